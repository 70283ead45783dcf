//! Dead-letter records: the original key and value bytes unchanged, the original headers kept,
//! and `weir.*` headers that say where the record came from and why it failed. Header names are
//! documented in the README; change them only with a migration note.

use super::{OutboundRecord, Publisher};
use crate::handlers::{Failure, Inbound};
use crate::telemetry::events::{DeadLetterFailed, DeadLettered};
use crate::telemetry::Metrics;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Header names, in one place (they are a contract: see `contracts::dead_letter`).
pub(crate) mod header {
    pub use crate::contracts::dead_letter::{
        ATTEMPTS, CONSUMER_GROUP, ERROR_KIND, ERROR_MESSAGE, ERROR_REASON, HANDLER,
        ORIGINAL_OFFSET, ORIGINAL_PARTITION, ORIGINAL_TIMESTAMP, ORIGINAL_TOPIC,
    };
    /// `weir.replay.count`: how many times `weir dlq replay` has republished this record.
    pub const REPLAY_COUNT: &str = "weir.replay.count";
    /// `weir.replay.id`: the replay that republished this record.
    pub const REPLAY_ID: &str = "weir.replay.id";
    /// `weir.replay.source`: the dead letter it was republished from, `topic:partition:offset`.
    /// A resumed replay finds what it already published by this header, so it never publishes
    /// a record twice within one replay id.
    pub const REPLAY_SOURCE: &str = "weir.replay.source";

    /// The headers that describe a failure. A replay removes them: the republished record is the
    /// original one again, and a new failure writes fresh ones.
    pub const FAILURE: [&str; 10] = [
        ORIGINAL_TOPIC,
        ORIGINAL_PARTITION,
        ORIGINAL_OFFSET,
        ORIGINAL_TIMESTAMP,
        CONSUMER_GROUP,
        ERROR_KIND,
        ERROR_REASON,
        ERROR_MESSAGE,
        ATTEMPTS,
        HANDLER,
    ];
}

pub(crate) fn record(
    rec: &Inbound,
    failure: &Failure,
    group: &str,
    topic: String,
) -> OutboundRecord {
    let mut headers = rec.headers.clone();
    headers.set(header::ORIGINAL_TOPIC, rec.topic.as_bytes());
    headers.set(header::ORIGINAL_PARTITION, rec.partition.to_string());
    headers.set(header::ORIGINAL_OFFSET, rec.offset.to_string());
    if let Some(ts) = rec.timestamp_ms {
        headers.set(header::ORIGINAL_TIMESTAMP, ts.to_string());
    }
    headers.set(header::CONSUMER_GROUP, group);
    headers.set(header::ERROR_KIND, failure.kind.as_str());
    headers.set(header::ERROR_REASON, failure.detail);
    headers.set(header::ERROR_MESSAGE, failure.message.as_str());
    headers.set(header::ATTEMPTS, failure.attempts.to_string());
    match &failure.handler {
        Some(name) => headers.set(header::HANDLER, name.as_bytes()),
        None => headers.set(header::HANDLER, ""),
    }
    OutboundRecord {
        topic,
        key: rec.key.as_deref().map(<[u8]>::to_vec),
        value: rec.value.as_deref().map(<[u8]>::to_vec),
        headers,
    }
}

/// Publishes a dead letter until the broker acknowledges it. Returns `false` only if `stop`
/// fired first: then the source record is not final and must not be committed.
pub(crate) async fn publish(
    publisher: &dyn Publisher,
    metrics: &Metrics,
    record: OutboundRecord,
    failure: &Failure,
    source: &Inbound,
    stop: &CancellationToken,
) -> bool {
    let reason = failure.kind.as_str();
    let group = record
        .headers
        .get_str(header::CONSUMER_GROUP)
        .unwrap_or_default();
    let mut backoff = Duration::from_millis(100);
    loop {
        match publisher.publish_record(record.clone()).await {
            Ok(_) => {
                DeadLettered {
                    at: source.at(),
                    group,
                    event_id: failure.event_id,
                    dead_letter_topic: &record.topic,
                    reason,
                }
                .emit(metrics);
                return true;
            }
            Err(error) => {
                DeadLetterFailed {
                    at: source.at(),
                    group,
                    event_id: failure.event_id,
                    dead_letter_topic: &record.topic,
                    error: &error,
                }
                .emit();
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => backoff = (backoff * 2).min(Duration::from_secs(10)),
                    _ = stop.cancelled() => return false,
                }
            }
        }
    }
}
