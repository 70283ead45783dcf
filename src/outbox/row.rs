//! The row format shared by the writer and the relay: record headers as a JSON object.
//!
//! An object of strings is what a service in any language can write with plain SQL
//! (`'{"content-type": "application/cloudevents+json"}'`). It cannot repeat a header name or
//! carry binary values; Weir's own headers need neither.

use crate::contracts::Headers;
use serde_json::{Map, Value};

/// Headers as the `headers` column stores them. A repeated name keeps its last value (the one a
/// later writer meant, as [`Headers::get`] reads it).
pub(crate) fn headers_to_json(headers: &Headers) -> Result<Value, String> {
    let mut map = Map::new();
    for (name, value) in headers.iter() {
        let text = std::str::from_utf8(value)
            .map_err(|_| format!("header `{name}` is not UTF-8 and cannot be stored"))?;
        map.insert(name.to_owned(), Value::String(text.to_owned()));
    }
    Ok(Value::Object(map))
}

/// The `headers` column as record headers. String values go as they are; other JSON values
/// (a foreign writer's number or boolean) as their JSON text; `null` drops the header.
pub(crate) fn headers_from_json(value: &Value) -> Result<Headers, String> {
    let Value::Object(map) = value else {
        return Err(format!("headers must be a JSON object, not {value}"));
    };
    Ok(map
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(name, v)| match v {
            Value::String(s) => (name.clone(), s.clone().into_bytes()),
            other => (name.clone(), other.to_string().into_bytes()),
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn headers_survive_the_round_trip_through_the_column() {
        let headers = Headers::new()
            .with("content-type", "application/cloudevents+json")
            .with(
                "traceparent",
                "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            );
        let stored = headers_to_json(&headers).unwrap();
        assert_eq!(headers_from_json(&stored).unwrap(), headers);
    }

    #[test]
    fn foreign_values_that_are_not_strings_are_published_as_json_text() {
        let headers = headers_from_json(&json!({"n": 3, "b": true, "gone": null})).unwrap();
        assert_eq!(headers.get_str("n"), Some("3"));
        assert_eq!(headers.get_str("b"), Some("true"));
        assert_eq!(headers.get("gone"), None);
    }

    #[test]
    fn headers_that_are_not_an_object_are_refused() {
        assert!(headers_from_json(&json!(["content-type", "x"])).is_err());
    }

    #[test]
    fn a_binary_header_is_refused_rather_than_mangled() {
        let headers = Headers::new().with("bin", vec![0xff, 0xfe]);
        assert!(headers_to_json(&headers).is_err());
    }
}
