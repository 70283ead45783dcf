//! Trace context across Kafka: W3C `traceparent`/`tracestate` headers in, a consumer span that
//! continues the producer's trace out; and the reverse when publishing.
//!
//! Only the OpenTelemetry *API* is used here. With no tracer installed (no OTLP endpoint), spans
//! are plain `tracing` spans and injection is skipped.
//!
//! The per-record spans (`process`, `decode`, `handle`) are at `debug` level under the target
//! [`RECORD_SPANS`]: a subscriber that logs at `info` (the service's default) never builds them,
//! because formatting a dozen span fields per record, for log lines that are almost never
//! written, cost more than the rest of the framework's work on a record (`weir bench`). A
//! tracer is given them by a filter of its own (the binary enables this target for its OTLP
//! layer), so traces still show producer → process → handle. Log lines about a record carry
//! its topic, partition, offset, event id and trace id as fields of their own (see
//! [`log_trace_id`]), so they need no span; `RUST_LOG=info,weir::record=debug` puts the spans
//! back into the logs as well.

use crate::contracts::Headers;
use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use std::str::FromStr;
use tracing::Span;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The target of the per-record spans, for filters: `weir::record=debug` enables them.
pub(crate) const RECORD_SPANS: &str = "weir::record";

const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The producer's span context, if the headers carry a valid `traceparent`.
pub(crate) fn remote_context(headers: &Headers) -> Option<SpanContext> {
    let parent = headers.get_str(TRACEPARENT)?;
    let mut parts = parent.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || trace.len() != 32 || span.len() != 16 || flags.len() != 2 {
        return None;
    }
    let state = headers
        .get_str(TRACESTATE)
        .and_then(|s| TraceState::from_str(s).ok())
        .unwrap_or_default();
    let context = SpanContext::new(
        TraceId::from_hex(trace).ok()?,
        SpanId::from_hex(span).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        state,
    );
    context.is_valid().then_some(context)
}

/// Adds the current span's context to `headers`, unless they already carry one (a dead letter
/// keeps the original record's trace).
pub(crate) fn inject_current(headers: &mut Headers) {
    if headers.get(TRACEPARENT).is_some() {
        return;
    }
    let context = Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    if !sc.is_valid() {
        return;
    }
    headers.insert(
        TRACEPARENT,
        format!(
            "00-{:032x}-{:016x}-{:02x}",
            sc.trace_id(),
            sc.span_id(),
            sc.trace_flags().to_u8()
        ),
    );
    let state = sc.trace_state().header();
    if !state.is_empty() {
        headers.insert(TRACESTATE, state);
    }
}

/// The span of one record's processing (OpenTelemetry messaging conventions, `process`
/// operation), a child of the producer's span when the record carried one. Disabled (and then
/// nearly free: no field is evaluated) unless a subscriber enables [`RECORD_SPANS`] at `debug`.
pub(crate) fn process_span(
    topic: &str,
    partition: i32,
    offset: i64,
    group: &str,
    headers: &Headers,
) -> Span {
    let span = tracing::debug_span!(
        target: RECORD_SPANS,
        "process",
        "otel.name" = %format_args!("{topic} process"),
        "otel.kind" = "consumer",
        "messaging.system" = "kafka",
        "messaging.operation.type" = "process",
        "messaging.destination.name" = topic,
        "messaging.destination.partition.id" = partition,
        "messaging.kafka.offset" = offset,
        "messaging.consumer.group.name" = group,
        "messaging.message.id" = tracing::field::Empty,
        "cloudevents.event_type" = tracing::field::Empty,
        trace_id = tracing::field::Empty,
    );
    if span.is_disabled() {
        return span;
    }
    let remote = remote_context(headers);
    if let Some(parent) = &remote {
        // Fails only when no OpenTelemetry layer is installed; then there is nothing to link.
        let _ =
            span.set_parent(opentelemetry::Context::new().with_remote_span_context(parent.clone()));
    }
    let own = span.context().span().span_context().clone();
    let trace_id = if own.is_valid() {
        Some(own.trace_id())
    } else {
        remote.map(|r| r.trace_id())
    };
    if let Some(id) = trace_id {
        span.record(
            "trace_id",
            tracing::field::display(format_args!("{id:032x}")),
        );
    }
    span
}

/// Whether a record's child spans (`decode`, `handle`) are worth building: its `process` span
/// is enabled, and a tracer that samples did not drop its trace (a trace the sampler dropped,
/// say one whose producer sent it unsampled, is exported by nobody).
pub(crate) fn wants_children(process: &Span) -> bool {
    if process.is_disabled() {
        return false;
    }
    let context = process.context();
    let span = context.span();
    let sc = span.span_context();
    // Not valid: no tracer, only a log subscriber that asked for the spans; it gets them all.
    !sc.is_valid() || sc.is_sampled()
}

/// Records the decoded event's identity on the process span.
pub(crate) fn record_event(span: &Span, event_id: &uuid::Uuid, event_type: &str) {
    if span.is_disabled() {
        return;
    }
    span.record("messaging.message.id", tracing::field::display(event_id));
    span.record("cloudevents.event_type", event_type);
}

/// The span of decoding one record (envelope, route, payload).
pub(crate) fn decode_span() -> Span {
    tracing::debug_span!(target: RECORD_SPANS, "decode", "otel.name" = "decode")
}

/// The span of one handler call.
pub(crate) fn handle_span(handler: &str, attempt: u32) -> Span {
    tracing::debug_span!(target: RECORD_SPANS, "handle", "otel.name" = %format_args!("handle {handler}"), handler, attempt)
}

/// A record's trace id for its log lines: the producer's (`traceparent`), or else the one the
/// record's span started, when a tracer runs. Read only when a line is written.
pub(crate) fn log_trace_id(headers: &Headers) -> Option<LogTraceId<'_>> {
    let from_header = headers.get_str(TRACEPARENT).and_then(|parent| {
        let mut parts = parent.split('-');
        let (_, trace) = (parts.next()?, parts.next()?);
        (trace.len() == 32 && trace.bytes().all(|b| b.is_ascii_hexdigit())).then_some(trace)
    });
    if let Some(trace) = from_header {
        return Some(LogTraceId::Header(trace));
    }
    let context = Span::current().context();
    let span = context.span();
    let sc = span.span_context();
    sc.is_valid().then(|| LogTraceId::Span(sc.trace_id()))
}

/// A trace id as 32 hex digits, borrowed from the header when it came from one.
pub(crate) enum LogTraceId<'a> {
    Header(&'a str),
    Span(TraceId),
}

impl std::fmt::Display for LogTraceId<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Header(id) => f.write_str(id),
            Self::Span(id) => write!(f, "{id:032x}"),
        }
    }
}

/// The span of one publish (OpenTelemetry `send` operation); its context goes into the headers.
pub(crate) fn publish_span(topic: &str) -> Span {
    tracing::info_span!(
        "publish",
        "otel.name" = %format_args!("{topic} send"),
        "otel.kind" = "producer",
        "messaging.system" = "kafka",
        "messaging.operation.type" = "send",
        "messaging.destination.name" = topic,
    )
}

/// The span of an offset commit.
pub(crate) fn commit_span(sync: bool) -> Span {
    tracing::info_span!(
        "commit",
        "otel.name" = "commit offsets",
        "messaging.system" = "kafka",
        sync
    )
}
