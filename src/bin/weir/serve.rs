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
    tracing::info!(brokers = %settings.kafka.brokers, group = %settings.consumer.group_id, ?topics, "Serving.");
    let token = subscription.shutdown_token();
    tokio::spawn(async move {
        crate::shutdown_signal().await;
        tracing::info!("Shutdown requested; draining in-flight work.");
        token.cancel();
    });
    let report = subscription.join().await?;
    tracing::info!(committed = ?report.committed, abandoned = report.abandoned, "Stopped.");
    Ok(())
}
