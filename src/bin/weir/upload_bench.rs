//! `weir bench-uploads`: does moving side effects into handlers halve upload latency? Uploads the same generated images and text
//! files through the resource API twice, in one process:
//!
//! - **inline**: every side effect (hashes, dimensions and thumbnail, index) runs inside the
//!   request, before the answer (`storage.inline_side_effects`), as the service did before;
//! - **events**: the request stores the file, the row and the event, and answers; the handlers
//!   do the rest, fed by the outbox relay through the broker.
//!
//! The clock starts once the consumer has joined its group, as in a service that has been up
//! for a while. Both arms run the same code (the inline mode calls the handlers' own functions), each on a
//! fresh PostgreSQL schema, storage directory and (by default) embedded mock broker. Reported:
//! upload latency (p50, p99, mean) as the client sees it, and the time from the first upload
//! until every side effect of every upload is done, for each of `--rounds` rounds (arms
//! interleaved), and whether the goals hold in every round: p50 at least 50% better than
//! inline, p99 no worse.

use crate::config::Settings;
use crate::reference::{resources, Services};
use anyhow::Context as _;
use futures_util::StreamExt as _;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use rdkafka::mocking::MockCluster;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions as _, PgPool};
use std::future::IntoFuture as _;
use std::str::FromStr as _;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_util::sync::CancellationToken;
use weir::{Bus, ConsumerConfig, KafkaBus, KafkaConfig, OutboxMetrics, OutboxRelay, RelayConfig};

#[derive(Debug, clap::Args)]
pub(crate) struct UploadBenchArgs {
    /// PostgreSQL server; each arm works in a fresh schema, dropped afterwards.
    #[arg(long, env = "WEIR_DATABASE__URL")]
    database_url: String,
    /// A real broker (the topic `resource-events` must exist); by default an embedded mock
    /// cluster per arm.
    #[arg(long)]
    brokers: Option<String>,
    /// Files uploaded per arm: half images (PNG, JPEG, GIF, WebP in turn), half text.
    #[arg(long, default_value_t = 200)]
    files: usize,
    /// Image width in pixels (height is three quarters of it).
    #[arg(long, default_value_t = 1024)]
    image_px: u32,
    /// Size of each text file in bytes.
    #[arg(long, default_value_t = 32 * 1024)]
    text_bytes: usize,
    /// Uploads in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Rounds; each runs both arms, the first arm alternating, so the goals are judged in
    /// every round rather than on one run of each.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

/// One generated upload.
struct Upload {
    name: String,
    content_type: &'static str,
    bytes: bytes::Bytes,
}

/// What one arm measured.
struct Measured {
    latencies: Vec<Duration>,
    uploads_done: Duration,
    effects_done: Duration,
}

impl Measured {
    fn percentile(&self, p: f64) -> Duration {
        let mut sorted = self.latencies.clone();
        sorted.sort();
        let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
        sorted[rank.clamp(1, sorted.len()) - 1]
    }

    fn mean(&self) -> Duration {
        self.latencies.iter().sum::<Duration>() / self.latencies.len().max(1) as u32
    }
}

pub(crate) async fn run(args: UploadBenchArgs) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.files > 0 && args.concurrency > 0 && args.rounds > 0,
        "--files, --concurrency and --rounds must be positive"
    );
    let started = Instant::now();
    let uploads = Arc::new(generate(&args)?);
    let total: usize = uploads.iter().map(|u| u.bytes.len()).sum();
    println!(
        "weir bench-uploads: {} files ({:.1} MiB: {}x{} images and {} KiB texts, generated in {:.1?}), {} concurrent uploads, broker: {}",
        uploads.len(),
        total as f64 / (1024.0 * 1024.0),
        args.image_px,
        args.image_px * 3 / 4,
        args.text_bytes / 1024,
        started.elapsed(),
        args.concurrency,
        args.brokers.as_deref().unwrap_or("embedded mock cluster"),
    );
    println!(
        "machine: {} cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    );
    let mut rounds = Vec::with_capacity(args.rounds);
    for round in 0..args.rounds {
        // Alternate which arm goes first: a machine warming up (or a checkpoint of the
        // database) must not always fall on the same arm.
        let (inline, events) = if round % 2 == 0 {
            let inline = arm(&args, uploads.clone(), true).await?;
            (inline, arm(&args, uploads.clone(), false).await?)
        } else {
            let events = arm(&args, uploads.clone(), false).await?;
            (arm(&args, uploads.clone(), true).await?, events)
        };
        rounds.push((inline, events));
    }

    let better = |a: Duration, b: Duration| 100.0 * (1.0 - b.as_secs_f64() / a.as_secs_f64());
    println!();
    println!("inline: side effects in the request; events: side effects in handlers (cpu_bound calls on {} of the cores, as `weir serve` runs them)", cpu_bound_threads());
    println!();
    println!("| round | arm | upload p50 | upload p99 | upload mean | all uploads answered | all side effects done |");
    println!("|---|---|---|---|---|---|---|");
    for (i, (inline, events)) in rounds.iter().enumerate() {
        for (name, m) in [("inline", inline), ("events", events)] {
            println!(
                "| {} | {name} | {:.1?} | {:.1?} | {:.1?} | {:.2?} | {:.2?} |",
                i + 1,
                m.percentile(50.0),
                m.percentile(99.0),
                m.mean(),
                m.uploads_done,
                m.effects_done
            );
        }
    }
    println!();
    let (mut p50_met, mut p99_met) = (true, true);
    for (i, (inline, events)) in rounds.iter().enumerate() {
        let p50 = better(inline.percentile(50.0), events.percentile(50.0));
        let p99 = better(inline.percentile(99.0), events.percentile(99.0));
        p50_met &= p50 >= 50.0;
        p99_met &= events.percentile(99.0) <= inline.percentile(99.0);
        println!(
            "round {}: upload latency {p50:.0}% better at p50, {p99:.0}% at p99, {:.0}% in the mean",
            i + 1,
            better(inline.mean(), events.mean()),
        );
    }
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    println!(
        "goal: p50 at least 50% better than inline in every round: {}",
        verdict(p50_met)
    );
    println!(
        "goal: p99 no worse than inline in every round: {}",
        verdict(p99_met)
    );
    Ok(())
}

/// The `cpu_bound` calls the events arm runs at once: as `weir serve` does beside its API.
fn cpu_bound_threads() -> usize {
    Settings::default()
        .serve_consumer(true)
        .cpu_bound_threads
        .unwrap_or(1)
}

/// Images (four formats in turn) and text files, alternately; contents differ per file.
fn generate(args: &UploadBenchArgs) -> anyhow::Result<Vec<Upload>> {
    const FORMATS: [(ImageFormat, &str, &str); 4] = [
        (ImageFormat::Png, "image/png", "png"),
        (ImageFormat::Jpeg, "image/jpeg", "jpg"),
        (ImageFormat::Gif, "image/gif", "gif"),
        (ImageFormat::WebP, "image/webp", "webp"),
    ];
    const WORDS: [&str; 12] = [
        "river",
        "weir",
        "event",
        "kafka",
        "offset",
        "stone",
        "water",
        "flow",
        "record",
        "upload",
        "handler",
        "thumbnail",
    ];
    let (width, height) = (args.image_px.max(16), (args.image_px * 3 / 4).max(12));
    (0..args.files)
        .map(|i| {
            if i % 2 == 0 {
                let (format, content_type, ext) = FORMATS[(i / 2) % FORMATS.len()];
                let seed = i as u32;
                let image = RgbImage::from_fn(width, height, |x, y| {
                    let wave =
                        ((x + seed * 7) as f32 / 23.0).sin() * ((y + seed) as f32 / 17.0).cos();
                    let noise =
                        (x.wrapping_mul(2_654_435_761) ^ y.wrapping_mul(40_503) ^ seed) % 32;
                    Rgb([
                        (128.0 + 100.0 * wave) as u8,
                        ((x * 255 / width) as u8).wrapping_add(noise as u8),
                        ((y * 255 / height) as u8) ^ (seed as u8),
                    ])
                });
                let mut bytes = Vec::new();
                DynamicImage::ImageRgb8(image)
                    .write_to(&mut std::io::Cursor::new(&mut bytes), format)
                    .with_context(|| format!("encoding a {content_type} image"))?;
                Ok(Upload {
                    name: format!("image-{i}.{ext}"),
                    content_type,
                    bytes: bytes.into(),
                })
            } else {
                let mut text = format!("document {i} unique{i}\n");
                let mut n = i;
                while text.len() < args.text_bytes {
                    n = n.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                    text.push_str(WORDS[(n >> 33) % WORDS.len()]);
                    text.push(if (n >> 40) % 12 == 0 { '\n' } else { ' ' });
                }
                Ok(Upload {
                    name: format!("notes-{i}.txt"),
                    content_type: "text/plain",
                    bytes: text.into_bytes().into(),
                })
            }
        })
        .collect()
}

/// One arm on a fresh schema, storage directory and broker.
async fn arm(
    args: &UploadBenchArgs,
    uploads: Arc<Vec<Upload>>,
    inline: bool,
) -> anyhow::Result<Measured> {
    let schema = format!("weir_bench_{}", uuid::Uuid::new_v4().simple());
    let server = PgConnectOptions::from_str(&args.database_url).context("--database-url")?;
    let mut admin = server
        .connect()
        .await
        .context("cannot connect to --database-url")?;
    sqlx::query(&format!("CREATE SCHEMA {schema}"))
        .execute(&mut admin)
        .await?;
    let storage = std::env::temp_dir().join(&schema);
    let result = run_arm(args, uploads, inline, &schema, &storage).await;
    let _ = sqlx::query(&format!("DROP SCHEMA {schema} CASCADE"))
        .execute(&mut admin)
        .await;
    let _ = std::fs::remove_dir_all(&storage);
    result
}

async fn run_arm(
    args: &UploadBenchArgs,
    uploads: Arc<Vec<Upload>>,
    inline: bool,
    schema: &str,
    storage: &std::path::Path,
) -> anyhow::Result<Measured> {
    let pool = PgPoolOptions::new()
        .max_connections(16)
        .connect_with(
            PgConnectOptions::from_str(&args.database_url)?.options([("search_path", schema)]),
        )
        .await?;
    weir::migrate(&pool, &crate::db::migrations()).await?;
    let mut settings = Settings::default().reference();
    settings.storage.dir = storage.to_owned();
    settings.storage.inline_side_effects = inline;
    let services = Services {
        pool: pool.clone(),
        settings: Arc::new(settings),
    };

    let mock = match &args.brokers {
        Some(_) => None,
        None => Some(MockCluster::new(1).context("cannot start the embedded mock cluster")?),
    };
    let brokers = match (&mock, &args.brokers) {
        (Some(mock), _) => mock.bootstrap_servers(),
        (None, Some(brokers)) => brokers.clone(),
        (None, None) => unreachable!("one of them is set"),
    };
    if let Some(mock) = &mock {
        mock.create_topic(crate::reference::events::RESOURCE_TOPIC, 4, 1)?;
        mock.create_topic(
            &format!("{}.dlq", crate::reference::events::RESOURCE_TOPIC),
            1,
            1,
        )?;
    }
    let bus = KafkaBus::new(KafkaConfig::new(brokers))?;
    let subscription = bus.subscribe(
        resources::handlers(weir::Router::new(), &services),
        ConsumerConfig {
            group_id: format!("bench-uploads-{schema}"),
            ..Settings::default().serve_consumer(true)
        },
    )?;
    let stop = CancellationToken::new();
    let relay = OutboxRelay::new(
        pool.clone(),
        bus.clone(),
        RelayConfig::default(),
        OutboxMetrics::new(&prometheus::Registry::new())?,
    );
    let relay = tokio::spawn(relay.run(stop.clone()));
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
    let addr = listener.local_addr()?;
    let server = tokio::spawn(
        axum::serve(listener, resources::routes(&services))
            .with_graceful_shutdown(stop.clone().cancelled_owned())
            .into_future(),
    );

    // A running service's consumer joined its group long before the uploads come: do not
    // measure the join.
    let health = subscription.health();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !health.status().ready {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the consumer did not join within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let client = reqwest::Client::new();
    let started = Instant::now();
    let latencies: Vec<anyhow::Result<Duration>> = futures_util::stream::iter(0..uploads.len())
        .map(|i| {
            let (client, uploads) = (client.clone(), uploads.clone());
            async move {
                let upload = &uploads[i];
                let sent = Instant::now();
                let response = client
                    // Generated names need no escaping.
                    .post(format!("http://{addr}/resources?name={}", upload.name))
                    .header("content-type", upload.content_type)
                    .body(upload.bytes.clone())
                    .send()
                    .await?;
                let status = response.status();
                let body = response.text().await?;
                let latency = sent.elapsed();
                anyhow::ensure!(status == 201, "upload {i} answered {status}: {body}");
                Ok(latency)
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let uploads_done = started.elapsed();
    let latencies = latencies.into_iter().collect::<anyhow::Result<Vec<_>>>()?;
    let deadline = Instant::now() + Duration::from_secs(600);
    while pending(&pool).await? > 0 {
        anyhow::ensure!(
            Instant::now() < deadline,
            "side effects still pending after 10 minutes"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let effects_done = started.elapsed();

    stop.cancel();
    subscription.stop().await?;
    let _ = relay.await;
    let _ = server.await;
    pool.close().await;
    Ok(Measured {
        latencies,
        uploads_done,
        effects_done,
    })
}

/// Resources with a side effect not done yet.
async fn pending(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM resources r LEFT JOIN resource_index i ON i.resource_id = r.id
         WHERE r.hashed_at IS NULL OR i.resource_id IS NULL
            OR (r.content_type LIKE 'image/%' AND r.image_done_at IS NULL)",
    )
    .fetch_one(pool)
    .await
}
