//! The last few handler errors of a process, for its status report: a bounded ring written when
//! a handler fails (never on a record's success path), read when a report is built.

use std::collections::VecDeque;
use std::sync::Mutex;

/// Errors a report lists at most: enough to see what is failing, small enough that a report
/// stays a few kilobytes.
pub(crate) const KEPT: usize = 10;

/// Characters of an error's message kept: handler errors can quote whatever they like, and a
/// report must stay bounded.
const MESSAGE_CHARS: usize = 500;

/// One handler error: which event, which route, what kind, what it said. Never the record's
/// bytes, which may hold personal data the status topic must not carry.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ErrorEntry {
    /// When the error was recorded.
    pub at: chrono::DateTime<chrono::Utc>,
    /// The CloudEvents id of the record's event.
    pub event_id: String,
    /// The topic of the record.
    pub topic: String,
    /// The handler's name (the route pauses and breakers name).
    pub route: String,
    /// What became of the record: `retried`, `dead_lettered`, `skipped` or `parked`.
    pub kind: String,
    /// The handler's error, cut to 500 characters.
    pub message: String,
}

/// The ring itself; a lock taken once per failed handler call and once per report.
#[derive(Debug, Default)]
pub(crate) struct RecentErrors {
    ring: Mutex<(VecDeque<ErrorEntry>, u64)>,
}

impl RecentErrors {
    /// Keeps an error, dropping the oldest beyond [`KEPT`].
    pub(crate) fn push(
        &self,
        event_id: &dyn std::fmt::Display,
        topic: &str,
        route: &str,
        kind: &str,
        message: &dyn std::fmt::Display,
    ) {
        let mut message = message.to_string();
        if let Some((cut, _)) = message.char_indices().nth(MESSAGE_CHARS) {
            message.truncate(cut);
        }
        let entry = ErrorEntry {
            at: chrono::Utc::now(),
            event_id: event_id.to_string(),
            topic: topic.to_owned(),
            route: route.to_owned(),
            kind: kind.to_owned(),
            message,
        };
        let mut ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        if ring.0.len() == KEPT {
            ring.0.pop_front();
        }
        ring.0.push_back(entry);
        ring.1 += 1;
    }

    /// The errors kept, oldest first, and how many were recorded in all (more than listed when
    /// older ones were dropped).
    pub(crate) fn snapshot(&self) -> (Vec<ErrorEntry>, u64) {
        let ring = self.ring.lock().unwrap_or_else(|e| e.into_inner());
        (ring.0.iter().cloned().collect(), ring.1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_only_the_latest_errors_with_their_messages_cut() {
        let errors = RecentErrors::default();
        for i in 0..(KEPT + 3) {
            errors.push(&i, "t", "on_t", "retried", &"x".repeat(MESSAGE_CHARS * 2));
        }
        let (kept, total) = errors.snapshot();
        assert_eq!(kept.len(), KEPT);
        assert_eq!(total, (KEPT + 3) as u64);
        assert_eq!(kept[0].event_id, "3");
        assert_eq!(kept[0].message.len(), MESSAGE_CHARS);
    }
}
