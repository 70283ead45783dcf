//! The `weir` binary: the reference service (`serve`), the manual trigger (`publish`) and the
//! demo on an embedded broker (`demo`, also what plain `cargo run` does).

mod config;
mod demo;
mod publish;
mod reference;
mod serve;

use clap::{Parser, Subcommand};
use std::path::PathBuf;
use tracing_subscriber::EnvFilter;

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
    /// Publish one CloudEvent and print where it was written.
    Publish(publish::PublishArgs),
    /// Run the reference service on an embedded mock broker with a sample stream (the default).
    Demo,
}

fn init_logs(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| {
        EnvFilter::new(if json {
            "info"
        } else {
            "warn,weir=info,librdkafka=error"
        })
    });
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.compact().init();
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command.unwrap_or(Command::Demo) {
        Command::Serve => {
            init_logs(true);
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            serve::run(settings).await
        }
        Command::Publish(args) => {
            init_logs(false);
            let settings = config::Settings::load(cli.config.as_deref(), cli.brokers)?;
            publish::run(settings.kafka, args).await
        }
        Command::Demo => {
            init_logs(false);
            demo::run().await
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
