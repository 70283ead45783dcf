//! Event contracts: what an event is, how it travels (CloudEvents), and how bytes become typed
//! events. Depends on nothing else in Weir, so producers in any service can share it.

pub(crate) mod dead_letter;
mod decode;
mod envelope;
mod event;
mod factory;
mod headers;
#[cfg(test)]
mod properties;

pub use decode::{DecodeError, DecodeLimits};
pub(crate) use envelope::{decode_envelope, decode_structured_as, RawEnvelope};
pub use envelope::{Envelope, EventMeta, CLOUDEVENTS_CONTENT_TYPE, SPEC_VERSION};
pub(crate) use event::EventDescriptor;
pub use event::{Event, EventType};
pub use factory::EventFactory;
pub use headers::Headers;
