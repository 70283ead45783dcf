//! A route's circuit breaker at work: the gate every call of the route passes, the cool-down
//! timer, and the requests to pause and resume the route that the engine acts on.
//!
//! The [`Breaker`] decides; this drives it with the clock and reports what it decided. Before
//! each call, a record's handler asks the gate ([`Circuit::admit`]): while the breaker is closed
//! it passes at once; while open it waits, spending no attempt, until the breaker closes; while
//! half-open exactly one waiting call passes, the probe. Each call's outcome is recorded
//! ([`Ticket::record`]). When the breaker opens, the route is paused
//! ([`PauseRequest`], source `breaker`) and a timer ends the cool-down; when it closes, the
//! route is resumed and every waiting call passes. If nothing is waiting when the cool-down
//! ends (its records were revoked, say), the route is resumed so a new record can probe.

use super::breaker::{Breaker, BreakerConfig, BreakerState, CallOutcome, Transition};
use crate::telemetry::events::{BreakerOpenedBecause, BreakerTransitioned};
use crate::telemetry::Metrics;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::{mpsc, Notify};
use tokio_util::sync::CancellationToken;

/// The breaker asks the engine to pause (`reason` set) or resume (`None`) the route.
#[derive(Debug)]
pub(crate) struct PauseRequest {
    pub(crate) route: Arc<str>,
    pub(crate) reason: Option<String>,
}

/// Where pause requests go: set once by the engine that runs the dispatcher.
pub(crate) type Requests = Arc<OnceLock<mpsc::UnboundedSender<PauseRequest>>>;

/// One route's breaker and its gate.
pub(crate) struct Circuit {
    route: Arc<str>,
    breaker: Mutex<Breaker>,
    /// Woken at every change of state.
    changed: Notify,
    /// Calls waiting at the gate.
    waiting: AtomicUsize,
    requests: Requests,
    metrics: Metrics,
}

fn now() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

impl Circuit {
    pub(crate) fn new(
        route: Arc<str>,
        config: BreakerConfig,
        requests: Requests,
        metrics: Metrics,
    ) -> Arc<Self> {
        metrics
            .breaker_state
            .with_label_values(&[&*route])
            .set(BreakerState::Closed.gauge());
        Arc::new(Self {
            route,
            breaker: Mutex::new(Breaker::new(config)),
            changed: Notify::new(),
            waiting: AtomicUsize::new(0),
            requests,
            metrics,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the breaker holds calls back now (open or half-open).
    pub(crate) fn holding(&self) -> bool {
        self.lock().state() != BreakerState::Closed
    }

    /// Waits until a call may run; `None` if `stop` fired first. Waiting spends no attempt.
    pub(crate) async fn admit(self: &Arc<Self>, stop: &CancellationToken) -> Option<Ticket> {
        let mut counted = false;
        let result = loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let (admitted, late) = {
                let mut breaker = self.lock();
                // The cool-down's timer may not have run yet: end it here, reported the same.
                let late = breaker.poll(now());
                (breaker.admit(), late)
            };
            if let Some(transition) = late {
                self.transitioned(transition);
            }
            if admitted {
                break Some(Ticket {
                    circuit: self.clone(),
                    recorded: false,
                });
            }
            if !counted {
                self.waiting.fetch_add(1, Ordering::SeqCst);
                counted = true;
            }
            tokio::select! {
                _ = changed => {}
                _ = stop.cancelled() => break None,
            }
        };
        if counted {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
        }
        result
    }

    fn record(self: &Arc<Self>, outcome: CallOutcome) {
        let transition = self.lock().record(now(), outcome);
        if let Some(transition) = transition {
            self.transitioned(transition);
        }
    }

    /// Reports a change of state and acts on it.
    fn transitioned(self: &Arc<Self>, t: Transition) {
        BreakerTransitioned {
            route: &self.route,
            from: t.from.as_str(),
            to: t.to.as_str(),
            gauge: t.to.gauge(),
            opened: t.opened.map(|o| BreakerOpenedBecause {
                failures: o.failures,
                calls: o.calls,
                window: o.window,
                threshold: o.threshold,
                probe_failed: o.probe_failed,
                cool_down: o.cool_down,
            }),
        }
        .emit(&self.metrics);
        match t.to {
            BreakerState::Open => {
                let reason = t.opened.map(|o| o.reason()).unwrap_or_default();
                self.request(Some(reason));
                self.cool_down();
            }
            BreakerState::HalfOpen => {
                if self.waiting.load(Ordering::SeqCst) == 0 {
                    // Nothing waits to probe: let a new record of the route in to do it.
                    self.request(None);
                }
            }
            BreakerState::Closed => self.request(None),
        }
        self.changed.notify_waiters();
    }

    fn request(&self, reason: Option<String>) {
        if let Some(requests) = self.requests.get() {
            let _ = requests.send(PauseRequest {
                route: self.route.clone(),
                reason,
            });
        }
    }

    /// Ends the cool-down on time: a timer, since no call may come to move the breaker on.
    fn cool_down(self: &Arc<Self>) {
        let Some(until) = self.lock().deadline() else {
            return;
        };
        let circuit = Arc::downgrade(self);
        let until = tokio::time::Instant::from_std(until);
        tokio::spawn(async move {
            tokio::time::sleep_until(until).await;
            let Some(circuit) = circuit.upgrade() else {
                return;
            };
            let transition = circuit.lock().poll(now());
            if let Some(transition) = transition {
                circuit.transitioned(transition);
            }
        });
    }
}

/// Leave to make one call; its outcome goes back to the breaker.
pub(crate) struct Ticket {
    circuit: Arc<Circuit>,
    recorded: bool,
}

impl Ticket {
    /// Records the call's outcome.
    pub(crate) fn record(mut self, outcome: CallOutcome) {
        self.recorded = true;
        self.circuit.record(outcome);
    }
}

impl Drop for Ticket {
    /// A call that never reported (its task was aborted) says nothing about the downstream;
    /// if it was the probe, the next call probes.
    fn drop(&mut self) {
        if !self.recorded {
            self.circuit.record(CallOutcome::Ignored);
        }
    }
}
