//! The one event every arm decodes: a structured CloudEvent of about 545 bytes, published with
//! Weir's own envelope, and the typed view the hand loop and RustStream decode it into.

use serde::{Deserialize, Serialize};
use weir::{Envelope, Event, EventType};

/// Distinct record keys (and so Weir key lanes) in the topic.
pub(crate) const KEYS: usize = 1_000;

/// The event's data, the shape of the reference service's `customer.created`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct CustomerCreated {
    pub(crate) customer_id: String,
    pub(crate) details: serde_json::Value,
}

impl Event for CustomerCreated {
    const TYPE: EventType = EventType::new("customer.created");
    const TOPIC: &'static str = "customers";

    fn key(&self) -> String {
        self.customer_id.clone()
    }
}

/// The whole CloudEvent, typed: what A1 and RustStream decode each record into. Weir decodes
/// the same attributes into its `Envelope` (the id as a UUID, the time with chrono) and hands
/// the handler `data`; this struct parses them the same way, so no arm skips work another does.
#[derive(Debug, Deserialize)]
#[allow(dead_code)] // Decoded to be paid for, never read.
pub(crate) struct CloudEventIn {
    pub(crate) specversion: String,
    pub(crate) id: uuid::Uuid,
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    pub(crate) source: String,
    pub(crate) time: Option<chrono::DateTime<chrono::Utc>>,
    pub(crate) subject: Option<String>,
    pub(crate) datacontenttype: Option<String>,
    pub(crate) dataschema: Option<String>,
    pub(crate) data: CustomerCreated,
}

/// Record `i`: key and structured value (about 545 bytes).
pub(crate) fn record(i: usize) -> (String, Vec<u8>) {
    record_with(i, &[])
}

/// Record `i` with extra string fields in its `details` (the latency bench's produce time).
pub(crate) fn record_with(i: usize, extra: &[(&str, String)]) -> (String, Vec<u8>) {
    let mut details = serde_json::json!({
        "name": format!("Customer {i}"),
        "email": format!("customer-{i}@example.com"),
        "plan": "enterprise",
        "notes": "x".repeat(207),
    });
    for (k, v) in extra {
        details[*k] = serde_json::Value::String(v.clone());
    }
    let event = CustomerCreated {
        customer_id: format!("key-{}", i % KEYS),
        details,
    };
    let envelope = Envelope::new(event).source("/bench");
    let value = envelope.to_structured().expect("the event serializes");
    (envelope.key(), value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_decode_into_the_typed_view() {
        let (key, value) = record(1_234);
        let event: CloudEventIn = serde_json::from_slice(&value).unwrap();
        assert_eq!(event.data.customer_id, key);
        assert_eq!(event.event_type, "customer.created");
        assert!((500..600).contains(&value.len()), "{} bytes", value.len());
    }
}
