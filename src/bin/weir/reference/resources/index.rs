//! The search index: `resource_indexer` (on `resource.created` and, as `resource_reindexer`,
//! on `resource.updated`) writes a resource's full-text document; `resource_cleanup` (on
//! `resource.deleted`) removes the entry, the thumbnail and the file; [`search`] queries it.
//!
//! The document is built in PostgreSQL from the current row, so a rerun, or a created-event
//! handled after a rename, writes the same document as the latest state calls for. Everything
//! uses the `simple` configuration (no stemming, no stop words): names and file contents are
//! matched word for word, whatever their language.

use super::{store, EffectError, Services};
use crate::reference::events::ResourceDeleted;
use serde::Serialize;
use sqlx::PgPool;
use tokio::io::AsyncReadExt as _;
use uuid::Uuid;

/// Names are indexed whole and split at punctuation too, so `q3-report.txt` is found by
/// `report`. Weights rank name hits above content hits.
const UPSERT: &str = "
INSERT INTO resource_index (resource_id, document, indexed_at)
SELECT id,
       setweight(to_tsvector('simple', name || ' ' || regexp_replace(name, '[^[:alnum:]]+', ' ', 'g')), 'A')
    || setweight(to_tsvector('simple', original_name || ' '
                             || regexp_replace(original_name, '[^[:alnum:]]+', ' ', 'g')), 'B')
    || setweight(to_tsvector('simple', content_type || ' '
                             || regexp_replace(content_type, '[^[:alnum:]]+', ' ', 'g') || ' '
                             || array_to_string(tags, ' ')), 'C')
    || setweight(to_tsvector('simple', $2), 'D'),
       now()
FROM resources WHERE id = $1 AND deleted_at IS NULL
ON CONFLICT (resource_id) DO UPDATE SET document = EXCLUDED.document, indexed_at = now()";

/// Whether a file's content goes into the index.
pub(crate) fn is_text(content_type: &str) -> bool {
    content_type.starts_with("text/") || content_type == "application/json"
}

/// Writes (or rewrites) the resource's index entry from its current row and, for text files,
/// the first `index_text_bytes` of its content. Does nothing for a deleted resource.
pub(crate) async fn run(services: &Services, id: Uuid) -> Result<(), EffectError> {
    let Some(row) = store::live(&services.pool, id).await? else {
        return Ok(());
    };
    let content = if is_text(&row.content_type) {
        let storage = &services.settings.storage;
        let path = store::resolve(&storage.dir, &row.file_path)?;
        read_text(&path, storage.index_text_bytes)
            .await
            .map_err(|e| {
                EffectError::transient(format!("cannot read the file {}: {e}", row.file_path))
            })?
    } else {
        String::new()
    };
    sqlx::query(UPSERT)
        .bind(id)
        .bind(content)
        .execute(&services.pool)
        .await?;
    Ok(())
}

/// Up to `limit` bytes of a file as text: invalid UTF-8 replaced, NULs (which PostgreSQL text
/// cannot hold) dropped.
async fn read_text(path: &std::path::Path, limit: u64) -> std::io::Result<String> {
    let file = tokio::fs::File::open(path).await?;
    let mut bytes = Vec::new();
    file.take(limit).read_to_end(&mut bytes).await?;
    Ok(String::from_utf8_lossy(&bytes).replace('\0', " "))
}

/// Removes what a deleted resource left: its index entry, thumbnail and file. Only for a row
/// that is really deleted, so a stale or forged event cannot remove a live resource's data.
pub(crate) async fn remove(
    services: &Services,
    event: &ResourceDeleted,
) -> Result<(), EffectError> {
    let Some(row) = store::load(&services.pool, event.resource_id).await? else {
        return Ok(());
    };
    if row.deleted_at.is_none() {
        tracing::warn!(id = %row.id, "A deletion event for a live resource; ignored.");
        return Ok(());
    }
    sqlx::query("DELETE FROM resource_index WHERE resource_id = $1")
        .bind(row.id)
        .execute(&services.pool)
        .await?;
    let dir = &services.settings.storage.dir;
    for file in [store::thumbnail_path(&row.file_path), row.file_path.clone()] {
        store::remove_if_present(&store::resolve(dir, &file)?)
            .map_err(|e| EffectError::transient(format!("cannot remove {file}: {e}")))?;
    }
    sqlx::query("UPDATE resources SET thumbnail = NULL WHERE id = $1")
        .bind(row.id)
        .execute(&services.pool)
        .await?;
    Ok(())
}

/// One search result.
#[derive(Debug, Serialize)]
pub(crate) struct Hit {
    id: Uuid,
    name: String,
    original_name: String,
    content_type: String,
    rank: f32,
}

/// Live resources whose document matches `query` (web-search syntax: words, `"a phrase"`,
/// `-not`, `or`), best first.
pub(crate) async fn search(
    pool: &PgPool,
    query: &str,
    limit: i64,
) -> Result<Vec<Hit>, sqlx::Error> {
    let rows: Vec<(Uuid, String, String, String, f32)> = sqlx::query_as(
        "SELECT r.id, r.name, r.original_name, r.content_type, ts_rank(i.document, q) AS rank
         FROM resource_index i
         JOIN resources r ON r.id = i.resource_id,
              websearch_to_tsquery('simple', $1) q
         WHERE i.document @@ q AND r.deleted_at IS NULL
         ORDER BY rank DESC, r.created_at DESC
         LIMIT $2",
    )
    .bind(query)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(id, name, original_name, content_type, rank)| Hit {
            id,
            name,
            original_name,
            content_type,
            rank,
        })
        .collect())
}
