//! The outbox relay's and the inbox's metrics and typed events: every metric and log line about
//! an outbox row or an inbox entry is emitted here.

use prometheus::{core::Collector, Gauge, IntCounterVec, IntGauge, Opts, Registry};
use std::time::Duration;
use tracing::{debug, info, warn};
use uuid::Uuid;

/// The relay's Prometheus metrics, registered into a registry the service already exposes
/// (usually [`Metrics::registry`](crate::Metrics::registry)).
///
/// `weir_outbox_pending` and `weir_outbox_oldest_pending_age_seconds` are read from the table
/// (every relay reports the same numbers; aggregate with `max`, not `sum`); the counters count
/// this relay's own work.
#[derive(Clone)]
pub struct OutboxMetrics {
    pub(crate) pending: IntGauge,
    pub(crate) oldest_pending_age: Gauge,
    pub(crate) published: IntCounterVec,
    pub(crate) failures: IntCounterVec,
}

impl std::fmt::Debug for OutboxMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxMetrics").finish_non_exhaustive()
    }
}

impl OutboxMetrics {
    /// Creates the metrics and registers them. Fails if the registry already has them (one
    /// relay per registry).
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            pending: IntGauge::new(
                "weir_outbox_pending",
                "Outbox rows not published yet (committed ones; read from the table).",
            )?,
            oldest_pending_age: Gauge::new(
                "weir_outbox_oldest_pending_age_seconds",
                "Age of the oldest unpublished outbox row; 0 when none is pending.",
            )?,
            published: IntCounterVec::new(
                Opts::new(
                    "weir_outbox_published_total",
                    "Outbox rows this relay published (broker-acknowledged), by topic.",
                ),
                &["topic"],
            )?,
            failures: IntCounterVec::new(
                Opts::new(
                    "weir_outbox_publish_failures_total",
                    "Failed attempts to publish an outbox row (retried with backoff), by topic.",
                ),
                &["topic"],
            )?,
        };
        registry.register(Box::new(metrics.pending.clone()))?;
        registry.register(Box::new(metrics.oldest_pending_age.clone()))?;
        registry.register(Box::new(metrics.published.clone()))?;
        registry.register(Box::new(metrics.failures.clone()))?;
        Ok(metrics)
    }

    /// Rows this relay published, over all topics.
    pub fn published_total(&self) -> u64 {
        sum(&self.published)
    }

    /// Failed publish attempts of this relay, over all topics.
    pub fn publish_failures_total(&self) -> u64 {
        sum(&self.failures)
    }

    /// The last pending count read from the table.
    pub fn pending(&self) -> i64 {
        self.pending.get()
    }

    /// The last oldest-pending age read from the table, in seconds.
    pub fn oldest_pending_age_seconds(&self) -> f64 {
        self.oldest_pending_age.get()
    }
}

fn sum(counters: &IntCounterVec) -> u64 {
    counters
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

pub(crate) struct OutboxRowPublished<'a> {
    pub(crate) id: Uuid,
    pub(crate) topic: &'a str,
    pub(crate) key: &'a str,
    pub(crate) attempt: i32,
}

impl OutboxRowPublished<'_> {
    pub(crate) fn emit(&self, m: &OutboxMetrics) {
        m.published.with_label_values(&[self.topic]).inc();
        debug!(event_id = %self.id, topic = self.topic, key = self.key, attempt = self.attempt, "Outbox row published.");
    }
}

pub(crate) struct OutboxPublishFailed<'a> {
    pub(crate) id: Uuid,
    pub(crate) topic: &'a str,
    pub(crate) key: &'a str,
    pub(crate) attempt: i32,
    pub(crate) retry_in: Duration,
    pub(crate) error: &'a str,
}

impl OutboxPublishFailed<'_> {
    pub(crate) fn emit(&self, m: &OutboxMetrics) {
        m.failures.with_label_values(&[self.topic]).inc();
        warn!(event_id = %self.id, topic = self.topic, key = self.key, attempt = self.attempt,
              retry_in_ms = self.retry_in.as_millis() as u64, error = self.error,
              "Outbox row not published; its key waits for the retry.");
    }
}

pub(crate) struct OutboxBacklog {
    pub(crate) pending: i64,
    pub(crate) oldest_age: Option<f64>,
}

impl OutboxBacklog {
    pub(crate) fn emit(&self, m: &OutboxMetrics) {
        m.pending.set(self.pending);
        m.oldest_pending_age
            .set(self.oldest_age.unwrap_or(0.0).max(0.0));
    }
}

pub(crate) struct OutboxPurged {
    pub(crate) rows: u64,
    pub(crate) older_than: Duration,
}

impl OutboxPurged {
    pub(crate) fn emit(&self) {
        if self.rows > 0 {
            info!(rows = self.rows, older_than = %humantime::format_duration(self.older_than),
                  "Purged published outbox rows.");
        }
    }
}

pub(crate) struct OutboxRoundFailed<'a> {
    pub(crate) error: &'a dyn std::fmt::Display,
}

impl OutboxRoundFailed<'_> {
    pub(crate) fn emit(&self) {
        warn!(error = %self.error, "Outbox relay round failed; rows stay pending and are retried.");
    }
}

pub(crate) struct OutboxListenerLost<'a> {
    pub(crate) error: &'a dyn std::fmt::Display,
}

impl OutboxListenerLost<'_> {
    pub(crate) fn emit(&self) {
        warn!(error = %self.error, "LISTEN connection for the outbox lost; polling until it is back.");
    }
}

pub(crate) struct OutboxRelayRunning {
    pub(crate) running: bool,
}

impl OutboxRelayRunning {
    pub(crate) fn emit(&self) {
        if self.running {
            info!("Outbox relay started.");
        } else {
            info!("Outbox relay stopped.");
        }
    }
}

pub(crate) struct MigrationsApplied<'a> {
    pub(crate) ids: &'a [&'static str],
}

impl MigrationsApplied<'_> {
    pub(crate) fn emit(&self) {
        if self.ids.is_empty() {
            info!("Database schema up to date.");
        } else {
            info!(applied = ?self.ids, "Database migrations applied.");
        }
    }
}

pub(crate) struct InboxDuplicate<'a> {
    pub(crate) group: &'a str,
    pub(crate) event_id: Uuid,
}

impl InboxDuplicate<'_> {
    pub(crate) fn emit(&self) {
        debug!(consumer_group = self.group, event_id = %self.event_id,
               "Event already applied (inbox); skipped.");
    }
}
