//! Handing events over to Temporal: a handler that starts a workflow for each event.
//!
//! A Kafka handler should finish quickly and idempotently; long, stateful work (stream a file,
//! retry a step for minutes, report progress) belongs to a durable workflow. This module is the
//! hand-off between the two: [`Temporal::starts`] turns a typed event into one workflow start,
//! and the handler's result says whether the record is done:
//!
//! - started, or **already started** (a redelivered record derives the same workflow id, and the
//!   id is never reused): `Ok`, the offset is committed;
//! - the server is unreachable, slow or overloaded (`Unavailable`, `DeadlineExceeded`,
//!   `ResourceExhausted`, ...): [`HandlerError::Retryable`](crate::HandlerError), so the record
//!   is retried under the route's policy rather than lost;
//! - the request is wrong (`InvalidArgument`, `NotFound` namespace, ...):
//!   [`HandlerError::Acknowledged`](crate::HandlerError), dead-lettered with the server's message.
//!
//! The record's W3C trace context travels in the workflow's header (`_tracer-data`, the key
//! Temporal's tracing interceptors read) and memo (`traceparent`, shown by `temporal workflow
//! describe`), so a trace can be followed from Kafka into Temporal.
//!
//! It depends on `contracts` and `handlers` only; the worker side (workflows, activities) is the
//! application's, built with the Temporal SDK.

mod client;
mod errors;
mod start;

pub use client::Temporal;
pub use errors::{classify_start_error, TemporalError};
pub use start::{StartOutcome, WorkflowRequest, TRACE_HEADER};

/// The Temporal client crate, re-exported so applications use the same version as Weir.
pub use temporalio_client as client_crate;
