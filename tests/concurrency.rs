//! Concurrency inside a partition, on the memory bus: limits hold, per-key order holds with
//! random handler latencies, and CPU-bound handlers neither exceed the core count nor starve
//! async handlers. (Speed is measured by `weir bench`, not here.)

mod reference;

use crate::reference::{CustomerCreated, CustomerUpdated};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use weir::{
    Bus, ConsumerConfig, Ctx, Envelope, HandlerError, HandlerOptions, MemoryBus, MemoryConfig,
    ProcessingOrder, PublishExt, Router, StopReport,
};

/// Counts calls running at once, overall and per partition, and remembers the maxima.
#[derive(Default)]
struct Concurrency {
    now: AtomicUsize,
    max: AtomicUsize,
    per_partition: Mutex<HashMap<i32, (usize, usize)>>,
}

impl Concurrency {
    fn enter(&self, partition: i32) {
        let now = self.now.fetch_add(1, Ordering::SeqCst) + 1;
        self.max.fetch_max(now, Ordering::SeqCst);
        let mut map = self.per_partition.lock().unwrap();
        let entry = map.entry(partition).or_default();
        entry.0 += 1;
        entry.1 = entry.1.max(entry.0);
    }

    fn exit(&self, partition: i32) {
        self.now.fetch_sub(1, Ordering::SeqCst);
        self.per_partition
            .lock()
            .unwrap()
            .get_mut(&partition)
            .unwrap()
            .0 -= 1;
    }

    fn max_per_partition(&self) -> usize {
        self.per_partition
            .lock()
            .unwrap()
            .values()
            .map(|(_, max)| *max)
            .max()
            .unwrap_or(0)
    }
}

async fn publish_customers(bus: &MemoryBus, n: usize, keys: usize) {
    for i in 0..n {
        let event =
            CustomerCreated::new(format!("c-{}", i % keys), serde_json::json!({ "seq": i }));
        bus.publish(&Envelope::new(event)).await.expect("publish");
    }
}

async fn recv_n<T>(rx: &mut mpsc::UnboundedReceiver<T>, n: usize) -> Vec<T> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let item = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .expect("records keep flowing")
            .expect("channel open");
        out.push(item);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_never_exceeds_the_global_and_per_partition_limits() {
    let bus = MemoryBus::new(MemoryConfig {
        default_partitions: 4,
        ..MemoryConfig::default()
    });
    let metrics = bus.metrics().clone();
    let n = 2_000;
    publish_customers(&bus, n, 500).await;
    let seen = Arc::new(Concurrency::default());
    let peak_in_flight = Arc::new(AtomicUsize::new(0));
    let (tx, mut done) = mpsc::unbounded_channel();
    let router = {
        let (seen, peak, metrics) = (seen.clone(), peak_in_flight.clone(), metrics.clone());
        Router::new().on(move |_: CustomerCreated, ctx: Ctx| {
            let (seen, peak, metrics, tx) =
                (seen.clone(), peak.clone(), metrics.clone(), tx.clone());
            async move {
                seen.enter(ctx.partition());
                // The gauge counts fetched-and-not-final records, waiting ones included.
                let gauge = metrics.render();
                let in_flight = gauge
                    .lines()
                    .find_map(|l| l.strip_prefix("weir_in_flight_messages "))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                peak.fetch_max(in_flight, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(fastrand::u64(0..3))).await;
                seen.exit(ctx.partition());
                tx.send(()).map_err(HandlerError::acknowledged)
            }
        })
    };
    let config = ConsumerConfig::new("limits")
        .order(ProcessingOrder::Unordered)
        .max_in_flight(16, 6);
    let subscription = bus.subscribe(router, config).expect("subscribe");
    recv_n(&mut done, n).await;
    subscription.stop().await.expect("stop");
    assert!(
        seen.max.load(Ordering::SeqCst) <= 16,
        "global: {}",
        seen.max.load(Ordering::SeqCst)
    );
    assert!(
        seen.max_per_partition() <= 6,
        "per partition: {}",
        seen.max_per_partition()
    );
    assert!(
        peak_in_flight.load(Ordering::SeqCst) <= 16,
        "gauge: {}",
        peak_in_flight.load(Ordering::SeqCst)
    );
    assert!(
        seen.max.load(Ordering::SeqCst) > 6,
        "records of several partitions ran at once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_order_holds_with_random_handler_latencies() {
    let bus = MemoryBus::new(MemoryConfig {
        default_partitions: 2,
        ..MemoryConfig::default()
    });
    let (n, keys) = (1_500, 30);
    publish_customers(&bus, n, keys).await;
    let (tx, mut done) = mpsc::unbounded_channel::<(String, u64)>();
    let router = Router::new().on(move |e: CustomerCreated, _ctx: Ctx| {
        let tx = tx.clone();
        async move {
            tokio::time::sleep(Duration::from_micros(fastrand::u64(0..2_000))).await;
            let seq = e.details["seq"].as_u64().unwrap();
            tx.send((e.customer_id, seq))
                .map_err(HandlerError::acknowledged)
        }
    });
    let subscription = bus
        .subscribe(router, ConsumerConfig::new("order"))
        .expect("subscribe");
    let handled = recv_n(&mut done, n).await;
    subscription.stop().await.expect("stop");
    let mut per_key: HashMap<String, Vec<u64>> = HashMap::new();
    for (key, seq) in handled {
        per_key.entry(key).or_default().push(seq);
    }
    assert_eq!(per_key.len(), keys);
    for (key, seqs) in per_key {
        let mut sorted = seqs.clone();
        sorted.sort_unstable();
        assert_eq!(seqs, sorted, "key {key} was handled out of order");
    }
}

fn burn(duration: Duration) {
    let start = std::time::Instant::now();
    while start.elapsed() < duration {
        std::hint::black_box(0u64);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_bound_handlers_use_at_most_one_core_each_and_never_starve_async_ones() {
    let bus = MemoryBus::new(MemoryConfig {
        default_partitions: 8,
        ..MemoryConfig::default()
    });
    let cores = std::thread::available_parallelism().unwrap().get();
    let cpu_records = 40;
    publish_customers(&bus, cpu_records, 40).await;
    let cpu = Arc::new(Concurrency::default());
    let (cpu_tx, mut cpu_done) = mpsc::unbounded_channel::<std::time::Instant>();
    let (io_tx, mut io_done) = mpsc::unbounded_channel::<std::time::Instant>();
    let router = {
        let cpu = cpu.clone();
        Router::new()
            .on_with(
                move |_: CustomerCreated, ctx: Ctx| {
                    let (cpu, tx) = (cpu.clone(), cpu_tx.clone());
                    async move {
                        cpu.enter(ctx.partition());
                        burn(Duration::from_millis(20));
                        cpu.exit(ctx.partition());
                        tx.send(std::time::Instant::now())
                            .map_err(HandlerError::acknowledged)
                    }
                },
                HandlerOptions::new().cpu_bound(),
            )
            .on(move |_: CustomerUpdated, _ctx: Ctx| {
                let tx = io_tx.clone();
                async move {
                    tx.send(std::time::Instant::now())
                        .map_err(HandlerError::acknowledged)
                }
            })
    };
    let subscription = bus
        .subscribe(router, ConsumerConfig::new("cpu"))
        .expect("subscribe");
    // Wait until the CPU-bound work is under way, then send async work behind it.
    recv_n(&mut cpu_done, 2).await;
    for i in 0..5 {
        let event = CustomerUpdated::new(format!("u-{i}"), serde_json::json!({}));
        bus.publish(&Envelope::new(event)).await.expect("publish");
    }
    let io_finished = recv_n(&mut io_done, 5).await.into_iter().max().unwrap();
    let cpu_finished = recv_n(&mut cpu_done, cpu_records - 2)
        .await
        .into_iter()
        .max()
        .unwrap();
    let report: StopReport = subscription.stop().await.expect("stop");
    assert_eq!(report.abandoned, 0);
    assert!(
        cpu.max.load(Ordering::SeqCst) <= cores,
        "{} CPU-bound calls at once on {cores} cores",
        cpu.max.load(Ordering::SeqCst)
    );
    assert!(
        io_finished < cpu_finished,
        "async handlers waited for the CPU-bound backlog to finish"
    );
}

/// The most `cpu_bound` calls seen running at once while 40 records of 20 ms each go through
/// a subscription with `config`.
async fn most_cpu_bound_calls_at_once(config: ConsumerConfig) -> usize {
    let bus = MemoryBus::new(MemoryConfig {
        default_partitions: 8,
        ..MemoryConfig::default()
    });
    let records = 40;
    publish_customers(&bus, records, records).await;
    let cpu = Arc::new(Concurrency::default());
    let (done_tx, mut done) = mpsc::unbounded_channel::<std::time::Instant>();
    let router = {
        let cpu = cpu.clone();
        Router::new().on_with(
            move |_: CustomerCreated, ctx: Ctx| {
                let (cpu, tx) = (cpu.clone(), done_tx.clone());
                async move {
                    cpu.enter(ctx.partition());
                    burn(Duration::from_millis(20));
                    cpu.exit(ctx.partition());
                    tx.send(std::time::Instant::now())
                        .map_err(HandlerError::acknowledged)
                }
            },
            HandlerOptions::new().cpu_bound(),
        )
    };
    let subscription = bus.subscribe(router, config).expect("subscribe");
    recv_n(&mut done, records).await;
    let report: StopReport = subscription.stop().await.expect("stop");
    assert_eq!(report.abandoned, 0);
    cpu.max.load(Ordering::SeqCst)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_bound_threads_caps_the_cpu_bound_calls_running_at_once() {
    // Two permits: the calls do overlap (so the count below can see an overlap at all).
    let two =
        most_cpu_bound_calls_at_once(ConsumerConfig::new("cpu-two").cpu_bound_threads(2)).await;
    assert_eq!(two, 2, "two permits, 40 records of 20 ms on 8 partitions");
    // One permit, as a process that answers requests beside its consumer sets on 2 cores.
    let one =
        most_cpu_bound_calls_at_once(ConsumerConfig::new("cpu-one").cpu_bound_threads(1)).await;
    assert_eq!(one, 1, "{one} cpu_bound calls at once with one permit");
}
