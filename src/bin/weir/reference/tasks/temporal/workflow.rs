//! `TaskProcessingWorkflow`: one processing request of one task, as a durable workflow.
//!
//! `begin_run`, then `process_chunk` until the end of the file (each chunk resumes from the
//! cursor the previous one returned, and a retried chunk from its last heartbeat), then
//! `finish_run`. A chunk that fails for good (a non-retryable failure, or the retry policy's
//! attempts spent) marks the task `failed` with the activity's error and fails the workflow with
//! it, so `GET /tasks/{id}` and `temporal workflow describe` tell the same story.
//!
//! The `progress` query answers from the workflow's state: the phase and the counts as of the
//! last finished chunk (the task row has the finer, per-`progress_every` counts).

#![allow(unreachable_pub)] // the SDK's macros generate `pub` marker types

use super::activities::TaskActivities;
use super::models::{
    ActivityPolicy, ChunkRequest, Cursor, Progress, RunEnd, RunStart, TaskRunInput, TaskRunOutcome,
};
use std::time::Duration;
use temporalio_common::protos::temporal::api::failure::v1::Failure as FailureProto;
use temporalio_common::RetryPolicy;
use temporalio_macros::{workflow, workflow_methods};
use temporalio_sdk::{
    ActivityExecutionError, ActivityOptions, ApplicationFailure, WorkflowContext,
    WorkflowContextView, WorkflowResult,
};

/// The workflow's state: what the `progress` query shows.
#[workflow]
#[derive(Default)]
pub struct TaskProcessingWorkflow {
    progress: Progress,
}

/// The options of the file activity (the configured retry policy and timeouts).
fn chunk_options(policy: &ActivityPolicy) -> ActivityOptions {
    ActivityOptions::with_start_to_close_timeout(Duration::from_millis(policy.start_to_close_ms))
        .heartbeat_timeout(Duration::from_millis(policy.heartbeat_timeout_ms))
        .retry_policy(retry_policy(policy))
        .build()
}

/// The options of the bookkeeping activities: short database writes, same retry policy.
fn bookkeeping_options(policy: &ActivityPolicy) -> ActivityOptions {
    ActivityOptions::with_start_to_close_timeout(Duration::from_secs(60))
        .retry_policy(retry_policy(policy))
        .build()
}

fn retry_policy(policy: &ActivityPolicy) -> RetryPolicy {
    RetryPolicy::builder()
        .initial_interval(Duration::from_millis(policy.initial_interval_ms))
        .backoff_coefficient(policy.backoff_coefficient)
        .maximum_interval(Duration::from_millis(policy.maximum_interval_ms))
        .maximum_attempts(policy.maximum_attempts)
        .non_retryable_error_types([super::activities::FILE_REJECTED])
        .build()
}

/// The innermost message of an activity failure (the activity's own error, not the wrapper's
/// "activity task failed").
fn failure_message(error: &ActivityExecutionError) -> String {
    let Some(mut failure) = error.failure() else {
        return error.to_string();
    };
    let mut chain: Vec<&FailureProto> = vec![failure];
    while let Some(cause) = failure.cause.as_deref() {
        chain.push(cause);
        failure = cause;
    }
    chain
        .iter()
        .rev()
        .map(|f| f.message.trim())
        .find(|m| !m.is_empty())
        .unwrap_or("the activity failed")
        .to_owned()
}

#[workflow_methods]
impl TaskProcessingWorkflow {
    #[run]
    pub async fn run(
        ctx: &mut WorkflowContext<Self>,
        input: TaskRunInput,
    ) -> WorkflowResult<TaskRunOutcome> {
        ctx.state_mut(|s| s.progress.phase = "starting".into());
        let policy = input.policy.clone();
        let task_id = input.task_id;
        let start = ctx
            .execute_activity(
                TaskActivities::begin_run,
                input,
                bookkeeping_options(&policy),
            )
            .await?;
        let (run, file_url, entity_type) = match start {
            RunStart::UnknownTask | RunStart::Finished { .. } => {
                let run = match start {
                    RunStart::Finished { run, .. } => Some(run),
                    _ => None,
                };
                ctx.state_mut(|s| {
                    s.progress.phase = "skipped".into();
                    s.progress.run = run;
                });
                return Ok(TaskRunOutcome {
                    task_id,
                    run,
                    good: 0,
                    bad: 0,
                });
            }
            RunStart::Running {
                run,
                file_url,
                entity_type,
            } => (run, file_url, entity_type),
        };
        ctx.state_mut(|s| {
            s.progress.phase = "processing".into();
            s.progress.run = Some(run);
        });
        let mut cursor = Cursor::default();
        loop {
            let request = ChunkRequest {
                task_id,
                run,
                file_url: file_url.clone(),
                entity_type: entity_type.clone(),
                from: cursor,
                max_records: policy.chunk_records.max(1),
            };
            match ctx
                .execute_activity(
                    TaskActivities::process_chunk,
                    request,
                    chunk_options(&policy),
                )
                .await
            {
                Ok(chunk) => {
                    cursor = chunk.cursor;
                    ctx.state_mut(|s| {
                        s.progress.cursor = cursor;
                        s.progress.chunks += 1;
                    });
                    if chunk.done {
                        break;
                    }
                }
                Err(error) => {
                    let reason = failure_message(&error);
                    ctx.state_mut(|s| {
                        s.progress.phase = "failed".into();
                        s.progress.error = Some(reason.clone());
                    });
                    ctx.execute_activity(
                        TaskActivities::finish_run,
                        RunEnd {
                            task_id,
                            run,
                            result: Err(reason.clone()),
                        },
                        bookkeeping_options(&policy),
                    )
                    .await?;
                    return Err(ApplicationFailure::non_retryable(reason).into());
                }
            }
        }
        ctx.execute_activity(
            TaskActivities::finish_run,
            RunEnd {
                task_id,
                run,
                result: Ok(cursor),
            },
            bookkeeping_options(&policy),
        )
        .await?;
        ctx.state_mut(|s| s.progress.phase = "completed".into());
        Ok(TaskRunOutcome {
            task_id,
            run: Some(run),
            good: cursor.good,
            bad: cursor.bad,
        })
    }

    /// The phase and counts so far.
    #[query]
    pub fn progress(&self, _ctx: &WorkflowContextView) -> Progress {
        self.progress.clone()
    }
}
