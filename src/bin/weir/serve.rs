//! `weir serve`: the reference service on the configured brokers, until SIGTERM or SIGINT.

use crate::config::Settings;
use crate::reference::{self, Recorder};
use anyhow::Context as _;
use weir::{Bus, KafkaBus};

pub(crate) async fn run(settings: Settings) -> anyhow::Result<()> {
    let recorder = Recorder::open(settings.service.record_file.as_deref())
        .context("cannot open service.record_file")?;
    let bus = KafkaBus::new(settings.kafka.clone())?;
    let router = reference::router(&recorder)
        .retry(settings.retry.clone())
        .unhandled(settings.unhandled);
    let topics = router.topics();
    let subscription = bus.subscribe(router, settings.consumer.clone())?;
    let listener = tokio::net::TcpListener::bind(settings.admin_addr)
        .await
        .with_context(|| format!("cannot listen on admin_addr {}", settings.admin_addr))?;
    let admin_addr = listener.local_addr()?;
    let admin_stop = tokio_util::sync::CancellationToken::new();
    let admin = tokio::spawn(weir::serve_admin(
        listener,
        bus.metrics().clone(),
        subscription.health(),
        admin_stop.clone().cancelled_owned(),
    ));
    tracing::info!(brokers = %settings.kafka.brokers, group = %settings.consumer.group_id, ?topics, %admin_addr, "Serving.");
    let token = subscription.shutdown_token();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        tracing::info!("Shutdown requested; draining in-flight work.");
        token.cancel();
    });
    let report = subscription.join().await;
    admin_stop.cancel();
    let _ = admin.await;
    let report = report?;
    tracing::info!(committed = ?report.committed, abandoned = report.abandoned, "Stopped.");
    Ok(())
}
