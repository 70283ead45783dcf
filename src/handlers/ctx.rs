use super::record::Inbound;
use crate::contracts::{EventMeta, Headers};
use chrono::{DateTime, Utc};
use std::sync::Arc;
use uuid::Uuid;

/// The W3C trace context a record carried (`traceparent`, `tracestate` headers).
///
/// Kept as text here so handlers do not depend on a tracing SDK; the telemetry layer turns it
/// into a parent span.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    /// The `traceparent` header, `00-<trace id>-<span id>-<flags>`.
    pub traceparent: String,
    /// The `tracestate` header, if any.
    pub tracestate: Option<String>,
}

impl TraceContext {
    /// Reads the context from record headers, if a well-formed `traceparent` is present.
    pub fn from_headers(headers: &Headers) -> Option<Self> {
        let traceparent = headers.get_str("traceparent")?;
        let parts: Vec<&str> = traceparent.split('-').collect();
        let well_formed = parts.len() == 4
            && parts[1].len() == 32
            && parts[2].len() == 16
            && parts
                .iter()
                .all(|p| p.bytes().all(|b| b.is_ascii_hexdigit()));
        well_formed.then(|| Self {
            traceparent: traceparent.to_owned(),
            tracestate: headers.get_str("tracestate").map(str::to_owned),
        })
    }

    /// The 32-hex-digit trace id.
    pub fn trace_id(&self) -> &str {
        self.traceparent.split('-').nth(1).unwrap_or_default()
    }
}

/// Where a record came from; shared by every attempt and every handler of one record.
#[derive(Debug)]
pub(crate) struct RecordInfo {
    /// The record itself, shared with the engine rather than copied field by field.
    pub(crate) record: Arc<Inbound>,
    pub(crate) event: EventMeta,
    pub(crate) trace: Option<TraceContext>,
    /// Whether its handler calls get a `handle` span (see `telemetry::trace::wants_children`).
    pub(crate) child_spans: bool,
}

/// What a handler knows about the record it is handling, besides the event itself.
#[derive(Debug, Clone)]
pub struct Ctx {
    record: Arc<RecordInfo>,
    attempt: u32,
    handler: Arc<str>,
}

impl Ctx {
    pub(crate) fn new(record: Arc<RecordInfo>, attempt: u32, handler: Arc<str>) -> Self {
        Self {
            record,
            attempt,
            handler,
        }
    }

    /// A context for calling a handler directly, e.g. in its unit tests.
    pub fn detached(topic: impl Into<String>, event: EventMeta) -> Self {
        let topic: String = topic.into();
        let info = RecordInfo {
            record: Arc::new(Inbound {
                topic: Arc::from(topic),
                partition: 0,
                offset: 0,
                key: None,
                value: None,
                headers: Headers::new(),
                timestamp_ms: None,
            }),
            event,
            trace: None,
            child_spans: false,
        };
        Self::new(Arc::new(info), 1, Arc::from("detached"))
    }

    /// The same context with a producer's trace context (unit tests of trace propagation).
    #[cfg(all(test, feature = "temporal"))]
    pub(crate) fn with_trace(self, trace: TraceContext) -> Self {
        let info = RecordInfo {
            record: self.record.record.clone(),
            event: self.record.event.clone(),
            trace: Some(trace),
            child_spans: self.record.child_spans,
        };
        Self::new(Arc::new(info), self.attempt, self.handler)
    }

    /// The topic the record was read from.
    pub fn topic(&self) -> &str {
        &self.record.record.topic
    }

    /// The topic, shared rather than copied.
    pub(crate) fn topic_shared(&self) -> Arc<str> {
        self.record.record.topic.clone()
    }

    /// Its partition.
    pub fn partition(&self) -> i32 {
        self.record.record.partition
    }

    /// Its offset within the partition.
    pub fn offset(&self) -> i64 {
        self.record.record.offset
    }

    /// The record key (the entity id), if it had one.
    pub fn key(&self) -> Option<&[u8]> {
        self.record.record.key.as_deref()
    }

    /// The record key as text, if it had one and it is UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key().and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The record headers as received.
    pub fn headers(&self) -> &Headers {
        &self.record.record.headers
    }

    /// Which attempt this is, from 1. A handler can use it to log or to change course.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// The name the handler was registered under.
    pub fn handler_name(&self) -> &str {
        &self.handler
    }

    /// The event's CloudEvents attributes.
    pub fn event(&self) -> &EventMeta {
        &self.record.event
    }

    /// The event's unique id: the key for idempotency.
    pub fn event_id(&self) -> Uuid {
        self.record.event.id
    }

    /// When the event happened, if its producer said.
    pub fn event_time(&self) -> Option<DateTime<Utc>> {
        self.record.event.time
    }

    /// The producer's trace context, if the record carried one.
    pub fn trace(&self) -> Option<&TraceContext> {
        self.record.trace.as_ref()
    }
}
