//! `EventFactory<T>`: raw record bytes and headers in, a typed event or a typed reason out.
//!
//! This is Weir's extractor, in axum's sense: decoding happens before any handler runs, so a
//! handler only ever receives a valid `T`, and every failure has a kind that ends up as a
//! dead-letter header and a metric label.

use super::decode::{DecodeError, DecodeLimits};
use super::envelope::{decode_envelope, RawEnvelope};
use super::{Envelope, Event, Headers};
use std::marker::PhantomData;

/// Decodes records into one event type `T`.
///
/// ```
/// # use serde::{Deserialize, Serialize};
/// # #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
/// # struct OrderPlaced { order_id: String, total_cents: u64 }
/// # impl weir::Event for OrderPlaced {
/// #     const TYPE: weir::EventType = weir::EventType::new("order.placed");
/// #     const TOPIC: &'static str = "orders";
/// #     fn key(&self) -> String { self.order_id.clone() }
/// # }
/// use weir::{EventFactory, Envelope, Headers};
/// let event = OrderPlaced { order_id: "o-1".into(), total_cents: 4_200 };
/// let bytes = Envelope::new(event.clone()).to_structured().unwrap();
/// let decoded = EventFactory::<OrderPlaced>::new()
///     .decode(Some(&bytes), &Headers::new())
///     .unwrap();
/// assert_eq!(decoded.data, event);
/// ```
pub struct EventFactory<T> {
    limits: DecodeLimits,
    _event: PhantomData<fn() -> T>,
}

impl<T> Clone for EventFactory<T> {
    fn clone(&self) -> Self {
        Self {
            limits: self.limits,
            _event: PhantomData,
        }
    }
}

impl<T> std::fmt::Debug for EventFactory<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventFactory")
            .field("event", &std::any::type_name::<T>())
            .field("limits", &self.limits)
            .finish()
    }
}

impl<T: Event> Default for EventFactory<T> {
    fn default() -> Self {
        Self::new()
    }
}

impl<T: Event> EventFactory<T> {
    /// A factory with default limits.
    pub fn new() -> Self {
        Self::with_limits(DecodeLimits::default())
    }

    /// A factory with explicit limits.
    pub fn with_limits(limits: DecodeLimits) -> Self {
        Self {
            limits,
            _event: PhantomData,
        }
    }

    /// Decodes a record (either CloudEvents mode) whose type must be `T::TYPE`.
    pub fn decode(
        &self,
        value: Option<&[u8]>,
        headers: &Headers,
    ) -> Result<Envelope<T>, DecodeError> {
        let raw = decode_envelope(value, headers, &self.limits)?;
        if T::TYPE != *raw.meta.event_type.as_str() {
            return Err(DecodeError::UnknownEventType {
                event_type: raw.meta.event_type,
            });
        }
        let data = self.decode_data(&raw)?;
        Ok(Envelope {
            meta: raw.meta,
            data,
        })
    }

    /// Decodes the payload of an already parsed envelope (the router has checked the type).
    pub(crate) fn decode_data(&self, raw: &RawEnvelope) -> Result<T, DecodeError> {
        // Plain serde first; the path-tracking retry only runs to name a failing field.
        if let Ok(data) = serde_json::from_str(raw.data.get()) {
            return Ok(data);
        }
        let de = &mut serde_json::Deserializer::from_str(raw.data.get());
        serde_path_to_error::deserialize(de).map_err(|e| DecodeError::from_json_at("data", e))
    }
}
