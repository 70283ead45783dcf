//! Parked records and the outbox (with a database): the oldest first, with their age and
//! attempts, so a person sees what durable retries are holding and what the relay has not
//! published yet. Read-only: the console changes nothing in the database.

use super::auth::Caller;
use super::html::{esc, page, trim_number, Problem};
use super::state::Console;
use axum::extract::State;
use axum::response::Html;
use axum::Extension;
use sqlx::Row as _;
use std::fmt::Write as _;
use std::sync::Arc;

/// Rows listed per table at most.
const LISTED: i64 = 100;

fn seconds(s: f64) -> String {
    if s < 120.0 {
        format!("{} s", trim_number(s.round()))
    } else if s < 7_200.0 {
        format!("{} min", trim_number((s / 60.0).round()))
    } else {
        format!("{} h", trim_number((s / 3600.0).round()))
    }
}

async fn table_exists(pool: &sqlx::PgPool, name: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(name)
        .fetch_one(pool)
        .await
}

/// The page.
pub(crate) async fn parked(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
) -> Result<Html<String>, Problem> {
    let title = "Parked and outbox";
    let Some(pool) = &console.database else {
        return Ok(page(
            title,
            Some(&caller),
            None,
            "<p class=\"muted\">No database is configured (<code>[database] url</code>, \
             <code>WEIR_DATABASE__URL</code>): durable retries and the outbox live there.</p>",
        ));
    };
    let db =
        |e: sqlx::Error| Problem::internal(&anyhow::Error::new(e).context("reading the database"));
    let mut body = String::from("<h2>Parked records (durable retries)</h2>");
    if table_exists(pool, "weir_parked").await.map_err(db)? {
        let rows = sqlx::query(
            "SELECT group_id, handler, topic, partition, \"offset\", key, attempts, durable_attempts, \
                    last_error, EXTRACT(EPOCH FROM now() - parked_at)::float8 AS age, \
                    GREATEST(EXTRACT(EPOCH FROM next_attempt_at - now()), 0)::float8 AS next_in, \
                    count(*) OVER () AS total \
             FROM weir_parked ORDER BY parked_at, seq LIMIT $1",
        )
        .bind(LISTED)
        .fetch_all(pool)
        .await
        .map_err(db)?;
        let total: i64 = rows
            .first()
            .map_or(Ok(0), |r| r.try_get("total"))
            .map_err(db)?;
        let _ = write!(
            body,
            "<p id=\"parked-total\" data-count=\"{total}\">{total} parked records, oldest first.</p>\
             <table id=\"parked\"><thead><tr><th>Age</th><th>Group</th><th>Handler</th><th>Topic/partition/offset</th>\
             <th>Key</th><th>Attempts (in place + durable)</th><th>Next attempt in</th><th>Last error</th></tr></thead><tbody>"
        );
        for r in &rows {
            let key: Option<Vec<u8>> = r.try_get("key").map_err(db)?;
            let attempts: i32 = r.try_get("attempts").map_err(db)?;
            let durable: i32 = r.try_get("durable_attempts").map_err(db)?;
            let _ =
                write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}/{}/{}</td><td><code>{}</code></td>\
                 <td class=\"num\">{attempts} + {durable}</td><td>{}</td><td>{}</td></tr>",
                seconds(r.try_get("age").map_err(db)?),
                esc(&r.try_get::<String, _>("group_id").map_err(db)?),
                esc(&r.try_get::<String, _>("handler").map_err(db)?),
                esc(&r.try_get::<String, _>("topic").map_err(db)?),
                r.try_get::<i32, _>("partition").map_err(db)?,
                r.try_get::<i64, _>("offset").map_err(db)?,
                esc(&key.map(|k| String::from_utf8_lossy(&k).into_owned()).unwrap_or_default()),
                seconds(r.try_get("next_in").map_err(db)?),
                esc(&r.try_get::<Option<String>, _>("last_error").map_err(db)?.unwrap_or_default()),
            );
        }
        body.push_str("</tbody></table>");
    } else {
        body.push_str("<p class=\"muted\">No <code>weir_parked</code> table: run <code>weir migrate</code>.</p>");
    }
    body.push_str("<h2>Outbox (not yet published)</h2>");
    if table_exists(pool, "weir_outbox").await.map_err(db)? {
        let rows = sqlx::query(
            "SELECT id::text AS id, topic, key, event_type, attempts, last_error, \
                    EXTRACT(EPOCH FROM now() - created_at)::float8 AS age, \
                    count(*) OVER () AS total \
             FROM weir_outbox WHERE published_at IS NULL ORDER BY seq LIMIT $1",
        )
        .bind(LISTED)
        .fetch_all(pool)
        .await
        .map_err(db)?;
        let total: i64 = rows
            .first()
            .map_or(Ok(0), |r| r.try_get("total"))
            .map_err(db)?;
        let _ = write!(
            body,
            "<p id=\"outbox-total\" data-count=\"{total}\">{total} rows waiting for the relay, oldest first.</p>\
             <table id=\"outbox\"><thead><tr><th>Age</th><th>Event id</th><th>Topic</th><th>Key</th>\
             <th>Event type</th><th>Attempts</th><th>Last error</th></tr></thead><tbody>"
        );
        for r in &rows {
            let _ = write!(
                body,
                "<tr><td>{}</td><td><code>{}</code></td><td>{}</td><td><code>{}</code></td><td>{}</td>\
                 <td class=\"num\">{}</td><td>{}</td></tr>",
                seconds(r.try_get("age").map_err(db)?),
                esc(&r.try_get::<String, _>("id").map_err(db)?),
                esc(&r.try_get::<String, _>("topic").map_err(db)?),
                esc(&r.try_get::<String, _>("key").map_err(db)?),
                esc(&r.try_get::<String, _>("event_type").map_err(db)?),
                r.try_get::<i32, _>("attempts").map_err(db)?,
                esc(&r.try_get::<Option<String>, _>("last_error").map_err(db)?.unwrap_or_default()),
            );
        }
        body.push_str("</tbody></table>");
    } else {
        body.push_str("<p class=\"muted\">No <code>weir_outbox</code> table: run <code>weir migrate</code>.</p>");
    }
    Ok(page(title, Some(&caller), None, &body))
}
