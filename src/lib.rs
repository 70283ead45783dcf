//! Weir: typed Kafka consumers for Rust services.
//!
//! A record arrives; an [`EventFactory<T>`] decodes it into a typed event; the handler registered
//! for that topic and event type runs; its result decides what happens next: success (offset
//! committed), a retryable error (retried with backoff), or an acknowledged error (not retried;
//! dead-lettered with its original bytes). Delivery is at least once: an offset is committed only
//! when its record's outcome is final.
//!
//! ```no_run
//! use serde::{Deserialize, Serialize};
//! use weir::{Bus, ConsumerConfig, Ctx, Event, EventType, HandlerError, MemoryBus, Router};
//!
//! /// An event contract: the payload of a CloudEvent, its type name and its topic.
//! #[derive(Debug, Clone, Serialize, Deserialize)]
//! struct OrderPlaced {
//!     order_id: String,
//!     total_cents: u64,
//! }
//!
//! impl Event for OrderPlaced {
//!     const TYPE: EventType = EventType::new("order.placed");
//!     const TOPIC: &'static str = "orders";
//!     fn key(&self) -> String {
//!         self.order_id.clone()
//!     }
//! }
//!
//! async fn reserve_stock(order: OrderPlaced, ctx: Ctx) -> Result<(), HandlerError> {
//!     tracing::info!(order = %order.order_id, attempt = ctx.attempt(), "reserving stock");
//!     Ok(())
//! }
//!
//! # async fn run() -> Result<(), weir::BusError> {
//! let bus = MemoryBus::default();
//! let subscription = bus.subscribe(Router::new().on(reserve_stock), ConsumerConfig::new("stock"))?;
//! subscription.stop().await?;
//! # Ok(()) }
//! ```
//!
//! # Layout
//! Dependencies point one way: `contracts` ← `telemetry` ← `handlers` ← `bus` ← `outbox`;
//! `testing` uses `bus` and what is below it; `temporal` uses `contracts`, `telemetry` and
//! `handlers`; `schema` uses `contracts` and `handlers`; `admin` uses `telemetry`. Nothing here
//! imports the binary, and the reference service's names live in the binary, not here.
//! `scripts/import-graph.py` checks this map against the code, and that no two files import
//! each other, directly or in a circle.
//!
//! - `contracts`: the [`Event`] trait, the CloudEvents [`Envelope`], [`EventFactory`] and its
//!   [`DecodeError`]. Depends on nothing else of Weir.
//! - `telemetry`: [`Metrics`], [`Health`], trace-context propagation, and the typed internal events
//!   every metric and log line goes through; [`otlp`] sets up trace export (feature `otlp`); the
//!   [`StatusReport`] a process publishes (its versioned schema, and the [`ReportBuilder`] that
//!   reads route counts and handler times off the metrics, plus the last handler errors and
//!   the fleet commands applied, [`CommandAck`]).
//! - `handlers`: [`HandlerFn`], [`Ctx`], [`State`], [`HandlerError`], the [`RetryPolicy`], the
//!   [`Router`] (where types are erased, and layers applied), the dispatch pipeline that takes
//!   one record to a final outcome, and each route's circuit breaker ([`BreakerConfig`]: it
//!   decides; the engine pauses the route). A handler never sees a transport.
//! - `bus`: the [`Bus`] and [`Publisher`] traits, the engine shared by every bus (key lanes,
//!   in-flight limits, offset tracking, dead-lettering, drain), pausing
//!   ([`Subscription::pause`], [`PauseTarget`], [`PauseSource`]), the engine's snapshot of its
//!   partitions ([`Subscription::status`]), the [`MemoryBus`] and, with the `kafka` feature, the
//!   `KafkaBus` (the only rdkafka user) and the `StatusReporter` that publishes status reports
//!   to the compacted `weir.status` topic; fleet commands ([`FleetCommand`], their versioned
//!   schema, and [`InForce`], the fold of a compacted commands topic) and, with `kafka`, the
//!   `CommandListener` every process runs on `weir.commands` and the `CommandPublisher` that
//!   issues them.
//! - `outbox` (feature `postgres`): the transactional `OutboxWriter` and `OutboxRelay`, the
//!   idempotent `inbox`, the embedded PostgreSQL `migrate` runner, and durable retries: the
//!   `ParkedStore` records are parked in and the `ParkedWorker` that retries them (it calls
//!   handlers through the dispatcher, and dead-letters like the engine).
//! - `admin` (feature `admin`): the admin HTTP server (`/metrics`, `/healthz`, `/readyz`).
//! - `testing` (feature `testing`, `weir::testing`): run a router on the memory bus inside a test.
//! - `temporal` (feature `temporal`, `weir::temporal`): a handler that starts a Temporal
//!   workflow per event, with idempotent workflow ids and the mapping of server errors to retry
//!   or dead-letter (depends on contracts, telemetry and handlers).
//! - [`schema`] (feature `schema`): the JSON Schema of each event's data, the AsyncAPI 3.0
//!   document of a [`Router`], and the breaking-change rules `weir schema check` applies
//!   (depends on contracts and handlers only).
//!
//! # Features
//! `default = ["cli", "bench", "console"]` builds the `weir` binary, its reference service and
//! its web console (`weir console`). A service using Weir as a library turns the defaults off
//! and picks: `kafka`, `postgres`, `admin`, `otlp`, `testing`, `schema`, `temporal` (its build
//! needs `protoc`), and rdkafka's `ssl`, `ssl-vendored`, `gssapi`, `zstd`, `cmake-build`.

#![forbid(unsafe_code)]

#[cfg(feature = "admin")]
mod admin;
mod bus;
mod contracts;
mod handlers;
#[cfg(feature = "postgres")]
mod outbox;
#[cfg(feature = "schema")]
pub mod schema;
mod telemetry;
#[cfg(feature = "temporal")]
pub mod temporal;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "admin")]
pub use admin::{admin_router, serve_admin};
pub use bus::{
    Addressee, Bus, BusError, CommandAction, CommandError, CommandTarget, ConsumerConfig,
    DeadLetterTopics, Delivery, FleetCommand, InForce, MemoryBus, MemoryConfig, OutboundRecord,
    Pause, PauseError, PauseSource, PauseTarget, ProcessingOrder, PublishError, PublishExt,
    Publisher, StatusProbe, StopReport, StoredRecord, Subscription, COMMANDS_TOPIC,
    COMMAND_SCHEMA_VERSION,
};
#[cfg(feature = "kafka")]
pub use bus::{
    CommandListener, CommandPublisher, KafkaBus, KafkaConfig, ReporterConfig, StatusReporter,
};
pub use contracts::{
    DecodeError, DecodeLimits, Envelope, Event, EventFactory, EventMeta, EventType, Headers,
    CLOUDEVENTS_CONTENT_TYPE, SPEC_VERSION,
};
pub use handlers::{
    AckPolicy, AnyEvent, BatchCtx, BatchHandlerFn, BatchResult, BatchWindow, BoxError,
    BreakerConfig, BreakerState, Ctx, DurableRetry, FromBatch, FromCtx, HandlerError, HandlerExt,
    HandlerFn, HandlerOptions, HandlerService, IntoHandler, Layered, Request, RetryDecision,
    RetryPolicy, Router, State, TraceContext, UnhandledPolicy, WithLayer,
};
#[cfg(feature = "postgres")]
pub use outbox::{
    inbox, migrate, purge_inbox, InboxFuture, InboxTx, Migration, OutboxError, OutboxRelay,
    OutboxWriter, ParkedStore, ParkedWorker, ParkedWorkerConfig, RelayConfig, OUTBOX_CHANNEL,
    OUTBOX_MIGRATIONS,
};
#[cfg(feature = "postgres")]
pub use telemetry::outbox::OutboxMetrics;
#[cfg(feature = "postgres")]
pub use telemetry::parked::ParkedMetrics;
pub use telemetry::{
    CommandAck, ErrorEntry, Health, HealthStatus, Metrics, PartitionStatus, PauseReason,
    ProcessInfo, ReportBuilder, RouteStatus, StatusReport, MAX_REPORTED_PARTITIONS,
    REPORT_SCHEMA_VERSION,
};

/// OTLP trace export from the standard `OTEL_*` variables.
#[cfg(feature = "otlp")]
pub mod otlp {
    pub use crate::telemetry::otlp::{tracer_provider_from_env, OtlpError};
}

/// What Weir's exported macros expand to; not part of the API.
#[doc(hidden)]
pub mod __private {
    #[cfg(feature = "schema")]
    pub use schemars;
}

/// Names of the headers Weir adds to dead-letter records (documented in the README).
pub mod dead_letter_headers {
    pub use crate::bus::dead_letter_header_names::*;
}

/// The README's Rust snippets, compiled (and run, unless marked `no_run`) by
/// `cargo test --doc --features testing`, so the README cannot drift from the API. They use the
/// default features and the test kit; `scripts/test.sh` runs them.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
