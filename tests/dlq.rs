//! `weir dlq` against a real Tansu broker: a consumer in this process dead-letters records, the
//! `weir` binary lists, shows and replays them, and the same consumer handles the replays.
//!
//! Every record is published alone (one record per batch): Tansu skips the rest of a batch when a
//! fetch starts inside it, and its high watermark is the last batch's base offset + 1.

mod reference;
mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::broker::{unique, Tansu};
use support::kafka::read_topic;
use support::orders::{one_record_per_batch, order_record, OrderPlaced};
use support::process::{eventually, TestDir, WeirProcess};
use weir::dead_letter_headers as header;
use weir::{
    Bus, ConsumerConfig, Ctx, Envelope, HandlerError, HandlerOptions, Headers, KafkaBus,
    OutboundRecord, Publisher, RetryPolicy, Router, StoredRecord, Subscription,
};

fn bus(broker: &Tansu) -> KafkaBus {
    one_record_per_batch(&broker.brokers())
}

/// Publishes one order to `topic`, awaiting its acknowledgement.
async fn place(bus: &KafkaBus, topic: &str, order_id: &str) -> uuid::Uuid {
    let (mut record, id) = order_record(topic, order_id);
    record.headers.set("x-tenant", "acme");
    bus.publish_record(record).await.expect("publish");
    id
}

/// Handler calls, by event id: (attempt, succeeded).
type Calls = Arc<Mutex<HashMap<uuid::Uuid, Vec<bool>>>>;

/// A consumer of `topic` whose handler fails (retryably) for the orders in `broken`.
fn consume(
    bus: &KafkaBus,
    topic: &str,
    group: &str,
    broken: Arc<Mutex<HashSet<String>>>,
    calls: Calls,
) -> Subscription {
    let router = Router::new()
        .on_with(
            move |order: OrderPlaced, ctx: Ctx| {
                let failing = broken.lock().unwrap().contains(&order.order_id);
                calls
                    .lock()
                    .unwrap()
                    .entry(ctx.event_id())
                    .or_default()
                    .push(!failing);
                async move {
                    if failing {
                        Err(HandlerError::retryable("the payment service is down"))
                    } else {
                        Ok(())
                    }
                }
            },
            HandlerOptions::new().topic(topic).name("charge"),
        )
        .retry(RetryPolicy {
            initial_interval: Duration::from_millis(10),
            maximum_attempts: 2,
            jitter: 0.0,
            ..RetryPolicy::default()
        });
    let config = ConsumerConfig {
        commit_interval: Duration::from_millis(100),
        ..ConsumerConfig::new(group)
    };
    bus.subscribe(router, config).expect("subscribe")
}

/// Runs `weir <args>` to completion; returns (success, stdout, stderr).
async fn weir(dir: &TestDir, name: &str, brokers: &str, args: &[&str]) -> (bool, String, String) {
    let env = vec![("WEIR_BROKERS".to_owned(), brokers.to_owned())];
    let mut process = WeirProcess::spawn(dir.path(), name, args, &env);
    let status = process
        .wait_exit(Duration::from_secs(120))
        .await
        .unwrap_or_else(|| panic!("weir {args:?} did not finish within 120 s"));
    (status.success(), process.stdout(), process.stderr())
}

async fn records(broker: &Tansu, topic: &str, at_least: usize) -> Vec<StoredRecord> {
    read_topic(
        &broker.brokers(),
        topic,
        at_least,
        Duration::from_millis(700),
        Duration::from_secs(30),
    )
    .await
}

fn header_of<'a>(r: &'a StoredRecord, name: &str) -> Option<&'a str> {
    r.headers.get_str(name)
}

fn create(broker: &Arc<Tansu>, topics: &[&str]) {
    for t in topics {
        broker.create_topic(t, 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_brings_back_exactly_the_filtered_dead_letters_and_parks_those_over_max_replays() {
    let broker = Arc::new(Tansu::start_memory());
    let topic = unique("orders");
    let dlq = format!("{topic}.dlq");
    let parking = format!("{topic}.parking");
    create(&broker, &[&topic, &dlq, &parking]);
    let bus = bus(&broker);
    let dir = TestDir::new("weir-dlq");

    // The payment service is down for six orders; two records are poison (not even JSON).
    let failing: Vec<String> = (0..6).map(|i| format!("f-{i}")).collect();
    let broken = Arc::new(Mutex::new(failing.iter().cloned().collect::<HashSet<_>>()));
    let calls: Calls = Arc::default();
    let subscription = consume(&bus, &topic, "shop", broken.clone(), calls.clone());
    let mut failing_ids = HashMap::new();
    for i in 0..10 {
        let order = if i % 3 == 0 && i / 3 < 4 {
            format!("ok-{i}")
        } else {
            failing[failing_ids.len()].clone()
        };
        let id = place(&bus, &topic, &order).await;
        if order.starts_with("f-") {
            failing_ids.insert(order, id);
        }
    }
    for i in 0..2 {
        let poison = OutboundRecord {
            topic: topic.clone(),
            key: Some(format!("poison-{i}").into_bytes()),
            value: Some(b"\xff not json".to_vec()),
            headers: Headers::new(),
        };
        bus.publish_record(poison).await.expect("publish poison");
    }
    assert_eq!(failing_ids.len(), 6);
    let dead = records(&broker, &dlq, 8).await;
    assert_eq!(dead.len(), 8, "6 exhausted + 2 poison dead letters");
    let kinds: BTreeMap<&str, usize> = dead.iter().fold(BTreeMap::new(), |mut m, r| {
        *m.entry(header_of(r, header::ERROR_KIND).unwrap())
            .or_default() += 1;
        m
    });
    assert_eq!(
        kinds,
        BTreeMap::from([("decode", 2), ("retries_exhausted", 6)])
    );

    // `list` counts them, `show` prints one.
    let brokers = broker.brokers();
    let (ok, out, err) = weir(
        &dir,
        "list",
        &brokers,
        &["dlq", "list", "--topic", &dlq, "--json"],
    )
    .await;
    assert!(ok, "{err}");
    let listing: serde_json::Value = serde_json::from_str(&out).expect("list --json");
    assert_eq!(listing["records"], 8);
    assert_eq!(listing["by_kind"]["retries_exhausted"], 6);
    assert_eq!(listing["by_kind"]["decode"], 2);
    assert_eq!(listing["by_handler"]["charge"], 6);
    assert_eq!(listing["by_original_topic"][&topic], 8);
    let exhausted = dead
        .iter()
        .find(|r| header_of(r, header::ERROR_KIND) == Some("retries_exhausted"))
        .unwrap();
    let offset = exhausted.offset.to_string();
    let (ok, out, err) = weir(
        &dir,
        "show",
        &brokers,
        &["dlq", "show", "--topic", &dlq, "--offset", &offset],
    )
    .await;
    assert!(ok, "{err}");
    assert!(out.contains("weir.error.kind: retries_exhausted"), "{out}");
    assert!(
        out.contains("\"order_id\": \"f-"),
        "the JSON value is pretty-printed: {out}"
    );

    // The cause is fixed, except for f-0.
    broken.lock().unwrap().retain(|o| o == "f-0");
    let handled_before: usize = calls.lock().unwrap().values().map(Vec::len).sum();

    // A dry run publishes nothing.
    let filter = "kind=retries_exhausted";
    let (ok, out, err) = weir(
        &dir,
        "dry-run",
        &brokers,
        &[
            "dlq",
            "replay",
            "--topic",
            &dlq,
            "--filter",
            filter,
            "--dry-run",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("selected 6, replayed 6, parked 0, skipped 0"),
        "{out}"
    );
    let after_dry_run = records(&broker, &topic, 12).await;
    assert_eq!(after_dry_run.len(), 12, "a dry run publishes nothing");

    // The replay brings back exactly the six exhausted ones, not the poison.
    let (ok, out, err) = weir(
        &dir,
        "replay",
        &brokers,
        &[
            "dlq", "replay", "--topic", &dlq, "--filter", filter, "--yes", "--id", "first",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("selected 6, replayed 6, parked 0, skipped 0"),
        "{out}"
    );
    let source = records(&broker, &topic, 18).await;
    assert_eq!(source.len(), 18);
    let replayed: Vec<&StoredRecord> = source
        .iter()
        .filter(|r| header_of(r, header::REPLAY_ID) == Some("first"))
        .collect();
    assert_eq!(replayed.len(), 6);
    for r in &replayed {
        assert_eq!(header_of(r, header::REPLAY_COUNT), Some("1"));
        assert_eq!(
            header_of(r, "x-tenant"),
            Some("acme"),
            "original headers kept"
        );
        for failure in header::FAILURE {
            assert_eq!(header_of(r, failure), None, "{failure} removed");
        }
        assert!(
            String::from_utf8_lossy(r.key.as_deref().unwrap()).starts_with("f-"),
            "only the filtered records"
        );
    }

    // The handler runs once more per replayed record: f-1..f-5 succeed, f-0 fails again.
    eventually(
        "the replayed orders to be handled",
        Duration::from_secs(60),
        || {
            let calls = calls.clone();
            let failing_ids = failing_ids.clone();
            async move {
                let calls = calls.lock().unwrap();
                let done = failing_ids.iter().all(|(order, id)| {
                    let c = calls.get(id).map(Vec::as_slice).unwrap_or_default();
                    if order == "f-0" {
                        c.len() >= 4
                    } else {
                        c.len() >= 3
                    }
                });
                if done {
                    Ok(())
                } else {
                    Err(format!("{calls:?}"))
                }
            }
        },
    )
    .await;
    let again = records(&broker, &dlq, 9).await;
    assert_eq!(again.len(), 9, "f-0 failed again after its replay");
    {
        let calls = calls.lock().unwrap();
        for (order, id) in &failing_ids {
            let c = &calls[id];
            if order == "f-0" {
                assert_eq!(c, &[false, false, false, false], "{order}");
            } else {
                // Two failed attempts, then exactly one successful call for the replay.
                assert_eq!(c, &[false, false, true], "{order}");
            }
        }
        let handled_after: usize = calls.values().map(Vec::len).sum();
        assert_eq!(handled_after, handled_before + 5 + 2);
    }

    // f-0 has now been replayed once: with --max-replays 1 its new dead letter is parked, while
    // its first one (never replayed) goes back once more.
    let (ok, out, err) = weir(
        &dir,
        "park",
        &brokers,
        &[
            "dlq",
            "replay",
            "--topic",
            &dlq,
            "--filter",
            "key=f-0",
            "--max-replays",
            "1",
            "--yes",
            "--id",
            "second",
        ],
    )
    .await;
    assert!(ok, "{err}");
    assert!(
        out.contains("selected 2, replayed 1, parked 1, skipped 0"),
        "{out}"
    );
    let parked = records(&broker, &parking, 1).await;
    assert_eq!(parked.len(), 1);
    assert_eq!(header_of(&parked[0], header::REPLAY_COUNT), Some("1"));
    assert_eq!(
        header_of(&parked[0], header::ERROR_KIND),
        Some("retries_exhausted"),
        "parked with its failure headers"
    );
    // Dropping the subscription stops it; this test is about the replay, not the stop.
    drop(subscription);
}

/// Synthetic dead letters `o-<i>` of `topic` for each `i` of `orders`, published one by one.
async fn dead_letters_of(bus: &KafkaBus, topic: &str, dlq: &str, orders: std::ops::Range<usize>) {
    for i in orders {
        let envelope = Envelope::new(OrderPlaced {
            order_id: format!("o-{i}"),
        });
        let headers = Headers::new()
            .with(header::ORIGINAL_TOPIC, topic)
            .with(header::ERROR_KIND, "retries_exhausted")
            .with(header::ATTEMPTS, "5");
        bus.publish_record(OutboundRecord {
            topic: dlq.to_owned(),
            key: Some(format!("o-{i}").into_bytes()),
            value: Some(envelope.to_structured().unwrap()),
            headers,
        })
        .await
        .expect("publish dead letter");
    }
}

/// `n` synthetic dead letters of `topic`, published one by one.
async fn dead_letters(bus: &KafkaBus, topic: &str, dlq: &str, n: usize) {
    dead_letters_of(bus, topic, dlq, 0..n).await;
}

/// The dead-letter offsets the replayed records of `topic` came from, in topic order.
fn sources(records: &[StoredRecord], dlq: &str) -> Vec<i64> {
    records
        .iter()
        .filter_map(|r| header_of(r, header::REPLAY_SOURCE))
        .map(|s| {
            let rest = s.strip_prefix(&format!("{dlq}:0:")).expect("source");
            rest.parse().unwrap()
        })
        .collect()
}

/// The dead-letter offsets the records of `topic` replayed by replay `id` came from, in topic
/// order.
fn sources_of(records: &[StoredRecord], dlq: &str, id: &str) -> Vec<i64> {
    let mine: Vec<StoredRecord> = records
        .iter()
        .filter(|r| header_of(r, header::REPLAY_ID) == Some(id))
        .cloned()
        .collect();
    sources(&mine, dlq)
}

/// Waits until the wall clock is past the millisecond it reads now: a record produced after
/// this gets a later timestamp (CreateTime, set by the producer) than one acknowledged before.
async fn next_millisecond() {
    let now = chrono::Utc::now().timestamp_millis();
    while chrono::Utc::now().timestamp_millis() <= now {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

/// Runs `weir dlq replay --topic <dlq> --yes --id <id> <range...>`; returns its summary line.
async fn replay_range(dir: &TestDir, brokers: &str, dlq: &str, id: &str, range: &[&str]) -> String {
    let mut args = vec!["dlq", "replay", "--topic", dlq, "--yes", "--id", id];
    args.extend(range);
    let (ok, out, err) = weir(dir, id, brokers, &args).await;
    assert!(ok, "weir {args:?}: {err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_to_selects_exactly_the_records_inside_the_range_by_offset_or_time() {
    let broker = Arc::new(Tansu::start_memory());
    let topic = unique("orders");
    let dlq = format!("{topic}.dlq");
    create(&broker, &[&topic, &dlq]);
    let bus = bus(&broker);
    // Offsets 0..=6, then 7 and 8 in later milliseconds than 6, then 9 later than 8: a time
    // range from 7's timestamp to 8's holds exactly 7 and 8.
    dead_letters_of(&bus, &topic, &dlq, 0..7).await;
    next_millisecond().await;
    dead_letters_of(&bus, &topic, &dlq, 7..9).await;
    next_millisecond().await;
    dead_letters_of(&bus, &topic, &dlq, 9..10).await;
    let dead = records(&broker, &dlq, 10).await;
    assert_eq!(
        dead.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (0..10).collect::<Vec<_>>()
    );
    let dir = TestDir::new("weir-dlq-range");
    let brokers = broker.brokers();

    // By offset: both bounds included; each bound alone leaves the other side open.
    let out = replay_range(
        &dir,
        &brokers,
        &dlq,
        "middle",
        &["--from", "3", "--to", "6"],
    )
    .await;
    assert!(
        out.contains("selected 4, replayed 4, parked 0, skipped 0"),
        "{out}"
    );
    let out = replay_range(&dir, &brokers, &dlq, "head", &["--to", "1"]).await;
    assert!(
        out.contains("selected 2, replayed 2, parked 0, skipped 0"),
        "{out}"
    );
    let out = replay_range(&dir, &brokers, &dlq, "tail", &["--from", "8"]).await;
    assert!(
        out.contains("selected 2, replayed 2, parked 0, skipped 0"),
        "{out}"
    );

    // By time: RFC 3339, to the millisecond, both bounds included.
    let time = |offset: usize| {
        chrono::DateTime::<chrono::Utc>::from_timestamp_millis(dead[offset].timestamp_ms)
            .expect("a record timestamp")
            .to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
    };
    assert!(dead[6].timestamp_ms < dead[7].timestamp_ms, "{dead:?}");
    assert!(dead[8].timestamp_ms < dead[9].timestamp_ms, "{dead:?}");
    let out = replay_range(
        &dir,
        &brokers,
        &dlq,
        "by-time",
        &["--from", &time(7), "--to", &time(8)],
    )
    .await;
    assert!(
        out.contains("selected 2, replayed 2, parked 0, skipped 0"),
        "{out}"
    );

    let replayed = records(&broker, &topic, 10).await;
    assert_eq!(replayed.len(), 10, "4 + 2 + 2 + 2 replayed records");
    assert_eq!(sources_of(&replayed, &dlq, "middle"), [3, 4, 5, 6]);
    assert_eq!(sources_of(&replayed, &dlq, "head"), [0, 1]);
    assert_eq!(sources_of(&replayed, &dlq, "tail"), [8, 9]);
    assert_eq!(sources_of(&replayed, &dlq, "by-time"), [7, 8]);
    for r in &replayed {
        let source = sources(std::slice::from_ref(r), &dlq)[0];
        assert_eq!(
            r.key.as_deref(),
            Some(format!("o-{source}").as_bytes()),
            "each replayed record is its own dead letter"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_rate_spaces_the_publishes_at_least_one_interval_apart() {
    const RECORDS: usize = 20;
    const RATE: u32 = 10;
    let broker = Arc::new(Tansu::start_memory());
    let topic = unique("orders");
    let dlq = format!("{topic}.dlq");
    create(&broker, &[&topic, &dlq]);
    let bus = bus(&broker);
    dead_letters(&bus, &topic, &dlq, RECORDS).await;
    let dir = TestDir::new("weir-dlq-rate");
    let rate = format!("{RATE}/s");
    let out = replay_range(&dir, &broker.brokers(), &dlq, "paced", &["--rate", &rate]).await;
    assert!(
        out.contains(&format!("selected {RECORDS}, replayed {RECORDS}")),
        "{out}"
    );

    // Each replayed record's timestamp is the time the replay produced it (CreateTime, set by
    // its producer), so the spacing is read off the records themselves. At most RATE a second
    // means any k + 1 consecutive publishes span at least k / RATE seconds: the whole run, and
    // every window of RATE + 1 records (the windows still hold if the first publish alone was
    // slow, as a producer's first one is). The slack allows for the time between the pacer's
    // wake-up and the produce call of a window's first record, and for millisecond timestamps;
    // unpaced, the 20 publishes take a few milliseconds after the first.
    let replayed = records(&broker, &topic, RECORDS).await;
    assert_eq!(
        sources_of(&replayed, &dlq, "paced"),
        (0..RECORDS as i64).collect::<Vec<_>>()
    );
    let times: Vec<i64> = replayed.iter().map(|r| r.timestamp_ms).collect();
    let interval_ms = 1000 / i64::from(RATE);
    let slack_ms = interval_ms / 2;
    let span = times[RECORDS - 1] - times[0];
    let bound = (RECORDS as i64 - 1) * interval_ms;
    assert!(
        span >= bound - slack_ms,
        "{RECORDS} records at {rate} were produced within {span} ms, under the {bound} ms the \
         rate allows: {times:?}"
    );
    let window = RATE as usize;
    for (i, pair) in times.windows(window + 1).enumerate() {
        let took = pair[window] - pair[0];
        assert!(
            took >= 1000 - slack_ms,
            "records {i}..={} ({} of them) were produced within {took} ms: {times:?}",
            i + window,
            window + 1
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_that_crashes_between_publish_and_commit_resumes_without_publishing_twice() {
    let broker = Arc::new(Tansu::start_memory());
    let topic = unique("orders");
    let dlq = format!("{topic}.dlq");
    create(&broker, &[&topic, &dlq]);
    let bus = bus(&broker);
    dead_letters(&bus, &topic, &dlq, 10).await;
    let dir = TestDir::new("weir-dlq-crash");
    let brokers = broker.brokers();
    let args = ["dlq", "replay", "--topic", &dlq, "--yes", "--id", "r1"];

    // Aborts right after the 4th acknowledged publish: at least that one is published and not
    // committed.
    let mut crashing = args.to_vec();
    crashing.extend(["--crash-after", "4"]);
    let (ok, _, err) = weir(&dir, "crash", &brokers, &crashing).await;
    assert!(!ok, "the replay was meant to abort: {err}");
    assert_eq!(
        sources(&records(&broker, &topic, 4).await, &dlq),
        [0, 1, 2, 3]
    );

    let (ok, out, err) = weir(&dir, "resume", &brokers, &args).await;
    assert!(ok, "{err}");
    let skipped: u64 = out
        .split("skipped ")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no skipped count in {out}"));
    assert!(
        skipped >= 1,
        "the 4th record was published but not committed: {out}"
    );
    let replayed = sources(&records(&broker, &topic, 10).await, &dlq);
    assert_eq!(
        replayed,
        (0..10).collect::<Vec<_>>(),
        "each dead letter exactly once"
    );

    // Running the finished replay again publishes nothing.
    let (ok, out, err) = weir(&dir, "again", &brokers, &args).await;
    assert!(ok, "{err}");
    assert!(out.contains("selected 0, replayed 0"), "{out}");
    assert_eq!(records(&broker, &topic, 10).await.len(), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_killed_midway_resumes_where_it_stopped_without_publishing_twice() {
    let broker = Arc::new(Tansu::start_memory());
    let topic = unique("orders");
    let dlq = format!("{topic}.dlq");
    create(&broker, &[&topic, &dlq]);
    let bus = bus(&broker);
    dead_letters(&bus, &topic, &dlq, 30).await;
    let dir = TestDir::new("weir-dlq-kill");
    let brokers = broker.brokers();
    let env = vec![("WEIR_BROKERS".to_owned(), brokers.clone())];
    let args = [
        "dlq", "replay", "--topic", &dlq, "--yes", "--id", "r2", "--rate", "4/s",
    ];
    let mut first = WeirProcess::spawn(dir.path(), "first", &args, &env);
    // Reads until at least four replayed records are there (or 3 s passed), then kills.
    eventually(
        "some of the replay to be published",
        Duration::from_secs(60),
        || {
            let brokers = brokers.clone();
            let topic = topic.clone();
            async move {
                let n = read_topic(
                    &brokers,
                    &topic,
                    4,
                    Duration::from_millis(100),
                    Duration::from_secs(3),
                )
                .await
                .len();
                if n >= 4 {
                    Ok(())
                } else {
                    Err(format!("{n} published"))
                }
            }
        },
    )
    .await;
    let status = first.kill_and_wait().await;
    assert!(!status.success());
    let before = records(&broker, &topic, 4).await.len();
    assert!(before < 30, "killed midway, not at the end ({before})");

    let (ok, out, err) = weir(&dir, "resume", &brokers, &args).await;
    assert!(ok, "{err}");
    assert!(out.contains("replay id r2"), "{out}");
    let replayed = sources(&records(&broker, &topic, 30).await, &dlq);
    assert_eq!(
        replayed,
        (0..30).collect::<Vec<_>>(),
        "each dead letter exactly once"
    );
}

#[tokio::test]
async fn replay_exits_non_zero_when_a_publish_fails() {
    let broker = Arc::new(Tansu::start_memory());
    let topic = unique("orders");
    let dlq = format!("{topic}.dlq");
    create(&broker, &[&topic, &dlq]);
    let bus = bus(&broker);
    dead_letters(&bus, &topic, &dlq, 2).await;
    // The destination does not exist (and Tansu does not create topics on demand).
    let missing = unique("nowhere");
    let dir = TestDir::new("weir-dlq-fail");
    let (ok, out, err) = weir(
        &dir,
        "fail",
        &broker.brokers(),
        &[
            "dlq",
            "replay",
            "--topic",
            &dlq,
            "--yes",
            "--to-topic",
            &missing,
        ],
    )
    .await;
    assert!(!ok, "a failed publish must fail the command: {out}");
    assert!(err.contains(&missing), "{err}");
    assert!(out.contains("replayed 0"), "{out}");
}
