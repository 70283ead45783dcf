//! Durable retries in `weir serve` against Tansu and PostgreSQL: a key whose handler fails for
//! 3 s while 5,000 records of 100 keys stream is parked, other keys flow and the partitions commit
//! to their end, and once the handler recovers the key's records are handled in offset order;
//! also across a SIGKILL of `weir serve` while the key is parked, and a rebalance to replicas.
//! And a parked record whose handler keeps failing is dead-lettered after its last durable
//! attempt, after which its key's next record runs.
//!
//! The customer handler of the reference service fails `Retryable` while the event's
//! `details.simulate = "outage"` and `details.until` is in the future (an hour ahead: for good). Records are published one
//! per batch (Tansu skips the rest of a batch when a fetch starts inside it).

mod reference;
mod support;

use crate::reference::{CustomerCreated, CUSTOMER_TOPIC, RESOURCE_TOPIC, TASK_TOPIC};
use serde_json::json;
use std::collections::{BTreeMap, HashSet};
use std::time::Duration;
use support::broker::{unique, Tansu};
use support::db::TestDb;
use support::kafka::read_topic;
use support::orders::one_record_per_batch;
use support::process::{
    eventually, http_get, metric_sum, wait_until, Handled, RecordFile, ServeOptions, TestDir,
    WeirProcess, FAST_GROUP_TOML,
};
use weir::dead_letter_headers as dl;
use weir::{Delivery, Envelope, Headers, KafkaBus, OutboundRecord, PublishExt, Publisher};

const PARTITIONS: i32 = 4;
const RECORDS: usize = 5_000;
const KEYS: usize = 100;
const BAD: &str = "c-7";
const OUTAGE: Duration = Duration::from_secs(3);
const PATIENCE: Duration = Duration::from_secs(240);

/// `weir serve` with the database, its API and storage in `dir`, and fast commits; no retry
/// settings yet.
fn serve_options(broker: &Tansu, db: &TestDb, group: &str, dir: &TestDir) -> ServeOptions {
    ServeOptions::new(&broker.brokers(), group, &dir.join("handled.jsonl"))
        .env("WEIR_DATABASE__URL", db.url())
        .env("WEIR_DATABASE__MAX_CONNECTIONS", "8")
        .env("WEIR_HTTP__ADDR", "127.0.0.1:0")
        .env(
            "WEIR_STORAGE__DIR",
            dir.join("storage").display().to_string(),
        )
        .env("WEIR_CONSUMER__REVOKE_TIMEOUT", "2s")
        .env("WEIR_CONSUMER__COMMIT_INTERVAL", "50ms")
        .env("WEIR_KAFKA__PRODUCER__BATCH.NUM.MESSAGES", "1")
}

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
    serve_options(broker, db, group, dir).config(&toml)
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
    let bus = one_record_per_batch(&brokers);
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

/// Waits for `weir serve` to be up (its admin server listening).
async fn serving(process: &WeirProcess) {
    wait_until("serve to start", PATIENCE, || {
        process
            .admin_addr()
            .map(|_| ())
            .ok_or_else(|| "not serving".to_owned())
    })
    .await;
}

async fn parked(db: &TestDb, group: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM weir_parked WHERE group_id = $1")
        .bind(group)
        .fetch_one(db.pool())
        .await
        .unwrap()
}

/// The group's committed offsets on the customer topic, by partition.
async fn committed(brokers: &str, group: &str) -> BTreeMap<i32, i64> {
    support::kafka::committed_on(brokers, group, CUSTOMER_TOPIC).await
}

async fn nothing_left_parked(db: &TestDb, group: &str) {
    eventually("no parked records left", PATIENCE, || async {
        match parked(db, group).await {
            0 => Ok(()),
            n => Err(format!("{n} parked")),
        }
    })
    .await;
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
    let broker = reference_broker();
    let db = TestDb::migrated().await;
    let dir = TestDir::new("weir-durable");
    let group = unique("durable");
    let options = options(&broker, &db, &group, &dir);
    let mut records = RecordFile::new(&dir.join("handled.jsonl"));
    let first = WeirProcess::serve(dir.path(), "serve-1", &options);
    serving(&first).await;

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
        let (brokers, group) = (&brokers, &group);
        let ends = stream.ends.clone();
        async move {
            let got = committed(brokers, group).await;
            if ends.iter().all(|(p, end)| got.get(p) == Some(end)) {
                Ok(())
            } else {
                Err(format!("committed {got:?}, ends {ends:?}"))
            }
        }
    })
    .await;
    nothing_left_parked(&db, &group).await;
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

/// The customer whose dependency stays down for the whole exhaustion test.
const DOOMED: &str = "c-doomed";

/// Publishes a `customer.created` of [`DOOMED`] with `details`, one record per batch; returns
/// where it landed and its value, byte for byte.
async fn publish_doomed(bus: &KafkaBus, details: serde_json::Value) -> (Delivery, Vec<u8>) {
    let value = Envelope::new(CustomerCreated::new(DOOMED.to_owned(), details))
        .to_structured()
        .unwrap();
    let delivery = bus
        .publish_record(OutboundRecord {
            topic: CUSTOMER_TOPIC.to_owned(),
            key: Some(DOOMED.as_bytes().to_vec()),
            value: Some(value.clone()),
            headers: Headers::new().with("content-type", weir::CLOUDEVENTS_CONTENT_TYPE),
        })
        .await
        .expect("publish");
    (delivery, value)
}

/// A broker with the reference service's topics, and the customers' dead-letter topic.
fn reference_broker() -> Tansu {
    let broker = Tansu::start_memory();
    for topic in [TASK_TOPIC, CUSTOMER_TOPIC, RESOURCE_TOPIC] {
        broker.create_topic(topic, PARTITIONS);
    }
    broker.create_topic(&format!("{CUSTOMER_TOPIC}.dlq"), 1);
    broker
}

/// The parked rows of the group: (offset, attempts, durable attempts), by offset.
async fn parked_rows(db: &TestDb, group: &str) -> Vec<(i64, i32, i32)> {
    sqlx::query_as(
        "SELECT \"offset\", attempts, durable_attempts FROM weir_parked WHERE group_id = $1 \
         ORDER BY \"offset\"",
    )
    .bind(group)
    .fetch_all(db.pool())
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_record_failing_its_last_durable_attempt_is_dead_lettered_and_its_key_moves_on() {
    let broker = reference_broker();
    let dlq = format!("{CUSTOMER_TOPIC}.dlq");
    let db = TestDb::migrated().await;
    let dir = TestDir::new("weir-durable-exhausted");
    let group = unique("durable-exhausted");
    // Three attempts in place, then three durable ones 1 s, 2 s and 2 s apart, set through the
    // environment: without the durable stage the record would be dead-lettered after 3.
    let options = serve_options(&broker, &db, &group, &dir)
        .config(FAST_GROUP_TOML)
        .env("WEIR_RETRY__INITIAL_INTERVAL", "20ms")
        .env("WEIR_RETRY__MAXIMUM_ATTEMPTS", "3")
        .env("WEIR_RETRY__JITTER", "0")
        .env("WEIR_RETRY__DURABLE__INITIAL_INTERVAL", "1s")
        .env("WEIR_RETRY__DURABLE__BACKOFF_COEFFICIENT", "2.0")
        .env("WEIR_RETRY__DURABLE__MAXIMUM_INTERVAL", "2s")
        .env("WEIR_RETRY__DURABLE__MAXIMUM_ATTEMPTS", "3");
    let mut records = RecordFile::new(&dir.join("handled.jsonl"));
    let mut serve = WeirProcess::serve(dir.path(), "serve", &options);
    serving(&serve).await;

    // The first record's dependency is down for an hour: for good, as far as this test goes.
    // The second record of the same customer is fine.
    let bus = one_record_per_batch(&broker.brokers());
    let until = chrono::Utc::now() + chrono::Duration::hours(1);
    let (failing, failing_value) = publish_doomed(
        &bus,
        json!({"simulate": "outage", "until": until.to_rfc3339()}),
    )
    .await;
    let (next, _) = publish_doomed(&bus, json!({"n": 1})).await;
    assert_eq!(failing.partition, next.partition, "one key, one partition");
    let partition = failing.partition;
    let handled = |lines: &[Handled], offset: i64| -> Vec<Handled> {
        lines
            .iter()
            .filter(|l| {
                (l.topic.as_str(), l.partition, l.offset) == (CUSTOMER_TOPIC, partition, offset)
            })
            .cloned()
            .collect()
    };

    // Parked after its in-place attempts, the next record of the key parked behind it without
    // a call, and the partition committed past both.
    let brokers = broker.brokers();
    eventually("both records parked and committed past", PATIENCE, || {
        let next_handled = handled(records.refresh(), next.offset);
        let (db, group, brokers) = (&db, &group, &brokers);
        async move {
            assert!(
                next_handled.is_empty(),
                "the next record ran while the key was parked: {next_handled:?}"
            );
            let rows = parked_rows(db, group).await;
            let committed = committed(brokers, group).await.get(&partition).copied();
            if rows.len() == 2
                && rows[0].0 == failing.offset
                && rows[0].1 >= 3
                && rows[1] == (next.offset, 0, 0)
                && committed >= Some(next.offset + 1)
            {
                Ok(())
            } else {
                Err(format!("parked {rows:?}, committed {committed:?}"))
            }
        }
    })
    .await;

    // The worker retries the head until its last durable attempt, then dead-letters it; only
    // then does the key's next record run.
    eventually("the failing record to leave the table", PATIENCE, || {
        let next_handled = handled(records.refresh(), next.offset);
        let (db, group) = (&db, &group);
        async move {
            let rows = parked_rows(db, group).await;
            let head_parked = rows.iter().any(|r| r.0 == failing.offset);
            assert!(
                !head_parked || next_handled.is_empty(),
                "the next record ran before the failing one was dead-lettered: {rows:?}"
            );
            if head_parked {
                Err(format!("parked {rows:?}"))
            } else {
                Ok(())
            }
        }
    })
    .await;
    let dead = read_topic(&brokers, &dlq, 1, Duration::from_secs(1), PATIENCE).await;
    assert_eq!(dead.len(), 1, "one dead letter: {dead:?}");
    let dead = &dead[0];
    let header = |name| dead.headers.get_str(name);
    assert_eq!(header(dl::ATTEMPTS), Some("6"), "3 in place + 3 durable");
    assert_eq!(header(dl::ERROR_KIND), Some("retries_exhausted"));
    assert_eq!(header(dl::HANDLER), Some("record_customer_created"));
    assert_eq!(header(dl::CONSUMER_GROUP), Some(group.as_str()));
    assert_eq!(header(dl::ORIGINAL_TOPIC), Some(CUSTOMER_TOPIC));
    assert_eq!(
        header(dl::ORIGINAL_PARTITION),
        Some(partition.to_string().as_str())
    );
    assert_eq!(
        header(dl::ORIGINAL_OFFSET),
        Some(failing.offset.to_string().as_str())
    );
    assert!(
        header(dl::ERROR_MESSAGE).is_some_and(|m| m.contains("simulated outage")),
        "{:?}",
        header(dl::ERROR_MESSAGE)
    );
    assert_eq!(dead.key.as_deref(), Some(DOOMED.as_bytes()));
    assert_eq!(
        dead.value.as_deref(),
        Some(failing_value.as_slice()),
        "the original bytes"
    );
    assert_eq!(
        header("content-type"),
        Some(weir::CLOUDEVENTS_CONTENT_TYPE),
        "the original headers"
    );

    // The key moved on: its next record ran once, as the worker's first call of it; the
    // failing one never succeeded, and nothing is left parked.
    let ran = wait_until("the next record to run", PATIENCE, || {
        Some(handled(records.refresh(), next.offset))
            .filter(|ran| !ran.is_empty())
            .ok_or_else(|| "not yet".to_owned())
    })
    .await;
    assert_eq!(ran.len(), 1, "{ran:?}");
    assert_eq!(ran[0].attempt, 1, "{ran:?}");
    assert!(handled(records.refresh(), failing.offset).is_empty());
    nothing_left_parked(&db, &group).await;
    let admin = serve.admin_addr().expect("admin address");
    let (_, metrics) = http_get(admin, "/metrics").expect("metrics");
    let attempts = |result| {
        metric_sum(
            &metrics,
            "weir_parked_attempts_total",
            &[("result", result)],
        )
    };
    assert_eq!(attempts("retry"), 2.0, "{metrics}");
    assert_eq!(attempts("dead_lettered"), 1.0, "{metrics}");
    assert_eq!(attempts("success"), 1.0, "{metrics}");

    serve.sigterm();
    serve.wait_exit(Duration::from_secs(30)).await;
    db.close().await;
}

/// Seconds from the database's clock until the row of `offset` is due (negative: overdue), and
/// its (attempts, durable attempts).
async fn due_in(db: &TestDb, group: &str, offset: i64) -> Option<(f64, i32, i32)> {
    sqlx::query_as(
        "SELECT EXTRACT(EPOCH FROM next_attempt_at - now())::float8, attempts, durable_attempts \
         FROM weir_parked WHERE group_id = $1 AND \"offset\" = $2",
    )
    .bind(group)
    .bind(offset)
    .fetch_optional(db.pool())
    .await
    .unwrap()
}

/// `weir serve` with `service.retry_worker = false` parks a failing record and never retries it
/// itself; a separate `weir retry-worker` process (same group, same database) does, through its
/// durable attempts, and dead-letters it after the last one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_retry_worker_process_retries_what_serve_without_its_worker_parked() {
    let broker = reference_broker();
    let dlq = format!("{CUSTOMER_TOPIC}.dlq");
    let db = TestDb::migrated().await;
    let dir = TestDir::new("weir-retry-worker");
    let group = unique("retry-worker");
    // Three attempts in place, then two durable ones a second apart.
    let options = serve_options(&broker, &db, &group, &dir)
        .config(FAST_GROUP_TOML)
        .env("WEIR_SERVICE__RETRY_WORKER", "false")
        .env("WEIR_RETRY__INITIAL_INTERVAL", "20ms")
        .env("WEIR_RETRY__MAXIMUM_ATTEMPTS", "3")
        .env("WEIR_RETRY__JITTER", "0")
        .env("WEIR_RETRY__DURABLE__INITIAL_INTERVAL", "1s")
        .env("WEIR_RETRY__DURABLE__BACKOFF_COEFFICIENT", "1.0")
        .env("WEIR_RETRY__DURABLE__MAXIMUM_INTERVAL", "1s")
        .env("WEIR_RETRY__DURABLE__MAXIMUM_ATTEMPTS", "2");
    let mut serve = WeirProcess::serve(dir.path(), "serve", &options);
    serving(&serve).await;

    let bus = one_record_per_batch(&broker.brokers());
    let until = chrono::Utc::now() + chrono::Duration::hours(1);
    let (failing, _) = publish_doomed(
        &bus,
        json!({"simulate": "outage", "until": until.to_rfc3339()}),
    )
    .await;

    // Parked by serve after its three in-place attempts.
    eventually("the record to be parked", PATIENCE, || async {
        match due_in(&db, &group, failing.offset).await {
            Some((_, 3, 0)) => Ok(()),
            other => Err(format!("{other:?}\n{}", serve.stderr_tail(1500))),
        }
    })
    .await;

    // With serve alone nobody retries it: serve registered no parked-record worker (its
    // metrics have none of the worker's series), and the row stays untouched well past the time
    // it fell due, by three of the worker's one-second polls.
    let admin = serve.admin_addr().expect("admin address");
    let (_, metrics) = http_get(admin, "/metrics").expect("metrics");
    assert!(
        !metrics.contains("weir_parked_records"),
        "serve runs a parked-record worker although service.retry_worker = false:\n{metrics}"
    );
    let overdue = 3.0;
    eventually("the parked row to be overdue", PATIENCE, || {
        let db = &db;
        let group = &group;
        async move {
            let row = due_in(db, group, failing.offset).await;
            let Some((due, 3, 0)) = row else {
                panic!("retried with no retry worker running: {row:?}");
            };
            if due <= -overdue {
                Ok(())
            } else {
                Err(format!("{row:?}"))
            }
        }
    })
    .await;
    assert!(serve.is_running(), "{}", serve.stderr_tail(1500));

    // A retry-worker process with the same settings takes it: two durable attempts, then the
    // dead-letter topic.
    let mut worker = WeirProcess::command(dir.path(), "retry-worker", "retry-worker", &options);
    let dead = read_topic(&broker.brokers(), &dlq, 1, Duration::from_secs(1), PATIENCE).await;
    assert_eq!(
        dead.len(),
        1,
        "one dead letter: {dead:?}\n{}",
        worker.stderr_tail(2000)
    );
    assert_eq!(
        dead[0].headers.get_str(dl::ATTEMPTS),
        Some("5"),
        "3 in place + 2 durable"
    );
    assert_eq!(
        dead[0].headers.get_str(dl::ORIGINAL_OFFSET),
        Some(failing.offset.to_string().as_str())
    );
    nothing_left_parked(&db, &group).await;
    let worker_admin = worker
        .logged_addr("Retrying parked records.", "admin_addr")
        .expect("the retry worker's admin address");
    let (_, metrics) = http_get(worker_admin, "/metrics").expect("retry-worker metrics");
    let attempts = |result| {
        metric_sum(
            &metrics,
            "weir_parked_attempts_total",
            &[("result", result)],
        )
    };
    assert_eq!(attempts("retry"), 1.0, "{metrics}");
    assert_eq!(attempts("dead_lettered"), 1.0, "{metrics}");

    for process in [&mut worker, &mut serve] {
        process.sigterm();
        let status = process.wait_exit(Duration::from_secs(30)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "{status:?}\n{}",
            process.stderr_tail(1500)
        );
    }
    db.close().await;
}
