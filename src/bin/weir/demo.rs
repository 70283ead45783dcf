//! `weir demo` (and plain `cargo run`): the reference service on librdkafka's in-process mock
//! cluster, fed a sample stream with a malformed record, a transient failure and a permanent
//! one; then a summary of what happened, read from the same metrics `/metrics` would show.

use crate::reference::events::{
    CustomerCreated, CustomerUpdated, ResourceCreated, TaskCreated, TaskFields, TriggeredBy,
};
use crate::reference::{self, Recorder, TestHooks};
use anyhow::Context as _;
use rdkafka::mocking::MockCluster;
use std::time::Duration;
use weir::{
    Bus, ConsumerConfig, Envelope, Event, Headers, KafkaBus, KafkaConfig, OutboundRecord,
    PublishExt, Publisher, RetryPolicy,
};

const TOPICS: [&str; 3] = [
    TaskCreated::TOPIC,
    CustomerCreated::TOPIC,
    ResourceCreated::TOPIC,
];

pub(crate) async fn run() -> anyhow::Result<()> {
    let cluster = MockCluster::new(1).context("cannot start the embedded Kafka mock cluster")?;
    for topic in TOPICS {
        cluster.create_topic(topic, 3, 1)?;
        cluster.create_topic(&format!("{topic}.dlq"), 1, 1)?;
    }
    let brokers = cluster.bootstrap_servers();
    println!("Embedded Kafka (librdkafka mock cluster) at {brokers}");
    let bus = KafkaBus::new(KafkaConfig::new(brokers))?;
    let retry = RetryPolicy {
        initial_interval: Duration::from_millis(50),
        ..RetryPolicy::default()
    };
    // The sample stream's failures are the test hooks' doing: the demo is the one place, with
    // the tests, where they are on.
    let router = reference::router(&Recorder::default(), TestHooks::On, None)?.retry(retry);
    let subscription = bus.subscribe(router, ConsumerConfig::new("weir-demo"))?;

    let task = |entity: &str| {
        TaskCreated::new(TaskFields::new(
            uuid::Uuid::new_v4(),
            "tenant-1",
            "production",
            format!("file:///data/{entity}.csv"),
            entity,
            TriggeredBy::Api,
        ))
    };
    let published = [
        bus.publish(&Envelope::new(task("orders"))).await?,
        bus.publish(&Envelope::new(task("invoices"))).await?,
        bus.publish(&Envelope::new(CustomerCreated::new(
            "c-1",
            serde_json::json!({"name": "Ada"}),
        )))
        .await?,
        bus.publish(&Envelope::new(CustomerUpdated::new(
            "c-1",
            serde_json::json!({"simulate": "transient"}),
        )))
        .await?,
        bus.publish(&Envelope::new(CustomerUpdated::new(
            "c-2",
            serde_json::json!({"simulate": "permanent"}),
        )))
        .await?,
        bus.publish(&Envelope::new(ResourceCreated::new(
            uuid::Uuid::new_v4(),
            "a/b.png",
            "image/png",
            "b.png",
        )))
        .await?,
        bus.publish_record(OutboundRecord {
            topic: CustomerCreated::TOPIC.to_owned(),
            key: Some(b"c-3".to_vec()),
            value: Some(b"{\"specversion\": \"1.0\", this is not JSON".to_vec()),
            headers: Headers::new(),
        })
        .await?,
    ];
    println!(
        "Published {} records (one malformed, one failing transiently, one failing for good).",
        published.len()
    );

    let metrics = bus.metrics().clone();
    let finished = || {
        metrics.handled_total("success")
            + metrics.handled_total("dead_lettered")
            + metrics.handled_total("decode_error")
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while finished() < published.len() as u64 || metrics.dead_letters_total() < 2 {
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the demo stream did not finish within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = subscription.stop().await?;

    println!();
    println!("Summary");
    println!("  handled           {}", metrics.handled_total("success"));
    println!("  retried           {}", metrics.handled_total("retried"));
    println!(
        "  dead-lettered     {}  (handler failures)",
        metrics.handled_total("dead_lettered")
    );
    println!(
        "  decode errors     {}  (never reached a handler)",
        metrics.handled_total("decode_error")
    );
    println!("  dead letters sent {}", metrics.dead_letters_total());
    println!("  committed         {:?}", report.committed);
    Ok(())
}
