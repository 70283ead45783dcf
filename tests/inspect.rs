//! `weir inspect` against a real Tansu broker (and PostgreSQL for the outbox), compared with what
//! a foreign client, confluent-kafka for Python, reads of the same group.
//!
//! Records are published one per batch: Tansu's high watermark is the last batch's base
//! offset + 1, so only then is the log end every client reads the true one.

mod reference;
mod support;

use serde::Deserialize;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::broker::{unique, Tansu};
use support::db::TestDb;
use support::orders::{one_record_per_batch, order_record, OrderPlaced};
use support::process::{eventually, TestDir, WeirProcess};
use weir::{
    Bus, ConsumerConfig, Ctx, HandlerOptions, Headers, KafkaBus, OutboundRecord, Publisher, Router,
    Subscription,
};

fn bus(broker: &Tansu) -> KafkaBus {
    one_record_per_batch(&broker.brokers())
}

async fn place(bus: &KafkaBus, topic: &str, order_id: &str) {
    let (record, _) = order_record(topic, order_id);
    bus.publish_record(record).await.expect("publish");
}

fn consume(bus: &KafkaBus, topic: &str, group: &str, handled: Arc<AtomicUsize>) -> Subscription {
    let router = Router::new().on_with(
        move |_: OrderPlaced, _: Ctx| {
            handled.fetch_add(1, Ordering::SeqCst);
            async { Ok(()) }
        },
        HandlerOptions::new().topic(topic),
    );
    let config = ConsumerConfig {
        commit_interval: Duration::from_millis(100),
        ..ConsumerConfig::new(group)
    };
    bus.subscribe(router, config).expect("subscribe")
}

async fn inspect(
    dir: &TestDir,
    name: &str,
    brokers: &str,
    args: &[&str],
    env: &[(&str, String)],
) -> (bool, String, String) {
    let mut all_env = vec![("WEIR_BROKERS".to_owned(), brokers.to_owned())];
    all_env.extend(env.iter().map(|(k, v)| ((*k).to_owned(), v.clone())));
    let mut command = vec!["inspect"];
    command.extend(args);
    let mut process = WeirProcess::spawn(dir.path(), name, &command, &all_env);
    let status = process
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("weir inspect finishes");
    (status.success(), process.stdout(), process.stderr())
}

/// Committed offset (or -1001 for none) and log end per partition, read by confluent-kafka.
const PYTHON_OFFSETS: &str = r#"
import json, sys
from confluent_kafka import Consumer, TopicPartition

brokers, group, topic, partitions = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
consumer = Consumer({"bootstrap.servers": brokers, "group.id": group, "enable.auto.commit": False})
out = {}
for tp in consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10):
    low, high = consumer.get_watermark_offsets(TopicPartition(topic, tp.partition), timeout=10)
    committed = tp.offset if tp.offset >= 0 else None
    out[tp.partition] = {"committed": committed, "log_end": high,
                         "lag": high - (committed if committed is not None else low)}
consumer.close()
print(json.dumps(out))
"#;

#[derive(Debug, PartialEq, Eq, Deserialize)]
struct Offsets {
    committed: Option<i64>,
    log_end: i64,
    lag: i64,
}

async fn foreign_offsets(
    brokers: &str,
    group: &str,
    topic: &str,
    partitions: i32,
) -> BTreeMap<i32, Offsets> {
    let python = support::foreign::python();
    let output = tokio::process::Command::new(&python)
        .args(["-c", PYTHON_OFFSETS, brokers, group, topic])
        .arg(partitions.to_string())
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        output.status.success(),
        "confluent-kafka failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let parsed: BTreeMap<String, Offsets> =
        serde_json::from_slice(&output.stdout).expect("python output");
    parsed
        .into_iter()
        .map(|(p, o)| (p.parse().unwrap(), o))
        .collect()
}

fn weir_offsets(report: &serde_json::Value, topic: &str) -> BTreeMap<i32, Offsets> {
    report["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .filter(|p| p["topic"] == topic)
        .map(|p| {
            (
                p["partition"].as_i64().unwrap() as i32,
                Offsets {
                    committed: p["committed"].as_i64(),
                    log_end: p["log_end"].as_i64().unwrap(),
                    lag: p["lag"].as_i64().unwrap(),
                },
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_reports_the_committed_offsets_and_lag_that_confluent_kafka_reads() {
    let broker = Tansu::start_memory();
    let topic = unique("orders");
    let dlq = format!("{topic}.dlq");
    broker.create_topic(&topic, 2);
    broker.create_topic(&dlq, 1);
    let bus = bus(&broker);
    let group = unique("shop");
    let dir = TestDir::new("weir-inspect");
    let brokers = broker.brokers();

    for i in 0..20 {
        place(&bus, &topic, &format!("o-{i}")).await;
    }
    bus.publish_record(OutboundRecord {
        topic: topic.clone(),
        key: Some(b"poison".to_vec()),
        value: Some(b"not json".to_vec()),
        headers: Headers::new(),
    })
    .await
    .unwrap();
    let handled = Arc::new(AtomicUsize::new(0));
    let subscription = consume(&bus, &topic, &group, handled.clone());

    // Running: the member and its assignment show, and the committed offsets reach the end.
    let report = eventually(
        "inspect to show everything committed",
        Duration::from_secs(60),
        || {
            let (dir, brokers, group, topic) = (&dir, &brokers, &group, &topic);
            async move {
                let (ok, out, err) =
                    inspect(dir, "running", brokers, &["--group", group, "--json"], &[]).await;
                if !ok {
                    return Err(err);
                }
                let report: serde_json::Value =
                    serde_json::from_str(&out).map_err(|e| e.to_string())?;
                let committed: i64 = weir_offsets(&report, topic)
                    .values()
                    .map(|o| o.committed.unwrap_or(0))
                    .sum();
                if committed == 21 && !report["members"].as_array().unwrap().is_empty() {
                    Ok(report)
                } else {
                    Err(out)
                }
            }
        },
    )
    .await;
    assert_eq!(handled.load(Ordering::SeqCst), 20);
    assert_eq!(report["total_lag"], 0);
    // Tansu 0.6 describes members without their assignment; Kafka fills it in.
    let assignment = &report["members"][0]["assignment"];
    if assignment != &serde_json::json!({}) {
        assert_eq!(assignment[&topic], serde_json::json!([0, 1]), "{report}");
    }
    assert_eq!(
        report["dead_letters"][&dlq]["by_kind"]["decode"], 1,
        "{report}"
    );
    assert!(
        report["outbox"].is_null(),
        "no database, no outbox: {report}"
    );
    // Dropping the subscription stops it (this test is about inspect, not the stop).
    drop(subscription);

    // Stopped, with a backlog: the same committed offsets, log ends and lags as confluent-kafka.
    for i in 20..27 {
        place(&bus, &topic, &format!("o-{i}")).await;
    }
    let (ok, out, err) = inspect(
        &dir,
        "stopped",
        &brokers,
        &["--group", &group, "--json"],
        &[],
    )
    .await;
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    let ours = weir_offsets(&report, &topic);
    let theirs = foreign_offsets(&brokers, &group, &topic, 2).await;
    assert_eq!(ours, theirs);
    assert_eq!(report["total_lag"], 7, "{report}");
    assert_eq!(ours.values().map(|o| o.lag).sum::<i64>(), 7);

    // The table form says the same.
    let (ok, out, err) = inspect(&dir, "table", &brokers, &["--group", &group], &[]).await;
    assert!(ok, "{err}");
    assert!(out.contains(&format!("group {group}")), "{out}");
    assert!(
        out.lines()
            .any(|l| l.trim_start().starts_with("total") && l.trim_end().ends_with(" 7")),
        "{out}"
    );
}

#[tokio::test]
async fn inspect_fails_for_a_group_that_does_not_exist() {
    let broker = Tansu::start_memory();
    let topic = unique("orders");
    broker.create_topic(&topic, 1);
    let dir = TestDir::new("weir-inspect-missing");
    let group = unique("nobody");
    let (ok, out, err) = inspect(
        &dir,
        "missing",
        &broker.brokers(),
        &["--group", &group],
        &[],
    )
    .await;
    assert!(!ok, "{out}");
    assert!(err.contains("does not exist"), "{err}");
}

/// Parks a row for `group` as a consumer would: `key` (or none) at `offset`, parked `age` ago,
/// with `attempts` calls so far and its next attempt `next_in` from now.
async fn park(
    db: &TestDb,
    group: &str,
    key: Option<&str>,
    offset: i64,
    attempts: i32,
    age: &str,
    next_in: &str,
) {
    sqlx::query(
        "INSERT INTO weir_parked (group_id, handler, topic, partition, \"offset\", key, value, \
         attempts, parked_at, next_attempt_at) \
         VALUES ($1, 'reserve_stock', 'orders', 1, $2, $3, '\\x7b7d', $4, \
                 now() - $5::interval, now() + $6::interval)",
    )
    .bind(group)
    .bind(offset)
    .bind(key.map(str::as_bytes))
    .bind(attempts)
    .bind(age)
    .bind(next_in)
    .execute(db.pool())
    .await
    .expect("parked row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspect_with_a_database_reports_the_outbox_backlog_and_the_oldest_parked_keys() {
    let broker = Tansu::start_memory();
    let topic = unique("orders");
    broker.create_topic(&topic, 1);
    let bus = bus(&broker);
    let group = unique("shop");
    place(&bus, &topic, "o-1").await;
    let handled = Arc::new(AtomicUsize::new(0));
    let subscription = consume(&bus, &topic, &group, handled.clone());
    let db = TestDb::migrated().await;
    for age in ["90 seconds", "1 second"] {
        sqlx::query(
            "INSERT INTO weir_outbox (id, topic, key, event_type, payload, created_at) \
             VALUES ($1, 'orders', 'o-2', 'test.order_placed', '\\x7b7d', now() - $2::interval)",
        )
        .bind(uuid::Uuid::new_v4())
        .bind(age)
        .execute(db.pool())
        .await
        .expect("outbox row");
    }
    // 24 parked keys, 26 records: a record without a key, parked longest; k-0 with three
    // records, its head retried 6 times and next tried in 40 s; k-1 to k-22 one each, each
    // parked 10 s less long than the one before, their heads due. Another group's row is not
    // this group's.
    park(&db, &group, None, 1, 3, "1000 seconds", "0 seconds").await;
    for (offset, age) in [(10, 300), (11, 250), (12, 10)] {
        let (attempts, next) = if offset == 10 {
            (6, "40 seconds")
        } else {
            (0, "0 seconds")
        };
        park(
            &db,
            &group,
            Some("k-0"),
            offset,
            attempts,
            &format!("{age} seconds"),
            next,
        )
        .await;
    }
    for i in 1..=22 {
        let age = format!("{} seconds", 300 - 10 * i);
        park(
            &db,
            &group,
            Some(&format!("k-{i}")),
            100 + i,
            3,
            &age,
            "-5 seconds",
        )
        .await;
    }
    park(
        &db,
        "another-group",
        Some("k-0"),
        500,
        3,
        "2000 seconds",
        "0 seconds",
    )
    .await;

    let dir = TestDir::new("weir-inspect-db");
    let env = [("WEIR_DATABASE__URL", db.url())];
    let report = eventually("the group to commit", Duration::from_secs(60), || {
        let (dir, broker, group, env) = (&dir, &broker, &group, &env);
        async move {
            let (ok, out, err) = inspect(
                dir,
                "db",
                &broker.brokers(),
                &["--group", group, "--json"],
                env,
            )
            .await;
            if !ok {
                return Err(err);
            }
            let report: serde_json::Value =
                serde_json::from_str(&out).map_err(|e| e.to_string())?;
            if report["total_lag"] == 0 {
                Ok(report)
            } else {
                Err(out)
            }
        }
    })
    .await;
    assert_eq!(report["outbox"]["pending"], 2, "{report}");
    let age = report["outbox"]["oldest_age_seconds"].as_f64().unwrap();
    assert!((90.0..3600.0).contains(&age), "{report}");

    // The totals count every key; the listing shows the 20 parked longest, oldest first.
    let parked = &report["parked"];
    assert_eq!(parked["records"], 26, "{parked}");
    assert_eq!(parked["keys"], 24, "{parked}");
    let by_key = parked["by_key"].as_array().expect("by_key");
    let keys: Vec<Option<&str>> = by_key.iter().map(|k| k["key"].as_str()).collect();
    let mut expected = vec![None, Some("k-0".to_owned())];
    expected.extend((1..=18).map(|i| Some(format!("k-{i}"))));
    assert_eq!(
        keys,
        expected.iter().map(Option::as_deref).collect::<Vec<_>>(),
        "{parked}"
    );
    let k0 = &by_key[1];
    assert_eq!(k0["topic"], "orders");
    assert_eq!(k0["partition"], 1);
    assert_eq!(k0["handler"], "reserve_stock");
    assert_eq!(k0["records"], 3, "{k0}");
    assert_eq!(k0["head_offset"], 10, "{k0}");
    assert_eq!(k0["head_attempts"], 6, "{k0}");
    let oldest = k0["oldest_age_seconds"].as_f64().unwrap();
    assert!((300.0..400.0).contains(&oldest), "{k0}");
    let next = k0["next_attempt_in_seconds"].as_f64().unwrap();
    assert!(next > 0.0 && next <= 40.0, "{k0}");
    assert_eq!(
        by_key[2]["next_attempt_in_seconds"], 0.0,
        "an overdue head is due, not negative: {parked}"
    );

    // `--parked-keys` bounds the listing; the table says how many it shows.
    let brokers = broker.brokers();
    let (ok, out, err) = inspect(
        &dir,
        "db-two-keys",
        &brokers,
        &["--group", &group, "--json", "--parked-keys", "2"],
        &env,
    )
    .await;
    assert!(ok, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["parked"]["by_key"].as_array().unwrap().len(), 2);
    assert_eq!(report["parked"]["keys"], 24);
    let (ok, out, err) = inspect(&dir, "db-table", &brokers, &["--group", &group], &env).await;
    assert!(ok, "{err}");
    assert!(out.contains("parked: 26 records, 24 keys"), "{out}");
    let k0_line = out
        .lines()
        .find(|l| l.trim_start().starts_with("k-0 "))
        .unwrap_or_else(|| panic!("no line for k-0: {out}"));
    let cells: Vec<&str> = k0_line.split_whitespace().collect();
    assert_eq!(
        cells[..4],
        ["k-0", "orders", "1", "reserve_stock"],
        "{k0_line}"
    );
    assert_eq!(cells[4], "3", "records: {k0_line}");
    assert_eq!(cells[7], "10", "head offset: {k0_line}");
    assert_eq!(cells[8], "6", "attempts: {k0_line}");
    assert_eq!(cells[9], "in", "next attempt: {k0_line}");
    assert!(out.contains("(no key)"), "{out}");
    assert!(!out.contains("k-19 "), "beyond the 20 oldest: {out}");
    assert!(out.contains("(20 of 24 keys, oldest first"), "{out}");
    // Dropping the subscription stops it (this test is about inspect, not the stop).
    drop(subscription);
    db.close().await;
}
