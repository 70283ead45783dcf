//! The Kafka bus, on rdkafka (librdkafka). The only module that imports rdkafka.

mod commands;
mod config;
mod consumer;
mod pauses;
mod producer;
mod status;

pub use commands::{CommandListener, CommandPublisher};
pub use config::KafkaConfig;
pub use status::{ReporterConfig, StatusReporter};

use super::engine::Engine;
use super::publish::PublishFuture;
use super::{Bus, BusError, ConsumerConfig, OutboundRecord, Publisher, Subscription};
use crate::handlers::{Dispatcher, Router};
use crate::telemetry::{Health, Metrics};
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::producer::FutureProducer;
use rdkafka::ClientContext;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

/// Routes librdkafka's own log lines into `tracing`.
#[derive(Clone, Default)]
pub(crate) struct LogContext;

impl ClientContext for LogContext {
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        log_client_message(level, fac, message);
    }
}

pub(crate) fn log_client_message(level: RDKafkaLogLevel, fac: &str, message: &str) {
    use RDKafkaLogLevel::*;
    match level {
        Emerg | Alert | Critical | Error => tracing::error!(target: "librdkafka", fac, "{message}"),
        Warning => tracing::warn!(target: "librdkafka", fac, "{message}"),
        Notice | Info => tracing::info!(target: "librdkafka", fac, "{message}"),
        Debug => tracing::debug!(target: "librdkafka", fac, "{message}"),
    }
}

struct Inner {
    config: KafkaConfig,
    producer: FutureProducer<LogContext>,
    metrics: Metrics,
}

/// A bus on a Kafka cluster (or any Kafka-compatible broker). Cheap to clone.
#[derive(Clone)]
pub struct KafkaBus {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for KafkaBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KafkaBus")
            .field("config", &self.inner.config)
            .finish_non_exhaustive()
    }
}

impl KafkaBus {
    /// Creates the producer (no connection is made until the first publish).
    /// Fails on an invalid setting, naming it.
    pub fn new(config: KafkaConfig) -> Result<Self, BusError> {
        Self::with_metrics(config, Metrics::new())
    }

    /// The same, reporting into the given metrics.
    pub fn with_metrics(config: KafkaConfig, metrics: Metrics) -> Result<Self, BusError> {
        let producer = config
            .producer_config()
            .create_with_context(LogContext)
            .map_err(|e| config.creation_error(&e))?;
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                producer,
                metrics,
            }),
        })
    }

    /// The metrics of this bus and its subscriptions.
    pub fn metrics(&self) -> &Metrics {
        &self.inner.metrics
    }

    /// The configuration, for diagnostics (secrets are redacted by its `Debug`).
    pub fn config(&self) -> &KafkaConfig {
        &self.inner.config
    }
}

impl Publisher for KafkaBus {
    fn publish_record(&self, record: OutboundRecord) -> PublishFuture<'_> {
        producer::publish(
            &self.inner.producer,
            &self.inner.metrics,
            self.inner.config.delivery_timeout,
            record,
        )
    }
}

impl Bus for KafkaBus {
    fn subscribe<S>(
        &self,
        router: Router<S>,
        config: ConsumerConfig,
    ) -> Result<Subscription, BusError> {
        let router = router.into_stateless();
        config.validate()?;
        let topics = router.topics();
        if topics.is_empty() {
            return Err(BusError::NoHandlers);
        }
        let kafka = &self.inner.config;
        let client = kafka.consumer_config(&config.group_id);
        KafkaConfig::check_timeouts(&client, &config)?;
        let health = Health::default();
        let source = consumer::start(
            client,
            &topics,
            self.inner.metrics.clone(),
            health.clone(),
            kafka.max_prefetch_bytes,
            |e| kafka.creation_error(e),
        )?;
        let metrics = self.inner.metrics.clone();
        let dispatcher = Arc::new(
            Dispatcher::new(router, metrics, &config.group_id)
                .cpu_bound_threads(config.cpu_bound_threads),
        );
        Ok(run(
            source,
            dispatcher,
            Arc::new(self.clone()),
            config,
            health,
        ))
    }
}

/// Runs the engine on a Kafka source. The subscription ends with the engine's report once the
/// consumer has left the group, or with an error if the poll thread failed.
fn run(
    source: consumer::KafkaSource,
    dispatcher: Arc<Dispatcher>,
    dead_letters: Arc<dyn Publisher>,
    config: ConsumerConfig,
    health: Health,
) -> Subscription {
    let stop = CancellationToken::new();
    let engine = Engine::new(
        source,
        dispatcher,
        dead_letters,
        config,
        stop.clone(),
        health.clone(),
    );
    let control = engine.control();
    let task = tokio::spawn(async move {
        let (report, source) = engine.run().await;
        let close = source.close();
        tokio::task::spawn_blocking(close)
            .await
            .map_err(|e| BusError::Task(e.to_string()))??;
        Ok(report.into())
    });
    Subscription::new(stop, health, control, task)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::contracts::{Event, EventType};
    use crate::handlers::Ctx;
    use crate::MemoryBus;

    #[derive(Clone, serde::Serialize, serde::Deserialize)]
    struct Ping {}

    impl Event for Ping {
        const TYPE: EventType = EventType::new("test.ping");
        const TOPIC: &'static str = "pings";
        fn key(&self) -> String {
            String::new()
        }
    }

    fn client() -> rdkafka::ClientConfig {
        let mut config = rdkafka::ClientConfig::new();
        // Nothing listens there: the consumer runs, polls and never connects.
        config
            .set("bootstrap.servers", "127.0.0.1:9")
            .set("group.id", "weir-test")
            .set("enable.auto.offset.store", "false");
        config
    }

    #[tokio::test]
    async fn a_poll_thread_panic_is_reported_by_join() {
        let metrics = Metrics::new();
        let health = Health::default();
        let source = consumer::start(
            client(),
            &["pings".to_owned()],
            metrics.clone(),
            health.clone(),
            64 * 1024 * 1024,
            |e| BusError::Transport(e.to_string()),
        )
        .expect("the consumer starts");
        source.panic_poll_thread();
        let router = Router::new().on(|_: Ping, _: Ctx| async { Ok(()) });
        let dispatcher = Arc::new(Dispatcher::new(router, metrics, "weir-test"));
        let subscription = run(
            source,
            dispatcher,
            Arc::new(MemoryBus::default()),
            ConsumerConfig::new("weir-test"),
            health,
        );
        let result = tokio::time::timeout(std::time::Duration::from_secs(30), subscription.join())
            .await
            .expect("the subscription ends when its poll thread dies");
        match result {
            Err(BusError::Task(message)) => assert!(message.contains("panicked"), "{message}"),
            other => panic!("a poll-thread panic ended the subscription as {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_revoke_or_drain_that_outlasts_the_session_timeout_is_refused_at_subscribe() {
        let mut kafka = KafkaConfig::new("127.0.0.1:9");
        for (key, value) in [
            ("max.poll.interval.ms", "12000"),
            ("session.timeout.ms", "6000"),
        ] {
            kafka.consumer.insert(key.to_owned(), value.to_owned());
        }
        let bus = KafkaBus::new(kafka).expect("the bus");
        let subscribe = |revoke: u64, drain: u64| {
            let router = Router::new().on(|_: Ping, _: Ctx| async { Ok(()) });
            let config = ConsumerConfig {
                revoke_timeout: std::time::Duration::from_secs(revoke),
                drain_timeout: std::time::Duration::from_secs(drain),
                ..ConsumerConfig::new("weir-test")
            };
            bus.subscribe(router, config)
        };
        // 3 s plus up to 3 s for cpu_bound calls reaches the 6 s session timeout.
        for (revoke, drain, key) in [(3, 1, "revoke_timeout"), (1, 3, "drain_timeout")] {
            match subscribe(revoke, drain) {
                Err(BusError::Config { key: k, message }) => {
                    assert_eq!(k, key);
                    assert!(
                        message.contains("session.timeout.ms (6000 ms)"),
                        "{message}"
                    );
                }
                Err(other) => panic!("refused for another reason: {other}"),
                Ok(_) => panic!("revoke {revoke} s, drain {drain} s subscribed"),
            }
        }
        let fits = subscribe(2, 2).expect("2 s plus 2 s fits inside 6 s");
        fits.stop().await.expect("stops");
    }
}
