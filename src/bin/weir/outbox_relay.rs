//! `weir outbox-relay`: publishes committed outbox rows until SIGTERM or SIGINT. Run as many
//! replicas as you like; they share the work by key (see `weir::OutboxRelay`).

use crate::config::Settings;
use tokio_util::sync::CancellationToken;
use weir::{KafkaBus, OutboxMetrics, OutboxRelay};

/// Relays until `stop_requested` is cancelled; a stop during start-up (connecting, migrating)
/// exits cleanly.
pub(crate) async fn run(
    settings: Settings,
    stop_requested: CancellationToken,
) -> anyhow::Result<()> {
    let connect = async {
        let pool = crate::db::connect(&settings.database).await?;
        if settings.database.migrate_on_start {
            weir::migrate(&pool, &crate::db::migrations()).await?;
        }
        anyhow::Ok(pool)
    };
    let pool = tokio::select! {
        pool = connect => pool?,
        () = stop_requested.cancelled() => {
            tracing::info!("Stop requested during start-up; exiting.");
            return Ok(());
        }
    };
    let metrics = crate::telemetry::process_metrics()?;
    let outbox_metrics = OutboxMetrics::new(metrics.registry())?;
    let bus = KafkaBus::with_metrics(settings.kafka.clone(), metrics.clone())?;
    let reporter = settings.control.reporter(&bus, "outbox-relay");
    let commands = settings.control.commands(&bus, reporter.process_id());
    let relay = OutboxRelay::new(pool.clone(), bus, settings.outbox.clone(), outbox_metrics);

    // Metrics and liveness only: a relay that cannot publish shows in
    // `weir_outbox_oldest_pending_age_seconds`.
    let stop = CancellationToken::new();
    let (admin_addr, admin) =
        crate::liveness::serve(settings.admin_addr, metrics.clone(), stop.clone()).await?;

    tracing::info!(brokers = %settings.kafka.brokers, %admin_addr, config = ?settings.outbox, "Relaying the outbox.");
    // It consumes no topic: it reads the fleet commands to acknowledge them (as `ignored`).
    let commands = tokio::spawn(commands.run(stop.clone().cancelled_owned()));
    let reporter = tokio::spawn(reporter.run(stop.clone().cancelled_owned()));
    let signal = stop.clone();
    tokio::spawn(async move {
        stop_requested.cancelled().await;
        tracing::info!("Shutdown requested; finishing the round in flight.");
        signal.cancel();
    });
    relay.run(stop.clone()).await;
    stop.cancel();
    let _ = reporter.await;
    let _ = commands.await;
    let _ = admin.await;
    pool.close().await;
    Ok(())
}
