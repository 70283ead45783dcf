//! The fleet commands a process applied lately, for its status report: each acknowledged by id
//! in the next reports, until newer ones push it out of a bounded ring.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Acknowledgements a report lists at most: enough for an operator's action to be seen in the
/// next reports, small enough that a report stays a few kilobytes.
pub(crate) const KEPT: usize = 20;

/// One command as this process applied it (or refused it).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CommandAck {
    /// When the process applied it.
    pub at: chrono::DateTime<chrono::Utc>,
    /// The command's id; empty for a record too malformed to have one.
    pub id: String,
    /// Who issued it.
    pub issuer: String,
    /// `pause`, `resume`, `quiet`, `unquiet`; `unknown` for a rejected record.
    pub command: String,
    /// What it targets, as in its key: `topic|orders`, `quiet`.
    pub target: String,
    /// `applied`; `ignored` (nothing this process consumes is targeted); `rejected` (not a
    /// command this process reads); `failed` (the engine had stopped).
    pub result: String,
}

/// The ring; a lock taken once per command and once per report.
#[derive(Debug, Default)]
pub(crate) struct RecentCommands {
    ring: Mutex<VecDeque<CommandAck>>,
}

impl RecentCommands {
    /// Keeps an acknowledgement, dropping the oldest beyond [`KEPT`].
    pub(crate) fn push(&self, ack: CommandAck) {
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.len() == KEPT {
            ring.pop_front();
        }
        ring.push_back(ack);
    }

    /// The acknowledgements kept, oldest first.
    pub(crate) fn snapshot(&self) -> Vec<CommandAck> {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        ring.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_latest_acknowledgements_oldest_first() {
        let ring = RecentCommands::default();
        for n in 0..KEPT + 3 {
            ring.push(CommandAck {
                at: chrono::Utc::now(),
                id: n.to_string(),
                issuer: "tester".into(),
                command: "pause".into(),
                target: "topic|t".into(),
                result: "applied".into(),
            });
        }
        let ids: Vec<String> = ring.snapshot().into_iter().map(|a| a.id).collect();
        let expected: Vec<String> = (3..KEPT + 3).map(|n| n.to_string()).collect();
        assert_eq!(ids, expected);
    }
}
