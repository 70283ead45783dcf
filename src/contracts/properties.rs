//! Property tests of decoding: whatever bytes and headers a record carries, decoding returns
//! (never panics), and its answer is exact. A record is the one input a consumer cannot choose,
//! so every path from bytes to a typed event (the pre-parse limits, the structured and binary
//! CloudEvents parsers, the one-pass fast path) is fed arbitrary, mutated and JSON-shaped input
//! here, `CASES` cases per property per run.
//!
//! The properties:
//! - an absent or empty value is `Empty`, an oversized one `TooLarge`, one that is not UTF-8
//!   `InvalidUtf8` at the parser's own position, whatever the headers;
//! - a successful decode says what the record says: its id, type, source and data, read back
//!   independently through `serde_json::Value` (structured mode) or the `ce_*` headers
//!   (binary mode);
//! - the one-pass path (`decode_structured_as`), taken as the dispatcher takes it (for its
//!   route's type only), succeeds exactly when the two-step path does, with the same envelope;
//! - a valid record, in either mode, decodes to the event it was made from.
//!
//! Each property prints how many cases ran and how they ended, to stderr directly (not through
//! `eprintln!`, which the test harness captures), so the CI log shows the counts.

use super::envelope::{decode_envelope, decode_structured_as};
use super::{DecodeError, DecodeLimits, Envelope, Event, EventFactory, EventType, Headers};
use proptest::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::sync::Mutex;

/// Cases per property and run: enough to reach the rarer shapes (a valid id beside a broken
/// payload, a stray `ce_specversion` header) many times over, and a few seconds in debug.
const CASES: u32 = 100_000;

/// `CASES` cases, drawn with XorShift: the default ChaCha generator, unoptimized in a debug
/// build, took 80% of the run's time (100,000 cases: a minute instead of seconds).
fn config() -> ProptestConfig {
    ProptestConfig {
        rng_algorithm: proptest::test_runner::RngAlgorithm::XorShift,
        ..ProptestConfig::with_cases(CASES)
    }
}

/// A neutral event of the tests' own, with a typed field besides free JSON, so payload errors
/// name fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Probe {
    customer_id: String,
    n: u32,
    details: serde_json::Value,
}

impl Event for Probe {
    const TYPE: EventType = EventType::new("probe.created");
    const TOPIC: &'static str = "probes";
    fn key(&self) -> String {
        self.customer_id.clone()
    }
}

const ID: &str = "0190a0a0-0000-7000-8000-000000000000";

/// The limits of a case: a small one (so `TooLarge` is reached) or the default.
fn limits() -> impl Strategy<Value = DecodeLimits> {
    prop_oneof![1 => Just(64usize), 4 => Just(DecodeLimits::default().max_bytes)]
        .prop_map(|max_bytes| DecodeLimits { max_bytes })
}

/// Short strings of any characters. Short, because the decoders treat a long string as they
/// treat a short one, and generating long ones would spend the run's time on allocation.
fn text() -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..12).prop_map(String::from_iter)
}

/// Strings a decoder may meet in a CloudEvent attribute: the valid ones, near misses, and
/// anything.
fn attribute() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("1.0".to_owned()),
        Just("0.3".to_owned()),
        Just(ID.to_owned()),
        Just("not-a-uuid".to_owned()),
        Just(Probe::TYPE.as_str().to_owned()),
        Just("/source".to_owned()),
        Just("2026-01-02T03:04:05.123456Z".to_owned()),
        Just("yesterday".to_owned()),
        Just("application/json".to_owned()),
        Just("application/cloudevents+json; charset=utf-8".to_owned()),
        Just("text/xml".to_owned()),
        Just(String::new()),
        text(),
    ]
}

/// Any JSON value, a few levels deep.
fn json() -> impl Strategy<Value = serde_json::Value> {
    use serde_json::Value;
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u32>().prop_map(Value::from),
        attribute().prop_map(Value::String),
    ];
    leaf.prop_recursive(2, 8, 3, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Array),
            prop::collection::btree_map(
                prop_oneof![
                    Just("customer_id".to_owned()),
                    Just("n".to_owned()),
                    Just("details".to_owned()),
                    text()
                ],
                inner,
                0..4
            )
            .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A payload that is often a `Probe`, sometimes nearly one.
fn payload() -> impl Strategy<Value = serde_json::Value> {
    prop_oneof![
        (text(), any::<u32>(), json()).prop_map(|(customer_id, n, details)| {
            serde_json::json!({"customer_id": customer_id, "n": n, "details": details})
        }),
        json(),
    ]
}

/// A JSON object with some of a structured CloudEvent's members, each valid or not.
fn structured_shape() -> impl Strategy<Value = Vec<u8>> {
    let member = |name: &'static str| {
        prop::option::weighted(
            0.8,
            prop_oneof![
                3 => attribute().prop_map(serde_json::Value::String),
                1 => json(),
            ],
        )
        .prop_map(move |v| (name, v))
    };
    (
        (
            member("specversion"),
            member("id"),
            member("type"),
            member("source"),
        ),
        (
            member("time"),
            member("subject"),
            member("datacontenttype"),
            member("dataschema"),
        ),
        prop::option::weighted(0.9, payload()),
        any::<bool>(),
    )
        .prop_map(|((a, b, c, d), (e, f, g, h), data, trailing_garbage)| {
            let mut object = serde_json::Map::new();
            for (name, value) in [a, b, c, d, e, f, g, h] {
                if let Some(value) = value {
                    object.insert(name.to_owned(), value);
                }
            }
            if let Some(data) = data {
                object.insert("data".to_owned(), data);
            }
            let mut bytes = serde_json::to_vec(&object).expect("a map serializes");
            if trailing_garbage {
                bytes.extend_from_slice(b" ,");
            }
            bytes
        })
}

/// A valid structured record, then a few byte-level mutations of it.
fn mutated() -> impl Strategy<Value = Vec<u8>> {
    #[derive(Debug, Clone)]
    enum Mutation {
        Set(usize, u8),
        Remove(usize),
        Insert(usize, u8),
        Truncate(usize),
    }
    let mutation = prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Set(i, b)),
        any::<usize>().prop_map(Mutation::Remove),
        (any::<usize>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<usize>().prop_map(Mutation::Truncate),
    ];
    (valid_probe(), prop::collection::vec(mutation, 1..4)).prop_map(|(probe, mutations)| {
        let mut bytes = Envelope::with_id(ID.parse().expect("a UUID"), probe)
            .to_structured()
            .expect("serializes");
        for m in mutations {
            let len = bytes.len().max(1);
            match m {
                Mutation::Set(i, b) if !bytes.is_empty() => bytes[i % len] = b,
                Mutation::Remove(i) if !bytes.is_empty() => {
                    bytes.remove(i % len);
                }
                Mutation::Insert(i, b) => bytes.insert(i % (bytes.len() + 1), b),
                Mutation::Truncate(i) => bytes.truncate(i % len),
                _ => {}
            }
        }
        bytes
    })
}

/// A record value: absent, arbitrary bytes, a mutated valid record, or a JSON-shaped one.
fn value() -> impl Strategy<Value = Option<Vec<u8>>> {
    prop_oneof![
        1 => Just(None),
        3 => prop::collection::vec(any::<u8>(), 0..256).prop_map(Some),
        3 => mutated().prop_map(Some),
        4 => structured_shape().prop_map(Some),
        2 => payload().prop_map(|p| Some(serde_json::to_vec(&p).expect("serializes"))),
    ]
}

/// Record headers: mostly none, else a few `ce_*` ones (valid, near misses, or not UTF-8)
/// and strangers.
fn headers() -> impl Strategy<Value = Headers> {
    let name = prop_oneof![
        Just("ce_specversion".to_owned()),
        Just("ce_id".to_owned()),
        Just("ce_type".to_owned()),
        Just("ce_source".to_owned()),
        Just("ce_time".to_owned()),
        Just("ce_subject".to_owned()),
        Just("ce_dataschema".to_owned()),
        Just("content-type".to_owned()),
        text(),
    ];
    let value = prop_oneof![
        3 => attribute().prop_map(String::into_bytes),
        1 => prop::collection::vec(any::<u8>(), 0..16),
    ];
    prop_oneof![
        1 => Just(Headers::new()),
        2 => prop::collection::vec((name, value), 0..8).prop_map(|pairs| {
            let mut headers = Headers::new();
            for (name, value) in pairs {
                headers.insert(name, value);
            }
            headers
        }),
    ]
}

fn valid_probe() -> impl Strategy<Value = Probe> {
    (text(), any::<u32>(), json()).prop_map(|(customer_id, n, details)| Probe {
        customer_id,
        n,
        details,
    })
}

/// How the cases of one property ended, printed when it is done.
#[derive(Default)]
struct Tally(Mutex<BTreeMap<&'static str, u64>>);

impl Tally {
    fn count(&self, outcome: &'static str) {
        *self
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(outcome)
            .or_default() += 1;
    }

    fn print(&self, property: &str, started: std::time::Instant) -> u64 {
        let outcomes = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let total: u64 = outcomes.values().sum();
        // Straight to stderr: the harness captures `eprintln!` of a passing test.
        let _ = writeln!(
            std::io::stderr(),
            "{property}: {total} cases in {:.1?}, none panicked: {outcomes:?}",
            started.elapsed()
        );
        total
    }
}

/// What the record says, read back without Weir's decoder: structured mode through
/// `serde_json::Value`, binary mode from the headers. Only called on records Weir decoded.
fn assert_says(value: &[u8], headers: &Headers, decoded: &Envelope<Probe>) {
    assert_eq!(decoded.meta.event_type, Probe::TYPE.as_str());
    if headers.get("ce_specversion").is_some() {
        assert_eq!(headers.get_str("ce_specversion"), Some("1.0"));
        assert_eq!(
            headers.get_str("ce_id").map(|id| id.parse().ok()),
            Some(Some(decoded.meta.id))
        );
        assert_eq!(headers.get_str("ce_type"), Some(Probe::TYPE.as_str()));
        assert_eq!(
            headers.get_str("ce_source"),
            Some(decoded.meta.source.as_str())
        );
        let data: Probe = serde_json::from_slice(value).expect("the data is a Probe");
        assert_eq!(data, decoded.data);
    } else {
        let record: serde_json::Value = serde_json::from_slice(value).expect("the value is JSON");
        assert_eq!(record["specversion"], "1.0");
        assert_eq!(
            record["id"].as_str().map(|id| id.parse().ok()),
            Some(Some(decoded.meta.id))
        );
        assert_eq!(record["type"], Probe::TYPE.as_str());
        assert_eq!(record["source"], decoded.meta.source.as_str());
        let data = Probe::deserialize(&record["data"]).expect("the data is a Probe");
        assert_eq!(data, decoded.data);
    }
}

#[test]
fn decoding_any_record_answers_exactly_and_never_panics() {
    let tally = Tally::default();
    let started = std::time::Instant::now();
    let config = config();
    proptest!(config, |(value in value(), headers in headers(), limits in limits())| {
        let factory = EventFactory::<Probe>::with_limits(limits);
        let decoded = factory.decode(value.as_deref(), &headers);
        let bytes = value.as_deref().unwrap_or_default();
        if bytes.is_empty() {
            prop_assert_eq!(&decoded, &Err(DecodeError::Empty));
        } else if bytes.len() > limits.max_bytes {
            prop_assert_eq!(
                &decoded,
                &Err(DecodeError::TooLarge { size: bytes.len(), limit: limits.max_bytes })
            );
        } else if let Err(e) = std::str::from_utf8(bytes) {
            prop_assert_eq!(
                &decoded,
                &Err(DecodeError::InvalidUtf8 { valid_up_to: e.valid_up_to() })
            );
        }
        // The envelope alone: what the router decodes before it knows the handler.
        let raw = decode_envelope(value.as_deref(), &headers, &limits);
        match (&raw, &decoded) {
            (Err(envelope), Err(whole)) => prop_assert_eq!(envelope, whole),
            (Ok(raw), Err(DecodeError::UnknownEventType { event_type })) => {
                prop_assert_eq!(&raw.meta.event_type, event_type);
            }
            (Ok(raw), Err(_)) => prop_assert_eq!(raw.meta.event_type.as_str(), Probe::TYPE.as_str()),
            (Ok(_), Ok(_)) => {}
            (Err(e), Ok(_)) => prop_assert!(false, "the envelope failed ({}) but the event decoded", e),
        }
        // As the dispatcher takes it: only for the type of its route.
        let one_pass = decode_structured_as::<Probe>(value.as_deref(), &headers, &limits)
            .filter(|(meta, _)| meta.event_type == Probe::TYPE.as_str());
        let structured = headers.get("ce_specversion").is_none();
        match (&decoded, one_pass) {
            (Ok(envelope), Some((meta, data))) => {
                prop_assert_eq!(&envelope.meta, &meta);
                prop_assert_eq!(&envelope.data, &data);
            }
            (Ok(_), None) => prop_assert!(!structured, "the one-pass path refused what the two-step path decoded"),
            (Err(e), Some(_)) => prop_assert!(false, "the one-pass path decoded what the two-step path refused: {}", e),
            (Err(_), None) => {}
        }
        match &decoded {
            Ok(envelope) => {
                assert_says(bytes, &headers, envelope);
                tally.count(if structured { "ok_structured" } else { "ok_binary" });
            }
            Err(e) => {
                prop_assert!(!e.to_string().is_empty());
                tally.count(e.kind());
            }
        }
    });
    let total = tally.print("decoding_any_record", started);
    assert!(total >= u64::from(CASES), "{total} cases ran");
}

#[test]
fn a_valid_record_in_either_mode_decodes_to_its_event() {
    let tally = Tally::default();
    let started = std::time::Instant::now();
    let config = config();
    let content_type = prop_oneof![
        Just(None),
        Just(Some("application/json")),
        Just(Some("application/json; charset=utf-8")),
        Just(Some("application/vnd.probe+json")),
    ];
    // Any time an RFC 3339 timestamp can spell (years 0 to 9999), to the microsecond Weir
    // writes.
    let micros = -62_167_219_200_000_000i64..253_402_300_800_000_000;
    proptest!(config, |(
        probe in valid_probe(),
        source in text(),
        micros in micros,
        binary in any::<bool>(),
        content_type in content_type,
    )| {
        let mut envelope = Envelope::new(probe).source(source);
        envelope.meta.time = chrono::DateTime::from_timestamp_micros(micros);
        let (value, headers) = if binary {
            let (mut headers, value) = envelope.to_binary().expect("serializes");
            match content_type {
                Some(ct) => headers.set("content-type", ct),
                None => headers = headers_without(&headers, "content-type"),
            }
            (value, headers)
        } else {
            (envelope.to_structured().expect("serializes"), Headers::new())
        };
        let decoded = EventFactory::<Probe>::new()
            .decode(Some(&value), &headers)
            .map_err(|e| TestCaseError::fail(format!("{e}")))?;
        prop_assert_eq!(&decoded.meta, &envelope.meta);
        prop_assert_eq!(&decoded.data, &envelope.data);
        tally.count(if binary { "binary" } else { "structured" });
    });
    let total = tally.print("a_valid_record_decodes", started);
    assert!(total >= u64::from(CASES), "{total} cases ran");
}

fn headers_without(headers: &Headers, name: &str) -> Headers {
    let mut kept = Headers::new();
    for (n, v) in headers.iter().filter(|(n, _)| *n != name) {
        kept.insert(n, v);
    }
    kept
}
