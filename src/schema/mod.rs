//! Contracts as documents: the JSON Schema of each event's data, an AsyncAPI 3.0 document of a
//! service built from its [`Router`](crate::Router), and the compatibility rules that decide
//! whether a change to a contract breaks its consumers or producers.
//!
//! Teams in other languages read the document; CI compares the current contracts with a saved
//! one ([`Document::check`]) and fails on a breaking change. The rules ([`ChangeKind`], and the
//! README's table) follow Weir's decoder: unknown fields are ignored, a missing field that is
//! neither an `Option` nor `#[serde(default)]` is rejected, a wrong type or an unknown enum
//! value is rejected.
//!
//! ```
//! use serde::{Deserialize, Serialize};
//! use weir::schema::{AsyncApi, JsonSchema};
//! use weir::{Ctx, Event, EventType, HandlerError, Router};
//!
//! #[derive(Clone, Serialize, Deserialize, JsonSchema)]
//! struct TaskCreated {
//!     task_id: String,
//! }
//!
//! impl Event for TaskCreated {
//!     const TYPE: EventType = EventType::new("task.created");
//!     const TOPIC: &'static str = "tasks";
//!     fn key(&self) -> String {
//!         self.task_id.clone()
//!     }
//!     weir::data_schema!();
//! }
//!
//! async fn handle(_: TaskCreated, _: Ctx) -> Result<(), HandlerError> { Ok(()) }
//! let router = Router::new().on(handle);
//! let document = router.asyncapi(&AsyncApi::new("Tasks", "1.0.0").consumer_group("tasks"));
//! assert!(document.to_yaml().unwrap().contains("task.created"));
//! ```
//!
//! - `asyncapi`: the document (channels, operations, messages, dead-letter channels);
//! - `example`: an example payload built from a data schema;
//! - `compat`: the breaking-change rules.

mod asyncapi;
mod compat;
mod example;

pub use asyncapi::AsyncApi;
pub use compat::{Change, ChangeKind, Report};
pub use schemars::{JsonSchema, Schema, SchemaGenerator};

use serde_json::Value;

/// Why a document could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The text is neither valid YAML nor valid JSON.
    #[error("cannot read the document: {0}")]
    Parse(String),
    /// The text is YAML or JSON, but not an AsyncAPI 3 document.
    #[error("not an AsyncAPI 3 document: {0}")]
    NotAsyncApi(String),
    /// YAML output failed.
    #[error("cannot write YAML: {0}")]
    Yaml(#[from] serde_norway::Error),
    /// JSON output failed.
    #[error("cannot write JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// An AsyncAPI 3.0 document: built by [`Router::asyncapi`](crate::Router::asyncapi) or read from
/// a saved file.
#[derive(Debug, Clone, PartialEq)]
pub struct Document(Value);

impl Document {
    /// Reads a document from YAML or JSON text (JSON is YAML, so one parser reads both).
    pub fn parse(text: &str) -> Result<Self, SchemaError> {
        let value: Value =
            serde_norway::from_str(text).map_err(|e| SchemaError::Parse(e.to_string()))?;
        match value.get("asyncapi").and_then(Value::as_str) {
            Some(v) if v.starts_with("3.") => Ok(Self(value)),
            Some(v) => Err(SchemaError::NotAsyncApi(format!("asyncapi version {v}"))),
            None => Err(SchemaError::NotAsyncApi("no `asyncapi` field".to_owned())),
        }
    }

    /// The document as a JSON value.
    pub fn as_value(&self) -> &Value {
        &self.0
    }

    /// YAML text: what `contracts/asyncapi.yaml` holds.
    pub fn to_yaml(&self) -> Result<String, SchemaError> {
        Ok(serde_norway::to_string(&self.0)?)
    }

    /// Pretty JSON text.
    pub fn to_json(&self) -> Result<String, SchemaError> {
        Ok(serde_json::to_string_pretty(&self.0)?)
    }

    /// The CloudEvents types of the messages in the document, sorted.
    pub fn event_types(&self) -> Vec<String> {
        let mut types: Vec<String> = compat::events(&self.0)
            .into_iter()
            .map(|e| e.event_type)
            .collect();
        types.sort();
        types.dedup();
        types
    }

    /// The data schema of one event type as a standalone JSON Schema (draft-07): what a team in
    /// another language validates the `data` of a CloudEvent with. `None` if the type is not in
    /// the document.
    pub fn data_schema(&self, event_type: &str) -> Option<Value> {
        let event = compat::events(&self.0)
            .into_iter()
            .find(|e| e.event_type == event_type)?;
        let mut schema = compat::resolve(&self.0, &event.data).clone();
        if let Value::Bool(any) = schema {
            schema = if any {
                serde_json::json!({})
            } else {
                serde_json::json!({"not": {}})
            };
        }
        let object = schema.as_object_mut()?;
        object.insert(
            "$schema".to_owned(),
            Value::from("http://json-schema.org/draft-07/schema#"),
        );
        if let Some(uri) = &event.dataschema {
            object.insert("$id".to_owned(), Value::from(uri.as_str()));
        }
        // Recursive types keep `$ref`s into the document's components; carry them along so the
        // same pointers resolve in the standalone schema.
        if serde_json::to_string(object).is_ok_and(|text| text.contains("\"#/components/schemas/"))
        {
            if let Some(schemas) = self.0.pointer("/components/schemas") {
                object.insert(
                    "components".to_owned(),
                    serde_json::json!({ "schemas": schemas }),
                );
            }
        }
        Some(schema)
    }

    /// Compares this document (the current contracts) with a saved `baseline`: every change,
    /// each classified as breaking or compatible by Weir's decoding rules.
    pub fn check(&self, baseline: &Document) -> Report {
        compat::compare(&baseline.0, &self.0)
    }
}

impl std::fmt::Display for Document {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.to_yaml() {
            Ok(text) => f.write_str(&text),
            Err(_) => Err(std::fmt::Error),
        }
    }
}
