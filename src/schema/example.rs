//! An example payload built from a data schema, so every message in a document shows what a
//! real one looks like without the contract's author writing one. An `examples` entry in the
//! schema (`#[schemars(example = ...)]`) wins; otherwise every property, optional ones too, gets
//! a plausible value of its type and format. The document builder checks each example with the
//! decoder, so an example is always one Weir accepts.

use super::compat::resolve;
use serde_json::{json, Map, Value};

/// Deep enough for any contract; past it, `null`.
const MAX_DEPTH: usize = 24;

/// An example value of `schema`, whose `$ref`s resolve in `root`.
pub(crate) fn synthesize(root: &Value, schema: &Value) -> Value {
    build(root, schema, &mut Vec::new())
}

/// The `$ref` a schema is, if it is one.
fn reference(schema: &Value) -> Option<&str> {
    schema.get("$ref").and_then(Value::as_str)
}

/// `path` holds the `$ref`s being expanded: a recursive type ends where it would repeat, as an
/// empty list or a `null` (what `Vec<Self>` and `Option<Box<Self>>` accept).
fn build(root: &Value, schema: &Value, path: &mut Vec<String>) -> Value {
    if path.len() > MAX_DEPTH {
        return Value::Null;
    }
    let Some(name) = reference(schema) else {
        return build_resolved(root, schema, path);
    };
    if path.iter().any(|p| p == name) {
        return Value::Null;
    }
    path.push(name.to_owned());
    let value = build_resolved(root, resolve(root, schema), path);
    path.pop();
    value
}

fn build_resolved(root: &Value, schema: &Value, path: &mut Vec<String>) -> Value {
    let Some(object) = schema.as_object() else {
        // `true` (any JSON value) or `false` (nothing): an empty object reads best.
        return json!({});
    };
    let first = |key: &str| object.get(key).and_then(Value::as_array)?.first().cloned();
    if let Some(example) = first("examples") {
        return example;
    }
    if let Some(value) = object.get("const").or_else(|| object.get("default")) {
        return value.clone();
    }
    if let Some(value) = first("enum") {
        return value;
    }
    for key in ["oneOf", "anyOf"] {
        if let Some(variants) = object.get(key).and_then(Value::as_array) {
            // The first variant that is not `null` (`Option<T>` shows a `T`), unless it would
            // repeat a type being expanded.
            let repeats = |v: &Value| reference(v).is_some_and(|r| path.iter().any(|p| p == r));
            let variant = variants
                .iter()
                .find(|v| resolve(root, v).get("type") != Some(&json!("null")) && !repeats(v))
                .or(variants.first());
            if let Some(variant) = variant {
                return build(root, variant, path);
            }
        }
    }
    if let Some(parts) = object.get("allOf").and_then(Value::as_array) {
        let mut merged = Map::new();
        for part in parts {
            if let Value::Object(fields) = build(root, part, path) {
                merged.extend(fields);
            }
        }
        return Value::Object(merged);
    }
    let ty = match object.get("type") {
        Some(Value::String(t)) => Some(t.as_str()),
        Some(Value::Array(types)) => types
            .iter()
            .filter_map(Value::as_str)
            .find(|t| *t != "null")
            .or(Some("null")),
        _ if object.contains_key("properties") => Some("object"),
        _ => None,
    };
    match ty {
        Some("object") => {
            let mut fields = Map::new();
            if let Some(properties) = object.get("properties").and_then(Value::as_object) {
                for (name, property) in properties {
                    fields.insert(name.clone(), build(root, property, path));
                }
            }
            Value::Object(fields)
        }
        Some("array") => match object.get("items") {
            Some(items)
                if !items.is_array()
                    && !reference(items).is_some_and(|r| path.iter().any(|p| p == r)) =>
            {
                json!([build(root, items, path)])
            }
            _ => json!([]),
        },
        Some("string") => Value::from(string_example(object.get("format").and_then(Value::as_str))),
        Some("integer") | Some("number") => object
            .get("minimum")
            .cloned()
            .filter(|m| m.as_f64().is_some_and(|m| m > 0.0))
            .unwrap_or(json!(1)),
        Some("boolean") => json!(false),
        Some("null") => Value::Null,
        _ => json!({}),
    }
}

fn string_example(format: Option<&str>) -> &'static str {
    match format {
        Some("uuid") => "0192a8f0-7c1e-7000-8000-00000000c0de",
        Some("date-time") => "2026-01-01T12:00:00Z",
        Some("date") => "2026-01-01",
        Some("time") => "12:00:00Z",
        Some("uri") | Some("uri-reference") => "https://example.com/",
        Some("email") => "someone@example.com",
        Some("hostname") => "example.com",
        Some("ipv4") => "192.0.2.1",
        Some("ipv6") => "2001:db8::1",
        _ => "example",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_example_fills_every_property_with_its_type_and_format() {
        let schema = json!({
            "type": "object",
            "required": ["id"],
            "properties": {
                "id": {"type": "string", "format": "uuid"},
                "count": {"type": ["integer", "null"], "minimum": 0},
                "kind": {"oneOf": [{"const": "api"}, {"const": "manual"}]},
                "tags": {"type": "array", "items": {"type": "string"}},
                "note": {"anyOf": [{"type": "null"}, {"$ref": "#/defs/Note"}]},
            }
        });
        let root = json!({"defs": {"Note": {"type": "object", "properties": {"text": {"type": "string"}}}}});
        assert_eq!(
            synthesize(&root, &schema),
            json!({
                "id": "0192a8f0-7c1e-7000-8000-00000000c0de",
                "count": 1,
                "kind": "api",
                "tags": ["example"],
                "note": {"text": "example"},
            })
        );
    }

    #[test]
    fn a_declared_example_wins() {
        let schema = json!({"type": "object", "examples": [{"a": 7}], "properties": {"a": {"type": "integer"}}});
        assert_eq!(synthesize(&json!({}), &schema), json!({"a": 7}));
    }
}
