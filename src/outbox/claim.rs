//! Claiming rows to publish, and recording what became of them: the relay's SQL, and the pure
//! rules (which rows of a key go in one round, how long a failed row waits) it applies.
//!
//! # Ordering and exclusion
//!
//! A relay round runs in one transaction that stays open while the round's records are
//! published, and claims *keys*, not rows:
//!
//! 1. **Heads.** It locks, `FOR UPDATE SKIP LOCKED`, up to `max_keys` rows that are due and have
//!    no earlier (lower `seq`) unpublished row of their key. Holding a key's head row means owning
//!    the key: no other relay can see a later row of that key as a head while the head is
//!    unpublished, and a relay whose snapshot is older than a just-committed round finds the
//!    head it wanted locked (skipped) or, once re-checked, published (filtered out). That
//!    re-check is why the heads are row-locked rather than only advisory-locked.
//! 2. **Key locks.** It takes `pg_try_advisory_xact_lock` on each key and drops the keys it did
//!    not get. This only matters when two writers insert rows of one key concurrently and the
//!    lower `seq` commits last: that late row is then a second head of the key, and the advisory
//!    lock keeps two relays from publishing one key at the same time.
//! 3. **Runs.** For each owned key it reads up to `rows_per_key` unpublished rows from the head
//!    on, cut at the first row not due yet.
//!
//! The round then publishes each key's run in order, one record after the other (the next only
//! once the broker acknowledged the previous), stops the key at its first failure, and in the
//! same transaction marks the published rows and records the failure. Per key, rows are
//! therefore published in `seq` order, except that a row committed after a later row of its
//! key was already published goes out when it becomes visible: writers that need a strict
//! order per entity serialise their transactions on the entity (a row lock on it), which they
//! need for a consistent state change anyway.

use super::OutboxError;
use sqlx::{PgConnection, Row};
use std::collections::HashMap;
use std::time::Duration;
use uuid::Uuid;

/// One row claimed for publishing.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Claimed {
    pub(crate) id: Uuid,
    pub(crate) seq: i64,
    pub(crate) key: String,
    pub(crate) topic: String,
    pub(crate) payload: Vec<u8>,
    pub(crate) headers: serde_json::Value,
    /// Attempts before this one.
    pub(crate) attempts: i32,
    /// `next_attempt_at` has passed.
    pub(crate) due: bool,
}

/// A failed row: its id, what went wrong, and how long it waits before the next attempt.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Failed {
    pub(crate) id: Uuid,
    pub(crate) error: String,
    pub(crate) delay: Duration,
}

const HEADS: &str = "
    SELECT o.id, o.key
    FROM weir_outbox o
    WHERE o.published_at IS NULL
      AND o.next_attempt_at <= now()
      AND NOT EXISTS (
          SELECT 1 FROM weir_outbox e
          WHERE e.key = o.key AND e.seq < o.seq AND e.published_at IS NULL)
    ORDER BY o.seq
    LIMIT $1
    FOR UPDATE OF o SKIP LOCKED";

const KEY_LOCKS: &str = "
    SELECT k, pg_try_advisory_xact_lock(
        hashtextextended('weir_outbox/' || coalesce(current_schema(), '') || '/' || k, 0))
    FROM unnest($1::text[]) AS k";

const RUNS: &str = "
    SELECT id, seq, key, topic, payload, headers, attempts, due
    FROM (
        SELECT o.id, o.seq, o.key, o.topic, o.payload, o.headers, o.attempts,
               o.next_attempt_at <= now() AS due,
               row_number() OVER (PARTITION BY o.key ORDER BY o.seq) AS n
        FROM weir_outbox head
        JOIN weir_outbox o
          ON o.key = head.key AND o.seq >= head.seq AND o.published_at IS NULL
        WHERE head.id = ANY($1)
    ) run
    WHERE n <= $2
    ORDER BY key, seq";

const MARK_PUBLISHED: &str = "
    UPDATE weir_outbox
    SET published_at = now(), attempts = attempts + 1, last_error = NULL
    WHERE id = ANY($1)";

const MARK_FAILED: &str = "
    UPDATE weir_outbox o
    SET attempts = o.attempts + 1,
        last_error = f.error,
        next_attempt_at = now() + make_interval(secs => f.delay)
    FROM unnest($1::uuid[], $2::text[], $3::float8[]) AS f(id, error, delay)
    WHERE o.id = f.id";

/// Claims keys and reads their runs, inside the round's transaction. Returns one run per key,
/// keys in the order of their heads.
pub(crate) async fn claim(
    tx: &mut PgConnection,
    max_keys: usize,
    rows_per_key: usize,
) -> Result<Vec<Vec<Claimed>>, OutboxError> {
    let heads: Vec<(Uuid, String)> = sqlx::query_as(HEADS)
        .bind(i64::try_from(max_keys).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
    if heads.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<&str> = heads.iter().map(|(_, k)| k.as_str()).collect();
    let locked: HashMap<String, bool> = sqlx::query_as(KEY_LOCKS)
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
    let owned: Vec<Uuid> = heads
        .iter()
        .filter(|(_, key)| locked.get(key).copied().unwrap_or(false))
        .map(|(id, _)| *id)
        .collect();
    if owned.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(RUNS)
        .bind(&owned)
        .bind(i64::try_from(rows_per_key).unwrap_or(i64::MAX))
        .fetch_all(&mut *tx)
        .await?;
    let rows = rows
        .into_iter()
        .map(|r| {
            Ok(Claimed {
                id: r.try_get("id")?,
                seq: r.try_get("seq")?,
                key: r.try_get("key")?,
                topic: r.try_get("topic")?,
                payload: r.try_get("payload")?,
                headers: r.try_get("headers")?,
                attempts: r.try_get("attempts")?,
                due: r.try_get("due")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    Ok(plan(rows, rows_per_key))
}

/// Groups claimed rows into one run per key: in `seq` order, at most `rows_per_key` rows, cut
/// at the first row that is not due (a later row must not overtake it). Keys come in the order
/// of their first row.
pub(crate) fn plan(mut rows: Vec<Claimed>, rows_per_key: usize) -> Vec<Vec<Claimed>> {
    rows.sort_by_key(|r| r.seq);
    let mut order: Vec<String> = Vec::new();
    let mut runs: HashMap<String, (Vec<Claimed>, bool)> = HashMap::new();
    for row in rows {
        let (run, closed) = runs.entry(row.key.clone()).or_insert_with(|| {
            order.push(row.key.clone());
            (Vec::new(), false)
        });
        if *closed || run.len() >= rows_per_key.max(1) {
            continue;
        }
        if !row.due && !run.is_empty() {
            *closed = true;
            continue;
        }
        run.push(row);
    }
    order
        .into_iter()
        .filter_map(|key| runs.remove(&key).map(|(run, _)| run))
        .filter(|run| !run.is_empty())
        .collect()
}

/// Marks rows published and records failures, inside the round's transaction.
pub(crate) async fn record(
    tx: &mut PgConnection,
    published: &[Uuid],
    failed: &[Failed],
) -> Result<(), OutboxError> {
    if !published.is_empty() {
        sqlx::query(MARK_PUBLISHED)
            .bind(published)
            .execute(&mut *tx)
            .await?;
    }
    if !failed.is_empty() {
        let ids: Vec<Uuid> = failed.iter().map(|f| f.id).collect();
        let errors: Vec<&str> = failed.iter().map(|f| f.error.as_str()).collect();
        let delays: Vec<f64> = failed.iter().map(|f| f.delay.as_secs_f64()).collect();
        sqlx::query(MARK_FAILED)
            .bind(&ids)
            .bind(&errors)
            .bind(&delays)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// How long a row that failed `attempts_before + 1` times waits: `initial * 2^attempts_before`,
/// capped at `max`, then spread by `±jitter` (`sample` in `[0, 1)`) so rows that failed
/// together do not all come back in the same instant.
pub(crate) fn backoff(
    attempts_before: i32,
    initial: Duration,
    max: Duration,
    jitter: f64,
    sample: f64,
) -> Duration {
    let exponent = attempts_before.clamp(0, 62);
    let base = initial.as_secs_f64() * 2f64.powi(exponent);
    let capped = base.min(max.as_secs_f64());
    let spread = 1.0 + jitter.clamp(0.0, 1.0) * (2.0 * sample.clamp(0.0, 1.0) - 1.0);
    Duration::from_secs_f64((capped * spread).max(0.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(seq: i64, key: &str, due: bool) -> Claimed {
        Claimed {
            id: Uuid::from_u128(seq as u128),
            seq,
            key: key.to_owned(),
            topic: "t".to_owned(),
            payload: Vec::new(),
            headers: serde_json::json!({}),
            attempts: 0,
            due,
        }
    }

    fn seqs(runs: &[Vec<Claimed>]) -> Vec<Vec<i64>> {
        runs.iter()
            .map(|run| run.iter().map(|r| r.seq).collect())
            .collect()
    }

    #[test]
    fn runs_keep_seq_order_within_a_key_and_head_order_across_keys() {
        let rows = vec![
            row(5, "b", true),
            row(2, "a", true),
            row(3, "b", true),
            row(9, "a", true),
            row(4, "a", true),
        ];
        assert_eq!(seqs(&plan(rows, 10)), vec![vec![2, 4, 9], vec![3, 5]]);
    }

    #[test]
    fn a_run_stops_at_the_first_row_that_is_not_due_so_nothing_overtakes_it() {
        let rows = vec![
            row(1, "a", true),
            row(2, "a", false),
            row(3, "a", true),
            row(4, "b", true),
        ];
        assert_eq!(seqs(&plan(rows, 10)), vec![vec![1], vec![4]]);
    }

    #[test]
    fn a_run_holds_at_most_rows_per_key_rows() {
        let rows = (1..=10).map(|s| row(s, "a", true)).collect();
        assert_eq!(seqs(&plan(rows, 3)), vec![vec![1, 2, 3]]);
    }

    #[test]
    fn backoff_doubles_from_the_initial_delay_up_to_the_cap() {
        let d = |n| backoff(n, Duration::from_secs(1), Duration::from_secs(60), 0.0, 0.5);
        assert_eq!(d(0), Duration::from_secs(1));
        assert_eq!(d(1), Duration::from_secs(2));
        assert_eq!(d(5), Duration::from_secs(32));
        assert_eq!(d(6), Duration::from_secs(60));
        assert_eq!(d(10_000), Duration::from_secs(60));
    }

    #[test]
    fn backoff_jitter_stays_within_its_fraction() {
        let one = Duration::from_secs(10);
        let low = backoff(0, one, one, 0.2, 0.0);
        let high = backoff(0, one, one, 0.2, 0.999_999);
        assert!(low >= Duration::from_secs(8) && low < one, "{low:?}");
        assert!(high > one && high <= Duration::from_secs(12), "{high:?}");
    }
}
