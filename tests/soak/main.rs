//! The soak (issue 32): the whole reference deployment on this machine under a stream of
//! customer events and a schedule of faults, then a check of every record's fate, written as a
//! report (JSON and Markdown) with a picture (SVG timeline) beside it.
//!
//! Run it with `scripts/soak.sh [--minutes N] [--rate R] [--seed S]`, or as part of the suite
//! (`cargo test --test soak`), where it runs its default: 3 minutes at 100 records/s, every
//! fault kind once, on a random seed it prints (set `WEIR_SOAK_SEED` to replay a schedule).
//!
//! - `fleet`: Tansu (sqlite), PostgreSQL (a private cluster), three `weir serve`, one
//!   `weir retry-worker`, one `weir outbox-relay`, and what the faults do to them;
//! - `faults`: the seeded schedule;
//! - `producer.py`: the foreign producer (confluent-kafka) with the poison set and outages;
//! - `ledger`: the producer's log and the handlers' ledger;
//! - `monitor`: the timeline, peak memory and partition ownership while it runs;
//! - `checker`: lost, order, duplicates, dead letters, latency, lag and drain per fault;
//! - `report` and `picture`: Markdown and SVG.
//!
//! The test fails on a lost record, an order violation, a dead letter outside the poison set (or
//! a poison record not dead-lettered), a record left parked, or a process exiting by itself.

#[path = "../reference/mod.rs"]
mod reference;
#[path = "../support/mod.rs"]
mod support;

mod checker;
mod faults;
mod fleet;
mod ledger;
mod monitor;
mod picture;
mod report;
mod tasks;

use checker::{FaultRun, Inputs, Report};
use faults::FaultKind;
use fleet::Fleet;
use monitor::{Monitor, Status};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The stream's topic (the reference service's customers).
const TOPIC: &str = reference::CUSTOMER_TOPIC;
const DEAD_LETTER_TOPIC: &str = "customer-events.dlq";
pub(crate) const STATUS_TOPIC: &str = "weir.status";
const PARTITIONS: i32 = 4;
/// Customers: the stream's keys.
const KEYS: u32 = 200;
/// One record in this many is poison (alternately undecodable and failing forever).
const POISON_EVERY: u32 = 500;
/// How often the soak asks the API for a task (through the outbox and the relay).
const TASK_EVERY: Duration = Duration::from_millis(500);
/// How long the fleet may take, after the stream, to handle everything and finish the retries.
const DRAIN: Duration = Duration::from_secs(240);
const PRODUCER: &str = include_str!("producer.py");

struct Settings {
    minutes: f64,
    rate: f64,
    seed: u64,
    report_dir: PathBuf,
}

impl Settings {
    fn from_env() -> Settings {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.trim().is_empty());
        let seed = var("WEIR_SOAK_SEED")
            .map(|s| s.parse().expect("WEIR_SOAK_SEED is a number"))
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
                    % 1_000_000
            });
        Settings {
            minutes: var("WEIR_SOAK_MINUTES")
                .map_or(3.0, |m| m.parse().expect("WEIR_SOAK_MINUTES")),
            rate: var("WEIR_SOAK_RATE").map_or(100.0, |r| r.parse().expect("WEIR_SOAK_RATE")),
            seed,
            report_dir: var("WEIR_SOAK_REPORT_DIR").map_or_else(
                || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/soak"),
                PathBuf::from,
            ),
        }
    }

    fn command(&self) -> String {
        format!(
            "scripts/soak.sh --minutes {} --rate {} --seed {}",
            self.minutes, self.rate, self.seed
        )
    }
}

fn python() -> String {
    std::env::var("WEIR_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "WEIR_TEST_PYTHON is not set: it must name a Python with confluent-kafka \
             (scripts/test.sh and scripts/soak.sh set it)"
        )
    })
}

fn tansu_version() -> String {
    let bin = std::env::var("WEIR_TANSU_BIN").unwrap_or_else(|_| "tansu".into());
    let version = std::process::Command::new(&bin)
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    format!("{version} (crates.io build), sqlite storage")
}

/// The runner's side while faults run: restarts what exited by itself, answers a broker
/// fault with a rebalance.
struct Watch {
    status: Arc<Mutex<Status>>,
    exits: Vec<String>,
    next_remedy: usize,
}

impl Watch {
    async fn look(&mut self, fleet: &mut Fleet, start: Instant) {
        for exit in fleet.check_exits().await {
            eprintln!(
                "soak: unexpected exit at {:.1} s: {exit}",
                start.elapsed().as_secs_f64()
            );
            self.exits.push(exit);
        }
        let remedy = self.status.lock().unwrap().remedy.take();
        if let Some(partition) = remedy {
            let slot = self.next_remedy % fleet::REPLICAS;
            self.next_remedy += 1;
            eprintln!(
                "soak: broker fault: partition {partition} has no live owner; restarting serve-{slot} to rebalance ({:.1} s)",
                start.elapsed().as_secs_f64()
            );
            fleet.restart_replica(slot).await;
        }
    }

    /// Looks every half second until `until`.
    async fn until(&mut self, fleet: &mut Fleet, start: Instant, until: Instant) {
        while Instant::now() < until {
            self.look(fleet, start).await;
            tokio::time::sleep(Duration::from_millis(500).min(until - Instant::now())).await;
        }
    }
}

async fn run_fault(
    fleet: &mut Fleet,
    kind: FaultKind,
    rng: &mut faults::Rng,
    watch: &mut Watch,
    start: Instant,
) -> String {
    match kind {
        FaultKind::KillReplica => {
            let slot = rng.below(fleet::REPLICAS as u64) as usize;
            fleet.kill_replica(slot).await;
            format!("SIGKILL serve-{slot}, restarted")
        }
        FaultKind::RollingRestart => {
            let mut slow = Vec::new();
            for slot in 0..fleet::REPLICAS {
                if !fleet.restart_replica(slot).await {
                    slow.push(slot);
                }
                watch.look(fleet, start).await;
            }
            if slow.is_empty() {
                "SIGTERM serve-0, -1, -2 in turn, each restarted and serving first".into()
            } else {
                format!("SIGTERM in turn; replicas {slow:?} needed SIGKILL after the grace")
            }
        }
        FaultKind::Scale => {
            let clean = fleet.scale_down().await;
            let hold = Instant::now() + Duration::from_secs(15);
            watch.until(fleet, start, hold).await;
            fleet.scale_up().await;
            format!(
                "3 -> 1 for 15 s -> 3{}",
                if clean {
                    ""
                } else {
                    " (a stop needed SIGKILL)"
                }
            )
        }
        FaultKind::BrokerRestart => {
            fleet.restart_broker();
            "Tansu killed and restarted on its sqlite storage".into()
        }
        FaultKind::Outage => format!(
            "records sent in the next {} s fail retryably until its end (parked)",
            faults::OUTAGE.as_secs()
        ),
        FaultKind::KillRetryWorker => {
            fleet.kill_retry_worker().await;
            "SIGKILL retry-worker, restarted".into()
        }
        FaultKind::DatabaseRestart => match fleet.restart_database() {
            Ok(()) => "pg_ctl restart -m fast".into(),
            Err(e) => format!("restart failed: {e}"),
        },
        FaultKind::KillRelay => {
            fleet.kill_relay().await;
            "SIGKILL outbox-relay, restarted".into()
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_loses_nothing_under_faults() {
    let settings = Settings::from_env();
    let stream = Duration::from_secs_f64(settings.minutes * 60.0);
    let started_at = chrono::Utc::now().to_rfc3339();
    let group = support::broker::unique("soak");
    let mut fleet = Fleet::start(
        &[
            (TOPIC, PARTITIONS),
            (reference::TASK_TOPIC, PARTITIONS),
            (reference::RESOURCE_TOPIC, PARTITIONS),
            (DEAD_LETTER_TOPIC, 1),
            (STATUS_TOPIC, 1),
        ],
        &group,
    )
    .await;
    let mut kinds = vec![
        FaultKind::KillReplica,
        FaultKind::RollingRestart,
        FaultKind::Scale,
        FaultKind::BrokerRestart,
        FaultKind::Outage,
        FaultKind::KillRelay,
    ];
    kinds.sort();
    let mut plan = faults::schedule(settings.seed, stream, &kinds);
    let mut left_out = Vec::new();
    if !fleet.db.can_restart() {
        plan.retain(|p| p.kind != FaultKind::DatabaseRestart);
        left_out.push(format!(
            "database_restart: no private PostgreSQL ({}); the shared test server is not restarted",
            fleet.db_note.clone().unwrap_or_default()
        ));
    }
    left_out.push(
        "temporal_restart: the tasks handler's Temporal hand-off is not part of this soak yet"
            .into(),
    );
    println!(
        "soak: seed {}, {} min at {} records/s; schedule:",
        settings.seed, settings.minutes, settings.rate
    );
    for p in &plan {
        println!("  {:>7.1} s  {}", p.at.as_secs_f64(), p.kind.label());
    }

    // The stream.
    let producer_log = fleet.dir.join("produced.jsonl");
    let config = serde_json::json!({
        "brokers": fleet.brokers(),
        "topic": TOPIC,
        "rate": settings.rate,
        "seconds": stream.as_secs_f64(),
        "seed": settings.seed,
        "keys": KEYS,
        "poison_every": POISON_EVERY,
        "outages": faults::outages(&plan)
            .iter()
            .map(|(a, b)| [a.as_secs_f64(), b.as_secs_f64()])
            .collect::<Vec<_>>(),
    });
    let stdout = std::fs::File::create(&producer_log).expect("producer log");
    let stderr = std::fs::File::create(fleet.dir.join("producer.stderr")).expect("producer err");
    let monitor = Monitor::new(
        TOPIC,
        PARTITIONS,
        &producer_log,
        &fleet.ledger(),
        fleet.dir.path(),
    );
    let start = Instant::now();
    let stream_start_ms = chrono::Utc::now().timestamp_millis();
    let mut producer = tokio::process::Command::new(python())
        .args(["-c", PRODUCER, &config.to_string()])
        .stdout(stdout)
        .stderr(stderr)
        .kill_on_drop(true)
        .spawn()
        .expect("the producer starts");
    let status = Arc::new(Mutex::new(Status::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let monitor = monitor.spawn(
        fleet.live.clone(),
        fleet.peaks.clone(),
        status.clone(),
        stop.clone(),
    );
    let csv = fleet.dir.join("customers.csv");
    std::fs::write(&csv, tasks::customers_csv()).expect("the task file");
    let tasks_stop = Arc::new(AtomicBool::new(false));
    let task_driver = tasks::spawn(
        fleet.apis.clone(),
        format!("file://{}", csv.display()),
        TASK_EVERY,
        tasks_stop.clone(),
    );
    let mut watch = Watch {
        status: status.clone(),
        exits: Vec::new(),
        next_remedy: 0,
    };

    // The faults.
    let mut rng = faults::Rng::new(settings.seed ^ 0x5eed);
    let mut runs = Vec::new();
    let broker = tansu_version();
    for planned in &plan {
        watch.until(&mut fleet, start, start + planned.at).await;
        let begun = start.elapsed().as_secs_f64();
        println!("soak: {:>7.1} s  {} ...", begun, planned.kind.label());
        let note = run_fault(&mut fleet, planned.kind, &mut rng, &mut watch, start).await;
        let mut ended = start.elapsed().as_secs_f64();
        let mut begun = begun;
        let mut note = note;
        if planned.kind == FaultKind::Outage {
            // The producer writes the outage into the records sent in its window, whatever
            // the runner is doing then: it starts and ends as planned.
            if begun > planned.at.as_secs_f64() + 0.5 {
                note.push_str(&format!(" (the runner, busy, noted it at {begun:.1} s)"));
            }
            begun = planned.at.as_secs_f64();
            ended = begun + faults::OUTAGE.as_secs_f64();
        }
        println!(
            "soak: {:>7.1} s  {}: {note}",
            start.elapsed().as_secs_f64(),
            planned.kind.label()
        );
        runs.push(FaultRun {
            kind: planned.kind,
            planned_s: planned.at.as_secs_f64(),
            start_s: begun,
            end_s: ended,
            broker: broker.clone(),
            note,
            max_lag: 0,
            drain_s: None,
            duplicates: 0,
        });
    }

    // The end of the stream, then the drain.
    let producer_deadline = start + stream + Duration::from_secs(120);
    let produced_ok = loop {
        watch.look(&mut fleet, start).await;
        if let Some(exit) = producer.try_wait().expect("producer status") {
            break exit.success();
        }
        assert!(
            Instant::now() < producer_deadline,
            "the producer did not finish within 2 minutes of the stream's end"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let stream_end = start.elapsed().as_secs_f64();
    tasks_stop.store(true, Ordering::SeqCst);
    let task_log = task_driver.await.expect("the task driver");
    let mut task_ledger = ledger::Lines::<ledger::Handling>::new(&fleet.ledger());
    let mut tasks_handled = std::collections::HashSet::new();
    let drain_deadline = Instant::now() + DRAIN;
    let mut parked = -1;
    let mut task_statuses = std::collections::BTreeMap::new();
    loop {
        watch.look(&mut fleet, start).await;
        for h in task_ledger.refresh() {
            if h.handler == "record_task_created" {
                tasks_handled.extend(h.key.clone());
            }
        }
        let tasks_done = task_log
            .created
            .iter()
            .all(|(id, _)| tasks_handled.contains(id))
            && match fleet.task_statuses().await {
                Ok(statuses) => {
                    let done = statuses
                        .iter()
                        .all(|(s, _)| s == "completed" || s == "failed");
                    task_statuses = statuses;
                    done
                }
                Err(_) => false,
            };
        let lag = status.lock().unwrap().lag;
        if lag <= 0 && tasks_done {
            match fleet.parked().await {
                Ok(0) => {
                    parked = 0;
                    break;
                }
                Ok(n) => parked = n,
                Err(e) => eprintln!("soak: cannot count parked records: {e}"),
            }
        }
        if Instant::now() > drain_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let tasks_lost: Vec<String> = task_log
        .created
        .iter()
        .filter(|(id, _)| !tasks_handled.contains(id))
        .map(|(id, _)| id.clone())
        .collect();
    let task_count = |status: &str| task_statuses.get(status).copied().unwrap_or(0);
    let tasks = checker::Tasks {
        created: task_log.created.len() as u64,
        refused_requests: task_log.refused,
        handled: task_log.created.len() as u64 - tasks_lost.len() as u64,
        lost: tasks_lost,
        completed: task_count("completed"),
        failed: task_count("failed"),
        unfinished: task_statuses
            .iter()
            .filter(|(s, _)| *s != "completed" && *s != "failed")
            .map(|(_, n)| n)
            .sum(),
    };
    let drain_at_end_s = start.elapsed().as_secs_f64() - stream_end;
    let poison = status.lock().unwrap().produced_poison as usize;
    let dead_letters = support::kafka::read_topic(
        &fleet.brokers(),
        DEAD_LETTER_TOPIC,
        poison,
        Duration::from_secs(3),
        Duration::from_secs(60),
    )
    .await;
    if parked != 0 {
        parked = fleet.parked().await.unwrap_or(parked);
    }
    stop.store(true, Ordering::SeqCst);
    let monitor = monitor.await.expect("the monitor");
    fleet.stop_all().await;

    // The verdict.
    let found = checker::check(Inputs {
        produced: monitor.produced.all(),
        ledger: monitor.ledger.all(),
        dead_letters: &dead_letters,
        topic: TOPIC,
        stream_start_ms,
        rate: settings.rate,
        faults: runs,
        samples: &monitor.samples,
        broker_faults: &monitor.broker_faults,
    });
    let mut failures = Vec::new();
    if !produced_ok {
        failures.push(format!(
            "the producer failed: {}",
            std::fs::read_to_string(fleet.dir.join("producer.stderr")).unwrap_or_default()
        ));
    }
    if !found.lost.is_empty() {
        failures.push(format!(
            "{} records lost ({} of them on partitions with a broker fault)",
            found.lost.len(),
            found.lost_on_broker_fault
        ));
    }
    if !found.order_violations.is_empty() {
        failures.push(format!("{} order violations", found.order_violations.len()));
    }
    if !found.dead_lettered.unexpected.is_empty() {
        failures.push(format!(
            "{} unexpected dead letters",
            found.dead_lettered.unexpected.len()
        ));
    }
    if !found.dead_lettered.missing.is_empty() {
        failures.push(format!(
            "{} poison records not dead-lettered",
            found.dead_lettered.missing.len()
        ));
    }
    if parked != 0 {
        failures.push(format!("{parked} records still parked at the end"));
    }
    if !tasks.lost.is_empty() || tasks.unfinished > 0 || tasks.failed > 0 {
        failures.push(format!(
            "tasks: {} created by the API never handled, {} unfinished, {} failed",
            tasks.lost.len(),
            tasks.unfinished,
            tasks.failed
        ));
    }
    if !watch.exits.is_empty() {
        failures.push(format!(
            "{} processes exited by themselves",
            watch.exits.len()
        ));
    }
    if !monitor.ledger.garbled.is_empty() {
        failures.push(format!(
            "{} garbled ledger lines",
            monitor.ledger.garbled.len()
        ));
    }
    let name = format!("soak-{}", settings.seed);
    let report = Report {
        passed: failures.is_empty(),
        failures,
        seed: settings.seed,
        minutes: settings.minutes,
        rate: settings.rate,
        command: settings.command(),
        started_at,
        broker,
        database: match &fleet.db {
            fleet::Database::Private(_) => "a private PostgreSQL cluster (pg_ctl)".into(),
            fleet::Database::Shared(_) => "a schema on the shared test server".into(),
        },
        produced: found.produced,
        handled_unique: found.handled_unique,
        lost: found.lost.len() as u64,
        lost_sample: found.lost.iter().take(20).cloned().collect(),
        lost_on_broker_fault: found.lost_on_broker_fault,
        order_violations: found.order_violations.len() as u64,
        order_violation_sample: found.order_violations.iter().take(20).cloned().collect(),
        duplicates: found.duplicates,
        dead_lettered: found.dead_lettered,
        parked_at_end: parked,
        tasks,
        latency: found.latency,
        latency_excluding_outage: found.latency_excluding_outage,
        max_lag: found.max_lag,
        faults: found.faults,
        faults_left_out: left_out,
        broker_faults: monitor.broker_faults.clone(),
        unexpected_exits: watch.exits.clone(),
        peak_rss_kib: fleet.peaks.lock().unwrap().clone(),
        garbled_ledger_lines: monitor.ledger.garbled.len(),
        drain_at_end_s,
        picture: format!("{name}.svg"),
        timeline: monitor.samples.clone(),
    };
    std::fs::create_dir_all(&settings.report_dir).expect("report dir");
    let json = settings.report_dir.join(format!("{name}.json"));
    let md = settings.report_dir.join(format!("{name}.md"));
    let svg = settings.report_dir.join(&report.picture);
    std::fs::write(&json, serde_json::to_string_pretty(&report).unwrap()).expect("write json");
    std::fs::write(&md, report::markdown(&report)).expect("write md");
    let title = format!(
        "Weir soak, seed {}: {} min at {}/s, lost {}, order violations {}",
        report.seed, report.minutes, report.rate, report.lost, report.order_violations
    );
    std::fs::write(
        &svg,
        picture::svg(
            &title,
            &report.timeline,
            &report.faults,
            &report.broker_faults,
        ),
    )
    .expect("write svg");
    println!("{}", report::markdown(&report));
    println!("soak report: {}", json.display());
    println!("soak report: {}", md.display());
    println!("soak picture: {}", svg.display());
    assert!(
        report.passed,
        "the soak failed: {:?} (report: {})",
        report.failures,
        md.display()
    );
}
