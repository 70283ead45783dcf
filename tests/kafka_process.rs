//! The `weir` binary against a real Kafka-compatible broker (Tansu), as an operator runs it:
//! crashes (SIGKILL), graceful stops (SIGTERM), dead letters, a rebalance between two replicas,
//! a broker restart, an unreachable broker, a CloudEvent from another client, and the demo.
//!
//! Each test starts its own broker (the reference service consumes the fixed topics
//! `task-events`, `customer-events` and `resource-events`) and creates the topics with four
//! partitions before `weir serve` starts. The service appends one JSON line per handled event to
//! its record file; the tests compare those lines with the event ids they published. Expected
//! sets come from what publishing returned, never from the broker's watermarks (Tansu 0.6
//! reports wrong ones). Every wait polls with a deadline; nothing sleeps and hopes.

mod reference;
mod support;

use crate::reference::{
    CustomerCreated, CustomerUpdated, ResourceCreated, TaskCreated, TaskFields, TriggeredBy,
    CUSTOMER_TOPIC, RESOURCE_TOPIC, TASK_TOPIC,
};
use futures_util::future::{join_all, BoxFuture, FutureExt};
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::broker::{unique, Tansu};
use support::kafka::committed_offsets;
use support::process::{
    eventually, http_get, wait_until, Handled, RecordFile, ServeOptions, TestDir, WeirProcess,
    FAST_GROUP_TOML,
};
use uuid::Uuid;
use weir::dead_letter_headers as dlh;
use weir::{Envelope, Headers, KafkaBus, KafkaConfig, OutboundRecord, PublishExt, Publisher};

/// The reference service's topics.
const TOPICS: [&str; 3] = [TASK_TOPIC, CUSTOMER_TOPIC, RESOURCE_TOPIC];
const PARTITIONS: i32 = 4;
/// `WEIR_CONSUMER__DRAIN_TIMEOUT` of every `weir serve` here.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a stopping `weir serve` may take: the drain timeout plus closing the consumer.
const GRACE: Duration = Duration::from_secs(15);
/// Overall deadline for a published stream to be handled.
const PATIENCE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A broker with the reference service's topics (and `extra` ones), four partitions each.
fn broker_with_topics(broker: Tansu, extra: &[&str]) -> Tansu {
    for topic in TOPICS.iter().chain(extra) {
        broker.create_topic(topic, PARTITIONS);
    }
    broker
}

/// `weir serve` settings shared by the tests: [`FAST_GROUP_TOML`], a 2 s drain, a 2 s revoke timeout
/// below the rebalance timeout, and frequent commits (so the window of handled-but-uncommitted
/// records a crash replays stays small).
fn serve_options(broker: &Tansu, group: &str, record_file: &std::path::Path) -> ServeOptions {
    ServeOptions::new(&broker.brokers(), group, record_file)
        .env(
            "WEIR_CONSUMER__DRAIN_TIMEOUT",
            format!("{}s", DRAIN_TIMEOUT.as_secs()),
        )
        .env("WEIR_CONSUMER__REVOKE_TIMEOUT", "2s")
        .env("WEIR_CONSUMER__COMMIT_INTERVAL", "10ms")
        .config(FAST_GROUP_TOML)
}

/// A bus for the test's own publishing.
///
/// One record per batch: Tansu 0.6 answers a fetch that starts inside a record batch with the
/// *next* batch, so a consumer resuming mid-batch (from a committed offset after a restart or a
/// rebalance, or after pausing a partition) never sees the rest of that batch. Real Kafka
/// returns the whole batch and the client skips to the offset. With single-record batches every
/// offset starts a batch, and the tests see Weir's behaviour rather than that broker bug.
fn bus(brokers: &str) -> KafkaBus {
    support::orders::one_record_per_batch(brokers)
}

/// The seed for the random kill points: `WEIR_TEST_SEED`, else random (printed, to reproduce).
fn seed() -> u64 {
    std::env::var("WEIR_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| fastrand::u64(..))
}

/// One acknowledged event.
#[derive(Clone, Debug)]
struct Sent {
    id: String,
    topic: String,
    partition: i32,
    offset: i64,
}

/// Publishes the `n`th event of a stream: customers, tasks and resources in turn, each with a
/// key of its own.
fn publish_nth(bus: &KafkaBus, n: usize) -> BoxFuture<'_, Sent> {
    fn sent(id: Uuid, result: Result<weir::Delivery, weir::PublishError>) -> Sent {
        let delivery = result.unwrap_or_else(|e| panic!("publishing event {id} failed: {e}"));
        Sent {
            id: id.to_string(),
            topic: delivery.topic,
            partition: delivery.partition,
            offset: delivery.offset,
        }
    }
    match n % 3 {
        0 => {
            let envelope = Envelope::new(CustomerCreated::new(format!("c-{n}"), json!({"n": n})));
            async move { sent(envelope.meta.id, bus.publish(&envelope).await) }.boxed()
        }
        1 => {
            let envelope = Envelope::new(TaskCreated::new(TaskFields::new(
                Uuid::new_v4(),
                "tenant-1",
                "production",
                format!("file:///data/{n}.csv"),
                "orders",
                TriggeredBy::Api,
            )));
            async move { sent(envelope.meta.id, bus.publish(&envelope).await) }.boxed()
        }
        _ => {
            let envelope = Envelope::new(ResourceCreated::new(
                Uuid::new_v4(),
                format!("r/{n}.png"),
                "image/png",
                format!("{n}.png"),
            ));
            async move { sent(envelope.meta.id, bus.publish(&envelope).await) }.boxed()
        }
    }
}

/// Publishes events `first..first + count` concurrently, `chunk` at a time.
async fn publish_range(bus: &KafkaBus, first: usize, count: usize, chunk: usize) -> Vec<Sent> {
    let mut sent = Vec::with_capacity(count);
    let mut n = first;
    while n < first + count {
        let end = (n + chunk).min(first + count);
        sent.extend(join_all((n..end).map(|i| publish_nth(bus, i))).await);
        n = end;
    }
    sent
}

/// A stream published in the background, chunk by chunk, until `total` events or `stop`.
struct Stream {
    sent: Arc<Mutex<Vec<Sent>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream {
    fn start(bus: KafkaBus, total: Option<usize>, chunk: usize, pause: Duration) -> Stream {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (sent, stop) = (sent.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) && total.is_none_or(|t| n < t) {
                    let count = total.map_or(chunk, |t| chunk.min(t - n));
                    let batch = publish_range(&bus, n, count, chunk).await;
                    sent.lock().unwrap().extend(batch);
                    n += count;
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                }
            })
        };
        Stream { sent, stop, task }
    }

    /// Acknowledged so far.
    fn published(&self) -> usize {
        self.sent.lock().unwrap().len()
    }

    /// Asks the publisher to stop after its current chunk.
    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    /// Waits for the publisher to end; every acknowledged event.
    async fn finish(self) -> Vec<Sent> {
        if let Err(e) = self.task.await {
            std::panic::resume_unwind(e.into_panic());
        }
        std::mem::take(&mut *self.sent.lock().unwrap())
    }
}

/// Fails at once (with its log) if `serve` exited, instead of waiting out a deadline.
/// Fails at once (with its log) if `serve` exited, instead of waiting out a deadline.
fn assert_running(serve: &mut WeirProcess) {
    serve.assert_running();
}

/// Waits until every id in `sent` is in the record file(s), failing early if a process died.
async fn wait_all_handled(
    what: &str,
    sent: &[Sent],
    files: &mut [&mut RecordFile],
    alive: &mut [&mut WeirProcess],
) {
    wait_until(what, PATIENCE, || {
        for serve in alive.iter_mut() {
            assert_running(serve);
        }
        let mut handled = HashSet::new();
        for file in files.iter_mut() {
            handled.extend(file.ids());
        }
        let missing: Vec<&Sent> = sent.iter().filter(|s| !handled.contains(&s.id)).collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "{} of {} events not handled yet, e.g. {:?}",
                missing.len(),
                sent.len(),
                &missing[..missing.len().min(3)]
            ))
        }
    })
    .await;
}

/// SIGTERM, then the exit status within [`GRACE`] and how long it took.
async fn terminate(serve: &mut WeirProcess) -> (std::process::ExitStatus, Duration) {
    serve.sigterm();
    let signalled = Instant::now();
    let status = serve.wait_exit(GRACE).await.unwrap_or_else(|| {
        panic!(
            "{} still running {GRACE:?} after SIGTERM (drain timeout {DRAIN_TIMEOUT:?})\n{}",
            serve.name(),
            serve.stderr_tail(8 * 1024)
        )
    });
    (status, signalled.elapsed())
}

/// Every handled line names the topic, partition and offset its event was published to.
fn assert_coordinates(lines: &[Handled], sent: &[Sent]) {
    let by_id: HashMap<&str, &Sent> = sent.iter().map(|s| (s.id.as_str(), s)).collect();
    for line in lines {
        let Some(s) = by_id.get(line.event_id.as_str()) else {
            continue; // assert_only_published reports strangers
        };
        assert_eq!(
            (line.topic.as_str(), line.partition, line.offset),
            (s.topic.as_str(), s.partition, s.offset),
            "event {} handled at other coordinates than it was published to",
            line.event_id
        );
    }
}

/// `GET /readyz` on the admin server: status and body (`(0, error)` if it does not answer).
fn readyz(admin: std::net::SocketAddr) -> (u16, String) {
    http_get(admin, "/readyz").unwrap_or_else(|e| (0, e.to_string()))
}

/// Duplicate handlings: lines minus distinct ids.
fn duplicates(counts: &HashMap<String, usize>) -> usize {
    counts.values().map(|c| c - 1).sum()
}

/// Every handled id must be one the test published.
fn assert_only_published(counts: &HashMap<String, usize>, sent: &[Sent]) {
    let published: HashSet<&str> = sent.iter().map(|s| s.id.as_str()).collect();
    let strangers: Vec<&String> = counts
        .keys()
        .filter(|id| !published.contains(id.as_str()))
        .collect();
    assert!(
        strangers.is_empty(),
        "handled ids that were never published: {strangers:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Crashes and stops
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_sigkill_without_losing_events() {
    const EVENTS: usize = 20_000;
    const KILLS: usize = 3;
    const MAX_IN_FLIGHT: usize = 256;
    // A crash replays what was handled and not yet committed. How much that is depends on how
    // fast the broker answers commits on a loaded machine (measured: ~550 per kill when commits
    // are answered on time, 1,025 once in CI), so the replay is reported, not bounded by a
    // guess at timing. What is asserted is the contract itself, read from the group's
    // committed offsets right after each kill: the next process replays nothing before them,
    // they never pass a record that was not handled, and each process moved them forward.
    let started = Instant::now();
    let broker = broker_with_topics(Tansu::start_memory(), &[]);
    let dir = TestDir::new("weir-sigkill");
    let mut records = RecordFile::new(&dir.join("handled.jsonl"));
    let group = unique("sigkill");
    let options = serve_options(&broker, &group, records.path())
        .env("WEIR_CONSUMER__MAX_IN_FLIGHT", MAX_IN_FLIGHT.to_string())
        .env("WEIR_CONSUMER__MAX_IN_FLIGHT_PER_PARTITION", "64");
    let mut serve = WeirProcess::serve(dir.path(), "serve-0", &options);
    let stream = Stream::start(bus(&broker.brokers()), Some(EVENTS), 500, Duration::ZERO);

    // Kill points: handled-line counts spread over the stream, each jittered by a quarter slot.
    let seed = seed();
    let mut rng = fastrand::Rng::with_seed(seed);
    let slot = EVENTS / (KILLS + 1);
    let points: Vec<usize> = (1..=KILLS)
        .map(|k| k * slot - slot / 4 + rng.usize(0..slot / 2))
        .collect();
    // Line count when each process died: the dead one appends nothing more and the next one
    // has not started, so these split the record file by process.
    let mut boundaries = vec![0];
    let mut published_at_kill = Vec::new();
    // The group's committed offsets right after each kill. A commit the dead process sent just
    // before it died may still land after this read, so the new process starts at or after
    // these: every assertion below holds for anything at or after them.
    let mut committed_at_kill: Vec<HashMap<(String, i32), i64>> = Vec::new();
    for (k, &point) in points.iter().enumerate() {
        wait_until(
            &format!("{point} handled lines before kill {}", k + 1),
            PATIENCE,
            || {
                assert_running(&mut serve);
                let lines = records.count();
                if lines >= point {
                    Ok(())
                } else {
                    Err(format!("{lines} lines, {} published", stream.published()))
                }
            },
        )
        .await;
        // The process must have committed before it dies: one killed inside its first commit
        // interval (replaying the previous crash's backlog can reach the next kill point within
        // a second) commits nothing, by design. A process that never commits fails here.
        let previous = committed_at_kill
            .last()
            .map_or(0, |c: &HashMap<(String, i32), i64>| c.values().sum::<i64>());
        eventually(
            &format!("serve-{k} to commit past {previous} before kill {}", k + 1),
            PATIENCE,
            || {
                let brokers = broker.brokers();
                let group = group.clone();
                async move {
                    let now: i64 = committed_offsets(&brokers, &group, &TOPICS)
                        .await
                        .values()
                        .sum();
                    if now > previous {
                        Ok(())
                    } else {
                        Err(format!("committed {now}"))
                    }
                }
            },
        )
        .await;
        serve.kill_and_wait().await;
        boundaries.push(records.count());
        published_at_kill.push(stream.published());
        committed_at_kill.push(committed_offsets(&broker.brokers(), &group, &TOPICS).await);
        serve = WeirProcess::serve(dir.path(), &format!("serve-{}", k + 1), &options);
    }

    let sent = stream.finish().await;
    assert_eq!(sent.len(), EVENTS);
    let published_after = started.elapsed();
    wait_all_handled(
        "every published event in the record file",
        &sent,
        &mut [&mut records],
        &mut [&mut serve],
    )
    .await;
    let counts = records.counts();
    assert_only_published(&counts, &sent);
    assert_coordinates(records.lines(), &sent);
    assert!(records.garbled.is_empty(), "{:?}", records.garbled);

    // Duplicates per kill: lines of the process started after it whose event an earlier
    // process had handled. Each kill's committed offsets are checked against the same split:
    // the next process replays nothing below them, they never pass a record no earlier process
    // had handled, and each killed process moved them forward.
    boundaries.push(records.lines().len());
    let lines = records.lines();
    let total = |c: &HashMap<(String, i32), i64>| c.values().sum::<i64>();
    let mut seen: HashSet<&str> = HashSet::new();
    let mut per_kill = Vec::new();
    for (run, bounds) in boundaries.windows(2).enumerate() {
        let here = &lines[bounds[0]..bounds[1]];
        if let Some(k) = run.checked_sub(1) {
            let committed = &committed_at_kill[k];
            let position = |topic: &str, partition: i32| {
                committed
                    .get(&(topic.to_string(), partition))
                    .copied()
                    .unwrap_or(0)
            };
            let replayed: Vec<&Handled> = here
                .iter()
                .filter(|l| seen.contains(l.event_id.as_str()))
                .collect();
            let replayed_below: Vec<&&Handled> = replayed
                .iter()
                .filter(|l| l.offset < position(&l.topic, l.partition))
                .collect();
            assert!(
                replayed_below.is_empty(),
                "seed {seed}: after kill {run}, the next process handled again records below \
                 the committed offsets {committed:?}: {replayed_below:?}"
            );
            let unhandled: Vec<&Sent> = sent
                .iter()
                .filter(|s| s.offset < position(&s.topic, s.partition))
                .filter(|s| !seen.contains(s.id.as_str()))
                .collect();
            assert!(
                unhandled.is_empty(),
                "seed {seed}: at kill {run}, committed offsets {committed:?} pass records no \
                 process had handled: {unhandled:?}"
            );
            let previous = k.checked_sub(1).map_or(0, |p| total(&committed_at_kill[p]));
            assert!(
                total(committed) > previous,
                "seed {seed}: the process killed at kill {run} committed nothing: {committed:?}"
            );
            per_kill.push(replayed.len());
        }
        seen.extend(here.iter().map(|l| l.event_id.as_str()));
    }
    let duplicates = duplicates(&counts);
    println!(
        "sigkill: seed {seed}; {EVENTS} events; {KILLS} SIGKILLs after {:?} lines ({published_at_kill:?} \
         published); {} lines, {duplicates} duplicates ({per_kill:?} per kill, max_in_flight \
         {MAX_IN_FLIGHT}); published after {published_after:?}, all handled after {:?}",
        &boundaries[1..=KILLS],
        lines.len(),
        started.elapsed()
    );
    assert_eq!(per_kill.iter().sum::<usize>(), duplicates);
    let (status, _) = terminate(&mut serve).await;
    assert!(status.success(), "{status}\n{}", serve.stderr_tail(4096));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drains_commits_and_exits_zero() {
    const EVENTS: usize = 10_000;
    let started = Instant::now();
    let broker = broker_with_topics(Tansu::start_memory(), &[]);
    let dir = TestDir::new("weir-sigterm");
    let mut records = RecordFile::new(&dir.join("handled.jsonl"));
    let options = serve_options(&broker, &unique("sigterm"), records.path());
    let mut serve = WeirProcess::serve(dir.path(), "serve-0", &options);
    let stream = Stream::start(bus(&broker.brokers()), Some(EVENTS), 500, Duration::ZERO);

    let at_term = wait_until("1000 handled lines", PATIENCE, || {
        assert_running(&mut serve);
        let lines = records.count();
        if lines >= 1000 {
            Ok((lines, stream.published()))
        } else {
            Err(format!("{lines} lines"))
        }
    })
    .await;
    let (status, took) = terminate(&mut serve).await;
    let stderr = serve.stderr();
    assert!(
        status.success(),
        "exit status {status} after SIGTERM\n{}",
        serve.stderr_tail(8 * 1024)
    );
    assert!(
        stderr.contains("Shutdown requested") && stderr.contains("Stopped."),
        "no drain in the log\n{}",
        serve.stderr_tail(8 * 1024)
    );
    let after_first = records.count();

    let mut serve = WeirProcess::serve(dir.path(), "serve-1", &options);
    let sent = stream.finish().await;
    wait_all_handled(
        "every event handled after the restart",
        &sent,
        &mut [&mut records],
        &mut [&mut serve],
    )
    .await;
    let counts = records.counts();
    assert_only_published(&counts, &sent);
    assert_coordinates(records.lines(), &sent);
    println!(
        "sigterm: SIGTERM at {} lines ({} published), exit {status} after {took:?}; first run \
         handled {after_first}; total {} lines for {EVENTS} events in {:?}",
        at_term.0,
        at_term.1,
        records.lines().len(),
        started.elapsed()
    );
    let mut twice: Vec<_> = records
        .lines()
        .iter()
        .filter(|l| counts[&l.event_id] > 1)
        .collect();
    twice.sort_by(|a, b| a.event_id.cmp(&b.event_id));
    assert!(
        twice.is_empty(),
        "{} events handled twice after a graceful stop, e.g. {:?}",
        duplicates(&counts),
        &twice[..twice.len().min(6)]
    );
    let (status, _) = terminate(&mut serve).await;
    assert!(status.success(), "{status}");
}

// ---------------------------------------------------------------------------------------------
// Dead letters
// ---------------------------------------------------------------------------------------------

/// A record that cannot be decoded, and the dead-letter reason it must get.
struct Poison {
    key: Vec<u8>,
    value: Option<Vec<u8>>,
    reason: &'static str,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dead_letters_poison_with_original_bytes_and_continues() {
    let dlq = format!("{CUSTOMER_TOPIC}.dlq");
    let broker = broker_with_topics(Tansu::start_memory(), &[&dlq]);
    let dir = TestDir::new("weir-dlq");
    let mut records = RecordFile::new(&dir.join("handled.jsonl"));
    let group = unique("dlq");
    let mut serve = WeirProcess::serve(
        dir.path(),
        "serve",
        &serve_options(&broker, &group, records.path()),
    );
    let bus = bus(&broker.brokers());

    let missing_customer_id = json!({
        "specversion": "1.0", "id": Uuid::new_v4().to_string(), "type": "customer.created",
        "source": "/test", "data": {"details": {}}
    });
    let poisons = [
        Poison {
            key: b"poison-json".to_vec(),
            value: Some(b"{\"specversion\": \"1.0\", this is not JSON".to_vec()),
            reason: "not_json",
        },
        Poison {
            key: vec![0xff, 0x00, 0xfe, b'k'],
            value: Some(vec![b'{', 0xff, 0xfe, 0x00, 0x01, b'}']),
            reason: "invalid_utf8",
        },
        Poison {
            key: b"poison-null".to_vec(),
            value: None,
            reason: "empty",
        },
        Poison {
            key: b"poison-field".to_vec(),
            value: Some(serde_json::to_vec(&missing_customer_id).unwrap()),
            reason: "missing_field",
        },
    ];

    // good, poison, then a good one with the poison's key (same partition, same key lane): bad
    // input must block neither its partition nor its key.
    let mut good = Vec::new();
    let mut bad = Vec::new();
    let publish_good = |key: String| {
        let bus = &bus;
        async move {
            let envelope = Envelope::new(CustomerUpdated::new(key, json!({"ok": true})));
            let delivery = bus
                .publish(&envelope)
                .await
                .expect("publishing a good event");
            Sent {
                id: envelope.meta.id.to_string(),
                topic: delivery.topic,
                partition: delivery.partition,
                offset: delivery.offset,
            }
        }
    };
    for (i, poison) in poisons.iter().enumerate() {
        good.push(publish_good(format!("good-{i}")).await);
        let delivery = bus
            .publish_record(OutboundRecord {
                topic: CUSTOMER_TOPIC.to_owned(),
                key: Some(poison.key.clone()),
                value: poison.value.clone(),
                headers: Headers::new()
                    .with("x-test-case", i.to_string())
                    .with("x-binary", vec![0u8, 0xff]),
            })
            .await
            .expect("publishing a malformed record");
        bad.push(delivery);
        let after = String::from_utf8(poison.key.clone()).unwrap_or_else(|_| format!("after-{i}"));
        good.push(publish_good(after).await);
    }

    wait_all_handled(
        "the good records around the poison ones",
        &good,
        &mut [&mut records],
        &mut [&mut serve],
    )
    .await;

    // Read the dead-letter topic with a plain rdkafka consumer.
    let expected = poisons.len();
    let quiet = Duration::from_millis(500);
    type DeadLetter = (Option<Vec<u8>>, Option<Vec<u8>>, Vec<(String, Vec<u8>)>);
    let dead_letters: Vec<DeadLetter> =
        support::kafka::read_topic(&broker.brokers(), &dlq, expected, quiet, PATIENCE)
            .await
            .into_iter()
            .map(|r| {
                let headers = r
                    .headers
                    .iter()
                    .map(|(k, v)| (k.to_owned(), v.to_vec()))
                    .collect();
                (r.key, r.value, headers)
            })
            .collect();
    assert_eq!(
        dead_letters.len(),
        expected,
        "dead letters found on {dlq} within {PATIENCE:?}\n{}",
        serve.stderr_tail(8 * 1024)
    );

    let header = |headers: &[(String, Vec<u8>)], name: &str| -> Option<String> {
        headers
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    };
    for (i, (poison, delivery)) in poisons.iter().zip(&bad).enumerate() {
        let (key, value, headers) = dead_letters
            .iter()
            .find(|(_, _, h)| {
                header(h, dlh::ORIGINAL_PARTITION) == Some(delivery.partition.to_string())
                    && header(h, dlh::ORIGINAL_OFFSET) == Some(delivery.offset.to_string())
            })
            .unwrap_or_else(|| {
                panic!(
                    "no dead letter for {CUSTOMER_TOPIC}/{}@{} ({}); got {:?}",
                    delivery.partition,
                    delivery.offset,
                    poison.reason,
                    dead_letters.iter().map(|d| &d.2).collect::<Vec<_>>()
                )
            });
        let get = |name: &str| header(headers, name);
        assert_eq!(key.as_deref(), Some(poison.key.as_slice()), "key bytes");
        assert_eq!(value, &poison.value, "value bytes ({})", poison.reason);
        assert_eq!(get(dlh::ORIGINAL_TOPIC).as_deref(), Some(CUSTOMER_TOPIC));
        assert_eq!(get(dlh::CONSUMER_GROUP), Some(group.clone()));
        assert_eq!(get(dlh::ERROR_KIND).as_deref(), Some("decode"));
        assert_eq!(get(dlh::ERROR_REASON).as_deref(), Some(poison.reason));
        let message = get(dlh::ERROR_MESSAGE).unwrap_or_default();
        assert!(!message.is_empty(), "empty {}", dlh::ERROR_MESSAGE);
        assert_eq!(get(dlh::ATTEMPTS).as_deref(), Some("0"));
        assert_eq!(get(dlh::HANDLER).as_deref(), Some(""));
        let timestamp = get(dlh::ORIGINAL_TIMESTAMP).unwrap_or_default();
        assert!(
            timestamp.parse::<i64>().is_ok_and(|t| t > 0),
            "{}: {timestamp:?}",
            dlh::ORIGINAL_TIMESTAMP
        );
        let original: Vec<&(String, Vec<u8>)> = headers
            .iter()
            .filter(|(k, _)| k.starts_with("x-"))
            .collect();
        assert_eq!(
            original,
            [
                &("x-test-case".to_owned(), i.to_string().into_bytes()),
                &("x-binary".to_owned(), vec![0u8, 0xff]),
            ],
            "original headers kept"
        );
        println!(
            "dead letter: reason {} message {message:?} from {}/{}",
            poison.reason, delivery.partition, delivery.offset
        );
    }
    assert!(serve.is_running());
}

/// The reference service's test hooks (`details.simulate`) are off unless
/// `service.test_hooks` turns them on: otherwise whoever can publish to `customer-events` could
/// make a production replica panic, hang or dead-letter at will. With the default settings an
/// event asking for any hook is an ordinary event: recorded once, on its first attempt, nothing
/// retried or dead-lettered.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulate_in_a_payload_is_plain_data_without_test_hooks() {
    let dlq = format!("{CUSTOMER_TOPIC}.dlq");
    let broker = broker_with_topics(Tansu::start_memory(), &[&dlq]);
    let dir = TestDir::new("weir-no-hooks");
    let mut records = RecordFile::new(&dir.join("handled.jsonl"));
    let options = serve_options(&broker, &unique("no-hooks"), records.path())
        .without("WEIR_SERVICE__TEST_HOOKS");
    let mut serve = WeirProcess::serve(dir.path(), "serve", &options);
    let admin = wait_until("the admin address", PATIENCE, || {
        assert_running(&mut serve);
        serve
            .admin_addr()
            .ok_or_else(|| "not logged yet".to_owned())
    })
    .await;

    let bus = bus(&broker.brokers());
    let until = chrono::Utc::now() + chrono::Duration::hours(1);
    let mut sent = Vec::new();
    for hook in ["panic", "permanent", "transient", "hang", "slow", "outage"] {
        let details = json!({"simulate": hook, "ms": 600_000, "until": until.to_rfc3339()});
        let envelope = Envelope::new(CustomerCreated::new(format!("hook-{hook}"), details));
        let delivery = bus.publish(&envelope).await.expect("publish");
        sent.push(Sent {
            id: envelope.meta.id.to_string(),
            topic: delivery.topic,
            partition: delivery.partition,
            offset: delivery.offset,
        });
    }

    // Done when every event is recorded; a retry or a dead letter fails at once (with the
    // hooks obeyed, `panic` and `permanent` dead-letter within a second).
    let metric = |name: &str, labels: &[(&str, &str)]| {
        let (_, body) = http_get(admin, "/metrics").expect("GET /metrics");
        support::process::metric_sum(&body, name, labels)
    };
    wait_until("every hook event recorded", PATIENCE, || {
        assert_running(&mut serve);
        let dead = metric("weir_dead_letters_total", &[]);
        let retried = metric("weir_messages_handled_total", &[("outcome", "retried")]);
        assert!(
            dead == 0.0 && retried == 0.0,
            "{dead} dead-lettered, {retried} retried: the hooks were obeyed\n{}",
            serve.stderr_tail(4 * 1024)
        );
        let handled: HashSet<String> = records.ids();
        match sent.iter().filter(|s| !handled.contains(&s.id)).count() {
            0 => Ok(()),
            n => Err(format!("{n} of {} not recorded yet", sent.len())),
        }
    })
    .await;

    let lines = records.refresh().to_vec();
    assert_eq!(lines.len(), sent.len(), "each recorded once: {lines:?}");
    assert!(lines.iter().all(|l| l.attempt == 1), "{lines:?}");
    assert_coordinates(&lines, &sent);
    assert_eq!(metric("weir_dead_letters_total", &[]), 0.0);
    assert!(
        !serve.stderr().contains("test hooks are on"),
        "warned about test hooks that are off"
    );
    assert!(serve.is_running());
}

// ---------------------------------------------------------------------------------------------
// Group and broker
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebalance_moves_partitions_without_loss() {
    let started = Instant::now();
    let broker = broker_with_topics(Tansu::start_memory(), &[]);
    let dir = TestDir::new("weir-rebalance");
    let group = unique("rebalance");
    let mut file_a = RecordFile::new(&dir.join("a.jsonl"));
    let mut file_b = RecordFile::new(&dir.join("b.jsonl"));
    // librdkafka's group-protocol debug log, so a failure shows what the group did.
    let options = |file: &RecordFile| {
        serve_options(&broker, &group, file.path())
            .config(&format!("{FAST_GROUP_TOML}\"debug\" = \"cgrp\"\n"))
            .env("RUST_LOG", "info,librdkafka=debug")
    };
    let mut a = WeirProcess::serve(dir.path(), "serve-a", &options(&file_a));
    let mut b = WeirProcess::serve(dir.path(), "serve-b", &options(&file_b));
    let stream = Stream::start(bus(&broker.brokers()), None, 100, Duration::from_millis(20));

    // Both members have partitions once both have handled events.
    wait_until("both replicas handling events", PATIENCE, || {
        assert_running(&mut a);
        assert_running(&mut b);
        let (na, nb) = (file_a.count(), file_b.count());
        if na >= 100 && nb >= 100 {
            Ok(())
        } else {
            Err(format!("a {na}, b {nb} lines"))
        }
    })
    .await;
    let (status, took) = terminate(&mut a).await;
    assert!(status.success(), "{status}\n{}", a.stderr_tail(8 * 1024));
    let at_stop = stream.published();

    // A's partitions and the highest offset A handled in each.
    let mut a_had: BTreeMap<(String, i32), i64> = BTreeMap::new();
    for line in file_a.refresh() {
        let top = a_had
            .entry((line.topic.clone(), line.partition))
            .or_insert(line.offset);
        *top = (*top).max(line.offset);
    }
    let taken_over = |b: &[Handled]| -> BTreeMap<(String, i32), usize> {
        let mut moved = BTreeMap::new();
        for line in b {
            if a_had
                .get(&(line.topic.clone(), line.partition))
                .is_some_and(|top| line.offset > *top)
            {
                *moved
                    .entry((line.topic.clone(), line.partition))
                    .or_insert(0) += 1;
            }
        }
        moved
    };
    wait_until("the survivor handling A's partitions", PATIENCE, || {
        assert_running(&mut b);
        let moved = taken_over(file_b.refresh());
        if moved.len() == a_had.len() {
            Ok(())
        } else {
            Err(format!("A had {:?}; B took over {moved:?}", a_had.keys()))
        }
    })
    .await;
    stream.stop();
    let sent = stream.finish().await;
    wait_all_handled(
        "every event handled by one replica or the other",
        &sent,
        &mut [&mut file_a, &mut file_b],
        &mut [&mut b],
    )
    .await;

    let mut counts = file_a.counts();
    for (id, n) in file_b.counts() {
        *counts.entry(id).or_insert(0) += n;
    }
    assert_only_published(&counts, &sent);
    assert_coordinates(file_a.lines(), &sent);
    assert_coordinates(file_b.lines(), &sent);
    let moved = taken_over(file_b.lines());
    println!(
        "rebalance: {} events; A stopped (exit {status} after {took:?}) with {at_stop} published; \
         A handled {} in {:?}; B handled {} and took over {moved:?}; {} duplicates; {:?}",
        sent.len(),
        file_a.lines().len(),
        a_had.keys(),
        file_b.lines().len(),
        duplicates(&counts),
        started.elapsed()
    );
    assert_eq!(
        moved.keys().collect::<Vec<_>>(),
        a_had.keys().collect::<Vec<_>>(),
        "the survivor handled every partition A had"
    );
    let (status, _) = terminate(&mut b).await;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeps_running_across_a_broker_restart() {
    const EVENTS: usize = 2_000;
    const OUTAGE: Duration = Duration::from_secs(7);
    let started = Instant::now();
    let mut broker = broker_with_topics(Tansu::start_sqlite(), &[]);
    let dir = TestDir::new("weir-broker-restart");
    let mut records = RecordFile::new(&dir.join("handled.jsonl"));
    let mut serve = WeirProcess::serve(
        dir.path(),
        "serve",
        &serve_options(&broker, &unique("restart"), records.path()),
    );

    let mut sent = {
        let bus = bus(&broker.brokers());
        publish_range(&bus, 0, EVENTS, 500).await
    };
    wait_until(
        "some events handled before the broker stops",
        PATIENCE,
        || {
            assert_running(&mut serve);
            let lines = records.count();
            if lines >= EVENTS / 4 {
                Ok(())
            } else {
                Err(format!("{lines} lines"))
            }
        },
    )
    .await;
    let before_stop = records.count();
    let admin = serve
        .admin_addr()
        .expect("the Serving. line names the admin address");
    assert_eq!(readyz(admin).0, 200, "ready before the outage");
    let log_before = serve.stderr().len();
    broker.stop();
    let stopped = Instant::now();
    // The service notices: it logs the outage and turns not ready, and keeps running.
    let noticed = wait_until("weir serve logging the broker outage", PATIENCE, || {
        assert_running(&mut serve);
        let log = serve.stderr();
        let new = &log[log_before.min(log.len())..];
        new.lines()
            .find(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
            .map(str::to_owned)
            .ok_or_else(|| "no warning yet".to_owned())
    })
    .await;
    let not_ready = wait_until("/readyz to say the broker is down", PATIENCE, || {
        assert_running(&mut serve);
        match readyz(admin) {
            (503, body) if body.contains("\"broker_up\":false") => Ok(body),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    // Keep the broker away past the group's session timeout (6 s), checking all along that the
    // service stays up; this is the scenario's length, not something the test waits for.
    wait_until(
        "an outage longer than the session timeout",
        PATIENCE,
        || {
            assert_running(&mut serve);
            if stopped.elapsed() >= OUTAGE {
                Ok(())
            } else {
                Err(format!("{:?}", stopped.elapsed()))
            }
        },
    )
    .await;
    let down = stopped.elapsed();
    broker.restart();

    {
        let bus = bus(&broker.brokers());
        sent.extend(publish_range(&bus, EVENTS, EVENTS, 500).await);
    }
    wait_all_handled(
        "every event handled after the broker restart",
        &sent,
        &mut [&mut records],
        &mut [&mut serve],
    )
    .await;
    wait_until("/readyz to say ready again", PATIENCE, || {
        assert_running(&mut serve);
        match readyz(admin) {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    let counts = records.counts();
    assert_only_published(&counts, &sent);
    assert_coordinates(records.lines(), &sent);
    println!(
        "broker restart: {before_stop} handled before the stop, broker down {down:?} (/readyz \
         said {not_ready}), first warning: {noticed}; {} events, {} lines, {} duplicates, {:?}",
        sent.len(),
        records.lines().len(),
        duplicates(&counts),
        started.elapsed()
    );
    assert_running(&mut serve);
    let (status, _) = terminate(&mut serve).await;
    assert!(
        status.success(),
        "{status}\n{}",
        serve.stderr_tail(8 * 1024)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_while_the_broker_is_unreachable_at_start() {
    // A port nothing listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let brokers = format!("127.0.0.1:{port}");
    let dir = TestDir::new("weir-unreachable");
    let record_file = dir.join("handled.jsonl");
    let mut serve = WeirProcess::serve(
        dir.path(),
        "serve",
        &ServeOptions::new(&brokers, &unique("unreachable"), &record_file),
    );

    // librdkafka's connection errors reach the log through Weir's client context.
    let retrying = |line: &str| -> bool {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            return false;
        };
        let fields = &v["fields"];
        let text = |k: &str| fields[k].as_str().unwrap_or_default().to_owned();
        v["level"] == "WARN"
            && text("message").contains("retrying")
            && text("reason").contains(&brokers)
            && text("reason").contains("Connection refused")
    };
    let line = wait_until(
        "a log line saying the broker cannot be reached and Weir retries",
        Duration::from_secs(30),
        || {
            assert_running(&mut serve);
            serve
                .stderr()
                .lines()
                .find(|l| retrying(l))
                .map(str::to_owned)
                .ok_or_else(|| serve.stderr_tail(2048))
        },
    )
    .await;
    // Still there a few seconds in (it keeps retrying instead of giving up), and not ready.
    wait_until("3 s of uptime", Duration::from_secs(10), || {
        assert_running(&mut serve);
        if serve.uptime() >= Duration::from_secs(3) {
            Ok(())
        } else {
            Err(format!("{:?}", serve.uptime()))
        }
    })
    .await;
    let admin = serve
        .admin_addr()
        .expect("the Serving. line names the admin address");
    let (status, body) = readyz(admin);
    assert_eq!(status, 503, "/readyz without a broker: {body}");
    assert!(body.contains("\"broker_up\":false"), "{body}");
    let log = serve.stderr();
    let uptime = serve.uptime();
    let warnings = log
        .lines()
        .filter(|l| l.contains("\"level\":\"WARN\"") || l.contains("\"level\":\"ERROR\""))
        .count();
    println!(
        "unreachable: after {uptime:?}: /readyz {status} {body}; {warnings} warn/error lines \
         ({} retrying lines); first:\n{line}",
        log.lines().filter(|l| retrying(l)).count()
    );

    let publish_started = Instant::now();
    let mut publish = WeirProcess::spawn(
        dir.path(),
        "publish",
        &[
            "publish",
            "--brokers",
            &brokers,
            "--topic",
            CUSTOMER_TOPIC,
            "--type",
            "customer.created",
            "--key",
            "c-1",
            "--data",
            r#"{"customer_id": "c-1", "details": {}}"#,
            "--timeout",
            "3s",
        ],
        &[],
    );
    let status = publish
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("weir publish exits");
    let took = publish_started.elapsed();
    let stderr = publish.stderr();
    println!("unreachable: weir publish exited {status} after {took:?}:\n{stderr}");
    assert!(!status.success(), "weir publish succeeded without a broker");
    assert!(
        stderr.contains(&format!("publishing to {brokers} failed")),
        "the error names the brokers: {stderr}"
    );

    let (status, took) = terminate(&mut serve).await;
    println!("unreachable: weir serve exited {status} {took:?} after SIGTERM");
    assert!(status.success(), "{status}\n{}", serve.stderr_tail(4096));
}

// ---------------------------------------------------------------------------------------------
// Interop and demo
// ---------------------------------------------------------------------------------------------

/// Produces one structured-mode and one binary-mode CloudEvent with confluent-kafka.
const PYTHON_PRODUCER: &str = r#"
import datetime, json, sys
from confluent_kafka import Producer

brokers, topic, structured_id, binary_id = sys.argv[1:5]
now = datetime.datetime.now(datetime.timezone.utc).isoformat()
errors = []

def report(err, msg):
    if err is not None:
        errors.append(str(err))
    else:
        print(f"delivered {msg.topic()} {msg.partition()} {msg.offset()}")

producer = Producer({"bootstrap.servers": brokers})
structured = {
    "specversion": "1.0", "id": structured_id, "type": "customer.created",
    "source": "/python-producer", "time": now, "subject": "py-1",
    "datacontenttype": "application/json",
    "data": {"customer_id": "py-1", "details": {"name": "Grace"}},
}
producer.produce(topic, key=b"py-1", value=json.dumps(structured).encode(),
                 headers=[("content-type", b"application/cloudevents+json")], on_delivery=report)
producer.produce(topic, key=b"py-2",
                 value=json.dumps({"customer_id": "py-2", "details": {"plan": "pro"}}).encode(),
                 headers=[("ce_specversion", b"1.0"), ("ce_id", binary_id.encode()),
                          ("ce_type", b"customer.updated"), ("ce_source", b"/python-producer"),
                          ("ce_time", now.encode()), ("ce_subject", b"py-2"),
                          ("content-type", b"application/json")],
                 on_delivery=report)
left = producer.flush(30)
if left or errors:
    sys.exit(f"not delivered: {left} left, errors {errors}")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn foreign_cloudevent_is_handled() {
    let python = support::foreign::python();
    let broker = broker_with_topics(Tansu::start_memory(), &[]);
    let dir = TestDir::new("weir-interop");
    let mut records = RecordFile::new(&dir.join("handled.jsonl"));
    let mut serve = WeirProcess::serve(
        dir.path(),
        "serve",
        &serve_options(&broker, &unique("interop"), records.path()),
    );
    let structured_id = Uuid::new_v4().to_string();
    let binary_id = Uuid::new_v4().to_string();
    let output = tokio::process::Command::new(&python)
        .args(["-c", PYTHON_PRODUCER, &broker.brokers(), CUSTOMER_TOPIC])
        .args([&structured_id, &binary_id])
        .kill_on_drop(true)
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
    assert!(
        output.status.success(),
        "the Python producer failed ({}):\n{}{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

    let lines = wait_until("both foreign events handled", PATIENCE, || {
        assert_running(&mut serve);
        let lines = records.refresh();
        let find = |id: &str| lines.iter().find(|l| l.event_id == id).cloned();
        match (find(&structured_id), find(&binary_id)) {
            (Some(s), Some(b)) => Ok((s, b)),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    println!(
        "interop: {}\nstructured: {:?}\nbinary: {:?}",
        String::from_utf8_lossy(&output.stdout).trim(),
        lines.0,
        lines.1
    );
    let (structured, binary) = lines;
    assert_eq!(structured.event_type, "customer.created");
    assert_eq!(structured.handler, "record_customer_created");
    assert_eq!(structured.topic, CUSTOMER_TOPIC);
    assert_eq!(binary.event_type, "customer.updated");
    assert_eq!(binary.handler, "record_customer_updated");
    assert_eq!(binary.topic, CUSTOMER_TOPIC);
}

/// The number after `label` on the summary line that starts with it.
fn summary_number(output: &str, label: &str) -> u64 {
    output
        .lines()
        .map(str::trim_start)
        .find_map(|l| l.strip_prefix(label))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no `{label} <n>` line in the demo's output:\n{output}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_runs_without_a_broker() {
    let dir = TestDir::new("weir-demo");
    let started = Instant::now();
    let mut demo = WeirProcess::spawn(dir.path(), "demo", &["demo"], &[]);
    let status = demo
        .wait_exit(Duration::from_secs(90))
        .await
        .unwrap_or_else(|| panic!("weir demo still running after 90 s\n{}", demo.stderr()));
    let stdout = demo.stdout();
    println!(
        "demo: exit {status} after {:?}\n{stdout}",
        started.elapsed()
    );
    assert!(status.success(), "{status}\n{stdout}\n{}", demo.stderr());
    assert!(stdout.contains("Summary"), "{stdout}");
    assert_eq!(summary_number(&stdout, "handled"), 5);
    assert_eq!(summary_number(&stdout, "retried"), 1);
    assert_eq!(summary_number(&stdout, "dead-lettered"), 1);
    assert_eq!(summary_number(&stdout, "decode errors"), 1);
    assert_eq!(summary_number(&stdout, "dead letters sent"), 2);
}

/// A `/proc/<pid>/status` field in KiB (`VmRSS`: resident now; `VmHWM`: the peak so far).
fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// Flow control end to end: handlers stuck on a dead dependency while the backlog grows to many
/// times the memory the consumer may use. Weir stops taking records at its in-flight limit, the
/// poll thread stops behind the full hand-off, librdkafka stops prefetching at
/// `queued.max.messages.kbytes` and the poll thread within the prefetch budget
/// (`kafka.max_prefetch_bytes`), and after a while the consumer warns that the partition is held back: the
/// process's peak memory grows by a bounded amount, not by the backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_handler_keeps_memory_bounded_whatever_the_backlog() {
    const BACKLOG: usize = 10_000;
    const PAD: usize = 8 * 1024;
    const QUEUE_KIB: u64 = 4 * 1024;
    const PREFETCH_MIB: u64 = 8;
    let broker = broker_with_topics(Tansu::start_memory(), &[]);
    let dir = TestDir::new("weir-bounded");
    let mut records = RecordFile::new(&dir.join("handled.jsonl"));
    let options = serve_options(&broker, &unique("bounded"), records.path())
        .env("WEIR_CONSUMER__MAX_IN_FLIGHT", "4")
        .env("WEIR_CONSUMER__MAX_IN_FLIGHT_PER_PARTITION", "4")
        .env(
            "WEIR_KAFKA__CONSUMER__QUEUED.MAX.MESSAGES.KBYTES",
            QUEUE_KIB.to_string(),
        )
        // The whole consumer's prefetch budget: what it may hold of the backlog, whatever the
        // partition count. The default (64 MiB) is near this test's whole backlog.
        .env(
            "WEIR_KAFKA__MAX_PREFETCH_BYTES",
            (PREFETCH_MIB * 1024 * 1024).to_string(),
        );
    let mut serve = WeirProcess::serve(dir.path(), "serve-0", &options);
    let admin = wait_until("the admin address", PATIENCE, || {
        assert_running(&mut serve);
        serve
            .admin_addr()
            .ok_or_else(|| "not logged yet".to_owned())
    })
    .await;
    let metric = |name: &str| {
        let (_, body) = http_get(admin, "/metrics").expect("GET /metrics");
        support::process::metric_sum(&body, name, &[])
    };
    // Records never handled take no publishing order: batching is fine here (the Tansu
    // mid-batch fetch bug only bites a consumer that resumes inside a batch it handles).
    let publisher = KafkaBus::new(KafkaConfig::new(broker.brokers())).expect("publisher");
    for i in 0..4 {
        let hang = Envelope::new(CustomerCreated::new(
            format!("stuck-{i}"),
            json!({ "simulate": "hang" }),
        ));
        publisher.publish(&hang).await.expect("publish");
    }
    wait_until("four stuck handlers", PATIENCE, || {
        assert_running(&mut serve);
        match metric("weir_in_flight_messages") {
            n if n >= 4.0 => Ok(()),
            n => Err(format!("{n} in flight")),
        }
    })
    .await;
    let pid = serve.pid();
    let before = proc_status_kib(pid, "VmRSS");

    let pad = "x".repeat(PAD);
    let publisher = &publisher;
    for chunk in (0..BACKLOG).collect::<Vec<_>>().chunks(500) {
        join_all(chunk.iter().map(|i| {
            let e = Envelope::new(CustomerCreated::new(
                format!("c-{i}"),
                json!({ "n": i, "pad": pad }),
            ));
            async move { publisher.publish(&e).await.expect("publish") }
        }))
        .await;
    }
    // The lag gauge comes from the high watermarks of fetch responses (and, for a partition
    // held back for memory, which is not fetched, from the broker every 2 s): once it passes a
    // few queues' worth, the backlog the consumer must not hoard is there.
    wait_until("the lag gauge to show fetching", PATIENCE, || {
        assert_running(&mut serve);
        match metric("weir_consumer_lag") {
            n if n >= 1_000.0 => Ok(()),
            n => Err(format!("lag {n}")),
        }
    })
    .await;
    wait_until("the partition to be held back", PATIENCE, || {
        assert_running(&mut serve);
        serve
            .stderr()
            .contains("hand-off is full")
            .then_some(())
            .ok_or_else(|| "not held back yet".to_owned())
    })
    .await;

    let peak = proc_status_kib(pid, "VmHWM");
    let growth_mib = peak.saturating_sub(before) / 1024;
    let backlog_mib = (BACKLOG * PAD / (1024 * 1024)) as u64;
    eprintln!("RSS before the backlog {before} KiB; peak {peak} KiB; backlog {backlog_mib} MiB");
    assert!(
        growth_mib < backlog_mib / 2,
        "peak memory grew by {growth_mib} MiB with a {backlog_mib} MiB backlog: the prefetch \
         queue ({QUEUE_KIB} KiB), the budget ({PREFETCH_MIB} MiB) or the hand-off is not bounded"
    );
    assert_eq!(
        metric("weir_in_flight_messages"),
        4.0,
        "in flight stays at the limit"
    );
    assert_eq!(
        records.count(),
        0,
        "nothing past the stuck handlers was handled"
    );
    serve.kill_and_wait().await;
}
