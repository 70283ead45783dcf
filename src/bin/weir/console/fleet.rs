//! The fleet as the console knows it: the latest report of every process, and an hour of lag
//! and throughput history, all built from `weir.status` alone.
//!
//! The console reads the status topic from its beginning, outside any consumer group, and
//! folds every report in: a restarted console rebuilds what the topic still holds. A tombstone
//! removes its process; a process whose last report is older than three of its own report
//! intervals is stale (it died, or cannot reach Kafka), and its partitions go to whoever else
//! reports them. An hour after its last report, a stale process is forgotten.

use chrono::{DateTime, Duration as Span, Utc};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use weir::StatusReport;

/// How much history the charts keep.
pub(crate) const HISTORY: Span = Span::hours(1);
/// A process is stale after this many report intervals without a report.
const STALE_AFTER_INTERVALS: i32 = 3;
/// Width of one throughput bucket: reports of every process that fall in it add up.
pub(crate) const BUCKET_SECONDS: i64 = 10;

/// One process's latest report and when it came.
#[derive(Debug, Clone)]
pub(crate) struct Process {
    pub(crate) report: StatusReport,
}

impl Process {
    /// Whether three report intervals went by without a report, as of `now`.
    pub(crate) fn is_stale(&self, now: DateTime<Utc>) -> bool {
        let interval = Span::milliseconds(i64::try_from(self.report.interval_ms).unwrap_or(0));
        now - self.report.at > interval * STALE_AFTER_INTERVALS
    }
}

/// Handled, retried and dead-lettered records of one route in one bucket.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Counts {
    pub(crate) handled: u64,
    pub(crate) retried: u64,
    pub(crate) dead_lettered: u64,
}

/// Lag points of one partition, oldest first.
type LagPoints = VecDeque<(DateTime<Utc>, i64)>;

/// Who owns a partition, as the reports say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Owner {
    pub(crate) process: String,
    pub(crate) stale: bool,
    pub(crate) lag: Option<i64>,
    pub(crate) paused: bool,
}

/// Everything the pages show.
#[derive(Debug, Default)]
pub(crate) struct Fleet {
    processes: BTreeMap<String, Process>,
    /// Lag points of each partition, oldest first.
    lag: BTreeMap<(String, i32), LagPoints>,
    /// Each route's counts per bucket start (seconds since the epoch).
    throughput: BTreeMap<(String, String), BTreeMap<i64, Counts>>,
    /// Reports and tombstones read so far.
    pub(crate) records_read: u64,
}

impl Fleet {
    /// Folds in one record of the status topic: a report, or a tombstone (`None`) for `key`.
    /// A value that is not a report of a schema this console reads is ignored, with an error
    /// for the log.
    pub(crate) fn apply(&mut self, key: &str, value: Option<&[u8]>) -> Result<(), String> {
        self.records_read += 1;
        let Some(value) = value else {
            self.processes.remove(key);
            return Ok(());
        };
        let report: StatusReport = serde_json::from_slice(value)
            .map_err(|e| format!("status record {key} is not a report this console reads: {e}"))?;
        self.add(report);
        Ok(())
    }

    fn add(&mut self, report: StatusReport) {
        let at = report.at;
        for p in &report.partitions {
            if let Some(lag) = p.lag {
                let points = self.lag.entry((p.topic.clone(), p.partition)).or_default();
                // Two owners may report a partition during a rebalance; keep time order.
                if points.back().is_none_or(|(last, _)| *last <= at) {
                    points.push_back((at, lag));
                }
            }
        }
        let bucket = at.timestamp().div_euclid(BUCKET_SECONDS) * BUCKET_SECONDS;
        for r in &report.routes {
            let counts = self
                .throughput
                .entry((r.topic.clone(), r.event_type.clone()))
                .or_default()
                .entry(bucket)
                .or_default();
            counts.handled += r.handled;
            counts.retried += r.retried;
            counts.dead_lettered += r.dead_lettered;
        }
        let newer = self
            .processes
            .get(&report.process.id)
            .is_none_or(|p| p.report.at <= at);
        if newer {
            self.processes
                .insert(report.process.id.clone(), Process { report });
        }
        self.forget_before(at - HISTORY);
    }

    /// Drops history older than `cutoff`, and the processes whose last report is: one that
    /// died without its tombstone would otherwise stay on the page (stale) for ever.
    fn forget_before(&mut self, cutoff: DateTime<Utc>) {
        self.processes.retain(|_, p| p.report.at >= cutoff);
        for points in self.lag.values_mut() {
            while points.front().is_some_and(|(t, _)| *t < cutoff) {
                points.pop_front();
            }
        }
        self.lag.retain(|_, points| !points.is_empty());
        let first_bucket = cutoff.timestamp();
        for buckets in self.throughput.values_mut() {
            buckets.retain(|start, _| *start + BUCKET_SECONDS > first_bucket);
        }
        self.throughput.retain(|_, buckets| !buckets.is_empty());
    }

    /// The processes, by id.
    pub(crate) fn processes(&self) -> &BTreeMap<String, Process> {
        &self.processes
    }

    /// Every topic and partition a process reports, with its owner: the live process with the
    /// newest report listing it, else (all owners stale) the stale one with the newest report.
    pub(crate) fn owners(&self, now: DateTime<Utc>) -> BTreeMap<String, BTreeMap<i32, Owner>> {
        let mut best: BTreeMap<(String, i32), (bool, DateTime<Utc>, Owner)> = BTreeMap::new();
        for (id, process) in &self.processes {
            let stale = process.is_stale(now);
            for p in &process.report.partitions {
                let candidate = (
                    !stale,
                    process.report.at,
                    Owner {
                        process: id.clone(),
                        stale,
                        lag: p.lag,
                        paused: p.paused,
                    },
                );
                let key = (p.topic.clone(), p.partition);
                let better = best
                    .get(&key)
                    .is_none_or(|(live, at, _)| (candidate.0, candidate.1) > (*live, *at));
                if better {
                    best.insert(key, candidate);
                }
            }
        }
        let mut grid: BTreeMap<String, BTreeMap<i32, Owner>> = BTreeMap::new();
        for ((topic, partition), (_, _, owner)) in best {
            grid.entry(topic).or_default().insert(partition, owner);
        }
        grid
    }

    /// Topics with lag history.
    pub(crate) fn lag_topics(&self) -> BTreeSet<&str> {
        self.lag.keys().map(|(t, _)| t.as_str()).collect()
    }

    /// Lag points of each partition of `topic`.
    pub(crate) fn lag_of(&self, topic: &str) -> BTreeMap<i32, Vec<(DateTime<Utc>, i64)>> {
        self.lag
            .iter()
            .filter(|((t, _), _)| t == topic)
            .map(|((_, p), points)| (*p, points.iter().copied().collect()))
            .collect()
    }

    /// Each route's counts per bucket, oldest first.
    pub(crate) fn throughput(&self) -> &BTreeMap<(String, String), BTreeMap<i64, Counts>> {
        &self.throughput
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use weir::{PartitionStatus, ProcessInfo, RouteStatus, REPORT_SCHEMA_VERSION};

    fn report(id: &str, at: DateTime<Utc>, partitions: &[(i32, i64)]) -> StatusReport {
        let mut process = ProcessInfo::current("serve");
        process.id = id.to_owned();
        StatusReport {
            schema_version: REPORT_SCHEMA_VERSION,
            at,
            interval_ms: 1_000,
            process,
            partitions: partitions
                .iter()
                .map(|(p, lag)| PartitionStatus {
                    topic: "customers".into(),
                    partition: *p,
                    position: None,
                    committed: None,
                    log_end: None,
                    lag: Some(*lag),
                    in_flight: 0,
                    paused: false,
                    pause_reasons: vec![],
                })
                .collect(),
            partitions_total: partitions.len(),
            partitions_truncated: false,
            window_seconds: 1.0,
            routes: vec![RouteStatus {
                topic: "customers".into(),
                event_type: "customer.created".into(),
                handled: 10,
                retried: 1,
                dead_lettered: 2,
                parked: 0,
                p50_seconds: None,
                p99_seconds: None,
            }],
            errors: vec![],
            errors_total: 0,
            errors_truncated: false,
            commands: vec![],
        }
    }

    fn apply(fleet: &mut Fleet, r: &StatusReport) {
        let bytes = serde_json::to_vec(r).unwrap();
        fleet.apply(&r.process.id, Some(&bytes)).unwrap();
    }

    #[test]
    fn a_process_goes_stale_after_three_missed_reports_and_a_live_one_takes_its_partitions() {
        let t0 = Utc::now();
        let mut fleet = Fleet::default();
        apply(&mut fleet, &report("a", t0, &[(0, 5), (1, 7)]));
        apply(&mut fleet, &report("b", t0, &[(2, 1)]));
        let owners = fleet.owners(t0 + Span::milliseconds(2_900));
        assert_eq!(owners["customers"][&1].process, "a");
        assert!(!owners["customers"][&1].stale);

        // b takes a's partitions; a stops reporting.
        let t1 = t0 + Span::seconds(2);
        apply(&mut fleet, &report("b", t1, &[(0, 0), (1, 0), (2, 0)]));
        let now = t0 + Span::milliseconds(3_100);
        assert!(fleet.processes()["a"].is_stale(now));
        assert!(!fleet.processes()["b"].is_stale(now));
        let owners = fleet.owners(now);
        assert!(owners["customers"].values().all(|o| o.process == "b"));

        // Only a stale owner: it is still shown, as stale.
        let mut lonely = Fleet::default();
        apply(&mut lonely, &report("a", t0, &[(0, 5)]));
        let owner = &lonely.owners(now)["customers"][&0];
        assert_eq!((owner.process.as_str(), owner.stale), ("a", true));
    }

    #[test]
    fn a_tombstone_removes_its_process_and_garbage_is_refused() {
        let mut fleet = Fleet::default();
        apply(&mut fleet, &report("a", Utc::now(), &[(0, 1)]));
        fleet.apply("a", None).unwrap();
        assert!(fleet.processes().is_empty());
        assert!(fleet.apply("x", Some(b"not json")).is_err());
        assert!(fleet.processes().is_empty());
    }

    #[test]
    fn history_keeps_an_hour_of_lag_points_and_sums_routes_per_bucket() {
        let t0 = DateTime::from_timestamp(1_000_000, 0).unwrap();
        let mut fleet = Fleet::default();
        apply(&mut fleet, &report("a", t0, &[(0, 5)]));
        apply(&mut fleet, &report("b", t0 + Span::seconds(1), &[(0, 3)]));
        assert_eq!(fleet.lag_of("customers")[&0].len(), 2);
        let buckets = &fleet.throughput()[&("customers".into(), "customer.created".into())];
        assert_eq!(buckets.len(), 1);
        assert_eq!(
            buckets.values().next(),
            Some(&Counts {
                handled: 20,
                retried: 2,
                dead_lettered: 4
            })
        );
        // An hour later the old points are gone, and so is b, silent since.
        apply(&mut fleet, &report("a", t0 + Span::minutes(61), &[(0, 9)]));
        assert_eq!(fleet.lag_of("customers")[&0].len(), 1);
        assert_eq!(fleet.processes().keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(
            fleet.throughput()[&("customers".into(), "customer.created".into())].len(),
            1
        );
    }
}
