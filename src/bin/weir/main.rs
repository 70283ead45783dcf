//! The `weir` binary: the reference service (`serve`), the manual trigger (`publish`) and the
//! demo on an embedded broker (`demo`, also what plain `cargo run` does).

mod bench;
mod config;
mod db;
mod demo;
mod outbox_relay;
mod publish;
mod reference;
mod serve;
mod telemetry;
mod upload_bench;
mod worker;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

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
    Bench(bench::BenchArgs),
    /// Measure seed 004: upload latency with side effects in the request vs in event handlers.
    BenchUploads(upload_bench::UploadBenchArgs),
    /// Apply pending database migrations (outbox, inbox, the reference service's tables).
    Migrate,
    /// Publish committed outbox rows until SIGTERM/SIGINT.
    OutboxRelay,
    /// Run the Temporal worker of task processing alone until SIGTERM/SIGINT (needs
    /// [temporal] address and [database] url).
    Worker,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Demo) {
        Command::Serve => {
            let _telemetry = telemetry::init(true)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            serve::run(settings).await
        }
        Command::Publish(args) => {
            let _telemetry = telemetry::init(false)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            publish::run(settings, args).await
        }
        Command::Bench(args) => {
            let _telemetry = telemetry::init(false)?;
            bench::run(args).await
        }
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
            let _telemetry = telemetry::init(true)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            outbox_relay::run(settings).await
        }
        Command::Worker => {
            let _telemetry = telemetry::init(true)?;
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            worker::run(settings).await
        }
    }
}

/// Resolves on SIGTERM (Kubernetes' stop signal) or SIGINT (Ctrl-C).
pub(crate) async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("installing a SIGTERM handler cannot fail on Unix");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
