//! The status report a process publishes (issue 30): who it is, the partitions it owns and how
//! far each got, what each route did since the last report, and its last errors. JSON, with an
//! explicit [`REPORT_SCHEMA_VERSION`] so that a console can read reports of older and newer
//! replicas side by side during a rolling deploy.
//!
//! Built every few seconds, never per record: route counts and handler times are deltas of the
//! Prometheus series the records already update (`weir_messages_handled_total`,
//! `weir_handler_duration_seconds`), so reporting adds nothing to a record's path. The
//! partitions come from the engine, asked through its control channel.

use super::metrics::Metrics;
use super::recent_commands::CommandAck;
use super::recent_errors::{self, ErrorEntry};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::OnceLock;

/// The report's schema version. Bumped when a field changes meaning or goes; new optional
/// fields keep it.
pub const REPORT_SCHEMA_VERSION: u32 = 1;

/// Partitions a report lists at most: a report must fit comfortably in one Kafka record
/// (about 200 bytes per partition, so 1,000 keep it near 200 kB).
pub const MAX_REPORTED_PARTITIONS: usize = 1_000;

/// One process's status at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// [`REPORT_SCHEMA_VERSION`] of the writer.
    pub schema_version: u32,
    /// When the report was built.
    pub at: DateTime<Utc>,
    /// How often this process reports, in milliseconds: a reader marks the process stale after
    /// three intervals without a report.
    pub interval_ms: u64,
    /// The process.
    pub process: ProcessInfo,
    /// The partitions it owns, by topic and partition; at most [`MAX_REPORTED_PARTITIONS`].
    pub partitions: Vec<PartitionStatus>,
    /// How many partitions it owns, listed or not.
    pub partitions_total: usize,
    /// Whether some partitions were left out of `partitions`.
    pub partitions_truncated: bool,
    /// Seconds covered by the routes' counts (since the previous report).
    pub window_seconds: f64,
    /// Each route's counts over the window; routes with no series yet are not listed.
    pub routes: Vec<RouteStatus>,
    /// The latest handler errors, oldest first (at most ten).
    pub errors: Vec<ErrorEntry>,
    /// Handler errors since the process started, listed or not.
    pub errors_total: u64,
    /// Whether older errors were left out of `errors`.
    pub errors_truncated: bool,
    /// The fleet commands this process read lately, oldest first (at most twenty), each with
    /// its result: how an operator sees that a command reached this process. Absent in
    /// reports of processes older than fleet commands.
    #[serde(default)]
    pub commands: Vec<CommandAck>,
}

/// Who reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// `<host>-<pid>-<8 hex digits>`: the report's key, stable for the process's life and
    /// unique across restarts (the hex digits are drawn at start).
    pub id: String,
    /// `HOSTNAME` (a pod's name on Kubernetes), else the kernel's host name, else `unknown`.
    pub host: String,
    /// The operating system's process id.
    pub pid: u32,
    /// Weir's version.
    pub version: String,
    /// What the process does: `serve`, `worker`, `retry-worker`, `outbox-relay`, ...
    pub role: String,
    /// When the process started.
    pub started_at: DateTime<Utc>,
    /// Resident memory in bytes (`VmRSS`); `None` where `/proc` does not say.
    pub rss_bytes: Option<u64>,
}

/// The identity of this process: drawn once, so every report of it carries the same id.
fn identity() -> &'static (String, String, DateTime<Utc>) {
    static IDENTITY: OnceLock<(String, String, DateTime<Utc>)> = OnceLock::new();
    IDENTITY.get_or_init(|| {
        // HOSTNAME is the pod's name on Kubernetes; shells often do not export it, so Linux's
        // own record of the name comes next.
        let host = std::env::var("HOSTNAME")
            .ok()
            .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok())
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "unknown".to_owned());
        let short = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let id = format!("{host}-{}-{short}", std::process::id());
        (id, host, Utc::now())
    })
}

impl ProcessInfo {
    /// This process in `role`, with its resident memory now.
    pub fn current(role: impl Into<String>) -> Self {
        let (id, host, started_at) = identity();
        Self {
            id: id.clone(),
            host: host.clone(),
            pid: std::process::id(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            role: role.into(),
            started_at: *started_at,
            rss_bytes: rss_bytes(),
        }
    }
}

/// `VmRSS` of `/proc/self/status`, in bytes; `None` off Linux or if it cannot be read.
fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// One owned partition, as the engine saw it when asked.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStatus {
    /// The topic.
    pub topic: String,
    /// The partition.
    pub partition: i32,
    /// The next offset after the last record the engine admitted; `None` before the first.
    pub position: Option<i64>,
    /// The next offset the broker confirmed committing for the group; `None` before the first
    /// confirmed commit.
    pub committed: Option<i64>,
    /// The partition's high watermark, from the client's statistics (Kafka only, refreshed
    /// every couple of seconds); `None` until known.
    pub log_end: Option<i64>,
    /// Records between the committed position (before any commit, the log start) and
    /// `log_end`, from the same statistics; the same number `weir_consumer_lag` shows.
    pub lag: Option<i64>,
    /// Records admitted and not final: running, or waiting behind their key.
    pub in_flight: usize,
    /// Whether any pause holds the partition.
    pub paused: bool,
    /// What holds it paused: each source and its reason.
    pub pause_reasons: Vec<PauseReason>,
}

/// One reason a partition is paused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PauseReason {
    /// Who paused: `api`, `breaker` or `command`.
    pub source: String,
    /// Why, as given.
    pub reason: String,
}

/// One route's work over a report's window. A route here is what the metrics know: a topic
/// and an event type.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RouteStatus {
    /// The topic.
    pub topic: String,
    /// The event type.
    pub event_type: String,
    /// Records whose handler succeeded.
    pub handled: u64,
    /// Failed attempts that were retried in place.
    pub retried: u64,
    /// Records dead-lettered.
    pub dead_lettered: u64,
    /// Records parked for durable retries.
    pub parked: u64,
    /// Median handler time in seconds: the upper bound of the histogram bucket it falls in.
    /// `None` without a handler call in the window.
    pub p50_seconds: Option<f64>,
    /// 99th percentile handler time in seconds, the same way.
    pub p99_seconds: Option<f64>,
}

/// The cumulative values of one route's series at the last report.
#[derive(Debug, Clone, Default)]
struct Totals {
    outcomes: HashMap<String, u64>,
    /// Cumulative bucket counts, in the order of `bounds`.
    buckets: Vec<u64>,
    bounds: Vec<f64>,
}

/// Builds a process's reports: remembers the route totals of the previous one, so each report
/// counts only its own window.
#[derive(Debug)]
pub struct ReportBuilder {
    role: String,
    interval: std::time::Duration,
    metrics: Metrics,
    last: HashMap<(String, String), Totals>,
    last_at: std::time::Instant,
}

impl ReportBuilder {
    /// A builder for a process in `role` reporting every `interval`, reading `metrics`. The
    /// first report's window starts now.
    pub fn new(role: impl Into<String>, interval: std::time::Duration, metrics: Metrics) -> Self {
        let mut builder = Self {
            role: role.into(),
            interval,
            metrics,
            last: HashMap::new(),
            last_at: std::time::Instant::now(),
        };
        builder.last = builder.totals();
        builder
    }

    /// The report of now, with the partitions the engine gave.
    pub fn build(&mut self, mut partitions: Vec<PartitionStatus>) -> StatusReport {
        let now = std::time::Instant::now();
        let window = now.duration_since(self.last_at);
        self.last_at = now;
        let totals = self.totals();
        let mut routes: Vec<RouteStatus> = totals
            .iter()
            .map(|(route, now)| {
                let before = self.last.get(route);
                delta(route, now, before)
            })
            .collect();
        routes.sort_by(|a, b| (&a.topic, &a.event_type).cmp(&(&b.topic, &b.event_type)));
        self.last = totals;

        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        let partitions_total = partitions.len();
        partitions.truncate(MAX_REPORTED_PARTITIONS);
        let (errors, errors_total) = self.metrics.recent_errors.snapshot();
        StatusReport {
            schema_version: REPORT_SCHEMA_VERSION,
            at: Utc::now(),
            interval_ms: u64::try_from(self.interval.as_millis()).unwrap_or(u64::MAX),
            process: ProcessInfo::current(self.role.clone()),
            partitions_truncated: partitions_total > partitions.len(),
            partitions,
            partitions_total,
            window_seconds: window.as_secs_f64(),
            routes,
            errors_truncated: errors_total > recent_errors::KEPT as u64
                && errors.len() == recent_errors::KEPT,
            errors,
            errors_total,
            commands: self.metrics.recent_commands.snapshot(),
        }
    }

    /// Every route's cumulative series now (one pass over two metric families).
    fn totals(&self) -> HashMap<(String, String), Totals> {
        use prometheus::core::Collector as _;
        let mut totals: HashMap<(String, String), Totals> = HashMap::new();
        let label = |m: &prometheus::proto::Metric, name: &str| {
            m.get_label()
                .iter()
                .find(|l| l.name() == name)
                .map(|l| l.value().to_owned())
                .unwrap_or_default()
        };
        for family in self.metrics.handled.collect() {
            for m in family.get_metric() {
                let route = (label(m, "topic"), label(m, "event_type"));
                let outcome = label(m, "outcome");
                *totals
                    .entry(route)
                    .or_default()
                    .outcomes
                    .entry(outcome)
                    .or_default() += m.get_counter().get_value() as u64;
            }
        }
        for family in self.metrics.handler_duration.collect() {
            for m in family.get_metric() {
                let route = (label(m, "topic"), label(m, "event_type"));
                let entry = totals.entry(route).or_default();
                let histogram = m.get_histogram();
                entry.bounds = histogram
                    .get_bucket()
                    .iter()
                    .map(|b| b.upper_bound())
                    .collect();
                entry.buckets = histogram
                    .get_bucket()
                    .iter()
                    .map(|b| b.cumulative_count())
                    .collect();
                entry.bounds.push(f64::INFINITY);
                entry.buckets.push(histogram.get_sample_count());
            }
        }
        totals
    }
}

/// One route's counts between two totals.
fn delta(route: &(String, String), now: &Totals, before: Option<&Totals>) -> RouteStatus {
    let count = |outcome: &str| {
        let was = before
            .and_then(|b| b.outcomes.get(outcome))
            .copied()
            .unwrap_or(0);
        now.outcomes
            .get(outcome)
            .copied()
            .unwrap_or(0)
            .saturating_sub(was)
    };
    let buckets: Vec<u64> = now
        .buckets
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let was = before.and_then(|b| b.buckets.get(i)).copied().unwrap_or(0);
            n.saturating_sub(was)
        })
        .collect();
    let quantile = |q: f64| quantile(&now.bounds, &buckets, q);
    RouteStatus {
        topic: route.0.clone(),
        event_type: route.1.clone(),
        handled: count("success"),
        retried: count("retried"),
        dead_lettered: count("dead_lettered"),
        parked: count("parked"),
        p50_seconds: quantile(0.5),
        p99_seconds: quantile(0.99),
    }
}

/// The upper bound of the bucket where quantile `q` falls, from cumulative bucket counts (the
/// last bucket is +Inf: reported as the largest finite bound). `None` for an empty window.
fn quantile(bounds: &[f64], cumulative: &[u64], q: f64) -> Option<f64> {
    let total = *cumulative.last()?;
    if total == 0 {
        return None;
    }
    let rank = (q * total as f64).ceil().max(1.0) as u64;
    let at = cumulative.iter().position(|&n| n >= rank)?;
    let bound = bounds[at];
    if bound.is_finite() {
        Some(bound)
    } else {
        bounds.iter().rev().find(|b| b.is_finite()).copied()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_report_serializes_with_its_schema_version_and_every_section() {
        let metrics = Metrics::new();
        metrics.recent_errors.push(
            &"e-1",
            "orders",
            "reserve_stock",
            "retried",
            &"stock service down",
        );
        let mut builder =
            ReportBuilder::new("serve", std::time::Duration::from_secs(5), metrics.clone());
        let series = metrics.route_series("orders", "order.placed");
        series.succeeded.inc_by(3);
        series.duration.observe(0.002);
        series.duration.observe(0.002);
        series.duration.observe(0.2);
        let report = builder.build(vec![PartitionStatus {
            topic: "orders".into(),
            partition: 0,
            position: Some(12),
            committed: Some(10),
            log_end: Some(20),
            lag: Some(10),
            in_flight: 2,
            paused: true,
            pause_reasons: vec![PauseReason {
                source: "api".into(),
                reason: "maintenance".into(),
            }],
        }]);
        let json: serde_json::Value = serde_json::to_value(&report).expect("serializes");
        assert_eq!(json["schema_version"], REPORT_SCHEMA_VERSION);
        for field in [
            "at",
            "interval_ms",
            "process",
            "partitions",
            "partitions_total",
            "partitions_truncated",
            "window_seconds",
            "routes",
            "errors",
            "errors_total",
            "errors_truncated",
        ] {
            assert!(json.get(field).is_some(), "no `{field}` in {json}");
        }
        let process = &json["process"];
        for field in [
            "id",
            "host",
            "pid",
            "version",
            "role",
            "started_at",
            "rss_bytes",
        ] {
            assert!(process.get(field).is_some(), "no process `{field}`");
        }
        assert_eq!(process["role"], "serve");
        assert_eq!(process["version"], env!("CARGO_PKG_VERSION"));
        let partition = &json["partitions"][0];
        assert_eq!(partition["position"], 12);
        assert_eq!(partition["committed"], 10);
        assert_eq!(partition["lag"], 10);
        assert_eq!(partition["in_flight"], 2);
        assert_eq!(partition["pause_reasons"][0]["reason"], "maintenance");
        let route = &json["routes"][0];
        assert_eq!(route["event_type"], "order.placed");
        assert_eq!(route["handled"], 3);
        assert_eq!(route["p50_seconds"], 0.005);
        assert_eq!(route["p99_seconds"], 0.25);
        assert_eq!(json["errors"][0]["event_id"], "e-1");
        assert_eq!(json["errors"][0]["kind"], "retried");
        let back: StatusReport = serde_json::from_value(json).expect("reads back");
        assert_eq!(back, report);
    }

    #[test]
    fn route_counts_cover_only_the_window_since_the_last_report() {
        let metrics = Metrics::new();
        let series = metrics.route_series("orders", "order.placed");
        series.succeeded.inc_by(5);
        let mut builder =
            ReportBuilder::new("serve", std::time::Duration::from_secs(5), metrics.clone());
        series.succeeded.inc_by(2);
        assert_eq!(builder.build(Vec::new()).routes[0].handled, 2);
        let quiet = builder.build(Vec::new());
        assert_eq!(quiet.routes[0].handled, 0);
        assert_eq!(quiet.routes[0].p50_seconds, None);
    }

    #[test]
    fn partitions_beyond_the_cap_are_left_out_and_said_so() {
        let mut builder =
            ReportBuilder::new("serve", std::time::Duration::from_secs(5), Metrics::new());
        let many = (0..(MAX_REPORTED_PARTITIONS as i32 + 5))
            .map(|partition| PartitionStatus {
                topic: "t".into(),
                partition,
                position: None,
                committed: None,
                log_end: None,
                lag: None,
                in_flight: 0,
                paused: false,
                pause_reasons: Vec::new(),
            })
            .collect();
        let report = builder.build(many);
        assert_eq!(report.partitions.len(), MAX_REPORTED_PARTITIONS);
        assert_eq!(report.partitions_total, MAX_REPORTED_PARTITIONS + 5);
        assert!(report.partitions_truncated);
    }
}
