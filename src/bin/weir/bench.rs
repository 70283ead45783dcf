//! `weir bench`: Weir against hand-written rdkafka loops, in one run, on one pre-filled topic.
//!
//! Arms run in interleaved rounds (A0, A1, W, A0, A1, W, ...) so drift in the machine's state
//! hits every arm alike; each arm uses a fresh consumer group and the exact client settings Weir
//! uses (`KafkaConfig::consumer_config`), and its clock runs from its first record to its last,
//! so group joins are not measured. Medians are reported.
//!
//! - A0: a raw `BaseConsumer` loop that only counts records: the client's ceiling.
//! - A1: what a careful engineer writes without a framework: serde decoding of the CloudEvent
//!   into the typed event, and an offset store per record (at-least-once).
//! - W: Weir with a no-op typed handler, retries and dead-lettering configured; W reporting: the
//!   same with a status reporter publishing every 100 ms (reporting must not slow consumption).
//! - W-io-*: a 10 ms async handler on 4 partitions and 1,000 keys, `partition` vs `key` order.
//! - W-cpu-*: a ~50 µs CPU-bound handler (`cpu_bound`), `partition` vs `key` order.
//! - In-process: A1 and W over records already in memory (Weir's memory bus vs a loop over a
//!   `Vec`), which isolates the framework's own cost from the client and the broker.
//!
//! The bench logs through the service's own subscriber (JSON) at the service's default level,
//! `info`, unless `RUST_LOG` says otherwise: W and W-mem are what `weir serve` pays per record.
//! W and W-mem also run a second time with the log filter switched to `error`, in the same
//! rounds: the framework's cost without its logging.
//!
//! `--stuck 8,64,256` (a real broker only): peak memory with a handler that never returns (a
//! downstream that hangs), one fresh process per partition count, so what the consumer
//! prefetches for partitions whose records cannot be handled is measured alone.

use crate::reference::events::CustomerCreated;
use crate::telemetry::Telemetry;
use anyhow::Context as _;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::Message;
use serde::Deserialize;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::Notify;
use weir::{
    Bus, ConsumerConfig, Ctx, Envelope, HandlerError, HandlerOptions, KafkaBus, KafkaConfig,
    MemoryBus, MemoryConfig, ProcessingOrder, ReporterConfig, RetryPolicy, Router, StatusReporter,
};

#[derive(Debug, clap::Args)]
pub(crate) struct BenchArgs {
    /// A real broker to benchmark against; by default an embedded mock cluster.
    #[arg(long)]
    brokers: Option<String>,
    /// Records in the main topic (8 partitions). The default fits the mock cluster, which keeps
    /// only about 5 MB per partition (older records are deleted); use more with `--brokers`.
    #[arg(long, default_value_t = 80_000)]
    records: usize,
    /// Records in the I/O topic (4 partitions, 1,000 keys); the partition-order arm stops after
    /// a quarter of them, since it runs at 400 msgs/s by construction. As many as the mock
    /// cluster keeps: the key-order arm runs near 100,000 msgs/s, and in a shorter run its start
    /// (the first fetches, the 1,000 slots filling) and its drain weigh on the rate (0.61-0.69
    /// of the bound with 20,000 records, 0.81 with 45,000).
    #[arg(long, default_value_t = 40_000)]
    io_records: usize,
    /// Rounds of each interleaved comparison.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Also drain a backlog of this many records with Weir and report peak memory (needs
    /// `--brokers`: the mock cluster would both delete most of it and count its log in our RSS).
    #[arg(long)]
    backlog: Option<usize>,
    /// Weir's global in-flight limit (default: ConsumerConfig's).
    #[arg(long)]
    max_in_flight: Option<usize>,
    /// Weir's per-partition in-flight limit (default: ConsumerConfig's).
    #[arg(long)]
    max_in_flight_per_partition: Option<usize>,
    /// A librdkafka consumer property for every arm, hand loops and Weir alike (repeatable:
    /// `--kafka fetch.queue.backoff.ms=1000`), on top of Weir's defaults.
    #[arg(long = "kafka", value_name = "KEY=VALUE", value_parser = parse_property)]
    kafka: Vec<(String, String)>,
    /// Prefetched mode for A0, A1 and W: after its first record each arm waits this many
    /// seconds, so the client prefetches up to its queue limits, and only then starts the clock.
    /// Shows the framework's own cost where the broker caps every arm; keep `--records` within
    /// what the prefetch queue holds (raise it with `--kafka queued.max.messages.kbytes=...`).
    #[arg(long, value_name = "SECONDS")]
    prefetch: Option<u64>,
    /// Only run these arm groups (comma-separated: base, io, cpu, mem). For instruction counts
    /// under callgrind, one in-process arm alone: mem-a1, mem-w, mem-w-error, or mem-setup (the
    /// records prepared and published, no arm run), whose count is subtracted from the others.
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
    /// Internal: drain `--records` records of this existing topic with Weir and report the
    /// process's peak RSS (what `--backlog` runs in a fresh process).
    #[arg(long, hide = true)]
    drain_topic: Option<String>,
    /// Peak RSS with a handler that never returns, for each of these partition counts
    /// (comma-separated; needs `--brokers`): a topic of that many partitions is pre-filled with
    /// `--stuck-records` records per partition, and a fresh process subscribes to it with
    /// Weir's default consumer settings for `--stuck-seconds`.
    #[arg(long, value_delimiter = ',', value_name = "PARTITIONS")]
    stuck: Vec<usize>,
    /// Records per partition for `--stuck`.
    #[arg(long, default_value_t = 10_000)]
    stuck_records: usize,
    /// How long each `--stuck` process runs.
    #[arg(long, default_value_t = 25)]
    stuck_seconds: u64,
    /// Internal: subscribe to this existing topic with a handler that never returns, for
    /// `--stuck-seconds`, and report the process's peak RSS (what `--stuck` runs).
    #[arg(long, hide = true)]
    stuck_topic: Option<String>,
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

/// Weir's client settings with the run's `--kafka` consumer properties on top.
fn kafka_config(args: &BenchArgs, brokers: String) -> KafkaConfig {
    let mut kafka = KafkaConfig::new(brokers);
    kafka.consumer.extend(args.kafka.iter().cloned());
    kafka
}

async fn drain(args: &BenchArgs, topic: &str) -> anyhow::Result<()> {
    let brokers = args
        .brokers
        .clone()
        .context("--drain-topic needs --brokers")?;
    let bus = KafkaBus::new(kafka_config(args, brokers))?;
    let consumer = ConsumerConfig::new(format!("bench-{}", uuid::Uuid::new_v4().simple()));
    let before = rss_kib("VmRSS:");
    let run = weir_arm(&bus, topic, args.records, Work::Noop, consumer, None).await?;
    println!(
        "backlog: drained {} records at {:.0} msgs/s in a fresh process; peak RSS {:.1} MiB (at start {:.1} MiB)",
        args.records,
        run.rate,
        rss_kib("VmHWM:").unwrap_or(0) as f64 / 1024.0,
        before.unwrap_or(0) as f64 / 1024.0
    );
    Ok(())
}

/// A fresh process holds records with a handler that never returns, then reports its peak RSS.
async fn stuck(args: &BenchArgs, topic: &str) -> anyhow::Result<()> {
    let brokers = args
        .brokers
        .clone()
        .context("--stuck-topic needs --brokers")?;
    let bus = KafkaBus::new(kafka_config(args, brokers))?;
    let consumer = ConsumerConfig::new(format!("bench-{}", uuid::Uuid::new_v4().simple()));
    let before = rss_kib("VmRSS:");
    let started = Arc::new(AtomicUsize::new(0));
    let router = {
        let started = started.clone();
        Router::new().on_with(
            move |event: CustomerCreated, _ctx: Ctx| {
                started.fetch_add(1, Ordering::Relaxed);
                std::hint::black_box(&event);
                // A downstream that hangs.
                std::future::pending::<Result<(), HandlerError>>()
            },
            HandlerOptions::new().topic(topic).name("stuck"),
        )
    };
    let _subscription = bus.subscribe(router, consumer)?;
    tokio::time::sleep(Duration::from_secs(args.stuck_seconds)).await;
    println!(
        "stuck: {} s, {} handlers started; peak RSS {:.1} MiB (at start {:.1} MiB)",
        args.stuck_seconds,
        started.load(Ordering::Relaxed),
        rss_kib("VmHWM:").unwrap_or(0) as f64 / 1024.0,
        before.unwrap_or(0) as f64 / 1024.0
    );
    // The handlers never return: stopping would only wait for the drain timeout.
    std::process::exit(0);
}

/// `--stuck`: one topic and one fresh process per partition count; returns the report's lines.
async fn stuck_arms(args: &BenchArgs, target: &Target, run_id: &str) -> anyhow::Result<String> {
    let mut lines = format!(
        "stuck handler: {} records of ~{} bytes per partition, {} s, Weir's default consumer settings\n",
        args.stuck_records,
        payload(0).to_structured().map_or(0, |v| v.len()),
        args.stuck_seconds
    );
    for &partitions in &args.stuck {
        let topic = format!("bench-stuck-{partitions}-{run_id}");
        target
            .create_topic(&topic, i32::try_from(partitions)?)
            .await?;
        prefill(&target.kafka, &topic, partitions * args.stuck_records).await?;
        let output = tokio::process::Command::new(std::env::current_exe()?)
            .args(["bench", "--stuck-topic", &topic])
            .args(["--stuck-seconds", &args.stuck_seconds.to_string()])
            .args(["--brokers", &target.kafka.brokers])
            .args(
                args.kafka
                    .iter()
                    .flat_map(|(k, v)| ["--kafka".to_owned(), format!("{k}={v}")]),
            )
            .stderr(std::process::Stdio::null())
            .output()
            .await?;
        anyhow::ensure!(output.status.success(), "the stuck process failed");
        let line = format!(
            "  {partitions:>4} partitions: {}",
            String::from_utf8_lossy(&output.stdout).trim_start()
        );
        // At once too: a run of three partition counts takes minutes.
        eprint!("{line}");
        lines.push_str(&line);
    }
    Ok(lines)
}

const KEYS: usize = 1_000;
const IO_PARTITIONS: usize = 4;
const IO_LATENCY: Duration = Duration::from_millis(10);
const CPU_WORK: Duration = Duration::from_micros(50);
/// The reporting arm's interval: 50 times as often as `weir serve`'s default (5 s), so that a
/// run of a second publishes several reports, each asking the engine for its partitions.
const REPORT_INTERVAL: Duration = Duration::from_millis(100);

struct Run {
    rate: f64,
    /// The rate between the 10th and the 90th percent of the records (Weir's arms): steady
    /// state, without the time to fill the in-flight slots at the start and to empty them at
    /// the end.
    steady: Option<f64>,
    p50: Option<Duration>,
    p99: Option<Duration>,
    rss_growth_kib: Option<u64>,
}

struct Arm {
    name: String,
    runs: Vec<Run>,
}

impl Arm {
    fn new(name: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            runs: Vec::new(),
        }
    }

    fn median_rate(&self) -> f64 {
        median(self.runs.iter().map(|r| r.rate).collect())
    }

    /// Slowest run over fastest: how far apart the same arm's rounds fell.
    fn spread(&self) -> Option<f64> {
        let rates = self.runs.iter().map(|r| r.rate);
        let fastest = rates.clone().fold(f64::NAN, f64::max);
        let slowest = rates.fold(f64::NAN, f64::min);
        (self.runs.len() > 1).then(|| slowest / fastest)
    }
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(|a, b| a.total_cmp(b));
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Resets the kernel's peak-RSS mark (Linux), so each arm's peak is its own.
fn reset_peak_rss() -> Option<u64> {
    std::fs::write("/proc/self/clear_refs", "5").ok()?;
    rss_kib("VmRSS:")
}

fn rss_kib(field: &str) -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

fn peak_growth(start: Option<u64>) -> Option<u64> {
    Some(rss_kib("VmHWM:")?.saturating_sub(start?))
}

/// Where the records live: the mock cluster (kept alive here) or a real broker.
struct Target {
    kafka: KafkaConfig,
    mock: Option<MockCluster<'static, rdkafka::producer::DefaultProducerContext>>,
}

impl Target {
    async fn create_topic(&self, name: &str, partitions: i32) -> anyhow::Result<()> {
        if let Some(mock) = &self.mock {
            return Ok(mock.create_topic(name, partitions, 1)?);
        }
        let admin: AdminClient<DefaultClientContext> = self.kafka.producer_config().create()?;
        let topic = NewTopic::new(name, partitions, TopicReplication::Fixed(1));
        for result in admin.create_topics([&topic], &AdminOptions::new()).await? {
            result.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
        }
        Ok(())
    }
}

fn payload(i: usize) -> Envelope<CustomerCreated> {
    // About 360 bytes on the wire, like the measurements.
    let details = serde_json::json!({
        "name": format!("Customer {i}"),
        "email": format!("customer-{i}@example.com"),
        "plan": "enterprise",
        "notes": "x".repeat(60),
    });
    Envelope::new(CustomerCreated::new(format!("key-{}", i % KEYS), details)).source("/bench")
}

async fn prefill(kafka: &KafkaConfig, topic: &str, n: usize) -> anyhow::Result<()> {
    let mut config = kafka.producer_config();
    config
        .set("linger.ms", "50")
        .set("batch.num.messages", "10000");
    let producer: FutureProducer = config.create()?;
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(20_000) {
        let sends = chunk.iter().map(|&i| {
            let envelope = payload(i);
            let key = envelope.key();
            let value = envelope.to_structured().expect("serializable");
            let producer = &producer;
            async move {
                let record = FutureRecord::to(topic).key(&key).payload(&value);
                producer
                    .send(record, Duration::from_secs(30))
                    .await
                    .map_err(|(e, _)| e)
            }
        });
        for result in futures_util::future::join_all(sends).await {
            result.context("pre-filling the topic")?;
        }
    }
    eprintln!(
        "pre-filled {topic} with {n} records in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// The typed view A1 decodes into: a CloudEvent with customer data.
#[derive(Deserialize)]
#[allow(dead_code)]
struct CloudEventIn {
    id: uuid::Uuid,
    #[serde(rename = "type")]
    event_type: String,
    data: CustomerCreated,
}

/// A0 and A1: a plain `BaseConsumer` loop on a blocking thread.
fn hand_loop(
    kafka: &KafkaConfig,
    topic: &str,
    n: usize,
    typed: bool,
    warmup: Option<Duration>,
) -> anyhow::Result<Run> {
    let group = format!("bench-{}", uuid::Uuid::new_v4().simple());
    let consumer: BaseConsumer = kafka.consumer_config(&group).create()?;
    consumer.subscribe(&[topic])?;
    let rss = reset_peak_rss();
    let mut count = 0usize;
    let mut started = None;
    let deadline = Instant::now() + Duration::from_secs(600);
    while count < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "hand loop stalled at {count}/{n}"
        );
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        if started.is_none() {
            if let Some(warmup) = warmup {
                std::thread::sleep(warmup);
            }
            started = Some(Instant::now());
        }
        if typed {
            let event: CloudEventIn =
                serde_json::from_slice(message.payload().unwrap_or_default())?;
            std::hint::black_box(&event);
            consumer.store_offset(message.topic(), message.partition(), message.offset())?;
        }
        count += 1;
    }
    let elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
    if typed {
        consumer.commit_consumer_state(CommitMode::Sync)?;
    }
    Ok(Run {
        rate: (n.saturating_sub(1)) as f64 / elapsed.as_secs_f64().max(1e-9),
        steady: None,
        p50: None,
        p99: None,
        rss_growth_kib: peak_growth(rss),
    })
}

#[derive(Clone, Copy)]
enum Work {
    Noop,
    Io,
    Cpu,
}

/// The I/O the io arms' handlers wait on: a call answered at its deadline, to within tens of
/// microseconds, by a thread of its own, the way a remote service's reply arrives from outside
/// the runtime. A `tokio::time::sleep` of 10 ms takes ~11.25 ms here (the timer counts whole
/// milliseconds and rounds up, then wakes late), and those 1.25 ms, not the framework, capped
/// the io-partition arm at 0.89 of its 4 / 10 ms bound. With this device the handler takes the
/// 10 ms the bound assumes, which the p50 column shows.
struct IoDevice {
    calls: std::sync::mpsc::Sender<(Instant, tokio::sync::oneshot::Sender<()>)>,
}

impl IoDevice {
    async fn call(&self, deadline: Instant) {
        let (reply, answered) = tokio::sync::oneshot::channel();
        let sent = self.calls.send((deadline, reply));
        if sent.is_ok() {
            let _ = answered.await;
        }
    }
}

fn io_device() -> &'static IoDevice {
    static DEVICE: std::sync::OnceLock<IoDevice> = std::sync::OnceLock::new();
    DEVICE.get_or_init(|| {
        let (calls, pending_calls) =
            std::sync::mpsc::channel::<(Instant, tokio::sync::oneshot::Sender<()>)>();
        std::thread::Builder::new()
            .name("bench-io".into())
            .spawn(move || {
                use std::sync::mpsc::RecvTimeoutError;
                let mut pending = std::collections::BTreeMap::new();
                let mut seq = 0u64;
                loop {
                    let next = pending.keys().next().map(|(at, _): &(Instant, u64)| *at);
                    let call = match next {
                        None => pending_calls
                            .recv()
                            .map_err(|_| RecvTimeoutError::Disconnected),
                        Some(at) => {
                            pending_calls.recv_timeout(at.saturating_duration_since(Instant::now()))
                        }
                    };
                    match call {
                        Ok((at, reply)) => {
                            seq += 1;
                            pending.insert((at, seq), reply);
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                    let now = Instant::now();
                    while let Some(entry) = pending.first_entry() {
                        if entry.key().0 > now {
                            break;
                        }
                        let _ = entry.remove().send(());
                    }
                }
            })
            .expect("the bench's I/O thread starts");
        IoDevice { calls }
    })
}

fn burn(duration: Duration) {
    let start = Instant::now();
    while start.elapsed() < duration {
        std::hint::black_box(0u64);
    }
}

/// Counts handled records and keeps handler latencies; wakes the bench at the target count.
struct Tally {
    count: AtomicUsize,
    target: usize,
    /// Set once; read without a lock, so counting costs a no-op handler no more than A1's
    /// `count += 1` costs the hand loop (a mutex and a clock read per record did).
    first: std::sync::OnceLock<Instant>,
    last: Mutex<Option<Instant>>,
    latencies: Mutex<Vec<Duration>>,
    /// When the 10th and the 90th percent of the records finished: the steady-state window,
    /// without the run's start and drain.
    marks: Mutex<Vec<Instant>>,
    done: Notify,
    /// Prefetched mode: handlers wait this long after the first record, then the clock starts.
    warmup: Option<Duration>,
    gate_started: AtomicBool,
    open: AtomicBool,
    opened: Notify,
}

impl Tally {
    fn new(target: usize, warmup: Option<Duration>) -> Arc<Self> {
        Arc::new(Self {
            warmup,
            gate_started: AtomicBool::new(false),
            open: AtomicBool::new(false),
            opened: Notify::new(),
            count: AtomicUsize::new(0),
            target,
            first: std::sync::OnceLock::new(),
            last: Mutex::new(None),
            latencies: Mutex::new(Vec::new()),
            marks: Mutex::new(Vec::new()),
            done: Notify::new(),
        })
    }

    /// In prefetched mode, holds every handler until the warm-up after the first record is over.
    async fn pass_gate(self: &Arc<Self>) {
        let Some(warmup) = self.warmup else {
            return;
        };
        if self.open.load(Ordering::Acquire) {
            return;
        }
        if !self.gate_started.swap(true, Ordering::SeqCst) {
            let tally = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(warmup).await;
                let _ = tally.first.set(Instant::now());
                tally.open.store(true, Ordering::Release);
                tally.opened.notify_waiters();
            });
        }
        loop {
            // Created before the check: `notify_waiters` reaches it even if not yet polled.
            let notified = self.opened.notified();
            if self.open.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    fn record(&self, latency: Option<Duration>) {
        if self.first.get().is_none() {
            let _ = self.first.set(Instant::now());
        }
        if let Some(latency) = latency {
            self.latencies.lock().unwrap().push(latency);
        }
        let count = self.count.fetch_add(1, Ordering::SeqCst) + 1;
        if count == self.target / 10 || count == self.target * 9 / 10 {
            self.marks.lock().unwrap().push(Instant::now());
        }
        if count == self.target {
            *self.last.lock().unwrap() = Some(Instant::now());
            self.done.notify_one();
        }
    }

    fn run(&self, rss: Option<u64>) -> Run {
        let first = *self.first.get().expect("records were handled");
        let last = self.last.lock().unwrap().expect("the target was reached");
        let mut latencies = std::mem::take(&mut *self.latencies.lock().unwrap());
        latencies.sort();
        let pick = |q: f64| {
            latencies
                .get(((latencies.len() as f64 - 1.0) * q) as usize)
                .copied()
        };
        let mut marks = std::mem::take(&mut *self.marks.lock().unwrap());
        marks.sort();
        let steady = match marks.as_slice() {
            [from, to] if to > from => {
                let records = self.target * 9 / 10 - self.target / 10;
                Some(records as f64 / (*to - *from).as_secs_f64())
            }
            _ => None,
        };
        Run {
            rate: (self.target.saturating_sub(1)) as f64 / (last - first).as_secs_f64().max(1e-9),
            steady,
            p50: pick(0.50),
            p99: pick(0.99),
            rss_growth_kib: peak_growth(rss),
        }
    }
}

fn router(work: Work, topic: &str, tally: Arc<Tally>) -> Router {
    let mut options = HandlerOptions::new().topic(topic).name("bench");
    if matches!(work, Work::Cpu) {
        options = options.cpu_bound();
    }
    // The handler reaches the tally by a plain reference: cloning its `Arc` per call cost two
    // atomic operations per record that A1's loop does not pay, in a handler meant to cost
    // nothing. One small box per arm is leaked for it.
    let tally: &'static Arc<Tally> = Box::leak(Box::new(tally));
    Router::new().retry(RetryPolicy::default()).on_with(
        move |event: CustomerCreated, _ctx: Ctx| async move {
            tally.pass_gate().await;
            let latency = match work {
                Work::Noop => {
                    std::hint::black_box(&event);
                    None
                }
                Work::Io => {
                    let started = Instant::now();
                    io_device().call(started + IO_LATENCY).await;
                    Some(started.elapsed())
                }
                Work::Cpu => {
                    let started = Instant::now();
                    burn(CPU_WORK);
                    Some(started.elapsed())
                }
            };
            tally.record(latency);
            Ok::<(), HandlerError>(())
        },
        options,
    )
}

async fn weir_arm<B: Bus>(
    bus: &B,
    topic: &str,
    n: usize,
    work: Work,
    consumer: ConsumerConfig,
    warmup: Option<Duration>,
) -> anyhow::Result<Run> {
    weir_arm_reporting(bus, topic, n, work, consumer, warmup, None).await
}

/// [`weir_arm`], with a status reporter watching the subscription when `reporter` is given,
/// as `weir serve` runs one.
async fn weir_arm_reporting<B: Bus>(
    bus: &B,
    topic: &str,
    n: usize,
    work: Work,
    consumer: ConsumerConfig,
    warmup: Option<Duration>,
    reporter: Option<StatusReporter>,
) -> anyhow::Result<Run> {
    let tally = Tally::new(n, warmup);
    let rss = reset_peak_rss();
    let subscription = bus.subscribe(router(work, topic, tally.clone()), consumer)?;
    let stop = tokio_util::sync::CancellationToken::new();
    let reporting = reporter.map(|reporter| {
        let reporter = reporter.watch(subscription.status_probe());
        tokio::spawn(reporter.run(stop.clone().cancelled_owned()))
    });
    tokio::time::timeout(Duration::from_secs(900), tally.done.notified())
        .await
        .with_context(|| format!("Weir stalled at {}/{n}", tally.count.load(Ordering::SeqCst)))?;
    let run = tally.run(rss);
    subscription.stop().await?;
    stop.cancel();
    if let Some(reporting) = reporting {
        reporting.await?;
    }
    Ok(run)
}

fn print_arms(arms: &[&Arm]) {
    println!(
        "{:<32} {:>10} {:>10} {:>10} {:>14}  runs (msgs/s)",
        "arm", "msgs/s", "p50", "p99", "peak RSS +MiB"
    );
    for arm in arms.iter().filter(|a| !a.runs.is_empty()) {
        let fmt_d = |d: Option<Duration>| {
            d.map_or("-".to_owned(), |d| {
                format!("{:.2}ms", d.as_secs_f64() * 1e3)
            })
        };
        let mid = arm.runs.iter().min_by(|a, b| {
            (a.rate - arm.median_rate())
                .abs()
                .total_cmp(&(b.rate - arm.median_rate()).abs())
        });
        let rss = arm
            .runs
            .iter()
            .filter_map(|r| r.rss_growth_kib)
            .max()
            .map_or("-".to_owned(), |k| format!("{:.1}", k as f64 / 1024.0));
        let runs: Vec<String> = arm.runs.iter().map(|r| format!("{:.0}", r.rate)).collect();
        println!(
            "{:<32} {:>10.0} {:>10} {:>10} {:>14}  {}",
            arm.name,
            arm.median_rate(),
            fmt_d(mid.and_then(|r| r.p50)),
            fmt_d(mid.and_then(|r| r.p99)),
            rss,
            runs.join(", ")
        );
    }
}

/// `value / of`, the ratio of two arms' medians, if both ran.
fn ratio(value: &Arm, of: &Arm) -> Option<f64> {
    (!value.runs.is_empty() && !of.runs.is_empty()).then(|| value.median_rate() / of.median_rate())
}

fn goal(name: &str, value: Option<f64>, target: f64) {
    if let Some(value) = value {
        let met = if value >= target { "met" } else { "NOT met" };
        println!("  {name:<58} {value:>8.3} (goal >= {target}) {met}");
    }
}

fn info(name: &str, value: Option<f64>) {
    if let Some(value) = value {
        println!("  {name:<58} {value:>8.2}");
    }
}

/// Runs `arm` with the log filter switched to `error`, then restores the process's own.
async fn at_error_level<T>(
    telemetry: &Telemetry,
    arm: impl std::future::Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<T> {
    telemetry.set_log_filter(Some("error"))?;
    let result = arm.await;
    telemetry.set_log_filter(None)?;
    result
}

pub(crate) async fn run(args: BenchArgs, telemetry: &Telemetry) -> anyhow::Result<()> {
    if let Some(topic) = &args.drain_topic {
        return drain(&args, topic).await;
    }
    if let Some(topic) = &args.stuck_topic {
        return stuck(&args, topic).await;
    }
    let wants = |group: &str| args.only.is_empty() || args.only.iter().any(|o| o == group);
    let level = telemetry.log_filter().to_owned();
    let run_id = uuid::Uuid::new_v4().simple().to_string();
    let mut report = Report::new(&level);
    if wants("base")
        || wants("io")
        || wants("cpu")
        || args.backlog.is_some()
        || !args.stuck.is_empty()
    {
        kafka_arms(&args, telemetry, &run_id, &mut report).await?;
    } else {
        println!(
            "weir bench: {} in-process records, {} rounds",
            args.records, args.rounds
        );
    }
    in_process_arms(&args, telemetry, &run_id, &mut report).await?;
    report.print();
    if let Some(output) = report.backlog {
        println!();
        print!("{output}");
    }
    if let Some(output) = report.stuck {
        println!();
        print!("{output}");
    }
    Ok(())
}

/// Every arm's runs, printed together at the end.
struct Report {
    level: String,
    a0: Arm,
    a1: Arm,
    w: Arm,
    w_error: Arm,
    /// W with a status reporter publishing every [`REPORT_INTERVAL`].
    w_report: Arm,
    io_p: Arm,
    io_k: Arm,
    cpu_p: Arm,
    cpu_k: Arm,
    a1_mem: Arm,
    w_mem: Arm,
    w_mem_error: Arm,
    /// W's consumer settings, for the in-flight bound.
    max_in_flight: usize,
    backlog: Option<String>,
    stuck: Option<String>,
}

impl Report {
    fn new(level: &str) -> Self {
        Self {
            level: level.to_owned(),
            a0: Arm::new("A0 raw loop"),
            a1: Arm::new("A1 typed at-least-once"),
            w: Arm::new(format!("W weir no-op [{level}]")),
            w_error: Arm::new("W weir no-op [error]"),
            w_report: Arm::new(format!(
                "W reporting every {} ms [{level}]",
                REPORT_INTERVAL.as_millis()
            )),
            io_p: Arm::new(format!("W-io-partition [{level}]")),
            io_k: Arm::new(format!("W-io-key [{level}]")),
            cpu_p: Arm::new(format!("W-cpu-partition [{level}]")),
            cpu_k: Arm::new(format!("W-cpu-key [{level}]")),
            a1_mem: Arm::new("A1-mem hand loop"),
            w_mem: Arm::new(format!("W-mem weir no-op [{level}]")),
            w_mem_error: Arm::new("W-mem weir no-op [error]"),
            max_in_flight: ConsumerConfig::new("bench").max_in_flight,
            backlog: None,
            stuck: None,
        }
    }

    fn print(&self) {
        println!();
        print_arms(&[
            &self.a0,
            &self.a1,
            &self.w,
            &self.w_error,
            &self.w_report,
            &self.io_p,
            &self.io_k,
            &self.cpu_p,
            &self.cpu_k,
            &self.a1_mem,
            &self.w_mem,
            &self.w_mem_error,
        ]);
        let level = &self.level;
        println!();
        println!("ratios (medians); [{level}] is the log level `weir serve` runs at by default (or RUST_LOG's), [error] the framework without its logging");
        goal(
            &format!("W [{level}] / A1 (broker)"),
            ratio(&self.w, &self.a1),
            0.95,
        );
        info(
            "W [error] / A1 (broker, framework only)",
            ratio(&self.w_error, &self.a1),
        );
        // Reporting must never slow consumption: W with a reporter publishing 50 times as
        // often as `weir serve`'s default, against W in the same rounds. W's own spread over
        // its rounds is the noise to compare the difference with.
        goal(
            &format!("W reporting every {} ms / W", REPORT_INTERVAL.as_millis()),
            ratio(&self.w_report, &self.w),
            0.95,
        );
        info(
            "W's spread over rounds (slowest / fastest)",
            self.w.spread(),
        );
        goal(
            &format!("W-mem [{level}] / A1-mem (in process)"),
            ratio(&self.w_mem, &self.a1_mem),
            0.8,
        );
        info(
            "W-mem [error] / A1-mem (in process, framework only)",
            ratio(&self.w_mem_error, &self.a1_mem),
        );
        // Partition order runs one record per partition at a time: 4 partitions / 10 ms.
        let partition_bound = IO_PARTITIONS as f64 / IO_LATENCY.as_secs_f64();
        goal(
            &format!(
                "W-io-partition / its bound ({IO_PARTITIONS} partitions / {} ms)",
                IO_LATENCY.as_millis()
            ),
            (!self.io_p.runs.is_empty()).then(|| self.io_p.median_rate() / partition_bound),
            0.9,
        );
        // At most `max_in_flight` records run at once, and with key order at most one per key.
        let concurrency = self.max_in_flight.min(KEYS);
        let in_flight_bound = concurrency as f64 / IO_LATENCY.as_secs_f64();
        // The bound is a steady state (every slot busy): judged on the middle 80 % of the
        // records, without filling the slots at the start and emptying them at the end. The
        // whole run's ratio is printed too.
        let steady = median(self.io_k.runs.iter().filter_map(|r| r.steady).collect());
        goal(
            &format!(
                "W-io-key steady / in-flight bound ({concurrency} / {} ms)",
                IO_LATENCY.as_millis()
            ),
            (!self.io_k.runs.is_empty()).then(|| steady / in_flight_bound),
            0.8,
        );
        info(
            "W-io-key whole run / in-flight bound",
            (!self.io_k.runs.is_empty()).then(|| self.io_k.median_rate() / in_flight_bound),
        );
        goal(
            "W-cpu-key / W-cpu-partition",
            ratio(&self.cpu_k, &self.cpu_p),
            0.9,
        );
        info("W-io-key / W-io-partition", ratio(&self.io_k, &self.io_p));
        info("A0 (client ceiling) / A1", ratio(&self.a0, &self.a1));
    }
}

/// The arms that read from Kafka (the embedded mock cluster or `--brokers`), and the backlog.
async fn kafka_arms(
    args: &BenchArgs,
    telemetry: &Telemetry,
    run_id: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let wants = |group: &str| args.only.is_empty() || args.only.iter().any(|o| o == group);
    /// Bytes per partition the mock cluster keeps before deleting old records (measured: about
    /// 11,500 bench records of ~440 bytes on the wire).
    const MOCK_RETENTION_BYTES: usize = 5 * 1024 * 1024;
    if args.brokers.is_none() {
        anyhow::ensure!(
            args.backlog.is_none(),
            "--backlog needs --brokers: the mock cluster keeps about 5 MB per partition"
        );
        anyhow::ensure!(
            args.stuck.is_empty(),
            "--stuck needs --brokers: the mock cluster keeps about 5 MB per partition"
        );
        anyhow::ensure!(
            args.records * 440 / 8 < MOCK_RETENTION_BYTES && args.io_records * 440 / IO_PARTITIONS < MOCK_RETENTION_BYTES,
            "the mock cluster keeps about 5 MB per partition: use at most ~90,000 --records and ~45,000 --io-records, or --brokers"
        );
    }
    let target = match &args.brokers {
        Some(brokers) => Target {
            kafka: kafka_config(args, brokers.clone()),
            mock: None,
        },
        None => {
            let mock = MockCluster::new(1).context("cannot start the embedded mock cluster")?;
            Target {
                kafka: kafka_config(args, mock.bootstrap_servers()),
                mock: Some(mock),
            }
        }
    };
    println!(
        "weir bench: {} records (8 partitions), {} I/O records ({IO_PARTITIONS} partitions), {} rounds, broker: {}",
        args.records,
        args.io_records,
        args.rounds,
        args.brokers.as_deref().unwrap_or("embedded mock cluster")
    );
    for (k, v) in &args.kafka {
        println!("consumer property: {k}={v}");
    }
    if let Some(secs) = args.prefetch {
        println!(
            "prefetched mode: A0, A1 and W start their clocks {secs} s after their first record"
        );
    }
    println!(
        "machine: {} cores; log filter: {} (JSON lines, as `weir serve`)",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        report.level
    );
    let main_topic = format!("bench-{run_id}");
    let io_topic = format!("bench-io-{run_id}");
    target.create_topic(&main_topic, 8).await?;
    target.create_topic(&io_topic, IO_PARTITIONS as i32).await?;
    prefill(&target.kafka, &main_topic, args.records).await?;
    prefill(&target.kafka, &io_topic, args.io_records).await?;
    let bus = KafkaBus::new(target.kafka.clone())?;
    let consumer = |order: ProcessingOrder| {
        let mut c =
            ConsumerConfig::new(format!("bench-{}", uuid::Uuid::new_v4().simple())).order(order);
        c.max_in_flight = args.max_in_flight.unwrap_or(c.max_in_flight);
        c.max_in_flight_per_partition = args
            .max_in_flight_per_partition
            .unwrap_or(c.max_in_flight_per_partition);
        c
    };
    report.max_in_flight = consumer(ProcessingOrder::Key).max_in_flight;

    // 1. Framework overhead against the client's ceiling and a hand-written loop.
    let warmup = args.prefetch.map(Duration::from_secs);
    for round in 0..args.rounds {
        if !wants("base") {
            break;
        }
        eprintln!(
            "round {}/{}: A0, A1, W, W [error], W reporting",
            round + 1,
            args.rounds
        );
        let (kafka, topic, n) = (target.kafka.clone(), main_topic.clone(), args.records);
        report.a0.runs.push(
            tokio::task::spawn_blocking(move || hand_loop(&kafka, &topic, n, false, warmup))
                .await??,
        );
        let (kafka, topic) = (target.kafka.clone(), main_topic.clone());
        report.a1.runs.push(
            tokio::task::spawn_blocking(move || hand_loop(&kafka, &topic, n, true, warmup))
                .await??,
        );
        let noop = || {
            weir_arm(
                &bus,
                &main_topic,
                args.records,
                Work::Noop,
                consumer(ProcessingOrder::Key),
                warmup,
            )
        };
        report.w.runs.push(noop().await?);
        report
            .w_error
            .runs
            .push(at_error_level(telemetry, noop()).await?);
        let mut reporting = ReporterConfig::default();
        reporting.status_topic = format!("bench-status-{run_id}");
        reporting.report_interval = REPORT_INTERVAL;
        report.w_report.runs.push(
            weir_arm_reporting(
                &bus,
                &main_topic,
                args.records,
                Work::Noop,
                consumer(ProcessingOrder::Key),
                warmup,
                Some(StatusReporter::new(&bus, reporting, "bench")),
            )
            .await?,
        );
    }

    // 2. I/O-bound handlers: one record per partition at a time vs per key.
    let io_partition_n = (args.io_records / IO_PARTITIONS).max(1);
    for round in 0..args.rounds {
        if !wants("io") {
            break;
        }
        eprintln!(
            "round {}/{}: W-io-partition, W-io-key",
            round + 1,
            args.rounds
        );
        report.io_p.runs.push(
            weir_arm(
                &bus,
                &io_topic,
                io_partition_n,
                Work::Io,
                consumer(ProcessingOrder::Partition),
                None,
            )
            .await?,
        );
        report.io_k.runs.push(
            weir_arm(
                &bus,
                &io_topic,
                args.io_records,
                Work::Io,
                consumer(ProcessingOrder::Key),
                None,
            )
            .await?,
        );
    }

    // 3. CPU-bound handlers.
    let cpu_n = args.records.min(50_000);
    for round in 0..args.rounds {
        if !wants("cpu") {
            break;
        }
        eprintln!(
            "round {}/{}: W-cpu-partition, W-cpu-key",
            round + 1,
            args.rounds
        );
        report.cpu_p.runs.push(
            weir_arm(
                &bus,
                &main_topic,
                cpu_n,
                Work::Cpu,
                consumer(ProcessingOrder::Partition),
                None,
            )
            .await?,
        );
        report.cpu_k.runs.push(
            weir_arm(
                &bus,
                &main_topic,
                cpu_n,
                Work::Cpu,
                consumer(ProcessingOrder::Key),
                None,
            )
            .await?,
        );
    }

    if let Some(backlog) = args.backlog {
        let topic = format!("bench-backlog-{run_id}");
        target.create_topic(&topic, 8).await?;
        prefill(&target.kafka, &topic, backlog).await?;
        // Drain in a fresh process, so its peak RSS is Weir's alone and not what this one's
        // pre-filling producer left on the heap. It inherits RUST_LOG, so it logs at this
        // process's level.
        let output = tokio::process::Command::new(std::env::current_exe()?)
            .args([
                "bench",
                "--drain-topic",
                &topic,
                "--records",
                &backlog.to_string(),
            ])
            .args(["--brokers", &target.kafka.brokers])
            .args(
                args.kafka
                    .iter()
                    .flat_map(|(k, v)| ["--kafka".to_owned(), format!("{k}={v}")]),
            )
            .stderr(std::process::Stdio::inherit())
            .output()
            .await?;
        anyhow::ensure!(output.status.success(), "the drain process failed");
        report.backlog = Some(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    if !args.stuck.is_empty() {
        report.stuck = Some(stuck_arms(args, &target, run_id).await?);
    }
    Ok(())
}

/// In process: records already in memory, so only the framework's own work is timed.
async fn in_process_arms(
    args: &BenchArgs,
    telemetry: &Telemetry,
    run_id: &str,
    report: &mut Report,
) -> anyhow::Result<()> {
    let only = |group: &str| args.only.iter().any(|o| o == group);
    let all = args.only.is_empty() || only("mem");
    let setup_only = only("mem-setup");
    if !(all || setup_only || only("mem-a1") || only("mem-w") || only("mem-w-error")) {
        return Ok(());
    }
    let wants = |arm: &str| all || only(arm);
    let mem_n = args.records;
    let memory = MemoryBus::new(MemoryConfig {
        default_partitions: 8,
        capacity_per_partition: mem_n,
        ..MemoryConfig::default()
    });
    let encoded: Vec<(String, Vec<u8>)> = (0..mem_n)
        .map(|i| {
            let e = payload(i);
            (e.key(), e.to_structured().expect("serializable"))
        })
        .collect();
    let consumer = || {
        let mut c = ConsumerConfig::new(format!("bench-{}", uuid::Uuid::new_v4().simple()));
        c.max_in_flight = args.max_in_flight.unwrap_or(c.max_in_flight);
        c.max_in_flight_per_partition = args
            .max_in_flight_per_partition
            .unwrap_or(c.max_in_flight_per_partition);
        c
    };
    for round in 0..args.rounds {
        eprintln!(
            "round {}/{}: A1-mem, W-mem, W-mem [error]",
            round + 1,
            args.rounds
        );
        // A topic per W arm and round: the memory bus drops records every reading group has
        // committed. Both are filled whichever arms run, so `mem-setup` does the same work.
        let topics = [
            format!("bench-mem-{run_id}-{round}"),
            format!("bench-mem-error-{run_id}-{round}"),
        ];
        for topic in &topics {
            memory.create_topic(topic, 8);
            for (key, value) in &encoded {
                let record = weir::OutboundRecord {
                    topic: topic.clone(),
                    key: Some(key.clone().into_bytes()),
                    value: Some(value.clone()),
                    headers: weir::Headers::new()
                        .with("content-type", weir::CLOUDEVENTS_CONTENT_TYPE),
                };
                weir::Publisher::publish_record(&memory, record).await?;
            }
        }
        if wants("mem-a1") {
            let rss = reset_peak_rss();
            let started = Instant::now();
            let mut positions = std::collections::HashMap::new();
            for (i, (_, value)) in encoded.iter().enumerate() {
                let event: CloudEventIn = serde_json::from_slice(value)?;
                std::hint::black_box(&event);
                positions.insert(i % 8, i + 1);
            }
            report.a1_mem.runs.push(Run {
                rate: mem_n as f64 / started.elapsed().as_secs_f64().max(1e-9),
                steady: None,
                p50: None,
                p99: None,
                rss_growth_kib: peak_growth(rss),
            });
        }
        if wants("mem-w") {
            report
                .w_mem
                .runs
                .push(weir_arm(&memory, &topics[0], mem_n, Work::Noop, consumer(), None).await?);
        }
        if wants("mem-w-error") {
            let arm = weir_arm(&memory, &topics[1], mem_n, Work::Noop, consumer(), None);
            report
                .w_mem_error
                .runs
                .push(at_error_level(telemetry, arm).await?);
        }
    }
    Ok(())
}
