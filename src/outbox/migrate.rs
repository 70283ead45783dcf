//! A small migration runner: SQL files embedded in the binary, applied once each, in list order,
//! recorded in `weir_migrations`.
//!
//! Why not sqlx's migrator: it needs the `macros`/`migrate` features (a heavier build), and Weir
//! wants lists that compose: Weir's own tables and a service's tables go through one runner, each
//! migration identified by a name that says whose it is, so adding a migration is adding a file
//! and a line to a list.
//!
//! Every run happens in one transaction holding a transaction-scoped advisory lock (per schema),
//! so replicas starting together apply each migration exactly once and never see half of one.
//! The cost: a migration cannot use statements that refuse to run in a transaction
//! (`CREATE INDEX CONCURRENTLY`).

use super::OutboxError;
use crate::telemetry::outbox::MigrationsApplied;
use sqlx::PgPool;
use std::collections::{HashMap, HashSet};

/// One schema change: a unique id and its SQL (one or more statements).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Migration {
    /// Unique and stable forever, e.g. `weir/0001_outbox`; the prefix says whose it is.
    pub id: &'static str,
    /// The statements. Never edit an applied migration: add a new one.
    pub sql: &'static str,
}

impl Migration {
    /// A migration, usually `Migration::new("svc/0003_x", include_str!("migrations/0003_x.sql"))`.
    pub const fn new(id: &'static str, sql: &'static str) -> Self {
        Self { id, sql }
    }

    /// Detects an applied migration whose file was edited afterwards (FNV-1a, 64 bits: this
    /// catches accidents, it is not a security check).
    pub(crate) fn checksum(&self) -> String {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.sql.bytes() {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{hash:016x}")
    }
}

/// Weir's own tables: `weir_outbox` (with its NOTIFY trigger) and `weir_inbox`.
pub const OUTBOX_MIGRATIONS: &[Migration] = &[
    Migration::new(
        "weir/0001_outbox",
        include_str!("migrations/weir_0001_outbox.sql"),
    ),
    Migration::new(
        "weir/0002_inbox",
        include_str!("migrations/weir_0002_inbox.sql"),
    ),
];

const CREATE_TABLE: &str = "CREATE TABLE IF NOT EXISTS weir_migrations (
    id         text        PRIMARY KEY,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Serialises runners on the same schema (replicas of one service), not across schemas.
const LOCK: &str = "SELECT pg_advisory_xact_lock(
    hashtextextended('weir_migrations/' || coalesce(current_schema(), ''), 0))";

/// Applies the migrations not applied yet, in order, in one transaction; returns the ids it
/// applied (empty when the schema was up to date).
///
/// Fails without applying anything if an applied migration's SQL changed, if two migrations
/// share an id, or if any statement fails.
pub async fn migrate(
    pool: &PgPool,
    migrations: &[Migration],
) -> Result<Vec<&'static str>, OutboxError> {
    check_unique(migrations)?;
    let mut tx = pool.begin().await?;
    sqlx::query(LOCK).execute(&mut *tx).await?;
    sqlx::raw_sql(CREATE_TABLE).execute(&mut *tx).await?;
    let applied: HashMap<String, String> =
        sqlx::query_as::<_, (String, String)>("SELECT id, checksum FROM weir_migrations")
            .fetch_all(&mut *tx)
            .await?
            .into_iter()
            .collect();
    let mut done = Vec::new();
    for migration in migrations {
        match applied.get(migration.id) {
            Some(checksum) if *checksum == migration.checksum() => {}
            Some(_) => {
                return Err(OutboxError::Migration {
                    id: migration.id.to_owned(),
                    message: "it was changed after it was applied; add a new migration instead"
                        .to_owned(),
                })
            }
            None => {
                sqlx::raw_sql(migration.sql)
                    .execute(&mut *tx)
                    .await
                    .map_err(|e| OutboxError::Migration {
                        id: migration.id.to_owned(),
                        message: e.to_string(),
                    })?;
                sqlx::query("INSERT INTO weir_migrations (id, checksum) VALUES ($1, $2)")
                    .bind(migration.id)
                    .bind(migration.checksum())
                    .execute(&mut *tx)
                    .await?;
                done.push(migration.id);
            }
        }
    }
    tx.commit().await?;
    MigrationsApplied { ids: &done }.emit();
    Ok(done)
}

fn check_unique(migrations: &[Migration]) -> Result<(), OutboxError> {
    let mut seen = HashSet::new();
    for m in migrations {
        if !seen.insert(m.id) {
            return Err(OutboxError::Migration {
                id: m.id.to_owned(),
                message: "two migrations have this id".to_owned(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_embedded_migration_has_a_unique_id() {
        let all: Vec<Migration> = OUTBOX_MIGRATIONS.to_vec();
        assert!(check_unique(&all).is_ok());
        assert!(check_unique(&[all[0], all[0]]).is_err());
    }

    #[test]
    fn a_changed_sql_text_changes_the_checksum() {
        let a = Migration::new("x/1", "CREATE TABLE a (id int)");
        let b = Migration::new("x/1", "CREATE TABLE a (id bigint)");
        assert_ne!(a.checksum(), b.checksum());
        assert_eq!(a.checksum(), a.checksum());
    }
}
