//! Seed 004: resource uploads whose side effects (hashes, thumbnail, index) run in handlers,
//! off the request path. (Being built: issue 8.)

use super::api::Services;
use serde::{Deserialize, Serialize};
use weir::Migration;

/// The schema of `resources` and its search index (`reference/0002_...`).
pub(crate) const MIGRATIONS: &[Migration] = &[];
use std::path::PathBuf;

/// Where uploaded files live (`[storage]`, `WEIR_STORAGE__DIR`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(default, deny_unknown_fields)]
pub(crate) struct StorageSettings {
    /// The directory uploads and thumbnails are written to.
    pub(crate) dir: PathBuf,
}

impl Default for StorageSettings {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("weir-storage"),
        }
    }
}

/// The resource routes.
pub(crate) fn routes(_services: &Services) -> axum::Router {
    axum::Router::new()
}

/// Registers the resource side-effect handlers.
pub(crate) fn handlers(router: weir::Router, _services: &Services) -> weir::Router {
    router
}
