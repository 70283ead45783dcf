//! The checker: reads the run's histories after the fact and says what happened to every
//! record. It trusts nothing the system under test says about itself: produced comes from the
//! producer's acknowledgements, handled from the ledger, dead letters from the dead-letter topic.
//!
//! - lost: acknowledged, not poison, never handled (a broker fault's partition is called out,
//!   never silently counted either way);
//! - order violations: per key and handler, a record handled for the first time while an earlier
//!   record of the same key and handler (by the producer's sequence number) had not been handled
//!   yet. Weir keeps a key's order per handler: durable retries park a key per handler;
//! - duplicates: handlings after a record's first, each blamed on the latest fault started before
//!   it (`none` before the first fault);
//! - dead letters: must be exactly the poison set, matched by original partition and offset.

use crate::faults::FaultKind;
use crate::ledger::{Handling, Produced};
use crate::monitor::{BrokerFault, Sample};
use serde::Serialize;
use std::collections::{BTreeMap, HashMap, HashSet};
use weir::dead_letter_headers as dl;
use weir::StoredRecord;

/// A fault as it ran.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct FaultRun {
    pub(crate) kind: FaultKind,
    /// Seconds since the stream started: planned, started, ended.
    pub(crate) planned_s: f64,
    pub(crate) start_s: f64,
    pub(crate) end_s: f64,
    /// The broker it ran on.
    pub(crate) broker: String,
    /// What happened (which replica, a slow stop...).
    pub(crate) note: String,
    /// Filled by the checker: the highest total lag between this fault's start and the next's,
    /// and how long after its end the lag was back under one second's worth of records.
    pub(crate) max_lag: i64,
    pub(crate) drain_s: Option<f64>,
    pub(crate) duplicates: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Latency {
    pub(crate) count: usize,
    pub(crate) p50_ms: i64,
    pub(crate) p99_ms: i64,
    pub(crate) max_ms: i64,
}

impl Latency {
    fn of(mut values: Vec<i64>) -> Latency {
        values.sort_unstable();
        let at = |q: f64| {
            if values.is_empty() {
                0
            } else {
                values[((values.len() - 1) as f64 * q).round() as usize]
            }
        };
        Latency {
            count: values.len(),
            p50_ms: at(0.50),
            p99_ms: at(0.99),
            max_ms: values.last().copied().unwrap_or(0),
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Duplicates {
    /// Handlings beyond each record's first.
    pub(crate) count: u64,
    /// Records handled more than once.
    pub(crate) records: u64,
    /// `count`, by the fault blamed.
    pub(crate) by_fault: BTreeMap<String, u64>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct DeadLetters {
    /// The poison set's size: undecodable and failing-forever records sent.
    pub(crate) poison: u64,
    pub(crate) poison_undecodable: u64,
    pub(crate) poison_permanent: u64,
    /// Dead-lettered records of the poison set.
    pub(crate) matched: u64,
    /// Poison records with no dead letter.
    pub(crate) missing: Vec<String>,
    /// Dead letters of records outside the poison set.
    pub(crate) unexpected: Vec<String>,
    /// Dead letters beyond the first for the same record (at-least-once).
    pub(crate) repeated: u64,
}

/// Tasks created through the API (the outbox path).
#[derive(Clone, Debug, Default, Serialize)]
pub(crate) struct Tasks {
    /// Tasks the API answered 201 for.
    pub(crate) created: u64,
    /// Requests without a 201 (a replica going away, the database restarting): no task.
    pub(crate) refused_requests: u64,
    /// Created tasks whose `task.created` a handler recorded.
    pub(crate) handled: u64,
    /// Created tasks whose `task.created` no handler recorded.
    pub(crate) lost: Vec<String>,
    /// Task rows by final status at the end.
    pub(crate) completed: i64,
    pub(crate) failed: i64,
    pub(crate) unfinished: i64,
}

/// The whole verdict, as JSON (and rendered as Markdown by `report`).
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Report {
    pub(crate) passed: bool,
    pub(crate) failures: Vec<String>,
    pub(crate) seed: u64,
    pub(crate) minutes: f64,
    pub(crate) rate: f64,
    pub(crate) command: String,
    pub(crate) started_at: String,
    pub(crate) broker: String,
    pub(crate) database: String,
    pub(crate) produced: u64,
    pub(crate) handled_unique: u64,
    pub(crate) lost: u64,
    pub(crate) lost_sample: Vec<String>,
    /// Of `lost`, records on a partition that had a broker fault.
    pub(crate) lost_on_broker_fault: u64,
    pub(crate) order_violations: u64,
    pub(crate) order_violation_sample: Vec<String>,
    pub(crate) duplicates: Duplicates,
    pub(crate) dead_lettered: DeadLetters,
    pub(crate) parked_at_end: i64,
    pub(crate) tasks: Tasks,
    pub(crate) latency: Latency,
    pub(crate) latency_excluding_outage: Latency,
    pub(crate) max_lag: i64,
    pub(crate) faults: Vec<FaultRun>,
    pub(crate) faults_left_out: Vec<String>,
    pub(crate) broker_faults: Vec<BrokerFault>,
    pub(crate) unexpected_exits: Vec<String>,
    pub(crate) peak_rss_kib: BTreeMap<String, u64>,
    pub(crate) garbled_ledger_lines: usize,
    pub(crate) drain_at_end_s: f64,
    pub(crate) picture: String,
    pub(crate) timeline: Vec<Sample>,
}

/// Everything the checker reads.
pub(crate) struct Inputs<'a> {
    pub(crate) produced: &'a [Produced],
    pub(crate) ledger: &'a [Handling],
    pub(crate) dead_letters: &'a [StoredRecord],
    pub(crate) topic: &'a str,
    pub(crate) stream_start_ms: i64,
    pub(crate) rate: f64,
    pub(crate) faults: Vec<FaultRun>,
    pub(crate) samples: &'a [Sample],
    pub(crate) broker_faults: &'a [BrokerFault],
}

/// What the checker finds; the caller adds the run's settings.
pub(crate) struct Findings {
    pub(crate) produced: u64,
    pub(crate) handled_unique: u64,
    pub(crate) lost: Vec<String>,
    pub(crate) lost_on_broker_fault: u64,
    pub(crate) order_violations: Vec<String>,
    pub(crate) duplicates: Duplicates,
    pub(crate) dead_lettered: DeadLetters,
    pub(crate) latency: Latency,
    pub(crate) latency_excluding_outage: Latency,
    pub(crate) max_lag: i64,
    pub(crate) faults: Vec<FaultRun>,
}

pub(crate) fn check(inputs: Inputs<'_>) -> Findings {
    let by_id: HashMap<&str, &Produced> =
        inputs.produced.iter().map(|p| (p.id.as_str(), p)).collect();
    // Expected sequence numbers per (key, type), poison left out.
    let mut expected: HashMap<(&str, &str), Vec<u64>> = HashMap::new();
    for p in inputs.produced.iter().filter(|p| !p.is_poison()) {
        expected
            .entry((p.key.as_str(), p.event_type.as_str()))
            .or_default()
            .push(p.seq);
    }
    for seqs in expected.values_mut() {
        seqs.sort_unstable();
        seqs.dedup();
    }
    let mut next: HashMap<(&str, &str), usize> = HashMap::new();
    let mut done: HashMap<(&str, &str), HashSet<u64>> = HashMap::new();
    let mut first: HashMap<&str, i64> = HashMap::new();
    let mut faults = inputs.faults;
    faults.sort_by(|a, b| a.start_s.total_cmp(&b.start_s));
    let mut duplicates = Duplicates::default();
    let mut counts: HashMap<&str, u64> = HashMap::new();
    let mut violations = Vec::new();
    for h in inputs.ledger {
        let n = counts.entry(h.event_id.as_str()).or_default();
        *n += 1;
        if *n > 1 {
            duplicates.count += 1;
            if *n == 2 {
                duplicates.records += 1;
            }
            let t = (h.at_ms - inputs.stream_start_ms) as f64 / 1000.0;
            let blamed = faults.iter().rev().find(|f| f.start_s <= t);
            let name = blamed.map_or("none", |f| f.kind.label());
            *duplicates.by_fault.entry(name.to_owned()).or_default() += 1;
            if let Some(f) = faults.iter_mut().rev().find(|f| f.start_s <= t) {
                f.duplicates += 1;
            }
            continue;
        }
        first.insert(h.event_id.as_str(), h.at_ms);
        let Some(p) = by_id.get(h.event_id.as_str()) else {
            continue;
        };
        if p.is_poison() {
            violations.push(format!(
                "poison record {} was handled by {}",
                p.id, h.handler
            ));
            continue;
        }
        let chain = (p.key.as_str(), p.event_type.as_str());
        let seqs = &expected[&chain];
        let done = done.entry(chain).or_default();
        let at = next.entry(chain).or_default();
        if seqs.get(*at) != Some(&p.seq) {
            violations.push(format!(
                "{} {} seq {} handled (by pid {}) before seq {}",
                p.key,
                p.event_type,
                p.seq,
                h.pid,
                seqs.get(*at).copied().unwrap_or_default()
            ));
        }
        done.insert(p.seq);
        while seqs.get(*at).is_some_and(|s| done.contains(s)) {
            *at += 1;
        }
    }
    let broken: HashSet<i32> = inputs.broker_faults.iter().map(|b| b.partition).collect();
    let mut lost = Vec::new();
    let mut lost_on_broker_fault = 0;
    let mut latencies = Vec::new();
    let mut latencies_clean = Vec::new();
    for p in inputs.produced.iter().filter(|p| !p.is_poison()) {
        match first.get(p.id.as_str()) {
            Some(at) => {
                latencies.push(at - p.t);
                if p.kind != "outage" {
                    latencies_clean.push(at - p.t);
                }
            }
            None => {
                if broken.contains(&p.p) {
                    lost_on_broker_fault += 1;
                }
                lost.push(format!(
                    "{} ({} seq {}, partition {} offset {})",
                    p.id, p.key, p.seq, p.p, p.o
                ));
            }
        }
    }
    // Dead letters against the poison set, by original coordinates.
    let poison: HashMap<(i32, i64), &Produced> = inputs
        .produced
        .iter()
        .filter(|p| p.is_poison())
        .map(|p| ((p.p, p.o), p))
        .collect();
    let mut dead = DeadLetters {
        poison: poison.len() as u64,
        poison_undecodable: poison.values().filter(|p| p.kind == "undecodable").count() as u64,
        poison_permanent: poison.values().filter(|p| p.kind == "permanent").count() as u64,
        ..DeadLetters::default()
    };
    let mut seen = HashSet::new();
    for letter in inputs.dead_letters {
        let header = |name: &str| letter.headers.get_str(name).unwrap_or_default().to_owned();
        let coordinates = (
            header(dl::ORIGINAL_PARTITION).parse().unwrap_or(-1),
            header(dl::ORIGINAL_OFFSET).parse().unwrap_or(-1),
        );
        if header(dl::ORIGINAL_TOPIC) != inputs.topic || !poison.contains_key(&coordinates) {
            dead.unexpected.push(format!(
                "{}/{}/{} ({}: {})",
                header(dl::ORIGINAL_TOPIC),
                coordinates.0,
                coordinates.1,
                header(dl::ERROR_KIND),
                header(dl::ERROR_MESSAGE)
            ));
        } else if !seen.insert(coordinates) {
            dead.repeated += 1;
        }
    }
    dead.matched = seen.len() as u64;
    dead.missing = poison
        .iter()
        .filter(|(c, _)| !seen.contains(c))
        .map(|(c, p)| format!("{} ({}, partition {} offset {})", p.id, p.kind, c.0, c.1))
        .collect();
    // Lag and drain per fault, from the timeline.
    let threshold = inputs.rate.max(1.0) as i64;
    let starts: Vec<f64> = faults.iter().map(|f| f.start_s).collect();
    for (i, fault) in faults.iter_mut().enumerate() {
        let until = starts
            .get(i + 1)
            .copied()
            .unwrap_or(f64::MAX)
            .max(fault.end_s);
        fault.max_lag = inputs
            .samples
            .iter()
            .filter(|s| s.t_s >= fault.start_s && s.t_s <= until)
            .map(|s| s.lag)
            .max()
            .unwrap_or(0);
        fault.drain_s = inputs
            .samples
            .iter()
            .find(|s| s.t_s >= fault.end_s && s.lag <= threshold)
            .map(|s| s.t_s - fault.end_s);
    }
    Findings {
        produced: inputs.produced.len() as u64,
        handled_unique: inputs
            .produced
            .iter()
            .filter(|p| !p.is_poison() && first.contains_key(p.id.as_str()))
            .count() as u64,
        lost,
        lost_on_broker_fault,
        order_violations: violations,
        duplicates,
        dead_lettered: dead,
        latency: Latency::of(latencies),
        latency_excluding_outage: Latency::of(latencies_clean),
        max_lag: inputs.samples.iter().map(|s| s.lag).max().unwrap_or(0),
        faults,
    }
}
