//! `weir serve`: the reference service on the configured brokers, until SIGTERM or SIGINT.
//!
//! Without a database it consumes the seed topics with the recording handlers only. With one
//! (`[database] url`) it is the whole service: the resource and task handlers, the HTTP API, the
//! schedule, (unless `service.relay = false`) the outbox relay, and with `[temporal] address`
//! (unless `temporal.worker_in_serve = false`) the Temporal worker of task processing.

use crate::config::Settings;
use crate::reference::{self, Recorder, Services};
use anyhow::Context as _;
use std::future::IntoFuture as _;
use std::sync::Arc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use weir::{Bus, KafkaBus, OutboxMetrics, OutboxRelay, ParkedStore};

/// Serves until `stop_requested` is cancelled (by a signal). A stop requested while the service
/// is still starting (connecting, migrating, joining the group) ends it cleanly too.
pub(crate) async fn run(
    settings: Settings,
    stop_requested: CancellationToken,
) -> anyhow::Result<()> {
    let running = tokio::select! {
        running = start(settings) => running?,
        () = stop_requested.cancelled() => {
            tracing::info!("Stop requested during start-up; exiting.");
            return Ok(());
        }
    };
    running.serve(stop_requested).await
}

/// A started service: the consumer, and the jobs that stop after it has drained.
struct Running {
    subscription: weir::Subscription,
    services: Option<Services>,
    jobs: Vec<JoinHandle<()>>,
    /// The Temporal worker's thread, when it runs here.
    worker: Option<crate::worker::WorkerThread>,
    stop: CancellationToken,
}

async fn start(settings: Settings) -> anyhow::Result<Running> {
    let settings = Arc::new(settings);
    let recorder = Recorder::open(settings.service.record_file.as_deref())
        .context("cannot open service.record_file")?;
    let services = match settings.database.url {
        Some(_) => {
            let pool = crate::db::connect(&settings.database).await?;
            if settings.database.migrate_on_start {
                weir::migrate(&pool, &crate::db::migrations()).await?;
            }
            Some(Services {
                pool,
                settings: Arc::new(settings.reference()),
            })
        }
        None => None,
    };
    let metrics = crate::telemetry::process_metrics()?;
    let bus = KafkaBus::with_metrics(settings.kafka.clone(), metrics.clone())?;
    let hooks = settings.service.test_hooks();
    let mut router = reference::router(&recorder, hooks, services.as_ref())?
        .retry(settings.retry.clone())
        .unhandled(settings.unhandled);
    settings.apply_routes(&mut router)?;
    // Durable retries need the database: without one, [retry.durable] has nowhere to park and
    // records are dead-lettered after the in-place attempts as usual.
    let parked = match (&services, &settings.retry.durable) {
        (Some(services), Some(_)) => {
            let store = ParkedStore::new(services.pool.clone(), &settings.consumer.group_id);
            router = router.durable_retries(&store);
            Some(store)
        }
        (None, Some(_)) => {
            tracing::warn!("[retry.durable] is set but no database is configured; records are dead-lettered after the in-place attempts.");
            None
        }
        _ => None,
    };
    let topics = router.topics();
    let subscription = bus.subscribe(router, settings.serve_consumer(services.is_some()))?;
    // Every topic is held until the fleet commands in force are read (before the group can
    // assign a partition), so a partition a command paused comes to this replica paused.
    let process_id = weir::ProcessInfo::current("serve").id;
    let mut commands = settings
        .control
        .commands(&bus, &process_id)
        .watch(&subscription);
    commands.hold().await;

    // Everything besides the consumer stops on `stop`, after the consumer has drained.
    let stop = CancellationToken::new();
    let mut jobs: Vec<JoinHandle<()>> = Vec::new();
    // Status reports until the consumer has drained; then the tombstone of this process.
    let reporter = settings
        .control
        .reporter(&bus, "serve")
        .watch(subscription.status_probe());
    jobs.push(tokio::spawn(reporter.run(stop.clone().cancelled_owned())));
    jobs.push(tokio::spawn(commands.run(stop.clone().cancelled_owned())));
    let listener = tokio::net::TcpListener::bind(settings.admin_addr)
        .await
        .with_context(|| format!("cannot listen on admin_addr {}", settings.admin_addr))?;
    let admin_addr = listener.local_addr()?;
    let admin = weir::serve_admin(
        listener,
        metrics.clone(),
        subscription.health(),
        stop.clone().cancelled_owned(),
    );
    jobs.push(tokio::spawn(async move {
        if let Err(e) = admin.await {
            tracing::error!(error = %e, "The admin server stopped.");
        }
    }));
    let mut http_addr = None;
    let mut worker = None;
    if let Some(services) = &services {
        if settings.temporal.address().is_some() && settings.temporal.worker_in_serve {
            worker = Some(crate::worker::spawn(services, stop.clone())?);
        }
        let listener = tokio::net::TcpListener::bind(settings.http.addr)
            .await
            .with_context(|| format!("cannot listen on http.addr {}", settings.http.addr))?;
        http_addr = Some(listener.local_addr()?);
        let api = axum::serve(listener, reference::api(services))
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future();
        jobs.push(tokio::spawn(async move {
            if let Err(e) = api.await {
                tracing::error!(error = %e, "The HTTP API stopped.");
            }
        }));
        jobs.extend(reference::spawn_background(services, stop.clone()));
        if let (Some(store), true) = (parked, settings.service.retry_worker) {
            let worker =
                crate::retry_worker::worker(&settings, hooks, services, store, &bus, &metrics)?;
            let stop = stop.clone();
            jobs.push(tokio::spawn(async move { worker.run(stop).await }));
        }
        if settings.service.relay {
            let relay = OutboxRelay::new(
                services.pool.clone(),
                bus.clone(),
                settings.outbox.clone(),
                OutboxMetrics::new(metrics.registry())?,
            );
            let stop = stop.clone();
            jobs.push(tokio::spawn(async move { relay.run(stop).await }));
        }
    }
    tracing::info!(
        brokers = %settings.kafka.brokers,
        group = %settings.consumer.group_id,
        ?topics,
        %admin_addr,
        http_addr = http_addr.map(|a| a.to_string()),
        %process_id,
        "Serving."
    );
    Ok(Running {
        subscription,
        services,
        jobs,
        worker,
        stop,
    })
}

impl Running {
    async fn serve(self, stop_requested: CancellationToken) -> anyhow::Result<()> {
        let Running {
            subscription,
            services,
            jobs,
            worker,
            stop,
        } = self;
        let token = subscription.shutdown_token();
        tokio::spawn(async move {
            stop_requested.cancelled().await;
            tracing::info!("Shutdown requested; draining in-flight work.");
            token.cancel();
        });
        let report = subscription.join().await;
        stop.cancel();
        for job in jobs {
            let _ = job.await;
        }
        if let Some(worker) = worker {
            crate::worker::join(worker).await;
        }
        if let Some(services) = services {
            services.pool.close().await;
        }
        let report = report?;
        tracing::info!(committed = ?report.committed, abandoned = report.abandoned, orphaned = report.orphaned, "Stopped.");
        Ok(())
    }
}
