//! The AsyncAPI 3.0 document of a service, built from its `Router` and what it declares it
//! publishes.
//!
//! - channels: one per topic, with its Kafka binding; one per dead-letter topic, whose message
//!   carries the provenance headers;
//! - operations: `receive` for each handler (with the consumer group), `send` for each published
//!   event type and for dead letters;
//! - messages: one per CloudEvents type. The payload is the structured-mode CloudEvent: the
//!   envelope attributes, and `data`, whose schema is the contract's own (in
//!   `components.schemas`, under the type's name). The Kafka key is in the message binding.

use super::example::synthesize;
use super::Document;
use crate::contracts::dead_letter::HEADERS as DEAD_LETTER_HEADERS;
use crate::contracts::{Event, EventDescriptor, CLOUDEVENTS_CONTENT_TYPE, SPEC_VERSION};
use crate::handlers::Router;
use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::sync::Arc;

/// The AsyncAPI version written.
const ASYNCAPI_VERSION: &str = "3.0.0";
/// The Kafka bindings version written.
const KAFKA_BINDING_VERSION: &str = "0.5.0";
/// The message id of dead letters in `components.messages`.
const DEAD_LETTER_MESSAGE: &str = "dead-letter";
/// Fixed identity of the example CloudEvents, so a saved document only changes with a contract.
const EXAMPLE_ID: &str = "0192a8f0-7c1e-7000-8000-0000000e0e01";
const EXAMPLE_TIME: &str = "2026-01-01T12:00:00Z";

type DeadLetterNaming = Arc<dyn Fn(&str) -> String + Send + Sync>;

/// What a service says about itself beyond its router: its name and version, its consumer group,
/// where its dead letters go, and the events it publishes.
///
/// ```
/// use serde::{Deserialize, Serialize};
/// use weir::schema::{AsyncApi, JsonSchema};
/// use weir::{Event, EventType};
///
/// #[derive(Clone, Serialize, Deserialize, JsonSchema)]
/// struct ResourceCreated {
///     resource_id: String,
/// }
///
/// impl Event for ResourceCreated {
///     const TYPE: EventType = EventType::new("resource.created");
///     const TOPIC: &'static str = "resources";
///     fn key(&self) -> String {
///         self.resource_id.clone()
///     }
///     weir::data_schema!();
/// }
///
/// let api = AsyncApi::new("Resources", "1.2.0")
///     .description("Stores files and derives what they need.")
///     .consumer_group("resources")
///     .publishes::<ResourceCreated>();
/// # let _ = api;
/// ```
#[derive(Clone)]
pub struct AsyncApi {
    title: String,
    version: String,
    description: Option<String>,
    group: String,
    source: String,
    dead_letter: DeadLetterNaming,
    publishes: Vec<EventDescriptor>,
}

impl std::fmt::Debug for AsyncApi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let published: Vec<&str> = self
            .publishes
            .iter()
            .map(|e| e.event_type.as_str())
            .collect();
        f.debug_struct("AsyncApi")
            .field("title", &self.title)
            .field("version", &self.version)
            .field("group", &self.group)
            .field("publishes", &published)
            .finish_non_exhaustive()
    }
}

impl AsyncApi {
    /// The service's title and the version of its API (not Weir's).
    pub fn new(title: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            title: title.into(),
            version: version.into(),
            description: None,
            group: "weir".to_owned(),
            source: "/weir".to_owned(),
            dead_letter: Arc::new(|topic| format!("{topic}.dlq")),
            publishes: Vec::new(),
        }
    }

    /// What the service does, for the document's `info`.
    pub fn description(mut self, description: impl Into<String>) -> Self {
        self.description = Some(description.into());
        self
    }

    /// The consumer group its handlers consume in (`ConsumerConfig::group_id`; default `weir`).
    pub fn consumer_group(mut self, group: impl Into<String>) -> Self {
        self.group = group.into();
        self
    }

    /// The CloudEvents `source` the examples show (default `/weir`, as `Envelope::new` sets).
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.source = source.into();
        self
    }

    /// The dead-letter topic of each consumed topic (`DeadLetterTopics::topic_for`; by default
    /// the topic's name with `.dlq` appended, as the bus does).
    pub fn dead_letter_topics(
        mut self,
        naming: impl Fn(&str) -> String + Send + Sync + 'static,
    ) -> Self {
        self.dead_letter = Arc::new(naming);
        self
    }

    /// Declares an event the service publishes on `T::TOPIC`: a `send` operation in the document.
    pub fn publishes<T: Event>(mut self) -> Self {
        self.publishes.push(EventDescriptor::of::<T>());
        self
    }
}

impl Router {
    /// The AsyncAPI 3.0 document of a service with this router: every registered event type on
    /// its topic, every handler as a `receive` operation, the dead-letter channels, and the
    /// events `api` says the service publishes.
    pub fn asyncapi(&self, api: &AsyncApi) -> Document {
        let mut topics: BTreeMap<&str, Topic> = BTreeMap::new();
        for (topic, _, route) in self.iter() {
            let entry = topics.entry(topic).or_default();
            entry
                .events
                .entry(route.event.event_type.as_str())
                .or_insert(route.event);
            for handler in &route.handlers {
                let types = entry.handlers.entry(handler.name.to_string()).or_default();
                types.push(route.event.event_type.as_str());
            }
        }
        for event in &api.publishes {
            let entry = topics.entry(event.topic).or_default();
            entry
                .events
                .entry(event.event_type.as_str())
                .or_insert(*event);
            entry.published.push(event.event_type.as_str());
        }
        build(api, &topics)
    }
}

/// What the document says about one topic.
#[derive(Default)]
struct Topic {
    events: BTreeMap<&'static str, EventDescriptor>,
    /// Handler name → the event types it handles here.
    handlers: BTreeMap<String, Vec<&'static str>>,
    published: Vec<&'static str>,
}

/// A channel id: the address with anything outside `[A-Za-z0-9_-]` as `-`.
fn channel_id(address: &str) -> String {
    address
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

fn build(api: &AsyncApi, topics: &BTreeMap<&str, Topic>) -> Document {
    // Draft 7 is what AsyncAPI's own schema format extends. Inline subschemas keep each data
    // schema whole (readable, and copyable as it is); only recursive types leave `$ref`s, which
    // point into `components.schemas` where their definitions go.
    let mut generator = SchemaSettings::draft07()
        .with(|s| {
            s.inline_subschemas = true;
            s.definitions_path = "/components/schemas".into();
            s.meta_schema = None;
        })
        .into_generator();
    let mut data_schemas = Map::new();
    let mut descriptors: BTreeMap<&str, &EventDescriptor> = BTreeMap::new();
    for topic in topics.values() {
        for (event_type, event) in &topic.events {
            if descriptors.insert(event_type, event).is_none() {
                let schema = (event.data_schema)(&mut generator)
                    .map(schemars::Schema::to_value)
                    .unwrap_or(Value::Bool(true));
                data_schemas.insert((*event_type).to_owned(), schema);
            }
        }
    }
    let mut schemas: Map<String, Value> = generator.take_definitions(true);
    schemas.extend(data_schemas);
    let root = json!({ "components": { "schemas": schemas } });

    let mut messages = Map::new();
    for (event_type, event) in &descriptors {
        messages.insert((*event_type).to_owned(), event_message(api, &root, event));
    }
    messages.insert(DEAD_LETTER_MESSAGE.to_owned(), dead_letter_message());

    let mut channels = Map::new();
    let mut operations = Map::new();
    for (address, topic) in topics {
        let id = channel_id(address);
        let channel_messages: Map<String, Value> = topic
            .events
            .keys()
            .map(|t| {
                (
                    (*t).to_owned(),
                    json!({ "$ref": format!("#/components/messages/{t}") }),
                )
            })
            .collect();
        channels.insert(
            id.clone(),
            json!({
                "address": address,
                "title": address,
                "messages": channel_messages,
                "bindings": { "kafka": { "topic": address, "bindingVersion": KAFKA_BINDING_VERSION } },
            }),
        );
        let refs = |types: &[&str]| -> Vec<Value> {
            types
                .iter()
                .map(|t| json!({ "$ref": format!("#/channels/{id}/messages/{t}") }))
                .collect()
        };
        for (handler, types) in &topic.handlers {
            operations.insert(
                format!("receive.{id}.{handler}"),
                json!({
                    "action": "receive",
                    "title": handler,
                    "summary": format!("Handler `{handler}`, in consumer group `{}`.", api.group),
                    "channel": { "$ref": format!("#/channels/{id}") },
                    "messages": refs(types),
                    "bindings": { "kafka": {
                        "groupId": { "type": "string", "enum": [api.group] },
                        "bindingVersion": KAFKA_BINDING_VERSION,
                    } },
                }),
            );
        }
        if !topic.published.is_empty() {
            operations.insert(
                format!("send.{id}"),
                json!({
                    "action": "send",
                    "summary": format!("The service publishes these events on `{address}`, keyed by entity."),
                    "channel": { "$ref": format!("#/channels/{id}") },
                    "messages": refs(&topic.published),
                }),
            );
        }
        if !topic.handlers.is_empty() {
            let dlq = (api.dead_letter)(address);
            let dlq_id = channel_id(&dlq);
            channels.insert(
                dlq_id.clone(),
                json!({
                    "address": dlq,
                    "title": dlq,
                    "description": format!(
                        "Dead letters of `{address}`: records consumer group `{}` gave up on, \
                         with their original key and value, and headers saying why.",
                        api.group
                    ),
                    "messages": { DEAD_LETTER_MESSAGE: { "$ref": format!("#/components/messages/{DEAD_LETTER_MESSAGE}") } },
                    "bindings": { "kafka": { "topic": dlq, "bindingVersion": KAFKA_BINDING_VERSION } },
                    "x-weir-dead-letter-of": address,
                }),
            );
            operations.insert(
                format!("dead-letter.{id}"),
                json!({
                    "action": "send",
                    "summary": format!("Records of `{address}` whose outcome is a failure."),
                    "channel": { "$ref": format!("#/channels/{dlq_id}") },
                    "messages": [ { "$ref": format!("#/channels/{dlq_id}/messages/{DEAD_LETTER_MESSAGE}") } ],
                }),
            );
        }
    }

    let mut info = json!({ "title": api.title, "version": api.version });
    if let Some(description) = &api.description {
        info["description"] = Value::from(description.as_str());
    }
    let Value::Object(mut root) = root else {
        unreachable!("built as an object above")
    };
    let mut components = root.remove("components").unwrap_or_default();
    components["messages"] = Value::Object(messages);
    Document(json!({
        "asyncapi": ASYNCAPI_VERSION,
        "info": info,
        "channels": channels,
        "operations": operations,
        "components": components,
    }))
}

/// The message of one event type: a structured-mode CloudEvent whose `data` is the contract.
fn event_message(api: &AsyncApi, root: &Value, event: &EventDescriptor) -> Value {
    let event_type = event.event_type.as_str();
    let data_ref = format!("#/components/schemas/{event_type}");
    let data_schema = root
        .pointer(&format!(
            "/components/schemas/{}",
            pointer_escape(event_type)
        ))
        .cloned()
        .unwrap_or(Value::Bool(true));
    let data = synthesize(root, &data_schema);
    let key = (event.key_of)(&data).ok();

    let mut dataschema = json!({
        "type": "string",
        "format": "uri",
        "description": "URI of the schema of `data`, when the producer declares one.",
    });
    if let Some(uri) = event.dataschema {
        dataschema["const"] = Value::from(uri);
    }
    let payload = json!({
        "type": "object",
        "description": "A CloudEvent 1.0 in structured mode: the envelope attributes, and the \
                        event itself in `data`.",
        "required": ["specversion", "id", "type", "source", "data"],
        "properties": {
            "specversion": { "type": "string", "const": SPEC_VERSION },
            "id": { "type": "string", "format": "uuid",
                    "description": "Unique id of this occurrence; consumers deduplicate on it." },
            "type": { "type": "string", "const": event_type },
            "source": { "type": "string", "description": "The producing service (a URI reference)." },
            "time": { "type": "string", "format": "date-time", "description": "When it happened." },
            "subject": { "type": "string", "description": "The id of the resource the event concerns." },
            "datacontenttype": { "type": "string", "description": "`application/json` (any JSON media type is accepted)." },
            "dataschema": dataschema,
            "data": { "$ref": data_ref },
        },
    });
    let mut example = json!({
        "specversion": SPEC_VERSION,
        "id": EXAMPLE_ID,
        "type": event_type,
        "source": api.source,
        "time": EXAMPLE_TIME,
    });
    if let Some(key) = &key {
        example["subject"] = Value::from(key.as_str());
    }
    example["datacontenttype"] = Value::from("application/json");
    if let Some(uri) = event.dataschema {
        example["dataschema"] = Value::from(uri);
    }
    example["data"] = data;

    let mut key_schema = json!({
        "type": "string",
        "description": "The entity the event is about: it picks the partition, so one entity's \
                        events are consumed in order.",
    });
    if let Some(key) = &key {
        key_schema["examples"] = json!([key]);
    }
    let mut message = json!({
        "name": event_type,
        "title": data_schema.get("title").cloned().unwrap_or_else(|| Value::from(event_type)),
        "contentType": CLOUDEVENTS_CONTENT_TYPE,
        "headers": publish_headers(),
        "payload": payload,
        "bindings": { "kafka": { "key": key_schema, "bindingVersion": KAFKA_BINDING_VERSION } },
        "examples": [ {
            "name": event_type,
            "headers": { "content-type": CLOUDEVENTS_CONTENT_TYPE },
            "payload": example,
        } ],
    });
    if let Some(description) = data_schema.get("description") {
        message["summary"] = description.clone();
    }
    if let Some(uri) = event.dataschema {
        message["description"] = Value::from(format!("`data` follows the schema at {uri}."));
    }
    message
}

/// The record headers a published event carries; the envelope itself is in the value.
fn publish_headers() -> Value {
    json!({
        "type": "object",
        "description": "Kafka record headers. Weir also reads binary-mode CloudEvents, whose \
                        attributes travel as `ce_*` headers with the bare `data` as the value.",
        "properties": {
            "content-type": { "type": "string", "const": CLOUDEVENTS_CONTENT_TYPE },
            "traceparent": { "type": "string", "description": "W3C trace context of the producer's span." },
            "tracestate": { "type": "string", "description": "W3C trace state, when there is one." },
        },
    })
}

/// The message of every dead-letter topic: the original bytes, and the provenance headers.
fn dead_letter_message() -> Value {
    let mut properties = Map::new();
    let mut required = Vec::new();
    for header in DEAD_LETTER_HEADERS {
        let mut schema = json!({ "type": "string", "description": header.description });
        if header.integer {
            schema["pattern"] = Value::from("^-?[0-9]+$");
        }
        properties.insert(header.name.to_owned(), schema);
        if header.always {
            required.push(Value::from(header.name));
        }
    }
    json!({
        "name": DEAD_LETTER_MESSAGE,
        "title": "Dead letter",
        "summary": "A record the consumer gave up on: its original key, value and headers, \
                    unchanged, plus `weir.*` headers saying where it came from and why.",
        "headers": {
            "type": "object",
            "required": required,
            "properties": properties,
            "description": "The original record's headers are kept alongside these.",
        },
        "payload": {
            "description": "The original record value, byte for byte. It may not be JSON: \
                            records that did not decode are dead-lettered too.",
        },
        "bindings": { "kafka": {
            "key": { "type": "string", "description": "The original record's key, unchanged." },
            "bindingVersion": KAFKA_BINDING_VERSION,
        } },
    })
}

/// Escapes a name for a JSON pointer segment.
fn pointer_escape(name: &str) -> String {
    name.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schema::JsonSchema;
    use crate::{Ctx, EventType};
    use serde::{Deserialize, Serialize};

    /// A contract that declares its schema URI.
    #[derive(Clone, Serialize, Deserialize, JsonSchema)]
    struct InvoiceSent {
        invoice_id: String,
    }

    impl Event for InvoiceSent {
        const TYPE: EventType = EventType::new("invoice.sent");
        const TOPIC: &'static str = "invoices";
        const DATASCHEMA: Option<&'static str> =
            Some("https://schemas.example.com/invoice.sent/1.json");
        crate::data_schema!();
        fn key(&self) -> String {
            self.invoice_id.clone()
        }
    }

    /// A contract without a schema.
    #[derive(Clone, Serialize, Deserialize)]
    struct Opaque {}

    impl Event for Opaque {
        const TYPE: EventType = EventType::new("opaque.seen");
        const TOPIC: &'static str = "invoices";
        fn key(&self) -> String {
            String::new()
        }
    }

    /// A recursive contract: schemars must leave a `$ref` for it.
    #[derive(Clone, Serialize, Deserialize, JsonSchema)]
    struct Folder {
        name: String,
        children: Vec<Folder>,
    }

    impl Event for Folder {
        const TYPE: EventType = EventType::new("folder.moved");
        const TOPIC: &'static str = "folders";
        crate::data_schema!();
        fn key(&self) -> String {
            self.name.clone()
        }
    }

    fn handled<T: Event>(router: Router) -> Router {
        let options = crate::HandlerOptions::new().name("record");
        router.on_with(|_: T, _: Ctx| async { Ok(()) }, options)
    }

    #[test]
    fn a_declared_dataschema_appears_in_the_message_and_the_standalone_schema() {
        let doc = handled::<InvoiceSent>(Router::new()).asyncapi(&AsyncApi::new("t", "1"));
        let uri = "https://schemas.example.com/invoice.sent/1.json";
        let message = &doc.as_value()["components"]["messages"]["invoice.sent"];
        assert_eq!(message["payload"]["properties"]["dataschema"]["const"], uri);
        assert_eq!(message["examples"][0]["payload"]["dataschema"], uri);
        let schema = doc.data_schema("invoice.sent").unwrap();
        assert_eq!(schema["$id"], uri);
        assert_eq!(schema["required"], json!(["invoice_id"]));
    }

    #[test]
    fn dead_letter_channels_follow_the_configured_naming_and_carry_the_provenance_headers() {
        let api = AsyncApi::new("t", "1")
            .consumer_group("billing")
            .dead_letter_topics(|topic| format!("dead.{topic}"));
        let doc = handled::<InvoiceSent>(Router::new()).asyncapi(&api);
        let doc = doc.as_value();
        let channel = &doc["channels"]["dead-invoices"];
        assert_eq!(channel["address"], "dead.invoices");
        assert_eq!(channel["x-weir-dead-letter-of"], "invoices");
        let headers = &doc["components"]["messages"][DEAD_LETTER_MESSAGE]["headers"];
        assert_eq!(headers["required"].as_array().unwrap().len(), 9);
        assert!(headers["properties"]["weir.original.timestamp"].is_object());
        assert!(!headers["required"]
            .as_array()
            .unwrap()
            .contains(&json!("weir.original.timestamp")));
        let receive = &doc["operations"]["receive.invoices.record"];
        assert_eq!(
            receive["bindings"]["kafka"]["groupId"]["enum"],
            json!(["billing"])
        );
    }

    #[test]
    fn a_published_only_topic_has_a_send_operation_and_no_dead_letters() {
        let doc = Router::new().asyncapi(&AsyncApi::new("t", "1").publishes::<InvoiceSent>());
        let doc = doc.as_value();
        assert_eq!(doc["operations"]["send.invoices"]["action"], "send");
        let channels: Vec<&String> = doc["channels"].as_object().unwrap().keys().collect();
        assert_eq!(channels, ["invoices"]);
    }

    #[test]
    fn an_event_without_a_schema_is_documented_as_any_json() {
        let doc = handled::<Opaque>(Router::new()).asyncapi(&AsyncApi::new("t", "1"));
        assert_eq!(
            doc.as_value()["components"]["schemas"]["opaque.seen"],
            json!(true)
        );
        assert_eq!(
            doc.data_schema("opaque.seen").unwrap(),
            json!({"$schema": "http://json-schema.org/draft-07/schema#"})
        );
    }

    #[test]
    fn a_recursive_contract_keeps_its_references_resolvable() {
        let doc = handled::<Folder>(Router::new()).asyncapi(&AsyncApi::new("t", "1"));
        let value = doc.as_value();
        let schema = &value["components"]["schemas"]["folder.moved"];
        let items = schema["properties"]["children"]["items"]["$ref"]
            .as_str()
            .unwrap();
        assert!(
            value.pointer(&items[1..]).is_some(),
            "{items} resolves in the document"
        );
        let standalone = doc.data_schema("folder.moved").unwrap();
        assert!(
            standalone.pointer(&items[1..]).is_some(),
            "{items} resolves standalone"
        );
        // The example stops at the recursion and still decodes.
        let example = &value["components"]["messages"]["folder.moved"]["examples"][0]["payload"];
        assert_eq!(example["subject"], "example");
    }
}
