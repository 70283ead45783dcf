//! The typed handler API, in axum's shape: a handler is a plain `async fn` whose first argument
//! is the event and whose other arguments are extracted from the record's [`Ctx`] and the
//! router's state. Registering one is one call; the router erases its type once.

use super::{Ctx, HandlerError};
use std::future::Future;

/// The router's shared state, as a handler argument: `State(db): State<Db>`.
///
/// Given once with [`Router::with_state`](crate::Router::with_state) and cloned into each call,
/// so make it cheap to clone (a pool, an `Arc`), as with axum's `State`.
#[derive(Debug, Clone, Copy, Default)]
pub struct State<S>(pub S);

/// A handler argument taken from the record's context and the router's state.
///
/// Implemented for [`Ctx`] and [`State<S>`]; implement it for a type of yours to give handlers
/// a narrower view (a tenant id read from a header, say). Extraction cannot fail: what can fail
/// is decoding, and that happens before any handler runs.
pub trait FromCtx<S>: Sized {
    /// Builds the argument for one call.
    fn from_ctx(ctx: &Ctx, state: &S) -> Self;

    /// Builds the last argument, which may take the context itself rather than a copy.
    fn from_ctx_owned(ctx: Ctx, state: &S) -> Self {
        Self::from_ctx(&ctx, state)
    }
}

impl<S> FromCtx<S> for Ctx {
    fn from_ctx(ctx: &Ctx, _: &S) -> Self {
        ctx.clone()
    }

    fn from_ctx_owned(ctx: Ctx, _: &S) -> Self {
        ctx
    }
}

impl<S: Clone> FromCtx<S> for State<S> {
    fn from_ctx(_: &Ctx, state: &S) -> Self {
        State(state.clone())
    }
}

/// A handler for events of type `T`: every `async fn(T, ...) -> Result<(), HandlerError>` and
/// every closure of that shape, whose further arguments (up to three) are [`FromCtx`] types:
/// [`Ctx`], [`State<S>`], or your own.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// # struct OrderPlaced { order_id: String, total_cents: u64 }
/// # impl weir::Event for OrderPlaced {
/// #     const TYPE: weir::EventType = weir::EventType::new("order.placed");
/// #     const TOPIC: &'static str = "orders";
/// #     fn key(&self) -> String { self.order_id.clone() }
/// # }
/// use weir::{Ctx, HandlerError, Router, State};
///
/// #[derive(Clone)]
/// struct Stock { warehouse: &'static str }
///
/// async fn reserve(order: OrderPlaced, State(stock): State<Stock>, ctx: Ctx) -> Result<(), HandlerError> {
///     println!("{} reserves {} (attempt {})", stock.warehouse, order.order_id, ctx.attempt());
///     Ok(())
/// }
/// async fn audit(order: OrderPlaced) -> Result<(), HandlerError> {
///     Ok(())
/// }
///
/// let router = Router::with_state(Stock { warehouse: "north" }).on(reserve).on(audit);
/// ```
///
/// The `M` parameter only tells the implementations apart (the argument types); it is inferred.
#[diagnostic::on_unimplemented(
    message = "`{Self}` is not a Weir handler for `{T}` events with router state `{S}`",
    label = "not an `async fn({T}, ...) -> Result<(), HandlerError>`",
    note = "a handler takes the event first, then up to three of `Ctx`, `State<S>` or your own `FromCtx` types, and returns `Result<(), HandlerError>`",
    note = "`State<X>` needs `Router::with_state(x)` with the same `X`; its future must be `Send + 'static` (clone what it borrows)"
)]
pub trait HandlerFn<T, M, S = ()>: Clone + Send + Sync + 'static {
    /// The future the handler returns.
    type Future: Future<Output = Result<(), HandlerError>> + Send + 'static;

    /// Runs the handler once on one event.
    fn call(&self, event: T, ctx: Ctx, state: &S) -> Self::Future;
}

impl<F, Fut, T, S> HandlerFn<T, (), S> for F
where
    F: Fn(T) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    type Future = Fut;

    fn call(&self, event: T, _: Ctx, _: &S) -> Fut {
        self(event)
    }
}

macro_rules! impl_handler_fn {
    ($($arg:ident,)* ; $last:ident) => {
        impl<F, Fut, T, S, $($arg,)* $last> HandlerFn<T, ($($arg,)* $last,), S> for F
        where
            F: Fn(T, $($arg,)* $last) -> Fut + Clone + Send + Sync + 'static,
            Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
            $($arg: FromCtx<S>,)*
            $last: FromCtx<S>,
        {
            type Future = Fut;

            fn call(&self, event: T, ctx: Ctx, state: &S) -> Fut {
                self(event, $($arg::from_ctx(&ctx, state),)* $last::from_ctx_owned(ctx, state))
            }
        }
    };
}

impl_handler_fn!(; A1);
impl_handler_fn!(A1, ; A2);
impl_handler_fn!(A1, A2, ; A3);
