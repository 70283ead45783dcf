//! The reference service's task path, driven from outside as tests/tasks.rs (inline processing)
//! and tests/temporal.rs (processing on Temporal) both drive it: a broker with its topics,
//! `weir serve` with the database and the API, task creation, files to process (written, or
//! served over HTTP by the test), the webhook and manual triggers, and the service's JSON log
//! lines.

use super::broker::Tansu;
use super::db::TestDb;
use super::process::{eventually, ServeOptions, TestDir, WeirProcess, FAST_GROUP_TOML};
use crate::reference::{CUSTOMER_TOPIC, RESOURCE_TOPIC, TASK_TOPIC};
use axum::extract::{Path as UrlPath, State};
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Webhook secret of the services started with [`serve_options`].
pub const SECRET: &str = "test-webhook-secret";

/// A broker with the reference service's topics and the task dead-letter topic, `partitions`
/// each.
pub async fn broker(partitions: i32) -> Tansu {
    tokio::task::spawn_blocking(move || {
        let broker = Tansu::start_memory();
        for topic in [
            TASK_TOPIC,
            CUSTOMER_TOPIC,
            RESOURCE_TOPIC,
            "task-events.dlq",
        ] {
            broker.create_topic(topic, partitions);
        }
        broker
    })
    .await
    .expect("broker")
}

/// `weir serve` in consumer group `group` with the database, the API on an ephemeral port,
/// migrations on start, a fast relay, fast retries, the webhook secret [`SECRET`], and one
/// record per produced batch (Tansu 0.6 skips the rest of a batch a fetch starts inside; see
/// tests/kafka_process.rs). Its record file is `<dir>/<records>.records`.
pub fn serve_options(
    broker: &Tansu,
    db: &TestDb,
    group: &str,
    dir: &TestDir,
    records: &str,
) -> ServeOptions {
    ServeOptions::new(
        &broker.brokers(),
        group,
        &dir.join(&format!("{records}.records")),
    )
    .env("WEIR_DATABASE__URL", db.url())
    .env("WEIR_DATABASE__MIGRATE_ON_START", "true")
    .env("WEIR_HTTP__ADDR", "127.0.0.1:0")
    .env("WEIR_OUTBOX__POLL_INTERVAL", "100ms")
    .env("WEIR_KAFKA__PRODUCER__BATCH.NUM.MESSAGES", "1")
    .env("WEIR_CONSUMER__COMMIT_INTERVAL", "10ms")
    .env("WEIR_RETRY__INITIAL_INTERVAL", "100ms")
    .env("WEIR_TASKS__WEBHOOK_SECRET", SECRET)
    .env("WEIR_TASKS__FETCH_TIMEOUT", "5s")
    .config(FAST_GROUP_TOML)
}

/// A running service and its API's base URL.
pub struct Service {
    pub process: WeirProcess,
    pub base: String,
}

/// Starts `weir serve` and waits for its API to listen.
pub async fn start(dir: &TestDir, name: &str, options: &ServeOptions) -> Service {
    let process = WeirProcess::serve(dir.path(), name, options);
    let addr = eventually(
        &format!("{name} to serve"),
        Duration::from_secs(60),
        || async { process.http_addr().ok_or_else(|| process.stderr_tail(2048)) },
    )
    .await;
    Service {
        process,
        base: format!("http://{addr}"),
    }
}

/// `POST /tasks`; the new task's id.
pub async fn create_task(
    client: &reqwest::Client,
    base: &str,
    file_url: &str,
    entity: &str,
) -> Uuid {
    let response = client
        .post(format!("{base}/tasks"))
        .json(&json!({"file_url": file_url, "entity_type": entity}))
        .send()
        .await
        .expect("POST /tasks");
    assert_eq!(
        response.status(),
        StatusCode::CREATED,
        "POST /tasks {file_url}"
    );
    let body: Value = response.json().await.expect("JSON");
    assert_eq!(body["status"], "pending", "{body}");
    body["id"].as_str().expect("id").parse().expect("uuid")
}

/// Customers CSV: `good` valid rows and `bad` invalid ones (of three kinds), interleaved.
pub fn customers_csv(good: usize, bad: usize) -> String {
    let mut text = String::from("id,name,email\n");
    for i in 0..good.max(bad) {
        if i < good {
            text.push_str(&format!("c{i},Name {i},c{i}@example.com\n"));
        }
        if i < bad {
            text.push_str(match i % 3 {
                0 => ",No Id,x@example.com\n",
                1 => "b1,Bad Mail,not-an-address\n",
                _ => "b,too,many,fields\n",
            });
        }
    }
    text
}

/// Files served over HTTP by the test, from a directory:
/// - `/files/<name>`: the file;
/// - `/flaky<n>/<name>`: 503 to the first `n` requests of each name (`/flaky/<name>`: the
///   first), then the file;
/// - `/down/<name>`: always 503;
/// - `/export/<stem>`: the file `<stem>.<ext>`, without an extension in the URL
///   (`Content-Type` says the format);
/// - `/slow/<name>`: the file streamed 100 lines per 100 ms.
///
/// Every request's time is kept by `<kind>/<name>`, and the 503 answers are counted.
#[derive(Clone)]
pub struct FileServer {
    dir: PathBuf,
    pub hits: Arc<Mutex<HashMap<String, Vec<Instant>>>>,
    pub unavailable: Arc<AtomicUsize>,
}

async fn serve_file(
    State(server): State<FileServer>,
    UrlPath((kind, name)): UrlPath<(String, String)>,
) -> axum::response::Response {
    let count = {
        let mut hits = server.hits.lock().unwrap();
        let times = hits.entry(format!("{kind}/{name}")).or_default();
        times.push(Instant::now());
        times.len()
    };
    let failing = match kind.strip_prefix("flaky") {
        Some("") => count == 1,
        Some(n) => count <= n.parse().unwrap_or(0),
        None => kind == "down",
    };
    if failing {
        server.unavailable.fetch_add(1, Ordering::SeqCst);
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let name = match kind.as_str() {
        "export" => std::fs::read_dir(&server.dir)
            .into_iter()
            .flatten()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .find(|f| f.split_once('.').is_some_and(|(stem, _)| stem == name))
            .unwrap_or(name),
        _ => name,
    };
    let Ok(bytes) = tokio::fs::read(server.dir.join(&name)).await else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let content_type = if name.ends_with(".csv") {
        "text/csv"
    } else {
        "application/x-ndjson"
    };
    if kind != "slow" {
        return ([(header::CONTENT_TYPE, content_type)], bytes).into_response();
    }
    // A slow source: 100 lines per 100 ms, so a run of a few thousand records takes seconds
    // whatever the machine's speed.
    let lines: Vec<bytes::Bytes> = bytes
        .split_inclusive(|b| *b == b'\n')
        .collect::<Vec<_>>()
        .chunks(100)
        .map(|chunk| bytes::Bytes::from(chunk.concat()))
        .collect();
    let stream = futures_util::stream::unfold(lines.into_iter(), |mut rest| async move {
        let next = rest.next()?;
        tokio::time::sleep(Duration::from_millis(100)).await;
        Some((Ok::<_, std::io::Error>(next), rest))
    });
    (
        [(header::CONTENT_TYPE, content_type)],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// Serves `dir` (see [`FileServer`]) on an ephemeral port; its base URL and the server's
/// counters.
pub async fn file_server(dir: &Path) -> (String, FileServer) {
    let server = FileServer {
        dir: dir.to_owned(),
        hits: Arc::default(),
        unavailable: Arc::default(),
    };
    let app = axum::Router::new()
        .route("/{kind}/{name}", axum::routing::get(serve_file))
        .with_state(server.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), server)
}

/// `X-Weir-Timestamp` and `X-Weir-Signature` for `body` signed at `timestamp` with `secret`.
pub fn signed(secret: &str, timestamp: i64, body: &str) -> [(&'static str, String); 2] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("key");
    mac.update(format!("{timestamp}.{body}").as_bytes());
    [
        ("x-weir-timestamp", timestamp.to_string()),
        (
            "x-weir-signature",
            format!("sha256={}", hex::encode(mac.finalize().into_bytes())),
        ),
    ]
}

/// JSON log lines of a process whose message is `message`.
pub fn log_lines(process: &WeirProcess, message: &str) -> Vec<Value> {
    process
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(|v| v["fields"]["message"] == message)
        .collect()
}

/// `POST /webhooks/task-processing` with `headers` (see [`signed`]); the status and the JSON
/// answer (`null` if there is none).
pub async fn webhook(
    client: &reqwest::Client,
    base: &str,
    headers: &[(&'static str, String)],
    body: &str,
) -> (StatusCode, Value) {
    let mut request = client
        .post(format!("{base}/webhooks/task-processing"))
        .header(header::CONTENT_TYPE, "application/json")
        .body(body.to_owned());
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    let response = request.send().await.expect("webhook call");
    let status = response.status();
    (status, response.json().await.unwrap_or(Value::Null))
}

/// The manual trigger: `weir publish --process-task <task>` against the test's database, run to
/// its end; its exit status and the process (for its output).
pub async fn publish_process_task(
    dir: &TestDir,
    name: &str,
    db: &TestDb,
    task: Uuid,
) -> (ExitStatus, WeirProcess) {
    let env = [("WEIR_DATABASE__URL".to_owned(), db.url())];
    let mut process = WeirProcess::spawn(
        dir.path(),
        name,
        &["publish", "--process-task", &task.to_string()],
        &env,
    );
    let status = process
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("weir publish exits");
    (status, process)
}
