//! RS: RustStream 0.7.7 on ruststream-rdkafka 0.7.1, a typed `#[subscriber]` handler with
//! `Commit::Tracked` (an ack stores the offset once everything below it settled; librdkafka's
//! timer commits it), in RustStream's default dispatch (one delivery at a time).

use crate::event::CloudEventIn;
use crate::settings::Client;
use crate::tally::Tally;
use ruststream_rdkafka::prelude::*;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

/// The app's state: what the handler reaches through `State<Arc<Tally>>`.
#[derive(Clone, FromRef)]
struct BenchState {
    tally: Arc<Tally>,
}

/// The handler: the payload arrives decoded by RustStream's JSON codec.
#[subscriber(KafkaTopic)]
async fn count(event: &CloudEventIn, State(tally): State<Arc<Tally>>) -> HandlerOutcome {
    tally.enter(&event.data.details);
    tally.pass_gate().await;
    std::hint::black_box(event);
    tally.record();
    HandlerOutcome::ack()
}

/// Reads `n` records of `topic` in a fresh group; returns records per second.
pub(crate) async fn run(
    client: &Client,
    topic: &str,
    n: usize,
    warmup: Option<Duration>,
) -> anyhow::Result<f64> {
    let tally = Tally::new(n, warmup);
    let running = start(client, topic, tally.clone()).await?;
    let waited = tally.wait(crate::ARM_TIMEOUT).await;
    running.shutdown().await?;
    waited?;
    Ok(tally.rate())
}

/// Starts the RustStream app with the handler on `topic`, in a fresh group; resolves once the
/// group has assigned its partitions.
pub(crate) async fn start(
    client: &Client,
    topic: &str,
    tally: Arc<Tally>,
) -> anyhow::Result<RunningApp> {
    let broker = client.ruststream();
    let (topic, group) = (topic.to_owned(), crate::fresh_group());
    let state = BenchState { tally };
    let app = RustStream::new(AppInfo::new("weir-peers", "0.0.0"))
        .on_startup(async move |()| Ok::<_, Infallible>(state))
        .with_broker(broker, |b| {
            b.include(count.map_source(move |_| {
                KafkaTopic::new(topic)
                    .group(group)
                    .commit(Commit::Tracked)
                    .start(StartOffset::Earliest)
            }));
        });
    Ok(app.start().await?)
}
