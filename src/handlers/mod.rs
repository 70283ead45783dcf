//! Handlers: the typed `async fn(T, Ctx)` API, its error model, the retry policy, the router that
//! erases types once, and the dispatch pipeline that turns one record into a final outcome.
//! Depends on `contracts` and `telemetry`: a handler never sees a transport.

mod batch;
mod blocking;
mod breaker;
mod circuit;
mod ctx;
mod dispatch;
mod erased;
mod error;
mod handler;
mod layer;
mod parking;
mod record;
mod retry;
mod router;

pub use batch::{BatchCtx, BatchHandlerFn, BatchResult, BatchWindow, FromBatch};
pub(crate) use blocking::BlockingCalls;
pub use breaker::{BreakerConfig, BreakerState};
pub(crate) use circuit::PauseRequest;
pub use ctx::{Ctx, TraceContext};
#[cfg(feature = "postgres")]
pub(crate) use dispatch::ParkedAttempt;
pub(crate) use dispatch::{Dispatcher, FirstCall, Resume};
pub use error::{BoxError, HandlerError};
pub use handler::{FromCtx, HandlerFn, State};
pub use layer::{AnyEvent, HandlerExt, HandlerService, IntoHandler, Layered, Request, WithLayer};
#[cfg(feature = "postgres")]
pub(crate) use parking::ParkFuture;
pub(crate) use parking::Parking;
pub(crate) use record::{DeadLetterKind, Failure, Inbound, Outcome};
pub use retry::{DurableRetry, RetryDecision, RetryPolicy};
#[cfg(feature = "testing")]
pub(crate) use router::Observe;
pub use router::{AckPolicy, HandlerOptions, Router, UnhandledPolicy};
