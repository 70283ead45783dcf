//! A0 and A1: hand-written `BaseConsumer` loops on a blocking thread.
//!
//! - A0 only counts records: the client's ceiling.
//! - A1 is what a careful engineer writes without a framework, after rust-rdkafka's
//!   `at_least_once` example: serde decoding of the CloudEvent into the typed view, then the
//!   record's offset stored (`enable.auto.offset.store=false`), so only handled records commit.

use crate::event::CloudEventIn;
use crate::latency::Latencies;
use crate::settings::Client;
use crate::tally::rate;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::Message;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Reads `n` records of `topic` in a fresh group; returns records per second.
pub(crate) fn run(
    client: &Client,
    topic: &str,
    n: usize,
    typed: bool,
    warmup: Option<Duration>,
) -> anyhow::Result<f64> {
    run_until(client, topic, n, typed, warmup, None)
}

/// The latency bench's A1: reads until `stop` is set, each record's latency into `latencies`.
pub(crate) fn timed(
    client: &Client,
    topic: &str,
    latencies: Arc<Latencies>,
    stop: Arc<AtomicBool>,
) -> anyhow::Result<()> {
    run_until(
        client,
        topic,
        usize::MAX,
        true,
        None,
        Some((latencies, stop)),
    )
    .map(|_| ())
}

fn run_until(
    client: &Client,
    topic: &str,
    n: usize,
    typed: bool,
    warmup: Option<Duration>,
    timing: Option<(Arc<Latencies>, Arc<AtomicBool>)>,
) -> anyhow::Result<f64> {
    let group = crate::fresh_group();
    let consumer: BaseConsumer = client.hand_loop(&group, typed).create()?;
    consumer.subscribe(&[topic])?;
    let mut count = 0usize;
    let mut started = None;
    let deadline = Instant::now() + crate::ARM_TIMEOUT;
    while count < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "hand loop stalled at {count}/{n}"
        );
        if timing
            .as_ref()
            .is_some_and(|(_, stop)| stop.load(Ordering::Relaxed))
        {
            break;
        }
        let Some(message) = consumer.poll(Duration::from_millis(100)) else {
            continue;
        };
        let message = message?;
        if started.is_none() {
            if let Some(warmup) = warmup {
                std::thread::sleep(warmup);
            }
            started = Some(Instant::now());
        }
        if typed {
            let event: CloudEventIn =
                serde_json::from_slice(message.payload().unwrap_or_default())?;
            if let Some((latencies, _)) = &timing {
                latencies.observe(&event.data.details);
            }
            std::hint::black_box(&event);
            consumer.store_offset(message.topic(), message.partition(), message.offset())?;
        }
        count += 1;
    }
    let elapsed = started.map_or(Duration::ZERO, |s| s.elapsed());
    if typed {
        consumer.commit_consumer_state(CommitMode::Sync)?;
    }
    Ok(rate(n, elapsed))
}
