//! `OutboxWriter`: stores an event in `weir_outbox` inside the caller's transaction.
//!
//! Writing the event and the state change it announces in one transaction is the point: either
//! both commit or neither does, so no event announces a change that was rolled back, and no
//! change goes unannounced because the broker was down at the wrong moment. The relay publishes
//! the row after the commit; until then it is invisible to it.

use super::row::headers_to_json;
use super::OutboxError;
use crate::bus::{encode, OutboundRecord};
use crate::contracts::{Envelope, Event};
use sqlx::PgConnection;
use uuid::Uuid;

const INSERT: &str = "INSERT INTO weir_outbox (id, topic, key, event_type, payload, headers)
                      VALUES ($1, $2, $3, $4, $5, $6)";

/// Writes events to the outbox table, inside a transaction the caller owns.
///
/// ```no_run
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// # struct OrderPlaced { order_id: String, total_cents: u64 }
/// # impl weir::Event for OrderPlaced {
/// #     const TYPE: weir::EventType = weir::EventType::new("order.placed");
/// #     const TOPIC: &'static str = "orders";
/// #     fn key(&self) -> String { self.order_id.clone() }
/// # }
/// # async fn example(pool: sqlx::PgPool, order: OrderPlaced) -> Result<(), weir::OutboxError> {
/// let mut tx = pool.begin().await?;
/// // ... the service's own writes on `&mut *tx` ...
/// weir::OutboxWriter::write(&mut tx, &weir::Envelope::new(order)).await?;
/// tx.commit().await?; // only now can the relay see (and publish) the event
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, Copy, Default)]
pub struct OutboxWriter;

impl OutboxWriter {
    /// Stores the record Weir would publish for this event (structured CloudEvent, keyed by the
    /// entity id, to `T::TOPIC`, with `content-type` and the current trace context).
    ///
    /// Takes the connection of an open transaction: pass `&mut tx` for a
    /// `sqlx::Transaction<'_, Postgres>`. On a plain connection outside a transaction the row
    /// commits at once, which loses the atomicity that is the reason for an outbox.
    pub async fn write<T: Event>(
        conn: &mut PgConnection,
        envelope: &Envelope<T>,
    ) -> Result<(), OutboxError> {
        let record = encode(envelope).map_err(|e| OutboxError::Encode(e.to_string()))?;
        Self::write_record(conn, envelope.meta.id, &envelope.meta.event_type, record).await
    }

    /// Stores an already encoded record, for events that are not a Rust [`Event`] type (a
    /// binary-mode CloudEvent, a forwarded record). `id` must be the CloudEvent id; the record
    /// must have a UTF-8 key, since rows of one key are published in order.
    pub async fn write_record(
        conn: &mut PgConnection,
        id: Uuid,
        event_type: &str,
        mut record: OutboundRecord,
    ) -> Result<(), OutboxError> {
        let key = record
            .key
            .as_deref()
            .ok_or(OutboxError::InvalidRecord("the record has no key"))
            .and_then(|k| {
                std::str::from_utf8(k)
                    .map_err(|_| OutboxError::InvalidRecord("the record key is not UTF-8"))
            })?;
        let payload = record
            .value
            .as_deref()
            .ok_or(OutboxError::InvalidRecord("the record has no value"))?;
        // The writer's trace context travels with the row, so the consumer's span continues the
        // trace that wrote the event, not the relay's. (Publishing keeps a traceparent it finds.)
        crate::telemetry::trace::inject_current(&mut record.headers);
        let headers = headers_to_json(&record.headers).map_err(OutboxError::Encode)?;
        sqlx::query(INSERT)
            .bind(id)
            .bind(&record.topic)
            .bind(key)
            .bind(event_type)
            .bind(payload)
            .bind(headers)
            .execute(conn)
            .await?;
        Ok(())
    }
}
