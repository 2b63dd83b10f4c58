//! Offsets: at-least-once bookkeeping.
//!
//! Every consumed record is registered when it arrives ([`OffsetTracker::begin`]) and finished
//! once everything it produced (alert, dead letter, score) has been acknowledged by the broker
//! ([`OffsetTracker::finish`]). Work finishes out of order (batches infer in parallel, produce
//! acknowledgements arrive in any order), so per partition only the *contiguous prefix* of
//! finished offsets may be committed: the commit position is the lowest offset still in flight,
//! or one past the highest finished offset when nothing is in flight. A crash then replays the
//! unfinished records, never skips them.

use std::collections::{BTreeSet, HashMap};

/// A topic and partition number.
pub type Partition = (String, i32);
/// A Kafka offset.
pub type Offset = i64;

#[derive(Debug, Default)]
struct PartitionState {
    in_flight: BTreeSet<Offset>,
    /// Highest offset finished so far.
    highest_finished: Option<Offset>,
    /// One past the highest offset begun: where the next record is expected.
    front: Offset,
}

impl PartitionState {
    /// The offset to commit: the next record a restarted consumer must read.
    fn position(&self) -> Option<Offset> {
        match self.in_flight.first() {
            Some(&lowest) => Some(lowest),
            None => self.highest_finished.map(|h| h + 1),
        }
    }
}

/// Per-partition in-flight offsets of one consumer.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<Partition, PartitionState>,
}

impl OffsetTracker {
    pub fn new() -> OffsetTracker {
        OffsetTracker::default()
    }

    /// Registers a record as in flight.
    pub fn begin(&mut self, topic: &str, partition: i32, offset: Offset) {
        let p = self.entry(topic, partition);
        p.in_flight.insert(offset);
        p.front = p.front.max(offset + 1);
    }

    /// Marks a record as done: all its outputs are acknowledged.
    pub fn finish(&mut self, topic: &str, partition: i32, offset: Offset) {
        let p = self.entry(topic, partition);
        p.in_flight.remove(&offset);
        p.highest_finished = Some(p.highest_finished.map_or(offset, |h| h.max(offset)));
    }

    fn entry(&mut self, topic: &str, partition: i32) -> &mut PartitionState {
        self.partitions
            .entry((topic.to_string(), partition))
            .or_default()
    }

    /// The commit position of one partition, if any record of it has been seen.
    pub fn position(&self, topic: &str, partition: i32) -> Option<Offset> {
        self.partitions
            .get(&(topic.to_string(), partition))
            .and_then(PartitionState::position)
    }

    /// Per partition, one past the highest offset begun: once [`OffsetTracker::position`]
    /// reaches it, everything received before is finished.
    pub fn fronts(&self) -> Vec<(Partition, Offset)> {
        let mut out: Vec<_> = self
            .partitions
            .iter()
            .map(|(tp, s)| (tp.clone(), s.front))
            .collect();
        out.sort();
        out
    }

    /// Records in flight on the given partitions (all partitions if `None`).
    pub fn in_flight(&self, partitions: Option<&[Partition]>) -> usize {
        self.partitions
            .iter()
            .filter(|(tp, _)| partitions.is_none_or(|ps| ps.contains(tp)))
            .map(|(_, s)| s.in_flight.len())
            .sum()
    }

    /// Forgets partitions (revoked): their positions are no longer ours to commit.
    pub fn remove(&mut self, partitions: &[Partition]) {
        for tp in partitions {
            self.partitions.remove(tp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_contiguous_prefix_is_committable() {
        let mut t = OffsetTracker::new();
        for o in 10..15 {
            t.begin("in", 0, o);
        }
        assert_eq!(t.position("in", 0), Some(10));
        // 11, 13 and 14 finish before 10 and 12: nothing past 10 is safe yet.
        t.finish("in", 0, 11);
        t.finish("in", 0, 13);
        t.finish("in", 0, 14);
        assert_eq!(t.position("in", 0), Some(10));
        t.finish("in", 0, 10);
        assert_eq!(t.position("in", 0), Some(12));
        t.finish("in", 0, 12);
        assert_eq!(t.position("in", 0), Some(15));
        assert_eq!(t.in_flight(None), 0);
    }

    #[test]
    fn partitions_are_independent() {
        let mut t = OffsetTracker::new();
        t.begin("in", 0, 5);
        t.begin("in", 1, 7);
        t.finish("in", 1, 7);
        assert_eq!(
            (t.position("in", 0), t.position("in", 1)),
            (Some(5), Some(8))
        );
        assert_eq!(t.position("other", 0), None);
    }

    #[test]
    fn gaps_in_offsets_do_not_block_the_position() {
        // Compacted topics and transaction markers leave holes between offsets.
        let mut t = OffsetTracker::new();
        t.begin("in", 0, 3);
        t.begin("in", 0, 9);
        t.finish("in", 0, 9);
        assert_eq!(t.position("in", 0), Some(3));
        t.finish("in", 0, 3);
        assert_eq!(t.position("in", 0), Some(10));
    }

    #[test]
    fn the_front_is_past_everything_received_and_reached_once_it_is_finished() {
        let mut t = OffsetTracker::new();
        t.begin("in", 0, 4);
        t.begin("in", 0, 7);
        let front = t.fronts();
        assert_eq!(front, vec![(("in".into(), 0), 8)]);
        t.finish("in", 0, 7);
        assert!(t.position("in", 0) < Some(8));
        t.finish("in", 0, 4);
        assert_eq!(t.position("in", 0), Some(8));
    }

    #[test]
    fn in_flight_counts_and_removal() {
        let mut t = OffsetTracker::new();
        t.begin("a", 0, 1);
        t.begin("a", 1, 1);
        t.begin("a", 1, 2);
        let p1 = [("a".to_string(), 1)];
        assert_eq!(t.in_flight(Some(&p1)), 2);
        t.remove(&p1);
        assert_eq!(t.in_flight(None), 1);
        assert_eq!(t.position("a", 1), None);
    }
}
