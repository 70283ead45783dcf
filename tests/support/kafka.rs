//! Reading a topic back with a plain rdkafka consumer, the way a foreign client would, and a
//! group's committed offsets.

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers as _, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};
use weir::{Headers, StoredRecord};

/// Every record of `topic`, read from the beginning of each partition without a group commit,
/// sorted by partition then offset. Returns once at least `at_least` records are in and none
/// arrived for `quiet` (Tansu's high watermark is unreliable, so "all" cannot be asked), or after
/// `patience` with whatever is there: callers assert the count.
pub async fn read_topic(
    brokers: &str,
    topic: &str,
    at_least: usize,
    quiet: Duration,
    patience: Duration,
) -> Vec<StoredRecord> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", super::broker::unique("weir-test-reader"))
        .set("enable.auto.commit", "false");
    let topic = topic.to_owned();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().expect("a reader");
        let metadata = consumer
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .expect("metadata");
        let mut tpl = TopicPartitionList::new();
        for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
            tpl.add_partition_offset(&topic, partition.id(), Offset::Beginning)
                .expect("partition");
        }
        consumer.assign(&tpl).expect("assign");
        let deadline = Instant::now() + patience;
        let mut quiet_since = Instant::now();
        let mut out = Vec::new();
        loop {
            match consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => {
                    quiet_since = Instant::now();
                    let headers: Headers = m
                        .headers()
                        .map(|hs| {
                            hs.iter()
                                .map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec()))
                                .collect()
                        })
                        .unwrap_or_default();
                    out.push(StoredRecord {
                        partition: m.partition(),
                        offset: m.offset(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                        headers,
                        timestamp_ms: m.timestamp().to_millis().unwrap_or_default(),
                    });
                }
                Some(Err(e)) => panic!("reading {topic}: {e}"),
                None => {}
            }
            let now = Instant::now();
            let settled = out.len() >= at_least && now - quiet_since > quiet;
            if settled || now > deadline {
                out.sort_by_key(|r| (r.partition, r.offset));
                return out;
            }
        }
    })
    .await
    .expect("reader task")
}

/// The committed offset of `group` for each partition of `topics` that has one, keyed by topic
/// and partition. The reading client stays outside the group (it never joins), so reading moves
/// no partition.
pub async fn committed_offsets(
    brokers: &str,
    group: &str,
    topics: &[&str],
) -> HashMap<(String, i32), i64> {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("group.id", group);
    let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        let consumer: BaseConsumer = config.create().expect("a client to read committed offsets");
        let mut tpl = TopicPartitionList::new();
        for topic in &topics {
            let metadata = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .expect("metadata");
            for partition in metadata.topics().iter().flat_map(|t| t.partitions()) {
                tpl.add_partition(topic, partition.id());
            }
        }
        consumer
            .committed_offsets(tpl, Duration::from_secs(30))
            .expect("committed offsets")
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) => Some(((e.topic().to_string(), e.partition()), o)),
                _ => None,
            })
            .collect()
    })
    .await
    .expect("reading committed offsets")
}

/// The group's committed offsets on one topic, by partition.
pub async fn committed_on(brokers: &str, group: &str, topic: &str) -> BTreeMap<i32, i64> {
    committed_offsets(brokers, group, &[topic])
        .await
        .into_iter()
        .map(|((_, partition), offset)| (partition, offset))
        .collect()
}
