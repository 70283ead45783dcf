//! Durable retries (PostgreSQL) on the in-memory bus: parking, per-key order across parking and
//! the parked-record worker, durable exhaustion, and a new owner learning the parked keys.
//! The same store and worker run under `weir serve` against Kafka (tests/kafka_process.rs).

mod reference;
mod support;

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use support::db::TestDb;
use support::process::eventually;
use tokio_util::sync::CancellationToken;
use weir::dead_letter_headers as header;
use weir::{
    Bus, ConsumerConfig, Ctx, DeadLetterTopics, DurableRetry, Envelope, Event, EventType,
    HandlerError, HandlerOptions, MemoryBus, MemoryConfig, Metrics, ParkedMetrics, ParkedStore,
    ParkedWorker, ParkedWorkerConfig, PublishExt, RetryPolicy, Router, Subscription,
};

const TOPIC: &str = "orders";
const PATIENCE: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    seq: u32,
}

impl Event for OrderPlaced {
    const TYPE: EventType = EventType::new("test.order_placed");
    const TOPIC: &'static str = TOPIC;

    fn key(&self) -> String {
        self.order_id.clone()
    }
}

/// What the handler did, in the order it did it.
#[derive(Clone, Default)]
struct Log {
    /// (key, seq) of every successful call.
    handled: Arc<Mutex<Vec<(String, u32)>>>,
    /// (key, seq, attempt) of every call.
    calls: Arc<Mutex<Vec<(String, u32, u32)>>>,
}

impl Log {
    fn handled_of(&self, key: &str) -> Vec<u32> {
        let handled = self.handled.lock().unwrap();
        handled
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, s)| *s)
            .collect()
    }

    fn calls_of(&self, key: &str) -> Vec<(u32, u32)> {
        let calls = self.calls.lock().unwrap();
        calls
            .iter()
            .filter(|(k, _, _)| k == key)
            .map(|(_, s, a)| (*s, *a))
            .collect()
    }
}

/// A handler that fails `Retryable` while `failing` says so for a record.
fn router(
    log: &Log,
    failing: impl Fn(&OrderPlaced) -> bool + Clone + Send + Sync + 'static,
    durable_attempts: u32,
) -> Router {
    let log = log.clone();
    Router::new()
        .on_with(
            move |order: OrderPlaced, ctx: Ctx| {
                let fail = failing(&order);
                log.calls
                    .lock()
                    .unwrap()
                    .push((order.order_id.clone(), order.seq, ctx.attempt()));
                if !fail {
                    log.handled
                        .lock()
                        .unwrap()
                        .push((order.order_id, order.seq));
                }
                async move {
                    if fail {
                        Err(HandlerError::retryable("the warehouse is down"))
                    } else {
                        Ok(())
                    }
                }
            },
            HandlerOptions::new().name("reserve_stock"),
        )
        .retry(RetryPolicy {
            initial_interval: Duration::from_millis(5),
            maximum_attempts: 2,
            jitter: 0.0,
            durable: Some(DurableRetry {
                initial_interval: Duration::from_millis(50),
                backoff_coefficient: 1.0,
                maximum_interval: Duration::from_millis(50),
                maximum_attempts: durable_attempts,
            }),
            ..RetryPolicy::default()
        })
}

fn bus() -> MemoryBus {
    let bus = MemoryBus::new(MemoryConfig::default());
    bus.create_topic(TOPIC, 2);
    bus.create_topic(&format!("{TOPIC}.dlq"), 1);
    bus
}

async fn publish(bus: &MemoryBus, key: &str, seq: u32) {
    bus.publish(&Envelope::new(OrderPlaced {
        order_id: key.to_owned(),
        seq,
    }))
    .await
    .expect("publish");
}

fn subscribe(bus: &MemoryBus, router: Router, store: &ParkedStore) -> Subscription {
    let config = ConsumerConfig {
        commit_interval: Duration::from_millis(20),
        ..ConsumerConfig::new(store.group_id())
    };
    bus.subscribe(router.durable_retries(store), config)
        .expect("subscribe")
}

fn worker(bus: &MemoryBus, store: &ParkedStore, router: Router) -> (ParkedWorker, ParkedMetrics) {
    let metrics = Metrics::new();
    let parked = ParkedMetrics::new(metrics.registry()).unwrap();
    let worker = ParkedWorker::new(
        store.clone(),
        router,
        Arc::new(bus.clone()),
        DeadLetterTopics::default(),
        metrics,
        parked.clone(),
    )
    .config(ParkedWorkerConfig {
        poll_interval: Duration::from_millis(20),
        ..ParkedWorkerConfig::default()
    });
    (worker, parked)
}

async fn parked_rows(db: &TestDb, group: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM weir_parked WHERE group_id = $1")
        .bind(group)
        .fetch_one(db.pool())
        .await
        .unwrap()
}

/// Waits until the group's committed offsets reach the end of every partition.
async fn committed_to_the_end(bus: &MemoryBus, group: &str) {
    eventually("the committed offsets to reach the end", PATIENCE, || {
        let (committed, ends) = (bus.committed(group, TOPIC), bus.end_offsets(TOPIC));
        async move {
            if ends
                .iter()
                .all(|(p, end)| committed.get(p).copied().unwrap_or(0) == *end)
            {
                Ok(())
            } else {
                Err(format!("committed {committed:?}, ends {ends:?}"))
            }
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_key_is_parked_in_order_while_other_keys_flow_and_commits_move_past_it() {
    let db = TestDb::migrated().await;
    let bus = bus();
    let store = ParkedStore::new(db.pool().clone(), "shop");
    let log = Log::default();
    let outage = Arc::new(AtomicBool::new(true));
    let failing = {
        let outage = outage.clone();
        move |o: &OrderPlaced| o.order_id == "k-bad" && outage.load(Ordering::SeqCst)
    };
    for seq in 0..20 {
        for key in 0..10 {
            publish(&bus, &format!("k-{key}"), seq).await;
        }
        publish(&bus, "k-bad", seq).await;
    }
    let subscription = subscribe(&bus, router(&log, failing.clone(), 1000), &store);

    // During the outage: every other key finishes and the partitions commit to their end.
    committed_to_the_end(&bus, "shop").await;
    for key in 0..10 {
        assert_eq!(
            log.handled_of(&format!("k-{key}")),
            (0..20).collect::<Vec<_>>()
        );
    }
    assert_eq!(parked_rows(&db, "shop").await, 20, "all of k-bad is parked");
    assert_eq!(
        log.calls_of("k-bad"),
        [(0, 1), (0, 2)],
        "only the first record was tried; the later ones were parked behind it"
    );
    assert_eq!(bus.metrics().handled_total("parked"), 20);

    // The worker retries the head while the outage lasts, then k-bad flows, in offset order.
    let (worker, parked_metrics) = worker(&bus, &store, router(&log, failing, 1000));
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { worker.run(stop).await }
    });
    eventually("a durable retry during the outage", PATIENCE, || {
        let calls = log.calls_of("k-bad").len();
        async move {
            if calls >= 4 {
                Ok(())
            } else {
                Err(format!("{calls} calls"))
            }
        }
    })
    .await;
    assert!(log.handled_of("k-bad").is_empty());
    assert_eq!(parked_metrics.records(), 20);
    assert_eq!(parked_metrics.keys(), 1);
    let attempts: Vec<u32> = log.calls_of("k-bad").iter().map(|(_, a)| *a).collect();
    assert_eq!(
        attempts[..4],
        [1, 2, 3, 4],
        "attempt numbers continue from the consumer's"
    );
    outage.store(false, Ordering::SeqCst);
    eventually("k-bad to be handled", PATIENCE, || {
        let handled = log.handled_of("k-bad");
        async move {
            if handled.len() >= 20 {
                Ok(())
            } else {
                Err(format!("{handled:?}"))
            }
        }
    })
    .await;
    assert_eq!(log.handled_of("k-bad"), (0..20).collect::<Vec<_>>());
    eventually("the table to empty", PATIENCE, || {
        let db = &db;
        async move {
            match parked_rows(db, "shop").await {
                0 => Ok(()),
                n => Err(format!("{n} rows")),
            }
        }
    })
    .await;
    stop.cancel();
    running.await.unwrap();
    subscription.stop().await.unwrap();
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_record_failing_its_last_durable_attempt_is_dead_lettered_and_its_key_moves_on() {
    let db = TestDb::migrated().await;
    let bus = bus();
    let store = ParkedStore::new(db.pool().clone(), "shop");
    let log = Log::default();
    // Order 0 of k-1 never succeeds; order 1 of k-1 is fine.
    let failing = |o: &OrderPlaced| o.order_id == "k-1" && o.seq == 0;
    publish(&bus, "k-1", 0).await;
    publish(&bus, "k-1", 1).await;
    let subscription = subscribe(&bus, router(&log, failing, 3), &store);
    committed_to_the_end(&bus, "shop").await;
    assert_eq!(parked_rows(&db, "shop").await, 2);
    assert!(log.handled_of("k-1").is_empty(), "k-1/1 waits behind k-1/0");

    let (worker, _) = worker(&bus, &store, router(&log, failing, 3));
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { worker.run(stop).await }
    });
    let dlq = format!("{TOPIC}.dlq");
    eventually("the dead letter and then k-1/1", PATIENCE, || {
        let (dead, handled) = (bus.records(&dlq), log.handled_of("k-1"));
        async move {
            if dead.len() == 1 && handled == [1] {
                Ok(())
            } else {
                Err(format!("{} dead letters, handled {handled:?}", dead.len()))
            }
        }
    })
    .await;
    let dead = &bus.records(&dlq)[0];
    assert_eq!(
        dead.headers.get_str(header::ATTEMPTS),
        Some("5"),
        "2 in place + 3 durable"
    );
    assert_eq!(
        dead.headers.get_str(header::ERROR_KIND),
        Some("retries_exhausted")
    );
    assert_eq!(dead.headers.get_str(header::HANDLER), Some("reserve_stock"));
    assert_eq!(
        log.calls_of("k-1"),
        [(0, 1), (0, 2), (0, 3), (0, 4), (0, 5), (1, 1)],
        "k-1/1 ran only after k-1/0 was dead-lettered"
    );
    stop.cancel();
    running.await.unwrap();
    subscription.stop().await.unwrap();
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_owner_parks_a_key_behind_what_the_previous_owner_parked() {
    let db = TestDb::migrated().await;
    let bus = bus();
    let log = Log::default();
    let outage = Arc::new(AtomicBool::new(true));
    let failing = {
        let outage = outage.clone();
        move |o: &OrderPlaced| o.order_id == "k-bad" && o.seq == 0 && outage.load(Ordering::SeqCst)
    };
    publish(&bus, "k-bad", 0).await;
    publish(&bus, "k-ok", 0).await;
    let first = ParkedStore::new(db.pool().clone(), "shop");
    let subscription = subscribe(&bus, router(&log, failing.clone(), 1000), &first);
    committed_to_the_end(&bus, "shop").await;
    subscription.stop().await.unwrap();
    assert_eq!(parked_rows(&db, "shop").await, 1);

    // A restart: a fresh store knows nothing in memory. k-bad/1 would succeed if called, but
    // must wait behind k-bad/0.
    publish(&bus, "k-bad", 1).await;
    publish(&bus, "k-ok", 1).await;
    let second = ParkedStore::new(db.pool().clone(), "shop");
    let subscription = subscribe(&bus, router(&log, failing.clone(), 1000), &second);
    committed_to_the_end(&bus, "shop").await;
    assert_eq!(log.handled_of("k-ok"), [0, 1]);
    assert!(
        log.handled_of("k-bad").is_empty(),
        "{:?}",
        log.calls_of("k-bad")
    );
    assert_eq!(parked_rows(&db, "shop").await, 2);

    outage.store(false, Ordering::SeqCst);
    let (worker, _) = worker(&bus, &second, router(&log, failing, 1000));
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { worker.run(stop).await }
    });
    eventually("k-bad handled in order", PATIENCE, || {
        let handled = log.handled_of("k-bad");
        async move {
            if handled.len() >= 2 {
                Ok(())
            } else {
                Err(format!("{handled:?}"))
            }
        }
    })
    .await;
    assert_eq!(log.handled_of("k-bad"), [0, 1]);

    // Once the worker emptied the key, the consumer handles its next record itself.
    publish(&bus, "k-bad", 2).await;
    eventually("k-bad/2 handled by the consumer", PATIENCE, || {
        let handled = log.handled_of("k-bad");
        async move {
            if handled == [0, 1, 2] {
                Ok(())
            } else {
                Err(format!("{handled:?}"))
            }
        }
    })
    .await;
    let mut by_seq: HashMap<u32, usize> = HashMap::new();
    for (s, _) in log.calls_of("k-bad") {
        *by_seq.entry(s).or_default() += 1;
    }
    assert_eq!(by_seq[&2], 1, "handled once, not parked");
    stop.cancel();
    running.await.unwrap();
    subscription.stop().await.unwrap();
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_keys_hold_their_later_records_across_a_rebalance_to_a_second_replica() {
    let db = TestDb::migrated().await;
    let bus = bus();
    let log = Log::default();
    let outage = Arc::new(AtomicBool::new(true));
    // Eight failing keys, so both partitions have some.
    let bad: Vec<String> = (0..8).map(|i| format!("bad-{i}")).collect();
    let failing = {
        let outage = outage.clone();
        move |o: &OrderPlaced| o.order_id.starts_with("bad-") && outage.load(Ordering::SeqCst)
    };
    for key in &bad {
        publish(&bus, key, 0).await;
    }
    let first = ParkedStore::new(db.pool().clone(), "shop");
    let a = subscribe(&bus, router(&log, failing.clone(), 1000), &first);
    committed_to_the_end(&bus, "shop").await;
    assert_eq!(parked_rows(&db, "shop").await, 8);

    // A second replica joins: one partition moves to it, and it must learn what was parked there.
    let second = ParkedStore::new(db.pool().clone(), "shop");
    let b = subscribe(&bus, router(&log, failing.clone(), 1000), &second);
    for seq in 1..4 {
        for key in &bad {
            publish(&bus, key, seq).await;
        }
        publish(&bus, &format!("ok-{seq}"), seq).await;
    }
    committed_to_the_end(&bus, "shop").await;
    assert_eq!(
        parked_rows(&db, "shop").await,
        32,
        "every later record parked behind"
    );
    for key in &bad {
        assert_eq!(
            log.calls_of(key),
            [(0, 1), (0, 2)],
            "{key}: only its first record was tried"
        );
    }

    outage.store(false, Ordering::SeqCst);
    let (worker, _) = worker(&bus, &second, router(&log, failing, 1000));
    let stop = CancellationToken::new();
    let running = tokio::spawn({
        let stop = stop.clone();
        async move { worker.run(stop).await }
    });
    eventually("every bad key handled", PATIENCE, || {
        let done = bad.iter().all(|k| log.handled_of(k).len() >= 4);
        async move {
            if done {
                Ok(())
            } else {
                Err("not yet".to_owned())
            }
        }
    })
    .await;
    for key in &bad {
        assert_eq!(log.handled_of(key), [0, 1, 2, 3], "{key} in offset order");
    }
    stop.cancel();
    running.await.unwrap();
    a.stop().await.unwrap();
    b.stop().await.unwrap();
    db.close().await;
}
