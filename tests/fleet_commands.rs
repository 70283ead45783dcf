//! Fleet commands through Kafka (issue 30, section 2), with real `weir serve` replicas on Tansu:
//!
//! - two replicas in one group handle the reference customers stream; `weir fleet pause
//!   --topic customer-events` stops handling on both (their ledgers stop growing while their
//!   reports keep coming), and the group's lag grows as records keep being published;
//! - a third replica started after the command comes up with the pause in force: the
//!   partitions it is given stay paused, and its ledger stays empty;
//! - `weir fleet resume` drains everything: every record handled, each key in publish order;
//! - every replica acknowledges both command ids in its status report;
//! - a malformed record on the commands topic is rejected and counted; nobody crashes.
//!
//! The customers topic has 8 partitions and the two others 1 each, so the third replica's share
//! of the 10 (at least 3, as the sticky assignor balances) holds at least one customers
//! partition. Every wait polls with a deadline; "stopped growing" is judged over two further
//! reports of every replica.

mod reference;
mod support;

use crate::reference::{CustomerCreated, CUSTOMER_TOPIC, RESOURCE_TOPIC, TASK_TOPIC};
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;
use support::broker::{unique, Tansu};
use support::kafka::read_topic;
use support::orders::one_record_per_batch;
use support::process::{
    eventually, http_get, metric_sum, wait_until, RecordFile, ServeOptions, TestDir, WeirProcess,
    FAST_GROUP_TOML,
};
use weir::{Envelope, KafkaBus, OutboundRecord, PublishExt, Publisher, StatusReport};

const CUSTOMER_PARTITIONS: i32 = 8;
const KEYS: usize = 20;
const BEFORE: usize = 40;
const DURING: usize = 60;
const PATIENCE: Duration = Duration::from_secs(120);
const STATUS_TOPIC: &str = "weir.status";
const COMMANDS_TOPIC: &str = "weir.commands";

/// One acknowledged record.
#[derive(Clone, Debug)]
struct Sent {
    id: String,
    key: String,
    partition: i32,
    offset: i64,
}

async fn publish(bus: &KafkaBus, from: usize, count: usize) -> Vec<Sent> {
    let mut sent = Vec::new();
    // One at a time, so that each key's records get their offsets in publish order.
    for n in from..from + count {
        let key = format!("c-{}", n % KEYS);
        let envelope = Envelope::new(CustomerCreated::new(key.clone(), json!({"n": n})));
        let delivery = bus.publish(&envelope).await.expect("publishes");
        sent.push(Sent {
            id: envelope.meta.id.to_string(),
            key,
            partition: delivery.partition,
            offset: delivery.offset,
        });
    }
    sent
}

/// The latest report of each process, by pid.
async fn reports(brokers: &str) -> HashMap<u32, StatusReport> {
    let records = read_topic(
        brokers,
        STATUS_TOPIC,
        1,
        Duration::from_millis(300),
        Duration::from_secs(5),
    )
    .await;
    let mut latest = HashMap::new();
    for value in records.into_iter().filter_map(|r| r.value) {
        if let Ok(report) = serde_json::from_slice::<StatusReport>(&value) {
            latest.insert(report.process.pid, report);
        }
    }
    latest
}

/// Runs `weir fleet <args>` and returns the command it printed.
async fn fleet(dir: &TestDir, name: &str, brokers: &str, args: &[&str]) -> serde_json::Value {
    let mut all = vec!["fleet"];
    all.extend_from_slice(args);
    let env = [("WEIR_BROKERS".to_owned(), brokers.to_owned())];
    let mut process = WeirProcess::spawn(dir.path(), name, &all, &env);
    let status = process
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("weir fleet exits");
    assert!(status.success(), "weir fleet failed: {}", process.stderr());
    serde_json::from_str(process.stdout().trim()).expect("weir fleet prints the command as JSON")
}

fn fail_if_exited(replicas: &mut [&mut WeirProcess]) {
    for serve in replicas.iter_mut() {
        if let Some(status) = serve.try_status() {
            panic!(
                "{} exited ({status})\n{}",
                serve.name(),
                serve.stderr_tail(8 * 1024)
            );
        }
    }
}

async fn ready(serve: &mut WeirProcess) -> std::net::SocketAddr {
    wait_until(&format!("{} to be ready", serve.name()), PATIENCE, || {
        if let Some(status) = serve.try_status() {
            panic!("{} exited ({status})\n{}", serve.name(), serve.stderr());
        }
        let admin = serve.admin_addr().ok_or("not serving yet".to_owned())?;
        match http_get(admin, "/readyz") {
            Ok((200, _)) => Ok(admin),
            other => Err(format!("/readyz: {other:?}")),
        }
    })
    .await
}

/// Customers records handled, over every ledger.
fn handled(ledgers: &mut [&mut RecordFile]) -> HashSet<String> {
    ledgers
        .iter_mut()
        .flat_map(|l| {
            l.refresh()
                .iter()
                .filter(|h| h.topic == CUSTOMER_TOPIC)
                .map(|h| h.event_id.clone())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Waits until each of `pids` has published a report built after `since` plus two intervals
/// (1 s each), and every one of them acknowledges `id` as applied; returns the reports.
async fn acknowledged(
    brokers: &str,
    pids: &[u32],
    id: &str,
    since: chrono::DateTime<chrono::Utc>,
) -> HashMap<u32, StatusReport> {
    let settled = since + chrono::Duration::seconds(2);
    eventually(
        &format!("every replica to acknowledge {id} in two reports"),
        PATIENCE,
        || async move {
            let latest = reports(brokers).await;
            for pid in pids {
                let report = latest.get(pid).ok_or(format!("no report of {pid}"))?;
                if report.at < settled {
                    return Err(format!("{pid}'s latest report is from {}", report.at));
                }
                match report.commands.iter().find(|c| c.id == id) {
                    Some(ack) if ack.result == "applied" => {}
                    other => return Err(format!("{pid} acknowledges {other:?}")),
                }
            }
            Ok(latest)
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fleet_pause_holds_every_replica_and_late_joiners_until_a_resume_drains_it_all() {
    let broker = Tansu::start_memory();
    broker.create_topic(CUSTOMER_TOPIC, CUSTOMER_PARTITIONS);
    broker.create_topic(TASK_TOPIC, 1);
    broker.create_topic(RESOURCE_TOPIC, 1);
    let brokers = broker.brokers();
    let dir = TestDir::new("weir-fleet");
    let group = unique("fleet");
    let mut ledgers: Vec<RecordFile> = ["a", "b", "c"]
        .iter()
        .map(|n| RecordFile::new(&dir.join(&format!("handled-{n}.jsonl"))))
        .collect();
    let options = |ledger: &RecordFile| {
        ServeOptions::new(&brokers, &group, ledger.path())
            .env("WEIR_CONTROL__REPORT_INTERVAL", "1s")
            .env("WEIR_CONSUMER__COMMIT_INTERVAL", "50ms")
            .config(FAST_GROUP_TOML)
    };
    let mut a = WeirProcess::serve(dir.path(), "serve-a", &options(&ledgers[0]));
    let mut b = WeirProcess::serve(dir.path(), "serve-b", &options(&ledgers[1]));
    let admin_a = ready(&mut a).await;
    let admin_b = ready(&mut b).await;
    let bus = one_record_per_batch(&brokers);

    // Before: both replicas handle the stream.
    let mut sent = publish(&bus, 0, BEFORE).await;
    eventually("the first records handled", PATIENCE, || {
        let (a_ledger, rest) = ledgers.split_at_mut(1);
        let n = handled(&mut [&mut a_ledger[0], &mut rest[0]]).len();
        async move {
            (n >= BEFORE)
                .then_some(())
                .ok_or(format!("{n} of {BEFORE}"))
        }
    })
    .await;

    // A malformed command: rejected and counted by both, which go on.
    bus.publish_record(OutboundRecord {
        topic: COMMANDS_TOPIC.to_owned(),
        key: Some(b"all|topic|customer-events".to_vec()),
        value: Some(br#"{"schema_version": 1, "action": "pause everything"}"#.to_vec()),
        headers: weir::Headers::new(),
    })
    .await
    .expect("publishes the malformed command");
    let rejected = |admin| {
        http_get(admin, "/metrics")
            .map(|(_, body)| {
                metric_sum(
                    &body,
                    "weir_commands_applied_total",
                    &[("command", "unknown"), ("result", "rejected")],
                )
            })
            .unwrap_or(0.0)
    };
    wait_until(
        "both replicas to reject the malformed command",
        PATIENCE,
        || {
            fail_if_exited(&mut [&mut a, &mut b]);
            let counts = (rejected(admin_a), rejected(admin_b));
            (counts.0 >= 1.0 && counts.1 >= 1.0)
                .then_some(())
                .ok_or(format!("rejected (a, b): {counts:?}"))
        },
    )
    .await;

    // The pause, fleet-wide.
    let pause = fleet(
        &dir,
        "fleet-pause",
        &brokers,
        &[
            "pause",
            "--topic",
            CUSTOMER_TOPIC,
            "--issuer",
            "test-operator",
        ],
    )
    .await;
    let pause_id = pause["id"].as_str().expect("an id").to_owned();
    assert_eq!(pause["issuer"], "test-operator");
    let paused_at = chrono::Utc::now();
    let pids = [a.pid(), b.pid()];
    acknowledged(&brokers, &pids, &pause_id, paused_at).await;
    let (a_ledger, rest) = ledgers.split_at_mut(1);
    let before_pause = handled(&mut [&mut a_ledger[0], &mut rest[0]]);

    // During: records keep coming; nothing is handled; the lag grows.
    let during = publish(&bus, BEFORE, DURING).await;
    let published_at = chrono::Utc::now();
    sent.extend(during.iter().cloned());
    let latest = acknowledged(&brokers, &pids, &pause_id, published_at).await;
    let (a_ledger, rest) = ledgers.split_at_mut(1);
    let while_paused = handled(&mut [&mut a_ledger[0], &mut rest[0]]);
    assert_eq!(
        while_paused.len(),
        before_pause.len(),
        "records were handled over two reports of each replica after the pause"
    );
    for report in latest.values() {
        for p in report
            .partitions
            .iter()
            .filter(|p| p.topic == CUSTOMER_TOPIC)
        {
            assert!(
                p.paused && p.pause_reasons.iter().any(|r| r.source == "command"),
                "{}: {p:?}",
                report.process.id
            );
        }
    }
    let ends = |sent: &[Sent]| {
        let mut ends: BTreeMap<i32, i64> = BTreeMap::new();
        for s in sent {
            let end = ends.entry(s.partition).or_default();
            *end = (*end).max(s.offset + 1);
        }
        ends
    };
    let lag = |committed: &BTreeMap<i32, i64>, sent: &[Sent]| -> i64 {
        ends(sent)
            .iter()
            .map(|(p, end)| (end - committed.get(p).copied().unwrap_or(0)).max(0))
            .sum()
    };
    let committed = support::kafka::committed_on(&brokers, &group, CUSTOMER_TOPIC).await;
    let lag_paused = lag(&committed, &sent);
    assert_eq!(
        lag_paused, DURING as i64,
        "the group's lag is every record published during the pause"
    );

    // A replica that starts after the command comes up paused.
    let mut c = WeirProcess::serve(dir.path(), "serve-c", &options(&ledgers[2]));
    let admin_c = ready(&mut c).await;
    let all_pids = [a.pid(), b.pid(), c.pid()];
    let c_report = eventually(
        "the late replica to own a customers partition, paused by the command",
        PATIENCE,
        || {
            let brokers = &brokers;
            let pid = c.pid();
            async move {
                let report = reports(brokers)
                    .await
                    .remove(&pid)
                    .ok_or("no report of c".to_owned())?;
                let owned: Vec<_> = report
                    .partitions
                    .iter()
                    .filter(|p| p.topic == CUSTOMER_TOPIC)
                    .collect();
                if owned.is_empty() {
                    return Err(format!("c owns {:?}", report.partitions));
                }
                if let Some(running) = owned.iter().find(|p| !p.paused) {
                    panic!("a partition moved to the late replica runs: {running:?}");
                }
                // Held at first, while it reads the commands; then paused by the command.
                let by_command = |p: &&weir::PartitionStatus| {
                    p.pause_reasons.iter().any(|r| r.reason == "fleet pause")
                };
                if !owned.iter().all(by_command) {
                    return Err(format!("c's customers partitions: {owned:?}"));
                }
                Ok(report)
            }
        },
    )
    .await;
    let joined_at = chrono::Utc::now();
    acknowledged(&brokers, &all_pids, &pause_id, joined_at).await;
    let mut all: Vec<&mut RecordFile> = ledgers.iter_mut().collect();
    assert_eq!(
        handled(&mut all).len(),
        before_pause.len(),
        "records were handled after the late replica joined"
    );
    assert!(
        rejected(admin_c) >= 1.0,
        "the late replica read the malformed command at start too"
    );
    println!(
        "late replica's customers partitions: {:?}",
        c_report
            .partitions
            .iter()
            .filter(|p| p.topic == CUSTOMER_TOPIC)
            .map(|p| p.partition)
            .collect::<Vec<_>>()
    );

    // Resume: everything drains.
    let resume = fleet(
        &dir,
        "fleet-resume",
        &brokers,
        &["resume", "--topic", CUSTOMER_TOPIC],
    )
    .await;
    let resume_id = resume["id"].as_str().expect("an id").to_owned();
    let resumed_at = chrono::Utc::now();
    let ids: HashSet<String> = sent.iter().map(|s| s.id.clone()).collect();
    eventually("every record handled after the resume", PATIENCE, || {
        fail_if_exited(&mut [&mut a, &mut b, &mut c]);
        let mut all: Vec<&mut RecordFile> = ledgers.iter_mut().collect();
        let done = handled(&mut all);
        let missing = ids.difference(&done).count();
        async move {
            (missing == 0)
                .then_some(())
                .ok_or(format!("{missing} not handled"))
        }
    })
    .await;
    eventually("the lag back to 0", PATIENCE, || {
        let (brokers, group, sent) = (&brokers, &group, &sent);
        async move {
            let committed = support::kafka::committed_on(brokers, group, CUSTOMER_TOPIC).await;
            match lag(&committed, sent) {
                0 => Ok(()),
                n => Err(format!("{n} behind")),
            }
        }
    })
    .await;
    let latest = acknowledged(&brokers, &all_pids, &resume_id, resumed_at).await;
    for report in latest.values() {
        let acked: Vec<&str> = report.commands.iter().map(|c| c.id.as_str()).collect();
        assert!(
            acked.contains(&pause_id.as_str()),
            "{} acknowledges {acked:?}",
            report.process.id
        );
        assert!(report.partitions.iter().all(|p| !p.paused), "{report:?}");
    }

    // Each replica handled each key's records in publish order.
    let key_of: HashMap<(i32, i64), &str> = sent
        .iter()
        .map(|s| ((s.partition, s.offset), s.key.as_str()))
        .collect();
    for ledger in &mut ledgers {
        let mut order: HashMap<&str, Vec<i64>> = HashMap::new();
        let mut seen = HashSet::new();
        for line in ledger
            .refresh()
            .iter()
            .filter(|l| l.topic == CUSTOMER_TOPIC)
        {
            if seen.insert((line.partition, line.offset)) {
                if let Some(key) = key_of.get(&(line.partition, line.offset)) {
                    order.entry(key).or_default().push(line.offset);
                }
            }
        }
        for (key, offsets) in order {
            assert!(
                offsets.windows(2).all(|w| w[0] < w[1]),
                "{key} out of order: {offsets:?}"
            );
        }
    }
    fail_if_exited(&mut [&mut a, &mut b, &mut c]);
    // The audit trail: each command in each replica's log, with its id and issuer.
    for serve in [&a, &b, &c] {
        let audit: Vec<serde_json::Value> = serve
            .stderr()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["fields"]["audit"] == "fleet_command")
            .collect();
        let find = |id: &str| audit.iter().find(|l| l["fields"]["command_id"] == id);
        let paused = find(&pause_id).unwrap_or_else(|| panic!("{}: {audit:?}", serve.name()));
        assert_eq!(paused["fields"]["issuer"], "test-operator");
        assert_eq!(paused["fields"]["command"], "pause");
        assert_eq!(paused["fields"]["target"], "topic|customer-events");
        assert_eq!(paused["fields"]["result"], "applied");
        assert!(find(&resume_id).is_some(), "{}: {audit:?}", serve.name());
    }
    println!("lag while paused {lag_paused}; pause {pause_id}, resume {resume_id}");
}

/// Waits until `check` holds for the latest reports (by pid), built after `since` plus one
/// interval; returns them.
async fn reports_where(
    brokers: &str,
    what: &str,
    since: chrono::DateTime<chrono::Utc>,
    check: impl Fn(&HashMap<u32, StatusReport>) -> Result<(), String>,
) -> HashMap<u32, StatusReport> {
    let settled = since + chrono::Duration::seconds(1);
    let check = &check;
    eventually(what, PATIENCE, || async move {
        let latest = reports(brokers).await;
        if let Some(old) = latest.values().find(|r| r.at < settled) {
            return Err(format!(
                "{}'s latest report is from {}",
                old.process.pid, old.at
            ));
        }
        check(&latest).map(|()| latest)
    })
    .await
}

/// The pause reasons of each partition a report lists, by topic and partition.
fn paused(report: &StatusReport) -> BTreeMap<(String, i32), Vec<String>> {
    report
        .partitions
        .iter()
        .map(|p| {
            let reasons = p
                .pause_reasons
                .iter()
                .map(|r| format!("{}: {}", r.source, r.reason))
                .collect();
            ((p.topic.clone(), p.partition), reasons)
        })
        .collect()
}

/// A quiet holds only the process it names, a fleet pause composes with it (the unquiet leaves
/// the pause in force), and a process that consumes nothing acknowledges commands as ignored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quiet_holds_only_its_process_and_an_unquiet_leaves_a_fleet_pause_in_force() {
    let db = support::db::TestDb::migrated().await;
    let broker = Tansu::start_memory();
    broker.create_topic(CUSTOMER_TOPIC, 4);
    broker.create_topic(TASK_TOPIC, 1);
    broker.create_topic(RESOURCE_TOPIC, 1);
    let brokers = broker.brokers();
    let dir = TestDir::new("weir-fleet-quiet");
    let group = unique("quiet");
    let ledger = RecordFile::new(&dir.join("handled.jsonl"));
    let options = ServeOptions::new(&brokers, &group, ledger.path())
        .env("WEIR_CONTROL__REPORT_INTERVAL", "1s")
        .config(FAST_GROUP_TOML);
    let mut a = WeirProcess::serve(dir.path(), "serve-a", &options);
    let mut b = WeirProcess::serve(dir.path(), "serve-b", &options);
    let relay_env = vec![
        ("WEIR_DATABASE__URL".to_owned(), db.url()),
        ("WEIR_BROKERS".to_owned(), brokers.clone()),
        ("WEIR_ADMIN_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("WEIR_CONTROL__REPORT_INTERVAL".to_owned(), "1s".to_owned()),
    ];
    let relay = WeirProcess::spawn(dir.path(), "relay", &["outbox-relay"], &relay_env);
    ready(&mut a).await;
    ready(&mut b).await;
    let (a_pid, b_pid, relay_pid) = (a.pid(), b.pid(), relay.pid());
    // Both replicas own partitions (the group has settled), and the relay reports.
    let latest = reports_where(
        &brokers,
        "both replicas to own partitions",
        chrono::Utc::now(),
        |r| {
            let owns = |pid| r.get(&pid).is_some_and(|r| !r.partitions.is_empty());
            (owns(a_pid) && owns(b_pid) && r.contains_key(&relay_pid))
                .then_some(())
                .ok_or(format!(
                    "{:?}",
                    r.values()
                        .map(|r| (r.process.pid, r.partitions.len()))
                        .collect::<Vec<_>>()
                ))
        },
    )
    .await;
    let b_id = latest[&b_pid].process.id.clone();

    let quiet = fleet(
        &dir,
        "fleet-quiet",
        &brokers,
        &["quiet", "--process", &b_id],
    )
    .await;
    let quiet_id = quiet["id"].as_str().expect("an id").to_owned();
    let acked = |r: &StatusReport, id: &str| {
        r.commands
            .iter()
            .find(|c| c.id == id)
            .map(|c| c.result.clone())
    };
    reports_where(&brokers, "b quiet, a running", chrono::Utc::now(), |r| {
        let (ra, rb) = (&r[&a_pid], &r[&b_pid]);
        let b_paused = paused(rb);
        let quiet_everywhere = b_paused
            .values()
            .all(|reasons| reasons == &["command: fleet quiet".to_owned()]);
        if acked(rb, &quiet_id).as_deref() != Some("applied")
            || b_paused.is_empty()
            || !quiet_everywhere
        {
            return Err(format!("b: {b_paused:?}, {:?}", rb.commands));
        }
        if acked(ra, &quiet_id).is_some() || paused(ra).values().any(|r| !r.is_empty()) {
            return Err(format!("a: {:?}, {:?}", paused(ra), ra.commands));
        }
        Ok(())
    })
    .await;

    let pause = fleet(
        &dir,
        "fleet-pause",
        &brokers,
        &["pause", "--topic", CUSTOMER_TOPIC],
    )
    .await;
    let pause_id = pause["id"].as_str().expect("an id").to_owned();
    let unquiet = fleet(
        &dir,
        "fleet-unquiet",
        &brokers,
        &["unquiet", "--process", &b_id],
    )
    .await;
    let unquiet_id = unquiet["id"].as_str().expect("an id").to_owned();
    reports_where(
        &brokers,
        "b unquiet with the customers pause in force; the relay ignoring the pause",
        chrono::Utc::now(),
        |r| {
            let rb = &r[&b_pid];
            if acked(rb, &unquiet_id).as_deref() != Some("applied") {
                return Err(format!("b: {:?}", rb.commands));
            }
            for ((topic, partition), reasons) in paused(rb) {
                let expected: &[&str] = if topic == CUSTOMER_TOPIC {
                    &["command: fleet pause"]
                } else {
                    &[]
                };
                if reasons != expected {
                    return Err(format!("b's {topic}/{partition}: {reasons:?}"));
                }
            }
            match acked(&r[&relay_pid], &pause_id).as_deref() {
                Some("ignored") => Ok(()),
                other => Err(format!("the relay acknowledges the pause as {other:?}")),
            }
        },
    )
    .await;
    fail_if_exited(&mut [&mut a, &mut b]);
    drop(relay);
    db.close().await;
}
