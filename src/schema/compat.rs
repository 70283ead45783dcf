//! The breaking-change rules, as Weir's decoder defines compatibility.
//!
//! A change is breaking when a consumer or producer that is still running the other side of it
//! would fail: Weir's decoder ([`EventFactory`](crate::EventFactory)) ignores fields it does not
//! know, rejects a missing field unless it is an `Option` or `#[serde(default)]`, rejects a value
//! of the wrong type or an enum value it does not know, and rejects unknown fields only for a
//! type that says `#[serde(deny_unknown_fields)]` (`additionalProperties: false`).
//!
//! Both documents are compared as JSON: a saved baseline (old) and the current contracts (new).
//! Events are matched by topic and CloudEvents type, so a breaking change published under a new
//! type name (`task.created.v2`) is an added type, not a break.

use serde_json::{Map, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

/// What changed between a baseline and the current contracts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum ChangeKind {
    /// Breaking: a topic is gone; its consumers wait forever, its producers' records go nowhere.
    RemovedTopic,
    /// Breaking: an event type is gone from a topic; producers of it have no consumer any more.
    RemovedEventType,
    /// Breaking: a new field is required; records of today's producers lack it and are rejected.
    AddedRequiredField,
    /// Breaking: an optional field became required; records that leave it out are rejected.
    BecameRequired,
    /// Breaking: a required field is gone; consumers that still require it reject new records.
    RemovedRequiredField,
    /// Breaking: a required field became optional; new producers may leave it out (or send
    /// `null`), which consumers that still require it reject.
    BecameOptional,
    /// Breaking: a field's type or format changed; one side rejects the other's values.
    ChangedType,
    /// Breaking: an enum lost values; records that carry them are rejected.
    NarrowedEnum,
    /// Breaking: an object now rejects fields it does not list (`additionalProperties: false`),
    /// and producers send such fields today.
    ClosedObject,
    /// Compatible: a new topic.
    AddedTopic,
    /// Compatible: a new event type (including a breaking change under a new type name).
    AddedEventType,
    /// Compatible: a new optional field; the decoder ignores it where it is unknown and does
    /// without it where it is missing.
    AddedOptionalField,
    /// Compatible: an optional field is gone; consumers that know it do without it.
    RemovedOptionalField,
    /// Compatible: an enum gained values. Consumers must be deployed before producers send the
    /// new values: a consumer that does not know a value rejects the record.
    WidenedEnum,
}

impl ChangeKind {
    /// Whether the change breaks a running consumer or producer.
    pub fn is_breaking(self) -> bool {
        !matches!(
            self,
            Self::AddedTopic
                | Self::AddedEventType
                | Self::AddedOptionalField
                | Self::RemovedOptionalField
                | Self::WidenedEnum
        )
    }

    /// A stable snake_case name, as `weir schema check` prints it.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RemovedTopic => "removed_topic",
            Self::RemovedEventType => "removed_event_type",
            Self::AddedRequiredField => "added_required_field",
            Self::BecameRequired => "became_required",
            Self::RemovedRequiredField => "removed_required_field",
            Self::BecameOptional => "became_optional",
            Self::ChangedType => "changed_type",
            Self::NarrowedEnum => "narrowed_enum",
            Self::ClosedObject => "closed_object",
            Self::AddedTopic => "added_topic",
            Self::AddedEventType => "added_event_type",
            Self::AddedOptionalField => "added_optional_field",
            Self::RemovedOptionalField => "removed_optional_field",
            Self::WidenedEnum => "widened_enum",
        }
    }
}

/// One change, located.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// What kind of change.
    pub kind: ChangeKind,
    /// The topic (channel address).
    pub topic: String,
    /// The CloudEvents type, unless the whole topic changed.
    pub event_type: Option<String>,
    /// The field's path from the CloudEvent, e.g. `data.triggered_by`.
    pub field: Option<String>,
    /// What exactly, for people.
    pub detail: String,
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let class = if self.kind.is_breaking() {
            "breaking"
        } else {
            "compatible"
        };
        write!(f, "{class} {}: {}", self.kind.as_str(), self.topic)?;
        if let Some(t) = &self.event_type {
            write!(f, " {t}")?;
        }
        if let Some(field) = &self.field {
            write!(f, " {field}")?;
        }
        write!(f, ": {}", self.detail)
    }
}

/// Every change between a baseline and the current contracts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// In document order: topics, then event types, then fields.
    pub changes: Vec<Change>,
}

impl Report {
    /// The breaking changes.
    pub fn breaking(&self) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(|c| c.kind.is_breaking())
    }

    /// True when nothing breaks.
    pub fn is_compatible(&self) -> bool {
        self.breaking().next().is_none()
    }

    /// Whether a change of this kind was found.
    pub fn has(&self, kind: ChangeKind) -> bool {
        self.changes.iter().any(|c| c.kind == kind)
    }
}

/// One event message of a document, found through its channels.
pub(crate) struct EventEntry {
    pub(crate) topic: String,
    pub(crate) event_type: String,
    /// The data schema (maybe a `$ref` into the document).
    pub(crate) data: Value,
    pub(crate) dataschema: Option<String>,
}

/// Follows `$ref`s that point into `root` (`#/...`); anything else is returned as it is.
pub(crate) fn resolve<'a>(root: &'a Value, mut schema: &'a Value) -> &'a Value {
    for _ in 0..32 {
        let Some(pointer) = schema
            .get("$ref")
            .and_then(Value::as_str)
            .and_then(|r| r.strip_prefix('#'))
        else {
            break;
        };
        match root.pointer(pointer) {
            Some(target) => schema = target,
            None => break,
        }
    }
    schema
}

fn channels(doc: &Value) -> impl Iterator<Item = &Value> {
    doc.get("channels")
        .and_then(Value::as_object)
        .into_iter()
        .flat_map(Map::values)
        .map(move |c| resolve(doc, c))
}

/// Every event message on every channel: those whose payload is a CloudEvent with a fixed
/// `type` (dead-letter messages carry any bytes and have none).
pub(crate) fn events(doc: &Value) -> Vec<EventEntry> {
    let mut out = Vec::new();
    for channel in channels(doc) {
        let Some(topic) = channel.get("address").and_then(Value::as_str) else {
            continue;
        };
        let messages = channel.get("messages").and_then(Value::as_object);
        for message in messages.into_iter().flat_map(Map::values) {
            let message = resolve(doc, message);
            let Some(payload) = message.get("payload").map(|p| resolve(doc, p)) else {
                continue;
            };
            let Some(event_type) = payload
                .pointer("/properties/type/const")
                .and_then(Value::as_str)
            else {
                continue;
            };
            out.push(EventEntry {
                topic: topic.to_owned(),
                event_type: event_type.to_owned(),
                data: payload
                    .pointer("/properties/data")
                    .cloned()
                    .unwrap_or(Value::Bool(true)),
                dataschema: payload
                    .pointer("/properties/dataschema/const")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
            });
        }
    }
    out
}

fn topics(doc: &Value) -> BTreeSet<String> {
    channels(doc)
        .filter_map(|c| c.get("address").and_then(Value::as_str))
        .map(str::to_owned)
        .collect()
}

/// Compares a baseline document (`old`) with the current one (`new`).
pub(crate) fn compare(old: &Value, new: &Value) -> Report {
    let mut changes = Vec::new();
    let (old_topics, new_topics) = (topics(old), topics(new));
    for topic in old_topics.difference(&new_topics) {
        changes.push(Change {
            kind: ChangeKind::RemovedTopic,
            topic: topic.clone(),
            event_type: None,
            field: None,
            detail: "the topic is no longer in the contracts".to_owned(),
        });
    }
    for topic in new_topics.difference(&old_topics) {
        changes.push(Change {
            kind: ChangeKind::AddedTopic,
            topic: topic.clone(),
            event_type: None,
            field: None,
            detail: "a new topic".to_owned(),
        });
    }
    let index = |doc| -> BTreeMap<(String, String), EventEntry> {
        events(doc)
            .into_iter()
            .map(|e| ((e.topic.clone(), e.event_type.clone()), e))
            .collect()
    };
    let (old_events, new_events) = (index(old), index(new));
    for (key, before) in &old_events {
        if !new_topics.contains(&key.0) {
            continue; // reported with its topic
        }
        let Some(after) = new_events.get(key) else {
            changes.push(Change {
                kind: ChangeKind::RemovedEventType,
                topic: key.0.clone(),
                event_type: Some(key.1.clone()),
                field: None,
                detail: "the event type is no longer on this topic".to_owned(),
            });
            continue;
        };
        let mut walk = Walk {
            old,
            new,
            topic: &key.0,
            event_type: &key.1,
            changes: &mut changes,
        };
        walk.schema(&before.data, &after.data, "data", 0);
    }
    for key in new_events.keys() {
        if old_topics.contains(&key.0) && !old_events.contains_key(key) {
            changes.push(Change {
                kind: ChangeKind::AddedEventType,
                topic: key.0.clone(),
                event_type: Some(key.1.clone()),
                field: None,
                detail: "a new event type".to_owned(),
            });
        }
    }
    Report { changes }
}

/// Nested deeper than this, a contract is compared no further (and a recursive one ends).
const MAX_DEPTH: usize = 32;

struct Walk<'a> {
    old: &'a Value,
    new: &'a Value,
    topic: &'a str,
    event_type: &'a str,
    changes: &'a mut Vec<Change>,
}

impl Walk<'_> {
    fn push(&mut self, kind: ChangeKind, field: &str, detail: String) {
        self.changes.push(Change {
            kind,
            topic: self.topic.to_owned(),
            event_type: Some(self.event_type.to_owned()),
            field: Some(field.to_owned()),
            detail,
        });
    }

    fn schema(&mut self, old: &Value, new: &Value, path: &str, depth: usize) {
        if depth > MAX_DEPTH {
            return;
        }
        let (old, new) = (resolve(self.old, old), resolve(self.new, new));
        let (old_types, new_types) = (self.types(self.old, old), self.types(self.new, new));
        let (old_format, new_format) = (format(old), format(new));
        if old_types != new_types || old_format != new_format {
            let show = |types: &Option<BTreeSet<String>>, format: Option<&str>| {
                let mut text = match types {
                    Some(t) => t.iter().cloned().collect::<Vec<_>>().join("|"),
                    None => "any".to_owned(),
                };
                if let Some(format) = format {
                    text.push_str(&format!(" ({format})"));
                }
                text
            };
            let detail = format!(
                "was {}, is {}",
                show(&old_types, old_format),
                show(&new_types, new_format)
            );
            self.push(ChangeKind::ChangedType, path, detail);
            return;
        }
        self.enums(old, new, path);
        self.objects(old, new, path, depth);
        if let (Some(a), Some(b)) = (old.get("items"), new.get("items")) {
            if a.is_object() && b.is_object() {
                self.schema(a, b, &format!("{path}[]"), depth + 1);
            }
        }
        // Unions that are not enums (`Option<Struct>` is `anyOf: [struct, null]`): compared
        // variant by variant when both have the same shape.
        for key in ["anyOf", "oneOf"] {
            if let (Some(a), Some(b)) = (
                old.get(key).and_then(Value::as_array),
                new.get(key).and_then(Value::as_array),
            ) {
                if a.len() == b.len() && self.values(self.old, old).is_none() {
                    for (a, b) in a.iter().zip(b) {
                        self.schema(a, b, path, depth + 1);
                    }
                }
            }
        }
    }

    /// The JSON types a schema admits; `None` when it admits any value.
    fn types(&self, root: &Value, schema: &Value) -> Option<BTreeSet<String>> {
        if let Some(t) = schema.get("type") {
            return Some(match t {
                Value::Array(types) => types
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect(),
                other => other.as_str().map(str::to_owned).into_iter().collect(),
            });
        }
        if let Some(values) = self.values(root, schema) {
            return Some(values.iter().map(|v| json_type(v).to_owned()).collect());
        }
        if schema.get("properties").is_some() {
            return Some(BTreeSet::from(["object".to_owned()]));
        }
        None
    }

    /// The values an enum-like schema admits (`enum`, `const`, or a union of those, as serde's
    /// unit enums come out); `None` when it is not an enum.
    fn values(&self, root: &Value, schema: &Value) -> Option<Vec<Value>> {
        let schema = resolve(root, schema);
        if let Some(values) = schema.get("enum").and_then(Value::as_array) {
            return Some(values.clone());
        }
        if let Some(value) = schema.get("const") {
            return Some(vec![value.clone()]);
        }
        if schema.get("type") == Some(&Value::from("null")) {
            return Some(vec![Value::Null]);
        }
        for key in ["oneOf", "anyOf"] {
            if let Some(variants) = schema.get(key).and_then(Value::as_array) {
                let mut all = Vec::new();
                for variant in variants {
                    all.extend(self.values(root, variant)?);
                }
                return Some(all);
            }
        }
        None
    }

    fn enums(&mut self, old: &Value, new: &Value, path: &str) {
        let Some(before) = self.values(self.old, old) else {
            return;
        };
        let show = |values: Vec<&Value>| {
            values
                .iter()
                .map(|v| v.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        };
        let Some(after) = self.values(self.new, new) else {
            // Any value of the same type is accepted now.
            self.push(
                ChangeKind::WidenedEnum,
                path,
                "no longer restricted to a list".to_owned(),
            );
            return;
        };
        let removed: Vec<&Value> = before.iter().filter(|v| !after.contains(v)).collect();
        let added: Vec<&Value> = after.iter().filter(|v| !before.contains(v)).collect();
        if !removed.is_empty() {
            self.push(
                ChangeKind::NarrowedEnum,
                path,
                format!("no longer accepts {}", show(removed)),
            );
        }
        if !added.is_empty() {
            self.push(
                ChangeKind::WidenedEnum,
                path,
                format!("now also accepts {}", show(added)),
            );
        }
    }

    fn objects(&mut self, old: &Value, new: &Value, path: &str, depth: usize) {
        let empty = Map::new();
        let properties = |s: &Value| s.get("properties").and_then(Value::as_object).cloned();
        let required = |s: &Value| -> BTreeSet<String> {
            s.get("required")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .map(str::to_owned)
                .collect()
        };
        let (old_props, new_props) = (properties(old), properties(new));
        let (old_req, new_req) = (required(old), required(new));
        let old_props_ref = old_props.as_ref().unwrap_or(&empty);
        let new_props_ref = new_props.as_ref().unwrap_or(&empty);
        let field = |name: &str| format!("{path}.{name}");
        for name in new_props_ref
            .keys()
            .filter(|n| !old_props_ref.contains_key(*n))
        {
            if new_req.contains(name) {
                self.push(
                    ChangeKind::AddedRequiredField,
                    &field(name),
                    "a new required field: records without it are rejected".to_owned(),
                );
            } else {
                self.push(
                    ChangeKind::AddedOptionalField,
                    &field(name),
                    "a new optional field".to_owned(),
                );
            }
        }
        for name in old_props_ref
            .keys()
            .filter(|n| !new_props_ref.contains_key(*n))
        {
            if old_req.contains(name) {
                self.push(
                    ChangeKind::RemovedRequiredField,
                    &field(name),
                    "a required field is gone: consumers that require it reject new records"
                        .to_owned(),
                );
            } else {
                self.push(
                    ChangeKind::RemovedOptionalField,
                    &field(name),
                    "an optional field is gone".to_owned(),
                );
            }
        }
        for (name, before) in old_props_ref {
            let Some(after) = new_props_ref.get(name) else {
                continue;
            };
            match (old_req.contains(name), new_req.contains(name)) {
                (false, true) => self.push(
                    ChangeKind::BecameRequired,
                    &field(name),
                    "was optional, is required: records without it are rejected".to_owned(),
                ),
                (true, false) => self.push(
                    ChangeKind::BecameOptional,
                    &field(name),
                    "was required, is optional: consumers that require it reject records \
                     without it"
                        .to_owned(),
                ),
                _ => {}
            }
            self.schema(before, after, &field(name), depth + 1);
        }
        let closed = |s: &Value| s.get("additionalProperties") == Some(&Value::Bool(false));
        if closed(new) {
            if !closed(old) {
                self.push(
                    ChangeKind::ClosedObject,
                    path,
                    "now rejects fields it does not list (additionalProperties: false); \
                     producers may send such fields today"
                        .to_owned(),
                );
            } else {
                for name in old_props_ref
                    .keys()
                    .filter(|n| !new_props_ref.contains_key(*n))
                {
                    self.push(
                        ChangeKind::ClosedObject,
                        &field(name),
                        "sent today, and now rejected as an unknown field".to_owned(),
                    );
                }
            }
        }
        // Maps: `BTreeMap<String, T>` is `additionalProperties: <T's schema>`.
        if let (Some(a), Some(b)) = (
            old.get("additionalProperties"),
            new.get("additionalProperties"),
        ) {
            if a.is_object() && b.is_object() {
                self.schema(a, b, &format!("{path}.*"), depth + 1);
            }
        }
    }
}

fn format(schema: &Value) -> Option<&str> {
    schema.get("format").and_then(Value::as_str)
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

#[cfg(test)]
#[allow(dead_code)] // the contracts below are only ever described, never built
mod tests {
    use super::ChangeKind::{self, *};
    use super::Report;
    use crate::schema::{AsyncApi, Document, JsonSchema};
    use crate::{Ctx, Event, EventType, Router};
    use serde::{Deserialize, Serialize};
    use serde_json::{json, Value};

    #[derive(Clone, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "snake_case")]
    enum Status {
        Open,
        Paid,
    }

    #[derive(Clone, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "snake_case")]
    enum NarrowStatus {
        Open,
    }

    #[derive(Clone, Serialize, Deserialize, JsonSchema)]
    #[serde(rename_all = "snake_case")]
    enum WideStatus {
        Open,
        Paid,
        Refunded,
    }

    #[derive(Clone, Serialize, Deserialize, JsonSchema)]
    struct Line {
        sku: String,
        quantity: u32,
    }

    #[derive(Clone, Serialize, Deserialize, JsonSchema)]
    struct LineWithTextQuantity {
        sku: String,
        quantity: String,
    }

    /// One version of the `order.placed` contract (or another type, on another topic), each an
    /// edited copy of `base`.
    macro_rules! version {
        ($module:ident, $type:literal, $topic:literal, $(#[$attr:meta])* { $($fields:tt)* }) => {
            mod $module {
                use super::*;
                #[derive(Clone, Serialize, Deserialize, JsonSchema)]
                $(#[$attr])*
                pub(super) struct Order { $($fields)* }
                impl Event for Order {
                    const TYPE: EventType = EventType::new($type);
                    const TOPIC: &'static str = $topic;
                    crate::data_schema!();
                    fn key(&self) -> String {
                        String::new()
                    }
                }
            }
        };
    }

    version!(base, "order.placed", "orders", {
        order_id: String,
        #[serde(default)]
        reference: String,
        note: Option<String>,
        amount: u32,
        status: Status,
        lines: Vec<Line>,
    });
    version!(added_required, "order.placed", "orders", {
        order_id: String,
        #[serde(default)]
        reference: String,
        note: Option<String>,
        amount: u32,
        status: Status,
        lines: Vec<Line>,
        customer_id: String,
    });
    version!(added_optional, "order.placed", "orders", {
        order_id: String,
        #[serde(default)]
        reference: String,
        note: Option<String>,
        amount: u32,
        status: Status,
        lines: Vec<Line>,
        customer_id: Option<String>,
    });
    version!(reference_required, "order.placed", "orders", {
        order_id: String,
        reference: String,
        note: Option<String>,
        amount: u32,
        status: Status,
        lines: Vec<Line>,
    });
    version!(without_amount, "order.placed", "orders", {
        order_id: String,
        #[serde(default)]
        reference: String,
        note: Option<String>,
        status: Status,
        lines: Vec<Line>,
    });
    version!(without_note, "order.placed", "orders", {
        order_id: String,
        #[serde(default)]
        reference: String,
        amount: u32,
        status: Status,
        lines: Vec<Line>,
    });
    version!(amount_optional, "order.placed", "orders", {
        order_id: String,
        #[serde(default)]
        reference: String,
        note: Option<String>,
        #[serde(default)]
        amount: u32,
        status: Status,
        lines: Vec<Line>,
    });
    version!(amount_as_text, "order.placed", "orders", {
        order_id: String,
        #[serde(default)]
        reference: String,
        note: Option<String>,
        amount: String,
        status: Status,
        lines: Vec<Line>,
    });
    version!(quantity_as_text, "order.placed", "orders", {
        order_id: String,
        #[serde(default)]
        reference: String,
        note: Option<String>,
        amount: u32,
        status: Status,
        lines: Vec<LineWithTextQuantity>,
    });
    version!(narrow_status, "order.placed", "orders", {
        order_id: String,
        #[serde(default)]
        reference: String,
        note: Option<String>,
        amount: u32,
        status: NarrowStatus,
        lines: Vec<Line>,
    });
    version!(wide_status, "order.placed", "orders", {
        order_id: String,
        #[serde(default)]
        reference: String,
        note: Option<String>,
        amount: u32,
        status: WideStatus,
        lines: Vec<Line>,
    });
    version!(closed, "order.placed", "orders", #[serde(deny_unknown_fields)] {
        order_id: String,
        #[serde(default)]
        reference: String,
        note: Option<String>,
        amount: u32,
        status: Status,
        lines: Vec<Line>,
    });
    version!(closed_without_note, "order.placed", "orders", #[serde(deny_unknown_fields)] {
        order_id: String,
        #[serde(default)]
        reference: String,
        amount: u32,
        status: Status,
        lines: Vec<Line>,
    });
    version!(cancelled, "order.cancelled", "orders", {
        order_id: String,
    });
    version!(v2, "order.placed.v2", "orders", {
        order_id: u64,
        total: String,
    });
    version!(refund, "refund.issued", "refunds", {
        order_id: String,
    });

    fn router() -> Router {
        Router::new()
    }

    trait Register {
        fn with<T: Event>(self) -> Self;
    }

    impl Register for Router {
        fn with<T: Event>(self) -> Self {
            self.on(|_: T, _: Ctx| async { Ok(()) })
        }
    }

    fn document(router: Router) -> Document {
        router.asyncapi(&AsyncApi::new("orders", "1.0.0").consumer_group("orders"))
    }

    fn check(baseline: Router, current: Router) -> Report {
        document(current).check(&document(baseline))
    }

    fn kinds(report: &Report) -> Vec<(ChangeKind, Option<String>)> {
        report
            .changes
            .iter()
            .map(|c| (c.kind, c.field.clone()))
            .collect()
    }

    fn field(kind: ChangeKind, path: &str) -> (ChangeKind, Option<String>) {
        (kind, Some(path.to_owned()))
    }

    /// A breaking change: the report finds exactly that change, and only that.
    fn assert_breaking(report: &Report, expected: &[(ChangeKind, Option<String>)]) {
        assert_eq!(kinds(report), expected, "{report:#?}");
        assert!(!report.is_compatible(), "{report:#?}");
    }

    fn assert_compatible(report: &Report, expected: &[(ChangeKind, Option<String>)]) {
        assert_eq!(kinds(report), expected, "{report:#?}");
        assert!(report.is_compatible(), "{report:#?}");
    }

    #[test]
    fn an_unchanged_contract_has_no_changes() {
        let report = check(
            router().with::<base::Order>(),
            router().with::<base::Order>(),
        );
        assert_eq!(report.changes, vec![]);
    }

    #[test]
    fn a_removed_topic_is_breaking() {
        let report = check(
            router().with::<base::Order>().with::<refund::Order>(),
            router().with::<base::Order>(),
        );
        assert_breaking(
            &report,
            &[(RemovedTopic, None), (RemovedTopic, None)], // the topic and its dead letters
        );
        let topics: Vec<&str> = report.changes.iter().map(|c| c.topic.as_str()).collect();
        assert_eq!(topics, ["refunds", "refunds.dlq"]);
    }

    #[test]
    fn a_removed_event_type_is_breaking() {
        let report = check(
            router().with::<base::Order>().with::<cancelled::Order>(),
            router().with::<base::Order>(),
        );
        assert_breaking(&report, &[(RemovedEventType, None)]);
        assert_eq!(
            report.changes[0].event_type.as_deref(),
            Some("order.cancelled")
        );
    }

    #[test]
    fn an_added_required_field_is_breaking() {
        let report = check(
            router().with::<base::Order>(),
            router().with::<added_required::Order>(),
        );
        assert_breaking(&report, &[field(AddedRequiredField, "data.customer_id")]);
    }

    #[test]
    fn a_field_that_became_required_is_breaking() {
        let report = check(
            router().with::<base::Order>(),
            router().with::<reference_required::Order>(),
        );
        assert_breaking(&report, &[field(BecameRequired, "data.reference")]);
    }

    #[test]
    fn a_removed_required_field_is_breaking() {
        let report = check(
            router().with::<base::Order>(),
            router().with::<without_amount::Order>(),
        );
        assert_breaking(&report, &[field(RemovedRequiredField, "data.amount")]);
    }

    #[test]
    fn a_required_field_that_became_optional_is_breaking() {
        let report = check(
            router().with::<base::Order>(),
            router().with::<amount_optional::Order>(),
        );
        assert_breaking(&report, &[field(BecameOptional, "data.amount")]);
    }

    #[test]
    fn a_changed_type_is_breaking_at_any_depth() {
        let report = check(
            router().with::<base::Order>(),
            router().with::<amount_as_text::Order>(),
        );
        assert_breaking(&report, &[field(ChangedType, "data.amount")]);
        assert_eq!(report.changes[0].detail, "was integer (uint32), is string");
        let report = check(
            router().with::<base::Order>(),
            router().with::<quantity_as_text::Order>(),
        );
        assert_breaking(&report, &[field(ChangedType, "data.lines[].quantity")]);
    }

    #[test]
    fn a_narrowed_enum_is_breaking() {
        let report = check(
            router().with::<base::Order>(),
            router().with::<narrow_status::Order>(),
        );
        assert_breaking(&report, &[field(NarrowedEnum, "data.status")]);
        assert_eq!(report.changes[0].detail, r#"no longer accepts "paid""#);
    }

    #[test]
    fn closing_an_object_to_unknown_fields_is_breaking() {
        let report = check(
            router().with::<base::Order>(),
            router().with::<closed::Order>(),
        );
        assert_breaking(&report, &[field(ClosedObject, "data")]);
        // Already closed: dropping an optional field rejects what producers send today.
        let report = check(
            router().with::<closed::Order>(),
            router().with::<closed_without_note::Order>(),
        );
        assert_breaking(
            &report,
            &[
                field(RemovedOptionalField, "data.note"),
                field(ClosedObject, "data.note"),
            ],
        );
    }

    #[test]
    fn an_added_optional_field_is_compatible() {
        let report = check(
            router().with::<base::Order>(),
            router().with::<added_optional::Order>(),
        );
        assert_compatible(&report, &[field(AddedOptionalField, "data.customer_id")]);
    }

    #[test]
    fn a_removed_optional_field_is_compatible_while_unknown_fields_are_ignored() {
        let report = check(
            router().with::<base::Order>(),
            router().with::<without_note::Order>(),
        );
        assert_compatible(&report, &[field(RemovedOptionalField, "data.note")]);
    }

    #[test]
    fn a_widened_enum_is_compatible() {
        let report = check(
            router().with::<base::Order>(),
            router().with::<wide_status::Order>(),
        );
        assert_compatible(&report, &[field(WidenedEnum, "data.status")]);
        assert_eq!(report.changes[0].detail, r#"now also accepts "refunded""#);
    }

    #[test]
    fn an_added_event_type_is_compatible() {
        let report = check(
            router().with::<base::Order>(),
            router().with::<base::Order>().with::<cancelled::Order>(),
        );
        assert_compatible(&report, &[(AddedEventType, None)]);
    }

    #[test]
    fn a_breaking_change_under_a_new_type_name_is_not_a_break() {
        let report = check(
            router().with::<base::Order>(),
            router().with::<base::Order>().with::<v2::Order>(),
        );
        assert_compatible(&report, &[(AddedEventType, None)]);
        assert_eq!(
            report.changes[0].event_type.as_deref(),
            Some("order.placed.v2")
        );
    }

    /// The baseline document as saved, edited by hand: the rules read any AsyncAPI document of
    /// this shape, not only the ones Weir just built.
    fn edited_baseline(edit: impl FnOnce(&mut Value)) -> Report {
        let current = document(router().with::<base::Order>());
        let mut saved = current.as_value().clone();
        edit(&mut saved);
        let text = serde_norway::to_string(&saved).unwrap();
        current.check(&Document::parse(&text).unwrap())
    }

    #[test]
    fn an_edited_baseline_with_a_value_the_contract_lost_is_a_narrowed_enum() {
        let report = edited_baseline(|doc| {
            let status = doc
                .pointer_mut("/components/schemas/order.placed/properties/status/enum")
                .unwrap();
            status.as_array_mut().unwrap().push(json!("refunded"));
        });
        assert_breaking(&report, &[field(NarrowedEnum, "data.status")]);
    }

    #[test]
    fn an_edited_baseline_with_a_field_the_contract_lost_is_a_removed_required_field() {
        let report = edited_baseline(|doc| {
            let order = doc.pointer_mut("/components/schemas/order.placed").unwrap();
            order["properties"]["currency"] = json!({"type": "string"});
            order["required"]
                .as_array_mut()
                .unwrap()
                .push(json!("currency"));
        });
        assert_breaking(&report, &[field(RemovedRequiredField, "data.currency")]);
    }
}
