//! The in-memory bus: a small broker in the process, with topics, partitions, keys, offsets and
//! committed positions per group, behind the same engine as the Kafka bus. It is what handlers
//! are tested on, and it keeps Kafka's observable semantics: key → partition by murmur2 (as the
//! Java client and Weir's producer do), per-partition order, group positions that survive a
//! subscription, redelivery of everything after the committed position.
//!
//! Bounded: a partition holds at most `capacity_per_partition` records not yet committed by
//! every group that consumes it; publishing into a full partition waits for room up to
//! `publish_timeout` and then fails with [`PublishError::QueueFull`]. Nothing is dropped.
//! One subscription per group at a time (no in-memory rebalancing).

use super::engine::{Engine, Source, SourceEvent, Tp};
use super::publish::PublishFuture;
use super::{
    Bus, BusError, ConsumerConfig, Delivery, OutboundRecord, PublishError, Publisher, Subscription,
};
use crate::contracts::Headers;
use crate::handlers::{Dispatcher, Inbound, Router};
use crate::telemetry::{Health, Metrics};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
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
    records: VecDeque<StoredRecord>,
}

impl Log {
    fn end(&self) -> i64 {
        self.base + self.records.len() as i64
    }
}

#[derive(Default)]
struct State {
    topics: HashMap<String, Vec<Log>>,
    /// (group, topic, partition) → next offset to consume.
    committed: HashMap<(String, String, i32), i64>,
    /// Groups that consume each topic, for retention.
    readers: HashMap<String, HashSet<String>>,
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
                    .flat_map(|l| l.records.iter().cloned())
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
        loop {
            changes.borrow_and_update();
            match self.inner.try_append(&record) {
                Ok(delivery) => return Ok(delivery),
                Err(partition) => {
                    let wait = tokio::time::timeout_at(deadline, changes.changed()).await;
                    if !matches!(wait, Ok(Ok(()))) {
                        return Err(PublishError::QueueFull {
                            topic: record.topic,
                            partition,
                            waited: timeout,
                        });
                    }
                }
            }
        }
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
    fn try_append(&self, record: &OutboundRecord) -> Result<Delivery, i32> {
        let mut state = self.lock();
        let default_partitions = self.config.default_partitions.max(1);
        let logs = state
            .topics
            .entry(record.topic.clone())
            .or_insert_with(|| (0..default_partitions).map(|_| Log::default()).collect());
        let partition = match &record.key {
            Some(key) => (murmur2(key) & 0x7fff_ffff) % logs.len() as u32,
            None => fastrand::u32(..logs.len() as u32),
        } as i32;
        let log = &mut logs[partition as usize];
        if log.records.len() >= self.config.capacity_per_partition {
            return Err(partition);
        }
        let offset = log.end();
        log.records.push_back(StoredRecord {
            partition,
            offset,
            key: record.key.clone(),
            value: record.value.clone(),
            headers: record.headers.clone(),
            timestamp_ms: chrono::Utc::now().timestamp_millis(),
        });
        drop(state);
        self.bump();
        Ok(Delivery {
            topic: record.topic.clone(),
            partition,
            offset,
        })
    }

    /// Drops records every reading group has committed, making room for publishers.
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
        {
            let mut state = self.inner.lock();
            for t in &topics {
                state
                    .readers
                    .entry(t.clone())
                    .or_default()
                    .insert(config.group_id.clone());
            }
        }
        let source = MemorySource {
            changes: self.inner.changed.subscribe(),
            inner: self.inner.clone(),
            group: config.group_id.clone(),
            topics: topics.iter().map(|t| Arc::from(t.as_str())).collect(),
            positions: HashMap::new(),
            stored: HashMap::new(),
            cursor: 0,
        };
        let metrics = self.inner.metrics.clone();
        let dispatcher = Arc::new(Dispatcher::new(router, metrics, &config.group_id));
        let stop = CancellationToken::new();
        // In memory the "broker" is always there and the group has one member.
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
        let task = tokio::spawn(async move { Ok(engine.run().await.0.into()) });
        Ok(Subscription::new(stop, health, task))
    }
}

struct MemorySource {
    inner: Arc<Inner>,
    changes: watch::Receiver<u64>,
    group: String,
    topics: Vec<Arc<str>>,
    /// The next offset to read, per (topic index, partition).
    positions: HashMap<(usize, usize), i64>,
    stored: HashMap<Tp, i64>,
    cursor: usize,
}

impl MemorySource {
    /// The next record of the first partition with one, round-robin across partitions.
    fn try_next(&mut self) -> Option<Inbound> {
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
            let log = &state.topics[&**topic][p];
            let position = *self.positions.entry((ti, p)).or_insert_with(|| {
                let committed = state
                    .committed
                    .get(&(self.group.clone(), topic.to_string(), p as i32))
                    .copied();
                committed.unwrap_or(log.base).max(log.base)
            });
            if position < log.end() {
                let stored = &log.records[(position - log.base) as usize];
                self.positions.insert((ti, p), position + 1);
                self.cursor = (self.cursor + i + 1) % n;
                return Some(Inbound {
                    topic: topic.clone(),
                    partition: stored.partition,
                    offset: stored.offset,
                    key: stored.key.clone(),
                    value: stored.value.clone(),
                    headers: stored.headers.clone(),
                    timestamp_ms: Some(stored.timestamp_ms),
                });
            }
        }
        None
    }
}

impl Source for MemorySource {
    async fn next(&mut self, want_records: bool) -> Option<SourceEvent> {
        if !want_records {
            // No control events in memory: wait until the engine has room again.
            std::future::pending::<()>().await;
        }
        loop {
            self.changes.borrow_and_update();
            if let Some(rec) = self.try_next() {
                return Some(SourceEvent::Record(rec));
            }
            if self.changes.changed().await.is_err() {
                return None;
            }
        }
    }

    fn try_record(&mut self) -> Option<Inbound> {
        self.try_next()
    }

    fn store(&mut self, tp: &Tp, next_offset: i64) {
        self.stored.insert(tp.clone(), next_offset);
    }

    async fn commit(&mut self, _sync: bool) -> Result<(), BusError> {
        if self.stored.is_empty() {
            return Ok(());
        }
        let mut state = self.inner.lock();
        for ((topic, partition), offset) in self.stored.drain() {
            state
                .committed
                .insert((self.group.clone(), topic.clone(), partition), offset);
            Inner::trim(&mut state, &topic);
        }
        drop(state);
        self.inner.bump();
        Ok(())
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
