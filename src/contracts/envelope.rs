//! The CloudEvents 1.0 envelope, in the Kafka protocol binding's two modes.
//!
//! Weir publishes *structured* mode (the whole CloudEvent as one JSON value, content type
//! `application/cloudevents+json`) because it survives any tool that copies record values but
//! drops headers. It also reads *binary* mode (`ce_*` headers, the data as the record value),
//! which other CloudEvents SDKs emit by default.

use super::decode::{DecodeError, DecodeLimits};
use super::{Event, Headers};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use std::borrow::Cow;
use uuid::Uuid;

/// The CloudEvents spec version Weir writes and accepts.
pub const SPEC_VERSION: &str = "1.0";
/// Content type of a structured-mode record.
pub const CLOUDEVENTS_CONTENT_TYPE: &str = "application/cloudevents+json";
const DATA_CONTENT_TYPE: &str = "application/json";
const DEFAULT_SOURCE: &str = "/weir";

/// The identity and context of one event occurrence: the CloudEvents attributes besides `data`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EventMeta {
    /// Unique id of this occurrence. Consumers deduplicate on it (see the inbox).
    pub id: Uuid,
    /// The CloudEvents `type`.
    pub event_type: String,
    /// Who produced it (a URI reference, e.g. `/orders-api`).
    pub source: String,
    /// When it happened, if the producer said.
    pub time: Option<DateTime<Utc>>,
    /// What it is about: Weir puts the resource id here.
    pub subject: Option<String>,
    /// Schema of `data`, if the producer declared one.
    pub dataschema: Option<String>,
}

/// One event occurrence ready to publish: metadata plus the typed payload.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope<T> {
    /// CloudEvents attributes.
    pub meta: EventMeta,
    /// The payload.
    pub data: T,
}

impl<T: Event> Envelope<T> {
    /// Wraps an event with a fresh time-ordered UUID (v7) and the current time.
    pub fn new(data: T) -> Self {
        Self::with_id(Uuid::now_v7(), data)
    }

    /// Wraps an event with a known id, for republishing the same occurrence (outbox, replays).
    pub fn with_id(id: Uuid, data: T) -> Self {
        Self {
            meta: EventMeta {
                id,
                event_type: T::TYPE.as_str().to_owned(),
                source: DEFAULT_SOURCE.to_owned(),
                time: Some(Utc::now()),
                subject: Some(data.resource_id()),
                dataschema: T::DATASCHEMA.map(str::to_owned),
            },
            data,
        }
    }

    /// Sets the CloudEvents `source`, normally the producing service.
    pub fn source(mut self, source: impl Into<String>) -> Self {
        self.meta.source = source.into();
        self
    }

    /// The record key: the entity id, so one entity's events stay in one partition, in order.
    pub fn key(&self) -> String {
        self.data.key()
    }
}

impl<T: Serialize> Envelope<T> {
    /// The structured-mode record value (what Weir publishes).
    pub fn to_structured(&self) -> Result<Vec<u8>, serde_json::Error> {
        #[derive(Serialize)]
        struct Out<'a, T> {
            specversion: &'static str,
            id: Uuid,
            #[serde(rename = "type")]
            event_type: &'a str,
            source: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            time: Option<String>,
            #[serde(skip_serializing_if = "Option::is_none")]
            subject: Option<&'a str>,
            datacontenttype: &'static str,
            #[serde(skip_serializing_if = "Option::is_none")]
            dataschema: Option<&'a str>,
            data: &'a T,
        }
        serde_json::to_vec(&Out {
            specversion: SPEC_VERSION,
            id: self.meta.id,
            event_type: &self.meta.event_type,
            source: &self.meta.source,
            time: self.meta.time.map(format_time),
            subject: self.meta.subject.as_deref(),
            datacontenttype: DATA_CONTENT_TYPE,
            dataschema: self.meta.dataschema.as_deref(),
            data: &self.data,
        })
    }

    /// The binary-mode record: `ce_*` headers and the bare JSON data as the value.
    pub fn to_binary(&self) -> Result<(Headers, Vec<u8>), serde_json::Error> {
        let mut headers = Headers::new()
            .with("ce_specversion", SPEC_VERSION)
            .with("ce_id", self.meta.id.to_string())
            .with("ce_type", self.meta.event_type.as_str())
            .with("ce_source", self.meta.source.as_str())
            .with("content-type", DATA_CONTENT_TYPE);
        if let Some(time) = self.meta.time {
            headers.insert("ce_time", format_time(time));
        }
        if let Some(subject) = &self.meta.subject {
            headers.insert("ce_subject", subject.as_str());
        }
        if let Some(schema) = &self.meta.dataschema {
            headers.insert("ce_dataschema", schema.as_str());
        }
        Ok((headers, serde_json::to_vec(&self.data)?))
    }
}

fn format_time(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// A decoded envelope whose `data` is still raw JSON: enough to route on `type` before the
/// payload is decoded into the handler's type.
#[derive(Debug)]
pub(crate) struct RawEnvelope {
    pub(crate) meta: EventMeta,
    pub(crate) data: Box<RawValue>,
}

/// Parses either CloudEvents mode. Binary mode is recognised by its `ce_specversion` header.
pub(crate) fn decode_envelope(
    value: Option<&[u8]>,
    headers: &Headers,
    limits: &DecodeLimits,
) -> Result<RawEnvelope, DecodeError> {
    let bytes = value.unwrap_or_default();
    if bytes.is_empty() {
        return Err(DecodeError::Empty);
    }
    if bytes.len() > limits.max_bytes {
        return Err(DecodeError::TooLarge {
            size: bytes.len(),
            limit: limits.max_bytes,
        });
    }
    let text = std::str::from_utf8(bytes).map_err(|e| DecodeError::InvalidUtf8 {
        valid_up_to: e.valid_up_to(),
    })?;
    if headers.get("ce_specversion").is_some() {
        decode_binary(text, headers)
    } else {
        decode_structured(text)
    }
}

fn decode_structured(text: &str) -> Result<RawEnvelope, DecodeError> {
    #[derive(Deserialize)]
    struct In {
        specversion: String,
        id: String,
        #[serde(rename = "type")]
        event_type: String,
        source: String,
        time: Option<String>,
        subject: Option<String>,
        datacontenttype: Option<String>,
        dataschema: Option<String>,
        data: Option<Box<RawValue>>,
    }
    // Plain serde first: tracking the path of every field costs as much as the parse itself, and
    // only an error needs it. The retry names the field.
    let parsed: In = match serde_json::from_str(text) {
        Ok(parsed) => parsed,
        Err(error) => {
            let de = &mut serde_json::Deserializer::from_str(text);
            return Err(match serde_path_to_error::deserialize::<_, In>(de) {
                Err(e) => DecodeError::from_json(e),
                // The retry stops at the end of the value: it passes where plain serde failed
                // only on bytes after it, which make the record no JSON all the same.
                Ok(_) => DecodeError::NotJson {
                    detail: error.to_string(),
                },
            });
        }
    };
    check_spec_version(&parsed.specversion)?;
    if let Some(ct) = &parsed.datacontenttype {
        check_json_content_type(ct)?;
    }
    let data = parsed.data.ok_or_else(|| DecodeError::MissingField {
        field: "data".to_owned(),
    })?;
    Ok(RawEnvelope {
        meta: EventMeta {
            id: parse_id(&parsed.id)?,
            event_type: parsed.event_type,
            source: parsed.source,
            time: parsed.time.as_deref().map(parse_time).transpose()?,
            subject: parsed.subject,
            dataschema: parsed.dataschema,
        },
        data,
    })
}

/// The envelope and a `T` payload in one pass, for a structured-mode record of the one type its
/// topic carries. `None` whenever the record strays from that happy path in any way (binary
/// mode, a parse error, a bad attribute): the caller then decodes in two steps, which routes on
/// the type and names the precise error, so both paths agree on every outcome.
pub(crate) fn decode_structured_as<T: DeserializeOwned>(
    value: Option<&[u8]>,
    headers: &Headers,
    limits: &DecodeLimits,
) -> Option<(EventMeta, T)> {
    #[derive(Deserialize)]
    struct In<'a, T> {
        #[serde(borrow)]
        specversion: Cow<'a, str>,
        #[serde(borrow)]
        id: Cow<'a, str>,
        #[serde(rename = "type")]
        event_type: String,
        source: String,
        #[serde(borrow)]
        time: Option<Cow<'a, str>>,
        subject: Option<String>,
        #[serde(borrow)]
        datacontenttype: Option<Cow<'a, str>>,
        dataschema: Option<String>,
        data: Option<T>,
    }
    let bytes = value.filter(|b| !b.is_empty() && b.len() <= limits.max_bytes)?;
    if headers.get("ce_specversion").is_some() {
        return None;
    }
    let text = std::str::from_utf8(bytes).ok()?;
    let parsed: In<'_, T> = serde_json::from_str(text).ok()?;
    check_spec_version(&parsed.specversion).ok()?;
    if let Some(ct) = &parsed.datacontenttype {
        check_json_content_type(ct).ok()?;
    }
    let meta = EventMeta {
        id: parse_id(&parsed.id).ok()?,
        event_type: parsed.event_type,
        source: parsed.source,
        time: match parsed.time.as_deref() {
            Some(t) => Some(parse_time(t).ok()?),
            None => None,
        },
        subject: parsed.subject,
        dataschema: parsed.dataschema,
    };
    Some((meta, parsed.data?))
}

fn decode_binary(text: &str, headers: &Headers) -> Result<RawEnvelope, DecodeError> {
    let required = |name: &'static str| -> Result<String, DecodeError> {
        let raw = headers.get(name).ok_or_else(|| DecodeError::MissingField {
            field: name.to_owned(),
        })?;
        std::str::from_utf8(raw)
            .map(str::to_owned)
            .map_err(|_| DecodeError::InvalidField {
                field: name.to_owned(),
                detail: "header is not UTF-8".to_owned(),
            })
    };
    let optional = |name: &'static str| headers.get_str(name).map(str::to_owned);
    check_spec_version(&required("ce_specversion")?)?;
    if let Some(ct) = headers.get_str("content-type") {
        check_json_content_type(ct)?;
    }
    let data: Box<RawValue> = serde_json::from_str(text).map_err(|e| DecodeError::NotJson {
        detail: e.to_string(),
    })?;
    Ok(RawEnvelope {
        meta: EventMeta {
            id: parse_id(&required("ce_id")?)?,
            event_type: required("ce_type")?,
            source: required("ce_source")?,
            time: optional("ce_time").as_deref().map(parse_time).transpose()?,
            subject: optional("ce_subject"),
            dataschema: optional("ce_dataschema"),
        },
        data,
    })
}

fn check_spec_version(v: &str) -> Result<(), DecodeError> {
    if v == SPEC_VERSION {
        Ok(())
    } else {
        Err(DecodeError::InvalidField {
            field: "specversion".to_owned(),
            detail: format!("unsupported CloudEvents version {v:?}, expected {SPEC_VERSION:?}"),
        })
    }
}

fn check_json_content_type(ct: &str) -> Result<(), DecodeError> {
    // The type nearly every record carries, without splitting and trimming it first.
    if ct == DATA_CONTENT_TYPE {
        return Ok(());
    }
    let essence = ct.split(';').next().unwrap_or_default().trim();
    if essence == DATA_CONTENT_TYPE
        || essence == CLOUDEVENTS_CONTENT_TYPE
        || essence.ends_with("+json")
    {
        Ok(())
    } else {
        Err(DecodeError::InvalidField {
            field: "datacontenttype".to_owned(),
            detail: format!("{essence:?} is not JSON"),
        })
    }
}

fn parse_id(id: &str) -> Result<Uuid, DecodeError> {
    Uuid::parse_str(id).map_err(|e| DecodeError::InvalidField {
        field: "id".to_owned(),
        detail: format!("not a UUID: {e}"),
    })
}

fn parse_time(t: &str) -> Result<DateTime<Utc>, DecodeError> {
    DateTime::parse_from_rfc3339(t)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| DecodeError::InvalidField {
            field: "time".to_owned(),
            detail: format!("not an RFC 3339 timestamp: {e}"),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Event, EventFactory, EventType};
    use serde::{Deserialize, Serialize};

    /// A neutral event of the tests' own (the library's tests use no reference-service type).
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
    struct CustomerCreated {
        customer_id: String,
        details: serde_json::Value,
    }

    impl CustomerCreated {
        fn new(customer_id: &str, details: serde_json::Value) -> Self {
            Self {
                customer_id: customer_id.to_owned(),
                details,
            }
        }
    }

    impl Event for CustomerCreated {
        const TYPE: EventType = EventType::new("customer.created");
        const TOPIC: &'static str = "customer-events";
        fn key(&self) -> String {
            self.customer_id.clone()
        }
    }

    fn limits() -> DecodeLimits {
        DecodeLimits::default()
    }

    #[test]
    fn one_pass_decoding_agrees_with_the_two_step_path() {
        let event = CustomerCreated::new("c-1", serde_json::json!({"name": "Ada", "n": [1, 2]}));
        let bytes = Envelope::new(event.clone()).to_structured().unwrap();
        let headers = Headers::new();
        let (meta, data) =
            decode_structured_as::<CustomerCreated>(Some(&bytes), &headers, &limits()).unwrap();
        let two_step = EventFactory::<CustomerCreated>::new()
            .decode(Some(&bytes), &headers)
            .unwrap();
        assert_eq!(meta, two_step.meta);
        assert_eq!(data, two_step.data);
        assert_eq!(data, event);
    }

    #[test]
    fn one_pass_decoding_leaves_every_unusual_record_to_the_two_step_path() {
        let one_pass = |value: &[u8], headers: &Headers| {
            decode_structured_as::<CustomerCreated>(Some(value), headers, &limits()).is_some()
        };
        let good = r#"{"specversion":"1.0","id":"0190a0a0-0000-7000-8000-000000000000","type":"customer.created.v1","source":"/t","data":{"customer_id":"c","details":{}}}"#;
        assert!(one_pass(good.as_bytes(), &Headers::new()));
        let binary = Headers::new().with("ce_specversion", "1.0");
        assert!(!one_pass(good.as_bytes(), &binary), "binary mode");
        for bad in [
            good.replace(
                r#""data":{"customer_id":"c","details":{}}"#,
                r#""data":null"#,
            ),
            good.replace(r#""specversion":"1.0""#, r#""specversion":"0.3""#),
            good.replace("0190a0a0-0000-7000-8000-000000000000", "not-a-uuid"),
            good.replace(r#""customer_id":"c""#, r#""customer_id":7"#),
            good.replace(r#""source":"/t","#, r#""source":"/t","time":"yesterday","#),
            good.replace(
                r#""source":"/t","#,
                r#""source":"/t","datacontenttype":"text/xml","#,
            ),
            good[..good.len() - 1].to_owned(),
        ] {
            assert!(!one_pass(bad.as_bytes(), &Headers::new()), "{bad}");
        }
        assert!(
            decode_structured_as::<CustomerCreated>(None, &Headers::new(), &limits()).is_none()
        );
    }

    #[test]
    fn bytes_after_the_json_value_are_refused_on_both_paths() {
        let good = r#"{"specversion":"1.0","id":"0190a0a0-0000-7000-8000-000000000000","type":"customer.created","source":"/t","data":{"customer_id":"c","details":{}}}"#;
        for trailing in ["\0", " ,", "x", "{}"] {
            let value = format!("{good}{trailing}");
            let decoded = EventFactory::<CustomerCreated>::new()
                .decode(Some(value.as_bytes()), &Headers::new());
            assert!(
                matches!(&decoded, Err(DecodeError::NotJson { detail }) if detail.contains("trailing")),
                "{trailing:?}: {decoded:?}"
            );
            assert!(decode_structured_as::<CustomerCreated>(
                Some(value.as_bytes()),
                &Headers::new(),
                &limits()
            )
            .is_none());
        }
    }
}
