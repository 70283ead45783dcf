//! Seed 004 end to end: `weir serve` processes (PostgreSQL in a fresh schema, a Tansu broker,
//! storage in a temp dir) take uploads over HTTP, and the side-effect handlers complete them.
//!
//! Expected values are computed here independently of the service: digests with the
//! `sha256sum` and `md5sum` commands, dimensions from the images this test generates,
//! thumbnails decoded with the `image` crate, dead letters read back with a plain consumer.

mod reference;
mod support;

use crate::reference::{CUSTOMER_TOPIC, RESOURCE_TOPIC, TASK_TOPIC};
use futures_util::future::join_all;
use image::{DynamicImage, ImageFormat, Rgb, RgbImage};
use serde_json::{json, Value};
use sqlx::PgPool;
use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use support::broker::{unique, Tansu};
use support::db::TestDb;
use support::process::{eventually, ServeOptions, TestDir, WeirProcess, FAST_GROUP_TOML};
use weir::dead_letter_headers as dlh;

const PARTITIONS: i32 = 4;
/// Overall deadline for side effects to complete.
const PATIENCE: Duration = Duration::from_secs(120);

// --- helpers -------------------------------------------------------------------------------

/// A Tansu broker with the reference service's topics and the resource dead-letter topic.
async fn broker() -> Tansu {
    tokio::task::spawn_blocking(|| {
        let broker = Tansu::start_memory();
        for topic in [TASK_TOPIC, CUSTOMER_TOPIC, RESOURCE_TOPIC] {
            broker.create_topic(topic, PARTITIONS);
        }
        broker.create_topic(&format!("{RESOURCE_TOPIC}.dlq"), 1);
        broker
    })
    .await
    .expect("broker")
}

/// Everything a test's processes share.
struct Rig {
    dir: TestDir,
    db: TestDb,
    broker: Tansu,
    group: String,
}

impl Rig {
    async fn new(name: &str) -> Rig {
        let dir = TestDir::new(name);
        std::fs::create_dir_all(dir.join("storage")).expect("storage dir");
        std::fs::create_dir_all(dir.join("originals")).expect("originals dir");
        Rig {
            dir,
            db: TestDb::new().await,
            broker: broker().await,
            group: unique("resources"),
        }
    }

    fn storage(&self) -> PathBuf {
        self.dir.join("storage")
    }

    /// The whole service: consumer, API, relay (unless `relay` is false), migrating at start.
    ///
    /// Producers send one record per batch: Tansu 0.6 skips the rest of a batch when a fetch
    /// starts inside it (see tests/kafka_process.rs).
    fn serve_options(&self, relay: bool) -> ServeOptions {
        ServeOptions::new(
            &self.broker.brokers(),
            &self.group,
            &self.dir.join("handled.jsonl"),
        )
        .env("WEIR_DATABASE__URL", self.db.url())
        .env("WEIR_DATABASE__MIGRATE_ON_START", "true")
        .env("WEIR_DATABASE__MAX_CONNECTIONS", "8")
        .env("WEIR_HTTP__ADDR", "127.0.0.1:0")
        .env("WEIR_STORAGE__DIR", self.storage().display().to_string())
        .env("WEIR_SERVICE__RELAY", relay.to_string())
        .env("WEIR_OUTBOX__POLL_INTERVAL", "100ms")
        .env("WEIR_KAFKA__PRODUCER__BATCH.NUM.MESSAGES", "1")
        .env("WEIR_CONSUMER__REVOKE_TIMEOUT", "2s")
        .env("WEIR_CONSUMER__COMMIT_INTERVAL", "10ms")
        .env("WEIR_RETRY__INITIAL_INTERVAL", "100ms")
        .env("WEIR_RETRY__MAXIMUM_INTERVAL", "500ms")
        .env("WEIR_RETRY__MAXIMUM_ATTEMPTS", "40")
        .config(FAST_GROUP_TOML)
    }

    fn serve(&self, name: &str, options: &ServeOptions) -> WeirProcess {
        WeirProcess::serve(self.dir.path(), name, options)
    }

    /// The API's base URL, once the process has logged it.
    async fn api(&self, process: &WeirProcess) -> String {
        let addr = eventually("the HTTP API address in the log", PATIENCE, || async {
            process.http_addr().ok_or_else(|| process.stderr_tail(2048))
        })
        .await;
        format!("http://{addr}")
    }
}

/// One file to upload, and what the service should find out about it.
#[derive(Clone)]
struct Sample {
    name: String,
    content_type: &'static str,
    bytes: Vec<u8>,
    /// Width and height, for decodable images.
    dimensions: Option<(u32, u32)>,
    /// A word only this file's content contains, for text files.
    word: Option<String>,
    /// Send as multipart/form-data rather than a raw body.
    multipart: bool,
}

const FORMATS: [(ImageFormat, &str, &str); 4] = [
    (ImageFormat::Png, "image/png", "png"),
    (ImageFormat::Jpeg, "image/jpeg", "jpg"),
    (ImageFormat::Gif, "image/gif", "gif"),
    (ImageFormat::WebP, "image/webp", "webp"),
];

fn encode(width: u32, height: u32, seed: u32, format: ImageFormat) -> Vec<u8> {
    let image = RgbImage::from_fn(width, height, |x, y| {
        Rgb([
            (x * 255 / width) as u8,
            (y * 255 / height) as u8,
            (seed.wrapping_mul(37) ^ x ^ y) as u8,
        ])
    });
    let mut bytes = Vec::new();
    DynamicImage::ImageRgb8(image)
        .write_to(&mut std::io::Cursor::new(&mut bytes), format)
        .expect("encode");
    bytes
}

fn image_sample(i: usize, width: u32, height: u32) -> Sample {
    let (format, content_type, ext) = FORMATS[i % FORMATS.len()];
    Sample {
        name: format!("picture-{i}.{ext}"),
        content_type,
        bytes: encode(width, height, i as u32, format),
        dimensions: Some((width, height)),
        word: None,
        multipart: i % 3 == 0,
    }
}

fn text_sample(i: usize) -> Sample {
    let word = format!("lexeme{i}q");
    let mut text = format!("Notes number {i}.\n");
    for line in 0..40 {
        text.push_str(&format!(
            "line {line} of the weir notes, about water and {word}\n"
        ));
    }
    Sample {
        name: format!("notes-{i}.txt"),
        content_type: "text/plain",
        bytes: text.into_bytes(),
        dimensions: None,
        word: Some(word),
        multipart: i % 3 == 1,
    }
}

fn binary_sample(i: usize) -> Sample {
    let bytes = (0..4096 + i * 13)
        .map(|n| (n.wrapping_mul(31) ^ i.wrapping_mul(7)) as u8)
        .collect();
    Sample {
        name: format!("blob-{i}.bin"),
        content_type: "application/octet-stream",
        bytes,
        dimensions: None,
        word: None,
        multipart: i % 3 == 2,
    }
}

/// A PNG cut in half: the right type, undecodable content.
fn corrupt_sample() -> Sample {
    let mut bytes = encode(64, 48, 1, ImageFormat::Png);
    bytes.truncate(bytes.len() / 2);
    Sample {
        name: "broken.png".to_owned(),
        content_type: "image/png",
        bytes,
        dimensions: None,
        word: None,
        multipart: false,
    }
}

/// Uploads a sample; the status and the JSON body.
async fn upload(client: &reqwest::Client, api: &str, sample: &Sample) -> (u16, Value) {
    let request = if sample.multipart {
        let part = reqwest::multipart::Part::bytes(sample.bytes.clone())
            .file_name(sample.name.clone())
            .mime_str(sample.content_type)
            .expect("mime");
        client
            .post(format!("{api}/resources"))
            .multipart(reqwest::multipart::Form::new().part("file", part))
    } else {
        client
            .post(format!("{api}/resources?name={}", sample.name))
            .header("content-type", sample.content_type)
            .body(sample.bytes.clone())
    };
    let response = request.send().await.expect("upload request");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

/// Uploads every sample, eight at a time; the responses in sample order.
async fn upload_all(client: &reqwest::Client, api: &str, samples: &[Sample]) -> Vec<Value> {
    let mut bodies = Vec::new();
    for chunk in samples.chunks(8) {
        for (sample, (status, body)) in chunk
            .iter()
            .zip(join_all(chunk.iter().map(|s| upload(client, api, s))).await)
        {
            assert_eq!(status, 201, "uploading {}: {body}", sample.name);
            bodies.push(body);
        }
    }
    bodies
}

async fn get_json(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let response = client.get(url).send().await.expect("GET");
    let status = response.status().as_u16();
    (status, response.json().await.expect("JSON body"))
}

/// Resources with some side effect neither done nor failed for good.
async fn unfinished(pool: &PgPool) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM resources r LEFT JOIN resource_index i ON i.resource_id = r.id
         WHERE r.deleted_at IS NULL AND (r.hashed_at IS NULL OR i.resource_id IS NULL
            OR (r.content_type LIKE 'image/%' AND r.image_done_at IS NULL
                AND r.image_error IS NULL))",
    )
    .fetch_one(pool)
    .await
    .expect("count unfinished resources")
}

async fn wait_all_done(pool: &PgPool, what: &str) {
    eventually(what, PATIENCE, || async {
        match unfinished(pool).await {
            0 => Ok(()),
            n => Err(format!("{n} resources unfinished")),
        }
    })
    .await;
}

/// `sha256sum` or `md5sum` of the samples, written to `dir` first.
fn digests(command: &str, dir: &Path, samples: &[Sample]) -> HashMap<String, String> {
    let paths: Vec<PathBuf> = samples
        .iter()
        .map(|s| {
            let path = dir.join(&s.name);
            std::fs::write(&path, &s.bytes).expect("write original");
            path
        })
        .collect();
    let output = std::process::Command::new(command)
        .args(&paths)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command}: {e}"));
    assert!(output.status.success(), "{command} failed");
    String::from_utf8(output.stdout)
        .expect("UTF-8")
        .lines()
        .map(|line| {
            let (digest, path) = line.split_once("  ").expect("`digest  path` lines");
            let name = Path::new(path).file_name().expect("file name");
            (name.to_string_lossy().into_owned(), digest.to_owned())
        })
        .collect()
}

/// Checks a finished resource against its sample: digests, dimensions, thumbnail, search.
async fn check_complete(
    client: &reqwest::Client,
    api: &str,
    storage: &Path,
    sample: &Sample,
    id: &str,
    sha256: &HashMap<String, String>,
    md5: &HashMap<String, String>,
) {
    let (status, r) = get_json(client, &format!("{api}/resources/{id}")).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["sha256"], json!(sha256[&sample.name]), "{}", sample.name);
    assert_eq!(r["md5"], json!(md5[&sample.name]), "{}", sample.name);
    assert_eq!(r["side_effects"]["hasher"], "done", "{r}");
    assert_eq!(r["side_effects"]["index"], "done", "{r}");
    assert_eq!(r["indexed"], true, "{r}");
    match sample.dimensions {
        Some((width, height)) => {
            assert_eq!(r["side_effects"]["image"], "done", "{r}");
            assert_eq!(
                (r["width"].clone(), r["height"].clone()),
                (json!(width), json!(height))
            );
            assert_eq!(r["phash"].as_str().map(str::len), Some(16), "{r}");
            let thumbnail = storage.join(r["thumbnail"].as_str().expect("thumbnail path"));
            let decoded = image::open(&thumbnail).unwrap_or_else(|e| {
                panic!("thumbnail {} does not decode: {e}", thumbnail.display())
            });
            assert!(decoded.width() <= 128 && decoded.height() <= 128);
            assert!(decoded.width() == 128.min(width) || decoded.height() == 128.min(height));
        }
        None if sample.content_type.starts_with("image/") => {}
        None => {
            assert_eq!(r["side_effects"]["image"], "not_applicable", "{r}");
            assert_eq!(r["thumbnail"], Value::Null);
        }
    }
    if let Some(word) = &sample.word {
        let (status, hits) = get_json(client, &format!("{api}/search?q={word}")).await;
        assert_eq!(status, 200, "{hits}");
        let ids: Vec<&str> = hits
            .as_array()
            .expect("a list")
            .iter()
            .filter_map(|h| h["id"].as_str())
            .collect();
        assert_eq!(ids, vec![id], "searching {word}");
    }
}

/// Every regular file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

// --- tests ---------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn uploads_answer_before_their_side_effects_which_then_complete_and_a_corrupt_image_is_dead_lettered(
) {
    let rig = Rig::new("resources-200").await;
    let mut samples = Vec::new();
    for i in 0..200 {
        samples.push(match i % 10 {
            0..=2 => image_sample(i, 40 + i as u32, 30 + (i as u32 % 50)),
            3..=6 => text_sample(i),
            _ => binary_sample(i),
        });
    }
    samples[100] = corrupt_sample();
    let originals = rig.dir.join("originals");
    let (sha256, md5) = (
        digests("sha256sum", &originals, &samples),
        digests("md5sum", &originals, &samples),
    );

    // The service without its relay: no event can reach a handler while the uploads run, so
    // every 201 provably came before any side effect.
    let serve = rig.serve("serve", &rig.serve_options(false));
    let api = rig.api(&serve).await;
    let client = reqwest::Client::new();
    let started = Instant::now();
    let created = upload_all(&client, &api, &samples).await;
    eprintln!("200 uploads answered in {:?}", started.elapsed());
    for (sample, body) in samples.iter().zip(&created) {
        assert_eq!(body["side_effects"]["hasher"], "pending", "{body}");
        assert_eq!(body["side_effects"]["index"], "pending", "{body}");
        let image = if sample.content_type.starts_with("image/") {
            "pending"
        } else {
            "not_applicable"
        };
        assert_eq!(body["side_effects"]["image"], image, "{body}");
        assert_eq!(body["original_name"], json!(sample.name));
        assert_eq!(body["size_bytes"], json!(sample.bytes.len()));
    }
    assert_eq!(unfinished(rig.db.pool()).await, 200);

    // One file is not in place when its events arrive (storage still syncing, say): its
    // hasher and indexer fail retryably until it appears, then complete.
    let late = created[3]["id"].as_str().expect("id").to_owned();
    let late_id: uuid::Uuid = late.parse().expect("uuid");
    let late_path: String = sqlx::query_scalar("SELECT file_path FROM resources WHERE id = $1")
        .bind(late_id)
        .fetch_one(rig.db.pool())
        .await
        .expect("file path");
    let late_file = rig.storage().join(&late_path);
    let aside = rig.dir.join("late-file");
    std::fs::rename(&late_file, &aside).expect("move the file away");

    // The relay as its own process (as the Helm chart deploys it) publishes the events.
    let relay_env: Vec<(String, String)> = vec![
        ("WEIR_DATABASE__URL".into(), rig.db.url()),
        ("WEIR_BROKERS".into(), rig.broker.brokers()),
        ("WEIR_ADMIN_ADDR".into(), "127.0.0.1:0".into()),
        ("WEIR_OUTBOX__POLL_INTERVAL".into(), "100ms".into()),
        (
            "WEIR_KAFKA__PRODUCER__BATCH.NUM.MESSAGES".into(),
            "1".into(),
        ),
    ];
    let _relay = WeirProcess::spawn(rig.dir.path(), "relay", &["outbox-relay"], &relay_env);
    eventually("the hasher retrying the missing file", PATIENCE, || async {
        let log = serve.stderr();
        let retried = log.lines().any(|l| {
            l.contains("Handler failed; retrying.")
                && l.contains("resource_hasher")
                && l.contains(&format!("cannot read the file {late_path}"))
        });
        retried.then_some(()).ok_or_else(|| serve.stderr_tail(1024))
    })
    .await;
    std::fs::rename(&aside, &late_file).expect("put the file in place");
    wait_all_done(rig.db.pool(), "every side effect of 200 uploads").await;
    eprintln!(
        "all side effects done {:?} after the first upload",
        started.elapsed()
    );

    let storage = rig.storage();
    for (sample, body) in samples.iter().zip(&created) {
        let id = body["id"].as_str().expect("id");
        check_complete(&client, &api, &storage, sample, id, &sha256, &md5).await;
    }

    // The corrupt image: its hashes and index entry done, its image side effect failed and
    // dead-lettered with the reason, naming the one handler that failed.
    let broken = created[100]["id"].as_str().expect("id");
    let (_, r) = get_json(&client, &format!("{api}/resources/{broken}")).await;
    assert_eq!(r["side_effects"]["image"], "failed", "{r}");
    assert!(
        r["image_error"]
            .as_str()
            .is_some_and(|e| e.contains("decode")),
        "{r}"
    );
    let dead = support::kafka::read_topic(
        &rig.broker.brokers(),
        &format!("{RESOURCE_TOPIC}.dlq"),
        1,
        Duration::from_secs(2),
        Duration::from_secs(30),
    )
    .await;
    assert_eq!(
        dead.len(),
        1,
        "only the corrupt image is dead-lettered: {dead:?}"
    );
    let record = &dead[0];
    assert_eq!(record.key.as_deref(), Some(broken.as_bytes()));
    assert_eq!(record.headers.get_str(dlh::HANDLER), Some("resource_image"));
    assert_eq!(
        record.headers.get_str(dlh::ERROR_REASON),
        Some("acknowledged")
    );
    let message = record
        .headers
        .get_str(dlh::ERROR_MESSAGE)
        .unwrap_or_default();
    assert!(
        message.contains("cannot decode") && message.contains(broken),
        "message: {message}"
    );
    rig.db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_killed_mid_way_completes_every_side_effect_once_in_effect_after_restart() {
    let rig = Rig::new("resources-kill").await;
    // Large enough images that their side effects are still running at the kill.
    let bases: Vec<Sample> = (0..4).map(|i| image_sample(i, 800, 600)).collect();
    let mut samples = Vec::new();
    for i in 0..120 {
        let mut sample = if i % 3 == 2 {
            text_sample(i)
        } else {
            bases[i % 4].clone()
        };
        sample.name = format!("{i}-{}", sample.name);
        samples.push(sample);
    }
    let originals = rig.dir.join("originals");
    let (sha256, md5) = (
        digests("sha256sum", &originals, &samples),
        digests("md5sum", &originals, &samples),
    );
    let options = rig.serve_options(true);
    let mut first = rig.serve("serve-1", &options);
    let api = rig.api(&first).await;
    let client = reqwest::Client::new();
    let created = upload_all(&client, &api, &samples).await;
    let images_done = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM resources WHERE image_done_at IS NOT NULL",
        )
        .fetch_one(rig.db.pool())
        .await
        .expect("count")
    };
    eventually("some images done", PATIENCE, || async {
        match images_done().await {
            n if n >= 4 => Ok(()),
            n => Err(format!("{n} images done")),
        }
    })
    .await;
    first.kill_and_wait().await;
    let at_kill = unfinished(rig.db.pool()).await;
    eprintln!("killed with {at_kill} of 120 resources unfinished");
    assert!(
        at_kill > 0,
        "everything finished before the kill; nothing was tested"
    );

    let second = rig.serve("serve-2", &options);
    let api = rig.api(&second).await;
    wait_all_done(rig.db.pool(), "every side effect after the restart").await;
    let storage = rig.storage();
    for (sample, body) in samples.iter().zip(&created) {
        let id = body["id"].as_str().expect("id");
        check_complete(&client, &api, &storage, sample, id, &sha256, &md5).await;
    }
    // Once in effect: one thumbnail per image, one index entry per resource, no dead letters.
    let thumbnails = files_under(&storage)
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".thumb.png"))
        .count();
    assert_eq!(
        thumbnails,
        samples.iter().filter(|s| s.dimensions.is_some()).count()
    );
    let entries: i64 = sqlx::query_scalar("SELECT count(*) FROM resource_index")
        .fetch_one(rig.db.pool())
        .await
        .expect("count");
    assert_eq!(entries, 120);
    let dead = support::kafka::read_topic(
        &rig.broker.brokers(),
        &format!("{RESOURCE_TOPIC}.dlq"),
        0,
        Duration::from_secs(2),
        Duration::from_secs(10),
    )
    .await;
    assert!(dead.is_empty(), "no dead letters: {dead:?}");
    rig.db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_requests_leave_nothing_behind_renames_are_searchable_and_deletes_remove_derived_data()
{
    let rig = Rig::new("resources-api").await;
    let serve = rig.serve(
        "serve",
        &rig.serve_options(true)
            .env("WEIR_STORAGE__MAX_UPLOAD_BYTES", "65536"),
    );
    let api = rig.api(&serve).await;
    let client = reqwest::Client::new();

    // Refused uploads and requests: a clear 4xx with a JSON error, and nothing written.
    let raw = |name: &str, content_type: &str, body: Vec<u8>| {
        client
            .post(format!("{api}/resources?name={name}"))
            .header("content-type", content_type)
            .body(body)
    };
    let cases = [
        (
            raw("empty.txt", "text/plain", Vec::new()),
            400,
            "empty_body",
        ),
        (
            raw("page.html", "text/html", b"<p>".to_vec()),
            415,
            "unsupported_media_type",
        ),
        (
            raw("big.bin", "application/octet-stream", vec![7; 100_000]),
            413,
            "too_large",
        ),
        (
            client
                .post(format!("{api}/resources"))
                .header("content-type", "text/plain")
                .body("no name"),
            400,
            "bad_name",
        ),
        (
            client
                .post(format!("{api}/resources"))
                .multipart(reqwest::multipart::Form::new().text("name", "nothing")),
            400,
            "bad_multipart",
        ),
        (
            client.get(format!("{api}/resources/not-an-id")),
            400,
            "bad_id",
        ),
        (
            client.get(format!("{api}/resources/{}", uuid::Uuid::new_v4())),
            404,
            "not_found",
        ),
        (client.get(format!("{api}/search?q=")), 400, "bad_query"),
        (
            client
                .patch(format!("{api}/resources/{}", uuid::Uuid::new_v4()))
                .json(&json!({})),
            400,
            "nothing_to_change",
        ),
    ];
    for (request, status, kind) in cases {
        let response = request.send().await.expect("request");
        assert_eq!(response.status().as_u16(), status, "{kind}");
        let body: Value = response.json().await.expect("a JSON error");
        assert_eq!(body["error"], kind, "{body}");
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    assert_eq!(
        files_under(&rig.storage()),
        Vec::<PathBuf>::new(),
        "no files left"
    );
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM resources) + (SELECT count(*) FROM weir_outbox)",
    )
    .fetch_one(rig.db.pool())
    .await
    .expect("count");
    assert_eq!(rows, 0, "no rows and no events");

    // Rename: searchable under the new name.
    let photo = image_sample(0, 300, 200);
    let mut notes = text_sample(1);
    notes.multipart = true;
    let created = upload_all(&client, &api, &[photo.clone(), notes.clone()]).await;
    let (photo_id, notes_id) = (
        created[0]["id"].as_str().expect("id").to_owned(),
        created[1]["id"].as_str().expect("id").to_owned(),
    );
    wait_all_done(rig.db.pool(), "the two uploads' side effects").await;
    let search = |q: &'static str| {
        let (client, api) = (client.clone(), api.clone());
        async move {
            let (status, hits) = get_json(&client, &format!("{api}/search?q={q}")).await;
            assert_eq!(status, 200, "{hits}");
            hits.as_array()
                .expect("a list")
                .iter()
                .filter_map(|h| h["id"].as_str().map(str::to_owned))
                .collect::<Vec<_>>()
        }
    };
    assert!(search("budget").await.is_empty());
    let response = client
        .patch(format!("{api}/resources/{notes_id}"))
        .json(&json!({"name": "Budget plan 2027.txt", "tags": ["finance"]}))
        .send()
        .await
        .expect("patch");
    assert_eq!(response.status().as_u16(), 200);
    let renamed: Value = response.json().await.expect("JSON");
    assert_eq!(renamed["name"], "Budget plan 2027.txt");
    assert_eq!(renamed["original_name"], json!(notes.name));
    eventually(
        "the renamed resource found by its new name",
        PATIENCE,
        || async {
            let (budget, finance) = (search("budget").await, search("finance").await);
            if budget == vec![notes_id.clone()] && finance == vec![notes_id.clone()] {
                Ok(())
            } else {
                Err(format!("budget: {budget:?}, finance: {finance:?}"))
            }
        },
    )
    .await;

    // Delete: the index entry, the thumbnail and the file go.
    let (_, before) = get_json(&client, &format!("{api}/resources/{photo_id}")).await;
    let thumbnail = rig
        .storage()
        .join(before["thumbnail"].as_str().expect("thumbnail"));
    assert!(thumbnail.exists());
    assert_eq!(search("picture").await, vec![photo_id.clone()]);
    let response = client
        .delete(format!("{api}/resources/{photo_id}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status().as_u16(), 204);
    let (status, _) = get_json(&client, &format!("{api}/resources/{photo_id}")).await;
    assert_eq!(status, 404);
    let again = client
        .delete(format!("{api}/resources/{photo_id}"))
        .send()
        .await
        .expect("delete");
    assert_eq!(again.status().as_u16(), 404);
    let id: uuid::Uuid = photo_id.parse().expect("uuid");
    eventually(
        "the deleted resource's derived data removed",
        PATIENCE,
        || async {
            let entries: i64 =
                sqlx::query_scalar("SELECT count(*) FROM resource_index WHERE resource_id = $1")
                    .bind(id)
                    .fetch_one(rig.db.pool())
                    .await
                    .expect("count");
            if entries == 0 && !thumbnail.exists() {
                Ok(())
            } else {
                Err(format!(
                    "index entries {entries}, thumbnail exists {}",
                    thumbnail.exists()
                ))
            }
        },
    )
    .await;
    assert!(search("picture").await.is_empty());

    // The events say what changed: the update carries exactly the changed fields.
    let events: Vec<Value> = support::kafka::read_topic(
        &rig.broker.brokers(),
        RESOURCE_TOPIC,
        4,
        Duration::from_secs(1),
        Duration::from_secs(30),
    )
    .await
    .iter()
    .map(|r| {
        serde_json::from_slice(r.value.as_deref().unwrap_or_default()).expect("a JSON CloudEvent")
    })
    .collect();
    let mut kinds: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["type"].as_str().unwrap_or_default(),
                e["data"]["resource_id"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    kinds.sort();
    let mut expected = vec![
        ("resource.created", photo_id.as_str()),
        ("resource.created", notes_id.as_str()),
        ("resource.deleted", photo_id.as_str()),
        ("resource.updated", notes_id.as_str()),
    ];
    expected.sort();
    assert_eq!(kinds, expected);
    let updated = events
        .iter()
        .find(|e| e["type"] == "resource.updated")
        .expect("the update");
    assert_eq!(
        updated["data"]["changed_fields"],
        json!({"name": "Budget plan 2027.txt", "tags": ["finance"]})
    );
    let left: Vec<PathBuf> = files_under(&rig.storage());
    assert_eq!(left.len(), 1, "only the text file is left: {left:?}");
    rig.db.close().await;
}

/// Hostile uploads, generated from a table: bodies over the limit, types not on the allowlist
/// (or none, or a multipart body that is not one), names that look like paths, empty files;
/// raw and multipart alike. Each gets a 4xx naming what is wrong, and nothing is left: no
/// file (temporary or not) in storage, no row, no event.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_oversized_mistyped_path_named_or_empty_upload_gets_a_4xx_and_writes_nothing() {
    const LIMIT: usize = 65_536;
    let rig = Rig::new("resources-hostile").await;
    let serve = rig.serve(
        "serve",
        &rig.serve_options(true)
            .env("WEIR_STORAGE__MAX_UPLOAD_BYTES", LIMIT.to_string()),
    );
    let api = rig.api(&serve).await;
    let client = reqwest::Client::new();
    let raw = |name: &str, content_type: Option<&str>, body: Vec<u8>| {
        // Percent-encoded whole, so separators reach the service as the name's own.
        let name: String = name.bytes().map(|b| format!("%{b:02X}")).collect();
        let request = client
            .post(format!("{api}/resources?name={name}"))
            .body(body);
        match content_type {
            Some(t) => request.header("content-type", t),
            None => request,
        }
    };
    let multipart =
        |file_name: &str, part_type: Option<&str>, body: Vec<u8>, fields: &[(&str, &str)]| {
            let mut part = reqwest::multipart::Part::bytes(body).file_name(file_name.to_owned());
            if let Some(t) = part_type {
                part = part.mime_str(t).expect("mime");
            }
            let mut form = reqwest::multipart::Form::new().part("file", part);
            for (name, value) in fields {
                form = form.text(name.to_string(), value.to_string());
            }
            client.post(format!("{api}/resources")).multipart(form)
        };
    let text = b"some text".to_vec();
    let mut cases: Vec<(String, reqwest::RequestBuilder, u16, &str)> = Vec::new();

    // Over the limit.
    for size in [LIMIT + 1, 4 * LIMIT, 64 * LIMIT] {
        cases.push((
            format!("raw {size} bytes"),
            raw("big.bin", Some("application/octet-stream"), vec![7; size]),
            413,
            "too_large",
        ));
        cases.push((
            format!("multipart {size} bytes"),
            multipart(
                "big.bin",
                Some("application/octet-stream"),
                vec![7; size],
                &[],
            ),
            413,
            "too_large",
        ));
    }
    // Types off the allowlist, or none.
    for content_type in [
        "text/html",
        "image/svg+xml",
        "application/x-sh",
        "application/javascript",
        "text/plain-ish",
        "",
        "*/*",
    ] {
        cases.push((
            format!("raw type {content_type:?}"),
            raw("file.txt", Some(content_type), text.clone()),
            415,
            "unsupported_media_type",
        ));
        if !content_type.is_empty() && content_type != "*/*" {
            cases.push((
                format!("part type {content_type:?}"),
                multipart("file.txt", Some(content_type), text.clone(), &[]),
                415,
                "unsupported_media_type",
            ));
            cases.push((
                format!("declared type {content_type:?}"),
                multipart(
                    "file.txt",
                    Some("text/plain"),
                    text.clone(),
                    &[("content_type", content_type)],
                ),
                415,
                "unsupported_media_type",
            ));
        }
    }
    cases.push((
        "raw without a type".into(),
        raw("file.txt", None, text.clone()),
        415,
        "unsupported_media_type",
    ));
    cases.push((
        "part without a type".into(),
        multipart("file.txt", None, text.clone(), &[]),
        415,
        "unsupported_media_type",
    ));
    cases.push((
        "multipart without a boundary".into(),
        raw("file.txt", Some("multipart/form-data"), text.clone()),
        400,
        "bad_multipart",
    ));
    cases.push((
        "multipart that is not".into(),
        raw(
            "file.txt",
            Some("multipart/form-data; boundary=xyz"),
            text.clone(),
        ),
        400,
        "bad_multipart",
    ));
    // Names that look like paths.
    for name in [
        "../../etc/passwd",
        "../x.txt",
        "a/b.txt",
        "/abs.txt",
        "a\\b.txt",
        "..\\x.txt",
        "C:\\Users\\x.txt",
        "..",
        ".",
        "x/..",
        "./x.txt",
    ] {
        cases.push((
            format!("raw name {name:?}"),
            raw(name, Some("text/plain"), text.clone()),
            400,
            "bad_name",
        ));
        cases.push((
            format!("file name {name:?}"),
            multipart(name, Some("text/plain"), text.clone(), &[]),
            400,
            "bad_name",
        ));
        cases.push((
            format!("name field {name:?}"),
            multipart(
                "ok.txt",
                Some("text/plain"),
                text.clone(),
                &[("name", name)],
            ),
            400,
            "bad_name",
        ));
    }
    // Empty files.
    for content_type in ["text/plain", "image/png", "application/octet-stream"] {
        cases.push((
            format!("raw empty {content_type}"),
            raw("empty", Some(content_type), Vec::new()),
            400,
            "empty_body",
        ));
        cases.push((
            format!("multipart empty {content_type}"),
            multipart("empty", Some(content_type), Vec::new(), &[]),
            400,
            "empty_body",
        ));
    }

    let tried = cases.len();
    let mut wrong = Vec::new();
    for (what, request, status, kind) in cases {
        let response = request.send().await.expect("request");
        let got = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        if (got, body["error"].as_str()) != (status, Some(kind))
            || body["message"].as_str().is_none_or(str::is_empty)
        {
            wrong.push(format!(
                "{what}: expected {status} {kind}, got {got} {body}"
            ));
        }
    }
    let left = files_under(&rig.storage());
    let rows: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM resources) + (SELECT count(*) FROM weir_outbox)",
    )
    .fetch_one(rig.db.pool())
    .await
    .expect("count");
    let _ = writeln!(
        std::io::stderr(),
        "uploads: {tried} hostile uploads tried, {} answered otherwise, {} files and {rows} rows left",
        wrong.len(),
        left.len()
    );
    assert!(
        wrong.is_empty(),
        "{} of {tried} cases:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    assert_eq!(left, Vec::<PathBuf>::new(), "no files left");
    assert_eq!(rows, 0, "no rows and no events");
    rig.db.close().await;
}

/// Sets a file's modification time `age` into the past.
fn age_file(path: &Path, age: Duration) {
    let file = std::fs::File::options()
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    file.set_modified(std::time::SystemTime::now() - age)
        .expect("set mtime");
}

/// Creates a file (and its directory) with some bytes.
fn plant(path: &Path, age: Duration) {
    std::fs::create_dir_all(path.parent().expect("parent")).expect("dir");
    std::fs::write(path, b"left behind").expect("write");
    age_file(path, age);
}

/// The counts of the first `Storage swept.` log line of a process.
fn swept(process: &WeirProcess) -> Result<(u64, u64), String> {
    process
        .stderr()
        .lines()
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .find(|v| v["fields"]["message"] == "Storage swept.")
        .map(|v| {
            let count = |f: &str| v["fields"][f].as_u64().expect("a count");
            (count("removed_temps"), count("removed_orphans"))
        })
        .ok_or_else(|| process.stderr_tail(1024))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_restart_sweeps_old_temp_files_and_rowless_uploads_and_keeps_everything_else() {
    let rig = Rig::new("resources-sweep").await;
    let options = rig.serve_options(true);
    let mut first = rig.serve("serve-1", &options);
    let api = rig.api(&first).await;
    let client = reqwest::Client::new();
    let kept = upload_all(&client, &api, &[text_sample(1)]).await;
    wait_all_done(rig.db.pool(), "the kept resource's side effects").await;
    first.sigterm();
    first.wait_exit(PATIENCE).await.expect("serve-1 exits");

    // What a killed process leaves, two hours old; and what a live one owns, fresh or not.
    let hours = Duration::from_secs(2 * 3600);
    let storage = rig.storage();
    let kept_id = uuid::Uuid::parse_str(kept[0]["id"].as_str().expect("id")).expect("uuid");
    let kept_file = files_under(&storage)
        .into_iter()
        .find(|p| p.file_name().unwrap().to_string_lossy() == kept_id.simple().to_string())
        .expect("the kept resource's file");
    age_file(&kept_file, hours);
    let orphan = uuid::Uuid::new_v4().simple().to_string();
    let old_orphan = storage.join(&orphan[30..]).join(&orphan);
    let old_temp = storage.join("0f").join(format!("{orphan}.tmp-0123"));
    let fresh_temp = storage.join("0f").join(format!("{orphan}.tmp-4567"));
    let fresh = uuid::Uuid::new_v4().simple().to_string();
    let fresh_upload = storage.join(&fresh[30..]).join(&fresh);
    plant(&old_orphan, hours);
    plant(&old_temp, hours);
    plant(&fresh_temp, Duration::ZERO);
    plant(&fresh_upload, Duration::ZERO);

    let second = rig.serve("serve-2", &options);
    let counts = eventually("the start-up sweep", PATIENCE, || async { swept(&second) }).await;
    assert_eq!(counts, (1, 1), "one old temp file, one old rowless upload");
    assert!(
        !old_orphan.exists() && !old_temp.exists(),
        "leftovers removed"
    );
    for path in [&kept_file, &fresh_temp, &fresh_upload] {
        assert!(path.exists(), "{} kept", path.display());
    }
    let api = rig.api(&second).await;
    let (status, body) = get_json(&client, &format!("{api}/resources/{kept_id}")).await;
    assert_eq!(status, 200, "{body}");
    rig.db.close().await;
}
