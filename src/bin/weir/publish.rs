//! `weir publish`: the manual trigger.
//!
//! Two forms:
//! - `weir publish --topic T --type E --key K --data JSON` wraps `--data` in a CloudEvent and
//!   publishes it straight to the broker, waiting for its acknowledgement;
//! - `weir publish --process-task <TASK ID>` asks for a task's processing: it writes
//!   `task.processing_requested` (`triggered_by: manual`) through the outbox of the configured
//!   database (`WEIR_DATABASE__URL`), in a transaction that checks the task exists, exactly as
//!   the other triggers do; the relay publishes it. Nothing is written for an unknown task.

use crate::config::Settings;
use crate::reference::events::TriggeredBy;
use anyhow::Context as _;
use chrono::Utc;
use weir::{
    Envelope, EventMeta, Headers, KafkaBus, KafkaConfig, OutboundRecord, Publisher,
    CLOUDEVENTS_CONTENT_TYPE,
};

#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    /// Ask for the processing of this task (a manual trigger through the outbox; needs the
    /// database). Replaces --topic, --type, --key and --data.
    #[arg(long, value_name = "TASK_ID", conflicts_with_all = ["topic", "event_type", "key", "data"])]
    process_task: Option<uuid::Uuid>,
    /// Topic to publish to.
    #[arg(long, required_unless_present = "process_task")]
    topic: Option<String>,
    /// CloudEvents type, e.g. task.processing_requested.
    #[arg(long = "type", required_unless_present = "process_task")]
    event_type: Option<String>,
    /// Record key: the entity id.
    #[arg(long, required_unless_present = "process_task")]
    key: Option<String>,
    /// The event data, as JSON.
    #[arg(long, required_unless_present = "process_task")]
    data: Option<String>,
    /// CloudEvents source.
    #[arg(long, default_value = "/weir-cli")]
    source: String,
    /// How long to wait for the broker's acknowledgement.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

pub(crate) async fn run(settings: Settings, args: PublishArgs) -> anyhow::Result<()> {
    match args.process_task {
        Some(task_id) => request_processing(&settings, task_id).await,
        None => publish(settings.kafka, args).await,
    }
}

async fn request_processing(settings: &Settings, task_id: uuid::Uuid) -> anyhow::Result<()> {
    let pool = crate::db::connect(&settings.database).await?;
    let mut tx = pool.begin().await?;
    let event_id =
        crate::reference::tasks::store::request_processing(&mut tx, task_id, TriggeredBy::Manual)
            .await?
            .with_context(|| format!("no task {task_id}: nothing was requested"))?;
    tx.commit().await?;
    pool.close().await;
    println!(
        "requested processing of task {task_id}: event {event_id} is in the outbox (triggered_by manual)"
    );
    Ok(())
}

async fn publish(kafka: KafkaConfig, args: PublishArgs) -> anyhow::Result<()> {
    let (Some(topic), Some(event_type), Some(key), Some(data)) =
        (args.topic, args.event_type, args.key, args.data)
    else {
        anyhow::bail!("--topic, --type, --key and --data are required");
    };
    let data: serde_json::Value =
        serde_json::from_str(&data).context("--data is not valid JSON")?;
    let envelope = Envelope {
        meta: EventMeta {
            id: uuid::Uuid::now_v7(),
            event_type,
            source: args.source,
            time: Some(Utc::now()),
            subject: Some(key.clone()),
            dataschema: None,
        },
        data,
    };
    let brokers = kafka.brokers.clone();
    let bus = KafkaBus::new(KafkaConfig {
        delivery_timeout: args.timeout,
        ..kafka
    })?;
    let record = OutboundRecord {
        topic,
        key: Some(key.into_bytes()),
        value: Some(envelope.to_structured()?),
        headers: Headers::new().with("content-type", CLOUDEVENTS_CONTENT_TYPE),
    };
    let delivery = bus
        .publish_record(record)
        .await
        .with_context(|| format!("publishing to {brokers} failed"))?;
    println!(
        "published {} to {} partition {} offset {}",
        envelope.meta.id, delivery.topic, delivery.partition, delivery.offset
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Cli {
        #[command(flatten)]
        args: PublishArgs,
    }

    #[test]
    fn process_task_stands_alone_and_the_raw_form_needs_all_four_arguments() {
        let id = "0190d6a2-0000-7000-8000-000000000000";
        let cli = Cli::try_parse_from(["publish", "--process-task", id]).unwrap();
        assert_eq!(cli.args.process_task.unwrap().to_string(), id);
        assert!(Cli::try_parse_from(["publish", "--process-task", id, "--topic", "t"]).is_err());
        assert!(Cli::try_parse_from(["publish", "--topic", "t", "--type", "e"]).is_err());
        let raw = [
            "publish", "--topic", "t", "--type", "e", "--key", "k", "--data", "{}",
        ];
        assert!(Cli::try_parse_from(raw).is_ok());
        assert!(Cli::try_parse_from(["publish", "--process-task", "not-a-uuid"]).is_err());
    }
}
