//! The reference service: handlers for the seed topics. They depend on contracts and handlers
//! only, never on a bus, as a user's handlers should.
//!
//! - this file: recording handlers for every seed event (what the process tests count), and the
//!   assembly of the service (handlers, HTTP routes, background jobs);
//! - `api`: the state routes share and the API's error type;
//! - `resources`: uploads and their side effects;
//! - `tasks`: task processing and its triggers.
//!
//! The recording handlers always run; the database-backed ones only when a database is
//! configured.
//!
//! Each handler records the event it handled (see `ServiceSettings::record_file`). With
//! `service.test_hooks` on (off by default: [`TestHooks`]), customer events carry a test hook:
//! `details.simulate = "transient"` fails the first attempt
//! retryably; `"permanent"` fails acknowledged; `"panic"` panics; `"hang"` never completes (a
//! handler stuck on a dead dependency, for the flow-control tests); `"slow"` completes after
//! `details.ms` (default 2,000), a slow dependency (the rebalancing tests); `"outage"` fails
//! retryably until `details.until` (RFC 3339), a dependency down for a while (durable-retry
//! tests).

mod api;
pub(crate) mod events;
pub(crate) mod resources;
pub(crate) mod settings;
pub(crate) mod tasks;

pub(crate) use api::Services;
use events::{
    CustomerCreated, CustomerDeleted, CustomerUpdated, ResourceCreated, ResourceDeleted,
    ResourceUpdated, TaskCreated, TaskProcessingRequested,
};
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex};
use weir::schema::AsyncApi;
use weir::{Ctx, HandlerError, HandlerOptions, Router};

/// Where handled events are written, one JSON line each, before the handler returns: event id,
/// type, handler, coordinates, attempt, key, time and process. Each line is written with one
/// `write` on an `O_APPEND` file and flushed before the handler succeeds, so it is in the file
/// before the offset can be committed and survives a SIGKILL of the process (the soak's ledger).
#[derive(Clone, Default)]
pub(crate) struct Recorder {
    file: Option<Arc<Mutex<File>>>,
}

#[derive(Serialize)]
struct Line<'a> {
    event_id: String,
    event_type: &'a str,
    handler: &'a str,
    topic: &'a str,
    partition: i32,
    offset: i64,
    attempt: u32,
    /// The record key, if any (the soak checks order per key).
    key: Option<&'a str>,
    /// When the handler finished, in Unix milliseconds (the soak's end-to-end latency).
    at_ms: i64,
    /// The recording process (the soak attributes handlings to replicas).
    pid: u32,
}

impl Recorder {
    pub(crate) fn open(path: Option<&Path>) -> std::io::Result<Self> {
        let file = path
            .map(|p| OpenOptions::new().create(true).append(true).open(p))
            .transpose()?;
        Ok(Self {
            file: file.map(|f| Arc::new(Mutex::new(f))),
        })
    }

    fn record(&self, ctx: &Ctx) -> Result<(), HandlerError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        let line = Line {
            event_id: ctx.event_id().to_string(),
            event_type: &ctx.event().event_type,
            handler: ctx.handler_name(),
            topic: ctx.topic(),
            partition: ctx.partition(),
            offset: ctx.offset(),
            attempt: ctx.attempt(),
            key: ctx.key_str(),
            at_ms: chrono::Utc::now().timestamp_millis(),
            pid: std::process::id(),
        };
        let mut text = serde_json::to_string(&line).map_err(HandlerError::acknowledged)?;
        text.push('\n');
        let mut file = file.lock().unwrap_or_else(|e| e.into_inner());
        // One write call per line, so a crash can cut only the last line, never mix two.
        file.write_all(text.as_bytes())
            .and_then(|()| file.flush())
            .map_err(HandlerError::retryable)
    }
}

/// Whether the customer handlers obey `details.simulate`. A test hook in the payload is a
/// backdoor in production (anyone who can publish can panic or stall a replica), so it is a
/// setting, off by default (`service.test_hooks`); off, an event asking for a hook is recorded
/// like any other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TestHooks {
    /// `details.simulate` is plain data.
    Off,
    /// `details.simulate` fails, panics, slows or hangs the handler (tests and the demo).
    On,
}

impl TestHooks {
    /// The hook an event asks for, if the hooks are on.
    fn requested(self, details: &serde_json::Value) -> Option<&str> {
        match self {
            TestHooks::On => details.get("simulate").and_then(|v| v.as_str()),
            TestHooks::Off => None,
        }
    }
}

fn simulate(
    hook: Option<&str>,
    details: &serde_json::Value,
    ctx: &Ctx,
) -> Result<(), HandlerError> {
    match hook {
        Some("transient") if ctx.attempt() == 1 => {
            Err(HandlerError::retryable("simulated transient failure"))
        }
        Some("permanent") => Err(HandlerError::acknowledged("simulated permanent failure")),
        // An outage of the customer's dependency until `details.until` (RFC 3339).
        Some("outage")
            if details
                .get("until")
                .and_then(|u| u.as_str())
                .and_then(|u| chrono::DateTime::parse_from_rfc3339(u).ok())
                .is_some_and(|until| chrono::Utc::now() < until) =>
        {
            Err(HandlerError::retryable("simulated outage"))
        }
        Some("panic") => panic!("simulated panic"),
        _ => Ok(()),
    }
}

type Done = std::future::Ready<Result<(), HandlerError>>;

/// A handler that only records the event.
fn recording<T: 'static>(r: &Recorder) -> impl Fn(T, Ctx) -> Done + Clone + Send + Sync + 'static {
    let r = r.clone();
    move |_, ctx| std::future::ready(r.record(&ctx))
}

/// A customer handler's future: done at once, or one that waits (`simulate = "hang"` never
/// ends, `"slow"` ends after `details.ms`).
type MaybeWaits = futures_util::future::Either<
    Done,
    futures_util::future::BoxFuture<'static, Result<(), HandlerError>>,
>;

/// A customer handler: obeys the `simulate` hook if the hooks are on, then records.
fn customer<T: 'static>(
    r: &Recorder,
    hooks: TestHooks,
    details: fn(&T) -> &serde_json::Value,
) -> impl Fn(T, Ctx) -> MaybeWaits + Clone + Send + Sync + 'static {
    use futures_util::FutureExt as _;
    let r = r.clone();
    move |e, ctx| {
        let details = details(&e);
        let hook = hooks.requested(details);
        match hook {
            Some("hang") => {
                return futures_util::future::Either::Right(std::future::pending().boxed());
            }
            Some("slow") => {
                let ms = details.get("ms").and_then(|v| v.as_u64()).unwrap_or(2_000);
                let r = r.clone();
                let slow = async move {
                    tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                    r.record(&ctx)
                };
                return futures_util::future::Either::Right(slow.boxed());
            }
            _ => {}
        }
        futures_util::future::Either::Left(std::future::ready(
            simulate(hook, details, &ctx).and_then(|()| r.record(&ctx)),
        ))
    }
}

/// The router of the reference service: the recording handlers (obeying `hooks`), and with a
/// database the resource and task handlers. Fails on a `[temporal]` section this build cannot
/// honour.
pub(crate) fn router(
    r: &Recorder,
    hooks: TestHooks,
    services: Option<&Services>,
) -> anyhow::Result<Router> {
    let router = recording_router(r, hooks);
    match services {
        Some(services) => tasks::handlers(resources::handlers(router, services), services),
        None => Ok(router),
    }
}

/// The HTTP API (resources and tasks).
pub(crate) fn api(services: &Services) -> axum::Router {
    resources::routes(services).merge(tasks::routes(services))
}

/// The service's background jobs, stopped by `stop`.
pub(crate) fn spawn_background(
    services: &Services,
    stop: tokio_util::sync::CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    let mut jobs = tasks::spawn_background(services, stop.clone());
    jobs.extend(resources::spawn_background(services, stop));
    jobs
}

/// What the service says about itself in its contract document, beyond its router: what it
/// is, and the events its API publishes through the outbox.
pub(crate) fn describe(api: AsyncApi) -> AsyncApi {
    api.description(
        "Resources: uploads whose side effects (hashes, thumbnails, index) run in event \
         handlers. Tasks: file processing started by the API, a person, a schedule or a \
         webhook. Customers: events of the customer service, recorded.",
    )
    .publishes::<TaskCreated>()
    .publishes::<TaskProcessingRequested>()
    .publishes::<ResourceCreated>()
    .publishes::<ResourceUpdated>()
    .publishes::<ResourceDeleted>()
}

fn recording_router(r: &Recorder, hooks: TestHooks) -> Router {
    let named = |name: &str| HandlerOptions::new().name(name);
    Router::new()
        .on_with(recording::<TaskCreated>(r), named("record_task_created"))
        .on_with(
            recording::<TaskProcessingRequested>(r),
            named("record_task_processing_requested"),
        )
        .on_with(
            customer(r, hooks, |e: &CustomerCreated| &e.details),
            named("record_customer_created"),
        )
        .on_with(
            customer(r, hooks, |e: &CustomerUpdated| &e.details),
            named("record_customer_updated"),
        )
        .on_with(
            customer(r, hooks, |e: &CustomerDeleted| &e.details),
            named("record_customer_deleted"),
        )
        .on_with(
            recording::<ResourceCreated>(r),
            named("record_resource_created"),
        )
        .on_with(
            recording::<ResourceUpdated>(r),
            named("record_resource_updated"),
        )
        .on_with(
            recording::<ResourceDeleted>(r),
            named("record_resource_deleted"),
        )
}
