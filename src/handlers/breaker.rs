//! The per-route circuit breaker's state machine: pure and clock-driven.
//!
//! The breaker only decides; it holds no timer and touches no partition. Its owner (the engine)
//! reports each handler call's outcome with the time it ended ([`Breaker::record`]), asks it at a
//! time of its choosing whether the cool-down is over ([`Breaker::poll`], [`Breaker::deadline`]),
//! and asks before letting a call run whether one may ([`Breaker::admit`]). It acts on the
//! [`Transition`]s these return: pausing the route when the breaker opens, letting one probe
//! through when it is half-open, resuming when it closes.
//!
//! - **Closed**: every call runs. Calls are remembered over a sliding `window`; once at least
//!   `minimum_calls` ended in it and retryable failures are at least `failure_ratio` of them, the
//!   breaker opens. Only [`HandlerError::Retryable`](crate::HandlerError::Retryable) failures
//!   count as failures; successes count as calls; acknowledged errors and decode errors are not
//!   the downstream's fault and do not count at all. A record that fails alone while others
//!   succeed stays under the ratio: it follows the normal retry and dead-letter path.
//! - **Open**: no call runs until the cool-down is over. The first cool-down is `cool_down`;
//!   each reopening without a close in between multiplies it by `backoff`, up to
//!   `max_cool_down`.
//! - **HalfOpen**: one call (the probe) runs. Its success closes the breaker (the window starts
//!   empty, the cool-down starts over); its retryable failure reopens it with the next, longer
//!   cool-down. Any other outcome (acknowledged) says nothing about the downstream: the next
//!   call is the probe.

use serde::Deserialize;
use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// When a route's circuit breaker opens and how long it stays open. Off unless given to
/// [`HandlerOptions::breaker`](crate::HandlerOptions::breaker) (or
/// [`Router::set_breaker`](crate::Router::set_breaker)). Deserializes from the keys below, with
/// durations in humantime (`"30s"`), each optional.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct BreakerConfig {
    /// The share of calls in the window that failed retryably at which the breaker opens
    /// (0.0–1.0). Default 0.5.
    pub failure_ratio: f64,
    /// The calls the window must hold before the ratio can open the breaker. Default 20.
    pub minimum_calls: u32,
    /// How far back calls count. Default 30 s.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// How long the breaker stays open the first time. Default 5 s.
    #[serde(with = "humantime_serde")]
    pub cool_down: Duration,
    /// The factor applied to the cool-down at each reopening. Default 2.
    pub backoff: f64,
    /// The longest cool-down. Default 5 minutes.
    #[serde(with = "humantime_serde")]
    pub max_cool_down: Duration,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failure_ratio: 0.5,
            minimum_calls: 20,
            window: Duration::from_secs(30),
            cool_down: Duration::from_secs(5),
            backoff: 2.0,
            max_cool_down: Duration::from_secs(300),
        }
    }
}

impl BreakerConfig {
    /// The defaults: opens at ≥ 50% retryable failures of ≥ 20 calls in 30 s; cool-down 5 s,
    /// doubling up to 5 minutes.
    pub fn new() -> Self {
        Self::default()
    }

    /// The failure ratio that opens the breaker (clamped to 0.0–1.0).
    pub fn failure_ratio(mut self, ratio: f64) -> Self {
        self.failure_ratio = ratio.clamp(0.0, 1.0);
        self
    }

    /// The calls the window must hold before the breaker can open (at least 1).
    pub fn minimum_calls(mut self, calls: u32) -> Self {
        self.minimum_calls = calls.max(1);
        self
    }

    /// How far back calls count.
    pub fn window(mut self, window: Duration) -> Self {
        self.window = window;
        self
    }

    /// The first cool-down.
    pub fn cool_down(mut self, cool_down: Duration) -> Self {
        self.cool_down = cool_down;
        self
    }

    /// The cool-down's growth at each reopening (at least 1).
    pub fn backoff(mut self, factor: f64) -> Self {
        self.backoff = factor.max(1.0);
        self
    }

    /// The longest cool-down.
    pub fn max_cool_down(mut self, max: Duration) -> Self {
        self.max_cool_down = max;
        self
    }

    /// The values kept in range, as the builder methods keep them (a deserialized config
    /// skips them).
    fn normalized(self) -> Self {
        let (ratio, calls, backoff) = (self.failure_ratio, self.minimum_calls, self.backoff);
        self.failure_ratio(if ratio.is_nan() { 0.5 } else { ratio })
            .minimum_calls(calls)
            .backoff(if backoff.is_nan() { 1.0 } else { backoff })
    }

    /// The cool-down after `reopenings` reopenings in a row (0 for the first opening).
    fn cool_down_after(&self, reopenings: u32) -> Duration {
        let factor = self.backoff.powi(reopenings.min(64) as i32);
        let secs = self.cool_down.as_secs_f64() * factor;
        if !secs.is_finite() || secs >= self.max_cool_down.as_secs_f64() {
            self.max_cool_down
        } else {
            Duration::from_secs_f64(secs)
        }
    }
}

/// A breaker's state, as the `weir_breaker_state` gauge reports it (0, 1, 2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    /// Calls run.
    Closed,
    /// No call runs until the cool-down is over.
    Open,
    /// One probe call runs.
    HalfOpen,
}

impl BreakerState {
    /// The state's name in logs and the `to` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Closed => "closed",
            Self::Open => "open",
            Self::HalfOpen => "half_open",
        }
    }

    /// The `weir_breaker_state` gauge's value: 0 closed, 1 open, 2 half-open.
    pub fn gauge(self) -> i64 {
        match self {
            Self::Closed => 0,
            Self::Open => 1,
            Self::HalfOpen => 2,
        }
    }
}

/// What one handler call said about the downstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CallOutcome {
    /// It succeeded.
    Success,
    /// It failed retryably (a `Retryable` error or a timeout).
    RetryableFailure,
    /// It failed in a way that is not the downstream's (acknowledged, decode): not counted.
    Ignored,
}

/// Why the breaker opened: what the window held at that moment.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct OpenedBecause {
    /// Retryable failures in the window.
    pub(crate) failures: u32,
    /// Calls in the window.
    pub(crate) calls: u32,
    /// The window.
    pub(crate) window: Duration,
    /// The configured ratio it reached.
    pub(crate) threshold: f64,
    /// Whether a failed half-open probe reopened it (rather than the window's ratio).
    pub(crate) probe_failed: bool,
    /// How long it stays open.
    pub(crate) cool_down: Duration,
}

impl OpenedBecause {
    /// A sentence for the pause's reason and the logs.
    pub(crate) fn reason(&self) -> String {
        if self.probe_failed {
            format!(
                "circuit breaker open: the half-open probe failed; cool-down {:?}",
                self.cool_down
            )
        } else {
            format!(
                "circuit breaker open: {} of {} calls failed retryably in {:?} (threshold {:.0}%); cool-down {:?}",
                self.failures,
                self.calls,
                self.window,
                self.threshold * 100.0,
                self.cool_down
            )
        }
    }
}

/// A change of state, for the owner to act on.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Transition {
    pub(crate) from: BreakerState,
    pub(crate) to: BreakerState,
    /// Set when `to` is `Open`.
    pub(crate) opened: Option<OpenedBecause>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Closed,
    Open { until: Instant },
    HalfOpen { probe_running: bool },
}

/// One route's breaker.
#[derive(Debug)]
pub(crate) struct Breaker {
    config: BreakerConfig,
    state: State,
    /// (end time, failed retryably) of the counted calls in the window, oldest first.
    calls: VecDeque<(Instant, bool)>,
    failures: u32,
    /// Openings since the last close, minus one: the cool-down's exponent.
    reopenings: u32,
}

impl Breaker {
    pub(crate) fn new(config: BreakerConfig) -> Self {
        Self {
            config: config.normalized(),
            state: State::Closed,
            calls: VecDeque::new(),
            failures: 0,
            reopenings: 0,
        }
    }

    pub(crate) fn state(&self) -> BreakerState {
        match self.state {
            State::Closed => BreakerState::Closed,
            State::Open { .. } => BreakerState::Open,
            State::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// When the cool-down ends, while open: the owner calls [`poll`](Self::poll) then.
    pub(crate) fn deadline(&self) -> Option<Instant> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }

    /// Moves from open to half-open once the cool-down is over.
    pub(crate) fn poll(&mut self, now: Instant) -> Option<Transition> {
        match self.state {
            State::Open { until } if now >= until => {
                self.state = State::HalfOpen {
                    probe_running: false,
                };
                Some(Transition {
                    from: BreakerState::Open,
                    to: BreakerState::HalfOpen,
                    opened: None,
                })
            }
            _ => None,
        }
    }

    /// Whether a call may run now: always when closed, never when open, and once (the probe)
    /// when half-open until the probe's outcome is recorded. Only [`poll`](Self::poll) ends
    /// the cool-down, so that every change of state is one its owner sees and reports.
    pub(crate) fn admit(&mut self) -> bool {
        match &mut self.state {
            State::Closed => true,
            State::Open { .. } => false,
            State::HalfOpen { probe_running } => !std::mem::replace(probe_running, true),
        }
    }

    /// Records a call that ended at `now`. A call that ends while open (it started before the
    /// breaker opened) changes nothing.
    pub(crate) fn record(&mut self, now: Instant, outcome: CallOutcome) -> Option<Transition> {
        match self.state {
            State::Closed => {
                self.forget_before(now);
                let failed = match outcome {
                    CallOutcome::Success => false,
                    CallOutcome::RetryableFailure => true,
                    CallOutcome::Ignored => return None,
                };
                self.calls.push_back((now, failed));
                self.failures += u32::from(failed);
                let calls = self.calls.len() as u32;
                if calls >= self.config.minimum_calls
                    && failed
                    && f64::from(self.failures) >= self.config.failure_ratio * f64::from(calls)
                {
                    let opened = OpenedBecause {
                        failures: self.failures,
                        calls,
                        window: self.config.window,
                        threshold: self.config.failure_ratio,
                        probe_failed: false,
                        cool_down: Duration::ZERO,
                    };
                    return Some(self.open(now, BreakerState::Closed, opened));
                }
                None
            }
            State::Open { .. } => None,
            State::HalfOpen { .. } => match outcome {
                CallOutcome::Success => {
                    self.state = State::Closed;
                    self.reopenings = 0;
                    self.calls.clear();
                    self.failures = 0;
                    Some(Transition {
                        from: BreakerState::HalfOpen,
                        to: BreakerState::Closed,
                        opened: None,
                    })
                }
                CallOutcome::RetryableFailure => {
                    self.reopenings = self.reopenings.saturating_add(1);
                    let opened = OpenedBecause {
                        failures: 1,
                        calls: 1,
                        window: self.config.window,
                        threshold: self.config.failure_ratio,
                        probe_failed: true,
                        cool_down: Duration::ZERO,
                    };
                    Some(self.open(now, BreakerState::HalfOpen, opened))
                }
                CallOutcome::Ignored => {
                    // The probe said nothing about the downstream: let the next call probe.
                    self.state = State::HalfOpen {
                        probe_running: false,
                    };
                    None
                }
            },
        }
    }

    fn open(&mut self, now: Instant, from: BreakerState, mut opened: OpenedBecause) -> Transition {
        let cool_down = self.config.cool_down_after(self.reopenings);
        opened.cool_down = cool_down;
        self.state = State::Open {
            until: now + cool_down,
        };
        self.calls.clear();
        self.failures = 0;
        Transition {
            from,
            to: BreakerState::Open,
            opened: Some(opened),
        }
    }

    fn forget_before(&mut self, now: Instant) {
        while let Some(&(at, failed)) = self.calls.front() {
            if now.saturating_duration_since(at) < self.config.window {
                break;
            }
            self.calls.pop_front();
            self.failures -= u32::from(failed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> BreakerConfig {
        BreakerConfig::new()
            .failure_ratio(0.5)
            .minimum_calls(4)
            .window(Duration::from_secs(30))
            .cool_down(Duration::from_secs(5))
            .backoff(2.0)
            .max_cool_down(Duration::from_secs(15))
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    /// Opens the breaker at `t0` with four failures; returns the transition.
    fn open(breaker: &mut Breaker, t0: Instant) -> Transition {
        for _ in 0..3 {
            assert_eq!(breaker.record(t0, CallOutcome::RetryableFailure), None);
        }
        breaker
            .record(t0, CallOutcome::RetryableFailure)
            .expect("the fourth failure opens it")
    }

    #[test]
    fn closed_opens_at_the_ratio_once_the_window_holds_the_minimum_calls() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        // 3 failures of 3 calls: 100%, but under the minimum.
        for _ in 0..3 {
            assert_eq!(breaker.record(t0, CallOutcome::RetryableFailure), None);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
        let t = breaker
            .record(t0 + secs(1), CallOutcome::RetryableFailure)
            .expect("opens");
        assert_eq!((t.from, t.to), (BreakerState::Closed, BreakerState::Open));
        let why = t.opened.expect("says why");
        assert_eq!((why.failures, why.calls, why.window), (4, 4, secs(30)));
        assert_eq!(why.cool_down, secs(5));
        assert!(why.reason().contains("4 of 4 calls"), "{}", why.reason());
        assert_eq!(breaker.deadline(), Some(t0 + secs(6)));
    }

    #[test]
    fn closed_stays_closed_below_the_ratio() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        // 1 failure for every 2 successes: 33%, forever.
        for i in 0..30 {
            let outcome = if i % 3 == 2 {
                CallOutcome::RetryableFailure
            } else {
                CallOutcome::Success
            };
            assert_eq!(breaker.record(t0 + secs(i), outcome), None, "call {i}");
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn failures_older_than_the_window_do_not_count() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        for _ in 0..3 {
            breaker.record(t0, CallOutcome::RetryableFailure);
        }
        // 30 s later the three have left the window: one failure of one call is under minimum.
        assert_eq!(
            breaker.record(t0 + secs(30), CallOutcome::RetryableFailure),
            None
        );
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn acknowledged_and_decode_errors_do_not_count() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        for _ in 0..100 {
            assert_eq!(breaker.record(t0, CallOutcome::Ignored), None);
        }
        // Had the ignored ones counted as calls, 3 failures of 103 would be far under the ratio;
        // had they counted as failures, it would have opened already.
        assert_eq!(breaker.state(), BreakerState::Closed);
        for _ in 0..3 {
            assert_eq!(breaker.record(t0, CallOutcome::RetryableFailure), None);
        }
        assert!(breaker.record(t0, CallOutcome::RetryableFailure).is_some());
    }

    #[test]
    fn a_poison_record_failing_alone_while_others_succeed_does_not_open_it() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        // One record fails retryably on each of its 10 attempts, one a second, while the
        // partition's other records succeed two a second.
        for s in 0..10 {
            let now = t0 + secs(s);
            breaker.record(now, CallOutcome::Success);
            assert_eq!(breaker.record(now, CallOutcome::RetryableFailure), None);
            breaker.record(now, CallOutcome::Success);
        }
        assert_eq!(breaker.state(), BreakerState::Closed);
    }

    #[test]
    fn open_admits_nothing_until_the_cool_down_then_half_open_admits_one_probe() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        open(&mut breaker, t0);
        assert!(!breaker.admit());
        assert_eq!(breaker.poll(t0 + secs(4)), None);
        let t = breaker.poll(t0 + secs(5)).expect("half-opens");
        assert_eq!((t.from, t.to), (BreakerState::Open, BreakerState::HalfOpen));
        assert!(breaker.admit(), "the probe");
        assert!(!breaker.admit(), "only one probe");
        assert!(!breaker.admit(), "still only one probe");
    }

    #[test]
    fn a_call_that_ends_while_open_changes_nothing() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        open(&mut breaker, t0);
        assert_eq!(breaker.record(t0 + secs(1), CallOutcome::Success), None);
        assert_eq!(breaker.state(), BreakerState::Open);
    }

    #[test]
    fn a_successful_probe_closes_it_with_an_empty_window() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        open(&mut breaker, t0);
        assert!(!breaker.admit(), "open until polled after the cool-down");
        breaker.poll(t0 + secs(5)).expect("half-opens");
        assert!(breaker.admit());
        let t = breaker
            .record(t0 + secs(6), CallOutcome::Success)
            .expect("closes");
        assert_eq!(
            (t.from, t.to),
            (BreakerState::HalfOpen, BreakerState::Closed)
        );
        assert!(breaker.admit());
        assert!(breaker.admit(), "closed admits every call");
        // The window starts empty: three failures are under the minimum again.
        for _ in 0..3 {
            assert_eq!(
                breaker.record(t0 + secs(7), CallOutcome::RetryableFailure),
                None
            );
        }
    }

    #[test]
    fn a_failed_probe_reopens_it_with_a_longer_cool_down_up_to_the_cap() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        let first = open(&mut breaker, t0);
        assert_eq!(first.opened.expect("why").cool_down, secs(5));
        // Then cool-downs of 10 s, 15 (the cap), 15.
        for expected in [10, 15, 15] {
            let now = breaker.deadline().expect("open");
            breaker.poll(now).expect("half-opens");
            assert!(breaker.admit(), "the probe");
            let t = breaker
                .record(now, CallOutcome::RetryableFailure)
                .expect("reopens");
            assert_eq!((t.from, t.to), (BreakerState::HalfOpen, BreakerState::Open));
            let why = t.opened.expect("says why");
            assert!(why.probe_failed);
            assert_eq!(why.cool_down, secs(expected));
            assert_eq!(breaker.deadline(), Some(now + secs(expected)));
        }
        // A close resets the cool-down.
        let now = breaker.deadline().expect("open");
        breaker.poll(now).expect("half-opens");
        assert!(breaker.admit());
        breaker.record(now, CallOutcome::Success).expect("closes");
        let t = open(&mut breaker, now);
        assert_eq!(t.opened.expect("why").cool_down, secs(5));
    }

    #[test]
    fn a_probe_that_fails_acknowledged_lets_the_next_call_probe() {
        let t0 = Instant::now();
        let mut breaker = Breaker::new(config());
        open(&mut breaker, t0);
        breaker.poll(t0 + secs(5)).expect("half-opens");
        assert!(breaker.admit());
        assert_eq!(breaker.record(t0 + secs(5), CallOutcome::Ignored), None);
        assert_eq!(breaker.state(), BreakerState::HalfOpen);
        assert!(breaker.admit(), "the next probe");
    }

    #[test]
    fn config_values_are_kept_in_range() {
        let c = BreakerConfig::new()
            .failure_ratio(3.0)
            .minimum_calls(0)
            .backoff(0.5);
        assert_eq!((c.failure_ratio, c.minimum_calls, c.backoff), (1.0, 1, 1.0));
        let d = BreakerConfig::default();
        assert_eq!(
            (d.failure_ratio, d.minimum_calls, d.window),
            (0.5, 20, secs(30))
        );
    }
}
