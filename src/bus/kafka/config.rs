//! Kafka client settings: Weir's defaults, then any librdkafka property from the user's
//! `[kafka]` table on top, so SASL/SSL and tuning need no code.

use crate::bus::BusError;
use rdkafka::ClientConfig;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// Connection and client settings for the Kafka bus.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// `host:port` list of bootstrap brokers.
    pub brokers: String,
    /// librdkafka properties for both the consumer and the producer (`security.protocol`,
    /// `sasl.mechanism`, `sasl.username`, `sasl.password`, `ssl.ca.location`, ...).
    pub properties: BTreeMap<String, String>,
    /// librdkafka properties for the consumer only.
    pub consumer: BTreeMap<String, String>,
    /// librdkafka properties for the producer only.
    pub producer: BTreeMap<String, String>,
    /// How long a publish may take until the broker acknowledges it (`message.timeout.ms`).
    #[serde(with = "humantime_serde")]
    pub delivery_timeout: Duration,
    /// The most the consumer holds of records fetched and not yet handed to a handler, all
    /// partitions together (default 64 MiB). librdkafka bounds its prefetch per partition
    /// (`queued.min.messages`, `queued.max.messages.kbytes`), so with many partitions and
    /// handlers that do not keep up it would hold hundreds of MiB; Weir divides this budget
    /// over the assigned partitions and pauses fetching a partition that holds more than its
    /// share, until the handlers have taken half of it.
    pub max_prefetch_bytes: usize,
}

/// [`KafkaConfig::max_prefetch_bytes`]'s default.
const MAX_PREFETCH_BYTES: usize = 64 * 1024 * 1024;

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".to_owned(),
            properties: BTreeMap::new(),
            consumer: BTreeMap::new(),
            producer: BTreeMap::new(),
            delivery_timeout: Duration::from_secs(30),
            max_prefetch_bytes: MAX_PREFETCH_BYTES,
        }
    }
}

/// Property names whose values are never printed.
pub(crate) fn is_secret(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    key.contains("password")
        || key.contains("secret")
        || key.contains("oauthbearer.config")
        || key.ends_with("key.pem")
        || key.ends_with(".key")
}

impl fmt::Debug for KafkaConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |m: &BTreeMap<String, String>| -> BTreeMap<String, String> {
            m.iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        if is_secret(k) {
                            "***".to_owned()
                        } else {
                            v.clone()
                        },
                    )
                })
                .collect()
        };
        f.debug_struct("KafkaConfig")
            .field("brokers", &self.brokers)
            .field("properties", &redact(&self.properties))
            .field("consumer", &redact(&self.consumer))
            .field("producer", &redact(&self.producer))
            .field("delivery_timeout", &self.delivery_timeout)
            .field("max_prefetch_bytes", &self.max_prefetch_bytes)
            .finish()
    }
}

impl KafkaConfig {
    /// Defaults with these bootstrap brokers.
    pub fn new(brokers: impl Into<String>) -> Self {
        Self {
            brokers: brokers.into(),
            ..Self::default()
        }
    }

    /// Sets a librdkafka property for both clients.
    pub fn set(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.properties.insert(key.into(), value.into());
        self
    }

    /// The consumer's configuration.
    ///
    /// Weir's defaults, each overridable:
    /// - `enable.auto.offset.store=false`: an offset is stored only when its record is final.
    /// - `enable.auto.commit=false`: the engine commits stored offsets itself, every
    ///   `commit_interval`, on revoke and at shutdown, always synchronously (the periodic one on
    ///   a thread of its own), so it has every answer to count and log: librdkafka gives the
    ///   answer to an asynchronous commit to no one.
    /// - `auto.offset.reset=earliest`: a new group starts from the beginning; nothing is skipped.
    /// - Fetch and prefetch queue, measured with `weir bench --kafka KEY=VALUE` (BENCHMARKS.md
    ///   has the numbers):
    ///   - `fetch.queue.backoff.ms=10`: once the prefetch queue is full, librdkafka waits this
    ///     long before fetching again. Its 1000 ms default cut every arm 45-fold (1.2M to 26k
    ///     msgs/s for the raw loop) as soon as the queue filled; 0 spins and was slower than 10.
    ///   - `queued.min.messages=10000` (librdkafka: 100000 per partition): halves the peak
    ///     memory of a consumer that drains a backlog (W: 52 to 27 MiB) at no measured cost in
    ///     throughput; 2000 halved the raw loop's ceiling.
    ///   - `queued.max.messages.kbytes=16384` (librdkafka: 65536): no measured cost. Both
    ///     bound each partition's queue (Weir splits one off per partition), so the whole
    ///     consumer's prefetch is bounded by [`KafkaConfig::max_prefetch_bytes`] instead.
    ///   - `fetch.wait.max.ms`, `fetch.max.bytes`, `max.partition.fetch.bytes`: librdkafka's
    ///     defaults; changing them made no difference beyond run-to-run noise.
    /// - `statistics.interval.ms=2000`: feeds `weir_consumer_lag` and broker reachability for
    ///   `/readyz`.
    /// - `partition.assignment.strategy=cooperative-sticky`: a rebalance revokes only the
    ///   partitions that move, and the others never stop (librdkafka's default, `range,roundrobin`,
    ///   revokes every partition of every member at each rebalance). Measured on Tansu with two
    ///   replicas, BENCHMARKS.md "Rebalancing". Every member of a group must use the same
    ///   protocol: set `range` here to join a group of eager consumers.
    pub fn consumer_config(&self, group_id: &str) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("group.id", group_id)
            .set("enable.auto.offset.store", "false")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("fetch.queue.backoff.ms", "10")
            .set("queued.min.messages", "10000")
            .set("queued.max.messages.kbytes", "16384")
            .set("statistics.interval.ms", "2000")
            .set("partition.assignment.strategy", "cooperative-sticky");
        for (k, v) in self.properties.iter().chain(&self.consumer) {
            c.set(k, v);
        }
        c
    }

    /// Checks that a revoke and a drain fit inside the group's patience with this member: the
    /// rebalance timeout it sends (`max.poll.interval.ms`) and its session timeout, whichever
    /// is shorter (librdkafka requires the session timeout to be the shorter). Past either the
    /// group moves on without it, and a record still running here runs twice. The session
    /// timeout counts although librdkafka heartbeats from a thread of its own: measured on
    /// Tansu with the eager protocol, a 1.9 s drain under a 3 s session made the group
    /// rebalance again and again, and under a 10 s session once. Each wait is its timeout plus
    /// the time its aborted `cpu_bound` calls get to return (at most the timeout, capped at 5 s).
    pub(crate) fn check_timeouts(
        client: &ClientConfig,
        consumer: &crate::bus::ConsumerConfig,
    ) -> Result<(), BusError> {
        let ms = |key: &str, default: u64| -> u64 {
            client
                .get(key)
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(default)
        };
        // librdkafka's defaults.
        let bounds = [
            ("session.timeout.ms", ms("session.timeout.ms", 45_000)),
            ("max.poll.interval.ms", ms("max.poll.interval.ms", 300_000)),
        ];
        let (bound_key, bound_ms) = bounds
            .into_iter()
            .min_by_key(|(_, ms)| *ms)
            .expect("two bounds");
        let bound = Duration::from_millis(bound_ms);
        for (key, timeout) in [
            ("revoke_timeout", consumer.revoke_timeout),
            ("drain_timeout", consumer.drain_timeout),
        ] {
            let grace = timeout.min(crate::bus::engine::BLOCKING_GRACE);
            if timeout + grace >= bound {
                return Err(BusError::Config {
                    key: key.to_owned(),
                    message: format!(
                        "{} (with up to {} for cpu_bound calls to return) does not fit inside \
                         kafka.{bound_key} ({bound_ms} ms): the group would move on while the \
                         partitions still drain, and their records would run twice. Lower \
                         {key} or raise {bound_key}",
                        humantime::format_duration(timeout),
                        humantime::format_duration(grace),
                    ),
                });
            }
        }
        Ok(())
    }

    /// The producer's configuration.
    ///
    /// Weir's defaults, each overridable: idempotent (`enable.idempotence=true`, which implies
    /// `acks=all`), `partitioner=murmur2_random` so keys land where Java clients put them, a
    /// bounded `message.timeout.ms`, and `linger.ms=5` to batch without adding noticeable latency.
    pub fn producer_config(&self) -> ClientConfig {
        let mut c = ClientConfig::new();
        c.set("bootstrap.servers", &self.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("partitioner", "murmur2_random")
            .set(
                "message.timeout.ms",
                self.delivery_timeout.as_millis().to_string(),
            )
            .set("linger.ms", "5");
        for (k, v) in self.properties.iter().chain(&self.producer) {
            c.set(k, v);
        }
        c
    }

    /// Turns a client-creation failure into an error that names the offending key and never
    /// contains a secret value.
    pub(crate) fn creation_error(&self, error: &rdkafka::error::KafkaError) -> BusError {
        let mut message = error.to_string();
        for (k, v) in self.all_properties() {
            if is_secret(k) && !v.is_empty() {
                message = message.replace(v.as_str(), "***");
            }
        }
        let key = self
            .all_properties()
            .map(|(k, _)| k)
            .find(|k| message.contains(&format!("\"{k}\"")))
            .map_or_else(|| "kafka".to_owned(), |k| format!("kafka.{k}"));
        BusError::Config { key, message }
    }

    fn all_properties(&self) -> impl Iterator<Item = (&String, &String)> {
        self.properties
            .iter()
            .chain(&self.consumer)
            .chain(&self.producer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_output_redacts_secrets() {
        let config = KafkaConfig::new("b:9092")
            .set("sasl.password", "hunter2")
            .set("ssl.key.password", "k3y")
            .set("sasl.username", "svc");
        let printed = format!("{config:?}");
        assert!(
            !printed.contains("hunter2") && !printed.contains("k3y"),
            "{printed}"
        );
        assert!(printed.contains("svc"));
    }

    #[test]
    fn a_bad_property_fails_naming_the_key_without_its_secret() {
        let config = KafkaConfig::new("b:9092")
            .set("sasl.password", "hunter2")
            .set("no.such.property", "1");
        let error = config
            .producer_config()
            .create::<rdkafka::producer::BaseProducer>()
            .map(|_| ())
            .unwrap_err();
        let error = config.creation_error(&error);
        let text = error.to_string();
        assert!(text.contains("kafka.no.such.property"), "{text}");
        assert!(!text.contains("hunter2"), "{text}");
    }

    #[test]
    fn an_invalid_value_fails_naming_its_key() {
        let config = KafkaConfig::new("b:9092").set("session.timeout.ms", "soon");
        let error = config
            .consumer_config("g")
            .create::<rdkafka::consumer::BaseConsumer>()
            .map(|_| ())
            .unwrap_err();
        let text = config.creation_error(&error).to_string();
        assert!(text.contains("kafka.session.timeout.ms"), "{text}");
    }

    #[test]
    fn a_secret_value_echoed_by_the_client_is_redacted() {
        let config = KafkaConfig::new("b:9092").set("sasl.password", "hunter2");
        let echoed = rdkafka::error::KafkaError::ClientCreation(
            "Invalid value \"hunter2\" for configuration property \"sasl.password\"".to_owned(),
        );
        let text = config.creation_error(&echoed).to_string();
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("kafka.sasl.password"), "{text}");
    }
}
