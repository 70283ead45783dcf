//! The parked-record worker's metrics and typed events (durable retries).

use prometheus::{Gauge, IntCounterVec, IntGauge, Opts, Registry};
use std::time::Duration;
use tracing::{info, warn};

/// The durable-retry metrics, registered into a registry the service already exposes (usually
/// [`Metrics::registry`](crate::Metrics::registry)).
///
/// The gauges are read from the `weir_parked` table for the worker's consumer group (every
/// worker of a group reports the same numbers; aggregate with `max`); the counter counts this
/// worker's own attempts.
#[derive(Clone)]
pub struct ParkedMetrics {
    pub(crate) records: IntGauge,
    pub(crate) keys: IntGauge,
    pub(crate) oldest_age: Gauge,
    pub(crate) attempts: IntCounterVec,
}

impl std::fmt::Debug for ParkedMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkedMetrics").finish_non_exhaustive()
    }
}

impl ParkedMetrics {
    /// Creates the metrics and registers them. Fails if the registry already has them (one
    /// worker per registry).
    pub fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let metrics = Self {
            records: IntGauge::new(
                "weir_parked_records",
                "Records parked for durable retries (read from the table).",
            )?,
            keys: IntGauge::new(
                "weir_parked_keys",
                "Keys with parked records: each holds its later records behind it.",
            )?,
            oldest_age: Gauge::new(
                "weir_parked_oldest_age_seconds",
                "Age of the oldest parked record; 0 when none is parked.",
            )?,
            attempts: IntCounterVec::new(
                Opts::new(
                    "weir_parked_attempts_total",
                    "Durable attempts of parked records, by result (success, retry, dead_lettered).",
                ),
                &["result"],
            )?,
        };
        registry.register(Box::new(metrics.records.clone()))?;
        registry.register(Box::new(metrics.keys.clone()))?;
        registry.register(Box::new(metrics.oldest_age.clone()))?;
        registry.register(Box::new(metrics.attempts.clone()))?;
        // Every result at 0 from the start (see `Metrics`): a failure panel has a series to show
        // before the first failure, and the first failure is a step `rate` sees.
        for result in ["success", "retry", "dead_lettered"] {
            metrics.attempts.with_label_values(&[result]);
        }
        Ok(metrics)
    }

    /// The last parked-record count read from the table.
    pub fn records(&self) -> i64 {
        self.records.get()
    }

    /// The last parked-key count read from the table.
    pub fn keys(&self) -> i64 {
        self.keys.get()
    }
}

/// The table's current state, as the gauges show it.
pub(crate) struct ParkedBacklog {
    pub(crate) records: i64,
    pub(crate) keys: i64,
    pub(crate) oldest_age: Duration,
}

impl ParkedBacklog {
    pub(crate) fn emit(&self, m: &ParkedMetrics) {
        m.records.set(self.records);
        m.keys.set(self.keys);
        m.oldest_age.set(self.oldest_age.as_secs_f64());
    }
}

/// One durable attempt of a parked record, and what it led to.
pub(crate) struct ParkedAttempted<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) handler: &'a str,
    pub(crate) attempt: u32,
    /// `success`, `retry` or `dead_lettered`.
    pub(crate) result: &'static str,
    pub(crate) error: Option<&'a str>,
    pub(crate) next_in: Option<Duration>,
}

impl ParkedAttempted<'_> {
    pub(crate) fn emit(&self, m: &ParkedMetrics) {
        m.attempts.with_label_values(&[self.result]).inc();
        let (topic, partition, offset, handler, attempt) = (
            self.topic,
            self.partition,
            self.offset,
            self.handler,
            self.attempt,
        );
        match self.result {
            "success" => info!(
                topic,
                partition, offset, handler, attempt, "Parked record handled; its key moves on."
            ),
            "retry" => warn!(
                topic,
                partition,
                offset,
                handler,
                attempt,
                error = self.error,
                next_in_ms = self.next_in.map(|d| d.as_millis() as u64),
                "Parked record failed again; retrying later."
            ),
            _ => warn!(
                topic,
                partition,
                offset,
                handler,
                attempt,
                error = self.error,
                "Parked record failed for good; dead-lettered, its key moves on."
            ),
        }
    }
}

/// The worker could not reach the store; it tries again.
pub(crate) struct ParkedWorkerFailed<'a> {
    pub(crate) error: &'a dyn std::fmt::Display,
}

impl ParkedWorkerFailed<'_> {
    pub(crate) fn emit(&self) {
        warn!(error = %self.error, "Parked-record worker round failed; retrying.");
    }
}
