//! The bus semantic suite, written once and generic over the bus.
//!
//! Each `pub async fn` is one behaviour every bus must have; a test file supplies a [`Harness`]
//! (a bus plus the inspection a test needs: topic creation, committed positions, the records of
//! a topic) and runs each function in a `#[tokio::test]`. The memory bus runs them in
//! `tests/memory_bus.rs`; the Kafka bus runs the same functions against a real broker.
//!
//! Rules the functions keep so they hold on a real broker:
//! - Every test uses fresh topics and groups ([`Harness::name`]) and registers its handlers with
//!   `HandlerOptions::topic`, so nothing depends on `Event::TOPIC`.
//! - Expected end offsets come from the [`Delivery`] values publishing returned (max offset + 1
//!   per partition, see [`Ends`]), never from the broker's end offsets.
//! - Nothing sleeps and hopes: handlers report to the test over channels, and every wait has a
//!   deadline ([`Harness::patience`]) after which the test fails with what it was waiting for.
//! - A group that has committed nothing starts at the earliest offset, so records published
//!   before a subscription is assigned its partitions are still consumed.
#![allow(dead_code, unreachable_pub)]

use crate::reference::{
    CustomerCreated, CustomerDeleted, CustomerUpdated, ResourceCreated, ResourceDeleted,
    ResourceUpdated, TaskCreated, TaskFields, TaskProcessingRequested, TriggeredBy,
};
use chrono::SubsecRound;
use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::future::Future;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use uuid::Uuid;
use weir::dead_letter_headers as dlh;
use weir::{
    Bus, ConsumerConfig, Ctx, DecodeLimits, Delivery, Envelope, Event, HandlerError,
    HandlerOptions, Headers, Metrics, OutboundRecord, PauseTarget, ProcessingOrder, Publisher,
    RetryPolicy, Router, StopReport, StoredRecord, Subscription, UnhandledPolicy,
    CLOUDEVENTS_CONTENT_TYPE,
};

// ---------------------------------------------------------------------------------------------
// The harness
// ---------------------------------------------------------------------------------------------

/// A bus under test and what the suite needs to observe it.
pub trait Harness {
    /// The bus under test.
    type Bus: Bus;

    /// The bus. Each test builds its own harness, so this is fresh per test.
    fn bus(&self) -> Self::Bus;

    /// The metrics the bus and its subscriptions report into.
    fn metrics(&self) -> Metrics;

    /// Creates `topic` with `partitions` partitions and waits until it can be used.
    fn create_topic(&self, topic: &str, partitions: i32) -> impl Future<Output = ()> + Send;

    /// The committed position (next offset) of each partition of `topic` for `group`.
    /// Partitions with no committed position are absent.
    fn committed(&self, group: &str, topic: &str)
        -> impl Future<Output = HashMap<i32, i64>> + Send;

    /// The records of `topic`, once at least `at_least` are there (or [`patience`] has passed:
    /// then whatever is there, and the caller's assertion fails). May return more than
    /// `at_least`: callers assert the exact count. `at_least == 0` returns what is there now.
    ///
    /// [`patience`]: Harness::patience
    fn records(
        &self,
        topic: &str,
        at_least: usize,
    ) -> impl Future<Output = Vec<StoredRecord>> + Send;

    /// How long any one wait may take before the test fails.
    fn patience(&self) -> Duration {
        Duration::from_secs(10)
    }

    /// How long a test watches for something that must not happen (a paused partition's
    /// records being handled), after a positive sign that it would have happened by then if it
    /// could (later records of another topic were handled). Free on a paused clock.
    fn quiet(&self) -> Duration {
        Duration::from_secs(1)
    }

    /// A fresh topic or group name, unique across runs (a broker may outlive a test run).
    fn name(&self, prefix: &str) -> String {
        format!("weir-{prefix}-{}", Uuid::new_v4().simple())
    }

    /// The consumer settings the suite starts from: frequent commits so tests can watch
    /// positions move while the subscription runs.
    fn consumer_config(&self, group: &str) -> ConsumerConfig {
        ConsumerConfig {
            commit_interval: Duration::from_millis(50),
            drain_timeout: Duration::from_secs(5),
            ..ConsumerConfig::new(group)
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// How an event is put on the wire (the CloudEvents Kafka binding's two modes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The whole CloudEvent as the JSON value (what Weir publishes).
    Structured,
    /// `ce_*` headers and the bare data as the value.
    Binary,
}

/// The record for `envelope` on `topic`, keyed by the event's key.
pub fn record<T: Event>(topic: &str, envelope: &Envelope<T>, mode: Mode) -> OutboundRecord {
    let key = Some(envelope.key().into_bytes());
    match mode {
        Mode::Structured => OutboundRecord {
            topic: topic.to_owned(),
            key,
            value: Some(envelope.to_structured().expect("test events serialize")),
            headers: Headers::new().with("content-type", CLOUDEVENTS_CONTENT_TYPE),
        },
        Mode::Binary => {
            let (headers, value) = envelope.to_binary().expect("test events serialize");
            OutboundRecord {
                topic: topic.to_owned(),
                key,
                value: Some(value),
                headers,
            }
        }
    }
}

/// The expected end of each partition, from what publishing returned: max offset + 1.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ends(pub HashMap<i32, i64>);

impl Ends {
    /// Accounts for one acknowledged record.
    pub fn note(&mut self, delivery: &Delivery) {
        let end = self.0.entry(delivery.partition).or_insert(0);
        *end = (*end).max(delivery.offset + 1);
    }
}

/// Publishes one record, noting where it landed.
pub async fn publish<P: Publisher>(bus: &P, record: OutboundRecord, ends: &mut Ends) -> Delivery {
    let topic = record.topic.clone();
    let delivery = bus
        .publish_record(record)
        .await
        .unwrap_or_else(|e| panic!("publishing to {topic} failed: {e}"));
    assert_eq!(delivery.topic, topic, "delivery names another topic");
    ends.note(&delivery);
    delivery
}

/// Starts a subscription with the harness's consumer settings changed by `adjust`.
pub fn subscribe<H: Harness>(
    h: &H,
    bus: &H::Bus,
    router: Router,
    group: &str,
    adjust: impl FnOnce(ConsumerConfig) -> ConsumerConfig,
) -> Subscription {
    let config = adjust(h.consumer_config(group));
    bus.subscribe(router, config)
        .unwrap_or_else(|e| panic!("subscribing as {group} failed: {e}"))
}

/// Stops a subscription, which must stop cleanly.
pub async fn stop(subscription: Subscription) -> StopReport {
    subscription
        .stop()
        .await
        .expect("the subscription stops cleanly")
}

/// The next message from a handler, or a failure naming what did not arrive in time.
pub async fn recv<T>(rx: &mut mpsc::UnboundedReceiver<T>, patience: Duration, what: &str) -> T {
    match tokio::time::timeout(patience, rx.recv()).await {
        Ok(Some(value)) => value,
        Ok(None) => panic!("the channel closed while waiting for {what}"),
        Err(_) => panic!("waited {patience:?} for {what}"),
    }
}

/// Asserts that no handler message is pending. Only meaningful once every record is final
/// (e.g. after [`wait_committed`]).
pub fn assert_no_more<T: Debug>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) {
    if let Ok(extra) = rx.try_recv() {
        panic!("{what}: unexpected extra message {extra:?}");
    }
}

/// Waits until `group` has committed every partition of `topic` up to `ends`, then asserts it
/// committed exactly that (not past the end).
pub async fn wait_committed<H: Harness>(h: &H, group: &str, topic: &str, ends: &Ends) {
    let deadline = Instant::now() + h.patience();
    loop {
        let committed = h.committed(group, topic).await;
        let reached = ends
            .0
            .iter()
            .all(|(p, end)| committed.get(p).is_some_and(|c| c >= end));
        if reached {
            for (p, end) in &ends.0 {
                assert_eq!(
                    committed.get(p),
                    Some(end),
                    "{group} committed past the end of {topic}/{p}"
                );
            }
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{group} committed {committed:?} on {topic}, expected the ends {:?} within {:?}",
            ends.0,
            h.patience()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The `seq` a test put in an event's details.
pub fn seq_of(details: &Value) -> u64 {
    details["seq"]
        .as_u64()
        .unwrap_or_else(|| panic!("no seq in {details}"))
}

/// A customer event carrying a sequence number, keyed by `key`.
pub fn numbered(key: &str, seq: u64) -> Envelope<CustomerCreated> {
    Envelope::new(CustomerCreated::new(key, json!({ "seq": seq })))
}

/// A retry policy with exact delays (no jitter).
pub fn exact_retry(initial: Duration, coefficient: f64, maximum_attempts: u32) -> RetryPolicy {
    RetryPolicy {
        initial_interval: initial,
        backoff_coefficient: coefficient,
        maximum_interval: Duration::from_secs(60),
        maximum_attempts,
        jitter: 0.0,
        non_retryable_kinds: Vec::new(),
        durable: None,
    }
}

fn header<'a>(record: &'a StoredRecord, name: &str) -> Option<&'a str> {
    record.headers.get_str(name)
}

/// Record values compared as bytes, a null value counting as empty (transports differ there).
fn bytes(value: &Option<Vec<u8>>) -> &[u8] {
    value.as_deref().unwrap_or_default()
}

/// Asserts that `dead` is the dead letter of `original` (published at `at`) with the given kind
/// and reason: original key, value and headers unchanged, and the provenance headers.
fn assert_dead_letter(
    dead: &StoredRecord,
    original: &OutboundRecord,
    at: &Delivery,
    group: &str,
    kind: &str,
    reason: &str,
) {
    let what = format!("dead letter of {}/{}@{}", at.topic, at.partition, at.offset);
    assert_eq!(dead.key, original.key, "{what}: key");
    assert_eq!(bytes(&dead.value), bytes(&original.value), "{what}: value");
    for (name, value) in original.headers.iter() {
        assert_eq!(
            dead.headers.get(name),
            Some(value),
            "{what}: original header {name}"
        );
    }
    let expect = [
        (dlh::ERROR_KIND, kind.to_owned()),
        (dlh::ERROR_REASON, reason.to_owned()),
        (dlh::ORIGINAL_TOPIC, at.topic.clone()),
        (dlh::ORIGINAL_PARTITION, at.partition.to_string()),
        (dlh::ORIGINAL_OFFSET, at.offset.to_string()),
        (dlh::CONSUMER_GROUP, group.to_owned()),
    ];
    for (name, value) in expect {
        assert_eq!(header(dead, name), Some(value.as_str()), "{what}: {name}");
    }
}

/// A handler that forwards every event it gets, with its context, to the test.
pub struct Probe<T> {
    rx: mpsc::UnboundedReceiver<(T, Ctx)>,
}

impl<T: Event + PartialEq + Debug> Probe<T> {
    /// Registers a forwarding handler for `T` on `topic`.
    pub fn register(router: Router, topic: &str) -> (Router, Self) {
        let (tx, rx) = mpsc::unbounded_channel();
        let router = router.on_with(
            move |event: T, ctx: Ctx| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send((event, ctx));
                    Ok(())
                }
            },
            HandlerOptions::new().topic(topic),
        );
        (router, Self { rx })
    }

    /// Receives the event once per delivery (in order) and asserts it equals what was sent:
    /// fields, event id, type, source, subject, time (to the microsecond, as encoded), and the
    /// record coordinates. All deliveries must carry equal metadata.
    pub async fn expect<H: Harness>(
        &mut self,
        h: &H,
        sent: &Envelope<T>,
        deliveries: &[Delivery],
    ) -> Vec<(T, Ctx)> {
        let mut got: Vec<(T, Ctx)> = Vec::new();
        for at in deliveries {
            let what = format!("{} at {}/{}@{}", T::TYPE, at.topic, at.partition, at.offset);
            let (event, ctx) = recv(&mut self.rx, h.patience(), &what).await;
            assert_eq!(event, sent.data, "{what}: fields");
            assert_eq!(ctx.event_id(), sent.meta.id, "{what}: event id");
            assert_eq!(ctx.event().event_type, T::TYPE.as_str(), "{what}: type");
            assert_eq!(ctx.event().source, sent.meta.source, "{what}: source");
            assert_eq!(ctx.event().subject, sent.meta.subject, "{what}: subject");
            assert_eq!(
                ctx.event_time(),
                sent.meta.time.map(|t| t.trunc_subsecs(6)),
                "{what}: time"
            );
            assert_eq!(
                (ctx.topic(), ctx.partition(), ctx.offset()),
                (at.topic.as_str(), at.partition, at.offset),
                "{what}: coordinates"
            );
            assert_eq!(ctx.key_str(), Some(sent.key().as_str()), "{what}: key");
            if let Some((first, first_ctx)) = got.first() {
                assert_eq!(&event, first, "{what}: differs from the first delivery");
                assert_eq!(
                    ctx.event(),
                    first_ctx.event(),
                    "{what}: metadata differs from the first delivery"
                );
            }
            got.push((event, ctx));
        }
        got
    }

    /// Asserts the handler got nothing else (call once every record is final).
    pub fn expect_no_more(&mut self) {
        assert_no_more(&mut self.rx, &format!("handler of {}", T::TYPE));
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Round trips
// ---------------------------------------------------------------------------------------------

fn task_fields(triggered_by: TriggeredBy) -> TaskFields {
    TaskFields::new(
        Uuid::new_v4(),
        "tenant-ü",
        "env-1",
        "file:///data/in.csv",
        "customer",
        triggered_by,
    )
}

async fn publish_modes<P: Publisher, T: Event>(
    bus: &P,
    topic: &str,
    envelope: &Envelope<T>,
    modes: &[Mode],
    ends: &mut Ends,
) -> Vec<Delivery> {
    let mut deliveries = Vec::new();
    for mode in modes {
        deliveries.push(publish(bus, record(topic, envelope, *mode), ends).await);
    }
    deliveries
}

async fn seed_round_trip<H: Harness>(h: &H, modes: &[Mode]) {
    let bus = h.bus();
    let topic = h.name("seeds");
    let group = h.name("seeds-group");
    h.create_topic(&topic, 3).await;

    let router = Router::new();
    let (router, mut task_created) = Probe::<TaskCreated>::register(router, &topic);
    let (router, mut task_requested) = Probe::<TaskProcessingRequested>::register(router, &topic);
    let (router, mut customer_created) = Probe::<CustomerCreated>::register(router, &topic);
    let (router, mut customer_updated) = Probe::<CustomerUpdated>::register(router, &topic);
    let (router, mut customer_deleted) = Probe::<CustomerDeleted>::register(router, &topic);
    let (router, mut resource_created) = Probe::<ResourceCreated>::register(router, &topic);
    let (router, mut resource_updated) = Probe::<ResourceUpdated>::register(router, &topic);
    let (router, mut resource_deleted) = Probe::<ResourceDeleted>::register(router, &topic);
    let subscription = subscribe(h, &bus, router, &group, |c| c);

    let resource = ResourceCreated::new(
        Uuid::new_v4(),
        "2024/05/a1b2.png",
        "image/png",
        "Ünïcødé ✓.png",
    );
    let tc = Envelope::new(TaskCreated::new(task_fields(TriggeredBy::Api)));
    let tr = Envelope::new(TaskProcessingRequested::new(task_fields(
        TriggeredBy::Webhook,
    )))
    .source("/tasks-api");
    let cc = Envelope::new(CustomerCreated::new(
        "cust-1",
        json!({"name": "Ada", "tags": ["a", "b"], "score": 1.5, "address": {"city": "Zürich"}}),
    ));
    let cu = Envelope::new(CustomerUpdated::new(
        "cust-1",
        json!({"email": "ada@example.com"}),
    ));
    let cd = Envelope::new(CustomerDeleted::new("cust-1", json!({"reason": "gdpr"})));
    let changes = BTreeMap::from([
        ("original_name".to_owned(), json!("b.png")),
        ("tags".to_owned(), json!(["x"])),
    ]);
    let ru = Envelope::new(resource.updated(changes));
    let rd = Envelope::new(resource.deleted());
    let rc = Envelope::new(resource);

    let mut ends = Ends::default();
    let at_tc = publish_modes(&bus, &topic, &tc, modes, &mut ends).await;
    let at_tr = publish_modes(&bus, &topic, &tr, modes, &mut ends).await;
    let at_cc = publish_modes(&bus, &topic, &cc, modes, &mut ends).await;
    let at_cu = publish_modes(&bus, &topic, &cu, modes, &mut ends).await;
    let at_cd = publish_modes(&bus, &topic, &cd, modes, &mut ends).await;
    let at_rc = publish_modes(&bus, &topic, &rc, modes, &mut ends).await;
    let at_ru = publish_modes(&bus, &topic, &ru, modes, &mut ends).await;
    let at_rd = publish_modes(&bus, &topic, &rd, modes, &mut ends).await;

    task_created.expect(h, &tc, &at_tc).await;
    task_requested.expect(h, &tr, &at_tr).await;
    customer_created.expect(h, &cc, &at_cc).await;
    customer_updated.expect(h, &cu, &at_cu).await;
    customer_deleted.expect(h, &cd, &at_cd).await;
    resource_created.expect(h, &rc, &at_rc).await;
    resource_updated.expect(h, &ru, &at_ru).await;
    resource_deleted.expect(h, &rd, &at_rd).await;

    wait_committed(h, &group, &topic, &ends).await;
    task_created.expect_no_more();
    task_requested.expect_no_more();
    customer_created.expect_no_more();
    customer_updated.expect_no_more();
    customer_deleted.expect_no_more();
    resource_created.expect_no_more();
    resource_updated.expect_no_more();
    resource_deleted.expect_no_more();
    stop(subscription).await;
}

/// Every seed event, published in structured mode, reaches its typed handler with equal fields,
/// the envelope's event id, type, source, subject and time, and its record coordinates.
pub async fn every_seed_event_round_trips_to_its_typed_handler<H: Harness>(h: &H) {
    seed_round_trip(h, &[Mode::Structured]).await;
}

/// Every seed event published once in structured and once in binary mode reaches the handler
/// twice with equal values and equal metadata.
pub async fn binary_mode_events_reach_the_handler_equal_to_structured_mode<H: Harness>(h: &H) {
    seed_round_trip(h, &[Mode::Structured, Mode::Binary]).await;
}

// ---------------------------------------------------------------------------------------------
// 2. Malformed input
// ---------------------------------------------------------------------------------------------

const MAX_BYTES: usize = 2048;

/// Every kind of undecodable record is dead-lettered with its key, value and headers unchanged
/// and the decode reason; none reaches the handler; a valid record after them is handled and
/// the committed position reaches the end.
pub async fn dead_letters_malformed_records_and_keeps_consuming<H: Harness>(h: &H) {
    let bus = h.bus();
    let topic = h.name("malformed");
    let dlq = format!("{topic}.dlq");
    let group = h.name("malformed-group");
    h.create_topic(&topic, 1).await;
    h.create_topic(&dlq, 1).await;

    let router = Router::new()
        .decode_limits(DecodeLimits {
            max_bytes: MAX_BYTES,
        })
        .unhandled(UnhandledPolicy::DeadLetter);
    let (router, mut handled) = Probe::<TaskCreated>::register(router, &topic);
    let subscription = subscribe(h, &bus, router, &group, |c| c);

    let valid = Envelope::new(TaskCreated::new(task_fields(TriggeredBy::Api)));
    let valid_json: Value =
        serde_json::from_slice(&valid.to_structured().unwrap()).expect("valid JSON");
    let mut missing = valid_json.clone();
    missing["data"]
        .as_object_mut()
        .expect("data is an object")
        .remove("task_id");
    let mut mistyped = valid_json.clone();
    mistyped["data"]["task_id"] = json!(42);
    let mut unknown = valid_json.clone();
    unknown["type"] = json!("task.archived");
    let mut big = task_fields(TriggeredBy::Api);
    big.file_url = format!("file:///{}", "x".repeat(MAX_BYTES));
    let too_large = Envelope::new(TaskCreated::new(big))
        .to_structured()
        .unwrap();
    assert!(too_large.len() > MAX_BYTES);

    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("empty", Vec::new()),
        ("too_large", too_large),
        (
            "invalid_utf8",
            b"{\"specversion\": \"1.0\xff\xfe\"}".to_vec(),
        ),
        ("not_json", b"{\"specversion\": \"1.0\", not json".to_vec()),
        ("missing_field", serde_json::to_vec(&missing).unwrap()),
        ("invalid_field", serde_json::to_vec(&mistyped).unwrap()),
        ("unknown_event_type", serde_json::to_vec(&unknown).unwrap()),
    ];
    let mut ends = Ends::default();
    let mut sent = Vec::new();
    for (reason, value) in cases {
        let original = OutboundRecord {
            topic: topic.clone(),
            key: Some(format!("malformed-{reason}").into_bytes()),
            value: Some(value),
            headers: Headers::new()
                .with("content-type", CLOUDEVENTS_CONTENT_TYPE)
                .with("x-weir-test", format!("kept-{reason}")),
        };
        let at = publish(&bus, original.clone(), &mut ends).await;
        sent.push((reason, original, at));
    }
    let at_valid = publish(&bus, record(&topic, &valid, Mode::Structured), &mut ends).await;

    handled.expect(h, &valid, &[at_valid]).await;
    wait_committed(h, &group, &topic, &ends).await;
    handled.expect_no_more();

    let dead = h.records(&dlq, sent.len()).await;
    assert_eq!(dead.len(), sent.len(), "dead letters: {dead:#?}");
    for (reason, original, at) in &sent {
        let matching: Vec<&StoredRecord> = dead.iter().filter(|d| d.key == original.key).collect();
        assert_eq!(
            matching.len(),
            1,
            "dead letters for {reason}: {matching:#?}"
        );
        assert_dead_letter(matching[0], original, at, &group, "decode", reason);
    }
    let metrics = h.metrics();
    assert_eq!(
        metrics.dead_letter_count(&topic, "decode"),
        sent.len() as u64
    );
    assert_eq!(
        metrics.handled_count(&topic, "unknown", "decode_error"),
        sent.len() as u64
    );
    stop(subscription).await;
}

/// With the default `UnhandledPolicy::Skip`, a record of a type nobody handles is skipped: not
/// dead-lettered, not handed to a handler, and committed.
pub async fn skips_unhandled_event_types_by_default<H: Harness>(h: &H) {
    let bus = h.bus();
    let topic = h.name("unhandled");
    let dlq = format!("{topic}.dlq");
    let group = h.name("unhandled-group");
    h.create_topic(&topic, 1).await;
    h.create_topic(&dlq, 1).await;

    let (router, mut handled) = Probe::<TaskCreated>::register(Router::new(), &topic);
    let subscription = subscribe(h, &bus, router, &group, |c| c);

    let other = Envelope::new(CustomerCreated::new("cust-9", json!({})));
    let valid = Envelope::new(TaskCreated::new(task_fields(TriggeredBy::Manual)));
    let mut ends = Ends::default();
    publish(&bus, record(&topic, &other, Mode::Structured), &mut ends).await;
    let at_valid = publish(&bus, record(&topic, &valid, Mode::Structured), &mut ends).await;

    handled.expect(h, &valid, &[at_valid]).await;
    wait_committed(h, &group, &topic, &ends).await;
    handled.expect_no_more();
    let dead = h.records(&dlq, 0).await;
    assert!(dead.is_empty(), "unexpected dead letters: {dead:#?}");
    assert_eq!(h.metrics().handled_count(&topic, "unknown", "skipped"), 1);
    stop(subscription).await;
}

// ---------------------------------------------------------------------------------------------
// 3. Retries
// ---------------------------------------------------------------------------------------------

/// A handler that fails retryably twice and then succeeds is called exactly three times, at
/// least the policy's backoff apart, and nothing is dead-lettered. Returns the two gaps between
/// calls (on a paused clock with no jitter they equal the policy's delays exactly).
pub async fn retries_retryable_failures_with_backoff<H: Harness>(
    h: &H,
    policy: RetryPolicy,
) -> Vec<Duration> {
    assert!(policy.maximum_attempts == 0 || policy.maximum_attempts >= 3);
    let bus = h.bus();
    let topic = h.name("retry");
    let dlq = format!("{topic}.dlq");
    let group = h.name("retry-group");
    h.create_topic(&topic, 1).await;
    h.create_topic(&dlq, 1).await;

    let (tx, mut calls) = mpsc::unbounded_channel::<(u32, Instant)>();
    let handler = move |_: CustomerCreated, ctx: Ctx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send((ctx.attempt(), Instant::now()));
            if ctx.attempt() <= 2 {
                Err(HandlerError::retryable("flaky dependency"))
            } else {
                Ok(())
            }
        }
    };
    let router = Router::new().on_with(
        handler,
        HandlerOptions::new()
            .topic(&topic)
            .retry(policy.clone())
            .name("flaky"),
    );
    let subscription = subscribe(h, &bus, router, &group, |c| c);

    let mut ends = Ends::default();
    publish(
        &bus,
        record(&topic, &numbered("k", 0), Mode::Structured),
        &mut ends,
    )
    .await;
    let mut times = Vec::new();
    for expected in 1..=3 {
        let (attempt, at) = recv(&mut calls, h.patience(), &format!("call {expected}")).await;
        assert_eq!(attempt, expected, "attempt numbers count from 1");
        times.push(at);
    }
    wait_committed(h, &group, &topic, &ends).await;
    assert_no_more(&mut calls, "a handler that succeeded on its third call");
    let dead = h.records(&dlq, 0).await;
    assert!(dead.is_empty(), "unexpected dead letters: {dead:#?}");
    stop(subscription).await;

    let gaps: Vec<Duration> = times.windows(2).map(|w| w[1] - w[0]).collect();
    for (i, gap) in gaps.iter().enumerate() {
        let delay = policy.backoff(i as u32 + 1);
        assert!(
            *gap >= delay,
            "gap {gap:?} after attempt {} is shorter than the backoff {delay:?}",
            i + 1
        );
    }
    gaps
}

fn fast_retry(maximum_attempts: u32) -> RetryPolicy {
    exact_retry(Duration::from_millis(10), 2.0, maximum_attempts)
}

/// Runs one record through a handler built by `make` (given the call counter) and returns the
/// single dead letter it must produce, with the original record, its delivery and the group.
async fn one_dead_letter<H, F, Fut>(
    h: &H,
    prefix: &str,
    handler_name: &str,
    policy: RetryPolicy,
    make: impl FnOnce(Arc<AtomicU32>) -> F,
) -> (StoredRecord, OutboundRecord, Delivery, String, u32)
where
    H: Harness,
    F: Fn(CustomerCreated, Ctx) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<(), HandlerError>> + Send + 'static,
{
    let bus = h.bus();
    let topic = h.name(prefix);
    let dlq = format!("{topic}.dlq");
    let group = h.name(&format!("{prefix}-group"));
    h.create_topic(&topic, 1).await;
    h.create_topic(&dlq, 1).await;

    let calls = Arc::new(AtomicU32::new(0));
    let router = Router::new().on_with(
        make(calls.clone()),
        HandlerOptions::new()
            .topic(&topic)
            .retry(policy)
            .name(handler_name),
    );
    let subscription = subscribe(h, &bus, router, &group, |c| c);
    let mut ends = Ends::default();
    let original = record(&topic, &numbered("k", 0), Mode::Structured);
    let at = publish(&bus, original.clone(), &mut ends).await;
    wait_committed(h, &group, &topic, &ends).await;
    let dead = h.records(&dlq, 1).await;
    assert_eq!(dead.len(), 1, "dead letters: {dead:#?}");
    stop(subscription).await;
    let calls = calls.load(Ordering::SeqCst);
    let dead = dead.into_iter().next().expect("one dead letter");
    assert_eq!(header(&dead, dlh::HANDLER), Some(handler_name));
    (dead, original, at, group, calls)
}

/// A handler that always fails retryably is called exactly `maximum_attempts` times, then the
/// record is dead-lettered as `retries_exhausted` with `weir.attempts` = that number.
pub async fn dead_letters_after_retries_are_exhausted<H: Harness>(h: &H) {
    let (dead, original, at, group, calls) =
        one_dead_letter(h, "exhausted", "always_down", fast_retry(3), |calls| {
            move |_: CustomerCreated, _: Ctx| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(HandlerError::retryable("database is down"))
                }
            }
        })
        .await;
    assert_eq!(calls, 3, "calls before giving up");
    assert_dead_letter(
        &dead,
        &original,
        &at,
        &group,
        "retries_exhausted",
        "retries_exhausted",
    );
    assert_eq!(header(&dead, dlh::ATTEMPTS), Some("3"));
    let message = header(&dead, dlh::ERROR_MESSAGE).unwrap_or_default();
    assert!(
        message.contains("database is down"),
        "error message {message:?}"
    );
}

/// An `Acknowledged` failure is not retried: one call, dead-lettered as `acknowledged`.
pub async fn dead_letters_acknowledged_failures_without_retrying<H: Harness>(h: &H) {
    let (dead, original, at, group, calls) =
        one_dead_letter(h, "acknowledged", "rejects", fast_retry(5), |calls| {
            move |_: CustomerCreated, _: Ctx| {
                let calls = calls.clone();
                async move {
                    calls.fetch_add(1, Ordering::SeqCst);
                    Err(HandlerError::acknowledged("no such customer"))
                }
            }
        })
        .await;
    assert_eq!(calls, 1, "an acknowledged failure is not retried");
    assert_dead_letter(
        &dead,
        &original,
        &at,
        &group,
        "acknowledged",
        "acknowledged",
    );
    assert_eq!(header(&dead, dlh::ATTEMPTS), Some("1"));
    let message = header(&dead, dlh::ERROR_MESSAGE).unwrap_or_default();
    assert!(
        message.contains("no such customer"),
        "error message {message:?}"
    );
}

/// A panicking handler's record is dead-lettered as `panic` after one call, and the
/// subscription keeps going: the next record of the same key is handled and committed.
pub async fn dead_letters_panics_and_keeps_consuming<H: Harness>(h: &H) {
    let bus = h.bus();
    let topic = h.name("panic");
    let dlq = format!("{topic}.dlq");
    let group = h.name("panic-group");
    h.create_topic(&topic, 1).await;
    h.create_topic(&dlq, 1).await;

    let panics = Arc::new(AtomicU32::new(0));
    let (tx, mut handled) = mpsc::unbounded_channel::<u64>();
    let counter = panics.clone();
    let handler = move |event: CustomerCreated, _: Ctx| {
        let (tx, counter) = (tx.clone(), counter.clone());
        async move {
            let seq = seq_of(&event.details);
            if seq == 0 {
                counter.fetch_add(1, Ordering::SeqCst);
                panic!("handler bug on seq 0");
            }
            let _ = tx.send(seq);
            Ok(())
        }
    };
    let router = Router::new().on_with(
        handler,
        HandlerOptions::new()
            .topic(&topic)
            .retry(fast_retry(3))
            .name("buggy"),
    );
    let subscription = subscribe(h, &bus, router, &group, |c| c);

    let mut ends = Ends::default();
    let first = record(&topic, &numbered("k", 0), Mode::Structured);
    let at_first = publish(&bus, first.clone(), &mut ends).await;
    publish(
        &bus,
        record(&topic, &numbered("k", 1), Mode::Structured),
        &mut ends,
    )
    .await;

    assert_eq!(recv(&mut handled, h.patience(), "seq 1").await, 1);
    wait_committed(h, &group, &topic, &ends).await;
    assert_no_more(&mut handled, "handler after the panic");
    assert_eq!(panics.load(Ordering::SeqCst), 1, "a panic is not retried");
    let dead = h.records(&dlq, 1).await;
    assert_eq!(dead.len(), 1, "dead letters: {dead:#?}");
    assert_dead_letter(&dead[0], &first, &at_first, &group, "panic", "panic");
    assert_eq!(header(&dead[0], dlh::HANDLER), Some("buggy"));
    let message = header(&dead[0], dlh::ERROR_MESSAGE).unwrap_or_default();
    assert!(
        message.contains("handler bug on seq 0"),
        "error message {message:?}"
    );
    stop(subscription).await;
}

/// Stop during a retry backoff ends the backoff at once (it does not wait for the delay nor for
/// the drain timeout): the record is abandoned, neither dead-lettered nor committed, and the
/// handler is not called again.
pub async fn stop_during_a_retry_backoff_abandons_the_record_at_once<H: Harness>(h: &H) {
    let bus = h.bus();
    let topic = h.name("backoff-stop");
    let dlq = format!("{topic}.dlq");
    let group = h.name("backoff-stop-group");
    h.create_topic(&topic, 1).await;
    h.create_topic(&dlq, 1).await;

    let (tx, mut calls) = mpsc::unbounded_channel::<u32>();
    let handler = move |_: CustomerCreated, ctx: Ctx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(ctx.attempt());
            Err(HandlerError::retryable("down for a while"))
        }
    };
    let hour = Duration::from_secs(3600);
    let router = Router::new().on_with(
        handler,
        HandlerOptions::new()
            .topic(&topic)
            .retry(exact_retry(hour, 1.0, 5)),
    );
    let drain_timeout = Duration::from_secs(5);
    let subscription = subscribe(h, &bus, router, &group, |c| c.drain_timeout(drain_timeout));

    let mut ends = Ends::default();
    publish(
        &bus,
        record(&topic, &numbered("k", 0), Mode::Structured),
        &mut ends,
    )
    .await;
    assert_eq!(recv(&mut calls, h.patience(), "the first call").await, 1);

    let started = Instant::now();
    let report = stop(subscription).await;
    let took = started.elapsed();
    assert!(
        took < drain_timeout,
        "stop took {took:?}: it waited out the backoff or the drain timeout"
    );
    assert_eq!(report.abandoned, 1, "{report:?}");
    assert!(report.committed.is_empty(), "{report:?}");
    assert!(h.committed(&group, &topic).await.is_empty());
    assert_no_more(&mut calls, "handler after the stop");
    let dead = h.records(&dlq, 0).await;
    assert!(dead.is_empty(), "unexpected dead letters: {dead:#?}");
}

// ---------------------------------------------------------------------------------------------
// 4. Fan-out
// ---------------------------------------------------------------------------------------------

/// Two handlers for one type: the failing one is dead-lettered under its own name and the
/// successful one runs exactly once (its success is not repeated because of the other).
pub async fn fan_out_dead_letters_only_the_failing_handler<H: Harness>(h: &H) {
    let bus = h.bus();
    let topic = h.name("fanout");
    let dlq = format!("{topic}.dlq");
    let group = h.name("fanout-group");
    h.create_topic(&topic, 1).await;
    h.create_topic(&dlq, 1).await;

    let ok_calls = Arc::new(AtomicU32::new(0));
    let failed_calls = Arc::new(AtomicU32::new(0));
    let (tx, mut handled) = mpsc::unbounded_channel::<Uuid>();
    let counter = ok_calls.clone();
    let succeeds = move |_: CustomerCreated, ctx: Ctx| {
        let (tx, counter) = (tx.clone(), counter.clone());
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            let _ = tx.send(ctx.event_id());
            Ok(())
        }
    };
    let counter = failed_calls.clone();
    let fails = move |_: CustomerCreated, _: Ctx| {
        let counter = counter.clone();
        async move {
            counter.fetch_add(1, Ordering::SeqCst);
            Err(HandlerError::acknowledged("not for me"))
        }
    };
    let options = HandlerOptions::new().topic(&topic).retry(fast_retry(3));
    let router = Router::new()
        .on_with(succeeds, options.clone().name("fan_out_succeeds"))
        .on_with(fails, options.name("fan_out_fails"));
    let subscription = subscribe(h, &bus, router, &group, |c| c);

    let mut ends = Ends::default();
    let event = numbered("k", 0);
    let original = record(&topic, &event, Mode::Structured);
    let at = publish(&bus, original.clone(), &mut ends).await;

    assert_eq!(
        recv(&mut handled, h.patience(), "the succeeding handler").await,
        event.meta.id
    );
    wait_committed(h, &group, &topic, &ends).await;
    let dead = h.records(&dlq, 1).await;
    assert_eq!(dead.len(), 1, "dead letters: {dead:#?}");
    assert_dead_letter(
        &dead[0],
        &original,
        &at,
        &group,
        "acknowledged",
        "acknowledged",
    );
    assert_eq!(header(&dead[0], dlh::HANDLER), Some("fan_out_fails"));
    assert_eq!(
        ok_calls.load(Ordering::SeqCst),
        1,
        "succeeding handler calls"
    );
    assert_eq!(
        failed_calls.load(Ordering::SeqCst),
        1,
        "failing handler calls"
    );
    assert_no_more(&mut handled, "succeeding handler");
    stop(subscription).await;
}

// ---------------------------------------------------------------------------------------------
// 5. Per-key order under failures
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct KeyLog {
    /// The seq whose handler is running now, if any.
    running: Option<u64>,
    /// Seqs whose outcome is final, in the order they became final.
    finished: Vec<u64>,
}

/// With `ProcessingOrder::Key` (the default), events of one key never overlap and a later event
/// of a key never starts before every earlier one is final, even when handlers fail at random
/// and are retried; each key's events finish in publish order.
pub async fn keeps_per_key_order_under_retries<H: Harness>(h: &H, events: usize, keys: usize) {
    let bus = h.bus();
    let topic = h.name("key-order");
    let group = h.name("key-order-group");
    h.create_topic(&topic, 4).await;

    let logs: Arc<Mutex<HashMap<String, KeyLog>>> = Arc::default();
    let violations: Arc<Mutex<Vec<String>>> = Arc::default();
    let (logs_in, violations_in) = (logs.clone(), violations.clone());
    let handler = move |event: CustomerCreated, ctx: Ctx| {
        let (logs, violations) = (logs_in.clone(), violations_in.clone());
        async move {
            let key = event.customer_id.clone();
            let seq = seq_of(&event.details);
            {
                let mut logs = logs.lock().unwrap();
                let log = logs.entry(key.clone()).or_default();
                if let Some(running) = log.running {
                    violations.lock().unwrap().push(format!(
                        "{key}: seq {seq} (attempt {}) started while seq {running} was running",
                        ctx.attempt()
                    ));
                }
                if log.finished.len() as u64 != seq {
                    violations.lock().unwrap().push(format!(
                        "{key}: seq {seq} (attempt {}) started when {:?} were final",
                        ctx.attempt(),
                        log.finished
                    ));
                }
                log.running = Some(seq);
            }
            // Let other keys' handlers interleave with this one.
            tokio::time::sleep(Duration::from_micros(fastrand::u64(0..1_000))).await;
            let fail = ctx.attempt() == 1 && fastrand::u8(0..3) == 0;
            let mut logs = logs.lock().unwrap();
            let log = logs.entry(key).or_default();
            log.running = None;
            if fail {
                return Err(HandlerError::retryable("transient failure"));
            }
            log.finished.push(seq);
            Ok(())
        }
    };
    let router = Router::new().on_with(
        handler,
        HandlerOptions::new()
            .topic(&topic)
            .retry(exact_retry(Duration::from_millis(2), 1.5, 5)),
    );
    let subscription = subscribe(h, &bus, router, &group, |c| c.order(ProcessingOrder::Key));

    let mut rng = fastrand::Rng::new();
    let mut next_seq: HashMap<String, u64> = HashMap::new();
    let mut ends = Ends::default();
    for _ in 0..events {
        let key = format!("customer-{}", rng.usize(..keys));
        let seq = next_seq.entry(key.clone()).or_default();
        let event = numbered(&key, *seq);
        *seq += 1;
        publish(&bus, record(&topic, &event, Mode::Structured), &mut ends).await;
    }
    wait_committed(h, &group, &topic, &ends).await;
    stop(subscription).await;

    let violations = violations.lock().unwrap();
    assert!(
        violations.is_empty(),
        "{} order violations, first ones: {:#?}",
        violations.len(),
        &violations[..violations.len().min(10)]
    );
    let logs = logs.lock().unwrap();
    for (key, count) in &next_seq {
        let finished = logs
            .get(key)
            .map(|l| l.finished.clone())
            .unwrap_or_default();
        assert_eq!(
            finished,
            (0..*count).collect::<Vec<_>>(),
            "{key}: final order"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 6. Stop with an unfinished record
// ---------------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Blocked(u64),
    Handled(u64),
}

/// After a stop, the committed position is the last finished record + 1 of the contiguous
/// prefix: a record whose handler has not finished is not committed, nor is anything after it
/// (even records that finished, under `Key` or `Unordered` order); the stop reports it
/// abandoned, and the next subscription of the group gets it (and what follows) again.
///
/// One partition; the 6th of 8 records blocks forever. Under `Partition` order the records
/// after it wait behind it; under `Key` order they have other keys and finish.
pub async fn stop_commits_only_finished_records_and_redelivers_the_rest<H: Harness>(
    h: &H,
    order: ProcessingOrder,
) {
    const BLOCKED: u64 = 5;
    const TOTAL: u64 = 8;
    let bus = h.bus();
    let topic = h.name("unfinished");
    let group = h.name("unfinished-group");
    h.create_topic(&topic, 1).await;

    let never = Arc::new(Notify::new());
    let (tx, mut steps) = mpsc::unbounded_channel::<Step>();
    let handler = move |event: CustomerCreated, _: Ctx| {
        let (tx, never) = (tx.clone(), never.clone());
        async move {
            let seq = seq_of(&event.details);
            if seq == BLOCKED {
                let _ = tx.send(Step::Blocked(seq));
                never.notified().await;
            }
            let _ = tx.send(Step::Handled(seq));
            Ok(())
        }
    };
    let router = Router::new().on_with(handler, HandlerOptions::new().topic(&topic));
    let subscription = subscribe(h, &bus, router, &group, |c| {
        c.order(order).drain_timeout(Duration::from_millis(200))
    });

    let mut ends = Ends::default();
    let mut sent = Vec::new();
    for seq in 0..TOTAL {
        let key = if seq == BLOCKED {
            "slow".to_owned()
        } else {
            format!("k{}", seq % 3)
        };
        let event = numbered(&key, seq);
        let at = publish(&bus, record(&topic, &event, Mode::Structured), &mut ends).await;
        assert_eq!(at.partition, 0);
        sent.push((event, at));
    }
    let mut expected: Vec<Step> = (0..BLOCKED).map(Step::Handled).collect();
    expected.push(Step::Blocked(BLOCKED));
    if order != ProcessingOrder::Partition {
        expected.extend((BLOCKED + 1..TOTAL).map(Step::Handled));
    }
    let mut got = Vec::new();
    for _ in 0..expected.len() {
        got.push(
            recv(
                &mut steps,
                h.patience(),
                &format!("{expected:?}, got {got:?}"),
            )
            .await,
        );
    }
    if order == ProcessingOrder::Partition {
        assert_eq!(got, expected, "partition order");
    } else {
        got.sort();
        expected.sort();
        assert_eq!(got, expected);
    }

    let report = stop(subscription).await;
    let blocked_at = sent[BLOCKED as usize].1.offset;
    assert!(
        report.abandoned >= 1,
        "the blocked record is reported abandoned: {report:?}"
    );
    assert_eq!(report.committed, vec![(topic.clone(), 0, blocked_at)]);
    assert_eq!(
        h.committed(&group, &topic).await,
        HashMap::from([(0, blocked_at)]),
        "committed after stop"
    );
    assert_no_more(&mut steps, "handler after the stop");

    // The next member of the group starts at the unfinished record.
    let (tx, mut again) = mpsc::unbounded_channel::<(u64, Uuid)>();
    let handler = move |event: CustomerCreated, ctx: Ctx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send((seq_of(&event.details), ctx.event_id()));
            Ok(())
        }
    };
    let router = Router::new().on_with(handler, HandlerOptions::new().topic(&topic));
    let subscription = subscribe(h, &bus, router, &group, |c| c.order(order));
    let mut want: Vec<(u64, Uuid)> = sent[BLOCKED as usize..]
        .iter()
        .map(|(event, _)| (seq_of(&event.data.details), event.meta.id))
        .collect();
    let mut redelivered = Vec::new();
    for _ in 0..want.len() {
        let what = format!("redelivery of {want:?}, got {redelivered:?}");
        redelivered.push(recv(&mut again, h.patience(), &what).await);
    }
    if order == ProcessingOrder::Partition {
        assert_eq!(redelivered, want, "redelivered in partition order");
    } else {
        redelivered.sort();
        want.sort();
        assert_eq!(redelivered, want, "redelivered");
    }
    wait_committed(h, &group, &topic, &ends).await;
    assert_no_more(&mut again, "redelivering subscription");
    stop(subscription).await;
}

// ---------------------------------------------------------------------------------------------
// 7. Exactly once without crashes, order per key, at volume
// ---------------------------------------------------------------------------------------------

type Seen = Arc<Mutex<Vec<(String, i32, i64, Uuid)>>>;

fn recording<T: Event>(
    seen: Seen,
) -> impl Fn(T, Ctx) -> std::future::Ready<Result<(), HandlerError>> + Clone + Send + Sync + 'static
{
    move |_: T, ctx: Ctx| {
        seen.lock().unwrap().push((
            ctx.key_str().unwrap_or_default().to_owned(),
            ctx.partition(),
            ctx.offset(),
            ctx.event_id(),
        ));
        std::future::ready(Ok(()))
    }
}

/// `events` random customer events (three types) over `keys` keys and `partitions` partitions:
/// with no crash, every event is handled exactly once, and each key's events in offset order.
pub async fn handles_every_event_exactly_once_in_key_order<H: Harness>(
    h: &H,
    events: usize,
    partitions: i32,
    keys: usize,
) {
    let bus = h.bus();
    let topic = h.name("volume");
    let group = h.name("volume-group");
    h.create_topic(&topic, partitions).await;

    let seen: Seen = Arc::default();
    let options = || HandlerOptions::new().topic(&topic);
    let router = Router::new()
        .on_with(recording::<CustomerCreated>(seen.clone()), options())
        .on_with(recording::<CustomerUpdated>(seen.clone()), options())
        .on_with(recording::<CustomerDeleted>(seen.clone()), options());
    let subscription = subscribe(h, &bus, router, &group, |c| c);

    let mut rng = fastrand::Rng::new();
    let mut records = Vec::with_capacity(events);
    let mut ids = Vec::with_capacity(events);
    for n in 0..events {
        let key = format!("key-{}", rng.usize(..keys));
        let details = json!({ "seq": n });
        let (id, record) = match rng.u8(0..3) {
            0 => {
                let e = Envelope::new(CustomerCreated::new(&key, details));
                (e.meta.id, record(&topic, &e, Mode::Structured))
            }
            1 => {
                let e = Envelope::new(CustomerUpdated::new(&key, details));
                (e.meta.id, record(&topic, &e, Mode::Structured))
            }
            _ => {
                let e = Envelope::new(CustomerDeleted::new(&key, details));
                (e.meta.id, record(&topic, &e, Mode::Structured))
            }
        };
        records.push(record);
        ids.push(id);
    }
    // Publish in concurrent batches; what each key's order must be comes from the offsets the
    // broker assigned, not from the publish order.
    let mut ends = Ends::default();
    let mut deliveries = Vec::with_capacity(events);
    for batch in records.chunks(64) {
        let sends = batch.iter().map(|r| bus.publish_record(r.clone()));
        for result in futures_util::future::join_all(sends).await {
            let delivery = result.unwrap_or_else(|e| panic!("publish failed: {e}"));
            ends.note(&delivery);
            deliveries.push(delivery);
        }
    }
    wait_committed(h, &group, &topic, &ends).await;
    stop(subscription).await;

    let seen = seen.lock().unwrap();
    let mut counts: HashMap<Uuid, usize> = HashMap::new();
    for (_, _, _, id) in seen.iter() {
        *counts.entry(*id).or_default() += 1;
    }
    let missing = ids.iter().filter(|id| !counts.contains_key(id)).count();
    let duplicated = counts.values().filter(|c| **c > 1).count();
    assert_eq!(
        (seen.len(), missing, duplicated),
        (events, 0, 0),
        "(handled, missing, duplicated)"
    );

    let mut expected: HashMap<String, Vec<(i32, i64)>> = HashMap::new();
    for (record, at) in records.iter().zip(&deliveries) {
        let key = String::from_utf8(record.key.clone().expect("keyed")).expect("UTF-8 key");
        expected
            .entry(key)
            .or_default()
            .push((at.partition, at.offset));
    }
    let mut actual: HashMap<String, Vec<(i32, i64)>> = HashMap::new();
    for (key, partition, offset, _) in seen.iter() {
        actual
            .entry(key.clone())
            .or_default()
            .push((*partition, *offset));
    }
    for (key, mut want) in expected {
        want.sort_unstable();
        assert_eq!(actual.get(&key), Some(&want), "{key}: handled order");
    }
}

// ---------------------------------------------------------------------------------------------
// 8. Stop drains
// ---------------------------------------------------------------------------------------------

#[derive(Debug, PartialEq, Eq)]
enum Drain {
    Started(u64),
    Finished(u64),
}

/// A handler still running when stop is requested is allowed to finish (within the drain
/// timeout), and its record is committed by the stop.
pub async fn stop_lets_running_handlers_finish_and_commits_them<H: Harness>(h: &H) {
    let bus = h.bus();
    let topic = h.name("drain");
    let group = h.name("drain-group");
    h.create_topic(&topic, 1).await;

    let release = Arc::new(Notify::new());
    let (tx, mut steps) = mpsc::unbounded_channel::<Drain>();
    let gate = release.clone();
    let handler = move |event: CustomerCreated, _: Ctx| {
        let (tx, gate) = (tx.clone(), gate.clone());
        async move {
            let seq = seq_of(&event.details);
            let _ = tx.send(Drain::Started(seq));
            if seq == 2 {
                gate.notified().await;
            }
            let _ = tx.send(Drain::Finished(seq));
            Ok(())
        }
    };
    let router = Router::new().on_with(handler, HandlerOptions::new().topic(&topic));
    let subscription = subscribe(h, &bus, router, &group, |c| c.drain_timeout(h.patience()));

    let mut ends = Ends::default();
    let mut last = None;
    for seq in 0..3 {
        let event = numbered("k", seq);
        last = Some(publish(&bus, record(&topic, &event, Mode::Structured), &mut ends).await);
    }
    let last = last.expect("published");
    for step in [
        Drain::Started(0),
        Drain::Finished(0),
        Drain::Started(1),
        Drain::Finished(1),
        Drain::Started(2),
    ] {
        assert_eq!(
            recv(&mut steps, h.patience(), &format!("{step:?}")).await,
            step
        );
    }

    let requested = subscription.shutdown_token();
    let stopping = tokio::spawn(subscription.stop());
    tokio::time::timeout(h.patience(), requested.cancelled())
        .await
        .expect("stop was requested");
    let before = commits(&h.metrics(), "success");
    release.notify_one();
    let report = tokio::time::timeout(h.patience() * 2, stopping)
        .await
        .expect("stop returns within the drain timeout")
        .expect("the stop task did not panic")
        .expect("the subscription stops cleanly");

    assert_eq!(
        recv(&mut steps, h.patience(), "the handler to finish").await,
        Drain::Finished(2)
    );
    assert_eq!(report.abandoned, 0, "{report:?}");
    let end = ends.0[&last.partition];
    assert_eq!(report.committed, vec![(topic.clone(), last.partition, end)]);
    assert_eq!(
        h.committed(&group, &topic).await,
        HashMap::from([(last.partition, end)])
    );
    assert!(
        commits(&h.metrics(), "success") > before,
        "the final commit's answer is counted before stop returns"
    );
}

/// `weir_commits_total{result}` as the metrics render it.
fn commits(metrics: &Metrics, result: &str) -> f64 {
    let series = format!("weir_commits_total{{result=\"{result}\"}} ");
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(&series)?.parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------------------------------------
// Consumer groups
// ---------------------------------------------------------------------------------------------

/// Handles records until every `seq` in `wanted` has been seen; returns who handled what:
/// `(member, partition, seq)`.
async fn handled_until(
    rx: &mut mpsc::UnboundedReceiver<(usize, i32, u64)>,
    wanted: std::ops::Range<u64>,
    patience: Duration,
) -> Vec<(usize, i32, u64)> {
    let mut missing: std::collections::BTreeSet<u64> = wanted.collect();
    let mut seen = Vec::new();
    while !missing.is_empty() {
        let what = format!("records {missing:?} to be handled");
        let (member, partition, seq) = recv(rx, patience, &what).await;
        missing.remove(&seq);
        seen.push((member, partition, seq));
    }
    seen
}

/// A member of a consumer group on `topic` that reports each record it handles as
/// `(member id, partition, seq)`.
fn group_member(id: usize, topic: &str, tx: &mpsc::UnboundedSender<(usize, i32, u64)>) -> Router {
    let tx = tx.clone();
    Router::new().on_with(
        move |event: CustomerCreated, ctx: Ctx| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((id, ctx.partition(), seq_of(&event.details)));
                Ok(())
            }
        },
        HandlerOptions::new().topic(topic),
    )
}

/// Two subscriptions in one group share the topic's partitions, each partition with one of
/// them; when one stops, the other takes its partitions over, from where it committed.
pub async fn a_group_shares_the_partitions_and_moves_them_when_a_member_stops<H: Harness>(h: &H) {
    let bus = h.bus();
    let topic = h.name("group");
    let group = h.name("group-members");
    h.create_topic(&topic, 4).await;
    let (tx, mut handled) = mpsc::unbounded_channel::<(usize, i32, u64)>();
    let member = |id: usize| group_member(id, &topic, &tx);
    let first = subscribe(h, &bus, member(0), &group, |c| c);
    let second = subscribe(h, &bus, member(1), &group, |c| c);
    let deadline = Instant::now() + h.patience();
    while !(first.health().status().joined && second.health().status().joined) {
        assert!(Instant::now() < deadline, "both members joined the group");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let mut ends = Ends::default();
    let keys = 16;
    for seq in 0..64 {
        let event = numbered(&format!("k{}", seq % keys), seq);
        publish(&bus, record(&topic, &event, Mode::Structured), &mut ends).await;
    }
    let shared = handled_until(&mut handled, 0..64, h.patience()).await;
    let partitions_of =
        |seen: &[(usize, i32, u64)], id: usize| -> std::collections::BTreeSet<i32> {
            seen.iter()
                .filter(|(m, _, _)| *m == id)
                .map(|(_, p, _)| *p)
                .collect()
        };
    let (mine, theirs) = (partitions_of(&shared, 0), partitions_of(&shared, 1));
    assert!(
        !mine.is_empty() && !theirs.is_empty(),
        "both members consumed: {mine:?} and {theirs:?}"
    );
    assert!(
        mine.is_disjoint(&theirs),
        "a partition was consumed by both members: {mine:?} and {theirs:?}"
    );

    stop(second).await;
    for seq in 64..128 {
        let event = numbered(&format!("k{}", seq % keys), seq);
        publish(&bus, record(&topic, &event, Mode::Structured), &mut ends).await;
    }
    let moved = handled_until(&mut handled, 64..128, h.patience() * 2).await;
    assert!(
        moved.iter().all(|(m, _, seq)| *m == 0 || *seq < 64),
        "the stopped member handled records after it stopped: {moved:?}"
    );
    assert_eq!(
        partitions_of(&moved, 0),
        ends.0.keys().copied().collect(),
        "the remaining member took every partition over"
    );
    wait_committed(h, &group, &topic, &ends).await;
    stop(first).await;
}

// ---------------------------------------------------------------------------------------------
// Pausing
// ---------------------------------------------------------------------------------------------

/// The value of `weir_partition_paused{topic,partition,reason}`, if the series exists.
pub fn paused_gauge(metrics: &Metrics, topic: &str, partition: i32, reason: &str) -> Option<i64> {
    let partition = partition.to_string();
    metrics
        .registry()
        .gather()
        .iter()
        .filter(|family| family.name() == "weir_partition_paused")
        .flat_map(|family| family.get_metric())
        .find(|m| {
            let label = |name: &str| {
                m.get_label()
                    .iter()
                    .find(|l| l.name() == name)
                    .map(|l| l.value().to_owned())
            };
            label("topic").as_deref() == Some(topic)
                && label("partition").as_deref() == Some(partition.as_str())
                && label("reason").as_deref() == Some(reason)
        })
        .map(|m| m.get_gauge().get_value() as i64)
}

/// Pausing a topic: the record in flight finishes and its offset is committed, no record
/// published after the pause is handled while another topic's later records are, and on
/// resume every held record is handled once, in order.
pub async fn a_paused_topic_is_not_handled_while_another_flows_and_resumes_in_order<H: Harness>(
    h: &H,
) {
    let bus = h.bus();
    let paused = h.name("paused");
    let other = h.name("flowing");
    let group = h.name("pause-group");
    h.create_topic(&paused, 1).await;
    h.create_topic(&other, 1).await;

    let release = Arc::new(Notify::new());
    let (tx, mut seen) = mpsc::unbounded_channel::<(&'static str, Drain)>();
    let (gate, on_paused) = (release.clone(), tx.clone());
    let paused_handler = move |event: CustomerCreated, _: Ctx| {
        let (tx, gate) = (on_paused.clone(), gate.clone());
        async move {
            let seq = seq_of(&event.details);
            let _ = tx.send(("paused", Drain::Started(seq)));
            if seq == 0 {
                gate.notified().await;
            }
            let _ = tx.send(("paused", Drain::Finished(seq)));
            Ok(())
        }
    };
    let other_handler = move |event: CustomerCreated, _: Ctx| {
        let tx = tx.clone();
        async move {
            let _ = tx.send(("other", Drain::Finished(seq_of(&event.details))));
            Ok(())
        }
    };
    let router = Router::new()
        .on_with(
            paused_handler,
            HandlerOptions::new().topic(&paused).name("paused_route"),
        )
        .on_with(
            other_handler,
            HandlerOptions::new().topic(&other).name("other_route"),
        );
    let subscription = subscribe(h, &bus, router, &group, |c| c);

    let (mut paused_ends, mut other_ends) = (Ends::default(), Ends::default());
    let first = publish(
        &bus,
        record(&paused, &numbered("k", 0), Mode::Structured),
        &mut Ends::default(),
    )
    .await;
    assert_eq!(
        recv(&mut seen, h.patience(), "the first record to start").await,
        ("paused", Drain::Started(0))
    );

    let pauses = subscription
        .pause(PauseTarget::topic(&paused), "maintenance")
        .await
        .expect("the topic pauses");
    assert_eq!(pauses.len(), 1, "{pauses:?}");
    assert_eq!(
        paused_gauge(&h.metrics(), &paused, first.partition, "maintenance"),
        Some(1)
    );
    paused_ends.note(&first);
    for seq in 1..6 {
        let event = numbered("k", seq);
        publish(
            &bus,
            record(&paused, &event, Mode::Structured),
            &mut paused_ends,
        )
        .await;
    }
    for seq in 0..3 {
        let event = numbered("o", seq);
        publish(
            &bus,
            record(&other, &event, Mode::Structured),
            &mut other_ends,
        )
        .await;
    }
    for seq in 0..3 {
        assert_eq!(
            recv(&mut seen, h.patience(), "the other topic's records").await,
            ("other", Drain::Finished(seq))
        );
    }
    // The record in flight finishes and is committed while its partition is paused.
    release.notify_one();
    assert_eq!(
        recv(&mut seen, h.patience(), "the record in flight to finish").await,
        ("paused", Drain::Finished(0))
    );
    let mut in_flight = Ends::default();
    in_flight.note(&first);
    wait_committed(h, &group, &paused, &in_flight).await;
    wait_committed(h, &group, &other, &other_ends).await;
    tokio::time::sleep(h.quiet()).await;
    assert_no_more(&mut seen, "a paused topic's records were handled");

    let pauses = subscription
        .resume(PauseTarget::topic(&paused))
        .await
        .expect("the topic resumes");
    assert!(pauses.is_empty(), "{pauses:?}");
    for seq in 1..6 {
        assert_eq!(
            recv(&mut seen, h.patience(), "the held records, in order").await,
            ("paused", Drain::Started(seq))
        );
        assert_eq!(
            recv(&mut seen, h.patience(), "the held records, in order").await,
            ("paused", Drain::Finished(seq))
        );
    }
    wait_committed(h, &group, &paused, &paused_ends).await;
    assert_no_more(&mut seen, "a record was handled twice");
    assert_eq!(
        paused_gauge(&h.metrics(), &paused, first.partition, "maintenance"),
        Some(0)
    );
    stop(subscription).await;
}

/// A paused topic stays paused for partitions assigned later: a member that paused its topic
/// gives half of it to a joining member (which is not paused and handles them), takes them back
/// when that member leaves, and handles none of them until it resumes.
pub async fn a_topic_pause_covers_partitions_assigned_after_a_rebalance<H: Harness>(h: &H) {
    let bus = h.bus();
    let topic = h.name("pause-rebalance");
    let group = h.name("pause-rebalance-group");
    h.create_topic(&topic, 4).await;
    let (tx, mut handled) = mpsc::unbounded_channel::<(usize, i32, u64)>();
    let member = |id: usize| group_member(id, &topic, &tx);
    let first = subscribe(h, &bus, member(0), &group, |c| c);
    first
        .pause(PauseTarget::topic(&topic), "deploy")
        .await
        .expect("the topic pauses");
    let mut ends = Ends::default();
    let keys = 16;
    for seq in 0..64 {
        let event = numbered(&format!("k{}", seq % keys), seq);
        publish(&bus, record(&topic, &event, Mode::Structured), &mut ends).await;
    }
    let metrics = h.metrics();
    let all_paused =
        |metrics: &Metrics| (0..4).all(|p| paused_gauge(metrics, &topic, p, "deploy") == Some(1));
    let deadline = Instant::now() + h.patience();
    while !all_paused(&metrics) {
        assert!(Instant::now() < deadline, "every partition was paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The joining member takes half the partitions and handles their records; it is not paused.
    let second = subscribe(h, &bus, member(1), &group, |c| c);
    let deadline = Instant::now() + h.patience();
    let mut theirs: BTreeMap<i32, Vec<u64>> = BTreeMap::new();
    let counts: HashMap<i32, usize> = {
        let mut counts = HashMap::new();
        let records = h.records(&topic, 64).await;
        for r in &records {
            *counts.entry(r.partition).or_insert(0) += 1;
        }
        counts
    };
    loop {
        let done = theirs.len() == 2
            && theirs
                .iter()
                .all(|(p, seqs)| seqs.len() == counts.get(p).copied().unwrap_or(0));
        if done {
            break;
        }
        let remaining = deadline.saturating_duration_since(Instant::now());
        let (id, partition, seq) =
            recv(&mut handled, remaining, "the joining member's records").await;
        assert_eq!(
            id, 1,
            "the paused member handled partition {partition}'s record {seq}"
        );
        theirs.entry(partition).or_default().push(seq);
    }

    // It leaves; its partitions come back to the first member, still paused.
    stop(second).await;
    for seq in 64..128 {
        let event = numbered(&format!("k{}", seq % keys), seq);
        publish(&bus, record(&topic, &event, Mode::Structured), &mut ends).await;
    }
    let deadline = Instant::now() + h.patience();
    while !all_paused(&metrics) {
        assert!(
            Instant::now() < deadline,
            "the partitions that came back were paused"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(h.quiet()).await;
    if let Ok(extra) = handled.try_recv() {
        panic!("a record of a paused topic was handled: {extra:?}");
    }

    first
        .resume(PauseTarget::topic(&topic))
        .await
        .expect("the topic resumes");
    let mut last: HashMap<String, u64> = HashMap::new();
    let mut mine = Vec::new();
    let wanted = 128 - theirs.values().map(Vec::len).sum::<usize>();
    while mine.len() < wanted {
        let (id, _, seq) = recv(&mut handled, h.patience(), "the held records").await;
        assert_eq!(id, 0);
        let key = format!("k{}", seq % keys);
        if let Some(before) = last.insert(key.clone(), seq) {
            assert!(before < seq, "key {key}: {seq} after {before}");
        }
        mine.push(seq);
    }
    wait_committed(h, &group, &topic, &ends).await;
    let mut all: Vec<u64> = mine
        .into_iter()
        .chain(theirs.into_values().flatten())
        .collect();
    all.sort_unstable();
    assert_eq!(
        all,
        (0..128).collect::<Vec<_>>(),
        "every record handled once"
    );
    stop(first).await;
}

/// A pause while records are fetched and not yet admitted (the engine's in-flight limit holds
/// them back; on Kafka some sit in the hand-off and some in librdkafka's prefetch, which a
/// pause discards): the admitted ones finish, nothing else is handled, and on resume the rest
/// are handled once each, in order.
pub async fn a_pause_holds_fetched_records_and_resume_hands_each_over_once_in_order<H: Harness>(
    h: &H,
    records: u64,
) {
    let bus = h.bus();
    let topic = h.name("pause-fetched");
    let group = h.name("pause-fetched-group");
    h.create_topic(&topic, 1).await;
    let release = Arc::new(Notify::new());
    let (tx, mut seen) = mpsc::unbounded_channel::<u64>();
    let gate = release.clone();
    let handler = move |event: CustomerCreated, _: Ctx| {
        let (tx, gate) = (tx.clone(), gate.clone());
        async move {
            let seq = seq_of(&event.details);
            if seq == 0 {
                gate.notified().await;
            }
            let _ = tx.send(seq);
            Ok(())
        }
    };
    let mut ends = Ends::default();
    for seq in 0..records {
        let event = numbered("k", seq);
        publish(&bus, record(&topic, &event, Mode::Structured), &mut ends).await;
    }
    let router = Router::new().on_with(handler, HandlerOptions::new().topic(&topic));
    let in_flight = 4;
    let subscription = subscribe(h, &bus, router, &group, |c| {
        c.order(ProcessingOrder::Partition)
            .max_in_flight(in_flight, in_flight)
    });
    // Record 0 holds its lane; the engine admits up to its limit behind it and no more.
    let metrics = h.metrics();
    let deadline = Instant::now() + h.patience();
    while metrics.registry().gather().iter().all(|f| {
        f.name() != "weir_in_flight_messages"
            || f.get_metric()[0].get_gauge().get_value() < in_flight as f64
    }) {
        assert!(Instant::now() < deadline, "the engine admitted its limit");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    subscription
        .pause(PauseTarget::topic(&topic), "hold")
        .await
        .expect("the topic pauses");
    release.notify_one();
    for seq in 0..in_flight as u64 {
        assert_eq!(
            recv(&mut seen, h.patience(), "the admitted records").await,
            seq
        );
    }
    let mut admitted = Ends::default();
    admitted.0.insert(0, in_flight as i64);
    wait_committed(h, &group, &topic, &admitted).await;
    tokio::time::sleep(h.quiet()).await;
    assert_no_more(&mut seen, "a paused partition's record was handled");

    subscription
        .resume(PauseTarget::topic(&topic))
        .await
        .expect("the topic resumes");
    for seq in in_flight as u64..records {
        assert_eq!(
            recv(&mut seen, h.patience(), "the held records, in order").await,
            seq
        );
    }
    wait_committed(h, &group, &topic, &ends).await;
    assert_no_more(&mut seen, "a record was handled twice");
    stop(subscription).await;
}

/// Pausing a route pauses its topic's partitions (and no other topic's); a topic or route the
/// subscription does not have is refused.
pub async fn a_route_pause_pauses_its_topics_and_unknown_targets_are_refused<H: Harness>(h: &H) {
    let bus = h.bus();
    let (audited, other) = (h.name("route-paused"), h.name("route-flowing"));
    let group = h.name("route-group");
    h.create_topic(&audited, 1).await;
    h.create_topic(&other, 1).await;
    let (tx, mut seen) = mpsc::unbounded_channel::<(&'static str, u64)>();
    let route = |name: &'static str| {
        let tx = tx.clone();
        move |event: CustomerCreated, _: Ctx| {
            let tx = tx.clone();
            async move {
                let _ = tx.send((name, seq_of(&event.details)));
                Ok(())
            }
        }
    };
    let router = Router::new()
        .on_with(
            route("audit"),
            HandlerOptions::new().topic(&audited).name("audit"),
        )
        .on_with(
            route("other"),
            HandlerOptions::new().topic(&other).name("other"),
        );
    let subscription = subscribe(h, &bus, router, &group, |c| c);
    assert_eq!(
        subscription
            .pause(PauseTarget::route("nope"), "x")
            .await
            .map(|_| ()),
        Err(weir::PauseError::UnknownRoute("nope".to_owned()))
    );
    assert_eq!(
        subscription
            .pause(PauseTarget::topic("nope"), "x")
            .await
            .map(|_| ()),
        Err(weir::PauseError::UnknownTopic("nope".to_owned()))
    );
    subscription
        .pause(PauseTarget::route("audit"), "auditor down")
        .await
        .expect("the route pauses");
    let mut ends = Ends::default();
    publish(
        &bus,
        record(&audited, &numbered("a", 0), Mode::Structured),
        &mut ends,
    )
    .await;
    publish(
        &bus,
        record(&other, &numbered("o", 1), Mode::Structured),
        &mut Ends::default(),
    )
    .await;
    assert_eq!(
        recv(&mut seen, h.patience(), "the other route's record").await,
        ("other", 1)
    );
    tokio::time::sleep(h.quiet()).await;
    assert_no_more(&mut seen, "the paused route's record was handled");
    subscription
        .resume(PauseTarget::route("audit"))
        .await
        .expect("the route resumes");
    assert_eq!(
        recv(&mut seen, h.patience(), "the paused route's record").await,
        ("audit", 0)
    );
    wait_committed(h, &group, &audited, &ends).await;
    stop(subscription).await;
}

/// A partition revoked while paused, whose pause is lifted while another member has it, runs
/// when it comes back: the revoke forgot its pause at the source (on Kafka, librdkafka keeps a
/// partition's pause across assignments, so it was resumed there at the revoke).
pub async fn a_partition_revoked_while_paused_runs_when_it_comes_back_resumed<H: Harness>(h: &H) {
    let bus = h.bus();
    let topic = h.name("pause-revoked");
    let group = h.name("pause-revoked-group");
    h.create_topic(&topic, 4).await;
    let (tx, mut handled) = mpsc::unbounded_channel::<(usize, i32, u64)>();
    let member = |id: usize| group_member(id, &topic, &tx);
    let first = subscribe(h, &bus, member(0), &group, |c| c);
    first
        .pause(PauseTarget::topic(&topic), "deploy")
        .await
        .expect("the topic pauses");
    let metrics = h.metrics();
    let paused_count = |metrics: &Metrics| {
        (0..4)
            .filter(|p| paused_gauge(metrics, &topic, *p, "deploy") == Some(1))
            .count()
    };
    let deadline = Instant::now() + h.patience();
    while paused_count(&metrics) < 4 {
        assert!(Instant::now() < deadline, "every partition was paused");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A second member takes two of the paused partitions away.
    let second = subscribe(h, &bus, member(1), &group, |c| c);
    let deadline = Instant::now() + h.patience();
    while paused_count(&metrics) > 2 || !second.health().status().joined {
        assert!(Instant::now() < deadline, "two partitions moved");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first
        .resume(PauseTarget::topic(&topic))
        .await
        .expect("the topic resumes");
    stop(second).await;
    let mut ends = Ends::default();
    for seq in 0..64 {
        let event = numbered(&format!("k{}", seq % 16), seq);
        publish(&bus, record(&topic, &event, Mode::Structured), &mut ends).await;
    }
    let seen = handled_until(&mut handled, 0..64, h.patience() * 2).await;
    assert!(
        seen.iter().all(|(m, _, _)| *m == 0),
        "the stopped member handled records: {seen:?}"
    );
    wait_committed(h, &group, &topic, &ends).await;
    stop(first).await;
}
