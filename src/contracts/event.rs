use serde::{de::DeserializeOwned, Serialize};
use std::fmt;

/// The name of an event type, such as `task.created`.
///
/// A newtype over a `'static` string so call sites name types through constants
/// (`OrderPlaced::TYPE`) and a typo is a compile error rather than a silently unhandled event.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventType(&'static str);

impl EventType {
    /// Declares an event type. Use it in a `const`, once per contract.
    pub const fn new(name: &'static str) -> Self {
        Self(name)
    }

    /// The wire name, as carried in the CloudEvents `type` attribute.
    pub const fn as_str(&self) -> &'static str {
        self.0
    }
}

impl fmt::Display for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl fmt::Debug for EventType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventType({})", self.0)
    }
}

impl PartialEq<str> for EventType {
    fn eq(&self, other: &str) -> bool {
        self.0 == other
    }
}

/// A domain event contract: the payload that goes into a CloudEvent's `data`, plus where it goes.
///
/// The identity of one occurrence (its UUID and timestamp) lives in the [`Envelope`](crate::Envelope)
/// that carries it, not in the payload, so that republishing the same occurrence (from an outbox,
/// say) keeps its id, and the payload stays plain domain data.
///
/// Schema evolution: decoding ignores unknown fields, so adding an optional field is compatible in
/// both directions. A breaking change gets a new type name (`task.created.v2`) and, if you want
/// consumers to check it, a [`DATASCHEMA`](Event::DATASCHEMA).
pub trait Event: Serialize + DeserializeOwned + Clone + Send + Sync + 'static {
    /// The CloudEvents `type`, e.g. `task.created`.
    const TYPE: EventType;
    /// The default topic this event is published to and consumed from.
    const TOPIC: &'static str;
    /// Optional CloudEvents `dataschema` URI, for consumers that want to check the version.
    const DATASCHEMA: Option<&'static str> = None;

    /// The entity this event is about. It is the Kafka record key: it decides the partition,
    /// and so the order in which events of one entity are seen.
    fn key(&self) -> String;

    /// The id of the resource the event concerns, carried as the CloudEvents `subject`.
    /// Defaults to the key, which is right for every seed contract.
    fn resource_id(&self) -> String {
        self.key()
    }
}
