//! Dead letters: the dead-letter topics, an explorer of each (filters by kind, event type, key
//! and time), one record's headers and event, and the replay.
//!
//! A replay runs `weir dlq replay`'s engine ([`crate::dlq::execute`]): first a dry run, which
//! counts what would be republished and where and pins each partition's end; then the
//! operator confirms, and the replay runs under the id the dry run drew, over the pinned range.
//! Its progress is committed under that id, so confirming again (a reload, a second click)
//! resumes after it and republishes nothing; dead letters written since the dry run (a replayed
//! record that failed again, say) are outside the pinned range and wait for the next replay.

use super::auth::{Caller, Refusal};
use super::html::{csrf_field, esc, page, url, Problem};
use super::state::Console;
use crate::dlq::{self, ReplayArgs};
use crate::kafka_read::{format_time, Position, ReadRecord};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::Html;
use axum::{Extension, Form};
use rdkafka::Offset;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use weir::dead_letter_headers as header;

/// Records the explorer lists at most (the newest that match; the counts cover them all).
const LISTED: usize = 200;
/// Records the explorer searches per partition at most: the newest.
const SEARCHED: i64 = 10_000;
/// Bytes of a raw value shown.
const RAW_SHOWN: usize = 4096;

/// The explorer's and the replay's filters, as a form or query gives them.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Filters {
    #[serde(default)]
    kind: String,
    #[serde(default, rename = "type")]
    event_type: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    from: String,
    #[serde(default)]
    to: String,
}

/// Filters, checked.
struct Parsed {
    kind: Option<String>,
    event_type: Option<String>,
    key: Option<String>,
    from: Option<Position>,
    to: Option<Position>,
}

impl Filters {
    fn parse(&self) -> Result<Parsed, Problem> {
        let text = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
        let position = |name: &str, s: &str| -> Result<Option<Position>, Problem> {
            text(s)
                .map(|s| {
                    s.parse::<Position>().map_err(|e| {
                        Problem::bad_request(format!(
                            "`{name}` must be an offset or an RFC 3339 time: `{s}` is {e}"
                        ))
                    })
                })
                .transpose()
        };
        let parsed = Parsed {
            kind: text(&self.kind),
            event_type: text(&self.event_type),
            key: text(&self.key),
            from: position("from", &self.from)?,
            to: position("to", &self.to)?,
        };
        for (name, value) in [
            ("kind", &parsed.kind),
            ("type", &parsed.event_type),
            ("key", &parsed.key),
        ] {
            if value.as_deref().is_some_and(|v| v.contains(',')) {
                return Err(Problem::bad_request(format!(
                    "`{name}` cannot contain a comma"
                )));
            }
        }
        match (parsed.from, parsed.to) {
            (Some(Position::Offset(f)), Some(Position::Offset(t))) if f > t => Err(
                Problem::bad_request(format!("`from` ({f}) is after `to` ({t})")),
            ),
            (Some(Position::Time(f)), Some(Position::Time(t))) if f > t => Err(
                Problem::bad_request(format!("`from` ({f}) is after `to` ({t})")),
            ),
            _ => Ok(parsed),
        }
    }

    /// The filters as links and hidden fields carry them.
    fn query(&self) -> String {
        format!(
            "kind={}&type={}&key={}&from={}&to={}",
            url(&self.kind),
            url(&self.event_type),
            url(&self.key),
            url(&self.from),
            url(&self.to)
        )
    }

    fn hidden_fields(&self) -> String {
        [
            ("kind", &self.kind),
            ("type", &self.event_type),
            ("key", &self.key),
            ("from", &self.from),
            ("to", &self.to),
        ]
        .iter()
        .map(|(k, v)| format!("<input type=\"hidden\" name=\"{k}\" value=\"{}\">", esc(v)))
        .collect()
    }
}

impl Parsed {
    fn matches(&self, r: &ReadRecord) -> bool {
        let header_is = |name: &str, want: &Option<String>| {
            want.as_deref().is_none_or(|w| r.header(name) == Some(w))
        };
        header_is(header::ERROR_KIND, &self.kind)
            && self
                .event_type
                .as_deref()
                .is_none_or(|w| dlq::event_type(r).as_deref() == Some(w))
            && self
                .key
                .as_deref()
                .is_none_or(|w| r.key.as_deref().map(String::from_utf8_lossy).as_deref() == Some(w))
            && self
                .from
                .is_none_or(|f| f.at_or_after(r.offset, r.timestamp_ms))
            && self
                .to
                .is_none_or(|t| t.at_or_before(r.offset, r.timestamp_ms))
    }

    /// `weir dlq replay --filter` syntax.
    fn replay_filter(&self) -> Option<String> {
        let parts: Vec<String> = [
            ("kind", &self.kind),
            ("type", &self.event_type),
            ("key", &self.key),
        ]
        .iter()
        .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={v}")))
        .collect();
        (!parts.is_empty()).then(|| parts.join(","))
    }
}

impl Console {
    /// The dead-letter topics of the cluster: every topic with the configured suffix, and the
    /// topics configured by name.
    fn dead_letter_topics(&self) -> Result<BTreeMap<String, Vec<i32>>, Problem> {
        let client = dlq::reader_client(&self.kafka).map_err(|e| Problem::internal(&e))?;
        let all = client.all_topics().map_err(|e| Problem::internal(&e))?;
        let named: Vec<&String> = self.dead_letter.topics.values().collect();
        Ok(all
            .into_iter()
            .filter(|(t, _)| t.ends_with(&self.dead_letter.suffix) || named.contains(&t))
            .collect())
    }

    /// `topic` if it is a dead-letter topic; a 404 naming it otherwise.
    fn known_dead_letter_topic(&self, topic: &str) -> Result<Vec<i32>, Problem> {
        self.dead_letter_topics()?.remove(topic).ok_or_else(|| {
            Problem::not_found(format!("There is no dead-letter topic named {topic}."))
        })
    }
}

/// The newest [`SEARCHED`] records of each partition of `topic` (a page must not read a
/// topic of millions), and whether older ones were left out.
async fn read_newest(
    console: &Console,
    topic: &str,
    partitions: &[i32],
) -> Result<(Vec<ReadRecord>, bool), Problem> {
    let client = dlq::reader_client(&console.kafka).map_err(|e| Problem::internal(&e))?;
    let mut starts: BTreeMap<i32, Offset> = BTreeMap::new();
    let mut capped = false;
    for p in partitions {
        let (low, high) = client
            .watermarks(topic, *p)
            .map_err(|e| Problem::internal(&e))?;
        let start = low.max(high - SEARCHED);
        capped |= start > low;
        starts.insert(*p, Offset::Offset(start));
    }
    let mut reader = client
        .reader(topic, &starts)
        .map_err(|e| Problem::internal(&e))?;
    let mut records = Vec::new();
    while let Some(r) = reader.next().await.map_err(|e| Problem::internal(&e))? {
        records.push(r);
    }
    Ok((records, capped))
}

/// The dead-letter topics with their record counts (from the partitions' offsets).
pub(crate) async fn topics(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
) -> Result<Html<String>, Problem> {
    let topics = console.dead_letter_topics()?;
    let client = dlq::reader_client(&console.kafka).map_err(|e| Problem::internal(&e))?;
    let mut body = String::from(
        "<table id=\"dead-letter-topics\"><thead><tr><th>Topic</th><th>Partitions</th>\
         <th>Records (by offsets)</th></tr></thead><tbody>",
    );
    if topics.is_empty() {
        body.push_str("<tr><td colspan=\"3\" class=\"muted\">No dead-letter topic yet.</td></tr>");
    }
    for (topic, partitions) in &topics {
        let mut records = 0;
        for p in partitions {
            let (low, high) = client
                .watermarks(topic, *p)
                .map_err(|e| Problem::internal(&e))?;
            records += high - low;
        }
        let _ = write!(
            body,
            "<tr><td><a href=\"/dlq/{}\">{}</a></td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            url(topic),
            esc(topic),
            partitions.len(),
            records
        );
    }
    body.push_str("</tbody></table>");
    Ok(page("Dead letters", Some(&caller), None, &body))
}

/// One dead-letter topic: counts by kind, the newest matching records, the replay form.
pub(crate) async fn explore(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    Path(topic): Path<String>,
    Query(filters): Query<Filters>,
) -> Result<Html<String>, Problem> {
    let parsed = filters.parse()?;
    let partitions = console.known_dead_letter_topic(&topic)?;
    let (records, capped) = read_newest(&console, &topic, &partitions).await?;
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut matching: Vec<&ReadRecord> = Vec::new();
    for r in &records {
        if parsed.matches(r) {
            *by_kind
                .entry(r.header(header::ERROR_KIND).unwrap_or("-").to_owned())
                .or_default() += 1;
            matching.push(r);
        }
    }
    matching.sort_by_key(|r| std::cmp::Reverse((r.timestamp_ms, r.partition, r.offset)));
    let field = |name: &str, label: &str, value: &str, hint: &str| {
        format!(
            "<label>{label}<input name=\"{name}\" value=\"{}\" placeholder=\"{hint}\"></label>",
            esc(value)
        )
    };
    let mut body =
        format!(
        "<form method=\"get\" class=\"filters\">{}{}{}{}{}<button type=\"submit\">Filter</button>\
         <a href=\"/dlq/{}\">clear</a></form>",
        field("kind", "Kind", &filters.kind, "retries_exhausted"),
        field("type", "Event type", &filters.event_type, "customer.created"),
        field("key", "Key", &filters.key, ""),
        field("from", "From (offset or time)", &filters.from, "2026-12-07T10:00:00Z"),
        field("to", "To (offset or time)", &filters.to, ""),
        url(&topic),
    );
    let _ = write!(
        body,
        "<p id=\"matching\" data-count=\"{}\">{} of {} dead letters match.",
        matching.len(),
        matching.len(),
        records.len()
    );
    for (kind, n) in &by_kind {
        let _ = write!(body, " <span class=\"muted\">{}: {n}</span>", esc(kind));
    }
    if capped {
        let _ = write!(
            body,
            " <span class=\"muted\">(the newest {SEARCHED} of each partition are searched; a \
             replay covers the whole range)</span>"
        );
    }
    body.push_str("</p>");
    if caller.role == super::auth::Role::Operator {
        let _ = write!(
            body,
            "<form method=\"post\" action=\"/dlq/{}/replay\" id=\"replay\">{}{}\
             <button type=\"submit\">Replay the matching dead letters (dry run first)</button></form>",
            url(&topic),
            csrf_field(&caller),
            filters.hidden_fields()
        );
    }
    body.push_str(
        "<table id=\"dead-letters\"><thead><tr><th>Partition/offset</th><th>Time</th><th>Key</th>\
         <th>Event type</th><th>Kind</th><th>Handler</th><th>Reason</th><th>Replays</th></tr></thead><tbody>",
    );
    for r in matching.iter().take(LISTED) {
        let _ = write!(
            body,
            "<tr><td><a href=\"/dlq/{t}/{p}/{o}\">{p}/{o}</a></td><td>{time}</td><td><code>{key}</code></td>\
             <td>{ty}</td><td>{kind}</td><td>{handler}</td><td>{reason}</td><td class=\"num\">{replays}</td></tr>",
            t = url(&topic),
            p = r.partition,
            o = r.offset,
            time = format_time(r.timestamp_ms),
            key = esc(&r.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default()),
            ty = esc(&dlq::event_type(r).unwrap_or_default()),
            kind = esc(r.header(header::ERROR_KIND).unwrap_or("-")),
            handler = esc(r.header(header::HANDLER).unwrap_or("-")),
            reason = esc(r.header(header::ERROR_REASON).unwrap_or("-")),
            replays = esc(r.header(header::REPLAY_COUNT).unwrap_or("0")),
        );
    }
    body.push_str("</tbody></table>");
    if matching.len() > LISTED {
        let _ = write!(
            body,
            "<p class=\"muted\">The newest {LISTED} are listed.</p>"
        );
    }
    Ok(page(&topic, Some(&caller), None, &body))
}

/// One dead letter: where it is, its headers, and its event (decoded JSON) or raw bytes.
pub(crate) async fn record(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    Path((topic, partition, offset)): Path<(String, i32, i64)>,
) -> Result<Html<String>, Problem> {
    let partitions = console.known_dead_letter_topic(&topic)?;
    if !partitions.contains(&partition) {
        return Err(Problem::not_found(format!(
            "{topic} has no partition {partition} (it has {partitions:?})."
        )));
    }
    let client = dlq::reader_client(&console.kafka).map_err(|e| Problem::internal(&e))?;
    let (low, high) = client
        .watermarks(&topic, partition)
        .map_err(|e| Problem::internal(&e))?;
    let missing = || {
        Problem::not_found(format!(
            "{topic}/{partition} has no record at offset {offset} (it holds {low}..{high})."
        ))
    };
    // Past the end there is nothing to wait for (a read there would wait for a record that
    // may never come).
    if offset < low || offset >= high {
        return Err(missing());
    }
    let starts = BTreeMap::from([(partition, Offset::Offset(offset))]);
    let mut reader = client
        .reader(&topic, &starts)
        .map_err(|e| Problem::internal(&e))?;
    let r = match reader.next().await.map_err(|e| Problem::internal(&e))? {
        Some(r) if r.offset == offset => r,
        _ => return Err(missing()),
    };
    drop(reader);
    let mut body = format!(
        "<p>{} · partition {partition} · offset {offset} · {} · key <code>{}</code></p>\
         <p><a href=\"/dlq/{}\">back to {}</a></p><h2>Headers</h2><table id=\"headers\"><tbody>",
        esc(&topic),
        format_time(r.timestamp_ms),
        esc(&r
            .key
            .as_deref()
            .map(String::from_utf8_lossy)
            .unwrap_or_default()),
        url(&topic),
        esc(&topic),
    );
    for (k, v) in r.headers.iter() {
        let _ = write!(
            body,
            "<tr><th>{}</th><td><code>{}</code></td></tr>",
            esc(k),
            esc(&String::from_utf8_lossy(v))
        );
    }
    body.push_str("</tbody></table>");
    let value = r.value.as_deref().unwrap_or_default();
    match serde_json::from_slice::<serde_json::Value>(value) {
        Ok(json) => {
            let _ = write!(
                body,
                "<h2>Event</h2><p>type <code>{}</code> · id <code>{}</code></p><pre id=\"event\">{}</pre>",
                esc(&dlq::event_type(&r).unwrap_or_else(|| "-".into())),
                esc(r.header("ce_id")
                    .or_else(|| json.get("id").and_then(|v| v.as_str()))
                    .unwrap_or("-")),
                esc(&serde_json::to_string_pretty(&json).unwrap_or_default())
            );
        }
        Err(error) => {
            let shown = &value[..value.len().min(RAW_SHOWN)];
            let hex: Vec<String> = shown
                .chunks(32)
                .map(|c| {
                    c.iter()
                        .map(|b| format!("{b:02x}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .collect();
            let _ = write!(
                body,
                "<h2>Raw bytes</h2><p class=\"muted\">{} bytes; not a JSON event ({}).</p>\
                 <pre id=\"raw\">{}</pre><pre>{}</pre>",
                value.len(),
                esc(&error.to_string()),
                esc(&String::from_utf8_lossy(shown)),
                hex.join("\n")
            );
        }
    }
    Ok(page(
        &format!("{topic} {partition}/{offset}"),
        Some(&caller),
        None,
        &body,
    ))
}

/// The replay forms' fields: the filters, the CSRF token and, to confirm, the dry run's id and
/// pinned ends.
#[derive(Debug, serde::Deserialize)]
pub(crate) struct ReplayForm {
    #[serde(default)]
    csrf: Option<String>,
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    until: Option<String>,
    #[serde(flatten)]
    filters: HashMap<String, String>,
}

impl ReplayForm {
    fn filters(&self) -> Result<Filters, Problem> {
        let mut f = Filters::default();
        for (k, v) in &self.filters {
            let slot = match k.as_str() {
                "kind" => &mut f.kind,
                "type" => &mut f.event_type,
                "key" => &mut f.key,
                "from" => &mut f.from,
                "to" => &mut f.to,
                other => {
                    return Err(Problem::bad_request(format!(
                        "unknown field `{other}` (kind, type, key, from, to)"
                    )))
                }
            };
            v.clone_into(slot);
        }
        Ok(f)
    }
}

/// Refuses an action the caller may not take: 403, before anything is read or changed.
pub(crate) fn authorize(caller: &Caller, csrf: Option<&str>) -> Result<(), Problem> {
    caller.may_act(csrf).map_err(|refusal| {
        Problem::new(
            StatusCode::FORBIDDEN,
            match refusal {
                Refusal::ViewerCannotAct => "A viewer cannot act: sign in with the operator token.",
                Refusal::MissingCsrf => {
                    "The form's CSRF token is missing or wrong: reload the page and try again."
                }
            },
        )
    })
}

fn ends_text(ends: &BTreeMap<i32, i64>) -> String {
    ends.iter()
        .map(|(p, e)| format!("{p}:{e}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn parse_ends(s: &str) -> Result<BTreeMap<i32, i64>, Problem> {
    s.split(',')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (p, e) = pair.split_once(':')?;
            Some((p.trim().parse().ok()?, e.trim().parse().ok()?))
        })
        .collect::<Option<_>>()
        .ok_or_else(|| Problem::bad_request(format!("`until` is not partition:end,...: `{s}`")))
}

fn targets_text(targets: &BTreeMap<String, u64>) -> String {
    targets
        .iter()
        .map(|(t, n)| {
            format!(
                "<li><span class=\"target\" data-topic=\"{}\">{}</span>: {n}</li>",
                esc(t),
                esc(t)
            )
        })
        .collect()
}

/// The dry run: what would be republished, how many, where; and the form to confirm it.
pub(crate) async fn dry_run(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    Path(topic): Path<String>,
    Form(form): Form<ReplayForm>,
) -> Result<Html<String>, Problem> {
    authorize(&caller, form.csrf.as_deref())?;
    let filters = form.filters()?;
    let parsed = filters.parse()?;
    console.known_dead_letter_topic(&topic)?;
    let filter = parsed.replay_filter();
    let args = ReplayArgs::for_console(
        &topic,
        parsed.from,
        parsed.to,
        filter.as_deref(),
        true,
        None,
    )
    .map_err(Problem::bad_request)?;
    let id = uuid::Uuid::now_v7().simple().to_string();
    let outcome = dlq::execute(&console.kafka, &args, &id, |_| Ok(true))
        .await
        .map_err(|e| Problem::internal(&e))?;
    if let Some(failure) = outcome.failure {
        return Err(Problem::internal(&failure));
    }
    let t = &outcome.tally;
    let would = t.replayed + t.parked;
    if would == 0 {
        return Err(Problem::bad_request(format!(
            "The range and filters select no dead letter of {topic} to replay \
             ({} selected, {} without a destination).",
            t.selected, t.skipped
        )));
    }
    let body = format!(
        "<p class=\"notice\" id=\"dry-run\" data-count=\"{would}\" data-replay-id=\"{id}\">Dry run, nothing published: \
         <b>{would}</b> dead letters of {topic_text} would be republished ({} selected, {} to parking, {} skipped).</p>\
         <ul id=\"targets\">{}</ul><p>Filters: <code>{}</code>; range: up to each partition's end now \
         (<code>{}</code>).</p>\
         <form method=\"post\" action=\"/dlq/{topic_url}/replay/confirm\" id=\"confirm\">{}{}\
         <input type=\"hidden\" name=\"id\" value=\"{id}\"><input type=\"hidden\" name=\"until\" value=\"{until}\">\
         <button type=\"submit\">Confirm: republish {would} records</button> \
         <a href=\"/dlq/{topic_url}?{query}\">cancel</a></form>\
         <p class=\"muted\">Replay id {id}: it is resumable, and confirming it again republishes nothing.</p>",
        t.selected,
        t.parked,
        t.skipped,
        targets_text(&t.targets),
        esc(filter.as_deref().unwrap_or("none")),
        esc(&ends_text(&outcome.ends)),
        csrf_field(&caller),
        filters.hidden_fields(),
        topic_text = esc(&topic),
        topic_url = url(&topic),
        until = esc(&ends_text(&outcome.ends)),
        query = filters.query(),
    );
    Ok(page("Replay: dry run", Some(&caller), None, &body))
}

/// The confirmed replay: runs under the dry run's id over its pinned range.
pub(crate) async fn confirm(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    Path(topic): Path<String>,
    Form(form): Form<ReplayForm>,
) -> Result<Html<String>, Problem> {
    authorize(&caller, form.csrf.as_deref())?;
    let filters = form.filters()?;
    let parsed = filters.parse()?;
    let id = form
        .id
        .as_deref()
        .filter(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| Problem::bad_request("`id` must be the replay id of a dry run"))?
        .to_owned();
    let until = parse_ends(
        form.until
            .as_deref()
            .ok_or_else(|| Problem::bad_request("`until` (the dry run's range) is missing"))?,
    )?;
    let partitions = console.known_dead_letter_topic(&topic)?;
    if let Some(p) = until.keys().find(|p| !partitions.contains(p)) {
        return Err(Problem::bad_request(format!(
            "{topic} has no partition {p}"
        )));
    }
    let filter = parsed.replay_filter();
    let args = ReplayArgs::for_console(
        &topic,
        parsed.from,
        parsed.to,
        filter.as_deref(),
        false,
        Some(until),
    )
    .map_err(Problem::bad_request)?;
    // One run of an id at a time: two at once could both publish before either commits.
    if !console
        .running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone())
    {
        return Err(Problem::new(
            StatusCode::CONFLICT,
            format!("Replay {id} is running; wait for it to finish."),
        ));
    }
    let outcome = dlq::execute(&console.kafka, &args, &id, |_| Ok(true)).await;
    console
        .running
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&id);
    let outcome = outcome.map_err(|e| Problem::internal(&e))?;
    let t = &outcome.tally;
    tracing::info!(
        replay_id = %id,
        topic,
        role = caller.role.name(),
        replayed = t.replayed,
        parked = t.parked,
        skipped = t.skipped,
        "Replay confirmed from the console."
    );
    let mut body = format!(
        "<p class=\"notice\" id=\"replayed\" data-replayed=\"{}\" data-parked=\"{}\" data-skipped=\"{}\">\
         Replay {id}: republished <b>{}</b>, parked {}, skipped {} (already published by this replay).</p>\
         <ul id=\"targets\">{}</ul>",
        t.replayed,
        t.parked,
        t.skipped,
        t.replayed,
        t.parked,
        t.skipped,
        targets_text(&t.targets),
    );
    if let Some(failure) = outcome.failure {
        let _ = write!(
            body,
            "<p class=\"problem\">The replay stopped: {}. Confirm again to resume it.</p>",
            esc(&format!("{failure:#}"))
        );
    } else {
        body.push_str("<p class=\"muted\">Its progress is committed: confirming it again republishes nothing.</p>");
    }
    let _ = write!(
        body,
        "<p><a href=\"/dlq/{}\">back to {}</a></p>",
        url(&topic),
        esc(&topic)
    );
    Ok(page("Replay", Some(&caller), None, &body))
}
