//! The circuit breaker of `weir serve` against Tansu, as an operator would see it (issue 29): the
//! reference customers handler's downstream fails for 20 s while 5,000 records stream over about
//! 30 s. With `[routes.record_customer_created.breaker]` configured, the breaker opens, the route
//! pauses, half-open probes test the downstream until it is back, and then the backlog drains:
//!
//! - the dead-letter topic stays empty and every published record is handled;
//! - each key's records are handled in the order they were published;
//! - the backlog of the moment the downstream comes back is committed within 10 s;
//! - while the breaker was open, no handler call ran but the half-open probes.
//!
//! The retry policy gives up after 5 attempts in about 2.4 s, so without the breaker records
//! published during the outage are dead-lettered (a run with the breaker section removed lost 700
//! to the dead-letter topic).
//!
//! The outage is the reference service's test hook: every record carries
//! `details = {"simulate": "outage", "until": <start + 20 s>}`, which fails retryably until then.
//! Records are published one per batch (Tansu skips the rest of a batch when a fetch starts inside
//! it, as one does after the breaker's pause). Every wait polls with a deadline.

mod reference;
mod support;

use crate::reference::{CustomerCreated, CUSTOMER_TOPIC, RESOURCE_TOPIC, TASK_TOPIC};
use futures_util::future::join_all;
use serde_json::json;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::broker::{unique, Tansu};
use support::kafka::read_topic;
use support::orders::one_record_per_batch;
use support::process::{
    http_get, metric_sum, wait_until, RecordFile, ServeOptions, TestDir, WeirProcess,
    FAST_GROUP_TOML,
};
use weir::{Envelope, KafkaBus, PublishExt};

const PARTITIONS: i32 = 4;
const RECORDS: usize = 5_000;
/// Customers (record keys): record `n` is customer `c-(n % KEYS)`.
const KEYS: usize = 100;
/// Records published at once; fewer than `KEYS`, so a chunk has each key at most once and a
/// key's records are published (and get their offsets) one after the other.
const CHUNK: usize = 50;
/// How long the stream lasts, about.
const STREAM: Duration = Duration::from_secs(30);
/// How long the downstream is down, from the stream's start.
const OUTAGE: Duration = Duration::from_secs(20);
/// How soon after the downstream is back its backlog of that moment must be committed.
const RECOVERY: Duration = Duration::from_secs(10);
const PATIENCE: Duration = Duration::from_secs(180);
/// The reference service's `customer.created` handler: the route the breaker guards.
const ROUTE: &str = "record_customer_created";

/// The retry policy gives up after 5 calls, 0.2 + 0.4 + 0.8 + 1 s apart: well inside the
/// outage, so without the breaker its records are dead-lettered. The breaker opens at half of
/// 10 calls failing; it probes after 1 s, then every 2 s.
fn config() -> String {
    format!(
        "{FAST_GROUP_TOML}
[retry]
initial_interval = \"200ms\"
backoff_coefficient = 2.0
maximum_interval = \"1s\"
maximum_attempts = 5
jitter = 0.0

[routes.{ROUTE}.breaker]
failure_ratio = 0.5
minimum_calls = 10
window = \"10s\"
cool_down = \"1s\"
backoff = 2.0
max_cool_down = \"2s\"
"
    )
}

/// One acknowledged record.
#[derive(Clone, Debug)]
struct Sent {
    id: String,
    key: String,
    partition: i32,
    offset: i64,
}

/// Publishes the stream in the background: `CHUNK` records at a time, paced to last about
/// `STREAM`, every one failing until `until`.
fn stream(
    bus: KafkaBus,
    until: chrono::DateTime<chrono::Utc>,
    sent: Arc<Mutex<Vec<Sent>>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let chunks = RECORDS / CHUNK;
        let start = tokio::time::Instant::now();
        for c in 0..chunks {
            // Pacing the load, not waiting for an outcome.
            tokio::time::sleep_until(start + STREAM * c as u32 / chunks as u32).await;
            let publish = (c * CHUNK..(c + 1) * CHUNK).map(|n| {
                let key = format!("c-{}", n % KEYS);
                let details = json!({"n": n, "simulate": "outage", "until": until.to_rfc3339()});
                let envelope = Envelope::new(CustomerCreated::new(key.clone(), details));
                let bus = &bus;
                async move {
                    let d = bus
                        .publish(&envelope)
                        .await
                        .unwrap_or_else(|e| panic!("publishing record {n} failed: {e}"));
                    Sent {
                        id: envelope.meta.id.to_string(),
                        key,
                        partition: d.partition,
                        offset: d.offset,
                    }
                }
            });
            let batch = join_all(publish).await;
            sent.lock().unwrap().extend(batch);
        }
    })
}

/// Offset after the last record published so far, by partition.
fn ends(sent: &[Sent]) -> BTreeMap<i32, i64> {
    let mut ends = BTreeMap::new();
    for s in sent {
        let end = ends.entry(s.partition).or_insert(0);
        *end = (*end).max(s.offset + 1);
    }
    ends
}

/// The group's committed offsets on the customer topic, by partition.
async fn committed(brokers: &str, group: &str) -> BTreeMap<i32, i64> {
    support::kafka::committed_on(brokers, group, CUSTOMER_TOPIC).await
}

/// Records published and not committed yet: `None` once the committed offsets reach `ends`.
fn lag(ends: &BTreeMap<i32, i64>, committed: &BTreeMap<i32, i64>) -> Option<i64> {
    let lag: i64 = ends
        .iter()
        .map(|(p, end)| (end - committed.get(p).copied().unwrap_or(0)).max(0))
        .sum();
    (lag > 0).then_some(lag)
}

/// One scrape of the admin server's `/metrics`.
#[derive(Clone, Copy, Debug)]
struct Sample {
    /// Since the stream started.
    at: Duration,
    /// `weir_breaker_state`: 0 closed, 1 open, 2 half-open (`None` without a breaker).
    state: Option<f64>,
    /// `weir_breaker_transitions_total` into open, half-open and closed.
    opened: f64,
    half_opened: f64,
    closed: f64,
    /// Handler calls on the customer topic (`weir_handler_duration_seconds_count`, one per call
    /// whatever it returned).
    calls: f64,
    /// Retry decisions (`weir_messages_handled_total{outcome="retried"}`).
    retried: f64,
}

impl Sample {
    fn parse(at: Duration, body: &str) -> Sample {
        // An empty sum is -0.0, which would print as such.
        let sum = |name, labels: &[(&str, &str)]| metric_sum(body, name, labels) + 0.0;
        let transitions = |to| {
            sum(
                "weir_breaker_transitions_total",
                &[("route", ROUTE), ("to", to)],
            )
        };
        let topic = ("topic", CUSTOMER_TOPIC);
        Sample {
            at,
            state: body
                .lines()
                .any(|l| l.starts_with("weir_breaker_state{"))
                .then(|| sum("weir_breaker_state", &[("route", ROUTE)])),
            opened: transitions("open"),
            half_opened: transitions("half_open"),
            closed: transitions("closed"),
            calls: sum("weir_handler_duration_seconds_count", &[topic]),
            retried: sum(
                "weir_messages_handled_total",
                &[topic, ("outcome", "retried")],
            ),
        }
    }

    fn is_open(&self) -> bool {
        self.state == Some(1.0)
    }
}

/// Scrapes `/metrics` every 20 ms on a thread of its own until `stop`: the breaker's states and
/// the handler calls over time.
fn sample_metrics(
    admin: std::net::SocketAddr,
    started: Instant,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<Sample>> {
    std::thread::spawn(move || {
        let mut samples = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            if let Ok((200, body)) = http_get(admin, "/metrics") {
                samples.push(Sample::parse(started.elapsed(), &body));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        samples
    })
}

/// Calls made while the breaker was open, and the half-open probes it let through meanwhile:
/// the calls between consecutive scrapes that both saw it open with no close in between. Any
/// call there must be a probe, and each half-open admits one. (A call admitted just before the
/// breaker opened counts itself before it reports its outcome, so it cannot land there unless
/// a scrape falls in the microseconds between another call's opening and its count.)
fn calls_while_open(samples: &[Sample]) -> (f64, f64) {
    samples
        .windows(2)
        .filter(|w| w[0].is_open() && w[1].is_open() && w[0].closed == w[1].closed)
        .fold((0.0, 0.0), |(calls, probes), w| {
            (
                calls + (w[1].calls - w[0].calls),
                probes + (w[1].half_opened - w[0].half_opened),
            )
        })
}

fn fail_if_exited(serve: &mut WeirProcess) {
    if let Some(status) = serve.try_status() {
        panic!("serve exited ({status})\n{}", serve.stderr_tail(8 * 1024));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_downstream_outage_opens_the_breaker_and_dead_letters_nothing() {
    let broker = Tansu::start_memory();
    for topic in [TASK_TOPIC, CUSTOMER_TOPIC, RESOURCE_TOPIC] {
        broker.create_topic(topic, PARTITIONS);
    }
    let dlq = format!("{CUSTOMER_TOPIC}.dlq");
    broker.create_topic(&dlq, 1);
    let brokers = broker.brokers();
    let dir = TestDir::new("weir-breaker");
    let group = unique("breaker");
    let mut records = RecordFile::new(&dir.join("handled.jsonl"));
    let options = ServeOptions::new(&brokers, &group, records.path())
        .env("WEIR_CONSUMER__COMMIT_INTERVAL", "50ms")
        .config(&config());
    let mut serve = WeirProcess::serve(dir.path(), "serve", &options);
    let admin = wait_until("serve to be ready", PATIENCE, || {
        fail_if_exited(&mut serve);
        let admin = serve.admin_addr().ok_or("not serving yet".to_owned())?;
        match http_get(admin, "/readyz") {
            Ok((200, _)) => Ok(admin),
            other => Err(format!("/readyz: {other:?}")),
        }
    })
    .await;

    // The stream, failing until `until`; the metrics scraped throughout.
    let started = Instant::now();
    let until = chrono::Utc::now() + chrono::Duration::from_std(OUTAGE).unwrap();
    let back = started + OUTAGE;
    let stop_sampling = Arc::new(AtomicBool::new(false));
    let sampler = sample_metrics(admin, started, stop_sampling.clone());
    let sent = Arc::new(Mutex::new(Vec::<Sent>::new()));
    let publishing = stream(one_record_per_batch(&brokers), until, sent.clone());

    // Lag: records acknowledged to the publisher and not committed by the group. The recovery
    // is the backlog of the moment the downstream came back being committed. It is not the
    // first moment the live lag reads 0: the stream goes on for 10 s after that moment, so the
    // live lag reaches 0 only when a commit happens to catch up with the publisher, and at the
    // latest when the publisher stops (a slower machine publishes later, not the group recovers
    // later).
    wait_until("the downstream to come back", OUTAGE * 2, || {
        fail_if_exited(&mut serve);
        (Instant::now() >= back)
            .then_some(())
            .ok_or("down".to_owned())
    })
    .await;
    let ends_at_back = ends(&sent.lock().unwrap());
    let lag_at_back = lag(&ends_at_back, &committed(&brokers, &group).await);
    let recovered = support::process::eventually("the backlog to be committed", PATIENCE, || {
        let (brokers, group, ends) = (&brokers, &group, &ends_at_back);
        async move {
            match lag(ends, &committed(brokers, group).await) {
                None => Ok(back.elapsed()),
                Some(lag) => Err(format!("{lag} records behind")),
            }
        }
    })
    .await;
    if let Err(e) = publishing.await {
        std::panic::resume_unwind(e.into_panic());
    }
    let published = started.elapsed();
    let sent = std::mem::take(&mut *sent.lock().unwrap());
    assert_eq!(sent.len(), RECORDS);
    // Every record final: committed offsets at the end of the stream.
    let all_ends = ends(&sent);
    let drained = support::process::eventually("the whole stream committed", PATIENCE, || {
        let (brokers, group, ends) = (&brokers, &group, &all_ends);
        async move {
            match lag(ends, &committed(brokers, group).await) {
                None => Ok(started.elapsed()),
                Some(lag) => Err(format!("{lag} records behind")),
            }
        }
    })
    .await;
    fail_if_exited(&mut serve);
    stop_sampling.store(true, Ordering::SeqCst);
    let samples = sampler.join().expect("the sampler");
    let (_, body) = http_get(admin, "/metrics").expect("GET /metrics");
    let last = Sample::parse(started.elapsed(), &body);

    // What an operator cares about, all checked before any verdict, so a failing run says
    // everything that went wrong.
    let mut failures = Vec::new();

    // Nothing dead-lettered: the topic is empty, and the service says so too.
    let dead = read_topic(&brokers, &dlq, 0, Duration::from_secs(2), PATIENCE).await;
    let dead_lettered = metric_sum(&body, "weir_dead_letters_total", &[]);
    if !dead.is_empty() || dead_lettered > 0.0 {
        failures.push(format!(
            "{} records on {dlq} ({dead_lettered} counted by weir_dead_letters_total)",
            dead.len()
        ));
    }

    // Nothing lost: every published record handled (the offsets are committed, so every
    // record is final, and a handled one was written to the record file before its handler
    // returned).
    let lines = records.refresh().to_vec();
    assert!(records.garbled.is_empty(), "{:?}", records.garbled);
    let handled: HashSet<&str> = lines.iter().map(|l| l.event_id.as_str()).collect();
    let lost = sent
        .iter()
        .filter(|s| !handled.contains(s.id.as_str()))
        .count();
    if lost > 0 {
        failures.push(format!(
            "{lost} of {RECORDS} published records never handled"
        ));
    }
    let duplicates = lines.len() - handled.len();

    // Key order: each key's records handled (first handling of each) in publish order. A key's
    // records were published one after the other, so publish order is offset order.
    let key_of: HashMap<(i32, i64), &str> = sent
        .iter()
        .map(|s| ((s.partition, s.offset), s.key.as_str()))
        .collect();
    let mut order: HashMap<&str, Vec<i64>> = HashMap::new();
    let mut seen = HashSet::new();
    for line in lines.iter().filter(|l| l.topic == CUSTOMER_TOPIC) {
        if seen.insert((line.partition, line.offset)) {
            if let Some(key) = key_of.get(&(line.partition, line.offset)) {
                order.entry(key).or_default().push(line.offset);
            }
        }
    }
    let out_of_order: Vec<_> = order
        .iter()
        .filter(|(_, offsets)| offsets.windows(2).any(|w| w[0] > w[1]))
        .map(|(key, _)| *key)
        .collect();
    if !out_of_order.is_empty() {
        failures.push(format!(
            "{} keys handled out of publish order, e.g. {:?}",
            out_of_order.len(),
            &out_of_order[..out_of_order.len().min(5)]
        ));
    }

    // Recovery: the backlog of the moment the downstream came back, committed within RECOVERY.
    if recovered > RECOVERY {
        failures.push(format!(
            "the backlog of {lag_at_back:?} records of the moment the downstream came back \
             was committed only {recovered:.1?} after (at most {RECOVERY:?})"
        ));
    }

    // Attempts: each successful handling's attempt, from the record file.
    let retried_records = lines.iter().filter(|l| l.attempt > 1).count();
    let max_attempt = lines.iter().map(|l| l.attempt).max().unwrap_or(0);

    // The breaker, from the scrapes: when it was open, and what ran meanwhile.
    let first_open = samples.iter().find(|s| s.is_open()).map(|s| s.at);
    let closed_again = first_open.and_then(|opened| {
        samples
            .iter()
            .find(|s| s.at > opened && s.state == Some(0.0))
            .map(|s| s.at)
    });
    let (open_calls, probes) = calls_while_open(&samples);
    let failed_calls = last.calls - lines.len() as f64;
    println!(
        "breaker: {RECORDS} records published over {published:.1?}, outage {OUTAGE:?}; \
         {} handled lines ({duplicates} duplicates), {} dead letters; \
         breaker first seen open at {first_open:.1?}, closed again at {closed_again:.1?} \
         (transitions: {} open, {} half-open, {} closed); \
         calls: {} in all, {failed_calls} failed, {} retry decisions; \
         while open: {open_calls} calls, {probes} probes; \
         {retried_records} records handled after a retry (max attempt {max_attempt}); \
         lag {lag_at_back:?} when the downstream came back, that backlog committed \
         {recovered:.1?} after; \
         whole stream committed at {drained:.1?}; {} scrapes",
        lines.len(),
        dead.len(),
        last.opened,
        last.half_opened,
        last.closed,
        last.calls,
        last.retried,
        samples.len(),
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    // The breaker did the work: it opened during the outage, probed, and is closed again.
    let Some(opened) = first_open else {
        panic!("the breaker was never seen open: {last:?}");
    };
    assert!(opened < OUTAGE, "opened only at {opened:?}");
    assert!(
        closed_again.is_some_and(|c| c >= OUTAGE),
        "closed again at {closed_again:?}, before the downstream came back at {OUTAGE:?}"
    );
    assert_eq!(last.state, Some(0.0), "closed at the end: {last:?}");
    assert!(
        last.half_opened >= 2.0 && last.opened == last.half_opened && last.closed == 1.0,
        "one opening, a probe every cool-down, the last one closing it: {last:?}"
    );
    // No attempt spent while open, but the probes.
    assert!(
        open_calls <= probes,
        "{open_calls} handler calls while the breaker was open, with {probes} probes"
    );
    serve.sigterm();
    serve.wait_exit(Duration::from_secs(30)).await;
}
