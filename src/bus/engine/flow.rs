//! The flow's bookkeeping: how many records are in flight, each partition's share of
//! `max_in_flight`, how much of it the partitions hold, and which partitions the source was
//! told are open. The rule itself is in the engine's module doc; this keeps its counts in one
//! place, so that they change together and the source hears of each partition's change once.
//! It knows the source only as a [`Gate`], so it imports nothing of the engine's.

/// Where the flow's decisions go: the source, which takes an open partition's records whatever
/// the pool, and a closed one's only while the pool has room.
pub(super) trait Gate {
    type Key: ?Sized;
    fn set_open(&mut self, tp: &Self::Key, open: bool);
}

/// The engine's totals.
pub(super) struct Flow {
    max_in_flight: usize,
    /// Each partition's part of `max_in_flight`.
    share: usize,
    /// Sum over partitions of `max(in_flight, share)`: at most `max_in_flight`, so every
    /// partition can always reach its share.
    reserved: usize,
    /// Admitted and not final, over every partition.
    in_flight: usize,
}

/// One partition's counts.
pub(super) struct PartitionFlow {
    /// Admitted and not final: running, or waiting in a lane or for a slot.
    in_flight: usize,
    /// Whether the source was last told this partition is below its share.
    open: bool,
}

impl PartitionFlow {
    /// Its records admitted and not final.
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Nothing in flight, and open: sources start with every partition open.
    pub(super) fn new() -> Self {
        Self {
            in_flight: 0,
            open: true,
        }
    }
}

impl Flow {
    /// Before any partition is assigned, the whole limit is one share.
    pub(super) fn new(max_in_flight: usize) -> Self {
        Self {
            max_in_flight,
            share: max_in_flight,
            reserved: 0,
            in_flight: 0,
        }
    }

    /// Records admitted and not final, over every partition.
    #[inline]
    pub(super) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Whether records may be taken beyond the partitions' shares.
    #[inline]
    pub(super) fn pool_open(&self) -> bool {
        self.reserved < self.max_in_flight
    }

    /// A record of `tp` joins the flow: it counts against its partition's share and
    /// `max_in_flight` until it leaves ([`release`](Self::release)). A partition that reaches
    /// its share is closed at the source.
    #[inline]
    pub(super) fn count_in<G: Gate>(
        &mut self,
        part: &mut PartitionFlow,
        source: &mut G,
        tp: &G::Key,
    ) {
        part.in_flight += 1;
        let borrowed = part.in_flight > self.share;
        let close = part.open && part.in_flight >= self.share;
        if close {
            part.open = false;
        }
        if borrowed {
            self.reserved += 1;
        }
        if close {
            source.set_open(tp, false);
        }
        self.in_flight += 1;
    }

    /// `count` records of `tp` left the flow (finished, or dropped unstarted). A partition
    /// back below its share is opened at the source.
    #[inline]
    pub(super) fn release<G: Gate>(
        &mut self,
        part: &mut PartitionFlow,
        source: &mut G,
        tp: &G::Key,
        count: usize,
    ) {
        let before = part.in_flight;
        part.in_flight -= count;
        self.reserved -= before.max(self.share) - part.in_flight.max(self.share);
        self.in_flight -= count;
        if !part.open && part.in_flight < self.share {
            part.open = true;
            source.set_open(tp, true);
        }
    }

    /// A partition left the engine with its records (revoked). Partitions start open, so if it
    /// comes back the source must agree: it is reopened there. [`reshare`](Self::reshare)
    /// once the set of partitions has settled.
    pub(super) fn forget<G: Gate>(&mut self, part: &PartitionFlow, source: &mut G, tp: &G::Key) {
        self.in_flight -= part.in_flight;
        if !part.open {
            source.set_open(tp, true);
        }
    }

    /// Recomputes the shares after the set of partitions changed, and tells the source which
    /// partitions are below theirs.
    pub(super) fn reshare<'a, G: Gate>(
        &mut self,
        partitions: impl ExactSizeIterator<Item = (&'a G::Key, &'a mut PartitionFlow)>,
        source: &mut G,
    ) where
        G::Key: 'a,
    {
        self.share = (self.max_in_flight / partitions.len().max(1)).max(1);
        self.reserved = 0;
        for (tp, part) in partitions {
            self.reserved += part.in_flight.max(self.share);
            let open = part.in_flight < self.share;
            if open != part.open {
                part.open = open;
                source.set_open(tp, open);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records what the source is told, by partition number.
    #[derive(Default)]
    struct Gates(Vec<(i32, bool)>);

    impl Gate for Gates {
        type Key = i32;
        fn set_open(&mut self, tp: &i32, open: bool) {
            self.0.push((*tp, open));
        }
    }

    /// Two partitions sharing a limit of 5: a share of 2 each, and 1 left over in the pool.
    fn two_partitions() -> (Flow, [PartitionFlow; 2], Gates) {
        let mut flow = Flow::new(5);
        let mut parts = [PartitionFlow::new(), PartitionFlow::new()];
        let mut gates = Gates::default();
        let [p0, p1] = &mut parts;
        flow.reshare([(&0, p0), (&1, p1)].into_iter(), &mut gates);
        (flow, parts, gates)
    }

    #[test]
    fn a_partition_closes_at_its_share_and_reopens_below_it() {
        let (mut flow, [mut p0, _], mut gates) = two_partitions();
        flow.count_in(&mut p0, &mut gates, &0);
        assert!(gates.0.is_empty());
        flow.count_in(&mut p0, &mut gates, &0);
        assert_eq!(gates.0, [(0, false)]);
        flow.release(&mut p0, &mut gates, &0, 1);
        assert_eq!(gates.0, [(0, false), (0, true)]);
        assert_eq!(flow.in_flight(), 1);
    }

    #[test]
    fn a_partition_borrows_beyond_its_share_only_what_the_shares_leave() {
        let (mut flow, [mut p0, _], mut gates) = two_partitions();
        for _ in 0..2 {
            flow.count_in(&mut p0, &mut gates, &0);
        }
        assert!(flow.pool_open());
        flow.count_in(&mut p0, &mut gates, &0);
        // Partition 1's share stays free for it.
        assert!(!flow.pool_open());
        flow.release(&mut p0, &mut gates, &0, 1);
        assert!(flow.pool_open());
        flow.release(&mut p0, &mut gates, &0, 2);
        assert_eq!(flow.in_flight(), 0);
        assert_eq!(gates.0, [(0, false), (0, true)]);
    }

    #[test]
    fn a_new_partition_closes_one_over_its_new_share_and_a_forgotten_one_is_reopened() {
        let mut flow = Flow::new(4);
        let (mut p0, mut p1) = (PartitionFlow::new(), PartitionFlow::new());
        let mut gates = Gates::default();
        flow.reshare([(&0, &mut p0)].into_iter(), &mut gates);
        for _ in 0..3 {
            flow.count_in(&mut p0, &mut gates, &0);
        }
        assert!(gates.0.is_empty());
        flow.reshare([(&0, &mut p0), (&1, &mut p1)].into_iter(), &mut gates);
        assert_eq!(gates.0, [(0, false)]);
        assert!(!flow.pool_open());
        flow.forget(&p0, &mut gates, &0);
        assert_eq!(gates.0, [(0, false), (0, true)]);
        assert_eq!(flow.in_flight(), 0);
    }
}
