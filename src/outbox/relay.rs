//! `OutboxRelay`: publishes committed outbox rows, in order per key, and marks them published.
//!
//! The loop: run a round (claim keys, publish their runs, record the outcome, commit; see
//! `claim.rs` for why two relays can never publish one key at once), then wait for a NOTIFY on
//! `weir_outbox`, the poll interval, or shutdown; a full round goes again at once. Between
//! rounds it refreshes the backlog gauges and purges published rows older than the retention.

use super::claim::{self, Claimed, Failed};
use super::row::headers_from_json;
use super::OutboxError;
use crate::bus::{OutboundRecord, Publisher};
use crate::telemetry::outbox::{
    OutboxBacklog, OutboxListenerLost, OutboxMetrics, OutboxPublishFailed, OutboxPurged,
    OutboxRelayRunning, OutboxRoundFailed, OutboxRowPublished,
};
use futures_util::future::join_all;
use serde::Deserialize;
use sqlx::postgres::PgListener;
use sqlx::PgPool;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// The channel the `weir_outbox` insert trigger notifies.
pub const OUTBOX_CHANNEL: &str = "weir_outbox";

/// Deleting published rows in slices keeps each statement's locks and WAL burst small.
const PURGE_SLICE: i64 = 10_000;

/// How a relay claims, retries and cleans up. Every field has a default.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RelayConfig {
    /// Look for due rows at least this often, NOTIFY or not (retries and lost notifications).
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// Keys claimed per round. With `rows_per_key`, bounds the rows one crash can duplicate.
    pub max_keys: usize,
    /// Rows of one key published per round, one after the other.
    pub rows_per_key: usize,
    /// Wait after a row's first failed attempt; doubles with each further failure.
    #[serde(with = "humantime_serde")]
    pub retry_initial: Duration,
    /// The longest wait between attempts.
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Spread of each wait, as a fraction (0.2 = ±20 %).
    pub retry_jitter: f64,
    /// Published rows are deleted once they are this old.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
    /// How often to delete published rows past the retention.
    #[serde(with = "humantime_serde")]
    pub purge_interval: Duration,
    /// How often to read the backlog gauges from the table.
    #[serde(with = "humantime_serde")]
    pub metrics_interval: Duration,
    /// Wake up on `NOTIFY weir_outbox` (the insert trigger) instead of waiting for the poll.
    pub listen: bool,
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(1),
            max_keys: 64,
            rows_per_key: 16,
            retry_initial: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            retry_jitter: 0.2,
            retention: Duration::from_secs(24 * 3600),
            purge_interval: Duration::from_secs(60),
            metrics_interval: Duration::from_secs(5),
            listen: true,
        }
    }
}

/// Publishes committed outbox rows. Run one or several per database.
///
/// # Order
///
/// Rows of one key are published in `seq` (insertion) order, one at a time: the next only after
/// the broker acknowledged the previous, and never by two relays at once (a round owns the keys
/// it claims until it commits). A row that fails holds back the rest of its key until it is
/// published; other keys go on. The one exception is a row that commits after a later row of
/// its key was already published (two transactions writing one key concurrently): it goes out
/// when it becomes visible. Writers that need a strict order per entity lock the entity row, as
/// a consistent state change needs anyway.
///
/// # Delivery guarantees
///
/// At least once. A row is marked published in the same transaction that claimed it, after the
/// broker acknowledged it, so in normal operation each row is published exactly once, however
/// many relays run. A row is published again only if its round's transaction does not commit
/// after the broker acknowledged it: the relay dies or loses its database connection in
/// between, or the final commit fails. Each such event duplicates at most the rows of that one
/// round, `max_keys × rows_per_key` at most, each once; duplicates keep their CloudEvent id, so
/// an [`inbox`](crate::inbox) on the consumer side absorbs them.
///
/// A failed row is retried with exponential backoff (`retry_initial` doubling up to
/// `retry_max`), and each failure is recorded on the row (`attempts`, `last_error`,
/// `next_attempt_at`). A row that can never be published (a topic that does not exist, a
/// record over the broker's size limit) blocks its key until someone fixes or deletes it:
/// skipping it would break the order, and `weir_outbox_oldest_pending_age_seconds` shows it.
///
/// ```no_run
/// # async fn example(pool: sqlx::PgPool) -> Result<(), Box<dyn std::error::Error>> {
/// use weir::{KafkaBus, KafkaConfig, Metrics, OutboxMetrics, OutboxRelay, RelayConfig};
/// let metrics = Metrics::new();
/// let bus = KafkaBus::with_metrics(KafkaConfig::new("kafka:9092"), metrics.clone())?;
/// let relay = OutboxRelay::new(pool, bus, RelayConfig::default(), OutboxMetrics::new(metrics.registry())?);
/// let shutdown = tokio_util::sync::CancellationToken::new();
/// tokio::spawn(relay.run(shutdown.clone()));
/// // ... on SIGTERM:
/// shutdown.cancel();
/// # Ok(()) }
/// ```
pub struct OutboxRelay {
    pool: PgPool,
    publisher: Arc<dyn Publisher>,
    config: RelayConfig,
    metrics: OutboxMetrics,
}

impl std::fmt::Debug for OutboxRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutboxRelay")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl OutboxRelay {
    /// A relay publishing through `publisher` (a [`KafkaBus`](crate::KafkaBus), whose publish
    /// resolves on the broker's acknowledgement). The pool needs two connections: one for
    /// LISTEN, one for rounds.
    pub fn new(
        pool: PgPool,
        publisher: impl Publisher + 'static,
        config: RelayConfig,
        metrics: OutboxMetrics,
    ) -> Self {
        Self {
            pool,
            publisher: Arc::new(publisher),
            config,
            metrics,
        }
    }

    /// Runs until `shutdown` is cancelled. A round in flight is finished first (bounded by the
    /// publisher's delivery timeout), so stopping does not cause duplicates. Database and broker
    /// errors never end the loop: they are logged, counted, and retried.
    pub async fn run(self, shutdown: CancellationToken) {
        OutboxRelayRunning { running: true }.emit();
        let wake = Arc::new(Notify::new());
        let listener_stop = shutdown.child_token();
        let listener = if self.config.listen {
            // Listening before the first round: a row committed between that round and LISTEN
            // would otherwise wait for the poll.
            let first = connect_listener(&self.pool).await;
            Some(tokio::spawn(listen(
                self.pool.clone(),
                first,
                wake.clone(),
                listener_stop.clone(),
                self.config.poll_interval,
            )))
        } else {
            None
        };
        let mut next_purge = Instant::now() + self.config.purge_interval;
        let mut next_metrics = Instant::now();
        while !shutdown.is_cancelled() {
            let full = match self.round().await {
                Ok(full) => full,
                Err(error) => {
                    OutboxRoundFailed { error: &error }.emit();
                    false
                }
            };
            let now = Instant::now();
            if now >= next_metrics {
                if let Err(error) = self.refresh_metrics().await {
                    OutboxRoundFailed { error: &error }.emit();
                }
                next_metrics = now + self.config.metrics_interval;
            }
            if now >= next_purge {
                if let Err(error) = self.purge().await {
                    OutboxRoundFailed { error: &error }.emit();
                }
                next_purge = now + self.config.purge_interval;
            }
            if full {
                continue;
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = wake.notified() => {}
                () = tokio::time::sleep(self.config.poll_interval) => {}
            }
        }
        listener_stop.cancel();
        if let Some(task) = listener {
            let _ = task.await;
        }
        OutboxRelayRunning { running: false }.emit();
    }

    /// One round: claim keys, publish their runs, record the outcome, commit. True when the
    /// round hit a limit, so more rows are probably due right now.
    async fn round(&self) -> Result<bool, OutboxError> {
        // Zero would claim nothing forever; one is the slowest setting that makes progress.
        let (max_keys, rows_per_key) =
            (self.config.max_keys.max(1), self.config.rows_per_key.max(1));
        let mut tx = self.pool.begin().await?;
        let runs = claim::claim(&mut tx, max_keys, rows_per_key).await?;
        if runs.is_empty() {
            tx.commit().await?;
            return Ok(false);
        }
        let full = runs.len() >= max_keys || runs.iter().any(|r| r.len() >= rows_per_key);
        let outcomes = join_all(runs.into_iter().map(|run| self.publish_run(run))).await;
        let mut published = Vec::new();
        let mut failed = Vec::new();
        for (ids, failure) in outcomes {
            published.extend(ids);
            failed.extend(failure);
        }
        claim::record(&mut tx, &published, &failed).await?;
        tx.commit().await?;
        Ok(full)
    }

    /// Publishes one key's run in order, each record only after the previous one was
    /// acknowledged; stops at the first failure, which must not be overtaken.
    async fn publish_run(&self, run: Vec<Claimed>) -> (Vec<Uuid>, Option<Failed>) {
        let mut published = Vec::with_capacity(run.len());
        for row in run {
            let attempt = row.attempts.saturating_add(1);
            let outcome = match headers_from_json(&row.headers) {
                Ok(headers) => {
                    let record = OutboundRecord {
                        topic: row.topic.clone(),
                        key: Some(row.key.clone().into_bytes()),
                        value: Some(row.payload),
                        headers,
                    };
                    self.publisher
                        .publish_record(record)
                        .await
                        .map(|_| ())
                        .map_err(|e| e.to_string())
                }
                Err(invalid) => Err(format!("invalid row: {invalid}")),
            };
            match outcome {
                Ok(()) => {
                    OutboxRowPublished {
                        id: row.id,
                        topic: &row.topic,
                        key: &row.key,
                        attempt,
                    }
                    .emit(&self.metrics);
                    published.push(row.id);
                }
                Err(error) => {
                    let delay = claim::backoff(
                        row.attempts,
                        self.config.retry_initial,
                        self.config.retry_max,
                        self.config.retry_jitter,
                        fastrand::f64(),
                    );
                    OutboxPublishFailed {
                        id: row.id,
                        topic: &row.topic,
                        key: &row.key,
                        attempt,
                        retry_in: delay,
                        error: &error,
                    }
                    .emit(&self.metrics);
                    return (
                        published,
                        Some(Failed {
                            id: row.id,
                            error,
                            delay,
                        }),
                    );
                }
            }
        }
        (published, None)
    }

    /// Reads the backlog (pending rows, age of the oldest) into the gauges.
    pub async fn refresh_metrics(&self) -> Result<(), OutboxError> {
        let (pending, oldest_age): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), EXTRACT(EPOCH FROM now() - min(created_at))::float8
             FROM weir_outbox WHERE published_at IS NULL",
        )
        .fetch_one(&self.pool)
        .await?;
        OutboxBacklog {
            pending,
            oldest_age,
        }
        .emit(&self.metrics);
        Ok(())
    }

    /// Deletes published rows older than the retention; returns how many.
    pub async fn purge(&self) -> Result<u64, OutboxError> {
        let mut total = 0;
        loop {
            let deleted = sqlx::query(
                "DELETE FROM weir_outbox WHERE id IN (
                     SELECT id FROM weir_outbox
                     WHERE published_at < now() - make_interval(secs => $1)
                     LIMIT $2)",
            )
            .bind(self.config.retention.as_secs_f64())
            .bind(PURGE_SLICE)
            .execute(&self.pool)
            .await?
            .rows_affected();
            total += deleted;
            if deleted < PURGE_SLICE as u64 {
                break;
            }
        }
        OutboxPurged {
            rows: total,
            older_than: self.config.retention,
        }
        .emit();
        Ok(total)
    }
}

async fn connect_listener(pool: &PgPool) -> Result<PgListener, sqlx::Error> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen(OUTBOX_CHANNEL).await?;
    Ok(listener)
}

/// Turns notifications into wake-ups. `PgListener` reconnects by itself on `recv`; if even that
/// fails, this reconnects after `retry`, waking the relay once since notifications may have
/// been missed meanwhile.
async fn listen(
    pool: PgPool,
    first: Result<PgListener, sqlx::Error>,
    wake: Arc<Notify>,
    stop: CancellationToken,
    retry: Duration,
) {
    let mut current = first;
    loop {
        match current {
            Ok(mut listener) => loop {
                tokio::select! {
                    () = stop.cancelled() => return,
                    received = listener.recv() => match received {
                        Ok(_) => wake.notify_one(),
                        Err(error) => {
                            OutboxListenerLost { error: &error }.emit();
                            break;
                        }
                    },
                }
            },
            Err(error) => OutboxListenerLost { error: &error }.emit(),
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(retry) => {}
        }
        current = connect_listener(&pool).await;
        if current.is_ok() {
            wake.notify_one();
        }
    }
}
