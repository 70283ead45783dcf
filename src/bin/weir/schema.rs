//! `weir schema`: the reference service's contracts as documents, and the breaking-change check
//! CI runs against the saved document (`contracts/asyncapi.yaml`).

use crate::config::Settings;
use crate::reference::{self, Recorder, Services, TestHooks};
use anyhow::Context as _;
use clap::{Args, Subcommand, ValueEnum};
use std::path::PathBuf;
use std::sync::Arc;
use weir::schema::{AsyncApi, Document};

#[derive(Debug, Args)]
pub(crate) struct SchemaArgs {
    #[command(subcommand)]
    command: SchemaCommand,
}

#[derive(Debug, Subcommand)]
enum SchemaCommand {
    /// Print the service's AsyncAPI 3.0 document: topics, handlers, messages, dead letters.
    Asyncapi {
        /// Output format.
        #[arg(long, value_enum, default_value_t = Format::Yaml)]
        format: Format,
    },
    /// Print the JSON Schema (draft 7) of one event type's data, e.g. `--type task.created`.
    Json {
        /// The CloudEvents type.
        #[arg(long = "type", value_name = "TYPE")]
        event_type: String,
    },
    /// Compare the current contracts with a saved AsyncAPI document (YAML or JSON); print every
    /// change and exit non-zero if any of them is breaking.
    Check {
        /// The saved document, e.g. contracts/asyncapi.yaml.
        #[arg(long, value_name = "FILE")]
        baseline: PathBuf,
    },
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Yaml,
    Json,
}

/// The reference service's document: its whole router (built, never run: the database pool the
/// handlers hold is lazy and never connects), the consumer group and dead-letter topics of the
/// configuration, and what the service says it publishes.
pub(crate) fn document(settings: &Settings) -> anyhow::Result<Document> {
    let url = settings
        .database
        .url
        .as_deref()
        .unwrap_or("postgres://localhost/weir");
    let services = Services {
        pool: sqlx::postgres::PgPoolOptions::new().connect_lazy(url)?,
        settings: Arc::new(settings.reference()),
    };
    // The hooks change what handlers do, not what they consume: the document is the same.
    let router = reference::router(&Recorder::default(), TestHooks::Off, Some(&services))?;
    let dead_letters = settings.consumer.dead_letter.clone();
    let api = AsyncApi::new("Weir reference service", env!("CARGO_PKG_VERSION"))
        .consumer_group(settings.consumer.group_id.as_str())
        .dead_letter_topics(move |topic| dead_letters.topic_for(topic));
    Ok(router.asyncapi(&reference::describe(api)))
}

pub(crate) fn run(settings: Settings, args: SchemaArgs) -> anyhow::Result<()> {
    let document = document(&settings)?;
    match args.command {
        SchemaCommand::Asyncapi { format } => {
            let text = match format {
                Format::Yaml => document.to_yaml()?,
                Format::Json => document.to_json()? + "\n",
            };
            print!("{text}");
        }
        SchemaCommand::Json { event_type } => {
            let schema = document.data_schema(&event_type).with_context(|| {
                format!(
                    "no event type {event_type:?}; the service's types are: {}",
                    document.event_types().join(", ")
                )
            })?;
            println!("{}", serde_json::to_string_pretty(&schema)?);
        }
        SchemaCommand::Check { baseline } => {
            let text = std::fs::read_to_string(&baseline)
                .with_context(|| format!("cannot read {}", baseline.display()))?;
            let saved = Document::parse(&text)
                .with_context(|| format!("cannot read {}", baseline.display()))?;
            let report = document.check(&saved);
            for change in &report.changes {
                println!("{change}");
            }
            let breaking = report.breaking().count();
            if breaking > 0 {
                anyhow::bail!(
                    "{breaking} breaking change(s) against {}. Publish an incompatible contract \
                     under a new event type (e.g. task.created.v2); update the baseline only \
                     once no consumer or producer depends on the old one.",
                    baseline.display()
                );
            }
            println!(
                "compatible with {} ({} change(s))",
                baseline.display(),
                report.changes.len()
            );
        }
    }
    Ok(())
}
