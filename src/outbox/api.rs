//! Reading, waiting on and pruning the outbox.

use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use rocksdb::{ReadOptions, WriteBatch};

use super::dead::{DeadLetter, decode_dead_letter};
use super::entry::{OutboxEntry, decode_entry};
use super::event::Event;
use super::notify::HeadChanged;
use crate::Durability;
use crate::error::{Error, Result};
use crate::store::open::{META_PRUNED_THROUGH, decode_seq, storage};
use crate::store::{CF_DEAD, CF_META, CF_OUTBOX, Store};

/// Prunes shorter than this use point deletes instead of a range delete.
const POINT_DELETE_SPAN: u64 = 256;

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
    pub(crate) fn store(&self) -> &Store {
        &self.store
    }

    /// The last committed seq (0 when nothing was ever committed).
    pub fn head(&self) -> u64 {
        self.store.inner.notifier.head()
    }

    /// The first seq still in the outbox (`head + 1` when it is empty).
    pub fn tail(&self) -> u64 {
        self.store.inner.pipeline.first_seq.load(Ordering::Acquire)
    }

    /// The highest seq known to be on disk: every entry up to it survives a
    /// power loss. `Sync` commits are on disk when they return;
    /// `Buffered` ones once a later fsync covers them (a `Sync` commit,
    /// [`make_durable`](Outbox::make_durable), or the relay, which calls it
    /// before it ships).
    pub fn durable_head(&self) -> u64 {
        self.store.inner.pipeline.durable_seq()
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
        let inner = &self.store.inner;
        read_entries(
            &inner.db,
            inner.cf(CF_OUTBOX)?,
            Window {
                from,
                tail: self.tail(),
                head: self.head(),
            },
            max_entries,
            max_bytes,
            || self.tail(),
        )
    }

    /// The entry with this seq, if it is still in the outbox.
    pub fn get(&self, seq: u64) -> Result<Option<OutboxEntry>> {
        Ok(self.read(seq, 1)?.into_iter().find(|e| e.seq == seq))
    }

    /// Removes every entry with seq `<= seq` (clamped to the head), with one
    /// range delete (point deletes for spans under 256 entries, which keep
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
        let inner = &self.store.inner;
        let _guard = inner.prune_lock.lock();
        inner.pipeline.check_poisoned()?;
        let seq = seq.min(self.head());
        let tail = self.tail();
        if seq < tail {
            return Ok(tail);
        }
        let mut batch = WriteBatch::default();
        let dead_cf = inner.cf(CF_DEAD)?;
        for d in dead {
            if d.entry.seq > seq {
                return Err(Error::InvalidArgument(format!(
                    "dead letter for seq {} is beyond the completed seq {seq}",
                    d.entry.seq
                )));
            }
            batch.put_cf(dead_cf, d.entry.seq.to_be_bytes(), d.encode());
        }
        // Entries below the tail are gone already, so only [tail, seq] is
        // deleted. Short spans (the relay's usual case) use point deletes: every
        // range tombstone in a memtable is re-fragmented by each new iterator
        // and each further range delete, so thousands of small ones made reads
        // and prunes quadratic (measured: 6 ms per read after 1,000 one-entry
        // range deletes). Long spans use one range delete.
        let outbox = inner.cf(CF_OUTBOX)?;
        if seq - tail < POINT_DELETE_SPAN {
            for s in tail..=seq {
                batch.delete_cf(outbox, s.to_be_bytes());
            }
        } else {
            batch.delete_range_cf(outbox, tail.to_be_bytes(), (seq + 1).to_be_bytes());
        }
        batch.put_cf(inner.cf(CF_META)?, META_PRUNED_THROUGH, seq.to_be_bytes());
        if let Err(e) = inner
            .db
            .write_opt(batch, inner.write_options(Durability::Buffered))
        {
            return Err(inner.pipeline.poison(format!("outbox prune failed: {e}")));
        }
        inner.pipeline.first_seq.store(seq + 1, Ordering::Release);
        Ok(seq + 1)
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
        list_dead(&inner.db, inner.cf(CF_DEAD)?, from, limit)
    }

    /// Number of dead letters.
    pub fn count(&self) -> Result<u64> {
        let inner = &self.store.inner;
        count_keys(&inner.db, inner.cf(CF_DEAD)?)
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
        let inner = &self.store.inner;
        let cf = inner.cf(CF_DEAD)?;
        let mut batch = WriteBatch::default();
        for seq in seqs {
            batch.delete_cf(cf, seq.to_be_bytes());
        }
        self.write(batch)
    }

    /// Deletes every dead letter.
    pub fn purge_all(&self) -> Result<()> {
        let inner = &self.store.inner;
        let cf = inner.cf(CF_DEAD)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, 0u64.to_be_bytes(), u64::MAX.to_be_bytes());
        batch.delete_cf(cf, u64::MAX.to_be_bytes());
        self.write(batch)
    }

    /// Writes a purge: refused on a poisoned store, and a failure poisons
    /// it, like every other write.
    fn write(&self, batch: WriteBatch) -> Result<()> {
        let inner = &self.store.inner;
        inner.pipeline.check_poisoned()?;
        inner
            .db
            .write_opt(batch, inner.write_options(inner.opts.durability))
            .map_err(|e| {
                inner
                    .pipeline
                    .poison(format!("dead-letter purge failed: {e}"))
            })
    }
}

/// The seqs a read may return: `from` (raised to `tail`) through `head`.
pub(crate) struct Window {
    pub(crate) from: u64,
    pub(crate) tail: u64,
    pub(crate) head: u64,
}

/// Reads up to `max_entries` (and about `max_bytes`) committed entries of
/// `window` from the outbox column family `cf` of `db`, checking that seqs
/// are contiguous. `tail_now` re-reads the tail: pruning may race a read.
pub(crate) fn read_entries(
    db: &rocksdb::DB,
    cf: &rocksdb::ColumnFamily,
    window: Window,
    max_entries: usize,
    max_bytes: usize,
    tail_now: impl Fn() -> u64,
) -> Result<Vec<OutboxEntry>> {
    let Window { from, tail, head } = window;
    let from = from.max(tail);
    if from > head || max_entries == 0 {
        return Ok(Vec::new());
    }
    let mut ro = ReadOptions::default();
    ro.set_iterate_lower_bound(from.to_be_bytes().to_vec());
    // Bounded by the head read before: entries a concurrent commit is
    // writing right now are left for the next read.
    ro.set_iterate_upper_bound((head + 1).to_be_bytes().to_vec());
    let mut it = db.raw_iterator_cf_opt(cf, ro);
    it.seek_to_first();
    let mut out = Vec::new();
    let mut bytes = 0usize;
    let mut expected = from;
    while let Some((key, value)) = it.item() {
        let seq = decode_seq(key)?;
        let entry =
            decode_entry(value).map_err(|e| Error::corruption(format!("outbox seq {seq}"), e.0))?;
        if entry.seq != seq {
            return Err(Error::corruption(
                format!("outbox seq {seq}"),
                format!("entry says it is seq {}", entry.seq),
            ));
        }
        // Pruning may have raced ahead of `from`; anything else is a hole.
        if seq != expected && expected >= tail_now() {
            return Err(Error::corruption(
                format!("outbox seq {expected}"),
                format!("missing: the next entry present is seq {seq}"),
            ));
        }
        expected = seq + 1;
        bytes = bytes.saturating_add(entry.size_hint());
        out.push(entry);
        if out.len() >= max_entries || bytes >= max_bytes {
            break;
        }
        it.next();
    }
    it.status().map_err(storage("read outbox"))?;
    Ok(out)
}

/// Up to `limit` dead letters with seq `>= from` from the column family `cf`.
pub(crate) fn list_dead(
    db: &rocksdb::DB,
    cf: &rocksdb::ColumnFamily,
    from: u64,
    limit: usize,
) -> Result<Vec<DeadLetter>> {
    let mut ro = ReadOptions::default();
    ro.set_iterate_lower_bound(from.to_be_bytes().to_vec());
    let mut it = db.raw_iterator_cf_opt(cf, ro);
    it.seek_to_first();
    let mut out = Vec::new();
    while let Some((key, value)) = it.item() {
        if out.len() >= limit {
            break;
        }
        let seq = decode_seq(key)?;
        let d = decode_dead_letter(value)
            .map_err(|e| Error::corruption(format!("dead letter seq {seq}"), e.0))?;
        out.push(d);
        it.next();
    }
    it.status().map_err(storage("read dead letters"))?;
    Ok(out)
}

/// Number of keys in the column family `cf` (values are not decoded).
pub(crate) fn count_keys(db: &rocksdb::DB, cf: &rocksdb::ColumnFamily) -> Result<u64> {
    let mut it = db.raw_iterator_cf(cf);
    it.seek_to_first();
    let mut n = 0u64;
    while it.valid() {
        n += 1;
        it.next();
    }
    it.status().map_err(storage("count"))?;
    Ok(n)
}
