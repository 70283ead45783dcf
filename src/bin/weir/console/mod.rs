//! `weir console`: the fleet's web console.
//!
//! An application like any other: it reads Kafka (the status topic, the commands topic, the
//! dead-letter topics) and writes only replays and fleet commands, never talking to a replica
//! directly, so it works the same with one replica or fifty. Pages are rendered on the server; the one stylesheet is inside the binary.
//!
//! - `fleet`: the fleet in memory, folded from the status reports; `feed` follows the topic.
//! - `pages`: Fleet, one process, Lag and throughput, Errors, the login page.
//! - `dead_letters`: the explorer, a record's view, and the replay (dry run, then confirm).
//! - `controls`: the Controls page: pause, resume, quiet and unquiet through the commands
//!   topic, the commands in force, and each command's acknowledgements from the reports;
//!   `commands` folds the commands topic (`feed` follows it too).
//! - `routes`: the route table (`route_table`, read at start) and the AsyncAPI document;
//!   `parked`: parked records and the outbox, with a database.
//! - `auth`: tokens, sessions, CSRF; `html`: escaping, the page frame, the login form, SVG
//!   charts; `state`: what the handlers share. This file wires them: the router, the caller
//!   check in front of every page, login and logout. (No file imports this one, nor one that
//!   imports it back: `scripts/import-graph.py` checks.)

mod auth;
mod commands;
mod controls;
mod dead_letters;
mod feed;
mod fleet;
mod html;
mod pages;
mod parked;
mod route_table;
mod routes;
mod state;

use crate::config::Settings;
use anyhow::Context as _;
use auth::{Auth, Caller};
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use state::Console;
use std::sync::{Arc, Mutex};
use tokio_util::sync::CancellationToken;

#[derive(Debug, clap::Args)]
pub(crate) struct ConsoleArgs {
    /// Where to listen, overriding `[console] listen` (default 127.0.0.1:8900).
    #[arg(long)]
    listen: Option<std::net::SocketAddr>,
    /// Start without tokens: anyone who reaches the console may look and act. For a laptop,
    /// never for a cluster.
    #[arg(long)]
    insecure_no_auth: bool,
}

/// Runs the console until `stop`.
pub(crate) async fn run(
    settings: Settings,
    args: ConsoleArgs,
    stop: CancellationToken,
) -> anyhow::Result<()> {
    let c = &settings.console;
    if c.viewer_token.is_none() && c.operator_token.is_none() {
        anyhow::ensure!(
            args.insecure_no_auth,
            "the console needs a token: set [console] viewer_token and operator_token \
             (WEIR_CONSOLE__VIEWER_TOKEN, WEIR_CONSOLE__OPERATOR_TOKEN), or pass \
             --insecure-no-auth to let anyone who reaches it look and act"
        );
        eprintln!(
            "WARNING: weir console runs with --insecure-no-auth: anyone who can reach it can \
             look at the fleet and replay dead letters."
        );
        tracing::warn!("The console runs without authentication (--insecure-no-auth).");
    } else if args.insecure_no_auth {
        tracing::warn!("--insecure-no-auth is ignored: tokens are configured.");
    }
    let insecure = args.insecure_no_auth && c.viewer_token.is_none() && c.operator_token.is_none();
    let bus = weir::KafkaBus::new(settings.kafka.clone()).context("the commands publisher")?;
    let console = Arc::new(Console {
        kafka: settings.kafka.clone(),
        status_topic: settings.control.status_topic.clone(),
        dead_letter: settings.consumer.dead_letter.clone(),
        fleet: Arc::default(),
        commands_topic: settings.control.commands_topic.clone(),
        commands: Arc::default(),
        publisher: weir::CommandPublisher::new(&bus, settings.control.commands_topic.clone()),
        auth: Auth::new(c.viewer_token.clone(), c.operator_token.clone(), insecure),
        running: Mutex::default(),
        routes: route_table::RouteTable::of(&settings)?,
        database: match settings.database.url.as_deref() {
            Some(url) => Some(
                sqlx::postgres::PgPoolOptions::new()
                    .max_connections(2)
                    .connect_lazy(url)
                    .context("[database] url")?,
            ),
            None => None,
        },
    });
    let listen = args.listen.unwrap_or(c.listen);
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let console_addr = listener.local_addr()?;
    tracing::info!(
        %console_addr,
        status_topic = console.status_topic,
        "Console listening."
    );
    let fleet = console.fleet.clone();
    let feed = tokio::spawn(feed::follow(
        console.kafka.clone(),
        console.status_topic.clone(),
        move |key, value| {
            fleet
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .apply(key, value)
        },
        stop.clone(),
    ));
    let commands = console.commands.clone();
    let commands = tokio::spawn(feed::follow(
        console.kafka.clone(),
        console.commands_topic.clone(),
        move |key, value| {
            commands
                .write()
                .unwrap_or_else(|e| e.into_inner())
                .apply(key, value)
        },
        stop.clone(),
    ));
    let shutdown = stop.clone();
    axum::serve(listener, router(console))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    stop.cancel();
    commands.await.context("the commands feed panicked")??;
    feed.await.context("the status feed panicked")?
}

/// The console's routes: open ones (login, assets, probe), and the rest behind the caller check.
fn router(console: Arc<Console>) -> Router {
    let pages = Router::new()
        .route("/", get(pages::fleet))
        .route("/processes/{id}", get(pages::process))
        .route("/lag", get(pages::lag))
        .route("/errors", get(pages::errors))
        .route("/parked", get(parked::parked))
        .route("/routes", get(routes::routes))
        .route("/asyncapi.json", get(routes::asyncapi))
        .route("/dlq", get(dead_letters::topics))
        .route("/dlq/{topic}", get(dead_letters::explore))
        .route(
            "/dlq/{topic}/{partition}/{offset}",
            get(dead_letters::record),
        )
        .route("/dlq/{topic}/replay", post(dead_letters::dry_run))
        .route("/dlq/{topic}/replay/confirm", post(dead_letters::confirm))
        .route("/controls", get(controls::page).post(controls::act))
        .route("/controls/commands/{id}", get(controls::command))
        .route("/logout", post(logout))
        .route_layer(axum::middleware::from_fn_with_state(
            console.clone(),
            require_caller,
        ));
    Router::new()
        .route("/login", get(login_form).post(login))
        .route("/healthz", get(|| async { "ok" }))
        .route(
            "/assets/console.css",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
                    html::CSS,
                )
            }),
        )
        .merge(pages)
        .fallback(|| async { html::Problem::not_found("No such page.") })
        .layer(axum::middleware::map_response(security_headers))
        .with_state(console)
}

/// Headers every answer carries: nothing from elsewhere may run or be framed.
async fn security_headers(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_SECURITY_POLICY,
        header::HeaderValue::from_static(
            "default-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; \
             form-action 'self'; frame-ancestors 'none'",
        ),
    );
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        header::HeaderValue::from_static("nosniff"),
    );
    headers.insert(
        header::REFERRER_POLICY,
        header::HeaderValue::from_static("no-referrer"),
    );
    headers.insert(
        header::CACHE_CONTROL,
        header::HeaderValue::from_static("no-store"),
    );
    response
}

/// Middleware: finds the caller, or answers 401 with the login page.
async fn require_caller(
    State(console): State<Arc<Console>>,
    mut request: Request,
    next: Next,
) -> Response {
    match console.auth.caller(request.headers()) {
        Some(caller) => {
            request.extensions_mut().insert(caller);
            next.run(request).await
        }
        None => (
            StatusCode::UNAUTHORIZED,
            html::login_page("Sign in with a viewer or operator token."),
        )
            .into_response(),
    }
}

async fn login_form(State(console): State<Arc<Console>>) -> Response {
    if console.auth.insecure() {
        return Redirect::to("/").into_response();
    }
    html::login_page("Sign in with a viewer or operator token.").into_response()
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
}

async fn login(State(console): State<Arc<Console>>, Form(form): Form<LoginForm>) -> Response {
    match console.auth.role_of(form.token.trim()) {
        Some(role) => {
            let id = console.auth.open_session(role);
            tracing::info!(role = role.name(), "Console sign-in.");
            (
                StatusCode::SEE_OTHER,
                [
                    (header::SET_COOKIE, auth::session_cookie(&id)),
                    (header::LOCATION, "/".to_owned()),
                ],
            )
                .into_response()
        }
        None => (
            StatusCode::UNAUTHORIZED,
            html::login_page("That token is not valid."),
        )
            .into_response(),
    }
}

#[derive(serde::Deserialize)]
struct CsrfForm {
    csrf: Option<String>,
}

async fn logout(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    // Signing out is an action of its own session: a viewer may, with its CSRF token.
    if caller.csrf.is_some() && caller.csrf != form.csrf {
        return html::Problem::new(
            StatusCode::FORBIDDEN,
            "The form's CSRF token is missing or wrong.",
        )
        .into_response();
    }
    console.auth.close_session(&headers);
    (
        StatusCode::SEE_OTHER,
        [
            (header::SET_COOKIE, auth::expired_cookie()),
            (header::LOCATION, "/login".to_owned()),
        ],
    )
        .into_response()
}
