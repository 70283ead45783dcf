//! The pipeline for one record: decode the envelope, find the routes, decode the payload, run
//! every handler with its retry policy, and report a final outcome. Transport-agnostic: both
//! buses feed it records and act on what it returns.

use super::ctx::RecordInfo;
use super::retry::RetryDecision;
use super::router::{ErasedEvent, Route, TypeRoute};
use super::{AckPolicy, Ctx, HandlerError, Router, TraceContext, UnhandledPolicy};
use crate::contracts::{decode_envelope, DecodeError, EventMeta, Headers};
use crate::telemetry::events::{
    At, DecodeFailed, HandlerCalled, HandlerGaveUp, HandlerRetrying, HandlerSucceeded,
    RecordReceived, RecordSkipped, UNKNOWN_TYPE,
};
use crate::telemetry::{trace, Metrics, RouteSeries};
use futures_util::FutureExt;
use prometheus::IntCounter;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// A record as any transport delivers it.
#[derive(Debug, Clone)]
pub(crate) struct Inbound {
    /// Shared: every record of a topic points at one copy of its name.
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) value: Option<Vec<u8>>,
    pub(crate) headers: Headers,
    /// Broker or producer timestamp, milliseconds since the epoch.
    pub(crate) timestamp_ms: Option<i64>,
}

impl Inbound {
    pub(crate) fn at(&self) -> At<'_> {
        At {
            topic: &self.topic,
            partition: self.partition,
            offset: self.offset,
        }
    }
}

/// Why a record goes to the dead-letter topic: the `weir.error.kind` header and the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum DeadLetterKind {
    Decode,
    Acknowledged,
    RetriesExhausted,
    Panic,
}

impl DeadLetterKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Decode => "decode",
            Self::Acknowledged => "acknowledged",
            Self::RetriesExhausted => "retries_exhausted",
            Self::Panic => "panic",
        }
    }
}

/// One final failure, to be dead-lettered.
#[derive(Debug, Clone)]
pub(crate) struct Failure {
    pub(crate) kind: DeadLetterKind,
    /// The decode error kind for decode failures; otherwise the same as `kind`.
    pub(crate) detail: &'static str,
    pub(crate) message: String,
    pub(crate) attempts: u32,
    /// The handler that failed; `None` for decode failures (no handler ran).
    pub(crate) handler: Option<Arc<str>>,
}

/// What became of a record.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// Final. Each failure must be dead-lettered before the offset may be committed; an empty
    /// list means handled or skipped.
    Done(Vec<Failure>),
    /// Stopped mid-way (shutdown during a retry backoff): not final, must not be committed.
    Abandoned,
}

enum HandlerResult {
    Final(Option<Failure>),
    Abandoned,
}

/// Runs records through a router.
pub(crate) struct Dispatcher {
    router: Router,
    metrics: Metrics,
    group: String,
    /// One permit per core, shared by every `cpu_bound` handler.
    cpu: Arc<Semaphore>,
    /// `weir_messages_received_total` of each subscribed topic, resolved once.
    received: HashMap<String, IntCounter>,
}

impl Dispatcher {
    pub(crate) fn new(mut router: Router, metrics: Metrics, group: impl Into<String>) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        router.bind_metrics(&metrics);
        let received = router
            .topics()
            .into_iter()
            .map(|t| {
                let counter = metrics.received.with_label_values(&[&t]);
                (t, counter)
            })
            .collect();
        Self {
            received,
            router,
            metrics,
            group: group.into(),
            cpu: Arc::new(Semaphore::new(cores)),
        }
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Handles one record to a final outcome, or abandons it when `stop` fires during a backoff.
    /// The record's `process` span: the caller runs everything about the record in it (handling
    /// and dead-lettering), so every log line about the record carries its trace id.
    pub(crate) fn span(&self, rec: &Inbound) -> tracing::Span {
        trace::process_span(
            &rec.topic,
            rec.partition,
            rec.offset,
            &self.group,
            &rec.headers,
        )
    }

    /// Handles one record to a final outcome, or abandons it when `stop` fires during a backoff.
    /// `span` is the record's [`span`](Self::span), which the caller has entered.
    pub(crate) async fn dispatch(
        &self,
        rec: &Arc<Inbound>,
        stop: &CancellationToken,
        span: &tracing::Span,
    ) -> Outcome {
        let outcome = self.dispatch_record(rec, stop, span).await;
        if let Some(observer) = &self.router.observer {
            observer.outcome(rec, &outcome);
        }
        outcome
    }

    async fn dispatch_record(
        &self,
        rec: &Arc<Inbound>,
        stop: &CancellationToken,
        span: &tracing::Span,
    ) -> Outcome {
        RecordReceived { at: rec.at() }.emit(&self.metrics, self.received.get(&*rec.topic));
        let decoded = {
            let _decode = trace::decode_span().entered();
            self.decode(rec, span)
        };
        let (route, meta, event) = match decoded {
            Ok(decoded) => decoded,
            Err(outcome) => return outcome,
        };
        let info = Arc::new(RecordInfo {
            record: rec.clone(),
            trace: TraceContext::from_headers(&rec.headers),
            event: meta,
        });
        let resolved;
        let series = match &route.series {
            Some(series) => series,
            None => {
                resolved = self
                    .metrics
                    .route_series(&rec.topic, &info.event.event_type);
                &resolved
            }
        };
        if let [handler] = route.handlers.as_slice() {
            // The common case, without join_all's allocation and bookkeeping; the handler gets
            // the decoded event itself, not a copy.
            return match self
                .run_handler(handler, route, event, &info, series, stop)
                .await
            {
                HandlerResult::Final(failure) => Outcome::Done(failure.into_iter().collect()),
                HandlerResult::Abandoned => Outcome::Abandoned,
            };
        }
        let runs = route
            .handlers
            .iter()
            .map(|handler| self.run_handler(handler, route, event.clone(), &info, series, stop));
        let mut failures = Vec::new();
        for result in futures_util::future::join_all(runs).await {
            match result {
                HandlerResult::Final(failure) => failures.extend(failure),
                HandlerResult::Abandoned => return Outcome::Abandoned,
            }
        }
        Outcome::Done(failures)
    }

    /// Envelope, route, payload: the record as a typed event, or the final outcome if it cannot
    /// become one (decode error, or a type nobody handles).
    fn decode(
        &self,
        rec: &Inbound,
        span: &tracing::Span,
    ) -> Result<(&TypeRoute, EventMeta, ErasedEvent), Outcome> {
        if let Some((wire_type, route)) = self.router.sole_route(&rec.topic) {
            let one_pass =
                (route.decode_one_pass)(rec.value.as_deref(), &rec.headers, &self.router.limits);
            if let Some((meta, event)) = one_pass.filter(|(m, _)| m.event_type == wire_type) {
                trace::record_event(span, &meta.id, &meta.event_type);
                return Ok((route, meta, event));
            }
        }
        let raw = decode_envelope(rec.value.as_deref(), &rec.headers, &self.router.limits)
            .map_err(|e| self.decode_failure(rec, e))?;
        let Some(route) = self.router.route(&rec.topic, &raw.meta.event_type) else {
            return Err(match self.router.on_unhandled {
                UnhandledPolicy::Skip => {
                    RecordSkipped {
                        at: rec.at(),
                        event_id: Some(raw.meta.id),
                        event_type: UNKNOWN_TYPE,
                        reason: "unhandled_type",
                    }
                    .emit(&self.metrics);
                    Outcome::Done(Vec::new())
                }
                UnhandledPolicy::DeadLetter => self.decode_failure(
                    rec,
                    DecodeError::UnknownEventType {
                        event_type: raw.meta.event_type,
                    },
                ),
            });
        };
        trace::record_event(span, &raw.meta.id, &raw.meta.event_type);
        let event = (route.decode)(&raw).map_err(|e| self.decode_failure(rec, e))?;
        Ok((route, raw.meta, event))
    }

    fn decode_failure(&self, rec: &Inbound, error: DecodeError) -> Outcome {
        DecodeFailed {
            at: rec.at(),
            kind: error.kind(),
            error: &error,
        }
        .emit(&self.metrics);
        Outcome::Done(vec![Failure {
            kind: DeadLetterKind::Decode,
            detail: error.kind(),
            message: error.to_string(),
            attempts: 0,
            handler: None,
        }])
    }

    /// Decodes the record again, for a retry: the first attempt took the event, and decoding
    /// succeeded once, so it does again. Retries are rare and wait a backoff; a copy of every
    /// event kept for them would cost every record.
    fn decode_again(&self, route: &TypeRoute, rec: &Inbound) -> Result<ErasedEvent, DecodeError> {
        let limits = &self.router.limits;
        if let Some((_, event)) =
            (route.decode_one_pass)(rec.value.as_deref(), &rec.headers, limits)
        {
            return Ok(event);
        }
        let raw = decode_envelope(rec.value.as_deref(), &rec.headers, limits)?;
        (route.decode)(&raw)
    }

    async fn run_handler(
        &self,
        handler: &Route,
        route: &TypeRoute,
        event: ErasedEvent,
        info: &Arc<RecordInfo>,
        series: &RouteSeries,
        stop: &CancellationToken,
    ) -> HandlerResult {
        let m = &self.metrics;
        let at = info.record.at();
        let event_type = info.event.event_type.as_str();
        let event_id = info.event.id;
        let policy = handler.retry.as_ref().unwrap_or(&self.router.default_retry);
        let mut attempt = 1;
        let mut first = Some(event);
        loop {
            let event = match first.take() {
                Some(event) => event,
                None => match self.decode_again(route, &info.record) {
                    Ok(event) => event,
                    Err(error) => {
                        return HandlerResult::Final(Some(Failure {
                            kind: DeadLetterKind::Decode,
                            detail: error.kind(),
                            message: error.to_string(),
                            attempts: attempt - 1,
                            handler: Some(handler.name.clone()),
                        }))
                    }
                },
            };
            let ctx = Ctx::new(info.clone(), attempt, handler.name.clone());
            let started = Instant::now();
            let result = self
                .call_once(handler, event, ctx)
                .instrument(trace::handle_span(&handler.name, attempt))
                .await;
            HandlerCalled {
                duration: started.elapsed(),
            }
            .emit(series);
            if let Some(observer) = &self.router.observer {
                observer.call(&info.record, &handler.name, attempt, started);
            }
            let give_up = |kind: super::DeadLetterKind, message: String, dropped: bool| {
                HandlerGaveUp {
                    at,
                    event_id,
                    event_type,
                    handler: &handler.name,
                    attempts: attempt,
                    kind: kind.as_str(),
                    dropped,
                    error: &message,
                }
                .emit(m);
                HandlerResult::Final((!dropped).then(|| Failure {
                    kind,
                    detail: kind.as_str(),
                    message,
                    attempts: attempt,
                    handler: Some(handler.name.clone()),
                }))
            };
            let error = match result {
                Ok(Ok(())) => {
                    HandlerSucceeded {
                        at,
                        event_id,
                        event_type,
                        handler: &handler.name,
                        attempt,
                    }
                    .emit(series);
                    return HandlerResult::Final(None);
                }
                Err(panic) => return give_up(DeadLetterKind::Panic, panic, false),
                Ok(Err(error)) => error,
            };
            match policy.decide(attempt, &error) {
                RetryDecision::RetryAfter(delay) => {
                    HandlerRetrying {
                        at,
                        event_id,
                        event_type,
                        handler: &handler.name,
                        attempt,
                        delay,
                        error: &error,
                    }
                    .emit(m);
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => attempt += 1,
                        _ = stop.cancelled() => return HandlerResult::Abandoned,
                    }
                }
                RetryDecision::Permanent => {
                    let ack = handler
                        .on_acknowledged
                        .unwrap_or(self.router.on_acknowledged);
                    return give_up(
                        DeadLetterKind::Acknowledged,
                        error_chain(&error),
                        ack == AckPolicy::Drop,
                    );
                }
                RetryDecision::Exhausted => {
                    return give_up(DeadLetterKind::RetriesExhausted, error_chain(&error), false)
                }
            }
        }
    }

    /// One call, with its timeout; a panic (while building or polling the future) becomes `Err`.
    /// A `cpu_bound` call runs on a blocking thread, which nothing can interrupt: it keeps its
    /// core permit and this record's lane until it has really returned, even past its timeout
    /// (which then only cuts its waits), so a retry never overlaps it. If this future is dropped
    /// (the record was aborted), the call's waits are cut too.
    async fn call_once(
        &self,
        handler: &Route,
        event: ErasedEvent,
        ctx: Ctx,
    ) -> Result<Result<(), HandlerError>, String> {
        let future = std::panic::catch_unwind(AssertUnwindSafe(|| (handler.call)(event, ctx)))
            .map_err(|p| panic_message(&*p))?;
        let guarded = AssertUnwindSafe(future).catch_unwind();
        let timed_out = |limit| {
            HandlerError::retryable(format!("handler timed out after {limit:?}"))
                .with_kind("timeout")
        };
        let result = if !handler.cpu_bound {
            match handler.timeout {
                None => guarded.await,
                Some(limit) => match tokio::time::timeout(limit, guarded).await {
                    Ok(result) => result,
                    Err(_) => Ok(Err(timed_out(limit))),
                },
            }
        } else {
            let permit = self
                .cpu
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            let runtime = tokio::runtime::Handle::current();
            let cut = CancellationToken::new();
            let cut_inside = cut.clone();
            let _cut_on_drop = cut.clone().drop_guard();
            let mut call = tokio::task::spawn_blocking(move || {
                let _permit = permit;
                runtime.block_on(async {
                    tokio::select! {
                        result = guarded => Some(result),
                        _ = cut_inside.cancelled() => None,
                    }
                })
            });
            let joined = match handler.timeout {
                None => (&mut call).await,
                Some(limit) => match tokio::time::timeout(limit, &mut call).await {
                    Ok(joined) => joined,
                    Err(_) => {
                        cut.cancel();
                        let _ = call.await;
                        return Ok(Err(timed_out(limit)));
                    }
                },
            };
            match joined {
                Ok(Some(result)) => result,
                Ok(None) => Ok(Err(timed_out(Duration::ZERO))),
                Err(join) => Err(Box::new(format!("blocking task ended: {join}")) as _),
            }
        };
        result.map_err(|p| panic_message(&*p))
    }
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "non-string panic payload".to_owned());
    format!("handler panicked: {text}")
}

/// The error and its causes, `a: b: c`, for the dead-letter message header.
fn error_chain(error: &HandlerError) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error).and_then(std::error::Error::source);
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
