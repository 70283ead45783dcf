//! `weir publish`: the manual trigger. Wraps `--data` in a CloudEvent and waits for the broker's
//! acknowledgement.

use anyhow::Context as _;
use chrono::Utc;
use weir::{
    Envelope, EventMeta, Headers, KafkaBus, KafkaConfig, OutboundRecord, Publisher,
    CLOUDEVENTS_CONTENT_TYPE,
};

#[derive(Debug, clap::Args)]
pub(crate) struct PublishArgs {
    /// Topic to publish to.
    #[arg(long)]
    topic: String,
    /// CloudEvents type, e.g. task.processing_requested.
    #[arg(long = "type")]
    event_type: String,
    /// Record key: the entity id.
    #[arg(long)]
    key: String,
    /// The event data, as JSON.
    #[arg(long)]
    data: String,
    /// CloudEvents source.
    #[arg(long, default_value = "/weir-cli")]
    source: String,
    /// How long to wait for the broker's acknowledgement.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

pub(crate) async fn run(kafka: KafkaConfig, args: PublishArgs) -> anyhow::Result<()> {
    let data: serde_json::Value =
        serde_json::from_str(&args.data).context("--data is not valid JSON")?;
    let envelope = Envelope {
        meta: EventMeta {
            id: uuid::Uuid::now_v7(),
            event_type: args.event_type,
            source: args.source,
            time: Some(Utc::now()),
            subject: Some(args.key.clone()),
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
        topic: args.topic,
        key: Some(args.key.into_bytes()),
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
