//! Tasks through the outbox: while the stream runs, the soak asks the replicas' API for a task
//! every so often (`POST /tasks`, round robin over the replicas serving). The API writes the
//! task row and its `task.created` in one transaction; `weir outbox-relay` publishes the event;
//! the replicas record it and process the task's file. A SIGKILL of the relay must lose no
//! task: each task the API created must be handled and end completed.

use serde_json::json;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The API addresses of the replicas serving now, by process name.
pub(crate) type Apis = Arc<Mutex<BTreeMap<String, SocketAddr>>>;

/// What the task driver did.
#[derive(Default)]
pub(crate) struct TaskLog {
    /// Ids of the tasks the API answered 201 for, with the time of the answer (Unix ms).
    pub(crate) created: Vec<(String, i64)>,
    /// Requests that got no 201 (a replica going away, the database restarting).
    pub(crate) refused: u64,
}

/// A small valid customers file to process.
pub(crate) fn customers_csv() -> String {
    let mut text = String::from("id,name,email\n");
    for i in 0..5 {
        text.push_str(&format!("c{i},Name {i},c{i}@example.com\n"));
    }
    text
}

/// Creates a task every `every` until `stop`.
pub(crate) fn spawn(
    apis: Apis,
    file_url: String,
    every: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<TaskLog> {
    tokio::spawn(async move {
        let client = reqwest::Client::builder()
            .timeout(Duration::from_secs(5))
            .build()
            .expect("an HTTP client");
        let mut log = TaskLog::default();
        let mut tick = tokio::time::interval(every);
        let mut turn = 0usize;
        while !stop.load(Ordering::SeqCst) {
            tick.tick().await;
            let addrs: Vec<SocketAddr> = apis.lock().unwrap().values().copied().collect();
            if addrs.is_empty() {
                log.refused += 1;
                continue;
            }
            turn += 1;
            let addr = addrs[turn % addrs.len()];
            let answer = client
                .post(format!("http://{addr}/tasks"))
                .json(&json!({"file_url": file_url, "entity_type": "customers"}))
                .send()
                .await;
            let id = match answer {
                Ok(response) if response.status().as_u16() == 201 => response
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|body| body["id"].as_str().map(str::to_owned)),
                _ => None,
            };
            match id {
                Some(id) => log
                    .created
                    .push((id, chrono::Utc::now().timestamp_millis())),
                None => log.refused += 1,
            }
        }
        log
    })
}
