//! The inbox's records: a consumer's [`Position`] in one partition, and the
//! [`Seen`] window of one producing store's event seqs.
//!
//! Both are values of reserved tables (bincode in the store's CRC value
//! frame, like every table value); field order is the format.
//!
//! | table | key | value |
//! |---|---|---|
//! | `outboxkv.inbox.positions` | (consumer, stream, partition) | [`Position`] |
//! | `outboxkv.inbox.seen` | (consumer, producing store id: 16 bytes) | [`Seen`] |
//! | `outboxkv.inbox.dead` | (consumer, stream, partition, position) | [`InboxDeadLetter`](super::InboxDeadLetter) |
//! | `outboxkv.inbox.filters` | (consumer, stream) | the JetStream filter subject the positions were kept with |
//! | `outboxkv.inbox.replay` | (consumer, stream, partition, position) | [`InboxDeadLetter`](super::InboxDeadLetter) queued for replay |

use serde::{Deserialize, Serialize};

use crate::Table;

/// A consumer's position in one partition: every position below `next` is
/// done (applied, skipped as a duplicate, or dead-lettered), and so is each
/// position in the ranges of `done`.
///
/// `done` holds what completed out of order (JetStream, with several
/// messages unacknowledged at once, or one being retried while later ones
/// are applied), as inclusive ranges `(first, last)`: ascending, disjoint,
/// never touching each other or `next` (a range that reaches `next` is
/// folded into it). A reader that knows that a stretch of positions holds
/// nothing for this consumer (a filtered JetStream consumer skips other
/// subjects' sequences) marks it done with the message after it, so a
/// message stuck in retries costs one range, not one entry per message
/// applied behind it: `done` holds about one range per unfinished position.
///
/// The one exception to "ranges never touch `next`": once every position
/// below `u64::MAX` is done, `next` stays `u64::MAX` and a done `u64::MAX`
/// is the range `(u64::MAX, u64::MAX)`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Position {
    /// Every position below this is done.
    pub next: u64,
    /// Done ranges above `next`, inclusive, ascending.
    pub done: Vec<(u64, u64)>,
}

impl Position {
    /// Whether `position` is done.
    pub fn contains(&self, position: u64) -> bool {
        if position < self.next {
            return true;
        }
        let at = self.done.partition_point(|&(_, last)| last < position);
        self.done
            .get(at)
            .is_some_and(|&(first, _)| first <= position)
    }

    /// Marks `position` done, and every position below `floor`.
    pub fn mark(&mut self, position: u64, floor: u64) {
        self.mark_range(position, position, floor);
    }

    /// Marks `first..=last` done, and every position below `floor`.
    pub fn mark_range(&mut self, first: u64, last: u64, floor: u64) {
        if floor > self.next {
            self.next = floor;
            let below = self.done.partition_point(|&(_, l)| l < floor);
            self.done.drain(..below);
        }
        if first <= last && last >= self.next {
            let first = first.max(self.next);
            // The ranges that overlap or touch `first..=last`.
            let from = self
                .done
                .partition_point(|&(_, l)| l.saturating_add(1) < first);
            let to = self
                .done
                .partition_point(|&(f, _)| f <= last.saturating_add(1));
            let mut merged = (first, last);
            if from < to {
                merged.0 = merged.0.min(self.done[from].0);
                merged.1 = merged.1.max(self.done[to - 1].1);
            }
            self.done.splice(from..to, [merged]);
        }
        // Fold the ranges that reach `next` into it.
        while let Some(&(f, l)) = self.done.first()
            && f <= self.next
        {
            if l == u64::MAX {
                self.next = u64::MAX;
                self.done = vec![(u64::MAX, u64::MAX)];
                break;
            }
            self.next = self.next.max(l + 1);
            self.done.remove(0);
        }
    }

    /// Whether a record is well-formed (read from disk: a bad one is
    /// reported as corruption, never trusted).
    pub(crate) fn valid(&self) -> bool {
        let at_end = self.next == u64::MAX && self.done == [(u64::MAX, u64::MAX)];
        let first_ok = self.done.first().is_none_or(|&(f, _)| f > self.next) || at_end;
        first_ok
            && self.done.iter().all(|&(f, l)| f <= l)
            && self
                .done
                .windows(2)
                .all(|w| w[0].1 < w[1].0 && w[1].0 - w[0].1 > 1)
    }
}

/// The seqs of one producing store a consumer has applied, within a window
/// below the highest: a ring of bits, bit `seq % window` for each seq in
/// `max - window + 1 ..= max`.
///
/// A seq at or below `max - window` is not known either way: it is applied
/// (the window is for the duplicates a producer's relay sends again after a
/// restart or past the broker's own deduplication, which are recent). The
/// window never makes the inbox drop a message it has not applied.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seen {
    /// The highest seq applied.
    pub max: u64,
    /// The window, in bits (a multiple of 64).
    pub window: u32,
    /// The ring.
    pub bits: Vec<u64>,
}

impl Seen {
    /// An empty window of `window` seqs (rounded up to a multiple of 64).
    pub fn new(window: u32) -> Seen {
        let words = window.div_ceil(64).max(1);
        Seen {
            max: 0,
            window: words * 64,
            bits: vec![0; words as usize],
        }
    }

    /// Whether a record is well-formed.
    pub(crate) fn valid(&self) -> bool {
        self.window > 0
            && self.window.is_multiple_of(64)
            && self.bits.len() as u64 * 64 == u64::from(self.window)
    }

    fn bit(&self, seq: u64) -> (usize, u64) {
        let i = seq % u64::from(self.window);
        ((i / 64) as usize, 1 << (i % 64))
    }

    /// Whether `seq` was applied: `Some(true)` yes, `Some(false)` no,
    /// `None` below the window (unknown).
    pub fn contains(&self, seq: u64) -> Option<bool> {
        if seq > self.max {
            return Some(false);
        }
        if self.max - seq >= u64::from(self.window) {
            return None;
        }
        let (w, b) = self.bit(seq);
        Some(self.bits.get(w).is_some_and(|x| x & b != 0))
    }

    /// Records `seq` as applied.
    pub fn insert(&mut self, seq: u64) {
        if seq > self.max {
            let gap = seq - self.max;
            if gap >= u64::from(self.window) {
                self.bits.iter_mut().for_each(|x| *x = 0);
            } else {
                for s in self.max + 1..=seq {
                    let (w, b) = self.bit(s);
                    if let Some(x) = self.bits.get_mut(w) {
                        *x &= !b;
                    }
                }
            }
            self.max = seq;
        } else if self.max - seq >= u64::from(self.window) {
            return;
        }
        let (w, b) = self.bit(seq);
        if let Some(x) = self.bits.get_mut(w) {
            *x |= b;
        }
    }
}

/// Positions, per (consumer, stream, partition).
pub(crate) const POSITIONS: Table<(String, String, u32), Position> =
    Table::reserved("outboxkv.inbox.positions");

/// The subject filter a JetStream durable was read with, per (consumer,
/// stream label): the positions' ranges hold that filter's gaps, so a
/// reader with another filter is refused.
pub(crate) const FILTERS: Table<(String, String), String> =
    Table::reserved("outboxkv.inbox.filters");

/// Producer windows, per (consumer, producing store id).
pub(crate) const SEEN: Table<(String, Vec<u8>), Seen> = Table::reserved("outboxkv.inbox.seen");

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use proptest::prelude::*;

    use super::*;

    proptest! {
        /// Against a set model: `contains` is exactly "marked, or below a
        /// floor given", in any order of marks and ranges.
        #[test]
        fn position_matches_a_set(ops in proptest::collection::vec((0u64..64, 0u64..64, 0u64..4), 0..200)) {
            let mut pos = Position::default();
            let mut model = BTreeSet::new();
            let mut floor = 0;
            for (p, f, width) in ops {
                let f = f.min(p);
                let first = p.saturating_sub(width);
                pos.mark_range(first, p, f);
                model.extend(first..=p);
                floor = floor.max(f);
                prop_assert!(pos.valid(), "{:?}", pos);
                for q in 0..70 {
                    prop_assert_eq!(pos.contains(q), q < floor || model.contains(&q), "q {}", q);
                }
                // Kept ranges lie above a gap, one range per run of the model.
                prop_assert!(pos.done.iter().all(|&(first, _)| first > pos.next));
                let runs = (pos.next..70)
                    .filter(|&q| model.contains(&q) && (q == pos.next || !model.contains(&(q - 1))))
                    .count();
                prop_assert_eq!(pos.done.len(), runs);
            }
        }

        /// Near `u64::MAX`: no overflow, and the record stays well-formed.
        #[test]
        fn position_near_the_top(ops in proptest::collection::vec((0u64..8, 0u64..3), 0..40)) {
            let mut pos = Position { next: u64::MAX - 6, done: Vec::new() };
            for (back, width) in ops {
                let p = u64::MAX - back;
                pos.mark_range(p.saturating_sub(width), p, 0);
                prop_assert!(pos.valid(), "{:?}", pos);
                prop_assert!(pos.contains(p));
            }
        }

        /// Against a set model: a seq inside the window is reported exactly;
        /// below it, unknown, never "applied" for a seq that was not.
        #[test]
        fn seen_never_claims_an_unseen_seq(seqs in proptest::collection::vec(1u64..400, 0..300)) {
            let mut seen = Seen::new(64);
            let mut model = BTreeSet::new();
            for s in seqs {
                seen.insert(s);
                model.insert(s);
                prop_assert!(seen.valid());
                let max = *model.iter().next_back().unwrap_or(&0);
                for q in 1..420 {
                    match seen.contains(q) {
                        Some(true) => prop_assert!(model.contains(&q), "q {}", q),
                        Some(false) => prop_assert!(!model.contains(&q), "q {}", q),
                        None => prop_assert!(max - q >= 64, "q {} max {}", q, max),
                    }
                }
            }
        }
    }
}
