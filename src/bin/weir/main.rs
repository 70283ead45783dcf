//! The `weir` binary: the reference service (`serve`), the manual trigger (`publish`) and the
//! demo on an embedded broker (`demo`, also what plain `cargo run` does).

/// mimalloc rather than glibc's malloc: every record's buffers are allocated on the thread that
/// reads them and freed on the one that handles them, and glibc's malloc spent more
/// instructions on that than the rest of the framework (BENCHMARKS.md, "Instructions per
/// record"). A library user picks their own allocator; this is the service's choice.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[cfg(feature = "bench")]
mod bench;
mod config;
#[cfg(feature = "console")]
mod console;
mod db;
mod demo;
mod dlq;
mod fleet;
mod inspect;
mod kafka_read;
mod liveness;
mod outbox_relay;
mod publish;
mod reference;
mod retry_worker;
mod schema;
mod serve;
mod telemetry;
#[cfg(feature = "bench")]
mod upload_bench;
mod worker;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// Typed Kafka consumers: the Weir reference service and tools.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// TOML configuration file (environment variables WEIR_* override it).
    #[arg(long, global = true, env = "WEIR_CONFIG")]
    config: Option<PathBuf>,
    /// Bootstrap brokers, overriding the configuration (same as WEIR_BROKERS).
    #[arg(long, global = true)]
    brokers: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the reference service against the configured brokers until SIGTERM/SIGINT.
    Serve,
    /// Publish one CloudEvent, or ask for a task's processing (--process-task).
    Publish(publish::PublishArgs),
    /// Run the reference service on an embedded mock broker with a sample stream (the default).
    Demo,
    /// Measure Weir against hand-written rdkafka loops (embedded mock broker by default).
    #[cfg(feature = "bench")]
    Bench(bench::BenchArgs),
    /// Measure upload latency with resource side effects in the request vs in event handlers.
    #[cfg(feature = "bench")]
    BenchUploads(upload_bench::UploadBenchArgs),
    /// Apply pending database migrations (outbox, inbox, the reference service's tables).
    Migrate,
    /// Publish committed outbox rows until SIGTERM/SIGINT.
    OutboxRelay,
    /// Retry parked records (durable retries) until SIGTERM/SIGINT; `serve` runs one too unless
    /// service.retry_worker = false.
    RetryWorker,
    /// Inspect and redrive dead-letter topics: list, show, replay.
    Dlq(dlq::DlqArgs),
    /// One look at a consumer group: members, committed offsets and lag, dead letters, parked
    /// records and the outbox.
    Inspect(inspect::InspectArgs),
    /// Run the Temporal worker of task processing alone until SIGTERM/SIGINT (needs
    /// [temporal] address and [database] url).
    Worker,
    /// Steer every process (or one) through the commands topic: pause, resume, quiet, unquiet.
    Fleet(fleet::FleetArgs),
    /// The service's contracts as documents (AsyncAPI 3.0, JSON Schema) and the check CI runs.
    Schema(schema::SchemaArgs),
    /// Serve the fleet's web console until SIGTERM/SIGINT: processes, partitions, lag, errors,
    /// dead letters and their replay, from Kafka alone.
    #[cfg(feature = "console")]
    Console(console::ConsoleArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Demo) {
        Command::Serve => {
            let stop = stop_on_signal()?;
            let _telemetry = telemetry::init(true)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            serve::run(settings, stop).await
        }
        Command::Publish(args) => {
            let _telemetry = telemetry::init(false)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            publish::run(settings, args).await
        }
        #[cfg(feature = "bench")]
        Command::Bench(args) => {
            // The service's own subscriber (JSON, `info` unless RUST_LOG says otherwise), so
            // the bench measures what `weir serve` runs with.
            let telemetry = telemetry::init(true)?;
            bench::run(args, &telemetry).await
        }
        #[cfg(feature = "bench")]
        Command::BenchUploads(args) => {
            let _telemetry = telemetry::init(false)?;
            upload_bench::run(args).await
        }
        Command::Demo => {
            let _telemetry = telemetry::init(false)?;
            demo::run().await
        }
        Command::Migrate => {
            let _telemetry = telemetry::init(false)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            db::migrate(&settings.database).await
        }
        Command::OutboxRelay => {
            let stop = stop_on_signal()?;
            let _telemetry = telemetry::init(true)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            outbox_relay::run(settings, stop).await
        }
        Command::Worker => {
            let stop = stop_on_signal()?;
            let _telemetry = telemetry::init(true)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            worker::run(settings, stop).await
        }
        Command::Schema(args) => {
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            schema::run(settings, args)
        }
        Command::RetryWorker => {
            let _telemetry = telemetry::init(true)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            retry_worker::run(settings).await
        }
        Command::Dlq(args) => {
            let _telemetry = telemetry::init(false)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            dlq::run(settings.kafka, args).await
        }
        Command::Fleet(args) => {
            let _telemetry = telemetry::init(false)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            fleet::run(settings, args).await
        }
        #[cfg(feature = "console")]
        Command::Console(args) => {
            let stop = stop_on_signal()?;
            let _telemetry = telemetry::init(true)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            console::run(settings, args, stop).await
        }
        Command::Inspect(args) => {
            let _telemetry = telemetry::init(false)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            inspect::run(settings, args).await
        }
    }
}

/// A token cancelled on SIGTERM (Kubernetes' stop signal) or SIGINT (Ctrl-C). The handlers are
/// installed before this returns, so a stop that arrives while a command is still starting is
/// a clean stop (exit 0), not a kill by signal: call it first.
pub(crate) fn stop_on_signal() -> anyhow::Result<CancellationToken> {
    let token = CancellationToken::new();
    let cancel = token.clone();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
        let mut int = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            cancel.cancel();
        });
    }
    #[cfg(not(unix))]
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        cancel.cancel();
    });
    Ok(token)
}
