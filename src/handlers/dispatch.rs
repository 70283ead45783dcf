//! The pipeline for one record: decode the envelope, find the routes, decode the payload, run
//! every handler with its retry policy, and report a final outcome. Transport-agnostic: both
//! buses feed it records and act on what it returns.

use super::blocking::BlockingCalls;
use super::breaker::CallOutcome;
use super::circuit::{Circuit, PauseRequest, Requests};
use super::ctx::RecordInfo;
use super::erased::{BoxFuture, ErasedEvent};
use super::record::{DeadLetterKind, Failure, Inbound, Outcome};
#[cfg(feature = "postgres")]
use super::retry::DurableRetry;
use super::retry::RetryDecision;
use super::router::{Route, TypeRoute};
use super::Parking;
use super::{AckPolicy, Ctx, HandlerError, Router, TraceContext, UnhandledPolicy};
use crate::contracts::{decode_envelope, DecodeError, EventMeta};
use crate::telemetry::events::{
    DecodeFailed, HandlerBlockedThread, HandlerCalled, HandlerGaveUp, HandlerRetrying,
    HandlerSucceeded, ParkFailed, RecordParked, RecordReceived, RecordSkipped, UNKNOWN_TYPE,
};
use crate::telemetry::{trace, LocalRouteSeries, LocalSeries, Metrics, RouteSeries};
use futures_util::FutureExt;
use prometheus::IntCounter;
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// What one durable attempt of a parked record came to.
#[cfg(feature = "postgres")]
#[derive(Debug)]
pub(crate) enum ParkedAttempt {
    Succeeded,
    /// Failed `Retryable`: try again later, or dead-letter with this failure after the last
    /// durable attempt.
    Retryable(Failure),
    /// Failed for good (acknowledged, panic, undecodable): dead-letter now.
    Final(Failure),
}

/// Records of a route run as tasks straight away after one of its first calls ran long.
const SPAWN_AFTER_SLOW_POLL: u32 = 1024;

/// A first poll this long is a handler blocking its thread (synchronous I/O, a sleep, a lock
/// held across a slow call): far beyond anything a computing poll between two awaits takes.
const BLOCKING_POLL: Duration = Duration::from_millis(10);

/// The error recorded for a record parked only because its key had parked records.
const BEHIND: &str = "parked behind an earlier record of its key";

enum HandlerResult {
    Final(Option<Failure>),
    Abandoned,
}

/// One handler's attempts at one record: what each attempt, and what it reports, refers to.
#[derive(Clone, Copy)]
struct HandlerRun<'a> {
    handler: &'a Route,
    route: &'a TypeRoute,
    info: &'a Arc<RecordInfo>,
    series: &'a RouteSeries,
    stop: &'a CancellationToken,
    /// Counts its `cpu_bound` calls until they return, for whoever gives the record up.
    blocking: &'a Arc<BlockingCalls>,
}

/// What the engine's synchronous first call of a record's handler came to
/// ([`Dispatcher::first_call`]).
pub(crate) enum FirstCall {
    /// The handler succeeded in its first poll: the record is handled and its outcome reported.
    /// `polled` is how long the call took.
    Handled { polled: Duration },
    /// The rest runs as the record's task, from where the first call left off
    /// ([`Dispatcher::dispatch`] with the [`Resume`]).
    Resume { resume: Resume, polled: Duration },
    /// The handler was called and returned, then something after it panicked (the observer,
    /// say): that call was attempt 1, so the record's task must not call the handler again.
    Panicked { message: String, polled: Duration },
    /// The handler's first calls ran long lately (it computes or blocks its thread): the
    /// record's task runs it from the start, spawned at once, so the engine's thread does not
    /// wait for it. Nothing of the record was done.
    Spawn,
    /// Off the path the first call covers (several handlers, a `cpu_bound` one, durable retries,
    /// a record that does not decode in one pass): the record's task runs it from the start.
    Fresh,
}

/// A record whose first handler call has begun: the decoded record and the call.
pub(crate) struct Resume {
    info: Arc<RecordInfo>,
    started: Instant,
    call: Started,
}

enum Started {
    /// Waiting: its next poll, in the record's task, registers the task's waker.
    Running(BoxFuture<Result<(), HandlerError>>),
    /// Returned an error or panicked: the retry policy decides, in the record's task.
    Returned(Result<Result<(), HandlerError>, String>),
}

/// The first attempt of a handler: the event to call it with, or the call the engine began.
enum FirstAttempt {
    Event(ErasedEvent),
    Started(Instant, Started),
}

/// Runs records through a router.
pub(crate) struct Dispatcher {
    router: Router,
    metrics: Metrics,
    group: String,
    /// One permit per `cpu_bound` call that may run at once (one per core unless the
    /// consumer's configuration says fewer), shared by every `cpu_bound` handler.
    cpu: Arc<Semaphore>,
    /// `weir_messages_received_total` of each subscribed topic, resolved once. Looked up per
    /// record, so with foldhash: SipHash over a topic name cost more than the increment.
    received: HashMap<String, IntCounter, foldhash::fast::RandomState>,
    /// The circuit breaker of each route (handler name) that has one.
    circuits: HashMap<Arc<str>, Arc<Circuit>>,
    /// Where the breakers' pause and resume requests go ([`breaker_requests`](Self::breaker_requests)).
    requests: Requests,
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
        let reasons = DeadLetterKind::ALL.map(DeadLetterKind::as_str);
        let requests = Requests::default();
        let mut circuits = HashMap::new();
        for (topic, event_type, route) in router.iter() {
            metrics.export_route(topic, event_type, &reasons);
            for handler in &route.handlers {
                if let Some(config) = &handler.breaker {
                    circuits.entry(handler.name.clone()).or_insert_with(|| {
                        Circuit::new(
                            handler.name.clone(),
                            config.clone(),
                            requests.clone(),
                            metrics.clone(),
                        )
                    });
                }
            }
        }
        Self {
            received,
            circuits,
            requests,
            router,
            metrics,
            group: group.into(),
            cpu: Arc::new(Semaphore::new(cores)),
        }
    }

    /// Runs at most `threads` `cpu_bound` calls at once instead of one per core.
    pub(crate) fn cpu_bound_threads(mut self, threads: Option<usize>) -> Self {
        if let Some(threads) = threads {
            self.cpu = Arc::new(Semaphore::new(threads.max(1)));
        }
        self
    }

    pub(crate) fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// The channel the routes' circuit breakers ask the engine to pause and resume them
    /// through; `None` if no route has a breaker (or it was taken already).
    pub(crate) fn breaker_requests(&self) -> Option<mpsc::UnboundedReceiver<PauseRequest>> {
        if self.circuits.is_empty() {
            return None;
        }
        let (sender, receiver) = mpsc::unbounded_channel();
        self.requests.set(sender).ok()?;
        Some(receiver)
    }

    /// The topics consumed, and each (handler name, topic) pair: what pausing a route covers.
    pub(crate) fn routes(&self) -> (Vec<String>, Vec<(String, String)>) {
        let pairs = self
            .router
            .iter()
            .flat_map(|(topic, _, route)| {
                route
                    .handlers
                    .iter()
                    .map(move |h| (h.name.to_string(), topic.to_owned()))
            })
            .collect();
        (self.router.topics(), pairs)
    }

    /// Forgets the parked keys of partitions this consumer gave up: owning one again learns them
    /// again from the store, which another owner may have added to meanwhile.
    pub(crate) fn forget_parked(&self, partitions: &[(String, i32)]) {
        if let Some(parking) = &self.router.parking {
            parking.forget(partitions);
        }
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
        resume: Option<Resume>,
        stop: &CancellationToken,
        blocking: &Arc<BlockingCalls>,
        span: &tracing::Span,
    ) -> Outcome {
        let outcome = match resume {
            None => self.dispatch_record(rec, stop, blocking, span).await,
            Some(resume) => self.dispatch_resumed(rec, resume, stop, blocking).await,
        };
        if let Some(observer) = &self.router.observer {
            observer.outcome(rec, &outcome);
        }
        outcome
    }

    /// The record's handler called and polled once, synchronously, for the engine: a handler
    /// that does not wait (a no-op, a cache hit, a cheap transform) is done without a task, a
    /// boxed record future or the async layers around its call, which cost more than such a
    /// handler. Covers one handler on a topic of one event type, decoded in one pass, with no
    /// durable retries and no `cpu_bound` work; anything else is [`FirstCall::Fresh`], before
    /// any of it was done. Only where the record's span is disabled: the engine then has no span
    /// to run this in.
    ///
    /// A call whose poll takes longer than `budget` sends the route's next
    /// [`SPAWN_AFTER_SLOW_POLL`] records straight to tasks: a handler that computes or blocks
    /// in its poll must not hold the engine's thread, and every partition with it. A poll longer
    /// than [`BLOCKING_POLL`] is a handler blocking its thread: a warning names the route.
    pub(crate) fn first_call(
        &self,
        rec: &Arc<Inbound>,
        local: &mut LocalSeries,
        budget: Duration,
    ) -> FirstCall {
        if self.router.parking.is_some() {
            return FirstCall::Fresh;
        }
        let Some((wire_type, route)) = self.router.sole_route(&rec.topic) else {
            return FirstCall::Fresh;
        };
        let [handler] = route.handlers.as_slice() else {
            return FirstCall::Fresh;
        };
        // Without breakers (the usual case) no lookup per record: one length check.
        let gated = !self.circuits.is_empty() && self.circuits.contains_key(&handler.name);
        if handler.cpu_bound || gated {
            return FirstCall::Fresh;
        }
        if handler.spawn_next.load(Ordering::Relaxed) > 0 {
            // Only the engine's thread calls this (one engine per dispatcher): no race.
            handler.spawn_next.fetch_sub(1, Ordering::Relaxed);
            return FirstCall::Spawn;
        }
        let decoded =
            (route.decode_one_pass)(rec.value.as_deref(), &rec.headers, &self.router.limits);
        let Some((meta, event)) = decoded.filter(|(m, _)| m.event_type == wire_type) else {
            return FirstCall::Fresh;
        };
        let counts = local.topic(&rec.topic, || {
            let received = match self.received.get(&*rec.topic) {
                Some(counter) => counter.clone(),
                None => self.metrics.received.with_label_values(&[&*rec.topic]),
            };
            (
                received,
                self.series(route, &rec.topic, wire_type).into_owned(),
            )
        });
        RecordReceived { at: rec.at() }.emit_local(counts);
        let info = Arc::new(RecordInfo {
            record: rec.clone(),
            trace: TraceContext::from_headers(&rec.headers),
            event: meta,
            child_spans: false,
        });
        let ctx = Ctx::new(info.clone(), 1, handler.name.clone());
        let started = Instant::now();
        // A panic while building or polling the handler's future is the handler's, as in
        // `call_once`.
        let polled = std::panic::catch_unwind(AssertUnwindSafe(|| {
            let mut future = (handler.call)(event, ctx);
            let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
            match future.as_mut().poll(&mut cx) {
                std::task::Poll::Ready(result) => Started::Returned(Ok(result)),
                std::task::Poll::Pending => Started::Running(future),
            }
        }))
        .unwrap_or_else(|panic| Started::Returned(Err(panic_message(&*panic))));
        let duration = started.elapsed();
        if duration > budget {
            self.slow_first_call(rec, handler, wire_type, duration);
        }
        if let Started::Returned(Ok(Ok(()))) = polled {
            // The handler has run: a panic from here on ends the record as that attempt's.
            let succeeded = std::panic::catch_unwind(AssertUnwindSafe(|| {
                self.first_call_succeeded(rec, handler, &info, counts, started, duration)
            }));
            return match succeeded {
                Ok(()) => FirstCall::Handled { polled: duration },
                Err(panic) => FirstCall::Panicked {
                    message: panic_message(&*panic),
                    polled: duration,
                },
            };
        }
        FirstCall::Resume {
            resume: Resume {
                info,
                started,
                call: polled,
            },
            polled: duration,
        }
    }

    /// A first call whose poll ran long: the route's next records go straight to tasks, and a
    /// handler that blocked its thread is named.
    fn slow_first_call(&self, rec: &Inbound, handler: &Route, event_type: &str, polled: Duration) {
        handler
            .spawn_next
            .store(SPAWN_AFTER_SLOW_POLL, Ordering::Relaxed);
        if polled >= BLOCKING_POLL {
            HandlerBlockedThread {
                topic: &rec.topic,
                event_type,
                handler: &handler.name,
                polled,
            }
            .emit(&self.metrics);
        }
    }

    /// What follows a first call that succeeded: its metrics and the observer's view of it.
    fn first_call_succeeded(
        &self,
        rec: &Arc<Inbound>,
        handler: &Route,
        info: &RecordInfo,
        counts: &LocalRouteSeries,
        started: Instant,
        duration: Duration,
    ) {
        HandlerCalled { duration }.emit_local(counts);
        if let Some(observer) = &self.router.observer {
            observer.call(rec, &handler.name, 1, started);
        }
        HandlerSucceeded {
            at: rec.at(),
            event_id: info.event.id,
            event_type: &info.event.event_type,
            handler: &handler.name,
            attempt: 1,
        }
        .emit_local(counts);
        if let Some(observer) = &self.router.observer {
            observer.outcome(rec, &Outcome::Done(Vec::new()));
        }
    }

    /// The rest of a record whose first call the engine began ([`first_call`](Self::first_call)):
    /// its route is the one that call found, the topic's only one.
    async fn dispatch_resumed(
        &self,
        rec: &Arc<Inbound>,
        resume: Resume,
        stop: &CancellationToken,
        blocking: &Arc<BlockingCalls>,
    ) -> Outcome {
        let Some((_, route)) = self.router.sole_route(&rec.topic) else {
            unreachable!("a resumed record's topic has one route");
        };
        let handler = &route.handlers[0];
        let Resume {
            info,
            started,
            call,
        } = resume;
        let series = &*self.series(route, &rec.topic, &info.event.event_type);
        let first = FirstAttempt::Started(started, call);
        let run = HandlerRun {
            handler,
            route,
            info: &info,
            series,
            stop,
            blocking,
        };
        match self.run_handler(run, first).await {
            HandlerResult::Final(failure) => Outcome::Done(failure.into_iter().collect()),
            HandlerResult::Abandoned => Outcome::Abandoned,
        }
    }

    async fn dispatch_record(
        &self,
        rec: &Arc<Inbound>,
        stop: &CancellationToken,
        blocking: &Arc<BlockingCalls>,
        span: &tracing::Span,
    ) -> Outcome {
        RecordReceived { at: rec.at() }.emit(&self.metrics, self.received.get(&*rec.topic));
        // Child spans only where a subscriber records the record's span (and its trace is
        // sampled): at the default level there is none, and building them was most of the cost.
        let children = trace::wants_children(span);
        let decoded = if children {
            let _decode = trace::decode_span().entered();
            self.decode(rec, span)
        } else {
            self.decode(rec, span)
        };
        let (route, meta, event) = match decoded {
            Ok(decoded) => decoded,
            Err(outcome) => return outcome,
        };
        if let Some(parking) = &self.router.parking {
            if !self.learn_parked(&**parking, rec, stop).await {
                return Outcome::Abandoned;
            }
        }
        let info = Arc::new(RecordInfo {
            record: rec.clone(),
            trace: TraceContext::from_headers(&rec.headers),
            event: meta,
            child_spans: children,
        });
        let series = &*self.series(route, &rec.topic, &info.event.event_type);
        let Some(first_handler) = route.handlers.first() else {
            return Outcome::Done(Vec::new());
        };
        let run = HandlerRun {
            handler: first_handler,
            route,
            info: &info,
            series,
            stop,
            blocking,
        };
        if let [_] = route.handlers.as_slice() {
            // The common case, without join_all's allocation and bookkeeping; the handler gets
            // the decoded event itself, not a copy.
            return match self.run_handler(run, FirstAttempt::Event(event)).await {
                HandlerResult::Final(failure) => Outcome::Done(failure.into_iter().collect()),
                HandlerResult::Abandoned => Outcome::Abandoned,
            };
        }
        let runs = route.handlers.iter().map(|handler| {
            let first = FirstAttempt::Event(event.clone());
            self.run_handler(HandlerRun { handler, ..run }, first)
        });
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
            .map_err(|e| self.decode_failure(rec, None, e))?;
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
                    Some(raw.meta.id),
                    DecodeError::UnknownEventType {
                        event_type: raw.meta.event_type,
                    },
                ),
            });
        };
        trace::record_event(span, &raw.meta.id, &raw.meta.event_type);
        let event =
            (route.decode)(&raw).map_err(|e| self.decode_failure(rec, Some(raw.meta.id), e))?;
        Ok((route, raw.meta, event))
    }

    fn decode_failure(
        &self,
        rec: &Inbound,
        event_id: Option<uuid::Uuid>,
        error: DecodeError,
    ) -> Outcome {
        DecodeFailed {
            at: rec.at(),
            event_id,
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
            event_id,
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

    /// Runs one handler on the record until its result is final: attempt after attempt, as
    /// its retry policy decides, starting from `first` (the call the engine began, or the event).
    async fn run_handler(&self, run: HandlerRun<'_>, first: FirstAttempt) -> HandlerResult {
        if let Some(parked) = self.park_if_behind(&run).await {
            return parked;
        }
        let mut attempt = 1;
        let mut first = Some(first);
        let circuit = if self.circuits.is_empty() {
            None
        } else {
            self.circuits.get(&run.handler.name)
        };
        loop {
            // The breaker's gate: while it is open, the record waits here, spending no attempt.
            let ticket = match circuit {
                None => None,
                Some(circuit) => match circuit.admit(run.stop).await {
                    Some(ticket) => Some(ticket),
                    None => return HandlerResult::Abandoned,
                },
            };
            let (started, result) = match self.call_attempt(&run, first.take(), attempt).await {
                Ok(called) => called,
                Err(undecodable) => return undecodable,
            };
            self.note_call(&run, attempt, started);
            if let Some(ticket) = ticket {
                ticket.record(match &result {
                    Ok(Ok(())) => CallOutcome::Success,
                    Ok(Err(HandlerError::Retryable { .. })) => CallOutcome::RetryableFailure,
                    Ok(Err(HandlerError::Acknowledged { .. })) | Err(_) => CallOutcome::Ignored,
                });
            }
            let error = match result {
                Ok(Ok(())) => return self.succeeded(&run, attempt),
                Err(panic) => {
                    return self.give_up(&run, attempt, DeadLetterKind::Panic, panic, false)
                }
                Ok(Err(error)) => error,
            };
            if matches!(error, HandlerError::Retryable { .. })
                && circuit.is_some_and(|c| c.holding())
            {
                // A failure of the outage the breaker has seen: not the record's, so it spends
                // no attempt and no retry decision; the record waits at the gate for the close.
                continue;
            }
            match self.after_failure(&run, attempt, error).await {
                std::ops::ControlFlow::Continue(()) => attempt += 1,
                std::ops::ControlFlow::Break(result) => return result,
            }
        }
    }

    /// A key with parked records holds its later records back: the record is parked behind
    /// them, unless the store says they have gone meanwhile. Checked whatever the policy
    /// says: a key parked under an earlier configuration still holds its later records.
    /// `None` when the record is free to run.
    async fn park_if_behind(&self, run: &HandlerRun<'_>) -> Option<HandlerResult> {
        let parking = self.router.parking.as_ref()?;
        let (name, rec) = (&run.handler.name, &run.info.record);
        if !parking.is_parked(name, rec) {
            return None;
        }
        let Some(still) = self.confirm_parked(&**parking, name, rec, run.stop).await else {
            return Some(HandlerResult::Abandoned);
        };
        if !still {
            return None;
        }
        let now = std::time::Duration::ZERO;
        let parked = self.park(&**parking, run, 0, BEHIND, now).await;
        Some(parked)
    }

    /// One attempt's call, and when it started: the call the engine began, or a new one with
    /// the first attempt's event or, for a retry, the event decoded again. `Err` with the
    /// handler's final result if the record no longer decodes.
    async fn call_attempt(
        &self,
        run: &HandlerRun<'_>,
        first: Option<FirstAttempt>,
        attempt: u32,
    ) -> Result<(Instant, Result<Result<(), HandlerError>, String>), HandlerResult> {
        let event = match first {
            Some(FirstAttempt::Started(started, call)) => {
                return Ok((started, self.finish_first(run.handler, started, call).await));
            }
            Some(FirstAttempt::Event(event)) => event,
            None => match self.decode_again(run.route, &run.info.record) {
                Ok(event) => event,
                Err(error) => {
                    return Err(HandlerResult::Final(Some(Failure {
                        kind: DeadLetterKind::Decode,
                        detail: error.kind(),
                        message: error.to_string(),
                        attempts: attempt - 1,
                        handler: Some(run.handler.name.clone()),
                        event_id: Some(run.info.event.id),
                    })))
                }
            },
        };
        let ctx = Ctx::new(run.info.clone(), attempt, run.handler.name.clone());
        let started = Instant::now();
        let call = self.call_once(run.handler, event, ctx, Some(run.blocking));
        let result = if run.info.child_spans {
            call.instrument(trace::handle_span(&run.handler.name, attempt))
                .await
        } else {
            call.await
        };
        Ok((started, result))
    }

    /// Every call's duration, whatever it returned, and the observer's view of it.
    fn note_call(&self, run: &HandlerRun<'_>, attempt: u32, started: Instant) {
        HandlerCalled {
            duration: started.elapsed(),
        }
        .emit(run.series);
        if let Some(observer) = &self.router.observer {
            observer.call(&run.info.record, &run.handler.name, attempt, started);
        }
    }

    fn succeeded(&self, run: &HandlerRun<'_>, attempt: u32) -> HandlerResult {
        HandlerSucceeded {
            at: run.info.record.at(),
            event_id: run.info.event.id,
            event_type: run.info.event.event_type.as_str(),
            handler: &run.handler.name,
            attempt,
        }
        .emit(run.series);
        HandlerResult::Final(None)
    }

    /// What the retry policy makes of a failed attempt: `Continue` once the backoff before the
    /// next one has passed; else the handler's final result: dead-lettered, dropped, parked for
    /// durable retries, or abandoned (`stop` fired during the backoff).
    async fn after_failure(
        &self,
        run: &HandlerRun<'_>,
        attempt: u32,
        error: HandlerError,
    ) -> std::ops::ControlFlow<HandlerResult> {
        use std::ops::ControlFlow::{Break, Continue};
        let handler = run.handler;
        let policy = handler.retry.as_ref().unwrap_or(&self.router.default_retry);
        match policy.decide(attempt, &error) {
            RetryDecision::RetryAfter(delay) => {
                HandlerRetrying {
                    at: run.info.record.at(),
                    group: &self.group,
                    event_id: run.info.event.id,
                    event_type: run.info.event.event_type.as_str(),
                    handler: &handler.name,
                    attempt,
                    delay,
                    error: &error,
                }
                .emit(&self.metrics);
                tokio::select! {
                    _ = tokio::time::sleep(delay) => Continue(()),
                    _ = run.stop.cancelled() => Break(HandlerResult::Abandoned),
                }
            }
            RetryDecision::Permanent => {
                let ack = handler
                    .on_acknowledged
                    .unwrap_or(self.router.on_acknowledged);
                let (kind, dropped) = (DeadLetterKind::Acknowledged, ack == AckPolicy::Drop);
                Break(self.give_up(run, attempt, kind, error_chain(&error), dropped))
            }
            RetryDecision::Exhausted => {
                if let (Some(parking), Some(durable)) = (&self.router.parking, &policy.durable) {
                    let (error, delay) = (error_chain(&error), durable.delay(1));
                    return Break(self.park(&**parking, run, attempt, &error, delay).await);
                }
                let kind = DeadLetterKind::RetriesExhausted;
                Break(self.give_up(run, attempt, kind, error_chain(&error), false))
            }
        }
    }

    /// The handler failed for good at `attempt`: logged and counted, and its failure is to be
    /// dead-lettered unless `dropped` (an acknowledged error under [`AckPolicy::Drop`]).
    fn give_up(
        &self,
        run: &HandlerRun<'_>,
        attempt: u32,
        kind: DeadLetterKind,
        message: String,
        dropped: bool,
    ) -> HandlerResult {
        let event_id = run.info.event.id;
        HandlerGaveUp {
            at: run.info.record.at(),
            group: &self.group,
            event_id,
            event_type: run.info.event.event_type.as_str(),
            handler: &run.handler.name,
            attempts: attempt,
            kind: kind.as_str(),
            dropped,
            error: &message,
        }
        .emit(&self.metrics);
        HandlerResult::Final((!dropped).then(|| Failure {
            kind,
            detail: kind.as_str(),
            message,
            attempts: attempt,
            handler: Some(run.handler.name.clone()),
            event_id: Some(event_id),
        }))
    }

    /// Learns the parked keys of the record's partition (once per ownership), retrying until the
    /// store answers: handling a record of a partition whose parked keys are unknown could let
    /// it overtake a parked record of its key. `false` if `stop` fired first.
    async fn learn_parked(
        &self,
        parking: &dyn Parking,
        rec: &Inbound,
        stop: &CancellationToken,
    ) -> bool {
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            match parking.learn(&rec.topic, rec.partition).await {
                Ok(()) => return true,
                Err(error) => ParkFailed {
                    at: rec.at(),
                    what: "learn the partition's parked keys",
                    error: &error,
                }
                .emit(),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(std::time::Duration::from_secs(10)),
                _ = stop.cancelled() => return false,
            }
        }
    }

    /// Whether the key still has parked records, retrying until the store answers; `None` if
    /// `stop` fired first.
    async fn confirm_parked(
        &self,
        parking: &dyn Parking,
        handler: &str,
        rec: &Inbound,
        stop: &CancellationToken,
    ) -> Option<bool> {
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            match parking.confirm(handler, rec).await {
                Ok(still) => return Some(still),
                Err(error) => ParkFailed {
                    at: rec.at(),
                    what: "check the key's parked records",
                    error: &error,
                }
                .emit(),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(std::time::Duration::from_secs(10)),
                _ = stop.cancelled() => return None,
            }
        }
    }

    /// Parks the record for `handler`, retrying until the store has it: only then is this
    /// handler's outcome final and the offset committable.
    async fn park(
        &self,
        parking: &dyn Parking,
        run: &HandlerRun<'_>,
        attempts: u32,
        error: &str,
        delay: std::time::Duration,
    ) -> HandlerResult {
        let (handler, info, stop) = (run.handler, run.info, run.stop);
        let rec = &info.record;
        let mut backoff = std::time::Duration::from_millis(100);
        loop {
            match parking
                .park(&handler.name, rec, attempts, error, delay)
                .await
            {
                Ok(()) => {
                    RecordParked {
                        at: rec.at(),
                        event_id: info.event.id,
                        event_type: &info.event.event_type,
                        handler: &handler.name,
                        attempts,
                        behind: error == BEHIND,
                        error,
                    }
                    .emit(&self.metrics);
                    return HandlerResult::Final(None);
                }
                Err(e) => ParkFailed {
                    at: rec.at(),
                    what: "park the record",
                    error: &e,
                }
                .emit(),
            }
            tokio::select! {
                _ = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(std::time::Duration::from_secs(10)),
                _ = stop.cancelled() => return HandlerResult::Abandoned,
            }
        }
    }

    /// One durable attempt of a parked record, for the parked-record worker: the named handler
    /// alone, called once as attempt `attempt`.
    #[cfg(feature = "postgres")]
    pub(crate) async fn call_parked(
        &self,
        handler_name: &str,
        rec: Arc<Inbound>,
        attempt: u32,
    ) -> ParkedAttempt {
        let failure = |kind: DeadLetterKind, detail: &'static str, message: String| Failure {
            kind,
            detail,
            message,
            attempts: attempt,
            handler: Some(Arc::from(handler_name)),
            event_id: None,
        };
        let limits = &self.router.limits;
        let raw = match decode_envelope(rec.value.as_deref(), &rec.headers, limits) {
            Ok(raw) => raw,
            Err(e) => {
                return ParkedAttempt::Final(failure(
                    DeadLetterKind::Decode,
                    e.kind(),
                    e.to_string(),
                ))
            }
        };
        let Some(route) = self.router.route(&rec.topic, &raw.meta.event_type) else {
            let e = DecodeError::UnknownEventType {
                event_type: raw.meta.event_type.clone(),
            };
            return ParkedAttempt::Final(failure(DeadLetterKind::Decode, e.kind(), e.to_string()));
        };
        let Some(handler) = route.handlers.iter().find(|h| &*h.name == handler_name) else {
            return ParkedAttempt::Final(failure(
                DeadLetterKind::Acknowledged,
                "unknown_handler",
                format!(
                    "no handler named {handler_name} for {} on {}",
                    raw.meta.event_type, rec.topic
                ),
            ));
        };
        let event = match (route.decode)(&raw) {
            Ok(event) => event,
            Err(e) => {
                return ParkedAttempt::Final(failure(
                    DeadLetterKind::Decode,
                    e.kind(),
                    e.to_string(),
                ))
            }
        };
        let info = Arc::new(RecordInfo {
            record: rec.clone(),
            trace: TraceContext::from_headers(&rec.headers),
            event: raw.meta,
            child_spans: false,
        });
        let ctx = Ctx::new(info, attempt, handler.name.clone());
        let policy = handler.retry.as_ref().unwrap_or(&self.router.default_retry);
        match self.call_once(handler, event, ctx, None).await {
            Ok(Ok(())) => ParkedAttempt::Succeeded,
            Err(panic) => ParkedAttempt::Final(failure(DeadLetterKind::Panic, "panic", panic)),
            Ok(Err(error)) => match policy.decide(1, &error) {
                RetryDecision::Permanent => ParkedAttempt::Final(failure(
                    DeadLetterKind::Acknowledged,
                    DeadLetterKind::Acknowledged.as_str(),
                    error_chain(&error),
                )),
                _ => ParkedAttempt::Retryable(failure(
                    DeadLetterKind::RetriesExhausted,
                    DeadLetterKind::RetriesExhausted.as_str(),
                    error_chain(&error),
                )),
            },
        }
    }

    /// The durable stage of a handler's policy, if it has one.
    #[cfg(feature = "postgres")]
    pub(crate) fn durable(&self, topic: &str, handler: &str) -> Option<DurableRetry> {
        let policy = self
            .router
            .handler(topic, handler)
            .and_then(|h| h.retry.as_ref())
            .unwrap_or(&self.router.default_retry);
        policy.durable.clone()
    }

    /// A route's metric series: resolved once when the dispatcher took the router, else looked
    /// up now.
    fn series<'a>(
        &self,
        route: &'a TypeRoute,
        topic: &str,
        event_type: &str,
    ) -> std::borrow::Cow<'a, RouteSeries> {
        match &route.series {
            Some(series) => std::borrow::Cow::Borrowed(series),
            None => std::borrow::Cow::Owned(self.metrics.route_series(topic, event_type)),
        }
    }

    /// The first call the engine began, to its end: with the rest of its timeout, counted from
    /// when the engine called it.
    async fn finish_first(
        &self,
        handler: &Route,
        started: Instant,
        call: Started,
    ) -> Result<Result<(), HandlerError>, String> {
        let future = match call {
            Started::Returned(result) => return result,
            Started::Running(future) => future,
        };
        let guarded = AssertUnwindSafe(future).catch_unwind();
        let result = match handler.timeout {
            None => guarded.await,
            Some(limit) => match tokio::time::timeout_at(started + limit, guarded).await {
                Ok(result) => result,
                Err(_) => Ok(Err(timed_out(limit))),
            },
        };
        result.map_err(|p| panic_message(&*p))
    }

    /// One call, with its timeout; a panic (while building or polling the future) becomes `Err`.
    /// A `cpu_bound` call runs on a blocking thread, which nothing can interrupt: it keeps its
    /// core permit and this record's lane until it has really returned, even past its timeout
    /// (which then only cuts its waits), so a retry never overlaps it. If this future is dropped
    /// (the record was aborted), the call's waits are cut too, and the call stays counted in
    /// `blocking` until it has returned.
    async fn call_once(
        &self,
        handler: &Route,
        event: ErasedEvent,
        ctx: Ctx,
        blocking: Option<&Arc<BlockingCalls>>,
    ) -> Result<Result<(), HandlerError>, String> {
        let future = std::panic::catch_unwind(AssertUnwindSafe(|| (handler.call)(event, ctx)))
            .map_err(|p| panic_message(&*p))?;
        let guarded = AssertUnwindSafe(future).catch_unwind();
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
            let counted = blocking.map(|calls| calls.enter());
            let mut call = tokio::task::spawn_blocking(move || {
                let _counted = counted;
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

fn timed_out(limit: Duration) -> HandlerError {
    HandlerError::retryable(format!("handler timed out after {limit:?}")).with_kind("timeout")
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
