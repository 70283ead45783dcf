//! `weir inspect`: one look at a consumer group's state.
//!
//! - the group's state, members and their assignment (as the group coordinator describes them);
//! - per partition: the committed offset, the log end and the lag (log end - committed; from the
//!   log start when nothing is committed);
//! - dead letters the group wrote, by error kind (reading its dead-letter topics);
//! - with a database: parked records (durable retries), with the keys parked longest one by one,
//!   and the outbox's pending rows.
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
    /// Parked keys listed one by one, oldest first (the totals always count them all).
    #[arg(long, default_value_t = 20)]
    parked_keys: i64,
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
    /// The keys with the oldest parked records, at most `--parked-keys` of `keys`.
    by_key: Vec<ParkedKey>,
}

/// One key's parked records (for one handler): what holds the key, and when the worker tries
/// its head record again.
#[derive(Debug, Serialize)]
struct ParkedKey {
    handler: String,
    topic: String,
    partition: i32,
    /// The record key as text (invalid UTF-8 replaced); `null` for records without a key.
    key: Option<String>,
    records: i64,
    oldest_age_seconds: f64,
    /// The key's head record: the one the worker retries, and the calls it has had so far.
    head_offset: i64,
    head_attempts: i32,
    /// Seconds until the head's next attempt; 0 when it is due.
    next_attempt_in_seconds: f64,
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
        Some(_) => database_state(&settings, &group, args.parked_keys.max(0)).await?,
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
    listed_keys: i64,
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
            by_key: parked_keys(&pool, group, listed_keys).await?,
        })
    } else {
        None
    };
    pool.close().await;
    Ok((parked, outbox))
}

/// The `limit` keys (per handler, topic and partition) with the oldest parked records, with
/// their head row: the lowest offset, the only one the worker retries.
async fn parked_keys(
    pool: &sqlx::PgPool,
    group: &str,
    limit: i64,
) -> anyhow::Result<Vec<ParkedKey>> {
    use sqlx::Row as _;
    let rows = sqlx::query(
        "WITH keys AS ( \
             SELECT handler, topic, partition, key, count(*) AS records, \
                    min(parked_at) AS oldest, min(\"offset\") AS head_offset \
             FROM weir_parked WHERE group_id = $1 \
             GROUP BY handler, topic, partition, key \
             ORDER BY oldest, topic, partition, handler, key \
             LIMIT $2) \
         SELECT k.handler, k.topic, k.partition, k.key, k.records, \
                EXTRACT(EPOCH FROM now() - k.oldest)::float8 AS oldest_age_seconds, \
                k.head_offset, h.attempts AS head_attempts, \
                GREATEST(EXTRACT(EPOCH FROM h.next_attempt_at - now()), 0)::float8 \
                    AS next_attempt_in_seconds \
         FROM keys k JOIN weir_parked h \
           ON h.group_id = $1 AND h.handler = k.handler AND h.topic = k.topic \
          AND h.partition = k.partition AND h.\"offset\" = k.head_offset \
         ORDER BY k.oldest, k.topic, k.partition, k.handler, k.key",
    )
    .bind(group)
    .bind(limit)
    .fetch_all(pool)
    .await
    .context("reading the parked keys")?;
    rows.iter()
        .map(|row| {
            let key: Option<Vec<u8>> = row.try_get("key")?;
            Ok(ParkedKey {
                handler: row.try_get("handler")?,
                topic: row.try_get("topic")?,
                partition: row.try_get("partition")?,
                key: key.map(|k| String::from_utf8_lossy(&k).into_owned()),
                records: row.try_get("records")?,
                oldest_age_seconds: row.try_get("oldest_age_seconds")?,
                head_offset: row.try_get("head_offset")?,
                head_attempts: row.try_get("head_attempts")?,
                next_attempt_in_seconds: row.try_get("next_attempt_in_seconds")?,
            })
        })
        .collect::<Result<_, sqlx::Error>>()
        .context("reading the parked keys")
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
        Some(p) => {
            println!(
                "\nparked: {} records, {} keys, oldest {}",
                p.records,
                p.keys,
                age(p.oldest_age_seconds)
            );
            print_parked_keys(p);
        }
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

/// The per-key listing under the parked totals: one line per key, oldest first.
fn print_parked_keys(p: &Parked) {
    if p.by_key.is_empty() {
        return;
    }
    /// Keys are the user's bytes: long ones are cut so the table stays a table.
    fn cut(text: &str, width: usize) -> String {
        if text.chars().count() <= width {
            text.to_owned()
        } else {
            let mut cut: String = text.chars().take(width - 1).collect();
            cut.push('…');
            cut
        }
    }
    println!(
        "  {:<24} {:<24} {:>9} {:<24} {:>7} {:>8} {:>12} {:>8} {:>12}",
        "key",
        "topic",
        "partition",
        "handler",
        "records",
        "oldest",
        "head offset",
        "attempts",
        "next attempt"
    );
    for k in &p.by_key {
        let next = if k.next_attempt_in_seconds > 0.0 {
            format!("in {:.0} s", k.next_attempt_in_seconds.ceil())
        } else {
            "due".to_owned()
        };
        println!(
            "  {:<24} {:<24} {:>9} {:<24} {:>7} {:>8} {:>12} {:>8} {:>12}",
            k.key
                .as_deref()
                .map_or_else(|| "(no key)".to_owned(), |key| cut(key, 24)),
            cut(&k.topic, 24),
            k.partition,
            cut(&k.handler, 24),
            k.records,
            format!("{:.0} s", k.oldest_age_seconds),
            k.head_offset,
            k.head_attempts,
            next
        );
    }
    let shown = p.by_key.len() as i64;
    if shown < p.keys {
        println!(
            "  ({shown} of {} keys, oldest first; --parked-keys N for more)",
            p.keys
        );
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
