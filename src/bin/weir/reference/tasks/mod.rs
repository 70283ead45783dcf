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
use crate::reference::events::{TaskCreated, TaskProcessingRequested};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
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
