//! The one place that registers the task workflow and its activities with a worker; only the
//! binary's start-up (`weir serve` with `[temporal]`, `weir worker`) calls it.

use super::activities::TaskActivities;
use super::workflow::TaskProcessingWorkflow;
use crate::reference::settings::TemporalSettings;
use crate::reference::tasks::process::Processor;
use crate::reference::Services;
use anyhow::Context as _;
use std::time::Duration;
use temporalio_sdk::{Runtime, Worker, WorkerOptions};
use tokio_util::sync::CancellationToken;
use weir::temporal::Temporal;

/// The worker's options: the task queue, the workflow, the activities.
fn worker_options(task_queue: &str, services: &Services) -> anyhow::Result<WorkerOptions> {
    Ok(WorkerOptions::new(task_queue)
        .register_workflow::<TaskProcessingWorkflow>()
        .context("cannot register TaskProcessingWorkflow")?
        .register_activities(TaskActivities::new(Processor::new(services)))
        .build())
}

/// Runs the task worker until `stop`, on its own thread: the SDK's worker future is not `Send`.
///
/// While the server is unreachable it keeps trying to connect (every few seconds, logging
/// each failure), so a worker started before Temporal is simply late, not dead.
pub(crate) fn spawn_worker(
    settings: &TemporalSettings,
    services: &Services,
    stop: CancellationToken,
) -> anyhow::Result<std::thread::JoinHandle<anyhow::Result<()>>> {
    let address = settings
        .address()
        .context("no [temporal] address to run the worker against")?;
    let temporal = Temporal::new(address, &settings.namespace, &settings.task_queue)?
        .with_connect_timeout(settings.connect_timeout);
    let task_queue = settings.task_queue.clone();
    let options = worker_options(&task_queue, services)?;
    let thread = std::thread::Builder::new()
        .name("temporal-worker".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("cannot start the worker's runtime")?;
            runtime.block_on(run_worker(temporal, options, stop))
        })
        .context("cannot start the worker thread")?;
    Ok(thread)
}

async fn run_worker(
    temporal: Temporal,
    options: WorkerOptions,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let client = loop {
        match temporal.client().await {
            Ok(client) => break client,
            Err(e) => {
                tracing::warn!(error = %e, "Temporal worker cannot connect; retrying.");
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    () = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    };
    let runtime = Runtime::from_current_tokio(Default::default())
        .map_err(|e| anyhow::anyhow!("cannot start the Temporal runtime: {e}"))?;
    let mut worker = Worker::new(&runtime, client, options)
        .map_err(|e| anyhow::anyhow!("cannot create the Temporal worker: {e}"))?;
    let shutdown = worker.shutdown_handle();
    tokio::spawn(async move {
        stop.cancelled().await;
        shutdown();
    });
    tracing::info!(
        task_queue = temporal.task_queue(),
        namespace = temporal.namespace(),
        "Temporal worker running."
    );
    worker
        .run()
        .await
        .map_err(|e| anyhow::anyhow!("the Temporal worker stopped: {e}"))?;
    tracing::info!("Temporal worker stopped.");
    Ok(())
}
