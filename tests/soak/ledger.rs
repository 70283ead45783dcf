//! The two histories the checker reads, both JSON lines appended while the soak runs: the
//! producer's log (one line per record the broker acknowledged) and the ledger (one line per
//! handler invocation that succeeded, written by the reference service's recorder before the
//! handler returns, so before its offset can be committed).
//!
//! Every process appends to one ledger file with one `write` per line on `O_APPEND`: the file's
//! order is the order the handlings finished in, across processes, which is what the order
//! check walks.

use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

/// One record the producer sent and the broker acknowledged. (Every field of the line is
/// parsed, so a change of format fails loudly; the checker reads only some.)
#[derive(Clone, Debug, Deserialize)]
#[allow(dead_code)]
pub(crate) struct Produced {
    /// The record's number in the stream.
    pub(crate) n: u64,
    /// The CloudEvent id (also set, but not readable, for undecodable records).
    pub(crate) id: String,
    /// The record key (a customer).
    pub(crate) key: String,
    /// The key's sequence number: 1, 2, 3... in the order the key's records were sent.
    pub(crate) seq: u64,
    /// The CloudEvent type.
    #[serde(rename = "type")]
    pub(crate) event_type: String,
    /// `ok`, `outage` (fails until its outage ends), `undecodable` or `permanent` (poison).
    pub(crate) kind: String,
    /// When `produce()` was called, Unix milliseconds.
    pub(crate) t: i64,
    /// Partition and offset the broker acknowledged.
    pub(crate) p: i32,
    pub(crate) o: i64,
}

impl Produced {
    /// Whether the record is in the poison set (must be dead-lettered, never handled).
    pub(crate) fn is_poison(&self) -> bool {
        self.kind == "undecodable" || self.kind == "permanent"
    }
}

/// One successful handler invocation (all fields parsed, as for [`Produced`]).
#[derive(Clone, Debug, Deserialize)]
#[allow(dead_code)]
pub(crate) struct Handling {
    pub(crate) event_id: String,
    pub(crate) event_type: String,
    pub(crate) handler: String,
    pub(crate) partition: i32,
    pub(crate) offset: i64,
    /// 1 for the first call of this delivery; retries in place and parked retries count up.
    pub(crate) attempt: u32,
    pub(crate) key: Option<String>,
    /// When the handler finished, Unix milliseconds.
    pub(crate) at_ms: i64,
    /// The process that handled it.
    pub(crate) pid: u32,
}

/// A JSON-lines file read incrementally: each [`refresh`](Self::refresh) parses what was
/// appended since the last one; a trailing line without its newline waits for the next.
pub(crate) struct Lines<T> {
    path: PathBuf,
    read: u64,
    partial: Vec<u8>,
    lines: Vec<T>,
    /// Lines that did not parse (a torn write would show here; must stay empty).
    pub(crate) garbled: Vec<String>,
}

impl<T: DeserializeOwned> Lines<T> {
    pub(crate) fn new(path: &Path) -> Self {
        Lines {
            path: path.to_owned(),
            read: 0,
            partial: Vec::new(),
            lines: Vec::new(),
            garbled: Vec::new(),
        }
    }

    /// Reads what was appended; the new lines.
    pub(crate) fn refresh(&mut self) -> &[T] {
        let before = self.lines.len();
        if let Ok(mut file) = File::open(&self.path) {
            if file.seek(SeekFrom::Start(self.read)).is_ok() {
                let mut bytes = Vec::new();
                if let Ok(n) = file.read_to_end(&mut bytes) {
                    self.read += n as u64;
                    self.partial.extend_from_slice(&bytes);
                }
            }
        }
        if let Some(end) = self.partial.iter().rposition(|b| *b == b'\n') {
            let complete: Vec<u8> = self.partial.drain(..=end).collect();
            for line in complete.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                match serde_json::from_slice::<T>(line) {
                    Ok(parsed) => self.lines.push(parsed),
                    Err(_) => self
                        .garbled
                        .push(String::from_utf8_lossy(line).into_owned()),
                }
            }
        }
        &self.lines[before..]
    }

    /// Every line read so far.
    pub(crate) fn all(&self) -> &[T] {
        &self.lines
    }
}
