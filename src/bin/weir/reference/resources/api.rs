//! The resource routes:
//!
//! - `POST /resources`: an upload, either the raw body (type from `Content-Type`, name from
//!   `?name=`) or `multipart/form-data` (a `file` part, optional `name` and `tags` fields).
//!   Stores the file, inserts the row and its `resource.created` event in one transaction,
//!   answers 201 without waiting for any side effect;
//! - `GET /resources/{id}`: the resource and the state of each side effect;
//! - `PATCH /resources/{id}`: rename/retag (`{"name": ..., "tags": [...]}`), `resource.updated`;
//! - `DELETE /resources/{id}`: `resource.deleted`; the cleanup handler removes the rest;
//! - `GET /search?q=`: the full-text index.
//!
//! A refused upload leaves nothing behind: the file is written under a temporary name and
//! removed on any failure up to the commit of its row.

use super::store::{self, Incoming, NewResource};
use super::{index, Services};
use crate::reference::api::ApiError;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::Json;
use futures_util::StreamExt as _;
use serde::Deserialize;
use uuid::Uuid;

/// What uploads may be, besides [`IMAGE_TYPES`](super::IMAGE_TYPES).
const OTHER_TYPES: [&str; 7] = [
    "text/plain",
    "text/csv",
    "text/markdown",
    "application/json",
    "application/pdf",
    "application/zip",
    "application/octet-stream",
];

/// What a nameless upload is told.
const NAME_IT: &str =
    "name the upload: ?name=... (raw body) or a file name or name field (multipart)";

/// The longest name accepted, in characters.
const MAX_NAME: usize = 255;

pub(super) fn routes(services: &Services) -> axum::Router {
    axum::Router::new()
        .route("/resources", post(create))
        .route("/resources/{id}", get(show).patch(update).delete(remove))
        .route("/search", get(search))
        // Uploads are streamed to disk and counted against `storage.max_upload_bytes` there.
        .layer(DefaultBodyLimit::disable())
        .with_state(services.clone())
}

/// The media type without parameters, lowercase; refused unless on the allowlist.
fn accepted_type(raw: Option<&str>) -> Result<String, ApiError> {
    let media = raw
        .and_then(|t| t.split(';').next())
        .map(|t| t.trim().to_ascii_lowercase())
        .unwrap_or_default();
    if super::is_image(&media) || OTHER_TYPES.contains(&media.as_str()) {
        Ok(media)
    } else {
        let shown = if media.is_empty() { "none" } else { &media };
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "content type {shown} is not accepted; use one of {}, {}",
                super::IMAGE_TYPES.join(", "),
                OTHER_TYPES.join(", ")
            ),
        ))
    }
}

fn valid_name(name: &str) -> Result<String, ApiError> {
    let trimmed = name.trim();
    if trimmed.is_empty() || trimmed.chars().count() > MAX_NAME {
        return Err(ApiError::bad_request(
            "bad_name",
            format!("a name is 1 to {MAX_NAME} characters"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "bad_name",
            "a name cannot contain control characters",
        ));
    }
    // Storage never uses the name as a path, but clients and consumers of the events may
    // (saving a download under it): a name is one file name, never a path.
    if trimmed.contains(['/', '\\']) || trimmed == "." || trimmed == ".." {
        return Err(ApiError::bad_request(
            "bad_name",
            "a name is a file name, without / or \\, and not . or ..",
        ));
    }
    Ok(trimmed.to_owned())
}

fn valid_tags(tags: Vec<String>) -> Result<Vec<String>, ApiError> {
    let tags: Vec<String> = tags
        .into_iter()
        .map(|t| t.trim().to_owned())
        .filter(|t| !t.is_empty())
        .collect();
    if tags.len() > 32
        || tags
            .iter()
            .any(|t| t.len() > 64 || t.contains(char::is_control))
    {
        return Err(ApiError::bad_request(
            "bad_tags",
            "at most 32 tags of at most 64 characters",
        ));
    }
    Ok(tags)
}

fn parse_id(id: &str) -> Result<Uuid, ApiError> {
    Uuid::parse_str(id)
        .map_err(|_| ApiError::bad_request("bad_id", format!("{id:?} is not a resource id")))
}

fn too_large(max: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "too_large",
        format!("uploads are limited to {max} bytes"),
    )
}

/// `POST /resources` query parameters (raw uploads name the file here).
#[derive(Debug, Deserialize)]
struct CreateQuery {
    name: Option<String>,
    /// Comma-separated.
    tags: Option<String>,
}

/// An upload as received: the file on disk under a temporary name, and what describes it.
struct Received {
    incoming: Incoming,
    name: Option<String>,
    original_name: Option<String>,
    content_type: String,
    tags: Vec<String>,
}

async fn create(
    State(services): State<Services>,
    query: Result<Query<CreateQuery>, QueryRejection>,
    headers: HeaderMap,
    request: Request,
) -> Result<impl IntoResponse, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let storage = &services.settings.storage;
    let id = Uuid::now_v7();
    let file_path = store::new_file_path(id);
    let path = storage.dir.join(&file_path);
    let request_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok());
    let received = if request_type.is_some_and(|t| t.starts_with("multipart/form-data")) {
        let multipart = Multipart::from_request(request, &())
            .await
            .map_err(|e| ApiError::bad_request("bad_multipart", e.body_text()))?;
        receive_multipart(multipart, path, storage.max_upload_bytes).await?
    } else {
        let content_type = accepted_type(request_type)?;
        // Refused before a byte is stored when the request says enough.
        match &query.name {
            Some(name) => valid_name(name).map(drop)?,
            None => return Err(ApiError::bad_request("bad_name", NAME_IT)),
        }
        let mut incoming = Incoming::create(path).await.map_err(ApiError::internal)?;
        let mut body = request.into_body().into_data_stream();
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| ApiError::bad_request("bad_body", e.to_string()))?;
            if incoming.written() + chunk.len() as u64 > storage.max_upload_bytes {
                // Read (and drop) a bounded rest, so the client gets this answer rather than a
                // reset connection.
                let mut rest = 0u64;
                while let Some(Ok(chunk)) = body.next().await {
                    rest += chunk.len() as u64;
                    if rest > storage.max_upload_bytes {
                        break;
                    }
                }
                return Err(too_large(storage.max_upload_bytes));
            }
            incoming.write(&chunk).await.map_err(ApiError::internal)?;
        }
        Received {
            incoming,
            original_name: query.name.clone(),
            name: query.name.clone(),
            content_type,
            tags: Vec::new(),
        }
    };
    if received.incoming.written() == 0 {
        return Err(ApiError::bad_request("empty_body", "the upload is empty"));
    }
    let name = received
        .name
        .or(received.original_name.clone())
        .ok_or_else(|| ApiError::bad_request("bad_name", NAME_IT))?;
    let name = valid_name(&name)?;
    let original_name = valid_name(received.original_name.as_deref().unwrap_or(&name))?;
    let mut tags = received.tags;
    if let Some(list) = &query.tags {
        tags.extend(list.split(',').map(str::to_owned));
    }
    let new = NewResource {
        id,
        name,
        original_name,
        content_type: received.content_type,
        file_path,
        size_bytes: i64::try_from(received.incoming.written()).unwrap_or(i64::MAX),
        tags: valid_tags(tags)?,
    };
    let stored = received
        .incoming
        .finish()
        .await
        .map_err(ApiError::internal)?;
    store::insert(&services.pool, &new).await?;
    stored.keep();
    if storage.inline_side_effects {
        super::run_inline(&services, id)
            .await
            .map_err(ApiError::internal)?;
    }
    let row = store::load(&services.pool, id)
        .await?
        .ok_or_else(|| ApiError::internal("the resource vanished after its insert"))?;
    Ok((
        StatusCode::CREATED,
        [(header::LOCATION, format!("/resources/{id}"))],
        Json(row.view()),
    ))
}

/// Reads a multipart upload: exactly one `file` part (its file name is the original name),
/// optional `name`, `content_type` (overriding the part's type) and `tags` (comma-separated).
async fn receive_multipart(
    mut multipart: Multipart,
    path: std::path::PathBuf,
    max: u64,
) -> Result<Received, ApiError> {
    let bad = |e: axum::extract::multipart::MultipartError| {
        ApiError::bad_request("bad_multipart", e.body_text())
    };
    let mut file: Option<(Incoming, Option<String>, Option<String>)> = None;
    let (mut name, mut declared_type, mut tags) = (None, None, Vec::new());
    while let Some(mut field) = multipart.next_field().await.map_err(bad)? {
        match field.name().unwrap_or_default() {
            "file" => {
                if file.is_some() {
                    return Err(ApiError::bad_request(
                        "bad_multipart",
                        "one file per upload",
                    ));
                }
                let original = field.file_name().map(str::to_owned);
                let part_type = field.content_type().map(str::to_owned);
                let mut incoming = Incoming::create(path.clone())
                    .await
                    .map_err(ApiError::internal)?;
                while let Some(chunk) = field.chunk().await.map_err(bad)? {
                    if incoming.written() + chunk.len() as u64 > max {
                        return Err(too_large(max));
                    }
                    incoming.write(&chunk).await.map_err(ApiError::internal)?;
                }
                file = Some((incoming, original, part_type));
            }
            "name" => name = Some(field.text().await.map_err(bad)?),
            "content_type" => declared_type = Some(field.text().await.map_err(bad)?),
            "tags" => tags.extend(
                field
                    .text()
                    .await
                    .map_err(bad)?
                    .split(',')
                    .map(str::to_owned),
            ),
            other => {
                return Err(ApiError::bad_request(
                    "bad_multipart",
                    format!("unknown field {other:?}; expected file, name, content_type, tags"),
                ))
            }
        }
    }
    let (incoming, original_name, part_type) =
        file.ok_or_else(|| ApiError::bad_request("bad_multipart", "no `file` part in the upload"))?;
    Ok(Received {
        content_type: accepted_type(declared_type.as_deref().or(part_type.as_deref()))?,
        incoming,
        name,
        original_name,
        tags,
    })
}

async fn show(
    State(services): State<Services>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&id)?;
    match store::live(&services.pool, id).await? {
        Some(row) => Ok(Json(row.view())),
        None => Err(ApiError::not_found(format!("no resource {id}"))),
    }
}

/// `PATCH /resources/{id}` body: what to change.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Patch {
    name: Option<String>,
    tags: Option<Vec<String>>,
}

async fn update(
    State(services): State<Services>,
    Path(id): Path<String>,
    body: Result<Json<Patch>, JsonRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let id = parse_id(&id)?;
    let Json(patch) = body.map_err(|e| ApiError::bad_request("bad_json", e.body_text()))?;
    if patch.name.is_none() && patch.tags.is_none() {
        return Err(ApiError::bad_request(
            "nothing_to_change",
            "give a new name and/or tags",
        ));
    }
    let name = patch.name.as_deref().map(valid_name).transpose()?;
    let tags = patch.tags.map(valid_tags).transpose()?;
    match store::update(&services.pool, id, name, tags).await? {
        Some(row) => Ok(Json(row.view())),
        None => Err(ApiError::not_found(format!("no resource {id}"))),
    }
}

async fn remove(
    State(services): State<Services>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let id = parse_id(&id)?;
    if store::delete(&services.pool, id).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no resource {id}")))
    }
}

/// `GET /search` parameters.
#[derive(Debug, Deserialize)]
struct SearchQuery {
    q: Option<String>,
    limit: Option<i64>,
}

async fn search(
    State(services): State<Services>,
    query: Result<Query<SearchQuery>, QueryRejection>,
) -> Result<impl IntoResponse, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::bad_request("bad_query", e.body_text()))?;
    let q = query.q.as_deref().map(str::trim).unwrap_or_default();
    if q.is_empty() {
        return Err(ApiError::bad_request("bad_query", "search with ?q=words"));
    }
    let limit = query.limit.unwrap_or(20).clamp(1, 100);
    Ok(Json(index::search(&services.pool, q, limit).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_types_are_normalised_and_checked_against_the_allowlist() {
        assert_eq!(
            accepted_type(Some("Text/Plain; charset=utf-8")).unwrap(),
            "text/plain"
        );
        assert_eq!(accepted_type(Some("image/webp")).unwrap(), "image/webp");
        for refused in [None, Some(""), Some("text/html"), Some("image/svg+xml")] {
            let error = accepted_type(refused).unwrap_err();
            assert_eq!(
                error.status(),
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "{refused:?}"
            );
        }
    }

    #[test]
    fn names_are_trimmed_and_bounded() {
        assert_eq!(valid_name("  report.txt ").unwrap(), "report.txt");
        assert!(valid_name("   ").is_err());
        assert!(valid_name("a\nb").is_err());
        assert!(valid_name(&"x".repeat(MAX_NAME + 1)).is_err());
        assert!(
            valid_name(&"é".repeat(MAX_NAME)).is_ok(),
            "characters, not bytes"
        );
    }

    #[test]
    fn names_are_file_names_not_paths() {
        for name in [
            "../x.txt",
            "a/b.txt",
            "/abs",
            "a\\b.txt",
            "C:\\x.txt",
            "..",
            ".",
            " .. ",
        ] {
            assert!(valid_name(name).is_err(), "{name:?}");
        }
        for name in ["my..notes.txt", "...", ".hidden", "résumé (1).pdf"] {
            assert_eq!(valid_name(name).unwrap(), name);
        }
    }
}
