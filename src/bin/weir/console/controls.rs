//! Controls: pause and resume a topic, a partition or a route, fleet-wide or for one process,
//! and quiet or unquiet a process, by publishing [`FleetCommand`]s to the commands topic, the
//! same way `weir fleet` does. The console never talks to a replica: every process reads the
//! topic and acknowledges each command in its next status report, and the command's page shows
//! those acknowledgements as they arrive (it reloads itself while one is awaited).
//!
//! The console follows the commands topic too, and folds it as every process does
//! ([`Commands`](super::commands::Commands)): the Controls page lists the commands in force, each with the button that
//! lifts it, and the latest commands with how many processes acknowledged them.
//!
//! Input is checked against what the fleet shows before anything is published: a topic that no
//! report lists and no route consumes, a partition no report lists, a route that is not in the
//! route table, or a process that has not reported is refused with a 4xx. Lifting a command
//! in force is always accepted, even if what it paused is not reported any more.

use super::auth::Caller;
use super::commands::REMEMBERED;
use super::dead_letters::authorize;
use super::html::{csrf_field, esc, page as frame, time, url, Problem};
use super::state::Console;
use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::{Extension, Form};
use chrono::Utc;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;
use weir::{Addressee, CommandAction, CommandTarget, FleetCommand};

/// Commands the Controls page lists.
const LISTED: usize = 20;
/// How long a publish may take before the page says it failed.
const PUBLISH_TIMEOUT: Duration = Duration::from_secs(15);

/// The Controls page's form: every field a string, so that any POST parses and reaches the
/// caller check first.
#[derive(Debug, Default, serde::Deserialize)]
pub(crate) struct ActForm {
    #[serde(default)]
    csrf: Option<String>,
    /// `pause`, `resume`, `quiet` or `unquiet`.
    #[serde(default)]
    action: String,
    #[serde(default)]
    topic: String,
    #[serde(default)]
    partition: String,
    #[serde(default)]
    route: String,
    /// A process id; empty for every process.
    #[serde(default)]
    process: String,
}

/// What the fleet shows: what a command may name.
#[derive(Debug, Default)]
struct Known {
    /// Each topic with the partitions the reports list (none for a topic only a route names).
    topics: BTreeMap<String, BTreeSet<i32>>,
    /// The route table's handlers.
    routes: BTreeSet<String>,
    /// The processes that report.
    processes: BTreeSet<String>,
    /// The keys of the commands in force.
    in_force: BTreeSet<String>,
}

impl Known {
    fn of(console: &Console) -> Self {
        let mut known = Known::default();
        for topic in console.routes.topics() {
            known.topics.entry(topic).or_default();
        }
        known.routes = console
            .routes
            .routes
            .iter()
            .map(|r| r.handler.clone())
            .collect();
        let fleet = console.fleet.read().unwrap_or_else(|e| e.into_inner());
        for (id, process) in fleet.processes() {
            known.processes.insert(id.clone());
            for p in &process.report.partitions {
                known
                    .topics
                    .entry(p.topic.clone())
                    .or_default()
                    .insert(p.partition);
            }
        }
        let commands = console.commands.read().unwrap_or_else(|e| e.into_inner());
        known.in_force = commands
            .in_force
            .commands()
            .map(FleetCommand::key)
            .collect();
        known
    }
}

/// The command a form asks for, checked against what the fleet shows.
fn build(form: &ActForm, known: &Known, issuer: &str) -> Result<FleetCommand, Problem> {
    let text = |s: &str| Some(s.trim().to_owned()).filter(|s| !s.is_empty());
    let (topic, partition, route, process) = (
        text(&form.topic),
        text(&form.partition),
        text(&form.route),
        text(&form.process),
    );
    let target = || -> Result<CommandTarget, Problem> {
        match (&topic, &partition, &route) {
            (Some(_), _, Some(_)) => Err(Problem::bad_request(
                "Give a topic (and perhaps a partition) or a route, not both.",
            )),
            (None, None, None) => Err(Problem::bad_request(
                "Give a topic (and perhaps a partition) or a route.",
            )),
            (None, Some(_), _) => Err(Problem::bad_request("A partition needs its topic.")),
            (Some(topic), None, None) => Ok(CommandTarget::Topic {
                topic: topic.clone(),
            }),
            (Some(topic), Some(partition), None) => {
                let partition = partition
                    .parse::<i32>()
                    .ok()
                    .filter(|p| *p >= 0)
                    .ok_or_else(|| {
                        Problem::bad_request(format!(
                            "`partition` must be a partition number: `{partition}` is not"
                        ))
                    })?;
                Ok(CommandTarget::Partition {
                    topic: topic.clone(),
                    partition,
                })
            }
            (None, None, Some(route)) => Ok(CommandTarget::Route {
                route: route.clone(),
            }),
        }
    };
    let action = match form.action.trim() {
        "pause" => CommandAction::Pause { target: target()? },
        "resume" => CommandAction::Resume { target: target()? },
        "quiet" | "unquiet" => {
            if topic.is_some() || partition.is_some() || route.is_some() {
                return Err(Problem::bad_request(
                    "A quiet or unquiet applies to a whole process: give no topic, partition or \
                     route.",
                ));
            }
            if form.action.trim() == "quiet" {
                CommandAction::Quiet
            } else {
                CommandAction::Unquiet
            }
        }
        other => {
            return Err(Problem::bad_request(format!(
                "`action` must be pause, resume, quiet or unquiet, not `{other}`."
            )))
        }
    };
    let to = process.map_or(Addressee::All, Addressee::Process);
    let command = FleetCommand::new(issuer, to, action);
    // Lifting what is in force is always allowed (a resume has the key of the pause it lifts):
    // the fleet may not show its target any more.
    let lifts = matches!(
        command.action,
        CommandAction::Resume { .. } | CommandAction::Unquiet
    );
    if lifts && known.in_force.contains(&command.key()) {
        return Ok(command);
    }
    if let Addressee::Process(id) = &command.to {
        if !known.processes.contains(id) {
            return Err(Problem::not_found(format!(
                "No process {id} reports: the fleet page lists the processes by id."
            )));
        }
    }
    match &command.action {
        CommandAction::Pause { target } | CommandAction::Resume { target } => match target {
            CommandTarget::Topic { topic } => {
                if !known.topics.contains_key(topic) {
                    return Err(Problem::not_found(format!(
                        "No report lists topic {topic}, and no route consumes it."
                    )));
                }
            }
            CommandTarget::Partition { topic, partition } => {
                let listed = known.topics.get(topic);
                if !listed.is_some_and(|p| p.contains(partition)) {
                    return Err(Problem::not_found(format!(
                        "No report lists partition {partition} of topic {topic}."
                    )));
                }
            }
            CommandTarget::Route { route } => {
                if !known.routes.contains(route) {
                    return Err(Problem::not_found(format!(
                        "No route is handled by {route}: the routes page lists the handlers."
                    )));
                }
            }
            _ => {
                return Err(Problem::bad_request(
                    "This console does not know that target.",
                ))
            }
        },
        _ => {}
    }
    Ok(command)
}

/// POST /controls: checks the caller, then the input, then publishes the command and shows its
/// page (a redirect: reloading it does not publish again).
pub(crate) async fn act(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    Form(form): Form<ActForm>,
) -> Result<Response, Problem> {
    authorize(&caller, form.csrf.as_deref())?;
    let issuer = format!("console:{}", caller.role.name());
    let command = build(&form, &Known::of(&console), &issuer)?;
    let published = tokio::time::timeout(PUBLISH_TIMEOUT, console.publisher.publish(&command))
        .await
        .map_err(|_| format!("no answer from the broker within {PUBLISH_TIMEOUT:?}"))
        .and_then(|r| r.map_err(|e| e.to_string()));
    if let Err(error) = published {
        return Err(Problem::new(
            StatusCode::BAD_GATEWAY,
            format!(
                "Could not publish the command to {}: {error}",
                console.commands_topic
            ),
        ));
    }
    tracing::info!(
        audit = "console_command",
        command_id = command.id,
        issuer = command.issuer,
        command = command.action.name(),
        target = command.action.target_key(),
        to = %command.to,
        "Fleet command published from the console."
    );
    let location = format!("/controls/commands/{}", url(&command.id));
    console
        .commands
        .write()
        .unwrap_or_else(|e| e.into_inner())
        .remember(command);
    Ok((StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response())
}

/// A command in words: `pause topic customer-events`.
fn describe(action: &CommandAction) -> String {
    let target = |t: &CommandTarget| match t {
        CommandTarget::Topic { topic } => format!("topic {topic}"),
        CommandTarget::Partition { topic, partition } => {
            format!("partition {partition} of {topic}")
        }
        CommandTarget::Route { route } => format!("route {route}"),
        other => other.to_string(),
    };
    match action {
        CommandAction::Pause { target: t } => format!("pause {}", target(t)),
        CommandAction::Resume { target: t } => format!("resume {}", target(t)),
        other => other.name().to_owned(),
    }
}

fn addressee(to: &Addressee) -> String {
    match to {
        Addressee::All => "every process".to_owned(),
        Addressee::Process(id) => format!("process {id}"),
        other => other.to_string(),
    }
}

/// The hidden fields and button of a form that publishes `action` to `to` (disabled for a
/// viewer); the Fleet and process pages show them too.
pub(crate) fn command_form(
    caller: &Caller,
    action: &CommandAction,
    to: &Addressee,
    label: &str,
) -> String {
    let mut fields = vec![("action", action.name().to_owned())];
    if let CommandAction::Pause { target } | CommandAction::Resume { target } = action {
        match target {
            CommandTarget::Topic { topic } => fields.push(("topic", topic.clone())),
            CommandTarget::Partition { topic, partition } => {
                fields.push(("topic", topic.clone()));
                fields.push(("partition", partition.to_string()));
            }
            CommandTarget::Route { route } => fields.push(("route", route.clone())),
            _ => {}
        }
    }
    if let Addressee::Process(id) = to {
        fields.push(("process", id.clone()));
    }
    let hidden: String = fields
        .iter()
        .map(|(k, v)| format!("<input type=\"hidden\" name=\"{k}\" value=\"{}\">", esc(v)))
        .collect();
    format!(
        "<form method=\"post\" action=\"/controls\" class=\"inline\" data-action=\"{}\">{}{hidden}\
         <button{}{}>{}</button></form>",
        action.name(),
        csrf_field(caller),
        // What lifts a command looks secondary: the pause is the button to notice.
        if matches!(
            action,
            CommandAction::Resume { .. } | CommandAction::Unquiet
        ) {
            " class=\"secondary\""
        } else {
            ""
        },
        if caller.may_act(caller.csrf.as_deref()).is_ok() {
            ""
        } else {
            " disabled title=\"Sign in with the operator token to act.\""
        },
        esc(label)
    )
}

/// Each addressed process's acknowledgement of `command`: (process, stale, result, at).
fn acknowledgements(
    console: &Console,
    command: &FleetCommand,
) -> Vec<(String, bool, String, Option<chrono::DateTime<Utc>>)> {
    let fleet = console.fleet.read().unwrap_or_else(|e| e.into_inner());
    let now = Utc::now();
    let addressed: Vec<&String> = match &command.to {
        Addressee::Process(id) => vec![id],
        _ => fleet.processes().keys().collect(),
    };
    addressed
        .into_iter()
        .map(|id| match fleet.processes().get(id) {
            None => (id.clone(), true, "not reporting".to_owned(), None),
            Some(p) => {
                let stale = p.is_stale(now);
                match p.report.commands.iter().rev().find(|a| a.id == command.id) {
                    Some(ack) => (id.clone(), stale, ack.result.clone(), Some(ack.at)),
                    None if p.report.process.started_at > command.issued_at
                        && !matches!(
                            command.action,
                            CommandAction::Pause { .. } | CommandAction::Quiet
                        ) =>
                    {
                        (id.clone(), stale, "started later".to_owned(), None)
                    }
                    None => (id.clone(), stale, "waiting".to_owned(), None),
                }
            }
        })
        .collect()
}

/// GET /controls: the commands in force, the buttons, the latest commands.
pub(crate) async fn page(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
) -> Html<String> {
    let known = Known::of(&console);
    let (in_force, recent, records_read): (Vec<FleetCommand>, Vec<FleetCommand>, u64) = {
        let commands = console.commands.read().unwrap_or_else(|e| e.into_inner());
        (
            commands.in_force.commands().cloned().collect(),
            commands.recent.iter().rev().take(LISTED).cloned().collect(),
            commands.records_read,
        )
    };
    let mut body = format!(
        "<p class=\"muted\">Each action publishes a fleet command to <code>{}</code> (records \
         read so far: {}); every process applies the commands for it and acknowledges them in its next \
         status report. A pause stops fetching: records in flight finish and their offsets \
         commit.</p>",
        esc(&console.commands_topic),
        records_read
    );
    if caller.may_act(caller.csrf.as_deref()).is_err() {
        body.push_str(
            "<p class=\"warning\">You are signed in as a viewer: sign in with the operator \
             token to act.</p>",
        );
    }

    body.push_str(
        "<h2>Commands in force</h2><table id=\"in-force\"><thead><tr><th>Command</th>\
         <th>For</th><th>Issued by</th><th>At</th><th>Id</th><th></th></tr></thead><tbody>",
    );
    if in_force.is_empty() {
        body.push_str(
            "<tr><td colspan=\"6\" class=\"muted\">Nothing is paused or quiet.</td></tr>",
        );
    }
    for command in &in_force {
        let lift = match &command.action {
            CommandAction::Pause { target } => CommandAction::Resume {
                target: target.clone(),
            },
            _ => CommandAction::Unquiet,
        };
        let _ = write!(
            body,
            "<tr data-key=\"{key}\"><td>{what}</td><td>{to}</td><td>{issuer}</td><td>{at}</td>\
             <td><a href=\"/controls/commands/{href}\"><code>{id}</code></a></td><td>{button}</td></tr>",
            key = esc(&command.key()),
            what = esc(&describe(&command.action)),
            to = esc(&addressee(&command.to)),
            issuer = esc(&command.issuer),
            at = time(command.issued_at),
            href = url(&command.id),
            id = esc(&command.id),
            button = command_form(
                &caller,
                &lift,
                &command.to,
                if matches!(lift, CommandAction::Unquiet) { "Unquiet" } else { "Resume" }
            ),
        );
    }
    body.push_str("</tbody></table>");

    body.push_str(
        "<h2>Topics, across the fleet</h2><table id=\"topics\"><thead><tr><th>Topic</th>\
         <th>Partitions reported</th><th></th></tr></thead><tbody>",
    );
    for (topic, partitions) in &known.topics {
        let target = CommandTarget::Topic {
            topic: topic.clone(),
        };
        let listed: Vec<String> = partitions.iter().map(i32::to_string).collect();
        let _ = write!(
            body,
            "<tr data-topic=\"{}\"><td>{}</td><td>{}</td><td>{} {}</td></tr>",
            esc(topic),
            esc(topic),
            if listed.is_empty() {
                "-".to_owned()
            } else {
                listed.join(", ")
            },
            command_form(
                &caller,
                &CommandAction::Pause {
                    target: target.clone()
                },
                &Addressee::All,
                "Pause"
            ),
            command_form(
                &caller,
                &CommandAction::Resume { target },
                &Addressee::All,
                "Resume"
            ),
        );
    }
    body.push_str("</tbody></table>");

    // One form for the rest: a partition, a route, or one process only.
    let options = |items: &mut dyn Iterator<Item = &String>, none: &str| {
        let mut out = format!("<option value=\"\">{}</option>", esc(none));
        for item in items {
            let _ = write!(out, "<option>{}</option>", esc(item));
        }
        out
    };
    let _ = write!(
        body,
        "<h2>A partition, a route, or one process</h2><form method=\"post\" action=\"/controls\" \
         id=\"target\" class=\"filters\">{csrf}\
         <label>Topic<select name=\"topic\">{topics}</select></label>\
         <label>Partition<input name=\"partition\" inputmode=\"numeric\" size=\"6\" placeholder=\"every\"></label>\
         <label>or route<select name=\"route\">{routes}</select></label>\
         <label>Process<select name=\"process\">{processes}</select></label>\
         <button name=\"action\" value=\"pause\">Pause</button>\
         <button name=\"action\" value=\"resume\" class=\"secondary\">Resume</button></form>",
        csrf = csrf_field(&caller),
        topics = options(&mut known.topics.keys(), "-"),
        routes = options(&mut known.routes.iter(), "-"),
        processes = options(&mut known.processes.iter(), "every process"),
    );

    body.push_str(
        "<h2>Quiet a process</h2><p class=\"muted\">A quiet process takes no new records of any \
         topic; what is in flight finishes.</p><table id=\"quiet\"><thead><tr><th>Process id</th>\
         <th></th></tr></thead><tbody>",
    );
    if known.processes.is_empty() {
        body.push_str("<tr><td colspan=\"2\" class=\"muted\">No process reports.</td></tr>");
    }
    for id in &known.processes {
        let to = Addressee::Process(id.clone());
        let _ = write!(
            body,
            "<tr data-process=\"{}\"><td><a href=\"/processes/{}\"><code>{}</code></a></td><td>{} {}</td></tr>",
            esc(id),
            url(id),
            esc(id),
            command_form(&caller, &CommandAction::Quiet, &to, "Quiet"),
            command_form(&caller, &CommandAction::Unquiet, &to, "Unquiet"),
        );
    }
    body.push_str("</tbody></table>");

    body.push_str(
        "<h2>Latest commands</h2><table id=\"recent\"><thead><tr><th>At</th><th>Command</th>\
         <th>For</th><th>Issued by</th><th>Acknowledged</th></tr></thead><tbody>",
    );
    if recent.is_empty() {
        body.push_str("<tr><td colspan=\"5\" class=\"muted\">No command yet.</td></tr>");
    }
    for command in &recent {
        let acks = acknowledgements(&console, command);
        let done = acks.iter().filter(|a| a.2 != "waiting").count();
        let _ = write!(
            body,
            "<tr data-id=\"{id}\"><td>{at}</td><td><a href=\"/controls/commands/{href}\">{what}</a></td>\
             <td>{to}</td><td>{issuer}</td><td>{done} of {all}</td></tr>",
            id = esc(&command.id),
            at = time(command.issued_at),
            href = url(&command.id),
            what = esc(&describe(&command.action)),
            to = esc(&addressee(&command.to)),
            issuer = esc(&command.issuer),
            all = acks.len(),
        );
    }
    body.push_str("</tbody></table>");
    frame("Controls", Some(&caller), None, &body)
}

/// GET /controls/commands/{id}: one command and each addressed process's acknowledgement;
/// reloads itself every 2 s while one is awaited.
pub(crate) async fn command(
    State(console): State<Arc<Console>>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> Result<Html<String>, Problem> {
    let command = console
        .commands
        .read()
        .unwrap_or_else(|e| e.into_inner())
        .find(&id)
        .cloned()
        .ok_or_else(|| {
            Problem::not_found(format!(
                "No command {id} among the latest {REMEMBERED} of {}.",
                console.commands_topic
            ))
        })?;
    let acks = acknowledgements(&console, &command);
    let waiting = acks.iter().any(|a| a.2 == "waiting");
    let mut body = format!(
        "<div id=\"command\" data-id=\"{id}\" data-action=\"{action}\" data-target=\"{target}\" \
         data-to=\"{to_key}\"><p class=\"notice\"><b>{what}</b> for {to}, issued by {issuer} at \
         {at}.<br>Command id <code>{id}</code>, key <code>{key}</code> on <code>{topic}</code>.</p></div>\
         <h2>Acknowledgements</h2><p class=\"muted\">From each process's status reports{refresh}.</p>\
         <table id=\"acks\"><thead><tr><th>Process id</th><th>Health</th><th>Result</th>\
         <th>Applied at</th></tr></thead><tbody>",
        id = esc(&command.id),
        action = command.action.name(),
        target = esc(&command.action.target_key()),
        to_key = esc(&command.to.to_string()),
        what = esc(&describe(&command.action)),
        to = esc(&addressee(&command.to)),
        issuer = esc(&command.issuer),
        at = time(command.issued_at),
        key = esc(&command.key()),
        topic = esc(&console.commands_topic),
        refresh = if waiting {
            "; this page reloads every 2 s while one is awaited"
        } else {
            ""
        },
    );
    if acks.is_empty() {
        body.push_str("<tr><td colspan=\"4\" class=\"muted\">No process reports.</td></tr>");
    }
    for (process, stale, result, at) in &acks {
        let class = match result.as_str() {
            "applied" => "live",
            "waiting" | "ignored" | "started later" => "muted",
            _ => "stale",
        };
        let _ = write!(
            body,
            "<tr data-process=\"{id}\" data-result=\"{result}\"><td><a href=\"/processes/{href}\">\
             <code>{id}</code></a></td><td class=\"{health}\">{health}</td>\
             <td class=\"{class}\">{result}</td><td>{at}</td></tr>",
            id = esc(process),
            href = url(process),
            health = if *stale { "stale" } else { "live" },
            result = esc(result),
            at = at.map_or_else(|| "-".to_owned(), time),
        );
    }
    body.push_str("</tbody></table><p><a href=\"/controls\">Back to Controls</a></p>");
    Ok(frame(
        "Command",
        Some(&caller),
        Some(if waiting { 2 } else { 5 }),
        &body,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known() -> Known {
        Known {
            topics: BTreeMap::from([
                ("customers".to_owned(), BTreeSet::from([0, 1])),
                ("tasks".to_owned(), BTreeSet::new()),
            ]),
            routes: BTreeSet::from(["record_customer_created".to_owned()]),
            processes: BTreeSet::from(["h-1-ab".to_owned()]),
            in_force: BTreeSet::from(["all|topic|gone".to_owned()]),
        }
    }

    fn form(action: &str, fields: &[(&str, &str)]) -> ActForm {
        let mut form = ActForm {
            action: action.to_owned(),
            ..ActForm::default()
        };
        for (k, v) in fields {
            let v = (*v).to_owned();
            match *k {
                "topic" => form.topic = v,
                "partition" => form.partition = v,
                "route" => form.route = v,
                "process" => form.process = v,
                _ => unreachable!(),
            }
        }
        form
    }

    fn status(result: Result<FleetCommand, Problem>) -> u16 {
        result.map_or_else(|p| p.status.as_u16(), |_| 200)
    }

    #[test]
    fn a_form_becomes_the_command_it_names_with_the_issuer() {
        let k = known();
        let c = build(
            &form("pause", &[("topic", "customers")]),
            &k,
            "console:operator",
        )
        .unwrap();
        assert_eq!(c.key(), "all|topic|customers");
        assert_eq!(c.issuer, "console:operator");
        let c = build(
            &form(
                "resume",
                &[
                    ("topic", "customers"),
                    ("partition", "1"),
                    ("process", "h-1-ab"),
                ],
            ),
            &k,
            "x",
        )
        .unwrap();
        assert_eq!(c.key(), "process:h-1-ab|partition|customers|1");
        let c = build(
            &form("pause", &[("route", "record_customer_created")]),
            &k,
            "x",
        )
        .unwrap();
        assert_eq!(c.key(), "all|route|record_customer_created");
        let c = build(&form("quiet", &[("process", "h-1-ab")]), &k, "x").unwrap();
        assert_eq!(c.key(), "process:h-1-ab|quiet");
        // A topic only a route names (no partition reported yet) may be paused.
        assert_eq!(
            status(build(&form("pause", &[("topic", "tasks")]), &k, "x")),
            200
        );
    }

    #[test]
    fn unknown_or_malformed_input_is_refused_but_a_command_in_force_can_always_be_lifted() {
        let k = known();
        // (action, fields, the status expected)
        type Case = (&'static str, &'static [(&'static str, &'static str)], u16);
        let cases: &[Case] = &[
            ("pause", &[("topic", "nope")], 404),
            ("pause", &[("topic", "customers"), ("partition", "7")], 404),
            ("pause", &[("topic", "customers"), ("partition", "x")], 400),
            ("pause", &[("topic", "customers"), ("partition", "-1")], 400),
            ("pause", &[("partition", "0")], 400),
            ("pause", &[("route", "nobody")], 404),
            (
                "pause",
                &[("topic", "customers"), ("route", "record_customer_created")],
                400,
            ),
            ("pause", &[], 400),
            (
                "pause",
                &[("topic", "customers"), ("process", "ghost")],
                404,
            ),
            ("quiet", &[("process", "ghost")], 404),
            ("quiet", &[("topic", "customers")], 400),
            ("reboot", &[("topic", "customers")], 400),
            ("resume", &[("topic", "gone"), ("process", "h-1-ab")], 404),
            ("pause", &[("topic", "gone")], 404),
            ("resume", &[("topic", "gone")], 200),
        ];
        for (action, fields, expected) in cases {
            assert_eq!(
                status(build(&form(action, fields), &k, "x")),
                *expected,
                "{action} {fields:?}"
            );
        }
    }
}
