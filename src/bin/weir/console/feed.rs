//! Follows a compacted topic of the fleet (the status topic into the [`Fleet`], the commands
//! topic into the [`Commands`](super::commands::Commands)): every partition assigned from the beginning,
//! outside any consumer group (nothing is committed, no replica's rebalance is disturbed), for
//! as long as the console runs. A topic that does not exist yet (no process has reported) is
//! looked for again every few seconds; partitions added later are picked up the same way.

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use weir::KafkaConfig;

/// How often the topic's partitions are looked up again once it is followed, and while it
/// does not exist yet (a fleet that is starting creates it any moment).
const RESCAN: Duration = Duration::from_secs(5);
const RESCAN_MISSING: Duration = Duration::from_secs(1);

/// Reads `topic` into `apply` (each record's key, and its value or `None` for a tombstone)
/// until `stop`.
pub(crate) async fn follow(
    kafka: KafkaConfig,
    topic: String,
    mut apply: impl FnMut(&str, Option<&[u8]>) -> Result<(), String> + Send,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let mut config =
        kafka.consumer_config(&format!("weir-console-{}", uuid::Uuid::new_v4().simple()));
    config
        .set("enable.partition.eof", "false")
        .set("statistics.interval.ms", "0")
        .set("fetch.wait.max.ms", "100")
        .set("isolation.level", "read_uncommitted");
    let consumer: StreamConsumer = config.create()?;
    let mut assigned: Vec<i32> = Vec::new();
    let mut next_scan = tokio::time::Instant::now();
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            () = tokio::time::sleep_until(next_scan) => {
                let partitions = partitions(&consumer, &topic);
                if partitions.len() > assigned.len() {
                    // `incremental_assign` keeps the positions of partitions already read.
                    let mut tpl = TopicPartitionList::new();
                    for p in partitions.iter().filter(|p| !assigned.contains(p)) {
                        tpl.add_partition_offset(&topic, *p, Offset::Beginning)?;
                    }
                    consumer.incremental_assign(&tpl)?;
                    tracing::info!(topic, partitions = partitions.len(), "Following a fleet topic.");
                    assigned = partitions;
                }
                let wait = if assigned.is_empty() { RESCAN_MISSING } else { RESCAN };
                next_scan = tokio::time::Instant::now() + wait;
            }
            message = consumer.recv(), if !assigned.is_empty() => match message {
                Ok(m) => {
                    let key = m.key().map(String::from_utf8_lossy).unwrap_or_default();
                    if let Err(error) = apply(&key, m.payload()) {
                        tracing::warn!(topic, offset = m.offset(), %error, "Record skipped.");
                    }
                }
                Err(error) => {
                    tracing::warn!(topic, %error, "Reading a fleet topic failed; retrying.");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            },
        }
    }
}

/// The partition ids of `topic`; none while it does not exist (or the broker does not answer).
fn partitions(consumer: &StreamConsumer, topic: &str) -> Vec<i32> {
    let metadata = tokio::task::block_in_place(|| {
        consumer.fetch_metadata(Some(topic), Duration::from_secs(5))
    });
    let Ok(metadata) = metadata else {
        return Vec::new();
    };
    let mut ids: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic && t.error().is_none())
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();
    ids.sort_unstable();
    ids
}
