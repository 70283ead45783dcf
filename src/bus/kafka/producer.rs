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

pub(crate) fn publish<'a>(
    producer: &'a FutureProducer<super::LogContext>,
    metrics: &'a Metrics,
    timeout: Duration,
    record: OutboundRecord,
) -> PublishFuture<'a> {
    crate::bus::publish::traced(record, move |record| async move {
        let started = tokio::time::Instant::now();
        let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
        for (key, value) in record.headers.iter() {
            headers = headers.insert(Header {
                key,
                value: Some(value),
            });
        }
        let mut future_record: FutureRecord<'_, [u8], [u8]> =
            FutureRecord::to(&record.topic).headers(headers);
        if let Some(key) = &record.key {
            future_record = future_record.key(key.as_slice());
        }
        if let Some(value) = &record.value {
            future_record = future_record.payload(value.as_slice());
        }
        let result = match producer.send(future_record, Timeout::After(timeout)).await {
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
