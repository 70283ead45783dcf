//! Publishing to Kafka: resolves only once the broker has acknowledged the record (idempotent
//! producer, `acks=all`), within the configured delivery timeout.

use crate::bus::publish::PublishFuture;
use crate::bus::{Delivery, OutboundRecord, PublishError};
use crate::telemetry::events::Published;
use crate::telemetry::Metrics;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::util::Timeout;
use std::time::Duration;

impl OutboundRecord {
    /// The record as rdkafka's producer takes it: key, value and headers byte for byte. For a
    /// program that sends with a producer of its own (`weir dlq replay` does, so that a replayed
    /// record gets no header the dead letter did not have); [`KafkaBus`](crate::KafkaBus) uses
    /// it too.
    pub fn to_future_record(&self) -> FutureRecord<'_, [u8], [u8]> {
        let mut headers = OwnedHeaders::new_with_capacity(self.headers.len());
        for (key, value) in self.headers.iter() {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut record = FutureRecord::to(&self.topic).headers(headers);
        if let Some(key) = &self.key {
            record = record.key(key.as_slice());
        }
        if let Some(value) = &self.value {
            record = record.payload(value.as_slice());
        }
        record
    }
}

pub(crate) fn publish<'a>(
    producer: &'a FutureProducer<super::LogContext>,
    metrics: &'a Metrics,
    timeout: Duration,
    record: OutboundRecord,
) -> PublishFuture<'a> {
    crate::bus::publish::traced(record, move |record| async move {
        let started = tokio::time::Instant::now();
        let result = match producer
            .send(record.to_future_record(), Timeout::After(timeout))
            .await
        {
            Ok(delivery) => Ok(Delivery {
                topic: record.topic.clone(),
                partition: delivery.partition,
                offset: delivery.offset,
            }),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::MessageTimedOut), _)) => {
                Err(PublishError::Timeout {
                    topic: record.topic.clone(),
                    timeout,
                    message: "message timed out".to_owned(),
                })
            }
            Err((error, _)) => Err(PublishError::Broker {
                topic: record.topic.clone(),
                message: error.to_string(),
            }),
        };
        Published {
            topic: &record.topic,
            duration: started.elapsed(),
            result: result
                .as_ref()
                .map(|_| ())
                .map_err(|e| e as &dyn std::fmt::Display),
        }
        .emit(metrics);
        result
    })
}
