//! What the soak watches while it runs, once a second: produced and handled so far, total lag,
//! throughput, peak memory, and who owns each partition of the stream's topic according to the
//! replicas themselves: their `Rebalance.` log lines (assign and revoke, the engine events that
//! also feed the status reports of `weir.status`), read from their log files. The status
//! reports would travel through the broker under test, and arrive late exactly while it
//! misbehaves; the log files do not.
//!
//! Total lag here is the soak's own figure, from its two histories: records the broker
//! acknowledged (poison excluded) that no handler has yet handled. It does not depend on the
//! broker's watermarks (Tansu's are not to be trusted) nor on Weir's own metrics.
//!
//! A partition that no live replica reports owning for longer than two session timeouts while
//! it has records waiting is a broker fault (Tansu 0.6.0 sometimes leaves a SIGKILLed member's
//! partitions unassigned): it is recorded with its evidence, and the runner is asked to restart
//! a replica, which makes the group rebalance.

use crate::fleet::{note_peak, Live, Peaks};
use crate::ledger::{Handling, Lines, Produced};
use serde::Serialize;
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The group's session timeout (`FAST_GROUP_TOML`).
pub(crate) const SESSION_TIMEOUT: Duration = Duration::from_secs(6);
/// How often a broker fault asks again for a rebalance while it lasts.
const REMEDY_EVERY: Duration = Duration::from_secs(20);

/// One point of the timeline.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Sample {
    /// Seconds since the stream started.
    pub(crate) t_s: f64,
    /// Records acknowledged by the broker so far (poison included).
    pub(crate) produced: u64,
    /// Distinct records handled so far (poison excluded: it is never handled).
    pub(crate) handled: u64,
    /// Handler invocations recorded so far (duplicates included).
    pub(crate) handlings: u64,
    /// Acknowledged, not poison, not yet handled.
    pub(crate) lag: i64,
    /// Handler invocations per second since the previous sample.
    pub(crate) throughput: f64,
    /// Replicas alive that own a partition of the stream's topic.
    pub(crate) owning_replicas: usize,
}

/// A partition without a live owner for longer than two session timeouts while records waited.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct BrokerFault {
    pub(crate) partition: i32,
    /// When the last live owner's report stopped listing it (seconds since the stream started).
    pub(crate) unowned_from_s: f64,
    pub(crate) detected_s: f64,
    /// When a live replica reported owning it again; `None` if never.
    pub(crate) ended_s: Option<f64>,
    /// Records of the partition waiting when it was detected.
    pub(crate) backlog: i64,
    /// The last process that owned it.
    pub(crate) last_owner: Option<String>,
    /// When the runner restarted a replica to make the group rebalance.
    pub(crate) remedies_s: Vec<f64>,
}

/// What the runner reads from the monitor while it runs.
#[derive(Default)]
pub(crate) struct Status {
    pub(crate) produced: u64,
    pub(crate) produced_poison: u64,
    pub(crate) handled: u64,
    pub(crate) lag: i64,
    /// A partition whose broker fault wants a rebalance now.
    pub(crate) remedy: Option<i32>,
    pub(crate) broker_faults: usize,
}

/// One replica's log and the partitions of the topic it owns by it.
struct Owner {
    log: Lines<Value>,
    owns: HashSet<i32>,
}

impl Owner {
    /// Applies the new `Rebalance.` lines of the log.
    fn refresh(&mut self, topic: &str) {
        for line in self.log.refresh() {
            let fields = &line["fields"];
            if fields["message"] != "Rebalance." {
                continue;
            }
            // `partitions` is the Debug form of [(topic, partition), ...].
            let listed = fields["partitions"].as_str().unwrap_or_default();
            let needle = format!("(\"{topic}\", ");
            let partitions: Vec<i32> = listed
                .match_indices(&needle)
                .filter_map(|(at, _)| {
                    let rest = &listed[at + needle.len()..];
                    rest[..rest.find(')')?].trim().parse().ok()
                })
                .collect();
            match fields["kind"].as_str() {
                Some("assign") => self.owns.extend(partitions),
                Some("revoke") => {
                    for p in partitions {
                        self.owns.remove(&p);
                    }
                }
                _ => {}
            }
        }
    }
}

/// The monitor's state; handed back to the runner when it stops.
pub(crate) struct Monitor {
    topic: String,
    partitions: i32,
    start: Instant,
    pub(crate) produced: Lines<Produced>,
    pub(crate) ledger: Lines<Handling>,
    produced_ids: HashMap<String, (i32, bool)>,
    handled_ids: HashSet<String>,
    produced_clean: u64,
    handled_clean: u64,
    backlog: HashMap<i32, i64>,
    pub(crate) samples: Vec<Sample>,
    logs: PathBuf,
    owners: HashMap<String, Owner>,
    unowned_since: HashMap<i32, Instant>,
    last_owner: HashMap<i32, String>,
    open: HashMap<i32, (usize, Instant)>,
    pub(crate) broker_faults: Vec<BrokerFault>,
}

impl Monitor {
    /// A monitor of `topic`'s stream; the replicas' logs are `<logs>/<name>.stderr`.
    pub(crate) fn new(
        topic: &str,
        partitions: i32,
        producer_log: &Path,
        ledger: &Path,
        logs: &Path,
    ) -> Monitor {
        Monitor {
            topic: topic.to_owned(),
            partitions,
            start: Instant::now(),
            produced: Lines::new(producer_log),
            ledger: Lines::new(ledger),
            produced_ids: HashMap::new(),
            handled_ids: HashSet::new(),
            produced_clean: 0,
            handled_clean: 0,
            backlog: HashMap::new(),
            samples: Vec::new(),
            logs: logs.to_owned(),
            owners: HashMap::new(),
            unowned_since: HashMap::new(),
            last_owner: HashMap::new(),
            open: HashMap::new(),
            broker_faults: Vec::new(),
        }
    }

    /// Seconds since the stream started.
    pub(crate) fn now_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    fn secs(&self, at: Instant) -> f64 {
        at.duration_since(self.start).as_secs_f64()
    }

    /// Reads the new lines of both histories and updates the counts.
    fn read(&mut self) {
        let new: Vec<(String, i32, bool)> = self
            .produced
            .refresh()
            .iter()
            .map(|p| (p.id.clone(), p.p, p.is_poison()))
            .collect();
        for (id, partition, poison) in new {
            if !poison {
                self.produced_clean += 1;
                *self.backlog.entry(partition).or_default() += 1;
                if self.handled_ids.contains(&id) {
                    self.handled_clean += 1;
                    *self.backlog.entry(partition).or_default() -= 1;
                }
            }
            self.produced_ids.insert(id, (partition, poison));
        }
        let new: Vec<String> = self
            .ledger
            .refresh()
            .iter()
            .map(|h| h.event_id.clone())
            .collect();
        for id in new {
            if self.handled_ids.insert(id.clone()) {
                if let Some((partition, false)) = self.produced_ids.get(&id) {
                    self.handled_clean += 1;
                    *self.backlog.entry(*partition).or_default() -= 1;
                }
            }
        }
    }

    /// One look: histories, memory, ownership. Returns the status for the runner.
    fn tick(&mut self, live: &Live, peaks: &Peaks, status: &Mutex<Status>) {
        self.read();
        let live: Vec<(String, u32)> = live
            .lock()
            .unwrap()
            .iter()
            .map(|(n, p)| (n.clone(), *p))
            .collect();
        for (name, pid) in &live {
            note_peak(peaks, name, *pid);
        }
        let now = Instant::now();
        let replicas: HashSet<&String> = live
            .iter()
            .filter(|(n, _)| n.starts_with("serve-"))
            .map(|(n, _)| n)
            .collect();
        self.owners.retain(|name, _| replicas.contains(name));
        for name in replicas {
            let log = self.logs.join(format!("{name}.stderr"));
            let owner = self.owners.entry(name.clone()).or_insert_with(|| Owner {
                log: Lines::new(&log),
                owns: HashSet::new(),
            });
            owner.refresh(&self.topic);
        }
        let mut owners: HashMap<i32, String> = HashMap::new();
        for (name, owner) in &self.owners {
            for p in &owner.owns {
                owners.insert(*p, name.clone());
            }
        }
        let owning = self.owners.values().filter(|o| !o.owns.is_empty()).count();
        let mut remedy = None;
        for partition in 0..self.partitions {
            let waiting = self.backlog.get(&partition).copied().unwrap_or(0);
            if let Some(owner) = owners.remove(&partition) {
                self.last_owner.insert(partition, owner);
                self.unowned_since.remove(&partition);
                if let Some((index, _)) = self.open.remove(&partition) {
                    self.broker_faults[index].ended_s = Some(self.secs(now));
                }
                continue;
            }
            let since = *self.unowned_since.entry(partition).or_insert(now);
            if let Some((index, asked)) = self.open.get_mut(&partition) {
                if now.duration_since(*asked) > REMEDY_EVERY {
                    *asked = now;
                    let t = now.duration_since(self.start).as_secs_f64();
                    self.broker_faults[*index].remedies_s.push(t);
                    remedy = Some(partition);
                }
                continue;
            }
            if now.duration_since(since) > 2 * SESSION_TIMEOUT && waiting > 0 {
                let last_owner = self.last_owner.get(&partition).cloned();
                self.broker_faults.push(BrokerFault {
                    partition,
                    unowned_from_s: self.secs(since),
                    detected_s: self.secs(now),
                    ended_s: None,
                    backlog: waiting,
                    last_owner,
                    remedies_s: vec![self.secs(now)],
                });
                self.open
                    .insert(partition, (self.broker_faults.len() - 1, now));
                remedy = Some(partition);
            }
        }
        let handlings = self.ledger.all().len() as u64;
        let t_s = self.now_s();
        let throughput = match self.samples.last() {
            Some(last) if t_s > last.t_s => (handlings - last.handlings) as f64 / (t_s - last.t_s),
            _ => 0.0,
        };
        let lag = self.produced_clean as i64 - self.handled_clean as i64;
        self.samples.push(Sample {
            t_s,
            produced: self.produced.all().len() as u64,
            handled: self.handled_clean,
            handlings,
            lag,
            throughput,
            owning_replicas: owning,
        });
        let mut status = status.lock().unwrap();
        status.produced = self.produced.all().len() as u64;
        status.produced_poison =
            self.produced.all().iter().filter(|p| p.is_poison()).count() as u64;
        status.handled = self.handled_clean;
        status.lag = lag;
        status.broker_faults = self.broker_faults.len();
        if remedy.is_some() {
            status.remedy = remedy;
        }
    }

    /// Runs until `stop`, a look every second. Returns the monitor with everything it saw.
    pub(crate) fn spawn(
        mut self,
        live: Live,
        peaks: Peaks,
        status: Arc<Mutex<Status>>,
        stop: Arc<AtomicBool>,
    ) -> tokio::task::JoinHandle<Monitor> {
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(1));
            while !stop.load(Ordering::SeqCst) {
                every.tick().await;
                self.tick(&live, &peaks, &status);
            }
            // Everything written before the stop is read.
            self.tick(&live, &peaks, &status);
            self
        })
    }
}
