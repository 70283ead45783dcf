//! The `resource_image` side effect, for images only: dimensions, a thumbnail beside the file
//! (`<file>.thumb.png`) and a perceptual hash.
//!
//! A file that is not there (yet) is a transient failure: retried. A file that cannot be
//! decoded never will be: the reason is stored on the row (`image_error`) and the failure is
//! `Acknowledged`, so the event goes to the dead-letter topic naming this handler, while the
//! other side effects of the same upload complete on their own.

use super::{store, EffectError, Services};
use image::{DynamicImage, ImageFormat, ImageReader};
use std::io::BufReader;
use std::path::Path;
use uuid::Uuid;

/// What decoding an image yields.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Measured {
    pub(crate) width: u32,
    pub(crate) height: u32,
    /// 64-bit difference hash, hex.
    pub(crate) phash: String,
}

/// Why an image could not be measured.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ImageFailure {
    /// The file could not be read or the thumbnail not written: may work later.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The bytes are not a decodable image of a supported format: never will work.
    #[error("cannot decode the image: {0}")]
    Corrupt(String),
}

/// Measures the resource's image, writes its thumbnail and stores the results (absolute
/// values; the thumbnail replaced atomically). Does nothing for other types, a deleted
/// resource, or one done already whose thumbnail is in place.
pub(crate) async fn run(services: &Services, id: Uuid) -> Result<(), EffectError> {
    let Some(row) = store::live(&services.pool, id).await? else {
        return Ok(());
    };
    if !super::is_image(&row.content_type) {
        return Ok(());
    }
    let storage = &services.settings.storage;
    let path = store::resolve(&storage.dir, &row.file_path)?;
    let thumbnail = store::thumbnail_path(&row.file_path);
    let thumbnail_file = store::resolve(&storage.dir, &thumbnail)?;
    if row.image_done_at.is_some() && thumbnail_file.exists() {
        return Ok(());
    }
    let (px, content_type) = (storage.thumbnail_px, row.content_type.clone());
    let measured =
        tokio::task::spawn_blocking(move || measure(&path, &thumbnail_file, px, &content_type))
            .await
            .map_err(EffectError::transient)?;
    match measured {
        Ok(m) => {
            sqlx::query(
                "UPDATE resources SET width = $2, height = $3, phash = $4, thumbnail = $5,
                     image_error = NULL, image_done_at = now()
                 WHERE id = $1 AND deleted_at IS NULL",
            )
            .bind(id)
            .bind(i32::try_from(m.width).unwrap_or(i32::MAX))
            .bind(i32::try_from(m.height).unwrap_or(i32::MAX))
            .bind(m.phash)
            .bind(thumbnail)
            .execute(&services.pool)
            .await?;
            Ok(())
        }
        Err(ImageFailure::Io(e)) => Err(EffectError::transient(format!(
            "cannot read {} or write its thumbnail: {e}",
            row.file_path
        ))),
        Err(ImageFailure::Corrupt(reason)) => {
            let reason = format!("cannot decode {} as {}: {reason}", row.id, row.content_type);
            sqlx::query(
                "UPDATE resources SET image_error = $2 WHERE id = $1 AND deleted_at IS NULL",
            )
            .bind(id)
            .bind(&reason)
            .execute(&services.pool)
            .await?;
            Err(EffectError::Permanent(reason))
        }
    }
}

/// Decodes the image at `path`, writes a PNG thumbnail fitting `px`×`px` to `thumbnail`
/// (atomically), and returns its dimensions and perceptual hash. CPU-bound: call it off the
/// async threads.
pub(crate) fn measure(
    path: &Path,
    thumbnail: &Path,
    px: u32,
    content_type: &str,
) -> Result<Measured, ImageFailure> {
    let file = std::fs::File::open(path)?;
    // The bytes decide the format; the declared type only when they say nothing.
    let mut reader = ImageReader::new(BufReader::new(file)).with_guessed_format()?;
    if reader.format().is_none() {
        reader
            .set_format(ImageFormat::from_mime_type(content_type).ok_or_else(|| {
                ImageFailure::Corrupt(format!("unsupported type {content_type}"))
            })?);
    }
    let image = reader.decode().map_err(|e| match e {
        image::ImageError::IoError(io) if io.kind() != std::io::ErrorKind::UnexpectedEof => {
            ImageFailure::Io(io)
        }
        other => ImageFailure::Corrupt(other.to_string()),
    })?;
    // Never enlarged: a small image is its own thumbnail.
    let small = if image.width() <= px && image.height() <= px {
        DynamicImage::ImageRgba8(image.to_rgba8())
    } else {
        DynamicImage::ImageRgba8(image.thumbnail(px, px).to_rgba8())
    };
    let mut png = Vec::new();
    small
        .write_to(&mut std::io::Cursor::new(&mut png), ImageFormat::Png)
        .map_err(|e| ImageFailure::Io(std::io::Error::other(e)))?;
    store::write_atomic(thumbnail, &png)?;
    Ok(Measured {
        width: image.width(),
        height: image.height(),
        phash: format!("{:016x}", dhash(&small)),
    })
}

/// The difference hash (dHash): shrink to 9×8 grey pixels and set one bit per pair of
/// horizontal neighbours, 1 where brightness increases. Near-identical images (resized,
/// recompressed) get hashes a few bits apart; compare with the Hamming distance. Computed from
/// the thumbnail, which keeps everything a 9×8 sample can see and costs far less to shrink.
pub(crate) fn dhash(image: &DynamicImage) -> u64 {
    let grey = image
        .resize_exact(9, 8, image::imageops::FilterType::Triangle)
        .to_luma8();
    let mut hash = 0u64;
    for y in 0..8 {
        for x in 0..8 {
            hash <<= 1;
            if grey.get_pixel(x, y)[0] < grey.get_pixel(x + 1, y)[0] {
                hash |= 1;
            }
        }
    }
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{Rgb, RgbImage};

    fn gradient(width: u32, height: u32) -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(width, height, |x, y| {
            Rgb([(x * 255 / width) as u8, (y * 255 / height) as u8, 90])
        }))
    }

    fn temp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("weir-image-{}-{name}", Uuid::new_v4().simple()))
    }

    #[test]
    fn measures_every_accepted_format_and_writes_a_decodable_thumbnail() {
        for (format, content_type) in [
            (ImageFormat::Png, "image/png"),
            (ImageFormat::Jpeg, "image/jpeg"),
            (ImageFormat::Gif, "image/gif"),
            (ImageFormat::WebP, "image/webp"),
        ] {
            let (file, thumb) = (temp("in"), temp("thumb.png"));
            gradient(300, 200).save_with_format(&file, format).unwrap();
            let measured = measure(&file, &thumb, 128, content_type).unwrap();
            assert_eq!((measured.width, measured.height), (300, 200), "{format:?}");
            let decoded = image::open(&thumb).unwrap();
            assert_eq!((decoded.width(), decoded.height()), (128, 85), "{format:?}");
            std::fs::remove_file(file).unwrap();
            std::fs::remove_file(thumb).unwrap();
        }
        let (file, thumb) = (temp("small.png"), temp("thumb.png"));
        gradient(40, 30)
            .save_with_format(&file, ImageFormat::Png)
            .unwrap();
        measure(&file, &thumb, 128, "image/png").unwrap();
        let decoded = image::open(&thumb).unwrap();
        assert_eq!(
            (decoded.width(), decoded.height()),
            (40, 30),
            "never enlarged"
        );
        std::fs::remove_file(file).unwrap();
        std::fs::remove_file(thumb).unwrap();
    }

    #[test]
    fn a_corrupt_image_is_corrupt_and_a_missing_one_is_an_io_failure() {
        let (file, thumb) = (temp("bad.png"), temp("thumb.png"));
        let mut bytes = Vec::new();
        gradient(64, 64)
            .write_to(&mut std::io::Cursor::new(&mut bytes), ImageFormat::Png)
            .unwrap();
        bytes.truncate(bytes.len() / 2);
        std::fs::write(&file, &bytes).unwrap();
        assert!(matches!(
            measure(&file, &thumb, 128, "image/png"),
            Err(ImageFailure::Corrupt(_))
        ));
        std::fs::write(&file, b"not an image at all").unwrap();
        assert!(matches!(
            measure(&file, &thumb, 128, "image/png"),
            Err(ImageFailure::Corrupt(_))
        ));
        assert!(!thumb.exists(), "no thumbnail for a corrupt image");
        std::fs::remove_file(&file).unwrap();
        assert!(matches!(
            measure(&file, &thumb, 128, "image/png"),
            Err(ImageFailure::Io(_))
        ));
    }

    #[test]
    fn similar_images_get_close_hashes_and_different_ones_distant() {
        let distance = |a: &DynamicImage, b: &DynamicImage| (dhash(a) ^ dhash(b)).count_ones();
        let original = gradient(400, 300);
        let resized = original.resize_exact(200, 150, image::imageops::FilterType::Nearest);
        let flipped = original.fliph();
        assert!(distance(&original, &resized) <= 4);
        assert!(distance(&original, &flipped) >= 32);
    }
}
