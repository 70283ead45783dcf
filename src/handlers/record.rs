//! A record as a transport hands it to the handlers, and what became of it. A leaf: the context,
//! the parking hook, the router's observers and the dispatcher all speak of records in these
//! terms, and the transports build and read them.

use crate::contracts::Headers;
use crate::telemetry::events::At;
use std::sync::Arc;

/// A record as any transport delivers it.
#[derive(Debug, Clone)]
pub(crate) struct Inbound {
    /// Shared: every record of a topic points at one copy of its name.
    pub(crate) topic: Arc<str>,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// Shared buffers: the memory bus hands out its log's bytes without copying them.
    pub(crate) key: Option<bytes::Bytes>,
    pub(crate) value: Option<bytes::Bytes>,
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
            headers: &self.headers,
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
    /// Every kind, for the `reason` label values exported at 0 from the start.
    pub(crate) const ALL: [DeadLetterKind; 4] = [
        Self::Decode,
        Self::Acknowledged,
        Self::RetriesExhausted,
        Self::Panic,
    ];

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
    /// The event's id, for the dead-letter log line; `None` if decoding did not get that far.
    pub(crate) event_id: Option<uuid::Uuid>,
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
