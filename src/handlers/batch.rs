//! Batch handlers: one call for many events, each element with its own outcome.
//!
//! The engine still tracks every record on its own: its retries, its dead letter, its offset.
//! A batch route gathers the records of one partition that are ready at the same time (up to
//! `max_size`, waiting at most `max_wait` after the first) and calls the handler once; each
//! element's result then goes back to its record, which succeeds, retries (in a later batch,
//! after its backoff) or is dead-lettered alone.
//!
//! Key order holds because records of one key are never in flight together (the default
//! `order = "key"`): a batch holds at most one record per key, and a key's next record waits
//! for this one's final outcome. Under `order = "partition"` a batch holds one record, since
//! nothing of a partition overlaps.

use super::erased::BoxFuture;
use super::handler::State;
use super::{Ctx, HandlerError};
use futures_util::FutureExt;
use std::collections::HashMap;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::oneshot;

/// One result per event, in the order the events were given. Elements without a result (a
/// shorter vector) count as retryable failures.
pub type BatchResult = Vec<Result<(), HandlerError>>;

/// How large a batch may grow and how long its first record waits for others.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchWindow {
    /// The most events in one call.
    pub max_size: usize,
    /// How long a batch stays open after its first event.
    pub max_wait: Duration,
}

impl BatchWindow {
    /// A window of at most `max_size` events and `max_wait`.
    pub fn new(max_size: usize, max_wait: Duration) -> Self {
        Self {
            max_size: max_size.max(1),
            max_wait,
        }
    }
}

impl Default for BatchWindow {
    /// 100 events or 20 ms, whichever comes first.
    fn default() -> Self {
        Self::new(100, Duration::from_millis(20))
    }
}

/// The contexts of a batch's events, index for index.
#[derive(Debug, Clone)]
pub struct BatchCtx {
    items: Vec<Ctx>,
}

impl BatchCtx {
    /// Each event's context, in the order of the events.
    pub fn contexts(&self) -> &[Ctx] {
        &self.items
    }

    /// How many events the batch holds.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the batch is empty (it never is when a handler sees it).
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// A batch handler argument: [`BatchCtx`] or [`State<S>`].
pub trait FromBatch<S>: Sized {
    /// Builds the argument for one call.
    fn from_batch(ctx: &BatchCtx, state: &S) -> Self;
}

impl<S> FromBatch<S> for BatchCtx {
    fn from_batch(ctx: &BatchCtx, _: &S) -> Self {
        ctx.clone()
    }
}

impl<S: Clone> FromBatch<S> for State<S> {
    fn from_batch(_: &BatchCtx, state: &S) -> Self {
        State(state.clone())
    }
}

/// A batch handler for events of type `T`: `async fn(Vec<T>, ...) -> BatchResult`, whose other
/// arguments (up to two) are [`BatchCtx`] or [`State<S>`].
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a Weir batch handler for `{T}` events with router state `{S}`",
    label = "not an `async fn(Vec<{T}>, ...) -> BatchResult`",
    note = "a batch handler takes `Vec<T>` first, then up to two of `BatchCtx` and `State<S>`, and returns one `Result<(), HandlerError>` per event"
)]
pub trait BatchHandlerFn<T, M, S = ()>: Clone + Send + Sync + 'static {
    /// The future the handler returns.
    type Future: Future<Output = BatchResult> + Send + 'static;

    /// Runs the handler once on a batch.
    fn call(&self, events: Vec<T>, ctx: BatchCtx, state: &S) -> Self::Future;
}

impl<F, Fut, T, S> BatchHandlerFn<T, (), S> for F
where
    F: Fn(Vec<T>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = BatchResult> + Send + 'static,
{
    type Future = Fut;

    fn call(&self, events: Vec<T>, _: BatchCtx, _: &S) -> Fut {
        self(events)
    }
}

macro_rules! impl_batch_handler_fn {
    ($($arg:ident),+) => {
        impl<F, Fut, T, S, $($arg),+> BatchHandlerFn<T, ($($arg,)+), S> for F
        where
            F: Fn(Vec<T>, $($arg),+) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = BatchResult> + Send + 'static,
            $($arg: FromBatch<S>),+
        {
            type Future = Fut;

            fn call(&self, events: Vec<T>, ctx: BatchCtx, state: &S) -> Fut {
                self(events, $($arg::from_batch(&ctx, state)),+)
            }
        }
    };
}

impl_batch_handler_fn!(A1);
impl_batch_handler_fn!(A1, A2);

type RunBatch<T> = Arc<dyn Fn(Vec<T>, BatchCtx) -> BoxFuture<BatchResult> + Send + Sync>;
type Reply = oneshot::Sender<Result<(), HandlerError>>;
/// A batch is per topic and partition.
type PartitionKey = (Arc<str>, i32);
type OpenBatches<T> = HashMap<PartitionKey, Pending<T>>;

/// The events of one partition waiting for their batch.
struct Pending<T> {
    id: u64,
    events: Vec<T>,
    contexts: Vec<Ctx>,
    replies: Vec<Reply>,
}

/// Gathers a batch route's records per partition and runs the handler on each batch.
pub(crate) struct Batcher<T> {
    run: RunBatch<T>,
    window: BatchWindow,
    open: Mutex<OpenBatches<T>>,
    ids: AtomicU64,
}

impl<T: Send + 'static> Batcher<T> {
    pub(crate) fn new<S, M, H>(handler: H, state: S, window: BatchWindow) -> Self
    where
        S: Send + Sync + 'static,
        H: BatchHandlerFn<T, M, S>,
    {
        Self {
            run: Arc::new(move |events, ctx| Box::pin(handler.call(events, ctx, &state))),
            window,
            open: Mutex::default(),
            ids: AtomicU64::new(0),
        }
    }

    fn open(&self) -> std::sync::MutexGuard<'_, OpenBatches<T>> {
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// One record's part: joins its partition's open batch and waits for its own result. The
    /// record that opens a batch closes it after `max_wait`; the one that fills it closes it at
    /// once. Whoever closes a batch runs the handler inside its own record's task, so nothing
    /// runs outside the engine's reach (a revoked partition's tasks stop it).
    pub(crate) async fn submit(self: Arc<Self>, event: T, ctx: Ctx) -> Result<(), HandlerError> {
        let (reply, result) = oneshot::channel();
        let key = (ctx.topic_shared(), ctx.partition());
        let (full, opened) = {
            let mut open = self.open();
            let pending = open.entry(key.clone()).or_insert_with(|| Pending {
                id: self.ids.fetch_add(1, Ordering::Relaxed),
                events: Vec::new(),
                contexts: Vec::new(),
                replies: Vec::new(),
            });
            pending.events.push(event);
            pending.contexts.push(ctx);
            pending.replies.push(reply);
            if pending.events.len() >= self.window.max_size {
                (open.remove(&key), None)
            } else if pending.events.len() == 1 {
                (None, Some(pending.id))
            } else {
                (None, None)
            }
        };
        if let Some(batch) = full {
            self.run(batch).await;
        } else if let Some(id) = opened {
            let mut guard = CloseOnDrop {
                batcher: &self,
                key,
                id,
            };
            tokio::time::sleep(self.window.max_wait).await;
            if let Some(batch) = guard.take() {
                self.run(batch).await;
            }
        }
        result.await.unwrap_or_else(|_| {
            Err(HandlerError::retryable(
                "the batch this event was in stopped before it finished",
            ))
        })
    }

    /// Calls the handler and hands each record its result.
    async fn run(&self, batch: Pending<T>) {
        let count = batch.events.len();
        let call = (self.run)(
            batch.events,
            BatchCtx {
                items: batch.contexts,
            },
        );
        match AssertUnwindSafe(call).catch_unwind().await {
            Ok(results) => {
                let got = results.len();
                let mut results = results.into_iter();
                for reply in batch.replies {
                    let result = results.next().unwrap_or_else(|| {
                        Err(HandlerError::retryable(format!(
                            "the batch handler returned {got} results for {count} events"
                        )))
                    });
                    let _ = reply.send(result);
                }
            }
            Err(panic) => {
                let text = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                for reply in batch.replies {
                    let _ = reply.send(Err(HandlerError::acknowledged(format!(
                        "the batch handler panicked: {text}"
                    ))
                    .with_kind("panic")));
                }
            }
        }
    }
}

/// Closes the batch its record opened if that record stops waiting (a timeout, a revoke):
/// the others then fail retryably instead of waiting for a close that never comes.
struct CloseOnDrop<'a, T> {
    batcher: &'a Batcher<T>,
    key: PartitionKey,
    id: u64,
}

impl<T> CloseOnDrop<'_, T> {
    /// The batch, if it is still the one this record opened and still open.
    fn take(&mut self) -> Option<Pending<T>> {
        let mut open = self.batcher.open.lock().unwrap_or_else(|e| e.into_inner());
        match open.get(&self.key) {
            Some(pending) if pending.id == self.id => open.remove(&self.key),
            _ => None,
        }
    }
}

impl<T> Drop for CloseOnDrop<'_, T> {
    fn drop(&mut self) {
        // Dropping the batch drops its replies: every waiting record sees the batch stop.
        drop(self.take());
    }
}
