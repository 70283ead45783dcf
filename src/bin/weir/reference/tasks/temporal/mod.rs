//! Task processing on Temporal (feature `temporal`, with `[temporal] address` set): the Kafka
//! handler only starts a workflow; the workflow's activities do the work the inline handler
//! does, under a Temporal retry policy, resuming from heartbeats.
//!
//! - `models`: the workflow's and activities' inputs and outputs, plain data;
//! - `activities`: begin the run, count a chunk of the file (heartbeating), finish the run;
//! - `workflow`: `TaskProcessingWorkflow`, with its `progress` query;
//! - `registry`: the one place that registers both with a worker (binary start-up only);
//! - this file: the handlers of `task.created` and `task.processing_requested`, which start one
//!   workflow per event with `weir::temporal`.
//!
//! Workflow ids are `task-<task id>-<event id>`: one per event, so a redelivered record finds
//! its workflow started already, and `WorkflowId STARTS_WITH "task-<task id>"` lists a task's.

mod activities;
mod models;
mod registry;
mod workflow;

use crate::reference::events::{TaskCreated, TaskFields, TaskProcessingRequested};
use crate::reference::settings::ReferenceSettings;
use crate::reference::tasks::store::trigger_name;
use models::{ActivityPolicy, TaskRunInput};
pub(crate) use registry::spawn_worker;
use weir::temporal::{Temporal, WorkflowRequest};
use weir::{Ctx, HandlerOptions, RetryPolicy};
use workflow::TaskProcessingWorkflow;

/// The workflow id of the run that event `event_id` asks for on task `task_id`.
pub(crate) fn workflow_id(task_id: uuid::Uuid, event_id: uuid::Uuid) -> String {
    format!("task-{task_id}-{event_id}")
}

/// Registers the two handlers that start `TaskProcessingWorkflow`.
///
/// Their retry policy is the service's with no attempt limit: a start fails retryably only
/// while Temporal is unreachable or overloaded, and then the record must wait for it, not be
/// dead-lettered (a refused start is `Acknowledged` and dead-lettered at once).
pub(crate) fn handlers(
    router: weir::Router,
    all: &ReferenceSettings,
) -> anyhow::Result<weir::Router> {
    let settings = &all.temporal;
    let retry = RetryPolicy {
        maximum_attempts: 0,
        ..all.retry.clone()
    };
    let address = settings
        .address()
        .ok_or_else(|| anyhow::anyhow!("no [temporal] address"))?;
    let temporal = Temporal::new(address, &settings.namespace, &settings.task_queue)?
        .with_connect_timeout(settings.connect_timeout);
    let policy = ActivityPolicy {
        initial_interval_ms: millis(settings.initial_interval),
        backoff_coefficient: settings.backoff_coefficient,
        maximum_interval_ms: millis(settings.maximum_interval),
        maximum_attempts: settings.maximum_attempts,
        start_to_close_ms: millis(settings.start_to_close),
        heartbeat_timeout_ms: millis(settings.heartbeat_timeout),
        chunk_records: settings.chunk_records,
    };
    let request = move |fields: TaskFields, ctx: &Ctx| {
        WorkflowRequest::new(TaskRunInput {
            task_id: fields.task_id,
            event_id: ctx.event_id(),
            event_type: ctx.event().event_type.clone(),
            triggered_by: trigger_name(fields.triggered_by).to_owned(),
            policy: policy.clone(),
        })
        .id(workflow_id(fields.task_id, ctx.event_id()))
        .memo("task_id", fields.task_id.to_string())
    };
    let created = request.clone();
    Ok(router
        .on_with(
            temporal.starts(
                || TaskProcessingWorkflow::run,
                move |event: TaskCreated, ctx: &Ctx| created(event.0, ctx),
            ),
            HandlerOptions::new()
                .name("start_task_workflow")
                .retry(retry.clone()),
        )
        .on_with(
            temporal.starts(
                || TaskProcessingWorkflow::run,
                move |event: TaskProcessingRequested, ctx: &Ctx| request(event.0, ctx),
            ),
            HandlerOptions::new()
                .name("start_task_workflow")
                .retry(retry),
        ))
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
