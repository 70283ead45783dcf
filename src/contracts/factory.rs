//! `EventFactory<T>`: raw record bytes and headers in, a typed event or a typed reason out.
//!
//! This is Weir's extractor, in axum's sense: decoding happens before any handler runs, so a
//! handler only ever receives a valid `T`, and every failure has a kind that ends up as a
//! dead-letter header and a metric label.

use super::envelope::{decode_envelope, RawEnvelope};
use super::{Envelope, Event, Headers};
use std::marker::PhantomData;

/// Why a record could not be decoded. Every variant is permanent: retrying cannot fix the bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The record has no value, or an empty one.
    #[error("empty record value")]
    Empty,
    /// The value is over the configured size limit.
    #[error("record value is {size} bytes, over the {limit}-byte limit")]
    TooLarge {
        /// Size of the value.
        size: usize,
        /// The configured limit.
        limit: usize,
    },
    /// The value is not UTF-8, so it cannot be JSON.
    #[error("record value is not valid UTF-8 (valid up to byte {valid_up_to})")]
    InvalidUtf8 {
        /// Length of the valid prefix.
        valid_up_to: usize,
    },
    /// The value is not well-formed JSON.
    #[error("record value is not JSON: {detail}")]
    NotJson {
        /// The parser's message, with line and column.
        detail: String,
    },
    /// A required field or attribute is absent.
    #[error("missing field `{field}`")]
    MissingField {
        /// Path of the field, e.g. `data.task_id` or `ce_type`.
        field: String,
    },
    /// A field is present but has the wrong type or an invalid value.
    #[error("invalid field `{field}`: {detail}")]
    InvalidField {
        /// Path of the field.
        field: String,
        /// What is wrong with it.
        detail: String,
    },
    /// The event type is not one this consumer knows on this topic.
    #[error("unknown event type {event_type:?}")]
    UnknownEventType {
        /// The type the record declared.
        event_type: String,
    },
}

impl DecodeError {
    /// A stable snake_case name for the kind, used as a dead-letter header and a log field.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Empty => "empty",
            Self::TooLarge { .. } => "too_large",
            Self::InvalidUtf8 { .. } => "invalid_utf8",
            Self::NotJson { .. } => "not_json",
            Self::MissingField { .. } => "missing_field",
            Self::InvalidField { .. } => "invalid_field",
            Self::UnknownEventType { .. } => "unknown_event_type",
        }
    }

    /// Classifies a serde_json error, keeping the path of the offending field.
    pub(crate) fn from_json(err: serde_path_to_error::Error<serde_json::Error>) -> Self {
        Self::from_json_at("", err)
    }

    fn from_json_at(prefix: &str, err: serde_path_to_error::Error<serde_json::Error>) -> Self {
        use serde_json::error::Category;
        let path = err.path().to_string();
        let inner = err.into_inner();
        let join = |leaf: &str| {
            let mut parts: Vec<&str> = Vec::new();
            for p in [prefix, path.as_str(), leaf] {
                if !p.is_empty() && p != "." {
                    parts.push(p);
                }
            }
            parts.join(".")
        };
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => Self::NotJson {
                detail: inner.to_string(),
            },
            Category::Data => {
                let msg = inner.to_string();
                match msg
                    .strip_prefix("missing field `")
                    .and_then(|rest| rest.split('`').next())
                {
                    Some(field) => Self::MissingField { field: join(field) },
                    None => Self::InvalidField {
                        field: join(""),
                        detail: msg,
                    },
                }
            }
        }
    }
}

/// Limits applied before parsing, so one huge record cannot exhaust memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeLimits {
    /// Largest record value accepted, in bytes. Default 1 MiB, Kafka's default message size.
    pub max_bytes: usize,
}

impl Default for DecodeLimits {
    fn default() -> Self {
        Self {
            max_bytes: 1024 * 1024,
        }
    }
}

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
