//! Seed 000: tasks processed by a handler, started by four triggers (API, manual, schedule,
//! webhook) that only publish events. (Being built: issue 9.)

use super::api::Services;
use serde::{Deserialize, Serialize};
use weir::Migration;

/// The schema of task progress (`reference/0003_...`), after `weir::TASK_MIGRATIONS`.
pub(crate) const MIGRATIONS: &[Migration] = &[];
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Task processing and its triggers (`[tasks]`, `WEIR_TASKS__...`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct TaskSettings {}

/// The task routes.
pub(crate) fn routes(_services: &Services) -> axum::Router {
    axum::Router::new()
}

/// Registers the task processing handler.
pub(crate) fn handlers(router: weir::Router, _services: &Services) -> weir::Router {
    router
}

/// Background jobs (the schedule), stopped by `stop`.
pub(crate) fn spawn_background(
    _services: &Services,
    _stop: CancellationToken,
) -> Vec<JoinHandle<()>> {
    Vec::new()
}
