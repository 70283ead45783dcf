//! `weir schema`: the reference service's contract document, as other teams and CI use it.
//!
//! - the document lists every seed event on its topic, and the dead-letter channels;
//! - it validates with the official AsyncAPI parser (node, `@asyncapi/parser`);
//! - each data schema agrees with the decoder on real encoded events, with a JSON Schema
//!   validator (Python `jsonschema`): what the decoder rejects, the schema rejects;
//! - `weir schema check` passes against the saved document and names each breaking change
//!   against an edited copy of it.

mod reference;

use crate::reference::{
    CustomerCreated, CustomerDeleted, CustomerUpdated, ResourceCreated, ResourceDeleted,
    ResourceUpdated, TaskCreated, TaskFields, TaskProcessingRequested, TriggeredBy,
};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use uuid::Uuid;
use weir::{DecodeError, Envelope, Event, EventFactory, Headers};

fn weir(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_weir"))
        .args(args)
        .env_remove("WEIR_CONFIG")
        .output()
        .expect("run weir")
}

fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

fn document() -> Value {
    let output = weir(&["schema", "asyncapi", "--format", "json"]);
    assert!(output.status.success(), "{output:?}");
    serde_json::from_slice(&output.stdout).expect("the document is JSON")
}

fn saved_document() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("contracts/asyncapi.yaml")
}

fn resolve<'a>(doc: &'a Value, value: &'a Value) -> &'a Value {
    match value.get("$ref").and_then(Value::as_str) {
        Some(r) => doc.pointer(&r[1..]).expect("the $ref resolves"),
        None => value,
    }
}

#[test]
fn the_document_lists_every_seed_event_on_its_topic_and_the_dead_letter_channels() {
    let doc = document();
    assert_eq!(doc["asyncapi"], "3.0.0");
    let mut topics: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut dead_letters = Vec::new();
    for channel in doc["channels"].as_object().unwrap().values() {
        let address = channel["address"].as_str().unwrap().to_owned();
        let names: Vec<String> = channel["messages"]
            .as_object()
            .unwrap()
            .values()
            .map(|m| resolve(&doc, m)["name"].as_str().unwrap().to_owned())
            .collect();
        if channel.get("x-weir-dead-letter-of").is_some() {
            assert_eq!(names, ["dead-letter"]);
            dead_letters.push(address);
        } else {
            assert_eq!(channel["bindings"]["kafka"]["topic"], address.as_str());
            topics.insert(address, names);
        }
    }
    assert_eq!(
        topics,
        BTreeMap::from([
            (
                "customer-events".to_owned(),
                vec![
                    "customer.created".into(),
                    "customer.deleted".into(),
                    "customer.updated".into()
                ]
            ),
            (
                "resource-events".to_owned(),
                vec![
                    "resource.created".into(),
                    "resource.deleted".into(),
                    "resource.updated".into()
                ]
            ),
            (
                "task-events".to_owned(),
                vec!["task.created".into(), "task.processing_requested".into()]
            ),
        ])
    );
    assert_eq!(
        dead_letters,
        [
            "customer-events.dlq",
            "resource-events.dlq",
            "task-events.dlq"
        ]
    );

    // Dead letters carry the provenance headers.
    let dead_letter = &doc["components"]["messages"]["dead-letter"];
    let headers = dead_letter["headers"]["properties"].as_object().unwrap();
    use weir::dead_letter_headers as h;
    for name in [
        h::ORIGINAL_TOPIC,
        h::ORIGINAL_PARTITION,
        h::ORIGINAL_OFFSET,
        h::ORIGINAL_TIMESTAMP,
        h::CONSUMER_GROUP,
        h::ERROR_KIND,
        h::ERROR_REASON,
        h::ERROR_MESSAGE,
        h::ATTEMPTS,
        h::HANDLER,
    ] {
        assert!(headers.contains_key(name), "{name} is documented");
    }

    // Each event message: CloudEvents content type, the type as its name, the envelope in the
    // payload with `data` pointing at the contract's schema, the key in the Kafka binding.
    let messages = doc["components"]["messages"].as_object().unwrap();
    for (id, message) in messages.iter().filter(|(id, _)| *id != "dead-letter") {
        assert_eq!(message["name"], id.as_str());
        assert_eq!(message["contentType"], "application/cloudevents+json");
        assert_eq!(
            message["payload"]["properties"]["type"]["const"],
            id.as_str()
        );
        assert_eq!(
            message["payload"]["properties"]["data"]["$ref"],
            format!("#/components/schemas/{id}")
        );
        let data = &doc["components"]["schemas"][id];
        for attribute in ["specversion", "id", "source", "subject", "time"] {
            assert!(
                data["properties"].get(attribute).is_none(),
                "{id}: envelope kept out of data"
            );
        }
        assert_eq!(message["bindings"]["kafka"]["key"]["type"], "string");
    }

    // Handlers are receive operations in the configured group; published events are sends.
    let operations = doc["operations"].as_object().unwrap();
    let receive = &operations["receive.task-events.process_task"];
    assert_eq!(receive["action"], "receive");
    assert_eq!(
        receive["bindings"]["kafka"]["groupId"]["enum"],
        json!(["weir-reference"])
    );
    assert_eq!(receive["messages"].as_array().unwrap().len(), 2);
    assert_eq!(operations["send.resource-events"]["action"], "send");
    assert!(
        operations.get("send.customer-events").is_none(),
        "customers are not published"
    );
}

#[test]
fn every_example_in_the_document_decodes_into_its_type() {
    fn decodes<T: Event>(example: &Value) -> Result<(), DecodeError> {
        let bytes = serde_json::to_vec(example).unwrap();
        EventFactory::<T>::new()
            .decode(Some(&bytes), &Headers::new())
            .map(|_| ())
    }
    let doc = document();
    let messages = doc["components"]["messages"].as_object().unwrap();
    let mut checked = 0;
    for (id, message) in messages.iter().filter(|(id, _)| *id != "dead-letter") {
        let example = &message["examples"][0]["payload"];
        let result = match id.as_str() {
            "task.created" => decodes::<TaskCreated>(example),
            "task.processing_requested" => decodes::<TaskProcessingRequested>(example),
            "customer.created" => decodes::<CustomerCreated>(example),
            "customer.updated" => decodes::<CustomerUpdated>(example),
            "customer.deleted" => decodes::<CustomerDeleted>(example),
            "resource.created" => decodes::<ResourceCreated>(example),
            "resource.updated" => decodes::<ResourceUpdated>(example),
            "resource.deleted" => decodes::<ResourceDeleted>(example),
            other => panic!("unexpected message {other}"),
        };
        assert_eq!(result, Ok(()), "{id}: {example}");
        assert!(
            example["subject"].is_string(),
            "{id}: the example has its key"
        );
        checked += 1;
    }
    assert_eq!(checked, 8);
}

#[test]
fn the_document_validates_with_the_official_asyncapi_parser() {
    let node_path = std::env::var("WEIR_TEST_ASYNCAPI_NODE_PATH").unwrap_or_else(|_| {
        panic!(
            "WEIR_TEST_ASYNCAPI_NODE_PATH is not set: it must name a node_modules directory with \
             @asyncapi/parser (scripts/test.sh installs it in .tmp/asyncapi and sets it)"
        )
    });
    let dir = std::env::temp_dir().join(format!("weir-asyncapi-{}", Uuid::new_v4()));
    std::fs::create_dir_all(&dir).unwrap();
    let yaml = dir.join("asyncapi.yaml");
    let output = weir(&["schema", "asyncapi"]);
    assert!(output.status.success(), "{output:?}");
    std::fs::write(&yaml, &output.stdout).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/validate-asyncapi.mjs");
    let output = Command::new("node")
        .arg(&script)
        .arg(&yaml)
        .arg(saved_document())
        .env("NODE_PATH", &node_path)
        .output()
        .expect("run node");
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        output.status.success(),
        "{}{}",
        stdout(&output),
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(
        stdout(&output)
            .matches("valid AsyncAPI 3.0.0 (6 channels, 9 messages)")
            .count(),
        2
    );
}

/// Validates instances against schemas with Python's `jsonschema` (draft 7, as declared).
const VALIDATE: &str = r#"
import json, sys
import jsonschema
cases = json.load(sys.stdin)
out = []
for case in cases:
    cls = jsonschema.validators.validator_for(case["schema"])
    cls.check_schema(case["schema"])
    out.append(cls(case["schema"]).is_valid(case["instance"]))
json.dump(out, sys.stdout)
"#;

struct Case {
    name: String,
    event_type: &'static str,
    instance: Value,
    decoder_accepts: bool,
}

/// The real encoded event, and edits of it: each top-level field removed, each replaced by a
/// value of another type. The decoder's verdict is recorded for each.
fn cases<T: Event>(event: T) -> Vec<Case> {
    let bytes = Envelope::new(event).to_structured().unwrap();
    let record: Value = serde_json::from_slice(&bytes).unwrap();
    let data = record["data"].clone();
    let decode = |data: &Value| {
        let mut record = record.clone();
        record["data"] = data.clone();
        let bytes = serde_json::to_vec(&record).unwrap();
        EventFactory::<T>::new().decode(Some(&bytes), &Headers::new())
    };
    let mut cases = vec![Case {
        name: format!("{} as encoded", T::TYPE),
        event_type: T::TYPE.as_str(),
        decoder_accepts: decode(&data).is_ok(),
        instance: data.clone(),
    }];
    for field in data.as_object().unwrap().keys() {
        let mut without = data.clone();
        without.as_object_mut().unwrap().remove(field);
        let verdict = decode(&without);
        if let Err(e) = &verdict {
            assert_eq!(e.kind(), "missing_field", "{e}");
        }
        cases.push(Case {
            name: format!("{} without {field}", T::TYPE),
            event_type: T::TYPE.as_str(),
            decoder_accepts: verdict.is_ok(),
            instance: without,
        });
        let mut retyped = data.clone();
        retyped[field] = json!(12345);
        cases.push(Case {
            name: format!("{} with a number as {field}", T::TYPE),
            event_type: T::TYPE.as_str(),
            decoder_accepts: decode(&retyped).is_ok(),
            instance: retyped,
        });
    }
    cases
}

#[test]
fn each_data_schema_agrees_with_the_decoder_on_real_encoded_events() {
    let python = std::env::var("WEIR_TEST_PYTHON").unwrap_or_else(|_| {
        panic!(
            "WEIR_TEST_PYTHON is not set: it must name a Python with jsonschema \
             (scripts/test.sh creates .tmp/venv and sets it)"
        )
    });
    let fields = TaskFields::new(
        Uuid::new_v4(),
        "tenant-1",
        "production",
        "file:///data/contacts.csv",
        "contact",
        TriggeredBy::Webhook,
    );
    let resource = ResourceCreated::new(Uuid::new_v4(), "ab/cd.png", "image/png", "cat.png");
    let changes = BTreeMap::from([("original_name".to_owned(), json!("dog.png"))]);
    let details = json!({"name": "Ada", "tier": 2});
    let all: Vec<Case> = [
        cases(TaskCreated::new(fields.clone())),
        cases(TaskProcessingRequested::new(fields)),
        cases(CustomerCreated::new("c-1", details.clone())),
        cases(CustomerUpdated::new("c-1", details.clone())),
        cases(CustomerDeleted::new("c-1", details)),
        cases(resource.clone()),
        cases(resource.updated(changes)),
        cases(resource.deleted()),
    ]
    .into_iter()
    .flatten()
    .collect();

    let mut schemas: BTreeMap<&str, Value> = BTreeMap::new();
    for case in &all {
        schemas.entry(case.event_type).or_insert_with(|| {
            let output = weir(&["schema", "json", "--type", case.event_type]);
            assert!(output.status.success(), "{output:?}");
            serde_json::from_slice(&output.stdout).unwrap()
        });
    }
    let input: Vec<Value> = all
        .iter()
        .map(|c| json!({"schema": schemas[c.event_type], "instance": c.instance}))
        .collect();
    let mut child = Command::new(&python)
        .args(["-c", VALIDATE])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(&input).unwrap())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let verdicts: Vec<bool> = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(verdicts.len(), all.len());

    let disagreements: Vec<String> = all
        .iter()
        .zip(&verdicts)
        .filter(|(case, schema_accepts)| case.decoder_accepts != **schema_accepts)
        .map(|(case, schema_accepts)| {
            format!(
                "{}: decoder accepts {}, schema accepts {schema_accepts}",
                case.name, case.decoder_accepts
            )
        })
        .collect();
    assert_eq!(disagreements, Vec::<String>::new());
    // The edits did exercise both verdicts: real events pass, missing fields fail.
    let rejected_missing = all
        .iter()
        .filter(|c| c.name.contains(" without ") && !c.decoder_accepts)
        .count();
    assert!(
        rejected_missing >= 30,
        "{rejected_missing} missing-field rejections"
    );
    assert!(all
        .iter()
        .filter(|c| c.name.ends_with("as encoded"))
        .all(|c| c.decoder_accepts));
    // `details` of customer.deleted is `#[serde(default)]`: both accept it missing.
    assert!(all
        .iter()
        .any(|c| c.name == "customer.deleted without details" && c.decoder_accepts));
}

#[test]
fn check_passes_against_the_saved_document() {
    let saved = saved_document();
    let output = weir(&["schema", "check", "--baseline", saved.to_str().unwrap()]);
    assert!(output.status.success(), "{output:?}");
    assert!(
        stdout(&output).starts_with("compatible with"),
        "{}",
        stdout(&output)
    );
}

#[test]
fn check_fails_and_names_each_breaking_change_against_an_edited_baseline() {
    let text = std::fs::read_to_string(saved_document()).unwrap();
    let mut doc: Value = serde_norway::from_str(&text).unwrap();
    // The baseline had a trigger the contract no longer accepts ...
    doc.pointer_mut("/components/schemas/task.created/properties/triggered_by/oneOf")
        .unwrap()
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "string", "const": "email"}));
    // ... a required field the contract dropped ...
    let resource = doc
        .pointer_mut("/components/schemas/resource.created")
        .unwrap();
    resource["properties"]["size_bytes"] = json!({"type": "integer"});
    resource["required"]
        .as_array_mut()
        .unwrap()
        .push(json!("size_bytes"));
    // ... a field that was optional ...
    doc.pointer_mut("/components/schemas/customer.created/required")
        .unwrap()
        .as_array_mut()
        .unwrap()
        .retain(|f| f != "details");
    // ... and a whole topic.
    let mut audit = doc["channels"]["task-events"].clone();
    audit["address"] = json!("audit-events");
    doc["channels"]["audit-events"] = audit;

    let path = std::env::temp_dir().join(format!("weir-baseline-{}.yaml", Uuid::new_v4()));
    std::fs::write(&path, serde_norway::to_string(&doc).unwrap()).unwrap();
    let output = weir(&["schema", "check", "--baseline", path.to_str().unwrap()]);
    std::fs::remove_file(&path).ok();
    assert!(!output.status.success(), "{output:?}");
    let printed = stdout(&output);
    let breaking: Vec<&str> = printed
        .lines()
        .filter(|l| l.starts_with("breaking "))
        .collect();
    assert_eq!(
        breaking,
        [
            "breaking removed_topic: audit-events: the topic is no longer in the contracts",
            "breaking became_required: customer-events customer.created data.details: was optional, is required: records without it are rejected",
            "breaking removed_required_field: resource-events resource.created data.size_bytes: a required field is gone: consumers that require it reject new records",
            "breaking narrowed_enum: task-events task.created data.triggered_by: no longer accepts \"email\"",
        ],
        "{printed}"
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("4 breaking change(s)"), "{stderr}");
}
