//! Handlers: the typed `async fn(T, Ctx)` API, its error model, the retry policy, the router that
//! erases types once, and the dispatch pipeline that turns one record into a final outcome.
//! Depends on `contracts` only: a handler never sees a transport.

mod ctx;
mod dispatch;
mod error;
mod handler;
mod parking;
mod retry;
mod router;

pub use ctx::{Ctx, TraceContext};
pub(crate) use dispatch::{DeadLetterKind, Dispatcher, Failure, Inbound, Outcome, ParkedAttempt};
pub use error::{BoxError, HandlerError};
pub use handler::HandlerFn;
pub(crate) use parking::{ParkFuture, Parking};
pub use retry::{DurableRetry, RetryDecision, RetryPolicy};
pub use router::{AckPolicy, HandlerOptions, Router, UnhandledPolicy};
