//! The fleet console in a real browser (Debian's `chromium`, headless, through
//! `chromium-driver`): two `weir serve` replicas on Tansu, a foreign producer (confluent-kafka in
//! Python, `WEIR_TEST_PYTHON`) streaming customer events into them, one key failing for good
//! (the reference service's `details.simulate = "permanent"` hook) so its records are
//! dead-lettered.
//!
//! It checks what a person sees: the fleet page shows both processes and every partition's
//! owner within 15 s; killing a replica marks it stale and its partitions show the survivor;
//! the lag chart has points; the errors page shows the failing route's error; replay from the
//! page (dry run, confirm) republishes exactly the dead letters the dry run counted, once, and
//! confirming again republishes nothing; a page without a token is the login page, a viewer's
//! POST is refused, a POST without its CSRF token is refused. A screenshot of each page is saved
//! under `target/console-screenshots/`.
//!
//! The second test drives the Controls page: pausing the customers topic from the page stops
//! all handling of it on both replicas (their handler ledgers stop growing while the producer
//! keeps streaming), the group's lag grows (on the Lag page too), and the command's page shows
//! both replicas' acknowledgements; the Resume button of the command in force drains it,
//! nothing is lost and each key's records are handled in publish order. A viewer's POST to the
//! control endpoint, a POST without its CSRF token and a POST naming an unknown topic,
//! partition or process publish nothing. The two tests take turns (two fleets and two browsers
//! at once would only slow a small machine down).
//!
//! Needs `WEIR_TEST_CHROMEDRIVER` (the driver; `scripts/test.sh` installs it and sets it) and
//! is skipped with a message without it, like the suite's other optional tools; needs
//! `WEIR_TEST_PYTHON` as the suite's other foreign-client tests do.

mod reference;
mod support;

use crate::reference::{CustomerCreated, CUSTOMER_TOPIC, RESOURCE_TOPIC, TASK_TOPIC};
use serde_json::{json, Value};
use std::collections::{BTreeSet, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use support::broker::{unique, Tansu};
use support::foreign::ForeignProducer;
use support::kafka::{committed_on, read_topic};
use support::process::{
    eventually, http_get, RecordFile, ServeOptions, TestDir, WeirProcess, FAST_GROUP_TOML,
};
use support::webdriver::{Browser, ChromeDriver};
use weir::{dead_letter_headers as header, Envelope, StatusReport};

/// The tests of this file take turns.
static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

const PARTITIONS: i32 = 4;
const VIEWER: &str = "viewer-token-browser";
const OPERATOR: &str = "operator-token-browser";
const BAD_KEY: &str = "c-bad";
const PATIENCE: Duration = Duration::from_secs(90);
/// How long a click's page may take to load.
const STEP: Duration = Duration::from_secs(20);

fn screenshots() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target"));
    target.join("console-screenshots")
}

/// Reloads `path` until `check` finds what it waits for in the page's data (a script's result).
async fn until_page<T>(
    browser: &Browser,
    url: &str,
    what: &str,
    timeout: Duration,
    script: &str,
    mut check: impl FnMut(&Value) -> Result<T, String>,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        browser.goto(url).await;
        let seen = browser.execute(script, json!([])).await;
        match check(&seen) {
            Ok(found) => return found,
            Err(last) if Instant::now() >= deadline => {
                panic!("{what}: not seen within {timeout:?}; last: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(300)).await,
        }
    }
}

/// The fleet page's processes and partition cells, as data.
const FLEET_SCRIPT: &str = r#"
return {
  processes: [...document.querySelectorAll('#processes tbody tr')].map(r => ({
    id: r.dataset.process, pid: Number(r.dataset.pid), health: r.dataset.health })),
  cells: [...document.querySelectorAll('.cell[data-partition]')].map(c => ({
    topic: c.dataset.topic, partition: Number(c.dataset.partition), owner: c.dataset.owner,
    stale: c.dataset.ownerStale === 'true' })),
};"#;

#[derive(Debug)]
struct FleetView {
    /// (id, pid, health)
    processes: Vec<(String, u32, String)>,
    /// (topic, partition, owner, owner is stale)
    cells: Vec<(String, i32, String, bool)>,
}

fn fleet_view(v: &Value) -> FleetView {
    FleetView {
        processes: v["processes"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| {
                (
                    p["id"].as_str().unwrap_or_default().to_owned(),
                    p["pid"].as_u64().unwrap_or_default() as u32,
                    p["health"].as_str().unwrap_or_default().to_owned(),
                )
            })
            .collect(),
        cells: v["cells"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|c| {
                (
                    c["topic"].as_str().unwrap_or_default().to_owned(),
                    c["partition"].as_i64().unwrap_or(-1) as i32,
                    c["owner"].as_str().unwrap_or_default().to_owned(),
                    c["stale"].as_bool().unwrap_or(true),
                )
            })
            .collect(),
    }
}

/// Records of `topic` published by replay `id`: (count, distinct dead letters they came from).
async fn replayed_by(brokers: &str, id: &str) -> (usize, BTreeSet<String>) {
    let records = read_topic(
        brokers,
        CUSTOMER_TOPIC,
        1,
        Duration::from_millis(500),
        Duration::from_secs(10),
    )
    .await;
    let mine: Vec<_> = records
        .iter()
        .filter(|r| r.headers.get_str(header::REPLAY_ID) == Some(id))
        .collect();
    let sources = mine
        .iter()
        .filter_map(|r| r.headers.get_str(header::REPLAY_SOURCE).map(str::to_owned))
        .collect();
    (mine.len(), sources)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_shows_the_fleet_its_lag_and_errors_and_replays_dead_letters_once() {
    let Some(chromedriver) = std::env::var_os("WEIR_TEST_CHROMEDRIVER") else {
        eprintln!(
            "skipped: WEIR_TEST_CHROMEDRIVER is not set (Debian's chromium-driver; \
             scripts/test.sh installs it and sets it)"
        );
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let shots = screenshots();
    let dlq = format!("{CUSTOMER_TOPIC}.dlq");
    let dlq = dlq.as_str();
    let broker = Tansu::start_memory();
    for topic in [TASK_TOPIC, CUSTOMER_TOPIC, RESOURCE_TOPIC] {
        broker.create_topic(topic, PARTITIONS);
    }
    broker.create_topic(dlq, 2);
    let brokers = broker.brokers();
    let dir = TestDir::new("weir-console-browser");
    let group = unique("console");
    let replica = |name: &str| {
        let records = RecordFile::new(&dir.join(&format!("{name}.jsonl")));
        let options = ServeOptions::new(&brokers, &group, records.path())
            .env("WEIR_CONTROL__REPORT_INTERVAL", "1s")
            .env("WEIR_CONSUMER__COMMIT_INTERVAL", "10ms")
            .config(FAST_GROUP_TOML);
        WeirProcess::serve(dir.path(), name, &options)
    };
    let mut a = replica("serve-a");
    let console_env = [
        ("WEIR_BROKERS".to_owned(), brokers.clone()),
        ("WEIR_GROUP_ID".to_owned(), group.clone()),
        ("WEIR_CONSOLE__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("WEIR_CONSOLE__VIEWER_TOKEN".to_owned(), VIEWER.to_owned()),
        (
            "WEIR_CONSOLE__OPERATOR_TOKEN".to_owned(),
            OPERATOR.to_owned(),
        ),
    ];
    let mut console = WeirProcess::spawn(dir.path(), "console", &["console"], &console_env);

    // The foreign producer: a stream of customers, every fifth event for the failing key.
    let stop = Arc::new(AtomicBool::new(false));
    let bad_published = Arc::new(AtomicUsize::new(0));
    let bad_ids = Arc::new(std::sync::Mutex::new(HashSet::new()));
    let producer = {
        let (brokers, stop, bad_published, bad_ids) = (
            brokers.clone(),
            stop.clone(),
            bad_published.clone(),
            bad_ids.clone(),
        );
        tokio::spawn(async move {
            let mut producer = ForeignProducer::start(&brokers);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let event = if n % 5 == 4 {
                    CustomerCreated::new(BAD_KEY, json!({"simulate": "permanent", "n": n}))
                } else {
                    CustomerCreated::new(format!("c-{}", n % 40), json!({"n": n}))
                };
                let envelope = Envelope::new(event);
                let id = envelope.meta.id.to_string();
                producer.publish(&envelope).await;
                if n % 5 == 4 {
                    bad_ids.lock().unwrap().insert(id);
                    bad_published.fetch_add(1, Ordering::SeqCst);
                }
                n += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    let console_addr = eventually("the console's address", PATIENCE, || {
        let found = console.logged_addr("Console listening.", "console_addr");
        async move { found.ok_or_else(|| "not logged yet".to_owned()) }
    })
    .await;
    let base = format!("http://{console_addr}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();

    // Security, as a script sees it: no token, 401 and the login page; a viewer cannot act.
    let anonymous = http.get(&base).send().await.unwrap();
    assert_eq!(anonymous.status(), reqwest::StatusCode::UNAUTHORIZED);
    assert!(anonymous
        .text()
        .await
        .unwrap()
        .contains("action=\"/login\""));
    let viewer_post = http
        .post(format!("{base}/dlq/{dlq}/replay"))
        .header("authorization", format!("Bearer {VIEWER}"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("kind=")
        .send()
        .await
        .unwrap();
    assert_eq!(viewer_post.status(), reqwest::StatusCode::FORBIDDEN);

    let driver = ChromeDriver::start(std::path::Path::new(&chromedriver)).await;
    let browser = driver.session().await;

    // The browser without a session gets the login page; sign in as the operator.
    browser.goto(&base).await;
    assert_eq!(browser.title().await, "Sign in · Weir console");
    browser.screenshot(&shots.join("login.png")).await;
    browser.type_into("#token", OPERATOR).await;
    browser.click("form.login button").await;
    browser.wait_for("#processes", STEP).await;

    // The first replica owns every partition before the second starts: it leads the group, and
    // the one killed below is a follower. (On Tansu 0.6.0, a group whose leader is killed was
    // seen never to reassign: the survivor revoked its partitions and got none back.)
    let all_cells = 3 * PARTITIONS as usize;
    until_page(
        &browser,
        &base,
        "the first replica owning every partition",
        PATIENCE,
        FLEET_SCRIPT,
        |v| {
            let view = fleet_view(v);
            let mine = view
                .processes
                .iter()
                .any(|(_, pid, h)| *pid == a.pid() && h == "live")
                && view.cells.len() == all_cells;
            if mine {
                Ok(())
            } else {
                Err(format!("{view:?}"))
            }
        },
    )
    .await;
    let mut b = replica("serve-b");

    // Fleet: both processes and every partition's owner, within 15 s of both replicas running.
    eventually("both replicas serving", PATIENCE, || {
        let ready = a.admin_addr().is_some() && b.admin_addr().is_some();
        async move {
            if ready {
                Ok(())
            } else {
                Err("starting".to_owned())
            }
        }
    })
    .await;
    let started = Instant::now();
    let pids: BTreeSet<u32> = [a.pid(), b.pid()].into();
    let view = until_page(
        &browser,
        &base,
        "both processes live and every partition owned by one of them",
        Duration::from_secs(15),
        FLEET_SCRIPT,
        |v| {
            let view = fleet_view(v);
            let live: BTreeSet<u32> = view
                .processes
                .iter()
                .filter(|(_, _, h)| h == "live")
                .map(|(_, pid, _)| *pid)
                .collect();
            let ids: HashSet<&str> = view
                .processes
                .iter()
                .map(|(id, _, _)| id.as_str())
                .collect();
            let owned = view.cells.len() == all_cells
                && view
                    .cells
                    .iter()
                    .all(|(_, _, owner, stale)| !stale && ids.contains(owner.as_str()));
            if live == pids && owned {
                Ok(view)
            } else {
                Err(format!("{view:?}"))
            }
        },
    )
    .await;
    println!(
        "fleet page complete {:?} after both replicas served",
        started.elapsed()
    );
    browser.screenshot(&shots.join("fleet.png")).await;
    let id_of = |pid: u32| {
        view.processes
            .iter()
            .find(|(_, p, _)| *p == pid)
            .map(|(id, _, _)| id.clone())
            .expect("listed")
    };
    let (id_a, id_b) = (id_of(a.pid()), id_of(b.pid()));

    // Errors: the failing route's error, with the id of one of the failing events.
    let errors = until_page(
        &browser,
        &format!("{base}/errors"),
        "the failing route's error",
        PATIENCE,
        r#"return [...document.querySelectorAll('#errors tbody tr[data-route]')].map(r =>
             ({route: r.dataset.route, event: r.dataset.eventId, text: r.innerText}));"#,
        |v| {
            let rows = v.as_array().cloned().unwrap_or_default();
            let ids = bad_ids.lock().unwrap();
            rows.iter()
                .find(|r| {
                    r["route"] == "record_customer_created"
                        && r["text"]
                            .as_str()
                            .unwrap_or("")
                            .contains("simulated permanent failure")
                        && ids.contains(r["event"].as_str().unwrap_or(""))
                })
                .cloned()
                .ok_or_else(|| format!("{rows:?}"))
        },
    )
    .await;
    println!("error row: {errors}");
    browser.screenshot(&shots.join("errors.png")).await;

    // Lag and throughput: the customers topic's lag chart has points.
    let points = until_page(
        &browser,
        &format!("{base}/lag"),
        "points on the customers lag chart",
        PATIENCE,
        &format!(
            "return [...document.querySelectorAll('[data-chart=lag][data-topic=\"{CUSTOMER_TOPIC}\"] polyline')]
               .map(p => Number(p.dataset.points));"
        ),
        |v| {
            let total: u64 = v.as_array().into_iter().flatten().filter_map(Value::as_u64).sum();
            if total >= 2 { Ok(total) } else { Err(format!("{v}")) }
        },
    )
    .await;
    println!("lag chart points: {points}");
    let route_lines = browser
        .execute(
            "return document.querySelectorAll('[data-chart=route] polyline').length;",
            json!([]),
        )
        .await;
    assert!(route_lines.as_u64().unwrap_or(0) >= 3, "{route_lines}");
    // The group's committed offsets, read from the broker: every partition, and the
    // customers' committed.
    let offsets = until_page(
        &browser,
        &format!("{base}/lag"),
        "the group's committed offsets",
        PATIENCE,
        "return [...document.querySelectorAll('#group-offsets tbody tr')].map(r => r.innerText);",
        |v| {
            let rows: Vec<String> = v
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|r| r.as_str().map(str::to_owned))
                .collect();
            let committed = rows
                .iter()
                .filter(|r| r.starts_with(CUSTOMER_TOPIC) && !r.contains("\t-\t"))
                .count();
            if rows.len() == all_cells && committed > 0 {
                Ok(rows)
            } else {
                Err(format!("{rows:?}"))
            }
        },
    )
    .await;
    println!("group offsets: {offsets:?}");
    browser.screenshot(&shots.join("lag.png")).await;

    // Routes: the route table, each event type linked to its contract.
    browser.goto(&format!("{base}/routes")).await;
    let contract = browser
        .execute(
            "return document.querySelector('#routes tr[data-handler=record_customer_created] a').getAttribute('href');",
            json!([]),
        )
        .await;
    assert_eq!(
        contract,
        json!("/asyncapi.json#/components/messages/customer.created")
    );
    browser.screenshot(&shots.join("routes.png")).await;

    // Kill one replica: it goes stale, and the survivor owns every partition.
    b.sigkill();
    let killed = Instant::now();
    until_page(
        &browser,
        &base,
        "the killed replica stale and its partitions with the survivor",
        PATIENCE,
        FLEET_SCRIPT,
        |v| {
            let view = fleet_view(v);
            let b_stale = view
                .processes
                .iter()
                .any(|(id, _, h)| *id == id_b && h == "stale");
            let moved = view.cells.len() == all_cells
                && view
                    .cells
                    .iter()
                    .all(|(_, _, owner, stale)| *owner == id_a && !stale);
            if b_stale && moved {
                Ok(())
            } else {
                Err(format!("{view:?}"))
            }
        },
    )
    .await;
    println!("stale and moved {:?} after the kill", killed.elapsed());
    browser
        .screenshot(&shots.join("fleet-after-kill.png"))
        .await;

    // Stop the stream; wait until the dead-letter topic stops growing.
    stop.store(true, Ordering::SeqCst);
    producer.await.expect("the producer ends");
    let bad = bad_published.load(Ordering::SeqCst);
    let deadline = Instant::now() + PATIENCE;
    let mut previous = None;
    let dead_letters = loop {
        let n = read_topic(
            &brokers,
            dlq,
            bad,
            Duration::from_millis(500),
            Duration::from_secs(10),
        )
        .await
        .len();
        if n >= bad && previous == Some(n) {
            break n;
        }
        assert!(
            Instant::now() < deadline,
            "the dead-letter topic did not settle: {n} dead letters, {bad} failing events published"
        );
        previous = Some(n);
    };
    println!("{dead_letters} dead letters of {bad} failing events");

    // Dead letters: the topic list, the explorer, one record.
    browser.goto(&format!("{base}/dlq")).await;
    assert!(browser.text().await.contains(dlq));
    browser.screenshot(&shots.join("dead-letters.png")).await;
    browser
        .click(&format!("#dead-letter-topics a[href=\"/dlq/{dlq}\"]"))
        .await;
    browser.wait_for("#matching", STEP).await;
    let listed = browser
        .execute(
            "return Number(document.querySelector('#matching').dataset.count);",
            json!([]),
        )
        .await;
    assert_eq!(listed.as_u64(), Some(dead_letters as u64));
    browser
        .screenshot(&shots.join("dead-letter-topic.png"))
        .await;
    browser.click("#dead-letters tbody a").await;
    browser.wait_for("#headers", STEP).await;
    let record_text = browser.text().await;
    assert!(record_text.contains(header::ERROR_KIND), "{record_text}");
    assert!(
        record_text.contains("customer.created") && record_text.contains(BAD_KEY),
        "{record_text}"
    );
    browser
        .screenshot(&shots.join("dead-letter-record.png"))
        .await;

    // A POST without its CSRF token is refused (the form, with the token taken out).
    browser.goto(&format!("{base}/dlq/{dlq}")).await;
    browser
        .execute(
            "document.querySelector('#replay input[name=csrf]').remove();",
            json!([]),
        )
        .await;
    browser.click("#replay button").await;
    browser.wait_for("p.problem", STEP).await;
    assert_eq!(browser.title().await, "Forbidden · Weir console");
    assert!(browser.text().await.contains("CSRF"));

    // Replay: the dry run counts them and names the target; confirming republishes them once.
    browser
        .goto(&format!("{base}/dlq/{dlq}?key={BAD_KEY}"))
        .await;
    browser.click("#replay button").await;
    browser.wait_for("#dry-run", STEP).await;
    let dry = browser
        .execute(
            "const d = document.querySelector('#dry-run'); \
             return {count: Number(d.dataset.count), id: d.dataset.replayId, \
                     targets: [...document.querySelectorAll('#targets .target')].map(t => t.dataset.topic), \
                     form: document.querySelector('#confirm').outerHTML};",
            json!([]),
        )
        .await;
    assert_eq!(dry["count"].as_u64(), Some(dead_letters as u64), "{dry}");
    assert_eq!(dry["targets"], json!([CUSTOMER_TOPIC]));
    let replay_id = dry["id"].as_str().expect("a replay id").to_owned();
    assert_eq!(
        replayed_by(&brokers, &replay_id).await.0,
        0,
        "a dry run publishes nothing"
    );
    browser.screenshot(&shots.join("replay-dry-run.png")).await;
    browser.click("#confirm button").await;
    browser.wait_for("#replayed", STEP).await;
    let replayed = browser
        .execute(
            "return Number(document.querySelector('#replayed').dataset.replayed);",
            json!([]),
        )
        .await;
    assert_eq!(replayed.as_u64(), Some(dead_letters as u64));
    browser.screenshot(&shots.join("replay.png")).await;
    let (count, sources) = replayed_by(&brokers, &replay_id).await;
    assert_eq!(
        (count, sources.len()),
        (dead_letters, dead_letters),
        "each dead letter once: {sources:?}"
    );

    // Confirming the same replay again (the dry run's form, submitted a second time)
    // republishes nothing: its progress is committed under its id.
    browser
        .execute(
            "document.querySelector('#replayed').remove(); \
             document.body.insertAdjacentHTML('beforeend', arguments[0]);",
            json!([dry["form"]]),
        )
        .await;
    browser.click("#confirm button").await;
    browser.wait_for("#replayed", STEP).await;
    let again = browser
        .execute(
            "return Number(document.querySelector('#replayed').dataset.replayed);",
            json!([]),
        )
        .await;
    assert_eq!(again.as_u64(), Some(0), "{}", browser.text().await);
    let (count, _) = replayed_by(&brokers, &replay_id).await;
    assert_eq!(
        count, dead_letters,
        "nothing republished by the second confirm"
    );

    // Bad input against the real topics: a clear 4xx, and nothing published.
    let operator = format!("Bearer {OPERATOR}");
    let post = |path: String, body: &'static str| {
        http.post(format!("{base}{path}"))
            .header("authorization", operator.clone())
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
    };
    let past_the_end = post(format!("/dlq/{dlq}/replay"), "from=1000000")
        .send()
        .await
        .unwrap();
    assert_eq!(past_the_end.status(), reqwest::StatusCode::BAD_REQUEST);
    assert!(past_the_end
        .text()
        .await
        .unwrap()
        .contains("select no dead letter"));
    let unknown_topic = post("/dlq/no-such.dlq/replay".to_owned(), "")
        .send()
        .await
        .unwrap();
    assert_eq!(unknown_topic.status(), reqwest::StatusCode::NOT_FOUND);
    for path in [
        format!("/dlq/{dlq}/7/0"),
        format!("/dlq/{dlq}/0/999999"),
        "/dlq/no-such.dlq".to_owned(),
        "/processes/no-such-process".to_owned(),
    ] {
        let response = http
            .get(format!("{base}{path}"))
            .header("authorization", operator.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), reqwest::StatusCode::NOT_FOUND, "{path}");
    }
    let (count, _) = replayed_by(&brokers, &replay_id).await;
    assert_eq!(count, dead_letters);

    browser.quit().await;
    drop(driver);

    // A restarted console rebuilds its history from the status topic: the lag chart it
    // serves at once has the points of before the restart.
    console.sigterm();
    let status = console
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("stops");
    assert!(status.success(), "{}", console.stderr_tail(4096));
    let restarted = WeirProcess::spawn(dir.path(), "console-2", &["console"], &console_env);
    let addr = eventually("the restarted console's address", PATIENCE, || {
        let found = restarted.logged_addr("Console listening.", "console_addr");
        async move { found.ok_or_else(|| "not logged yet".to_owned()) }
    })
    .await;
    let before_restart = chrono::Utc::now();
    eventually(
        "the lag history rebuilt after the restart",
        PATIENCE,
        || {
            let http = http.clone();
            async move {
                let page = http
                    .get(format!("http://{addr}/lag"))
                    .header("authorization", format!("Bearer {VIEWER}"))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?
                    .text()
                    .await
                    .map_err(|e| e.to_string())?;
                let points: usize = page
                    .split("data-points=\"")
                    .skip(1)
                    .filter_map(|rest| rest.split('"').next()?.parse::<usize>().ok())
                    .sum();
                if points >= 10 {
                    Ok(())
                } else {
                    Err(format!("{points} points"))
                }
            }
        },
    )
    .await;
    println!(
        "history rebuilt {:?} after the restart",
        (chrono::Utc::now() - before_restart)
            .to_std()
            .unwrap_or_default()
    );
    a.sigterm();
    assert!(a
        .wait_exit(Duration::from_secs(30))
        .await
        .is_some_and(|s| s.success()));
}

/// One record the producer published, as the broker acknowledged it.
#[derive(Clone, Debug)]
struct Sent {
    id: String,
    key: String,
    partition: i32,
    offset: i64,
}

/// The latest status report of each process, by pid, read from the status topic.
async fn reports(brokers: &str) -> std::collections::HashMap<u32, StatusReport> {
    let records = read_topic(
        brokers,
        "weir.status",
        1,
        Duration::from_millis(300),
        Duration::from_secs(5),
    )
    .await;
    let mut latest = std::collections::HashMap::new();
    for value in records.into_iter().filter_map(|r| r.value) {
        if let Ok(report) = serde_json::from_slice::<StatusReport>(&value) {
            latest.insert(report.process.pid, report);
        }
    }
    latest
}

/// Waits until every one of `pids` has published a report built at least two report
/// intervals (1 s each) after `since`: whatever was in flight then has finished.
async fn two_reports_after(brokers: &str, pids: &[u32], since: chrono::DateTime<chrono::Utc>) {
    let settled = since + chrono::Duration::seconds(2);
    eventually(
        "two further reports of every replica",
        PATIENCE,
        || async move {
            let latest = reports(brokers).await;
            for pid in pids {
                let report = latest.get(pid).ok_or(format!("no report of {pid}"))?;
                if report.at < settled {
                    return Err(format!("{pid}'s latest report is from {}", report.at));
                }
            }
            Ok(())
        },
    )
    .await;
}

/// Customers records handled, over both ledgers: (distinct event ids, ledger lines).
fn handled(ledgers: &mut [RecordFile]) -> (HashSet<String>, usize) {
    let mut ids = HashSet::new();
    let mut lines = 0;
    for ledger in ledgers.iter_mut() {
        for h in ledger
            .refresh()
            .iter()
            .filter(|h| h.topic == CUSTOMER_TOPIC)
        {
            ids.insert(h.event_id.clone());
            lines += 1;
        }
    }
    (ids, lines)
}

/// The group's lag on the customers topic: records published past its committed offsets.
async fn customers_lag(brokers: &str, group: &str, sent: &[Sent]) -> i64 {
    let committed = committed_on(brokers, group, CUSTOMER_TOPIC).await;
    let mut ends: std::collections::BTreeMap<i32, i64> = std::collections::BTreeMap::new();
    for s in sent {
        let end = ends.entry(s.partition).or_default();
        *end = (*end).max(s.offset + 1);
    }
    ends.iter()
        .map(|(p, end)| (end - committed.get(p).copied().unwrap_or(0)).max(0))
        .sum()
}

/// The customers topic's lag in the Lag page's table of group offsets (read from the broker),
/// once `enough` accepts it.
async fn group_lag_on_page(browser: &Browser, base: &str, enough: impl Fn(i64) -> bool) -> i64 {
    until_page(
        browser,
        &format!("{base}/lag"),
        "the customers lag in the group offsets table",
        PATIENCE,
        "return [...document.querySelectorAll('#group-offsets tbody tr')].map(r => \
           [...r.cells].map(c => c.innerText));",
        |v| {
            let rows = v.as_array().cloned().unwrap_or_default();
            let customers: Vec<i64> = rows
                .iter()
                .filter(|r| r[0] == CUSTOMER_TOPIC)
                .filter_map(|r| r[4].as_str()?.trim().parse().ok())
                .collect();
            let lag = customers.iter().sum();
            if customers.len() == PARTITIONS as usize && enough(lag) {
                Ok(lag)
            } else {
                Err(format!("{rows:?}"))
            }
        },
    )
    .await
}

/// The acknowledgements a command's page shows: process id → result.
const ACKS_SCRIPT: &str = r#"
const c = document.querySelector('#command');
return {
  id: c && c.dataset.id, action: c && c.dataset.action,
  acks: [...document.querySelectorAll('#acks tbody tr[data-process]')].map(r =>
    [r.dataset.process, r.dataset.result]),
};"#;

/// Reloads the command page at `url` until each of `ids` shows `applied`.
async fn until_applied(browser: &Browser, url: &str, ids: &[&str]) -> Value {
    until_page(
        browser,
        url,
        "every replica's acknowledgement on the command's page",
        PATIENCE,
        ACKS_SCRIPT,
        |v| {
            let acks: std::collections::HashMap<String, String> = v["acks"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|a| Some((a[0].as_str()?.to_owned(), a[1].as_str()?.to_owned())))
                .collect();
            if ids
                .iter()
                .all(|id| acks.get(*id).map(String::as_str) == Some("applied"))
            {
                Ok(v.clone())
            } else {
                Err(format!("{v}"))
            }
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pausing_a_topic_from_the_controls_page_holds_both_replicas_until_its_resume_drains_it() {
    let Some(chromedriver) = std::env::var_os("WEIR_TEST_CHROMEDRIVER") else {
        eprintln!(
            "skipped: WEIR_TEST_CHROMEDRIVER is not set (Debian's chromium-driver; \
             scripts/test.sh installs it and sets it)"
        );
        return;
    };
    let _turn = ONE_AT_A_TIME.lock().await;
    let shots = screenshots();
    let broker = Tansu::start_memory();
    broker.create_topic(CUSTOMER_TOPIC, PARTITIONS);
    broker.create_topic(TASK_TOPIC, 1);
    broker.create_topic(RESOURCE_TOPIC, 1);
    let brokers = broker.brokers();
    let dir = TestDir::new("weir-console-controls");
    let group = unique("controls");
    let mut ledgers: Vec<RecordFile> = ["a", "b"]
        .iter()
        .map(|n| RecordFile::new(&dir.join(&format!("handled-{n}.jsonl"))))
        .collect();
    let replica = |name: &str, ledger: &RecordFile| {
        let options = ServeOptions::new(&brokers, &group, ledger.path())
            .env("WEIR_CONTROL__REPORT_INTERVAL", "1s")
            .env("WEIR_CONSUMER__COMMIT_INTERVAL", "10ms")
            .config(FAST_GROUP_TOML);
        WeirProcess::serve(dir.path(), name, &options)
    };
    let mut a = replica("serve-a", &ledgers[0]);
    let mut b = replica("serve-b", &ledgers[1]);
    let console_env = [
        ("WEIR_BROKERS".to_owned(), brokers.clone()),
        ("WEIR_GROUP_ID".to_owned(), group.clone()),
        ("WEIR_CONSOLE__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
        ("WEIR_CONSOLE__VIEWER_TOKEN".to_owned(), VIEWER.to_owned()),
        (
            "WEIR_CONSOLE__OPERATOR_TOKEN".to_owned(),
            OPERATOR.to_owned(),
        ),
    ];
    let console = WeirProcess::spawn(dir.path(), "console", &["console"], &console_env);

    // The foreign producer: 20 keys, one record at a time (so each key's offsets follow its
    // publish order), until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(std::sync::Mutex::new(Vec::<Sent>::new()));
    let producer = {
        let (brokers, stop, sent) = (brokers.clone(), stop.clone(), sent.clone());
        tokio::spawn(async move {
            let mut producer = ForeignProducer::start(&brokers);
            let mut n = 0u64;
            while !stop.load(Ordering::SeqCst) {
                let key = format!("c-{}", n % 20);
                let envelope = Envelope::new(CustomerCreated::new(key.clone(), json!({"n": n})));
                let delivery = producer.publish(&envelope).await;
                sent.lock().unwrap().push(Sent {
                    id: envelope.meta.id.to_string(),
                    key,
                    partition: delivery.partition,
                    offset: delivery.offset,
                });
                n += 1;
                tokio::time::sleep(Duration::from_millis(40)).await;
            }
        })
    };
    let sent_now = || sent.lock().unwrap().clone();

    let console_addr = eventually("the console's address", PATIENCE, || {
        let found = console.logged_addr("Console listening.", "console_addr");
        async move { found.ok_or_else(|| "not logged yet".to_owned()) }
    })
    .await;
    let base = format!("http://{console_addr}");
    for serve in [&a, &b] {
        eventually(&format!("{} ready", serve.name()), PATIENCE, || {
            let ready = serve
                .admin_addr()
                .and_then(|admin| http_get(admin, "/readyz").ok())
                .is_some_and(|(status, _)| status == 200);
            async move { ready.then_some(()).ok_or("not ready".to_owned()) }
        })
        .await;
    }

    let driver = ChromeDriver::start(std::path::Path::new(&chromedriver)).await;
    let browser = driver.session().await;
    browser.goto(&format!("{base}/login")).await;
    browser.type_into("#token", OPERATOR).await;
    browser.click("form.login button").await;
    browser.wait_for("#processes", STEP).await;

    // Both replicas own customers partitions and handle them.
    let all_cells = PARTITIONS as usize + 2;
    let pids: BTreeSet<u32> = [a.pid(), b.pid()].into();
    let view = until_page(
        &browser,
        &base,
        "both replicas live, each owning customers partitions",
        PATIENCE,
        FLEET_SCRIPT,
        |v| {
            let view = fleet_view(v);
            let live: BTreeSet<u32> = view
                .processes
                .iter()
                .filter(|(_, _, h)| h == "live")
                .map(|(_, pid, _)| *pid)
                .collect();
            let owners: BTreeSet<&str> = view
                .cells
                .iter()
                .filter(|(topic, _, _, stale)| topic == CUSTOMER_TOPIC && !stale)
                .map(|(_, _, owner, _)| owner.as_str())
                .collect();
            if live == pids && view.cells.len() == all_cells && owners.len() == 2 {
                Ok(view)
            } else {
                Err(format!("{view:?}"))
            }
        },
    )
    .await;
    let id_of = |pid: u32| {
        view.processes
            .iter()
            .find(|(_, p, _)| *p == pid)
            .map(|(id, _, _)| id.clone())
            .expect("listed")
    };
    let (id_a, id_b) = (id_of(a.pid()), id_of(b.pid()));
    eventually("both replicas handling customers", PATIENCE, || {
        let each: Vec<usize> = ledgers
            .iter_mut()
            .map(|l| {
                l.refresh()
                    .iter()
                    .filter(|h| h.topic == CUSTOMER_TOPIC)
                    .count()
            })
            .collect();
        async move {
            each.iter()
                .all(|n| *n > 0)
                .then_some(())
                .ok_or(format!("handled per replica: {each:?}"))
        }
    })
    .await;

    // Refused: a viewer's POST, a POST without its CSRF token, an unknown topic or partition.
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let post = |token: &str, body: String| {
        http.post(format!("{base}/controls"))
            .header("authorization", format!("Bearer {token}"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
    };
    let viewer = post(VIEWER, format!("action=pause&topic={CUSTOMER_TOPIC}"))
        .send()
        .await
        .unwrap();
    assert_eq!(viewer.status(), reqwest::StatusCode::FORBIDDEN);
    for (body, expected) in [
        (
            "action=pause&topic=no-such-topic".to_owned(),
            "no-such-topic",
        ),
        (
            format!("action=pause&topic={CUSTOMER_TOPIC}&partition=99"),
            "partition 99",
        ),
        (
            format!("action=pause&topic={CUSTOMER_TOPIC}&process=nobody-1-deadbeef"),
            "nobody-1-deadbeef",
        ),
    ] {
        let refused = post(OPERATOR, body.clone()).send().await.unwrap();
        assert_eq!(refused.status(), reqwest::StatusCode::NOT_FOUND, "{body}");
        let text = refused.text().await.unwrap();
        assert!(
            text.contains(expected) && text.contains("Nothing was changed"),
            "{text}"
        );
    }
    let pause_button =
        format!("#topics tr[data-topic=\"{CUSTOMER_TOPIC}\"] form[data-action=pause] button");
    browser.goto(&format!("{base}/controls")).await;
    browser
        .execute(
            &format!(
                "document.querySelector('#topics tr[data-topic=\"{CUSTOMER_TOPIC}\"] \
                 form[data-action=pause] input[name=csrf]').remove();"
            ),
            json!([]),
        )
        .await;
    browser.click(&pause_button).await;
    browser.wait_for("p.problem", STEP).await;
    assert_eq!(browser.title().await, "Forbidden · Weir console");
    assert!(browser.text().await.contains("CSRF"));

    // Pause the customers topic from the page: both replicas acknowledge it on the page.
    browser.goto(&format!("{base}/controls")).await;
    browser.screenshot(&shots.join("controls.png")).await;
    let clicked = Instant::now();
    browser.click(&pause_button).await;
    browser.wait_for("#command", STEP).await;
    let command_url = browser.url().await;
    let shown = until_applied(&browser, &command_url, &[&id_a, &id_b]).await;
    assert_eq!(shown["action"], "pause", "{shown}");
    let pause_id = shown["id"].as_str().expect("an id").to_owned();
    println!(
        "pause {pause_id} acknowledged by both replicas on the page {:?} after the click",
        clicked.elapsed()
    );
    browser
        .screenshot(&shots.join("controls-pause-acknowledged.png"))
        .await;

    // While paused: the producer keeps publishing, the ledgers stop growing, the lag grows.
    let pid_list = [a.pid(), b.pid()];
    two_reports_after(&brokers, &pid_list, chrono::Utc::now()).await;
    let (_, lines_paused) = handled(&mut ledgers);
    let sent_paused = sent_now();
    let lag_paused = customers_lag(&brokers, &group, &sent_paused).await;
    let page_lag_paused = group_lag_on_page(&browser, &base, |_| true).await;
    eventually("the producer to publish 40 more records", PATIENCE, || {
        let more = sent_now().len() - sent_paused.len();
        async move { (more >= 40).then_some(()).ok_or(format!("{more} more")) }
    })
    .await;
    two_reports_after(&brokers, &pid_list, chrono::Utc::now()).await;
    let (_, lines_later) = handled(&mut ledgers);
    let sent_later = sent_now();
    let lag_later = customers_lag(&brokers, &group, &sent_later).await;
    assert_eq!(
        lines_later, lines_paused,
        "customers records were handled while the topic was paused"
    );
    assert!(
        lag_later > lag_paused && lag_later >= (sent_later.len() - sent_paused.len()) as i64,
        "the lag grows while paused: {lag_paused} then {lag_later}"
    );
    // The Lag page's group offsets (from the broker) show it grow too.
    let more = (sent_later.len() - sent_paused.len()) as i64;
    let page_lag_later =
        group_lag_on_page(&browser, &base, |lag| lag >= page_lag_paused + more).await;
    println!(
        "paused: {lines_paused} handled, lag {lag_paused} then {lag_later} after {more} more \
         records; on the Lag page {page_lag_paused} then {page_lag_later}"
    );
    browser.goto(&base).await;
    browser.screenshot(&shots.join("fleet-paused.png")).await;
    browser.goto(&format!("{base}/processes/{}", id_a)).await;
    browser.screenshot(&shots.join("process-paused.png")).await;

    // The command in force, listed with its Resume button; the resume drains everything.
    let key = format!("all|topic|{CUSTOMER_TOPIC}");
    browser.goto(&format!("{base}/controls")).await;
    let listed = browser
        .execute(
            "return [...document.querySelectorAll('#in-force tr[data-key]')].map(r => r.dataset.key);",
            json!([]),
        )
        .await;
    assert_eq!(listed, json!([key]));
    browser
        .screenshot(&shots.join("controls-in-force.png"))
        .await;
    browser
        .click(&format!("#in-force tr[data-key=\"{key}\"] button"))
        .await;
    browser.wait_for("#command", STEP).await;
    let command_url = browser.url().await;
    let shown = until_applied(&browser, &command_url, &[&id_a, &id_b]).await;
    assert_eq!(shown["action"], "resume", "{shown}");
    let resume_id = shown["id"].as_str().expect("an id").to_owned();
    browser
        .screenshot(&shots.join("controls-resume-acknowledged.png"))
        .await;
    until_page(
        &browser,
        &format!("{base}/controls"),
        "nothing in force after the resume",
        PATIENCE,
        "return document.querySelectorAll('#in-force tr[data-key]').length;",
        |v| (v == &json!(0)).then_some(()).ok_or(format!("{v}")),
    )
    .await;

    stop.store(true, Ordering::SeqCst);
    producer.await.expect("the producer ends");
    let sent = sent_now();
    let ids: HashSet<String> = sent.iter().map(|s| s.id.clone()).collect();
    eventually("every record handled after the resume", PATIENCE, || {
        let (done, _) = handled(&mut ledgers);
        let missing = ids.difference(&done).count();
        async move {
            (missing == 0)
                .then_some(())
                .ok_or(format!("{missing} not handled"))
        }
    })
    .await;
    eventually("the lag back to 0", PATIENCE, || {
        let (brokers, group, sent) = (&brokers, &group, &sent);
        async move {
            match customers_lag(brokers, group, sent).await {
                0 => Ok(()),
                n => Err(format!("{n} behind")),
            }
        }
    })
    .await;
    // Each replica handled each key's records in publish order.
    let key_of: std::collections::HashMap<(i32, i64), &str> = sent
        .iter()
        .map(|s| ((s.partition, s.offset), s.key.as_str()))
        .collect();
    for ledger in &mut ledgers {
        let mut order: std::collections::HashMap<&str, Vec<i64>> = Default::default();
        let mut seen = HashSet::new();
        for line in ledger
            .refresh()
            .iter()
            .filter(|l| l.topic == CUSTOMER_TOPIC)
        {
            if seen.insert((line.partition, line.offset)) {
                if let Some(key) = key_of.get(&(line.partition, line.offset)) {
                    order.entry(*key).or_default().push(line.offset);
                }
            }
        }
        for (key, offsets) in order {
            assert!(
                offsets.windows(2).all(|w| w[0] < w[1]),
                "{key} out of order: {offsets:?}"
            );
        }
    }

    // Quiet one process (a script's POST): only it is addressed, and it acknowledges; the
    // Unquiet button of the quiet in force lifts it.
    let quiet = post(OPERATOR, format!("action=quiet&process={id_b}"))
        .send()
        .await
        .unwrap();
    assert_eq!(quiet.status(), reqwest::StatusCode::SEE_OTHER);
    let location = quiet.headers()["location"].to_str().unwrap().to_owned();
    let shown = until_applied(&browser, &format!("{base}{location}"), &[&id_b]).await;
    assert_eq!(shown["action"], "quiet", "{shown}");
    assert_eq!(shown["acks"].as_array().map(Vec::len), Some(1), "{shown}");
    let quiet_id = shown["id"].as_str().expect("an id").to_owned();
    browser
        .screenshot(&shots.join("controls-quiet-acknowledged.png"))
        .await;
    browser.goto(&format!("{base}/controls")).await;
    browser
        .click(&format!(
            "#in-force tr[data-key=\"process:{id_b}|quiet\"] button"
        ))
        .await;
    browser.wait_for("#command", STEP).await;
    let command_url = browser.url().await;
    let shown = until_applied(&browser, &command_url, &[&id_b]).await;
    assert_eq!(shown["action"], "unquiet", "{shown}");
    let unquiet_id = shown["id"].as_str().expect("an id").to_owned();

    // The commands topic holds exactly the page's commands, issued by the operator: the
    // refused requests published nothing.
    let commands: Vec<Value> = read_topic(
        &brokers,
        "weir.commands",
        4,
        Duration::from_millis(500),
        Duration::from_secs(10),
    )
    .await
    .into_iter()
    .filter_map(|r| serde_json::from_slice(&r.value?).ok())
    .collect();
    let published: Vec<(&str, &str, &str)> = commands
        .iter()
        .map(|c| {
            (
                c["id"].as_str().unwrap_or_default(),
                c["action"]["kind"].as_str().unwrap_or_default(),
                c["issuer"].as_str().unwrap_or_default(),
            )
        })
        .collect();
    assert_eq!(
        published,
        [
            (pause_id.as_str(), "pause", "console:operator"),
            (resume_id.as_str(), "resume", "console:operator"),
            (quiet_id.as_str(), "quiet", "console:operator"),
            (unquiet_id.as_str(), "unquiet", "console:operator"),
        ]
    );
    println!(
        "{} records, every one handled once in key order",
        sent.len()
    );
    browser.quit().await;
    drop(driver);
    for serve in [&mut a, &mut b] {
        serve.sigterm();
        assert!(serve
            .wait_exit(Duration::from_secs(30))
            .await
            .is_some_and(|s| s.success()));
    }
}
