//! A foreign producer: confluent-kafka in Python (`WEIR_TEST_PYTHON`), the client most services
//! that feed a Weir consumer would use, kept running for a test's whole stream.
//!
//! The test writes one record per line to the script's stdin and reads back where it landed.
//! Each record is flushed before the next is taken, so every record is its own batch: Tansu
//! skips the rest of a batch when a fetch starts inside it, and a test that checks per-key order
//! needs each key's offsets to follow its publish order.

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};
use weir::{Envelope, Event, CLOUDEVENTS_CONTENT_TYPE};

/// How to get a Python with confluent-kafka, for the message of a test that needs one.
pub const PYTHON_HELP: &str = "WEIR_TEST_PYTHON is not set: it must name a Python with \
     confluent-kafka 2.12.1 (scripts/test.sh creates .tmp/venv and sets it; or: python3 -m venv \
     .tmp/venv && .tmp/venv/bin/pip install confluent-kafka==2.12.1 && \
     export WEIR_TEST_PYTHON=$PWD/.tmp/venv/bin/python)";

/// The Python with confluent-kafka; panics with [`PYTHON_HELP`] without one.
pub fn python() -> String {
    std::env::var("WEIR_TEST_PYTHON").unwrap_or_else(|_| panic!("{PYTHON_HELP}"))
}

const SCRIPT: &str = r#"
import json, sys
from confluent_kafka import Producer

producer = Producer({"bootstrap.servers": sys.argv[1], "linger.ms": 0})
for line in sys.stdin:
    record = json.loads(line)
    answer = {}

    def report(err, msg):
        if err is not None:
            answer["error"] = str(err)
        else:
            answer.update(partition=msg.partition(), offset=msg.offset())

    producer.produce(record["topic"], key=record["key"].encode(),
                     value=record["value"].encode(),
                     headers=[(k, v.encode()) for k, v in record["headers"]],
                     on_delivery=report)
    producer.flush(30)
    if not answer:
        answer["error"] = "not delivered within 30 s"
    print(json.dumps(answer), flush=True)
"#;

#[derive(Serialize)]
struct Request<'a> {
    topic: &'a str,
    key: &'a str,
    value: &'a str,
    headers: Vec<(&'a str, &'a str)>,
}

#[derive(Deserialize)]
struct Answer {
    partition: Option<i32>,
    offset: Option<i64>,
    error: Option<String>,
}

/// Where a record landed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Landed {
    pub partition: i32,
    pub offset: i64,
}

/// The running Python producer; killed on drop.
pub struct ForeignProducer {
    child: Child,
    stdin: ChildStdin,
    answers: Lines<BufReader<ChildStdout>>,
}

impl ForeignProducer {
    /// Starts the producer for `brokers`. Panics without `WEIR_TEST_PYTHON`.
    pub fn start(brokers: &str) -> ForeignProducer {
        let python = python();
        let mut child = Command::new(&python)
            .args(["-c", SCRIPT, brokers])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot run {python}: {e}"));
        let stdin = child.stdin.take().expect("piped stdin");
        let answers = BufReader::new(child.stdout.take().expect("piped stdout")).lines();
        ForeignProducer {
            child,
            stdin,
            answers,
        }
    }

    /// Publishes `envelope` as a structured CloudEvent on its event's topic, keyed by its key,
    /// and waits for the broker's acknowledgement.
    pub async fn publish<E: Event>(&mut self, envelope: &Envelope<E>) -> Landed {
        let value = envelope.to_structured().expect("encode");
        let value = std::str::from_utf8(&value).expect("a structured CloudEvent is JSON text");
        let key = envelope.key();
        self.send(
            E::TOPIC,
            &key,
            value,
            &[("content-type", CLOUDEVENTS_CONTENT_TYPE)],
        )
        .await
    }

    /// Publishes one record and waits for the broker's acknowledgement.
    pub async fn send(
        &mut self,
        topic: &str,
        key: &str,
        value: &str,
        headers: &[(&str, &str)],
    ) -> Landed {
        let mut line = serde_json::to_vec(&Request {
            topic,
            key,
            value,
            headers: headers.to_vec(),
        })
        .expect("encode");
        line.push(b'\n');
        if let Err(e) = self.stdin.write_all(&line).await {
            panic!(
                "the Python producer is gone ({e}): {:?}",
                self.child.try_wait()
            );
        }
        let answer = self
            .answers
            .next_line()
            .await
            .expect("read the producer's answer")
            .unwrap_or_else(|| panic!("the Python producer exited: {:?}", self.child.try_wait()));
        let answer: Answer = serde_json::from_str(&answer)
            .unwrap_or_else(|e| panic!("the producer answered {answer:?}: {e}"));
        match answer {
            Answer {
                partition: Some(partition),
                offset: Some(offset),
                error: None,
            } => Landed { partition, offset },
            Answer { error, .. } => panic!("not delivered to {topic}: {error:?}"),
        }
    }
}
