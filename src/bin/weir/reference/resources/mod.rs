//! Resource uploads whose side effects run in event handlers, off the request path.
//!
//! Uploading used to hash the file, measure it, thumbnail it and index it before answering. Here
//! the upload only stores the file, inserts the row and writes `resource.created` through the
//! outbox in one transaction, and answers 201. Each side effect is its own handler on that
//! event (fan-out), with its own outcome, retries and dead letters:
//!
//! - `resource_hasher` ([`hasher`]): SHA-256 and MD5, streamed;
//! - `resource_image` ([`image`]): dimensions, a perceptual hash and a thumbnail, for images;
//! - `resource_indexer` ([`index`]): the full-text document, also on `resource.updated`;
//! - `resource_cleanup` ([`index`]): on `resource.deleted`, the index entry, thumbnail and file.
//!
//! Every side effect is idempotent: it reads the current row, writes absolute values and files
//! atomically (temp file + rename), and does nothing for a resource deleted meanwhile. A handler
//! that runs twice (a crash before the offset commit) leaves the same state.
//!
//! - [`api`]: the HTTP routes;
//! - [`store`]: files on disk and the `resources` rows;
//! - [`sweep`]: removes the leftovers of a killed process from the storage directory.

mod api;
mod hasher;
mod image;
mod index;
mod store;
mod sweep;

use super::api::Services;
use crate::reference::events::{ResourceCreated, ResourceDeleted, ResourceUpdated};
use uuid::Uuid;
use weir::{Ctx, HandlerError, HandlerOptions, Migration};

/// The schema of `resources` and its search index.
pub(crate) const MIGRATIONS: &[Migration] = &[Migration::new(
    "reference/0002_resources",
    include_str!("../migrations/reference_0002_resources.sql"),
)];

/// The image types uploads accept, which the image side effect handles.
pub(crate) const IMAGE_TYPES: [&str; 4] = ["image/png", "image/jpeg", "image/gif", "image/webp"];

/// Whether the image side effect applies to this content type.
pub(crate) fn is_image(content_type: &str) -> bool {
    IMAGE_TYPES.contains(&content_type)
}

/// The resource routes.
pub(crate) fn routes(services: &Services) -> axum::Router {
    api::routes(services)
}

/// The resource service's background job: the storage sweep.
pub(crate) fn spawn_background(
    services: &Services,
    stop: tokio_util::sync::CancellationToken,
) -> Option<tokio::task::JoinHandle<()>> {
    sweep::spawn(services, stop)
}

/// Why a side effect did not complete, which decides between retrying and dead-lettering.
#[derive(Debug, thiserror::Error)]
pub(crate) enum EffectError {
    /// It may work later (the database is away, the file is not there yet).
    #[error("{0}")]
    Transient(String),
    /// It will never work for this resource (the image cannot be decoded).
    #[error("{0}")]
    Permanent(String),
}

impl EffectError {
    fn transient(e: impl std::fmt::Display) -> Self {
        Self::Transient(e.to_string())
    }
}

impl From<sqlx::Error> for EffectError {
    fn from(e: sqlx::Error) -> Self {
        Self::transient(format!("database: {e}"))
    }
}

impl From<EffectError> for HandlerError {
    fn from(e: EffectError) -> Self {
        match e {
            EffectError::Transient(m) => HandlerError::retryable(m),
            EffectError::Permanent(m) => HandlerError::acknowledged(m),
        }
    }
}

/// One side effect: a function of the service and the resource id, reading what it needs from
/// the current row (not from the event, which may be older than a rename).
type Effect = for<'a> fn(
    &'a Services,
    Uuid,
) -> std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), EffectError>> + Send + 'a>,
>;

/// One side effect of `resource.created`.
struct SideEffect {
    /// The handler's name (logs, metrics, the `weir.handler` dead-letter header).
    name: &'static str,
    /// Burns CPU (hashing, decoding): runs on the blocking pool, at most one per core.
    cpu_bound: bool,
    run: Effect,
}

/// The side effects of `resource.created`, in the order the inline mode runs them.
const ON_CREATED: [SideEffect; 3] = [
    SideEffect {
        name: "resource_hasher",
        cpu_bound: true,
        run: |s, id| Box::pin(hasher::run(s, id)),
    },
    SideEffect {
        name: "resource_image",
        cpu_bound: true,
        run: |s, id| Box::pin(image::run(s, id)),
    },
    SideEffect {
        name: "resource_indexer",
        cpu_bound: false,
        run: |s, id| Box::pin(index::run(s, id)),
    },
];

/// Runs every side effect of an upload now (the inline mode). A permanent failure (a corrupt
/// image) is recorded on the row as the handler would, and does not fail the upload.
pub(crate) async fn run_inline(services: &Services, id: Uuid) -> Result<(), EffectError> {
    for effect in ON_CREATED {
        match (effect.run)(services, id).await {
            Err(EffectError::Permanent(reason)) => {
                tracing::warn!(%id, effect = effect.name, %reason, "Side effect failed for good.");
            }
            other => other?,
        }
    }
    Ok(())
}

/// Registers the side-effect handlers, each separately so each has its own outcome, retries
/// and dead letters. Hashing and decoding burn CPU: those run as `cpu_bound`, at most one per
/// core, off the consumer's threads.
pub(crate) fn handlers(router: weir::Router, services: &Services) -> weir::Router {
    let mut router = router;
    for effect in ON_CREATED {
        let services = services.clone();
        let options = HandlerOptions::new().name(effect.name);
        let options = if effect.cpu_bound {
            options.cpu_bound()
        } else {
            options
        };
        router = router.on_with(
            move |event: ResourceCreated, _ctx: Ctx| {
                let services = services.clone();
                async move { Ok((effect.run)(&services, event.resource_id).await?) }
            },
            options,
        );
    }
    let reindex = services.clone();
    let cleanup = services.clone();
    router
        .on_with(
            move |event: ResourceUpdated, _ctx: Ctx| {
                let services = reindex.clone();
                async move { Ok(index::run(&services, event.resource_id).await?) }
            },
            HandlerOptions::new().name("resource_reindexer"),
        )
        .on_with(
            move |event: ResourceDeleted, _ctx: Ctx| {
                let services = cleanup.clone();
                async move { Ok(index::remove(&services, &event).await?) }
            },
            HandlerOptions::new().name("resource_cleanup"),
        )
}
