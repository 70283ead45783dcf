use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Liveness facts a subscription keeps current, for `/readyz`.
///
/// Ready means: the consumer has joined its group, a broker is reachable, and it is not draining
/// at shutdown. Kubernetes then stops routing to a draining pod and does not count a pod that
/// lost its brokers as available.
#[derive(Debug, Clone, Default)]
pub struct Health {
    inner: Arc<Flags>,
}

#[derive(Debug, Default)]
struct Flags {
    joined: AtomicBool,
    broker_up: AtomicBool,
    draining: AtomicBool,
}

/// A snapshot of [`Health`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct HealthStatus {
    /// Ready to take traffic.
    pub ready: bool,
    /// The consumer has received its first assignment.
    pub joined: bool,
    /// At least one broker connection is up.
    pub broker_up: bool,
    /// The subscription is draining at shutdown.
    pub draining: bool,
}

impl Health {
    /// The current state.
    pub fn status(&self) -> HealthStatus {
        let f = &self.inner;
        let joined = f.joined.load(Ordering::SeqCst);
        let broker_up = f.broker_up.load(Ordering::SeqCst);
        let draining = f.draining.load(Ordering::SeqCst);
        HealthStatus {
            ready: joined && broker_up && !draining,
            joined,
            broker_up,
            draining,
        }
    }

    pub(crate) fn set_joined(&self, v: bool) {
        self.inner.joined.store(v, Ordering::SeqCst);
    }

    pub(crate) fn set_broker_up(&self, v: bool) {
        self.inner.broker_up.store(v, Ordering::SeqCst);
    }

    pub(crate) fn set_draining(&self) {
        self.inner.draining.store(true, Ordering::SeqCst);
    }
}
