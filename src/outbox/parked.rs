//! Durable retries on PostgreSQL: the `weir_parked` store a consumer parks records in, and the
//! parked-record worker that retries them.
//!
//! # Per-key order
//! Per key, records are handled in offset order across in-place retries, parking and the worker:
//! - the consumer parks a record (after its in-place attempts) before its offset may commit, and
//!   parks every later record of the key behind it without calling the handler, as long as the
//!   key has parked rows for that handler and group ([`ParkedStore`] keeps the parked keys of the
//!   partitions it owns in memory, learned from the table before a partition's first record, and
//!   asks the table again before parking behind a key, since the worker may have emptied it);
//! - the worker takes only a key's head row (lowest offset), `FOR UPDATE SKIP LOCKED` as the
//!   outbox relay does, so one key is retried by one worker at a time, in order; when the head
//!   succeeds or is dead-lettered it is deleted, and the next row becomes the head.
//!
//! Parking is per handler: with fan-out, handlers that succeeded are not run again.

use super::OutboxError;
use crate::bus::dead_letter;
use crate::bus::{DeadLetterTopics, Publisher};
use crate::contracts::Headers;
use crate::handlers::{Dispatcher, Inbound, ParkFuture, ParkedAttempt, Parking, Router};
use crate::telemetry::parked::{ParkedAttempted, ParkedBacklog, ParkedMetrics, ParkedWorkerFailed};
use crate::telemetry::Metrics;
use sqlx::{PgPool, Row};
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

/// Parked keys of one partition, by handler.
type PartitionKeys = HashMap<String, HashSet<Option<bytes::Bytes>>>;

#[derive(Default)]
struct Known {
    /// Partitions whose parked keys were loaded (or are loading) since this consumer owns them.
    learned: HashMap<(String, i32), Arc<OnceCell<()>>>,
    /// topic → partition → handler → keys.
    keys: HashMap<String, HashMap<i32, PartitionKeys>>,
}

/// The `weir_parked` table of one consumer group: where a subscription parks records for durable
/// retries ([`Router::durable_retries`]) and where a [`ParkedWorker`] takes them from.
#[derive(Clone)]
pub struct ParkedStore {
    pool: PgPool,
    group: Arc<str>,
    known: Arc<Mutex<Known>>,
}

impl std::fmt::Debug for ParkedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkedStore")
            .field("group", &self.group)
            .finish_non_exhaustive()
    }
}

impl ParkedStore {
    /// The store of consumer group `group_id` (the subscription's `ConsumerConfig::group_id`).
    /// Needs the `weir/0003_parked` migration ([`OUTBOX_MIGRATIONS`](crate::OUTBOX_MIGRATIONS)).
    pub fn new(pool: PgPool, group_id: impl Into<String>) -> Self {
        Self {
            pool,
            group: Arc::from(group_id.into()),
            known: Arc::default(),
        }
    }

    /// The consumer group.
    pub fn group_id(&self) -> &str {
        &self.group
    }

    fn known(&self) -> std::sync::MutexGuard<'_, Known> {
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn remember(&self, handler: &str, topic: &str, partition: i32, key: Option<bytes::Bytes>) {
        self.known()
            .keys
            .entry(topic.to_owned())
            .or_default()
            .entry(partition)
            .or_default()
            .entry(handler.to_owned())
            .or_default()
            .insert(key);
    }

    async fn load(&self, topic: &str, partition: i32) -> Result<(), sqlx::Error> {
        let rows = sqlx::query(
            "SELECT DISTINCT handler, key FROM weir_parked \
             WHERE group_id = $1 AND topic = $2 AND partition = $3",
        )
        .bind(&*self.group)
        .bind(topic)
        .bind(partition)
        .fetch_all(&self.pool)
        .await?;
        for row in rows {
            let handler: String = row.try_get("handler")?;
            let key: Option<Vec<u8>> = row.try_get("key")?;
            self.remember(&handler, topic, partition, key.map(bytes::Bytes::from));
        }
        Ok(())
    }
}

impl<S> Router<S> {
    /// Gives this router's handlers a durable retry stage in `store`: a handler whose
    /// [`RetryPolicy::durable`](crate::RetryPolicy::durable) is set parks records there once its
    /// in-place attempts are spent, and every handler parks a record behind its key's parked
    /// records. Run a [`ParkedWorker`] on the same store to retry them.
    pub fn durable_retries(mut self, store: &ParkedStore) -> Self {
        self.parking = Some(Arc::new(store.clone()));
        self
    }
}

impl Parking for ParkedStore {
    fn learn<'a>(&'a self, topic: &'a str, partition: i32) -> ParkFuture<'a, ()> {
        Box::pin(async move {
            let cell = self
                .known()
                .learned
                .entry((topic.to_owned(), partition))
                .or_default()
                .clone();
            cell.get_or_try_init(|| self.load(topic, partition))
                .await
                .map(|_| ())
                .map_err(|e| e.to_string())
        })
    }

    fn is_parked(&self, handler: &str, rec: &Inbound) -> bool {
        let known = self.known();
        known
            .keys
            .get(&*rec.topic)
            .and_then(|p| p.get(&rec.partition))
            .and_then(|h| h.get(handler))
            .is_some_and(|keys| keys.contains(&rec.key))
    }

    fn confirm<'a>(&'a self, handler: &'a str, rec: &'a Inbound) -> ParkFuture<'a, bool> {
        Box::pin(async move {
            let still: bool = sqlx::query_scalar(
                "SELECT EXISTS (SELECT 1 FROM weir_parked WHERE group_id = $1 AND handler = $2 \
                 AND topic = $3 AND partition = $4 AND key IS NOT DISTINCT FROM $5)",
            )
            .bind(&*self.group)
            .bind(handler)
            .bind(&*rec.topic)
            .bind(rec.partition)
            .bind(rec.key.as_deref())
            .fetch_one(&self.pool)
            .await
            .map_err(|e| e.to_string())?;
            if !still {
                let mut known = self.known();
                if let Some(keys) = known
                    .keys
                    .get_mut(&*rec.topic)
                    .and_then(|p| p.get_mut(&rec.partition))
                    .and_then(|h| h.get_mut(handler))
                {
                    keys.remove(&rec.key);
                }
            }
            Ok(still)
        })
    }

    fn park<'a>(
        &'a self,
        handler: &'a str,
        rec: &'a Inbound,
        attempts: u32,
        error: &'a str,
        delay: Duration,
    ) -> ParkFuture<'a, ()> {
        Box::pin(async move {
            let (names, values): (Vec<String>, Vec<Vec<u8>>) = rec
                .headers
                .iter()
                .map(|(k, v)| (k.to_owned(), v.to_vec()))
                .unzip();
            sqlx::query(
                "INSERT INTO weir_parked (group_id, handler, topic, partition, \"offset\", key, \
                 value, header_names, header_values, timestamp_ms, attempts, last_error, \
                 next_attempt_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, \
                         now() + make_interval(secs => $13)) \
                 ON CONFLICT ON CONSTRAINT weir_parked_record DO NOTHING",
            )
            .bind(&*self.group)
            .bind(handler)
            .bind(&*rec.topic)
            .bind(rec.partition)
            .bind(rec.offset)
            .bind(rec.key.as_deref())
            .bind(rec.value.as_deref())
            .bind(&names)
            .bind(&values)
            .bind(rec.timestamp_ms)
            .bind(attempts as i32)
            .bind(error)
            .bind(delay.as_secs_f64())
            .execute(&self.pool)
            .await
            .map_err(|e| e.to_string())?;
            self.remember(handler, &rec.topic, rec.partition, rec.key.clone());
            Ok(())
        })
    }

    fn forget(&self, partitions: &[(String, i32)]) {
        let mut known = self.known();
        for (topic, partition) in partitions {
            known.learned.remove(&(topic.clone(), *partition));
            if let Some(by_partition) = known.keys.get_mut(topic) {
                by_partition.remove(partition);
            }
        }
    }
}

/// How the parked-record worker runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParkedWorkerConfig {
    /// How long to wait when no parked record is due.
    pub poll_interval: Duration,
    /// Keys taken per round.
    pub max_keys: i64,
}

impl Default for ParkedWorkerConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            max_keys: 32,
        }
    }
}

/// Retries parked records: each due key's head row, with the handler it was parked for, with
/// attempt numbers that continue from the consumer's; deletes the row on success, dead-letters
/// the record after the last durable attempt (or at once for a permanent failure), and otherwise
/// backs off with the handler's [`DurableRetry`](crate::DurableRetry) intervals. Any number of workers may run on one
/// store: a key is worked on by one at a time.
pub struct ParkedWorker {
    store: ParkedStore,
    dispatcher: Dispatcher,
    dead_letters: Arc<dyn Publisher>,
    dead_letter_topics: DeadLetterTopics,
    metrics: Metrics,
    parked_metrics: ParkedMetrics,
    config: ParkedWorkerConfig,
}

impl std::fmt::Debug for ParkedWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ParkedWorker")
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

struct Head {
    seq: i64,
    handler: String,
    rec: Inbound,
    attempts: i32,
    durable_attempts: i32,
}

impl ParkedWorker {
    /// A worker for `store` that calls `router`'s handlers (the same router the consumer runs)
    /// and dead-letters through `dead_letters` into `dead_letter_topics`.
    pub fn new(
        store: ParkedStore,
        router: Router,
        dead_letters: Arc<dyn Publisher>,
        dead_letter_topics: DeadLetterTopics,
        metrics: Metrics,
        parked_metrics: ParkedMetrics,
    ) -> Self {
        let dispatcher = Dispatcher::new(router, metrics.clone(), store.group_id());
        Self {
            store,
            dispatcher,
            dead_letters,
            dead_letter_topics,
            metrics,
            parked_metrics,
            config: ParkedWorkerConfig::default(),
        }
    }

    /// Sets the worker's pacing.
    pub fn config(mut self, config: ParkedWorkerConfig) -> Self {
        self.config = config;
        self
    }

    /// Works until `stop` fires: rounds back to back while records are due, otherwise one per
    /// `poll_interval`.
    pub async fn run(&self, stop: CancellationToken) {
        while !stop.is_cancelled() {
            let worked = match self.run_once(&stop).await {
                Ok(n) => n,
                Err(e) => {
                    ParkedWorkerFailed { error: &e }.emit();
                    0
                }
            };
            if worked == 0 {
                tokio::select! {
                    _ = tokio::time::sleep(self.config.poll_interval) => {}
                    _ = stop.cancelled() => {}
                }
            }
        }
    }

    /// One round: the due head rows, one attempt each; returns how many were attempted.
    pub async fn run_once(&self, stop: &CancellationToken) -> Result<usize, OutboxError> {
        let pool = &self.store.pool;
        let group = &*self.store.group;
        let mut tx = pool.begin().await?;
        let rows = sqlx::query(
            "SELECT p.seq, p.handler, p.topic, p.partition, p.\"offset\", p.key, p.value, \
                    p.header_names, p.header_values, p.timestamp_ms, p.attempts, p.durable_attempts \
             FROM weir_parked p \
             WHERE p.group_id = $1 AND p.next_attempt_at <= now() \
               AND NOT EXISTS ( \
                   SELECT 1 FROM weir_parked e \
                   WHERE e.group_id = p.group_id AND e.handler = p.handler AND e.topic = p.topic \
                     AND e.partition = p.partition AND e.key IS NOT DISTINCT FROM p.key \
                     AND e.\"offset\" < p.\"offset\") \
             ORDER BY p.next_attempt_at, p.seq \
             LIMIT $2 \
             FOR UPDATE OF p SKIP LOCKED",
        )
        .bind(group)
        .bind(self.config.max_keys)
        .fetch_all(&mut *tx)
        .await?;
        let mut heads = Vec::with_capacity(rows.len());
        for row in rows {
            let names: Vec<String> = row.try_get("header_names")?;
            let values: Vec<Vec<u8>> = row.try_get("header_values")?;
            let topic: String = row.try_get("topic")?;
            heads.push(Head {
                seq: row.try_get("seq")?,
                handler: row.try_get("handler")?,
                attempts: row.try_get("attempts")?,
                durable_attempts: row.try_get("durable_attempts")?,
                rec: Inbound {
                    topic: Arc::from(topic),
                    partition: row.try_get("partition")?,
                    offset: row.try_get("offset")?,
                    key: row.try_get::<Option<Vec<u8>>, _>("key")?.map(Into::into),
                    value: row.try_get::<Option<Vec<u8>>, _>("value")?.map(Into::into),
                    headers: names.into_iter().zip(values).collect::<Headers>(),
                    timestamp_ms: row.try_get("timestamp_ms")?,
                },
            });
        }
        let attempted = heads.len();
        for head in heads {
            if !self.attempt(&mut tx, head, stop).await? {
                // Stopped while dead-lettering: nothing of this round is final.
                tx.rollback().await?;
                return Ok(0);
            }
        }
        tx.commit().await?;
        self.report_backlog().await?;
        Ok(attempted)
    }

    /// One durable attempt of a head row. `false` if `stop` fired before a dead letter was
    /// acknowledged.
    async fn attempt(
        &self,
        tx: &mut sqlx::PgConnection,
        head: Head,
        stop: &CancellationToken,
    ) -> Result<bool, OutboxError> {
        let attempt = u32::try_from(head.attempts).unwrap_or(0) + 1;
        let durable_attempt = u32::try_from(head.durable_attempts).unwrap_or(0) + 1;
        let rec = Arc::new(head.rec);
        let outcome = self
            .dispatcher
            .call_parked(&head.handler, rec.clone(), attempt)
            .await;
        let policy = self
            .dispatcher
            .durable(&rec.topic, &head.handler)
            .unwrap_or_default();
        let event = |result, error, next_in| {
            attempted(&rec, &head.handler, attempt, result, error, next_in)
        };
        let failure = match outcome {
            ParkedAttempt::Succeeded => {
                delete(tx, head.seq).await?;
                event("success", None, None).emit(&self.parked_metrics);
                return Ok(true);
            }
            ParkedAttempt::Retryable(failure) if durable_attempt < policy.maximum_attempts => {
                let delay = policy.delay(durable_attempt + 1);
                sqlx::query(
                    "UPDATE weir_parked SET attempts = $2, durable_attempts = $3, last_error = $4, \
                     next_attempt_at = now() + make_interval(secs => $5) WHERE seq = $1",
                )
                .bind(head.seq)
                .bind(attempt as i32)
                .bind(durable_attempt as i32)
                .bind(&failure.message)
                .bind(delay.as_secs_f64())
                .execute(&mut *tx)
                .await?;
                event("retry", Some(&failure.message), Some(delay)).emit(&self.parked_metrics);
                return Ok(true);
            }
            ParkedAttempt::Retryable(failure) | ParkedAttempt::Final(failure) => failure,
        };
        let record = dead_letter::record(
            &rec,
            &failure,
            &self.store.group,
            self.dead_letter_topics.topic_for(&rec.topic),
        );
        let published = dead_letter::publish(
            &*self.dead_letters,
            &self.metrics,
            record,
            &failure,
            &rec,
            stop,
        )
        .await;
        if !published {
            return Ok(false);
        }
        delete(tx, head.seq).await?;
        event("dead_lettered", Some(&failure.message), None).emit(&self.parked_metrics);
        Ok(true)
    }

    async fn report_backlog(&self) -> Result<(), OutboxError> {
        let row = sqlx::query(
            "SELECT count(*) AS records, \
                    count(DISTINCT (handler, topic, partition, key)) AS keys, \
                    COALESCE(EXTRACT(EPOCH FROM now() - min(parked_at)), 0)::float8 AS age \
             FROM weir_parked WHERE group_id = $1",
        )
        .bind(&*self.store.group)
        .fetch_one(&self.store.pool)
        .await?;
        ParkedBacklog {
            records: row.try_get("records")?,
            keys: row.try_get("keys")?,
            oldest_age: Duration::from_secs_f64(row.try_get::<f64, _>("age")?.max(0.0)),
        }
        .emit(&self.parked_metrics);
        Ok(())
    }
}

fn attempted<'a>(
    rec: &'a Inbound,
    handler: &'a str,
    attempt: u32,
    result: &'static str,
    error: Option<&'a str>,
    next_in: Option<Duration>,
) -> ParkedAttempted<'a> {
    ParkedAttempted {
        topic: &rec.topic,
        partition: rec.partition,
        offset: rec.offset,
        handler,
        attempt,
        result,
        error,
        next_in,
    }
}

async fn delete(tx: &mut sqlx::PgConnection, seq: i64) -> Result<(), OutboxError> {
    sqlx::query("DELETE FROM weir_parked WHERE seq = $1")
        .bind(seq)
        .execute(tx)
        .await?;
    Ok(())
}
