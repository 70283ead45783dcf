//! The Kafka source: a dedicated thread polls a `BaseConsumer` and hands records to the engine.
//!
//! At-least-once: `enable.auto.offset.store=false`; the engine stores a partition's offset only
//! once every record before it is final, and commits stored offsets periodically, when
//! partitions are revoked, and at shutdown. Commits are counted when the broker answers, not
//! when they are queued. Every commit Weir makes is synchronous, because librdkafka answers an
//! asynchronous `rd_kafka_commit` without a reply queue to nobody (rust-rdkafka's
//! `CommitMode::Async` never reaches `commit_callback`): the periodic one runs on a blocking
//! thread, at most one at a time, so neither the engine nor the poll thread waits for the
//! broker; the one at revoke runs on the poll thread before it gives the partitions up, and the
//! final one is awaited by the engine's drain, so its answer is counted before the poll thread stops.
//!
//! Why a thread: librdkafka runs rebalance callbacks inside `poll`, and serves the group only
//! while it is polled.
//!
//! Rebalances: `partition.assignment.strategy` is `cooperative-sticky` unless set otherwise, so
//! a rebalance revokes only the partitions that move. A revoke does not block the callback:
//! the revoked partitions stop fetching and feeding the engine at once, the engine drains them
//! while every other partition flows on, and once it answers (their offsets stored) the poll
//! thread commits and gives them up (`incremental_unassign`; `unassign` with the eager
//! protocol). librdkafka, and the group, wait for that unassign, so the wait is bounded by the
//! engine's `revoke_timeout`, which must fit inside `max.poll.interval.ms`.
//!
//! Per-partition flow: each assigned partition's records are split off into a queue of their
//! own (`split_partition_queue`, as vector's Kafka source does) and cross to the engine through
//! a bounded hand-off of their own: at most [`HANDOFF_BATCHES`] batches per partition are
//! handed over and not yet taken. A partition the engine is not taking records from fills its
//! hand-off, the thread stops polling its queue, and librdkafka's bounded prefetch for it fills
//! and stops fetching, while every other partition flows on. The main queue (rebalances, commit
//! answers, statistics) is polled on every turn whatever the partitions do, so rebalances are
//! served and `max.poll.interval.ms` is never exceeded however slow the handlers are.
//!
//! Prefetch budget: librdkafka bounds its prefetch per partition queue, so with many partitions
//! whose handlers do not keep up it would hold hundreds of MiB. Where librdkafka's own bound for
//! a partition (`queued.min.messages` records of the size seen so far, at most
//! `queued.max.messages.kbytes`) fits in the partition's share of `max_prefetch_bytes` (the
//! budget over the assigned partitions), a held-back partition's records are left in its queue,
//! as above. Where it does not, the poll thread takes them out of the queue into batches of its
//! own, up to the share, and then pauses the partition's fetching in librdkafka, which drops
//! what it had prefetched beyond; once the engine has taken half of the share, fetching resumes
//! where the poll thread stopped. So the whole consumer holds about the budget, whatever the
//! partition count.

use super::pauses::{PauseReason, Pauses};
use crate::bus::engine::{PartitionKey, Source, SourceEvent, Tp};
use crate::bus::BusError;
use crate::handlers::Inbound;
use crate::telemetry::events::{
    BrokerReachability, ConsumerLag, KafkaClientError, OffsetsCommitted, PartitionHeldBack,
    PrefetchBytes, PrefetchPaused, Throttle,
};
use crate::telemetry::{Health, Metrics};
use rdkafka::consumer::base_consumer::PartitionQueue;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers as _, Message};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// Records cross from the poll thread to the engine in batches of up to this many: one hand-off
/// (and at most one wake-up of the engine) per batch rather than per record. A batch is sent as
/// soon as librdkafka has nothing more ready for its partition, so batching adds no latency.
const BATCH: usize = 128;
/// A batch also ends at this many bytes of values, so large records do not make a partition's
/// hand-off the biggest buffer in the process (librdkafka's prefetch is bounded in bytes too).
const BATCH_BYTES: usize = 128 * 1024;
/// Batches of one partition handed over and not yet taken by the engine. Small: the engine's
/// in-flight limits, not this buffer, bound memory; librdkafka keeps its own prefetch queue.
const HANDOFF_BATCHES: usize = 2;
/// The longest the poll thread sleeps when nothing moves; librdkafka and the engine wake it
/// sooner when a queue gets records or a hand-off gets room.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// Batches of one partition the poll thread takes out of its queue in one turn at most, so the
/// main queue and the other partitions are served between them.
const BATCHES_PER_TURN: usize = 8;
/// A hand-off full this long is worth a warning: the partition's handlers are not keeping up.
const HELD_BACK_WARNING: Duration = Duration::from_secs(10);

enum Control {
    Revoked {
        partitions: Vec<Tp>,
        epoch: u64,
        done: oneshot::Sender<()>,
    },
    Assigned(Vec<Tp>),
}

/// A change of assignment, for the poll thread to apply to its partition queues once `poll`
/// (which ran the rebalance callback) has returned.
enum Change {
    Assigned(Vec<Tp>),
    Revoked(Vec<Tp>),
}

/// librdkafka callbacks: logs into `tracing`, rebalances into the engine, commit answers into
/// the metrics.
pub(crate) struct WeirContext {
    control: mpsc::UnboundedSender<Control>,
    /// Bumped at every revoke; batches carry the epoch they were polled in.
    epoch: AtomicU64,
    /// Assignment changes not yet applied by the poll thread, in order.
    changes: Mutex<Vec<Change>>,
    /// The poll thread, woken when a queue gets records.
    poller: Arc<OnceLock<std::thread::Thread>>,
    /// Bytes of records the poll thread holds or has handed over and the engine has not taken,
    /// all partitions together; librdkafka's statistics add its own queues to it.
    held_bytes: AtomicUsize,
    /// Why each partition's fetching is paused.
    pauses: Pauses,
    metrics: Metrics,
    health: Health,
    /// Repeated client errors are logged once per 30 s.
    errors: Throttle,
    /// The revoke the engine is draining, if any ([`PendingRevoke`]).
    pending_revoke: Mutex<Option<PendingRevoke>>,
    /// Each partition's high watermark and lag from the latest statistics, for status reports:
    /// replaced at each statistics callback (every couple of seconds), read when a report asks.
    log_ends: Mutex<HashMap<Tp, (i64, Option<i64>)>>,
    /// The log ends of the paused partitions, asked of the broker by [`refresh_held_ends`]:
    /// librdkafka learns a high watermark only from fetch responses, and a paused partition
    /// is not fetched, so its lag would stay where the pause found it while its backlog grows.
    held_ends: Mutex<HashMap<(Arc<str>, i32), i64>>,
    /// Makes the poll thread panic at its next turn, to test that the panic is reported.
    #[cfg(test)]
    panic_next_turn: AtomicBool,
}

impl WeirContext {
    fn broker_up(&self, up: bool) {
        let was_up = self.health.status().broker_up;
        self.health.set_broker_up(up);
        BrokerReachability { up, was_up }.emit();
    }

    fn change(&self, change: Change) {
        self.changes
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(change);
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
        let mut prefetched = self.held_bytes.load(Ordering::Relaxed);
        let mut ends = HashMap::new();
        let held_ends = self
            .held_ends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                // -1 is librdkafka's internal unassigned partition.
                if *partition >= 0 {
                    prefetched += usize::try_from(p.fetchq_size).unwrap_or(0);
                    let held = held_ends
                        .iter()
                        .find(|((t, n), _)| n == partition && &**t == topic.as_str())
                        .map(|(_, end)| *end);
                    let end = p.hi_offset.max(held.unwrap_or(-1));
                    if end >= 0 {
                        ends.insert((topic.clone(), *partition), (end, lag(p, end)));
                    }
                    if let Some(lag) = lag(p, end) {
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
        PrefetchBytes(prefetched).emit(&self.metrics);
        *self.log_ends.lock().unwrap_or_else(|e| e.into_inner()) = ends;
    }
}

fn partitions(tpl: &TopicPartitionList) -> Vec<Tp> {
    tpl.elements()
        .iter()
        .map(|e| (e.topic().to_owned(), e.partition()))
        .collect()
}

/// A commit answer to count: `None` for "nothing to commit", which commits nothing.
fn commit_answer(result: KafkaResult<()>) -> Option<KafkaResult<()>> {
    match result {
        Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)) => None,
        other => Some(other),
    }
}

/// A revoke the engine is draining. The partitions stay assigned, and the group waits for this
/// member, until the engine answers `drained`; then the poll thread commits and gives them up
/// ([`finish_revoke`]). Meanwhile the poll thread goes on serving every other partition.
struct PendingRevoke {
    tpl: TopicPartitionList,
    drained: oneshot::Receiver<()>,
}

impl WeirContext {
    /// An assignment: the partitions are added (cooperative: only the new ones are listed),
    /// split off by the poll thread and announced to the engine.
    fn assign(&self, consumer: &WeirConsumer, tpl: &TopicPartitionList) {
        let result = if cooperative(consumer) {
            consumer.incremental_assign(tpl)
        } else {
            consumer.assign(tpl)
        };
        if let Err(error) = result {
            tracing::warn!(%error, "Could not take the assigned partitions.");
        }
        self.health.set_joined(true);
        // The group coordinator just answered: a broker is up. Without this, readiness waited
        // for the first statistics (statistics.interval.ms) even while records were already
        // being handled.
        if !self.health.status().broker_up {
            self.broker_up(true);
        }
        let assigned = partitions(tpl);
        self.change(Change::Assigned(assigned.clone()));
        let _ = self.control.send(Control::Assigned(assigned));
    }

    /// A revoke: the partitions stop fetching and feeding the engine at once, and the engine
    /// drains them while the rest flows. Not answered here: librdkafka waits for the unassign,
    /// which the poll thread makes once the engine is done ([`finish_revoke`]), so the poll
    /// thread never blocks on handlers.
    fn revoke(&self, consumer: &WeirConsumer, tpl: &TopicPartitionList) {
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let revoked = partitions(tpl);
        for (topic, partition) in &revoked {
            let tp = (Arc::from(topic.as_str()), *partition);
            self.pauses.pause(consumer, &tp, PauseReason::Revoking);
        }
        self.change(Change::Revoked(revoked.clone()));
        let (done, drained) = oneshot::channel();
        let sent = self.control.send(Control::Revoked {
            partitions: revoked,
            epoch,
            done,
        });
        let pending = PendingRevoke {
            tpl: tpl.clone(),
            drained,
        };
        if sent.is_ok() {
            *self
                .pending_revoke
                .lock()
                .unwrap_or_else(|e| e.into_inner()) = Some(pending);
        } else {
            // The engine has gone (the consumer is closing): nothing runs to drain.
            finish_revoke(consumer, pending);
        }
    }
}

/// Whether the group uses the cooperative protocol (`cooperative-sticky`): rebalances then add
/// and revoke only the partitions that move.
fn cooperative(consumer: &WeirConsumer) -> bool {
    matches!(
        consumer.rebalance_protocol(),
        RebalanceProtocol::Cooperative
    )
}

/// Ends a revoke the engine has drained: commits the positions it stored (not when the
/// assignment was lost: the group has moved on, and the commit could only be refused), then
/// gives the partitions up, which lets the group's rebalance go on.
fn finish_revoke(consumer: &WeirConsumer, pending: PendingRevoke) {
    if !consumer.assignment_lost() {
        count(
            &consumer.context().metrics,
            commit_answer(consumer.commit_consumer_state(CommitMode::Sync)),
        );
    }
    let result = if cooperative(consumer) {
        consumer.incremental_unassign(&pending.tpl)
    } else {
        consumer.unassign()
    };
    if let Err(error) = result {
        tracing::warn!(%error, "Could not give up the revoked partitions.");
    }
    // librdkafka keeps a partition's pause across an unassign: a later owner of it in this
    // process must not find it paused.
    let pauses = &consumer.context().pauses;
    for (topic, partition) in partitions(&pending.tpl) {
        let tp = (Arc::from(topic.as_str()), partition);
        pauses.resume(consumer, &tp, PauseReason::Revoking);
    }
}

/// Finishes the pending revoke if the engine has answered it (or has gone).
fn finish_drained_revoke(consumer: &WeirConsumer) {
    let context = consumer.context();
    let mut pending = context
        .pending_revoke
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let drained = match pending.as_mut() {
        None => return,
        Some(p) => !matches!(
            p.drained.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ),
    };
    if drained {
        let revoke = pending.take().expect("checked above");
        drop(pending);
        finish_revoke(consumer, revoke);
    }
}

impl ConsumerContext for WeirContext {
    /// Replaces rust-rdkafka's rebalance, which assigns and unassigns inside the callback: a
    /// revoke is answered later, from the poll thread, once the engine has drained it.
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => self.assign(consumer, tpl),
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => self.revoke(consumer, tpl),
            other => {
                let error = RDKafkaErrorCode::from(other);
                tracing::warn!(%error, "Rebalance error; giving the partitions up.");
                // As rust-rdkafka does: the assignment is dropped, and the group assigns again.
                let result = if cooperative(consumer) {
                    consumer.incremental_unassign(tpl)
                } else {
                    consumer.unassign()
                };
                if let Err(error) = result {
                    tracing::warn!(%error, "Could not give up the partitions.");
                }
            }
        }
    }

    /// The broker's answer to a commit librdkafka made on its own (`enable.auto.commit=true`,
    /// if a user sets it), served from `poll`. Weir's own commits are synchronous and counted
    /// where they return: librdkafka sends their answers nowhere else.
    fn commit_callback(&self, result: KafkaResult<()>, _offsets: &TopicPartitionList) {
        count(&self.metrics, commit_answer(result));
    }
}

/// Counts a commit answer; a failure is also a warning.
fn count(metrics: &Metrics, answer: Option<KafkaResult<()>>) {
    if let Some(result) = answer {
        OffsetsCommitted {
            result: result
                .as_ref()
                .map(|_| ())
                .map_err(|e| e as &dyn std::fmt::Display),
        }
        .emit(metrics);
    }
}

/// The offsets the engine stored, and those the broker confirmed, per partition the engine has.
#[derive(Default)]
struct Positions {
    stored: HashMap<Tp, i64>,
    confirmed: HashMap<Tp, i64>,
    /// Stored since the last commit started, or that commit failed: a periodic commit has
    /// something to do.
    uncommitted: bool,
}

/// Commits the stored offsets and waits for the broker's answer (`None`: nothing to commit).
/// Once it has them, every offset stored before the commit started is confirmed: librdkafka
/// committed it, or one after it, or had it committed already.
fn commit_stored(consumer: &WeirConsumer, positions: &Mutex<Positions>) -> Option<KafkaResult<()>> {
    let lock = || positions.lock().unwrap_or_else(|e| e.into_inner());
    let before = {
        let mut positions = lock();
        positions.uncommitted = false;
        positions.stored.clone()
    };
    let answer = commit_answer(consumer.commit_consumer_state(CommitMode::Sync));
    let mut positions = lock();
    if matches!(answer, None | Some(Ok(()))) {
        for (tp, offset) in before {
            // Not if the partition was revoked meanwhile.
            if positions.stored.contains_key(&tp) {
                positions.confirmed.insert(tp, offset);
            }
        }
    } else {
        positions.uncommitted = true;
    }
    answer
}

/// Records between the group's committed position and the partition's high watermark. Before
/// the group's first commit the position is the log start (Weir's groups start at `earliest`);
/// librdkafka's own `consumer_lag` is -1 until then, which would hide a backlog that has not
/// been touched at all.
/// `end` is the partition's high watermark: from the statistics, or from the broker for a
/// paused partition ([`refresh_held_ends`]).
fn lag(p: &rdkafka::statistics::Partition, end: i64) -> Option<i64> {
    if end < 0 {
        return None;
    }
    let position = if p.committed_offset >= 0 {
        p.committed_offset
    } else {
        p.lo_offset
    };
    (position >= 0).then(|| (end - position).max(0))
}

/// How often the paused partitions' log ends are asked of the broker: librdkafka's statistics
/// interval, at which the lag is published.
const HELD_ENDS_EVERY: Duration = Duration::from_secs(2);
/// A bound on one round of asking, so that a stop is never held up for long by a broker that
/// does not answer.
const HELD_ENDS_ROUND: Duration = Duration::from_secs(2);

/// Asks the broker for the log end of each paused partition every [`HELD_ENDS_EVERY`], until
/// `stop`; runs on a thread of its own, so that a slow broker never holds up polling. Nothing is
/// asked while nothing is paused.
fn refresh_held_ends(consumer: &WeirConsumer, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        std::thread::park_timeout(HELD_ENDS_EVERY);
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let held = consumer.context().pauses.held();
        let mut ends = HashMap::new();
        let round = Instant::now();
        for tp in held {
            let Some(left) = HELD_ENDS_ROUND.checked_sub(round.elapsed()) else {
                break;
            };
            if stop.load(Ordering::SeqCst) {
                break;
            }
            if let Ok((_, high)) = consumer.fetch_watermarks(&tp.0, tp.1, left) {
                ends.insert(tp, high);
            }
        }
        *consumer
            .context()
            .held_ends
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = ends;
    }
}

pub(crate) type WeirConsumer = BaseConsumer<WeirContext>;

/// Records of one partition polled together, in offset order.
struct Handoff {
    tp: PartitionKey,
    /// The rebalance epoch they were polled in.
    epoch: u64,
    records: Vec<Inbound>,
    /// What the records cost in memory ([`footprint`]).
    bytes: usize,
    /// The partition's hand-off.
    pending: Arc<Pending>,
}

/// One partition's hand-off: batches handed over and not yet taken by the engine.
#[derive(Default)]
struct Pending {
    batches: AtomicUsize,
    bytes: AtomicUsize,
    /// The partition's fetching is paused for memory: the engine wakes the poll thread at each
    /// batch it takes, so that it can resume.
    paused: AtomicBool,
}

/// Creates the consumer and its poll thread, subscribed to `topics`.
pub(crate) fn start(
    config: rdkafka::ClientConfig,
    topics: &[String],
    metrics: Metrics,
    health: Health,
    max_prefetch_bytes: usize,
    on_error: impl Fn(&KafkaError) -> BusError,
) -> Result<KafkaSource, BusError> {
    let queue_bound = QueueBound::of(&config);
    let (control_tx, control) = mpsc::unbounded_channel();
    let poller = Arc::new(OnceLock::<std::thread::Thread>::new());
    let context = WeirContext {
        control: control_tx,
        epoch: AtomicU64::new(0),
        changes: Mutex::new(Vec::new()),
        poller: poller.clone(),
        held_bytes: AtomicUsize::new(0),
        pauses: Pauses::default(),
        pending_revoke: Mutex::new(None),
        log_ends: Mutex::default(),
        held_ends: Mutex::default(),
        metrics,
        health,
        errors: Throttle::new(Duration::from_secs(30)),
        #[cfg(test)]
        panic_next_turn: AtomicBool::new(false),
    };
    let mut consumer: WeirConsumer = config
        .create_with_context(context)
        .map_err(|e| on_error(&e))?;
    consumer.set_nonempty_callback(wake(&poller));
    let consumer = Arc::new(consumer);
    let names: Vec<&str> = topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&names)
        .map_err(|e| BusError::Transport(format!("subscribe to {names:?}: {e}")))?;
    let (handoff_tx, handoff) = mpsc::unbounded_channel();
    let closing = Arc::new(AtomicBool::new(false));
    let thread = {
        let consumer = consumer.clone();
        let closing = closing.clone();
        let poller = poller.clone();
        std::thread::Builder::new()
            .name("weir-kafka-poll".to_owned())
            .spawn(move || {
                let _ = poller.set(std::thread::current());
                poll_loop(
                    consumer,
                    handoff_tx,
                    closing,
                    max_prefetch_bytes,
                    queue_bound,
                );
            })
            .map_err(|e| BusError::Transport(format!("cannot start the poll thread: {e}")))?
    };
    Ok(KafkaSource {
        consumer: OffRuntime(Some(consumer)),
        handoff,
        buffered: Vec::new(),
        cursor: 0,
        closed: HashSet::new(),
        paused: HashSet::new(),
        control,
        revoked_at: HashMap::new(),
        positions: Arc::default(),
        committing: None,
        closing,
        poller: thread.thread().clone(),
        thread: Some(thread),
    })
}

/// A callback that wakes the poll thread (once it has started).
fn wake(poller: &Arc<OnceLock<std::thread::Thread>>) -> impl Fn() + Send + Sync + 'static {
    let poller = poller.clone();
    move || {
        if let Some(thread) = poller.get() {
            thread.unpark();
        }
    }
}

/// One assigned partition, as the poll thread feeds it.
struct Feed {
    tp: PartitionKey,
    /// Its own queue; `None` if librdkafka would not split it (its records then come through
    /// the main queue).
    queue: Option<PartitionQueue<WeirContext>>,
    /// Polled and not handed over yet: the batch being filled, and its bytes ([`footprint`]).
    held: Vec<Inbound>,
    held_bytes: usize,
    /// Full batches the hand-off had no room for, and their bytes.
    waiting: VecDeque<(Vec<Inbound>, usize)>,
    waiting_bytes: usize,
    pending: Arc<Pending>,
    /// Its fetching is paused for memory.
    paused: bool,
    /// Split again after a record of it came through the main queue.
    resplit: bool,
    /// Since when the hand-off has been full, and whether that was logged.
    full_since: Option<Instant>,
    warned: bool,
}

/// Polls the main queue and each partition with room in its hand-off; sleeps when nothing
/// moves, until librdkafka or the engine wakes it.
fn poll_loop(
    consumer: Arc<WeirConsumer>,
    handoff: mpsc::UnboundedSender<Handoff>,
    closing: Arc<AtomicBool>,
    max_prefetch_bytes: usize,
    queue_bound: QueueBound,
) {
    // The refresher ends before this thread does, so the consumer is closed (its last handle
    // dropped) where `KafkaSource::close` expects, after this thread is joined.
    let stop_refresher = Arc::new(AtomicBool::new(false));
    let refresher = {
        let (consumer, stop) = (consumer.clone(), stop_refresher.clone());
        std::thread::Builder::new()
            .name("weir-kafka-ends".to_owned())
            .spawn(move || refresh_held_ends(&consumer, &stop))
    };
    poll_until_closed(consumer, handoff, closing, max_prefetch_bytes, queue_bound);
    stop_refresher.store(true, Ordering::SeqCst);
    match refresher {
        Ok(refresher) => {
            refresher.thread().unpark();
            let _ = refresher.join();
        }
        Err(error) => {
            tracing::warn!(%error, "Could not start the thread that refreshes paused partitions' log ends; their lag is not refreshed.");
        }
    }
}

fn poll_until_closed(
    consumer: Arc<WeirConsumer>,
    handoff: mpsc::UnboundedSender<Handoff>,
    closing: Arc<AtomicBool>,
    max_prefetch_bytes: usize,
    queue_bound: QueueBound,
) {
    let mut feeds: Vec<Feed> = Vec::new();
    let mut converter = Converter::default();
    let poller = consumer.context().poller.clone();
    while !closing.load(Ordering::SeqCst) {
        #[cfg(test)]
        if consumer.context().panic_next_turn.load(Ordering::SeqCst) {
            panic!("injected poll-thread panic");
        }
        finish_drained_revoke(&consumer);
        let mut moved = poll_main_queue(&consumer, &mut feeds, &poller, &mut converter);
        let epoch = consumer.context().epoch.load(Ordering::SeqCst);
        // At least a byte: a partition may always hold one record, so a budget smaller than
        // the partition count slows consumption and never stops it.
        let share = (max_prefetch_bytes / feeds.len().max(1)).max(1);
        // Whether librdkafka's own bound keeps a held-back partition within its share.
        let queue_fits = queue_bound.bytes(&converter) <= share;
        let mut held = 0;
        for feed in &mut feeds {
            let held_back = feed.held_back(&consumer.context().pauses);
            // Only a held-back partition whose queue librdkafka would let grow past its share is
            // taken out of its queue beyond what its hand-off has room for.
            let hoard = held_back && !queue_fits;
            match feed.turn(&mut converter, &handoff, epoch, share, hoard) {
                Ok(m) => moved |= m,
                // The engine has gone.
                Err(Gone) => return close(feeds, consumer),
            }
            feed.bound(&consumer, share, &mut converter);
            held += feed.buffered();
        }
        consumer.context().held_bytes.store(held, Ordering::Relaxed);
        if !moved {
            std::thread::park_timeout(POLL_INTERVAL);
        }
    }
    close(feeds, consumer);
}

/// Polls the main queue until it is empty: rebalances and commit answers, and the records a
/// partition had fetched before it was split off. Draining those before its own queue is
/// polled keeps the partition's records in offset order. Returns whether any record came.
fn poll_main_queue(
    consumer: &Arc<WeirConsumer>,
    feeds: &mut Vec<Feed>,
    poller: &Arc<OnceLock<std::thread::Thread>>,
    converter: &mut Converter,
) -> bool {
    let mut moved = false;
    loop {
        let polled = consumer.poll(Duration::ZERO);
        apply_changes(consumer, feeds, poller);
        match polled {
            None => return moved,
            Some(Ok(message)) => {
                let inbound = converter.inbound(&message);
                if let Some(feed) = feeds
                    .iter_mut()
                    .find(|f| f.tp.1 == inbound.partition && f.tp.0 == inbound.topic)
                {
                    feed.hold_from_main_queue(inbound, consumer, poller);
                }
                moved = true;
            }
            // The context's error callback has logged it already (throttled).
            Some(Err(error)) => tracing::debug!(%error, "Kafka consumer error; still polling."),
        }
    }
}

impl Feed {
    /// Holds a record of the partition that came through the main queue. librdkafka may
    /// point the partition back at the main queue when its fetching starts, after the split:
    /// it is split again (once). The old handle goes first: dropping it unhooks the wake-up of
    /// the (same) underlying queue.
    fn hold_from_main_queue(
        &mut self,
        inbound: Inbound,
        consumer: &Arc<WeirConsumer>,
        poller: &Arc<OnceLock<std::thread::Thread>>,
    ) {
        if self.queue.is_some() && !self.resplit {
            self.resplit = true;
            self.queue = None;
            self.queue = split(consumer, &self.tp, poller);
        }
        self.held_bytes += footprint(&inbound);
        self.held.push(inbound);
    }

    /// Whether the partition's hand-off is full (the engine is not taking its records): what
    /// is polled of it then waits in the poll thread, up to its share of the prefetch budget.
    /// Warns once it has been full for [`HELD_BACK_WARNING`], and again when it has room.
    fn held_back(&mut self, pauses: &Pauses) -> bool {
        if self.pending.batches.load(Ordering::Acquire) >= HANDOFF_BATCHES {
            let since = *self.full_since.get_or_insert_with(std::time::Instant::now);
            // A partition the engine paused is held back on purpose; one paused for the
            // prefetch budget is held back by its handlers, which is worth the warning.
            if !self.warned
                && since.elapsed() >= HELD_BACK_WARNING
                && !pauses.has(&self.tp, PauseReason::Engine)
            {
                self.warned = true;
                PartitionHeldBack {
                    topic: &self.tp.0,
                    partition: self.tp.1,
                    held: true,
                }
                .emit();
            }
            return true;
        }
        self.full_since = None;
        if std::mem::take(&mut self.warned) {
            PartitionHeldBack {
                topic: &self.tp.0,
                partition: self.tp.1,
                held: false,
            }
            .emit();
        }
        false
    }

    /// Bytes of its records the partition holds: polled, or handed over and not yet taken.
    fn buffered(&self) -> usize {
        self.held_bytes + self.waiting_bytes + self.pending.bytes.load(Ordering::Acquire)
    }

    /// Hands batches over while the hand-off has room, and polls the partition's queue into
    /// batches while it holds less than its `share` (up to [`BATCHES_PER_TURN`] batches): only
    /// as many as the hand-off has room for, unless `hoard`. Returns whether anything moved.
    ///
    /// Without `hoard`, what the hand-off has no room for stays in librdkafka's queue: it is
    /// taken at a later turn, and while the partition is held back librdkafka's own bound
    /// keeps it within the share (`queue_fits`). Polling past the hand-off's room whenever it
    /// had some cost the no-op arm of `weir bench` (8 partitions) 15-20%: the poll thread took
    /// up to [`BATCHES_PER_TURN`] batches of one partition in a turn, most of them into
    /// `waiting` (up to 66 at once, most of a partition's prefetch), while the other
    /// partitions' hand-offs ran dry.
    fn turn(
        &mut self,
        converter: &mut Converter,
        handoff: &mpsc::UnboundedSender<Handoff>,
        epoch: u64,
        share: usize,
        hoard: bool,
    ) -> Result<bool, Gone> {
        let mut moved = self.hand_over(handoff, epoch)?;
        if self.paused {
            self.drop_prefetched(converter);
        }
        for _ in 0..BATCHES_PER_TURN {
            if self.paused
                || self.buffered() >= share
                || (!hoard && self.pending.batches.load(Ordering::Acquire) >= HANDOFF_BATCHES)
                || !self.fill(converter, share)
            {
                break;
            }
            moved = true;
            self.hand_over(handoff, epoch)?;
        }
        Ok(moved)
    }

    /// Polls the partition's own queue into the batch being filled, up to [`BATCH`] records or
    /// [`BATCH_BYTES`], and while the partition holds less than its `share`; a full batch
    /// waits for room in the hand-off. Returns whether a record came.
    fn fill(&mut self, converter: &mut Converter, share: usize) -> bool {
        let Some(queue) = &self.queue else {
            return false;
        };
        let others = self.waiting_bytes + self.pending.bytes.load(Ordering::Acquire);
        let mut polled = false;
        while self.held.len() < BATCH
            && self.held_bytes < BATCH_BYTES
            && others + self.held_bytes < share
        {
            match queue.poll(Duration::ZERO) {
                None => break,
                Some(Ok(message)) => {
                    let inbound = converter.inbound(&message);
                    let bytes = footprint(&inbound);
                    converter.records += 1;
                    converter.bytes += bytes;
                    self.held_bytes += bytes;
                    self.held.push(inbound);
                    polled = true;
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "Kafka partition error; still polling.");
                    break;
                }
            }
        }
        if self.held.len() >= BATCH || self.held_bytes >= BATCH_BYTES {
            let bytes = std::mem::take(&mut self.held_bytes);
            let batch = std::mem::replace(&mut self.held, Vec::with_capacity(BATCH));
            self.waiting_bytes += bytes;
            self.waiting.push_back((batch, bytes));
        }
        polled
    }

    /// Frees what librdkafka prefetched for the partition before its pause. The pause makes
    /// those records stale, but librdkafka frees them only when its queue is polled (the pause
    /// puts a barrier at the queue's head, which stops its own purge): polling yields none of
    /// them. A record it does yield is current, and is held.
    fn drop_prefetched(&mut self, converter: &mut Converter) {
        let Some(queue) = &self.queue else {
            return;
        };
        loop {
            match queue.poll(Duration::ZERO) {
                None => return,
                Some(Ok(message)) => {
                    let inbound = converter.inbound(&message);
                    self.held_bytes += footprint(&inbound);
                    self.held.push(inbound);
                }
                Some(Err(error)) => {
                    tracing::debug!(%error, "Kafka partition error; still polling.");
                    return;
                }
            }
        }
    }

    /// Hands the waiting batches over, then the batch being filled, while the hand-off has
    /// room. Returns whether it handed anything over.
    fn hand_over(
        &mut self,
        handoff: &mpsc::UnboundedSender<Handoff>,
        epoch: u64,
    ) -> Result<bool, Gone> {
        let mut moved = false;
        while self.pending.batches.load(Ordering::Acquire) < HANDOFF_BATCHES {
            let (records, bytes) = match self.waiting.pop_front() {
                Some((records, bytes)) => {
                    self.waiting_bytes -= bytes;
                    (records, bytes)
                }
                None if !self.held.is_empty() => (
                    std::mem::replace(&mut self.held, Vec::with_capacity(BATCH)),
                    std::mem::take(&mut self.held_bytes),
                ),
                None => break,
            };
            self.pending.batches.fetch_add(1, Ordering::AcqRel);
            self.pending.bytes.fetch_add(bytes, Ordering::AcqRel);
            handoff
                .send(Handoff {
                    tp: self.tp.clone(),
                    epoch,
                    records,
                    bytes,
                    pending: self.pending.clone(),
                })
                .map_err(|_| Gone)?;
            moved = true;
        }
        Ok(moved)
    }

    /// Pauses the partition's fetching once it holds its `share`, which drops what librdkafka
    /// prefetched for it beyond what was polled; resumes it (from the record after the last
    /// one polled) once the engine has taken half of it.
    fn bound(&mut self, consumer: &WeirConsumer, share: usize, converter: &mut Converter) {
        let held = self.buffered();
        let pause = if !self.paused && held >= share {
            true
        } else if self.paused && held <= share / 2 {
            false
        } else {
            return;
        };
        let pauses = &consumer.context().pauses;
        if pause {
            pauses.pause(consumer, &self.tp, PauseReason::Memory);
        } else {
            pauses.resume(consumer, &self.tp, PauseReason::Memory);
        }
        self.paused = pause;
        self.pending.paused.store(pause, Ordering::Release);
        if pause {
            self.drop_prefetched(converter);
        }
        PrefetchPaused {
            topic: &self.tp.0,
            partition: self.tp.1,
            paused: pause,
            held,
            share,
        }
        .emit();
    }
}

/// The engine has gone: the hand-off's receiver is closed.
struct Gone;

/// What a record costs while it waits: its key and value, and the record itself (the headers
/// are shared with the records around it).
fn footprint(inbound: &Inbound) -> usize {
    std::mem::size_of::<Inbound>()
        + inbound.value.as_ref().map_or(0, bytes::Bytes::len)
        + inbound.key.as_ref().map_or(0, bytes::Bytes::len)
}

/// Applies the assignment changes the rebalance callbacks recorded: splits off the queues of
/// assigned partitions, drops those of revoked ones (with whatever they held: never handed
/// over, so never started, and the new owner fetches them from the committed offset).
fn apply_changes(
    consumer: &Arc<WeirConsumer>,
    feeds: &mut Vec<Feed>,
    poller: &Arc<OnceLock<std::thread::Thread>>,
) {
    let changes = std::mem::take(
        &mut *consumer
            .context()
            .changes
            .lock()
            .unwrap_or_else(|e| e.into_inner()),
    );
    for change in changes {
        match change {
            Change::Revoked(revoked) => feeds.retain(|f| {
                let keep = !revoked.iter().any(|(t, p)| *p == f.tp.1 && **t == *f.tp.0);
                if !keep && f.paused {
                    // Its memory is freed with the feed (the revoke keeps its fetching paused
                    // until librdkafka gives it up).
                    consumer
                        .context()
                        .pauses
                        .resume(consumer, &f.tp, PauseReason::Memory);
                }
                keep
            }),
            Change::Assigned(assigned) => {
                for (topic, partition) in assigned {
                    if feeds
                        .iter()
                        .any(|f| f.tp.1 == partition && *f.tp.0 == *topic)
                    {
                        continue;
                    }
                    let tp = (Arc::from(topic.as_str()), partition);
                    feeds.push(Feed {
                        queue: split(consumer, &tp, poller),
                        tp,
                        held: Vec::with_capacity(BATCH),
                        held_bytes: 0,
                        waiting: VecDeque::new(),
                        waiting_bytes: 0,
                        pending: Arc::default(),
                        paused: false,
                        resplit: false,
                        full_since: None,
                        warned: false,
                    });
                }
            }
        }
    }
}

/// The partition's own queue, waking the poll thread when it gets records.
fn split(
    consumer: &Arc<WeirConsumer>,
    tp: &PartitionKey,
    poller: &Arc<OnceLock<std::thread::Thread>>,
) -> Option<PartitionQueue<WeirContext>> {
    let queue = consumer.split_partition_queue(&tp.0, tp.1).map(|mut q| {
        q.set_nonempty_callback(wake(poller));
        q
    });
    if queue.is_none() {
        tracing::warn!(topic = %tp.0, partition = tp.1, "Could not give the partition a queue of its own; its records come through the main queue.");
    }
    queue
}

/// Dropping the last handle closes the consumer: it leaves the group, so its partitions move to
/// the other members at once instead of after the session timeout. The partition queues go
/// first: each holds a handle of the consumer.
fn close(feeds: Vec<Feed>, consumer: Arc<WeirConsumer>) {
    // A revoke still pending: the engine has ended, so it is over; the close would otherwise
    // wait for its unassign.
    let pending = consumer
        .context()
        .pending_revoke
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take();
    if let Some(pending) = pending {
        finish_revoke(&consumer, pending);
    }
    drop(feeds);
    drop(consumer);
}

/// Turns polled messages into records, with what consecutive records share ([`to_inbound`]).
#[derive(Default)]
struct Converter {
    names: Vec<Arc<str>>,
    last_headers: crate::contracts::Headers,
    /// Records polled from partition queues, and their bytes ([`footprint`]).
    records: usize,
    bytes: usize,
}

/// librdkafka's bound on one partition's queue (`queued.min.messages`,
/// `queued.max.messages.kbytes`; Weir's defaults or the user's).
#[derive(Clone, Copy)]
struct QueueBound {
    records: usize,
    bytes: usize,
}

impl QueueBound {
    fn of(config: &rdkafka::ClientConfig) -> Self {
        let get = |key: &str, default: usize| {
            config
                .get(key)
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(default)
        };
        // librdkafka's defaults where neither Weir nor the user set one.
        Self {
            records: get("queued.min.messages", 100_000),
            bytes: get("queued.max.messages.kbytes", 65_536).saturating_mul(1024),
        }
    }

    /// What the queue holds at most, with records the size of those polled so far.
    fn bytes(&self, converter: &Converter) -> usize {
        let average = converter.bytes / converter.records.max(1);
        self.bytes.min(self.records.saturating_mul(average))
    }
}

impl Converter {
    #[inline]
    fn inbound(&mut self, message: &BorrowedMessage<'_>) -> Inbound {
        to_inbound(message, &mut self.names, &mut self.last_headers)
    }
}

/// `names` keeps one shared copy of each topic name, so a record's topic is not an allocation;
/// `last` the headers of the previous record, which the next record shares when it carries the
/// same ones (nearly every record of a topic carries the same content type): copying them cost
/// four allocations per record, each freed on another thread.
fn to_inbound(
    message: &BorrowedMessage<'_>,
    names: &mut Vec<Arc<str>>,
    last: &mut crate::contracts::Headers,
) -> Inbound {
    let topic = match names.iter().find(|n| ***n == *message.topic()) {
        Some(name) => name.clone(),
        None => {
            let name: Arc<str> = Arc::from(message.topic());
            names.push(name.clone());
            name
        }
    };
    let headers = match message.headers() {
        None => crate::contracts::Headers::new(),
        Some(hs) => {
            let same = hs.count() == last.len()
                && hs.iter().zip(last.iter()).all(|(h, (name, value))| {
                    h.key == name && h.value.unwrap_or_default() == value
                });
            if !same {
                *last = hs
                    .iter()
                    .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                    .collect();
            }
            last.clone()
        }
    };
    Inbound {
        topic,
        partition: message.partition(),
        offset: message.offset(),
        key: message.key().map(bytes::Bytes::copy_from_slice),
        value: message.payload().map(bytes::Bytes::copy_from_slice),
        headers,
        timestamp_ms: message.timestamp().to_millis(),
    }
}

/// Batches of one partition handed over and not yet taken by the engine.
struct Buffered {
    tp: PartitionKey,
    /// Each batch with its bytes and its partition's hand-off.
    batches: VecDeque<(std::vec::IntoIter<Inbound>, usize, Arc<Pending>)>,
}

/// The engine's handle on the consumer. The drop of the last handle closes the consumer, which
/// can run the rebalance callback, which blocks: that must never happen on a runtime thread,
/// so a handle dropped there hands its `Arc` to a thread of its own.
struct OffRuntime(Option<Arc<WeirConsumer>>);

impl std::ops::Deref for OffRuntime {
    type Target = Arc<WeirConsumer>;
    fn deref(&self) -> &Arc<WeirConsumer> {
        self.0.as_ref().expect("taken only when closing")
    }
}

impl Drop for OffRuntime {
    fn drop(&mut self) {
        if let Some(consumer) = self.0.take() {
            if tokio::runtime::Handle::try_current().is_ok() {
                let _ = std::thread::Builder::new()
                    .name("weir-kafka-close".to_owned())
                    .spawn(move || drop(consumer));
            }
        }
    }
}

/// The engine's view of the Kafka consumer.
pub(crate) struct KafkaSource {
    consumer: OffRuntime,
    handoff: mpsc::UnboundedReceiver<Handoff>,
    /// Records handed over and not yet taken, per partition.
    buffered: Vec<Buffered>,
    /// The partition the next record is taken from first.
    cursor: usize,
    /// Partitions the engine takes records of only while its pool has room.
    closed: HashSet<PartitionKey>,
    /// Paused partitions: none of their records is handed to the engine (those handed over
    /// stay buffered, in order), and their fetching is paused in librdkafka.
    paused: HashSet<PartitionKey>,
    control: mpsc::UnboundedReceiver<Control>,
    /// Epoch at which each partition was last revoked: records of it polled before then were
    /// never started and will be fetched again from the committed offset, so they are dropped.
    revoked_at: HashMap<Tp, u64>,
    /// Shared with the commits running on blocking threads.
    positions: Arc<Mutex<Positions>>,
    /// The periodic commit still waiting for the broker, if any.
    committing: Option<tokio::task::JoinHandle<()>>,
    closing: Arc<AtomicBool>,
    poller: std::thread::Thread,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl KafkaSource {
    /// Stops the poll thread and waits for the consumer to leave the group. Fails if the poll
    /// thread panicked: the subscription then did not end cleanly, whatever the engine saw.
    /// Run the returned closure off the runtime (`spawn_blocking`): it waits, and the consumer
    /// may be closed in it.
    pub(crate) fn close(mut self) -> impl FnOnce() -> Result<(), BusError> + Send {
        self.closing.store(true, Ordering::SeqCst);
        self.poller.unpark();
        let thread = self.thread.take();
        let consumer = self.consumer.0.take();
        drop(self);
        move || match thread.map(std::thread::JoinHandle::join) {
            Some(Err(panic)) => Err(BusError::Task(format!(
                "the Kafka poll thread panicked: {}",
                panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default()
            ))),
            _ => {
                drop(consumer);
                Ok(())
            }
        }
    }

    /// Makes the poll thread panic at its next turn.
    #[cfg(test)]
    pub(crate) fn panic_poll_thread(&self) {
        self.consumer
            .context()
            .panic_next_turn
            .store(true, Ordering::SeqCst);
        self.poller.unpark();
    }

    fn tpl(tp: &Tp, offset: Offset) -> TopicPartitionList {
        let mut tpl = TopicPartitionList::new();
        // Adding a partition to a fresh list cannot fail for a valid offset.
        let _ = tpl.add_partition_offset(&tp.0, tp.1, offset);
        tpl
    }

    fn positions(&self) -> std::sync::MutexGuard<'_, Positions> {
        self.positions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn control_event(&mut self, control: Control) -> SourceEvent {
        match control {
            Control::Revoked {
                partitions,
                epoch,
                done,
            } => {
                for tp in &partitions {
                    self.revoked_at.insert(tp.clone(), epoch);
                    // Handed over and not taken: never started; the new owner has them.
                    self.buffered
                        .retain(|b| !(b.tp.1 == tp.1 && *b.tp.0 == *tp.0));
                }
                self.cursor = 0;
                SourceEvent::Revoked { partitions, done }
            }
            Control::Assigned(partitions) => SourceEvent::Assigned(partitions),
        }
    }

    /// Keeps a batch the poll thread handed over, unless it was polled before its partition's
    /// last revoke.
    fn receive(&mut self, batch: Handoff) {
        let stale = !self.revoked_at.is_empty() && {
            let tp = (batch.tp.0.to_string(), batch.tp.1);
            self.revoked_at
                .get(&tp)
                .is_some_and(|revoked| batch.epoch < *revoked)
        };
        if stale {
            return;
        }
        let entry = (batch.records.into_iter(), batch.bytes, batch.pending);
        match self.buffered.iter_mut().find(|b| b.tp == batch.tp) {
            Some(buffered) => buffered.batches.push_back(entry),
            None => self.buffered.push(Buffered {
                tp: batch.tp,
                batches: VecDeque::from([entry]),
            }),
        }
    }

    /// The next record of a partition the engine takes records of, round-robin by batch.
    fn take(&mut self, pool_open: bool) -> Option<Inbound> {
        let n = self.buffered.len();
        for i in 0..n {
            let at = (self.cursor + i) % n;
            let buffered = &mut self.buffered[at];
            let Some((batch, bytes, pending)) = buffered.batches.front_mut() else {
                continue;
            };
            if !pool_open && !self.closed.is_empty() && self.closed.contains(&buffered.tp) {
                continue;
            }
            if !self.paused.is_empty() && self.paused.contains(&buffered.tp) {
                continue;
            }
            let record = batch.next();
            if batch.len() == 0 {
                // The batch is taken: the partition's hand-off has room for another, and its
                // fetching may resume.
                pending.bytes.fetch_sub(*bytes, Ordering::AcqRel);
                if pending.batches.fetch_sub(1, Ordering::AcqRel) == HANDOFF_BATCHES
                    || pending.paused.load(Ordering::Acquire)
                {
                    self.poller.unpark();
                }
                buffered.batches.pop_front();
                self.cursor = at + 1;
            } else {
                self.cursor = at;
            }
            if record.is_some() {
                return record;
            }
        }
        None
    }
}

impl Drop for KafkaSource {
    fn drop(&mut self) {
        self.closing.store(true, Ordering::SeqCst);
        self.poller.unpark();
    }
}

impl Source for KafkaSource {
    async fn next(&mut self, pool_open: bool) -> Option<SourceEvent> {
        loop {
            // Rebalances first, so no record of a revoked partition is taken after its revoke.
            match self.control.try_recv() {
                Ok(control) => return Some(self.control_event(control)),
                Err(mpsc::error::TryRecvError::Disconnected) => return None,
                Err(mpsc::error::TryRecvError::Empty) => {}
            }
            if let Some(inbound) = self.take(pool_open) {
                return Some(SourceEvent::Record(inbound));
            }
            tokio::select! {
                biased;
                control = self.control.recv() => return Some(self.control_event(control?)),
                batch = self.handoff.recv() => self.receive(batch?),
            }
        }
    }

    fn try_record(&mut self, pool_open: bool) -> Option<Inbound> {
        if !self.control.is_empty() {
            return None;
        }
        loop {
            if let Some(inbound) = self.take(pool_open) {
                return Some(inbound);
            }
            let batch = self.handoff.try_recv().ok()?;
            self.receive(batch);
        }
    }

    fn set_open(&mut self, tp: &PartitionKey, open: bool) {
        if open {
            self.closed.remove(tp);
        } else {
            self.closed.insert(tp.clone());
        }
    }

    fn set_paused(&mut self, tp: &PartitionKey, paused: bool) {
        if paused {
            self.paused.insert(tp.clone());
        } else {
            self.paused.remove(tp);
        }
        let consumer = &*self.consumer;
        let pauses = &consumer.context().pauses;
        if paused {
            pauses.pause(consumer, tp, PauseReason::Engine);
        } else {
            pauses.resume(consumer, tp, PauseReason::Engine);
        }
    }

    fn store(&mut self, tp: &Tp, next_offset: i64) {
        // `rd_kafka_offsets_store` takes the next offset to consume, as the engine gives it.
        if let Err(error) = self
            .consumer
            .store_offsets(&Self::tpl(tp, Offset::Offset(next_offset)))
        {
            // The partition was revoked meanwhile; its new owner starts from the last commit.
            tracing::debug!(topic = %tp.0, partition = tp.1, %error, "Offset not stored.");
            return;
        }
        let mut positions = self.positions();
        positions.stored.insert(tp.clone(), next_offset);
        positions.uncommitted = true;
    }

    /// Periodic (`sync` false): starts a commit on a blocking thread, which counts the answer
    /// when the broker gives it, and returns at once; skipped when nothing was stored since the
    /// last one succeeded, and while the previous one still waits (the next carries these
    /// offsets too). `sync`: commits and returns the answer for
    /// the engine to count, once the periodic one still out (if any) has its answer too.
    async fn commit(&mut self, sync: bool) -> Option<Result<(), BusError>> {
        let consumer = Arc::clone(&self.consumer);
        let positions = self.positions.clone();
        if !sync {
            if self.committing.as_ref().is_some_and(|c| !c.is_finished())
                || !self.positions().uncommitted
            {
                return None;
            }
            self.committing = Some(tokio::task::spawn_blocking(move || {
                count(
                    &consumer.context().metrics,
                    commit_stored(&consumer, &positions),
                );
            }));
            return None;
        }
        let committing = self.committing.take();
        let answer =
            match tokio::task::spawn_blocking(move || commit_stored(&consumer, &positions)).await {
                Ok(answer) => {
                    answer.map(|r| r.map_err(|e| BusError::Transport(format!("commit: {e}"))))
                }
                Err(e) => Some(Err(BusError::Task(e.to_string()))),
            };
        // A periodic commit still out has its answer counted too before the source closes. Not
        // awaited first: without a coordinator each waits up to the session timeout, and side
        // by side they wait once.
        if let Some(committing) = committing {
            let _ = committing.await;
        }
        answer
    }

    /// The engine stored the revoked partitions' last positions: the commit at the revoke
    /// carries them, and the partitions are no longer this consumer's to report.
    fn released(&mut self, partitions: &[Tp]) {
        {
            let mut positions = self.positions();
            for tp in partitions {
                positions.stored.remove(tp);
                positions.confirmed.remove(tp);
            }
        }
        // The engine has just answered the revoke: the poll thread commits and unassigns.
        self.poller.unpark();
    }

    fn log_ends(&self) -> HashMap<Tp, (i64, Option<i64>)> {
        self.consumer
            .context()
            .log_ends
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn confirmed(&self) -> Vec<(String, i32, i64)> {
        self.positions()
            .confirmed
            .iter()
            .map(|((t, p), o)| (t.clone(), *p, *o))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn context(metrics: &Metrics) -> WeirContext {
        WeirContext {
            control: mpsc::unbounded_channel().0,
            epoch: AtomicU64::new(0),
            changes: Mutex::new(Vec::new()),
            poller: Arc::default(),
            held_bytes: AtomicUsize::new(0),
            pauses: Pauses::default(),
            pending_revoke: Mutex::new(None),
            log_ends: Mutex::default(),
            held_ends: Mutex::default(),
            metrics: metrics.clone(),
            health: Health::default(),
            errors: Throttle::new(Duration::from_secs(30)),
            panic_next_turn: AtomicBool::new(false),
        }
    }

    #[test]
    fn a_commit_the_broker_refuses_is_counted_as_a_failure() {
        let metrics = Metrics::new();
        let context = context(&metrics);
        let offsets = TopicPartitionList::new();
        context.commit_callback(
            Err(KafkaError::ConsumerCommit(
                RDKafkaErrorCode::RebalanceInProgress,
            )),
            &offsets,
        );
        context.commit_callback(Ok(()), &offsets);
        // Nothing was stored: nothing was committed, nothing to count.
        context.commit_callback(
            Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)),
            &offsets,
        );
        let count = |result| metrics.commits.with_label_values(&[result]).get();
        assert_eq!(count("failure"), 1);
        assert_eq!(count("success"), 1);
    }
}
