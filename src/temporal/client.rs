//! The connection to Temporal, made on first use and kept.

use super::errors::TemporalError;
use std::sync::Arc;
use std::time::Duration;
use temporalio_client::{Client, ClientOptions, ConnectionOptions, RetryOptions, Url};
use tokio::sync::Mutex;

/// A Temporal client for handlers, connected lazily.
///
/// Connecting at start would make a service that also consumes other topics depend on Temporal
/// being up; instead the first start connects, and while the server is unreachable each start
/// fails `Retryable`, so its record waits and nothing else does.
#[derive(Clone)]
pub struct Temporal {
    inner: Arc<Inner>,
}

struct Inner {
    url: Url,
    namespace: String,
    task_queue: String,
    connect_timeout: Duration,
    client: Mutex<Option<Client>>,
}

impl std::fmt::Debug for Temporal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Temporal")
            .field("address", &self.inner.url.as_str())
            .field("namespace", &self.inner.namespace)
            .field("task_queue", &self.inner.task_queue)
            .finish()
    }
}

impl Temporal {
    /// A client for `address` (e.g. `http://127.0.0.1:7233`); nothing is connected yet.
    pub fn new(
        address: &str,
        namespace: impl Into<String>,
        task_queue: impl Into<String>,
    ) -> Result<Self, TemporalError> {
        let with_scheme = if address.contains("://") {
            address.to_owned()
        } else {
            format!("http://{address}")
        };
        let url = Url::parse(&with_scheme).map_err(|e| TemporalError::InvalidAddress {
            address: address.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            inner: Arc::new(Inner {
                url,
                namespace: namespace.into(),
                task_queue: task_queue.into(),
                connect_timeout: Duration::from_secs(5),
                client: Mutex::new(None),
            }),
        })
    }

    /// Bounds connecting (5 s by default); past it the start fails retryably.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        if let Some(inner) = Arc::get_mut(&mut self.inner) {
            inner.connect_timeout = timeout;
        }
        self
    }

    /// The default task queue of starts.
    pub fn task_queue(&self) -> &str {
        &self.inner.task_queue
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        &self.inner.namespace
    }

    /// The connected client, connecting first if needed. A failure is not cached: the next call
    /// tries again.
    pub async fn client(&self) -> Result<Client, TemporalError> {
        let mut slot = self.inner.client.lock().await;
        if let Some(client) = slot.as_ref() {
            return Ok(client.clone());
        }
        let connection = ConnectionOptions::new(self.inner.url.clone())
            .identity(format!("weir@{}", std::process::id()))
            .connect_timeout(self.inner.connect_timeout)
            // One start is one record's attempt; Weir's retry policy spaces the attempts, so the
            // client gives up quickly instead of holding the record for its own backoff.
            .retry_options(
                RetryOptions::builder()
                    .max_retries(2)
                    .max_elapsed_time(Some(self.inner.connect_timeout))
                    .build(),
            )
            .build();
        let options = ClientOptions::new(self.inner.namespace.clone()).build();
        let client =
            Client::connect(connection, options)
                .await
                .map_err(|e| TemporalError::Connect {
                    address: self.inner.url.to_string(),
                    source: Box::new(e),
                })?;
        *slot = Some(client.clone());
        Ok(client)
    }
}
