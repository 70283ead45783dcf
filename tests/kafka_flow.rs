//! Flow control against a real broker: handlers stuck for longer than `max.poll.interval.ms`
//! must not cost the consumer its group membership. The engine stops taking records at its
//! in-flight limit; the poll thread stops polling a partition whose hand-off is full (so
//! librdkafka's prefetch for it fills and its fetching stops, without a pause), and goes on
//! polling the main queue, so the group keeps it.

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
    // Both waits fit inside the 6 s session timeout, as subscribing checks.
    let config = ConsumerConfig {
        revoke_timeout: Duration::from_secs(2),
        drain_timeout: Duration::from_secs(2),
        ..ConsumerConfig::new("stalled-group").max_in_flight(4, 4)
    };
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

/// librdkafka bounds its prefetch per partition queue, and Weir splits one off per partition:
/// with many partitions and a downstream that hangs, the consumer held hundreds of MiB (issue
/// 29: 587 MiB at 64 partitions). The budget is the whole consumer's, whatever the partitions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_handler_on_many_partitions_holds_at_most_the_prefetch_budget() {
    const PARTITIONS: i32 = 24;
    const BUDGET: usize = 2 * 1024 * 1024;
    let broker = Tansu::start_memory();
    broker.create_topic("crowded", PARTITIONS);
    let mut kafka = KafkaConfig::new(broker.brokers());
    kafka.max_prefetch_bytes = BUDGET;
    kafka
        .consumer
        .insert("statistics.interval.ms".to_owned(), "200".to_owned());
    let bus = KafkaBus::new(kafka).expect("bus");
    // About 15 MB in all: far more than the budget, and well within librdkafka's own
    // per-partition limits (10,000 records, 16 MiB), so without the budget all of it is
    // prefetched.
    let n = 36_000;
    for chunk in (0..n).collect::<Vec<u64>>().chunks(2_000) {
        let sends = chunk.iter().map(|&seq| {
            let e = Envelope::new(CustomerCreated::new(
                format!("c-{seq}"),
                serde_json::json!({ "seq": seq, "notes": "x".repeat(200) }),
            ));
            bus.publish_record(OutboundRecord {
                topic: "crowded".to_owned(),
                key: Some(e.key().into_bytes()),
                value: Some(e.to_structured().unwrap()),
                headers: weir::Headers::new(),
            })
        });
        for result in futures_util::future::join_all(sends).await {
            result.expect("publish");
        }
    }
    let started: Arc<Mutex<std::collections::HashSet<i32>>> = Arc::default();
    let router = {
        let started = started.clone();
        Router::new().on_with(
            move |_: CustomerCreated, ctx: Ctx| {
                started.lock().unwrap().insert(ctx.partition());
                // A downstream that hangs.
                std::future::pending::<Result<(), weir::HandlerError>>()
            },
            HandlerOptions::new().topic("crowded"),
        )
    };
    let config = ConsumerConfig::new("crowded-group").max_in_flight(PARTITIONS as usize, 1);
    let subscription = bus.subscribe(router, config).expect("subscribe");
    let metrics = bus.metrics().clone();
    wait_until(
        "a stuck handler on every partition (each has been fetched)",
        Duration::from_secs(60),
        || {
            let count = started.lock().unwrap().len();
            (count == PARTITIONS as usize)
                .then_some(())
                .ok_or(format!("{count} of {PARTITIONS}"))
        },
    )
    .await;
    // Statistics come every 200 ms: 25 samples of what the consumer holds while nothing is
    // taken from it, each within the budget, with room for a fetch that lands on a partition
    // as it pauses (measured: 2,101,896 bytes at most; 13,240,077 before the budget).
    let mut peak = 0.0_f64;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        peak = peak.max(counter(&metrics, "weir_consumer_prefetch_bytes "));
        assert!(
            peak <= 1.5 * BUDGET as f64,
            "the consumer holds {peak} bytes of prefetched records; budget {BUDGET}"
        );
    }
    assert!(peak > 0.0, "the gauge never counted the prefetch");
    println!("peak prefetch: {peak} bytes (budget {BUDGET})");
    drop(subscription);
}

/// Fetching paused for memory resumes where the poll thread stopped: once the handlers move
/// again, every record is handled, once, in order per key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn partitions_paused_for_memory_resume_without_losing_or_repeating_records() {
    const PARTITIONS: i32 = 8;
    let broker = Tansu::start_memory();
    broker.create_topic("budgeted", PARTITIONS);
    let mut kafka = KafkaConfig::new(broker.brokers());
    // About 60 records of each partition at a time: every partition pauses and resumes
    // several times.
    kafka.max_prefetch_bytes = 256 * 1024;
    let bus = KafkaBus::new(kafka).expect("bus");
    // One record per batch: Tansu 0.6 skips the rest of a batch when a fetch (here, the one
    // after a resume) starts inside it.
    let n: u64 = 2_000;
    for seq in 0..n {
        let e = Envelope::new(CustomerCreated::new(
            format!("c-{}", seq % 40),
            serde_json::json!({ "seq": seq, "notes": "x".repeat(200) }),
        ));
        bus.publish_record(OutboundRecord {
            topic: "budgeted".to_owned(),
            key: Some(e.key().into_bytes()),
            value: Some(e.to_structured().unwrap()),
            headers: weir::Headers::new(),
        })
        .await
        .expect("publish");
    }
    let gate = Arc::new(Notify::new());
    let open = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let handled: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
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
                    handled.lock().unwrap().push((e.customer_id.clone(), seq));
                    Ok(())
                }
            },
            HandlerOptions::new().topic("budgeted"),
        )
    };
    let config = ConsumerConfig::new("budgeted-group").max_in_flight(PARTITIONS as usize, 1);
    let subscription = bus.subscribe(router, config).expect("subscribe");
    let metrics = bus.metrics().clone();
    wait_until(
        "a stuck handler on every partition",
        Duration::from_secs(60),
        || {
            let in_flight = counter(&metrics, "weir_in_flight_messages ");
            (in_flight >= f64::from(PARTITIONS))
                .then_some(())
                .ok_or(format!("in flight {in_flight}"))
        },
    )
    .await;
    open.store(true, std::sync::atomic::Ordering::SeqCst);
    gate.notify_waiters();
    wait_until(
        "every record to be handled",
        Duration::from_secs(120),
        || {
            let count = handled.lock().unwrap().len() as u64;
            (count >= n).then_some(()).ok_or(format!("{count} of {n}"))
        },
    )
    .await;
    subscription.stop().await.expect("stop");
    let handled = handled.lock().unwrap().clone();
    let mut seen = std::collections::HashSet::new();
    let repeated: Vec<u64> = handled
        .iter()
        .filter(|(_, seq)| !seen.insert(*seq))
        .map(|(_, seq)| *seq)
        .collect();
    assert!(repeated.is_empty(), "handled twice: {repeated:?}");
    assert_eq!(seen.len() as u64, n);
    let mut last: HashMap<&str, u64> = HashMap::new();
    for (key, seq) in &handled {
        if let Some(previous) = last.insert(key, *seq) {
            assert!(previous < *seq, "key {key}: {seq} after {previous}");
        }
    }
}
