//! W: Weir with a no-op typed handler, retries configured, in key or partition order.

use crate::event::CustomerCreated;
use crate::settings::Client;
use crate::tally::Tally;
use std::sync::Arc;
use std::time::Duration;
use weir::{
    Bus, ConsumerConfig, Ctx, HandlerError, HandlerOptions, KafkaBus, ProcessingOrder, RetryPolicy,
    Router,
};

/// Reads `n` records of `topic` in a fresh group; returns records per second.
pub(crate) async fn run(
    client: &Client,
    topic: &str,
    n: usize,
    order: ProcessingOrder,
    warmup: Option<Duration>,
) -> anyhow::Result<f64> {
    let tally = Tally::new(n, warmup);
    let subscription = subscribe(client, topic, order, tally.clone())?;
    let waited = tally.wait(crate::ARM_TIMEOUT).await;
    subscription.stop().await?;
    waited?;
    Ok(tally.rate())
}

/// Subscribes Weir's no-op handler to `topic` in a fresh group.
pub(crate) fn subscribe(
    client: &Client,
    topic: &str,
    order: ProcessingOrder,
    tally: Arc<Tally>,
) -> anyhow::Result<weir::Subscription> {
    let bus = KafkaBus::new(client.weir())?;
    let consumer = ConsumerConfig::new(crate::fresh_group()).order(order);
    Ok(bus.subscribe(router(topic, tally), consumer)?)
}

fn router(topic: &str, tally: Arc<Tally>) -> Router {
    // The handler reaches the tally by a plain reference, as `weir bench` does: cloning an
    // `Arc` per call costs atomics the hand loop does not pay. One small box per arm-run leaks.
    let tally: &'static Arc<Tally> = Box::leak(Box::new(tally));
    Router::new().retry(RetryPolicy::default()).on_with(
        move |event: CustomerCreated, _ctx: Ctx| async move {
            tally.enter(&event.details);
            tally.pass_gate().await;
            std::hint::black_box(&event);
            tally.record();
            Ok::<(), HandlerError>(())
        },
        HandlerOptions::new().topic(topic).name("peers"),
    )
}
