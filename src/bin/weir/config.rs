//! Configuration: defaults, then a TOML file (`--config`), then `WEIR_*` environment variables.
//! `WEIR_BROKERS` and `WEIR_GROUP_ID` are shorthands; any other key is reachable as
//! `WEIR_<SECTION>__<KEY>` (e.g. `WEIR_CONSUMER__MAX_IN_FLIGHT=64`).

use anyhow::Context as _;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use weir::{ConsumerConfig, KafkaConfig, RetryPolicy, UnhandledPolicy};

/// Everything `weir serve` reads.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct Settings {
    pub(crate) kafka: KafkaConfig,
    pub(crate) consumer: ConsumerConfig,
    pub(crate) retry: RetryPolicy,
    pub(crate) unhandled: UnhandledPolicy,
    pub(crate) service: ServiceSettings,
    /// Where the admin server (`/metrics`, `/healthz`, `/readyz`) listens (`WEIR_ADMIN_ADDR`).
    pub(crate) admin_addr: std::net::SocketAddr,
}

/// The reference service's own settings.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ServiceSettings {
    /// Append one JSON line per handled event here (event id, type, handler, coordinates), so
    /// loss and duplicates can be checked from outside the process.
    pub(crate) record_file: Option<PathBuf>,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            kafka: KafkaConfig::default(),
            consumer: ConsumerConfig::new("weir-reference"),
            retry: RetryPolicy::default(),
            unhandled: UnhandledPolicy::default(),
            service: ServiceSettings::default(),
            admin_addr: ([0, 0, 0, 0], 9090).into(),
        }
    }
}

impl Settings {
    pub(crate) fn load(file: Option<&Path>, brokers: Option<String>) -> anyhow::Result<Self> {
        let mut figment =
            Figment::new().merge(Serialized::default("service", ServiceSettings::default()));
        if let Some(path) = file {
            anyhow::ensure!(
                path.exists(),
                "config file {} does not exist",
                path.display()
            );
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(Env::prefixed("WEIR_").map(|key| {
            match key.as_str().to_ascii_lowercase().as_str() {
                "brokers" => "kafka.brokers".into(),
                "group_id" => "consumer.group_id".into(),
                other => other.replace("__", ".").into(),
            }
        }));
        if let Some(brokers) = brokers {
            figment = figment.merge(Serialized::default("kafka.brokers", brokers));
        }
        // Figment's message names the key and where it came from (file or variable).
        figment.extract().context("invalid configuration")
    }
}
