//! Handlers: the typed `async fn(T, Ctx)` API, its error model, the retry policy, the router that
//! erases types once, and the dispatch pipeline that turns one record into a final outcome.
//! Depends on `contracts` only: a handler never sees a transport.

mod batch;
mod ctx;
mod dispatch;
mod error;
mod handler;
mod layer;
mod retry;
mod router;

pub use batch::{BatchCtx, BatchHandlerFn, BatchResult, BatchWindow, FromBatch};
pub use ctx::{Ctx, TraceContext};
pub(crate) use dispatch::{DeadLetterKind, Dispatcher, Failure, Inbound, Outcome};
pub use error::{BoxError, HandlerError};
pub use handler::{FromCtx, HandlerFn, State};
pub use layer::{AnyEvent, HandlerExt, HandlerService, IntoHandler, Layered, Request, WithLayer};
pub use retry::{RetryDecision, RetryPolicy};
#[cfg(feature = "testing")]
pub(crate) use router::Observe;
pub use router::{AckPolicy, HandlerOptions, Router, UnhandledPolicy};
