//! Counting handled records for the framework arms (W and RS), with the prefetched mode's gate.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Notify;

use crate::latency::Latencies;

/// Counts handled records and wakes the bench at the target count.
pub(crate) struct Tally {
    count: AtomicUsize,
    target: usize,
    /// When the clock started: the first record, or the gate's opening in prefetched mode.
    first: OnceLock<Instant>,
    last: Mutex<Option<Instant>>,
    done: Notify,
    /// Prefetched mode: handlers wait this long after the first record, then the clock starts.
    warmup: Option<Duration>,
    gate_started: AtomicBool,
    open: AtomicBool,
    opened: Notify,
    /// Latency mode: each record's produce→handler-entry time goes here.
    latencies: Option<Arc<Latencies>>,
}

impl Tally {
    pub(crate) fn new(target: usize, warmup: Option<Duration>) -> Arc<Self> {
        Self::build(target, warmup, None)
    }

    /// For the latency bench: no target, every record's latency recorded.
    pub(crate) fn timing(latencies: Arc<Latencies>) -> Arc<Self> {
        Self::build(usize::MAX, None, Some(latencies))
    }

    fn build(
        target: usize,
        warmup: Option<Duration>,
        latencies: Option<Arc<Latencies>>,
    ) -> Arc<Self> {
        Arc::new(Self {
            latencies,
            count: AtomicUsize::new(0),
            target,
            first: OnceLock::new(),
            last: Mutex::new(None),
            done: Notify::new(),
            warmup,
            gate_started: AtomicBool::new(false),
            open: AtomicBool::new(false),
            opened: Notify::new(),
        })
    }

    /// In prefetched mode, holds every handler until the warm-up after the first record is
    /// over; otherwise returns at once.
    pub(crate) async fn pass_gate(self: &Arc<Self>) {
        let Some(warmup) = self.warmup else {
            return;
        };
        if self.open.load(Ordering::Acquire) {
            return;
        }
        if !self.gate_started.swap(true, Ordering::SeqCst) {
            let tally = self.clone();
            tokio::spawn(async move {
                tokio::time::sleep(warmup).await;
                let _ = tally.first.set(Instant::now());
                tally.open.store(true, Ordering::Release);
                tally.opened.notify_waiters();
            });
        }
        loop {
            // Created before the check: `notify_waiters` reaches it even if not yet polled.
            let notified = self.opened.notified();
            if self.open.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }

    /// At handler entry, in latency mode: the record's produce→handler-entry time.
    pub(crate) fn enter(&self, details: &serde_json::Value) {
        if let Some(latencies) = &self.latencies {
            latencies.observe(details);
        }
    }

    /// One record handled.
    pub(crate) fn record(&self) {
        if self.first.get().is_none() {
            let _ = self.first.set(Instant::now());
        }
        let count = self.count.fetch_add(1, Ordering::Relaxed) + 1;
        if count == self.target {
            *self.last.lock().unwrap() = Some(Instant::now());
            self.done.notify_one();
        }
    }

    pub(crate) fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Waits for the target count, up to `timeout`.
    pub(crate) async fn wait(&self, timeout: Duration) -> anyhow::Result<()> {
        let done = self.done.notified();
        if self.count() >= self.target {
            return Ok(());
        }
        tokio::time::timeout(timeout, done)
            .await
            .map_err(|_| anyhow::anyhow!("stalled at {}/{} records", self.count(), self.target))
    }

    /// Records per second from the clock's start to the last record (the first record's own
    /// time is not counted: `target - 1` intervals).
    pub(crate) fn rate(&self) -> f64 {
        let first = *self.first.get().expect("records were handled");
        let last = self.last.lock().unwrap().expect("the target was reached");
        rate(self.target, last - first)
    }
}

pub(crate) fn rate(n: usize, elapsed: Duration) -> f64 {
    n.saturating_sub(1) as f64 / elapsed.as_secs_f64().max(1e-9)
}
