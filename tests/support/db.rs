//! A fresh PostgreSQL schema per test, so tests share nothing and can run in parallel.
//!
//! The server comes from `WEIR_TEST_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`, what `scripts/test.sh` checks). Each `TestDb`
//! creates `weir_test_<uuid>` and points every connection's `search_path` at it through the
//! startup options, so the pool, LISTEN connections and child processes given [`TestDb::url`]
//! all see the same tables. The schema is dropped by [`TestDb::close`], or on drop (also when the
//! test panics) over a connection of its own.

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool};
use std::str::FromStr;

const DEFAULT_URL: &str = "postgres://postgres@127.0.0.1:5432/test";

/// The server URL tests use.
pub fn server_url() -> String {
    std::env::var("WEIR_TEST_DATABASE_URL")
        .ok()
        .filter(|u| !u.trim().is_empty())
        .unwrap_or_else(|| DEFAULT_URL.to_owned())
}

/// A schema of one's own and a pool on it.
pub struct TestDb {
    pool: PgPool,
    schema: String,
    dropped: bool,
}

impl TestDb {
    /// An empty fresh schema.
    pub async fn new() -> TestDb {
        let schema = format!("weir_test_{}", uuid::Uuid::new_v4().simple());
        let server = server_url();
        let mut admin = PgConnectOptions::from_str(&server)
            .expect("WEIR_TEST_DATABASE_URL is a PostgreSQL URL")
            .connect()
            .await
            .unwrap_or_else(|e| {
                panic!("cannot connect to {server} (run scripts/test.sh, which checks PostgreSQL): {e}")
            });
        sqlx::query(&format!("CREATE SCHEMA {schema}"))
            .execute(&mut admin)
            .await
            .expect("create schema");
        let _ = admin.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options(&schema))
            .await
            .expect("pool on the test schema");
        TestDb {
            pool,
            schema,
            dropped: false,
        }
    }

    /// A fresh schema with Weir's own migrations (outbox, inbox) applied.
    pub async fn migrated() -> TestDb {
        let db = TestDb::new().await;
        weir::migrate(db.pool(), weir::OUTBOX_MIGRATIONS)
            .await
            .expect("migrations");
        db
    }

    /// The pool (connections have `search_path` set to the schema).
    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The schema's name.
    pub fn schema(&self) -> &str {
        &self.schema
    }

    /// A URL whose connections use this schema, for child processes (`WEIR_DATABASE__URL`).
    pub fn url(&self) -> String {
        let server = server_url();
        let separator = if server.contains('?') { '&' } else { '?' };
        format!("{server}{separator}options=-csearch_path%3D{}", self.schema)
    }

    /// A new pool on the schema (a second service instance, say).
    pub async fn new_pool(&self, max_connections: u32) -> PgPool {
        PgPoolOptions::new()
            .max_connections(max_connections)
            .connect_with(options(&self.schema))
            .await
            .expect("pool on the test schema")
    }

    /// Closes the pool and drops the schema.
    pub async fn close(mut self) {
        self.pool.close().await;
        drop_schema(&self.schema).await;
        self.dropped = true;
    }
}

fn options(schema: &str) -> PgConnectOptions {
    PgConnectOptions::from_str(&server_url())
        .expect("WEIR_TEST_DATABASE_URL is a PostgreSQL URL")
        .options([("search_path", schema)])
}

async fn drop_schema(schema: &str) {
    if let Ok(mut conn) = PgConnectOptions::from_str(&server_url())
        .expect("URL")
        .connect()
        .await
    {
        // Bounded: a test that left a transaction open must not hang the run here.
        let _ = sqlx::query("SET lock_timeout = '10s'")
            .execute(&mut conn)
            .await;
        let _ = sqlx::query(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .execute(&mut conn)
            .await;
        let _ = conn.close().await;
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if self.dropped {
            return;
        }
        // The pool belongs to the test's runtime; use a connection (and runtime) of our own.
        let schema = self.schema.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(drop_schema(&schema));
            }
        })
        .join();
    }
}
