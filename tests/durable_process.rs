//! Durable retries in `weir serve` against Tansu and PostgreSQL: a key whose handler fails for
//! 3 s while 5,000 records of 100 keys stream is parked, other keys flow and the partitions commit
//! to their end, and once the handler recovers the key's records are handled in offset order;
//! also across a SIGKILL of `weir serve` while the key is parked, and a rebalance to replicas.
//!
//! The customer handler of the reference service fails `Retryable` while the event's
//! `details.simulate = "outage"` and `details.until` is in the future. Records are published one
//! per batch (Tansu skips the rest of a batch when a fetch starts inside it).

mod support;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use support::broker::{unique, Tansu};
use support::db::TestDb;
use support::process::{
    eventually, Handled, RecordFile, ServeOptions, TestDir, WeirProcess, FAST_GROUP_TOML,
};
use weir::seeds::{CustomerCreated, CUSTOMER_TOPIC, RESOURCE_TOPIC, TASK_TOPIC};
use weir::{Envelope, KafkaBus, KafkaConfig, PublishExt};

const PARTITIONS: i32 = 4;
const RECORDS: usize = 5_000;
const KEYS: usize = 100;
const BAD: &str = "c-7";
const OUTAGE: Duration = Duration::from_secs(3);
const PATIENCE: Duration = Duration::from_secs(240);

fn options(broker: &Tansu, db: &TestDb, group: &str, dir: &TestDir) -> ServeOptions {
    let toml = format!(
        "{FAST_GROUP_TOML}
[retry]
initial_interval = \"20ms\"
maximum_attempts = 3
jitter = 0.0

[retry.durable]
initial_interval = \"300ms\"
backoff_coefficient = 1.0
maximum_interval = \"300ms\"
maximum_attempts = 1000
"
    );
    ServeOptions::new(&broker.brokers(), group, &dir.join("handled.jsonl"))
        .env("WEIR_DATABASE__URL", db.url())
        .env("WEIR_DATABASE__MAX_CONNECTIONS", "8")
        .env("WEIR_HTTP__ADDR", "127.0.0.1:0")
        .env(
            "WEIR_STORAGE__DIR",
            dir.join("storage").display().to_string(),
        )
        .env("WEIR_CONSUMER__REVOKE_TIMEOUT", "5s")
        .env("WEIR_CONSUMER__COMMIT_INTERVAL", "50ms")
        .env("WEIR_KAFKA__PRODUCER__BATCH.NUM.MESSAGES", "1")
        .config(&toml)
}

/// (partition, offset) of each published record of `key`, and the last offset per partition.
#[derive(Default)]
struct Stream {
    bad: Vec<(i32, i64)>,
    ends: BTreeMap<i32, i64>,
}

/// Publishes the stream: record `n` has key `c-(n % KEYS)`; the bad key's records carry the
/// outage hook, failing until `until`.
async fn stream(brokers: String, until: chrono::DateTime<chrono::Utc>) -> Stream {
    let mut config = KafkaConfig::new(brokers);
    config
        .producer
        .insert("batch.num.messages".into(), "1".into());
    let bus = KafkaBus::new(config).expect("bus");
    let mut out = Stream::default();
    for n in 0..RECORDS {
        let key = format!("c-{}", n % KEYS);
        let details = if key == BAD {
            json!({"n": n, "simulate": "outage", "until": until.to_rfc3339()})
        } else {
            json!({"n": n})
        };
        let d = bus
            .publish(&Envelope::new(CustomerCreated::new(key.clone(), details)))
            .await
            .expect("publish");
        if key == BAD {
            out.bad.push((d.partition, d.offset));
        }
        let end = out.ends.entry(d.partition).or_default();
        *end = (*end).max(d.offset + 1);
    }
    out
}

async fn parked(db: &TestDb, group: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM weir_parked WHERE group_id = $1")
        .bind(group)
        .fetch_one(db.pool())
        .await
        .unwrap()
}

fn committed(brokers: &str, group: &str) -> BTreeMap<i32, i64> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", brokers)
        .set("group.id", group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..PARTITIONS {
        tpl.add_partition(CUSTOMER_TOPIC, p);
    }
    consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .filter_map(|e| match e.offset() {
            Offset::Offset(o) => Some((e.partition(), o)),
            _ => None,
        })
        .collect()
}

/// The bad key's handled offsets, first handling of each, in the order they were handled.
fn bad_order(lines: &[Handled], bad: &HashSet<(i32, i64)>) -> Vec<(i32, i64)> {
    let mut seen = HashSet::new();
    lines
        .iter()
        .filter(|l| l.topic == CUSTOMER_TOPIC && bad.contains(&(l.partition, l.offset)))
        .map(|l| (l.partition, l.offset))
        .filter(|c| seen.insert(*c))
        .collect()
}

async fn key_order_holds_across_parking(crash_and_rebalance: bool) {
    let broker = Tansu::start_memory();
    for topic in [TASK_TOPIC, CUSTOMER_TOPIC, RESOURCE_TOPIC] {
        broker.create_topic(topic, PARTITIONS);
    }
    broker.create_topic(&format!("{CUSTOMER_TOPIC}.dlq"), 1);
    let db = TestDb::migrated().await;
    let dir = TestDir::new("weir-durable");
    let group = unique("durable");
    let options = options(&broker, &db, &group, &dir);
    let mut records = RecordFile::new(&dir.join("handled.jsonl"));
    let first = WeirProcess::serve(dir.path(), "serve-1", &options);
    eventually("serve to join its group", PATIENCE, || {
        let ready = first.admin_addr().is_some();
        async move {
            if ready {
                Ok(())
            } else {
                Err("not serving".into())
            }
        }
    })
    .await;

    let until = chrono::Utc::now() + chrono::Duration::from_std(OUTAGE).unwrap();
    let streaming = tokio::spawn(stream(broker.brokers(), until));
    eventually("the bad key to be parked", PATIENCE, || {
        let (db, group) = (&db, &group);
        async move {
            match parked(db, group).await {
                0 => Err("nothing parked".into()),
                _ => Ok(()),
            }
        }
    })
    .await;
    let mut replicas = vec![first];
    if crash_and_rebalance {
        // Killed while the key is parked; two replicas take over and share the partitions.
        replicas[0].kill_and_wait().await;
        replicas.push(WeirProcess::serve(dir.path(), "serve-2", &options));
        replicas.push(WeirProcess::serve(dir.path(), "serve-3", &options));
    }
    let stream = streaming.await.unwrap();
    let bad: HashSet<(i32, i64)> = stream.bad.iter().copied().collect();
    assert_eq!(bad.len(), RECORDS / KEYS);

    // Nothing lost: every record handled, the bad key's included.
    let expected = RECORDS;
    eventually("every record handled", PATIENCE, || {
        let n = records
            .refresh()
            .iter()
            .filter(|l| l.topic == CUSTOMER_TOPIC)
            .map(|l| (l.partition, l.offset))
            .collect::<HashSet<_>>()
            .len();
        async move {
            if n >= expected {
                Ok(())
            } else {
                Err(format!("{n} of {expected} handled"))
            }
        }
    })
    .await;
    let lines = records.refresh().to_vec();

    // The bad key in offset order: its partition's offsets, each handled before the next.
    let order = bad_order(&lines, &bad);
    let mut sorted = order.clone();
    sorted.sort();
    assert_eq!(
        order, sorted,
        "the bad key's records were handled out of order"
    );
    assert_eq!(order.len(), bad.len());

    // It was parked, and the partition moved on: records after the bad key's first one (same
    // partition) were handled before the bad key recovered.
    let (bad_partition, first_bad) = stream.bad[0];
    let first_bad_success = lines
        .iter()
        .position(|l| {
            l.topic == CUSTOMER_TOPIC && (l.partition, l.offset) == (bad_partition, first_bad)
        })
        .unwrap();
    let overtook = lines[..first_bad_success]
        .iter()
        .filter(|l| {
            l.topic == CUSTOMER_TOPIC && l.partition == bad_partition && l.offset > first_bad
        })
        .count();
    assert!(
        overtook > 0,
        "no record of the bad key's partition was handled while it was parked"
    );
    let first_handling = lines
        .iter()
        .find(|l| (l.partition, l.offset) == (bad_partition, first_bad))
        .unwrap();
    assert!(
        first_handling.attempt > 3,
        "handled by a durable attempt: {first_handling:?}"
    );

    // The partitions' committed offsets reach the end, and the table empties.
    let brokers = broker.brokers();
    eventually("committed offsets at the end", PATIENCE, || {
        let got = committed(&brokers, &group);
        let ends = stream.ends.clone();
        async move {
            if ends.iter().all(|(p, end)| got.get(p) == Some(end)) {
                Ok(())
            } else {
                Err(format!("committed {got:?}, ends {ends:?}"))
            }
        }
    })
    .await;
    eventually("no parked records left", PATIENCE, || {
        let (db, group) = (&db, &group);
        async move {
            match parked(db, group).await {
                0 => Ok(()),
                n => Err(format!("{n} parked")),
            }
        }
    })
    .await;
    for mut replica in replicas {
        if replica.is_running() {
            replica.sigterm();
            replica.wait_exit(Duration::from_secs(30)).await;
        }
    }
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_failing_for_three_seconds_is_parked_while_others_flow_then_handled_in_order() {
    key_order_holds_across_parking(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_holds_across_a_sigkill_while_parked_and_a_rebalance_to_two_replicas() {
    key_order_holds_across_parking(true).await;
}
