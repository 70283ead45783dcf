//! The idempotent inbox: a handler wrapper that applies each event at most once per consumer.
//!
//! Kafka delivery is at least once, so a handler sees some events twice (a rebalance before the
//! commit, a crash, a producer's duplicate). Wrapped by [`inbox`], a handler's writes and the
//! record "this consumer applied event X" commit in one transaction; a redelivered event finds
//! the record and is skipped, so its effect happens once.
//!
//! The transaction is handed to the handler by value, as an [`InboxTx`], and handed back in the
//! `Ok`: no borrow has to outlive the handler's future, and the wrapper alone decides to commit.
//! Returning an error drops it, which rolls back both the handler's writes and the inbox entry,
//! so the retry starts from scratch.

use super::OutboxError;
use crate::contracts::Event;
use crate::handlers::{Ctx, HandlerError};
use crate::telemetry::outbox::InboxDuplicate;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use std::future::Future;
use std::ops::{Deref, DerefMut};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// The handler's transaction: run queries on `&mut *tx`. Return it in `Ok` to commit.
///
/// A wrapper rather than the bare `sqlx::Transaction` so a handler cannot commit early or hand
/// back another transaction: the inbox entry is inside this one, and must commit with the
/// handler's writes or not at all.
#[derive(Debug)]
pub struct InboxTx {
    tx: Transaction<'static, Postgres>,
}

impl Deref for InboxTx {
    type Target = PgConnection;
    fn deref(&self) -> &PgConnection {
        &self.tx
    }
}

impl DerefMut for InboxTx {
    fn deref_mut(&mut self) -> &mut PgConnection {
        &mut self.tx
    }
}

/// The future an inbox-wrapped handler returns.
pub type InboxFuture = Pin<Box<dyn Future<Output = Result<(), HandlerError>> + Send + 'static>>;

/// Wraps a handler so each event is applied at most once for `group`: registrable with
/// [`Router::on`](crate::Router::on).
///
/// For each call: begin a transaction; insert `(group, event id)` into `weir_inbox`, doing
/// nothing if it is there; if it was there, the event was applied already: roll back and
/// return `Ok` (skipped). Otherwise run `handler` with the transaction and commit if it returns
/// `Ok`. Database errors are [`HandlerError::retryable`]. Two deliveries racing (two consumers
/// around a rebalance) serialise on the inbox row: the second waits, then skips.
///
/// `group` names whose inbox it is: the consumer group, or `group/handler` when several handlers
/// of one group apply the same events. The wrapper's own name in logs is the closure's; give a
/// readable one with [`Router::on_with`](crate::Router::on_with).
///
/// ```no_run
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// # struct OrderPlaced { order_id: String, total_cents: u64 }
/// # impl weir::Event for OrderPlaced {
/// #     const TYPE: weir::EventType = weir::EventType::new("order.placed");
/// #     const TOPIC: &'static str = "orders";
/// #     fn key(&self) -> String { self.order_id.clone() }
/// # }
/// # fn example(pool: sqlx::PgPool) {
/// use weir::{inbox, Ctx, HandlerError, InboxTx, Router};
/// let router = Router::new().on(inbox(pool, "stock", |order: OrderPlaced, _ctx: Ctx, mut tx: InboxTx| async move {
///     sqlx::query("UPDATE stock SET reserved = reserved + 1 WHERE order_id = $1")
///         .bind(order.order_id)
///         .execute(&mut *tx)
///         .await
///         .map_err(HandlerError::retryable)?;
///     Ok(tx)
/// }));
/// # }
/// ```
pub fn inbox<T, F, Fut>(
    pool: PgPool,
    group: impl Into<String>,
    handler: F,
) -> impl Fn(T, Ctx) -> InboxFuture + Clone + Send + Sync + 'static
where
    T: Event,
    F: Fn(T, Ctx, InboxTx) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<InboxTx, HandlerError>> + Send + 'static,
{
    let group: Arc<str> = Arc::from(group.into());
    move |event: T, ctx: Ctx| {
        let pool = pool.clone();
        let group = group.clone();
        let handler = handler.clone();
        Box::pin(async move {
            let event_id = ctx.event_id();
            let mut tx = pool.begin().await.map_err(HandlerError::retryable)?;
            let fresh = sqlx::query(
                "INSERT INTO weir_inbox (consumer_group, event_id) VALUES ($1, $2)
                 ON CONFLICT DO NOTHING",
            )
            .bind(&*group)
            .bind(event_id)
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::retryable)?
            .rows_affected()
                == 1;
            if !fresh {
                InboxDuplicate {
                    group: &group,
                    event_id,
                }
                .emit();
                tx.rollback().await.map_err(HandlerError::retryable)?;
                return Ok(());
            }
            let InboxTx { tx } = handler(event, ctx, InboxTx { tx }).await?;
            tx.commit().await.map_err(HandlerError::retryable)
        }) as InboxFuture
    }
}

/// Deletes inbox entries older than `older_than`; returns how many. Keep entries longer than
/// any redelivery can come late (the topic's retention is the safe bound): a redelivery after
/// its entry was purged is applied again.
pub async fn purge_inbox(pool: &PgPool, older_than: Duration) -> Result<u64, OutboxError> {
    Ok(
        sqlx::query(
            "DELETE FROM weir_inbox WHERE processed_at < now() - make_interval(secs => $1)",
        )
        .bind(older_than.as_secs_f64())
        .execute(pool)
        .await?
        .rows_affected(),
    )
}
