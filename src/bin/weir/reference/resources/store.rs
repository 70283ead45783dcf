//! Files on disk and the `resources` rows: where a resource's file and thumbnail are, how files
//! are written so a crash never leaves half of one, and every statement that changes a row
//! together with the event announcing the change.

use super::EffectError;
use crate::reference::events::ResourceCreated;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::PgRow;
use sqlx::{PgPool, Row as _};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Component, Path, PathBuf};
use uuid::Uuid;
use weir::{Envelope, OutboxWriter};

/// A resource row, with whether (and when) its index entry was written.
#[derive(Debug, Clone)]
pub(crate) struct Row {
    pub(crate) id: Uuid,
    pub(crate) name: String,
    pub(crate) original_name: String,
    pub(crate) content_type: String,
    pub(crate) file_path: String,
    pub(crate) size_bytes: i64,
    pub(crate) tags: Vec<String>,
    pub(crate) created_at: DateTime<Utc>,
    pub(crate) updated_at: DateTime<Utc>,
    pub(crate) deleted_at: Option<DateTime<Utc>>,
    pub(crate) sha256: Option<String>,
    pub(crate) md5: Option<String>,
    pub(crate) hashed_at: Option<DateTime<Utc>>,
    pub(crate) width: Option<i32>,
    pub(crate) height: Option<i32>,
    pub(crate) phash: Option<String>,
    pub(crate) thumbnail: Option<String>,
    pub(crate) image_error: Option<String>,
    pub(crate) image_done_at: Option<DateTime<Utc>>,
    pub(crate) indexed_at: Option<DateTime<Utc>>,
}

const SELECT: &str = "SELECT r.*, i.indexed_at FROM resources r
                      LEFT JOIN resource_index i ON i.resource_id = r.id WHERE r.id = $1";

impl Row {
    fn from_row(row: &PgRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            id: row.try_get("id")?,
            name: row.try_get("name")?,
            original_name: row.try_get("original_name")?,
            content_type: row.try_get("content_type")?,
            file_path: row.try_get("file_path")?,
            size_bytes: row.try_get("size_bytes")?,
            tags: row.try_get("tags")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            deleted_at: row.try_get("deleted_at")?,
            sha256: row.try_get("sha256")?,
            md5: row.try_get("md5")?,
            hashed_at: row.try_get("hashed_at")?,
            width: row.try_get("width")?,
            height: row.try_get("height")?,
            phash: row.try_get("phash")?,
            thumbnail: row.try_get("thumbnail")?,
            image_error: row.try_get("image_error")?,
            image_done_at: row.try_get("image_done_at")?,
            indexed_at: row.try_get("indexed_at")?,
        })
    }

    /// The event contract's view of this resource (for updates and deletions).
    fn created(&self) -> ResourceCreated {
        ResourceCreated::new(
            self.id,
            &self.file_path,
            &self.content_type,
            &self.original_name,
        )
    }

    /// What the API shows: the row and the state of each side effect.
    pub(crate) fn view(&self) -> View {
        let done = |yes: bool| if yes { "done" } else { "pending" };
        let image = if !super::is_image(&self.content_type) {
            "not_applicable"
        } else if self.image_error.is_some() {
            "failed"
        } else {
            done(self.image_done_at.is_some())
        };
        // An entry older than the last rename is stale until the reindexer has run.
        let indexed = self.indexed_at.is_some_and(|at| at >= self.updated_at);
        View {
            id: self.id,
            name: self.name.clone(),
            original_name: self.original_name.clone(),
            content_type: self.content_type.clone(),
            size_bytes: self.size_bytes,
            tags: self.tags.clone(),
            created_at: self.created_at,
            updated_at: self.updated_at,
            sha256: self.sha256.clone(),
            md5: self.md5.clone(),
            phash: self.phash.clone(),
            width: self.width,
            height: self.height,
            thumbnail: self.thumbnail.clone(),
            image_error: self.image_error.clone(),
            indexed,
            side_effects: BTreeMap::from([
                ("hasher", done(self.hashed_at.is_some())),
                ("image", image),
                ("index", done(indexed)),
            ]),
        }
    }
}

/// A resource as the API returns it.
#[derive(Debug, Serialize)]
pub(crate) struct View {
    id: Uuid,
    name: String,
    original_name: String,
    content_type: String,
    size_bytes: i64,
    tags: Vec<String>,
    created_at: DateTime<Utc>,
    updated_at: DateTime<Utc>,
    sha256: Option<String>,
    md5: Option<String>,
    phash: Option<String>,
    width: Option<i32>,
    height: Option<i32>,
    thumbnail: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_error: Option<String>,
    indexed: bool,
    side_effects: BTreeMap<&'static str, &'static str>,
}

/// The row, deleted or not; `None` if it never existed.
pub(crate) async fn load(pool: &PgPool, id: Uuid) -> Result<Option<Row>, sqlx::Error> {
    sqlx::query(SELECT)
        .bind(id)
        .fetch_optional(pool)
        .await?
        .as_ref()
        .map(Row::from_row)
        .transpose()
}

/// The row if the resource exists and is not deleted: what a side effect works on. `None`
/// means there is nothing to do, ever (so the handler succeeds instead of retrying).
pub(crate) async fn live(pool: &PgPool, id: Uuid) -> Result<Option<Row>, sqlx::Error> {
    Ok(load(pool, id).await?.filter(|r| r.deleted_at.is_none()))
}

/// A new resource, its file already in place.
pub(crate) struct NewResource {
    pub(crate) id: Uuid,
    pub(crate) name: String,
    pub(crate) original_name: String,
    pub(crate) content_type: String,
    pub(crate) file_path: String,
    pub(crate) size_bytes: i64,
    pub(crate) tags: Vec<String>,
}

/// Inserts the row and its `resource.created` event in one transaction: both or neither.
pub(crate) async fn insert(pool: &PgPool, new: &NewResource) -> Result<(), weir::OutboxError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO resources (id, name, original_name, content_type, file_path, size_bytes, tags)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(new.id)
    .bind(&new.name)
    .bind(&new.original_name)
    .bind(&new.content_type)
    .bind(&new.file_path)
    .bind(new.size_bytes)
    .bind(&new.tags)
    .execute(&mut *tx)
    .await?;
    let event = ResourceCreated::new(
        new.id,
        &new.file_path,
        &new.content_type,
        &new.original_name,
    );
    OutboxWriter::write(&mut tx, &Envelope::new(event)).await?;
    tx.commit().await?;
    Ok(())
}

/// Renames and/or retags a live resource and announces what changed (`resource.updated`), in
/// one transaction. `None` if there is no such live resource; no event if nothing changed.
pub(crate) async fn update(
    pool: &PgPool,
    id: Uuid,
    name: Option<String>,
    tags: Option<Vec<String>>,
) -> Result<Option<Row>, weir::OutboxError> {
    let mut tx = pool.begin().await?;
    // Locked, so two concurrent updates are announced in the order they were applied.
    let Some(row) = lock_live(&mut tx, id).await? else {
        return Ok(None);
    };
    let mut changed = BTreeMap::new();
    if let Some(name) = name.filter(|n| *n != row.name) {
        changed.insert("name".to_owned(), serde_json::Value::from(name));
    }
    if let Some(tags) = tags.filter(|t| *t != row.tags) {
        changed.insert("tags".to_owned(), serde_json::Value::from(tags));
    }
    if !changed.is_empty() {
        sqlx::query(
            "UPDATE resources SET name = coalesce($2, name),
                 tags = coalesce($3, tags), updated_at = now() WHERE id = $1",
        )
        .bind(id)
        .bind(changed.get("name").and_then(|v| v.as_str()))
        .bind(changed.get("tags").map(|_| tags_of(&changed["tags"])))
        .execute(&mut *tx)
        .await?;
        let event = row.created().updated(changed);
        OutboxWriter::write(&mut tx, &Envelope::new(event)).await?;
    }
    tx.commit().await?;
    Ok(load(pool, id).await?)
}

/// The live (not deleted) resource `id`, locked until the transaction ends.
async fn lock_live(conn: &mut sqlx::PgConnection, id: Uuid) -> Result<Option<Row>, sqlx::Error> {
    sqlx::query(&format!(
        "{SELECT} AND r.deleted_at IS NULL FOR UPDATE OF r"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?
    .as_ref()
    .map(Row::from_row)
    .transpose()
}

fn tags_of(value: &serde_json::Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|t| t.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// Marks a live resource deleted and announces it (`resource.deleted`) in one transaction; the
/// cleanup handler then removes its file, thumbnail and index entry. `false` if there was no
/// such live resource.
pub(crate) async fn delete(pool: &PgPool, id: Uuid) -> Result<bool, weir::OutboxError> {
    let mut tx = pool.begin().await?;
    let Some(row) = lock_live(&mut tx, id).await? else {
        return Ok(false);
    };
    sqlx::query("UPDATE resources SET deleted_at = now(), updated_at = now() WHERE id = $1")
        .bind(id)
        .execute(&mut *tx)
        .await?;
    OutboxWriter::write(&mut tx, &Envelope::new(row.created().deleted())).await?;
    tx.commit().await?;
    Ok(true)
}

/// Where a new resource's file goes, relative to the storage directory: spread over 256
/// subdirectories by the id's last (random) byte, so no directory grows huge.
pub(crate) fn new_file_path(id: Uuid) -> String {
    let id = id.simple().to_string();
    format!("{}/{id}", &id[id.len() - 2..])
}

/// The resource id a stored file is named by (see [`new_file_path`]): 32 hex digits, nothing
/// else, so thumbnails and temporary files are not taken for uploads.
pub(crate) fn file_id(name: &str) -> Option<Uuid> {
    (name.len() == 32)
        .then(|| Uuid::try_parse(name).ok())
        .flatten()
}

/// What marks a temporary file (`<name>.tmp-<uuid>`, see [`temp_beside`]); the storage sweep
/// removes old ones.
pub(crate) const TEMP_MARKER: &str = ".tmp-";

/// A resource's thumbnail, beside its file.
pub(crate) fn thumbnail_path(file_path: &str) -> String {
    format!("{file_path}.thumb.png")
}

/// The absolute path of a stored file. Refuses anything but plain relative components: a path
/// from an event must not reach outside the storage directory.
pub(crate) fn resolve(dir: &Path, relative: &str) -> Result<PathBuf, EffectError> {
    let path = Path::new(relative);
    if relative.is_empty() || !path.components().all(|c| matches!(c, Component::Normal(_))) {
        return Err(EffectError::Permanent(format!(
            "file path {relative:?} is not inside the storage directory"
        )));
    }
    Ok(dir.join(path))
}

/// A temporary name beside `path`, unique to this writer.
fn temp_beside(path: &Path) -> PathBuf {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!("{TEMP_MARKER}{}", Uuid::new_v4().simple()));
    path.with_file_name(name)
}

/// Writes `bytes` to a temporary file beside `path`, then renames it into place: readers and a
/// restarted process see the old file or the whole new one, never a part.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let temp = temp_beside(path);
    let written = std::fs::File::create(&temp)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_data()))
        .and_then(|()| std::fs::rename(&temp, path));
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// Removes a file; one that is already gone is fine (removal is idempotent).
pub(crate) fn remove_if_present(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A file being received: written under a temporary name, renamed into place by
/// [`finish`](Self::finish). Dropped unfinished (an error, a client gone), it removes itself.
pub(crate) struct Incoming {
    temp: PathBuf,
    path: PathBuf,
    file: Option<tokio::fs::File>,
    written: u64,
}

impl Incoming {
    /// Starts receiving the file that will be at `path`.
    pub(crate) async fn create(path: PathBuf) -> std::io::Result<Self> {
        if let Some(parent) = path.parent() {
            tokio::fs::create_dir_all(parent).await?;
        }
        let temp = temp_beside(&path);
        let file = tokio::fs::File::create(&temp).await?;
        Ok(Self {
            temp,
            path,
            file: Some(file),
            written: 0,
        })
    }

    /// Appends a chunk.
    pub(crate) async fn write(&mut self, chunk: &[u8]) -> std::io::Result<()> {
        use tokio::io::AsyncWriteExt as _;
        let file = self.file.as_mut().expect("written only before finish");
        file.write_all(chunk).await?;
        self.written += chunk.len() as u64;
        Ok(())
    }

    /// Bytes written so far.
    pub(crate) fn written(&self) -> u64 {
        self.written
    }

    /// Flushes the data to disk and moves the file into place. The returned guard removes it
    /// again unless [`Stored::keep`] is called (once the row committed).
    pub(crate) async fn finish(mut self) -> std::io::Result<Stored> {
        let file = self.file.take().expect("finished once");
        let moved = match file.sync_data().await {
            Ok(()) => tokio::fs::rename(&self.temp, &self.path).await,
            Err(e) => Err(e),
        };
        drop(file);
        if let Err(e) = moved {
            let _ = std::fs::remove_file(&self.temp);
            return Err(e);
        }
        Ok(Stored {
            path: Some(std::mem::take(&mut self.path)),
        })
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        if self.file.is_some() {
            let _ = std::fs::remove_file(&self.temp);
        }
    }
}

/// A stored file not yet referenced by a committed row: removed on drop unless kept, so a
/// failed insert leaves no orphan file.
pub(crate) struct Stored {
    path: Option<PathBuf>,
}

impl Stored {
    /// The row committed: the file stays.
    pub(crate) fn keep(mut self) {
        self.path = None;
    }
}

impl Drop for Stored {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolve_refuses_paths_that_leave_the_storage_directory() {
        let dir = Path::new("/srv/storage");
        assert_eq!(
            resolve(dir, "ab/file").unwrap(),
            PathBuf::from("/srv/storage/ab/file")
        );
        for bad in ["", "/etc/passwd", "../x", "ab/../../x", "./x"] {
            assert!(resolve(dir, bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn new_files_spread_over_subdirectories_by_the_ids_last_byte() {
        let id = Uuid::parse_str("0190f1c2-0000-7000-8000-0000000000ab").unwrap();
        assert_eq!(new_file_path(id), format!("ab/{}", id.simple()));
    }

    #[tokio::test]
    async fn an_unfinished_incoming_file_removes_itself_and_a_finished_one_appears_whole() {
        let dir = std::env::temp_dir().join(format!("weir-store-{}", Uuid::new_v4().simple()));
        let path = dir.join("ab").join("file");
        let mut incoming = Incoming::create(path.clone()).await.unwrap();
        incoming.write(b"half").await.unwrap();
        drop(incoming);
        assert_eq!(std::fs::read_dir(dir.join("ab")).unwrap().count(), 0);

        let mut incoming = Incoming::create(path.clone()).await.unwrap();
        incoming.write(b"whole ").await.unwrap();
        incoming.write(b"file").await.unwrap();
        assert_eq!(incoming.written(), 10);
        let stored = incoming.finish().await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"whole file");
        drop(stored);
        assert!(!path.exists(), "a stored file nobody kept is removed");

        let stored = Incoming::create(path.clone())
            .await
            .unwrap()
            .finish()
            .await
            .unwrap();
        stored.keep();
        assert!(path.exists());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
