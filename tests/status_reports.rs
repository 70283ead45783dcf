//! Status reports through Kafka: a `weir serve` publishes its report to `weir.status` every
//! `[control] report_interval`, keyed by its process id, listing the partitions it owns with
//! the offsets the broker confirmed; a clean stop leaves a tombstone for its key. The outbox
//! relay, which consumes nothing, reports too.

mod reference;
mod support;

use crate::reference::{CustomerCreated, CUSTOMER_TOPIC, RESOURCE_TOPIC, TASK_TOPIC};
use serde_json::json;
use std::collections::BTreeMap;
use std::time::Duration;
use support::broker::{unique, Tansu};
use support::db::TestDb;
use support::kafka::read_topic;
use support::process::{
    eventually, http_get, metric_sum, RecordFile, ServeOptions, TestDir, WeirProcess,
    FAST_GROUP_TOML,
};
use weir::{Envelope, PublishExt, StatusReport, StoredRecord, REPORT_SCHEMA_VERSION};

/// A reported partition's committed offset, log end and lag.
type Offsets = (Option<i64>, Option<i64>, Option<i64>);

const STATUS_TOPIC: &str = "weir.status";
const PARTITIONS: i32 = 4;
const EVENTS: usize = 24;
const PATIENCE: Duration = Duration::from_secs(90);

/// The latest record of each key, in topic order (a tombstone's value is `None`).
fn latest_by_key(records: Vec<StoredRecord>) -> BTreeMap<String, Option<Vec<u8>>> {
    records
        .into_iter()
        .map(|r| {
            let key = String::from_utf8(r.key.expect("reports are keyed")).expect("utf-8 key");
            (key, r.value)
        })
        .collect()
}

async fn status_records(brokers: &str) -> Vec<StoredRecord> {
    read_topic(
        brokers,
        STATUS_TOPIC,
        1,
        Duration::from_millis(300),
        Duration::from_secs(5),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reports_its_partitions_and_commits_then_leaves_a_tombstone_at_a_clean_stop() {
    let broker = Tansu::start_memory();
    for topic in [TASK_TOPIC, CUSTOMER_TOPIC, RESOURCE_TOPIC] {
        broker.create_topic(topic, PARTITIONS);
    }
    let brokers = broker.brokers();
    let dir = TestDir::new("weir-status");
    let mut records = RecordFile::new(&dir.join("handled.jsonl"));
    let options = ServeOptions::new(&brokers, &unique("status"), records.path())
        .env("WEIR_CONTROL__REPORT_INTERVAL", "1s")
        .env("WEIR_CONSUMER__COMMIT_INTERVAL", "10ms")
        .config(FAST_GROUP_TOML);
    let mut serve = WeirProcess::serve(dir.path(), "serve-0", &options);

    // Published ends per partition, from what publishing returned (Tansu's watermarks are not
    // to be trusted).
    let bus = support::orders::one_record_per_batch(&brokers);
    let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
    for n in 0..EVENTS {
        let envelope = Envelope::new(CustomerCreated::new(format!("c-{n}"), json!({"n": n})));
        let delivery = bus.publish(&envelope).await.expect("publishes");
        let end = ends.entry(delivery.partition).or_default();
        *end = (*end).max(delivery.offset + 1);
    }
    eventually("every event handled", PATIENCE, || {
        let handled = records.count();
        async move {
            if handled >= EVENTS {
                Ok(())
            } else {
                Err(format!("{handled} of {EVENTS} handled"))
            }
        }
    })
    .await;

    let (key, report) = eventually(
        "a report whose committed offsets and log ends reach the published ends",
        PATIENCE,
        || {
            let brokers = brokers.clone();
            let ends = ends.clone();
            async move {
                let latest = latest_by_key(status_records(&brokers).await);
                let (key, value) = latest
                    .into_iter()
                    .next()
                    .ok_or_else(|| "no report yet".to_owned())?;
                let value = value.ok_or_else(|| "a tombstone while running".to_owned())?;
                let report: StatusReport =
                    serde_json::from_slice(&value).map_err(|e| format!("not a report: {e}"))?;
                // Committed (from the engine) and log end and lag (from librdkafka's
                // statistics, every 2 s) of each partition.
                let seen: BTreeMap<i32, Offsets> = report
                    .partitions
                    .iter()
                    .filter(|p| p.topic == CUSTOMER_TOPIC)
                    .map(|p| (p.partition, (p.committed, p.log_end, p.lag)))
                    .collect();
                let caught_up = ends
                    .iter()
                    .all(|(p, end)| seen.get(p) == Some(&(Some(*end), Some(*end), Some(0))));
                if caught_up {
                    Ok((key, report))
                } else {
                    Err(format!(
                        "(committed, log end, lag) {seen:?}, published ends {ends:?}"
                    ))
                }
            }
        },
    )
    .await;
    println!(
        "status report: {}",
        serde_json::to_string_pretty(&report).expect("serializes")
    );
    assert_eq!(report.schema_version, REPORT_SCHEMA_VERSION);
    assert_eq!(
        report.process.id, key,
        "reports are keyed by their process id"
    );
    assert_eq!(report.process.role, "serve");
    assert_eq!(report.process.pid, serve.pid());
    assert_eq!(report.interval_ms, 1_000);
    assert_eq!(
        report.partitions_total,
        3 * PARTITIONS as usize,
        "one replica owns every partition of the three topics: {:?}",
        report.partitions
    );
    assert!(!report.partitions_truncated);
    for partition in report
        .partitions
        .iter()
        .filter(|p| p.topic == CUSTOMER_TOPIC)
    {
        if let Some(end) = ends.get(&partition.partition) {
            assert_eq!(partition.position, Some(*end), "{partition:?}");
        }
        assert_eq!(partition.in_flight, 0, "{partition:?}");
        assert!(!partition.paused);
    }
    if cfg!(target_os = "linux") {
        assert!(report.process.rss_bytes.is_some_and(|rss| rss > 0));
    }
    let admin = serve.admin_addr().expect("the admin address is logged");
    let (_, metrics) = http_get(admin, "/metrics").expect("metrics");
    assert!(
        metric_sum(
            &metrics,
            "weir_reports_published_total",
            &[("result", "ok")]
        ) >= 1.0,
        "no published report counted:\n{metrics}"
    );

    serve.sigterm();
    let status = serve
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("exits after SIGTERM");
    assert!(
        status.success(),
        "{status}\n{}",
        serve.stderr_tail(8 * 1024)
    );
    let latest = eventually("the tombstone of the stopped process", PATIENCE, || {
        let brokers = brokers.clone();
        let key = key.clone();
        async move {
            let latest = latest_by_key(status_records(&brokers).await);
            match latest.get(&key) {
                Some(None) => Ok(latest),
                other => Err(format!("latest of {key}: {:?}", other.map(|v| v.is_some()))),
            }
        }
    })
    .await;
    assert_eq!(latest.len(), 1, "one process reported: {:?}", latest.keys());
}

/// A process without a consumer reports too: its role, no partitions, and a tombstone at stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbox_relay_reports_its_role_and_leaves_a_tombstone_at_a_clean_stop() {
    let db = TestDb::migrated().await;
    let broker = Tansu::start_memory();
    let brokers = broker.brokers();
    let dir = TestDir::new("weir-status-relay");
    let env = vec![
        ("WEIR_DATABASE__URL".to_owned(), db.url()),
        ("WEIR_BROKERS".to_owned(), brokers.clone()),
        ("WEIR_ADMIN_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("WEIR_CONTROL__REPORT_INTERVAL".to_owned(), "1s".to_owned()),
    ];
    let mut relay = WeirProcess::spawn(dir.path(), "relay", &["outbox-relay"], &env);
    let (key, report) = eventually("a report of the relay", PATIENCE, || {
        let brokers = brokers.clone();
        async move {
            let (key, value) = latest_by_key(status_records(&brokers).await)
                .into_iter()
                .next()
                .ok_or_else(|| "no report yet".to_owned())?;
            let value = value.ok_or_else(|| "a tombstone while running".to_owned())?;
            let report: StatusReport =
                serde_json::from_slice(&value).map_err(|e| format!("not a report: {e}"))?;
            Ok((key, report))
        }
    })
    .await;
    assert_eq!(report.process.id, key);
    assert_eq!(report.process.role, "outbox-relay");
    assert!(report.partitions.is_empty(), "{:?}", report.partitions);

    relay.sigterm();
    let status = relay
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("exits after SIGTERM");
    assert!(
        status.success(),
        "{status}\n{}",
        relay.stderr_tail(8 * 1024)
    );
    eventually("the tombstone of the stopped relay", PATIENCE, || {
        let brokers = brokers.clone();
        let key = key.clone();
        async move {
            match latest_by_key(status_records(&brokers).await).get(&key) {
                Some(None) => Ok(()),
                other => Err(format!("latest of {key}: {:?}", other.map(|v| v.is_some()))),
            }
        }
    })
    .await;
    db.close().await;
}
