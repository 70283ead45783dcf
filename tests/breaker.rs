//! The circuit breaker through a real subscription on the memory bus, on tokio's paused clock:
//! its states, the poison record that must not open it, an outage that must dead-letter nothing
//! and spend no attempts, and its pause composed with an API pause.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use weir::{
    BreakerConfig, Bus, ConsumerConfig, Ctx, Envelope, Event, EventType, HandlerError,
    HandlerOptions, MemoryBus, Metrics, PauseSource, PauseTarget, PublishExt, RetryPolicy, Router,
    Subscription,
};

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Job {
    id: u32,
}

impl Event for Job {
    const TYPE: EventType = EventType::new("test.job");
    const TOPIC: &'static str = "jobs";
    fn key(&self) -> String {
        format!("k{}", self.id)
    }
}

const ROUTE: &str = "work";

/// One handler call: when, which record, which attempt, and whether the downstream was down.
#[derive(Debug, Clone, Copy)]
struct Call {
    id: u32,
    attempt: u32,
    down: bool,
}

/// The downstream the handler calls, and what the handler saw.
#[derive(Default)]
struct Downstream {
    down: AtomicBool,
    /// A record that always fails retryably, whatever the downstream does.
    poison: Option<u32>,
    calls: Mutex<Vec<Call>>,
    handled: Mutex<Vec<u32>>,
}

fn breaker() -> BreakerConfig {
    BreakerConfig::new()
        .failure_ratio(0.5)
        .minimum_calls(4)
        .window(Duration::from_secs(30))
        .cool_down(Duration::from_secs(5))
        .backoff(2.0)
        .max_cool_down(Duration::from_secs(20))
}

fn retry(attempts: u32) -> RetryPolicy {
    RetryPolicy {
        initial_interval: Duration::from_millis(100),
        maximum_interval: Duration::from_secs(1),
        maximum_attempts: attempts,
        jitter: 0.0,
        ..RetryPolicy::default()
    }
}

/// Subscribes a replica (group `breakers`) whose handler calls `downstream`; the topic `jobs`
/// must exist.
fn subscribe(bus: &MemoryBus, downstream: &Arc<Downstream>, attempts: u32) -> Subscription {
    let d = downstream.clone();
    let router = Router::new().on_with(
        move |job: Job, ctx: Ctx| {
            let d = d.clone();
            async move {
                let down = d.down.load(Ordering::SeqCst);
                d.calls.lock().unwrap().push(Call {
                    id: job.id,
                    attempt: ctx.attempt(),
                    down,
                });
                if down || d.poison == Some(job.id) {
                    return Err(HandlerError::retryable("downstream unavailable"));
                }
                d.handled.lock().unwrap().push(job.id);
                Ok(())
            }
        },
        HandlerOptions::new()
            .name(ROUTE)
            .retry(retry(attempts))
            .breaker(breaker()),
    );
    bus.subscribe(router, ConsumerConfig::new("breakers"))
        .expect("subscribes")
}

async fn publish(bus: &MemoryBus, ids: impl IntoIterator<Item = u32>) {
    for id in ids {
        bus.publish(&Envelope::new(Job { id }))
            .await
            .expect("publishes");
    }
}

/// A metric's value, 0 when the series does not exist.
fn metric(metrics: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    metrics
        .registry()
        .gather()
        .iter()
        .filter(|family| family.name() == name)
        .flat_map(|family| family.get_metric())
        .find(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map_or(0.0, |m| {
            m.get_gauge().get_value() + m.get_counter().get_value()
        })
}

fn state(metrics: &Metrics) -> f64 {
    metric(metrics, "weir_breaker_state", &[("route", ROUTE)])
}

fn entered(metrics: &Metrics, to: &str) -> f64 {
    metric(
        metrics,
        "weir_breaker_transitions_total",
        &[("route", ROUTE), ("to", to)],
    )
}

/// Polls (on the paused clock) until `done`, or panics with `what` after `within`.
async fn until(within: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(start_paused = true)]
async fn the_breaker_opens_half_opens_reopens_and_closes_through_a_subscription() {
    let bus = MemoryBus::default();
    bus.create_topic("jobs", 1);
    let downstream = Arc::new(Downstream::default());
    downstream.down.store(true, Ordering::SeqCst);
    let subscription = subscribe(&bus, &downstream, 3);
    let metrics = bus.metrics().clone();
    assert_eq!(state(&metrics), 0.0, "starts closed");

    publish(&bus, 0..8).await;
    until(Duration::from_secs(5), "opens", || {
        entered(&metrics, "open") == 1.0
    })
    .await;
    assert_eq!(state(&metrics), 1.0);
    let opened_at = Instant::now();

    // The first cool-down (5 s) ends: one probe, which fails, and it reopens for 10 s.
    until(Duration::from_secs(10), "reopens", || {
        entered(&metrics, "open") == 2.0
    })
    .await;
    assert_eq!(entered(&metrics, "half_open"), 1.0);
    assert!(opened_at.elapsed() >= Duration::from_secs(5));
    let probes_while_down = downstream.calls.lock().unwrap().len();

    downstream.down.store(false, Ordering::SeqCst);
    until(Duration::from_secs(15), "closes", || {
        entered(&metrics, "closed") == 1.0
    })
    .await;
    assert!(
        opened_at.elapsed() >= Duration::from_secs(15),
        "the 10 s cool-down"
    );
    assert_eq!(state(&metrics), 0.0);
    assert_eq!(entered(&metrics, "half_open"), 2.0);
    until(Duration::from_secs(5), "every record handled", || {
        downstream.handled.lock().unwrap().len() == 8
    })
    .await;
    assert_eq!(
        probes_while_down,
        4 + 1,
        "4 calls opened it, then one probe"
    );
    assert!(bus.records("jobs.dlq").is_empty());
    subscription.stop().await.expect("stops");
    assert_eq!(bus.committed("breakers", "jobs").get(&0), Some(&8));
}

#[tokio::test(start_paused = true)]
async fn a_single_poison_record_never_opens_the_breaker_and_dead_letters_as_normal() {
    let bus = MemoryBus::default();
    bus.create_topic("jobs", 1);
    let downstream = Arc::new(Downstream {
        poison: Some(0),
        ..Downstream::default()
    });
    // Six attempts: more failures than the breaker's minimum calls, so only the ratio keeps
    // it closed.
    let subscription = subscribe(&bus, &downstream, 6);
    let metrics = bus.metrics().clone();
    publish(&bus, 0..21).await;
    until(
        Duration::from_secs(30),
        "the poison record dead-letters",
        || bus.records("jobs.dlq").len() == 1,
    )
    .await;
    let poison_calls = downstream
        .calls
        .lock()
        .unwrap()
        .iter()
        .filter(|c| c.id == 0)
        .count();
    assert_eq!(poison_calls, 6, "every attempt ran");
    assert_eq!(downstream.handled.lock().unwrap().len(), 20);
    assert_eq!(entered(&metrics, "open"), 0.0, "the breaker opened");
    assert_eq!(state(&metrics), 0.0);
    subscription.stop().await.expect("stops");
}

#[tokio::test(start_paused = true)]
async fn a_five_minute_outage_dead_letters_nothing_and_spends_no_attempts_while_open() {
    let bus = MemoryBus::default();
    bus.create_topic("jobs", 1);
    let downstream = Arc::new(Downstream::default());
    let subscription = subscribe(&bus, &downstream, 3);
    let metrics = bus.metrics().clone();

    publish(&bus, 0..10).await;
    until(Duration::from_secs(5), "the first records", || {
        downstream.handled.lock().unwrap().len() == 10
    })
    .await;

    downstream.down.store(true, Ordering::SeqCst);
    publish(&bus, 10..60).await;
    tokio::time::sleep(Duration::from_secs(300)).await;
    assert!(entered(&metrics, "open") >= 1.0, "it opened");
    let during: Vec<Call> = downstream.calls.lock().unwrap()[10..].to_vec();
    let probes = entered(&metrics, "half_open") as usize;
    assert_eq!(
        bus.committed("breakers", "jobs").get(&0),
        Some(&10),
        "the records finished before the outage commit while it is open"
    );
    downstream.down.store(false, Ordering::SeqCst);

    until(Duration::from_secs(60), "every record handled", || {
        downstream.handled.lock().unwrap().len() == 60
    })
    .await;
    assert!(bus.records("jobs.dlq").is_empty(), "dead-lettered");
    assert!(during.iter().all(|c| c.down));
    // The window held the first 10 successes, so 10 failures reached 50% and opened it; after
    // that only the one probe of each half-open ran.
    assert_eq!(
        during.len(),
        10 + probes,
        "calls during the outage: {during:?}"
    );
    assert!(
        during.iter().all(|c| c.attempt == 1),
        "an outage's failure spent an attempt: {during:?}"
    );
    // The 9 failures before the one that opened it were ordinary failures, and spent their
    // attempt 1; the opening failure, the probes and the wait spent none: after the outage
    // each record runs at most its second attempt.
    let after: Vec<Call> = downstream.calls.lock().unwrap()[10 + during.len()..].to_vec();
    let spent: Vec<u32> = during[..9].iter().map(|c| c.id).collect();
    for call in &after {
        let expected = if spent.contains(&call.id) { 2 } else { 1 };
        assert!(!call.down);
        assert_eq!(call.attempt, expected, "{call:?}");
    }
    // Cool-downs of 5, 10, then 20 s: about 15 probes in 300 s, not one per record per second.
    assert!((10..=20).contains(&probes), "{probes} probes");
    subscription.stop().await.expect("stops");
    assert_eq!(bus.committed("breakers", "jobs").get(&0), Some(&60));
}

#[tokio::test(start_paused = true)]
async fn an_api_pause_and_the_breaker_do_not_resume_what_the_other_paused() {
    let bus = MemoryBus::default();
    bus.create_topic("jobs", 1);
    let downstream = Arc::new(Downstream::default());
    downstream.down.store(true, Ordering::SeqCst);
    let subscription = subscribe(&bus, &downstream, 3);
    let metrics = bus.metrics().clone();
    let route = PauseTarget::route(ROUTE);

    publish(&bus, 0..8).await;
    until(Duration::from_secs(5), "opens", || {
        entered(&metrics, "open") == 1.0
    })
    .await;

    // The API pauses and resumes: the breaker's pause stays.
    let both = subscription
        .pause(route.clone(), "maintenance")
        .await
        .expect("pauses");
    assert_eq!(both.len(), 2, "{both:?}");
    let left = subscription.resume(route.clone()).await.expect("resumes");
    assert_eq!(left.len(), 1, "{left:?}");
    assert_eq!(left[0].source, PauseSource::Breaker);
    assert!(
        left[0].reason.contains("4 of 4 calls"),
        "the reason says why: {}",
        left[0].reason
    );

    // The API pauses again; the breaker closes: the API's pause stays.
    subscription
        .pause(route.clone(), "maintenance")
        .await
        .expect("pauses");
    downstream.down.store(false, Ordering::SeqCst);
    until(Duration::from_secs(30), "closes", || {
        entered(&metrics, "closed") == 1.0
    })
    .await;
    until(
        Duration::from_secs(5),
        "the admitted records finish",
        || downstream.handled.lock().unwrap().len() == 8,
    )
    .await;
    publish(&bus, [100]).await;
    tokio::time::sleep(Duration::from_secs(30)).await;
    assert!(
        !downstream.handled.lock().unwrap().contains(&100),
        "the breaker's close lifted the API's pause"
    );
    let left = subscription.resume(route).await.expect("resumes");
    assert!(left.is_empty(), "{left:?}");
    until(Duration::from_secs(5), "handled once resumed", || {
        downstream.handled.lock().unwrap().contains(&100)
    })
    .await;
    subscription.stop().await.expect("stops");
}

/// Ids whose records land on `partition` of a two-partition `jobs` topic (the partitioner
/// hashes the key, the same on every bus).
async fn ids_on(partition: i32, count: usize) -> Vec<u32> {
    let scratch = MemoryBus::default();
    scratch.create_topic("jobs", 2);
    let mut ids = Vec::new();
    for id in 1000.. {
        let delivery = scratch
            .publish(&Envelope::new(Job { id }))
            .await
            .expect("publishes");
        if delivery.partition == partition {
            ids.push(id);
            if ids.len() == count {
                return ids;
            }
        }
    }
    unreachable!()
}

/// Breaker state is per replica: the partition whose records held replica A's breaker open
/// moves to replica B, where the route's breaker is closed, and is handled there at once. A,
/// with no record left waiting when its cool-down ends, lifts its pause so that a new record
/// can probe, and closes on that probe's success.
#[tokio::test(start_paused = true)]
async fn a_moved_partition_starts_in_the_new_replicas_state_and_a_new_record_probes() {
    let bus = MemoryBus::default();
    bus.create_topic("jobs", 2);
    let (on_0, on_1) = (ids_on(0, 1).await, ids_on(1, 6).await);
    let a = Arc::new(Downstream::default());
    a.down.store(true, Ordering::SeqCst);
    let replica_a = subscribe(&bus, &a, 3);
    let metrics_a = bus.metrics().clone();

    publish(&bus, on_1.iter().copied()).await;
    until(Duration::from_secs(5), "A opens", || {
        entered(&metrics_a, "open") == 1.0
    })
    .await;
    let calls_in_a = a.calls.lock().unwrap().len();

    // B joins: partition 1 moves to it, with its records, which B's downstream serves.
    let b = Arc::new(Downstream::default());
    let replica_b = subscribe(&bus, &b, 3);
    until(Duration::from_secs(30), "B handles partition 1", || {
        b.handled.lock().unwrap().len() == on_1.len()
    })
    .await;
    assert_eq!(a.calls.lock().unwrap().len(), calls_in_a, "A called again");

    // A's cool-down ends with nothing waiting: its pause is lifted and a new record probes.
    a.down.store(false, Ordering::SeqCst);
    publish(&bus, on_0.iter().copied()).await;
    until(Duration::from_secs(30), "A closes", || {
        entered(&metrics_a, "closed") == 1.0
    })
    .await;
    until(Duration::from_secs(5), "A handles the probe", || {
        a.handled.lock().unwrap().as_slice() == on_0.as_slice()
    })
    .await;
    assert!(bus.records("jobs.dlq").is_empty());
    replica_b.stop().await.expect("B stops");
    replica_a.stop().await.expect("A stops");
}
