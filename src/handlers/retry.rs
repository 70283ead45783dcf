//! The retry decision, as one small type (tower's `retry::Policy` idea, with Temporal's retry
//! parameters). It decides from the attempt number and the error; it never sleeps itself, so it is
//! trivially testable and the transport stays out of it.

use super::HandlerError;
use serde::Deserialize;
use std::time::Duration;

/// When and how often a failing handler is tried again.
///
/// The delay before attempt `n + 1` is
/// `min(initial_interval * backoff_coefficient^(n-1), maximum_interval)`, reduced by up to
/// `jitter` (a fraction) at random so that many consumers failing together do not retry in step.
/// Jitter only shortens the delay, so `maximum_interval` is a hard bound.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RetryPolicy {
    /// Delay after the first failure.
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    /// Factor applied to the delay after each further failure.
    pub backoff_coefficient: f64,
    /// Upper bound of any one delay.
    #[serde(with = "humantime_serde")]
    pub maximum_interval: Duration,
    /// Total calls, the first included, before the record is dead-lettered. `0` means no limit,
    /// which blocks the key (or partition) for as long as the failure lasts: use with care.
    pub maximum_attempts: u32,
    /// Fraction (0.0-1.0) of each delay that may be randomly removed.
    pub jitter: f64,
    /// Kinds (see [`HandlerError::with_kind`]) that are never retried even when `Retryable`.
    pub non_retryable_kinds: Vec<String>,
    /// The durable stage (PostgreSQL, see [`DurableRetry`]): when set, and the subscription has
    /// a parked-record store, a record still failing `Retryable` after `maximum_attempts` is
    /// parked instead of dead-lettered, and the partition moves on.
    pub durable: Option<DurableRetry>,
}

/// Durable retries: after the in-place attempts, a record is parked in the database and retried
/// by the parked-record worker, `initial_interval` after parking, then backing off up to
/// `maximum_interval`, for `maximum_attempts` more calls; then it is dead-lettered. Meanwhile
/// every later record of its key (for that handler and consumer group) is parked behind it, so
/// each key's records are still handled in offset order; other keys flow.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DurableRetry {
    /// Delay before the first durable attempt.
    #[serde(with = "humantime_serde")]
    pub initial_interval: Duration,
    /// Factor applied to the delay after each further failure.
    pub backoff_coefficient: f64,
    /// Upper bound of any one delay.
    #[serde(with = "humantime_serde")]
    pub maximum_interval: Duration,
    /// Durable calls before the record is dead-lettered (at least 1).
    pub maximum_attempts: u32,
}

impl Default for DurableRetry {
    /// 1 min, doubling, at most 1 h apart, 10 attempts: about 8.5 hours before a dead letter.
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_secs(60),
            backoff_coefficient: 2.0,
            maximum_interval: Duration::from_secs(3600),
            maximum_attempts: 10,
        }
    }
}

/// `initial × coefficient^(n−1)`, capped at `maximum` (also when it overflows): the delay
/// shape of both retry stages.
fn exponential(initial: Duration, coefficient: f64, maximum: Duration, n: u32) -> Duration {
    let exponent = n.saturating_sub(1).min(64) as i32;
    let secs = initial.as_secs_f64() * coefficient.powi(exponent);
    if secs.is_finite() && secs < maximum.as_secs_f64() {
        Duration::from_secs_f64(secs.max(0.0))
    } else {
        maximum
    }
}

impl DurableRetry {
    /// The delay before durable attempt `n` (counted from 1).
    pub fn delay(&self, n: u32) -> Duration {
        exponential(
            self.initial_interval,
            self.backoff_coefficient,
            self.maximum_interval,
            n,
        )
    }
}

impl Default for RetryPolicy {
    /// 200 ms, doubling, at most 30 s apart, 5 attempts, 20% jitter: about 3 s of retrying
    /// before a record is dead-lettered, short enough not to stall a partition for long.
    fn default() -> Self {
        Self {
            initial_interval: Duration::from_millis(200),
            backoff_coefficient: 2.0,
            maximum_interval: Duration::from_secs(30),
            maximum_attempts: 5,
            jitter: 0.2,
            non_retryable_kinds: Vec::new(),
            durable: None,
        }
    }
}

/// What to do after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryDecision {
    /// Call the handler again after this delay.
    RetryAfter(Duration),
    /// The failure is permanent: `Acknowledged`, or a kind listed as non-retryable.
    Permanent,
    /// `maximum_attempts` calls have failed.
    Exhausted,
}

impl RetryPolicy {
    /// A policy that never retries: every failure is final after one call.
    pub fn no_retries() -> Self {
        Self {
            maximum_attempts: 1,
            ..Self::default()
        }
    }

    /// Decides what follows failed attempt number `attempt` (counted from 1).
    pub fn decide(&self, attempt: u32, error: &HandlerError) -> RetryDecision {
        match error {
            HandlerError::Acknowledged { .. } => RetryDecision::Permanent,
            HandlerError::Retryable { kind, .. }
                if kind
                    .as_deref()
                    .is_some_and(|k| self.non_retryable_kinds.iter().any(|n| n == k)) =>
            {
                RetryDecision::Permanent
            }
            HandlerError::Retryable { .. } => {
                if self.maximum_attempts != 0 && attempt >= self.maximum_attempts {
                    RetryDecision::Exhausted
                } else {
                    RetryDecision::RetryAfter(self.jittered(self.backoff(attempt)))
                }
            }
        }
    }

    /// The delay after failed attempt `attempt`, before jitter.
    pub fn backoff(&self, attempt: u32) -> Duration {
        exponential(
            self.initial_interval,
            self.backoff_coefficient,
            self.maximum_interval,
            attempt,
        )
    }

    fn jittered(&self, delay: Duration) -> Duration {
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 {
            return delay;
        }
        delay.mul_f64(1.0 - jitter * fastrand::f64())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(attempts: u32) -> RetryPolicy {
        RetryPolicy {
            initial_interval: Duration::from_millis(100),
            backoff_coefficient: 2.0,
            maximum_interval: Duration::from_millis(500),
            maximum_attempts: attempts,
            jitter: 0.0,
            non_retryable_kinds: vec!["bad_request".into()],
            durable: None,
        }
    }

    #[test]
    fn durable_delays_back_off_up_to_their_maximum() {
        let d = DurableRetry {
            initial_interval: Duration::from_secs(60),
            backoff_coefficient: 2.0,
            maximum_interval: Duration::from_secs(300),
            maximum_attempts: 5,
        };
        let delays: Vec<_> = (1..=5).map(|n| d.delay(n).as_secs()).collect();
        assert_eq!(delays, vec![60, 120, 240, 300, 300]);
    }

    #[test]
    fn backs_off_exponentially_up_to_the_maximum_interval() {
        let p = exact(10);
        let delays: Vec<_> = (1..=5).map(|a| p.backoff(a).as_millis()).collect();
        assert_eq!(delays, vec![100, 200, 400, 500, 500]);
    }

    #[test]
    fn gives_up_after_maximum_attempts() {
        let p = exact(3);
        let e = || HandlerError::retryable("db down");
        assert_eq!(
            p.decide(1, &e()),
            RetryDecision::RetryAfter(Duration::from_millis(100))
        );
        assert_eq!(
            p.decide(2, &e()),
            RetryDecision::RetryAfter(Duration::from_millis(200))
        );
        assert_eq!(p.decide(3, &e()), RetryDecision::Exhausted);
    }

    #[test]
    fn never_retries_acknowledged_or_non_retryable_kinds() {
        let p = exact(3);
        assert_eq!(
            p.decide(1, &HandlerError::acknowledged("no such customer")),
            RetryDecision::Permanent
        );
        let vetoed = HandlerError::retryable("400").with_kind("bad_request");
        assert_eq!(p.decide(1, &vetoed), RetryDecision::Permanent);
    }

    #[test]
    fn jitter_only_shortens_delays() {
        let p = RetryPolicy {
            jitter: 0.5,
            ..exact(100)
        };
        for attempt in 1..50 {
            match p.decide(attempt, &HandlerError::retryable("x")) {
                RetryDecision::RetryAfter(d) => {
                    let full = p.backoff(attempt);
                    assert!(
                        d <= full && d >= full / 2,
                        "{d:?} outside [{:?}, {full:?}]",
                        full / 2
                    );
                }
                other => panic!("unexpected {other:?}"),
            }
        }
    }

    #[test]
    fn zero_maximum_attempts_retries_forever() {
        let p = exact(0);
        assert!(matches!(
            p.decide(1000, &HandlerError::retryable("x")),
            RetryDecision::RetryAfter(_)
        ));
    }
}
