//! The reference service's task path (processing, with its progress), end to end: `weir
//! serve` processes with PostgreSQL (a fresh schema per test) and a Tansu broker (one per test),
//! files in a temp dir or served over HTTP by the test itself.
//!
//! What is checked, from outside the process: the task rows and their runs (`task_runs`, one per
//! processing event), the outbox rows the triggers wrote, the dead-letter topic, the schedule's
//! ticks and log lines.

mod reference;
mod support;

use axum::http::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use support::broker::{unique, Tansu};
use support::db::TestDb;
use support::process::{eventually, ServeOptions, TestDir, WeirProcess};
use support::tasks::{
    broker, create_task, customers_csv, file_server, log_lines, publish_process_task,
    serve_options, signed, start, webhook, Service, SECRET,
};
use uuid::Uuid;
use weir::dead_letter_headers as dlh;

const PARTITIONS: i32 = 4;
/// Overall deadline for anything the service does asynchronously.
const PATIENCE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// [`serve_options`] with a short revoke timeout, for the rebalances here.
fn options(broker: &Tansu, db: &TestDb, group: &str, dir: &TestDir, name: &str) -> ServeOptions {
    serve_options(broker, db, group, dir, name).env("WEIR_CONSUMER__REVOKE_TIMEOUT", "2s")
}

/// A task's row: status, good, bad, error.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Row {
    status: String,
    good: i64,
    bad: i64,
    error: Option<String>,
}

async fn row(pool: &PgPool, id: Uuid) -> Row {
    let (status, good, bad, error): (String, i64, i64, Option<String>) =
        sqlx::query_as("SELECT status, good_records, bad_records, error FROM tasks WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .expect("task row");
    Row {
        status,
        good,
        bad,
        error,
    }
}

/// A webhook call and its expected answer: (what, headers, body, status, error kind).
type WebhookCase<'a> = (
    &'a str,
    Vec<(&'static str, String)>,
    &'a str,
    StatusCode,
    &'a str,
);

/// A run as compared: (event type, triggered by, attempts, outcome, (good, bad)).
type RunSummary<'a> = (&'a str, &'a str, i32, Option<&'a str>, Option<(i64, i64)>);

/// One processing run: (event type, triggered by, attempts, outcome, good, bad).
type Run = (
    String,
    String,
    i32,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

async fn runs(pool: &PgPool, id: Uuid) -> Vec<Run> {
    sqlx::query_as(
        "SELECT event_type, triggered_by, attempts, outcome, good_records, bad_records
           FROM task_runs WHERE task_id = $1 ORDER BY id",
    )
    .bind(id)
    .fetch_all(pool)
    .await
    .expect("runs")
}

/// Waits until the task has `count` runs, all finished, and the row is final.
async fn wait_runs(pool: &PgPool, id: Uuid, count: usize, process: &WeirProcess) -> Vec<Run> {
    eventually(
        &format!("{count} finished runs of task {id}"),
        PATIENCE,
        || async {
            let runs = runs(pool, id).await;
            let row = row(pool, id).await;
            let done = runs.len() == count
                && runs.iter().all(|r| r.3.is_some())
                && (row.status == "completed" || row.status == "failed");
            if done {
                Ok(runs)
            } else {
                Err(format!("{row:?} {runs:?}\n{}", process.stderr_tail(1024)))
            }
        },
    )
    .await
}

/// `task.processing_requested` rows in the outbox for a task, by trigger.
async fn requests(pool: &PgPool, id: Uuid) -> BTreeMap<String, i64> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT convert_from(payload, 'UTF8')::jsonb -> 'data' ->> 'triggered_by', count(*)
           FROM weir_outbox
          WHERE event_type = 'task.processing_requested' AND key = $1
          GROUP BY 1",
    )
    .bind(id.to_string())
    .fetch_all(pool)
    .await
    .expect("outbox rows");
    rows.into_iter().collect()
}

/// Inserts a task that is pending since `age` ago, as one whose processing never started
/// (the schedule's business).
async fn insert_stale_task(pool: &PgPool, file: &Path, age: &str) -> Uuid {
    let id = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO tasks (id, tenant_id, environment_id, file_url, entity_type, status,
                            created_at)
         VALUES ($1, 't', 'e', $2, 'customers', 'pending', now() - $3::interval)",
    )
    .bind(id)
    .bind(format!("file://{}", file.display()))
    .bind(age)
    .execute(pool)
    .await
    .expect("insert a stale task");
    id
}

/// Products as JSON lines: `good` valid and `bad` invalid (of three kinds), interleaved.
fn products_jsonl(good: usize, bad: usize) -> String {
    let mut text = String::new();
    for i in 0..good.max(bad) {
        if i < good {
            text.push_str(&format!("{{\"sku\":\"P{i}\",\"price\":{}.5}}\n", i));
        }
        if i < bad {
            text.push_str(match i % 3 {
                0 => "{\"sku\":\"N\",\"price\":-2}\n",
                1 => "{not json\n",
                _ => "{\"price\":3}\n",
            });
        }
        if i % 5 == 0 {
            text.push('\n'); // blank lines are not records
        }
    }
    text
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_tasks_end_completed_with_exact_counts_or_failed_and_dead_lettered() {
    let db = TestDb::new().await;
    let broker = broker(PARTITIONS).await;
    let dir = TestDir::new("weir-tasks-fifty");
    let files = TestDir::new("weir-tasks-files");
    let (http, server) = file_server(files.path()).await;
    let group = unique("tasks");
    let service = start(&dir, "serve", &options(&broker, &db, &group, &dir, "serve")).await;
    let client = reqwest::Client::new();
    let base = &service.base;

    // The API refuses what can never be processed, before anything is written.
    for (body, kind) in [
        (
            json!({"file_url": "/x.csv", "entity_type": "orders"}),
            "invalid_entity_type",
        ),
        (
            json!({"file_url": "https://h/x.csv", "entity_type": "customers"}),
            "invalid_file_url",
        ),
        (json!({"entity_type": "customers"}), "invalid_body"),
    ] {
        let response = client
            .post(format!("{base}/tasks"))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{body}");
        let answer: Value = response.json().await.unwrap();
        assert_eq!(answer["error"], kind, "{answer}");
    }
    let missing = client
        .get(format!("{base}/tasks/{}", Uuid::now_v7()))
        .send()
        .await
        .unwrap();
    assert_eq!(missing.status(), StatusCode::NOT_FOUND);
    let garbled = client
        .get(format!("{base}/tasks/nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(garbled.status(), StatusCode::BAD_REQUEST);

    // 47 files with known counts (local paths, file:// URLs, HTTP: plain, flaky, and without
    // an extension so that its Content-Type decides), a missing file, an unsupported format
    // and an HTTP file that is never there.
    let mut expected: HashMap<Uuid, Result<(i64, i64), &str>> = HashMap::new();
    for i in 0..47usize {
        let (good, bad) = (3 + i % 7, i % 4);
        let (name, text, entity) = match i % 4 {
            0 | 1 => (format!("c{i}.csv"), customers_csv(good, bad), "customers"),
            2 => (format!("p{i}.jsonl"), products_jsonl(good, bad), "products"),
            _ => (
                format!("p{i}.ndjson"),
                products_jsonl(good, bad),
                "products",
            ),
        };
        std::fs::write(files.join(&name), text).expect("write file");
        let url = match i % 6 {
            0 => files.join(&name).display().to_string(),
            1 => format!("{http}/files/{name}"),
            2 => format!("{http}/flaky/{name}"),
            4 => format!("{http}/export/{}", name.split('.').next().unwrap()),
            _ => format!("file://{}", files.join(&name).display()),
        };
        let id = create_task(&client, base, &url, entity).await;
        expected.insert(id, Ok((good as i64, bad as i64)));
    }
    let missing_file = format!("file://{}", files.join("missing.csv").display());
    let missing_id = create_task(&client, base, &missing_file, "customers").await;
    expected.insert(missing_id, Err("No such file"));
    std::fs::write(files.join("data.xml"), "<customers/>").unwrap();
    let xml = files.join("data.xml").display().to_string();
    let xml_id = create_task(&client, base, &xml, "customers").await;
    expected.insert(xml_id, Err("unsupported format"));
    // Down for good: retried, then failed on the last attempt.
    let down_id = create_task(&client, base, &format!("{http}/down/c0.csv"), "customers").await;
    expected.insert(down_id, Err("gave up after 5 attempts"));
    assert_eq!(expected.len(), 50);

    let started = Instant::now();
    eventually("all 50 tasks final", PATIENCE, || async {
        let (open,): (i64,) = sqlx::query_as(
            "SELECT count(*) FROM tasks WHERE status NOT IN ('completed', 'failed')",
        )
        .fetch_one(db.pool())
        .await
        .unwrap();
        if open == 0 {
            Ok(())
        } else {
            Err(format!(
                "{open} open\n{}",
                service.process.stderr_tail(1024)
            ))
        }
    })
    .await;
    println!(
        "fifty: all final {:?} after the last POST",
        started.elapsed()
    );

    for (id, want) in &expected {
        let row = row(db.pool(), *id).await;
        match want {
            Ok((good, bad)) => assert_eq!(
                (row.status.as_str(), row.good, row.bad, row.error.as_deref()),
                ("completed", *good, *bad, None),
                "task {id}"
            ),
            Err(reason) => {
                assert_eq!(row.status, "failed", "task {id}: {row:?}");
                let error = row.error.clone().unwrap_or_default();
                assert!(error.contains(reason), "task {id}: {error}");
            }
        }
        // Each task was processed by exactly one run (its creation), in one attempt or more.
        let runs = runs(db.pool(), *id).await;
        assert_eq!(runs.len(), 1, "task {id}: {runs:?}");
    }
    assert!(
        server.unavailable.load(Ordering::SeqCst) >= 8,
        "the flaky files failed once each, and were retried"
    );

    // The API shows counts and progress.
    let task: Value = client
        .get(format!(
            "{base}/tasks/{}",
            expected.keys().find(|id| expected[id].is_ok()).unwrap()
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(task["status"], "completed", "{task}");
    assert_eq!(task["progress"], 1.0, "{task}");
    assert_eq!(
        task["processed_records"].as_i64(),
        Some(task["good_records"].as_i64().unwrap() + task["bad_records"].as_i64().unwrap()),
        "{task}"
    );
    assert_eq!(task["runs"], 1, "{task}");
    assert_eq!(task["last_triggered_by"], "api", "{task}");
    let failed: Value = client
        .get(format!("{base}/tasks/{xml_id}"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(failed["status"], "failed", "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("unsupported format"),
        "{failed}"
    );

    // The failed ones, and only they, are in the dead-letter topic, with the reason.
    let dead = support::kafka::read_topic(
        &broker.brokers(),
        "task-events.dlq",
        3,
        Duration::from_secs(1),
        PATIENCE,
    )
    .await;
    let keys: HashSet<String> = dead
        .iter()
        .map(|r| String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned())
        .collect();
    assert_eq!(
        keys,
        HashSet::from([
            missing_id.to_string(),
            xml_id.to_string(),
            down_id.to_string()
        ]),
        "dead letters: {dead:?}"
    );
    for record in &dead {
        assert_eq!(record.headers.get_str(dlh::HANDLER), Some("process_task"));
        let message = record
            .headers
            .get_str(dlh::ERROR_MESSAGE)
            .unwrap_or_default();
        assert!(
            ["No such file", "unsupported format", "503"]
                .iter()
                .any(|reason| message.contains(reason)),
            "{message}"
        );
    }
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_trigger_processes_its_task_once_and_the_webhook_rejects_bad_calls_publishing_nothing()
{
    let db = TestDb::new().await;
    let broker = broker(PARTITIONS).await;
    let dir = TestDir::new("weir-tasks-triggers");
    let group = unique("tasks");
    // Every second, but only tasks pending for an hour: the ones created here are not swept.
    let service_options = options(&broker, &db, &group, &dir, "serve")
        .env("WEIR_TASKS__SCHEDULE", "* * * * * *")
        .env("WEIR_TASKS__PENDING_AFTER", "1h");
    let service = start(&dir, "serve", &service_options).await;
    let client = reqwest::Client::new();
    let base = &service.base;
    let file = dir.join("customers.csv");
    std::fs::write(&file, customers_csv(7, 2)).unwrap();
    let single_run = Some((7, 2));

    // API: creation.
    let task = create_task(&client, base, &file.display().to_string(), "customers").await;
    wait_runs(db.pool(), task, 1, &service.process).await;

    // API: POST /tasks/{id}/process.
    let response = client
        .post(format!("{base}/tasks/{task}/process"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    wait_runs(db.pool(), task, 2, &service.process).await;
    let unknown = client
        .post(format!("{base}/tasks/{}/process", Uuid::now_v7()))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);

    // Manual: weir publish --process-task.
    let (status, publish) = publish_process_task(&dir, "publish", &db, task).await;
    assert!(status.success(), "{}", publish.stderr());
    assert!(
        publish.stdout().contains("triggered_by manual"),
        "{}",
        publish.stdout()
    );
    wait_runs(db.pool(), task, 3, &service.process).await;
    let (status, unknown) =
        publish_process_task(&dir, "publish-unknown", &db, Uuid::now_v7()).await;
    assert!(!status.success());
    assert!(
        unknown.stderr().contains("nothing was requested"),
        "{}",
        unknown.stderr()
    );

    // Webhook: the bad calls first, then one good call and its replay.
    let now = chrono::Utc::now().timestamp();
    let body = json!({"task_id": task, "triggered_by": "webhook"}).to_string();
    let unknown_body = json!({"task_id": Uuid::now_v7()}).to_string();
    let manual_body = json!({"task_id": task, "triggered_by": "manual"}).to_string();
    let cases: [WebhookCase; 7] = [
        (
            "no signature",
            vec![],
            &body,
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "wrong secret",
            signed("not-the-secret", now, &body).to_vec(),
            &body,
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "body altered after signing",
            signed(SECRET, now, &unknown_body).to_vec(),
            &body,
            StatusCode::UNAUTHORIZED,
            "invalid_signature",
        ),
        (
            "replay of an old request",
            signed(SECRET, now - 600, &body).to_vec(),
            &body,
            StatusCode::UNAUTHORIZED,
            "stale_timestamp",
        ),
        (
            "unknown task",
            signed(SECRET, now, &unknown_body).to_vec(),
            &unknown_body,
            StatusCode::NOT_FOUND,
            "not_found",
        ),
        (
            "malformed body",
            signed(SECRET, now, "{\"task\": 1}").to_vec(),
            "{\"task\": 1}",
            StatusCode::BAD_REQUEST,
            "invalid_body",
        ),
        (
            "another trigger's name",
            signed(SECRET, now, &manual_body).to_vec(),
            &manual_body,
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_trigger",
        ),
    ];
    for (what, headers, body, status, kind) in &cases {
        let (got, answer) = webhook(&client, base, headers, body).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (*status, Some(*kind)),
            "{what}: {answer}"
        );
    }
    let good = signed(SECRET, now, &body);
    let (status, answer) = webhook(&client, base, &good, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let (status, answer) = webhook(&client, base, &good, &body).await;
    assert_eq!(
        status,
        StatusCode::CONFLICT,
        "the same signed call again: {answer}"
    );
    assert_eq!(answer["error"], "replayed");
    wait_runs(db.pool(), task, 4, &service.process).await;

    // Scheduled: a task pending for two hours is requested by the next tick, once.
    let stale = insert_stale_task(db.pool(), &file, "2 hours").await;
    let stale_runs = wait_runs(db.pool(), stale, 1, &service.process).await;
    assert_eq!(stale_runs[0].1, "scheduled");
    let (ticks_then,): (i64,) = sqlx::query_as("SELECT count(*) FROM task_schedule_ticks")
        .fetch_one(db.pool())
        .await
        .unwrap();
    eventually("three more ticks", Duration::from_secs(30), || async {
        let (ticks,): (i64,) = sqlx::query_as("SELECT count(*) FROM task_schedule_ticks")
            .fetch_one(db.pool())
            .await
            .unwrap();
        (ticks >= ticks_then + 3)
            .then_some(())
            .ok_or(format!("{ticks} ticks"))
    })
    .await;
    assert_eq!(
        runs(db.pool(), stale).await.len(),
        1,
        "one scheduled run only"
    );
    assert_eq!(
        requests(db.pool(), stale).await,
        BTreeMap::from([("scheduled".into(), 1)])
    );

    // Exactly one run per trigger, each with the counts of a single run; and the outbox holds
    // exactly the accepted requests (the rejected calls wrote nothing).
    let all = runs(db.pool(), task).await;
    let by_trigger: Vec<RunSummary> = all
        .iter()
        .map(|r| {
            (
                r.0.as_str(),
                r.1.as_str(),
                r.2,
                r.3.as_deref(),
                r.4.zip(r.5),
            )
        })
        .collect();
    assert_eq!(
        by_trigger,
        vec![
            ("task.created", "api", 1, Some("completed"), single_run),
            (
                "task.processing_requested",
                "api",
                1,
                Some("completed"),
                single_run
            ),
            (
                "task.processing_requested",
                "manual",
                1,
                Some("completed"),
                single_run
            ),
            (
                "task.processing_requested",
                "webhook",
                1,
                Some("completed"),
                single_run
            ),
        ]
    );
    assert_eq!(
        requests(db.pool(), task).await,
        BTreeMap::from([
            ("api".into(), 1),
            ("manual".into(), 1),
            ("webhook".into(), 1)
        ])
    );
    let (all_requests,): (i64,) = sqlx::query_as(
        "SELECT count(*) FROM weir_outbox WHERE event_type = 'task.processing_requested'",
    )
    .fetch_one(db.pool())
    .await
    .unwrap();
    assert_eq!(
        all_requests, 4,
        "api, manual, webhook and scheduled; nothing else"
    );
    assert_eq!(
        row(db.pool(), task).await,
        Row {
            status: "completed".into(),
            good: 7,
            bad: 2,
            error: None
        }
    );
    db.close().await;
}

/// A generated webhook call: (what, headers, body, expected status and error kind).
type HostileCall = (
    String,
    Vec<(&'static str, String)>,
    String,
    (StatusCode, &'static str),
);

/// What a webhook call may leave behind: accepted deliveries and processing requests.
async fn webhook_writes(pool: &PgPool) -> (i64, i64) {
    sqlx::query_as(
        "SELECT (SELECT count(*) FROM task_webhook_deliveries),
                (SELECT count(*) FROM weir_outbox WHERE event_type = 'task.processing_requested')",
    )
    .fetch_one(pool)
    .await
    .expect("count")
}

/// Hostile webhook calls, generated from a table: every way the signature, the timestamp or
/// the body can be wrong, missing or replayed. Each gets a 4xx naming what is wrong, and none
/// writes a delivery or a processing request; only the one good call does, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_stale_or_replayed_webhook_call_gets_a_4xx_and_writes_nothing() {
    let db = TestDb::new().await;
    let broker = broker(PARTITIONS).await;
    let dir = TestDir::new("weir-tasks-webhook");
    let service = start(
        &dir,
        "serve",
        &options(&broker, &db, &unique("webhook"), &dir, "serve"),
    )
    .await;
    let client = reqwest::Client::new();
    let base = &service.base;
    let file = dir.join("customers.csv");
    std::fs::write(&file, customers_csv(2, 0)).unwrap();
    let task = create_task(&client, base, &file.display().to_string(), "customers").await;
    let before = webhook_writes(db.pool()).await;

    let now = chrono::Utc::now().timestamp();
    let window = 5 * 60; // tasks.webhook_window's default
    let body = json!({"task_id": task, "triggered_by": "webhook"}).to_string();
    let good = signed(SECRET, now, &body);
    let [(ts_name, ts), (sig_name, sig)] = good.clone();
    let hex = sig.trim_start_matches("sha256=").to_owned();
    let unauthorized = |kind: &'static str| (StatusCode::UNAUTHORIZED, kind);
    let mut cases: Vec<HostileCall> = Vec::new();
    let mut case = |what: &str, headers: Vec<(&'static str, String)>, body: &str, expected| {
        cases.push((what.to_owned(), headers, body.to_owned(), expected));
    };

    // Missing or malformed headers.
    case(
        "no headers",
        vec![],
        &body,
        unauthorized("invalid_signature"),
    );
    case(
        "no signature",
        vec![(ts_name, ts.clone())],
        &body,
        unauthorized("invalid_signature"),
    );
    case(
        "no timestamp",
        vec![(sig_name, sig.clone())],
        &body,
        unauthorized("invalid_signature"),
    );
    for bad_ts in ["", "abc", "1e9", "1.5", "-", "0x10", "99999999999999999999"] {
        case(
            &format!("timestamp {bad_ts:?}"),
            vec![(ts_name, bad_ts.to_owned()), (sig_name, sig.clone())],
            &body,
            unauthorized("invalid_signature"),
        );
    }
    for bad_sig in [
        String::new(),
        "sha256=".to_owned(),
        "sha256=zz".to_owned(),
        hex.clone(),
        format!("sha1={hex}"),
        format!("SHA256={hex}"),
        format!("sha256={}", &hex[..hex.len() - 1]),
        format!("sha256={}", &hex[..hex.len() - 2]),
        format!("sha256={hex}00"),
        format!("sha256={}", "0".repeat(64)),
        format!("sha256={}", "f".repeat(4096)),
    ] {
        case(
            &format!("signature {:?}", &bad_sig[..bad_sig.len().min(24)]),
            vec![(ts_name, ts.clone()), (sig_name, bad_sig)],
            &body,
            unauthorized("invalid_signature"),
        );
    }
    // Signed, but not by this secret or not for this request.
    for (what, headers) in [
        ("another secret", signed("not-the-secret", now, &body)),
        ("an empty secret", signed("", now, &body)),
        ("another body", signed(SECRET, now, "{}")),
        ("another timestamp", {
            let [_, (name, value)] = signed(SECRET, now - 1, &body);
            [(ts_name, ts.clone()), (name, value)]
        }),
    ] {
        case(
            what,
            headers.to_vec(),
            &body,
            unauthorized("invalid_signature"),
        );
    }
    // Signed with the secret, at a time outside the window (a replay of an old call, or a
    // clock far off), down to the extremes of the timestamp's type.
    for signed_at in [
        now - window - 2,
        now + window + 2,
        now - 10 * 365 * 24 * 3600,
        0,
        -1,
        i64::MIN,
        i64::MAX,
    ] {
        case(
            &format!("signed at {signed_at}"),
            signed(SECRET, signed_at, &body).to_vec(),
            &body,
            unauthorized("stale_timestamp"),
        );
    }
    // Signed correctly, but not a request this route takes.
    let bad_request = (StatusCode::BAD_REQUEST, "invalid_body");
    let unknown = json!({"task_id": Uuid::now_v7()}).to_string();
    for (bad_body, expected) in [
        ("", bad_request),
        ("null", bad_request),
        ("[]", bad_request),
        ("{}", bad_request),
        ("{\"task_id\": \"not-a-uuid\"}", bad_request),
        ("{\"task_id\": 7}", bad_request),
        (
            &*format!("{{\"task_id\": \"{task}\", \"extra\": 1}}"),
            bad_request,
        ),
        (
            &*format!("{{\"task_id\": \"{task}\"}} trailing"),
            bad_request,
        ),
        (
            &*format!("{{\"task_id\": \"{task}\", \"triggered_by\": \"nobody\"}}"),
            bad_request,
        ),
        (
            &*format!("{{\"task_id\": \"{task}\", \"triggered_by\": \"manual\"}}"),
            (StatusCode::UNPROCESSABLE_ENTITY, "invalid_trigger"),
        ),
        (&*unknown, (StatusCode::NOT_FOUND, "not_found")),
    ] {
        case(
            &format!("body {:?}", &bad_body[..bad_body.len().min(40)]),
            signed(SECRET, now, bad_body).to_vec(),
            bad_body,
            expected,
        );
    }

    let tried = cases.len() + 3; // and the three replays below
    for (what, headers, body, (status, kind)) in &cases {
        let (got, answer) = webhook(&client, base, headers, body).await;
        assert_eq!(
            (got, answer["error"].as_str()),
            (*status, Some(*kind)),
            "{what}: {answer}"
        );
        assert!(got.is_client_error(), "{what}: {got}");
        assert!(
            answer["message"].as_str().is_some_and(|m| !m.is_empty()),
            "{what}: {answer}"
        );
    }
    assert_eq!(
        webhook_writes(db.pool()).await,
        before,
        "a refused call wrote a delivery or a request"
    );

    // The good call once, then its replays: the same bytes, the same signature spelled in
    // upper case, the timestamp padded with spaces.
    let (status, answer) = webhook(&client, base, &good, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    let after_good = webhook_writes(db.pool()).await;
    assert_eq!(after_good, (before.0 + 1, before.1 + 1));
    for (what, headers) in [
        ("the same call", good.to_vec()),
        (
            "upper-case hex",
            vec![
                (ts_name, ts.clone()),
                (sig_name, format!("sha256={}", hex.to_uppercase())),
            ],
        ),
        (
            "a padded timestamp",
            vec![(ts_name, format!(" {ts} ")), (sig_name, sig.clone())],
        ),
    ] {
        let (status, answer) = webhook(&client, base, &headers, &body).await;
        assert_eq!(
            (status, answer["error"].as_str()),
            (StatusCode::CONFLICT, Some("replayed")),
            "replay with {what}: {answer}"
        );
    }
    assert_eq!(
        webhook_writes(db.pool()).await,
        after_good,
        "replays wrote nothing"
    );
    let _ = writeln!(
        std::io::stderr(),
        "webhook: {tried} hostile calls tried, each a 4xx, none wrote anything"
    );
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_with_one_schedule_fire_each_tick_once() {
    let db = TestDb::new().await;
    let broker = broker(PARTITIONS).await;
    let dir = TestDir::new("weir-tasks-replicas");
    let group = unique("tasks");
    let replica = |name: &str| {
        options(&broker, &db, &group, &dir, name)
            .env("WEIR_TASKS__SCHEDULE", "* * * * * *")
            .env("WEIR_TASKS__PENDING_AFTER", "30s")
            .env("RUST_LOG", "info,weir::reference::tasks::schedule=debug")
    };
    let a = start(&dir, "a", &replica("a")).await;
    let b = start(&dir, "b", &replica("b")).await;
    let file = dir.join("customers.csv");
    std::fs::write(&file, customers_csv(4, 1)).unwrap();

    // Three waves of stale tasks, each swept by a tick while both replicas run.
    let mut stale = Vec::new();
    for _ in 0..3 {
        let wave: Vec<Uuid> = {
            let mut wave = Vec::new();
            for _ in 0..4 {
                wave.push(insert_stale_task(db.pool(), &file, "1 hour").await);
            }
            wave
        };
        for id in &wave {
            wait_runs(db.pool(), *id, 1, &a.process).await;
        }
        stale.extend(wave);
    }

    // Both replicas saw the same ticks; for each, one fired and the other stood down.
    let fired = |p: &WeirProcess| -> Vec<String> {
        log_lines(p, "Schedule fired.")
            .iter()
            .map(|v| {
                v["fields"]["tick_at"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    let skipped = |p: &WeirProcess| -> Vec<String> {
        log_lines(p, "Schedule tick already fired by another replica.")
            .iter()
            .map(|v| {
                v["fields"]["tick_at"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned()
            })
            .collect()
    };
    let (fired_a, fired_b) = (fired(&a.process), fired(&b.process));
    let mut firings: HashMap<&str, usize> = HashMap::new();
    for tick in fired_a.iter().chain(&fired_b) {
        *firings.entry(tick.as_str()).or_default() += 1;
    }
    let doubles: Vec<_> = firings.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubles.is_empty(), "ticks fired twice: {doubles:?}");
    let contested: HashSet<String> = skipped(&a.process)
        .into_iter()
        .chain(skipped(&b.process))
        .filter(|tick| firings.contains_key(tick.as_str()))
        .collect();
    println!(
        "replicas: a fired {}, b fired {}, {} ticks seen by both",
        fired_a.len(),
        fired_b.len(),
        contested.len()
    );
    assert!(
        contested.len() >= 3,
        "both replicas ran the schedule together"
    );
    let (ticks, requested): (i64, i64) =
        sqlx::query_as("SELECT count(*), sum(requested)::int8 FROM task_schedule_ticks")
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(
        ticks as usize >= firings.len(),
        "{ticks} rows, {} fired",
        firings.len()
    );
    assert_eq!(
        requested,
        stale.len() as i64,
        "each stale task requested by one tick"
    );

    // Each stale task was requested once and processed once.
    for id in &stale {
        assert_eq!(
            requests(db.pool(), *id).await,
            BTreeMap::from([("scheduled".into(), 1)])
        );
        let runs = runs(db.pool(), *id).await;
        assert_eq!(runs.len(), 1, "{runs:?}");
        assert_eq!(runs[0].3.as_deref(), Some("completed"));
    }
    drop((a, b));
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tick_missed_while_no_replica_ran_fires_once_on_start() {
    let db = TestDb::new().await;
    let broker = broker(PARTITIONS).await;
    let dir = TestDir::new("weir-tasks-missed");
    let group = unique("tasks");
    // Yearly, at midnight on 1 January: its latest occurrence is far from any test's clock.
    let schedule = "0 0 0 1 1 *";
    let mut migrate = WeirProcess::spawn(
        dir.path(),
        "migrate",
        &["migrate"],
        &[("WEIR_DATABASE__URL".to_owned(), db.url())],
    );
    let status = migrate
        .wait_exit(Duration::from_secs(60))
        .await
        .expect("exits");
    assert!(status.success(), "{}", migrate.stderr());
    let latest: chrono::DateTime<chrono::Utc> = {
        use chrono::{Datelike, TimeZone};
        chrono::Utc
            .with_ymd_and_hms(chrono::Utc::now().year(), 1, 1, 0, 0, 0)
            .unwrap()
    };
    // The schedule last fired three years before that; every year since was missed.
    sqlx::query(
        "INSERT INTO task_schedule_ticks (schedule, tick_at, fired_by)
         VALUES ($1, $2 - interval '3 years', 'an old replica')",
    )
    .bind(schedule)
    .bind(latest)
    .execute(db.pool())
    .await
    .unwrap();
    let file = dir.join("customers.csv");
    std::fs::write(&file, customers_csv(3, 3)).unwrap();
    let stale = [
        insert_stale_task(db.pool(), &file, "2 hours").await,
        insert_stale_task(db.pool(), &file, "3 hours").await,
    ];

    let replica = |name: &str| {
        options(&broker, &db, &group, &dir, name)
            .env("WEIR_TASKS__SCHEDULE", schedule)
            .env("WEIR_TASKS__PENDING_AFTER", "1m")
    };
    let a = WeirProcess::serve(dir.path(), "a", &replica("a"));
    let b = WeirProcess::serve(dir.path(), "b", &replica("b"));
    for id in stale {
        let service = Service {
            process: WeirProcess::spawn(dir.path(), "noop", &["--help"], &[]),
            base: String::new(),
        };
        wait_runs(db.pool(), id, 1, &service.process).await;
    }
    let ticks = |pool: PgPool| async move {
        sqlx::query_as::<_, (chrono::DateTime<chrono::Utc>, i32)>(
            "SELECT tick_at, requested FROM task_schedule_ticks ORDER BY tick_at",
        )
        .fetch_all(&pool)
        .await
        .unwrap()
    };
    // The latest missed tick fired (none of the years before it), and the three-year-old one
    // was purged as older than a day.
    let after_start = ticks(db.pool().clone()).await;
    assert_eq!(
        after_start,
        vec![(latest, 2)],
        "one tick: the latest missed one, requesting both tasks"
    );
    let caught_up = [&a, &b]
        .iter()
        .map(|p| log_lines(p, "Firing the latest tick missed while no replica ran.").len())
        .sum::<usize>();
    assert!(caught_up >= 1, "a replica caught up");

    // Another start later finds nothing missed. (It has no webhook secret: the webhook is off.)
    let c = WeirProcess::serve(
        dir.path(),
        "c",
        &replica("c").env("WEIR_TASKS__WEBHOOK_SECRET", ""),
    );
    eventually("c's schedule running", Duration::from_secs(60), || async {
        (!log_lines(&c, "Task schedule running.").is_empty())
            .then_some(())
            .ok_or_else(|| c.stderr_tail(1024))
    })
    .await;
    assert_eq!(ticks(db.pool().clone()).await, after_start);
    let base = format!("http://{}", c.http_addr().expect("c serves"));
    let body = json!({"task_id": stale[0]}).to_string();
    let signed_call = signed(SECRET, chrono::Utc::now().timestamp(), &body);
    let (status, answer) = webhook(&reqwest::Client::new(), &base, &signed_call, &body).await;
    assert_eq!(
        (status, answer["error"].as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, Some("webhook_disabled"))
    );
    for id in stale {
        assert_eq!(
            requests(db.pool(), id).await,
            BTreeMap::from([("scheduled".into(), 1)])
        );
    }
    drop((a, b, c));
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_rerequested_while_processing_and_redelivered_after_sigkill_ends_with_single_run_counts(
) {
    let db = TestDb::new().await;
    let broker = broker(PARTITIONS).await;
    let dir = TestDir::new("weir-tasks-kill");
    let group = unique("tasks");
    // A progress update after every record: slow enough to be caught mid-file.
    let service_options =
        options(&broker, &db, &group, &dir, "serve").env("WEIR_TASKS__PROGRESS_EVERY", "1");
    let mut first = start(&dir, "first", &service_options).await;
    let client = reqwest::Client::new();
    let (good, bad) = (3_500, 500);
    let file = dir.join("big.csv");
    std::fs::write(&file, customers_csv(good, bad)).unwrap();
    let task = create_task(
        &client,
        &first.base,
        &file.display().to_string(),
        "customers",
    )
    .await;

    let seen = eventually("processing under way", PATIENCE, || async {
        let (status, processed): (String, i64) =
            sqlx::query_as("SELECT status, processed_records FROM tasks WHERE id = $1")
                .bind(task)
                .fetch_one(db.pool())
                .await
                .unwrap();
        (status == "processing" && processed >= 500)
            .then_some(processed)
            .ok_or(format!("{status} {processed}"))
    })
    .await;
    // Progress shows while it runs.
    let view: Value = client
        .get(format!("{}/tasks/{task}", first.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let progress = view["progress"].as_f64().unwrap_or(-1.0);
    assert!(
        view["status"] == "processing" && progress > 0.0 && progress < 1.0,
        "{view}"
    );
    // Re-requested while it is being processed, then the process dies mid-file.
    let response = client
        .post(format!("{}/tasks/{task}/process", first.base))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    first.process.kill_and_wait().await;
    let (processed_at_kill,): (i64,) =
        sqlx::query_as("SELECT processed_records FROM tasks WHERE id = $1")
            .bind(task)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(
        processed_at_kill < (good + bad) as i64,
        "killed mid-file ({seen} then {processed_at_kill})"
    );

    println!(
        "kill: {} records, re-requested at {seen}, killed at {processed_at_kill}",
        good + bad
    );
    let restarted = Instant::now();
    let second = start(&dir, "second", &service_options).await;
    let runs = wait_runs(db.pool(), task, 2, &second.process).await;
    println!(
        "kill: both runs finished {:?} after the restart",
        restarted.elapsed()
    );
    let expected = Some((good as i64, bad as i64));
    for run in &runs {
        assert_eq!(
            (run.3.as_deref(), run.4.zip(run.5)),
            (Some("completed"), expected),
            "{runs:?}"
        );
    }
    assert_eq!(runs[0].0, "task.created");
    assert!(
        runs[0].2 >= 2,
        "the creation run was redelivered after the kill: {runs:?}"
    );
    assert_eq!(runs[1].0, "task.processing_requested");
    assert_eq!(
        row(db.pool(), task).await,
        Row {
            status: "completed".into(),
            good: good as i64,
            bad: bad as i64,
            error: None
        }
    );
    let view: Value = client
        .get(format!("{}/tasks/{task}", second.base))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["processed_records"], good + bad, "{view}");
    assert_eq!(view["progress"], 1.0, "{view}");
    db.close().await;
}
