//! Part 2 of issue 31: produce→handler-entry latency at a fixed offered rate, and the highest
//! rate each arm sustains.
//!
//! For each arm and rate: a fresh topic of 8 partitions; the arm subscribes in a fresh group;
//! one probe record per partition tells when it reads every partition (so the group join is
//! not timed); then a producer thread offers `rate` records per second for `--latency-seconds`,
//! each carrying its produce time (microseconds on this process's monotonic clock, written into
//! the record just before it is handed to the producer). The handler, at entry (after decoding,
//! which the framework arms do before the handler runs), records now − produce time in an HDR
//! histogram. After the producer stops the arm gets up to `GRACE` to read the rest; what it has
//! not read by then is reported as lost.

use crate::event;
use hdrhistogram::Histogram;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// How long an arm may take, after the producer stops, to read what is left.
const GRACE: Duration = Duration::from_secs(30);
/// The p99 under which an offered rate counts as sustained.
pub(crate) const SUSTAINED_P99: Duration = Duration::from_millis(100);
/// The produce-time field's width: always 16 digits, so it is written in place.
const STAMP_DIGITS: usize = 16;
const STAMP_FIELD: &str = "sent_us";

/// Microseconds since the first call, on the monotonic clock (never 0 after the first call).
pub(crate) fn now_us() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(|| Instant::now() - Duration::from_micros(1));
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// What one arm saw of one offered rate.
pub(crate) struct Latencies {
    histogram: Mutex<Histogram<u64>>,
    /// Timed records handled.
    received: AtomicUsize,
    /// Probe records handled (one per partition, before the timed phase).
    probes: AtomicUsize,
}

impl Latencies {
    pub(crate) fn new() -> Self {
        Self {
            // 1 µs to 10 min, 3 significant digits.
            histogram: Mutex::new(Histogram::new_with_bounds(1, 600_000_000, 3).expect("bounds")),
            received: AtomicUsize::new(0),
            probes: AtomicUsize::new(0),
        }
    }

    /// At handler entry: the record's produce time, read off the decoded event.
    pub(crate) fn observe(&self, details: &serde_json::Value) {
        let now = now_us();
        let sent = details
            .get(STAMP_FIELD)
            .and_then(|v| v.as_str())
            .and_then(|s| s.parse::<u64>().ok());
        match sent {
            Some(0) | None => {
                self.probes.fetch_add(1, Ordering::Relaxed);
            }
            Some(sent) => {
                self.histogram
                    .lock()
                    .unwrap()
                    .saturating_record(now.saturating_sub(sent).max(1));
                self.received.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn received(&self) -> usize {
        self.received.load(Ordering::Relaxed)
    }

    pub(crate) fn probes(&self) -> usize {
        self.probes.load(Ordering::Relaxed)
    }

    /// p50, p99, p99.9 and max.
    pub(crate) fn summary(&self) -> Summary {
        let h = self.histogram.lock().unwrap();
        let at = |q: f64| Duration::from_micros(h.value_at_quantile(q));
        Summary {
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: Duration::from_micros(h.max()),
        }
    }

    /// The distribution sampled for a chart: (x, ms) on [`crate::plot::grid`].
    pub(crate) fn curve(&self) -> Vec<(f64, f64)> {
        let h = self.histogram.lock().unwrap();
        if h.is_empty() {
            return Vec::new();
        }
        crate::plot::grid()
            .map(|(x, q)| (x, h.value_at_quantile(q) as f64 / 1000.0))
            .collect()
    }

    /// The percentile distribution in HdrHistogram's text format (`.hgrm`, values in ms), which
    /// HdrHistogram's plotter reads.
    pub(crate) fn hgrm(&self) -> String {
        let h = self.histogram.lock().unwrap();
        let mut out = format!(
            "{:>12} {:>14} {:>10} {:>14}\n\n",
            "Value", "Percentile", "TotalCount", "1/(1-Percentile)"
        );
        for step in h.iter_quantiles(5) {
            let q = step.quantile_iterated_to();
            let inverse = if q < 1.0 {
                format!("{:>14.2}", 1.0 / (1.0 - q))
            } else {
                format!("{:>14}", "")
            };
            out.push_str(&format!(
                "{:>12.3} {:>14.12} {:>10} {inverse}\n",
                step.value_iterated_to() as f64 / 1000.0,
                q,
                step.count_since_last_iteration()
            ));
        }
        out.push_str(&format!(
            "#[Mean    = {:>12.3}, StdDeviation   = {:>12.3}]\n#[Max     = {:>12.3}, Total count    = {:>12}]\n",
            h.mean() / 1000.0,
            h.stdev() / 1000.0,
            h.max() as f64 / 1000.0,
            h.len()
        ));
        out
    }
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Summary {
    pub(crate) p50: Duration,
    pub(crate) p99: Duration,
    pub(crate) p999: Duration,
    pub(crate) max: Duration,
}

/// Record templates with a fixed-width produce-time field, stamped in place per send.
struct Templates {
    records: Vec<(String, Vec<u8>, usize)>,
}

impl Templates {
    fn new() -> Self {
        let records = (0..event::KEYS)
            .map(|i| {
                let (key, value) =
                    event::record_with(i, &[(STAMP_FIELD, "0".repeat(STAMP_DIGITS))]);
                let marker = format!("\"{STAMP_FIELD}\":\"");
                let at = find(&value, marker.as_bytes()).expect("the stamp field is in the record")
                    + marker.len();
                (key, value, at)
            })
            .collect();
        Self { records }
    }

    /// Record `i`, stamped with `sent_us`.
    fn stamped(&self, i: usize, sent_us: u64) -> (&str, Vec<u8>) {
        let (key, template, at) = &self.records[i % self.records.len()];
        let mut value = template.clone();
        let digits = format!("{sent_us:0width$}", width = STAMP_DIGITS);
        value[*at..*at + STAMP_DIGITS].copy_from_slice(digits.as_bytes());
        (key, value)
    }

    /// Record `i` as a probe (produce time 0: counted, not timed).
    fn probe(&self, i: usize) -> (&str, Vec<u8>) {
        let (key, template, _) = &self.records[i % self.records.len()];
        (key, template.clone())
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The producer a measurement offers its load with: one per measurement, warmed by the probes,
/// so its start (metadata, the idempotent producer's id) is not in the first records' latency.
pub(crate) type LoadProducer = ThreadedProducer<DefaultProducerContext>;

/// One probe per partition, so the arm shows it reads them all.
pub(crate) fn send_probes(
    producer: &LoadProducer,
    topic: &str,
    partitions: i32,
) -> anyhow::Result<()> {
    let templates = Templates::new();
    for p in 0..partitions {
        let (key, value) = templates.probe(p as usize);
        producer
            .send(BaseRecord::to(topic).key(key).payload(&value).partition(p))
            .map_err(|(e, _)| e)?;
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(())
}

/// Offers `rate` records per second for `seconds`; returns how many were sent.
pub(crate) fn offer(
    producer: &LoadProducer,
    topic: &str,
    rate: u64,
    seconds: u64,
) -> anyhow::Result<usize> {
    let templates = Templates::new();
    let total = usize::try_from(rate * seconds)?;
    let started = Instant::now();
    let mut sent = 0usize;
    while sent < total {
        let due = ((started.elapsed().as_secs_f64() * rate as f64) as usize).min(total);
        while sent < due {
            let (key, value) = templates.stamped(sent, now_us());
            match producer.send(BaseRecord::to(topic).key(key).payload(&value)) {
                Ok(()) => sent += 1,
                Err((e, _))
                    if e.rdkafka_error_code()
                        == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err((e, _)) => return Err(e.into()),
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    producer.flush(Duration::from_secs(30))?;
    Ok(sent)
}

/// Weir's producer settings (idempotent, `acks=all`, `linger.ms=5`) for every arm.
pub(crate) fn producer(brokers: &str) -> anyhow::Result<LoadProducer> {
    Ok(weir::KafkaConfig::new(brokers).producer_config().create()?)
}

/// Waits until the arm has read every partition's probe.
pub(crate) async fn wait_for_probes(
    latencies: &Latencies,
    partitions: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while latencies.probes() < partitions {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the arm read {} of {partitions} probes in 120 s",
            latencies.probes()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Waits until the arm has read `sent` timed records, or `GRACE` has passed.
pub(crate) async fn wait_for_rest(latencies: &Latencies, sent: usize) {
    let deadline = Instant::now() + GRACE;
    while latencies.received() < sent && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamped_records_carry_their_produce_time() {
        let templates = Templates::new();
        let (_, value) = templates.stamped(7, 1_234_567);
        let event: event::CloudEventIn = serde_json::from_slice(&value).unwrap();
        let latencies = Latencies::new();
        latencies.observe(&event.data.details);
        assert_eq!(latencies.received(), 1);
        let (_, probe) = templates.probe(7);
        let event: event::CloudEventIn = serde_json::from_slice(&probe).unwrap();
        latencies.observe(&event.data.details);
        assert_eq!(latencies.probes(), 1);
    }
}
