//! The pages built from status reports alone: Fleet, one process, Lag and throughput, Errors,
//! and the login page. Each names a process by the id its reports are keyed by in the status
//! topic, so a person can match the page to the topic.

use super::auth::Caller;
use super::controls::command_form;
use super::fleet::{Fleet, BUCKET_SECONDS, HISTORY};
use super::html::{bytes, chart, esc, page, time, trim_number, url, Problem, Series};
use super::state::Console;
use axum::extract::{Path, State};
use axum::response::Html;
use axum::Extension;
use chrono::Utc;
use std::fmt::Write as _;
use std::sync::Arc;
use weir::{Addressee, CommandAction, CommandTarget};

/// How often the fleet pages reload themselves.
const REFRESH_SECONDS: u32 = 5;

/// The lag colour class of a partition cell.
fn lag_class(lag: Option<i64>) -> &'static str {
    match lag {
        None => "lagx",
        Some(l) if l <= 0 => "lag0",
        Some(l) if l < 100 => "lag1",
        Some(l) if l < 1_000 => "lag2",
        Some(_) => "lag3",
    }
}

/// Fleet: every process and its health, then each topic's partitions by owner.
pub(crate) async fn fleet(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
) -> Html<String> {
    let fleet = console.fleet.read().unwrap_or_else(|e| e.into_inner());
    let now = Utc::now();
    let mut body = String::new();
    if fleet.processes().is_empty() {
        let _ = write!(
            body,
            "<p class=\"warning\">No process has reported to <code>{}</code> yet ({} records read).</p>",
            esc(&console.status_topic),
            fleet.records_read
        );
    }
    body.push_str(
        "<h2>Processes</h2><table id=\"processes\"><thead><tr><th>Process id</th><th>Role</th>\
         <th>Health</th><th>Last report</th><th>Host / pid</th><th>Version</th><th>RSS</th>\
         <th>Partitions</th><th>Errors</th></tr></thead><tbody>",
    );
    for (id, p) in fleet.processes() {
        let r = &p.report;
        let stale = p.is_stale(now);
        let age = (now - r.at).num_milliseconds() as f64 / 1000.0;
        let _ = write!(
            body,
            "<tr data-process=\"{id}\" data-pid=\"{pid}\" data-health=\"{health}\">\
             <td><a href=\"/processes/{href}\"><code>{id}</code></a></td><td>{role}</td>\
             <td class=\"{health}\">{health}</td><td>{age:.1} s ago</td><td>{host} / {pid}</td>\
             <td>{version}</td><td class=\"num\">{rss}</td><td class=\"num\">{partitions}</td>\
             <td class=\"num\">{errors}</td></tr>",
            id = esc(id),
            href = url(id),
            pid = r.process.pid,
            role = esc(&r.process.role),
            health = if stale { "stale" } else { "live" },
            host = esc(&r.process.host),
            version = esc(&r.process.version),
            rss = r.process.rss_bytes.map_or_else(|| "-".into(), bytes),
            partitions = r.partitions_total,
            errors = r.errors_total,
        );
    }
    body.push_str("</tbody></table>");
    body.push_str(
        "<h2>Partitions by owner</h2><p class=\"muted\">Colour by lag: \
         <span class=\"cell lag0\">0</span> <span class=\"cell lag1\">&lt; 100</span> \
         <span class=\"cell lag2\">&lt; 1,000</span> <span class=\"cell lag3\">1,000+</span>; \
         a dashed outline marks an owner that went stale.</p>",
    );
    for (topic, partitions) in fleet.owners(now) {
        let target = CommandTarget::Topic {
            topic: topic.clone(),
        };
        let _ = write!(
            body,
            "<h3>{} <span class=\"controls\">{} {}</span></h3><div class=\"grid\" data-topic=\"{}\">",
            esc(&topic),
            command_form(
                &caller,
                &CommandAction::Pause {
                    target: target.clone()
                },
                &Addressee::All,
                "Pause everywhere"
            ),
            command_form(
                &caller,
                &CommandAction::Resume { target },
                &Addressee::All,
                "Resume"
            ),
            esc(&topic)
        );
        for (partition, owner) in partitions {
            let _ = write!(
                body,
                "<div class=\"cell {class}{stale}\" data-topic=\"{topic}\" data-partition=\"{partition}\" \
                 data-owner=\"{owner}\" data-owner-stale=\"{is_stale}\" data-lag=\"{lag}\">\
                 <b>{topic_text} [{partition}]</b>{owner}<br>lag {lag}{paused}</div>",
                class = lag_class(owner.lag),
                stale = if owner.stale { " stale-owner" } else { "" },
                topic = esc(&topic),
                topic_text = esc(&topic),
                owner = esc(&owner.process),
                is_stale = owner.stale,
                lag = owner.lag.map_or_else(|| "-".into(), |l| l.to_string()),
                paused = if owner.paused { " · paused" } else { "" },
            );
        }
        body.push_str("</div>");
    }
    page("Fleet", Some(&caller), Some(REFRESH_SECONDS), &body)
}

/// One process: its partitions with offsets, its routes and its errors.
pub(crate) async fn process(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Html<String>, Problem> {
    let fleet = console.fleet.read().unwrap_or_else(|e| e.into_inner());
    let p = fleet.processes().get(&id).ok_or_else(|| {
        Problem::not_found(format!(
            "No process {id} in {}: it never reported, or it stopped cleanly.",
            console.status_topic
        ))
    })?;
    let r = &p.report;
    let me = Addressee::Process(r.process.id.clone());
    let mut body = format!(
        "<p><code>{}</code> · {} · {} on {} (pid {}) · started {} · last report {}</p>\
         <p>{} {}</p>\
         <h2>Partitions</h2><table><thead><tr><th>Topic</th><th>Partition</th><th>Position</th>\
         <th>Committed</th><th>Log end</th><th>Lag</th><th>In flight</th><th>Paused</th>\
         <th>This process only</th></tr></thead><tbody>",
        esc(&r.process.id),
        if p.is_stale(Utc::now()) {
            "<span class=\"stale\">stale</span>"
        } else {
            "<span class=\"live\">live</span>"
        },
        esc(&r.process.role),
        esc(&r.process.host),
        r.process.pid,
        time(r.process.started_at),
        time(r.at),
        command_form(&caller, &CommandAction::Quiet, &me, "Quiet this process"),
        command_form(&caller, &CommandAction::Unquiet, &me, "Unquiet"),
    );
    let opt = |v: Option<i64>| v.map_or_else(|| "-".to_owned(), |v| v.to_string());
    for part in &r.partitions {
        let target = CommandTarget::Partition {
            topic: part.topic.clone(),
            partition: part.partition,
        };
        let reasons: Vec<String> = part
            .pause_reasons
            .iter()
            .map(|p| format!("{}: {}", esc(&p.source), esc(&p.reason)))
            .collect();
        let _ = write!(
            body,
            "<tr><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td>\
             <td>{} {}</td></tr>",
            esc(&part.topic),
            part.partition,
            opt(part.position),
            opt(part.committed),
            opt(part.log_end),
            opt(part.lag),
            part.in_flight,
            if part.paused { reasons.join("; ") } else { "no".into() },
            command_form(&caller, &CommandAction::Pause { target: target.clone() }, &me, "Pause"),
            command_form(&caller, &CommandAction::Resume { target }, &me, "Resume"),
        );
    }
    body.push_str(
        "</tbody></table><h2>Routes (last report's window)</h2><table><thead><tr><th>Topic</th>\
        <th>Event type</th><th>Handled</th><th>Retried</th><th>Dead-lettered</th><th>Parked</th>\
        <th>p50</th><th>p99</th></tr></thead><tbody>",
    );
    let secs =
        |v: Option<f64>| v.map_or_else(|| "-".to_owned(), |s| format!("{:.1} ms", s * 1000.0));
    for route in &r.routes {
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            esc(&route.topic),
            esc(&route.event_type),
            route.handled,
            route.retried,
            route.dead_lettered,
            route.parked,
            secs(route.p50_seconds),
            secs(route.p99_seconds),
        );
    }
    body.push_str("</tbody></table>");
    Ok(page(
        &r.process.id,
        Some(&caller),
        Some(REFRESH_SECONDS),
        &body,
    ))
}

/// Lag and throughput: an hour of lag per partition, and of records per second per route.
pub(crate) async fn lag(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
) -> Html<String> {
    let offsets = group_offsets(&console);
    let fleet = console.fleet.read().unwrap_or_else(|e| e.into_inner());
    let to = Utc::now();
    let from = to - HISTORY;
    let mut body = String::from(
        "<p class=\"muted\">The last hour, from the status reports (kept in the console's memory; \
         rebuilt from the status topic when it restarts).</p><h2>Consumer lag</h2>",
    );
    if fleet.lag_topics().is_empty() {
        body.push_str("<p class=\"muted\">No lag reported yet.</p>");
    }
    for topic in fleet.lag_topics() {
        let series: Vec<Series> = fleet
            .lag_of(topic)
            .into_iter()
            .map(|(partition, points)| Series {
                name: format!("[{partition}]"),
                points: points.into_iter().map(|(t, v)| (t, v as f64)).collect(),
            })
            .collect();
        let _ = write!(
            body,
            "<h3>{}</h3><div data-chart=\"lag\" data-topic=\"{}\">{}</div>",
            esc(topic),
            esc(topic),
            chart(&format!("lag of {topic}"), &series, from, to)
        );
    }
    body.push_str("<h2>Records per second, per route</h2>");
    throughput(&fleet, &mut body, from, to);
    let _ = write!(
        body,
        "<h2>Committed offsets of group <code>{}</code></h2><p class=\"muted\">From the \
         broker, now (the console reads them without joining the group).</p>",
        esc(console.routes.group())
    );
    match offsets {
        Ok(rows) => {
            body.push_str(
                "<table id=\"group-offsets\"><thead><tr><th>Topic</th><th>Partition</th>\
                 <th>Committed</th><th>Log end</th><th>Lag</th></tr></thead><tbody>",
            );
            for (topic, partition, committed, (low, high)) in rows {
                let lag = high - committed.unwrap_or(low);
                let _ = write!(
                    body,
                    "<tr><td>{}</td><td class=\"num\">{partition}</td><td class=\"num\">{}</td>\
                     <td class=\"num\">{high}</td><td class=\"num\">{lag}</td></tr>",
                    esc(&topic),
                    committed.map_or_else(|| "-".to_owned(), |c| c.to_string()),
                );
            }
            body.push_str("</tbody></table>");
        }
        Err(error) => {
            let _ = write!(body, "<p class=\"problem\">{}</p>", esc(&error));
        }
    }
    page(
        "Lag and throughput",
        Some(&caller),
        Some(REFRESH_SECONDS * 2),
        &body,
    )
}

/// Committed offset (if any) and (log start, log end) of every partition of the routes'
/// topics, for the configured group.
type GroupOffsets = Vec<(String, i32, Option<i64>, (i64, i64))>;

fn group_offsets(console: &Console) -> Result<GroupOffsets, String> {
    let read = || -> anyhow::Result<GroupOffsets> {
        let client = crate::kafka_read::GroupClient::new(&console.kafka, console.routes.group())?;
        let mut coordinates = Vec::new();
        for topic in console.routes.topics() {
            for p in client.partitions(&topic)? {
                coordinates.push((topic.clone(), p));
            }
        }
        let committed = client.committed(&coordinates)?;
        coordinates
            .into_iter()
            .map(|(t, p)| {
                let marks = client.watermarks(&t, p)?;
                let c = committed.get(&(t.clone(), p)).copied();
                Ok((t, p, c, marks))
            })
            .collect()
    };
    read().map_err(|e| format!("{e:#}"))
}

fn throughput(
    fleet: &Fleet,
    body: &mut String,
    from: chrono::DateTime<Utc>,
    to: chrono::DateTime<Utc>,
) {
    if fleet.throughput().is_empty() {
        body.push_str("<p class=\"muted\">No route has reported yet.</p>");
    }
    let per_second = |n: u64| n as f64 / BUCKET_SECONDS as f64;
    for ((topic, event_type), buckets) in fleet.throughput() {
        let at = |start: &i64| {
            chrono::DateTime::from_timestamp(*start + BUCKET_SECONDS / 2, 0).unwrap_or(to)
        };
        let line = |name: &str, pick: fn(&super::fleet::Counts) -> u64| Series {
            name: name.to_owned(),
            points: buckets
                .iter()
                .map(|(s, c)| (at(s), per_second(pick(c))))
                .collect(),
        };
        let series = [
            line("handled/s", |c| c.handled),
            line("retried/s", |c| c.retried),
            line("dead-lettered/s", |c| c.dead_lettered),
        ];
        let total_dead: u64 = buckets.values().map(|c| c.dead_lettered).sum();
        let _ = write!(
            body,
            "<h3>{} · {}</h3><div data-chart=\"route\" data-topic=\"{}\" data-event-type=\"{}\">{}</div>\
             <p class=\"muted\">{} dead-lettered in the hour.</p>",
            esc(topic),
            esc(event_type),
            esc(topic),
            esc(event_type),
            chart(&format!("{topic} {event_type}"), &series, from, to),
            trim_number(total_dead as f64),
        );
    }
}

/// Errors: the latest handler errors of every process, newest first.
pub(crate) async fn errors(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
) -> Html<String> {
    let fleet = console.fleet.read().unwrap_or_else(|e| e.into_inner());
    let mut all: Vec<(&str, &weir::ErrorEntry)> = fleet
        .processes()
        .iter()
        .flat_map(|(id, p)| p.report.errors.iter().map(move |e| (id.as_str(), e)))
        .collect();
    all.sort_by_key(|e| std::cmp::Reverse(e.1.at));
    let mut body = String::from(
        "<p class=\"muted\">The last errors each process reported (at most ten per process); \
         the records' bytes never travel in reports.</p><table id=\"errors\"><thead><tr>\
         <th>At</th><th>Process</th><th>Route</th><th>Topic</th><th>Event id</th><th>Outcome</th>\
         <th>Message</th></tr></thead><tbody>",
    );
    if all.is_empty() {
        body.push_str("<tr><td colspan=\"7\" class=\"muted\">No errors reported.</td></tr>");
    }
    for (process, e) in all {
        let _ = write!(
            body,
            "<tr data-route=\"{route}\" data-event-id=\"{event}\"><td>{at}</td>\
             <td><a href=\"/processes/{href}\"><code>{process}</code></a></td><td>{route}</td>\
             <td>{topic}</td><td><code>{event}</code></td><td>{kind}</td><td>{message}</td></tr>",
            route = esc(&e.route),
            event = esc(&e.event_id),
            at = time(e.at),
            href = url(process),
            process = esc(process),
            topic = esc(&e.topic),
            kind = esc(&e.kind),
            message = esc(&e.message),
        );
    }
    body.push_str("</tbody></table>");
    page("Errors", Some(&caller), Some(REFRESH_SECONDS), &body)
}
