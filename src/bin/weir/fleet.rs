//! `weir fleet`: issue fleet commands (pause, resume, quiet, unquiet) to every `weir serve`,
//! `retry-worker` and `outbox-relay` through the commands topic (`[control] commands_topic`).
//! Prints the command published, as one JSON line; each process acknowledges its id in its
//! next status report.

use crate::config::Settings;
use anyhow::Context as _;
use clap::{Args, Subcommand};
use weir::{Addressee, CommandAction, CommandPublisher, CommandTarget, FleetCommand, KafkaBus};

#[derive(Debug, Args)]
pub(crate) struct FleetArgs {
    #[command(subcommand)]
    command: FleetCommandArgs,
}

#[derive(Debug, Subcommand)]
enum FleetCommandArgs {
    /// Pause a topic, a partition or a route (every process, or --process), until a resume of
    /// the same target. In-flight records finish; offsets keep committing.
    Pause(TargetArgs),
    /// Lift a fleet pause of the same target (not a pause of a breaker or of the library API).
    Resume(TargetArgs),
    /// Take no new records of any topic (in-flight records finish), until unquiet.
    Quiet(WhoArgs),
    /// Lift a quiet.
    Unquiet(WhoArgs),
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("what").required(true).args(["topic", "route"]))]
struct TargetArgs {
    /// The topic to pause or resume (every partition, unless --partition).
    #[arg(long)]
    topic: Option<String>,
    /// One partition of --topic.
    #[arg(long, requires = "topic")]
    partition: Option<i32>,
    /// A route: a handler's name (every partition of the topics it consumes).
    #[arg(long, conflicts_with = "topic")]
    route: Option<String>,
    /// Only the process with this id (the key of its status reports); every process otherwise.
    #[arg(long)]
    process: Option<String>,
    /// Who issues the command, for the audit trail (default: $USER).
    #[arg(long)]
    issuer: Option<String>,
}

#[derive(Debug, Args)]
#[command(group = clap::ArgGroup::new("who").required(true).args(["process", "all"]))]
struct WhoArgs {
    /// The process with this id (the key of its status reports).
    #[arg(long)]
    process: Option<String>,
    /// Every process.
    #[arg(long)]
    all: bool,
    /// Who issues the command, for the audit trail (default: $USER).
    #[arg(long)]
    issuer: Option<String>,
}

fn addressee(process: Option<String>) -> Addressee {
    process.map_or(Addressee::All, Addressee::Process)
}

fn issuer(given: Option<String>) -> String {
    given
        .or_else(|| std::env::var("USER").ok())
        .unwrap_or_else(|| "weir-cli".to_owned())
}

impl TargetArgs {
    fn target(&self) -> CommandTarget {
        match (&self.topic, self.partition, &self.route) {
            (Some(topic), Some(partition), _) => CommandTarget::Partition {
                topic: topic.clone(),
                partition,
            },
            (Some(topic), None, _) => CommandTarget::Topic {
                topic: topic.clone(),
            },
            (None, _, Some(route)) => CommandTarget::Route {
                route: route.clone(),
            },
            (None, _, None) => unreachable!("clap requires --topic or --route"),
        }
    }
}

pub(crate) async fn run(settings: Settings, args: FleetArgs) -> anyhow::Result<()> {
    let command = match args.command {
        FleetCommandArgs::Pause(t) => FleetCommand::new(
            issuer(t.issuer.clone()),
            addressee(t.process.clone()),
            CommandAction::Pause { target: t.target() },
        ),
        FleetCommandArgs::Resume(t) => FleetCommand::new(
            issuer(t.issuer.clone()),
            addressee(t.process.clone()),
            CommandAction::Resume { target: t.target() },
        ),
        FleetCommandArgs::Quiet(w) => {
            FleetCommand::new(issuer(w.issuer), addressee(w.process), CommandAction::Quiet)
        }
        FleetCommandArgs::Unquiet(w) => FleetCommand::new(
            issuer(w.issuer),
            addressee(w.process),
            CommandAction::Unquiet,
        ),
    };
    let bus = KafkaBus::new(settings.kafka.clone())?;
    let publisher = CommandPublisher::new(&bus, settings.control.commands_topic.clone());
    publisher.publish(&command).await.with_context(|| {
        format!(
            "cannot publish the command to {}",
            settings.control.commands_topic
        )
    })?;
    println!("{}", serde_json::to_string(&command)?);
    Ok(())
}
