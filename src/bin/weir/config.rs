//! Configuration: defaults, then a TOML file (`--config`), then `WEIR_*` environment variables.
//! `WEIR_BROKERS` and `WEIR_GROUP_ID` are shorthands; any other key is reachable as
//! `WEIR_<SECTION>__<KEY>` (e.g. `WEIR_CONSUMER__MAX_IN_FLIGHT=64`).

use crate::reference::settings::ReferenceSettings;
use crate::reference::TestHooks;
use anyhow::Context as _;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use weir::{BreakerConfig, ConsumerConfig, KafkaConfig, RetryPolicy, UnhandledPolicy};

/// Top-level settings reachable from `WEIR_*` variables. Other `WEIR_*` variables (a test rig's,
/// `WEIR_CONFIG` itself) are not settings and are ignored, so a shared environment cannot stop
/// the service; a typo in the TOML file, by contrast, is an error.
const SECTIONS: [&str; 17] = [
    "brokers",
    "group_id",
    "kafka",
    "consumer",
    "retry",
    "unhandled",
    "service",
    "admin_addr",
    "database",
    "outbox",
    "http",
    "storage",
    "tasks",
    "temporal",
    "routes",
    "control",
    "console",
];

/// librdkafka property maps, read from the environment verbatim: their names contain dots (which
/// would otherwise nest) and their values, passwords included, must never be parsed as numbers,
/// booleans or lists. `WEIR_KAFKA__PROPERTIES__SASL.PASSWORD` sets `sasl.password`.
const RAW_MAPS: [(&str, &str); 3] = [
    ("WEIR_KAFKA__PROPERTIES__", "kafka.properties"),
    ("WEIR_KAFKA__CONSUMER__", "kafka.consumer"),
    ("WEIR_KAFKA__PRODUCER__", "kafka.producer"),
];

/// Whether a `WEIR_`-stripped variable name is a setting the typed loader should read.
fn is_setting(key: &str) -> bool {
    let key = key.to_ascii_lowercase();
    let section = key.split("__").next().unwrap_or_default();
    SECTIONS.contains(&section)
        && !RAW_MAPS
            .iter()
            .any(|(prefix, _)| key.starts_with(&prefix["WEIR_".len()..].to_ascii_lowercase()))
}

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
    /// PostgreSQL, for `migrate` and `outbox-relay` (`WEIR_DATABASE__URL`).
    pub(crate) database: DatabaseSettings,
    /// The outbox relay's tuning (`[outbox]`, `WEIR_OUTBOX__POLL_INTERVAL=...`).
    pub(crate) outbox: weir::RelayConfig,
    /// The reference service's HTTP API (`[http]`, `WEIR_HTTP__ADDR`).
    pub(crate) http: HttpSettings,
    /// Where uploaded resources are stored (`[storage]`, `WEIR_STORAGE__DIR`).
    pub(crate) storage: crate::reference::settings::StorageSettings,
    /// Task processing and its triggers (`[tasks]`).
    pub(crate) tasks: crate::reference::settings::TaskSettings,
    /// Temporal, for task processing as a workflow (`[temporal]`, `WEIR_TEMPORAL__ADDRESS`).
    pub(crate) temporal: crate::reference::settings::TemporalSettings,
    /// Per-route settings, by handler name (`[routes.record_customer_created.breaker]`,
    /// `WEIR_ROUTES__RECORD_CUSTOMER_CREATED__BREAKER__MINIMUM_CALLS=...`).
    pub(crate) routes: BTreeMap<String, RouteSettings>,
    /// The fleet's control topics: where status reports go and how often (`[control]`,
    /// `WEIR_CONTROL__REPORT_INTERVAL=1s`).
    pub(crate) control: ControlSettings,
    /// `weir console`: where it listens and the tokens it asks for (`[console]`,
    /// `WEIR_CONSOLE__VIEWER_TOKEN=...`).
    pub(crate) console: ConsoleSettings,
}

/// `[control]`: the topics through which a fleet of processes is watched and commanded.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ControlSettings {
    /// The compacted topic status reports go to, keyed by process id.
    pub(crate) status_topic: String,
    /// How often each process publishes its report.
    #[serde(with = "humantime_serde")]
    pub(crate) report_interval: std::time::Duration,
    /// The compacted topic fleet commands are read from (`weir fleet` writes it), keyed by
    /// what they target (`WEIR_CONTROL__COMMANDS_TOPIC`).
    pub(crate) commands_topic: String,
}

impl Default for ControlSettings {
    fn default() -> Self {
        let reporter = weir::ReporterConfig::default();
        Self {
            status_topic: reporter.status_topic,
            report_interval: reporter.report_interval,
            commands_topic: weir::COMMANDS_TOPIC.to_owned(),
        }
    }
}

impl ControlSettings {
    /// A status reporter of this process in `role`, publishing through `bus`; run it with a
    /// future that completes once the process's consumers have drained.
    pub(crate) fn reporter(&self, bus: &weir::KafkaBus, role: &str) -> weir::StatusReporter {
        let mut config = weir::ReporterConfig::default();
        config.status_topic = self.status_topic.clone();
        config.report_interval = self.report_interval;
        weir::StatusReporter::new(bus, config, role)
    }

    /// The fleet commands reader of the process `process_id` (its reports' key).
    pub(crate) fn commands(&self, bus: &weir::KafkaBus, process_id: &str) -> weir::CommandListener {
        weir::CommandListener::new(bus, self.commands_topic.clone(), process_id)
    }
}

/// `[console]`: the fleet console (`weir console`). A viewer token lets a person or a probe
/// look; the operator token also lets them act (replay dead letters). The console refuses to
/// start with neither, unless it is given `--insecure-no-auth`.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ConsoleSettings {
    /// Where it listens: loopback by default, so that exposing it is a decision.
    pub(crate) listen: std::net::SocketAddr,
    /// The token that lets a person or a script look (`WEIR_CONSOLE__VIEWER_TOKEN`).
    #[serde(deserialize_with = "scalar_as_string")]
    pub(crate) viewer_token: Option<String>,
    /// The token that also lets them act (`WEIR_CONSOLE__OPERATOR_TOKEN`).
    #[serde(deserialize_with = "scalar_as_string")]
    pub(crate) operator_token: Option<String>,
}

impl Default for ConsoleSettings {
    fn default() -> Self {
        Self {
            listen: ([127, 0, 0, 1], 8900).into(),
            viewer_token: None,
            operator_token: None,
        }
    }
}

impl std::fmt::Debug for ConsoleSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Tokens are secrets: say whether each is set, never what it is.
        let set = |t: &Option<String>| if t.is_some() { "(set)" } else { "(none)" };
        f.debug_struct("ConsoleSettings")
            .field("listen", &self.listen)
            .field("viewer_token", &set(&self.viewer_token))
            .field("operator_token", &set(&self.operator_token))
            .finish()
    }
}

/// A token as text, whatever the environment parser made of it (`WEIR_..._TOKEN=1234` is read
/// as a number); an empty one counts as none.
fn scalar_as_string<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Scalar {
        Text(String),
        Int(i64),
        Float(f64),
        Bool(bool),
    }
    Ok(Option::<Scalar>::deserialize(d)?
        .map(|s| match s {
            Scalar::Text(t) => t,
            Scalar::Int(n) => n.to_string(),
            Scalar::Float(n) => n.to_string(),
            Scalar::Bool(b) => b.to_string(),
        })
        .filter(|t| !t.trim().is_empty()))
}

/// One route's (handler's) settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct RouteSettings {
    /// Its circuit breaker; off unless the section is present.
    pub(crate) breaker: Option<BreakerConfig>,
}

impl Settings {
    /// The consumer's configuration as `weir serve` runs it. When the resource API answers
    /// beside the consumer, `cpu_bound` handlers (image decoding) get one core fewer than the
    /// machine has, at least one, unless `[consumer] cpu_bound_threads` says otherwise: on one
    /// core per call, a burst of uploads to process took every core from the uploads still
    /// arriving, and their p99 was no better than with the work done inside the request.
    pub(crate) fn serve_consumer(&self, answers_requests: bool) -> ConsumerConfig {
        let mut consumer = self.consumer.clone();
        if answers_requests && consumer.cpu_bound_threads.is_none() {
            let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
            consumer.cpu_bound_threads = Some(cores.saturating_sub(1).max(1));
        }
        consumer
    }

    /// Applies `[routes.<name>]` to the router; an unknown route name is an error.
    pub(crate) fn apply_routes(&self, router: &mut weir::Router) -> anyhow::Result<()> {
        for (name, route) in &self.routes {
            if let Some(breaker) = &route.breaker {
                anyhow::ensure!(
                    router.set_breaker(name, breaker.clone()),
                    "[routes.{name}.breaker]: the service has no route (handler) named `{name}`"
                );
            }
        }
        Ok(())
    }
}

/// The reference service's HTTP API. It runs only when a database is configured: every route
/// writes through it.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct HttpSettings {
    /// Where the API listens, beside the admin server; port 0 picks a free one (logged).
    pub(crate) addr: std::net::SocketAddr,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            addr: ([0, 0, 0, 0], 8080).into(),
        }
    }
}

/// The database connection.
#[derive(Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct DatabaseSettings {
    /// `postgres://user:password@host:5432/db`; required by the commands that use the database.
    /// Read from `WEIR_DATABASE__URL`, else `[database] url` in the file, else `DATABASE_URL`
    /// (the name sqlx and most platforms use).
    pub(crate) url: Option<String>,
    /// Pool size; the relay needs two (one holds LISTEN).
    pub(crate) max_connections: u32,
    /// Apply pending migrations when `serve` or `outbox-relay` starts (otherwise run
    /// `weir migrate` first, as the Helm chart's migration job does).
    pub(crate) migrate_on_start: bool,
}

impl DatabaseSettings {
    /// Falls back to `DATABASE_URL` when no Weir setting named a database.
    fn url_from_env(&mut self, database_url: Option<String>) {
        if self.url.is_none() {
            self.url = database_url.filter(|url| !url.trim().is_empty());
        }
    }
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 4,
            migrate_on_start: false,
        }
    }
}

impl std::fmt::Debug for DatabaseSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The URL may carry a password: print it only with the password masked.
        let url = self
            .url
            .as_deref()
            .map(|u| match (u.find("://"), u.rfind('@')) {
                (Some(scheme), Some(at)) if at > scheme => match u[scheme + 3..at].find(':') {
                    Some(colon) => format!("{}:***{}", &u[..scheme + 3 + colon], &u[at..]),
                    None => u.to_owned(),
                },
                _ => u.to_owned(),
            });
        f.debug_struct("DatabaseSettings")
            .field("url", &url)
            .field("max_connections", &self.max_connections)
            .field("migrate_on_start", &self.migrate_on_start)
            .finish()
    }
}

/// The reference service's own settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct ServiceSettings {
    /// Append one JSON line per handled event here (event id, type, handler, coordinates), so
    /// loss and duplicates can be checked from outside the process.
    pub(crate) record_file: Option<PathBuf>,
    /// Run the outbox relay inside `serve` (with a database), so one process is the whole
    /// service. Turn it off when relays run as their own deployment (the Helm chart does).
    pub(crate) relay: bool,
    /// Run the parked-record worker inside `serve` when durable retries are on (`[retry.durable]`
    /// and a database). Turn it off when `weir retry-worker` runs on its own.
    pub(crate) retry_worker: bool,
    /// Obey the customer events' test hook (`details.simulate`: fail, panic, hang...). Off by
    /// default and never in production: with it on, whoever can publish to `customer-events`
    /// can make a replica panic, hang or dead-letter at will. The demo and the process tests
    /// turn it on.
    pub(crate) test_hooks: bool,
}

impl ServiceSettings {
    /// The hooks the customer handlers obey; warns when they are on, so a production replica
    /// that has them on says so at start-up.
    pub(crate) fn test_hooks(&self) -> TestHooks {
        if self.test_hooks {
            tracing::warn!(
                "The reference service's test hooks are on (service.test_hooks): customer events with details.simulate can fail, panic or hang their handler. Never turn them on in production."
            );
            TestHooks::On
        } else {
            TestHooks::Off
        }
    }
}

impl Default for ServiceSettings {
    fn default() -> Self {
        Self {
            record_file: None,
            relay: true,
            retry_worker: true,
            test_hooks: false,
        }
    }
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
            database: DatabaseSettings::default(),
            outbox: weir::RelayConfig::default(),
            http: HttpSettings::default(),
            storage: Default::default(),
            tasks: Default::default(),
            temporal: Default::default(),
            routes: BTreeMap::new(),
            control: ControlSettings::default(),
            console: Default::default(),
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
        figment = figment.merge(
            Env::prefixed("WEIR_")
                .filter(|key| is_setting(key.as_str()))
                .map(|key| match key.as_str().to_ascii_lowercase().as_str() {
                    "brokers" => "kafka.brokers".into(),
                    "group_id" => "consumer.group_id".into(),
                    other => other.replace("__", ".").into(),
                }),
        );
        for (prefix, path) in RAW_MAPS {
            let properties: std::collections::BTreeMap<String, String> = std::env::vars()
                .filter_map(|(k, v)| Some((k.strip_prefix(prefix)?.to_ascii_lowercase(), v)))
                .collect();
            if !properties.is_empty() {
                figment = figment.merge(Serialized::default(path, properties));
            }
        }
        if let Some(brokers) = brokers {
            figment = figment.merge(Serialized::default("kafka.brokers", brokers));
        }
        // Figment's message names the key and where it came from (file or variable).
        let mut settings: Settings = figment.extract().context("invalid configuration")?;
        settings
            .database
            .url_from_env(std::env::var("DATABASE_URL").ok());
        Ok(settings)
    }

    /// What the reference service reads, handed down to it.
    pub(crate) fn reference(&self) -> ReferenceSettings {
        ReferenceSettings {
            storage: self.storage.clone(),
            tasks: self.tasks.clone(),
            max_attempts: self.retry.maximum_attempts,
            retry: self.retry.clone(),
            temporal: self.temporal.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure type, not ours
    fn database_url_falls_back_to_the_common_variable_after_weirs_own() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("DATABASE_URL", "postgres://platform/db");
            let settings = Settings::load(None, None).map_err(|e| e.to_string())?;
            assert_eq!(
                settings.database.url.as_deref(),
                Some("postgres://platform/db")
            );

            jail.create_file("weir.toml", "[database]\nurl = \"postgres://file/db\"\n")?;
            let settings =
                Settings::load(Some(Path::new("weir.toml")), None).map_err(|e| e.to_string())?;
            assert_eq!(settings.database.url.as_deref(), Some("postgres://file/db"));

            jail.set_env("WEIR_DATABASE__URL", "postgres://weir/db");
            let settings =
                Settings::load(Some(Path::new("weir.toml")), None).map_err(|e| e.to_string())?;
            assert_eq!(settings.database.url.as_deref(), Some("postgres://weir/db"));
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure type, not ours
    fn console_listens_on_loopback_and_reads_tokens_of_any_shape_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            let settings = Settings::load(None, None).map_err(|e| e.to_string())?;
            assert_eq!(settings.console.listen, ([127, 0, 0, 1], 8900).into());
            assert!(settings.console.viewer_token.is_none());
            jail.set_env("WEIR_CONSOLE__VIEWER_TOKEN", "123456");
            jail.set_env("WEIR_CONSOLE__OPERATOR_TOKEN", "s3cret");
            let settings = Settings::load(None, None).map_err(|e| e.to_string())?;
            assert_eq!(settings.console.viewer_token.as_deref(), Some("123456"));
            assert_eq!(settings.console.operator_token.as_deref(), Some("s3cret"));
            assert!(
                !format!("{:?}", settings.console).contains("s3cret"),
                "tokens stay out of debug output"
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure type, not ours
    fn reads_task_settings_from_the_environment_and_refuses_a_bad_schedule() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("WEIR_TASKS__SCHEDULE", "*/2 * * * * *");
            jail.set_env("WEIR_TASKS__WEBHOOK_SECRET", "abc");
            jail.set_env("WEIR_TASKS__PENDING_AFTER", "90s");
            let settings = Settings::load(None, None).map_err(|e| e.to_string())?;
            assert_eq!(settings.tasks.schedule.as_deref(), Some("*/2 * * * * *"));
            assert_eq!(settings.tasks.webhook_secret.as_deref(), Some("abc"));
            assert_eq!(
                settings.tasks.pending_after,
                std::time::Duration::from_secs(90)
            );
            jail.set_env("WEIR_TASKS__SCHEDULE", "every day");
            let error = Settings::load(None, None).unwrap_err();
            assert!(format!("{error:#}").contains("cron"), "{error:#}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure type, not ours
    fn reads_the_durable_retry_stage_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            let settings = Settings::load(None, None).map_err(|e| e.to_string())?;
            assert_eq!(settings.retry.durable, None, "no durable stage unless set");
            jail.set_env("WEIR_RETRY__MAXIMUM_ATTEMPTS", "3");
            jail.set_env("WEIR_RETRY__DURABLE__INITIAL_INTERVAL", "1s");
            jail.set_env("WEIR_RETRY__DURABLE__BACKOFF_COEFFICIENT", "2.0");
            jail.set_env("WEIR_RETRY__DURABLE__MAXIMUM_INTERVAL", "2s");
            jail.set_env("WEIR_RETRY__DURABLE__MAXIMUM_ATTEMPTS", "3");
            let settings = Settings::load(None, None).map_err(|e| e.to_string())?;
            assert_eq!(settings.retry.maximum_attempts, 3);
            assert_eq!(
                settings.retry.durable,
                Some(weir::DurableRetry {
                    initial_interval: Duration::from_secs(1),
                    backoff_coefficient: 2.0,
                    maximum_interval: Duration::from_secs(2),
                    maximum_attempts: 3,
                })
            );
            // One variable is enough to turn the stage on; the rest keep their defaults.
            jail.clear_env();
            jail.set_env("WEIR_RETRY__DURABLE__MAXIMUM_ATTEMPTS", "4");
            let settings = Settings::load(None, None).map_err(|e| e.to_string())?;
            assert_eq!(
                settings.retry.durable,
                Some(weir::DurableRetry {
                    maximum_attempts: 4,
                    ..weir::DurableRetry::default()
                })
            );
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure type, not ours
    fn test_hooks_are_off_unless_a_setting_turns_them_on() {
        figment::Jail::expect_with(|jail| {
            let settings = Settings::load(None, None).map_err(|e| e.to_string())?;
            assert!(!settings.service.test_hooks);
            assert_eq!(settings.service.test_hooks(), TestHooks::Off);

            jail.create_file("weir.toml", "[service]\ntest_hooks = true\n")?;
            let settings =
                Settings::load(Some(Path::new("weir.toml")), None).map_err(|e| e.to_string())?;
            assert_eq!(settings.service.test_hooks(), TestHooks::On);

            jail.set_env("WEIR_SERVICE__TEST_HOOKS", "false");
            let settings =
                Settings::load(Some(Path::new("weir.toml")), None).map_err(|e| e.to_string())?;
            assert_eq!(settings.service.test_hooks(), TestHooks::Off);
            Ok(())
        });
    }

    #[test]
    fn reads_sections_and_ignores_foreign_weir_variables() {
        assert!(is_setting("BROKERS"));
        assert!(is_setting("CONSUMER__MAX_IN_FLIGHT"));
        assert!(is_setting("ADMIN_ADDR"));
        assert!(!is_setting("CONFIG"));
        assert!(!is_setting("TANSU_BIN"));
        assert!(!is_setting("TEST_DATABASE_URL"));
        assert!(
            !is_setting("KAFKA__PROPERTIES__SASL.PASSWORD"),
            "read raw, not typed"
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure type, not ours
    fn librdkafka_properties_from_the_environment_keep_dots_and_raw_values() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("WEIR_KAFKA__PROPERTIES__SASL.PASSWORD", "0123");
            jail.set_env("WEIR_KAFKA__PROPERTIES__SECURITY.PROTOCOL", "SASL_SSL");
            jail.set_env("WEIR_CONSUMER__MAX_IN_FLIGHT", "64");
            jail.set_env("WEIR_TANSU_BIN", "/somewhere/tansu");
            let settings = Settings::load(None, None).map_err(|e| e.to_string())?;
            assert_eq!(settings.kafka.properties["sasl.password"], "0123");
            assert_eq!(settings.kafka.properties["security.protocol"], "SASL_SSL");
            assert_eq!(settings.consumer.max_in_flight, 64);
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure type, not ours
    fn reads_temporal_settings_with_their_defaults_and_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            let settings = Settings::load(None, None).map_err(|e| e.to_string())?;
            assert_eq!(
                settings.temporal.address(),
                None,
                "no Temporal unless configured"
            );
            assert_eq!(settings.temporal.namespace, "default");
            assert_eq!(settings.temporal.task_queue, "weir-tasks");
            assert_eq!(settings.temporal.initial_interval, Duration::from_secs(1));
            assert_eq!(settings.temporal.backoff_coefficient, 2.0);
            assert_eq!(settings.temporal.maximum_interval, Duration::from_secs(300));
            assert_eq!(settings.temporal.maximum_attempts, 3);
            assert_eq!(settings.temporal.start_to_close, Duration::from_secs(1800));
            jail.set_env("WEIR_TEMPORAL__ADDRESS", "temporal:7233");
            jail.set_env("WEIR_TEMPORAL__NAMESPACE", "tasks");
            jail.set_env("WEIR_TEMPORAL__TASK_QUEUE", "q");
            jail.set_env("WEIR_TEMPORAL__MAXIMUM_ATTEMPTS", "5");
            let settings = Settings::load(None, None).map_err(|e| e.to_string())?;
            assert_eq!(settings.temporal.address(), Some("temporal:7233"));
            assert_eq!(settings.temporal.namespace, "tasks");
            assert_eq!(settings.temporal.task_queue, "q");
            assert_eq!(settings.temporal.maximum_attempts, 5);
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure type, not ours
    fn reads_every_temporal_setting_from_the_toml_file_and_the_environment_overrides_it() {
        figment::Jail::expect_with(|jail| {
            // Every key of `[temporal]`, none at its default; the first four as the Helm chart's
            // worker-values rendering writes them.
            jail.create_file(
                "weir.toml",
                r#"
[temporal]
address = "temporal-frontend.temporal:7233"
namespace = "weir"
task_queue = "weir-tasks-ci"
worker_in_serve = false
connect_timeout = "7s"
initial_interval = "250ms"
backoff_coefficient = 1.5
maximum_interval = "1m"
maximum_attempts = 9
start_to_close = "2h"
heartbeat_timeout = "45s"
chunk_records = 500
"#,
            )?;
            let settings =
                Settings::load(Some(Path::new("weir.toml")), None).map_err(|e| e.to_string())?;
            let t = &settings.temporal;
            assert_eq!(t.address(), Some("temporal-frontend.temporal:7233"));
            assert_eq!(t.namespace, "weir");
            assert_eq!(t.task_queue, "weir-tasks-ci");
            assert!(!t.worker_in_serve);
            assert_eq!(t.connect_timeout, Duration::from_secs(7));
            assert_eq!(t.initial_interval, Duration::from_millis(250));
            assert_eq!(t.backoff_coefficient, 1.5);
            assert_eq!(t.maximum_interval, Duration::from_secs(60));
            assert_eq!(t.maximum_attempts, 9);
            assert_eq!(t.start_to_close, Duration::from_secs(2 * 3600));
            assert_eq!(t.heartbeat_timeout, Duration::from_secs(45));
            assert_eq!(t.chunk_records, 500);
            // What the reference service is handed is the same table.
            let handed = settings.reference().temporal;
            assert_eq!(handed.task_queue, "weir-tasks-ci");
            assert_eq!(handed.address(), t.address());

            // The environment still wins over the file, key by key.
            jail.set_env("WEIR_TEMPORAL__TASK_QUEUE", "from-env");
            let settings =
                Settings::load(Some(Path::new("weir.toml")), None).map_err(|e| e.to_string())?;
            assert_eq!(settings.temporal.task_queue, "from-env");
            assert_eq!(
                settings.temporal.namespace, "weir",
                "the rest from the file"
            );

            // A misspelt key in the table is refused, naming it.
            jail.clear_env();
            jail.create_file("typo.toml", "[temporal]\ntask_qeue = \"q\"\n")?;
            let error = Settings::load(Some(Path::new("typo.toml")), None).unwrap_err();
            assert!(format!("{error:#}").contains("task_qeue"), "{error:#}");
            Ok(())
        });
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure type, not ours
    fn reads_a_routes_breaker_from_the_toml_file_and_the_environment() {
        figment::Jail::expect_with(|jail| {
            let settings = Settings::load(None, None).map_err(|e| e.to_string())?;
            assert!(settings.routes.is_empty(), "no breaker unless configured");

            jail.create_file(
                "weir.toml",
                "[routes.record_customer_created.breaker]\n\
                 failure_ratio = 0.25\nwindow = \"1m\"\ncool_down = \"2s\"\n",
            )?;
            jail.set_env(
                "WEIR_ROUTES__RECORD_CUSTOMER_CREATED__BREAKER__MINIMUM_CALLS",
                "7",
            );
            let settings =
                Settings::load(Some(Path::new("weir.toml")), None).map_err(|e| e.to_string())?;
            let breaker = settings.routes["record_customer_created"]
                .breaker
                .clone()
                .expect("a breaker");
            let expected = BreakerConfig::new()
                .failure_ratio(0.25)
                .minimum_calls(7)
                .window(Duration::from_secs(60))
                .cool_down(Duration::from_secs(2));
            assert_eq!(breaker, expected, "the rest are the defaults");

            // The reference service has that route; an empty router has not.
            let recorder = crate::reference::Recorder::default();
            let mut router = crate::reference::router(&recorder, TestHooks::Off, None)
                .map_err(|e| e.to_string())?;
            settings
                .apply_routes(&mut router)
                .map_err(|e| e.to_string())?;
            let mut router = weir::Router::new();
            let error = settings.apply_routes(&mut router).unwrap_err();
            assert!(
                error.to_string().contains("record_customer_created"),
                "{error}"
            );

            jail.clear_env();
            jail.create_file("typo.toml", "[routes.x.breaker]\nfailure_rate = 0.5\n")?;
            let error = Settings::load(Some(Path::new("typo.toml")), None).unwrap_err();
            assert!(format!("{error:#}").contains("failure_rate"), "{error:#}");
            Ok(())
        });
    }
}
