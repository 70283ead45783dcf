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

    /// The JSON Schema of the payload, for the contract documents (`weir::schema`). The default,
    /// `None`, documents the payload as any JSON value. With `#[derive(schemars::JsonSchema)]` on
    /// the type, the line `weir::data_schema!();` in its `impl Event` gives the real one.
    #[cfg(feature = "schema")]
    fn data_schema(generator: &mut schemars::SchemaGenerator) -> Option<schemars::Schema> {
        let _ = generator;
        None
    }
}

/// Implements [`Event::data_schema`] from the type's `schemars::JsonSchema`: one line in an
/// `impl Event`, so a contract's schema is derived from the Rust type and cannot drift from it.
///
/// Without the `schema` feature it expands to nothing, so contracts compile either way. It names
/// schemars through the crate's hidden `__private` re-export, not through `weir::schema`, so
/// `contracts` does not depend on the `schema` module that sits above it.
#[cfg(feature = "schema")]
#[macro_export]
macro_rules! data_schema {
    () => {
        fn data_schema(
            generator: &mut $crate::__private::schemars::SchemaGenerator,
        ) -> ::core::option::Option<$crate::__private::schemars::Schema> {
            ::core::option::Option::Some(generator.subschema_for::<Self>())
        }
    };
}

/// Implements [`Event`]'s schema method when the `schema` feature is on; nothing without it.
#[cfg(not(feature = "schema"))]
#[macro_export]
macro_rules! data_schema {
    () => {};
}

/// What Weir knows about an event type without a value of it: kept by the `Router` for each
/// registered type (and by the schema builder for each published one), so a contract document
/// can be built from a router without the user listing types again.
#[derive(Clone, Copy)]
#[cfg_attr(not(feature = "schema"), allow(dead_code))]
pub(crate) struct EventDescriptor {
    pub(crate) event_type: EventType,
    pub(crate) topic: &'static str,
    pub(crate) dataschema: Option<&'static str>,
    pub(crate) rust_type: &'static str,
    /// [`Event::data_schema`] of the type.
    #[cfg(feature = "schema")]
    pub(crate) data_schema: fn(&mut schemars::SchemaGenerator) -> Option<schemars::Schema>,
    /// Decodes a JSON payload as the type (the decoder's own rules) and returns its key: checks
    /// that a document's example is one the decoder accepts, and gives the example's key.
    #[cfg(feature = "schema")]
    pub(crate) key_of: fn(&serde_json::Value) -> Result<String, String>,
}

impl EventDescriptor {
    pub(crate) fn of<T: Event>() -> Self {
        Self {
            event_type: T::TYPE,
            topic: T::TOPIC,
            dataschema: T::DATASCHEMA,
            rust_type: std::any::type_name::<T>(),
            #[cfg(feature = "schema")]
            data_schema: T::data_schema,
            #[cfg(feature = "schema")]
            key_of: |value| {
                let text = value.to_string();
                serde_json::from_str::<T>(&text)
                    .map(|event| event.key())
                    .map_err(|e| e.to_string())
            },
        }
    }
}
