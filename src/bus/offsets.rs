//! Per-partition offset tracking for at-least-once delivery with concurrency.
//!
//! Records of one partition may finish out of order (different keys run concurrently), but a
//! consumer group stores one position per partition. Like vector's per-partition finalizer, the
//! tracker only ever reports the highest *contiguous* completed offset: a record that has not
//! finished holds back the commit of everything after it, so a crash redelivers it (and at most
//! the in-flight window after it), and never skips it.

use std::collections::VecDeque;

/// Offsets of one partition in delivery order, each marked done or not.
#[derive(Debug, Default)]
pub(crate) struct OffsetTracker {
    pending: VecDeque<(i64, bool)>,
    /// The next offset to commit (last contiguous done + 1), once anything is done.
    committable: Option<i64>,
}

impl OffsetTracker {
    /// Records that `offset` was delivered. Offsets of a partition arrive increasing.
    pub(crate) fn begin(&mut self, offset: i64) {
        debug_assert!(self.pending.back().is_none_or(|(o, _)| *o < offset));
        self.pending.push_back((offset, false));
    }

    /// Marks `offset` done. Returns the new commit position if it advanced.
    pub(crate) fn complete(&mut self, offset: i64) -> Option<i64> {
        let i = self
            .pending
            .binary_search_by_key(&offset, |(o, _)| *o)
            .ok()?;
        self.pending[i].1 = true;
        let mut advanced = None;
        while let Some(&(o, true)) = self.pending.front() {
            self.pending.pop_front();
            advanced = Some(o + 1);
        }
        if advanced.is_some() {
            self.committable = advanced;
        }
        advanced
    }

    /// A record that began and finished at once (its handler returned in the engine's first
    /// call). Returns the new committable position if it advanced: it does unless earlier
    /// offsets are still pending, as [`complete`](Self::complete) would have.
    pub(crate) fn passed(&mut self, offset: i64) -> Option<i64> {
        if self.pending.is_empty() {
            self.committable = Some(offset + 1);
            return self.committable;
        }
        self.begin(offset);
        self.complete(offset)
    }

    /// The position to commit, if any record has completed.
    pub(crate) fn committable(&self) -> Option<i64> {
        self.committable
    }

    /// Records delivered and not yet done (or done but behind an unfinished one).
    #[cfg(test)]
    pub(crate) fn outstanding(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_only_the_highest_contiguous_completed_offset() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.begin(o);
        }
        assert_eq!(t.complete(12), None);
        assert_eq!(t.complete(11), None);
        assert_eq!(t.committable(), None);
        assert_eq!(t.complete(10), Some(13));
        assert_eq!(t.complete(14), None);
        assert_eq!(t.committable(), Some(13));
        assert_eq!(t.complete(13), Some(15));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn a_record_passed_at_once_commits_only_behind_the_pending_ones() {
        let mut t = OffsetTracker::default();
        assert_eq!(t.passed(3), Some(4));
        t.begin(4);
        assert_eq!(t.passed(5), None);
        assert_eq!(t.committable(), Some(4));
        assert_eq!(t.complete(4), Some(6));
        assert_eq!(t.passed(6), Some(7));
        assert_eq!(t.outstanding(), 0);
    }

    #[test]
    fn tolerates_gaps_in_offsets() {
        let mut t = OffsetTracker::default();
        t.begin(5);
        t.begin(9);
        assert_eq!(t.complete(9), None);
        assert_eq!(t.complete(5), Some(10));
    }

    #[test]
    fn ignores_unknown_offsets() {
        let mut t = OffsetTracker::default();
        t.begin(1);
        assert_eq!(t.complete(7), None);
        assert_eq!(t.committable(), None);
    }

    #[test]
    fn random_completion_orders_commit_exactly_the_contiguous_prefix() {
        for seed in 0..200 {
            let mut rng = fastrand::Rng::with_seed(seed);
            let mut t = OffsetTracker::default();
            let n = rng.usize(1..50) as i64;
            for o in 0..n {
                t.begin(o);
            }
            let mut order: Vec<i64> = (0..n).collect();
            rng.shuffle(&mut order);
            let mut done = vec![false; n as usize];
            for o in order {
                done[o as usize] = true;
                t.complete(o);
                let prefix = done.iter().take_while(|d| **d).count() as i64;
                let expected = (prefix > 0).then_some(prefix);
                assert_eq!(t.committable(), expected, "seed {seed}");
            }
        }
    }
}
