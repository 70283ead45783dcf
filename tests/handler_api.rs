//! The handler API as a service author meets it: state, extractors, layers, and the test kit,
//! all on the in-memory bus with Tokio's paused clock.

use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use weir::testing::TestApp;
use weir::{
    AnyEvent, Ctx, Event, EventType, HandlerError, HandlerExt, HandlerOptions, HandlerService,
    Headers, OutboundRecord, Request, RetryPolicy, Router, State,
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
