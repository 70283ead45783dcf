//! The two client configurations every arm runs under.
//!
//! - `shared`: every arm gets the same librdkafka consumer settings, Weir's
//!   (`KafkaConfig::consumer_config`), less the properties each at-least-once design owns
//!   (`enable.auto.offset.store`, `enable.auto.commit`: RustStream's `Commit::Tracked` refuses
//!   them) and Weir's `statistics.interval.ms` (it feeds Weir's lag metric; only Weir reads it).
//! - `defaults`: each framework as a user gets it. The hand loops take librdkafka's defaults;
//!   RustStream its `KafkaBroker` and `KafkaTopic` with only the group, `Commit::Tracked` and
//!   `StartOffset::Earliest`; Weir its `KafkaConfig::new` and `ConsumerConfig::new`.
//!
//! Every arm starts a new group at the earliest offset (`auto.offset.reset=earliest`), or it
//! would read nothing of the pre-filled topic.

use rdkafka::ClientConfig;

/// Properties the shared configuration leaves to each arm.
const OWNED_BY_ARM: [&str; 5] = [
    "bootstrap.servers",
    "group.id",
    "enable.auto.offset.store",
    "enable.auto.commit",
    "statistics.interval.ms",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Settings {
    /// The same librdkafka consumer settings for every arm (Weir's).
    Shared,
    /// Each framework with its own defaults.
    Defaults,
}

impl Settings {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Settings::Shared => "shared settings",
            Settings::Defaults => "each framework's defaults",
        }
    }

    /// The consumer properties every arm gets in this configuration, on top of its own.
    pub(crate) fn common(self, brokers: &str) -> Vec<(String, String)> {
        match self {
            Settings::Shared => {
                let weir = weir::KafkaConfig::new(brokers).consumer_config("unused");
                weir.config_map()
                    .into_iter()
                    .filter(|(k, _)| !OWNED_BY_ARM.contains(k))
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .collect()
            }
            Settings::Defaults => vec![("auto.offset.reset".to_owned(), "earliest".to_owned())],
        }
    }
}

/// One arm's client settings: a configuration, the broker, and any properties the run adds on
/// top for every arm (`--kafka`).
#[derive(Debug, Clone)]
pub(crate) struct Client {
    pub(crate) settings: Settings,
    pub(crate) brokers: String,
    pub(crate) extra: Vec<(String, String)>,
    /// The prefetched mode's queue bounds, for the clients that read through librdkafka's one
    /// consumer queue (A0, A1, RS); Weir splits a queue off per partition and prefetches into
    /// its engine, and stalls with these (BENCHMARKS.md), so it keeps its own.
    pub(crate) queue: Vec<(String, String)>,
}

impl Client {
    pub(crate) fn new(settings: Settings, brokers: &str) -> Self {
        Self {
            settings,
            brokers: brokers.to_owned(),
            extra: Vec::new(),
            queue: Vec::new(),
        }
    }

    /// Adds these consumer properties for every arm (`--kafka`).
    pub(crate) fn with_all(mut self, properties: &[(String, String)]) -> Self {
        self.extra.extend(properties.iter().cloned());
        self
    }

    /// The prefetched mode's queue bounds for A0, A1 and RS, sized to hold `records` records
    /// of `bytes` each: a high-level consumer's `queued.min.messages` and
    /// `queued.max.messages.kbytes` bound its one queue, so Weir's (10,000 records, 16 MiB) left
    /// them fetching most of the topic after their clocks started. Both must be raised.
    pub(crate) fn holding(mut self, records: usize, bytes: usize) -> Self {
        let messages = (records + records / 10 + 1_000).max(100_000);
        let kbytes = (records * bytes * 2 / 1024).clamp(65_536, 2_097_151);
        self.queue = vec![
            ("queued.min.messages".to_owned(), messages.to_string()),
            ("queued.max.messages.kbytes".to_owned(), kbytes.to_string()),
        ];
        self
    }

    pub(crate) fn name(&self) -> &'static str {
        self.settings.name()
    }

    /// A hand loop's consumer: the common properties, and for A1 the at-least-once pair
    /// (offsets stored by the loop; committed by librdkafka's timer, or at the end).
    pub(crate) fn hand_loop(&self, group: &str, typed: bool) -> ClientConfig {
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", &self.brokers)
            .set("group.id", group);
        let common = self.settings.common(&self.brokers);
        for (k, v) in common.iter().chain(&self.queue).chain(&self.extra) {
            config.set(k, v);
        }
        if typed {
            config.set("enable.auto.offset.store", "false");
        }
        config
    }

    /// Weir's client settings: its defaults, which are the shared set.
    pub(crate) fn weir(&self) -> weir::KafkaConfig {
        let mut config = weir::KafkaConfig::new(&self.brokers);
        config.consumer.extend(self.extra.iter().cloned());
        config
    }

    /// RustStream's broker: the shared set through its `config` passthrough, or nothing but
    /// the bootstrap servers in the defaults configuration.
    pub(crate) fn ruststream(&self) -> ruststream_rdkafka::KafkaBroker {
        let mut broker = ruststream_rdkafka::KafkaBroker::new([self.brokers.as_str()]);
        let common = match self.settings {
            Settings::Shared => self.settings.common(&self.brokers),
            Settings::Defaults => Vec::new(),
        };
        let own = self.queue.iter().chain(&self.extra).cloned();
        for (k, v) in common.into_iter().chain(own) {
            broker = broker.config(k, v);
        }
        broker
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shared_settings_are_weirs_fetch_and_queue_settings() {
        let common = Settings::Shared.common("localhost:9092");
        let get = |key: &str| {
            common
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("fetch.queue.backoff.ms"), Some("10"));
        assert_eq!(get("auto.offset.reset"), Some("earliest"));
        assert_eq!(get("enable.auto.commit"), None);
        assert_eq!(get("group.id"), None);
    }
}
