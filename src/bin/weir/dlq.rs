//! `weir dlq`: look into a dead-letter topic and redrive it.
//!
//! - `list`: counts by error kind, reason, handler and original topic, oldest and newest record;
//! - `show`: one record, its headers, its value (pretty-printed when it is JSON);
//! - `replay`: republishes selected dead letters to their original topic (or `--to-topic`): the
//!   original key, value and headers, without Weir's failure headers, plus `weir.replay.count`
//!   (incremented), `weir.replay.id` and `weir.replay.source`. Records replayed `--max-replays`
//!   times already go to `<original topic>.parking` instead, for a person to look at.
//!
//! # A replay publishes each record once, even when it is killed
//! Progress is committed in the consumer group `weir-replay-<id>`, so running the same replay id
//! again resumes after the last committed dead letter. Between a publish and the commit after
//! it there is a window: a replay killed there would publish those records again. To close it,
//! before its first publish to a topic after each progress commit, the replay commits, in the
//! same group, that topic's current end offsets (a guard). On start, it reads every topic it has
//! a guard for from the guard to the end and collects the records whose `weir.replay.id` is its
//! own: their `weir.replay.source` names dead letters already published, which it skips. The
//! producer is idempotent, so its own retries add no duplicates either.

use crate::kafka_read::{format_time, GroupClient, Position, ReadRecord};
use anyhow::{bail, Context as _};
use rdkafka::producer::FutureProducer;
use rdkafka::Offset;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::time::{Duration, Instant};
use weir::dead_letter_headers as header;
use weir::{Headers, KafkaConfig, OutboundRecord};

/// How many published records, at most, between two progress commits.
const COMMIT_EVERY: u64 = 100;
/// How long, at most, between two progress commits while publishing.
const COMMIT_INTERVAL: Duration = Duration::from_secs(1);

#[derive(Debug, clap::Args)]
pub(crate) struct DlqArgs {
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(Debug, clap::Subcommand)]
enum DlqCommand {
    /// Count a dead-letter topic's records by error kind, reason, handler and original topic.
    List(ListArgs),
    /// Show one dead letter: its headers and its value.
    Show(ShowArgs),
    /// Republish dead letters to their original topic once the cause is fixed.
    Replay(ReplayArgs),
}

#[derive(Debug, clap::Args)]
struct ListArgs {
    /// The dead-letter topic, e.g. customers.dlq.
    #[arg(long)]
    topic: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
struct ShowArgs {
    /// The dead-letter topic.
    #[arg(long)]
    topic: String,
    /// The record's offset.
    #[arg(long)]
    offset: i64,
    /// The record's partition.
    #[arg(long, default_value_t = 0)]
    partition: i32,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, clap::Args)]
pub(crate) struct ReplayArgs {
    /// The dead-letter topic to replay, e.g. customers.dlq.
    #[arg(long)]
    topic: String,
    /// First record to replay: an offset (in every partition) or an RFC 3339 time.
    #[arg(long)]
    from: Option<Position>,
    /// Last record to replay (included): an offset or an RFC 3339 time.
    #[arg(long)]
    to: Option<Position>,
    /// Only records matching all of these: kind=…,reason=…,handler=…,key=…,topic=…,type=… (topic
    /// is the original topic, type the event type).
    #[arg(long, value_parser = parse_filter)]
    filter: Option<Filter>,
    /// Publish here instead of each record's original topic.
    #[arg(long)]
    to_topic: Option<String>,
    /// At most this many records per second, e.g. 50/s.
    #[arg(long, value_parser = parse_rate)]
    rate: Option<f64>,
    /// Records already replayed this many times go to `<original topic>.parking` instead.
    #[arg(long, default_value_t = 3)]
    max_replays: u32,
    /// The replay's id. Run again with the same id to resume an interrupted replay; a new id
    /// (the default) starts from the beginning.
    #[arg(long)]
    id: Option<String>,
    /// Count what would be replayed; publish and commit nothing.
    #[arg(long)]
    dry_run: bool,
    /// Do not ask for confirmation.
    #[arg(long)]
    yes: bool,
    /// For tests: abort the process right after the Nth publish is acknowledged, before its
    /// progress is committed.
    #[arg(long, hide = true)]
    crash_after: Option<u64>,
    /// Each partition's end, pinned by an earlier dry run (the console's confirm): the replay
    /// covers what the operator was shown, not the dead letters written since.
    #[arg(skip)]
    until: Option<BTreeMap<i32, i64>>,
}

#[cfg(feature = "console")]
impl ReplayArgs {
    /// A replay of `topic` as the console asks for it: the range and filter the operator gave
    /// (`filter` in `--filter`'s syntax), under replay `id` when confirming; the defaults of
    /// `weir dlq replay` otherwise. An error names the input that is wrong.
    pub(crate) fn for_console(
        topic: &str,
        from: Option<Position>,
        to: Option<Position>,
        filter: Option<&str>,
        dry_run: bool,
        until: Option<BTreeMap<i32, i64>>,
    ) -> Result<Self, String> {
        Ok(Self {
            topic: topic.to_owned(),
            from,
            to,
            filter: filter.map(parse_filter).transpose()?,
            to_topic: None,
            rate: None,
            max_replays: 3,
            id: None,
            dry_run,
            yes: true,
            crash_after: None,
            until,
        })
    }
}

pub(crate) async fn run(kafka: KafkaConfig, args: DlqArgs) -> anyhow::Result<()> {
    match args.command {
        DlqCommand::List(args) => list(&kafka, args).await,
        DlqCommand::Show(args) => show(&kafka, args).await,
        DlqCommand::Replay(args) => replay(&kafka, args).await,
    }
}

/// A client in a group of its own, for reading only (it never commits).
pub(crate) fn reader_client(kafka: &KafkaConfig) -> anyhow::Result<GroupClient> {
    GroupClient::new(
        kafka,
        &format!("weir-dlq-reader-{}", uuid::Uuid::new_v4().simple()),
    )
}

#[derive(Debug, Serialize)]
struct RecordRef {
    partition: i32,
    offset: i64,
    time: String,
}

#[derive(Debug, Default, Serialize)]
struct Listing {
    topic: String,
    records: u64,
    by_kind: BTreeMap<String, u64>,
    by_reason: BTreeMap<String, u64>,
    by_handler: BTreeMap<String, u64>,
    by_original_topic: BTreeMap<String, u64>,
    oldest: Option<RecordRef>,
    newest: Option<RecordRef>,
    #[serde(skip)]
    oldest_ms: Option<i64>,
    #[serde(skip)]
    newest_ms: Option<i64>,
}

impl Listing {
    fn add(&mut self, r: &ReadRecord) {
        let label = |name: &str| r.header(name).unwrap_or("-").to_owned();
        self.records += 1;
        *self.by_kind.entry(label(header::ERROR_KIND)).or_default() += 1;
        *self
            .by_reason
            .entry(label(header::ERROR_REASON))
            .or_default() += 1;
        let handler = match r.header(header::HANDLER) {
            Some("") => "(none: not decoded)".to_owned(),
            other => other.unwrap_or("-").to_owned(),
        };
        *self.by_handler.entry(handler).or_default() += 1;
        *self
            .by_original_topic
            .entry(label(header::ORIGINAL_TOPIC))
            .or_default() += 1;
        let at = || RecordRef {
            partition: r.partition,
            offset: r.offset,
            time: format_time(r.timestamp_ms),
        };
        let ms = r.timestamp_ms.unwrap_or(i64::MAX);
        if self.oldest.is_none() || ms < self.oldest_ms.unwrap_or(i64::MAX) {
            self.oldest = Some(at());
            self.oldest_ms = Some(ms);
        }
        if self.newest.is_none() || ms >= self.newest_ms.unwrap_or(i64::MIN) {
            self.newest = Some(at());
            self.newest_ms = Some(ms);
        }
    }

    fn print(&self) {
        println!("{}: {} dead letters", self.topic, self.records);
        for (title, counts) in [
            ("error kind", &self.by_kind),
            ("reason", &self.by_reason),
            ("handler", &self.by_handler),
            ("original topic", &self.by_original_topic),
        ] {
            if counts.is_empty() {
                continue;
            }
            println!("\n  {title:<40} {:>10}", "records");
            for (value, count) in counts {
                println!("  {value:<40} {count:>10}");
            }
        }
        for (title, r) in [("oldest", &self.oldest), ("newest", &self.newest)] {
            if let Some(r) = r {
                println!(
                    "\n{title}: partition {} offset {} at {}",
                    r.partition, r.offset, r.time
                );
            }
        }
    }
}

/// What `weir inspect` shows of a dead-letter topic.
#[derive(Debug, Serialize)]
pub(crate) struct ListingSummary {
    pub(crate) records: u64,
    pub(crate) by_kind: BTreeMap<String, u64>,
}

/// Counts the dead letters of `topic` that `group` wrote, by kind.
pub(crate) async fn count_for_group(
    kafka: &KafkaConfig,
    topic: &str,
    group: &str,
) -> anyhow::Result<ListingSummary> {
    let listing = read_listing(kafka, topic, |r| {
        r.header(header::CONSUMER_GROUP) == Some(group)
    })
    .await?;
    Ok(ListingSummary {
        records: listing.records,
        by_kind: listing.by_kind,
    })
}

async fn read_listing(
    kafka: &KafkaConfig,
    topic: &str,
    keep: impl Fn(&ReadRecord) -> bool,
) -> anyhow::Result<Listing> {
    let client = reader_client(kafka)?;
    let starts = client
        .partitions(topic)?
        .into_iter()
        .map(|p| (p, Offset::Beginning))
        .collect();
    let mut reader = client.reader(topic, &starts)?;
    let mut listing = Listing {
        topic: topic.to_owned(),
        ..Listing::default()
    };
    while let Some(record) = reader.next().await? {
        if keep(&record) {
            listing.add(&record);
        }
    }
    Ok(listing)
}

async fn list(kafka: &KafkaConfig, args: ListArgs) -> anyhow::Result<()> {
    let listing = read_listing(kafka, &args.topic, |_| true).await?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&listing)?);
    } else {
        listing.print();
    }
    Ok(())
}

async fn show(kafka: &KafkaConfig, args: ShowArgs) -> anyhow::Result<()> {
    let client = reader_client(kafka)?;
    if !client.partitions(&args.topic)?.contains(&args.partition) {
        bail!("topic {} has no partition {}", args.topic, args.partition);
    }
    let starts = BTreeMap::from([(args.partition, Offset::Offset(args.offset))]);
    let mut reader = client.reader(&args.topic, &starts)?;
    let record = loop {
        match reader.next().await? {
            Some(r) if r.offset == args.offset => break r,
            // Compacted away or skipped by the broker: the next one is past it.
            Some(r) if r.offset > args.offset => bail!(
                "{}/{}: no record at offset {} (the next one is {})",
                args.topic,
                args.partition,
                args.offset,
                r.offset
            ),
            Some(_) => {}
            None => bail!(
                "{}/{}: no record at offset {}",
                args.topic,
                args.partition,
                args.offset
            ),
        }
    };
    let text = |b: &Option<Vec<u8>>| b.as_ref().map(|b| String::from_utf8_lossy(b).into_owned());
    let value_json = record
        .value
        .as_ref()
        .and_then(|v| serde_json::from_slice::<serde_json::Value>(v).ok());
    if args.json {
        let headers: BTreeMap<&str, String> = record
            .headers
            .iter()
            .map(|(k, v)| (k, String::from_utf8_lossy(v).into_owned()))
            .collect();
        let out = serde_json::json!({
            "topic": record.topic,
            "partition": record.partition,
            "offset": record.offset,
            "time": format_time(record.timestamp_ms),
            "key": text(&record.key),
            "headers": headers,
            "value": value_json.clone().unwrap_or_else(
                || text(&record.value).map_or(serde_json::Value::Null, serde_json::Value::String),
            ),
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!(
        "{} partition {} offset {} at {}",
        record.topic,
        record.partition,
        record.offset,
        format_time(record.timestamp_ms)
    );
    println!(
        "key: {}",
        text(&record.key).unwrap_or_else(|| "(none)".into())
    );
    println!("headers:");
    for (k, v) in record.headers.iter() {
        println!("  {k}: {}", String::from_utf8_lossy(v));
    }
    println!("value:");
    match value_json {
        Some(v) => println!("{}", serde_json::to_string_pretty(&v)?),
        None => println!("{}", text(&record.value).unwrap_or_else(|| "(none)".into())),
    }
    Ok(())
}

/// `--filter kind=…,reason=…,handler=…,key=…,topic=…,type=…`: every listed field must match exactly.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct Filter {
    fields: Vec<(FilterField, String)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FilterField {
    Kind,
    Reason,
    Handler,
    Key,
    Topic,
    Type,
}

fn parse_filter(s: &str) -> Result<Filter, String> {
    let mut fields = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, value) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}` is not name=value"))?;
        let field = match name.trim() {
            "kind" => FilterField::Kind,
            "reason" => FilterField::Reason,
            "handler" => FilterField::Handler,
            "key" => FilterField::Key,
            "topic" => FilterField::Topic,
            "type" => FilterField::Type,
            other => {
                return Err(format!(
                    "unknown filter `{other}` (kind, reason, handler, key, topic, type)"
                ))
            }
        };
        fields.push((field, value.trim().to_owned()));
    }
    Ok(Filter { fields })
}

impl Filter {
    fn matches(&self, r: &ReadRecord) -> bool {
        self.fields.iter().all(|(field, want)| {
            let got = match field {
                FilterField::Kind => r.header(header::ERROR_KIND).map(str::to_owned),
                FilterField::Reason => r.header(header::ERROR_REASON).map(str::to_owned),
                FilterField::Handler => r.header(header::HANDLER).map(str::to_owned),
                FilterField::Topic => r.header(header::ORIGINAL_TOPIC).map(str::to_owned),
                FilterField::Type => event_type(r),
                FilterField::Key => r
                    .key
                    .as_ref()
                    .map(|k| String::from_utf8_lossy(k).into_owned()),
            };
            got.as_deref() == Some(want.as_str())
        })
    }
}

/// A record's CloudEvents type: the `ce_type` header (binary mode), else the `type` of a JSON
/// value (structured mode).
pub(crate) fn event_type(r: &ReadRecord) -> Option<String> {
    if let Some(t) = r.header("ce_type") {
        return Some(t.to_owned());
    }
    let value: serde_json::Value = serde_json::from_slice(r.value.as_deref()?).ok()?;
    value.get("type")?.as_str().map(str::to_owned)
}

fn parse_rate(s: &str) -> Result<f64, String> {
    let n = s.strip_suffix("/s").unwrap_or(s);
    match n.trim().parse::<f64>() {
        Ok(rate) if rate > 0.0 && rate.is_finite() => Ok(rate),
        _ => Err(format!("`{s}` is not a rate such as 50/s")),
    }
}

/// What a replay did, printed at the end.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct Tally {
    /// Records in range that matched the filter.
    pub(crate) selected: u64,
    /// Republished to their topic.
    pub(crate) replayed: u64,
    /// Sent to `<topic>.parking` (over `--max-replays`).
    pub(crate) parked: u64,
    /// Selected but not published: already published by an interrupted run of this replay, or
    /// with no topic to go to.
    pub(crate) skipped: u64,
    /// Records replayed or parked (counted, in a dry run) by the topic they go to.
    pub(crate) targets: BTreeMap<String, u64>,
}

/// What one run of a replay did.
pub(crate) struct Outcome {
    pub(crate) tally: Tally,
    /// Each partition's end the run stopped at (the range it covered; the console pins it).
    #[cfg_attr(not(feature = "console"), allow(dead_code))]
    pub(crate) ends: BTreeMap<i32, i64>,
    /// Why the run stopped early, if it did; running it again under the same id resumes.
    pub(crate) failure: Option<anyhow::Error>,
}

/// Where a selected dead letter goes, and as what.
#[derive(Debug, PartialEq, Eq)]
enum Action {
    Replay(OutboundRecord),
    Park(OutboundRecord),
    Skip(&'static str),
}

fn source_of(r: &ReadRecord) -> String {
    format!("{}:{}:{}", r.topic, r.partition, r.offset)
}

/// Decides what to do with one selected dead letter.
fn plan(r: &ReadRecord, id: &str, to_topic: Option<&str>, max_replays: u32) -> Action {
    let original = r.header(header::ORIGINAL_TOPIC).filter(|t| !t.is_empty());
    let Some(destination) = to_topic.or(original) else {
        return Action::Skip("no weir.original.topic header and no --to-topic");
    };
    let count: u32 = r
        .header(header::REPLAY_COUNT)
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or(0);
    if count >= max_replays {
        // Parked as it is, failure headers included: a person will want to see them.
        let mut headers = r.headers.clone();
        headers.set(header::REPLAY_ID, id);
        headers.set(header::REPLAY_SOURCE, source_of(r));
        return Action::Park(OutboundRecord {
            topic: format!("{}.parking", original.unwrap_or(destination)),
            key: r.key.clone(),
            value: r.value.clone(),
            headers,
        });
    }
    let mut headers: Headers = r
        .headers
        .iter()
        .filter(|(k, _)| {
            !header::FAILURE.contains(k)
                && *k != header::REPLAY_COUNT
                && *k != header::REPLAY_ID
                && *k != header::REPLAY_SOURCE
        })
        .map(|(k, v)| (k.to_owned(), v.to_vec()))
        .collect();
    headers.set(header::REPLAY_COUNT, (count + 1).to_string());
    headers.set(header::REPLAY_ID, id);
    headers.set(header::REPLAY_SOURCE, source_of(r));
    Action::Replay(OutboundRecord {
        topic: destination.to_owned(),
        key: r.key.clone(),
        value: r.value.clone(),
        headers,
    })
}

async fn replay(kafka: &KafkaConfig, args: ReplayArgs) -> anyhow::Result<()> {
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::now_v7().simple().to_string());
    let outcome = execute(kafka, &args, &id, |resumed| {
        announce(&args, &id, resumed);
        if args.dry_run || args.yes {
            Ok(true)
        } else {
            confirm(&args, &id)
        }
    })
    .await?;
    outcome.tally.print(args.dry_run, &id);
    match outcome.failure {
        Some(e) => Err(e.context(format!(
            "the replay stopped; run it again with --id {id} to resume"
        ))),
        None => Ok(()),
    }
}

/// Runs replay `id` (the engine of `weir dlq replay` and of the console's replay): reads its
/// range, asks `approve` (told whether the run resumes an earlier one) before publishing
/// anything, then publishes and commits its progress. A dry run publishes and commits nothing.
pub(crate) async fn execute(
    kafka: &KafkaConfig,
    args: &ReplayArgs,
    id: &str,
    approve: impl FnOnce(bool) -> anyhow::Result<bool>,
) -> anyhow::Result<Outcome> {
    if args.to_topic.as_deref() == Some(args.topic.as_str()) {
        bail!("--to-topic is the dead-letter topic itself");
    }
    let client = GroupClient::new(kafka, &format!("weir-replay-{id}"))?;
    let range = Range::read(&client, args)?;
    let already = if args.dry_run {
        HashSet::new()
    } else {
        published_by(kafka, &client, id, &args.topic).await?
    };
    if !approve(range.resumed)? {
        bail!("not confirmed; nothing was published");
    }
    let ends = range.ends.clone();
    let mut run = Replay::new(kafka, args, id, &client, already, range.ends)?;
    let failure = run.read_and_publish(&range.starts).await?;
    if !args.dry_run {
        client.commit(&run.positions)?;
    }
    Ok(Outcome {
        tally: run.tally,
        ends,
        failure,
    })
}

/// The dead letters a replay reads, per partition: from its start to the end it stops at.
struct Range {
    /// Partitions with something to read, and where.
    starts: BTreeMap<i32, Offset>,
    /// Each partition's end when the replay started; its records there are not replayed.
    ends: BTreeMap<i32, i64>,
    /// Whether a partition starts after the replay's committed progress.
    resumed: bool,
}

impl Range {
    /// A partition starts after the progress an earlier run of the replay committed, or at
    /// `--from`'s offset (whichever is later), else at its beginning.
    ///
    /// The replay covers what is in the topic now. Replayed records that fail again are
    /// dead-lettered behind this end while the replay runs; reading on would replay them again
    /// at once, in a loop. (A lower bound on brokers that under-report the end: what lies past
    /// it is left for the next replay, never replayed twice.)
    fn read(client: &GroupClient, args: &ReplayArgs) -> anyhow::Result<Self> {
        let partitions = client.partitions(&args.topic)?;
        let coordinates: Vec<(String, i32)> = partitions
            .iter()
            .map(|p| (args.topic.clone(), *p))
            .collect();
        let committed = client.committed(&coordinates)?;
        let from_offset = match args.from {
            Some(Position::Offset(o)) => Some(o),
            _ => None,
        };
        let mut starts = BTreeMap::new();
        let mut resumed = false;
        for p in &partitions {
            let start = match committed.get(&(args.topic.clone(), *p)) {
                Some(&c) => {
                    resumed = true;
                    Offset::Offset(c.max(from_offset.unwrap_or(0)))
                }
                None => from_offset.map_or(Offset::Beginning, Offset::Offset),
            };
            starts.insert(*p, start);
        }
        let mut ends = BTreeMap::new();
        for p in &partitions {
            let (low, high) = client.watermarks(&args.topic, *p)?;
            // A pinned end holds the range to what a dry run showed; a partition it did not
            // know has nothing in range.
            let high = match &args.until {
                Some(until) => until.get(p).copied().unwrap_or(low).min(high),
                None => high,
            };
            let start = match starts[p] {
                Offset::Offset(o) => o,
                _ => low,
            };
            if start >= high {
                starts.remove(p);
            }
            ends.insert(*p, high);
        }
        Ok(Self {
            starts,
            ends,
            resumed,
        })
    }
}

fn announce(args: &ReplayArgs, id: &str, resumed: bool) {
    eprintln!(
        "replay {id}: {} from {} ({})",
        if args.dry_run {
            "dry run of"
        } else {
            "replaying"
        },
        args.topic,
        if resumed {
            "resuming after its committed progress"
        } else {
            "from the start of the range"
        }
    );
}

impl Tally {
    fn count(&mut self, parked: bool, target: &str) {
        *self.targets.entry(target.to_owned()).or_default() += 1;
        if parked {
            self.parked += 1;
        } else {
            self.replayed += 1;
        }
    }

    fn print(&self, dry_run: bool, id: &str) {
        println!(
            "{}selected {}, replayed {}, parked {}, skipped {} (replay id {id})",
            if dry_run {
                "dry run, nothing published: "
            } else {
                ""
            },
            self.selected,
            self.replayed,
            self.parked,
            self.skipped
        );
    }
}

/// A replay under way: what it has published, and the progress it commits.
struct Replay<'a> {
    kafka: &'a KafkaConfig,
    args: &'a ReplayArgs,
    id: &'a str,
    client: &'a GroupClient,
    producer: FutureProducer,
    /// Dead letters an interrupted run of this replay published already.
    already: HashSet<(i32, i64)>,
    /// Each partition's end when the replay started ([`Range`]).
    ends: BTreeMap<i32, i64>,
    tally: Tally,
    /// The next dead letter of each partition: the progress to commit.
    positions: BTreeMap<(String, i32), i64>,
    /// The topics guarded since the last progress commit ([`guard`]).
    guarded: HashSet<String>,
    since_commit: u64,
    last_commit: Instant,
    published: u64,
    /// `--rate`'s interval, and when the next publish may start.
    pace: Option<(Duration, Instant)>,
}

impl<'a> Replay<'a> {
    fn new(
        kafka: &'a KafkaConfig,
        args: &'a ReplayArgs,
        id: &'a str,
        client: &'a GroupClient,
        already: HashSet<(i32, i64)>,
        ends: BTreeMap<i32, i64>,
    ) -> anyhow::Result<Self> {
        let producer: FutureProducer = {
            let mut config = kafka.producer_config();
            // One record at a time, acknowledged before the next: no batching delay to wait for.
            config.set("linger.ms", "0");
            config.create().context("cannot create the producer")?
        };
        Ok(Self {
            kafka,
            args,
            id,
            client,
            producer,
            already,
            ends,
            tally: Tally::default(),
            positions: BTreeMap::new(),
            guarded: HashSet::new(),
            since_commit: 0,
            last_commit: Instant::now(),
            published: 0,
            pace: args
                .rate
                .map(|r| (Duration::from_secs_f64(1.0 / r), Instant::now())),
        })
    }

    /// Reads the range and takes each dead letter in it, committing progress as it goes.
    /// `Ok(Some(error))` when a publish failed: the replay stops there, and what it did so far
    /// is still to be committed and reported.
    async fn read_and_publish(
        &mut self,
        starts: &BTreeMap<i32, Offset>,
    ) -> anyhow::Result<Option<anyhow::Error>> {
        let mut reader = self.client.reader(&self.args.topic, starts)?;
        while let Some(record) = reader.next().await? {
            if self.past_range(&record) {
                // Nothing more to read in this partition.
                reader.close(record.partition);
                continue;
            }
            match self.take(&record).await {
                Ok(true) => self.commit_if_due()?,
                Ok(false) => {}
                Err(failure) => return Ok(Some(failure)),
            }
        }
        Ok(None)
    }

    /// Whether the record lies past the range of its partition: dead-lettered after the replay
    /// started ([`Range`]), or past `--to`'s offset.
    fn past_range(&self, record: &ReadRecord) -> bool {
        if record.offset >= self.ends[&record.partition] {
            return true;
        }
        matches!(self.args.to, Some(Position::Offset(last)) if record.offset > last)
    }

    /// Whether the record is in `--from`/`--to` and matches `--filter`.
    fn selects(&self, record: &ReadRecord) -> bool {
        let args = self.args;
        let in_range = args
            .from
            .is_none_or(|f| f.at_or_after(record.offset, record.timestamp_ms))
            && args
                .to
                .is_none_or(|t| t.at_or_before(record.offset, record.timestamp_ms));
        in_range && args.filter.as_ref().is_none_or(|f| f.matches(record))
    }

    /// One dead letter of the range: passed over, counted (in a dry run), or published.
    /// `Ok(true)` once published; `Err` if that failed.
    async fn take(&mut self, record: &ReadRecord) -> anyhow::Result<bool> {
        let next = ((record.topic.clone(), record.partition), record.offset + 1);
        if !self.selects(record) {
            self.positions.insert(next.0, next.1);
            return Ok(false);
        }
        self.tally.selected += 1;
        if self.already.contains(&(record.partition, record.offset)) {
            self.tally.skipped += 1;
            self.positions.insert(next.0, next.1);
            return Ok(false);
        }
        let args = self.args;
        let (planned, parked) =
            match plan(record, self.id, args.to_topic.as_deref(), args.max_replays) {
                Action::Replay(p) => (p, false),
                Action::Park(p) => (p, true),
                Action::Skip(why) => {
                    eprintln!(
                        "skipping {}/{} offset {}: {why}",
                        record.topic, record.partition, record.offset
                    );
                    self.tally.skipped += 1;
                    self.positions.insert(next.0, next.1);
                    return Ok(false);
                }
            };
        if args.dry_run {
            self.tally.count(parked, &planned.topic);
            return Ok(false);
        }
        self.send(&planned).await.map_err(|e| {
            e.context(format!(
                "publishing {}/{} offset {} to {}",
                record.topic, record.partition, record.offset, planned.topic
            ))
        })?;
        self.published += 1;
        if args.crash_after == Some(self.published) {
            eprintln!(
                "--crash-after {}: aborting before the progress commit",
                self.published
            );
            std::process::abort();
        }
        self.tally.count(parked, &planned.topic);
        self.positions.insert(next.0, next.1);
        self.since_commit += 1;
        Ok(true)
    }

    /// Publishes one record, at `--rate`'s pace, after guarding its topic if it is the
    /// first publish there since the last progress commit.
    async fn send(&mut self, planned: &OutboundRecord) -> anyhow::Result<()> {
        if !self.guarded.contains(&planned.topic) {
            guard(self.client, &planned.topic)?;
            self.guarded.insert(planned.topic.clone());
        }
        if let Some((interval, next_at)) = &mut self.pace {
            tokio::time::sleep_until((*next_at).into()).await;
            *next_at = Instant::now().max(*next_at) + *interval;
        }
        publish(&self.producer, planned, self.kafka.delivery_timeout).await
    }

    /// Commits the progress every [`COMMIT_EVERY`] records or [`COMMIT_INTERVAL`]; a topic is
    /// guarded again before its next publish.
    fn commit_if_due(&mut self) -> anyhow::Result<()> {
        if self.since_commit >= COMMIT_EVERY || self.last_commit.elapsed() >= COMMIT_INTERVAL {
            self.client.commit(&self.positions)?;
            self.guarded.clear();
            self.since_commit = 0;
            self.last_commit = Instant::now();
        }
        Ok(())
    }
}

fn confirm(args: &ReplayArgs, id: &str) -> anyhow::Result<bool> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        bail!("stdin is not a terminal: pass --yes to replay without confirmation");
    }
    eprint!(
        "Republish the selected dead letters of {} to {} (replay id {id})? [y/N] ",
        args.topic,
        args.to_topic.as_deref().unwrap_or("their original topics")
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes"))
}

/// Commits, in the replay's group, the current end of every partition of `topic`: anything this
/// replay publishes to `topic` before its next progress commit lands after it.
fn guard(client: &GroupClient, topic: &str) -> anyhow::Result<()> {
    let mut ends = BTreeMap::new();
    for p in client.partitions(topic)? {
        let (_, high) = client.watermarks(topic, p)?;
        ends.insert((topic.to_owned(), p), high);
    }
    client.commit(&ends)
}

/// The dead letters (partition, offset) of `dlq` that an earlier run of replay `id` published
/// after its last progress commit: the records carrying `weir.replay.id = id` found after the
/// replay group's guards.
async fn published_by(
    kafka: &KafkaConfig,
    client: &GroupClient,
    id: &str,
    dlq: &str,
) -> anyhow::Result<HashSet<(i32, i64)>> {
    let candidates: Vec<(String, i32)> = client
        .all_topics()?
        .into_iter()
        .filter(|(topic, _)| topic != dlq)
        .flat_map(|(topic, ps)| ps.into_iter().map(move |p| (topic.clone(), p)))
        .collect();
    let guards = client.committed(&candidates)?;
    let mut by_topic: BTreeMap<String, BTreeMap<i32, Offset>> = BTreeMap::new();
    for ((topic, p), offset) in guards {
        by_topic
            .entry(topic)
            .or_default()
            .insert(p, Offset::Offset(offset));
    }
    let mut found = HashSet::new();
    let prefix = format!("{dlq}:");
    for (topic, starts) in by_topic {
        let scanner = reader_client(kafka)?;
        let mut reader = scanner.reader(&topic, &starts)?;
        while let Some(r) = reader.next().await? {
            if r.header(header::REPLAY_ID) != Some(id) {
                continue;
            }
            let Some(rest) = r
                .header(header::REPLAY_SOURCE)
                .and_then(|s| s.strip_prefix(&prefix))
            else {
                continue;
            };
            if let Some((p, o)) = rest.split_once(':') {
                if let (Ok(p), Ok(o)) = (p.parse(), o.parse()) {
                    found.insert((p, o));
                }
            }
        }
    }
    if !found.is_empty() {
        eprintln!(
            "replay {id}: {} dead letters were published before the last run stopped; they are skipped",
            found.len()
        );
    }
    Ok(found)
}

async fn publish(
    producer: &FutureProducer,
    record: &OutboundRecord,
    timeout: Duration,
) -> anyhow::Result<()> {
    producer
        .send(
            record.to_future_record(),
            rdkafka::util::Timeout::After(timeout),
        )
        .await
        .map(|_| ())
        .map_err(|(e, _)| anyhow::anyhow!(e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dead_letter(headers: &[(&str, &str)]) -> ReadRecord {
        ReadRecord {
            topic: "customers.dlq".into(),
            partition: 0,
            offset: 7,
            timestamp_ms: Some(0),
            key: Some(b"c-1".to_vec()),
            value: Some(b"{}".to_vec()),
            headers: headers.iter().map(|(k, v)| (*k, v.as_bytes())).collect(),
        }
    }

    #[test]
    fn a_replay_strips_failure_headers_keeps_the_others_and_counts_itself() {
        let r = dead_letter(&[
            ("traceparent", "00-abc-def-01"),
            (header::ORIGINAL_TOPIC, "customers"),
            (header::ERROR_KIND, "retries_exhausted"),
            (header::ATTEMPTS, "3"),
            (header::HANDLER, "h"),
            (header::REPLAY_COUNT, "1"),
            (header::REPLAY_ID, "old"),
        ]);
        let Action::Replay(p) = plan(&r, "new", None, 3) else {
            panic!("replayed");
        };
        assert_eq!(p.topic, "customers");
        assert_eq!(p.key.as_deref(), Some(&b"c-1"[..]));
        let names: Vec<&str> = p.headers.iter().map(|(k, _)| k).collect();
        assert_eq!(
            names,
            [
                "traceparent",
                header::REPLAY_COUNT,
                header::REPLAY_ID,
                header::REPLAY_SOURCE
            ]
        );
        assert_eq!(p.headers.get_str(header::REPLAY_COUNT), Some("2"));
        assert_eq!(p.headers.get_str(header::REPLAY_ID), Some("new"));
        assert_eq!(
            p.headers.get_str(header::REPLAY_SOURCE),
            Some("customers.dlq:0:7")
        );
    }

    #[test]
    fn a_record_replayed_max_times_goes_to_parking_with_its_failure_headers() {
        let r = dead_letter(&[
            (header::ORIGINAL_TOPIC, "customers"),
            (header::ERROR_KIND, "acknowledged"),
            (header::REPLAY_COUNT, "3"),
        ]);
        let Action::Park(p) = plan(&r, "id", Some("elsewhere"), 3) else {
            panic!("parked");
        };
        assert_eq!(p.topic, "customers.parking");
        assert_eq!(p.headers.get_str(header::ERROR_KIND), Some("acknowledged"));
        assert!(matches!(plan(&r, "id", None, 4), Action::Replay(_)));
    }

    #[test]
    fn a_record_without_a_destination_is_skipped() {
        assert!(matches!(
            plan(&dead_letter(&[]), "id", None, 3),
            Action::Skip(_)
        ));
        assert!(matches!(
            plan(&dead_letter(&[]), "id", Some("t"), 3),
            Action::Replay(_)
        ));
    }

    #[test]
    fn filters_match_every_listed_field() {
        let f = parse_filter("kind=retries_exhausted, key=c-1").unwrap();
        let r = dead_letter(&[(header::ERROR_KIND, "retries_exhausted")]);
        assert!(f.matches(&r));
        let f = parse_filter("kind=retries_exhausted,handler=h").unwrap();
        assert!(!f.matches(&r));
        assert!(parse_filter("colour=red").is_err());
        assert!(parse_filter("kind").is_err());
    }

    #[test]
    fn a_rate_is_a_positive_number_per_second() {
        assert_eq!(parse_rate("50/s"), Ok(50.0));
        assert_eq!(parse_rate("2.5"), Ok(2.5));
        assert!(parse_rate("0/s").is_err());
        assert!(parse_rate("fast").is_err());
    }
}
