use super::{Ctx, HandlerError};
use std::future::Future;

/// A handler for events of type `T`: implemented for every
/// `async fn(T, Ctx) -> Result<(), HandlerError>` and every closure of that shape.
///
/// Register one with [`Router::on`](crate::Router::on); the router erases the type, so users
/// never box anything. State goes in by closure capture:
/// `router.on(move |e: OrderPlaced, ctx| handle(db.clone(), e, ctx))`.
pub trait HandlerFn<T>: Clone + Send + Sync + 'static {
    /// The future the handler returns.
    type Future: Future<Output = Result<(), HandlerError>> + Send + 'static;

    /// Runs the handler once on one event.
    fn call(&self, event: T, ctx: Ctx) -> Self::Future;
}

impl<F, Fut, T> HandlerFn<T> for F
where
    F: Fn(T, Ctx) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    type Future = Fut;

    fn call(&self, event: T, ctx: Ctx) -> Fut {
        self(event, ctx)
    }
}
