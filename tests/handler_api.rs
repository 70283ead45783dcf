//! The handler API as a service author meets it: state, extractors, layers, and the test kit,
//! all on the in-memory bus with Tokio's paused clock.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use weir::testing::TestApp;
use weir::{
    AnyEvent, BatchCtx, BatchResult, BatchWindow, Ctx, Event, EventType, HandlerError, HandlerExt,
    HandlerOptions, HandlerService, Headers, OutboundRecord, Request, RetryPolicy, Router, State,
};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct OrderPlaced {
    order_id: String,
    total_cents: u64,
}

impl Event for OrderPlaced {
    const TYPE: EventType = EventType::new("order.placed");
    const TOPIC: &'static str = "orders";
    fn key(&self) -> String {
        self.order_id.clone()
    }
}

fn order(id: &str, total_cents: u64) -> OrderPlaced {
    OrderPlaced {
        order_id: id.to_owned(),
        total_cents,
    }
}

#[derive(Clone, Default)]
struct Ledger {
    seen: Arc<Mutex<Vec<(String, u32)>>>,
}

async fn record_order(
    order: OrderPlaced,
    State(ledger): State<Ledger>,
    ctx: Ctx,
) -> Result<(), HandlerError> {
    ledger
        .seen
        .lock()
        .unwrap()
        .push((order.order_id, ctx.attempt()));
    Ok(())
}

#[tokio::test(start_paused = true)]
async fn state_reaches_the_handler() {
    let ledger = Ledger::default();
    let mut app = TestApp::new(Router::with_state(ledger.clone()).on(record_order));

    app.publish(order("o-1", 100)).await;
    let outcome = app.next_outcome().await;

    assert!(outcome.is_success(), "{outcome:?}");
    assert_eq!(*ledger.seen.lock().unwrap(), vec![("o-1".to_owned(), 1)]);
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn handlers_take_only_the_arguments_they_need() {
    static CALLS: AtomicU32 = AtomicU32::new(0);
    async fn event_only(_: OrderPlaced) -> Result<(), HandlerError> {
        CALLS.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
    async fn state_only(_: OrderPlaced, State(n): State<u32>) -> Result<(), HandlerError> {
        CALLS.fetch_add(n, Ordering::SeqCst);
        Ok(())
    }
    let router = Router::with_state(10u32).on(event_only).on(state_only);
    let mut app = TestApp::new(router);

    app.publish(order("o-1", 1)).await;
    let outcome = app.next_outcome().await;

    assert!(outcome.is_success(), "{outcome:?}");
    assert_eq!(outcome.handlers.len(), 2, "the event fans out to both");
    assert_eq!(CALLS.load(Ordering::SeqCst), 11);
    app.stop().await;
}

/// A layer of the kind a team writes: refuse orders over a limit before the handler runs.
#[derive(Clone)]
struct RefuseLarge<S> {
    inner: S,
    limit: u64,
}

impl<S> tower::Service<Request<OrderPlaced>> for RefuseLarge<S>
where
    S: tower::Service<Request<OrderPlaced>, Response = (), Error = HandlerError>,
    S::Future: Send + 'static,
{
    type Response = ();
    type Error = HandlerError;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), HandlerError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<OrderPlaced>) -> Self::Future {
        if request.event.total_cents > self.limit {
            let id = request.event.order_id.clone();
            return Box::pin(async move {
                Err(HandlerError::acknowledged(format!(
                    "order {id} is over the limit"
                )))
            });
        }
        Box::pin(self.inner.call(request))
    }
}

#[tokio::test(start_paused = true)]
async fn a_route_layer_can_short_circuit_with_a_handler_error() {
    let ledger = Ledger::default();
    let layer = tower::layer::layer_fn(|inner: HandlerService<OrderPlaced>| RefuseLarge {
        inner,
        limit: 1_000,
    });
    let mut app = TestApp::new(Router::with_state(ledger.clone()).on(record_order.layer(layer)));

    app.publish(order("small", 10)).await;
    app.publish(order("large", 10_000)).await;
    let mut outcomes = vec![app.next_outcome().await, app.next_outcome().await];
    outcomes.sort_by_key(|o| o.dead_letters.len());

    assert!(outcomes[0].is_success(), "{outcomes:?}");
    assert!(
        outcomes[1].is_dead_lettered_with("acknowledged"),
        "{outcomes:?}"
    );
    assert!(outcomes[1].dead_letters[0]
        .message
        .contains("over the limit"));
    assert_eq!(
        *ledger.seen.lock().unwrap(),
        vec![("small".to_owned(), 1)],
        "the refused order never reached the handler"
    );
    assert_eq!(app.dead_letters(OrderPlaced::TOPIC).len(), 1);
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_router_layer_sees_every_event_and_can_short_circuit() {
    #[derive(Clone)]
    struct Maintenance<S>(S);
    impl<S> tower::Service<Request<AnyEvent>> for Maintenance<S>
    where
        S: tower::Service<Request<AnyEvent>, Response = (), Error = HandlerError>,
    {
        type Response = ();
        type Error = HandlerError;
        type Future =
            futures_util::future::Either<S::Future, std::future::Ready<Result<(), HandlerError>>>;
        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
            self.0.poll_ready(cx)
        }
        fn call(&mut self, request: Request<AnyEvent>) -> Self::Future {
            let order = request.event.downcast_ref::<OrderPlaced>();
            if order.is_some_and(|o| o.order_id.starts_with("blocked")) {
                return futures_util::future::Either::Right(std::future::ready(Err(
                    HandlerError::retryable("in maintenance").with_kind("maintenance"),
                )));
            }
            futures_util::future::Either::Left(self.0.call(request))
        }
    }
    let ledger = Ledger::default();
    let router = Router::with_state(ledger.clone())
        .retry(RetryPolicy::no_retries())
        .on(record_order)
        .layer(tower::layer::layer_fn(Maintenance));
    let mut app = TestApp::new(router);

    app.publish(order("blocked-1", 1)).await;
    let outcome = app.next_outcome().await;

    assert!(
        outcome.is_dead_lettered_with("retries_exhausted"),
        "{outcome:?}"
    );
    assert!(ledger.seen.lock().unwrap().is_empty());
    app.stop().await;
}

/// What the audit layers saw: (layer, order id, attempt).
type AuditLog = Arc<Mutex<Vec<(&'static str, String, u32)>>>;

/// A router-wide layer that lets everything through, noting what it saw in a shared log.
#[derive(Clone)]
struct Audit<S> {
    inner: S,
    label: &'static str,
    log: AuditLog,
}

impl<S> tower::Service<Request<AnyEvent>> for Audit<S>
where
    S: tower::Service<Request<AnyEvent>, Response = (), Error = HandlerError>,
{
    type Response = ();
    type Error = HandlerError;
    type Future = S::Future;
    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), HandlerError>> {
        self.inner.poll_ready(cx)
    }
    fn call(&mut self, request: Request<AnyEvent>) -> Self::Future {
        let order = request
            .event
            .downcast_ref::<OrderPlaced>()
            .map(|o| o.order_id.clone())
            .unwrap_or_default();
        self.log
            .lock()
            .unwrap()
            .push((self.label, order, request.ctx.attempt()));
        self.inner.call(request)
    }
}

#[tokio::test(start_paused = true)]
async fn a_router_layer_passes_normal_events_to_the_handler_unchanged() {
    let log = AuditLog::default();
    let audit = |label| {
        let log = log.clone();
        tower::layer::layer_fn(move |inner| Audit {
            inner,
            label,
            log: log.clone(),
        })
    };
    let ledger = Ledger::default();
    let router = Router::with_state(ledger.clone())
        .on(record_order)
        .layer(audit("inner"))
        .layer(audit("outer"));
    let mut app = TestApp::new(router);

    app.publish(order("o-1", 100)).await;
    let first = app.next_outcome().await;
    app.publish(order("o-2", 250)).await;
    let second = app.next_outcome().await;

    for outcome in [&first, &second] {
        assert!(outcome.is_success(), "{outcome:?}");
        assert_eq!(outcome.attempts(), 1, "{outcome:?}");
        assert!(outcome.dead_letters.is_empty(), "{outcome:?}");
    }
    assert_eq!(
        *ledger.seen.lock().unwrap(),
        vec![("o-1".to_owned(), 1), ("o-2".to_owned(), 1)],
        "the handler ran once per event, with the event it was sent"
    );
    // Both layers saw each event, typed, before the handler; the last one added runs first.
    assert_eq!(
        *log.lock().unwrap(),
        vec![
            ("outer", "o-1".to_owned(), 1),
            ("inner", "o-1".to_owned(), 1),
            ("outer", "o-2".to_owned(), 1),
            ("inner", "o-2".to_owned(), 1),
        ]
    );
    assert!(app.dead_letters(OrderPlaced::TOPIC).is_empty());
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_tower_concurrency_limit_works_as_a_route_layer() {
    let running = Arc::new(AtomicU32::new(0));
    let peak = Arc::new(AtomicU32::new(0));
    let handler = {
        let (running, peak) = (running.clone(), peak.clone());
        move |_: OrderPlaced| {
            let (running, peak) = (running.clone(), peak.clone());
            async move {
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                peak.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(10)).await;
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(())
            }
        }
    };
    let router = Router::new().on(handler.layer(tower::limit::ConcurrencyLimitLayer::new(2)));
    let config = weir::ConsumerConfig::new("limits").order(weir::ProcessingOrder::Unordered);
    let mut app = TestApp::with_config(router, config);

    for i in 0..8 {
        app.publish(order(&format!("o-{i}"), 1)).await;
    }
    for _ in 0..8 {
        assert!(app.next_outcome().await.is_success());
    }

    assert_eq!(
        peak.load(Ordering::SeqCst),
        2,
        "never more than the limit at once"
    );
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_test_kit_reports_retry_delays_that_follow_the_policy() {
    let calls = Arc::new(AtomicU32::new(0));
    let flaky = {
        let calls = calls.clone();
        move |_: OrderPlaced| {
            let call = calls.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                if call < 4 {
                    Err(HandlerError::retryable("the stock service is down"))
                } else {
                    Ok(())
                }
            }
        }
    };
    let policy = RetryPolicy {
        initial_interval: Duration::from_secs(1),
        backoff_coefficient: 2.0,
        maximum_interval: Duration::from_secs(3),
        maximum_attempts: 5,
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let router = Router::new().on_with(flaky, HandlerOptions::new().name("flaky").retry(policy));
    let mut app = TestApp::new(router);

    app.publish(order("o-1", 1)).await;
    let outcome = app.next_outcome().await;

    assert!(outcome.is_success(), "{outcome:?}");
    assert_eq!(outcome.attempts(), 4);
    assert_eq!(
        outcome.delays(),
        [
            Duration::from_secs(1),
            Duration::from_secs(2),
            Duration::from_secs(3)
        ],
        "1 s, doubling, capped at the 3 s maximum"
    );
    assert_eq!(outcome.handler("flaky").map(|h| h.attempts), Some(4));
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn the_test_kit_reports_exhausted_retries_and_bad_input() {
    let policy = RetryPolicy {
        maximum_attempts: 3,
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let always_down = |_: OrderPlaced| async { Err(HandlerError::retryable("down")) };
    let mut app = TestApp::new(Router::new().retry(policy.clone()).on(always_down));

    app.publish(order("o-1", 1)).await;
    let outcome = app.next_outcome().await;
    assert!(
        outcome.is_dead_lettered_with("retries_exhausted"),
        "{outcome:?}"
    );
    assert_eq!(outcome.attempts(), 3);
    assert_eq!(outcome.dead_letters[0].attempts, 3);
    let expected: Vec<Duration> = (1..3)
        .map(
            |attempt| match policy.decide(attempt, &HandlerError::retryable("down")) {
                weir::RetryDecision::RetryAfter(delay) => delay,
                other => panic!("attempt {attempt}: {other:?}"),
            },
        )
        .collect();
    assert_eq!(outcome.delays(), expected.as_slice());

    app.publish_record(OutboundRecord {
        topic: OrderPlaced::TOPIC.to_owned(),
        key: Some(b"o-2".to_vec()),
        value: Some(b"{not json".to_vec()),
        headers: Headers::new(),
    })
    .await;
    let outcome = app.next_outcome().await;
    assert!(outcome.is_dead_lettered_with("decode"), "{outcome:?}");
    assert!(outcome.handlers.is_empty(), "no handler saw the bad record");
    assert_eq!(app.dead_letters(OrderPlaced::TOPIC).len(), 2);
    app.stop().await;
}

#[tokio::test(start_paused = true)]
async fn a_batch_with_one_failing_element_dead_letters_exactly_that_element() {
    let batches = Arc::new(Mutex::new(Vec::<Vec<String>>::new()));
    let reserve_all = {
        let batches = batches.clone();
        move |orders: Vec<OrderPlaced>, ctx: BatchCtx| {
            let batches = batches.clone();
            async move {
                assert_eq!(orders.len(), ctx.len(), "one context per event");
                batches
                    .lock()
                    .unwrap()
                    .push(orders.iter().map(|o| o.order_id.clone()).collect());
                orders
                    .iter()
                    .map(|o| match o.total_cents {
                        0 => Err(HandlerError::acknowledged(format!(
                            "order {} is empty",
                            o.order_id
                        ))),
                        _ => Ok(()),
                    })
                    .collect::<BatchResult>()
            }
        }
    };
    let router =
        Router::new().on_batch(reserve_all, BatchWindow::new(10, Duration::from_millis(50)));
    let mut app = TestApp::new(router);
    app.bus().create_topic(OrderPlaced::TOPIC, 1);

    for (i, total) in [5, 7, 0, 9, 3].into_iter().enumerate() {
        app.publish(order(&format!("o-{i}"), total)).await;
    }
    let mut outcomes = Vec::new();
    for _ in 0..5 {
        outcomes.push(app.next_outcome().await);
    }
    let dead_letters = app.dead_letters(OrderPlaced::TOPIC);
    let report = app.stop().await;

    let seen = batches.lock().unwrap().clone();
    assert_eq!(
        seen,
        vec![vec!["o-0", "o-1", "o-2", "o-3", "o-4"]],
        "one call for the five ready records, in offset order"
    );
    let failed: Vec<i64> = outcomes
        .iter()
        .filter(|o| !o.is_success())
        .map(|o| o.offset)
        .collect();
    assert_eq!(failed, vec![2], "exactly the empty order failed");
    assert!(outcomes
        .iter()
        .find(|o| o.offset == 2)
        .unwrap()
        .is_dead_lettered_with("acknowledged"));
    assert_eq!(dead_letters.len(), 1);
    assert_eq!(dead_letters[0].key.as_deref(), Some(&b"o-2"[..]));
    assert_eq!(
        report.committed,
        vec![(OrderPlaced::TOPIC.to_owned(), 0, 5)],
        "every element, the dead-lettered one included, is committed"
    );
}

#[tokio::test(start_paused = true)]
async fn a_retryable_batch_element_is_retried_alone_in_a_later_batch() {
    let batches = Arc::new(Mutex::new(Vec::<Vec<(String, u32)>>::new()));
    let flaky_once = {
        let batches = batches.clone();
        move |orders: Vec<OrderPlaced>, ctx: BatchCtx| {
            let batches = batches.clone();
            async move {
                let attempts: Vec<u32> = ctx.contexts().iter().map(|c| c.attempt()).collect();
                batches.lock().unwrap().push(
                    orders
                        .iter()
                        .zip(&attempts)
                        .map(|(o, a)| (o.order_id.clone(), *a))
                        .collect(),
                );
                orders
                    .iter()
                    .zip(attempts)
                    .map(|(o, attempt)| match (o.order_id.as_str(), attempt) {
                        ("o-1", 1) => Err(HandlerError::retryable("stock service busy")),
                        _ => Ok(()),
                    })
                    .collect::<BatchResult>()
            }
        }
    };
    let policy = RetryPolicy {
        jitter: 0.0,
        ..RetryPolicy::default()
    };
    let router = Router::new()
        .retry(policy)
        .on_batch(flaky_once, BatchWindow::new(10, Duration::from_millis(5)));
    let mut app = TestApp::new(router);
    app.bus().create_topic(OrderPlaced::TOPIC, 1);

    for i in 0..3 {
        app.publish(order(&format!("o-{i}"), 1)).await;
    }
    let mut outcomes = Vec::new();
    for _ in 0..3 {
        outcomes.push(app.next_outcome().await);
    }
    app.stop().await;

    assert!(outcomes.iter().all(|o| o.is_success()), "{outcomes:?}");
    let retried = outcomes.iter().find(|o| o.offset == 1).unwrap();
    assert_eq!(retried.attempts(), 2);
    assert_eq!(
        *batches.lock().unwrap(),
        vec![
            vec![
                ("o-0".to_owned(), 1),
                ("o-1".to_owned(), 1),
                ("o-2".to_owned(), 1)
            ],
            vec![("o-1".to_owned(), 2)],
        ]
    );
}
