//! `weir inspect`: one look at a consumer group's state.
//!
//! - the group's state, members and their assignment (as the group coordinator describes them);
//! - per partition: the committed offset, the log end and the lag (log end - committed; from the
//!   log start when nothing is committed);
//! - dead letters the group wrote, by error kind (reading its dead-letter topics);
//! - with a database: parked records (durable retries) and the outbox's pending rows.
//!
//! It exits non-zero when the coordinator does not know the group and the group has no committed
//! offset: a typo in a group name must not look like an idle consumer.

use crate::config::Settings;
use crate::kafka_read::GroupClient;
use anyhow::{bail, Context as _};
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, clap::Args)]
pub(crate) struct InspectArgs {
    /// The consumer group (default: the configured group_id).
    #[arg(long)]
    group: Option<String>,
    /// Topics to report (default: the group's assigned and committed topics). Repeatable.
    #[arg(long = "topic")]
    topics: Vec<String>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Serialize)]
struct Report {
    group: String,
    state: String,
    members: Vec<Member>,
    partitions: Vec<PartitionState>,
    total_lag: i64,
    dead_letters: BTreeMap<String, crate::dlq::ListingSummary>,
    /// `null` without a database.
    parked: Option<Parked>,
    /// `null` without a database.
    outbox: Option<Outbox>,
}

#[derive(Debug, Serialize)]
struct Member {
    member_id: String,
    client_id: String,
    host: String,
    assignment: BTreeMap<String, Vec<i32>>,
}

#[derive(Debug, Serialize)]
struct PartitionState {
    topic: String,
    partition: i32,
    /// The next offset the group will read; `null` if it never committed one.
    committed: Option<i64>,
    log_start: i64,
    log_end: i64,
    lag: i64,
}

#[derive(Debug, Serialize)]
struct Parked {
    records: i64,
    keys: i64,
    oldest_age_seconds: Option<f64>,
}

#[derive(Debug, Serialize)]
struct Outbox {
    pending: i64,
    oldest_age_seconds: Option<f64>,
}

pub(crate) async fn run(settings: Settings, args: InspectArgs) -> anyhow::Result<()> {
    let group = args
        .group
        .clone()
        .unwrap_or_else(|| settings.consumer.group_id.clone());
    let client = GroupClient::new(&settings.kafka, &group)?;
    let (state, members) = describe(&client)?;
    let assigned: BTreeSet<String> = members
        .iter()
        .flat_map(|m| m.assignment.keys().cloned())
        .collect();
    let topics: BTreeMap<String, Vec<i32>> = if args.topics.is_empty() {
        let all = client.all_topics()?;
        // Without topics given: every partition of the cluster is asked for a committed offset,
        // then the topics with one (or assigned to a member) are kept.
        let everything: Vec<(String, i32)> = all
            .iter()
            .flat_map(|(t, ps)| ps.iter().map(move |p| (t.clone(), *p)))
            .collect();
        let committed = client.committed(&everything)?;
        let with_offsets: BTreeSet<String> = committed.keys().map(|(t, _)| t.clone()).collect();
        all.into_iter()
            .filter(|(t, _)| assigned.contains(t) || with_offsets.contains(t))
            .collect()
    } else {
        args.topics
            .iter()
            .map(|t| Ok((t.clone(), client.partitions(t)?)))
            .collect::<anyhow::Result<_>>()?
    };
    let coordinates: Vec<(String, i32)> = topics
        .iter()
        .flat_map(|(t, ps)| ps.iter().map(move |p| (t.clone(), *p)))
        .collect();
    let committed = client.committed(&coordinates)?;
    let known = !matches!(state.as_str(), "" | "Dead" | "Unknown");
    if !known && committed.is_empty() {
        bail!("consumer group {group} does not exist (no members, no committed offsets)");
    }
    let mut partitions = Vec::new();
    for (topic, partition) in &coordinates {
        let (log_start, log_end) = client.watermarks(topic, *partition)?;
        let c = committed.get(&(topic.clone(), *partition)).copied();
        partitions.push(PartitionState {
            topic: topic.clone(),
            partition: *partition,
            committed: c,
            log_start,
            log_end,
            lag: (log_end - c.unwrap_or(log_start)).max(0),
        });
    }
    let total_lag = partitions.iter().map(|p| p.lag).sum();
    let all_topics = client.all_topics()?;
    let mut dead_letters = BTreeMap::new();
    for topic in topics.keys() {
        let dlq = settings.consumer.dead_letter.topic_for(topic);
        if all_topics.contains_key(&dlq) {
            let summary = crate::dlq::count_for_group(&settings.kafka, &dlq, &group).await?;
            dead_letters.insert(dlq, summary);
        }
    }
    let (parked, outbox) = match settings.database.url {
        Some(_) => database_state(&settings, &group).await?,
        None => (None, None),
    };
    let report = Report {
        group,
        state,
        members,
        partitions,
        total_lag,
        dead_letters,
        parked,
        outbox,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print(&report);
    }
    Ok(())
}

fn describe(client: &GroupClient) -> anyhow::Result<(String, Vec<Member>)> {
    let Some(list) = client.describe_group()? else {
        return Ok((String::new(), Vec::new()));
    };
    let Some(info) = list.groups().iter().find(|g| g.name() == client.group()) else {
        return Ok((String::new(), Vec::new()));
    };
    let members = info
        .members()
        .iter()
        .map(|m| Member {
            member_id: m.id().to_owned(),
            client_id: m.client_id().to_owned(),
            host: m.client_host().to_owned(),
            assignment: m
                .assignment()
                .and_then(|bytes| parse_assignment(bytes).ok())
                .unwrap_or_default(),
        })
        .collect();
    Ok((info.state().to_owned(), members))
}

/// The consumer protocol's member assignment: version (i16), then an array of (topic: i16-length
/// string, partitions: array of i32); user data follows and is ignored.
fn parse_assignment(bytes: &[u8]) -> anyhow::Result<BTreeMap<String, Vec<i32>>> {
    struct Cursor<'a>(&'a [u8]);
    impl Cursor<'_> {
        fn take(&mut self, n: usize) -> anyhow::Result<&[u8]> {
            if self.0.len() < n {
                bail!("truncated assignment");
            }
            let (head, tail) = self.0.split_at(n);
            self.0 = tail;
            Ok(head)
        }
        fn i16(&mut self) -> anyhow::Result<i16> {
            Ok(i16::from_be_bytes(self.take(2)?.try_into()?))
        }
        fn i32(&mut self) -> anyhow::Result<i32> {
            Ok(i32::from_be_bytes(self.take(4)?.try_into()?))
        }
    }
    let mut out = BTreeMap::new();
    if bytes.is_empty() {
        return Ok(out);
    }
    let mut c = Cursor(bytes);
    let _version = c.i16()?;
    let topics = c.i32()?;
    for _ in 0..topics.max(0) {
        let len = c.i16()?;
        let name = String::from_utf8(c.take(len.max(0) as usize)?.to_vec())?;
        let count = c.i32()?;
        let mut partitions = Vec::new();
        for _ in 0..count.max(0) {
            partitions.push(c.i32()?);
        }
        partitions.sort_unstable();
        out.insert(name, partitions);
    }
    Ok(out)
}

async fn database_state(
    settings: &Settings,
    group: &str,
) -> anyhow::Result<(Option<Parked>, Option<Outbox>)> {
    let pool = crate::db::connect(&settings.database).await?;
    let table_exists = |name: &'static str| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, bool>("SELECT to_regclass($1) IS NOT NULL")
                .bind(name)
                .fetch_one(&pool)
                .await
        }
    };
    let outbox = if table_exists("weir_outbox").await? {
        let (pending, age): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8 \
             FROM weir_outbox WHERE published_at IS NULL",
        )
        .fetch_one(&pool)
        .await
        .context("reading the outbox")?;
        Some(Outbox {
            pending,
            oldest_age_seconds: age,
        })
    } else {
        None
    };
    let parked = if table_exists("weir_parked").await? {
        let (records, keys, age): (i64, i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), count(DISTINCT (handler, topic, partition, key)), \
             EXTRACT(EPOCH FROM now() - min(parked_at))::float8 \
             FROM weir_parked WHERE group_id = $1",
        )
        .bind(group)
        .fetch_one(&pool)
        .await
        .context("reading the parked records")?;
        Some(Parked {
            records,
            keys,
            oldest_age_seconds: age,
        })
    } else {
        None
    };
    pool.close().await;
    Ok((parked, outbox))
}

fn print(r: &Report) {
    println!(
        "group {} ({})",
        r.group,
        if r.state.is_empty() {
            "no members"
        } else {
            &r.state
        }
    );
    if r.members.is_empty() {
        println!("  no members");
    }
    for m in &r.members {
        let assignment: Vec<String> = m
            .assignment
            .iter()
            .map(|(t, ps)| {
                let ps: Vec<String> = ps.iter().map(i32::to_string).collect();
                format!("{t}[{}]", ps.join(","))
            })
            .collect();
        println!(
            "  {} ({} at {}): {}",
            m.member_id,
            m.client_id,
            m.host,
            if assignment.is_empty() {
                "nothing assigned".to_owned()
            } else {
                assignment.join(" ")
            }
        );
    }
    println!(
        "\n  {:<32} {:>9} {:>12} {:>12} {:>10}",
        "topic", "partition", "committed", "log end", "lag"
    );
    for p in &r.partitions {
        println!(
            "  {:<32} {:>9} {:>12} {:>12} {:>10}",
            p.topic,
            p.partition,
            p.committed
                .map_or_else(|| "-".to_owned(), |c| c.to_string()),
            p.log_end,
            p.lag
        );
    }
    println!(
        "  {:<32} {:>9} {:>12} {:>12} {:>10}",
        "total", "", "", "", r.total_lag
    );
    for (topic, summary) in &r.dead_letters {
        println!("\ndead letters in {topic}: {}", summary.records);
        for (kind, n) in &summary.by_kind {
            println!("  {kind:<32} {n:>10}");
        }
    }
    let age = |a: Option<f64>| a.map_or_else(|| "-".to_owned(), |s| format!("{s:.0} s"));
    match &r.parked {
        Some(p) => println!(
            "\nparked: {} records, {} keys, oldest {}",
            p.records,
            p.keys,
            age(p.oldest_age_seconds)
        ),
        None => println!("\nparked: - (no database, or no durable retries)"),
    }
    match &r.outbox {
        Some(o) => println!(
            "outbox: {} pending, oldest {}",
            o.pending,
            age(o.oldest_age_seconds)
        ),
        None => println!("outbox: - (no database)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_member_assignment_decodes_to_topics_and_partitions() {
        let mut bytes = vec![0, 1]; // version
        bytes.extend(2i32.to_be_bytes());
        for (name, parts) in [("b", vec![3i32, 1]), ("a", vec![0])] {
            bytes.extend((name.len() as i16).to_be_bytes());
            bytes.extend(name.as_bytes());
            bytes.extend((parts.len() as i32).to_be_bytes());
            for p in parts {
                bytes.extend(p.to_be_bytes());
            }
        }
        bytes.extend((-1i32).to_be_bytes()); // no user data
        let parsed = parse_assignment(&bytes).unwrap();
        assert_eq!(
            parsed,
            BTreeMap::from([("a".to_owned(), vec![0]), ("b".to_owned(), vec![1, 3])])
        );
        assert!(parse_assignment(&bytes[..9]).is_err());
    }
}
