//! The consumer engine shared by every bus.
//!
//! At-least-once, stated once: **an offset is stored for commit only after its record's outcome
//! is final** — every handler succeeded, or was skipped, or its dead letter was acknowledged by
//! the broker. Records finish out of order (keys run concurrently), so each partition's
//! [`OffsetTracker`] releases only the highest contiguous finished offset.
//!
//! Flow, per partition: each assigned partition has a *share* of `max_in_flight` (the limit
//! divided by the partitions assigned) that nobody else can take. A partition below its share
//! is always admitted from; above it, it borrows from what the other partitions leave unused,
//! while the total of `max(in flight, share)` over partitions stays within `max_in_flight`. A
//! partition the engine is not admitting from is closed at the source ([`Source::set_open`]):
//! its own bounded hand-off fills and its fetching stops by itself, while the other partitions'
//! records keep flowing. So a slow or large partition never holds another's records behind it.
//! Partitions are deliberately not paused at the client for this: pausing a librdkafka
//! partition discards its prefetched records, and measured with `weir bench` that re-fetching
//! cut throughput by an order of magnitude.
//!
//! Scheduling inside a partition: each record joins a *lane* — its partition (`Partition`
//! order), its partition and key (`Key` order), or none (`Unordered`). A lane runs one record at
//! a time; the rest wait in it in offset order. At most `max_in_flight_per_partition` records of
//! a partition run at once (lane heads beyond that wait for a slot, oldest first).
//!
//! Cancellation, per partition: each partition has a stop token (ends its retry backoffs and
//! dead-letter retries; the record is then not final and is redelivered) and an abort token,
//! which drops its running record futures at their next poll, as vector's Kafka source aborts a
//! revoked partition's task. A revoke first stops the partition's backoffs, lets its running
//! handlers finish until `revoke_timeout`, then aborts the rest and waits until every one of
//! them has ended before it answers the source. An aborted `cpu_bound` call cannot be
//! interrupted on its blocking thread: the revoke (and the drain at stop) also waits for those
//! to return, up to its timeout capped at [`BLOCKING_GRACE`], and reports any still running
//! then as orphans (a log event, a metric, `StopReport::orphaned`). So nothing of a revoked
//! partition runs once the source gives it up, except a reported orphan.
//!
//! A revoke never stops the loop: the revoked partitions *drain* ([`Revoke`]) while the loop
//! goes on admitting, completing and committing the records of every partition that stays, as
//! vector's per-partition finalizers do. With the cooperative assignor a rebalance revokes only
//! the partitions that move, so a rolling deploy no longer pauses the partitions that stay. Every spawned record
//! is known by its task id: a panic anywhere in a record's task, even one that escapes it,
//! ends the record (dead-lettered with kind `panic`, or redelivered if it was being aborted),
//! so no panic leaves a partition stuck.
//!
//! A handler whose first call runs long on the engine's thread (it computes, or blocks its
//! thread with synchronous I/O) has its route's next records run as tasks at once, and a poll
//! long enough to be blocking is named in a warning: one such route never stalls the others.
//!
//! Per-record cost, measured with `weir bench` and callgrind: keying a record allocates nothing
//! (shared topic names, lanes keyed by a hash), positions reach the source once per commit, not
//! once per record, and the engine takes a burst of ready records per turn of its loop. A
//! record whose lane and slot are free has its handler called by the engine itself, with its
//! event decoded in one pass over the record's bytes (`Dispatcher::first_call`): a handler that returns at once (a
//! no-op, a cache hit, a cheap transform) is done without a task, a record future or the flow's
//! counts, and its record touches only the offset tracker. One that waits, fails or panics goes
//! on as the record's task from where that call left off, so it is never called twice for one
//! attempt. With the record's span enabled (a `debug` filter, a sampled trace), the whole
//! record runs inside its span instead, polled once inline first.
//!
//! Pausing ([`control`](super::control)): a partition that a pause covers is closed at the
//! source whatever the flow ([`Source::set_paused`]); what the engine admitted before finishes
//! and commits. Pauses are rules kept here, applied again to each partition assigned later.
//! A route's circuit breaker asks for its pause and its resume through a channel of its own
//! (`breaker_requests`), applied as [`PauseSource::Breaker`](control::PauseSource::Breaker).
//!
//! Stop: stop fetching, drop records that have not started, let running handlers finish within
//! the drain timeout (retry backoffs end at once), abort the rest, wait for their `cpu_bound`
//! calls as a revoke does, commit synchronously.

use super::config::{ConsumerConfig, DeadLetterTopics, ProcessingOrder};
use super::control::{self, Command, Control, PauseCommand, Pauses, Scope};
use super::offsets::OffsetTracker;
use super::{BusError, Publisher};
use crate::handlers::{BlockingCalls, Dispatcher, FirstCall, Inbound, Resume};
use crate::telemetry::events::{
    BlockingCallsOrphaned, InFlight, OffsetsCommitted, Rebalanced, RecordTaskPanicked,
    RevokeDrained,
};
use crate::telemetry::{trace, Health, LocalSeries, PartitionStatus, PauseReason};
use flow::{Flow, PartitionFlow};
use futures_util::FutureExt as _;
use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::hash::BuildHasher as _;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use task::{dead_letter_panic, handle, panic_message, Tokens};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub(crate) type Tp = (String, i32);

/// A partition as the engine keys it: the topic shared, so keying a record costs no allocation.
pub(crate) type PartitionKey = (Arc<str>, i32);

/// What a source hands the engine.
pub(crate) enum SourceEvent {
    Record(Inbound),
    /// These partitions are being taken away; reply on `done` once their work has ended and
    /// their offsets are stored, so the source can commit before giving them up.
    Revoked {
        partitions: Vec<Tp>,
        done: oneshot::Sender<()>,
    },
    Assigned(Vec<Tp>),
}

/// Where records come from and where positions go. Implemented by each bus.
pub(crate) trait Source: Send + 'static {
    /// The next event; `None` when the source is closed. Must be cancel-safe. Records come only
    /// from partitions that are open ([`set_open`](Self::set_open)), or from any partition when
    /// `pool_open` is true (the engine has room beyond the partitions' shares); control events
    /// (rebalances) come whatever the flow.
    fn next(&mut self, pool_open: bool) -> impl Future<Output = Option<SourceEvent>> + Send;
    /// A record that is ready now, without waiting, if no control event is pending, under the
    /// same flow rule as [`next`](Self::next): lets the engine take a burst of records per turn
    /// of its loop instead of one.
    fn try_record(&mut self, pool_open: bool) -> Option<Inbound>;
    /// Whether the engine takes records of `tp` whatever the pool (the partition is below its
    /// share). Called only when that changes. Partitions start open.
    fn set_open(&mut self, tp: &PartitionKey, open: bool);
    /// Whether `tp` is paused: no record of it is handed to the engine, whatever the flow, until
    /// it is resumed; records fetched meanwhile are kept, in order. Called only when that
    /// changes: after its assignment (partitions start running), and when a paused partition
    /// is revoked (resumed, so that it starts running if it is assigned again).
    fn set_paused(&mut self, tp: &PartitionKey, paused: bool);
    /// Remembers `next_offset` as the partition's position to commit.
    fn store(&mut self, tp: &Tp, next_offset: i64);
    /// Commits stored positions; `sync` waits for the broker. Returns the broker's answer when
    /// the source has it now, to be counted by the engine; `None` when there was nothing to
    /// commit or when the source counts the answer itself once the broker gives it (Kafka's
    /// periodic commit, which waits for the broker on a thread of its own).
    fn commit(&mut self, sync: bool) -> impl Future<Output = Option<Result<(), BusError>>> + Send;
    /// The positions the broker confirmed, `(topic, partition, next offset)`, of the partitions
    /// the source still has: never a position only stored, or one whose commit was refused.
    fn confirmed(&self) -> Vec<(String, i32, i64)>;
    /// The high watermark of each partition and its lag, as far as the transport knows them
    /// (Kafka: from the client's statistics); empty where it does not.
    fn log_ends(&self) -> HashMap<Tp, (i64, Option<i64>)> {
        HashMap::new()
    }
    /// The engine is done with these revoked partitions: their last positions were stored
    /// before it answered the revoke, just now. A source forgets what it keeps of them.
    fn released(&mut self, _partitions: &[Tp]) {}
}

/// The flow tells a source which partitions to take records of whatever the pool.
impl<S: Source> flow::Gate for S {
    type Key = PartitionKey;
    #[inline]
    fn set_open(&mut self, tp: &PartitionKey, open: bool) {
        Source::set_open(self, tp, open);
    }
}

/// A lane within a partition: a hash of the record's key (`Key` order) or 0 (`Partition`
/// order). Two keys whose hashes collide share a lane; that only serializes them, which keeps
/// each key's order.
type Lane = u64;

/// The engine hashes a topic name and a lane several times per record; SipHash made that a
/// tenth of a no-op record's cost. foldhash is randomly seeded per process, so crafted keys
/// cannot aim at its buckets either.
type FastHash = foldhash::fast::RandomState;

struct PartitionState {
    tracker: OffsetTracker,
    generation: u64,
    /// Its records in flight, and whether the source takes its records whatever the pool.
    flow: PartitionFlow,
    /// Running now (at most `max_in_flight_per_partition`).
    running: usize,
    /// Busy lanes, each with the records waiting behind its running (or ready) head.
    lanes: HashMap<Lane, VecDeque<Inbound>, FastHash>,
    /// Records free to start (their lane is theirs) waiting for one of the partition's slots.
    ready: VecDeque<(Inbound, Option<Lane>)>,
    /// Highest offset admitted: a transport that hands over a record again (after a seek or a
    /// rebalance race) must not make the tracker see offsets out of order.
    last_admitted: Option<i64>,
    /// The tracker's position advanced since it was last handed to the source. Positions are
    /// handed over in batches, before each commit, not once per record.
    unstored: bool,
    /// The partition's stop and abort tokens, shared with its records' tasks: one reference
    /// count per record rather than two tokens' (each clone of a token takes its tree's lock).
    tokens: Arc<Tokens>,
    /// Being revoked: records that end unfinished now are redelivered to the new owner, not
    /// abandoned by this subscription.
    revoking: bool,
}

struct Completion {
    tp: PartKey,
    offset: i64,
    generation: u64,
    lane: Option<Lane>,
    is_final: bool,
}

/// Where a started record belongs: the partition and lane its completion frees, the
/// partition's generation (a completion from before a revoke is ignored), and the partition's
/// tokens, which stop and abort it.
struct Place {
    key: PartKey,
    lane: Option<Lane>,
    generation: u64,
    tokens: Arc<Tokens>,
}

impl Completion {
    /// The same record's completion, for a task that takes the record over.
    fn clone_place(&self) -> Completion {
        Completion {
            tp: self.tp.clone(),
            ..*self
        }
    }
}

impl Place {
    fn completion(&self, offset: i64, is_final: bool) -> Completion {
        Completion {
            tp: self.key.clone(),
            offset,
            generation: self.generation,
            lane: self.lane,
            is_final,
        }
    }

    fn into_completion(self, offset: i64, is_final: bool) -> Completion {
        Completion {
            tp: self.key,
            offset,
            generation: self.generation,
            lane: self.lane,
            is_final,
        }
    }
}

/// A spawned record, as the engine remembers it until its task ends: the completion of the
/// record unfinished, the record (to dead-letter it if its task panics), and its partition's
/// tokens.
struct Launched {
    unfinished: Completion,
    rec: Arc<Inbound>,
    tokens: Arc<Tokens>,
}

/// How a started record's task begins.
enum Start {
    /// From the start.
    Fresh,
    /// From the start, spawned at once: its route's handler blocked the engine's thread lately.
    Spawn,
    /// From where the engine's first call of its handler left off.
    Resume(Resume),
    /// Its handler's first call returned, then something after it panicked: that call was the
    /// attempt, so the record is dead-lettered with kind `panic` without calling it again.
    Panicked(String),
}

impl PartitionState {
    /// The place of a record of this partition, in `lane`, started now.
    fn place(&self, key: PartKey, lane: Option<Lane>) -> Place {
        Place {
            key,
            lane,
            generation: self.generation,
            tokens: self.tokens.clone(),
        }
    }
}

/// A revoke in progress: its partitions drain (their running records finish, or are aborted at
/// the deadline, and their `cpu_bound` calls return) while the others go on; then their
/// positions are stored, their state is dropped and the source is answered.
struct Revoke {
    id: u64,
    keys: Vec<PartKey>,
    partitions: Vec<Tp>,
    started: Instant,
    deadline: Instant,
    aborted: bool,
    /// Its records have ended; a task waits for their blocking calls to return (up to the
    /// grace), then sends `id` on the engine's `blocking_returned` channel.
    awaiting_blocking: bool,
    done: Option<oneshot::Sender<()>>,
}

#[derive(Debug, Default)]
pub(crate) struct StopReport {
    pub(crate) committed: Vec<(String, i32, i64)>,
    pub(crate) abandoned: usize,
    /// `cpu_bound` calls still running when their partition was given up (at a revoke or at
    /// stop), past the bound the engine waits for them.
    pub(crate) orphaned: usize,
}

pub(crate) struct Engine<S: Source> {
    source: S,
    dispatcher: Arc<Dispatcher>,
    dead_letters: Arc<dyn Publisher>,
    config: ConsumerConfig,
    stop: CancellationToken,
    health: Health,
    partitions: HashMap<PartKey, PartitionState, PartHash>,
    /// The last topic a record came from and its hash: records share their topic's `Arc`, so
    /// a topic name is hashed once, not once per record. Holding the `Arc` keeps its address
    /// from being reused by another name.
    last_topic: Option<(Arc<str>, u64)>,
    /// Spawned records; a task ends with `None` when its partition aborted it.
    tasks: JoinSet<Option<Completion>>,
    /// What each spawned record's task is about, by task id: a task that ends without its
    /// completion (a panic that escaped it, an abort) still ends its record.
    launched: HashMap<tokio::task::Id, Launched, FastHash>,
    /// Records in flight, the partitions' shares of `max_in_flight` and what they hold of it.
    flow: Flow,
    generations: u64,
    /// Records that ended without a final outcome (abandoned at stop).
    unfinished: usize,
    /// Blocking calls given up on while they ran ([`BLOCKING_GRACE`]).
    orphaned: usize,
    /// The consumer group and dead-letter naming, for dead-letter records.
    naming: Arc<(String, DeadLetterTopics)>,
    /// Hashes record keys into lanes; one instance, so a key's lane is stable.
    lane_hasher: FastHash,
    /// Records that finished during their first, inline poll, to complete from the loop (not
    /// recursively from inside `spawn`).
    finished_inline: Vec<Completion>,
    /// Records left to spawn without an inline poll, after an inline poll ran long.
    inline_cooldown: u32,
    inline_budget: std::time::Duration,
    /// Inline polls in a row that ran over the budget.
    slow_polls: u32,
    /// The metrics of records done in their first call, counted without atomics and flushed
    /// at the end of every turn of the loop.
    local: LocalSeries,
    /// The pauses in force ([`control`]), and the channel their changes come through.
    pauses: Pauses,
    commands: mpsc::UnboundedReceiver<Command>,
    control: Control,
    /// The routes' circuit breakers asking to pause or resume their route (`None`: no breaker).
    breaker_requests: Option<mpsc::UnboundedReceiver<crate::handlers::PauseRequest>>,
    /// Revokes whose partitions are draining, oldest first.
    revokes: Vec<Revoke>,
    revoke_ids: u64,
    /// The earliest deadline of a revoke that has not aborted its records yet.
    revoke_timer: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
    /// Revokes whose partitions' blocking calls returned (or whose grace ran out), by id.
    blocking_returned: (mpsc::UnboundedSender<u64>, mpsc::UnboundedReceiver<u64>),
}

/// Inline polls longer than [`inline_budget`], [`SLOW_POLLS`] in a row, mean the handler
/// computes rather than waits: the engine then spawns the next `INLINE_COOLDOWN` records
/// straight away, so such handlers spread over the runtime's threads instead of running on the
/// engine's.
const INLINE_COOLDOWN: u32 = 1024;
/// Inline polls over the budget in a row that make the engine spawn.
const SLOW_POLLS: u32 = 3;

/// The inline budget: about 100 µs on the machine this was tuned on, in units of this
/// machine's own speed. The budget separates handlers that compute from handlers that wait, a
/// property of the handler and not of the clock: measured in fixed microseconds, a slower
/// machine, or the same binary under an instruction counter (callgrind runs code ~50× slower),
/// would take every no-op handler for a computing one and spawn it, and then measure a path the
/// service never takes. So the budget is a multiple of a fixed piece of work timed once per
/// process (~2.8 µs here, so ~100 µs), floored at 50 µs.
fn inline_budget() -> std::time::Duration {
    static BUDGET: std::sync::OnceLock<std::time::Duration> = std::sync::OnceLock::new();
    *BUDGET.get_or_init(|| {
        let unit = (0..3)
            .map(|_| {
                let started = std::time::Instant::now();
                let mut x = 0u64;
                for i in 0..2_000u64 {
                    x = std::hint::black_box(x.wrapping_mul(6_364_136_223_846_793_005) ^ i);
                }
                std::hint::black_box(x);
                started.elapsed()
            })
            .min()
            .unwrap_or_default();
        (unit * 36).max(std::time::Duration::from_micros(50))
    })
}
/// How long a revoke or a drain waits, after aborting its records, for their `cpu_bound` calls
/// to return (at most its own timeout). Such a call runs on a blocking thread and cannot be
/// interrupted: until it returns the partition is not given up, so the next owner never runs
/// the record while this one still does. Past this bound the call is reported as an orphan
/// (a log event, `weir_blocking_calls_orphaned_total` and the stop report), never silently.
pub(crate) const BLOCKING_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// Records taken per turn of the engine loop at most, so completions and commits get their turn.
const BURST: usize = 256;

/// A partition as the engine's own maps key it: with its hash computed once, when a record is
/// admitted, so the half-dozen lookups of its partition on the way to its completion hash a
/// number instead of a topic name each time, and compare names only when the shared topic
/// `Arc`s differ.
#[derive(Clone)]
struct PartKey {
    hash: u64,
    tp: PartitionKey,
}

impl std::ops::Deref for PartKey {
    type Target = PartitionKey;
    fn deref(&self) -> &PartitionKey {
        &self.tp
    }
}

impl PartialEq for PartKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash
            && self.tp.1 == other.tp.1
            && (Arc::ptr_eq(&self.tp.0, &other.tp.0) || self.tp.0 == other.tp.0)
    }
}

impl Eq for PartKey {}

impl std::hash::Hash for PartKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}

/// Passes a [`PartKey`]'s own hash through (already a foldhash, so well spread).
#[derive(Default)]
struct PassThrough(u64);

impl std::hash::Hasher for PassThrough {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
}

type PartHash = std::hash::BuildHasherDefault<PassThrough>;

impl<S: Source> Engine<S> {
    pub(crate) fn new(
        source: S,
        dispatcher: Arc<Dispatcher>,
        dead_letters: Arc<dyn Publisher>,
        config: ConsumerConfig,
        stop: CancellationToken,
        health: Health,
    ) -> Self {
        let naming = Arc::new((config.group_id.clone(), config.dead_letter.clone()));
        let flow = Flow::new(config.max_in_flight);
        let (topics, pairs) = dispatcher.routes();
        let mut scope = Scope {
            topics: topics.into_iter().collect(),
            ..Scope::default()
        };
        for (route, topic) in pairs {
            scope.routes.entry(route).or_default().insert(topic);
        }
        let scope = Arc::new(scope);
        let (control, commands) = Control::new(scope.clone());
        let breaker_requests = dispatcher.breaker_requests();
        Self {
            breaker_requests,
            source,
            dispatcher,
            dead_letters,
            config,
            stop,
            health,
            partitions: HashMap::default(),
            tasks: JoinSet::new(),
            launched: HashMap::default(),
            flow,
            generations: 0,
            unfinished: 0,
            orphaned: 0,
            naming,
            lane_hasher: Default::default(),
            finished_inline: Vec::new(),
            last_topic: None,
            inline_cooldown: 0,
            inline_budget: inline_budget(),
            slow_polls: 0,
            local: LocalSeries::default(),
            pauses: Pauses::new(scope),
            commands,
            control,
            revokes: Vec::new(),
            revoke_ids: 0,
            revoke_timer: None,
            blocking_returned: mpsc::unbounded_channel(),
        }
    }

    /// A handle that pauses and resumes this engine's partitions.
    pub(crate) fn control(&self) -> Control {
        self.control.clone()
    }

    /// Runs until `stop` fires or the source closes; returns the report and the source, so the
    /// caller can close the transport after the final commit.
    pub(crate) async fn run(mut self) -> (StopReport, S) {
        let mut commit_tick = tokio::time::interval(self.config.commit_interval);
        commit_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let pool_open = self.pool_open();
            tokio::select! {
                // Biased, and the commit tick before the busy branches: under load a completion or
                // a record is always ready, and a tick polled last would never win.
                biased;
                _ = self.stop.cancelled() => break,
                _ = commit_tick.tick() => self.commit(false).await,
                Some(command) = self.commands.recv() => self.command(command),
                Some(request) = breaker_request(&mut self.breaker_requests) => {
                    let target = control::PauseTarget::route(&*request.route);
                    self.set_pause(control::PauseSource::Breaker, target, request.reason);
                }
                () = revoke_deadline(&mut self.revoke_timer) => self.revoke_deadline_passed(),
                Some(id) = self.blocking_returned.1.recv() => self.blocking_returned(id),
                Some(joined) = self.tasks.join_next_with_id() => self.joined(joined, true),
                event = self.source.next(pool_open) => match event {
                    None => break,
                    Some(SourceEvent::Record(rec)) => {
                        self.admit(rec);
                        self.settle_inline();
                        self.admit_ready();
                    }
                    Some(SourceEvent::Revoked { partitions, done }) => self.revoke(partitions, done),
                    Some(SourceEvent::Assigned(partitions)) => {
                        Rebalanced { kind: "assign", partitions: &partitions }.emit(self.dispatcher.metrics());
                        for tp in &partitions {
                            let key = self.key_of_tp(tp);
                            self.add_partition(key.clone());
                            self.pause_assigned(&key);
                        }
                    }
                },
            }
            self.settle_inline();
            if !self.revokes.is_empty() {
                self.advance_revokes();
            }
            self.local.flush();
        }
        self.drain().await
    }

    /// A pause command from a [`Control`] handle: applied, then answered with the pauses in force.
    fn command(&mut self, command: Command) {
        let PauseCommand {
            source,
            target,
            reason,
            done,
        } = match command {
            Command::Pause(pause) => pause,
            Command::Status(done) => {
                let _ = done.send(self.status());
                return;
            }
        };
        self.set_pause(source, target, reason);
        let _ = done.send(self.pauses.list());
    }

    /// Each owned partition's status, built now from what the engine keeps anyway: its last
    /// admitted offset, its flow's count, the pauses, and what the source knows of commits and
    /// log ends. Asked every few seconds by a reporter; costs nothing between asks.
    fn status(&self) -> Vec<PartitionStatus> {
        let committed = self.source.confirmed();
        let confirmed: HashMap<(&str, i32), i64> = committed
            .iter()
            .map(|(topic, partition, offset)| ((topic.as_str(), *partition), *offset))
            .collect();
        let ends = self.source.log_ends();
        self.partitions
            .iter()
            .filter(|(_, state)| !state.revoking)
            .map(|(key, state)| {
                let (topic, partition) = (&*key.tp.0, key.tp.1);
                let reasons = self.pauses.reasons(topic, partition);
                let end = ends.get(&(topic.to_owned(), partition));
                PartitionStatus {
                    topic: topic.to_owned(),
                    partition,
                    position: state.last_admitted.map(|o| o + 1),
                    committed: confirmed.get(&(topic, partition)).copied(),
                    log_end: end.map(|e| e.0),
                    lag: end.and_then(|e| e.1),
                    in_flight: state.flow.in_flight(),
                    paused: !reasons.is_empty(),
                    pause_reasons: reasons
                        .into_iter()
                        .map(|(source, reason)| PauseReason {
                            source: source.as_str().to_owned(),
                            reason,
                        })
                        .collect(),
                }
            })
            .collect()
    }

    /// Adds (`Some(reason)`) or lifts (`None`) `source`'s pause of `target`, for the partitions
    /// owned now; those assigned later get theirs at assignment
    /// ([`pause_assigned`](Self::pause_assigned)). The one entry point of every pause source.
    fn set_pause(
        &mut self,
        source: control::PauseSource,
        target: control::PauseTarget,
        reason: Option<String>,
    ) {
        let owned: Vec<PartitionKey> = self.partitions.keys().map(|k| k.tp.clone()).collect();
        let before: Vec<_> = owned
            .iter()
            .map(|(t, p)| self.pauses.reasons(t, *p))
            .collect();
        self.pauses.apply(source, target, reason);
        for (tp, before) in owned.iter().zip(before) {
            let after = self.pauses.reasons(&tp.0, tp.1);
            if after == before {
                continue;
            }
            control::report(
                self.dispatcher.metrics(),
                &tp.0,
                tp.1,
                &before,
                &after,
                false,
            );
            if after.is_empty() != before.is_empty() {
                self.source.set_paused(tp, !after.is_empty());
            }
        }
    }

    /// A partition just assigned is paused at once if a pause in force covers it.
    fn pause_assigned(&mut self, key: &PartKey) {
        if self.pauses.is_empty() {
            return;
        }
        let reasons = self.pauses.reasons(&key.tp.0, key.tp.1);
        if !reasons.is_empty() {
            control::report(
                self.dispatcher.metrics(),
                &key.tp.0,
                key.tp.1,
                &control::Reasons::new(),
                &reasons,
                false,
            );
            self.source.set_paused(&key.tp, true);
        }
    }

    /// The engine's key of a partition.
    fn key_of(&mut self, topic: &Arc<str>, partition: i32) -> PartKey {
        let topic_hash = match &self.last_topic {
            Some((last, hash)) if Arc::ptr_eq(last, topic) => *hash,
            _ => {
                let hash = self.lane_hasher.hash_one(&**topic);
                self.last_topic = Some((topic.clone(), hash));
                hash
            }
        };
        PartKey {
            hash: topic_hash ^ (partition as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
            tp: (topic.clone(), partition),
        }
    }

    fn key_of_tp(&mut self, tp: &Tp) -> PartKey {
        self.key_of(&Arc::from(tp.0.as_str()), tp.1)
    }

    /// Whether records may be taken beyond the partitions' shares.
    fn pool_open(&self) -> bool {
        self.flow.pool_open()
    }

    /// Takes the records the source has ready, while there is room: one turn of the loop (and
    /// its polls of the stop token, the commit tick and the task set) per burst, not per record.
    fn admit_ready(&mut self) {
        for _ in 0..BURST {
            let Some(rec) = self.source.try_record(self.pool_open()) else {
                break;
            };
            self.admit(rec);
            self.settle_inline();
        }
    }

    /// Adds the partition's state (with a fresh generation) if it is new; a new partition
    /// changes every partition's share.
    fn add_partition(&mut self, key: PartKey) {
        if !self.partitions.contains_key(&key) {
            self.generations += 1;
            let stop = self.stop.child_token();
            self.partitions.insert(
                key.clone(),
                PartitionState {
                    tracker: OffsetTracker::default(),
                    generation: self.generations,
                    flow: PartitionFlow::new(),
                    running: 0,
                    lanes: HashMap::default(),
                    ready: VecDeque::new(),
                    last_admitted: None,
                    unstored: false,
                    tokens: Arc::new(Tokens {
                        stop,
                        abort: CancellationToken::new(),
                        blocking: Arc::default(),
                    }),
                    revoking: false,
                },
            );
            self.reshare();
        }
    }

    /// Recomputes the shares after the set of partitions changed, and tells the source which
    /// partitions are below theirs.
    fn reshare(&mut self) {
        let partitions = self
            .partitions
            .iter_mut()
            .map(|(tp, state)| (&tp.tp, &mut state.flow));
        self.flow.reshare(partitions, &mut self.source);
    }

    fn admit(&mut self, rec: Inbound) {
        let lane = match self.config.order {
            ProcessingOrder::Partition => Some(0),
            ProcessingOrder::Key => Some(self.lane_hasher.hash_one(rec.key.as_deref())),
            ProcessingOrder::Unordered => None,
        };
        let key = self.key_of(&rec.topic, rec.partition);
        if !self.partitions.contains_key(&key) {
            self.add_partition(key.clone());
        }
        let limit = self.config.max_in_flight_per_partition;
        let Some(state) = self.partitions.get_mut(&key) else {
            return;
        };
        if state.revoking {
            // Its partition is draining: the record is the next owner's.
            return;
        }
        if state.last_admitted.is_some_and(|last| rec.offset <= last) {
            tracing::debug!(topic = %rec.topic, partition = rec.partition, offset = rec.offset, "Record already admitted; ignoring the repeat.");
            return;
        }
        state.last_admitted = Some(rec.offset);
        let runs_now =
            state.running < limit && lane.is_none_or(|lane| !state.lanes.contains_key(&lane));
        if !runs_now {
            self.count_in(&key, rec.offset);
            let Some(state) = self.partitions.get_mut(&key) else {
                return;
            };
            // Behind its lane's running record, or (its lane now taken) waiting for a slot,
            // which `start` queues it for.
            if let Some(busy) = lane {
                if let Some(waiting) = state.lanes.get_mut(&busy) {
                    waiting.push_back(rec);
                    return;
                }
                state.lanes.insert(busy, VecDeque::new());
            }
            self.start(&key, rec, lane);
            return;
        }
        // Its lane and a slot are free: its handler is called now. A record done in that call
        // never waited, so it touches none of the flow's counts or the lanes: only its offset.
        let span = self.dispatcher.span(&rec);
        let rec = Arc::new(rec);
        let resume = match self.first_call(&rec, &span) {
            FirstCall::Handled { .. } => {
                if let Some(state) = self.partitions.get_mut(&key) {
                    if state.tracker.passed(rec.offset).is_some() {
                        state.unstored = true;
                    }
                }
                return;
            }
            FirstCall::Resume { resume, .. } => Start::Resume(resume),
            FirstCall::Panicked { message, .. } => Start::Panicked(message),
            FirstCall::Spawn => Start::Spawn,
            FirstCall::Fresh => Start::Fresh,
        };
        self.count_in(&key, rec.offset);
        let Some(state) = self.partitions.get_mut(&key) else {
            return;
        };
        if let Some(lane) = lane {
            state.lanes.insert(lane, VecDeque::new());
        }
        state.running += 1;
        let place = state.place(key, lane);
        self.launch(place, rec, span, resume);
    }

    /// A record of `key` joins the flow: its offset is tracked, and it counts against its
    /// partition's share and `max_in_flight` until it leaves ([`release`](Self::release)).
    fn count_in(&mut self, key: &PartKey, offset: i64) {
        let Some(state) = self.partitions.get_mut(key) else {
            return;
        };
        state.tracker.begin(offset);
        self.flow.count_in(&mut state.flow, &mut self.source, key);
        InFlight(self.flow.in_flight()).emit(self.dispatcher.metrics());
    }

    /// Records of a partition left the engine (finished, or dropped unstarted).
    fn release(&mut self, tp: &PartKey, count: usize) {
        if let Some(state) = self.partitions.get_mut(tp) {
            self.flow
                .release(&mut state.flow, &mut self.source, tp, count);
        }
    }

    /// Runs a record now if its partition has a free slot, else queues it for the next one.
    fn start(&mut self, key: &PartKey, rec: Inbound, lane: Option<Lane>) {
        let limit = self.config.max_in_flight_per_partition;
        let Some(state) = self.partitions.get_mut(key) else {
            return;
        };
        if state.running < limit {
            state.running += 1;
            let place = state.place(key.clone(), lane);
            self.spawn(place, rec);
        } else {
            state.ready.push_back((rec, lane));
        }
    }

    fn spawn(&mut self, place: Place, rec: Inbound) {
        let span = self.dispatcher.span(&rec);
        let rec = Arc::new(rec);
        let resume = match self.first_call(&rec, &span) {
            FirstCall::Handled { .. } => {
                self.finished_inline
                    .push(place.into_completion(rec.offset, true));
                return;
            }
            FirstCall::Resume { resume, .. } => Start::Resume(resume),
            FirstCall::Panicked { message, .. } => Start::Panicked(message),
            FirstCall::Spawn => Start::Spawn,
            FirstCall::Fresh => Start::Fresh,
        };
        self.launch(place, rec, span, resume);
    }

    /// The handler's first call, made here: a handler that does not wait (a no-op, a cache
    /// hit, a cheap transform) is done without a task, a wake-up and a hand-back, nor the
    /// record's future, which cost more than such a handler. One that waits, fails or panics
    /// goes on as the record's task from where the call left off ([`launch`](Self::launch));
    /// its next poll there registers the task's waker, as the `Future` contract requires of
    /// every poll. Only with the record's span disabled (the default `info` level, no tracer
    /// sampling it): an enabled span runs the whole record as a task inside it. `Fresh` when
    /// the call was not made.
    fn first_call(&mut self, rec: &Arc<Inbound>, span: &tracing::Span) -> FirstCall {
        if self.inline_cooldown > 0 || !span.is_disabled() {
            return FirstCall::Fresh;
        }
        // A panic outside the handler's call (a payload's `Deserialize`, say) leaves the
        // record to its task, which catches it again and dead-letters the record.
        let first = std::panic::catch_unwind(AssertUnwindSafe(|| {
            self.dispatcher
                .first_call(rec, &mut self.local, self.inline_budget)
        }))
        .unwrap_or(FirstCall::Fresh);
        if let FirstCall::Handled { polled }
        | FirstCall::Resume { polled, .. }
        | FirstCall::Panicked { polled, .. } = &first
        {
            self.note_inline_poll(*polled);
        }
        first
    }

    /// Runs a started record as a task: from where its first call left off, or from the
    /// start, polled once inline first unless the engine is cooling down.
    fn launch(&mut self, place: Place, rec: Arc<Inbound>, span: tracing::Span, start: Start) {
        let launched = Launched {
            unfinished: place.completion(rec.offset, false),
            rec: rec.clone(),
            tokens: place.tokens.clone(),
        };
        let fresh = matches!(start, Start::Fresh);
        let task = self.record_task(place, rec, start, span.clone());
        let task = Box::pin(task.instrument(span));
        if !fresh {
            self.spawn_task(task, launched);
            return;
        }
        if self.inline_cooldown > 0 {
            self.inline_cooldown -= 1;
            self.spawn_task(task, launched);
            return;
        }
        self.poll_inline(task, launched);
    }

    /// Spawns a record's task, remembered by its id until it ends.
    fn spawn_task<F>(&mut self, task: F, launched: Launched)
    where
        F: Future<Output = Completion> + Send + 'static,
    {
        let abort = launched.tokens.clone();
        let id = self.tasks.spawn(abortable(task, abort)).id();
        self.launched.insert(id, launched);
    }

    /// The record's future: [`handle`] to its final outcome. A panic in there is caught and
    /// the record dead-lettered with kind `panic`, so no panic leaves its partition stuck.
    fn record_task(
        &self,
        place: Place,
        rec: Arc<Inbound>,
        start: Start,
        span: tracing::Span,
    ) -> impl Future<Output = Completion> + Send + 'static {
        let dispatcher = self.dispatcher.clone();
        let publisher = self.dead_letters.clone();
        // Shared, not copied: only a failing record needs the group and the dead-letter topic.
        let naming = self.naming.clone();
        let Place {
            key,
            lane,
            generation,
            tokens,
        } = place;
        let done = Completion {
            tp: key,
            offset: rec.offset,
            generation,
            lane,
            is_final: true,
        };
        async move {
            let resume = match start {
                Start::Fresh | Start::Spawn => Ok(None),
                Start::Resume(resume) => Ok(Some(resume)),
                Start::Panicked(message) => Err(message),
            };
            let handled = match resume {
                Ok(resume) => AssertUnwindSafe(handle(
                    &rec,
                    resume,
                    &dispatcher,
                    &*publisher,
                    &naming,
                    &tokens,
                    &span,
                ))
                .catch_unwind()
                .await
                .map_err(|panic| panic_message(&*panic)),
                Err(message) => Err(message),
            };
            let is_final = match handled {
                Ok(is_final) => is_final,
                Err(message) => {
                    RecordTaskPanicked {
                        at: rec.at(),
                        error: &message,
                        dead_lettering: true,
                    }
                    .emit();
                    dead_letter_panic(
                        &rec,
                        message,
                        &dispatcher,
                        &*publisher,
                        &naming,
                        &tokens.stop,
                    )
                    .await
                }
            };
            Completion { is_final, ..done }
        }
    }

    /// A record whose first call was not made (an enabled span, or a record off that call's
    /// path: see [`FirstCall::Fresh`]) may still finish without waiting: its whole future is
    /// polled once here, for the reason [`first_call`](Self::first_call) gives, and spawned
    /// only if it waits. The task catches its own panics, so this poll does not unwind.
    fn poll_inline<F>(&mut self, mut task: std::pin::Pin<Box<F>>, launched: Launched)
    where
        F: Future<Output = Completion> + Send + 'static,
    {
        let started = std::time::Instant::now();
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let polled = task.as_mut().poll(&mut cx);
        self.note_inline_poll(started.elapsed());
        match polled {
            std::task::Poll::Ready(done) => self.finished_inline.push(done),
            std::task::Poll::Pending => self.spawn_task(task, launched),
        }
    }

    /// Counts an inline poll that ran over the budget; several in a row make the engine spawn
    /// the next records instead. Several: one long poll alone is as likely the thread losing
    /// its core mid-poll (a loaded machine, a profiler) as a handler that computes.
    fn note_inline_poll(&mut self, polled: std::time::Duration) {
        if polled > self.inline_budget {
            self.slow_polls += 1;
            if self.slow_polls >= SLOW_POLLS {
                self.inline_cooldown = INLINE_COOLDOWN;
                self.slow_polls = 0;
            }
        } else {
            self.slow_polls = 0;
        }
    }

    /// Completes the records that finished inline, and those that finishing them started.
    fn settle_inline(&mut self) {
        while let Some(done) = self.finished_inline.pop() {
            self.complete(done, true);
        }
    }

    /// A record's task ended: its completion, or, if the task ended without one, the
    /// record's from what the engine remembers of it. A record task catches the panics of its
    /// record's handling; one that escapes it (a handler future whose drop panics when its
    /// partition aborts it, say) still ends the record, so its slot, lane and offset are freed.
    fn joined(
        &mut self,
        joined: Result<(tokio::task::Id, Option<Completion>), tokio::task::JoinError>,
        start_next: bool,
    ) {
        let (id, done) = match joined {
            Ok((id, done)) => (id, Ok(done)),
            Err(e) => (e.id(), Err(e)),
        };
        let Some(launched) = self.launched.remove(&id) else {
            return;
        };
        match done {
            Ok(Some(done)) => self.complete(done, start_next),
            // Aborted with its partition: unfinished, redelivered to the partition's next owner.
            Ok(None) => self.complete(launched.unfinished, start_next),
            Err(e) => self.task_failed(e, launched, start_next),
        }
    }

    /// A record's task ended without its completion. Cancelled, or panicked while its
    /// partition was aborting or stopping it: the record ends unfinished and is redelivered.
    /// Panicked otherwise: the record is dead-lettered with kind `panic`, in a task of its own.
    fn task_failed(&mut self, error: tokio::task::JoinError, launched: Launched, start_next: bool) {
        let stopping = launched.tokens.abort.is_cancelled() || launched.tokens.stop.is_cancelled();
        let message = match error.try_into_panic() {
            Ok(panic) => panic_message(&*panic),
            Err(_) => {
                self.complete(launched.unfinished, start_next);
                return;
            }
        };
        RecordTaskPanicked {
            at: launched.rec.at(),
            error: &message,
            dead_lettering: !stopping,
        }
        .emit_escaped();
        if stopping {
            self.complete(launched.unfinished, start_next);
            return;
        }
        let done = Completion {
            is_final: true,
            ..launched.unfinished.clone_place()
        };
        let (dispatcher, publisher) = (self.dispatcher.clone(), self.dead_letters.clone());
        let (naming, tokens, rec) = (
            self.naming.clone(),
            launched.tokens.clone(),
            launched.rec.clone(),
        );
        let task = async move {
            let is_final = dead_letter_panic(
                &rec,
                message,
                &dispatcher,
                &*publisher,
                &naming,
                &tokens.stop,
            )
            .await;
            Completion { is_final, ..done }
        };
        self.spawn_task(task, launched);
    }

    fn complete(&mut self, done: Completion, start_next: bool) {
        let Some(state) = self
            .partitions
            .get_mut(&done.tp)
            .filter(|s| s.generation == done.generation)
        else {
            // The partition was revoked meanwhile and its counts were settled then.
            return;
        };
        let mut lane_next = None;
        if let Some(lane) = done.lane {
            match state.lanes.get_mut(&lane).and_then(VecDeque::pop_front) {
                Some(rec) => lane_next = Some(rec),
                None => {
                    state.lanes.remove(&lane);
                }
            }
        }
        state.running -= 1;
        if done.is_final {
            if state.tracker.complete(done.offset).is_some() {
                state.unstored = true;
            }
        } else if !state.revoking {
            self.unfinished += 1;
        }
        self.flow
            .release(&mut state.flow, &mut self.source, &done.tp, 1);
        InFlight(self.flow.in_flight()).emit(self.dispatcher.metrics());
        if !start_next {
            if let (Some(rec), Some(lane)) = (lane_next, done.lane) {
                state.lanes.entry(lane).or_default().push_front(rec);
            }
            return;
        }
        if let Some(rec) = lane_next {
            self.start(&done.tp, rec, done.lane);
        }
        let limit = self.config.max_in_flight_per_partition;
        while let Some(state) = self.partitions.get_mut(&done.tp) {
            if state.running >= limit {
                break;
            }
            let Some((rec, lane)) = state.ready.pop_front() else {
                break;
            };
            state.running += 1;
            let place = state.place(done.tp.clone(), lane);
            self.spawn(place, rec);
        }
    }

    /// Hands the positions that advanced since the last call to the source, before a commit.
    fn store_positions(&mut self, matches: impl Fn(&PartKey) -> bool) {
        for (tp, state) in self.partitions.iter_mut() {
            if !state.unstored || !matches(tp) {
                continue;
            }
            state.unstored = false;
            if let Some(position) = state.tracker.committable() {
                self.source.store(&(tp.0.to_string(), tp.1), position);
            }
        }
    }

    /// Drops the waiting records of matching partitions; returns how many. Their offsets stay
    /// unfinished in the tracker, so nothing at or after them is committed.
    fn drop_waiting(&mut self, matches: impl Fn(&PartKey) -> bool) -> usize {
        let mut dropped = Vec::new();
        for (tp, state) in self.partitions.iter_mut() {
            if !matches(tp) {
                continue;
            }
            let mut here = 0;
            for waiting in state.lanes.values_mut() {
                here += waiting.len();
                waiting.clear();
            }
            // A lane whose head was waiting for a slot has nothing running; forget it, or it
            // would stay marked busy.
            for (_, lane) in state.ready.drain(..) {
                here += 1;
                if let Some(lane) = lane {
                    state.lanes.remove(&lane);
                }
            }
            if here > 0 {
                dropped.push((tp.clone(), here));
            }
        }
        let mut total = 0;
        for (tp, here) in dropped {
            self.release(&tp, here);
            total += here;
        }
        total
    }

    /// Starts draining revoked partitions: what has not started goes to the next owner (so do
    /// records waiting for a retry), running handlers get until `revoke_timeout`. The loop goes
    /// on meanwhile; [`advance_revokes`](Self::advance_revokes) answers the source once they
    /// have ended.
    fn revoke(&mut self, partitions: Vec<Tp>, done: oneshot::Sender<()>) {
        Rebalanced {
            kind: "revoke",
            partitions: &partitions,
        }
        .emit(self.dispatcher.metrics());
        let keys: Vec<PartKey> = partitions.iter().map(|tp| self.key_of_tp(tp)).collect();
        self.drop_waiting(|tp| keys.contains(tp));
        for tp in &keys {
            if let Some(state) = self.partitions.get_mut(tp) {
                state.revoking = true;
                state.tokens.stop.cancel();
            }
        }
        self.revoke_ids += 1;
        let started = Instant::now();
        let deadline = started + self.config.revoke_timeout;
        if self.revoke_timer.is_none() {
            self.revoke_timer = Some(Box::pin(tokio::time::sleep_until(deadline)));
        }
        self.revokes.push(Revoke {
            id: self.revoke_ids,
            keys,
            partitions,
            started,
            deadline,
            aborted: false,
            awaiting_blocking: false,
            done: Some(done),
        });
        self.advance_revokes();
    }

    /// A revoke's deadline passed with records of its partitions still running: they are
    /// aborted (each dropped at its next poll, ending unfinished, redelivered to the next owner).
    fn revoke_deadline_passed(&mut self) {
        let now = Instant::now();
        let mut next = None;
        for revoke in self.revokes.iter_mut().filter(|r| !r.aborted) {
            if revoke.deadline > now {
                next = Some(next.map_or(revoke.deadline, |n: Instant| n.min(revoke.deadline)));
                continue;
            }
            revoke.aborted = true;
            let running = revoke
                .keys
                .iter()
                .any(|tp| self.partitions.get(tp).is_some_and(|s| s.running > 0));
            if running {
                tracing::warn!(partitions = ?revoke.partitions, "Revoked partitions did not drain in time; cancelling their running handlers, whose records will be redelivered.");
            }
            for tp in &revoke.keys {
                if let Some(state) = self.partitions.get(tp) {
                    state.tokens.abort.cancel();
                }
            }
        }
        self.revoke_timer = next.map(|at| Box::pin(tokio::time::sleep_until(at)));
    }

    /// Ends the revokes whose partitions have nothing running: once their blocking calls have
    /// returned too (a task waits for them, up to the grace), the partitions are given up.
    fn advance_revokes(&mut self) {
        let mut i = 0;
        while i < self.revokes.len() {
            let revoke = &self.revokes[i];
            let running = revoke
                .keys
                .iter()
                .any(|tp| self.partitions.get(tp).is_some_and(|s| s.running > 0));
            if revoke.awaiting_blocking || running {
                i += 1;
                continue;
            }
            let calls: Vec<Arc<BlockingCalls>> = revoke
                .keys
                .iter()
                .filter_map(|tp| self.partitions.get(tp))
                .filter(|s| s.tokens.blocking.running() > 0)
                .map(|s| s.tokens.blocking.clone())
                .collect();
            if calls.is_empty() {
                let revoke = self.revokes.remove(i);
                self.give_up(revoke);
                continue;
            }
            let grace = self.config.revoke_timeout.min(BLOCKING_GRACE);
            let (id, returned) = (revoke.id, self.blocking_returned.0.clone());
            tokio::spawn(async move {
                let all = async {
                    for calls in calls {
                        calls.returned().await;
                    }
                };
                let _ = tokio::time::timeout(grace, all).await;
                let _ = returned.send(id);
            });
            self.revokes[i].awaiting_blocking = true;
            i += 1;
        }
    }

    /// A revoke's blocking calls returned, or its grace ran out: those still running are
    /// reported as orphans, and its partitions are given up.
    fn blocking_returned(&mut self, id: u64) {
        let Some(at) = self.revokes.iter().position(|r| r.id == id) else {
            return;
        };
        let revoke = self.revokes.remove(at);
        let grace = self.config.revoke_timeout.min(BLOCKING_GRACE);
        for tp in &revoke.keys {
            let left = self
                .partitions
                .get(tp)
                .map_or(0, |s| s.tokens.blocking.running());
            self.orphans(tp, left, grace, "revoke");
        }
        self.give_up(revoke);
    }

    /// Gives a drained revoke's partitions up: their positions go to the source (which commits
    /// when answered), their state goes, and the source is answered.
    fn give_up(&mut self, revoke: Revoke) {
        RevokeDrained {
            partitions: &revoke.partitions,
            took: revoke.started.elapsed(),
            aborted: revoke.aborted,
        }
        .emit(self.dispatcher.metrics());
        self.store_positions(|_| true);
        self.dispatcher.forget_parked(&revoke.partitions);
        for tp in &revoke.keys {
            if let Some(state) = self.partitions.remove(tp) {
                self.flow.forget(&state.flow, &mut self.source, tp);
                // The pause stays in force for when the partition comes back; the source
                // forgets it meanwhile, so that it runs if the pause is lifted before then.
                let reasons = self.pauses.reasons(&tp.tp.0, tp.tp.1);
                if !reasons.is_empty() {
                    let none = control::Reasons::new();
                    control::report(
                        self.dispatcher.metrics(),
                        &tp.tp.0,
                        tp.tp.1,
                        &reasons,
                        &none,
                        true,
                    );
                    self.source.set_paused(&tp.tp, false);
                }
            }
        }
        self.reshare();
        InFlight(self.flow.in_flight()).emit(self.dispatcher.metrics());
        if let Some(done) = revoke.done {
            let _ = done.send(());
        }
        self.source.released(&revoke.partitions);
    }

    /// Waits up to `grace` for the blocking calls of matching partitions to return (each
    /// record's task has ended, but an aborted `cpu_bound` call goes on), completing other
    /// records meanwhile; reports the calls still running then as orphans.
    async fn await_blocking(
        &mut self,
        matches: impl Fn(&PartKey) -> bool,
        grace: std::time::Duration,
        during: &'static str,
        start_next: bool,
    ) {
        let running: Vec<(PartKey, Arc<BlockingCalls>)> = self
            .partitions
            .iter()
            .filter(|(tp, s)| matches(tp) && s.tokens.blocking.running() > 0)
            .map(|(tp, s)| (tp.clone(), s.tokens.blocking.clone()))
            .collect();
        if running.is_empty() {
            return;
        }
        let until = Instant::now() + grace;
        for (tp, calls) in running {
            loop {
                tokio::select! {
                    _ = calls.returned() => break,
                    Some(joined) = self.tasks.join_next_with_id() => {
                        self.joined(joined, start_next);
                        self.settle_inline();
                    }
                    _ = tokio::time::sleep_until(until) => break,
                }
            }
            self.orphans(&tp, calls.running(), grace, during);
        }
    }

    /// Reports `left` blocking calls of `tp` still running after `grace`, if any, as orphans.
    fn orphans(
        &mut self,
        tp: &PartKey,
        left: usize,
        grace: std::time::Duration,
        during: &'static str,
    ) {
        if left > 0 {
            BlockingCallsOrphaned {
                topic: &tp.0,
                partition: tp.1,
                calls: left,
                waited: grace,
                during,
            }
            .emit(self.dispatcher.metrics());
            self.orphaned += left;
        }
    }

    async fn commit(&mut self, sync: bool) {
        self.store_positions(|_| true);
        let answer = self
            .source
            .commit(sync)
            .instrument(trace::commit_span(sync))
            .await;
        if let Some(result) = answer {
            OffsetsCommitted {
                result: result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| e as &dyn std::fmt::Display),
            }
            .emit(self.dispatcher.metrics());
        }
    }

    async fn drain(mut self) -> (StopReport, S) {
        self.local.flush();
        self.health.set_draining();
        self.stop.cancel();
        let mut abandoned = self.drop_waiting(|_| true);
        let deadline = Instant::now() + self.config.drain_timeout;
        while !self.tasks.is_empty() {
            tokio::select! {
                Some(joined) = self.tasks.join_next_with_id() => self.joined(joined, false),
                _ = tokio::time::sleep_until(deadline) => {
                    abandoned += self.tasks.len();
                    tracing::warn!(running = self.tasks.len(), "Drain timeout reached; abandoning running handlers (not committed).");
                    self.tasks.abort_all();
                    while self.tasks.join_next().await.is_some() {}
                    self.launched.clear();
                    break;
                }
            }
        }
        let grace = self.config.drain_timeout.min(BLOCKING_GRACE);
        self.await_blocking(|_| true, grace, "stop", false).await;
        abandoned += self.unfinished;
        self.commit(true).await;
        // Revokes still draining at stop: their records ended with the others; answered now,
        // after the final commit, so the source gives their partitions up committed.
        for revoke in std::mem::take(&mut self.revokes) {
            if let Some(done) = revoke.done {
                let _ = done.send(());
            }
            self.source.released(&revoke.partitions);
        }
        // What the broker confirmed, not what the trackers would commit: the final commit may
        // have been refused.
        let mut committed = self.source.confirmed();
        committed.sort();
        InFlight(0).emit(self.dispatcher.metrics());
        (
            StopReport {
                committed,
                abandoned,
                orphaned: self.orphaned,
            },
            self.source,
        )
    }
}

/// A spawned record's future, dropped at its partition's abort token: the record then ends
/// unfinished (`None`). Only a spawned record can be aborted: one that finishes in its inline
/// poll never needs the token (registering with it costs a lock per record).
async fn abortable(
    task: impl Future<Output = Completion>,
    tokens: Arc<Tokens>,
) -> Option<Completion> {
    tokio::select! {
        biased;
        _ = tokens.abort.cancelled() => None,
        done = task => Some(done),
    }
}

mod flow;
mod task;
#[cfg(test)]
mod tests;

/// The earliest deadline of a draining revoke; never, without one.
async fn revoke_deadline(timer: &mut Option<std::pin::Pin<Box<tokio::time::Sleep>>>) {
    match timer {
        Some(timer) => timer.as_mut().await,
        None => std::future::pending().await,
    }
}

/// The next request of a route's circuit breaker; never, without breakers.
async fn breaker_request(
    requests: &mut Option<mpsc::UnboundedReceiver<crate::handlers::PauseRequest>>,
) -> Option<crate::handlers::PauseRequest> {
    match requests {
        Some(requests) => requests.recv().await,
        None => std::future::pending().await,
    }
}
