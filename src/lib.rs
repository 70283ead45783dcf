//! Weir: typed Kafka consumers for Rust services.
//!
//! A record arrives; an [`EventFactory<T>`] decodes it into a typed event; the handler registered
//! for that topic and event type runs; its result decides what happens next: success (offset
//! committed), a retryable error (retried with backoff), or an acknowledged error (not retried;
//! dead-lettered with its original bytes). Delivery is at least once: an offset is committed only
//! when its record's outcome is final.
//!
//! ```no_run
//! use weir::{Bus, ConsumerConfig, Ctx, HandlerError, MemoryBus, Router, TaskCreated};
//!
//! async fn start_processing(task: TaskCreated, ctx: Ctx) -> Result<(), HandlerError> {
//!     tracing::info!(task = %task.0.task_id, attempt = ctx.attempt(), "processing");
//!     Ok(())
//! }
//!
//! # async fn run() -> Result<(), weir::BusError> {
//! let bus = MemoryBus::default();
//! let subscription = bus.subscribe(Router::new().on(start_processing), ConsumerConfig::new("tasks"))?;
//! subscription.stop().await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! - `contracts`: the [`Event`] trait, the CloudEvents [`Envelope`], [`EventFactory`] and its
//!   [`DecodeError`], and the seed services' events (tasks, customers, resources).
//! - `handlers`: [`HandlerFn`], [`Ctx`], [`HandlerError`], the [`RetryPolicy`], the [`Router`]
//!   (where types are erased) and the dispatch pipeline that takes one record to a final outcome.
//! - `bus`: the [`Bus`] and [`Publisher`] traits, the engine shared by every bus (key lanes,
//!   in-flight limits, offset tracking, dead-lettering, drain), the [`MemoryBus`] and the
//!   [`KafkaBus`] (the only rdkafka user).
//! - `telemetry`: [`Metrics`], [`Health`], trace-context propagation, and the typed internal events
//!   every metric and log line goes through.
//! - `admin`: the admin HTTP server (`/metrics`, `/healthz`, `/readyz`).
//! - `outbox`: the transactional [`OutboxWriter`] and [`OutboxRelay`], the idempotent [`inbox`],
//!   and the embedded PostgreSQL [`migrate`] runner (depends on contracts and [`Publisher`] only).
//! - `temporal` (feature `temporal`): a handler that starts a Temporal workflow per event, with
//!   idempotent workflow ids and the mapping of server errors to retry or dead-letter (depends on
//!   contracts and handlers only).

#![forbid(unsafe_code)]

mod admin;
mod bus;
mod contracts;
mod handlers;
mod outbox;
mod telemetry;
#[cfg(feature = "temporal")]
pub mod temporal;

pub use admin::{admin_router, serve_admin};
pub use bus::{
    Bus, BusError, ConsumerConfig, DeadLetterTopics, Delivery, KafkaBus, KafkaConfig, MemoryBus,
    MemoryConfig, OutboundRecord, ProcessingOrder, PublishError, PublishExt, Publisher, StopReport,
    StoredRecord, Subscription,
};
pub use contracts::*;
pub use handlers::{
    AckPolicy, BoxError, Ctx, HandlerError, HandlerFn, HandlerOptions, RetryDecision, RetryPolicy,
    Router, TraceContext, UnhandledPolicy,
};
pub use outbox::{
    create_task, inbox, migrate, purge_inbox, InboxFuture, InboxTx, Migration, NewTask,
    OutboxError, OutboxRelay, OutboxWriter, RelayConfig, OUTBOX_CHANNEL, OUTBOX_MIGRATIONS,
    TASK_MIGRATIONS,
};
pub use telemetry::outbox::OutboxMetrics;
pub use telemetry::{Health, HealthStatus, Metrics};

/// Names of the headers Weir adds to dead-letter records (documented in the README).
pub mod dead_letter_headers {
    pub use crate::bus::dead_letter_header_names::*;
}
