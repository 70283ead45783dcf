//! Part 2's runs: each arm at fixed offered rates (a table of p50/p99/p99.9/max, and an `.hgrm`
//! distribution file per arm and rate for plotting), and the search for each arm's sustainable
//! rate (the highest offered rate at which its p99 stays under 100 ms, nothing lost).

use crate::latency::{self, Latencies, Summary, SUSTAINED_P99};
use crate::report::ArmKind;
use crate::settings::Client;
use crate::tally::Tally;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use weir::ProcessingOrder;

/// What the latency part runs.
pub(crate) struct LoadPlan {
    pub(crate) client: Client,
    pub(crate) arms: Vec<ArmKind>,
    pub(crate) rates: Vec<u64>,
    pub(crate) seconds: u64,
    /// Search each arm's sustainable rate, doubling from this rate.
    pub(crate) search_from: Option<u64>,
    /// Where to write the `.hgrm` files and the charts.
    pub(crate) out: Option<PathBuf>,
}

/// One arm at one offered rate.
struct Point {
    sent: usize,
    received: usize,
    summary: Summary,
    latencies: Arc<Latencies>,
}

impl Point {
    fn lost(&self) -> usize {
        self.sent.saturating_sub(self.received)
    }

    fn sustained(&self) -> bool {
        self.lost() == 0 && self.summary.p99 < SUSTAINED_P99
    }
}

pub(crate) async fn run(plan: &LoadPlan) -> anyhow::Result<()> {
    let arms: Vec<ArmKind> = plan
        .arms
        .iter()
        .copied()
        .filter(|a| *a != ArmKind::A0)
        .collect();
    println!();
    println!(
        "latency under a steady load: {} s per arm and rate, 8 partitions, a fresh topic and group each, {}",
        plan.seconds,
        plan.client.name()
    );
    for (k, v) in &plan.client.extra {
        println!("consumer property for every arm: {k}={v}");
    }
    if let Some(out) = &plan.out {
        std::fs::create_dir_all(out)?;
    }
    let mut rows = Vec::new();
    for &rate in &plan.rates {
        for &arm in &arms {
            eprintln!(
                "latency: {} at {rate} msgs/s for {} s",
                arm.label(),
                plan.seconds
            );
            let point = measure(plan, arm, rate).await?;
            if let Some(out) = &plan.out {
                let name = format!("{}-{rate}.hgrm", arm_file_name(arm));
                std::fs::write(out.join(name), point.latencies.hgrm())?;
            }
            rows.push((rate, arm, point));
        }
    }
    if let Some(out) = &plan.out {
        for &rate in &plan.rates {
            let series: Vec<(String, Vec<(f64, f64)>)> = rows
                .iter()
                .filter(|(r, _, _)| *r == rate)
                .map(|(_, arm, point)| (arm.label().to_owned(), point.latencies.curve()))
                .collect();
            let title = format!(
                "produce → handler-entry latency at {rate} msgs/s, {} s, {}",
                plan.seconds,
                plan.client.name()
            );
            std::fs::write(
                out.join(format!("latency-{rate}.svg")),
                crate::plot::svg(&title, &series),
            )?;
        }
        println!(
            "  distributions written to {} (<arm>-<rate>.hgrm, latency-<rate>.svg)",
            out.display()
        );
    }
    if !rows.is_empty() {
        println!(
            "  {:<36} {:>8} {:>9} {:>6} {:>10} {:>10} {:>10} {:>10}",
            "arm", "rate/s", "received", "lost", "p50 ms", "p99 ms", "p99.9 ms", "max ms"
        );
        for (rate, arm, point) in &rows {
            print_point(*rate, *arm, point);
        }
        for &rate in &plan.rates {
            let p99 = |arm: ArmKind| {
                rows.iter()
                    .find(|(r, a, _)| *r == rate && *a == arm)
                    .map(|(_, _, p)| p.summary.p99.as_secs_f64())
            };
            let best_peer = [p99(ArmKind::A1), p99(ArmKind::Rs)]
                .into_iter()
                .flatten()
                .reduce(f64::min);
            for w in [ArmKind::WKey, ArmKind::WPartition] {
                if let (Some(w99), Some(best)) = (p99(w), best_peer) {
                    println!(
                        "  at {rate} msgs/s: {} p99 / best of A1 and RS p99: {:.3}",
                        w.label(),
                        w99 / best
                    );
                }
            }
        }
    }
    if let Some(from) = plan.search_from {
        println!();
        println!(
            "sustainable rate (p99 < {} ms over {} s, nothing lost), doubling from {from} msgs/s, then bisecting:",
            SUSTAINED_P99.as_millis(),
            plan.seconds
        );
        let mut found = Vec::new();
        for &arm in &arms {
            let rate = search(plan, arm, from).await?;
            println!(
                "  {:<36} {}",
                arm.label(),
                rate.map_or("none (fails at the first rate)".to_owned(), |r| format!(
                    "{r} msgs/s"
                ))
            );
            found.push((arm, rate));
        }
        let get = |arm: ArmKind| found.iter().find(|(a, _)| *a == arm).and_then(|(_, r)| *r);
        for w in [ArmKind::WKey, ArmKind::WPartition] {
            if let (Some(w_rate), Some(rs)) = (get(w), get(ArmKind::Rs)) {
                println!(
                    "  {} / RS sustainable rate: {:.3}",
                    w.label(),
                    w_rate as f64 / rs as f64
                );
            }
        }
    }
    Ok(())
}

fn print_point(rate: u64, arm: ArmKind, point: &Point) {
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "  {:<36} {:>8} {:>9} {:>6} {:>10.1} {:>10.1} {:>10.1} {:>10.1}",
        arm.label(),
        rate,
        point.received,
        point.lost(),
        ms(point.summary.p50),
        ms(point.summary.p99),
        ms(point.summary.p999),
        ms(point.summary.max)
    );
}

fn arm_file_name(arm: ArmKind) -> &'static str {
    match arm {
        ArmKind::A0 => "a0",
        ArmKind::A1 => "a1",
        ArmKind::Rs => "rs",
        ArmKind::WKey => "w-key",
        ArmKind::WPartition => "w-partition",
    }
}

/// Doubles the rate while the arm sustains it, then bisects three times between the last rate
/// sustained and the first not.
async fn search(plan: &LoadPlan, arm: ArmKind, from: u64) -> anyhow::Result<Option<u64>> {
    let mut good = None;
    let mut bad = None;
    let mut rate = from;
    while bad.is_none() && rate <= 1_000_000 {
        let point = measure(plan, arm, rate).await?;
        print_point(rate, arm, &point);
        if point.sustained() {
            good = Some(rate);
            rate *= 2;
        } else {
            bad = Some(rate);
        }
    }
    for _ in 0..3 {
        let (Some(lo), Some(hi)) = (good, bad) else {
            break;
        };
        let mid = (lo + hi) / 2;
        if mid == lo {
            break;
        }
        let point = measure(plan, arm, mid).await?;
        print_point(mid, arm, &point);
        if point.sustained() {
            good = Some(mid);
        } else {
            bad = Some(mid);
        }
    }
    Ok(good)
}

/// An arm reading, stopped when the measurement is over.
enum Reader {
    Hand(tokio::task::JoinHandle<anyhow::Result<()>>, Arc<AtomicBool>),
    RustStream(ruststream::runtime::RunningApp),
    Weir(weir::Subscription),
}

impl Reader {
    async fn stop(self) -> anyhow::Result<()> {
        match self {
            Reader::Hand(handle, stop) => {
                stop.store(true, Ordering::Relaxed);
                handle.await?
            }
            Reader::RustStream(running) => Ok(running.shutdown().await?),
            Reader::Weir(subscription) => {
                subscription.stop().await?;
                Ok(())
            }
        }
    }
}

async fn measure(plan: &LoadPlan, arm: ArmKind, rate: u64) -> anyhow::Result<Point> {
    let brokers = plan.client.brokers.as_str();
    let topic = format!("peers-latency-{}", uuid::Uuid::new_v4().simple());
    crate::create_topic(brokers, &topic).await?;
    let latencies = Arc::new(Latencies::new());
    let client = plan.client.clone();
    let reader = match arm {
        ArmKind::A0 | ArmKind::A1 => {
            let stop = Arc::new(AtomicBool::new(false));
            let (t, l, s) = (topic.clone(), latencies.clone(), stop.clone());
            let handle = tokio::task::spawn_blocking(move || crate::hand::timed(&client, &t, l, s));
            Reader::Hand(handle, stop)
        }
        ArmKind::Rs => Reader::RustStream(
            crate::ruststream_arm::start(&client, &topic, Tally::timing(latencies.clone())).await?,
        ),
        ArmKind::WKey | ArmKind::WPartition => {
            let order = if arm == ArmKind::WKey {
                ProcessingOrder::Key
            } else {
                ProcessingOrder::Partition
            };
            Reader::Weir(crate::weir_arm::subscribe(
                &client,
                &topic,
                order,
                Tally::timing(latencies.clone()),
            )?)
        }
    };
    let partitions = usize::try_from(crate::PARTITIONS)?;
    let producer = Arc::new(latency::producer(brokers)?);
    let (p, t) = (producer.clone(), topic.clone());
    tokio::task::spawn_blocking(move || latency::send_probes(&p, &t, crate::PARTITIONS)).await??;
    latency::wait_for_probes(&latencies, partitions).await?;
    let (p, t, seconds) = (producer, topic.clone(), plan.seconds);
    let sent = tokio::task::spawn_blocking(move || latency::offer(&p, &t, rate, seconds)).await??;
    latency::wait_for_rest(&latencies, sent).await;
    reader.stop().await?;
    Ok(Point {
        sent,
        received: latencies.received(),
        summary: latencies.summary(),
        latencies,
    })
}
