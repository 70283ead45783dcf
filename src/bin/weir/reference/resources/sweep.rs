//! The storage sweep: removes what a killed process can leave in the storage directory.
//!
//! Files are written under a temporary name and renamed into place, and an upload whose row
//! does not commit removes its file; but a process killed between those steps (SIGKILL, the OOM
//! killer, a node lost) leaves a `*.tmp-*` file, or an upload's file whose row never committed.
//! Neither is ever referenced, so nothing else would remove them. The sweep does, once they are
//! older than `storage.sweep_after`: by then no upload or side effect still owns them, on any
//! replica sharing the directory (an upload commits its row seconds after its file is in place).
//! It runs when the service starts and then every `sweep_after`.

use super::store::{file_id, TEMP_MARKER};
use super::Services;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// What a directory scan found old enough to be a leftover.
#[derive(Debug, Default, PartialEq, Eq)]
struct Leftovers {
    /// Temporary files (`<name>.tmp-<uuid>`).
    temps: Vec<PathBuf>,
    /// Upload files (named by their resource id), to remove if their row does not exist.
    uploads: Vec<(Uuid, PathBuf)>,
}

/// Walks the storage layout (`<2 hex>/<file>`, see `store::new_file_path`) for files last
/// modified before `cutoff`. Thumbnails and anything else are left alone.
fn scan(dir: &Path, cutoff: SystemTime) -> std::io::Result<Leftovers> {
    let mut found = Leftovers::default();
    let subdirs = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
        other => other?,
    };
    for subdir in subdirs {
        let subdir = subdir?;
        if !subdir.file_type()?.is_dir() {
            continue;
        }
        for file in std::fs::read_dir(subdir.path())? {
            let file = file?;
            let meta = file.metadata()?;
            if !meta.is_file() || meta.modified()? >= cutoff {
                continue;
            }
            let name = file.file_name();
            let name = name.to_string_lossy();
            if name.contains(TEMP_MARKER) {
                found.temps.push(file.path());
            } else if let Some(id) = file_id(&name) {
                found.uploads.push((id, file.path()));
            }
        }
    }
    Ok(found)
}

/// What one sweep removed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Swept {
    pub(crate) temps: usize,
    pub(crate) orphans: usize,
}

/// One sweep: scan, ask the database which upload files have rows, remove the rest.
async fn sweep(services: &Services, older_than: Duration) -> Result<Swept, String> {
    let dir = services.settings.storage.dir.clone();
    let cutoff = SystemTime::now()
        .checked_sub(older_than)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let found = tokio::task::spawn_blocking(move || scan(&dir, cutoff))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("cannot scan the storage directory: {e}"))?;
    let ids: Vec<Uuid> = found.uploads.iter().map(|(id, _)| *id).collect();
    // Any row, deleted or not: a deleted resource's file is the cleanup handler's to remove.
    let known: HashSet<Uuid> = sqlx::query_scalar("SELECT id FROM resources WHERE id = ANY($1)")
        .bind(&ids)
        .fetch_all(&services.pool)
        .await
        .map_err(|e| format!("database: {e}"))?
        .into_iter()
        .collect();
    let mut swept = Swept::default();
    for path in &found.temps {
        if remove(path) {
            swept.temps += 1;
        }
    }
    for (id, path) in &found.uploads {
        if !known.contains(id) && remove(path) {
            swept.orphans += 1;
        }
    }
    Ok(swept)
}

/// Removes a leftover; one already gone (another replica swept it) does not count.
fn remove(path: &Path) -> bool {
    match std::fs::remove_file(path) {
        Ok(()) => true,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "Cannot remove a storage leftover.");
            false
        }
    }
}

/// Sweeps now and every `storage.sweep_after` until `stop`; `None` when the sweep is off
/// (`sweep_after = "0s"`).
pub(crate) fn spawn(services: &Services, stop: CancellationToken) -> Option<JoinHandle<()>> {
    let every = services.settings.storage.sweep_after;
    if every.is_zero() {
        return None;
    }
    let services = services.clone();
    Some(tokio::spawn(async move {
        loop {
            match sweep(&services, every).await {
                Ok(swept) => tracing::info!(
                    removed_temps = swept.temps,
                    removed_orphans = swept.orphans,
                    "Storage swept."
                ),
                Err(e) => tracing::warn!(error = %e, "Storage sweep failed; trying again later."),
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(every) => {}
            }
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn touch(path: &Path, age: Duration) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        let file = std::fs::File::create(path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
    }

    #[test]
    fn scan_finds_old_temp_and_upload_files_and_leaves_thumbnails_and_fresh_files() {
        let dir = std::env::temp_dir().join(format!("weir-sweep-{}", Uuid::new_v4().simple()));
        let hour = Duration::from_secs(3600);
        let id = Uuid::new_v4();
        let upload = dir.join("ab").join(id.simple().to_string());
        let temp = dir.join("ab").join(format!("{}.tmp-1234", id.simple()));
        touch(&upload, 2 * hour);
        touch(&temp, 2 * hour);
        touch(
            &dir.join("ab").join(format!("{}.thumb.png", id.simple())),
            2 * hour,
        );
        touch(&dir.join("cd").join("x.tmp-fresh"), Duration::ZERO);
        touch(
            &dir.join("cd").join(Uuid::new_v4().simple().to_string()),
            Duration::ZERO,
        );
        touch(&dir.join("stray-top-level-file"), 2 * hour);

        let found = scan(&dir, SystemTime::now() - hour).unwrap();
        assert_eq!(found.temps, vec![temp]);
        assert_eq!(found.uploads, vec![(id, upload)]);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn scan_of_a_missing_directory_finds_nothing() {
        let dir = std::env::temp_dir().join(format!("weir-sweep-{}", Uuid::new_v4().simple()));
        assert_eq!(scan(&dir, SystemTime::now()).unwrap(), Leftovers::default());
    }

    #[test]
    fn only_a_bare_32_digit_id_names_an_upload() {
        let id = Uuid::new_v4();
        let stored = crate::reference::resources::store::new_file_path(id);
        let name = stored.rsplit('/').next().unwrap();
        assert_eq!(
            file_id(name),
            Some(id),
            "what new_file_path writes is recognised"
        );
        assert_eq!(file_id(&id.to_string()), None, "hyphenated is not ours");
        assert_eq!(file_id(&format!("{name}.thumb.png")), None);
        assert_eq!(file_id(&format!("{name}{TEMP_MARKER}1234")), None);
        assert_eq!(file_id("not-an-id"), None);
    }
}
