//! Flow control against a real broker: handlers stuck for longer than `max.poll.interval.ms`
//! must not cost the consumer its group membership. The engine stops taking records at its
//! in-flight limit; the stuck partition's own hand-off fills and the poll thread stops polling
//! that partition's queue (librdkafka's bounded prefetch then stops fetching it; nothing is
//! paused at the client), while it keeps polling the main queue, so the member stays in the
//! group.

mod reference;
mod support;

use crate::reference::CustomerCreated;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::broker::Tansu;
use support::process::wait_until;
use tokio::sync::Notify;
use weir::{
    Bus, ConsumerConfig, Ctx, Envelope, HandlerOptions, KafkaBus, KafkaConfig, Metrics,
    OutboundRecord, Publisher, Router,
};

fn counter(metrics: &Metrics, series: &str) -> f64 {
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stall_longer_than_max_poll_interval_keeps_the_partitions() {
    let broker = Tansu::start_memory();
    broker.create_topic("stalled", 1);
    let kafka = KafkaConfig::new(broker.brokers())
        .set("session.timeout.ms", "6000")
        .set("max.poll.interval.ms", "12000");
    let bus = KafkaBus::new(kafka).expect("bus");
    // One record per batch: Tansu 0.6 skips the rest of a batch when a fetch (here, the one
    // after resume) starts inside it.
    let n = 1_000;
    for i in 0..n {
        let e = Envelope::new(CustomerCreated::new(
            format!("c-{i}"),
            serde_json::json!({ "seq": i }),
        ));
        let record = OutboundRecord {
            topic: "stalled".to_owned(),
            key: Some(e.key().into_bytes()),
            value: Some(e.to_structured().unwrap()),
            headers: weir::Headers::new(),
        };
        bus.publish_record(record).await.expect("publish");
    }
    let gate = Arc::new(Notify::new());
    let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handled: Arc<Mutex<HashMap<u64, usize>>> = Arc::default();
    let router = {
        let (gate, open, handled) = (gate.clone(), open.clone(), handled.clone());
        Router::new().on_with(
            move |e: CustomerCreated, _ctx: Ctx| {
                let (gate, open, handled) = (gate.clone(), open.clone(), handled.clone());
                async move {
                    let notified = gate.notified();
                    if !open.load(std::sync::atomic::Ordering::SeqCst) {
                        notified.await;
                    }
                    let seq = e.details["seq"].as_u64().unwrap();
                    *handled.lock().unwrap().entry(seq).or_default() += 1;
                    Ok(())
                }
            },
            HandlerOptions::new().topic("stalled"),
        )
    };
    let config = ConsumerConfig::new("stalled-group").max_in_flight(4, 4);
    let subscription = bus.subscribe(router, config).expect("subscribe");
    let metrics = bus.metrics().clone();
    wait_until(
        "the handlers to be stuck at the in-flight limit",
        Duration::from_secs(30),
        || {
            let in_flight = counter(&metrics, "weir_in_flight_messages ");
            (in_flight >= 4.0)
                .then_some(())
                .ok_or(format!("in flight {in_flight}"))
        },
    )
    .await;
    // The scenario itself: stuck for twice max.poll.interval.ms.
    tokio::time::sleep(Duration::from_secs(24)).await;
    assert!(
        subscription.health().status().ready,
        "still ready (a group member with a reachable broker) during the stall: {:?}",
        subscription.health().status()
    );
    open.store(true, std::sync::atomic::Ordering::SeqCst);
    gate.notify_waiters();
    wait_until(
        "every record to be handled",
        Duration::from_secs(60),
        || {
            let count = handled.lock().unwrap().len();
            (count == n).then_some(()).ok_or(format!("{count} of {n}"))
        },
    )
    .await;
    subscription.stop().await.expect("stop");
    let revokes = counter(&metrics, "weir_rebalances_total{kind=\"revoke\"} ");
    assert_eq!(
        revokes, 0.0,
        "the group took the partition away during the stall"
    );
    let repeated: Vec<_> = handled
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, c)| **c > 1)
        .map(|(s, _)| *s)
        .collect();
    assert!(repeated.is_empty(), "handled twice: {repeated:?}");
}

/// librdkafka hands over a fetched batch of one partition at a time; with one global window
/// that batch held every other partition's records behind it. Each partition now has its own
/// queue and hand-off, and its own share of the in-flight window.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_slow_partition_the_fast_ones_records_finish_without_waiting_for_the_slow_ones() {
    let broker = Tansu::start_memory();
    broker.create_topic("lopsided", 2);
    let bus = KafkaBus::new(KafkaConfig::new(broker.brokers())).expect("bus");
    let publish = |key: String, seq: u64| {
        let e = Envelope::new(CustomerCreated::new(key, serde_json::json!({ "seq": seq })));
        OutboundRecord {
            topic: "lopsided".to_owned(),
            key: Some(e.key().into_bytes()),
            value: Some(e.to_structured().unwrap()),
            headers: weir::Headers::new(),
        }
    };
    // One key per partition: the slow one's backlog first, as it would sit in the topic.
    let slow_key = "slow".to_owned();
    let slow_partition = bus
        .publish_record(publish(slow_key.clone(), 0))
        .await
        .expect("publish")
        .partition;
    let fast_key = (0..)
        .map(|i| format!("fast-{i}"))
        .find(|k| {
            // The producer's partitioner is murmur2, as the memory bus's.
            let memory = weir::MemoryBus::new(weir::MemoryConfig {
                default_partitions: 2,
                ..weir::MemoryConfig::default()
            });
            let record = publish(k.clone(), 0);
            let delivery = futures_util::FutureExt::now_or_never(memory.publish_record(record));
            delivery.and_then(Result::ok).map(|d| d.partition) != Some(slow_partition)
        })
        .expect("a key on the other partition");
    let slow_n = 2_000;
    for seq in 1..slow_n {
        bus.publish_record(publish(slow_key.clone(), seq))
            .await
            .expect("publish");
    }
    let fast_n = 100;
    for seq in 0..fast_n {
        bus.publish_record(publish(fast_key.clone(), seq))
            .await
            .expect("publish");
    }
    let slow_done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let fast_done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let router = {
        let (slow_done, fast_done) = (slow_done.clone(), fast_done.clone());
        Router::new().on_with(
            move |e: CustomerCreated, _ctx: Ctx| {
                let (slow_done, fast_done) = (slow_done.clone(), fast_done.clone());
                async move {
                    if e.customer_id == "slow" {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        slow_done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    } else {
                        fast_done.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    }
                    Ok(())
                }
            },
            HandlerOptions::new().topic("lopsided"),
        )
    };
    let config = ConsumerConfig::new("lopsided-group")
        .order(weir::ProcessingOrder::Partition)
        .max_in_flight(64, 64);
    let subscription = bus.subscribe(router, config).expect("subscribe");
    wait_until(
        "the fast partition's records to be handled",
        Duration::from_secs(60),
        || {
            let fast = fast_done.load(std::sync::atomic::Ordering::SeqCst);
            (fast == fast_n)
                .then_some(())
                .ok_or(format!("{fast} of {fast_n}"))
        },
    )
    .await;
    let slow = slow_done.load(std::sync::atomic::Ordering::SeqCst);
    subscription.stop().await.expect("stop");
    // The slow partition needs 20 s for its backlog; the fast one must not have waited for it.
    assert!(
        slow < slow_n / 2,
        "the fast partition finished only after {slow} of the slow one's {slow_n} records"
    );
}
