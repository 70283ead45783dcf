//! The reference service's events, as real contracts: task processing, customers and resource
//! side effects. They are what the `weir` binary consumes and publishes, and what its tests and
//! contract documents use; a service of your own defines its own events (see [`Event`]).
//!
//! Not re-exported at the crate root: `weir::seeds::TaskCreated`. Each has a convenience
//! constructor so producers never assemble an event by hand.

use super::{Event, EventType};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use uuid::Uuid;

/// Topic of task events.
pub const TASK_TOPIC: &str = "task-events";
/// Topic of customer events.
pub const CUSTOMER_TOPIC: &str = "customer-events";
/// Topic of resource events.
pub const RESOURCE_TOPIC: &str = "resource-events";

/// What started a task's processing: the four triggers of the reference service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub enum TriggeredBy {
    /// The HTTP API, when the task is created or by `POST /tasks/{id}/process`.
    Api,
    /// A person, through `weir publish`.
    Manual,
    /// The configured schedule.
    Scheduled,
    /// A signed webhook call.
    Webhook,
}

/// The fields both task events carry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TaskFields {
    /// The task (and the record key).
    pub task_id: Uuid,
    /// Owning tenant.
    pub tenant_id: String,
    /// Environment within the tenant.
    pub environment_id: String,
    /// Where the file to process is (`file://`, a path, or `http://`).
    pub file_url: String,
    /// What kind of records the file holds.
    pub entity_type: String,
    /// What asked for this.
    pub triggered_by: TriggeredBy,
}

impl TaskFields {
    /// All fields, with a given trigger.
    pub fn new(
        task_id: Uuid,
        tenant_id: impl Into<String>,
        environment_id: impl Into<String>,
        file_url: impl Into<String>,
        entity_type: impl Into<String>,
        triggered_by: TriggeredBy,
    ) -> Self {
        Self {
            task_id,
            tenant_id: tenant_id.into(),
            environment_id: environment_id.into(),
            file_url: file_url.into(),
            entity_type: entity_type.into(),
            triggered_by,
        }
    }
}

/// `task.created`: a task row was written; processing should start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TaskCreated(pub TaskFields);

/// `task.processing_requested`: a trigger asks for (re)processing of an existing task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct TaskProcessingRequested(pub TaskFields);

impl TaskCreated {
    /// A created task; creation always comes through the API.
    pub fn new(fields: TaskFields) -> Self {
        Self(fields)
    }
}

impl TaskProcessingRequested {
    /// A processing request for `fields.task_id`, made by `fields.triggered_by`.
    pub fn new(fields: TaskFields) -> Self {
        Self(fields)
    }
}

impl Event for TaskCreated {
    const TYPE: EventType = EventType::new("task.created");
    const TOPIC: &'static str = TASK_TOPIC;
    crate::data_schema!();
    fn key(&self) -> String {
        self.0.task_id.to_string()
    }
}

impl Event for TaskProcessingRequested {
    const TYPE: EventType = EventType::new("task.processing_requested");
    const TOPIC: &'static str = TASK_TOPIC;
    crate::data_schema!();
    fn key(&self) -> String {
        self.0.task_id.to_string()
    }
}

/// `customer.created`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CustomerCreated {
    /// The customer (and the record key).
    pub customer_id: String,
    /// The customer's attributes, as the owning service defines them.
    pub details: Value,
}

/// `customer.updated`: `details` holds the new values of the changed attributes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CustomerUpdated {
    /// The customer (and the record key).
    pub customer_id: String,
    /// New values of the attributes that changed.
    pub details: Value,
}

/// `customer.deleted`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CustomerDeleted {
    /// The customer (and the record key).
    pub customer_id: String,
    /// Why, or what was kept, if the owner says.
    #[serde(default)]
    pub details: Value,
}

macro_rules! customer_event {
    ($ty:ident, $name:literal) => {
        impl $ty {
            /// Builds the event for one customer.
            pub fn new(customer_id: impl Into<String>, details: Value) -> Self {
                Self {
                    customer_id: customer_id.into(),
                    details,
                }
            }
        }
        impl Event for $ty {
            const TYPE: EventType = EventType::new($name);
            const TOPIC: &'static str = CUSTOMER_TOPIC;
            crate::data_schema!();
            fn key(&self) -> String {
                self.customer_id.clone()
            }
        }
    };
}
customer_event!(CustomerCreated, "customer.created");
customer_event!(CustomerUpdated, "customer.updated");
customer_event!(CustomerDeleted, "customer.deleted");

/// `resource.created`: a file was stored; its side effects (hashes, thumbnail, index) are due.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ResourceCreated {
    /// The resource (and the record key).
    pub resource_id: Uuid,
    /// Where the stored file is, relative to the storage directory.
    pub file_path: String,
    /// Its media type, e.g. `image/png`.
    pub content_type: String,
    /// The name it was uploaded under.
    pub original_name: String,
}

/// `resource.updated`: some attributes changed (rename, retag).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ResourceUpdated {
    /// The resource (and the record key).
    pub resource_id: Uuid,
    /// Where the stored file is.
    pub file_path: String,
    /// Its media type.
    pub content_type: String,
    /// The name it was uploaded under.
    pub original_name: String,
    /// Changed attributes and their new values.
    pub changed_fields: BTreeMap<String, Value>,
}

/// `resource.deleted`: the resource is gone; derived data must go too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ResourceDeleted {
    /// The resource (and the record key).
    pub resource_id: Uuid,
    /// Where the stored file was.
    pub file_path: String,
    /// Its media type.
    pub content_type: String,
    /// The name it was uploaded under.
    pub original_name: String,
}

impl ResourceCreated {
    /// A stored resource.
    pub fn new(
        resource_id: Uuid,
        file_path: impl Into<String>,
        content_type: impl Into<String>,
        original_name: impl Into<String>,
    ) -> Self {
        Self {
            resource_id,
            file_path: file_path.into(),
            content_type: content_type.into(),
            original_name: original_name.into(),
        }
    }

    /// The update event for this resource with the given changes.
    pub fn updated(&self, changed_fields: BTreeMap<String, Value>) -> ResourceUpdated {
        ResourceUpdated {
            resource_id: self.resource_id,
            file_path: self.file_path.clone(),
            content_type: self.content_type.clone(),
            original_name: self.original_name.clone(),
            changed_fields,
        }
    }

    /// The deletion event for this resource.
    pub fn deleted(&self) -> ResourceDeleted {
        ResourceDeleted {
            resource_id: self.resource_id,
            file_path: self.file_path.clone(),
            content_type: self.content_type.clone(),
            original_name: self.original_name.clone(),
        }
    }
}

macro_rules! resource_event {
    ($ty:ident, $name:literal) => {
        impl Event for $ty {
            const TYPE: EventType = EventType::new($name);
            const TOPIC: &'static str = RESOURCE_TOPIC;
            crate::data_schema!();
            fn key(&self) -> String {
                self.resource_id.to_string()
            }
        }
    };
}
resource_event!(ResourceCreated, "resource.created");
resource_event!(ResourceUpdated, "resource.updated");
resource_event!(ResourceDeleted, "resource.deleted");
