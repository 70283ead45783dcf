//! The `resource_hasher` side effect: SHA-256 and MD5 of the stored file, read in fixed-size
//! chunks so a large upload never sits in memory whole.
//!
//! (The perceptual hash of images is computed by the image side effect, which decodes the
//! image anyway: decoding twice would double the most expensive step.)

use super::{store, EffectError, Services};
use md5::Md5;
use sha2::{Digest as _, Sha256};
use std::io::Read as _;
use std::path::Path;
use uuid::Uuid;

/// Bytes read per step.
const CHUNK: usize = 64 * 1024;

/// Hashes the resource's file and stores both digests (absolute values: a rerun writes the
/// same). Does nothing for a deleted resource or one hashed already.
pub(crate) async fn run(services: &Services, id: Uuid) -> Result<(), EffectError> {
    let Some(row) = store::live(&services.pool, id).await? else {
        return Ok(());
    };
    if row.hashed_at.is_some() {
        return Ok(());
    }
    let path = store::resolve(&services.settings.storage.dir, &row.file_path)?;
    let (sha256, md5) = tokio::task::spawn_blocking(move || digest_file(&path))
        .await
        .map_err(EffectError::transient)?
        .map_err(|e| {
            // Missing: the upload has not finished moving it into place (or storage is not
            // mounted yet); either way, later may work.
            EffectError::transient(format!("cannot read the file {}: {e}", row.file_path))
        })?;
    sqlx::query(
        "UPDATE resources SET sha256 = $2, md5 = $3, hashed_at = now()
         WHERE id = $1 AND deleted_at IS NULL",
    )
    .bind(id)
    .bind(sha256)
    .bind(md5)
    .execute(&services.pool)
    .await?;
    Ok(())
}

/// SHA-256 and MD5 of a file, lowercase hex (as `sha256sum` and `md5sum` print them).
pub(crate) fn digest_file(path: &Path) -> std::io::Result<(String, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut sha256 = Sha256::new();
    let mut md5 = Md5::new();
    let mut buffer = vec![0; CHUNK];
    loop {
        let n = match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        sha256.update(&buffer[..n]);
        md5.update(&buffer[..n]);
    }
    Ok((hex::encode(sha256.finalize()), hex::encode(md5.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_match_the_known_values_across_chunk_boundaries() {
        let path = std::env::temp_dir().join(format!("weir-hash-{}", Uuid::new_v4().simple()));
        std::fs::write(&path, b"abc").unwrap();
        let (sha, md5) = digest_file(&path).unwrap();
        assert_eq!(
            sha,
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(md5, "900150983cd24fb0d6963f7d28e17f72");

        // Three and a half chunks: the streamed digest equals the one-shot digest.
        let bytes: Vec<u8> = (0..CHUNK * 7 / 2).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &bytes).unwrap();
        let (sha, md5) = digest_file(&path).unwrap();
        assert_eq!(sha, hex::encode(Sha256::digest(&bytes)));
        assert_eq!(md5, hex::encode(Md5::digest(&bytes)));
        std::fs::remove_file(path).unwrap();
    }

    #[test]
    fn a_missing_file_is_an_error_not_a_digest() {
        let path = std::env::temp_dir().join(format!("weir-none-{}", Uuid::new_v4().simple()));
        assert_eq!(
            digest_file(&path).unwrap_err().kind(),
            std::io::ErrorKind::NotFound
        );
    }
}
