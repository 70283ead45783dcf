//! `weir-peers`: Weir against RustStream and hand-written rdkafka loops on a real broker
//! (issue 31, part 1). `scripts/bench-peers.sh` starts Tansu and runs it; BENCHMARKS.md,
//! "Weir against RustStream (issue 31)", has the command and a run.
//!
//! One topic of 8 partitions is filled with structured CloudEvents (about 545 B each, 1,000
//! keys). Every arm decodes each record into the same typed struct and counts it:
//!
//! - A0: a raw `BaseConsumer` loop that only counts (the client's ceiling);
//! - A1: a hand-written at-least-once loop: typed decode, then `store_offset`;
//! - RS: RustStream 0.7.7 with ruststream-rdkafka 0.7.1, a typed `#[subscriber]`,
//!   `Commit::Tracked`;
//! - W: Weir with a no-op typed handler, in key order and in partition order.
//!
//! The arms run in interleaved rounds (A0, A1, RS, W key, W partition, A0, ...), each in a fresh
//! consumer group, so drift in the machine's state hits them alike; medians are reported, with
//! every ratio. Two modes: broker-fed (the clock runs from an arm's first record to its last, so
//! the group join is not timed, and the client fetches as it goes), and prefetched (after its
//! first record each arm waits `--prefetch` seconds while the client fills its queues, then
//! starts the clock: the client's own cost, as `weir bench --prefetch`). Two configurations:
//! shared librdkafka settings, and each framework's defaults (see `settings`).

#![forbid(unsafe_code)]

mod event;
mod hand;
mod latency;
mod load;
mod mock;
mod plot;
mod report;
mod ruststream_arm;
mod settings;
mod tally;
mod weir_arm;

use anyhow::Context as _;
use clap::Parser;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use report::{ArmKind, Table};
use settings::{Client, Settings};
use std::time::{Duration, Instant};
use weir::ProcessingOrder;

/// How long one arm-run may take before the bench gives up on it.
pub(crate) const ARM_TIMEOUT: Duration = Duration::from_secs(600);
/// Partitions of every bench topic.
pub(crate) const PARTITIONS: i32 = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Part 1: throughput of every arm on one filled topic, both modes, interleaved rounds.
    Throughput,
    /// Part 2: produce→handler-entry latency at fixed offered rates (and `--search-from`).
    Latency,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    /// The clock starts at an arm's first record; the client fetches as it goes.
    BrokerFed,
    /// The clock starts `--prefetch` seconds after the first record, queues full.
    Prefetched,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::BrokerFed => "broker-fed",
            Mode::Prefetched => "prefetched",
        }
    }
}

/// Weir against RustStream and hand-written rdkafka loops, on a running broker.
#[derive(Debug, Parser)]
struct Args {
    /// Bootstrap servers of the broker to run against (scripts/bench-peers.sh starts Tansu).
    #[arg(
        long,
        required_unless_present = "mock",
        default_value = "",
        hide_default_value = true
    )]
    brokers: String,
    /// Run against librdkafka's embedded mock cluster instead: a check that every arm works,
    /// not a measurement (it keeps about 5 MB per partition; use a few thousand records).
    #[arg(long)]
    mock: bool,
    /// Records in the bench topic (8 partitions).
    #[arg(long, default_value_t = 200_000)]
    records: usize,
    /// Rounds of each comparison.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Prefetched mode: seconds each arm waits after its first record before its clock starts
    /// (time enough for its client to fetch the whole topic).
    #[arg(long, default_value_t = 8)]
    prefetch: u64,
    /// Modes to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Mode::Prefetched, Mode::BrokerFed])]
    modes: Vec<Mode>,
    /// Configurations to run (comma-separated).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Settings::Shared, Settings::Defaults])]
    settings: Vec<Settings>,
    /// Arms to run (comma-separated; all by default).
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = ArmKind::ALL)]
    arms: Vec<ArmKind>,
    /// Read this existing, filled topic instead of creating and filling a new one.
    #[arg(long)]
    topic: Option<String>,
    /// A librdkafka consumer property for every arm, in every configuration and part
    /// (repeatable: `--kafka fetch.wait.max.ms=10`), on top of the arm's own.
    #[arg(long = "kafka", value_name = "KEY=VALUE", value_parser = parse_property)]
    kafka: Vec<(String, String)>,
    /// What to run (comma-separated): the throughput comparison, the latency bench, or both.
    #[arg(long, value_enum, value_delimiter = ',', default_values_t = [Part::Throughput])]
    parts: Vec<Part>,
    /// Latency: the offered rates (msgs/s, comma-separated), each arm in turn. The latency
    /// part runs in the first of `--settings`.
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 10_000])]
    latency_rates: Vec<u64>,
    /// Latency: how long the producer offers each rate.
    #[arg(long, default_value_t = 60)]
    latency_seconds: u64,
    /// Latency: also search each arm's sustainable rate (p99 < 100 ms, nothing lost), doubling
    /// from this rate, then bisecting three times.
    #[arg(long)]
    search_from: Option<u64>,
    /// Latency: write each arm's and rate's distribution here (`<arm>-<rate>.hgrm`,
    /// HdrHistogram's percentile format, in ms) and a chart per rate (`latency-<rate>.svg`).
    #[arg(long)]
    latency_out: Option<std::path::PathBuf>,
}

fn parse_property(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .ok_or_else(|| format!("expected KEY=VALUE, got {text:?}"))
}

/// A new consumer group name: every arm-run starts from the beginning of the topic.
pub(crate) fn fresh_group() -> String {
    format!("peers-{}", uuid::Uuid::new_v4().simple())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = Args::parse();
    if args.mock {
        args.brokers = mock::start().context("starting the mock cluster")?;
    }
    if args.parts.contains(&Part::Throughput) {
        throughput(&args).await?;
    }
    if args.parts.contains(&Part::Latency) {
        let plan = load::LoadPlan {
            client: Client::new(
                args.settings.first().copied().unwrap_or(Settings::Shared),
                &args.brokers,
            )
            .with_all(&args.kafka),
            arms: args.arms.clone(),
            rates: args.latency_rates.clone(),
            seconds: args.latency_seconds,
            search_from: args.search_from,
            out: args.latency_out.clone(),
        };
        load::run(&plan).await?;
    }
    Ok(())
}

/// Part 1: every arm on one filled topic, in interleaved rounds, per configuration and mode.
async fn throughput(args: &Args) -> anyhow::Result<()> {
    let topic = match &args.topic {
        Some(topic) => topic.clone(),
        None => {
            let topic = format!("peers-{}", uuid::Uuid::new_v4().simple());
            create_topic(&args.brokers, &topic).await?;
            fill(&args.brokers, &topic, args.records).await?;
            topic
        }
    };
    println!(
        "weir-peers: {} records of {} B (structured CloudEvents, {} keys) on {PARTITIONS} partitions, {} rounds, broker {}",
        args.records,
        event::record(args.records / 2).1.len(),
        event::KEYS,
        args.rounds,
        args.brokers
    );
    println!(
        "machine: {} cores; prefetched mode waits {} s after each arm's first record, A0, A1 and RS with queues that hold the topic",
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        args.prefetch
    );
    for (k, v) in &args.kafka {
        println!("consumer property for every arm: {k}={v}");
    }
    let mut tables = Vec::new();
    for &settings in &args.settings {
        for &mode in &args.modes {
            let title = format!("{} / {}", settings.name(), mode.name());
            let mut table = Table::new(title.clone(), &args.arms);
            let warmup = (mode == Mode::Prefetched).then(|| Duration::from_secs(args.prefetch));
            let mut client = Client::new(settings, &args.brokers).with_all(&args.kafka);
            if mode == Mode::Prefetched {
                // A high-level consumer's queue bounds hold for its one queue: with Weir's
                // (10,000 records, 16 MiB) the hand loops and RS did not run ahead.
                client = client.holding(args.records, event::record(args.records / 2).1.len());
            }
            for round in 0..args.rounds {
                for &arm in &args.arms {
                    eprintln!(
                        "{title}: round {}/{}, {}",
                        round + 1,
                        args.rounds,
                        arm.label()
                    );
                    let rate = run_arm(arm, &client, &topic, args.records, warmup)
                        .await
                        .with_context(|| format!("{title}: {}", arm.label()))?;
                    eprintln!("  {rate:.0} msgs/s");
                    table.push(arm, rate);
                }
            }
            table.print();
            tables.push(table);
        }
    }
    println!();
    println!("all tables, again:");
    for table in &tables {
        table.print();
    }
    Ok(())
}

async fn run_arm(
    arm: ArmKind,
    client: &Client,
    topic: &str,
    n: usize,
    warmup: Option<Duration>,
) -> anyhow::Result<f64> {
    match arm {
        ArmKind::A0 | ArmKind::A1 => {
            let (client, topic) = (client.clone(), topic.to_owned());
            let typed = arm == ArmKind::A1;
            tokio::task::spawn_blocking(move || hand::run(&client, &topic, n, typed, warmup))
                .await?
        }
        ArmKind::Rs => ruststream_arm::run(client, topic, n, warmup).await,
        ArmKind::WKey => weir_arm::run(client, topic, n, ProcessingOrder::Key, warmup).await,
        ArmKind::WPartition => {
            weir_arm::run(client, topic, n, ProcessingOrder::Partition, warmup).await
        }
    }
}

pub(crate) async fn create_topic(brokers: &str, topic: &str) -> anyhow::Result<()> {
    if let Some(created) = mock::create_topic(topic, PARTITIONS) {
        return created;
    }
    let admin: AdminClient<DefaultClientContext> =
        weir::KafkaConfig::new(brokers).producer_config().create()?;
    let new = NewTopic::new(topic, PARTITIONS, TopicReplication::Fixed(1));
    for result in admin.create_topics([&new], &AdminOptions::new()).await? {
        result.map_err(|(t, e)| anyhow::anyhow!("creating {t}: {e}"))?;
    }
    Ok(())
}

/// Fills `topic` with `n` records, with Weir's producer settings and large batches.
async fn fill(brokers: &str, topic: &str, n: usize) -> anyhow::Result<()> {
    let mut config = weir::KafkaConfig::new(brokers).producer_config();
    config
        .set("linger.ms", "50")
        .set("batch.num.messages", "10000");
    let producer: FutureProducer = config.create()?;
    let started = Instant::now();
    for chunk in (0..n).collect::<Vec<_>>().chunks(20_000) {
        let sends = chunk.iter().map(|&i| {
            let (key, value) = event::record(i);
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
            result.context("filling the topic")?;
        }
    }
    eprintln!(
        "filled {topic} with {n} records in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
