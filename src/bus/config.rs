use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// How records of one partition may overlap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProcessingOrder {
    /// One record at a time per partition: Kafka's native order, the slowest.
    Partition,
    /// Records with the same key in order, different keys concurrently. Kafka only promises order
    /// per key anyway (the key picks the partition), so this keeps every guarantee producers rely on.
    #[default]
    Key,
    /// No order at all: every record of a partition may run at once.
    Unordered,
}

/// Where dead letters go: `<topic><suffix>` unless a topic has its own.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DeadLetterTopics {
    /// Appended to the source topic's name. Default `.dlq`.
    pub suffix: String,
    /// Per-topic dead-letter topic, overriding the suffix.
    pub topics: BTreeMap<String, String>,
}

impl Default for DeadLetterTopics {
    fn default() -> Self {
        Self {
            suffix: ".dlq".to_owned(),
            topics: BTreeMap::new(),
        }
    }
}

impl DeadLetterTopics {
    /// The dead-letter topic for records of `topic`.
    pub fn topic_for(&self, topic: &str) -> String {
        self.topics
            .get(topic)
            .cloned()
            .unwrap_or_else(|| format!("{topic}{}", self.suffix))
    }
}

/// How one subscription consumes.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsumerConfig {
    /// The consumer group: replicas with the same group share the partitions.
    pub group_id: String,
    /// Ordering inside a partition.
    pub order: ProcessingOrder,
    /// Records fetched and not yet final, across all partitions. Bounds memory, and with the
    /// commit interval bounds what a crash redelivers: the records in flight plus those that
    /// finished since the last acknowledged commit.
    pub max_in_flight: usize,
    /// Records of one partition running at once; the partition's other ready records wait for
    /// a slot, oldest first. (Fetching is not paused for this: pausing a librdkafka partition
    /// discards its prefetched records.)
    pub max_in_flight_per_partition: usize,
    /// Dead-letter topic naming.
    pub dead_letter: DeadLetterTopics,
    /// How often completed offsets are committed while running.
    #[serde(with = "humantime_serde")]
    pub commit_interval: Duration,
    /// How long a stop waits for running handlers before abandoning them (uncommitted).
    /// Keep it below the orchestrator's grace period (Kubernetes' default is 30 s). With Kafka
    /// it must fit inside the session timeout too (a rebalance during the drain waits for it):
    /// checked at subscribe.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
    /// How long a rebalance waits for the revoked partitions' handlers; the partitions that
    /// stay go on meanwhile. With Kafka it must fit inside the session timeout (and
    /// `max.poll.interval.ms`), or the group moves on without us: checked at subscribe.
    #[serde(with = "humantime_serde")]
    pub revoke_timeout: Duration,
    /// How many `cpu_bound` calls run at once, across all the subscription's handlers; unset,
    /// one per core. A process that also answers requests (an HTTP API beside its consumer)
    /// sets fewer, so that a burst of CPU-bound records cannot take every core from the
    /// requests: their latency is what its users feel.
    pub cpu_bound_threads: Option<usize>,
}

impl Default for ConsumerConfig {
    fn default() -> Self {
        Self {
            group_id: "weir".to_owned(),
            order: ProcessingOrder::Key,
            max_in_flight: 1024,
            max_in_flight_per_partition: 256,
            dead_letter: DeadLetterTopics::default(),
            commit_interval: Duration::from_secs(1),
            drain_timeout: Duration::from_secs(25),
            revoke_timeout: Duration::from_secs(20),
            cpu_bound_threads: None,
        }
    }
}

impl ConsumerConfig {
    /// Defaults with a group id.
    pub fn new(group_id: impl Into<String>) -> Self {
        Self {
            group_id: group_id.into(),
            ..Self::default()
        }
    }

    /// Sets the processing order.
    pub fn order(mut self, order: ProcessingOrder) -> Self {
        self.order = order;
        self
    }

    /// Sets both in-flight limits.
    pub fn max_in_flight(mut self, total: usize, per_partition: usize) -> Self {
        self.max_in_flight = total;
        self.max_in_flight_per_partition = per_partition;
        self
    }

    /// Sets how many `cpu_bound` calls run at once (see [`cpu_bound_threads`](Self::cpu_bound_threads)).
    pub fn cpu_bound_threads(mut self, threads: usize) -> Self {
        self.cpu_bound_threads = Some(threads);
        self
    }

    /// Sets the drain timeout.
    pub fn drain_timeout(mut self, timeout: Duration) -> Self {
        self.drain_timeout = timeout;
        self
    }

    pub(crate) fn validate(&self) -> Result<(), super::error::BusError> {
        let bad = |key: &str, message: &str| {
            Err(super::error::BusError::Config {
                key: key.to_owned(),
                message: message.to_owned(),
            })
        };
        if self.group_id.trim().is_empty() {
            return bad("group_id", "must not be empty");
        }
        if self.max_in_flight == 0 {
            return bad("max_in_flight", "must be at least 1");
        }
        if self.max_in_flight_per_partition == 0 {
            return bad("max_in_flight_per_partition", "must be at least 1");
        }
        if self.cpu_bound_threads == Some(0) {
            return bad(
                "cpu_bound_threads",
                "must be at least 1 (or unset: one per core)",
            );
        }
        if self.commit_interval.is_zero() {
            return bad("commit_interval", "must be positive");
        }
        Ok(())
    }
}
