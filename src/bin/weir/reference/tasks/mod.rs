//! Tasks processed by a handler, started by four triggers (API, manual, schedule, webhook)
//! that only publish events; the handler reports progress as it goes.
//!
//! - `api`: `POST /tasks`, `GET /tasks/{id}`, `POST /tasks/{id}/process`;
//! - `webhook`: `POST /webhooks/task-processing`, HMAC-signed;
//! - `schedule`: the cron schedule that sweeps pending tasks, one replica per tick;
//! - `store`: the task row as the API shows it, and [`store::request_processing`], the one way
//!   every trigger asks for processing (a `task.processing_requested` through the outbox);
//! - `process`: the handler of `task.created` and `task.processing_requested`;
//! - `source`: opening and streaming the file (`file://`, a path, `http://`);
//! - `parse`: record formats (CSV, JSON lines) and the validation rule of each entity type;
//! - `temporal` (feature `temporal`): the same processing as a Temporal workflow, started by
//!   the handlers when `[temporal] address` is set; its activities reuse `process`, `source`
//!   and `parse`.
//!
//! The triggers never import `process`: they write an event, and the handler runs wherever the
//! consumer group puts the task's key, which keeps the engine out of the API.

mod api;
mod create;
mod parse;
mod process;
mod schedule;
mod source;
pub(crate) mod store;
#[cfg(feature = "temporal")]
pub(crate) mod temporal;
mod webhook;

use super::api::Services;
use serde::{Deserialize, Serialize};
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir::seeds::{TaskCreated, TaskProcessingRequested};
use weir::{HandlerOptions, Migration};

/// The `tasks` table, before the resources' tables (the order it was always applied in).
pub(crate) const TABLE: &[Migration] = &[Migration::new(
    "reference/0001_tasks",
    include_str!("../migrations/reference_0001_tasks.sql"),
)];

/// The schema of task progress (`reference/0003_...`), after [`TABLE`].
pub(crate) const MIGRATIONS: &[Migration] = &[Migration::new(
    "reference/0003_tasks_progress",
    include_str!("../migrations/reference_0003_tasks_progress.sql"),
)];

/// Task processing and its triggers (`[tasks]`, `WEIR_TASKS__...`).
#[derive(Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TaskSettings {
    /// A cron expression with a seconds field (`sec min hour day-of-month month day-of-week
    /// [year]`, UTC), e.g. `0 */5 * * * *`; each tick requests processing of the pending tasks
    /// older than `pending_after`. None: no schedule. Checked when the configuration is read.
    #[serde(deserialize_with = "valid_schedule")]
    pub(crate) schedule: Option<String>,
    /// How long a task may stay pending before the schedule asks for it (again).
    #[serde(with = "humantime_serde")]
    pub(crate) pending_after: Duration,
    /// At most this many tasks are requested per tick; the rest wait for the next one.
    pub(crate) schedule_batch: i64,
    /// The shared secret of `POST /webhooks/task-processing`. None: the route answers 503.
    pub(crate) webhook_secret: Option<String>,
    /// A signed webhook call is accepted only this close to its `X-Weir-Timestamp`.
    #[serde(with = "humantime_serde")]
    pub(crate) webhook_window: Duration,
    /// Bounds connecting to an `http://` file and each read of a file; past it the attempt
    /// fails retryably.
    #[serde(with = "humantime_serde")]
    pub(crate) fetch_timeout: Duration,
    /// Records between two progress updates of a task row (1: after every record).
    pub(crate) progress_every: u64,
}

impl Default for TaskSettings {
    fn default() -> Self {
        Self {
            schedule: None,
            pending_after: Duration::from_secs(5 * 60),
            schedule_batch: 1000,
            webhook_secret: None,
            webhook_window: Duration::from_secs(5 * 60),
            fetch_timeout: Duration::from_secs(30),
            progress_every: 1000,
        }
    }
}

/// Where task processing runs when it runs on Temporal, and the activities' retry policy.
/// Without `address`, tasks are processed inline by the Kafka handler.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TemporalSettings {
    /// The Temporal frontend, `host:port` or `http://host:port`. None: no Temporal.
    pub(crate) address: Option<String>,
    /// The namespace the task workflows run in.
    pub(crate) namespace: String,
    /// The task queue the handlers start workflows on and the worker polls.
    pub(crate) task_queue: String,
    /// Bounds connecting to the server; a start that cannot connect is retried by the consumer.
    #[serde(with = "humantime_serde")]
    pub(crate) connect_timeout: Duration,
    /// The file activity's retry policy: first retry after this long...
    #[serde(with = "humantime_serde")]
    pub(crate) initial_interval: Duration,
    /// ...each next one this many times longer...
    pub(crate) backoff_coefficient: f64,
    /// ...at most this long apart...
    #[serde(with = "humantime_serde")]
    pub(crate) maximum_interval: Duration,
    /// ...and at most this many attempts in all (0: unlimited).
    pub(crate) maximum_attempts: u32,
    /// One attempt of an activity may run this long.
    #[serde(with = "humantime_serde")]
    pub(crate) start_to_close: Duration,
    /// An attempt that has not heartbeated for this long is presumed lost (its worker died) and
    /// retried from its last heartbeat.
    #[serde(with = "humantime_serde")]
    pub(crate) heartbeat_timeout: Duration,
    /// Records per file activity: the workflow's progress (its query) advances per chunk.
    pub(crate) chunk_records: u64,
    /// Run the worker inside `weir serve` (when `address` is set). Turn it off when workers run
    /// as their own deployment (`weir worker`).
    pub(crate) worker_in_serve: bool,
}

impl Default for TemporalSettings {
    fn default() -> Self {
        Self {
            address: None,
            namespace: "default".into(),
            task_queue: "weir-tasks".into(),
            connect_timeout: Duration::from_secs(5),
            initial_interval: Duration::from_secs(1),
            backoff_coefficient: 2.0,
            maximum_interval: Duration::from_secs(5 * 60),
            maximum_attempts: 3,
            start_to_close: Duration::from_secs(30 * 60),
            heartbeat_timeout: Duration::from_secs(30),
            chunk_records: 10_000,
            worker_in_serve: true,
        }
    }
}

impl TemporalSettings {
    /// The address, if Temporal is configured.
    pub(crate) fn address(&self) -> Option<&str> {
        self.address.as_deref().filter(|a| !a.trim().is_empty())
    }
}

/// Refuses a schedule cron cannot parse, so a typo stops the service at start.
fn valid_schedule<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let schedule = Option::<String>::deserialize(d)?.filter(|s| !s.trim().is_empty());
    if let Some(expression) = &schedule {
        schedule::parse(expression).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid cron expression {expression:?} (sec min hour day month weekday): {e}"
            ))
        })?;
    }
    Ok(schedule)
}

impl std::fmt::Debug for TaskSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The webhook secret is never printed, only whether there is one.
        f.debug_struct("TaskSettings")
            .field("schedule", &self.schedule)
            .field("pending_after", &self.pending_after)
            .field("schedule_batch", &self.schedule_batch)
            .field(
                "webhook_secret",
                &self.webhook_secret.as_ref().map(|_| "***"),
            )
            .field("webhook_window", &self.webhook_window)
            .field("fetch_timeout", &self.fetch_timeout)
            .field("progress_every", &self.progress_every)
            .finish()
    }
}

/// The task routes: the API and the webhook.
pub(crate) fn routes(services: &Services) -> axum::Router {
    api::routes(services).merge(webhook::routes(services))
}

/// Registers the processing handler for both events that start it: with `[temporal] address`,
/// handlers that start `TaskProcessingWorkflow`; without, the inline processor.
pub(crate) fn handlers(router: weir::Router, services: &Services) -> anyhow::Result<weir::Router> {
    if services.settings.temporal.address().is_some() {
        #[cfg(feature = "temporal")]
        return temporal::handlers(router, &services.settings);
        #[cfg(not(feature = "temporal"))]
        anyhow::bail!(
            "[temporal] address is set, but this weir was built without the `temporal` feature"
        );
    }
    Ok(inline_handlers(router, services))
}

/// The inline processor on both events (no Temporal).
fn inline_handlers(router: weir::Router, services: &Services) -> weir::Router {
    let processor = process::Processor::new(services);
    let created = processor.clone();
    router
        .on_with(
            move |event: TaskCreated, ctx| {
                let processor = created.clone();
                async move { processor.handle(event.0, ctx).await }
            },
            HandlerOptions::new().name("process_task"),
        )
        .on_with(
            move |event: TaskProcessingRequested, ctx| {
                let processor = processor.clone();
                async move { processor.handle(event.0, ctx).await }
            },
            HandlerOptions::new().name("process_task"),
        )
}

/// Background jobs (the schedule), stopped by `stop`.
pub(crate) fn spawn_background(
    services: &Services,
    stop: CancellationToken,
) -> Vec<JoinHandle<()>> {
    schedule::spawn(services, stop).into_iter().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_hides_the_webhook_secret() {
        let settings = TaskSettings {
            webhook_secret: Some("s3cr3t-value".into()),
            ..TaskSettings::default()
        };
        let text = format!("{settings:?}");
        assert!(text.contains("webhook_secret: Some"), "{text}");
        assert!(!text.contains("s3cr3t-value"), "{text}");
        assert!(text.contains("***"), "{text}");
    }
}
