//! The Kafka source: a dedicated thread polls a `BaseConsumer` and hands records to the engine.
//!
//! At-least-once: `enable.auto.offset.store=false`; the engine stores a partition's offset only
//! once every record before it is final, and commits stored offsets periodically, synchronously
//! when partitions are revoked, and at shutdown.
//!
//! Why a thread: librdkafka runs rebalance callbacks inside `poll`. On revoke the callback must
//! block until the engine has drained the revoked partitions' work and stored their offsets, then
//! commit, before librdkafka gives the partitions away. Polling on a thread of its own lets that
//! callback block while the engine (on the Tokio runtime) keeps running handlers.

use crate::bus::engine::{Source, SourceEvent, Tp};
use crate::bus::BusError;
use crate::handlers::Inbound;
use crate::telemetry::events::{BrokerReachability, ConsumerLag, KafkaClientError, Throttle};
use crate::telemetry::{Health, Metrics};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers as _, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

/// Records cross from the poll thread to the engine in batches of up to this many: one hand-off
/// (and at most one wake-up of the engine) per batch rather than per record. A batch is sent as
/// soon as librdkafka has nothing more ready, so batching adds no latency.
const BATCH: usize = 128;
/// Batches waiting between the poll thread and the engine. Small: the engine's in-flight
/// limits, not this buffer, bound memory; librdkafka keeps its own prefetch queue.
const HANDOFF_BATCHES: usize = 4;
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long the poll thread may stop polling behind a full hand-off queue before it pauses the
/// assignment and polls again: far below librdkafka's `max.poll.interval.ms` (300 s).
const STALL_BEFORE_PAUSE: Duration = Duration::from_secs(10);
const STALL_NAP: Duration = Duration::from_millis(2);

enum Control {
    Revoked {
        partitions: Vec<Tp>,
        epoch: u64,
        done: oneshot::Sender<()>,
    },
    Assigned(Vec<Tp>),
}

/// librdkafka callbacks: logs into `tracing`, rebalances into the engine.
pub(crate) struct WeirContext {
    control: mpsc::UnboundedSender<Control>,
    /// Bumped at every revoke; records carry the epoch they were polled in.
    epoch: AtomicU64,
    metrics: Metrics,
    health: Health,
    /// Repeated client errors are logged once per 30 s.
    errors: Throttle,
}

impl WeirContext {
    fn broker_up(&self, up: bool) {
        let was_up = self.health.status().broker_up;
        self.health.set_broker_up(up);
        BrokerReachability { up, was_up }.emit();
    }
}

impl ClientContext for WeirContext {
    fn log(&self, level: rdkafka::config::RDKafkaLogLevel, fac: &str, message: &str) {
        super::log_client_message(level, fac, message);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if matches!(
            error.rdkafka_error_code(),
            Some(RDKafkaErrorCode::AllBrokersDown)
        ) {
            self.broker_up(false);
        }
        if let Some(suppressed) = self.errors.allow(&error.to_string()) {
            KafkaClientError {
                error: &error,
                reason,
                suppressed,
            }
            .emit();
        }
    }

    fn stats(&self, statistics: Statistics) {
        // Brokers with a node id >= 0 are the cluster's; the bootstrap entries are not.
        let up = statistics
            .brokers
            .values()
            .any(|b| b.nodeid >= 0 && b.state == "UP");
        self.broker_up(up);
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's internal unassigned partition.
                if *partition >= 0 {
                    if let Some(lag) = lag(p) {
                        ConsumerLag {
                            topic,
                            partition: *partition,
                            lag: Some(lag),
                        }
                        .emit(&self.metrics);
                    }
                }
            }
        }
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// "Nothing to commit" is success: the offsets are where they were.
fn commit_result(result: KafkaResult<()>) -> KafkaResult<()> {
    match result {
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => Ok(()),
        other => other,
    }
}

impl ConsumerContext for WeirContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let Rebalance::Revoke(tpl) = rebalance else {
            return;
        };
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let (done, drained) = oneshot::channel();
        let sent = self.control.send(Control::Revoked {
            partitions: partitions(tpl),
            epoch,
            done,
        });
        if sent.is_ok() {
            // The engine bounds this wait by its revoke timeout.
            let _ = drained.blocking_recv();
        }
        let result = commit_result(consumer.commit_consumer_state(CommitMode::Sync));
        crate::telemetry::events::OffsetsCommitted {
            result: result
                .as_ref()
                .map(|_| ())
                .map_err(|e| e as &dyn std::fmt::Display),
        }
        .emit(&self.metrics);
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(tpl) => {
                self.health.set_joined(true);
                // The group coordinator just answered: a broker is up. Without this, readiness
                // waited for the first statistics (statistics.interval.ms) even while records
                // were already being handled.
                if !self.health.status().broker_up {
                    self.broker_up(true);
                }
                let _ = self.control.send(Control::Assigned(partitions(tpl)));
            }
            Rebalance::Error(error) => tracing::warn!(%error, "Rebalance error."),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// Records between the group's committed position and the partition's high watermark. Before
/// the group's first commit the position is the log start (Weir's groups start at `earliest`);
/// librdkafka's own `consumer_lag` is -1 until then, which would hide a backlog that has not
/// been touched at all.
fn lag(p: &rdkafka::statistics::Partition) -> Option<i64> {
    if p.hi_offset < 0 {
        return None;
    }
    let position = if p.committed_offset >= 0 {
        p.committed_offset
    } else {
        p.lo_offset
    };
    (position >= 0).then(|| (p.hi_offset - position).max(0))
}

pub(crate) type WeirConsumer = BaseConsumer<WeirContext>;

/// Records polled together, each with the rebalance epoch it was polled in.
type Batch = Vec<(u64, Inbound)>;

/// Creates the consumer and its poll thread, subscribed to `topics`.
pub(crate) fn start(
    config: rdkafka::ClientConfig,
    topics: &[String],
    metrics: Metrics,
    health: Health,
    on_error: impl Fn(&KafkaError) -> BusError,
) -> Result<KafkaSource, BusError> {
    let (control_tx, control) = mpsc::unbounded_channel();
    let context = WeirContext {
        control: control_tx,
        epoch: AtomicU64::new(0),
        metrics,
        health,
        errors: Throttle::new(Duration::from_secs(30)),
    };
    let consumer: Arc<WeirConsumer> = Arc::new(
        config
            .create_with_context(context)
            .map_err(|e| on_error(&e))?,
    );
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&names)
        .map_err(|e| BusError::Transport(format!("subscribe to {names:?}: {e}")))?;
    let (records_tx, records) = mpsc::channel(HANDOFF_BATCHES);
    let closing = Arc::new(AtomicBool::new(false));
    let thread = {
        let consumer = consumer.clone();
        let closing = closing.clone();
        std::thread::Builder::new()
            .name("weir-kafka-poll".to_owned())
            .spawn(move || poll_loop(consumer, records_tx, closing))
            .map_err(|e| BusError::Transport(format!("cannot start the poll thread: {e}")))?
    };
    Ok(KafkaSource {
        consumer,
        records,
        received: Vec::new().into_iter(),
        control,
        revoked_at: HashMap::new(),
        closing,
        thread: Some(thread),
    })
}

/// Polls and hands records over. When the engine is at its in-flight limit the hand-off queue is
/// full; the thread then stops polling so librdkafka's bounded prefetch queue fills and fetching
/// stops by itself (no pause: pausing discards prefetched records). If that lasts longer than
/// [`STALL_BEFORE_PAUSE`], it pauses the assignment and goes on polling, so rebalances are served
/// and `max.poll.interval.ms` is never exceeded however slow the handlers are.
fn poll_loop(consumer: Arc<WeirConsumer>, records: mpsc::Sender<Batch>, closing: Arc<AtomicBool>) {
    // Polled records not handed over yet: the batch being filled, or a full one waiting for room.
    let mut held: Batch = Vec::with_capacity(BATCH);
    let mut full = false;
    let mut stalled_since: Option<Instant> = None;
    let mut paused: Option<TopicPartitionList> = None;
    let mut names: Vec<Arc<str>> = Vec::new();
    while !closing.load(Ordering::SeqCst) {
        if full {
            match records.try_send(std::mem::replace(&mut held, Vec::with_capacity(BATCH))) {
                Ok(()) => full = false,
                Err(TrySendError::Full(batch)) => held = batch,
                Err(TrySendError::Closed(_)) => return close(consumer, records),
            }
        }
        if !full {
            stalled_since = None;
            if let Some(tpl) = paused.take() {
                let _ = consumer.resume(&tpl);
                tracing::info!("Handlers caught up; fetching resumed.");
            }
        } else {
            let since = *stalled_since.get_or_insert_with(Instant::now);
            if paused.is_none() && since.elapsed() >= STALL_BEFORE_PAUSE {
                if let Ok(tpl) = consumer.assignment() {
                    let _ = consumer.pause(&tpl);
                    paused = Some(tpl);
                    tracing::warn!("Handlers are not keeping up; fetching paused so the consumer can keep polling.");
                }
            }
            if paused.is_none() {
                std::thread::sleep(STALL_NAP);
                continue;
            }
        }
        // An empty batch waits for records; a started one only takes what is ready now.
        let wait = if full {
            STALL_NAP
        } else if held.is_empty() {
            POLL_INTERVAL
        } else {
            Duration::ZERO
        };
        match consumer.poll(wait) {
            None => full = !held.is_empty(),
            Some(Ok(message)) => {
                let epoch = consumer.context().epoch.load(Ordering::SeqCst);
                held.push((epoch, to_inbound(&message, &mut names)));
                full = full || held.len() >= BATCH;
            }
            // The context's error callback has logged it already (throttled).
            Some(Err(error)) => tracing::debug!(%error, "Kafka consumer error; still polling."),
        }
    }
    close(consumer, records);
}

/// Dropping the last handle closes the consumer: it leaves the group, so its partitions move to
/// the other members at once instead of after the session timeout.
fn close(consumer: Arc<WeirConsumer>, records: mpsc::Sender<Batch>) {
    drop(records);
    drop(consumer);
}

/// `names` keeps one shared copy of each topic name, so a record's topic is not an allocation.
fn to_inbound(message: &BorrowedMessage<'_>, names: &mut Vec<Arc<str>>) -> Inbound {
    let topic = match names.iter().find(|n| ***n == *message.topic()) {
        Some(name) => name.clone(),
        None => {
            let name: Arc<str> = Arc::from(message.topic());
            names.push(name.clone());
            name
        }
    };
    let headers = message
        .headers()
        .map(|hs| {
            hs.iter()
                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    Inbound {
        topic,
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(<[u8]>::to_vec),
        value: message.payload().map(<[u8]>::to_vec),
        headers,
        timestamp_ms: message.timestamp().to_millis(),
    }
}

/// The engine's view of the Kafka consumer.
pub(crate) struct KafkaSource {
    consumer: Arc<WeirConsumer>,
    records: mpsc::Receiver<Batch>,
    /// The rest of the last batch received.
    received: std::vec::IntoIter<(u64, Inbound)>,
    control: mpsc::UnboundedReceiver<Control>,
    /// Epoch at which each partition was last revoked: records of it polled before then were
    /// never started and will be fetched again from the committed offset, so they are dropped.
    revoked_at: HashMap<Tp, u64>,
    closing: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KafkaSource {
    /// Stops the poll thread and waits for the consumer to leave the group.
    pub(crate) fn close(mut self) -> impl FnOnce() + Send {
        self.closing.store(true, Ordering::SeqCst);
        let thread = self.thread.take();
        drop(self);
        move || {
            if let Some(thread) = thread {
                let _ = thread.join();
            }
        }
    }

    fn tpl(tp: &Tp, offset: Offset) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        // Adding a partition to a fresh list cannot fail for a valid offset.
        let _ = tpl.add_partition_offset(&tp.0, tp.1, offset);
        tpl
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
    }
}

impl KafkaSource {
    fn control_event(&mut self, control: Control) -> SourceEvent {
        match control {
            Control::Revoked {
                partitions,
                epoch,
                done,
            } => {
                for tp in &partitions {
                    self.revoked_at.insert(tp.clone(), epoch);
                }
                SourceEvent::Revoked { partitions, done }
            }
            Control::Assigned(partitions) => SourceEvent::Assigned(partitions),
        }
    }

    /// The next record of the current batch that was not polled before its partition's revoke.
    fn next_received(&mut self) -> Option<Inbound> {
        for (epoch, inbound) in self.received.by_ref() {
            let stale = !self.revoked_at.is_empty() && {
                let tp = (inbound.topic.to_string(), inbound.partition);
                self.revoked_at
                    .get(&tp)
                    .is_some_and(|revoked| epoch < *revoked)
            };
            if !stale {
                return Some(inbound);
            }
        }
        None
    }
}

impl Source for KafkaSource {
    async fn next(&mut self, want_records: bool) -> Option<SourceEvent> {
        loop {
            // Rebalances first, so no record of a revoked partition is taken after its revoke.
            match self.control.try_recv() {
                Ok(control) => return Some(self.control_event(control)),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if want_records {
                if let Some(inbound) = self.next_received() {
                    return Some(SourceEvent::Record(inbound));
                }
            }
            tokio::select! {
                biased;
                control = self.control.recv() => return Some(self.control_event(control?)),
                batch = self.records.recv(), if want_records => {
                    self.received = batch?.into_iter();
                }
            }
        }
    }

    fn try_record(&mut self) -> Option<Inbound> {
        if !self.control.is_empty() {
            return None;
        }
        self.next_received()
    }

    fn store(&mut self, tp: &Tp, next_offset: i64) {
        // `rd_kafka_offsets_store` takes the next offset to consume, as the engine gives it.
        if let Err(error) = self
            .consumer
            .store_offsets(&Self::tpl(tp, Offset::Offset(next_offset)))
        {
            // The partition was revoked meanwhile; its new owner starts from the last commit.
            tracing::debug!(topic = %tp.0, partition = tp.1, %error, "Offset not stored.");
        }
    }

    async fn commit(&mut self, sync: bool) -> Result<(), BusError> {
        let result = if sync {
            let consumer = self.consumer.clone();
            tokio::task::spawn_blocking(move || consumer.commit_consumer_state(CommitMode::Sync))
                .await
                .map_err(|e| BusError::Task(e.to_string()))?
        } else {
            self.consumer.commit_consumer_state(CommitMode::Async)
        };
        commit_result(result).map_err(|e| BusError::Transport(format!("commit: {e}")))
    }
}
