//! Routes: the service's route table (topic, event type, handler, processing order, retry
//! policy), each event type linked to its contract in the AsyncAPI document, which the console
//! serves too. Both come from the router this binary runs (built, never run), and the
//! configuration the console was given: the same `[consumer]` and `[retry]` as the replicas'.

use super::auth::Caller;
use super::html::{esc, page, url};
use super::state::Console;
use axum::extract::State;
use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::Extension;
use std::fmt::Write as _;
use std::sync::Arc;

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
