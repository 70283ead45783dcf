//! The reference service's settings: `[storage]`, `[tasks]`, `[temporal]` and what it takes of
//! `[retry]`. A leaf: the binary's configuration builds them, the services read them, and this
//! file imports neither, so settings flow one way.

use serde::{Deserialize, Deserializer, Serialize};
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

/// The settings the reference service reads. The binary's configuration hands them down
/// (`config::Settings::reference`); nothing here reads the configuration itself, so settings
/// flow one way.
#[derive(Clone, Default)]
pub(crate) struct ReferenceSettings {
    /// `[storage]`: where uploads live and how they are swept.
    pub(crate) storage: StorageSettings,
    /// `[tasks]`: the schedule, the webhook, file fetching.
    pub(crate) tasks: TaskSettings,
    /// `[retry] maximum_attempts`: a task run knows its last attempt by it.
    pub(crate) max_attempts: u32,
    /// `[retry]`: the start handlers of task workflows take its intervals, without its limit.
    #[cfg_attr(not(feature = "temporal"), allow(dead_code))]
    pub(crate) retry: weir::RetryPolicy,
    /// `[temporal]`: with an address, tasks are processed as Temporal workflows.
    pub(crate) temporal: TemporalSettings,
}

/// Where uploaded files live and how uploads are handled (`[storage]`, `WEIR_STORAGE__...`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct StorageSettings {
    /// The directory uploads and thumbnails are written to (`WEIR_STORAGE__DIR`).
    pub(crate) dir: PathBuf,
    /// Larger uploads are refused with 413.
    pub(crate) max_upload_bytes: u64,
    /// Thumbnails fit in a square of this many pixels.
    pub(crate) thumbnail_px: u32,
    /// How much of a text file the index reads (PostgreSQL caps a `tsvector` at 1 MB).
    pub(crate) index_text_bytes: u64,
    /// Run every side effect inside the upload request, before answering, as the service did
    /// before they moved to handlers. Only for measuring the difference (`weir bench-uploads`);
    /// the handlers still run afterwards and find the work done.
    pub(crate) inline_side_effects: bool,
    /// Temporary files and uploads without a row (what a killed process leaves) older than this
    /// are removed, at start and then this often; `"0s"` turns the sweep off.
    #[serde(with = "humantime_serde")]
    pub(crate) sweep_after: std::time::Duration,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("weir-storage"),
            max_upload_bytes: 64 * 1024 * 1024,
            thumbnail_px: 128,
            index_text_bytes: 256 * 1024,
            inline_side_effects: false,
            sweep_after: std::time::Duration::from_secs(3600),
        }
    }
}

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
fn valid_schedule<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    let schedule = Option::<String>::deserialize(d)?.filter(|s| !s.trim().is_empty());
    if let Some(expression) = &schedule {
        parse_schedule(expression).map_err(|e| {
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

/// Parses a cron expression with a seconds field (`sec min hour day-of-month month day-of-week
/// [year]`, UTC).
pub(crate) fn parse_schedule(expression: &str) -> Result<cron::Schedule, cron::error::Error> {
    cron::Schedule::from_str(expression)
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
