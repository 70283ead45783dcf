//! Rebalancing between two `weir serve` replicas on a real broker (Tansu), with handlers slow
//! enough (2 s per record) that every partition always has records in flight when the second
//! replica joins.
//!
//! With the cooperative assignor (Weir's default) the first replica gives up only the
//! partitions that move, and drains them while the partitions it keeps go on: their committed
//! offsets must advance before the moved ones have drained. The same scenario with the eager
//! assignor revokes everything; both print how many records were handled in the seconds after
//! the revoke began (the figure in BENCHMARKS.md, "Rebalancing").

mod reference;
mod support;

use crate::reference::{CustomerCreated, CUSTOMER_TOPIC};
use serde_json::json;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::broker::{unique, Tansu};
use support::process::{
    wait_until, RecordFile, ServeOptions, TestDir, WeirProcess, FAST_GROUP_TOML,
};
use weir::{Envelope, KafkaBus, PublishExt};

const PARTITIONS: i32 = 4;
/// How long each customer record's handler takes (the reference handler's `slow` hook).
const SLOW: Duration = Duration::from_secs(2);
/// Keys cycled by the stream: each key's records run one at a time (key order), so a key takes
/// at most one record per [`SLOW`]; with this many keys the replicas keep up with the stream.
const KEYS: usize = 400;
/// Records published per second.
const RATE: usize = 100;
/// `WEIR_CONSUMER__MAX_IN_FLIGHT`: bounds the records a replica has fetched and not finished.
const MAX_IN_FLIGHT: usize = 512;
/// Records published this long after the revoke began are timed for the figure: from their
/// acknowledgement to their line in a record file (watched every 50 ms).
const WINDOW: Duration = Duration::from_secs(2);
/// How long after the revoke began the records published in [`WINDOW`] are watched for.
const WATCH: Duration = Duration::from_secs(10);
const PATIENCE: Duration = Duration::from_secs(120);

/// One acknowledged record of the stream.
#[derive(Clone, Debug)]
struct Sent {
    id: String,
    key: String,
    seq: usize,
    partition: i32,
    /// When the broker acknowledged it.
    at: Instant,
}

/// Publishes slow customer records at [`RATE`] until stopped.
struct Stream {
    sent: Arc<Mutex<Vec<Sent>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl Stream {
    fn start(bus: KafkaBus) -> Stream {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let task = {
            let (sent, stop) = (sent.clone(), stop.clone());
            tokio::spawn(async move {
                let chunk = RATE / 10;
                let mut tick = tokio::time::interval(Duration::from_millis(100));
                let mut seq = 0;
                while !stop.load(Ordering::SeqCst) {
                    tick.tick().await;
                    let batch = futures_util::future::join_all((seq..seq + chunk).map(|n| {
                        let key = format!("c-{}", n % KEYS);
                        let envelope = Envelope::new(CustomerCreated::new(
                            key.clone(),
                            json!({ "simulate": "slow", "ms": SLOW.as_millis() as u64, "seq": n }),
                        ));
                        let bus = &bus;
                        async move {
                            let delivery = bus.publish(&envelope).await.expect("publish");
                            Sent {
                                id: envelope.meta.id.to_string(),
                                key,
                                seq: n,
                                partition: delivery.partition,
                                at: Instant::now(),
                            }
                        }
                    }))
                    .await;
                    sent.lock().unwrap().extend(batch);
                    seq += chunk;
                }
            })
        };
        Stream { sent, stop, task }
    }

    async fn finish(self) -> Vec<Sent> {
        self.stop.store(true, Ordering::SeqCst);
        if let Err(e) = self.task.await {
            std::panic::resume_unwind(e.into_panic());
        }
        std::mem::take(&mut *self.sent.lock().unwrap())
    }
}

/// Fails at once (with its log) if `serve` exited, instead of waiting out a deadline.
fn assert_running(serve: &mut WeirProcess) {
    serve.assert_running();
}

/// The customer partitions named in a log line's partition list.
fn customer_partitions(line: &str) -> BTreeSet<i32> {
    (0..PARTITIONS)
        .filter(|p| line.contains(&format!("{CUSTOMER_TOPIC}\\\", {p})")))
        .collect()
}

/// The first log line of `serve` that contains every one of `needles`.
fn log_line(serve: &WeirProcess, needles: &[&str]) -> Option<String> {
    serve
        .stderr()
        .lines()
        .find(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
}

/// When each record was first seen handled, by id.
type Seen = HashMap<String, Instant>;

/// Watches both record files every 50 ms until `until`, noting when each record first shows.
async fn watch(
    until: Instant,
    seen: &mut Seen,
    replicas: &mut [(&mut WeirProcess, &mut RecordFile)],
) {
    while Instant::now() < until {
        for (serve, file) in replicas.iter_mut() {
            assert_running(serve);
            for line in file.refresh() {
                seen.entry(line.event_id.clone())
                    .or_insert_with(Instant::now);
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Median and longest time from acknowledgement to handling of the records published in
/// `from..from + WINDOW` on `partitions` (a record never seen counts as [`WATCH`]).
fn latency(sent: &[Sent], seen: &Seen, from: Instant, partitions: &BTreeSet<i32>) -> Latency {
    let mut all: Vec<Duration> = sent
        .iter()
        .filter(|s| s.at >= from && s.at < from + WINDOW && partitions.contains(&s.partition))
        .map(|s| {
            seen.get(&s.id)
                .map_or(WATCH, |t| t.saturating_duration_since(s.at))
        })
        .collect();
    all.sort();
    Latency {
        records: all.len(),
        median: all.get(all.len() / 2).copied().unwrap_or_default(),
        max: all.last().copied().unwrap_or_default(),
    }
}

/// Time from a record's acknowledgement to its handling, over some records.
#[derive(Debug, Clone, Copy)]
struct Latency {
    records: usize,
    median: Duration,
    max: Duration,
}

impl std::fmt::Display for Latency {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} records: median {:.2} s, max {:.2} s",
            self.records,
            self.median.as_secs_f64(),
            self.max.as_secs_f64()
        )
    }
}

/// What one scenario saw.
struct Rebalance {
    /// Customer partitions the first replica gave up, those it kept, and those the second took.
    moved: BTreeSet<i32>,
    taken: BTreeSet<i32>,
    kept: BTreeSet<i32>,
    /// Committed-offset samples taken while the moved partitions drained, in which every kept
    /// partition was past where it stood when the revoke began.
    advanced_while_draining: usize,
    samples_while_draining: usize,
    /// Records published in a [`WINDOW`] before the second replica started, of every partition.
    before: Latency,
    /// Records published in the [`WINDOW`] after the revoke began, of the partitions A kept and
    /// of those it gave up.
    after_kept: Latency,
    after_moved: Latency,
    /// How long the first replica's revoke drained, from its log.
    drained: String,
    /// Records handled twice, and of which partitions.
    duplicates: usize,
    duplicate_partitions: BTreeSet<i32>,
    records: usize,
}

/// Starts replica A, streams slow records, starts replica B, and watches A's revoke.
async fn rebalance(strategy: &str) -> Rebalance {
    let broker = Tansu::start_memory();
    // Only the customers topic (the one whose handler can be slow): the assignor balances the
    // count of partitions across all topics, so with the others present it may move
    // customer partitions only, or none.
    broker.create_topic(CUSTOMER_TOPIC, PARTITIONS);
    let dir = TestDir::new(&format!("weir-rebalance-{strategy}"));
    let group = unique(&format!("rebalance-{strategy}"));
    let mut file_a = RecordFile::new(&dir.join("a.jsonl"));
    let mut file_b = RecordFile::new(&dir.join("b.jsonl"));
    let options = |file: &RecordFile| {
        ServeOptions::new(&broker.brokers(), &group, file.path())
            .env("WEIR_CONSUMER__REVOKE_TIMEOUT", "2500ms")
            .env("WEIR_CONSUMER__COMMIT_INTERVAL", "10ms")
            .env("WEIR_CONSUMER__MAX_IN_FLIGHT", MAX_IN_FLIGHT.to_string())
            .config(&format!(
                "{FAST_GROUP_TOML}\"partition.assignment.strategy\" = \"{strategy}\"\n"
            ))
    };
    let mut a = WeirProcess::serve(dir.path(), "serve-a", &options(&file_a));
    // One record per produce request: Tansu 0.6 skips the rest of a batch when a fetch starts
    // inside it, which a consumer resuming from a committed offset does.
    let stream = Stream::start(support::orders::one_record_per_batch(&broker.brokers()));
    wait_until("replica A handling the stream", PATIENCE, || {
        assert_running(&mut a);
        match file_a.count() {
            n if n >= 2 * RATE => Ok(()),
            n => Err(format!("{n} handled")),
        }
    })
    .await;
    // A steady state to compare with.
    let mut seen = Seen::new();
    let steady = Instant::now();
    watch(
        steady + WINDOW + SLOW * 2,
        &mut seen,
        &mut [(&mut a, &mut file_a)],
    )
    .await;

    let mut b = WeirProcess::serve(dir.path(), "serve-b", &options(&file_b));
    let revoke = loop {
        watch(
            Instant::now() + Duration::from_millis(50),
            &mut seen,
            &mut [(&mut a, &mut file_a), (&mut b, &mut file_b)],
        )
        .await;
        if let Some(line) = log_line(&a, &["Rebalance.", "revoke"]) {
            break line;
        }
        assert!(steady.elapsed() < PATIENCE, "A was never asked to revoke");
    };
    let began = Instant::now();
    let moved = customer_partitions(&revoke);
    let kept: BTreeSet<i32> = (0..PARTITIONS).filter(|p| !moved.contains(p)).collect();
    let brokers = broker.brokers();
    let committed = || support::kafka::committed_on(&brokers, &group, CUSTOMER_TOPIC);
    let at_revoke = committed().await;
    // Sample the committed offsets until A logs that the moved partitions have drained; a
    // sample counts as taken during the drain only if the log did not have that line yet
    // after it was taken.
    let (mut samples, mut advanced) = (0, 0);
    let drained = loop {
        watch(
            Instant::now() + Duration::from_millis(50),
            &mut seen,
            &mut [(&mut a, &mut file_a), (&mut b, &mut file_b)],
        )
        .await;
        let now = committed().await;
        if let Some(line) = log_line(&a, &["Revoked partitions drained"]) {
            break line;
        }
        samples += 1;
        if kept
            .iter()
            .all(|p| now.get(p).copied().unwrap_or(-1) > at_revoke.get(p).copied().unwrap_or(-1))
        {
            advanced += 1;
        }
        assert!(began.elapsed() < PATIENCE, "A never finished draining");
    };
    let drained = drained
        .split("\"took\":")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .unwrap_or("?")
        .trim_matches('"')
        .to_owned();
    watch(
        began + WATCH,
        &mut seen,
        &mut [(&mut a, &mut file_a), (&mut b, &mut file_b)],
    )
    .await;
    let (before, after_kept, after_moved) = {
        let sent = stream.sent.lock().unwrap();
        let all: BTreeSet<i32> = (0..PARTITIONS).collect();
        (
            latency(&sent, &seen, steady, &all),
            latency(&sent, &seen, began, &kept),
            latency(&sent, &seen, began, &moved),
        )
    };

    // B takes its half over (with the eager protocol A gave up everything and gets half
    // back); then everything published is handled.
    let taken = wait_until("replica B handling its partitions", PATIENCE, || {
        assert_running(&mut a);
        assert_running(&mut b);
        let took: BTreeSet<i32> = file_b.refresh().iter().map(|l| l.partition).collect();
        if took.len() == PARTITIONS as usize / 2 {
            Ok(took)
        } else {
            Err(format!("B has {took:?}; A gave up {moved:?}"))
        }
    })
    .await;
    let sent = stream.finish().await;
    wait_until("every record handled", PATIENCE, || {
        assert_running(&mut a);
        assert_running(&mut b);
        let mut ids = file_a.ids();
        ids.extend(file_b.ids());
        let missing = sent.iter().filter(|s| !ids.contains(&s.id)).count();
        if missing == 0 {
            Ok(())
        } else {
            Err(format!("{missing} of {} not handled", sent.len()))
        }
    })
    .await;

    // Key order, within each replica: a key's records were handled in the order published.
    let by_id: HashMap<&str, &Sent> = sent.iter().map(|s| (s.id.as_str(), s)).collect();
    for file in [&mut file_a, &mut file_b] {
        let mut last: HashMap<&str, usize> = HashMap::new();
        for line in file.refresh() {
            let Some(s) = by_id.get(line.event_id.as_str()) else {
                panic!("handled a record nobody published: {line:?}");
            };
            if let Some(before) = last.insert(s.key.as_str(), s.seq) {
                assert!(
                    before < s.seq,
                    "key {} handled seq {} after seq {before}",
                    s.key,
                    s.seq
                );
            }
        }
    }
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for line in file_a.lines().iter().chain(file_b.lines()) {
        *counts
            .entry(by_id[line.event_id.as_str()].id.as_str())
            .or_default() += 1;
    }
    let twice: Vec<&Sent> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(id, _)| by_id[id])
        .collect();
    for mut serve in [a, b] {
        serve.sigterm();
        let status = serve.wait_exit(Duration::from_secs(15)).await;
        assert!(
            status.is_some_and(|s| s.success()),
            "{} exited {status:?}",
            serve.name()
        );
    }
    Rebalance {
        moved,
        taken,
        kept,
        advanced_while_draining: advanced,
        samples_while_draining: samples,
        before,
        after_kept,
        after_moved,
        drained,
        duplicates: twice.len(),
        duplicate_partitions: twice.iter().map(|s| s.partition).collect(),
        records: sent.len(),
    }
}

fn report(strategy: &str, r: &Rebalance) {
    println!(
        "rebalance figure ({strategy}): {} records at {RATE}/s, handlers {SLOW:?} each; A gave up \
         customer partitions {:?}, kept {:?}; drain took {}; kept partitions advanced in {} of {} \
         committed-offset samples during the drain; published to handled, before the second \
         replica: {}; in the {WINDOW:?} after the revoke began, on the kept partitions: {}, on \
         the moved ones: {}; {} handled twice (partitions {:?})",
        r.records,
        r.moved,
        r.kept,
        r.drained,
        r.advanced_while_draining,
        r.samples_while_draining,
        r.before,
        r.after_kept,
        r.after_moved,
        r.duplicates,
        r.duplicate_partitions,
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_cooperative_assignor_the_partitions_that_stay_keep_committing_while_the_moved_ones_drain(
) {
    let r = rebalance("cooperative-sticky").await;
    report("cooperative-sticky", &r);
    assert!(
        !r.moved.is_empty() && !r.kept.is_empty(),
        "A gave up some customer partitions and kept others: moved {:?}, kept {:?}",
        r.moved,
        r.kept
    );
    assert_eq!(r.taken, r.moved, "B took exactly what A gave up");
    assert!(
        r.advanced_while_draining > 0,
        "the kept partitions' committed offsets never advanced while the moved ones drained \
         ({} samples)",
        r.samples_while_draining
    );
    assert!(
        r.duplicate_partitions.is_subset(&r.moved),
        "records of partitions that stayed were handled twice: {:?}",
        r.duplicate_partitions
    );
    assert!(
        r.duplicates <= MAX_IN_FLIGHT,
        "{} records handled twice, more than A could have had in flight",
        r.duplicates
    );
}

/// The eager assignor for comparison: every partition is revoked and drains; nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_eager_assignor_every_partition_drains_and_nothing_is_lost() {
    let r = rebalance("range").await;
    report("range (eager)", &r);
    assert_eq!(
        r.kept,
        BTreeSet::new(),
        "the eager protocol revokes everything"
    );
    assert!(
        r.duplicates <= MAX_IN_FLIGHT,
        "{} records handled twice, more than A could have had in flight",
        r.duplicates
    );
}
