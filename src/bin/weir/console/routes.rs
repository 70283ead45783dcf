//! Routes: the service's route table (topic, event type, handler, processing order, retry
//! policy), each event type linked to its contract in the AsyncAPI document, which the console
//! serves too. Both come from the router this binary runs (built, never run), and the
//! configuration the console was given: the same `[consumer]` and `[retry]` as the replicas'.

use super::auth::Caller;
use super::html::{esc, page, url};
use super::Console;
use crate::config::Settings;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::Extension;
use std::fmt::Write as _;
use std::sync::Arc;

/// One route: a handler of some event types of one topic.
struct Route {
    topic: String,
    event_types: Vec<String>,
    handler: String,
}

/// What the Routes page shows.
pub(crate) struct RouteTable {
    routes: Vec<Route>,
    group: String,
    order: String,
    retry: String,
    document: String,
}

impl RouteTable {
    /// The reference service's routes, from its AsyncAPI document.
    pub(crate) fn of(settings: &Settings) -> anyhow::Result<Self> {
        let document = crate::schema::document(settings)?;
        let doc = document.as_value();
        let address = |channel_ref: &str| {
            let id = channel_ref.rsplit('/').next().unwrap_or_default();
            doc["channels"][id]["address"]
                .as_str()
                .unwrap_or(id)
                .to_owned()
        };
        let mut routes: Vec<Route> = doc["operations"]
            .as_object()
            .into_iter()
            .flatten()
            .filter(|(_, op)| op["action"] == "receive")
            .map(|(_, op)| Route {
                topic: address(op["channel"]["$ref"].as_str().unwrap_or_default()),
                event_types: op["messages"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m["$ref"].as_str())
                    .map(|r| r.rsplit('/').next().unwrap_or_default().to_owned())
                    .collect(),
                handler: op["title"].as_str().unwrap_or_default().to_owned(),
            })
            .collect();
        routes.sort_by(|a, b| (&a.topic, &a.handler).cmp(&(&b.topic, &b.handler)));
        let r = &settings.retry;
        Ok(Self {
            routes,
            group: settings.consumer.group_id.clone(),
            order: format!("{:?}", settings.consumer.order).to_lowercase(),
            retry: format!(
                "{} attempts, {} first, ×{} up to {}{}",
                r.maximum_attempts,
                humantime::format_duration(r.initial_interval),
                r.backoff_coefficient,
                humantime::format_duration(r.maximum_interval),
                if r.durable.is_some() {
                    ", then parked (durable)"
                } else {
                    ", then dead-lettered"
                }
            ),
            document: document.to_json()?,
        })
    }
}

/// The route table.
pub(crate) async fn routes(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
) -> Html<String> {
    let t = &console.routes;
    let mut body = format!(
        "<p>Consumer group <code>{}</code> · processing order <b>{}</b> · retry policy: {} \
         (the service's defaults; a route's own options are in its code). \
         <a href=\"/asyncapi.json\">AsyncAPI document</a></p>\
         <table id=\"routes\"><thead><tr><th>Topic</th><th>Event types (contract)</th>\
         <th>Handler</th><th>Dead letters</th></tr></thead><tbody>",
        esc(&t.group),
        esc(&t.order),
        esc(&t.retry),
    );
    for r in &t.routes {
        let contracts: Vec<String> = r
            .event_types
            .iter()
            .map(|e| {
                format!(
                    "<a href=\"/asyncapi.json#/components/messages/{}\"><code>{}</code></a>",
                    url(e),
                    esc(e)
                )
            })
            .collect();
        let dlq = console.dead_letter.topic_for(&r.topic);
        let _ = write!(
            body,
            "<tr data-handler=\"{h}\"><td>{t}</td><td>{c}</td><td><code>{h}</code></td>\
             <td><a href=\"/dlq/{du}\">{d}</a></td></tr>",
            h = esc(&r.handler),
            t = esc(&r.topic),
            c = contracts.join(", "),
            du = url(&dlq),
            d = esc(&dlq),
        );
    }
    body.push_str("</tbody></table>");
    page("Routes", Some(&caller), None, &body)
}

/// The AsyncAPI document the route table links into.
pub(crate) async fn asyncapi(State(console): State<Arc<Console>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        console.routes.document.clone(),
    )
}
