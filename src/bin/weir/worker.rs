//! `weir worker`: the Temporal worker of task processing alone, so workers and consumers scale
//! apart; `weir serve` runs the same worker beside its consumer unless told not to.

use crate::config::Settings;
use crate::reference::Services;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// A running worker (its thread).
pub(crate) type WorkerThread = std::thread::JoinHandle<anyhow::Result<()>>;

/// Starts the task worker, stopped by `stop`.
#[cfg(feature = "temporal")]
pub(crate) fn spawn(services: &Services, stop: CancellationToken) -> anyhow::Result<WorkerThread> {
    crate::reference::tasks::temporal::spawn_worker(&services.settings.temporal, services, stop)
}

/// Without the `temporal` feature there is no worker to start.
#[cfg(not(feature = "temporal"))]
pub(crate) fn spawn(_: &Services, _: CancellationToken) -> anyhow::Result<WorkerThread> {
    anyhow::bail!(
        "[temporal] address is set, but this weir was built without the `temporal` feature"
    )
}

/// Waits for the worker's thread to end, logging how it ended.
pub(crate) async fn join(worker: WorkerThread) {
    match tokio::task::spawn_blocking(move || worker.join()).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::error!(error = %format!("{e:#}"), "The Temporal worker failed."),
        _ => tracing::error!("The Temporal worker panicked."),
    }
}

/// `weir worker`: needs `[database] url` (the activities write the task rows) and
/// `[temporal] address`; runs until SIGTERM/SIGINT.
pub(crate) async fn run(settings: Settings, stop: CancellationToken) -> anyhow::Result<()> {
    anyhow::ensure!(
        settings.temporal.address().is_some(),
        "weir worker needs [temporal] address (WEIR_TEMPORAL__ADDRESS)"
    );
    anyhow::ensure!(
        settings.database.url.is_some(),
        "weir worker needs [database] url (WEIR_DATABASE__URL): its activities write the tasks"
    );
    let pool = crate::db::connect(&settings.database).await?;
    if settings.database.migrate_on_start {
        weir::migrate(&pool, &crate::db::migrations()).await?;
    }
    let services = Services {
        pool,
        settings: Arc::new(settings.reference()),
    };
    // Seen by the fleet like every other process: status reports (no partitions, no routes),
    // and the fleet commands read to acknowledge them (as `ignored`: it consumes no topic).
    let metrics = crate::telemetry::process_metrics()?;
    let bus = weir::KafkaBus::with_metrics(settings.kafka.clone(), metrics)?;
    let reporter = settings.control.reporter(&bus, "worker");
    let commands = settings.control.commands(&bus, reporter.process_id());
    let reported = CancellationToken::new();
    let reporter = tokio::spawn(reporter.run(reported.clone().cancelled_owned()));
    let commands = tokio::spawn(commands.run(reported.clone().cancelled_owned()));
    let worker = spawn(&services, stop.clone())?;
    let announce = stop.clone();
    tokio::spawn(async move {
        announce.cancelled().await;
        tracing::info!("Shutdown requested; stopping the worker.");
    });
    join(worker).await;
    reported.cancel();
    let _ = reporter.await;
    let _ = commands.await;
    services.pool.close().await;
    Ok(())
}
