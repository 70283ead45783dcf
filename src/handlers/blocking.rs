//! Calls on Tokio's blocking pool that are still running. A `cpu_bound` call cannot be
//! interrupted: when the record that made it is aborted (its partition revoked past its
//! deadline, or the subscription's drain timed out), the call goes on until it returns. Whoever
//! gives the record's partition up counts these calls and waits for them, so the partition's
//! next owner never runs a record while this one still does.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::sync::Notify;

/// The blocking calls of one partition (or of any group of records) that have not returned.
#[derive(Debug, Default)]
pub(crate) struct BlockingCalls {
    running: AtomicUsize,
    returned: Notify,
}

/// One blocking call, counted in its [`BlockingCalls`] until this guard is dropped: the guard
/// goes into the blocking closure and is dropped when the closure returns.
pub(crate) struct BlockingCall(Arc<BlockingCalls>);

impl BlockingCalls {
    /// Counts a call that starts now.
    pub(crate) fn enter(self: &Arc<Self>) -> BlockingCall {
        self.running.fetch_add(1, Ordering::SeqCst);
        BlockingCall(self.clone())
    }

    /// Calls that have not returned.
    pub(crate) fn running(&self) -> usize {
        self.running.load(Ordering::SeqCst)
    }

    /// Waits until every call counted here has returned.
    pub(crate) async fn returned(&self) {
        loop {
            let notified = self.returned.notified();
            let mut notified = std::pin::pin!(notified);
            notified.as_mut().enable();
            if self.running() == 0 {
                return;
            }
            notified.await;
        }
    }
}

impl Drop for BlockingCall {
    fn drop(&mut self) {
        if self.0.running.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.returned.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn waits_until_the_last_call_returns() {
        let calls = Arc::new(BlockingCalls::default());
        calls.returned().await;
        let (first, second) = (calls.enter(), calls.enter());
        let waiting = tokio::spawn({
            let calls = calls.clone();
            async move { calls.returned().await }
        });
        drop(first);
        tokio::task::yield_now().await;
        assert!(!waiting.is_finished(), "one call is still running");
        assert_eq!(calls.running(), 1);
        drop(second);
        waiting.await.expect("the wait ends");
        assert_eq!(calls.running(), 0);
    }
}
