//! Observability, end to end: `/metrics` counts a real stream exactly (and passes
//! `promtool check metrics`) and counts the broker's answers to commits, `/readyz` follows the
//! broker and the drain, traces reach a real OTLP receiver, and a SASL password never shows.

mod reference;
mod support;

use crate::reference::{CustomerCreated, CustomerDeleted, CustomerUpdated};
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;
use support::broker::{unique, Tansu};
use support::process::{metric_sum, wait_until, RecordFile, ServeOptions, TestDir, WeirProcess};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use weir::{
    Bus, ConsumerConfig, Ctx, Envelope, Event, Headers, KafkaBus, KafkaConfig, MemoryBus,
    OutboundRecord, PublishExt, Publisher, Router,
};

const TOPICS: [&str; 3] = ["task-events", "customer-events", "resource-events"];

fn broker_with_topics(broker: Tansu) -> Tansu {
    for topic in TOPICS {
        broker.create_topic(topic, 2);
        broker.create_topic(&format!("{topic}.dlq"), 1);
    }
    broker
}

/// A plain HTTP GET: (status, body).
async fn get(addr: std::net::SocketAddr, path: &str) -> Result<(u16, String), String> {
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: weir\r\nConnection: close\r\n\r\n");
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut response = String::new();
    stream
        .read_to_string(&mut response)
        .await
        .map_err(|e| e.to_string())?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {response:?}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Ok((status, body))
}

/// `name{labels} value` lines of a scrape, keyed by `name{labels}`.
fn samples(scrape: &str) -> HashMap<String, f64> {
    scrape
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            Some((series.to_owned(), value.parse().ok()?))
        })
        .collect()
}

fn required_tool(var: &str) -> PathBuf {
    let path = std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: run the tests with scripts/test.sh, which installs it")
    });
    PathBuf::from(path)
}

async fn admin_addr(serve: &WeirProcess) -> std::net::SocketAddr {
    wait_until(
        "the admin server address in the logs",
        Duration::from_secs(30),
        || serve.admin_addr().ok_or_else(|| serve.stderr_tail(2_000)),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_every_outcome_of_a_real_stream_exactly() {
    let broker = broker_with_topics(Tansu::start_memory());
    let dir = TestDir::new("metrics");
    let records = dir.join("handled.jsonl");
    let options = ServeOptions::new(&broker.brokers(), &unique("metrics"), &records)
        .env("WEIR_RETRY__INITIAL_INTERVAL", "20ms")
        .env("WEIR_RETRY__JITTER", "0");
    let serve = WeirProcess::serve(dir.path(), "serve", &options);
    let admin = admin_addr(&serve).await;

    let bus = KafkaBus::new(KafkaConfig::new(broker.brokers())).expect("bus");
    let details = |simulate: &str| serde_json::json!({ "simulate": simulate });
    for i in 0..5 {
        bus.publish(&Envelope::new(CustomerCreated::new(
            format!("c-{i}"),
            serde_json::json!({}),
        )))
        .await
        .expect("publish");
    }
    for i in 0..2 {
        let transient = CustomerUpdated::new(format!("u-{i}"), details("transient"));
        bus.publish(&Envelope::new(transient))
            .await
            .expect("publish");
    }
    let permanent = CustomerDeleted::new("d-1", details("permanent"));
    bus.publish(&Envelope::new(permanent))
        .await
        .expect("publish");
    let raw = |value: &[u8]| OutboundRecord {
        topic: CustomerCreated::TOPIC.to_owned(),
        key: Some(b"bad".to_vec()),
        value: Some(value.to_vec()),
        headers: Headers::new(),
    };
    bus.publish_record(raw(b"not json at all"))
        .await
        .expect("publish");
    bus.publish_record(raw(b"")).await.expect("publish");
    // A well-formed CloudEvent of a type nobody handles: skipped, not dead-lettered.
    let mut unknown = Envelope::new(CustomerCreated::new("x-1", serde_json::json!({})));
    unknown.meta.event_type = "customer.merged".to_owned();
    bus.publish_record(raw(&unknown.to_structured().unwrap()))
        .await
        .expect("publish");

    let topic = "customer-events";
    let expected: Vec<(String, f64)> = vec![
        (format!("weir_messages_received_total{{topic=\"{topic}\"}}"), 11.0),
        (format!("weir_messages_handled_total{{event_type=\"customer.created\",outcome=\"success\",topic=\"{topic}\"}}"), 5.0),
        (format!("weir_messages_handled_total{{event_type=\"customer.updated\",outcome=\"success\",topic=\"{topic}\"}}"), 2.0),
        (format!("weir_messages_handled_total{{event_type=\"customer.updated\",outcome=\"retried\",topic=\"{topic}\"}}"), 2.0),
        (format!("weir_messages_handled_total{{event_type=\"customer.deleted\",outcome=\"dead_lettered\",topic=\"{topic}\"}}"), 1.0),
        (format!("weir_messages_handled_total{{event_type=\"unknown\",outcome=\"decode_error\",topic=\"{topic}\"}}"), 2.0),
        (format!("weir_messages_handled_total{{event_type=\"unknown\",outcome=\"skipped\",topic=\"{topic}\"}}"), 1.0),
        (format!("weir_dead_letters_total{{reason=\"decode\",topic=\"{topic}\"}}"), 2.0),
        (format!("weir_dead_letters_total{{reason=\"acknowledged\",topic=\"{topic}\"}}"), 1.0),
        (format!("weir_published_total{{result=\"success\",topic=\"{topic}.dlq\"}}"), 3.0),
    ];
    let mut scrape = String::new();
    wait_until(
        "the scrape to show every outcome",
        Duration::from_secs(60),
        || {
            let body = futures_block(get(admin, "/metrics"))?.1;
            let have = samples(&body);
            scrape = body;
            match expected
                .iter()
                .find(|(series, value)| have.get(series) != Some(value))
            {
                None => Ok(()),
                Some((series, value)) => Err(format!(
                    "{series} is {:?}, expected {value}",
                    have.get(series)
                )),
            }
        },
    )
    .await;
    assert_eq!(
        RecordFile::new(&records).count(),
        7,
        "successful handler calls recorded"
    );
    assert!(samples(&scrape).contains_key("weir_in_flight_messages"));
    assert!(scrape.contains("weir_handler_duration_seconds_bucket"));

    let promtool = required_tool("WEIR_TEST_PROMTOOL");
    let mut check = Command::new(&promtool)
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool runs");
    use std::io::Write as _;
    check
        .stdin
        .take()
        .unwrap()
        .write_all(scrape.as_bytes())
        .unwrap();
    let out = check.wait_with_output().unwrap();
    let complaints = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && complaints.trim().is_empty(),
        "promtool check metrics: {complaints}"
    );
}

/// `weir_commits_total` counts what the broker answered, through the running consumer (not a
/// callback called by hand): successes that grow as records are handled, and a failure when a
/// handled record's offset cannot be committed. The broker stops while that record retries; it
/// succeeds while the broker is away; its commit waits for a coordinator until the consumer
/// loses its assignment, and the commit at that revoke is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commit_answers_are_counted_as_the_broker_gives_them() {
    let mut broker = broker_with_topics(Tansu::start_memory());
    let dir = TestDir::new("commits");
    let records_path = dir.join("handled.jsonl");
    let mut records = RecordFile::new(&records_path);
    // A retry every 100 ms for as long as the simulated outage lasts. The session timeout is
    // long enough for the outage record to finish while the broker is away and before the
    // consumer gives its partitions up (the commit at that revoke fails too).
    let options = ServeOptions::new(&broker.brokers(), &unique("commits"), &records_path)
        .env("WEIR_CONSUMER__COMMIT_INTERVAL", "100ms")
        .env("WEIR_RETRY__INITIAL_INTERVAL", "100ms")
        .env("WEIR_RETRY__BACKOFF_COEFFICIENT", "1.0")
        .env("WEIR_RETRY__MAXIMUM_ATTEMPTS", "1000")
        .env("WEIR_RETRY__JITTER", "0")
        .config(
            r#"
[kafka.consumer]
"session.timeout.ms" = "10000"
"heartbeat.interval.ms" = "1000"
"#,
        );
    let serve = WeirProcess::serve(dir.path(), "serve", &options);
    let admin = admin_addr(&serve).await;
    let scrape = || -> Result<String, String> { Ok(futures_block(get(admin, "/metrics"))?.1) };
    let commits =
        |body: &str, result: &str| metric_sum(body, "weir_commits_total", &[("result", result)]);

    let bus = KafkaBus::new(KafkaConfig::new(broker.brokers())).expect("bus");
    let mut successes = Vec::new();
    for round in 0..2 {
        for i in 0..50 {
            let created = CustomerCreated::new(format!("c-{round}-{i}"), serde_json::json!({}));
            bus.publish(&Envelope::new(created)).await.expect("publish");
        }
        let before = successes.last().copied().unwrap_or(0.0);
        let after = wait_until(
            "the round handled and a successful commit counted after it",
            Duration::from_secs(60),
            || {
                let handled = records.count();
                let body = scrape()?;
                let success = commits(&body, "success");
                if handled == 50 * (round + 1) && success > before {
                    Ok(success)
                } else {
                    Err(format!(
                        "{handled} handled, weir_commits_total{{result=\"success\"}} {success}"
                    ))
                }
            },
        )
        .await;
        successes.push(after);
    }
    assert_eq!(
        commits(&scrape().unwrap(), "failure"),
        0.0,
        "no commit failed while the broker was up"
    );

    // A record that fails until `until`: it is in hand, retrying, when the broker stops, and
    // succeeds while the broker is away, so its offset is stored and its commit has no broker.
    let until = chrono::Utc::now() + chrono::Duration::seconds(4);
    let outage = CustomerUpdated::new(
        "outage",
        serde_json::json!({ "simulate": "outage", "until": until.to_rfc3339() }),
    );
    bus.publish(&Envelope::new(outage)).await.expect("publish");
    drop(bus);
    wait_until(
        "the outage record retrying",
        Duration::from_secs(30),
        || {
            let body = scrape()?;
            let retried = metric_sum(
                &body,
                "weir_messages_handled_total",
                &[("event_type", "customer.updated"), ("outcome", "retried")],
            );
            if retried >= 1.0 {
                Ok(())
            } else {
                Err("not retried yet".to_owned())
            }
        },
    )
    .await;
    broker.stop();
    assert!(
        chrono::Utc::now() < until,
        "the broker stopped before the outage record could succeed"
    );
    let failures = wait_until(
        "a failed commit counted while the broker is away",
        Duration::from_secs(60),
        || {
            let body = scrape()?;
            let failure = commits(&body, "failure");
            if failure >= 1.0 {
                Ok(failure)
            } else {
                Err(format!(
                    "weir_commits_total{{result=\"failure\"}} {failure}"
                ))
            }
        },
    )
    .await;
    assert_eq!(records.count(), 101, "the outage record was handled");
    let log = serve.stderr();
    let warning = log
        .lines()
        .find(|l| l.contains("Offset commit failed"))
        .unwrap_or("no warning logged");
    println!("commit answers: successes {successes:?}, failures {failures}; {warning}");
}

/// Runs a future to completion from a synchronous closure (for `wait_until`).
fn futures_block<F: std::future::Future>(future: F) -> F::Output {
    tokio::task::block_in_place(|| tokio::runtime::Handle::current().block_on(future))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_broker() {
    let mut broker = broker_with_topics(Tansu::start_sqlite());
    let dir = TestDir::new("ready");
    let options = ServeOptions::new(
        &broker.brokers(),
        &unique("ready"),
        &dir.join("handled.jsonl"),
    );
    let serve = WeirProcess::serve(dir.path(), "serve", &options);
    let admin = admin_addr(&serve).await;
    let status = || futures_block(get(admin, "/readyz")).map(|(s, _)| s);
    wait_until(
        "ready once joined",
        Duration::from_secs(60),
        || match status()? {
            200 => Ok(()),
            s => Err(format!("status {s}")),
        },
    )
    .await;
    broker.stop();
    wait_until(
        "not ready without a broker",
        Duration::from_secs(60),
        || match status()? {
            503 => Ok(()),
            s => Err(format!("status {s}")),
        },
    )
    .await;
    assert_eq!(
        futures_block(get(admin, "/healthz")).unwrap().0,
        200,
        "alive all the same"
    );
    broker.restart();
    wait_until(
        "ready again once the broker is back",
        Duration::from_secs(60),
        || match status()? {
            200 => Ok(()),
            s => Err(format!("status {s}")),
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_while_draining() {
    let bus = MemoryBus::default();
    let release = std::sync::Arc::new(tokio::sync::Notify::new());
    let (started_tx, mut started) = tokio::sync::mpsc::unbounded_channel();
    let router = {
        let release = release.clone();
        Router::new().on(move |_: CustomerCreated, _ctx: Ctx| {
            let (release, started_tx) = (release.clone(), started_tx.clone());
            async move {
                let _ = started_tx.send(());
                release.notified().await;
                Ok(())
            }
        })
    };
    let subscription = bus
        .subscribe(router, ConsumerConfig::new("drain"))
        .expect("subscribe");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(weir::serve_admin(
        listener,
        bus.metrics().clone(),
        subscription.health(),
        std::future::pending(),
    ));
    assert_eq!(get(addr, "/readyz").await.unwrap().0, 200);
    bus.publish(&Envelope::new(CustomerCreated::new(
        "c",
        serde_json::json!({}),
    )))
    .await
    .unwrap();
    started.recv().await.unwrap();
    let health = subscription.health();
    subscription.shutdown_token().cancel();
    let stopping = tokio::spawn(subscription.join());
    wait_until("draining to show", Duration::from_secs(10), || {
        health
            .status()
            .draining
            .then_some(())
            .ok_or_else(|| format!("{:?}", health.status()))
    })
    .await;
    let (status, body) = get(addr, "/readyz").await.unwrap();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("\"draining\":true"), "{body}");
    release.notify_one();
    let report = stopping.await.unwrap().unwrap();
    assert_eq!(
        report.abandoned, 0,
        "the running handler finished during the drain"
    );
}

/// Starts rotel (an OTLP receiver) logging every span it receives.
struct Rotel {
    child: std::process::Child,
    log: PathBuf,
    grpc: String,
    http: String,
}

impl Rotel {
    fn start(dir: &TestDir) -> Rotel {
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .unwrap()
                .local_addr()
                .unwrap()
                .port()
        };
        let (grpc, http) = (
            format!("127.0.0.1:{}", port()),
            format!("127.0.0.1:{}", port()),
        );
        let log = dir.join("rotel.log");
        let child = Command::new(required_tool("WEIR_TEST_ROTEL"))
            .args([
                "start",
                "--exporter",
                "blackhole",
                "--debug-log",
                "traces",
                "--debug-log-verbosity",
                "detailed",
            ])
            .args(["--otlp-grpc-endpoint", &grpc, "--otlp-http-endpoint", &http])
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .expect("rotel starts");
        Rotel {
            child,
            log,
            grpc,
            http,
        }
    }

    fn received(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Rotel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A record published with a known `traceparent` is handled by `weir serve`, whose spans reach
/// rotel under that trace id, over `protocol`.
async fn trace_reaches_rotel(protocol: &str) {
    let broker = broker_with_topics(Tansu::start_memory());
    let dir = TestDir::new("otlp");
    let rotel = Rotel::start(&dir);
    let endpoint = match protocol {
        "grpc" => format!("http://{}", rotel.grpc),
        _ => format!("http://{}", rotel.http),
    };
    let records = dir.join("handled.jsonl");
    let options = ServeOptions::new(&broker.brokers(), &unique("otlp"), &records)
        .env("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
        .env("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
        .env("OTEL_SERVICE_NAME", format!("weir-{protocol}"));
    let mut serve = WeirProcess::serve(dir.path(), "serve", &options);
    let trace_id = format!("{:032x}", uuid::Uuid::new_v4().as_u128());
    let bus = KafkaBus::new(KafkaConfig::new(broker.brokers())).expect("bus");
    let envelope = Envelope::new(CustomerCreated::new("traced", serde_json::json!({})));
    let record = OutboundRecord {
        topic: CustomerCreated::TOPIC.to_owned(),
        key: Some(b"traced".to_vec()),
        value: Some(envelope.to_structured().unwrap()),
        headers: Headers::new().with("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01")),
    };
    bus.publish_record(record).await.expect("publish");
    let mut handled = RecordFile::new(&records);
    wait_until(
        "the traced event to be handled",
        Duration::from_secs(60),
        || {
            (handled.count() == 1)
                .then_some(())
                .ok_or_else(|| serve.stderr_tail(1_000))
        },
    )
    .await;
    serve.sigterm();
    let status = serve
        .wait_exit(Duration::from_secs(20))
        .await
        .expect("exits after SIGTERM");
    assert!(status.success(), "{}", serve.stderr_tail(2_000));
    wait_until("rotel to log the trace", Duration::from_secs(30), || {
        let log = rotel.received();
        let ours = log.contains(&format!("Trace ID       : {trace_id}"))
            && log.contains("customer-events process")
            && log.contains("handle record_customer_created")
            && log.contains(&format!("service.name: Str(weir-{protocol})"));
        ours.then_some(())
            .ok_or_else(|| format!("{} bytes received", log.len()))
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_a_real_otlp_receiver_over_grpc() {
    trace_reaches_rotel("grpc").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn traces_reach_a_real_otlp_receiver_over_http() {
    trace_reaches_rotel("http/protobuf").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sasl_password_never_appears_in_logs_errors_or_help() {
    const SECRET: &str = "hunter2-correct-horse";
    let dir = TestDir::new("secret");
    // A broker that does not speak SASL, so authentication fails and is logged at length.
    let broker = broker_with_topics(Tansu::start_memory());
    let config = format!(
        "[kafka.properties]\n\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanism\" = \"PLAIN\"\n\"sasl.username\" = \"weir\"\n\"sasl.password\" = \"{SECRET}\"\n"
    );
    let options = ServeOptions::new(
        &broker.brokers(),
        &unique("secret"),
        &dir.join("handled.jsonl"),
    )
    .env("RUST_LOG", "debug")
    .config(&config);
    let mut serve = WeirProcess::serve(dir.path(), "serve", &options);
    wait_until(
        "the service to log its failed SASL handshake",
        Duration::from_secs(30),
        || {
            let log = serve.stderr();
            (log.contains("SASL") && log.contains("Kafka client error"))
                .then_some(())
                .ok_or(format!("{} lines", log.lines().count()))
        },
    )
    .await;
    serve.sigterm();
    serve.wait_exit(Duration::from_secs(20)).await;
    assert!(
        !serve.stderr().contains(SECRET),
        "serve logged the password"
    );

    // The same password from the environment, with an invalid setting beside it: the start
    // fails, and the error does not carry the password either.
    let env = vec![
        ("WEIR_BROKERS".to_owned(), broker.brokers()),
        (
            "WEIR_KAFKA__PROPERTIES__SASL.PASSWORD".to_owned(),
            SECRET.to_owned(),
        ),
        (
            "WEIR_KAFKA__PROPERTIES__SESSION.TIMEOUT.MS".to_owned(),
            "soon".to_owned(),
        ),
        ("WEIR_ADMIN_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
    ];
    let mut failing = WeirProcess::spawn(dir.path(), "failing", &["serve"], &env);
    let status = failing
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits");
    assert!(!status.success());
    assert!(
        failing.stderr().contains("session.timeout.ms"),
        "{}",
        failing.stderr()
    );
    assert!(
        !failing.stderr().contains(SECRET),
        "the error carried the password"
    );

    let publish_args = [
        "publish",
        "--topic",
        "customer-events",
        "--type",
        "customer.created",
        "--key",
        "k",
        "--data",
        "{}",
        "--timeout",
        "2s",
    ];
    let mut publish = WeirProcess::spawn(dir.path(), "publish", &publish_args, &env[..3]);
    publish
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits");
    assert!(!publish.stderr().contains(SECRET) && !publish.stdout().contains(SECRET));

    for args in [
        &["--help"][..],
        &["serve", "--help"],
        &["publish", "--help"],
    ] {
        let mut help = WeirProcess::spawn(dir.path(), "help", args, &env);
        let status = help
            .wait_exit(Duration::from_secs(10))
            .await
            .expect("exits");
        assert!(status.success());
        assert!(
            !help.stdout().contains(SECRET) && !help.stderr().contains(SECRET),
            "{args:?}"
        );
    }
}
