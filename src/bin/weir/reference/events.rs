//! The reference service's events, as real contracts: task processing, customers and resource
//! side effects. They are what the `weir` binary consumes and publishes, and what its tests and
//! contract documents use. They live in the binary, not the library: a service of your own
//! defines its own events (see `weir::Event`), and a library build carries none of these.
//!
//! The integration tests compile this same file (`tests/reference`), so the events they publish
//! are the binary's, byte for byte. Each has a convenience constructor so producers never
//! assemble an event by hand.

use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::collections::BTreeMap;
use uuid::Uuid;
use weir::{Event, EventType};

/// Topic of task events.
pub(crate) const TASK_TOPIC: &str = "task-events";
/// Topic of customer events.
pub(crate) const CUSTOMER_TOPIC: &str = "customer-events";
/// Topic of resource events.
pub(crate) const RESOURCE_TOPIC: &str = "resource-events";

/// What started a task's processing: the four triggers of the reference service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
#[serde(rename_all = "snake_case")]
pub(crate) enum TriggeredBy {
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
pub(crate) struct TaskFields {
    /// The task (and the record key).
    pub(crate) task_id: Uuid,
    /// Owning tenant.
    pub(crate) tenant_id: String,
    /// Environment within the tenant.
    pub(crate) environment_id: String,
    /// Where the file to process is (`file://`, a path, or `http://`).
    pub(crate) file_url: String,
    /// What kind of records the file holds.
    pub(crate) entity_type: String,
    /// What asked for this.
    pub(crate) triggered_by: TriggeredBy,
}

impl TaskFields {
    /// All fields, with a given trigger.
    pub(crate) fn new(
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
pub(crate) struct TaskCreated(pub(crate) TaskFields);

/// `task.processing_requested`: a trigger asks for (re)processing of an existing task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub(crate) struct TaskProcessingRequested(pub(crate) TaskFields);

impl TaskCreated {
    /// A created task; creation always comes through the API.
    pub(crate) fn new(fields: TaskFields) -> Self {
        Self(fields)
    }
}

impl TaskProcessingRequested {
    /// A processing request for `fields.task_id`, made by `fields.triggered_by`.
    pub(crate) fn new(fields: TaskFields) -> Self {
        Self(fields)
    }
}

impl Event for TaskCreated {
    const TYPE: EventType = EventType::new("task.created");
    const TOPIC: &'static str = TASK_TOPIC;
    weir::data_schema!();
    fn key(&self) -> String {
        self.0.task_id.to_string()
    }
}

impl Event for TaskProcessingRequested {
    const TYPE: EventType = EventType::new("task.processing_requested");
    const TOPIC: &'static str = TASK_TOPIC;
    weir::data_schema!();
    fn key(&self) -> String {
        self.0.task_id.to_string()
    }
}

/// `customer.created`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub(crate) struct CustomerCreated {
    /// The customer (and the record key).
    pub(crate) customer_id: String,
    /// The customer's attributes, as the owning service defines them.
    pub(crate) details: Value,
}

/// `customer.updated`: `details` holds the new values of the changed attributes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub(crate) struct CustomerUpdated {
    /// The customer (and the record key).
    pub(crate) customer_id: String,
    /// New values of the attributes that changed.
    pub(crate) details: Value,
}

/// `customer.deleted`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub(crate) struct CustomerDeleted {
    /// The customer (and the record key).
    pub(crate) customer_id: String,
    /// Why, or what was kept, if the owner says.
    #[serde(default)]
    pub(crate) details: Value,
}

macro_rules! customer_event {
    ($ty:ident, $name:literal) => {
        impl $ty {
            /// Builds the event for one customer. The service publishes only some of the three
            /// (`weir publish`, the demo); the tests, which compile this file too, build all.
            #[allow(dead_code)]
            pub(crate) fn new(customer_id: impl Into<String>, details: Value) -> Self {
                Self {
                    customer_id: customer_id.into(),
                    details,
                }
            }
        }
        impl Event for $ty {
            const TYPE: EventType = EventType::new($name);
            const TOPIC: &'static str = CUSTOMER_TOPIC;
            weir::data_schema!();
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
pub(crate) struct ResourceCreated {
    /// The resource (and the record key).
    pub(crate) resource_id: Uuid,
    /// Where the stored file is, relative to the storage directory.
    pub(crate) file_path: String,
    /// Its media type, e.g. `image/png`.
    pub(crate) content_type: String,
    /// The name it was uploaded under.
    pub(crate) original_name: String,
}

/// `resource.updated`: some attributes changed (rename, retag).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub(crate) struct ResourceUpdated {
    /// The resource (and the record key).
    pub(crate) resource_id: Uuid,
    /// Where the stored file is.
    pub(crate) file_path: String,
    /// Its media type.
    pub(crate) content_type: String,
    /// The name it was uploaded under.
    pub(crate) original_name: String,
    /// Changed attributes and their new values.
    pub(crate) changed_fields: BTreeMap<String, Value>,
}

/// `resource.deleted`: the resource is gone; derived data must go too.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub(crate) struct ResourceDeleted {
    /// The resource (and the record key).
    pub(crate) resource_id: Uuid,
    /// Where the stored file was.
    pub(crate) file_path: String,
    /// Its media type.
    pub(crate) content_type: String,
    /// The name it was uploaded under.
    pub(crate) original_name: String,
}

impl ResourceCreated {
    /// A stored resource.
    pub(crate) fn new(
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
    pub(crate) fn updated(&self, changed_fields: BTreeMap<String, Value>) -> ResourceUpdated {
        ResourceUpdated {
            resource_id: self.resource_id,
            file_path: self.file_path.clone(),
            content_type: self.content_type.clone(),
            original_name: self.original_name.clone(),
            changed_fields,
        }
    }

    /// The deletion event for this resource.
    pub(crate) fn deleted(&self) -> ResourceDeleted {
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
            weir::data_schema!();
            fn key(&self) -> String {
                self.resource_id.to_string()
            }
        }
    };
}
resource_event!(ResourceCreated, "resource.created");
resource_event!(ResourceUpdated, "resource.updated");
resource_event!(ResourceDeleted, "resource.deleted");
