//! `weir retry-worker`: retries parked records (durable retries) until SIGTERM or SIGINT, with
//! the reference service's handlers. `weir serve` runs the same worker inside unless
//! `service.retry_worker = false`; run as many as you like (a key is retried by one at a time).

use crate::config::Settings;
use crate::reference::{self, Recorder, Services, TestHooks};
use anyhow::Context as _;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;
use weir::{KafkaBus, Metrics, ParkedMetrics, ParkedStore, ParkedWorker};

/// The worker for the reference service's handlers (the router `serve` consumes with, the
/// same test hooks included).
pub(crate) fn worker(
    settings: &Settings,
    hooks: TestHooks,
    services: &Services,
    store: ParkedStore,
    bus: &KafkaBus,
    metrics: &Metrics,
) -> anyhow::Result<ParkedWorker> {
    let recorder = Recorder::open(settings.service.record_file.as_deref())
        .context("cannot open service.record_file")?;
    let router = reference::router(&recorder, hooks, Some(services))?
        .retry(settings.retry.clone())
        .unhandled(settings.unhandled);
    Ok(ParkedWorker::new(
        store,
        router,
        Arc::new(bus.clone()),
        settings.consumer.dead_letter.clone(),
        metrics.clone(),
        ParkedMetrics::new(metrics.registry())?,
    ))
}

pub(crate) async fn run(settings: Settings) -> anyhow::Result<()> {
    let stop_requested = crate::stop_on_signal()?;
    let pool = crate::db::connect(&settings.database).await?;
    if settings.database.migrate_on_start {
        weir::migrate(&pool, &crate::db::migrations()).await?;
    }
    let services = Services {
        pool: pool.clone(),
        settings: Arc::new(settings.reference()),
    };
    let metrics = crate::telemetry::process_metrics()?;
    let bus = KafkaBus::with_metrics(settings.kafka.clone(), metrics.clone())?;
    let store = ParkedStore::new(pool.clone(), &settings.consumer.group_id);
    let worker = worker(
        &settings,
        settings.service.test_hooks(),
        &services,
        store,
        &bus,
        &metrics,
    )?;

    let stop = CancellationToken::new();
    let (admin_addr, admin) =
        crate::liveness::serve(settings.admin_addr, metrics.clone(), stop.clone()).await?;
    tracing::info!(group = %settings.consumer.group_id, %admin_addr, "Retrying parked records.");
    let reporter = settings.control.reporter(&bus, "retry-worker");
    // It consumes no topic: it reads the fleet commands to acknowledge them (as `ignored`).
    let commands = tokio::spawn(
        settings
            .control
            .commands(&bus, reporter.process_id())
            .run(stop.clone().cancelled_owned()),
    );
    let reporter = tokio::spawn(reporter.run(stop.clone().cancelled_owned()));
    let signal = stop.clone();
    tokio::spawn(async move {
        stop_requested.cancelled().await;
        tracing::info!("Shutdown requested; finishing the round in flight.");
        signal.cancel();
    });
    worker.run(stop.clone()).await;
    stop.cancel();
    let _ = reporter.await;
    let _ = commands.await;
    let _ = admin.await;
    pool.close().await;
    Ok(())
}
