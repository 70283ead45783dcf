//! The Grafana dashboard the chart ships (charts/weir/files/dashboard.json), checked on a real
//! Prometheus: two `weir serve` replicas run a stream against Tansu and PostgreSQL (successes,
//! retried failures, a dead letter, an outage that opens a circuit breaker and pauses its
//! partitions, a rebalance that drains revoked partitions); Prometheus (`WEIR_TEST_PROMETHEUS`,
//! Debian's 2.42, installed by scripts/test.sh) scrapes both every second; then every query of
//! every panel must parse and return at least one series. A panel whose metric Weir does not
//! export, or whose labels are misspelt, is an empty panel on an operator's screen: here it fails.
//!
//! And a fresh `weir serve` exports its failure counters at 0 (commit failures, dead letters by
//! reason), so failure panels and alerts have a series before the first failure.
//!
//! Every wait polls with a deadline.

mod reference;
mod support;

use crate::reference::{CustomerCreated, CustomerDeleted, CustomerUpdated, CUSTOMER_TOPIC};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use support::broker::{free_port, unique, Tansu};
use support::db::TestDb;
use support::process::{
    eventually, http_get, metric_sum, wait_until, ServeOptions, TestDir, WeirProcess,
    FAST_GROUP_TOML,
};
use weir::{Envelope, KafkaBus, KafkaConfig, PublishExt};

const PATIENCE: Duration = Duration::from_secs(120);
/// What the test puts in place of Grafana's `$__rate_interval`: 30 scrapes at 1 s.
const RATE_INTERVAL: &str = "30s";
/// The route (handler) the breaker guards: the reference service's `customer.created` handler.
const ROUTE: &str = "record_customer_created";
/// How long the customers' dependency is down, from the start of the stream.
const OUTAGE: Duration = Duration::from_secs(4);

/// The dashboard as the chart ships it.
fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("charts/weir/files/dashboard.json");
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()))
}

/// Every panel's queries: (panel title, PromQL as the dashboard has it).
fn panel_queries(dashboard: &Value) -> Vec<(String, String)> {
    let panels = dashboard["panels"]
        .as_array()
        .expect("the dashboard has panels");
    let mut queries = Vec::new();
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("<untitled>").to_owned();
        let targets = panel["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[]);
        assert!(!targets.is_empty(), "panel {title:?} has no query");
        for target in targets {
            let expr = target["expr"]
                .as_str()
                .unwrap_or_else(|| panic!("a target of panel {title:?} has no expr"));
            queries.push((title.clone(), expr.to_owned()));
        }
    }
    queries
}

/// The dashboard's `label_values(metric, label)` variables (the job picker) as PromQL with the
/// same answer: `count by (label) (metric)`. (variable name, query)
fn variable_queries(dashboard: &Value) -> Vec<(String, String)> {
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("variables");
    variables
        .iter()
        .filter(|v| v["type"] == "query")
        .map(|v| {
            let name = v["name"].as_str().unwrap_or_default().to_owned();
            let query = v["query"]["query"].as_str().or(v["query"].as_str());
            let inner = query
                .and_then(|q| q.strip_prefix("label_values("))
                .and_then(|q| q.strip_suffix(')'))
                .unwrap_or_else(|| {
                    panic!("variable {name}: not label_values(metric, label): {query:?}")
                });
            let (metric, label) = inner.rsplit_once(',').unwrap_or_else(|| {
                panic!("variable {name}: label_values without a metric: {inner}")
            });
            (
                name,
                format!("count by ({}) ({})", label.trim(), metric.trim()),
            )
        })
        .collect()
}

/// A query as Grafana would send it with "All" jobs picked: its variables replaced, none left.
fn as_grafana_sends_it(expr: &str) -> String {
    let query = expr
        .replace("$__rate_interval", RATE_INTERVAL)
        .replace("${job}", ".+")
        .replace("$job", ".+");
    assert!(
        !query.contains('$'),
        "{expr:?} uses a variable this test does not know: {query}"
    );
    query
}

/// `text` as a URL query value: every byte but the unreserved ones percent-encoded.
fn percent_encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                char::from(b).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

fn required_tool(var: &str) -> PathBuf {
    let path = std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with scripts/test.sh, which installs it")
    });
    let path = PathBuf::from(path);
    assert!(
        path.is_file(),
        "{var}={} does not exist: run scripts/test.sh, which installs it",
        path.display()
    );
    path
}

/// A Prometheus server scraping `targets` every second, its storage in a temp dir. Killed on drop.
struct Prometheus {
    child: Option<Child>,
    watchdog: Option<Child>,
    addr: SocketAddr,
    log: PathBuf,
    http: reqwest::Client,
}

impl Prometheus {
    fn start(binary: &Path, dir: &TestDir, targets: &[SocketAddr]) -> Prometheus {
        let targets: Vec<String> = targets.iter().map(|a| format!("\"{a}\"")).collect();
        let config = dir.join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: weir
    metrics_path: /metrics
    static_configs:
      - targets: [{}]
",
                targets.join(", ")
            ),
        )
        .expect("write prometheus.yml");
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let log = dir.join("prometheus.log");
        let child = Command::new(binary)
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("tsdb").display()
            ))
            .arg(format!("--web.listen-address={addr}"))
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("create prometheus.log"))
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", binary.display()));
        let watchdog = support::watchdog(child.id());
        Prometheus {
            child: Some(child),
            watchdog,
            addr,
            log,
            http: reqwest::Client::new(),
        }
    }

    fn log_tail(&self) -> String {
        support::process::tail(&self.log, 2_000)
    }

    /// Waits for `/-/ready`.
    async fn ready(&self) {
        let addr = self.addr;
        wait_until("Prometheus to be ready", PATIENCE, || {
            match http_get(addr, "/-/ready") {
                Ok((200, _)) => Ok(()),
                other => Err(format!("{other:?}\n{}", self.log_tail())),
            }
        })
        .await;
    }

    /// `/api/v1/query` at the current time: the result vector, or Prometheus' error (a query
    /// that does not parse is `bad_data`).
    async fn query(&self, promql: &str) -> Result<Vec<Value>, String> {
        let response = self
            .http
            .get(format!(
                "http://{}/api/v1/query?query={}",
                self.addr,
                percent_encoded(promql)
            ))
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| format!("GET /api/v1/query: {e}"))?;
        let body: Value = response
            .json()
            .await
            .map_err(|e| format!("/api/v1/query answered no JSON: {e}"))?;
        if body["status"] != "success" {
            return Err(format!("{}: {}", body["errorType"], body["error"]));
        }
        Ok(body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    /// The sum of an instant vector's values (0 with no series).
    async fn sum(&self, promql: &str) -> Result<f64, String> {
        Ok(self
            .query(promql)
            .await?
            .iter()
            .filter_map(|s| s["value"][1].as_str()?.parse::<f64>().ok())
            .sum())
    }

    /// Waits until `promql`'s values add up to at least `at_least`.
    async fn at_least(&self, what: &str, promql: &str, at_least: f64) {
        eventually(what, PATIENCE, || async move {
            match self.sum(promql).await? {
                n if n >= at_least => Ok(()),
                n => Err(format!("{promql} is {n}, waiting for {at_least}")),
            }
        })
        .await;
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        support::kill_wait(self.watchdog.take());
        support::kill_wait(self.child.take());
        if std::thread::panicking() {
            eprintln!("--- tail of prometheus.log ---\n{}", self.log_tail());
        }
    }
}

/// The admin address of a started `weir serve`.
async fn admin(serve: &WeirProcess) -> SocketAddr {
    wait_until("the admin server's address in the logs", PATIENCE, || {
        serve.admin_addr().ok_or_else(|| serve.stderr_tail(2_000))
    })
    .await
}

/// Polls `/metrics` of `addr` until `name{labels}` adds up to at least `at_least`.
async fn scraped(addr: SocketAddr, name: &str, labels: &[(&str, &str)], at_least: f64) {
    wait_until(&format!("{name}{labels:?} >= {at_least}"), PATIENCE, || {
        let body = http_get(addr, "/metrics").map_err(|e| e.to_string())?.1;
        match metric_sum(&body, name, labels) {
            n if n >= at_least => Ok(()),
            n => Err(format!("{n}")),
        }
    })
    .await;
}

/// Retries fast, parks what still fails (durable retries: the parked-records panels), and a
/// breaker on the customers' route that opens at half of 10 calls failing (the breaker and
/// pause panels).
fn serve_config() -> String {
    format!(
        "{FAST_GROUP_TOML}
[retry]
initial_interval = \"20ms\"
maximum_attempts = 3
jitter = 0.0

[retry.durable]
initial_interval = \"300ms\"
backoff_coefficient = 1.0
maximum_interval = \"300ms\"
maximum_attempts = 1000

[routes.{ROUTE}.breaker]
failure_ratio = 0.5
minimum_calls = 10
window = \"10s\"
cool_down = \"1s\"
backoff = 2.0
max_cool_down = \"2s\"
"
    )
}

fn broker() -> Tansu {
    let broker = Tansu::start_memory();
    broker.create_topic(CUSTOMER_TOPIC, 2);
    broker.create_topic(&format!("{CUSTOMER_TOPIC}.dlq"), 1);
    broker
}

/// Publishes the stream: 100 updates that succeed, 5 that fail once and are retried, 1 delete
/// whose handler refuses it for good (a dead letter), and 30 creations that fail while the
/// customers' dependency is down until `until`: the only calls of the breaker's route, so its
/// window is all failures and it opens; each has a key of its own, so a parked one holds
/// nothing else back.
async fn stream(bus: &KafkaBus, until: chrono::DateTime<chrono::Utc>) {
    for n in 0..100 {
        let e = CustomerUpdated::new(format!("ok-{n}"), json!({ "n": n }));
        bus.publish(&Envelope::new(e)).await.expect("publish");
    }
    for n in 0..5 {
        let e = CustomerUpdated::new(format!("retry-{n}"), json!({ "simulate": "transient" }));
        bus.publish(&Envelope::new(e)).await.expect("publish");
    }
    let doomed = CustomerDeleted::new("doomed", json!({ "simulate": "permanent" }));
    bus.publish(&Envelope::new(doomed)).await.expect("publish");
    for n in 0..30 {
        let details = json!({ "simulate": "outage", "until": until.to_rfc3339() });
        let e = CustomerCreated::new(format!("outage-{n}"), details);
        bus.publish(&Envelope::new(e)).await.expect("publish");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_dashboard_panel_shows_data_from_a_live_service_on_a_real_prometheus() {
    let started = Instant::now();
    // First, so a machine without Prometheus fails at once, saying so.
    let prometheus_bin = required_tool("WEIR_TEST_PROMETHEUS");
    let dashboard = dashboard();
    let queries = panel_queries(&dashboard);
    let broker = broker();
    let db = TestDb::migrated().await;
    let dir = TestDir::new("weir-dashboard");
    let group = unique("dashboard");
    let options = ServeOptions::new(&broker.brokers(), &group, &dir.join("handled.jsonl"))
        .env("WEIR_DATABASE__URL", db.url())
        .env("WEIR_DATABASE__MAX_CONNECTIONS", "4")
        .env("WEIR_HTTP__ADDR", "127.0.0.1:0")
        .env(
            "WEIR_STORAGE__DIR",
            dir.join("storage").display().to_string(),
        )
        .env("WEIR_CONSUMER__COMMIT_INTERVAL", "100ms")
        .config(&serve_config());

    // Two replicas; the second one's arrival revokes partitions of the first, which drains them
    // (the revoke drain panel). Settled before the stream, so the breaker's pauses are not
    // revoked away with their partitions.
    let first = WeirProcess::serve(dir.path(), "serve-1", &options);
    let first_admin = admin(&first).await;
    scraped(
        first_admin,
        "weir_rebalances_total",
        &[("kind", "assign")],
        1.0,
    )
    .await;
    let second = WeirProcess::serve(dir.path(), "serve-2", &options);
    let second_admin = admin(&second).await;
    scraped(first_admin, "weir_revoke_drain_seconds_count", &[], 1.0).await;
    scraped(
        second_admin,
        "weir_rebalances_total",
        &[("kind", "assign")],
        1.0,
    )
    .await;

    let prometheus = Prometheus::start(&prometheus_bin, &dir, &[first_admin, second_admin]);
    prometheus.ready().await;
    prometheus
        .at_least(
            "Prometheus to scrape both replicas",
            "up{job=\"weir\"} == 1",
            2.0,
        )
        .await;

    let bus = KafkaBus::new(KafkaConfig::new(broker.brokers())).expect("bus");
    let until = chrono::Utc::now() + chrono::Duration::from_std(OUTAGE).unwrap();
    stream(&bus, until).await;

    // The stream's effects, as Prometheus has them: what the failure panels are for.
    let checks = [
        (
            "records handled",
            "sum(weir_messages_handled_total{outcome=\"success\"})",
            105.0,
        ),
        (
            "records retried",
            "sum(weir_messages_handled_total{outcome=\"retried\"})",
            5.0,
        ),
        (
            "a dead letter",
            "sum(weir_dead_letters_total{reason=\"acknowledged\"})",
            1.0,
        ),
        (
            "a breaker opened",
            "sum(weir_breaker_transitions_total{to=\"open\"})",
            1.0,
        ),
        ("a paused partition", "count(weir_partition_paused)", 1.0),
        (
            "a revoke drained",
            "sum(weir_revoke_drain_seconds_count)",
            1.0,
        ),
        (
            "lag from librdkafka's statistics",
            "count(weir_consumer_lag)",
            2.0,
        ),
    ];
    for (what, promql, at_least) in checks {
        prometheus.at_least(what, promql, at_least).await;
    }

    // The job picker lists the scraped job.
    for (name, query) in variable_queries(&dashboard) {
        let series = prometheus
            .query(&query)
            .await
            .unwrap_or_else(|e| panic!("variable {name}: {query} fails on Prometheus: {e}"));
        assert!(
            series
                .iter()
                .any(|s| s["metric"].as_object().is_some_and(|m| !m.is_empty())),
            "variable {name} ({query}) offers nothing: {series:?}"
        );
    }

    // Every panel's every query parses and returns at least one series.
    let mut empty = Vec::new();
    let mut shown = BTreeMap::new();
    for (title, expr) in &queries {
        let query = as_grafana_sends_it(expr);
        match prometheus.query(&query).await {
            Ok(series) if series.is_empty() => empty.push(format!("{title:?}: {query}")),
            Ok(series) => *shown.entry(title.clone()).or_insert(0) += series.len(),
            Err(error) => panic!("panel {title:?}: {query} fails on Prometheus: {error}"),
        }
    }
    assert!(
        empty.is_empty(),
        "panels without data:\n{}",
        empty.join("\n")
    );
    eprintln!(
        "dashboard: {} queries of {} panels, each with series ({shown:?}); {:.1?}",
        queries.len(),
        shown.len(),
        started.elapsed()
    );
    drop(prometheus);
    drop((first, second));
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_service_exports_its_failure_counters_at_zero() {
    let broker = broker();
    let dir = TestDir::new("weir-zeros");
    let options = ServeOptions::new(
        &broker.brokers(),
        &unique("zeros"),
        &dir.join("handled.jsonl"),
    );
    let serve = WeirProcess::serve(dir.path(), "serve", &options);
    let addr = admin(&serve).await;
    let (status, body) = http_get(addr, "/metrics").expect("GET /metrics");
    assert_eq!(status, 200);
    let lines: Vec<&str> = body.lines().collect();
    for series in [
        "weir_commits_total{result=\"failure\"} 0".to_owned(),
        "weir_commits_total{result=\"success\"} 0".to_owned(),
        "weir_rebalances_total{kind=\"revoke\"} 0".to_owned(),
        "weir_revoke_drain_seconds_count{aborted=\"true\"} 0".to_owned(),
        format!("weir_dead_letters_total{{reason=\"acknowledged\",topic=\"{CUSTOMER_TOPIC}\"}} 0"),
        format!("weir_dead_letters_total{{reason=\"retries_exhausted\",topic=\"{CUSTOMER_TOPIC}\"}} 0"),
        format!("weir_dead_letters_total{{reason=\"panic\",topic=\"{CUSTOMER_TOPIC}\"}} 0"),
        format!("weir_dead_letters_total{{reason=\"decode\",topic=\"{CUSTOMER_TOPIC}\"}} 0"),
        format!("weir_messages_handled_total{{event_type=\"customer.created\",outcome=\"retried\",topic=\"{CUSTOMER_TOPIC}\"}} 0"),
        format!("weir_messages_handled_total{{event_type=\"customer.created\",outcome=\"dead_lettered\",topic=\"{CUSTOMER_TOPIC}\"}} 0"),
    ] {
        assert!(
            lines.contains(&series.as_str()),
            "a fresh /metrics lacks `{series}`:\n{body}"
        );
    }
    // The process collector: the dashboard's memory panel.
    let rss = metric_sum(&body, "process_resident_memory_bytes", &[]);
    assert!(rss > 1_000_000.0, "process_resident_memory_bytes is {rss}");
}
