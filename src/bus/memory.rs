//! The in-memory bus: a small broker in the process, with topics, partitions, keys, offsets and
//! committed positions per group, behind the same engine as the Kafka bus. It is what handlers
//! are tested on, and it keeps Kafka's observable semantics: key → partition by murmur2 (as the
//! Java client and Weir's producer do), per-partition order, group positions that survive a
//! subscription, redelivery of everything after the committed position.
//!
//! Bounded: a partition holds at most `capacity_per_partition` records not yet committed by
//! every group that consumes it; publishing into a full partition waits for room up to
//! `publish_timeout` and then fails with [`PublishError::QueueFull`]. Nothing is dropped.
//! Like Kafka's retention, and unlike a queue, a commit does not delete: committed records stay
//! readable ([`MemoryBus::records`]) until a publish needs their room. That also keeps freeing
//! them off the consumer's path.
//!
//! Consumer groups: subscriptions with the same group share the partitions of their topics
//! (partition `p` of a topic goes to member `p mod members`, members in joining order). When a
//! member joins or leaves, the group rebalances the way Kafka's cooperative protocol does: a
//! member that loses a partition gets a revoke, ends the partition's work, commits and gives
//! it up, and only then does the member it moves to get it, from the committed position.

use super::engine::{Engine, PartitionKey, Source, SourceEvent, Tp};
use super::publish::PublishFuture;
use super::{
    Bus, BusError, ConsumerConfig, Delivery, OutboundRecord, PublishError, Publisher, Subscription,
};
use crate::contracts::Headers;
use crate::handlers::{Dispatcher, Inbound, Router};
use crate::telemetry::events::OffsetsCommitted;
use crate::telemetry::{Health, Metrics};
use bytes::{Bytes, BytesMut};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use tokio::sync::oneshot;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Settings of the in-memory broker.
#[derive(Debug, Clone)]
pub struct MemoryConfig {
    /// Partitions of topics created on first use.
    pub default_partitions: i32,
    /// Records per partition not yet committed by every consuming group.
    pub capacity_per_partition: usize,
    /// How long a publish into a full partition waits for room.
    pub publish_timeout: Duration,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        Self {
            default_partitions: 4,
            capacity_per_partition: 100_000,
            publish_timeout: Duration::from_secs(5),
        }
    }
}

/// A record as stored in the in-memory broker, for inspection in tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Partition.
    pub partition: i32,
    /// Offset.
    pub offset: i64,
    /// Key bytes.
    pub key: Option<Vec<u8>>,
    /// Value bytes.
    pub value: Option<Vec<u8>>,
    /// Headers.
    pub headers: Headers,
    /// Milliseconds since the epoch at append.
    pub timestamp_ms: i64,
}

#[derive(Default)]
struct Log {
    /// Offset of `records[0]`.
    base: i64,
    records: VecDeque<Stored>,
    /// Where the next records' keys and values are copied: consecutive records share one
    /// buffer (and one reference count), as a Kafka log segment keeps them side by side. Read
    /// back one by one, records scattered over the heap cost the engine a cache miss per
    /// buffer, more than the rest of its work on a no-op record (`weir bench`, W-mem).
    chunk: BytesMut,
    /// The headers of the last record: the next record with equal headers (nearly all of them
    /// carry the same content type) shares them.
    last_headers: Headers,
}

/// The size of the buffers a partition's keys and values are packed into.
const CHUNK: usize = 64 * 1024;

impl Log {
    /// `data` copied into the partition's current chunk (a new one when it is full).
    fn pack(&mut self, data: &[u8]) -> Bytes {
        if self.chunk.capacity() - self.chunk.len() < data.len() {
            self.chunk = BytesMut::with_capacity(CHUNK.max(data.len()));
        }
        self.chunk.extend_from_slice(data);
        self.chunk.split().freeze()
    }

    /// `headers`, shared with the previous record's when equal.
    fn intern(&mut self, headers: &Headers) -> Headers {
        if *headers != self.last_headers {
            self.last_headers = headers.clone();
        }
        self.last_headers.clone()
    }
}

/// A record in a partition's log. Its buffers are shared with the records handed to
/// consumers, so reading one copies nothing.
struct Stored {
    partition: i32,
    offset: i64,
    key: Option<Bytes>,
    value: Option<Bytes>,
    headers: Headers,
    timestamp_ms: i64,
}

impl From<&Stored> for StoredRecord {
    fn from(s: &Stored) -> Self {
        Self {
            partition: s.partition,
            offset: s.offset,
            key: s.key.as_deref().map(<[u8]>::to_vec),
            value: s.value.as_deref().map(<[u8]>::to_vec),
            headers: s.headers.clone(),
            timestamp_ms: s.timestamp_ms,
        }
    }
}

/// Records a consumer takes from one partition under one lock of the bus: one lock, and one
/// look for the next partition, per this many records rather than per record.
const TAKE_BATCH: usize = 64;

impl Log {
    fn end(&self) -> i64 {
        self.base + self.records.len() as i64
    }
}

/// The maps read on every record use foldhash: SipHash over a topic name, several times per
/// record, cost a tenth of a no-op record (callgrind, `scripts/bench-instructions.sh`).
type FastHash = foldhash::fast::RandomState;

#[derive(Default)]
struct State {
    topics: HashMap<String, Vec<Log>, FastHash>,
    /// (group, topic, partition) → next offset to consume.
    committed: HashMap<(String, String, i32), i64>,
    /// Groups that consume each topic, for retention.
    readers: HashMap<String, HashSet<String>>,
    /// Members and partition owners of each consumer group.
    groups: HashMap<String, Group>,
    /// Bumped (under the lock) when a member joins or leaves or a topic is created: the groups'
    /// assignments may have changed. Read without the lock on every record.
    assignments: Arc<std::sync::atomic::AtomicU64>,
    /// The next member id.
    next_member: u64,
}

#[derive(Default)]
struct Group {
    /// Member id → its topics, in joining order.
    members: std::collections::BTreeMap<u64, Vec<Arc<str>>>,
    /// Who consumes each partition now. A partition moving between members has no owner from
    /// the moment the old one gives it up until the new one takes it.
    owners: HashMap<(Arc<str>, i32), u64>,
}

impl Group {
    /// The partitions `member` should own: of each of its topics, those whose index modulo the
    /// number of members reading the topic is the member's place among them.
    fn target(
        &self,
        member: u64,
        state_topics: &HashMap<String, Vec<Log>, FastHash>,
    ) -> Vec<(Arc<str>, i32)> {
        let Some(topics) = self.members.get(&member) else {
            return Vec::new();
        };
        let mut mine = Vec::new();
        for topic in topics {
            let readers: Vec<u64> = self
                .members
                .iter()
                .filter(|(_, ts)| ts.contains(topic))
                .map(|(id, _)| *id)
                .collect();
            let place = readers.iter().position(|id| *id == member).unwrap_or(0);
            let partitions = state_topics.get(&**topic).map_or(0, Vec::len);
            for p in (place..partitions).step_by(readers.len().max(1)) {
                mine.push((topic.clone(), p as i32));
            }
        }
        mine
    }
}

struct Inner {
    state: Mutex<State>,
    /// Bumped on every append, commit and topic creation; waiters re-check on change.
    changed: watch::Sender<u64>,
    config: MemoryConfig,
    metrics: Metrics,
}

/// An in-process bus with Kafka's semantics. Cheap to clone; clones share the broker.
#[derive(Clone)]
pub struct MemoryBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBus")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl Default for MemoryBus {
    fn default() -> Self {
        Self::new(MemoryConfig::default())
    }
}

impl MemoryBus {
    /// An empty broker.
    pub fn new(config: MemoryConfig) -> Self {
        Self::with_metrics(config, Metrics::new())
    }

    /// An empty broker reporting into the given metrics.
    pub fn with_metrics(config: MemoryConfig, metrics: Metrics) -> Self {
        Self {
            inner: Arc::new(Inner {
                state: Mutex::new(State::default()),
                changed: watch::channel(0).0,
                config,
                metrics,
            }),
        }
    }

    /// The metrics of this bus and its subscriptions.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// Creates a topic with `partitions` partitions, if it does not exist.
    pub fn create_topic(&self, topic: &str, partitions: i32) {
        let mut state = self.inner.lock();
        state
            .topics
            .entry(topic.to_owned())
            .or_insert_with(|| (0..partitions.max(1)).map(|_| Log::default()).collect());
        state.changed_assignments();
        drop(state);
        self.inner.bump();
    }

    /// Every record currently retained in a topic, by partition then offset.
    pub fn records(&self, topic: &str) -> Vec<StoredRecord> {
        let state = self.inner.lock();
        state
            .topics
            .get(topic)
            .map(|logs| {
                logs.iter()
                    .flat_map(|l| l.records.iter().map(StoredRecord::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The committed position (next offset) of each partition of `topic` for `group`.
    pub fn committed(&self, group: &str, topic: &str) -> HashMap<i32, i64> {
        let state = self.inner.lock();
        state
            .committed
            .iter()
            .filter(|((g, t, _), _)| g == group && t == topic)
            .map(|((_, _, p), o)| (*p, *o))
            .collect()
    }

    /// The end offset (next offset to be written) of each partition of `topic`.
    pub fn end_offsets(&self, topic: &str) -> HashMap<i32, i64> {
        let state = self.inner.lock();
        state
            .topics
            .get(topic)
            .map(|logs| {
                logs.iter()
                    .enumerate()
                    .map(|(p, l)| (p as i32, l.end()))
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn append(&self, record: OutboundRecord) -> Result<Delivery, PublishError> {
        let timeout = self.inner.config.publish_timeout;
        let mut changes = self.inner.changed.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let OutboundRecord {
            topic,
            key,
            value,
            headers,
        } = record;
        loop {
            changes.borrow_and_update();
            match self
                .inner
                .try_append(&topic, key.as_deref(), value.as_deref(), &headers)
            {
                Ok(delivery) => return Ok(delivery),
                Err(partition) => {
                    let wait = tokio::time::timeout_at(deadline, changes.changed()).await;
                    if !matches!(wait, Ok(Ok(()))) {
                        return Err(PublishError::QueueFull {
                            topic,
                            partition,
                            waited: timeout,
                        });
                    }
                }
            }
        }
    }
}

impl State {
    fn changed_assignments(&self) {
        self.assignments
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters to readers, so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        self.changed.send_modify(|v| *v = v.wrapping_add(1));
    }

    /// Appends, or returns the full partition.
    fn try_append(
        &self,
        topic: &str,
        key: Option<&[u8]>,
        value: Option<&[u8]>,
        headers: &Headers,
    ) -> Result<Delivery, i32> {
        let mut state = self.lock();
        let default_partitions = self.config.default_partitions.max(1);
        if !state.topics.contains_key(topic) {
            state.topics.insert(
                topic.to_owned(),
                (0..default_partitions).map(|_| Log::default()).collect(),
            );
            state.changed_assignments();
        }
        let logs = state.topics.get_mut(topic).expect("inserted above");
        let partition = match key {
            Some(key) => (murmur2(key) & 0x7fff_ffff) % logs.len() as u32,
            None => fastrand::u32(..logs.len() as u32),
        } as i32;
        if logs[partition as usize].records.len() >= self.config.capacity_per_partition {
            Self::trim(&mut state, topic);
        }
        let logs = state.topics.get_mut(topic).expect("inserted above");
        let log = &mut logs[partition as usize];
        if log.records.len() >= self.config.capacity_per_partition {
            return Err(partition);
        }
        let offset = log.end();
        let (key, value) = (key.map(|k| log.pack(k)), value.map(|v| log.pack(v)));
        let headers = log.intern(headers);
        log.records.push_back(Stored {
            partition,
            offset,
            key,
            value,
            headers,
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
        });
        drop(state);
        self.bump();
        Ok(Delivery {
            topic: topic.to_owned(),
            partition,
            offset,
        })
    }

    /// Drops records every reading group has committed, making room for a publisher.
    fn trim(state: &mut State, topic: &str) {
        let Some(groups) = state.readers.get(topic) else {
            return;
        };
        let Some(logs) = state.topics.get_mut(topic) else {
            return;
        };
        for (p, log) in logs.iter_mut().enumerate() {
            let low = groups
                .iter()
                .map(|g| {
                    state
                        .committed
                        .get(&(g.clone(), topic.to_owned(), p as i32))
                        .copied()
                        .unwrap_or(0)
                })
                .min()
                .unwrap_or(0);
            while log.base < low && log.records.pop_front().is_some() {
                log.base += 1;
            }
        }
    }
}

/// Kafka's murmur2 (the Java client's default partitioner), so keys land where they would on a
/// real cluster with Weir's producer (`partitioner=murmur2_random`).
fn murmur2(data: &[u8]) -> u32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let mut h: u32 = SEED ^ data.len() as u32;
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let rest = chunks.remainder();
    if rest.len() >= 3 {
        h ^= u32::from(rest[2]) << 16;
    }
    if rest.len() >= 2 {
        h ^= u32::from(rest[1]) << 8;
    }
    if !rest.is_empty() {
        h ^= u32::from(rest[0]);
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h
}

impl Publisher for MemoryBus {
    fn publish_record(&self, record: OutboundRecord) -> PublishFuture<'_> {
        super::publish::traced(record, move |record| async move {
            let topic = record.topic.clone();
            let started = tokio::time::Instant::now();
            let result = self.append(record).await;
            crate::telemetry::events::Published {
                topic: &topic,
                duration: started.elapsed(),
                result: result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| e as &dyn std::fmt::Display),
            }
            .emit(&self.inner.metrics);
            result
        })
    }
}

impl Bus for MemoryBus {
    fn subscribe<S>(
        &self,
        router: Router<S>,
        config: ConsumerConfig,
    ) -> Result<Subscription, BusError> {
        let router = router.into_stateless();
        config.validate()?;
        let topics = router.topics();
        if topics.is_empty() {
            return Err(BusError::NoHandlers);
        }
        let topic_names: Vec<Arc<str>> = topics.iter().map(|t| Arc::from(t.as_str())).collect();
        let member = {
            let mut state = self.inner.lock();
            for t in &topics {
                state
                    .readers
                    .entry(t.clone())
                    .or_default()
                    .insert(config.group_id.clone());
            }
            let member = state.next_member;
            state.next_member += 1;
            let group = state.groups.entry(config.group_id.clone()).or_default();
            group.members.insert(member, topic_names.clone());
            state.changed_assignments();
            member
        };
        self.inner.bump();
        let source = MemorySource {
            changes: self.inner.changed.subscribe(),
            inner: self.inner.clone(),
            group: config.group_id.clone(),
            member,
            topics: topic_names,
            positions: HashMap::default(),
            stored: HashMap::new(),
            confirmed: HashMap::new(),
            cursor: 0,
            closed: HashSet::default(),
            paused: HashSet::default(),
            owned: HashSet::default(),
            settled: None,
            assignments: self.inner.lock().assignments.clone(),
            releasing: None,
            batch: VecDeque::with_capacity(TAKE_BATCH),
            batch_of: None,
        };
        let metrics = self.inner.metrics.clone();
        let dispatcher = Arc::new(
            Dispatcher::new(router, metrics, &config.group_id)
                .cpu_bound_threads(config.cpu_bound_threads),
        );
        let stop = CancellationToken::new();
        // In memory the "broker" is always there.
        let health = Health::default();
        health.set_joined(true);
        health.set_broker_up(true);
        let engine = Engine::new(
            source,
            dispatcher,
            Arc::new(self.clone()),
            config,
            stop.clone(),
            health.clone(),
        );
        let control = engine.control();
        let task = tokio::spawn(async move { Ok(engine.run().await.0.into()) });
        Ok(Subscription::new(stop, health, control, task))
    }
}

struct MemorySource {
    inner: Arc<Inner>,
    changes: watch::Receiver<u64>,
    group: String,
    member: u64,
    topics: Vec<Arc<str>>,
    /// The next offset to read, per (topic index, partition), for owned partitions.
    positions: HashMap<(usize, usize), i64, FastHash>,
    stored: HashMap<Tp, i64>,
    /// The positions this member committed, of the partitions it still has.
    confirmed: HashMap<Tp, i64>,
    cursor: usize,
    /// Partitions the engine takes records of only while its pool has room.
    closed: HashSet<PartitionKey, FastHash>,
    /// Paused partitions: not read at all (Kafka's fetching stops) until resumed.
    paused: HashSet<PartitionKey, FastHash>,
    /// Partitions this member consumes: (topic index, partition).
    owned: HashSet<(usize, usize), FastHash>,
    /// The [`State::assignments`] count whose assignment this member has fully taken; `None`
    /// until then, so the group is checked again on every change.
    settled: Option<u64>,
    assignments: Arc<std::sync::atomic::AtomicU64>,
    /// A revoke the engine has not answered yet: once it has, the partitions are committed
    /// and given up.
    releasing: Option<Releasing>,
    /// Records taken from one partition's log and not yet handed to the engine, in offset
    /// order, with that partition (as topic index and partition, and as the engine keys it).
    /// Put back (the position rewound) whenever the engine stops taking that partition's
    /// records or a rebalance is pending.
    batch: VecDeque<Inbound>,
    batch_of: Option<((usize, usize), PartitionKey)>,
}

/// The engine's answer to a revoke, and the partitions (topic index, partition) it revoked.
type Releasing = (oneshot::Receiver<()>, Vec<(usize, usize)>);

impl MemorySource {
    fn topic_index(&self, topic: &str) -> Option<usize> {
        self.topics.iter().position(|t| &**t == topic)
    }

    /// Whether the group's assignment may have changed since this member last took it.
    fn unsettled(&self) -> bool {
        self.settled != Some(self.assignments.load(std::sync::atomic::Ordering::Acquire))
    }

    /// The next rebalance step for this member: a revoke of partitions it must give up, or an
    /// assignment of free partitions it should have.
    fn rebalance(&mut self) -> Option<SourceEvent> {
        if self.releasing.is_some() {
            return None;
        }
        let mut guard = self.inner.lock();
        if !self.unsettled() {
            return None;
        }
        let state = &mut *guard;
        let seen = state.assignments.load(std::sync::atomic::Ordering::Acquire);
        let group = state.groups.get_mut(&self.group)?;
        let target: Vec<(usize, usize)> = group
            .target(self.member, &state.topics)
            .into_iter()
            .filter_map(|(t, p)| Some((self.topic_index(&t)?, p as usize)))
            .collect();
        let lose: Vec<(usize, usize)> = self
            .owned
            .iter()
            .filter(|tp| !target.contains(tp))
            .copied()
            .collect();
        if !lose.is_empty() {
            let (done, answered) = oneshot::channel();
            let partitions = lose
                .iter()
                .map(|(t, p)| (self.topics[*t].to_string(), *p as i32))
                .collect();
            self.releasing = Some((answered, lose));
            return Some(SourceEvent::Revoked { partitions, done });
        }
        let mut gained = Vec::new();
        let mut waiting = false;
        for (t, p) in &target {
            if self.owned.contains(&(*t, *p)) {
                continue;
            }
            let key = (self.topics[*t].clone(), *p as i32);
            match group.owners.get(&key) {
                Some(_) => waiting = true,
                None => {
                    group.owners.insert(key, self.member);
                    self.owned.insert((*t, *p));
                    gained.push((self.topics[*t].to_string(), *p as i32));
                }
            }
        }
        if !waiting {
            self.settled = Some(seen);
        }
        drop(guard);
        if gained.is_empty() {
            return None;
        }
        // Others may be waiting for what this member took.
        self.inner.bump();
        Some(SourceEvent::Assigned(gained))
    }

    /// Once the engine has answered a revoke: commits the positions it stored and gives the
    /// partitions up, so their next owner starts where this one ended.
    fn finish_release(&mut self) {
        let Some((answered, _)) = &mut self.releasing else {
            return;
        };
        if matches!(
            answered.try_recv(),
            Err(oneshot::error::TryRecvError::Empty)
        ) {
            return;
        }
        let (_, lost) = self.releasing.take().expect("checked above");
        let committed = self.commit_stored();
        let mut state = self.inner.lock();
        if let Some(group) = state.groups.get_mut(&self.group) {
            for (t, p) in &lost {
                group.owners.remove(&(self.topics[*t].clone(), *p as i32));
            }
        }
        drop(state);
        for tp in &lost {
            self.owned.remove(tp);
            self.positions.remove(tp);
            self.confirmed
                .remove(&(self.topics[tp.0].to_string(), tp.1 as i32));
        }
        self.settled = None;
        if committed {
            OffsetsCommitted { result: Ok(()) }.emit(&self.inner.metrics);
        }
        self.inner.bump();
    }

    /// Writes the stored positions as the group's; whether there were any.
    fn commit_stored(&mut self) -> bool {
        if self.stored.is_empty() {
            return false;
        }
        let mut state = self.inner.lock();
        for ((topic, partition), offset) in self.stored.drain() {
            state
                .committed
                .insert((self.group.clone(), topic.clone(), partition), offset);
            self.confirmed.insert((topic, partition), offset);
        }
        drop(state);
        self.inner.bump();
        true
    }

    /// Puts the taken records back: the partition's position goes back to the first of them.
    fn unbatch(&mut self) {
        if let Some((tp, _)) = self.batch_of.take() {
            if let Some(first) = self.batch.front() {
                self.positions.insert(tp, first.offset);
            }
            self.batch.clear();
        }
    }

    /// Whether `tp` is being given up in the revoke the engine is draining.
    fn is_lost(&self, tp: &(usize, usize)) -> bool {
        self.releasing
            .as_ref()
            .is_some_and(|(_, lost)| lost.contains(tp))
    }

    /// The next record of the first owned partition with one that the engine takes records of,
    /// round-robin across partitions, a batch at a time. None while a rebalance step is
    /// pending, so it is handled first; while the engine drains a revoke, the partitions that
    /// stay go on (as Kafka's cooperative protocol does) and the revoked ones give nothing.
    fn try_next(&mut self, pool_open: bool) -> Option<Inbound> {
        if self.releasing.is_none() && self.unsettled() {
            self.unbatch();
            return None;
        }
        if let Some((tp, _)) = &self.batch_of {
            if self.is_lost(tp) {
                self.batch_of = None;
                self.batch.clear();
            }
        }
        if let Some((_, key)) = &self.batch_of {
            let paused = !self.paused.is_empty() && self.paused.contains(key);
            if !paused && (pool_open || self.closed.is_empty() || !self.closed.contains(key)) {
                if let Some(rec) = self.batch.pop_front() {
                    return Some(rec);
                }
            }
            self.unbatch();
        }
        let state = self.inner.lock();
        let counts: Vec<usize> = self
            .topics
            .iter()
            .map(|t| state.topics.get(&**t).map_or(0, Vec::len))
            .collect();
        let n: usize = counts.iter().sum();
        for i in 0..n {
            let mut at = (self.cursor + i) % n;
            let mut ti = 0;
            while at >= counts[ti] {
                at -= counts[ti];
                ti += 1;
            }
            let (topic, p) = (&self.topics[ti], at);
            if !self.owned.contains(&(ti, p)) || self.is_lost(&(ti, p)) {
                continue;
            }
            let key = (topic.clone(), p as i32);
            if !pool_open && !self.closed.is_empty() && self.closed.contains(&key) {
                continue;
            }
            if !self.paused.is_empty() && self.paused.contains(&key) {
                continue;
            }
            let log = &state.topics[&**topic][p];
            let position = *self.positions.entry((ti, p)).or_insert_with(|| {
                let committed = state
                    .committed
                    .get(&(self.group.clone(), topic.to_string(), p as i32))
                    .copied();
                committed.unwrap_or(log.base).max(log.base)
            });
            if position >= log.end() {
                continue;
            }
            let from = (position - log.base) as usize;
            let to = (from + TAKE_BATCH).min(log.records.len());
            self.batch
                .extend(log.records.range(from..to).map(|stored| Inbound {
                    topic: topic.clone(),
                    partition: stored.partition,
                    offset: stored.offset,
                    key: stored.key.clone(),
                    value: stored.value.clone(),
                    headers: stored.headers.clone(),
                    timestamp_ms: Some(stored.timestamp_ms),
                }));
            self.positions
                .insert((ti, p), position + (to - from) as i64);
            self.cursor = (self.cursor + i + 1) % n;
            self.batch_of = Some(((ti, p), key));
            return self.batch.pop_front();
        }
        None
    }
}

/// A member that goes away leaves its group: its partitions go to the others. The engine has
/// made its final commit by then.
impl Drop for MemorySource {
    fn drop(&mut self) {
        let mut state = self.inner.lock();
        if let Some(group) = state.groups.get_mut(&self.group) {
            group.members.remove(&self.member);
            group.owners.retain(|_, owner| *owner != self.member);
        }
        state.changed_assignments();
        drop(state);
        self.inner.bump();
    }
}

impl Source for MemorySource {
    async fn next(&mut self, pool_open: bool) -> Option<SourceEvent> {
        loop {
            self.changes.borrow_and_update();
            self.finish_release();
            if let Some(event) = self.rebalance() {
                return Some(event);
            }
            if let Some(rec) = self.try_next(pool_open) {
                return Some(SourceEvent::Record(rec));
            }
            // The engine answers a revoke while the loop goes on: wait for that too.
            let changed = match &mut self.releasing {
                Some((answered, _)) => tokio::select! {
                    _ = answered => Ok(()),
                    changed = self.changes.changed() => changed,
                },
                None => self.changes.changed().await,
            };
            if changed.is_err() {
                return None;
            }
        }
    }

    fn try_record(&mut self, pool_open: bool) -> Option<Inbound> {
        self.try_next(pool_open)
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
    }

    fn store(&mut self, tp: &Tp, next_offset: i64) {
        self.stored.insert(tp.clone(), next_offset);
    }

    async fn commit(&mut self, _sync: bool) -> Option<Result<(), BusError>> {
        self.commit_stored().then_some(Ok(()))
    }

    fn confirmed(&self) -> Vec<(String, i32, i64)> {
        self.confirmed
            .iter()
            .map(|((t, p), o)| (t.clone(), *p, *o))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::murmur2;

    #[test]
    fn murmur2_matches_the_java_client() {
        // Values from Kafka's UtilsTest.testMurmur2.
        let cases: [(&[u8], i32); 3] = [
            (b"21", -973_932_308),
            (b"foobar", -790_332_482),
            (b"a-little-bit-long-string", -985_981_536),
        ];
        for (input, expected) in cases {
            assert_eq!(
                murmur2(input) as i32,
                expected,
                "{:?}",
                std::str::from_utf8(input)
            );
        }
    }
}
