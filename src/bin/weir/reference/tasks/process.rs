//! The processing handler of `task.created` and `task.processing_requested`: streams the task's
//! file, validates each record, and keeps the task row's counts and progress up to date.
//!
//! # Idempotence
//! Each event is one *run* (`task_runs`, unique on the event id). A redelivered event (after a
//! crash, a rebalance or a retry) continues as the same run, counting the file again from the
//! start; a run that already finished is not redone, so a redelivery after completion changes
//! nothing. A new trigger is a new run, which recounts the file. Counts and progress are written
//! as absolute values (`SET good_records = $n`, never `+ 1`), so however often a run restarts,
//! or a completed task is requested again, it ends with the counts of a single run. Events of
//! one task share its key, so the consumer's key order runs them one after the other.
//!
//! # Errors
//! - a missing, unreadable or unsupported file, an unknown entity type, a CSV header without
//!   the rule's columns: the task is marked `failed` with the reason, *then* the handler returns
//!   `Acknowledged` (so the event goes to `task-events.dlq`, and the row already says why);
//! - a timeout, a refused connection, an HTTP 5xx: `Retryable`, and the row's `error` says it
//!   is being retried; on the last attempt the task is marked `failed` first;
//! - a database error: `Retryable` (nothing is marked: the database is what failed).

use super::parse::{EntityType, RecordParser, Verdict};
use super::source::{Location, Source, SourceError};
use super::store::trigger_name;
use crate::reference::events::TaskFields;
use crate::reference::settings::TaskSettings;
use crate::reference::Services;
use sqlx::PgPool;
use std::sync::Arc;
use uuid::Uuid;
use weir::{Ctx, HandlerError};

/// What the handler holds: the pool, an HTTP client, the settings.
#[derive(Clone)]
pub(super) struct Processor {
    pool: PgPool,
    client: reqwest::Client,
    settings: Arc<TaskSettings>,
    /// The retry policy's `maximum_attempts` (0: unlimited), to know the last attempt.
    max_attempts: u32,
}

/// How far a run got.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Counts {
    pub(super) good: i64,
    pub(super) bad: i64,
    pub(super) bytes_read: i64,
    pub(super) bytes_total: Option<i64>,
}

/// Where [`Processor::begin`] left a run.
pub(super) enum Begun {
    /// No such task.
    UnknownTask,
    /// This event's run already ended with `outcome`.
    Finished { run: i64, outcome: String },
    /// The run is on (the task row now names it); its file and entity type.
    Running {
        run: i64,
        file_url: String,
        entity_type: String,
    },
}

/// Why a run stopped early.
pub(super) enum Failure {
    /// The file can never be processed as it is.
    Permanent(String),
    /// Trying again may work.
    Transient(String),
    /// The database failed (retry; nothing can be recorded).
    Database(sqlx::Error),
    /// Another run of this task took over (this one lost its key in a rebalance).
    Superseded,
}

impl From<sqlx::Error> for Failure {
    fn from(e: sqlx::Error) -> Self {
        Failure::Database(e)
    }
}

impl From<SourceError> for Failure {
    fn from(e: SourceError) -> Self {
        match e {
            SourceError::Permanent(reason) => Failure::Permanent(reason),
            SourceError::Transient(reason) => Failure::Transient(reason),
        }
    }
}

impl Processor {
    pub(super) fn new(services: &Services) -> Self {
        let settings = &services.settings;
        let client = reqwest::Client::builder()
            .connect_timeout(settings.tasks.fetch_timeout)
            .read_timeout(settings.tasks.fetch_timeout)
            .build()
            .unwrap_or_else(|e| {
                // Only a TLS backend can fail to start, and this client has none.
                tracing::error!(error = %e, "Cannot build the HTTP client; using one without timeouts.");
                reqwest::Client::new()
            });
        Self {
            pool: services.pool.clone(),
            client,
            settings: Arc::new(settings.tasks.clone()),
            max_attempts: settings.max_attempts,
        }
    }

    /// The HTTP client files are fetched with.
    #[cfg_attr(not(feature = "temporal"), allow(dead_code))]
    pub(super) fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// The task settings.
    #[cfg_attr(not(feature = "temporal"), allow(dead_code))]
    pub(super) fn settings(&self) -> &TaskSettings {
        &self.settings
    }

    /// Processes the task `fields` names, as the run of `ctx`'s event.
    pub(super) async fn handle(&self, fields: TaskFields, ctx: Ctx) -> Result<(), HandlerError> {
        let task_id = fields.task_id;
        let begun = self
            .begin(
                task_id,
                ctx.event_id(),
                &ctx.event().event_type,
                trigger_name(fields.triggered_by),
            )
            .await
            .map_err(HandlerError::retryable)?;
        let (run, file_url, entity_type) = match begun {
            Begun::UnknownTask => {
                return Err(HandlerError::acknowledged(format!("no task {task_id}"))
                    .with_kind("unknown_task"))
            }
            Begun::Finished { run, outcome } => {
                tracing::info!(task = %task_id, run, %outcome, "Run already finished; not redone.");
                return Ok(());
            }
            Begun::Running {
                run,
                file_url,
                entity_type,
            } => (run, file_url, entity_type),
        };

        match self.count(task_id, run, &file_url, &entity_type).await {
            Ok(counts) => {
                self.finish(task_id, run, Ok(counts))
                    .await
                    .map_err(HandlerError::retryable)?;
                tracing::info!(
                    task = %task_id,
                    run,
                    triggered_by = trigger_name(fields.triggered_by),
                    good = counts.good,
                    bad = counts.bad,
                    "Task processed."
                );
                Ok(())
            }
            Err(Failure::Permanent(reason)) => {
                self.finish(task_id, run, Err(&reason))
                    .await
                    .map_err(HandlerError::retryable)?;
                tracing::warn!(task = %task_id, run, %reason, "Task failed.");
                Err(HandlerError::acknowledged(reason).with_kind("task_failed"))
            }
            Err(Failure::Transient(reason)) => {
                let last = self.max_attempts != 0 && ctx.attempt() >= self.max_attempts;
                if last {
                    let reason = format!("gave up after {} attempts: {reason}", ctx.attempt());
                    self.finish(task_id, run, Err(&reason))
                        .await
                        .map_err(HandlerError::retryable)?;
                } else {
                    sqlx::query(
                        "UPDATE tasks SET error = $3, updated_at = now()
                          WHERE id = $1 AND current_run = $2",
                    )
                    .bind(task_id)
                    .bind(run)
                    .bind(format!("retrying: {reason}"))
                    .execute(&self.pool)
                    .await
                    .map_err(HandlerError::retryable)?;
                }
                Err(HandlerError::retryable(reason))
            }
            Err(Failure::Database(e)) => Err(HandlerError::retryable(e)),
            Err(Failure::Superseded) => Err(HandlerError::retryable(format!(
                "run {run} of task {task_id} was superseded"
            ))),
        }
    }

    /// Starts (or continues) the run of event `event_id` on task `task_id`: one `task_runs` row
    /// per event, and the task row reset to `processing` with zero counts, unless that run
    /// already finished. Shared by the inline handler and the Temporal activities.
    pub(super) async fn begin(
        &self,
        task_id: Uuid,
        event_id: Uuid,
        event_type: &str,
        triggered_by: &str,
    ) -> Result<Begun, sqlx::Error> {
        // The row is the truth (a manual event may carry stale fields); the event names it.
        let task: Option<(String, String)> =
            sqlx::query_as("SELECT file_url, entity_type FROM tasks WHERE id = $1")
                .bind(task_id)
                .fetch_optional(&self.pool)
                .await?;
        let Some((file_url, entity_type)) = task else {
            return Ok(Begun::UnknownTask);
        };
        let (run, outcome): (i64, Option<String>) = sqlx::query_as(
            "INSERT INTO task_runs (task_id, event_id, event_type, triggered_by)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (event_id) DO UPDATE SET attempts = task_runs.attempts + 1
             RETURNING id, outcome",
        )
        .bind(task_id)
        .bind(event_id)
        .bind(event_type)
        .bind(triggered_by)
        .fetch_one(&self.pool)
        .await?;
        if let Some(outcome) = outcome {
            return Ok(Begun::Finished { run, outcome });
        }
        sqlx::query(
            "UPDATE tasks SET status = 'processing', current_run = $2, processed_records = 0,
                    good_records = 0, bad_records = 0, bytes_read = 0, bytes_total = NULL,
                    error = NULL, started_at = now(), finished_at = NULL, updated_at = now()
              WHERE id = $1",
        )
        .bind(task_id)
        .bind(run)
        .execute(&self.pool)
        .await?;
        Ok(Begun::Running {
            run,
            file_url,
            entity_type,
        })
    }

    /// Reads the file and counts its records, writing progress every `progress_every` records.
    async fn count(
        &self,
        task_id: Uuid,
        run: i64,
        file_url: &str,
        entity_type: &str,
    ) -> Result<Counts, Failure> {
        let entity = EntityType::parse(entity_type)
            .ok_or_else(|| Failure::Permanent(format!("unknown entity type {entity_type:?}")))?;
        let location = Location::parse(file_url).map_err(Failure::Permanent)?;
        let mut source = Source::open(&location, &self.client, self.settings.fetch_timeout).await?;
        let mut parser = RecordParser::new(source.format, entity);
        let mut counts = Counts {
            bytes_total: source.size.and_then(|s| i64::try_from(s).ok()),
            ..Counts::default()
        };
        let every = self.settings.progress_every.max(1);
        let mut line = Vec::with_capacity(1024);
        loop {
            let read = source.next_line(&mut line).await?;
            if read == 0 {
                return Ok(counts);
            }
            counts.bytes_read += read as i64;
            match parser.line(&line).map_err(Failure::Permanent)? {
                Verdict::Skipped => continue,
                Verdict::Good => counts.good += 1,
                Verdict::Bad(_) => counts.bad += 1,
            }
            if (counts.good + counts.bad) as u64 % every == 0 {
                self.progress(task_id, run, counts).await?;
            }
        }
    }

    /// Writes the run's absolute counts so far.
    pub(super) async fn progress(
        &self,
        task_id: Uuid,
        run: i64,
        counts: Counts,
    ) -> Result<(), Failure> {
        let updated = sqlx::query(
            "UPDATE tasks SET processed_records = $3, good_records = $4, bad_records = $5,
                    bytes_read = $6, bytes_total = $7, updated_at = now()
              WHERE id = $1 AND current_run = $2",
        )
        .bind(task_id)
        .bind(run)
        .bind(counts.good + counts.bad)
        .bind(counts.good)
        .bind(counts.bad)
        .bind(counts.bytes_read)
        .bind(counts.bytes_total)
        .execute(&self.pool)
        .await?;
        if updated.rows_affected() == 0 {
            return Err(Failure::Superseded);
        }
        Ok(())
    }

    /// Records the end of a run on the task and the run, in one transaction.
    pub(super) async fn finish(
        &self,
        task_id: Uuid,
        run: i64,
        result: Result<Counts, &str>,
    ) -> Result<(), sqlx::Error> {
        let mut tx = self.pool.begin().await?;
        match result {
            Ok(counts) => {
                sqlx::query(
                    "UPDATE tasks SET status = 'completed', processed_records = $3,
                            good_records = $4, bad_records = $5, bytes_read = $6,
                            bytes_total = COALESCE($7, $6), error = NULL, finished_at = now(),
                            updated_at = now()
                      WHERE id = $1 AND current_run = $2",
                )
                .bind(task_id)
                .bind(run)
                .bind(counts.good + counts.bad)
                .bind(counts.good)
                .bind(counts.bad)
                .bind(counts.bytes_read)
                .bind(counts.bytes_total)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE task_runs SET outcome = 'completed', finished_at = now(),
                            good_records = $2, bad_records = $3
                      WHERE id = $1",
                )
                .bind(run)
                .bind(counts.good)
                .bind(counts.bad)
                .execute(&mut *tx)
                .await?;
            }
            Err(reason) => {
                sqlx::query(
                    "UPDATE tasks SET status = 'failed', error = $3, finished_at = now(),
                            updated_at = now()
                      WHERE id = $1 AND current_run = $2",
                )
                .bind(task_id)
                .bind(run)
                .bind(reason)
                .execute(&mut *tx)
                .await?;
                sqlx::query(
                    "UPDATE task_runs SET outcome = 'failed', finished_at = now(), error = $2
                      WHERE id = $1",
                )
                .bind(run)
                .bind(reason)
                .execute(&mut *tx)
                .await?;
            }
        }
        tx.commit().await
    }
}
