//! Task processing on Temporal, end to end: `weir serve` (and `weir worker`) with
//! `[temporal]` against a real Temporal dev server (one per test binary), a Tansu broker and
//! PostgreSQL (one of each per test). No mocks of Temporal: what ran is read back with the
//! Temporal CLI (`temporal workflow list / describe / query`) and from the task rows.
//!
//! Each test uses a task queue of its own, so the workers of tests running side by side never
//! pick up each other's workflows (each test has its own database schema).

mod reference;
mod support;

use crate::reference::{CUSTOMER_TOPIC, TASK_TOPIC};
use axum::http::StatusCode;
use serde_json::{json, Value};
use sqlx::PgPool;
use std::collections::{BTreeSet, HashMap};
use std::sync::OnceLock;
use std::time::{Duration, Instant};
use support::broker::{unique, Tansu};
use support::db::TestDb;
use support::kafka::read_topic;
use support::process::{eventually, ServeOptions, TestDir, WeirProcess};
use support::tasks::{
    broker, create_task, customers_csv, file_server, log_lines, publish_process_task,
    serve_options, signed, start, webhook, SECRET,
};
use support::temporal::TemporalDev;
use uuid::Uuid;
use weir::temporal::{StartOutcome, Temporal, WorkflowRequest};
use weir::{Ctx, EventMeta, HandlerError};

const PARTITIONS: i32 = 2;
/// Overall deadline for anything asynchronous.
const PATIENCE: Duration = Duration::from_secs(120);

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// The dev server shared by this binary's tests.
fn temporal() -> &'static TemporalDev {
    static SERVER: OnceLock<TemporalDev> = OnceLock::new();
    SERVER.get_or_init(TemporalDev::start)
}

async fn shared_temporal() -> &'static TemporalDev {
    tokio::task::spawn_blocking(temporal).await.expect("server")
}

/// `weir serve` with the database, the API, a fast relay, and `[temporal]` at `address` on
/// `task_queue`.
fn options(
    broker: &Tansu,
    db: &TestDb,
    dir: &TestDir,
    address: &str,
    task_queue: &str,
) -> ServeOptions {
    serve_options(broker, db, &unique("tasks"), dir, "serve")
        .env("WEIR_RETRY__MAXIMUM_INTERVAL", "1s")
        .env("WEIR_TEMPORAL__ADDRESS", address)
        .env("WEIR_TEMPORAL__TASK_QUEUE", task_queue)
        .env("WEIR_TEMPORAL__CONNECT_TIMEOUT", "2s")
}

/// `weir worker` with the same settings as `options`' service, its broker included (the
/// worker reports its status and reads the fleet commands there).
fn worker(dir: &TestDir, name: &str, options: &ServeOptions) -> WeirProcess {
    let options = options.clone().env("WEIR_BROKERS", options.brokers.clone());
    WeirProcess::spawn(dir.path(), name, &["worker"], &options.env)
}

async fn get_task(client: &reqwest::Client, base: &str, task: Uuid) -> Value {
    client
        .get(format!("{base}/tasks/{task}"))
        .send()
        .await
        .expect("GET /tasks/{id}")
        .json()
        .await
        .expect("JSON")
}

/// (status, good, bad, error) of a task row.
async fn row(pool: &PgPool, id: Uuid) -> (String, i64, i64, Option<String>) {
    sqlx::query_as("SELECT status, good_records, bad_records, error FROM tasks WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .expect("task row")
}

/// Waits for the task row to be `completed` or `failed`.
async fn finished(
    pool: &PgPool,
    id: Uuid,
    process: &WeirProcess,
) -> (String, i64, i64, Option<String>) {
    eventually(&format!("task {id} to finish"), PATIENCE, || async {
        let row = row(pool, id).await;
        if row.0 == "completed" || row.0 == "failed" {
            Ok(row)
        } else {
            Err(format!("{row:?}\n{}", process.stderr_tail(1500)))
        }
    })
    .await
}

/// The ids of the events that asked for processing of `task` (creation and requests), from
/// the outbox the API, the webhook, the schedule and `weir publish` write through.
async fn processing_events(pool: &PgPool, task: Uuid) -> BTreeSet<Uuid> {
    let rows: Vec<(Uuid,)> = sqlx::query_as(
        "SELECT id FROM weir_outbox
          WHERE key = $1 AND event_type IN ('task.created', 'task.processing_requested')",
    )
    .bind(task.to_string())
    .fetch_all(pool)
    .await
    .expect("outbox rows");
    rows.into_iter().map(|(id,)| id).collect()
}

/// The task's workflows as Temporal lists them: workflow id → status.
fn workflows(server: &TemporalDev, task: Uuid) -> Result<HashMap<String, String>, String> {
    let listed = server.list(&format!("WorkflowId STARTS_WITH \"task-{task}\""))?;
    Ok(listed
        .iter()
        .map(|w| {
            (
                w["execution"]["workflowId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned(),
                w["status"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect())
}

const COMPLETED: &str = "WORKFLOW_EXECUTION_STATUS_COMPLETED";
const FAILED: &str = "WORKFLOW_EXECUTION_STATUS_FAILED";

/// Waits until the task has exactly one workflow per processing event, all `status`, and
/// returns them; fails on a workflow for no event or a second one for an event.
async fn one_workflow_per_event(
    server: &TemporalDev,
    pool: &PgPool,
    task: Uuid,
    status: &str,
) -> HashMap<String, String> {
    // Each check runs the CLI: poll every half second, not at `eventually`'s pace.
    let deadline = Instant::now() + PATIENCE;
    loop {
        let events = processing_events(pool, task).await;
        let expected: BTreeSet<String> =
            events.iter().map(|e| format!("task-{task}-{e}")).collect();
        let last = match workflows(server, task) {
            Ok(listed) => {
                let ids: BTreeSet<String> = listed.keys().cloned().collect();
                assert!(
                    ids.is_subset(&expected),
                    "a workflow for no event: {ids:?} vs {expected:?}"
                );
                if ids == expected && listed.values().all(|s| s == status) {
                    return listed;
                }
                format!("{listed:?} vs events {expected:?}")
            }
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "timed out waiting for one {status} workflow per event of task {task}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

fn ctx_for(event_id: Uuid) -> Ctx {
    Ctx::detached(
        TASK_TOPIC,
        EventMeta {
            id: event_id,
            event_type: "task.created".into(),
            source: "/tests".into(),
            time: None,
            subject: None,
            dataschema: None,
        },
    )
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

/// The adapter alone against the dev server: a second start of one event is "already started"
/// (success, nothing new), a refused start is acknowledged with the server's message, an
/// unreachable server is retryable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_adapter_starts_once_per_event_and_maps_refusals_and_outages() {
    let server = shared_temporal().await;
    let queue = unique("adapter");
    let temporal = Temporal::new(&server.address(), "default", &queue).expect("client");
    let workflow = || temporalio_client::UntypedWorkflow::new("WeirAdapterProbe");
    let input = || temporalio_common::data_converters::RawValue::empty();
    let event = Uuid::new_v4();
    let ctx = ctx_for(event);

    let first = temporal
        .start(workflow(), WorkflowRequest::new(input()), &ctx)
        .await
        .expect("first start");
    let id = format!("WeirAdapterProbe-{event}");
    assert!(
        matches!(&first, StartOutcome::Started { workflow_id, .. } if *workflow_id == id),
        "{first:?}"
    );
    let again = temporal
        .start(workflow(), WorkflowRequest::new(input()), &ctx)
        .await
        .expect("a redelivery is not an error");
    assert_eq!(
        again,
        StartOutcome::AlreadyStarted {
            workflow_id: id.clone()
        }
    );
    // Still refused once the first has closed: ids are never reused.
    server
        .cli(&[
            "workflow",
            "terminate",
            "--workflow-id",
            &id,
            "--reason",
            "test",
        ])
        .expect("terminate");
    let after_close = temporal
        .start(workflow(), WorkflowRequest::new(input()), &ctx)
        .await
        .expect("a redelivery after completion is not an error either");
    assert_eq!(
        after_close,
        StartOutcome::AlreadyStarted {
            workflow_id: id.clone()
        }
    );
    let listed = server
        .list(&format!("WorkflowId = \"{id}\""))
        .expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");

    // A namespace the server does not have: acknowledged, with the server's words.
    let nowhere = Temporal::new(&server.address(), "no-such-namespace", &queue).expect("client");
    let error = nowhere
        .start(
            workflow(),
            WorkflowRequest::new(input()),
            &ctx_for(Uuid::new_v4()),
        )
        .await
        .expect_err("unknown namespace");
    assert!(
        matches!(error, HandlerError::Acknowledged { .. }),
        "{error}"
    );
    assert!(error.to_string().contains("no-such-namespace"), "{error}");

    // Nobody listening: retryable.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let down = Temporal::new(&format!("127.0.0.1:{port}"), "default", &queue)
        .expect("client")
        .with_connect_timeout(Duration::from_secs(1));
    let error = down
        .start(
            workflow(),
            WorkflowRequest::new(input()),
            &ctx_for(Uuid::new_v4()),
        )
        .await
        .expect_err("unreachable");
    assert!(matches!(error, HandlerError::Retryable { .. }), "{error}");
}

/// Signal-with-start: two requests for one entity make one workflow that received two
/// signals.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signal_with_start_makes_one_workflow_per_entity_and_signals_it_per_request() {
    let server = shared_temporal().await;
    let queue = unique("signals");
    let temporal = Temporal::new(&server.address(), "default", &queue).expect("client");
    let id = format!("WeirSignalProbe-{}", Uuid::new_v4());
    let mut runs = Vec::new();
    for _ in 0..2 {
        let outcome = temporal
            .signal_with_start(
                temporalio_client::UntypedWorkflow::new("WeirSignalProbe"),
                WorkflowRequest::new(temporalio_common::data_converters::RawValue::empty()).id(&id),
                temporalio_client::UntypedSignal::new("request"),
                temporalio_common::data_converters::RawValue::empty(),
                &ctx_for(Uuid::new_v4()),
            )
            .await
            .expect("signal-with-start");
        match outcome {
            StartOutcome::Started {
                workflow_id,
                run_id,
            } => {
                assert_eq!(workflow_id, id);
                runs.push(run_id);
            }
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(
        runs[0], runs[1],
        "the second request went to the running workflow"
    );
    let listed = server
        .list(&format!("WorkflowId = \"{id}\""))
        .expect("list");
    assert_eq!(listed.len(), 1, "{listed:?}");
    let history = server
        .cli(&["workflow", "show", "--workflow-id", &id, "-o", "json"])
        .expect("history");
    assert_eq!(
        history
            .matches("EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED")
            .count(),
        2,
        "{history}"
    );
}

/// Standard base64 with padding, as the Temporal CLI prints payload bytes.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, b)| n | u32::from(*b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// A signal's input: `{"event_id": ...}` of the record, as a JSON payload.
fn signal_of(ctx: &Ctx) -> temporalio_common::data_converters::RawValue {
    use temporalio_common::protos::temporal::api::common::v1::Payload;
    temporalio_common::data_converters::RawValue::new(vec![Payload {
        metadata: HashMap::from([("encoding".to_owned(), b"json/plain".to_vec())]),
        data: json!({"event_id": ctx.event_id()}).to_string().into_bytes(),
        ..Default::default()
    }])
}

/// The handler form of signal-with-start, on a router: each event signals the workflow of its
/// record key (`<workflow type>-<key>` when the request names no id), starting it first if it is
/// not running. Three events for two customers make two workflows, signalled twice and once,
/// and every record succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_signals_with_start_handler_makes_one_workflow_per_key_and_signals_it_per_event() {
    use support::orders::OrderPlaced;
    use temporalio_client::{UntypedSignal, UntypedWorkflow};
    use temporalio_common::data_converters::RawValue;
    use weir::{Bus as _, ConsumerConfig, Envelope, Event as _, MemoryBus, PublishExt as _};

    let server = shared_temporal().await;
    let queue = unique("signals-handler");
    let temporal = Temporal::new(&server.address(), "default", &queue).expect("client");
    let workflow_type = unique("WeirSignalHandlerProbe");
    let handler = temporal.signals_with_start(
        {
            let workflow_type = workflow_type.clone();
            move || UntypedWorkflow::new(workflow_type.clone())
        },
        || UntypedSignal::new("request"),
        |_order: OrderPlaced, ctx: &Ctx| (WorkflowRequest::new(RawValue::empty()), signal_of(ctx)),
    );
    let bus = MemoryBus::default();
    bus.create_topic(OrderPlaced::TOPIC, 1);
    let group = "signals";
    let subscription = bus
        .subscribe(weir::Router::new().on(handler), ConsumerConfig::new(group))
        .expect("subscribe");
    let (first, second) = (unique("c"), unique("c"));
    let mut ends = 0;
    let mut events: HashMap<String, Vec<Uuid>> = HashMap::new();
    for key in [&first, &second, &first] {
        let envelope = Envelope::new(OrderPlaced {
            order_id: key.clone(),
        });
        let delivery = bus.publish(&envelope).await.expect("publish");
        ends = ends.max(delivery.offset + 1);
        events
            .entry(key.clone())
            .or_default()
            .push(envelope.meta.id);
    }

    // Every record handled and committed, none dead-lettered.
    let deadline = Instant::now() + PATIENCE;
    while bus.committed(group, OrderPlaced::TOPIC).get(&0) != Some(&ends) {
        assert!(
            Instant::now() < deadline,
            "records not all handled: committed {:?} of {ends}",
            bus.committed(group, OrderPlaced::TOPIC)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let dead = bus.records(&format!("{}.dlq", OrderPlaced::TOPIC));
    assert!(dead.is_empty(), "dead-lettered: {dead:?}");

    // One workflow per key, named after it, with one signal per event of the key.
    let expected: HashMap<String, &Vec<Uuid>> = events
        .iter()
        .map(|(key, ids)| (format!("{workflow_type}-{key}"), ids))
        .collect();
    assert_eq!(events[&first].len(), 2);
    let mut last;
    let listed = loop {
        match server.list(&format!("WorkflowType = \"{workflow_type}\"")) {
            Ok(listed) if listed.len() >= expected.len() => break listed,
            Ok(listed) => last = format!("{listed:?}"),
            Err(e) => last = e,
        }
        assert!(
            Instant::now() < deadline,
            "workflows of {workflow_type}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    let ids: BTreeSet<String> = listed
        .iter()
        .map(|w| {
            w["execution"]["workflowId"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        })
        .collect();
    assert_eq!(
        ids,
        expected.keys().cloned().collect::<BTreeSet<_>>(),
        "{listed:?}"
    );
    for (id, event_ids) in &expected {
        let history: Value = serde_json::from_str(
            &server
                .cli(&["workflow", "show", "--workflow-id", id, "-o", "json"])
                .expect("history"),
        )
        .expect("history JSON");
        let of_type = |kind: &str| -> Vec<&Value> {
            history["events"]
                .as_array()
                .expect("events")
                .iter()
                .filter(|e| e["eventType"] == kind)
                .collect()
        };
        assert_eq!(
            of_type("EVENT_TYPE_WORKFLOW_EXECUTION_STARTED").len(),
            1,
            "{id}: {history}"
        );
        // The signals, in order, carry the events of the key, in order (payload data is base64
        // in the CLI's JSON).
        let signals: Vec<&str> = of_type("EVENT_TYPE_WORKFLOW_EXECUTION_SIGNALED")
            .iter()
            .map(|e| {
                let attributes = &e["workflowExecutionSignaledEventAttributes"];
                assert_eq!(attributes["signalName"], "request", "{e}");
                attributes["input"]["payloads"][0]["data"]
                    .as_str()
                    .unwrap_or_default()
            })
            .collect();
        assert_eq!(
            base64(b"json/plain"),
            "anNvbi9wbGFpbg==",
            "the encoder itself"
        );
        let sent: Vec<String> = event_ids
            .iter()
            .map(|e| base64(json!({"event_id": e}).to_string().as_bytes()))
            .collect();
        assert_eq!(signals, sent, "{id}: {history}");
    }
    drop(subscription);
}

/// API, manual, schedule and webhook each lead to exactly one completed workflow per event,
/// with exact counts; the record of an event published a second time (what a redelivery after
/// a crash before the commit looks like to the handler) starts no second workflow.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_trigger_leads_to_one_completed_workflow_per_event_and_a_redelivery_to_none() {
    let server = shared_temporal().await;
    let db = TestDb::new().await;
    let broker = broker(PARTITIONS).await;
    let dir = TestDir::new("weir-temporal-triggers");
    let queue = unique("triggers");
    let service_options = options(&broker, &db, &dir, &server.address(), &queue)
        .env("WEIR_TASKS__SCHEDULE", "* * * * * *")
        .env("WEIR_TASKS__PENDING_AFTER", "1h");
    let service = start(&dir, "serve", &service_options).await;
    let client = reqwest::Client::new();
    let base = &service.base;
    let file = dir.join("customers.csv");
    std::fs::write(&file, customers_csv(7, 2)).unwrap();

    // API: creation, then POST /tasks/{id}/process.
    let task = create_task(&client, base, &file.display().to_string(), "customers").await;
    one_workflow_per_event(server, db.pool(), task, COMPLETED).await;
    assert_eq!(row(db.pool(), task).await, ("completed".into(), 7, 2, None));
    let response = client
        .post(format!("{base}/tasks/{task}/process"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    eventually("two events", PATIENCE, || async {
        let n = processing_events(db.pool(), task).await.len();
        (n == 2).then_some(()).ok_or(n.to_string())
    })
    .await;
    one_workflow_per_event(server, db.pool(), task, COMPLETED).await;

    // Manual: weir publish --process-task.
    let (status, publish) = publish_process_task(&dir, "publish", &db, task).await;
    assert!(status.success(), "{}", publish.stderr());
    eventually("three events", PATIENCE, || async {
        let n = processing_events(db.pool(), task).await.len();
        (n == 3).then_some(()).ok_or(n.to_string())
    })
    .await;
    one_workflow_per_event(server, db.pool(), task, COMPLETED).await;

    // Webhook.
    let body = json!({"task_id": task, "triggered_by": "webhook"}).to_string();
    let headers = signed(SECRET, chrono::Utc::now().timestamp(), &body);
    let (status, answer) = webhook(&client, base, &headers, &body).await;
    assert_eq!(status, StatusCode::ACCEPTED, "{answer}");
    eventually("four events", PATIENCE, || async {
        let n = processing_events(db.pool(), task).await.len();
        (n == 4).then_some(()).ok_or(n.to_string())
    })
    .await;
    let all = one_workflow_per_event(server, db.pool(), task, COMPLETED).await;
    assert_eq!(all.len(), 4);
    assert_eq!(row(db.pool(), task).await, ("completed".into(), 7, 2, None));

    // Schedule: a task pending for two hours is swept.
    let stale = Uuid::now_v7();
    sqlx::query(
        "INSERT INTO tasks (id, tenant_id, environment_id, file_url, entity_type, status,
                            created_at)
         VALUES ($1, 't', 'e', $2, 'customers', 'pending', now() - interval '2 hours')",
    )
    .bind(stale)
    .bind(format!("file://{}", file.display()))
    .execute(db.pool())
    .await
    .unwrap();
    eventually("the schedule's request", PATIENCE, || async {
        let n = processing_events(db.pool(), stale).await.len();
        (n >= 1).then_some(()).ok_or(n.to_string())
    })
    .await;
    let swept = one_workflow_per_event(server, db.pool(), stale, COMPLETED).await;
    assert!(!swept.is_empty());
    assert_eq!(
        row(db.pool(), stale).await,
        ("completed".into(), 7, 2, None)
    );

    // Redelivery: the creation record published again, same event id.
    let (created,): (Uuid,) = sqlx::query_as(
        "UPDATE weir_outbox SET published_at = NULL
          WHERE key = $1 AND event_type = 'task.created' RETURNING id",
    )
    .bind(task.to_string())
    .fetch_one(db.pool())
    .await
    .unwrap();
    eventually("the duplicate to be handled", PATIENCE, || async {
        let seen = log_lines(
            &service.process,
            "Workflow already started for this event; not starting another.",
        )
        .into_iter()
        .any(|l| l["fields"]["event_id"] == created.to_string());
        seen.then_some(())
            .ok_or_else(|| service.process.stderr_tail(1500))
    })
    .await;
    let after = workflows(server, task).unwrap();
    assert_eq!(after, all, "the redelivered record started nothing");
    db.close().await;
}

/// The worker is SIGKILLed midway through a 4,000-record file and restarted: the chunk's next
/// attempt resumes from its last heartbeat, the workflow completes, and the task ends with the
/// exact counts of one pass, 3500/500.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_file_resumes_from_its_heartbeat_and_the_counts_are_exact() {
    let server = shared_temporal().await;
    let db = TestDb::new().await;
    let broker = broker(PARTITIONS).await;
    let dir = TestDir::new("weir-temporal-kill");
    let queue = unique("kill");
    // The file comes from a slow server (4 s for the whole file), progress and a heartbeat
    // after every 50 records; a lost attempt is noticed after 2 s without heartbeats (the SDK
    // sends one per 1.6 s at most).
    let service_options = options(&broker, &db, &dir, &server.address(), &queue)
        .env("WEIR_TASKS__PROGRESS_EVERY", "50")
        .env("WEIR_TEMPORAL__HEARTBEAT_TIMEOUT", "2s")
        .env("WEIR_TEMPORAL__WORKER_IN_SERVE", "false");
    let service = start(&dir, "serve", &service_options).await;
    let mut first = worker(&dir, "worker-1", &service_options);
    let client = reqwest::Client::new();
    let (good, bad) = (3_500, 500);
    std::fs::write(dir.join("big.csv"), customers_csv(good, bad)).unwrap();
    let (files, _) = file_server(dir.path()).await;
    let slow = format!("{files}/slow/big.csv");
    let task = create_task(&client, &service.base, &slow, "customers").await;

    // Killed once the server holds a heartbeat from well into the file.
    let event = eventually("the creation event", PATIENCE, || async {
        let events = processing_events(db.pool(), task).await;
        events
            .into_iter()
            .next()
            .ok_or_else(|| "none yet".to_owned())
    })
    .await;
    let id = format!("task-{task}-{event}");
    let deadline = Instant::now() + PATIENCE;
    let beat = loop {
        let described = server.cli_json(&["workflow", "describe", "--workflow-id", &id]);
        let lines = described
            .as_ref()
            .ok()
            .and_then(|d| d["pendingActivities"][0]["heartbeatDetails"][0]["lines"].as_u64());
        if let Some(lines) = lines.filter(|l| *l >= 1_000) {
            break lines;
        }
        assert!(
            Instant::now() < deadline,
            "no heartbeat past line 1000: {described:?}\n{}",
            first.stderr_tail(1000)
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    first.kill_and_wait().await;
    let (processed_at_kill,): (i64,) =
        sqlx::query_as("SELECT processed_records FROM tasks WHERE id = $1")
            .bind(task)
            .fetch_one(db.pool())
            .await
            .unwrap();
    assert!(
        processed_at_kill < (good + bad) as i64,
        "killed mid-file (heartbeat at line {beat}, {processed_at_kill} processed)"
    );

    let second = worker(&dir, "worker-2", &service_options);
    let end = finished(db.pool(), task, &second).await;
    assert_eq!(end, ("completed".into(), good as i64, bad as i64, None));
    let resumed = log_lines(&second, "Resuming a chunk from its last heartbeat.");
    assert_eq!(resumed.len(), 1, "{}", second.stderr_tail(3000));
    let from = resumed[0]["fields"]["lines"].as_u64().unwrap_or(0);
    assert!(
        from >= beat && from < (good + bad + 1) as u64,
        "resumed from line {from}; the server had a heartbeat at line {beat}"
    );
    println!(
        "kill: {} records, heartbeat seen at line {beat}, {processed_at_kill} processed at the \
         kill, resumed at line {from}",
        good + bad
    );

    one_workflow_per_event(server, db.pool(), task, COMPLETED).await;
    let progress = server
        .cli_json(&[
            "workflow",
            "query",
            "--workflow-id",
            &id,
            "--name",
            "progress",
        ])
        .expect("query progress");
    let progress = &progress["queryResult"][0];
    assert_eq!(progress["phase"], "completed", "{progress}");
    assert_eq!(progress["cursor"]["good"], good, "{progress}");
    assert_eq!(progress["cursor"]["bad"], bad, "{progress}");
    db.close().await;
}

/// A chunk that fails retryably twice (HTTP 503) succeeds on its third attempt, 1 s then 2 s
/// after the failures (the policy's initial interval and coefficient); a file that fails every
/// attempt ends the task `failed` after three, with the error on `GET /tasks/{id}` and in
/// `temporal workflow describe`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_follow_the_policy_and_a_task_that_always_fails_ends_failed_with_its_error() {
    let server = shared_temporal().await;
    let db = TestDb::new().await;
    let broker = broker(PARTITIONS).await;
    let dir = TestDir::new("weir-temporal-retry");
    let queue = unique("retry");
    let service_options = options(&broker, &db, &dir, &server.address(), &queue);
    let service = start(&dir, "serve", &service_options).await;
    let client = reqwest::Client::new();
    std::fs::write(dir.join("c.csv"), customers_csv(5, 1)).unwrap();
    let (files, hits) = file_server(dir.path()).await;

    let flaky = create_task(
        &client,
        &service.base,
        &format!("{files}/flaky2/c.csv"),
        "customers",
    )
    .await;
    let end = finished(db.pool(), flaky, &service.process).await;
    assert_eq!(end, ("completed".into(), 5, 1, None));
    let times = hits.hits.lock().unwrap()["flaky2/c.csv"].clone();
    assert_eq!(times.len(), 3, "two failures, then the attempt that worked");
    let (first_gap, second_gap) = (times[1] - times[0], times[2] - times[1]);
    println!("retry: gaps {first_gap:?} and {second_gap:?}");
    assert!(
        first_gap >= Duration::from_millis(950) && first_gap < Duration::from_secs(3),
        "{first_gap:?}"
    );
    assert!(
        second_gap >= Duration::from_millis(1950) && second_gap < Duration::from_secs(5),
        "{second_gap:?}"
    );

    let down = create_task(
        &client,
        &service.base,
        &format!("{files}/down/c.csv"),
        "customers",
    )
    .await;
    let end = finished(db.pool(), down, &service.process).await;
    assert_eq!(end.0, "failed");
    assert_eq!(
        hits.hits.lock().unwrap()["down/c.csv"].len(),
        3,
        "maximum attempts"
    );
    let view = get_task(&client, &service.base, down).await;
    assert_eq!(view["status"], "failed", "{view}");
    let error = view["error"].as_str().unwrap_or_default().to_owned();
    assert!(error.contains("503"), "{view}");
    let listed = one_workflow_per_event(server, db.pool(), down, FAILED).await;
    let (id, _) = listed.iter().next().unwrap();
    let described = server
        .cli(&["workflow", "describe", "--workflow-id", id])
        .expect("describe");
    assert!(described.contains("503"), "{described}");
    db.close().await;
}

/// With Temporal down at start, `weir serve` runs: other topics are consumed, and the task's
/// record is retried, not dead-lettered, until the server is there; then the task completes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_temporal_down_serve_consumes_other_topics_and_the_task_waits_for_it() {
    let db = TestDb::new().await;
    let broker = broker(PARTITIONS).await;
    let dir = TestDir::new("weir-temporal-down");
    let queue = unique("down");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let address = format!("127.0.0.1:{port}");
    let service_options = options(&broker, &db, &dir, &address, &queue);
    let service = start(&dir, "serve", &service_options).await;
    let client = reqwest::Client::new();
    let file = dir.join("customers.csv");
    std::fs::write(&file, customers_csv(3, 1)).unwrap();
    let task = create_task(
        &client,
        &service.base,
        &file.display().to_string(),
        "customers",
    )
    .await;

    // Another topic is consumed meanwhile.
    let env = [("WEIR_BROKERS".to_owned(), broker.brokers())];
    let customer = Uuid::new_v4().to_string();
    let mut publish = WeirProcess::spawn(
        dir.path(),
        "publish-customer",
        &[
            "publish",
            "--topic",
            CUSTOMER_TOPIC,
            "--type",
            "customer.created",
            "--key",
            &customer,
            "--data",
            &json!({"customer_id": customer, "details": {}}).to_string(),
        ],
        &env,
    );
    assert!(publish
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits")
        .success());
    eventually("the customer event to be handled", PATIENCE, || async {
        let records = std::fs::read_to_string(dir.join("serve.records")).unwrap_or_default();
        records
            .contains("customer.created")
            .then_some(())
            .ok_or_else(|| service.process.stderr_tail(1000))
    })
    .await;
    // ...while the task's start is retried.
    eventually("retries of the task's start", PATIENCE, || async {
        let retries = log_lines(&service.process, "Handler failed; retrying.")
            .into_iter()
            .filter(|l| l["fields"]["handler"] == "start_task_workflow")
            .count();
        (retries >= 3).then_some(()).ok_or(retries.to_string())
    })
    .await;
    assert_eq!(row(db.pool(), task).await.0, "pending");

    // Temporal comes up on that address.
    let server = tokio::task::spawn_blocking(move || TemporalDev::start_on(port))
        .await
        .unwrap();
    let end = finished(db.pool(), task, &service.process).await;
    assert_eq!(end, ("completed".into(), 3, 1, None));
    one_workflow_per_event(&server, db.pool(), task, COMPLETED).await;
    assert!(
        !service.process.stderr().contains("Record dead-lettered."),
        "{}",
        service.process.stderr_tail(3000)
    );
    db.close().await;
}

/// `weir worker` is seen by the fleet like every other process: it publishes status reports
/// with its role and no partitions to the status topic, and leaves a tombstone at a clean stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_reports_its_role_and_leaves_a_tombstone_at_a_clean_stop() {
    let server = shared_temporal().await;
    let db = TestDb::new().await;
    let broker = broker(PARTITIONS).await;
    let brokers = broker.brokers();
    let dir = TestDir::new("weir-temporal-report");
    let options = options(&broker, &db, &dir, &server.address(), &unique("report"))
        .env("WEIR_CONTROL__REPORT_INTERVAL", "1s");
    let mut worker = worker(&dir, "worker", &options);
    // The latest record of each key of the status topic (`None`: a tombstone).
    let latest = |brokers: String| async move {
        let records = read_topic(
            &brokers,
            "weir.status",
            1,
            Duration::from_millis(300),
            Duration::from_secs(5),
        )
        .await;
        records
            .into_iter()
            .map(|r| {
                (
                    String::from_utf8(r.key.expect("keyed")).expect("utf-8"),
                    r.value,
                )
            })
            .collect::<HashMap<_, _>>()
    };
    let (key, report) = eventually("a report of the worker", PATIENCE, || {
        let (brokers, tail) = (brokers.clone(), worker.stderr_tail(1500));
        async move {
            latest(brokers)
                .await
                .into_iter()
                .find_map(|(key, value)| {
                    let report: weir::StatusReport = serde_json::from_slice(&value?).ok()?;
                    (report.process.role == "worker").then_some((key, report))
                })
                .ok_or_else(|| format!("no report of the worker yet\n{tail}"))
        }
    })
    .await;
    assert_eq!(report.process.id, key);
    assert!(report.partitions.is_empty(), "{:?}", report.partitions);

    worker.sigterm();
    let status = worker
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "{status}\n{}", worker.stderr_tail(4000));
    eventually("the tombstone of the stopped worker", PATIENCE, || {
        let (brokers, key) = (brokers.clone(), key.clone());
        async move {
            match latest(brokers).await.get(&key) {
                Some(None) => Ok(()),
                other => Err(format!("latest of {key}: {:?}", other.map(Option::is_some))),
            }
        }
    })
    .await;
    db.close().await;
}
