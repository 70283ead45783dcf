use crate::contracts::{Envelope, Event, Headers, CLOUDEVENTS_CONTENT_TYPE};
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A record to publish, already encoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboundRecord {
    /// Destination topic.
    pub topic: String,
    /// Record key: decides the partition.
    pub key: Option<Vec<u8>>,
    /// Record value.
    pub value: Option<Vec<u8>>,
    /// Record headers.
    pub headers: Headers,
}

/// Where an acknowledged record was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
}

/// Why a publish was not acknowledged.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    /// The event could not be serialized.
    #[error("could not encode the event: {0}")]
    Encode(#[from] serde_json::Error),
    /// The in-memory bus's partition stayed full for the whole publish timeout.
    #[error(
        "partition {partition} of `{topic}` stayed full for {waited:?}; is a consumer running?"
    )]
    QueueFull {
        /// Topic.
        topic: String,
        /// Partition.
        partition: i32,
        /// How long the publish waited for room.
        waited: Duration,
    },
    /// The broker did not acknowledge within the delivery timeout.
    #[error(
        "`{topic}`: not acknowledged within {timeout:?} (is the broker reachable?): {message}"
    )]
    Timeout {
        /// Topic.
        topic: String,
        /// The configured delivery timeout.
        timeout: Duration,
        /// The client's last error.
        message: String,
    },
    /// The broker rejected the record, or the client failed.
    #[error("`{topic}`: {message}")]
    Broker {
        /// Topic.
        topic: String,
        /// The broker's or client's error.
        message: String,
    },
}

/// A future that can be stored behind `dyn`.
pub(crate) type PublishFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Delivery, PublishError>> + Send + 'a>>;

/// Publishes raw records and resolves once the broker has acknowledged them.
///
/// Object-safe so the engine can dead-letter through any transport; typed publishing comes from
/// [`PublishExt`], implemented for every publisher.
pub trait Publisher: Send + Sync {
    /// Publishes one record; resolves after acknowledgement.
    fn publish_record(&self, record: OutboundRecord) -> PublishFuture<'_>;
}

/// Typed publishing: an event in, a CloudEvents record out.
pub trait PublishExt: Publisher {
    /// Publishes an event as a structured-mode CloudEvent, keyed by its entity id.
    fn publish<T: Event>(
        &self,
        envelope: &Envelope<T>,
    ) -> impl Future<Output = Result<Delivery, PublishError>> + Send {
        let record = encode(envelope);
        async move { self.publish_record(record?).await }
    }
}

impl<P: Publisher + ?Sized> PublishExt for P {}

/// The record Weir publishes for an event.
pub(crate) fn encode<T: Event>(envelope: &Envelope<T>) -> Result<OutboundRecord, PublishError> {
    Ok(OutboundRecord {
        topic: T::TOPIC.to_owned(),
        key: Some(envelope.key().into_bytes()),
        value: Some(envelope.to_structured()?),
        headers: Headers::new().with("content-type", CLOUDEVENTS_CONTENT_TYPE),
    })
}

/// Runs a transport's publish inside a `send` span whose context goes into the headers. The span
/// is created on first poll, so it is a child of whatever span the caller awaits it in (also
/// when the caller wraps the future with `.instrument(span)`).
pub(crate) fn traced<'a, F>(
    mut record: OutboundRecord,
    send: impl FnOnce(OutboundRecord) -> F + Send + 'a,
) -> PublishFuture<'a>
where
    F: Future<Output = Result<Delivery, PublishError>> + Send + 'a,
{
    use tracing::Instrument;
    Box::pin(async move {
        let span = crate::telemetry::trace::publish_span(&record.topic);
        async move {
            crate::telemetry::trace::inject_current(&mut record.headers);
            send(record).await
        }
        .instrument(span)
        .await
    })
}
