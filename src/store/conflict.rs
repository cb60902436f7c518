//! The conflict index: what optimistic concurrency control validates against.
//!
//! A transaction that reads with `get_for_update` registers as a *reader*
//! with the version its snapshot shows (every commit ordered at or below it
//! is in the snapshot). When it commits, each key it read must not have been
//! written by a commit ordered after that version; the index maps each
//! written key (by hash) to the version of the last ordered commit that
//! wrote it, so validation is one lookup per read.
//!
//! # The invariant
//!
//! The index holds the write record `(key, v)` of every ordered commit with
//! version `v > floor`, where
//!
//! ```text
//! floor <= min(oldest registered reader's snapshot version, visible version)
//! ```
//!
//! and `visible version` is the highest version written to RocksDB (all
//! versions at or below it are written: groups are written in order).
//! Both bounds matter:
//!
//! - a registered reader must see every commit ordered after its snapshot,
//!   whether or not that commit is written yet;
//! - a reader that registers *later* takes the visible version as its
//!   snapshot, so commits that are ordered but not yet written (a group the
//!   leader has taken from the queue and is writing right now) are not in
//!   its snapshot and must stay in the index, even when no reader is
//!   registered at all. Trimming "everything, since nobody reads" while a
//!   taken group was unwritten is the lost-update bug this module fixes.
//!
//! Records leave only from the old end, in version order ([`ConflictIndex::trim`]),
//! so trimming costs what it removes. A reader whose registration is gone
//! (released, or expired by the limits below) cannot validate:
//! [`ConflictIndex::validate`] then says [`Verdict::Expired`], never "no
//! conflict".
//!
//! # Limits
//!
//! An open reader holds `floor` down, so a transaction left open (held
//! across an `.await`, forgotten) would make the index grow without bound.
//! Readers older than `max_age`, and the oldest readers while the index
//! holds more than `max_records` records, are expired: their commits fail
//! with [`Error::TransactionExpired`](crate::Error::TransactionExpired).

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::invariant::invariant;
use std::time::{Duration, Instant};

/// Why an expired reader was expired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ExpiredBy {
    /// Open longer than the age limit.
    Age,
    /// The index held more records than its limit while it was the oldest.
    Size,
}

/// A registered reader, as the transaction keeps it.
#[derive(Debug)]
pub(crate) struct Ticket {
    id: u64,
    /// The snapshot version.
    pub(crate) start: u64,
    pub(crate) since: Instant,
}

#[derive(Debug, Clone, Copy)]
struct Reader {
    start: u64,
    since: Instant,
}

/// Outcome of a failed validation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The read at this index of the reads was written after the snapshot.
    Conflict(usize),
    /// The reader's registration is gone: it cannot be validated.
    Expired(ExpiredBy),
}

/// Limits on what open readers may hold (see the module docs).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub(crate) max_age: Duration,
    pub(crate) max_records: usize,
}

/// Counters for [`crate::TransactionStats`].
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Stats {
    pub(crate) readers: usize,
    pub(crate) oldest: Option<Instant>,
    pub(crate) records: usize,
    pub(crate) expired: u64,
}

pub(crate) struct ConflictIndex {
    /// Key hash → version of the last ordered commit that wrote it.
    latest: HashMap<u64, u64>,
    /// `(version, key hash)` of every record held, oldest first.
    log: VecDeque<(u64, u64)>,
    /// Registered readers by id; ids and snapshot versions both grow with
    /// registration order, so the first is the oldest and has the lowest
    /// snapshot.
    readers: BTreeMap<u64, Reader>,
    /// Readers expired, by id, until their transaction ends (bounded: an
    /// entry is removed on release, and at most `EXPIRED_KEPT` are kept):
    /// why, and since when they are open (for the stats).
    expired: BTreeMap<u64, (ExpiredBy, Instant)>,
    expired_total: u64,
    next_id: u64,
    /// Every record with a version above this is held.
    floor: u64,
    limits: Limits,
}

/// Expired registrations remembered for their reason; older ones report
/// [`ExpiredBy::Age`] when they finally commit.
const EXPIRED_KEPT: usize = 4096;

impl ConflictIndex {
    pub(crate) fn new(limits: Limits) -> Self {
        ConflictIndex {
            latest: HashMap::new(),
            log: VecDeque::new(),
            readers: BTreeMap::new(),
            expired: BTreeMap::new(),
            expired_total: 0,
            next_id: 0,
            floor: 0,
            limits,
        }
    }

    /// Registers a reader whose snapshot shows every version up to
    /// `visible` (the caller takes the snapshot after this call).
    pub(crate) fn register(&mut self, visible: u64, now: Instant) -> Ticket {
        invariant!(
            self.floor <= visible,
            "INV-CONFLICT: floor above the visible version"
        );
        invariant!(
            self.readers
                .last_key_value()
                .is_none_or(|(_, r)| r.start <= visible),
            "INV-CONFLICT: snapshot versions must grow with registration order"
        );
        let id = self.next_id;
        self.next_id += 1;
        self.readers.insert(
            id,
            Reader {
                start: visible,
                since: now,
            },
        );
        Ticket {
            id,
            start: visible,
            since: now,
        }
    }

    /// Unregisters a reader (its transaction ended). Releasing an expired
    /// reader only forgets why it expired.
    pub(crate) fn release(&mut self, ticket: &Ticket) {
        if self.readers.remove(&ticket.id).is_none() {
            self.expired.remove(&ticket.id);
        }
    }

    /// Checks `reads` (key hashes) of the reader `ticket`: `Ok` when none was
    /// written by a commit ordered after its snapshot.
    pub(crate) fn validate(
        &self,
        ticket: &Ticket,
        reads: impl Iterator<Item = u64>,
    ) -> Result<(), Verdict> {
        if !self.readers.contains_key(&ticket.id) {
            let by = self
                .expired
                .get(&ticket.id)
                .map_or(ExpiredBy::Age, |&(by, _)| by);
            return Err(Verdict::Expired(by));
        }
        // Registered readers hold the floor at or below their snapshot.
        invariant!(
            self.floor <= ticket.start,
            "INV-CONFLICT: a reader's records were trimmed"
        );
        for (i, hash) in reads.enumerate() {
            if self.latest.get(&hash).is_some_and(|&v| v > ticket.start) {
                return Err(Verdict::Conflict(i));
            }
        }
        Ok(())
    }

    /// Records that the commit ordered with `version` writes these keys.
    /// Versions must be recorded in increasing order.
    pub(crate) fn record(&mut self, version: u64, writes: impl Iterator<Item = u64>) {
        invariant!(
            version > self.floor,
            "INV-CONFLICT: recording below the floor"
        );
        invariant!(
            self.log.back().is_none_or(|&(v, _)| v <= version),
            "INV-CONFLICT: versions must be recorded in order"
        );
        for hash in writes {
            self.latest.insert(hash, version);
            self.log.push_back((version, hash));
        }
    }

    /// Drops the records no reader can need any more, given that every
    /// version up to `visible` is written; first expires readers past the
    /// limits (as of `now`, read only when readers are registered).
    /// Returns how many readers it expired.
    pub(crate) fn trim(&mut self, visible: u64, now: impl FnOnce() -> Instant) -> usize {
        let mut expired = 0;
        if self.readers.is_empty() {
            // The common case: nothing holds the floor below `visible`.
        } else if let Some(cutoff) = now().checked_sub(self.limits.max_age) {
            while let Some(entry) = self.readers.first_entry() {
                if entry.get().since > cutoff {
                    break;
                }
                let (id, reader) = entry.remove_entry();
                self.remember_expired(id, ExpiredBy::Age, reader.since);
                expired += 1;
            }
        }
        self.trim_to(visible);
        // Over the size limit, expire the oldest readers, but only while
        // that frees something: the oldest holds the floor below the
        // visible version and written records are held. Records of commits
        // not yet written stay whatever the size.
        while self.log.len() > self.limits.max_records {
            let holds_written = self.log.front().is_some_and(|&(v, _)| v <= visible);
            match self.readers.first_key_value() {
                Some((&id, r)) if r.start < visible && holds_written => {
                    let since = r.since;
                    self.readers.remove(&id);
                    self.remember_expired(id, ExpiredBy::Size, since);
                    expired += 1;
                    self.trim_to(visible);
                }
                _ => break,
            }
        }
        // Give back what a burst grew the index to, once it is mostly empty
        // (rarely: shrinking rehashes what is left).
        if self.latest.capacity() > SHRINK_ABOVE && self.latest.len() < self.latest.capacity() / 4 {
            self.latest
                .shrink_to(SHRINK_ABOVE.max(self.latest.len() * 2));
        }
        if self.log.capacity() > SHRINK_ABOVE && self.log.len() < self.log.capacity() / 4 {
            self.log.shrink_to(SHRINK_ABOVE.max(self.log.len() * 2));
        }
        expired
    }

    /// Counts a reader found expired at its commit (by age) before any
    /// trim expired it.
    pub(crate) fn count_expired(&mut self) {
        self.expired_total += 1;
    }

    fn remember_expired(&mut self, id: u64, by: ExpiredBy, since: Instant) {
        self.expired_total += 1;
        self.expired.insert(id, (by, since));
        while self.expired.len() > EXPIRED_KEPT {
            self.expired.pop_first();
        }
    }

    fn trim_to(&mut self, visible: u64) {
        let oldest = self
            .readers
            .first_key_value()
            .map_or(u64::MAX, |(_, r)| r.start);
        let floor = oldest.min(visible);
        invariant!(
            floor >= self.floor,
            "INV-CONFLICT: the floor never goes down"
        );
        if self.log.back().is_some_and(|&(v, _)| v <= floor)
            && self.latest.capacity() <= 4 * self.log.len().max(64)
        {
            // Everything goes (a store with no open reader and every
            // ordered commit written): clearing costs the map's capacity,
            // cheaper than removing one by one unless the map is mostly
            // empty space.
            self.log.clear();
            self.latest.clear();
        }
        while let Some(&(version, hash)) = self.log.front() {
            if version > floor {
                break;
            }
            self.log.pop_front();
            if let std::collections::hash_map::Entry::Occupied(e) = self.latest.entry(hash)
                && *e.get() == version
            {
                e.remove();
            }
        }
        self.floor = self.floor.max(floor);
    }

    /// Open transactions include expired ones that have not ended yet (up
    /// to `EXPIRED_KEPT` of them): a forgotten transaction stays visible.
    pub(crate) fn stats(&self) -> Stats {
        let oldest_reader = self.readers.first_key_value().map(|(_, r)| r.since);
        let oldest_expired = self.expired.first_key_value().map(|(_, &(_, since))| since);
        Stats {
            readers: self.readers.len() + self.expired.len(),
            oldest: match (oldest_reader, oldest_expired) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
            records: self.log.len(),
            expired: self.expired_total,
        }
    }
}

/// Map capacity kept when the index empties.
const SHRINK_ABOVE: usize = 16 * 1024;

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_age: Duration::from_secs(3600),
        max_records: 1 << 20,
    };

    fn index() -> ConflictIndex {
        ConflictIndex::new(LIMITS)
    }

    #[test]
    fn a_write_after_the_snapshot_conflicts() {
        let mut ix = index();
        let now = Instant::now();
        let t = ix.register(0, now);
        ix.record(1, [7].into_iter());
        assert_eq!(ix.validate(&t, [7].into_iter()), Err(Verdict::Conflict(0)));
        assert_eq!(ix.validate(&t, [8].into_iter()), Ok(()));
        // A write at or below the snapshot does not.
        let t2 = ix.register(1, now);
        assert_eq!(ix.validate(&t2, [7].into_iter()), Ok(()));
    }

    /// The bug: with no reader registered, trimming dropped the records of
    /// commits that were ordered but not yet written; a reader registering
    /// then (its snapshot at the visible version, without those commits)
    /// was never validated against them.
    #[test]
    fn trimming_keeps_commits_ordered_but_not_written() {
        let mut ix = index();
        let now = Instant::now();
        // Versions 1..=3 ordered; only 1 written (visible = 1); no readers.
        ix.record(1, [10].into_iter());
        ix.record(2, [20].into_iter());
        ix.record(3, [30].into_iter());
        ix.trim(1, || now);
        assert_eq!(ix.stats().records, 2, "records 2 and 3 must stay");
        let t = ix.register(1, now);
        assert_eq!(ix.validate(&t, [20].into_iter()), Err(Verdict::Conflict(0)));
        assert_eq!(ix.validate(&t, [30].into_iter()), Err(Verdict::Conflict(0)));
        assert_eq!(ix.validate(&t, [10].into_iter()), Ok(()));
        // Once everything is written, the reader still holds its records.
        ix.trim(3, || now);
        assert_eq!(
            ix.validate(&t, [20, 30].into_iter()),
            Err(Verdict::Conflict(0))
        );
        ix.release(&t);
        ix.trim(3, || now);
        assert_eq!(
            ix.stats().records,
            0,
            "nothing to hold once all is written and read"
        );
    }

    #[test]
    fn the_oldest_reader_holds_the_floor() {
        let mut ix = index();
        let now = Instant::now();
        ix.record(1, [1].into_iter());
        let old = ix.register(1, now);
        ix.record(2, [2].into_iter());
        ix.record(3, [3].into_iter());
        let young = ix.register(3, now);
        ix.record(4, [2].into_iter());
        ix.trim(4, || now);
        // Record 1 is in both snapshots: gone. 2.. stay for `old`.
        assert_eq!(ix.stats().records, 3);
        assert_eq!(
            ix.validate(&old, [2].into_iter()),
            Err(Verdict::Conflict(0))
        );
        assert_eq!(
            ix.validate(&old, [3].into_iter()),
            Err(Verdict::Conflict(0))
        );
        assert_eq!(ix.validate(&young, [3].into_iter()), Ok(()));
        assert_eq!(
            ix.validate(&young, [2].into_iter()),
            Err(Verdict::Conflict(0))
        );
        ix.release(&old);
        ix.trim(4, || now);
        // Only version 4 is above `young`'s snapshot.
        assert_eq!(ix.stats().records, 1);
        assert_eq!(
            ix.validate(&young, [2].into_iter()),
            Err(Verdict::Conflict(0))
        );
    }

    #[test]
    fn a_rewritten_key_keeps_its_latest_version() {
        let mut ix = index();
        let now = Instant::now();
        ix.record(1, [5].into_iter());
        ix.record(2, [5].into_iter());
        let t = ix.register(1, now);
        ix.trim(2, || now);
        // Dropping the (1, 5) record must not drop key 5's version 2.
        assert_eq!(ix.validate(&t, [5].into_iter()), Err(Verdict::Conflict(0)));
    }

    #[test]
    fn an_old_reader_expires_and_cannot_validate() {
        let mut ix = ConflictIndex::new(Limits {
            max_age: Duration::from_secs(10),
            ..LIMITS
        });
        let t0 = Instant::now();
        let old = ix.register(0, t0);
        let fresh = ix.register(0, t0 + Duration::from_secs(8));
        ix.record(1, [1].into_iter());
        assert_eq!(ix.trim(1, || t0 + Duration::from_secs(9)), 0);
        assert_eq!(ix.trim(1, || t0 + Duration::from_secs(11)), 1);
        assert_eq!(
            ix.validate(&old, std::iter::empty()),
            Err(Verdict::Expired(ExpiredBy::Age))
        );
        assert_eq!(
            ix.validate(&fresh, [1].into_iter()),
            Err(Verdict::Conflict(0))
        );
        assert_eq!(ix.stats().expired, 1);
        ix.release(&old);
        ix.release(&fresh);
        ix.trim(1, || t0 + Duration::from_secs(11));
        assert_eq!(ix.stats().records, 0);
    }

    #[test]
    fn the_size_limit_expires_the_oldest_readers_first() {
        let mut ix = ConflictIndex::new(Limits {
            max_records: 4,
            ..LIMITS
        });
        let now = Instant::now();
        let oldest = ix.register(0, now);
        for v in 1..=3 {
            ix.record(v, [v].into_iter());
        }
        let middle = ix.register(3, now);
        for v in 4..=6 {
            ix.record(v, [v].into_iter());
        }
        // 6 records, limit 4: `oldest` goes, then `middle` holds 3 records.
        assert_eq!(ix.trim(6, || now), 1);
        assert_eq!(ix.stats().records, 3);
        assert_eq!(
            ix.validate(&oldest, std::iter::empty()),
            Err(Verdict::Expired(ExpiredBy::Size))
        );
        assert_eq!(
            ix.validate(&middle, [5].into_iter()),
            Err(Verdict::Conflict(0))
        );
    }

    #[test]
    fn a_reader_that_holds_no_written_record_is_not_expired_for_size() {
        let mut ix = ConflictIndex::new(Limits {
            max_records: 2,
            ..LIMITS
        });
        let now = Instant::now();
        let r = ix.register(0, now);
        ix.record(1, std::iter::empty()); // an event-only commit, written
        ix.record(2, [1, 2, 3].into_iter()); // ordered, not written yet
        assert_eq!(ix.trim(1, || now), 0, "expiring r would free nothing");
        assert_eq!(ix.stats().records, 3);
        assert_eq!(ix.validate(&r, [9].into_iter()), Ok(()));
    }

    #[test]
    fn expired_transactions_count_as_open_until_they_end() {
        let mut ix = ConflictIndex::new(Limits {
            max_age: Duration::from_secs(10),
            ..LIMITS
        });
        let t0 = Instant::now();
        let old = ix.register(0, t0);
        ix.trim(0, || t0 + Duration::from_secs(11));
        let stats = ix.stats();
        assert_eq!((stats.readers, stats.expired), (1, 1));
        assert_eq!(stats.oldest, Some(t0));
        ix.release(&old);
        assert_eq!(ix.stats().readers, 0);
    }

    #[test]
    fn unwritten_records_are_never_dropped_for_size() {
        let mut ix = ConflictIndex::new(Limits {
            max_records: 1,
            ..LIMITS
        });
        let now = Instant::now();
        ix.record(1, [1, 2, 3].into_iter());
        ix.trim(0, || now);
        assert_eq!(
            ix.stats().records,
            3,
            "version 1 is ordered but not written"
        );
        // A reader whose snapshot is the visible version holds nothing that
        // could be dropped: expiring it would not help, so it stays.
        let t = ix.register(0, now);
        assert_eq!(ix.trim(0, || now), 0);
        assert_eq!(ix.stats().records, 3);
        assert_eq!(ix.validate(&t, [2].into_iter()), Err(Verdict::Conflict(0)));
        // Once version 1 is written, the reader holds written records past
        // the limit: it expires and they go.
        assert_eq!(ix.trim(1, || now), 1);
        assert_eq!(ix.stats().records, 0);
        assert_eq!(
            ix.validate(&t, [3].into_iter()),
            Err(Verdict::Expired(ExpiredBy::Size))
        );
    }
}
