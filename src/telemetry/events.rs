//! Typed internal events. Each struct is one thing that happened; `emit` updates the metrics and
//! writes the log line, so a signal's name and fields are defined exactly once.

use super::trace::{log_trace_id, LogTraceId};
use super::{LocalRouteSeries, Metrics, RouteSeries};
use crate::contracts::Headers;
use prometheus::IntCounter;
use std::time::Duration;
use tracing::{debug, error, info, warn};
use uuid::Uuid;

/// Where a record is, for log fields. Every line about a record carries these (and its event
/// id once known) as fields of its own: the record's span is not built at the default level.
#[derive(Debug, Clone, Copy)]
pub(crate) struct At<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// The record's headers, read for its trace id only when a line is written.
    pub(crate) headers: &'a Headers,
}

impl<'a> At<'a> {
    fn trace_id(&self) -> Option<tracing::field::DisplayValue<LogTraceId<'a>>> {
        log_trace_id(self.headers).map(tracing::field::display)
    }
}

fn shown<T: std::fmt::Display>(value: Option<T>) -> Option<tracing::field::DisplayValue<T>> {
    value.map(tracing::field::display)
}

/// The `event_type` label for records whose type is not a registered one: the wire value is
/// producer-controlled, so it never becomes a label.
pub(crate) const UNKNOWN_TYPE: &str = "unknown";

pub(crate) struct RecordReceived<'a> {
    pub(crate) at: At<'a>,
}

impl RecordReceived<'_> {
    /// `received` is the topic's series when the dispatcher has it at hand.
    pub(crate) fn emit(&self, m: &Metrics, received: Option<&IntCounter>) {
        match received {
            Some(counter) => counter.inc(),
            None => m.received.with_label_values(&[self.at.topic]).inc(),
        }
    }

    /// Counted on the engine's thread, flushed once per turn of its loop.
    pub(crate) fn emit_local(&self, series: &LocalRouteSeries) {
        series.received.inc();
    }
}

pub(crate) struct DecodeFailed<'a> {
    pub(crate) at: At<'a>,
    /// Known when the envelope decoded and only the payload did not.
    pub(crate) event_id: Option<Uuid>,
    pub(crate) kind: &'static str,
    pub(crate) error: &'a dyn std::fmt::Display,
}

impl DecodeFailed<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        let At {
            topic,
            partition,
            offset,
            ..
        } = self.at;
        m.handled
            .with_label_values(&[topic, UNKNOWN_TYPE, "decode_error"])
            .inc();
        warn!(topic, partition, offset, event_id = shown(self.event_id), trace_id = self.at.trace_id(),
              kind = self.kind, error = %self.error, "Record could not be decoded; dead-lettering.");
    }
}

pub(crate) struct RecordSkipped<'a> {
    pub(crate) at: At<'a>,
    pub(crate) event_id: Option<Uuid>,
    pub(crate) event_type: &'a str,
    pub(crate) reason: &'static str,
}

impl RecordSkipped<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        let At {
            topic,
            partition,
            offset,
            ..
        } = self.at;
        m.handled
            .with_label_values(&[topic, self.event_type, "skipped"])
            .inc();
        debug!(
            topic,
            partition,
            offset,
            event_id = shown(self.event_id),
            trace_id = self.at.trace_id(),
            event_type = self.event_type,
            reason = self.reason,
            "Record skipped."
        );
    }
}

pub(crate) struct HandlerCalled {
    pub(crate) duration: Duration,
}

impl HandlerCalled {
    pub(crate) fn emit(&self, series: &RouteSeries) {
        series.duration.observe(self.duration.as_secs_f64());
    }

    /// Counted on the engine's thread, flushed once per turn of its loop.
    pub(crate) fn emit_local(&self, series: &LocalRouteSeries) {
        series.duration.observe(self.duration.as_secs_f64());
    }
}

pub(crate) struct HandlerSucceeded<'a> {
    pub(crate) at: At<'a>,
    pub(crate) event_id: Uuid,
    pub(crate) event_type: &'a str,
    pub(crate) handler: &'a str,
    pub(crate) attempt: u32,
}

impl HandlerSucceeded<'_> {
    pub(crate) fn emit(&self, series: &RouteSeries) {
        series.succeeded.inc();
        self.log();
    }

    /// Counted on the engine's thread, flushed once per turn of its loop.
    pub(crate) fn emit_local(&self, series: &LocalRouteSeries) {
        series.succeeded.inc();
        self.log();
    }

    fn log(&self) {
        let At {
            topic,
            partition,
            offset,
            ..
        } = self.at;
        debug!(topic, partition, offset, event_id = %self.event_id, trace_id = self.at.trace_id(),
               event_type = self.event_type, handler = self.handler, attempt = self.attempt, "Handled.");
    }
}

pub(crate) struct HandlerRetrying<'a> {
    pub(crate) at: At<'a>,
    pub(crate) group: &'a str,
    pub(crate) event_id: Uuid,
    pub(crate) event_type: &'a str,
    pub(crate) handler: &'a str,
    pub(crate) attempt: u32,
    pub(crate) delay: Duration,
    pub(crate) error: &'a dyn std::fmt::Display,
}

impl HandlerRetrying<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        let At {
            topic,
            partition,
            offset,
            ..
        } = self.at;
        m.handled
            .with_label_values(&[topic, self.event_type, "retried"])
            .inc();
        m.recent_errors
            .push(&self.event_id, topic, self.handler, "retried", self.error);
        warn!(topic, partition, offset, group = self.group, event_id = %self.event_id, event_type = self.event_type,
              trace_id = self.at.trace_id(), handler = self.handler, attempt = self.attempt, delay_ms = self.delay.as_millis() as u64, error = %self.error, "Handler failed; retrying.");
    }
}

pub(crate) struct HandlerGaveUp<'a> {
    pub(crate) at: At<'a>,
    pub(crate) group: &'a str,
    pub(crate) event_id: Uuid,
    pub(crate) event_type: &'a str,
    pub(crate) handler: &'a str,
    pub(crate) attempts: u32,
    pub(crate) kind: &'static str,
    pub(crate) dropped: bool,
    pub(crate) error: &'a str,
}

impl HandlerGaveUp<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        let At {
            topic,
            partition,
            offset,
            ..
        } = self.at;
        let outcome = if self.dropped {
            "skipped"
        } else {
            "dead_lettered"
        };
        m.handled
            .with_label_values(&[topic, self.event_type, outcome])
            .inc();
        m.recent_errors
            .push(&self.event_id, topic, self.handler, outcome, &self.error);
        warn!(topic, partition, offset, group = self.group, event_id = %self.event_id, event_type = self.event_type,
              trace_id = self.at.trace_id(), handler = self.handler, attempts = self.attempts, kind = self.kind, dropped = self.dropped, error = self.error, "Handler failed for good.");
    }
}

pub(crate) struct DeadLettered<'a> {
    pub(crate) at: At<'a>,
    pub(crate) group: &'a str,
    /// `None` when the record could not be decoded far enough to know it.
    pub(crate) event_id: Option<Uuid>,
    pub(crate) dead_letter_topic: &'a str,
    pub(crate) reason: &'static str,
}

impl DeadLettered<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        let At {
            topic,
            partition,
            offset,
            ..
        } = self.at;
        m.dead_letters
            .with_label_values(&[topic, self.reason])
            .inc();
        info!(
            topic,
            partition,
            offset,
            group = self.group,
            event_id = shown(self.event_id),
            trace_id = self.at.trace_id(),
            dead_letter_topic = self.dead_letter_topic,
            reason = self.reason,
            "Record dead-lettered."
        );
    }
}

pub(crate) struct DeadLetterFailed<'a> {
    pub(crate) at: At<'a>,
    pub(crate) group: &'a str,
    pub(crate) event_id: Option<Uuid>,
    pub(crate) dead_letter_topic: &'a str,
    pub(crate) error: &'a dyn std::fmt::Display,
}

impl DeadLetterFailed<'_> {
    pub(crate) fn emit(&self) {
        let At {
            topic,
            partition,
            offset,
            ..
        } = self.at;
        error!(topic, partition, offset, group = self.group, event_id = shown(self.event_id),
               trace_id = self.at.trace_id(), dead_letter_topic = self.dead_letter_topic, error = %self.error,
               "Could not publish to the dead-letter topic; will retry and not commit past this record.");
    }
}

/// A handler handed its event over to Temporal (`weir::temporal`).
#[cfg(feature = "temporal")]
pub(crate) struct WorkflowStartRequested<'a> {
    pub(crate) event_id: Uuid,
    pub(crate) workflow_id: &'a str,
    /// The workflow id was taken already: a redelivered record, nothing new started.
    pub(crate) duplicate: bool,
}

#[cfg(feature = "temporal")]
impl WorkflowStartRequested<'_> {
    pub(crate) fn emit(&self) {
        if self.duplicate {
            info!(event_id = %self.event_id, workflow_id = self.workflow_id,
                  "Workflow already started for this event; not starting another.");
        } else {
            info!(event_id = %self.event_id, workflow_id = self.workflow_id, "Workflow started.");
        }
    }
}

/// A record's task panicked outside the handler's own catch (building or publishing a dead
/// letter, say).
pub(crate) struct RecordTaskPanicked<'a> {
    pub(crate) at: At<'a>,
    pub(crate) error: &'a str,
    /// The record is being dead-lettered with kind `panic`; if false, that panicked too and the
    /// record is committed past without a dead letter.
    pub(crate) dead_lettering: bool,
}

impl RecordTaskPanicked<'_> {
    pub(crate) fn emit(&self) {
        let At {
            topic,
            partition,
            offset,
            ..
        } = self.at;
        let trace_id = self.at.trace_id();
        if self.dead_lettering {
            error!(
                topic,
                partition,
                offset,
                trace_id,
                error = self.error,
                "Record task panicked; dead-lettering the record with kind panic."
            );
        } else {
            error!(topic, partition, offset, trace_id, error = self.error,
                   "Dead-lettering a panicked record panicked too; committing past it so the partition moves on.");
        }
    }
}

impl RecordTaskPanicked<'_> {
    /// A panic that escaped the record's task itself (a handler future whose drop panicked
    /// when its partition aborted it, say). `dead_lettering` false: the record was being
    /// aborted or stopped, so it ends unfinished and is redelivered.
    pub(crate) fn emit_escaped(&self) {
        let At {
            topic,
            partition,
            offset,
            ..
        } = self.at;
        let trace_id = self.at.trace_id();
        if self.dead_lettering {
            error!(
                topic,
                partition,
                offset,
                trace_id,
                error = self.error,
                "A panic escaped the record's task; dead-lettering the record with kind panic."
            );
        } else {
            error!(topic, partition, offset, trace_id, error = self.error,
                   "The record's task panicked while it was being cancelled; the record is not committed and will be redelivered.");
        }
    }
}

/// A handler's poll held the engine's thread for `polled`: it blocks its thread (synchronous
/// I/O in an `async fn`, say). Its route's next records run as tasks, off the engine's thread.
pub(crate) struct HandlerBlockedThread<'a> {
    pub(crate) topic: &'a str,
    pub(crate) event_type: &'a str,
    pub(crate) handler: &'a str,
    pub(crate) polled: Duration,
}

impl HandlerBlockedThread<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        m.blocking_polls
            .with_label_values(&[self.topic, self.event_type, self.handler])
            .inc();
        warn!(topic = self.topic, event_type = self.event_type, handler = self.handler, polled = ?self.polled,
              "Handler blocked its thread in a poll; running its records as tasks. Make its I/O async, or mark it cpu_bound.");
    }
}

/// `cpu_bound` calls of a partition were still running on their blocking threads when the
/// partition was given up, after the engine waited `waited` for them: their records may run
/// again at the partition's next owner while they finish here.
pub(crate) struct BlockingCallsOrphaned<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) calls: usize,
    pub(crate) waited: Duration,
    /// `revoke` or `stop`.
    pub(crate) during: &'static str,
}

impl BlockingCallsOrphaned<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        m.orphaned_calls
            .with_label_values(&[self.topic])
            .inc_by(self.calls as u64);
        error!(topic = self.topic, partition = self.partition, calls = self.calls, waited = ?self.waited,
               during = self.during,
               "cpu_bound calls still run after their partition was given up; their records may run again elsewhere meanwhile.");
    }
}

/// A partition's hand-off to the engine stayed full for a while (its handlers are not keeping
/// up, so its fetching has stopped at librdkafka's prefetch limit), or has room again.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
pub(crate) struct PartitionHeldBack<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) held: bool,
}

impl PartitionHeldBack<'_> {
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
    pub(crate) fn emit(&self) {
        let (topic, partition) = (self.topic, self.partition);
        if self.held {
            warn!(topic, partition,
                  "Handlers are not keeping up; the partition's hand-off is full, so its fetching stops at the prefetch limit (other partitions go on).");
        } else {
            info!(
                topic,
                partition, "Handlers caught up; the partition's records flow again."
            );
        }
    }
}

/// A pause began or ended to hold a partition (`Subscription::pause`, a breaker, a command).
pub(crate) struct PartitionPaused<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    /// Who paused: `api`, `breaker`, `command`.
    pub(crate) source: &'a str,
    pub(crate) reason: &'a str,
    /// Whether this source's pause began (true) or ended (false).
    pub(crate) paused: bool,
    /// Whether some pause with this reason still holds the partition: the gauge's value.
    pub(crate) held: bool,
    /// The partition left this consumer (revoked): its series is removed.
    pub(crate) gone: bool,
}

impl PartitionPaused<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        let (topic, partition, source, reason) =
            (self.topic, self.partition, self.source, self.reason);
        let partition_label = partition.to_string();
        let labels = [topic, partition_label.as_str(), reason];
        if self.gone {
            let _ = m.partition_paused.remove_label_values(&labels);
        } else {
            m.partition_paused
                .with_label_values(&labels)
                .set(i64::from(self.held));
        }
        match (self.paused, self.gone) {
            (true, _) => info!(topic, partition, source, reason, "Partition paused."),
            (false, false) => info!(topic, partition, source, reason, "Pause lifted."),
            (false, true) => debug!(
                topic,
                partition,
                source,
                reason,
                "Paused partition revoked; its pause stays for when it comes back."
            ),
        }
    }
}

/// What the consumer holds of records fetched and not yet handed to a handler, all partitions
/// together: librdkafka's prefetch queues and Weir's own hand-offs.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
pub(crate) struct PrefetchBytes(pub(crate) usize);

impl PrefetchBytes {
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
    pub(crate) fn emit(&self, m: &Metrics) {
        m.prefetch_bytes
            .set(i64::try_from(self.0).unwrap_or(i64::MAX));
    }
}

/// A partition's fetching paused because it holds more than its share of
/// `kafka.max_prefetch_bytes`, or resumed once its handlers took half of it.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
pub(crate) struct PrefetchPaused<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    pub(crate) paused: bool,
    /// Bytes it holds.
    pub(crate) held: usize,
    /// Its share of the budget.
    pub(crate) share: usize,
}

impl PrefetchPaused<'_> {
    #[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
    pub(crate) fn emit(&self) {
        let (topic, partition, held, share) = (self.topic, self.partition, self.held, self.share);
        if self.paused {
            debug!(topic, partition, held, share,
                   "The partition holds its share of the prefetch budget; its fetching pauses until its handlers take half of it.");
        } else {
            debug!(
                topic,
                partition, held, share, "The partition's fetching resumes."
            );
        }
    }
}

/// A route's circuit breaker came to `to` (`closed`, `open`, `half_open`; `gauge` its
/// `weir_breaker_state` value). `opened` says why it opened.
pub(crate) struct BreakerTransitioned<'a> {
    pub(crate) route: &'a str,
    pub(crate) from: &'a str,
    pub(crate) to: &'a str,
    pub(crate) gauge: i64,
    pub(crate) opened: Option<BreakerOpenedBecause>,
}

/// What the window held when a breaker opened, or that a half-open probe failed.
pub(crate) struct BreakerOpenedBecause {
    pub(crate) failures: u32,
    pub(crate) calls: u32,
    pub(crate) window: std::time::Duration,
    pub(crate) threshold: f64,
    pub(crate) probe_failed: bool,
    pub(crate) cool_down: std::time::Duration,
}

impl BreakerTransitioned<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        let (route, from, to) = (self.route, self.from, self.to);
        m.breaker_state.with_label_values(&[route]).set(self.gauge);
        m.breaker_transitions.with_label_values(&[route, to]).inc();
        match &self.opened {
            Some(why) if why.probe_failed => warn!(
                route,
                from,
                to,
                cool_down = ?why.cool_down,
                "Circuit breaker reopened: the half-open probe failed retryably; the route stays paused."
            ),
            Some(why) => warn!(
                route,
                from,
                to,
                failures = why.failures,
                calls = why.calls,
                window = ?why.window,
                threshold = why.threshold,
                cool_down = ?why.cool_down,
                "Circuit breaker opened: retryable failures reached the threshold; the route is paused."
            ),
            None => info!(route, from, to, "Circuit breaker changed state."),
        }
    }
}

pub(crate) struct InFlight(pub(crate) usize);

impl InFlight {
    pub(crate) fn emit(&self, m: &Metrics) {
        m.in_flight.set(self.0 as i64);
    }
}

/// The answer to a commit: from the broker, or a refusal before it was sent (no coordinator,
/// the assignment lost). A failure is a warning whichever it was.
pub(crate) struct OffsetsCommitted<'a> {
    pub(crate) result: Result<(), &'a dyn std::fmt::Display>,
}

impl OffsetsCommitted<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        match self.result {
            Ok(()) => m.commits.with_label_values(&["success"]).inc(),
            Err(error) => {
                m.commits.with_label_values(&["failure"]).inc();
                warn!(%error, "Offset commit failed; the next commit carries these offsets, or the partition's next owner handles them again.");
            }
        }
    }
}

pub(crate) struct Rebalanced<'a> {
    pub(crate) kind: &'static str,
    pub(crate) partitions: &'a [(String, i32)],
}

impl Rebalanced<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        m.rebalances.with_label_values(&[self.kind]).inc();
        info!(kind = self.kind, partitions = ?self.partitions, "Rebalance.");
    }
}

/// Revoked partitions drained and were given up: their running records finished (or were
/// aborted at `revoke_timeout`) while the partitions that stay ran on.
pub(crate) struct RevokeDrained<'a> {
    pub(crate) partitions: &'a [(String, i32)],
    pub(crate) took: Duration,
    /// The revoke timeout cut the drain short: the aborted records go to the next owner.
    pub(crate) aborted: bool,
}

impl RevokeDrained<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        m.revoke_drain
            .with_label_values(&[if self.aborted { "true" } else { "false" }])
            .observe(self.took.as_secs_f64());
        info!(partitions = ?self.partitions, took = ?self.took, aborted = self.aborted, "Revoked partitions drained; giving them up.");
    }
}

pub(crate) struct Published<'a> {
    pub(crate) topic: &'a str,
    pub(crate) duration: Duration,
    pub(crate) result: Result<(), &'a dyn std::fmt::Display>,
}

impl Published<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        let result = if self.result.is_ok() {
            "success"
        } else {
            "failure"
        };
        m.published.with_label_values(&[self.topic, result]).inc();
        m.publish_duration
            .with_label_values(&[self.topic])
            .observe(self.duration.as_secs_f64());
        if let Err(error) = self.result {
            warn!(topic = self.topic, %error, "Publish failed.");
        }
    }
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
pub(crate) struct ConsumerLag<'a> {
    pub(crate) topic: &'a str,
    pub(crate) partition: i32,
    /// `None` removes the series (the partition was revoked).
    pub(crate) lag: Option<i64>,
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
impl ConsumerLag<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        let partition = self.partition.to_string();
        match self.lag {
            Some(lag) => m
                .consumer_lag
                .with_label_values(&[self.topic, &partition])
                .set(lag),
            None => {
                let _ = m
                    .consumer_lag
                    .remove_label_values(&[self.topic, &partition]);
            }
        }
    }
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
pub(crate) struct BrokerReachability {
    pub(crate) up: bool,
    pub(crate) was_up: bool,
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
impl BrokerReachability {
    pub(crate) fn emit(&self) {
        match (self.was_up, self.up) {
            (true, false) => warn!("No broker reachable; not ready. Reconnecting."),
            (false, true) => info!("Broker reachable."),
            _ => {}
        }
    }
}

/// Lets one log line per key through, then at most one per `every`, counting the rest, so a
/// broker outage (librdkafka raises "all brokers down" about every 50 ms) cannot flood the logs.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
pub(crate) struct Throttle {
    every: Duration,
    seen: std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>,
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
impl Throttle {
    pub(crate) fn new(every: Duration) -> Self {
        Self {
            every,
            seen: std::sync::Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// `Some(suppressed since the last one)` if this occurrence should be logged.
    pub(crate) fn allow(&self, key: &str) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut seen = self.seen.lock().unwrap_or_else(|e| e.into_inner());
        match seen.get_mut(key) {
            None => {
                seen.insert(key.to_owned(), (now, 0));
                Some(0)
            }
            Some((last, suppressed)) if now.duration_since(*last) >= self.every => {
                let count = std::mem::take(suppressed);
                *last = now;
                Some(count)
            }
            Some((_, suppressed)) => {
                *suppressed += 1;
                None
            }
        }
    }
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
pub(crate) struct KafkaClientError<'a> {
    pub(crate) error: &'a dyn std::fmt::Display,
    pub(crate) reason: &'a str,
    pub(crate) suppressed: u64,
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))] // Only the Kafka bus emits it.
impl KafkaClientError<'_> {
    pub(crate) fn emit(&self) {
        warn!(error = %self.error, reason = self.reason, suppressed = self.suppressed,
              "Kafka client error; retrying.");
    }
}

/// A record was parked for a durable retry (after its in-place attempts, or behind an earlier
/// parked record of its key): its offset may move on.
pub(crate) struct RecordParked<'a> {
    pub(crate) at: At<'a>,
    pub(crate) event_id: Uuid,
    pub(crate) event_type: &'a str,
    pub(crate) handler: &'a str,
    pub(crate) attempts: u32,
    /// Parked only because its key had parked records (the handler was not called).
    pub(crate) behind: bool,
    pub(crate) error: &'a str,
}

impl RecordParked<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        let At {
            topic,
            partition,
            offset,
            ..
        } = self.at;
        m.handled
            .with_label_values(&[topic, self.event_type, "parked"])
            .inc();
        if !self.behind {
            m.recent_errors
                .push(&self.event_id, topic, self.handler, "parked", &self.error);
        }
        if self.behind {
            info!(topic, partition, offset, event_id = %self.event_id, trace_id = self.at.trace_id(),
                  handler = self.handler, "Key has parked records; parked this one behind them.");
        } else {
            warn!(topic, partition, offset, event_id = %self.event_id, trace_id = self.at.trace_id(),
                  handler = self.handler, attempts = self.attempts, error = self.error,
                  "Handler still failing; parked the record for durable retries.");
        }
    }
}

/// The parked-record store did not answer; the record waits and the store is asked again.
pub(crate) struct ParkFailed<'a> {
    pub(crate) at: At<'a>,
    pub(crate) what: &'static str,
    pub(crate) error: &'a str,
}

impl ParkFailed<'_> {
    pub(crate) fn emit(&self) {
        let At {
            topic,
            partition,
            offset,
            ..
        } = self.at;
        warn!(
            topic,
            partition,
            offset,
            error = self.error,
            "Could not {}; retrying.",
            self.what
        );
    }
}

/// A status report (or the final tombstone) was published to the status topic, or not.
#[cfg_attr(not(feature = "kafka"), allow(dead_code))] // The reporter is Kafka's.
pub(crate) struct ReportPublished<'a> {
    pub(crate) topic: &'a str,
    pub(crate) tombstone: bool,
    pub(crate) error: Option<&'a dyn std::fmt::Display>,
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
impl ReportPublished<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        let result = if self.error.is_some() { "error" } else { "ok" };
        m.reports_published.with_label_values(&[result]).inc();
        match self.error {
            Some(error) => {
                warn!(topic = self.topic, tombstone = self.tombstone, %error, "Could not publish the status report.")
            }
            None => debug!(
                topic = self.topic,
                tombstone = self.tombstone,
                "Published the status report."
            ),
        }
    }
}

/// A fleet command read from the commands topic, and what this process made of it: the audit
/// line of each command (id, issuer, action, target, result), the
/// `weir_commands_applied_total{command,result}` counter, and its acknowledgement in the next
/// status reports.
pub(crate) struct CommandApplied<'a> {
    pub(crate) id: &'a str,
    pub(crate) issuer: &'a str,
    /// `pause`, `resume`, `quiet`, `unquiet`, or `unknown` for a rejected record.
    pub(crate) command: &'static str,
    pub(crate) target: &'a str,
    /// `all`, or `process:<id>`.
    pub(crate) to: &'a str,
    /// `applied`, `ignored`, `rejected` or `failed`.
    pub(crate) result: &'static str,
    /// Whether it was read at start, among the commands still in force.
    pub(crate) in_force_at_start: bool,
    pub(crate) error: Option<&'a dyn std::fmt::Display>,
}

#[cfg_attr(not(feature = "kafka"), allow(dead_code))]
impl CommandApplied<'_> {
    pub(crate) fn emit(&self, m: &Metrics) {
        m.commands_applied
            .with_label_values(&[self.command, self.result])
            .inc();
        m.recent_commands.push(super::CommandAck {
            at: chrono::Utc::now(),
            id: self.id.to_owned(),
            issuer: self.issuer.to_owned(),
            command: self.command.to_owned(),
            target: self.target.to_owned(),
            result: self.result.to_owned(),
        });
        let error = shown(self.error);
        if self.result == "rejected" || self.result == "failed" {
            warn!(
                audit = "fleet_command",
                command_id = self.id,
                issuer = self.issuer,
                command = self.command,
                target = self.target,
                to = self.to,
                result = self.result,
                in_force_at_start = self.in_force_at_start,
                error,
                "Fleet command not applied."
            );
        } else {
            info!(
                audit = "fleet_command",
                command_id = self.id,
                issuer = self.issuer,
                command = self.command,
                target = self.target,
                to = self.to,
                result = self.result,
                in_force_at_start = self.in_force_at_start,
                "Fleet command."
            );
        }
    }
}
