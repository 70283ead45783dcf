//! The status reporter: publishes this process's [`StatusReport`] every `report_interval` to a
//! compacted topic, keyed by the process's id, and a tombstone for that key when it stops
//! cleanly. Readers (the console) keep the latest report per key and mark a process stale
//! after three intervals without one: a process that died without its tombstone.
//!
//! Reporting never slows consumption: the engine builds its partitions' part only when asked
//! (a message on its control channel every interval), and the routes' part is read from the
//! Prometheus series records update anyway. Nothing is added to a record's path.

use super::KafkaBus;
use crate::bus::{OutboundRecord, Publisher, StatusProbe};
use crate::contracts::Headers;
use crate::telemetry::events::ReportPublished;
use crate::telemetry::{ProcessInfo, ReportBuilder};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use serde::Deserialize;
use std::future::Future;
use std::time::Duration;

/// How long a stopping process waits for its tombstone to be acknowledged.
const TOMBSTONE_WAIT: Duration = Duration::from_secs(5);

/// Where and how often a process reports (`[control]` in the binary's settings).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct ReporterConfig {
    /// The compacted topic reports go to (`weir.status`).
    pub status_topic: String,
    /// How often a report is published (5 s). Readers take a process as gone after three
    /// intervals without a report.
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
}

impl Default for ReporterConfig {
    fn default() -> Self {
        Self {
            status_topic: "weir.status".to_owned(),
            report_interval: Duration::from_secs(5),
        }
    }
}

/// Publishes a process's status reports; see the module doc.
#[derive(Debug)]
pub struct StatusReporter {
    bus: KafkaBus,
    config: ReporterConfig,
    builder: ReportBuilder,
    probes: Vec<StatusProbe>,
    id: String,
}

impl StatusReporter {
    /// A reporter for this process in `role` (`serve`, `worker`, ...), publishing through `bus`
    /// and reading its metrics.
    pub fn new(bus: &KafkaBus, config: ReporterConfig, role: &str) -> Self {
        let builder = ReportBuilder::new(role, config.report_interval, bus.metrics().clone());
        Self {
            bus: bus.clone(),
            config,
            builder,
            probes: Vec::new(),
            id: ProcessInfo::current(role).id,
        }
    }

    /// Reports the partitions of this subscription too.
    pub fn watch(mut self, probe: StatusProbe) -> Self {
        self.probes.push(probe);
        self
    }

    /// The key of this process's reports.
    pub fn process_id(&self) -> &str {
        &self.id
    }

    /// Creates the topic if it is missing, then reports every interval until `stop` completes;
    /// then publishes the tombstone of this process's key. Run it until the subscriptions it
    /// watches have drained, so that the last report before the tombstone shows their final
    /// commits. Failures are logged and counted, never returned: reporting must not stop a
    /// service.
    pub async fn run(mut self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        // Creating the topic waits for a broker: an unreachable one must not hold up the stop.
        let stopped = tokio::select! {
            () = &mut stop => true,
            () = self.create_topic() => false,
        };
        if !stopped {
            let mut tick = tokio::time::interval(self.config.report_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    () = &mut stop => break,
                    _ = tick.tick() => {
                        // A report waiting for an unreachable broker must not hold up the stop.
                        tokio::select! {
                            () = &mut stop => break,
                            () = self.report() => {}
                        }
                    }
                }
            }
        }
        // Bounded too: a process whose broker is gone still stops promptly, and readers then
        // find it stale instead.
        if tokio::time::timeout(TOMBSTONE_WAIT, self.publish(None))
            .await
            .is_err()
        {
            tracing::warn!(topic = %self.config.status_topic, "The status tombstone was not acknowledged in time; readers will mark this process stale.");
        }
    }

    async fn report(&mut self) {
        let mut partitions = Vec::new();
        for probe in &self.probes {
            // An engine that does not answer within an interval (draining at stop, or stuck)
            // is reported without its partitions rather than holding the reports up.
            let asked = tokio::time::timeout(self.config.report_interval, probe.status());
            partitions.extend(asked.await.ok().flatten().unwrap_or_default());
        }
        let report = self.builder.build(partitions);
        match serde_json::to_vec(&report) {
            Ok(value) => self.publish(Some(value)).await,
            Err(e) => ReportPublished {
                topic: &self.config.status_topic,
                tombstone: false,
                error: Some(&e),
            }
            .emit(self.bus.metrics()),
        }
    }

    /// Publishes a report, or the tombstone (`None`).
    async fn publish(&self, value: Option<Vec<u8>>) {
        let tombstone = value.is_none();
        let record = OutboundRecord {
            topic: self.config.status_topic.clone(),
            key: Some(self.id.clone().into_bytes()),
            value,
            headers: Headers::new(),
        };
        let result = self.bus.publish_record(record).await;
        ReportPublished {
            topic: &self.config.status_topic,
            tombstone,
            error: result.as_ref().err().map(|e| e as &dyn std::fmt::Display),
        }
        .emit(self.bus.metrics());
    }

    /// Creates the status topic, compacted, unless it exists. A failure is logged once and
    /// reporting goes on: the broker may create the topic itself, or an operator may have.
    async fn create_topic(&self) {
        let topic = &self.config.status_topic;
        if let Err(error) = create_compacted_topic(&self.bus, topic).await {
            tracing::warn!(topic = %topic, %error, "Could not create the compacted status topic; reporting anyway.");
        }
    }
}

/// Creates `topic` with one partition, compacted, unless it exists (the status and commands
/// topics: the latest record of each key is what counts).
pub(super) async fn create_compacted_topic(bus: &KafkaBus, topic: &str) -> Result<(), String> {
    let created = async {
        let admin: AdminClient<DefaultClientContext> = bus.config().producer_config().create()?;
        let new =
            NewTopic::new(topic, 1, TopicReplication::Fixed(-1)).set("cleanup.policy", "compact");
        let options = AdminOptions::new()
            .operation_timeout(Some(Duration::from_secs(10)))
            .request_timeout(Some(Duration::from_secs(10)));
        let results = admin.create_topics([&new], &options).await?;
        Ok::<_, rdkafka::error::KafkaError>(results)
    };
    let failure = match created.await {
        Ok(results) => results.into_iter().find_map(|r| match r {
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) | Ok(_) => None,
            Err((_, code)) => Some(code.to_string()),
        }),
        Err(e) => Some(e.to_string()),
    };
    failure.map_or(Ok(()), Err)
}
