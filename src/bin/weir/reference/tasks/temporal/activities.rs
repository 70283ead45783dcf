//! The task workflow's activities: the only code of the Temporal path that touches the file and
//! the database. They reuse the inline path's pieces (the run bookkeeping of `process`, the
//! `source` streaming, the `parse` validation), so both paths count a file the same way.
//!
//! - `begin_run`: one run per event (`task_runs`), the task row reset to `processing`;
//! - `process_chunk`: counts up to `max_records` records from a cursor, heartbeating the cursor
//!   and writing absolute counts to the task row every `progress_every` records. A retried
//!   attempt resumes from its last heartbeat: it re-reads the lines before it (a stream cannot
//!   seek) but validates and counts nothing twice;
//! - `finish_run`: the task `completed` with its counts, or `failed` with the reason.
//!
//! A file that can never be processed (missing, unsupported, a CSV header without the rule's
//! columns) fails non-retryably; a timeout or a 5xx fails retryably, under the workflow's retry
//! policy.

use super::models::{ChunkRequest, ChunkResult, Cursor, RunEnd, RunStart, TaskRunInput};
use crate::reference::tasks::parse::{EntityType, RecordParser, Verdict};
use crate::reference::tasks::process::{Begun, Counts, Failure, Processor};
use crate::reference::tasks::source::{Location, Source, SourceError};
use std::sync::Arc;
use temporalio_macros::activities;
use temporalio_sdk::activities::{ActivityContext, ActivityError};
use temporalio_sdk::ApplicationFailure;

/// The activities, sharing the inline processor's pool, HTTP client and settings.
pub(crate) struct TaskActivities {
    processor: Processor,
}

impl TaskActivities {
    pub(crate) fn new(processor: Processor) -> Self {
        Self { processor }
    }
}

/// The failure type name of a file that can never be processed (non-retryable).
pub(crate) const FILE_REJECTED: &str = "TaskFileRejected";

fn permanent(reason: String) -> ActivityError {
    ActivityError::application(
        ApplicationFailure::builder(reason)
            .type_name(FILE_REJECTED.to_owned())
            .non_retryable(true)
            .build(),
    )
}

fn transient(reason: String) -> ActivityError {
    ActivityError::application(ApplicationFailure::new(reason))
}

impl From<Failure> for ActivityError {
    fn from(failure: Failure) -> Self {
        match failure {
            Failure::Permanent(reason) => permanent(reason),
            Failure::Transient(reason) => transient(reason),
            Failure::Database(e) => transient(format!("database: {e}")),
            // Another run owns the task row now; this one must not write to it again.
            Failure::Superseded => permanent("superseded by a newer run of the task".into()),
        }
    }
}

#[activities]
impl TaskActivities {
    /// Starts (or continues) the run of the input's event.
    #[activity]
    pub(crate) async fn begin_run(
        self: Arc<Self>,
        _ctx: ActivityContext,
        input: TaskRunInput,
    ) -> Result<RunStart, ActivityError> {
        let begun = self
            .processor
            .begin(
                input.task_id,
                input.event_id,
                &input.event_type,
                &input.triggered_by,
            )
            .await
            .map_err(|e| transient(format!("database: {e}")))?;
        Ok(match begun {
            Begun::UnknownTask => RunStart::UnknownTask,
            Begun::Finished { run, outcome } => RunStart::Finished { run, outcome },
            Begun::Running {
                run,
                file_url,
                entity_type,
            } => RunStart::Running {
                run,
                file_url,
                entity_type,
            },
        })
    }

    /// Counts up to `max_records` records from the request's cursor, or from this chunk's last
    /// heartbeat when it is a retry.
    #[activity]
    pub(crate) async fn process_chunk(
        self: Arc<Self>,
        ctx: ActivityContext,
        request: ChunkRequest,
    ) -> Result<ChunkResult, ActivityError> {
        let resumed: Option<Cursor> = ctx.heartbeat_details().deserialize().unwrap_or(None);
        let from = resumed.unwrap_or(request.from);
        if resumed.is_some() {
            tracing::info!(task = %request.task_id, run = request.run, lines = from.lines,
                           attempt = ctx.info().attempt, "Resuming a chunk from its last heartbeat.");
        }
        let entity = EntityType::parse(&request.entity_type)
            .ok_or_else(|| permanent(format!("unknown entity type {:?}", request.entity_type)))?;
        let location = Location::parse(&request.file_url).map_err(permanent)?;
        let settings = self.processor.settings();
        let mut source = Source::open(&location, self.processor.client(), settings.fetch_timeout)
            .await
            .map_err(|e| ActivityError::from(Failure::from(e)))?;
        let mut parser = RecordParser::new(source.format, entity);
        let mut cursor = Cursor {
            bytes_total: source.size.and_then(|s| i64::try_from(s).ok()),
            ..from
        };
        let mut line = Vec::with_capacity(1024);
        // Past the lines already counted: only a CSV header is parsed again.
        for _ in 0..from.lines {
            if read(&mut source, &mut line).await? == 0 {
                break;
            }
            if parser.expects_header() {
                parser.line(&line).map_err(permanent)?;
            }
        }
        let every = settings.progress_every.max(1);
        // The chunk ends `max_records` records after where the workflow asked it to start, also
        // when this attempt resumed part-way through.
        let chunk_start = (request.from.good + request.from.bad) as u64;
        let mut since_progress = 0u64;
        loop {
            if (cursor.good + cursor.bad) as u64 - chunk_start >= request.max_records {
                return Ok(ChunkResult {
                    cursor,
                    done: false,
                });
            }
            let n = read(&mut source, &mut line).await?;
            if n == 0 {
                return Ok(ChunkResult { cursor, done: true });
            }
            cursor.lines += 1;
            cursor.bytes_read += n as i64;
            match parser.line(&line).map_err(permanent)? {
                Verdict::Skipped => continue,
                Verdict::Good => cursor.good += 1,
                Verdict::Bad(_) => cursor.bad += 1,
            }
            since_progress += 1;
            if since_progress >= every {
                since_progress = 0;
                self.processor
                    .progress(request.task_id, request.run, counts(cursor))
                    .await?;
                ctx.record_heartbeat(cursor)
                    .await
                    .map_err(|e| transient(format!("heartbeat: {e}")))?;
                if ctx.is_cancelled() {
                    return Err(ActivityError::cancelled());
                }
            }
        }
    }

    /// Records how the run ended on the task row and the run.
    #[activity]
    pub(crate) async fn finish_run(
        self: Arc<Self>,
        _ctx: ActivityContext,
        end: RunEnd,
    ) -> Result<(), ActivityError> {
        let result = match &end.result {
            Ok(cursor) => Ok(counts(*cursor)),
            Err(reason) => Err(reason.as_str()),
        };
        self.processor
            .finish(end.task_id, end.run, result)
            .await
            .map_err(|e| transient(format!("database: {e}")))
    }
}

async fn read(source: &mut Source, line: &mut Vec<u8>) -> Result<usize, ActivityError> {
    source
        .next_line(line)
        .await
        .map_err(|e: SourceError| ActivityError::from(Failure::from(e)))
}

fn counts(cursor: Cursor) -> Counts {
    Counts {
        good: cursor.good,
        bad: cursor.bad,
        bytes_read: cursor.bytes_read,
        bytes_total: cursor.bytes_total,
    }
}
