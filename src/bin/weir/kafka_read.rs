//! Reading topics and group positions for the operator commands (`weir dlq`, `weir inspect`).
//!
//! A tool reads a topic to its end and stops, which a consumer loop never does; the end is the
//! partition-EOF event (`enable.partition.eof`) followed by a short quiet spell, not the high
//! watermark alone: some Kafka-compatible brokers (Tansu) report the base offset of the last
//! batch + 1 as the high watermark, so records of that batch would be missed. Partitions are
//! assigned, never subscribed, so reading joins no group and disturbs no rebalance.
//!
//! The admin calls of librdkafka block; they run under `block_in_place` so the runtime's other
//! tasks keep going.

use anyhow::{anyhow, bail, Context as _};
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers as _, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use weir::{Headers, KafkaConfig};

/// How long one admin request (metadata, offsets, commit) may take.
pub(crate) const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);
/// After every partition reported its end, how long to wait for stragglers before stopping.
const QUIET: Duration = Duration::from_millis(300);
/// How long a read may go without any message or end-of-partition event before giving up.
const STALL: Duration = Duration::from_secs(20);

/// One record as read back.
#[derive(Debug, Clone)]
pub(crate) struct ReadRecord {
    pub(crate) topic: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) timestamp_ms: Option<i64>,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) headers: Headers,
}

impl ReadRecord {
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get_str(name)
    }
}

/// A client for one consumer group (`group.id`), used for reading with assigned partitions, for
/// the group's committed offsets and for committing without joining the group.
pub(crate) struct GroupClient {
    consumer: StreamConsumer,
    group: String,
}

impl GroupClient {
    pub(crate) fn new(kafka: &KafkaConfig, group: &str) -> anyhow::Result<Self> {
        let mut config: ClientConfig = kafka.consumer_config(group);
        config
            .set("enable.partition.eof", "true")
            // A tool must see every record, including those of open transactions.
            .set("isolation.level", "read_uncommitted")
            .set("statistics.interval.ms", "0")
            // Once the reader has fetched to the end, each fetch waits up to this long on the
            // broker for new records, and the metadata and offset requests of this client
            // (`partitions`, `watermarks`) queue behind it on the same connection. At the
            // default 500 ms, `dlq replay`'s guard after each progress commit cost ~1 s, which
            // held a replay to about one record a second whatever `--rate` said.
            .set("fetch.wait.max.ms", "20")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest");
        let consumer: StreamConsumer = config
            .create()
            .with_context(|| format!("cannot create a Kafka client for {}", kafka.brokers))?;
        Ok(Self {
            consumer,
            group: group.to_owned(),
        })
    }

    pub(crate) fn group(&self) -> &str {
        &self.group
    }

    /// Partition ids of `topic`; an error if the topic does not exist.
    pub(crate) fn partitions(&self, topic: &str) -> anyhow::Result<Vec<i32>> {
        let metadata = blocking(|| self.consumer.fetch_metadata(Some(topic), ADMIN_TIMEOUT))
            .with_context(|| format!("cannot read the metadata of topic {topic}"))?;
        let t = metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic)
            .ok_or_else(|| anyhow!("topic {topic} does not exist"))?;
        if let Some(error) = t.error() {
            bail!("topic {topic}: {error:?}");
        }
        if t.partitions().is_empty() {
            bail!("topic {topic} does not exist");
        }
        let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
        ids.sort_unstable();
        Ok(ids)
    }

    /// Every topic of the cluster with its partitions, internal topics (`__*`) left out.
    pub(crate) fn all_topics(&self) -> anyhow::Result<BTreeMap<String, Vec<i32>>> {
        let metadata = blocking(|| self.consumer.fetch_metadata(None, ADMIN_TIMEOUT))
            .context("cannot read the cluster's metadata")?;
        Ok(metadata
            .topics()
            .iter()
            .filter(|t| t.error().is_none() && !t.name().starts_with("__"))
            .map(|t| {
                let mut ids: Vec<i32> = t.partitions().iter().map(|p| p.id()).collect();
                ids.sort_unstable();
                (t.name().to_owned(), ids)
            })
            .collect())
    }

    /// `(log start, log end)` of a partition.
    pub(crate) fn watermarks(&self, topic: &str, partition: i32) -> anyhow::Result<(i64, i64)> {
        blocking(|| {
            self.consumer
                .fetch_watermarks(topic, partition, ADMIN_TIMEOUT)
        })
        .with_context(|| format!("cannot read the offsets of {topic}/{partition}"))
    }

    /// The group's committed offsets for these partitions; partitions without one are absent.
    pub(crate) fn committed(
        &self,
        partitions: &[(String, i32)],
    ) -> anyhow::Result<BTreeMap<(String, i32), i64>> {
        if partitions.is_empty() {
            return Ok(BTreeMap::new());
        }
        let mut tpl = TopicPartitionList::new();
        for (topic, partition) in partitions {
            tpl.add_partition(topic, *partition);
        }
        let committed = blocking(|| self.consumer.committed_offsets(tpl, ADMIN_TIMEOUT))
            .with_context(|| {
                format!("cannot read the committed offsets of group {}", self.group)
            })?;
        Ok(committed
            .elements()
            .iter()
            .filter_map(|e| match e.offset() {
                Offset::Offset(o) if o >= 0 => Some(((e.topic().to_owned(), e.partition()), o)),
                _ => None,
            })
            .collect())
    }

    /// Commits these positions (the next offset to read) for the group, synchronously, without
    /// joining it.
    pub(crate) fn commit(&self, positions: &BTreeMap<(String, i32), i64>) -> anyhow::Result<()> {
        if positions.is_empty() {
            return Ok(());
        }
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), offset) in positions {
            tpl.add_partition_offset(topic, *partition, Offset::Offset(*offset))
                .context("building the commit")?;
        }
        blocking(|| self.consumer.commit(&tpl, CommitMode::Sync))
            .with_context(|| format!("cannot commit the progress of group {}", self.group))
    }

    /// The group's state and members, as the coordinator describes them; `None` if the
    /// coordinator does not know the group.
    pub(crate) fn describe_group(&self) -> anyhow::Result<Option<rdkafka::groups::GroupList>> {
        match blocking(|| {
            self.consumer
                .fetch_group_list(Some(&self.group), ADMIN_TIMEOUT)
        }) {
            Ok(list) => Ok(Some(list)),
            Err(KafkaError::GroupListFetch(
                rdkafka::types::RDKafkaErrorCode::GroupIdNotFound
                | rdkafka::types::RDKafkaErrorCode::UnknownMemberId,
            )) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("cannot describe group {}", self.group)),
        }
    }

    /// Starts reading the given partitions of `topic` from the given offsets.
    pub(crate) fn reader(
        &self,
        topic: &str,
        starts: &BTreeMap<i32, Offset>,
    ) -> anyhow::Result<TopicReader<'_>> {
        let mut tpl = TopicPartitionList::new();
        for (partition, offset) in starts {
            tpl.add_partition_offset(topic, *partition, *offset)
                .context("building the assignment")?;
        }
        self.consumer
            .assign(&tpl)
            .with_context(|| format!("cannot assign {topic}"))?;
        Ok(TopicReader {
            consumer: &self.consumer,
            topic: topic.to_owned(),
            open: starts.keys().copied().collect(),
            ended: HashSet::new(),
        })
    }
}

/// Records of some partitions of one topic, in order per partition, up to their ends.
pub(crate) struct TopicReader<'a> {
    consumer: &'a StreamConsumer,
    topic: String,
    open: HashSet<i32>,
    ended: HashSet<i32>,
}

impl TopicReader<'_> {
    /// The next record; `None` once every open partition reached its end.
    pub(crate) async fn next(&mut self) -> anyhow::Result<Option<ReadRecord>> {
        loop {
            if self.open.is_empty() {
                return Ok(None);
            }
            let all_ended = self.open.iter().all(|p| self.ended.contains(p));
            let wait = if all_ended { QUIET } else { STALL };
            match tokio::time::timeout(wait, self.consumer.recv()).await {
                Err(_) if all_ended => return Ok(None),
                Err(_) => {
                    let topic = &self.topic;
                    let waiting: Vec<_> = self.open.difference(&self.ended).collect();
                    bail!(
                        "reading {topic}: no record and no end of partition for {STALL:?} \
                         (partitions still open: {waiting:?})"
                    );
                }
                Ok(Err(KafkaError::PartitionEOF(partition))) => {
                    self.ended.insert(partition);
                }
                Ok(Err(e)) => {
                    return Err(anyhow!(e).context(format!("reading {}", self.topic)));
                }
                Ok(Ok(m)) => {
                    let partition = m.partition();
                    if !self.open.contains(&partition) {
                        continue;
                    }
                    // A record after an end-of-partition: that end was early (see above).
                    self.ended.remove(&partition);
                    return Ok(Some(ReadRecord {
                        topic: m.topic().to_owned(),
                        partition,
                        offset: m.offset(),
                        timestamp_ms: m.timestamp().to_millis(),
                        key: m.key().map(<[u8]>::to_vec),
                        value: m.payload().map(<[u8]>::to_vec),
                        headers: m
                            .headers()
                            .map(|hs| {
                                hs.iter()
                                    .map(|h| {
                                        (h.key.to_owned(), h.value.unwrap_or_default().to_vec())
                                    })
                                    .collect()
                            })
                            .unwrap_or_default(),
                    }));
                }
            }
        }
    }

    /// Stops reading a partition (its records past this point are not wanted).
    pub(crate) fn close(&mut self, partition: i32) {
        self.open.remove(&partition);
        self.ended.remove(&partition);
    }
}

impl Drop for TopicReader<'_> {
    fn drop(&mut self) {
        let _ = self.consumer.unassign();
    }
}

/// Runs a blocking librdkafka call without stalling the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

/// Where to start reading: an offset, or a time (RFC 3339).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Position {
    Offset(i64),
    Time(chrono::DateTime<chrono::Utc>),
}

impl std::str::FromStr for Position {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Ok(offset) = s.parse::<i64>() {
            if offset < 0 {
                return Err("an offset is 0 or more".to_owned());
            }
            return Ok(Self::Offset(offset));
        }
        chrono::DateTime::parse_from_rfc3339(s)
            .map(|t| Self::Time(t.with_timezone(&chrono::Utc)))
            .map_err(|e| format!("neither an offset nor an RFC 3339 time ({e})"))
    }
}

impl Position {
    /// Whether a record is at or after this position.
    pub(crate) fn at_or_after(&self, offset: i64, timestamp_ms: Option<i64>) -> bool {
        match self {
            Self::Offset(o) => offset >= *o,
            Self::Time(t) => timestamp_ms.is_some_and(|ms| ms >= t.timestamp_millis()),
        }
    }

    /// Whether a record is at or before this position.
    pub(crate) fn at_or_before(&self, offset: i64, timestamp_ms: Option<i64>) -> bool {
        match self {
            Self::Offset(o) => offset <= *o,
            Self::Time(t) => timestamp_ms.is_some_and(|ms| ms <= t.timestamp_millis()),
        }
    }
}

/// A record's time for people: RFC 3339 in UTC.
pub(crate) fn format_time(timestamp_ms: Option<i64>) -> String {
    timestamp_ms
        .and_then(chrono::DateTime::<chrono::Utc>::from_timestamp_millis)
        .map_or_else(
            || "-".to_owned(),
            |t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_position_is_an_offset_or_an_rfc3339_time() {
        assert_eq!("42".parse::<Position>(), Ok(Position::Offset(42)));
        let Position::Time(t) = "2026-11-30T12:00:00+01:00".parse::<Position>().unwrap() else {
            panic!("a time");
        };
        assert_eq!(t.to_rfc3339(), "2026-11-30T11:00:00+00:00");
        assert!("-1".parse::<Position>().is_err());
        assert!("yesterday".parse::<Position>().is_err());
    }

    #[test]
    fn positions_bound_records_by_offset_or_time() {
        let from: Position = "10".parse().unwrap();
        assert!(from.at_or_after(10, None) && !from.at_or_after(9, None));
        let to: Position = "1970-01-01T00:00:01Z".parse().unwrap();
        assert!(to.at_or_before(5, Some(1000)) && !to.at_or_before(5, Some(1001)));
        assert!(
            !to.at_or_before(5, None),
            "a record without a time is outside a time range"
        );
    }
}
