//! `weir console`'s security rules, over HTTP against the real binary (no browser, no broker:
//! the rules are checked before anything reads Kafka, and pages built from reports render an
//! empty fleet). The browser test (`tests/console_browser.rs`) covers the pages on a fleet.

mod reference;
mod support;

use reqwest::header::{AUTHORIZATION, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use reqwest::{redirect, Client, StatusCode};
use std::net::SocketAddr;
use std::time::Duration;
use support::broker::free_port;
use support::process::{eventually, TestDir, WeirProcess};

const VIEWER: &str = "viewer-token-for-tests";
const OPERATOR: &str = "operator-token-for-tests";

/// A console on an ephemeral port of loopback, with its environment.
fn console(dir: &TestDir, name: &str, env: &[(&str, &str)], args: &[&str]) -> WeirProcess {
    let mut all = vec![
        // Nothing listens there: the rules must hold without a broker.
        (
            "WEIR_BROKERS".to_owned(),
            format!("127.0.0.1:{}", free_port()),
        ),
        ("WEIR_CONSOLE__LISTEN".to_owned(), "127.0.0.1:0".to_owned()),
    ];
    all.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
    let mut argv = vec!["console"];
    argv.extend_from_slice(args);
    WeirProcess::spawn(dir.path(), name, &argv, &all)
}

async fn address(process: &WeirProcess) -> SocketAddr {
    eventually(
        "the console's address in its log",
        Duration::from_secs(30),
        || {
            let found = process.logged_addr("Console listening.", "console_addr");
            async move { found.ok_or_else(|| "not logged yet".to_owned()) }
        },
    )
    .await
}

fn client() -> Client {
    Client::builder()
        .redirect(redirect::Policy::none())
        .build()
        .expect("a client")
}

/// The value of `name="csrf"` in a page.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a CSRF field") + 19;
    page[at..].split('"').next().expect("a value").to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refuses_to_start_without_a_token_unless_told_to_run_insecure_and_then_warns() {
    let dir = TestDir::new("weir-console-refuse");
    let mut refused = console(&dir, "refused", &[], &[]);
    let status = refused
        .wait_exit(Duration::from_secs(30))
        .await
        .expect("exits");
    assert!(!status.success());
    assert!(
        refused.stderr().contains("the console needs a token"),
        "{}",
        refused.stderr_tail(4096)
    );

    let insecure = console(&dir, "insecure", &[], &["--insecure-no-auth"]);
    let addr = address(&insecure).await;
    assert!(addr.ip().is_loopback());
    assert!(insecure
        .stderr()
        .contains("WARNING: weir console runs with --insecure-no-auth"));
    let page = client()
        .get(format!("http://{addr}/"))
        .send()
        .await
        .expect("answers");
    assert_eq!(page.status(), StatusCode::OK, "everyone may look");
    // Even so, a form post from elsewhere is refused: it cannot know the CSRF token.
    let post = client()
        .post(format!("http://{addr}/dlq/customers.dlq/replay"))
        .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
        .body("kind=")
        .send()
        .await
        .unwrap();
    assert_eq!(post.status(), StatusCode::FORBIDDEN);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_sessions_and_csrf_decide_who_may_look_and_who_may_act() {
    let dir = TestDir::new("weir-console-auth");
    let process = console(
        &dir,
        "console",
        &[
            ("WEIR_CONSOLE__VIEWER_TOKEN", VIEWER),
            ("WEIR_CONSOLE__OPERATOR_TOKEN", OPERATOR),
        ],
        &[],
    );
    let addr = address(&process).await;
    let base = format!("http://{addr}");
    let http = client();
    let replay = format!("{base}/dlq/customers.dlq/replay");
    let form = |request: reqwest::RequestBuilder, body: &str| {
        request
            .header(CONTENT_TYPE, "application/x-www-form-urlencoded")
            .body(body.to_owned())
    };

    // No token: 401 and the login page, for pages and actions alike.
    for request in [http.get(&base), form(http.post(&replay), "")] {
        let response = request.send().await.unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert!(response.text().await.unwrap().contains("action=\"/login\""));
    }
    let wrong = http
        .get(&base)
        .header(AUTHORIZATION, "Bearer not-a-token")
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNAUTHORIZED);
    let bad_login = form(http.post(format!("{base}/login")), "token=guess")
        .send()
        .await
        .unwrap();
    assert_eq!(bad_login.status(), StatusCode::UNAUTHORIZED);
    assert!(bad_login.headers().get(SET_COOKIE).is_none());

    // A viewer's bearer token reads, and cannot act.
    let viewer = format!("Bearer {VIEWER}");
    let page = http
        .get(&base)
        .header(AUTHORIZATION, &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let headers = page.headers().clone();
    assert!(headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("default-src 'self'"));
    assert!(page.text().await.unwrap().contains("Processes"));
    let acted = form(http.post(&replay).header(AUTHORIZATION, &viewer), "")
        .send()
        .await
        .unwrap();
    assert_eq!(acted.status(), StatusCode::FORBIDDEN);
    assert!(acted.text().await.unwrap().contains("A viewer cannot act"));
    // The Controls page reads without a broker too; a viewer cannot pause.
    let controls = format!("{base}/controls");
    let page = http
        .get(&controls)
        .header(AUTHORIZATION, &viewer)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    assert!(page.text().await.unwrap().contains("Commands in force"));
    let paused = form(
        http.post(&controls).header(AUTHORIZATION, &viewer),
        "action=pause&topic=customer-events",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(paused.status(), StatusCode::FORBIDDEN);

    // An operator's session: an HttpOnly, SameSite=Strict cookie; its POSTs need its CSRF
    // token, and with it they reach input validation.
    let login = form(
        http.post(format!("{base}/login")),
        &format!("token={OPERATOR}"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(login.status(), StatusCode::SEE_OTHER);
    assert_eq!(login.headers()[LOCATION], "/");
    let set_cookie = login.headers()[SET_COOKIE].to_str().unwrap().to_owned();
    assert!(
        set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().unwrap().to_owned();
    let page = http
        .get(&base)
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let csrf = csrf_of(&page.text().await.unwrap());
    for body in ["kind=".to_owned(), "csrf=forged&kind=".to_owned()] {
        let refused = form(http.post(&replay).header(COOKIE, &cookie), &body)
            .send()
            .await
            .unwrap();
        assert_eq!(refused.status(), StatusCode::FORBIDDEN, "{body}");
        assert!(refused.text().await.unwrap().contains("CSRF"));
    }
    // A control POST needs the CSRF token too; with it, what no report shows is refused
    // before anything is published (there is no broker to publish to).
    let pause = form(
        http.post(&controls).header(COOKIE, &cookie),
        "action=pause&topic=customer-events",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(pause.status(), StatusCode::FORBIDDEN);
    for (body, status, says) in [
        (
            "action=pause&topic=no-such-topic",
            StatusCode::NOT_FOUND,
            "no-such-topic",
        ),
        (
            "action=quiet&process=nobody-1-deadbeef",
            StatusCode::NOT_FOUND,
            "No process nobody-1-deadbeef",
        ),
        ("action=reboot", StatusCode::BAD_REQUEST, "`action` must be"),
    ] {
        let refused = form(
            http.post(&controls).header(COOKIE, &cookie),
            &format!("csrf={csrf}&{body}"),
        )
        .send()
        .await
        .unwrap();
        assert_eq!(refused.status(), status, "{body}");
        let text = refused.text().await.unwrap();
        assert!(
            text.contains(says) && text.contains("Nothing was changed"),
            "{text}"
        );
    }
    let malformed = form(
        http.post(&replay).header(COOKIE, &cookie),
        &format!("csrf={csrf}&from=yesterday"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(malformed.status(), StatusCode::BAD_REQUEST);
    let text = malformed.text().await.unwrap();
    assert!(
        text.contains("`from` must be an offset or an RFC 3339 time")
            && text.contains("Nothing was changed"),
        "{text}"
    );
    let backwards = form(
        http.post(&replay)
            .header(AUTHORIZATION, format!("Bearer {OPERATOR}")),
        "from=9&to=3",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(
        backwards.status(),
        StatusCode::BAD_REQUEST,
        "a bearer needs no CSRF token"
    );
    let unknown_field = form(
        http.post(&replay)
            .header(AUTHORIZATION, format!("Bearer {OPERATOR}")),
        "colour=red",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(unknown_field.status(), StatusCode::BAD_REQUEST);
    let confirm_without_id = form(
        http.post(format!("{replay}/confirm"))
            .header(AUTHORIZATION, format!("Bearer {OPERATOR}")),
        "until=0:5",
    )
    .send()
    .await
    .unwrap();
    assert_eq!(confirm_without_id.status(), StatusCode::BAD_REQUEST);

    // Unknown things are 404s that say what is unknown.
    let unknown = http
        .get(format!("{base}/processes/nobody-1-deadbeef"))
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
    assert!(unknown
        .text()
        .await
        .unwrap()
        .contains("No process nobody-1-deadbeef"));

    // Signing out needs the CSRF token too, and ends the session.
    let out = form(
        http.post(format!("{base}/logout")).header(COOKIE, &cookie),
        &format!("csrf={csrf}"),
    )
    .send()
    .await
    .unwrap();
    assert_eq!(out.status(), StatusCode::SEE_OTHER);
    let after = http
        .get(&base)
        .header(COOKIE, &cookie)
        .send()
        .await
        .unwrap();
    assert_eq!(after.status(), StatusCode::UNAUTHORIZED);

    // Assets need no token, and come from the binary.
    let css = http
        .get(format!("{base}/assets/console.css"))
        .send()
        .await
        .unwrap();
    assert_eq!(css.status(), StatusCode::OK);
    assert!(css.text().await.unwrap().contains(".grid"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_parked_page_lists_parked_records_and_the_outbox_oldest_first() {
    let db = support::db::TestDb::migrated().await;
    for (offset, key, minutes) in [(7_i64, "k-new", 1), (3, "k-old", 30)] {
        sqlx::query(
            "INSERT INTO weir_parked (group_id, handler, topic, partition, \"offset\", key, \
             attempts, durable_attempts, last_error, parked_at) \
             VALUES ('shop', 'reserve_stock', 'orders', 0, $1, $2, 3, 2, 'payment service down', \
                     now() - make_interval(mins => $3))",
        )
        .bind(offset)
        .bind(key.as_bytes())
        .bind(minutes)
        .execute(db.pool())
        .await
        .expect("a parked row");
    }
    sqlx::query(
        "INSERT INTO weir_outbox (id, topic, key, event_type, payload, attempts) \
         VALUES (gen_random_uuid(), 'orders', 'o-1', 'order.placed', '\\x7b7d', 4)",
    )
    .execute(db.pool())
    .await
    .expect("an outbox row");

    let dir = TestDir::new("weir-console-parked");
    let url = db.url();
    let process = console(
        &dir,
        "console",
        &[
            ("WEIR_CONSOLE__VIEWER_TOKEN", VIEWER),
            ("WEIR_DATABASE__URL", url.as_str()),
        ],
        &[],
    );
    let addr = address(&process).await;
    let page = client()
        .get(format!("http://{addr}/parked"))
        .header(AUTHORIZATION, format!("Bearer {VIEWER}"))
        .send()
        .await
        .unwrap();
    assert_eq!(page.status(), StatusCode::OK);
    let text = page.text().await.unwrap();
    assert!(text.contains("data-count=\"2\""), "{text}");
    let (old, new) = (
        text.find("k-old").expect("k-old"),
        text.find("k-new").expect("k-new"),
    );
    assert!(old < new, "the oldest first");
    assert!(
        text.contains("3 + 2") && text.contains("30 min") && text.contains("payment service down")
    );
    assert!(
        text.contains("order.placed") && text.contains("<td class=\"num\">4</td>"),
        "{text}"
    );
    db.close().await;
}
