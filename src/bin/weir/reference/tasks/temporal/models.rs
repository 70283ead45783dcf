//! The data the task workflow and its activities exchange: plain, serializable, no behaviour.
//! Everything here is recorded in the workflow's history, so fields are only ever added.

// `pub`, not `pub(crate)`: the SDK's workflow macro puts the workflow's input, output and query
// types in `pub` signatures.
#![allow(unreachable_pub)]

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// The workflow's input: the event that asked for processing, and the policy to run it under
/// (passed in, not read from the worker's configuration, so a replay decides the same way).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRunInput {
    pub task_id: Uuid,
    pub event_id: Uuid,
    pub event_type: String,
    pub triggered_by: String,
    pub policy: ActivityPolicy,
}

/// The activities' timeouts and retry policy (`[temporal]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActivityPolicy {
    pub initial_interval_ms: u64,
    pub backoff_coefficient: f64,
    pub maximum_interval_ms: u64,
    /// 0: unlimited.
    pub maximum_attempts: u32,
    pub start_to_close_ms: u64,
    pub heartbeat_timeout_ms: u64,
    /// Records per `process_chunk` activity.
    pub chunk_records: u64,
}

/// What `begin_run` found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum RunStart {
    /// The task does not exist: nothing to do.
    UnknownTask,
    /// This event's run already ended (a redelivery after completion).
    Finished { run: i64, outcome: String },
    /// Process the file.
    Running {
        run: i64,
        file_url: String,
        entity_type: String,
    },
}

/// How far a run has read: lines consumed (header and blanks included) and the counts so far.
/// Also the heartbeat detail, so a retried chunk resumes here.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub lines: u64,
    pub good: i64,
    pub bad: i64,
    pub bytes_read: i64,
    pub bytes_total: Option<i64>,
}

/// One chunk of a file to count.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkRequest {
    pub task_id: Uuid,
    pub run: i64,
    pub file_url: String,
    pub entity_type: String,
    pub from: Cursor,
    pub max_records: u64,
}

/// Where a chunk stopped.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChunkResult {
    pub cursor: Cursor,
    /// The end of the file was reached.
    pub done: bool,
}

/// How a run ended, for `finish_run`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunEnd {
    pub task_id: Uuid,
    pub run: i64,
    /// Ok: the final counts; Err: why it failed.
    pub result: Result<Cursor, String>,
}

/// What the `progress` query answers.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// `starting`, `processing`, `completed`, `failed` or `skipped`.
    pub phase: String,
    pub run: Option<i64>,
    /// Counts as of the last finished chunk.
    pub cursor: Cursor,
    pub chunks: u32,
    pub error: Option<String>,
}

/// The workflow's result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TaskRunOutcome {
    pub task_id: Uuid,
    pub run: Option<i64>,
    pub good: i64,
    pub bad: i64,
}
