use super::recent_errors::RecentErrors;
use prometheus::local::{LocalHistogram, LocalIntCounter};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Weir's Prometheus metrics, in a registry of their own.
///
/// One instance per consumer process (or per bus in tests), so two buses in one test process do
/// not share counters. Label values are always bounded: topics, registered event types,
/// outcomes and reasons; never keys, offsets or event ids.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    pub(crate) received: IntCounterVec,
    pub(crate) handled: IntCounterVec,
    pub(crate) handler_duration: HistogramVec,
    pub(crate) dead_letters: IntCounterVec,
    pub(crate) in_flight: IntGauge,
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Set from librdkafka statistics.
    pub(crate) consumer_lag: IntGaugeVec,
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Set from librdkafka statistics.
    pub(crate) prefetch_bytes: IntGauge,
    pub(crate) commits: IntCounterVec,
    pub(crate) rebalances: IntCounterVec,
    pub(crate) revoke_drain: HistogramVec,
    pub(crate) partition_paused: IntGaugeVec,
    pub(crate) breaker_state: IntGaugeVec,
    pub(crate) breaker_transitions: IntCounterVec,
    pub(crate) published: IntCounterVec,
    pub(crate) publish_duration: HistogramVec,
    pub(crate) orphaned_calls: IntCounterVec,
    pub(crate) blocking_polls: IntCounterVec,
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Counted by the Kafka reporter.
    pub(crate) reports_published: IntCounterVec,
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Counted by the commands reader.
    pub(crate) commands_applied: IntCounterVec,
    /// The last handler errors, for status reports.
    pub(crate) recent_errors: std::sync::Arc<RecentErrors>,
    /// The last fleet commands applied, acknowledged in status reports.
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Written by the commands reader.
    pub(crate) recent_commands: std::sync::Arc<super::recent_commands::RecentCommands>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

const LATENCY_BUCKETS: &[f64] = &[
    0.000_1, 0.000_5, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

impl Metrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let registry = Registry::new();
        fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
            r.register(Box::new(c.clone()))
                .expect("metric names are unique and valid");
            c
        }
        let counter = |name: &str, help: &str, labels: &[&str]| {
            reg(
                &registry,
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"),
            )
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(LATENCY_BUCKETS.to_vec());
            reg(
                &registry,
                HistogramVec::new(opts, labels).expect("valid metric"),
            )
        };
        let metrics = Self {
            received: counter(
                "weir_messages_received_total",
                "Records received from the broker.",
                &["topic"],
            ),
            handled: counter(
                "weir_messages_handled_total",
                "Outcomes of handling: success, retried, dead_lettered, skipped, decode_error.",
                &["topic", "event_type", "outcome"],
            ),
            handler_duration: histogram(
                "weir_handler_duration_seconds",
                "Duration of one handler call.",
                &["topic", "event_type"],
            ),
            dead_letters: counter(
                "weir_dead_letters_total",
                "Records published to a dead-letter topic, by reason.",
                &["topic", "reason"],
            ),
            in_flight: reg(
                &registry,
                IntGauge::new(
                    "weir_in_flight_messages",
                    "Records fetched whose outcome is not final yet.",
                )
                .expect("valid metric"),
            ),
            prefetch_bytes: reg(
                &registry,
                IntGauge::new(
                    "weir_consumer_prefetch_bytes",
                    "Bytes of records fetched and not yet handed to a handler, all partitions together: librdkafka's prefetch queues (from its statistics) and Weir's hand-offs. Bounded by `kafka.max_prefetch_bytes` (plus what one fetch brings).",
                )
                .expect("valid metric"),
            ),
            consumer_lag: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "weir_consumer_lag",
                        "Records between the group's committed position (before the first commit, the log start) and the partition's high watermark, from librdkafka statistics.",
                    ),
                    &["topic", "partition"],
                )
                .expect("valid metric"),
            ),
            commits: counter(
                "weir_commits_total",
                "Offset commits, by result.",
                &["result"],
            ),
            rebalances: counter(
                "weir_rebalances_total",
                "Rebalance events, by kind (assign, revoke).",
                &["kind"],
            ),
            revoke_drain: histogram(
                "weir_revoke_drain_seconds",
                "How long revoked partitions drained before they were given up (the group waits that long for this replica); the other partitions run on meanwhile. `aborted` is true when revoke_timeout cut the drain short.",
                &["aborted"],
            ),
            partition_paused: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "weir_partition_paused",
                        "1 while a pause with this reason holds the partition (its records are not fetched or admitted), 0 once it was resumed.",
                    ),
                    &["topic", "partition", "reason"],
                )
                .expect("valid metric"),
            ),
            breaker_state: reg(
                &registry,
                IntGaugeVec::new(
                    Opts::new(
                        "weir_breaker_state",
                        "A route's circuit breaker: 0 closed, 1 open, 2 half-open.",
                    ),
                    &["route"],
                )
                .expect("valid metric"),
            ),
            breaker_transitions: counter(
                "weir_breaker_transitions_total",
                "Circuit breaker state changes, by route and the state entered (closed, open, half_open).",
                &["route", "to"],
            ),
            published: counter(
                "weir_published_total",
                "Records published, by result.",
                &["topic", "result"],
            ),
            publish_duration: histogram(
                "weir_publish_duration_seconds",
                "Time from publish to broker acknowledgement.",
                &["topic"],
            ),
            orphaned_calls: counter(
                "weir_blocking_calls_orphaned_total",
                "cpu_bound calls still running when their partition was given up (revoked, or at stop).",
                &["topic"],
            ),
            blocking_polls: counter(
                "weir_handler_blocking_polls_total",
                "Handler polls that held the engine's thread long enough to be blocking it (synchronous I/O in an async fn, say).",
                &["topic", "event_type", "handler"],
            ),
            reports_published: counter(
                "weir_reports_published_total",
                "Status reports (and the final tombstone) published to the status topic, by result (ok, error).",
                &["result"],
            ),
            commands_applied: counter(
                "weir_commands_applied_total",
                "Fleet commands read from the commands topic, by command (pause, resume, quiet, unquiet, unknown) and result (applied, ignored, rejected, failed).",
                &["command", "result"],
            ),
            recent_errors: std::sync::Arc::default(),
            recent_commands: std::sync::Arc::default(),
            registry,
        };
        metrics.export_known_labels();
        metrics
    }

    /// Creates the series whose label values are known from the start, at 0: a counter that has
    /// not counted yet is then exported as 0 rather than missing, as Prometheus advises, so a
    /// failure panel or an alert on `rate(...)` has a series to show on a good day, and the
    /// first failure is a step from 0 that `rate` and `increase` see (a series born at 1 is not).
    fn export_known_labels(&self) {
        for result in ["success", "failure"] {
            self.commits.with_label_values(&[result]);
        }
        for kind in ["assign", "revoke"] {
            self.rebalances.with_label_values(&[kind]);
        }
        for aborted in ["false", "true"] {
            self.revoke_drain.with_label_values(&[aborted]);
        }
        self.commands_applied
            .with_label_values(&["unknown", "rejected"]);
    }

    /// Creates a subscribed route's failure series at 0 (see [`export_known_labels`]):
    /// `weir_messages_handled_total` for the outcomes every route can have, and
    /// `weir_dead_letters_total` for each of `reasons` (every reason a record can be
    /// dead-lettered for).
    ///
    /// [`export_known_labels`]: Self::export_known_labels
    pub(crate) fn export_route(&self, topic: &str, event_type: &str, reasons: &[&str]) {
        for outcome in ["success", "retried", "dead_lettered"] {
            self.handled
                .with_label_values(&[topic, event_type, outcome]);
        }
        for reason in reasons {
            self.dead_letters.with_label_values(&[topic, reason]);
        }
    }

    /// The series every handled record of one (topic, event type) touches, resolved once.
    pub(crate) fn route_series(&self, topic: &str, event_type: &str) -> RouteSeries {
        RouteSeries {
            succeeded: self
                .handled
                .with_label_values(&[topic, event_type, "success"]),
            duration: self
                .handler_duration
                .with_label_values(&[topic, event_type]),
        }
    }

    /// The registry, to add a service's own metrics beside Weir's.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Everything in the Prometheus text exposition format, for a `/metrics` endpoint.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding into a Vec cannot fail");
        String::from_utf8(buf).expect("the text format is UTF-8")
    }

    /// Current value of `weir_messages_handled_total` for one label set (for tests and summaries).
    pub fn handled_count(&self, topic: &str, event_type: &str, outcome: &str) -> u64 {
        self.handled
            .get_metric_with_label_values(&[topic, event_type, outcome])
            .map(|c| c.get())
            .unwrap_or(0)
    }

    /// Sum of `weir_messages_handled_total` over every topic and event type for one outcome.
    pub fn handled_total(&self, outcome: &str) -> u64 {
        sum_where(&self.handled, "outcome", outcome)
    }

    /// Sum of `weir_dead_letters_total` over every topic and reason.
    pub fn dead_letters_total(&self) -> u64 {
        sum_where(&self.dead_letters, "", "")
    }

    /// Current value of `weir_dead_letters_total` for one topic and reason.
    pub fn dead_letter_count(&self, topic: &str, reason: &str) -> u64 {
        self.dead_letters
            .get_metric_with_label_values(&[topic, reason])
            .map(|c| c.get())
            .unwrap_or(0)
    }
}

/// The labelled series on a record's success path, looked up once per route instead of once per
/// record: a lookup hashes the label values under a lock, which cost more than everything else a
/// no-op handler's record does for metrics.
#[derive(Clone)]
pub(crate) struct RouteSeries {
    /// `weir_messages_handled_total{topic, event_type, outcome="success"}`.
    pub(crate) succeeded: IntCounter,
    /// `weir_handler_duration_seconds{topic, event_type}`.
    pub(crate) duration: Histogram,
}

/// The series a record's first call counts (`Dispatcher::first_call`), kept by the engine's
/// own thread without atomic operations and added to the shared series once per turn of the
/// engine's loop ([`flush`](Self::flush)). Counted directly, a no-op record made six atomic
/// read-modify-writes here (the received and succeeded counters; the histogram's shard, bucket,
/// sum and count), each of which waits for the core's pending stores; once per burst of up to
/// 256 records they cost nothing per record. A scrape sees a record at most one turn of the loop
/// late: the engine flushes before it waits for anything.
#[derive(Default)]
pub(crate) struct LocalSeries {
    /// One entry per topic (a first call needs its topic's only route), found by the address of
    /// the topic's shared name; the `Arc` held here keeps that address from being reused.
    topics: Vec<(std::sync::Arc<str>, LocalRouteSeries)>,
}

/// One topic's unsynchronized counts, see [`LocalSeries`].
pub(crate) struct LocalRouteSeries {
    pub(crate) received: LocalIntCounter,
    pub(crate) succeeded: LocalIntCounter,
    pub(crate) duration: LocalHistogram,
}

impl LocalSeries {
    /// The topic's entry, made from its shared series the first time.
    pub(crate) fn topic(
        &mut self,
        topic: &std::sync::Arc<str>,
        make: impl FnOnce() -> (IntCounter, RouteSeries),
    ) -> &LocalRouteSeries {
        let found = self
            .topics
            .iter()
            .position(|(t, _)| std::sync::Arc::ptr_eq(t, topic))
            .or_else(|| {
                // The same name in another `Arc` (a source that re-created it): the same series.
                let at = self.topics.iter().position(|(t, _)| **t == **topic)?;
                self.topics[at].0 = topic.clone();
                Some(at)
            });
        let at = found.unwrap_or_else(|| {
            let (received, series) = make();
            self.topics.push((
                topic.clone(),
                LocalRouteSeries {
                    received: received.local(),
                    succeeded: series.succeeded.local(),
                    duration: series.duration.local(),
                },
            ));
            self.topics.len() - 1
        });
        &self.topics[at].1
    }

    /// Adds the counts kept since the last flush to the shared series.
    pub(crate) fn flush(&self) {
        for (_, series) in &self.topics {
            series.received.flush();
            series.succeeded.flush();
            series.duration.flush();
        }
    }
}

impl Drop for LocalSeries {
    fn drop(&mut self) {
        self.flush();
    }
}

/// Sums a counter family over the series whose label `name` is `value` (all series if `name` is
/// empty).
fn sum_where(counters: &IntCounterVec, name: &str, value: &str) -> u64 {
    use prometheus::core::Collector;
    counters
        .collect()
        .iter()
        .flat_map(|family| family.get_metric())
        .filter(|m| {
            name.is_empty()
                || m.get_label()
                    .iter()
                    .any(|l| l.name() == name && l.value() == value)
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}
