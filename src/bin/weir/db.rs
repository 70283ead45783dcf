//! The database side of the binary: the connection pool, the migrations the reference service
//! needs, and `weir migrate`.

use crate::config::DatabaseSettings;
use anyhow::Context as _;
use sqlx::postgres::PgPoolOptions;
use sqlx::PgPool;
use weir::Migration;

/// Every migration the reference service needs, in order: Weir's tables, then its own. A new
/// table is a new file and one more entry in one of these lists; ids never change once applied.
pub(crate) fn migrations() -> Vec<Migration> {
    [
        weir::OUTBOX_MIGRATIONS,
        crate::reference::tasks::TABLE,
        crate::reference::resources::MIGRATIONS,
        crate::reference::tasks::MIGRATIONS,
    ]
    .concat()
}

/// A pool on `[database] url`, connected once to fail early on a wrong URL.
pub(crate) async fn connect(settings: &DatabaseSettings) -> anyhow::Result<PgPool> {
    let url = settings
        .url
        .as_deref()
        .context("no database configured: set [database] url or WEIR_DATABASE__URL")?;
    PgPoolOptions::new()
        .max_connections(settings.max_connections.max(2))
        .connect(url)
        .await
        .with_context(|| format!("cannot connect to the database ({settings:?})"))
}

/// `weir migrate`: applies pending migrations and exits.
pub(crate) async fn migrate(settings: &DatabaseSettings) -> anyhow::Result<()> {
    let pool = connect(settings).await?;
    let applied = weir::migrate(&pool, &migrations()).await?;
    println!(
        "{}",
        if applied.is_empty() {
            "schema up to date".to_owned()
        } else {
            format!("applied {}", applied.join(", "))
        }
    );
    pool.close().await;
    Ok(())
}
