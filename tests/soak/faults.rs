//! The fault schedule: which faults, when, drawn from the seed with a small deterministic PRNG
//! (SplitMix64), so a failing run is replayed with the same `WEIR_SOAK_SEED`.
//!
//! Every round runs each fault kind once, in an order shuffled per round, each in its own slot
//! of the stream at a jittered moment. The downstream outage carries three faults inside it, at
//! fixed points of its window, because they only mean something while records fail or are
//! parked: a SIGKILL of a replica while its handlers retry in place (work in flight, which a
//! premature commit would lose), a SIGKILL of the retry worker and a PostgreSQL restart.

use serde::Serialize;
use std::time::Duration;

/// SplitMix64: tiny, deterministic, good enough to draw a schedule.
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (n > 0).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub(crate) fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            let j = self.below(i as u64 + 1) as usize;
            items.swap(i, j);
        }
    }
}

/// A kind of fault.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum FaultKind {
    /// SIGKILL of one replica, restarted at once (a new member joins inside the session timeout).
    KillReplica,
    /// SIGTERM of each replica in turn, each restarted and serving before the next stops.
    RollingRestart,
    /// Two replicas stopped (SIGTERM), the last one alone for a while, then both started again.
    Scale,
    /// The broker killed and restarted on its storage.
    BrokerRestart,
    /// The customers handler's downstream down for [`OUTAGE`]: records fail retryably and are
    /// parked (durable retries) until it is back.
    Outage,
    /// SIGKILL of the retry worker while records are parked, restarted at once.
    KillRetryWorker,
    /// PostgreSQL restarted (`pg_ctl restart -m fast`) while records are parked.
    DatabaseRestart,
    /// SIGKILL of the outbox relay, restarted at once.
    KillRelay,
}

impl FaultKind {
    pub(crate) fn label(self) -> &'static str {
        match self {
            FaultKind::KillReplica => "kill_replica",
            FaultKind::RollingRestart => "rolling_restart",
            FaultKind::Scale => "scale_3_1_3",
            FaultKind::BrokerRestart => "broker_restart",
            FaultKind::Outage => "outage",
            FaultKind::KillRetryWorker => "kill_retry_worker",
            FaultKind::DatabaseRestart => "database_restart",
            FaultKind::KillRelay => "kill_relay",
        }
    }

    /// The marker colour in the picture.
    pub(crate) fn colour(self) -> &'static str {
        match self {
            FaultKind::KillReplica => "#d62728",
            FaultKind::RollingRestart => "#9467bd",
            FaultKind::Scale => "#8c564b",
            FaultKind::BrokerRestart => "#e377c2",
            FaultKind::Outage => "#ff7f0e",
            FaultKind::KillRetryWorker => "#17becf",
            FaultKind::DatabaseRestart => "#bcbd22",
            FaultKind::KillRelay => "#7f7f7f",
        }
    }
}

/// How long the downstream outage lasts.
pub(crate) const OUTAGE: Duration = Duration::from_secs(20);
/// When, inside an outage, a replica and the retry worker are killed and PostgreSQL restarted.
pub(crate) const INSIDE_OUTAGE: [(FaultKind, Duration); 3] = [
    (FaultKind::KillReplica, Duration::from_secs(3)),
    (FaultKind::KillRetryWorker, Duration::from_secs(8)),
    (FaultKind::DatabaseRestart, Duration::from_secs(14)),
];
/// No fault before this, so the fleet is settled and the baseline measured.
pub(crate) const WARM_UP: Duration = Duration::from_secs(15);
/// No fault starts in the stream's last stretch, so the last one is measured under load.
pub(crate) const COOL_DOWN: Duration = Duration::from_secs(10);
/// The shortest slot a fault gets; a longer stream repeats the rounds.
pub(crate) const SLOT: Duration = Duration::from_secs(24);

/// One planned fault.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Planned {
    pub(crate) kind: FaultKind,
    /// From the stream's start.
    #[serde(rename = "at_s", serialize_with = "secs")]
    pub(crate) at: Duration,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

/// The schedule of a stream of `stream` with the top-level fault `kinds`; outages bring their
/// inner faults. Sorted by time.
pub(crate) fn schedule(seed: u64, stream: Duration, kinds: &[FaultKind]) -> Vec<Planned> {
    let mut rng = Rng::new(seed);
    let usable = stream.saturating_sub(WARM_UP + COOL_DOWN);
    let per_round = SLOT * kinds.len() as u32;
    let rounds = (usable.as_secs_f64() / per_round.as_secs_f64())
        .floor()
        .max(1.0) as u32;
    let slot = usable / (rounds * kinds.len() as u32);
    let mut plan = Vec::new();
    let mut index = 0u32;
    for _ in 0..rounds {
        let mut order = kinds.to_vec();
        rng.shuffle(&mut order);
        for kind in order {
            let jitter = Duration::from_millis(rng.below(slot.as_millis() as u64 / 4 + 1));
            let at = WARM_UP + slot * index + jitter;
            plan.push(Planned { kind, at });
            if kind == FaultKind::Outage {
                for (inner, after) in INSIDE_OUTAGE {
                    plan.push(Planned {
                        kind: inner,
                        at: at + after,
                    });
                }
            }
            index += 1;
        }
    }
    plan.sort_by_key(|p| p.at);
    plan
}

/// The outage windows of a schedule, from the stream's start: what the producer writes into the
/// events it sends during them.
pub(crate) fn outages(plan: &[Planned]) -> Vec<(Duration, Duration)> {
    plan.iter()
        .filter(|p| p.kind == FaultKind::Outage)
        .map(|p| (p.at, p.at + OUTAGE))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_always_draws_the_same_schedule() {
        let kinds = [FaultKind::KillReplica, FaultKind::Scale, FaultKind::Outage];
        let a = schedule(7, Duration::from_secs(180), &kinds);
        let b = schedule(7, Duration::from_secs(180), &kinds);
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
        for kind in kinds {
            assert!(a.iter().any(|p| p.kind == kind), "{kind:?} in {a:?}");
        }
        assert!(a.windows(2).all(|w| w[0].at <= w[1].at), "sorted: {a:?}");
        assert!(a.iter().all(|p| p.at >= WARM_UP), "{a:?}");
    }
}
