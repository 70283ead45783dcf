//! A test contract (an order placed), so tests depend on no service's events, and a Kafka bus
//! whose producer sends every record alone.

use serde::{Deserialize, Serialize};
use weir::{Envelope, Event, EventType, Headers, KafkaBus, KafkaConfig, OutboundRecord};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OrderPlaced {
    pub order_id: String,
}

impl Event for OrderPlaced {
    const TYPE: EventType = EventType::new("test.order_placed");
    const TOPIC: &'static str = "orders";

    fn key(&self) -> String {
        self.order_id.clone()
    }
}

/// An order as a structured CloudEvent for `topic`, keyed by its id, and the event's id.
pub fn order_record(topic: &str, order_id: &str) -> (OutboundRecord, uuid::Uuid) {
    let envelope = Envelope::new(OrderPlaced {
        order_id: order_id.to_owned(),
    });
    let record = OutboundRecord {
        topic: topic.to_owned(),
        key: Some(order_id.as_bytes().to_vec()),
        value: Some(envelope.to_structured().expect("encode")),
        headers: Headers::new().with("content-type", weir::CLOUDEVENTS_CONTENT_TYPE),
    };
    (record, envelope.meta.id)
}

/// A bus that publishes one record per produce request: Tansu skips the rest of a batch when a
/// fetch starts inside it, and its high watermark is the last batch's base offset + 1.
pub fn one_record_per_batch(brokers: &str) -> KafkaBus {
    let mut config = KafkaConfig::new(brokers);
    config.producer.insert("linger.ms".into(), "0".into());
    config
        .producer
        .insert("batch.num.messages".into(), "1".into());
    KafkaBus::new(config).expect("bus")
}
