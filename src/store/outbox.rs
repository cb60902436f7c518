//! [`Outbox`] and [`DeadLetters`]: the store's outbox as a relay (or an
//! operator) sees it. A view on top of the store core: reads go through
//! [`scan`], pruning and purges through the core's writes
//! (`super::prune`).

use std::time::{Duration, SystemTime};

use super::engine::{CF_DEAD, scan};
use super::handle::Store;
use super::notify::HeadChanged;
use crate::error::{Error, Result};
use crate::outbox::dead::DeadLetter;
use crate::outbox::entry::OutboxEntry;
use crate::outbox::event::Event;

/// The store's outbox, as the relay sees it: committed entries in seq order,
/// a head that waiters can block or `.await` on, and pruning.
///
/// Seqs start at 1, are strictly increasing in commit order and gap-free:
/// every seq from [`tail`](Outbox::tail) to [`head`](Outbox::head) is
/// readable, and a reader that sees seq N sees every seq below N.
///
/// ```
/// use outboxkv::{Event, Store};
/// use std::time::{Duration, SystemTime};
///
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path())?;
/// let outbox = store.outbox();
/// assert_eq!((outbox.tail(), outbox.head()), (1, 0)); // empty
/// store.write(|tx| tx.emit(Event::bytes("greeting", "k1", b"hi".to_vec())))?;
/// assert_eq!(outbox.wait_beyond(0, Duration::from_secs(1)), 1);
/// let batch = outbox.read(outbox.tail(), 100)?;
/// assert_eq!(batch[0].payload, b"hi");
/// outbox.prune_through(batch[0].seq)?; // delivered: drop it
/// assert_eq!(outbox.depth(), 0);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct Outbox {
    store: Store,
}

impl Store {
    /// The store's outbox.
    pub fn outbox(&self) -> Outbox {
        Outbox {
            store: self.clone(),
        }
    }
}

impl Outbox {
    #[cfg(feature = "relay")]
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The last committed seq (0 when nothing was ever committed).
    pub fn head(&self) -> u64 {
        self.store.inner.notifier.head()
    }

    /// The first seq still in the outbox (`head + 1` when it is empty).
    pub fn tail(&self) -> u64 {
        self.store.inner.pipeline.tail()
    }

    /// The highest seq known to be on disk: every entry up to it survives a
    /// power loss. `Sync` commits are on disk when they return;
    /// `Buffered` ones once a later fsync covers them (a `Sync` commit,
    /// [`make_durable`](Outbox::make_durable), or the relay, which calls it
    /// before it ships). After an open it is the head: RocksDB's recovery
    /// writes what it replayed to fsynced files before the open returns,
    /// so a recovered backlog ships without more fsyncs.
    pub fn durable_head(&self) -> u64 {
        self.store.inner.pipeline.durable_head()
    }

    /// Makes every entry up to `through` durable: at once if it already is,
    /// else with one fsync of the write-ahead log (which also covers every
    /// other commit written so far). Call it before shipping entries you
    /// read yourself, so that no event reaches a broker while the state
    /// committed with it could still be lost to a power failure; the relay
    /// does. A failed fsync poisons the store ([`Error::Poisoned`]).
    ///
    /// ```
    /// use outboxkv::{Durability, Event, Store};
    /// # let dir = tempfile::tempdir()?;
    /// let store = Store::options().durability(Durability::Buffered).open(dir.path())?;
    /// store.write(|tx| tx.emit(Event::bytes("t", "k", vec![1])))?;
    /// let outbox = store.outbox();
    /// assert_eq!(outbox.durable_head(), 0);
    /// outbox.make_durable(outbox.head())?;
    /// assert_eq!(outbox.durable_head(), 1);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn make_durable(&self, through: u64) -> Result<()> {
        let inner = &self.store.inner;
        inner.pipeline.make_durable(inner, through)
    }

    /// Number of entries in the outbox (committed, not yet pruned).
    pub fn depth(&self) -> u64 {
        (self.head() + 1).saturating_sub(self.tail())
    }

    /// Reads up to `max_entries` committed entries with seq `>= from`, in seq order.
    pub fn read(&self, from: u64, max_entries: usize) -> Result<Vec<OutboxEntry>> {
        self.read_limited(from, max_entries, usize::MAX)
    }

    /// Like [`read`](Outbox::read), but also stops once the entries read
    /// reach `max_bytes` (by [`OutboxEntry::size_hint`]); at least one entry is
    /// returned when one is there.
    pub fn read_limited(
        &self,
        from: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Vec<OutboxEntry>> {
        self.store.read_outbox(from, max_entries, max_bytes)
    }

    /// The entry with this seq, if it is still in the outbox.
    pub fn get(&self, seq: u64) -> Result<Option<OutboxEntry>> {
        self.store.outbox_entry(seq)
    }

    /// Removes every entry with seq `<= seq` (clamped to the head), with one
    /// range delete (point deletes for spans of up to 256 entries, which keep
    /// range tombstones few), and returns the new tail. Pruning below the tail is a no-op.
    ///
    /// Pruning is written without an fsync whatever the store's durability:
    /// if a power loss undoes it, the entries come back and are delivered
    /// again (at least once, deduplicated by id where the broker can), which
    /// costs less than an fsync per relay round.
    pub fn prune_through(&self, seq: u64) -> Result<u64> {
        self.complete_through(seq, &[])
    }

    /// What a relay does once entries are settled: in one atomic write, moves
    /// `dead` (entries it gave up on, all `<= seq`) to the dead-letter table
    /// and prunes every entry `<= seq`. Returns the new tail.
    pub fn complete_through(&self, seq: u64, dead: &[DeadLetter]) -> Result<u64> {
        self.store.complete(seq, dead)
    }

    /// Applies the sidecar relay's cursor file (`<store>/relay/cursor`), if
    /// there is one: prunes every entry it delivered and moves the entries it
    /// dead-lettered into the dead-letter table, in one atomic write. Returns
    /// the new tail, or `None` when there is no cursor file.
    ///
    /// The store does this on its own every
    /// [`relay_cursor_poll`](crate::StoreOptions::relay_cursor_poll). A
    /// damaged cursor file, one of another store, or one that is not this
    /// store's history (ahead of its head, or naming another entry at its
    /// last delivered seq) is an [`Error::Corruption`] and prunes nothing.
    pub fn apply_relay_cursor(&self) -> Result<Option<u64>> {
        self.store.apply_relay_cursor()
    }

    /// Age of the oldest entry still in the outbox (zero when it is empty).
    pub fn oldest_age(&self) -> Result<Duration> {
        let Some(entry) = self.read(self.tail(), 1)?.into_iter().next() else {
            return Ok(Duration::ZERO);
        };
        Ok(SystemTime::now()
            .duration_since(entry.created_at())
            .unwrap_or(Duration::ZERO))
    }

    /// The store's dead-letter table.
    pub fn dead_letters(&self) -> DeadLetters {
        DeadLetters {
            store: self.store.clone(),
        }
    }

    /// Blocks until the head is beyond `seq` or `timeout` passes; returns the
    /// head either way. Wakes on commit, without polling.
    pub fn wait_beyond(&self, seq: u64, timeout: Duration) -> u64 {
        self.store.inner.notifier.wait_beyond(seq, timeout)
    }

    /// A future that resolves with the head once it is beyond `seq`. Works on
    /// any async runtime (it only uses the task's waker).
    pub fn changed(&self, seq: u64) -> HeadChanged {
        HeadChanged {
            notifier: self.store.inner.notifier.clone(),
            after: seq,
        }
    }
}

/// The dead-letter table: entries the relay gave up on (see [`DeadLetter`]).
///
/// ```
/// use outboxkv::{DeadLetter, Event, Store};
/// let dir = tempfile::tempdir()?;
/// let store = Store::open(dir.path())?;
/// store.write(|tx| tx.emit(Event::bytes("e", "k", vec![1; 10])))?;
/// let outbox = store.outbox();
/// let entry = outbox.read(1, 1)?.remove(0);
/// let id = entry.id;
/// // What a relay does when the broker rejects the entry for good:
/// let dead = DeadLetter { entry, error: "too large".into(), attempts: 1, first_failed_micros: 0, dead_at_micros: 0 };
/// outbox.complete_through(1, &[dead])?;
/// let dlq = outbox.dead_letters();
/// assert_eq!(dlq.list(0, 10)?.len(), 1);
/// let replayed = dlq.replay(&[1])?; // back into the outbox, same event id
/// assert_eq!(replayed, 2..3);
/// assert_eq!(outbox.read(2, 1)?[0].id, id);
/// assert!(dlq.list(0, 10)?.is_empty());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug)]
pub struct DeadLetters {
    store: Store,
}

impl DeadLetters {
    /// Up to `limit` dead letters with original seq `>= from`, in seq order.
    pub fn list(&self, from: u64, limit: usize) -> Result<Vec<DeadLetter>> {
        let inner = &self.store.inner;
        scan::list_dead(&inner.db, inner.cf(CF_DEAD)?, from, limit)
    }

    /// Number of dead letters.
    pub fn count(&self) -> Result<u64> {
        let inner = &self.store.inner;
        scan::count_keys(&inner.db, inner.cf(CF_DEAD)?)
    }

    /// Appends the dead letters with these (original) seqs to the outbox again,
    /// keeping their event ids and original times, and removes them from the
    /// dead-letter table, in one commit. Returns the new seqs. Unknown or
    /// repeated seqs are an [`Error::InvalidArgument`] and nothing is
    /// replayed.
    pub fn replay(&self, seqs: &[u64]) -> Result<std::ops::Range<u64>> {
        // One replay at a time, so a dead letter cannot be replayed twice.
        let _guard = self.store.inner.replay_lock.lock();
        let mut seen = std::collections::HashSet::with_capacity(seqs.len());
        if let Some(dup) = seqs.iter().find(|s| !seen.insert(**s)) {
            return Err(Error::InvalidArgument(format!(
                "dead letter {dup} is asked for more than once; nothing is replayed"
            )));
        }
        let mut events = Vec::with_capacity(seqs.len());
        for &seq in seqs {
            let found = self.list(seq, 1)?.into_iter().find(|d| d.entry.seq == seq);
            let d = found
                .ok_or_else(|| Error::InvalidArgument(format!("no dead letter with seq {seq}")))?;
            events.push(Event::replay_of(d.entry));
        }
        self.store.commit_replay(events, seqs)
    }

    /// Deletes the dead letters with these seqs (unknown seqs are ignored).
    pub fn purge(&self, seqs: &[u64]) -> Result<()> {
        self.store.purge_dead(Some(seqs))
    }

    /// Deletes every dead letter.
    pub fn purge_all(&self) -> Result<()> {
        self.store.purge_dead(None)
    }
}
