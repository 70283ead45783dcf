//! The transactional outbox, its relay and the idempotent inbox, against PostgreSQL (a fresh
//! schema per test) and a real Tansu broker (one per test).
//!
//! Published records are read back with a plain rdkafka consumer from the beginning of every
//! partition; "everything" means at least the expected count, then quiet for a moment (Tansu's
//! high watermark is not reliable, so ends are never computed from it). Records of one key share
//! a partition, so their read order is their publish order.

mod reference;
mod support;

use crate::reference::{TaskCreated, TaskFields, TriggeredBy};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use support::broker::{unique, Tansu};
use support::db::TestDb;
use support::process::{eventually, TestDir, WeirProcess};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use weir::{
    inbox, Bus, ConsumerConfig, Ctx, Delivery, Envelope, Event, EventFactory, EventType,
    HandlerError, HandlerOptions, Headers, InboxTx, KafkaBus, KafkaConfig, Migration,
    OutboundRecord, OutboxMetrics, OutboxRelay, OutboxWriter, PublishError, PublishExt, Publisher,
    RelayConfig, Router,
};

const TOPIC: &str = "outbox-numbered";
const PARTITIONS: i32 = 4;

/// The test event: the `n`th event of entity `key`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Numbered {
    key: String,
    n: u64,
}

impl Event for Numbered {
    const TYPE: EventType = EventType::new("test.numbered");
    const TOPIC: &'static str = TOPIC;
    fn key(&self) -> String {
        self.key.clone()
    }
}

// --- helpers -------------------------------------------------------------------------------

async fn broker_with_topics(sqlite: bool, topics: &[&str]) -> Tansu {
    let topics: Vec<String> = topics.iter().map(|t| (*t).to_owned()).collect();
    tokio::task::spawn_blocking(move || {
        let broker = if sqlite {
            Tansu::start_sqlite()
        } else {
            Tansu::start_memory()
        };
        for topic in &topics {
            broker.create_topic(topic, PARTITIONS);
        }
        broker
    })
    .await
    .expect("broker")
}

fn kafka_bus(brokers: &str, delivery_timeout: Duration) -> KafkaBus {
    let mut config = KafkaConfig::new(brokers);
    config.delivery_timeout = delivery_timeout;
    KafkaBus::new(config).expect("valid Kafka config")
}

fn fast_config() -> RelayConfig {
    RelayConfig {
        poll_interval: Duration::from_millis(200),
        retry_initial: Duration::from_millis(100),
        retry_max: Duration::from_secs(1),
        metrics_interval: Duration::from_millis(100),
        ..RelayConfig::default()
    }
}

struct RunningRelay {
    stop: CancellationToken,
    task: JoinHandle<()>,
    metrics: OutboxMetrics,
}

fn start_relay(
    pool: &PgPool,
    publisher: impl Publisher + 'static,
    config: RelayConfig,
) -> RunningRelay {
    let metrics = OutboxMetrics::new(&prometheus::Registry::new()).expect("fresh registry");
    let relay = OutboxRelay::new(pool.clone(), publisher, config, metrics.clone());
    let stop = CancellationToken::new();
    let task = tokio::spawn(relay.run(stop.clone()));
    RunningRelay {
        stop,
        task,
        metrics,
    }
}

impl RunningRelay {
    /// Stops the relay (it finishes its round) and hands back its metrics.
    async fn stop(self) -> OutboxMetrics {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the relay stops within a minute")
            .expect("the relay task does not panic");
        self.metrics
    }
}

/// `per_key` events for each key (n = 0..per_key), interleaved across keys, committed in
/// transactions of `per_tx` rows.
async fn write_numbered(
    pool: &PgPool,
    keys: &[String],
    per_key: u64,
    per_tx: usize,
) -> Vec<Envelope<Numbered>> {
    let envelopes: Vec<Envelope<Numbered>> = (0..per_key)
        .flat_map(|n| {
            keys.iter().map(move |key| {
                Envelope::new(Numbered {
                    key: key.clone(),
                    n,
                })
            })
        })
        .collect();
    for chunk in envelopes.chunks(per_tx.max(1)) {
        let mut tx = pool.begin().await.expect("begin");
        for envelope in chunk {
            OutboxWriter::write(&mut tx, envelope)
                .await
                .expect("outbox write");
        }
        tx.commit().await.expect("commit");
    }
    envelopes
}

fn keys(prefix: &str, count: usize) -> Vec<String> {
    (0..count).map(|i| format!("{prefix}-{i:03}")).collect()
}

async fn count(pool: &PgPool, condition: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT count(*) FROM weir_outbox WHERE {condition}"
    ))
    .fetch_one(pool)
    .await
    .expect("count query")
}

async fn wait_published(pool: &PgPool, total: i64, timeout: Duration) {
    eventually("every row published", timeout, || async {
        let published = count(pool, "published_at IS NOT NULL").await;
        if published >= total {
            Ok(())
        } else {
            Err(format!("{published} of {total} published"))
        }
    })
    .await;
}

/// One record read back from the topic.
#[derive(Debug, Clone)]
struct Received {
    key: String,
    value: Vec<u8>,
    headers: Headers,
}

impl Received {
    fn numbered(&self) -> Envelope<Numbered> {
        EventFactory::<Numbered>::new()
            .decode(Some(&self.value), &self.headers)
            .expect("a published record decodes as the event written")
    }
}

/// Everything on `topic`, by (partition, offset): at least `at_least` records, then 1.5 s quiet.
async fn read_back(brokers: &str, topic: &str, at_least: usize) -> Vec<Received> {
    let quiet = Duration::from_millis(1500);
    support::kafka::read_topic(brokers, topic, at_least, quiet, Duration::from_secs(60))
        .await
        .into_iter()
        .map(|r| Received {
            key: String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned(),
            value: r.value.unwrap_or_default(),
            headers: r.headers,
        })
        .collect()
}

/// What the topic says about the numbered events: per key, the `n`s in publish order counting
/// each event id once (its first appearance), and how many records were repeats.
struct Analysis {
    firsts: BTreeMap<String, Vec<u64>>,
    ids: HashSet<Uuid>,
    duplicates: usize,
}

fn analyse(records: &[Received]) -> Analysis {
    let mut firsts: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let mut ids = HashSet::new();
    let mut duplicates = 0;
    for record in records {
        let envelope = record.numbered();
        assert_eq!(
            record.key, envelope.data.key,
            "the record key is the entity id"
        );
        if ids.insert(envelope.meta.id) {
            firsts
                .entry(envelope.data.key.clone())
                .or_default()
                .push(envelope.data.n);
        } else {
            duplicates += 1;
        }
    }
    Analysis {
        firsts,
        ids,
        duplicates,
    }
}

fn assert_in_key_order(analysis: &Analysis, keys: &[String], per_key: u64) {
    let expected: Vec<u64> = (0..per_key).collect();
    for key in keys {
        let seen = analysis.firsts.get(key).cloned().unwrap_or_default();
        assert_eq!(seen, expected, "events of key {key} in publish order");
    }
}

fn ids_of<T>(envelopes: &[Envelope<T>]) -> HashSet<Uuid> {
    envelopes.iter().map(|e| e.meta.id).collect()
}

// --- acceptance ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolled_back_and_uncommitted_rows_are_never_published_and_committed_rows_are_published_in_key_order(
) {
    let db = TestDb::migrated().await;
    let broker = broker_with_topics(false, &[TOPIC]).await;

    // Open for the whole run: the relay must never see these rows.
    let mut open = db.pool().begin().await.expect("begin");
    let invisible = [
        Envelope::new(Numbered {
            key: "open".into(),
            n: 0,
        }),
        Envelope::new(Numbered {
            key: "k-000".into(),
            n: 99,
        }),
    ];
    for envelope in &invisible {
        OutboxWriter::write(&mut open, envelope)
            .await
            .expect("write");
    }
    let mut rolled_back = db.pool().begin().await.expect("begin");
    let discarded = Envelope::new(Numbered {
        key: "k-001".into(),
        n: 98,
    });
    OutboxWriter::write(&mut rolled_back, &discarded)
        .await
        .expect("write");
    rolled_back.rollback().await.expect("rollback");

    let relay = start_relay(
        db.pool(),
        kafka_bus(&broker.brokers(), Duration::from_secs(10)),
        fast_config(),
    );
    let keys = keys("k", 3);
    let committed = write_numbered(db.pool(), &keys, 20, 7).await;
    wait_published(db.pool(), 60, Duration::from_secs(60)).await;
    open.rollback().await.expect("rollback");
    let records = read_back(&broker.brokers(), TOPIC, 60).await;
    relay.stop().await;

    let analysis = analyse(&records);
    assert_eq!(
        analysis.ids,
        ids_of(&committed),
        "exactly the committed events"
    );
    assert!(!analysis.ids.contains(&discarded.meta.id));
    assert!(invisible.iter().all(|e| !analysis.ids.contains(&e.meta.id)));
    assert_in_key_order(&analysis, &keys, 20);
    assert_eq!(analysis.duplicates, 0);
    assert_eq!(
        count(db.pool(), "true").await,
        60,
        "rolled back rows left no trace"
    );
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_process_killed_mid_batch_leaves_every_committed_row_to_be_published_after_restart()
{
    const MAX_KEYS: usize = 4;
    const ROWS_PER_KEY: usize = 5;
    let db = TestDb::migrated().await;
    let broker = broker_with_topics(false, &[TOPIC]).await;
    let keys = keys("k", 20);
    let written = write_numbered(db.pool(), &keys, 50, 100).await;
    let total = written.len() as i64;

    let dir = TestDir::new("weir-outbox-kill");
    let env = vec![
        ("WEIR_DATABASE__URL".to_owned(), db.url()),
        ("WEIR_BROKERS".to_owned(), broker.brokers()),
        ("WEIR_ADMIN_ADDR".to_owned(), "127.0.0.1:0".to_owned()),
        ("WEIR_OUTBOX__MAX_KEYS".to_owned(), MAX_KEYS.to_string()),
        (
            "WEIR_OUTBOX__ROWS_PER_KEY".to_owned(),
            ROWS_PER_KEY.to_string(),
        ),
        ("WEIR_OUTBOX__POLL_INTERVAL".to_owned(), "100ms".to_owned()),
    ];
    let mut first = WeirProcess::spawn(dir.path(), "relay-1", &["outbox-relay"], &env);
    let at_kill = eventually(
        "the first relay to publish 100 rows",
        Duration::from_secs(60),
        || {
            let pool = db.pool().clone();
            async move {
                let published = count(&pool, "published_at IS NOT NULL").await;
                if published >= 100 {
                    Ok(published)
                } else {
                    Err(format!("{published} published"))
                }
            }
        },
    )
    .await;
    first.kill_and_wait().await;
    let after_kill = count(db.pool(), "published_at IS NOT NULL").await;
    assert!(
        after_kill < total,
        "the relay finished ({after_kill} of {total}) before it was killed; nothing was tested"
    );

    let mut second = WeirProcess::spawn(dir.path(), "relay-2", &["outbox-relay"], &env);
    wait_published(db.pool(), total, Duration::from_secs(120)).await;
    second.sigterm();
    let status = second.wait_exit(Duration::from_secs(30)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM stops the relay cleanly: {status:?}\n{}",
        second.stderr_tail(4096)
    );

    let records = read_back(&broker.brokers(), TOPIC, written.len()).await;
    let analysis = analyse(&records);
    assert_eq!(
        analysis.ids,
        ids_of(&written),
        "every committed row published"
    );
    assert_in_key_order(&analysis, &keys, 50);
    // Documented bound: a crash duplicates at most the round in flight.
    assert!(
        analysis.duplicates <= MAX_KEYS * ROWS_PER_KEY,
        "{} duplicates, bound {}",
        analysis.duplicates,
        MAX_KEYS * ROWS_PER_KEY
    );
    eprintln!(
        "killed at >= {at_kill} published ({after_kill} marked); {} duplicates after restart",
        analysis.duplicates
    );
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_publish_5000_rows_of_50_keys_once_each_in_key_order() {
    let db = TestDb::migrated().await;
    let broker = broker_with_topics(false, &[TOPIC]).await;
    let config = RelayConfig {
        max_keys: 10,
        rows_per_key: 10,
        ..fast_config()
    };
    let started = Instant::now();
    let a = start_relay(
        db.pool(),
        kafka_bus(&broker.brokers(), Duration::from_secs(10)),
        config.clone(),
    );
    let b = start_relay(
        &db.new_pool(4).await,
        kafka_bus(&broker.brokers(), Duration::from_secs(10)),
        config,
    );
    let keys = keys("key", 50);
    let written = write_numbered(db.pool(), &keys, 100, 100).await;
    wait_published(db.pool(), 5000, Duration::from_secs(180)).await;
    let elapsed = started.elapsed();
    let (by_a, by_b) = (a.metrics.published_total(), b.metrics.published_total());
    eventually(
        "the backlog gauge to read 0",
        Duration::from_secs(10),
        || {
            let pending = a.metrics.pending();
            async move {
                if pending == 0 {
                    Ok(())
                } else {
                    Err(format!("{pending} pending"))
                }
            }
        },
    )
    .await;
    a.stop().await;
    b.stop().await;

    let records = read_back(&broker.brokers(), TOPIC, 5000).await;
    let analysis = analyse(&records);
    assert_eq!(analysis.ids, ids_of(&written));
    assert_in_key_order(&analysis, &keys, 100);
    // Documented bound: no duplicates while no relay crashes and every commit succeeds.
    assert_eq!(analysis.duplicates, 0, "duplicates in normal operation");
    assert_eq!(by_a + by_b, 5000, "each row published by exactly one relay");
    eprintln!("5000 rows in {elapsed:?}: relay A published {by_a}, relay B {by_b}");
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_broker_is_down_rows_stay_pending_with_attempts_recorded_and_all_go_out_when_it_returns(
) {
    let db = TestDb::migrated().await;
    let mut broker = broker_with_topics(true, &[TOPIC]).await;
    let brokers = broker.brokers();
    broker.stop();

    let keys = keys("k", 3);
    let written = write_numbered(db.pool(), &keys, 5, 5).await;
    let relay = start_relay(
        db.pool(),
        kafka_bus(&brokers, Duration::from_secs(1)),
        RelayConfig {
            retry_initial: Duration::from_millis(200),
            retry_max: Duration::from_secs(1),
            ..fast_config()
        },
    );
    eventually(
        "each key's head to fail twice",
        Duration::from_secs(60),
        || async {
            let failed = count(db.pool(), "attempts >= 2 AND last_error IS NOT NULL").await;
            if failed >= 3 {
                Ok(())
            } else {
                Err(format!("{failed} rows with 2+ failed attempts"))
            }
        },
    )
    .await;
    assert_eq!(count(db.pool(), "published_at IS NOT NULL").await, 0);
    assert_eq!(
        count(db.pool(), "attempts > 0").await,
        3,
        "only each key's first row is tried: nothing overtakes it"
    );
    assert_eq!(
        count(db.pool(), "next_attempt_at > created_at AND attempts > 0").await,
        3,
        "failed rows wait for their backoff"
    );
    assert!(relay.metrics.publish_failures_total() >= 6);

    let broker = tokio::task::spawn_blocking(move || {
        broker.restart();
        broker
    })
    .await
    .expect("restart");
    wait_published(db.pool(), 15, Duration::from_secs(90)).await;
    relay.stop().await;

    let records = read_back(&broker.brokers(), TOPIC, 15).await;
    let analysis = analyse(&records);
    assert_eq!(analysis.ids, ids_of(&written));
    assert_in_key_order(&analysis, &keys, 5);
    assert_eq!(analysis.duplicates, 0);
    assert_eq!(
        count(db.pool(), "last_error IS NOT NULL").await,
        0,
        "a published row keeps no error"
    );
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_event_delivered_three_times_changes_the_database_once() {
    let db = TestDb::migrated().await;
    sqlx::query("CREATE TABLE effects (key text PRIMARY KEY, applied int NOT NULL)")
        .execute(db.pool())
        .await
        .expect("effects table");
    let broker = broker_with_topics(false, &[TOPIC]).await;
    let bus = kafka_bus(&broker.brokers(), Duration::from_secs(10));
    let handler = inbox(
        db.pool().clone(),
        "outbox-test",
        |event: Numbered, _ctx: Ctx, mut tx: InboxTx| async move {
            sqlx::query(
                "INSERT INTO effects (key, applied) VALUES ($1, 1)
                 ON CONFLICT (key) DO UPDATE SET applied = effects.applied + 1",
            )
            .bind(&event.key)
            .execute(&mut *tx)
            .await
            .map_err(HandlerError::retryable)?;
            Ok(tx)
        },
    );
    let subscription = bus
        .subscribe(
            Router::new().on_with(handler, HandlerOptions::new().name("apply")),
            ConsumerConfig::new(unique("inbox")),
        )
        .expect("subscribe");
    let envelope = Envelope::new(Numbered {
        key: "entity".into(),
        n: 1,
    });
    for _ in 0..3 {
        bus.publish(&envelope).await.expect("publish");
    }
    eventually("three deliveries handled", Duration::from_secs(60), || {
        let handled = bus
            .metrics()
            .handled_count(TOPIC, "test.numbered", "success");
        async move {
            if handled >= 3 {
                Ok(())
            } else {
                Err(format!("{handled} handled"))
            }
        }
    })
    .await;
    subscription.stop().await.expect("stop");

    let applied: i32 = sqlx::query_scalar("SELECT applied FROM effects WHERE key = 'entity'")
        .fetch_one(db.pool())
        .await
        .expect("effect");
    assert_eq!(applied, 1, "three deliveries, one effect");
    let entries: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM weir_inbox WHERE consumer_group = 'outbox-test' AND event_id = $1",
    )
    .bind(envelope.meta.id)
    .fetch_one(db.pool())
    .await
    .expect("inbox");
    assert_eq!(entries, 1);
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_inserted_with_plain_sql_is_published_like_one_from_the_writer_and_wakes_the_relay() {
    let db = TestDb::migrated().await;
    let broker = broker_with_topics(false, &[TOPIC]).await;
    // A poll interval far beyond the deadlines below: only NOTIFY can wake the relay in time.
    let relay = start_relay(
        db.pool(),
        kafka_bus(&broker.brokers(), Duration::from_secs(10)),
        RelayConfig {
            poll_interval: Duration::from_secs(600),
            ..fast_config()
        },
    );
    let from_writer = Envelope::new(Numbered {
        key: "rust".into(),
        n: 1,
    });
    let mut tx = db.pool().begin().await.expect("begin");
    OutboxWriter::write(&mut tx, &from_writer)
        .await
        .expect("write");
    tx.commit().await.expect("commit");
    wait_published(db.pool(), 1, Duration::from_secs(20)).await;

    // What a service in another language runs: the README's example, with this test's event.
    let foreign_id = Uuid::new_v4();
    let insert = r#"
        INSERT INTO weir_outbox (id, topic, key, event_type, payload, headers)
        VALUES (
          '$ID', 'outbox-numbered', 'polyglot', 'test.numbered',
          convert_to('{"specversion":"1.0","id":"$ID","type":"test.numbered","source":"/billing","datacontenttype":"application/json","data":{"key":"polyglot","n":7}}', 'UTF8'),
          '{"content-type": "application/cloudevents+json"}'
        )"#
    .replace("$ID", &foreign_id.to_string());
    sqlx::raw_sql(&insert)
        .execute(db.pool())
        .await
        .expect("plain SQL insert");
    wait_published(db.pool(), 2, Duration::from_secs(20)).await;
    relay.stop().await;

    let records = read_back(&broker.brokers(), TOPIC, 2).await;
    assert_eq!(records.len(), 2, "{records:?}");
    let by_key: HashMap<&str, &Received> = records.iter().map(|r| (r.key.as_str(), r)).collect();
    let rust = by_key["rust"].numbered();
    let foreign = by_key["polyglot"].numbered();
    assert_eq!(rust.meta.id, from_writer.meta.id);
    assert_eq!(rust.data, from_writer.data);
    assert_eq!(foreign.meta.id, foreign_id);
    assert_eq!(
        foreign.data,
        Numbered {
            key: "polyglot".into(),
            n: 7
        }
    );
    assert_eq!(foreign.meta.source, "/billing");
    for record in &records {
        assert_eq!(
            record.headers.get_str("content-type"),
            Some("application/cloudevents+json"),
            "{record:?}"
        );
    }
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_row_and_its_event_written_in_one_transaction_reach_a_handler_through_the_relay() {
    let db = TestDb::migrated().await;
    sqlx::raw_sql(
        "CREATE TABLE tasks (id uuid PRIMARY KEY, tenant_id text NOT NULL, status text NOT NULL)",
    )
    .execute(db.pool())
    .await
    .expect("the service's own table");
    let broker = broker_with_topics(false, &[crate::reference::TASK_TOPIC]).await;
    let bus = kafka_bus(&broker.brokers(), Duration::from_secs(10));
    let (sender, mut received) = tokio::sync::mpsc::unbounded_channel();
    let subscription = bus
        .subscribe(
            Router::new().on(move |task: TaskCreated, ctx: Ctx| {
                let sender = sender.clone();
                async move {
                    let _ = sender.send((task, ctx.event_id()));
                    Ok(())
                }
            }),
            ConsumerConfig::new(unique("tasks")),
        )
        .expect("subscribe");
    let relay = start_relay(db.pool(), bus.clone(), fast_config());

    // The service's write and its event, in one transaction: the outbox pattern.
    let task_id = Uuid::now_v7();
    let mut tx = db.pool().begin().await.expect("begin");
    sqlx::query("INSERT INTO tasks (id, tenant_id, status) VALUES ($1, 'tenant-1', 'pending')")
        .bind(task_id)
        .execute(&mut *tx)
        .await
        .expect("insert the task");
    let event = TaskCreated::new(TaskFields::new(
        task_id,
        "tenant-1",
        "prod",
        "file:///data/customers.csv",
        "customer",
        TriggeredBy::Api,
    ));
    OutboxWriter::write(&mut tx, &Envelope::new(event))
        .await
        .expect("write the event");
    tx.commit().await.expect("commit");
    let (task, event_id) = tokio::time::timeout(Duration::from_secs(60), received.recv())
        .await
        .expect("the handler receives the task within a minute")
        .expect("channel open");
    relay.stop().await;
    subscription.stop().await.expect("stop");

    assert_eq!(task.0.task_id, task_id);
    assert_eq!(task.0.tenant_id, "tenant-1");
    let (status, outbox_id): (String, Uuid) = sqlx::query_as(
        "SELECT t.status, o.id FROM tasks t JOIN weir_outbox o ON o.key = t.id::text WHERE t.id = $1",
    )
    .bind(task_id)
    .fetch_one(db.pool())
    .await
    .expect("task and its outbox row");
    assert_eq!(status, "pending");
    assert_eq!(
        event_id, outbox_id,
        "the CloudEvent id is the outbox row id"
    );
    db.close().await;
}

// --- the relay's claim and order logic, on PostgreSQL with a stand-in publisher -------------

/// One publish call seen by [`Recording`].
#[derive(Debug, Clone)]
struct Call {
    key: String,
    n: u64,
    started: Instant,
    ended: Instant,
}

/// A publisher that takes a moment per record, records each call, and fails every record of
/// the keys in `failing`.
#[derive(Clone, Default)]
struct Recording {
    calls: Arc<Mutex<Vec<Call>>>,
    failing: Arc<HashSet<String>>,
}

impl Publisher for Recording {
    fn publish_record(
        &self,
        record: OutboundRecord,
    ) -> Pin<Box<dyn Future<Output = Result<Delivery, PublishError>> + Send + '_>> {
        Box::pin(async move {
            let started = Instant::now();
            tokio::time::sleep(Duration::from_millis(2)).await;
            let value = record.value.clone().unwrap_or_default();
            let envelope = EventFactory::<Numbered>::new()
                .decode(Some(&value), &record.headers)
                .expect("decodes");
            let key = envelope.data.key.clone();
            if self.failing.contains(&key) {
                return Err(PublishError::Broker {
                    topic: record.topic,
                    message: "refused by the test".into(),
                });
            }
            self.calls.lock().unwrap().push(Call {
                key,
                n: envelope.data.n,
                started,
                ended: Instant::now(),
            });
            Ok(Delivery {
                topic: record.topic,
                partition: 0,
                offset: 0,
            })
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_relays_never_publish_one_key_at_the_same_time_nor_out_of_order() {
    let db = TestDb::migrated().await;
    let recording = Recording::default();
    let config = RelayConfig {
        max_keys: 3,
        rows_per_key: 4,
        ..fast_config()
    };
    let a = start_relay(db.pool(), recording.clone(), config.clone());
    let b = start_relay(&db.new_pool(4).await, recording.clone(), config);
    let keys = keys("k", 8);
    write_numbered(db.pool(), &keys, 30, 16).await;
    wait_published(db.pool(), 240, Duration::from_secs(60)).await;
    let (a, b) = (a.stop().await, b.stop().await);

    let calls = recording.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 240, "each row published once");
    let mut by_key: HashMap<&str, Vec<&Call>> = HashMap::new();
    for call in &calls {
        by_key.entry(call.key.as_str()).or_default().push(call);
    }
    for (key, mut calls) in by_key {
        calls.sort_by_key(|c| c.started);
        let ns: Vec<u64> = calls.iter().map(|c| c.n).collect();
        assert_eq!(ns, (0..30).collect::<Vec<_>>(), "order of key {key}");
        for pair in calls.windows(2) {
            assert!(
                pair[0].ended <= pair[1].started,
                "key {key}: n={} started before n={} was acknowledged",
                pair[1].n,
                pair[0].n
            );
        }
    }
    assert!(
        a.published_total() > 0 && b.published_total() > 0,
        "both relays took part ({} and {})",
        a.published_total(),
        b.published_total()
    );
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_row_holds_back_the_rest_of_its_key_but_not_other_keys() {
    let db = TestDb::migrated().await;
    let recording = Recording {
        failing: Arc::new(HashSet::from(["stuck".to_owned()])),
        ..Recording::default()
    };
    let relay = start_relay(db.pool(), recording.clone(), fast_config());
    write_numbered(db.pool(), &["stuck".to_owned(), "fine".to_owned()], 3, 10).await;
    wait_published(db.pool(), 3, Duration::from_secs(30)).await;
    eventually(
        "the stuck head to be retried",
        Duration::from_secs(30),
        || async {
            let retried = count(db.pool(), "key = 'stuck' AND attempts >= 3").await;
            if retried == 1 {
                Ok(())
            } else {
                Err(format!("{retried} stuck rows with 3+ attempts"))
            }
        },
    )
    .await;
    let metrics = relay.stop().await;

    let (attempts, error, n): (i32, Option<String>, i64) = sqlx::query_as(
        "SELECT attempts, last_error, seq FROM weir_outbox
         WHERE key = 'stuck' AND attempts > 0",
    )
    .fetch_one(db.pool())
    .await
    .expect("the one attempted row");
    let first_seq: i64 = sqlx::query_scalar("SELECT min(seq) FROM weir_outbox WHERE key = 'stuck'")
        .fetch_one(db.pool())
        .await
        .expect("seq");
    assert_eq!(n, first_seq, "only the head of the stuck key was tried");
    assert!(attempts >= 3);
    assert!(error.is_some_and(|e| e.contains("refused by the test")));
    assert_eq!(
        count(db.pool(), "key = 'stuck' AND published_at IS NOT NULL").await,
        0
    );
    assert_eq!(metrics.publish_failures_total() as i32, attempts);
    let published: Vec<u64> = recording
        .calls
        .lock()
        .unwrap()
        .iter()
        .map(|c| c.n)
        .collect();
    assert_eq!(published, vec![0, 1, 2], "the other key went out, in order");
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_inbox_handler_rolls_back_its_writes_and_its_inbox_entry() {
    let db = TestDb::migrated().await;
    sqlx::query("CREATE TABLE effects (key text PRIMARY KEY, applied int NOT NULL)")
        .execute(db.pool())
        .await
        .expect("effects table");
    let calls = Arc::new(AtomicU32::new(0));
    let counter = calls.clone();
    let handler = inbox(
        db.pool().clone(),
        "g",
        move |event: Numbered, _ctx: Ctx, mut tx: InboxTx| {
            let call = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                sqlx::query(
                    "INSERT INTO effects (key, applied) VALUES ($1, 1)
                     ON CONFLICT (key) DO UPDATE SET applied = effects.applied + 1",
                )
                .bind(&event.key)
                .execute(&mut *tx)
                .await
                .map_err(HandlerError::retryable)?;
                if call == 1 {
                    return Err(HandlerError::retryable("first attempt fails after writing"));
                }
                Ok(tx)
            }
        },
    );
    let envelope = Envelope::new(Numbered {
        key: "e".into(),
        n: 0,
    });
    let ctx = Ctx::detached(TOPIC, envelope.meta.clone());
    let effects = || async {
        sqlx::query_scalar::<_, i64>("SELECT coalesce(sum(applied), 0)::bigint FROM effects")
            .fetch_one(db.pool())
            .await
            .expect("effects")
    };
    let entries = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM weir_inbox")
            .fetch_one(db.pool())
            .await
            .expect("inbox")
    };

    assert!(handler(envelope.data.clone(), ctx.clone()).await.is_err());
    assert_eq!(
        (effects().await, entries().await),
        (0, 0),
        "all rolled back"
    );
    handler(envelope.data.clone(), ctx.clone())
        .await
        .expect("second attempt");
    assert_eq!((effects().await, entries().await), (1, 1));
    handler(envelope.data.clone(), ctx.clone())
        .await
        .expect("redelivery");
    assert_eq!(
        (effects().await, entries().await),
        (1, 1),
        "redelivery skipped"
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        2,
        "the handler did not run for the redelivery"
    );
    db.close().await;
}

// --- migrations and purge ------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_migration_runners_apply_each_migration_exactly_once() {
    let db = TestDb::new().await;
    let all = weir::OUTBOX_MIGRATIONS.to_vec();
    let runs = futures_util::future::join_all((0..4).map(|_| {
        let pool = db.pool().clone();
        let all = all.clone();
        async move { weir::migrate(&pool, &all).await.expect("migrate") }
    }))
    .await;
    let mut applied: Vec<&str> = runs.into_iter().flatten().collect();
    applied.sort_unstable();
    let mut expected: Vec<&str> = all.iter().map(|m| m.id).collect();
    expected.sort_unstable();
    assert_eq!(applied, expected, "each applied by exactly one runner");
    assert!(weir::migrate(db.pool(), &all)
        .await
        .expect("again")
        .is_empty());

    // A service adds its own table by adding a migration to its list.
    let mine = Migration::new("svc/0001_notes", "CREATE TABLE notes (id int PRIMARY KEY)");
    let with_mine = [all.as_slice(), &[mine]].concat();
    assert_eq!(
        weir::migrate(db.pool(), &with_mine).await.expect("mine"),
        vec!["svc/0001_notes"]
    );
    // An applied migration must never change.
    let edited = Migration::new(
        "svc/0001_notes",
        "CREATE TABLE notes (id bigint PRIMARY KEY)",
    );
    let error = weir::migrate(db.pool(), &[edited]).await.unwrap_err();
    assert!(error.to_string().contains("svc/0001_notes"), "{error}");
    db.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn published_rows_past_the_retention_are_purged_and_pending_ones_never() {
    let db = TestDb::migrated().await;
    write_numbered(db.pool(), &["a".to_owned()], 4, 4).await;
    sqlx::raw_sql(
        "UPDATE weir_outbox SET published_at = now() - interval '2 hours'
           WHERE seq IN (SELECT seq FROM weir_outbox ORDER BY seq LIMIT 2);
         UPDATE weir_outbox SET published_at = now()
           WHERE seq = (SELECT seq FROM weir_outbox ORDER BY seq OFFSET 2 LIMIT 1);
         UPDATE weir_outbox SET created_at = now() - interval '3 hours'
           WHERE published_at IS NULL",
    )
    .execute(db.pool())
    .await
    .expect("age rows");
    let metrics = OutboxMetrics::new(&prometheus::Registry::new()).expect("registry");
    let relay = OutboxRelay::new(
        db.pool().clone(),
        Recording::default(),
        RelayConfig {
            retention: Duration::from_secs(3600),
            ..RelayConfig::default()
        },
        metrics.clone(),
    );
    assert_eq!(relay.purge().await.expect("purge"), 2);
    assert_eq!(count(db.pool(), "published_at IS NOT NULL").await, 1);
    assert_eq!(count(db.pool(), "published_at IS NULL").await, 1);
    relay.refresh_metrics().await.expect("metrics");
    assert_eq!(metrics.pending(), 1);
    let age = metrics.oldest_pending_age_seconds();
    assert!((3.0 * 3600.0..3.0 * 3600.0 + 60.0).contains(&age), "{age}");
    db.close().await;
}

#[tokio::test]
async fn the_writer_stores_the_callers_trace_context_with_the_row() {
    use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
    use tracing::Instrument;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    use tracing_subscriber::layer::SubscriberExt;

    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().build();
    let layer = tracing_opentelemetry::layer().with_tracer(provider.tracer("weir-test"));
    let _guard = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    let db = TestDb::migrated().await;
    let span = tracing::info_span!("create order");
    let trace_id = format!("{:032x}", span.context().span().span_context().trace_id());
    let envelope = Envelope::new(Numbered {
        key: "traced".into(),
        n: 0,
    });
    async {
        let mut tx = db.pool().begin().await.expect("begin");
        OutboxWriter::write(&mut tx, &envelope)
            .await
            .expect("write");
        tx.commit().await.expect("commit");
    }
    .instrument(span)
    .await;

    let (traceparent, content_type): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT headers->>'traceparent', headers->>'content-type' FROM weir_outbox WHERE id = $1",
    )
    .bind(envelope.meta.id)
    .fetch_one(db.pool())
    .await
    .expect("row");
    let traceparent = traceparent.expect("a traceparent header");
    assert!(
        traceparent.starts_with(&format!("00-{trace_id}-")),
        "{traceparent} continues trace {trace_id}"
    );
    assert_eq!(
        content_type.as_deref(),
        Some("application/cloudevents+json")
    );
    db.close().await;
}
