//! Why each partition's fetching is paused. Several parts of Weir pause partitions in
//! librdkafka (the engine's pauses, the prefetch budget, a draining revoke), and none may resume what
//! another paused; librdkafka keeps one flag per partition, so the reasons are kept here and the flag follows "any reason".

use crate::bus::engine::PartitionKey;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};
use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

/// Why a partition's fetching is paused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) enum PauseReason {
    /// The engine's pauses: `Subscription::pause`, a breaker, an operator's command.
    Engine,
    /// It holds its share of `kafka.max_prefetch_bytes`.
    Memory,
    /// It is revoked and drains: what it fetched now would be dropped. Lifted once librdkafka
    /// has given it up.
    Revoking,
}

/// Each partition's pause reasons; librdkafka pauses it while it has any.
#[derive(Default)]
pub(crate) struct Pauses {
    reasons: Mutex<HashMap<PartitionKey, BTreeSet<PauseReason>>>,
}

impl Pauses {
    /// Adds `reason`; pauses the partition in librdkafka if it had none.
    pub(crate) fn pause<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        tp: &PartitionKey,
        reason: PauseReason,
    ) {
        let mut reasons = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        let set = reasons.entry(tp.clone()).or_default();
        if set.insert(reason) && set.len() == 1 {
            if let Err(error) = consumer.pause(&tpl(tp)) {
                tracing::warn!(topic = %tp.0, partition = tp.1, %error, ?reason, "Could not pause the partition's fetching.");
            }
        }
    }

    /// Removes `reason`; resumes the partition in librdkafka if no other reason is left.
    pub(crate) fn resume<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        tp: &PartitionKey,
        reason: PauseReason,
    ) {
        let mut reasons = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        let Some(set) = reasons.get_mut(tp) else {
            return;
        };
        if set.remove(&reason) && set.is_empty() {
            reasons.remove(tp);
            if let Err(error) = consumer.resume(&tpl(tp)) {
                tracing::warn!(topic = %tp.0, partition = tp.1, %error, ?reason, "Could not resume the partition's fetching.");
            }
        }
    }
}

impl Pauses {
    /// The partitions paused for the engine or for memory: not fetched, though they stay
    /// assigned, so nothing tells librdkafka how their logs grow. (A revoking partition is on
    /// its way out; its lag is no longer this consumer's to report.)
    pub(crate) fn held(&self) -> Vec<PartitionKey> {
        let reasons = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        reasons
            .iter()
            .filter(|(_, set)| !set.contains(&PauseReason::Revoking))
            .map(|(tp, _)| tp.clone())
            .collect()
    }

    /// Whether `tp` is paused in librdkafka for `reason`.
    pub(crate) fn has(&self, tp: &PartitionKey, reason: PauseReason) -> bool {
        let reasons = self.reasons.lock().unwrap_or_else(|e| e.into_inner());
        !reasons.is_empty() && reasons.get(tp).is_some_and(|set| set.contains(&reason))
    }
}

fn tpl(tp: &PartitionKey) -> TopicPartitionList {
    let mut tpl = TopicPartitionList::new();
    // Adding a partition to a fresh list cannot fail for a valid offset.
    let _ = tpl.add_partition_offset(&tp.0, tp.1, Offset::Invalid);
    tpl
}
