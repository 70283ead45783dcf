//! The scheduled trigger: on each tick of `tasks.schedule` (cron, UTC), request processing of
//! the tasks pending for longer than `tasks.pending_after`, such as tasks whose processing
//! gave up or whose creation was written by a service without a relay.
//!
//! Every replica runs the schedule; one fires each tick. Firing is one transaction: insert
//! `(schedule, tick)` into `task_schedule_ticks` (`ON CONFLICT DO NOTHING`); only the replica
//! whose insert went in goes on to write the requests through the outbox, in the same
//! transaction. A tick is the cron occurrence, not the replica's clock reading, so replicas agree
//! on it.
//!
//! A task is requested at most once per `pending_after` (its `last_requested_at`), so a request
//! still on its way is not doubled by the next tick.
//!
//! Missed ticks: on start, if the schedule has fired before and its latest occurrence (at or
//! before now) is later than the latest fired tick, that one occurrence fires at once; the
//! others missed while no replica ran are skipped (the sweep looks at every pending task, so
//! one firing catches up). A tick is never fired twice: its row stays.

use super::store::request_processing;
use crate::reference::events::TriggeredBy;
use crate::reference::settings::parse_schedule as parse;
use crate::reference::Services;
use chrono::{DateTime, Utc};
use cron::Schedule;
use sqlx::PgPool;
use std::time::Duration;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Ticks older than this are deleted (the latest one always stays).
const KEEP_TICKS: Duration = Duration::from_secs(24 * 3600);

/// Starts the schedule if one is configured. An invalid expression is logged and not run
/// (`Settings` validation in `serve` refuses it first; this is a second guard).
pub(super) fn spawn(services: &Services, stop: CancellationToken) -> Option<JoinHandle<()>> {
    let expression = services.settings.tasks.schedule.clone()?;
    let schedule = match parse(&expression) {
        Ok(schedule) => schedule,
        Err(e) => {
            tracing::error!(schedule = %expression, error = %e, "Invalid task schedule; not running it.");
            return None;
        }
    };
    let scheduler = Scheduler {
        pool: services.pool.clone(),
        expression,
        schedule,
        pending_after: services.settings.tasks.pending_after,
        batch: services.settings.tasks.schedule_batch.max(1),
        replica: replica_name(),
    };
    Some(tokio::spawn(scheduler.run(stop)))
}

/// This replica's name in `task_schedule_ticks.fired_by` and the logs.
fn replica_name() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "weir".to_owned());
    format!("{host}/{}", std::process::id())
}

struct Scheduler {
    pool: PgPool,
    expression: String,
    schedule: Schedule,
    pending_after: Duration,
    batch: i64,
    replica: String,
}

/// The latest occurrence at or before `now`, if it is later than `last_fired`; `None` when the
/// schedule never fired (nothing was missed: no replica ever ran it).
fn missed_tick(
    schedule: &Schedule,
    last_fired: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Option<DateTime<Utc>> {
    let last_fired = last_fired?;
    // `after(t)` runs both ways: backwards it yields the occurrences before t.
    let latest = schedule
        .after(&(now + chrono::Duration::milliseconds(1)))
        .next_back()?;
    (latest > last_fired).then_some(latest)
}

impl Scheduler {
    async fn run(self, stop: CancellationToken) {
        match self.last_fired().await {
            Ok(last) => {
                if let Some(tick) = missed_tick(&self.schedule, last, Utc::now()) {
                    tracing::info!(tick_at = %tick, "Firing the latest tick missed while no replica ran.");
                    self.fire(tick).await;
                }
            }
            Err(e) => tracing::error!(error = %e, "Cannot read the schedule's last tick."),
        }
        // Logged once the missed tick (if any) is handled.
        tracing::info!(schedule = %self.expression, replica = %self.replica, "Task schedule running.");
        let mut after = Utc::now();
        loop {
            let Some(tick) = self.schedule.after(&after).next() else {
                tracing::info!(schedule = %self.expression, "The schedule has no more ticks.");
                return;
            };
            let wait = (tick - Utc::now()).to_std().unwrap_or_default();
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(wait) => {}
            }
            self.fire(tick).await;
            // Ticks that passed while this one fired (a stalled process, a slow database) are
            // skipped, not fired one after the other: the next sweep covers them.
            after = tick.max(Utc::now());
        }
    }

    async fn last_fired(&self) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
        sqlx::query_scalar("SELECT max(tick_at) FROM task_schedule_ticks WHERE schedule = $1")
            .bind(&self.expression)
            .fetch_one(&self.pool)
            .await
    }

    /// Fires `tick` unless another replica did; errors are logged (the next tick sweeps again).
    async fn fire(&self, tick: DateTime<Utc>) {
        match self.try_fire(tick).await {
            Ok(Some(requested)) => tracing::info!(
                tick_at = %tick.to_rfc3339(),
                replica = %self.replica,
                requested = requested.len(),
                "Schedule fired."
            ),
            Ok(None) => tracing::debug!(
                tick_at = %tick.to_rfc3339(),
                "Schedule tick already fired by another replica."
            ),
            Err(e) => tracing::error!(
                tick_at = %tick.to_rfc3339(),
                error = %e,
                "Schedule tick failed; the next tick sweeps again."
            ),
        }
    }

    /// The tasks requested, or `None` if the tick was already taken.
    async fn try_fire(&self, tick: DateTime<Utc>) -> Result<Option<Vec<Uuid>>, weir::OutboxError> {
        let mut tx = self.pool.begin().await?;
        let taken = sqlx::query(
            "INSERT INTO task_schedule_ticks (schedule, tick_at, fired_by) VALUES ($1, $2, $3)
             ON CONFLICT DO NOTHING",
        )
        .bind(&self.expression)
        .bind(tick)
        .bind(&self.replica)
        .execute(&mut *tx)
        .await?
        .rows_affected()
            == 1;
        if !taken {
            return Ok(None);
        }
        let pending_after = self.pending_after.as_secs_f64();
        let due: Vec<Uuid> = sqlx::query_scalar(
            "SELECT id FROM tasks
              WHERE status = 'pending'
                AND created_at < now() - make_interval(secs => $1)
                AND (last_requested_at IS NULL
                     OR last_requested_at < now() - make_interval(secs => $1))
              ORDER BY created_at
              LIMIT $2
                FOR UPDATE SKIP LOCKED",
        )
        .bind(pending_after)
        .bind(self.batch)
        .fetch_all(&mut *tx)
        .await?;
        let mut requested = Vec::with_capacity(due.len());
        for id in due {
            if request_processing(&mut tx, id, TriggeredBy::Scheduled)
                .await?
                .is_some()
            {
                requested.push(id);
            }
        }
        sqlx::query(
            "UPDATE task_schedule_ticks SET requested = $3 WHERE schedule = $1 AND tick_at = $2",
        )
        .bind(&self.expression)
        .bind(tick)
        .bind(requested.len() as i32)
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "DELETE FROM task_schedule_ticks
              WHERE schedule = $1 AND tick_at < $2 - make_interval(secs => $3)",
        )
        .bind(&self.expression)
        .bind(tick)
        .bind(KEEP_TICKS.as_secs_f64())
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(Some(requested))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn at(h: u32, m: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 1, h, m, s).unwrap()
    }

    #[test]
    fn parses_expressions_with_seconds() {
        assert!(parse("*/2 * * * * *").is_ok());
        assert!(parse("0 0 3 * * *").is_ok());
        assert!(parse("not cron").is_err());
    }

    #[test]
    fn fires_only_the_latest_missed_tick_and_only_after_a_previous_firing() {
        let hourly = parse("0 0 * * * *").unwrap();
        // Down from 10:00 to 13:20: 11:00, 12:00 and 13:00 were missed; 13:00 fires, once.
        assert_eq!(
            missed_tick(&hourly, Some(at(10, 0, 0)), at(13, 20, 0)),
            Some(at(13, 0, 0))
        );
        // 13:00 fired already (by this or another replica): nothing.
        assert_eq!(
            missed_tick(&hourly, Some(at(13, 0, 0)), at(13, 20, 0)),
            None
        );
        // A tick exactly now counts as missed if not fired.
        assert_eq!(
            missed_tick(&hourly, Some(at(12, 0, 0)), at(13, 0, 0)),
            Some(at(13, 0, 0))
        );
        // Never fired before: no catch-up.
        assert_eq!(missed_tick(&hourly, None, at(13, 20, 0)), None);
    }
}
