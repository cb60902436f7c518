//! Reading, waiting on and pruning the outbox.

use std::sync::atomic::Ordering;
use std::time::Duration;

use rocksdb::{ReadOptions, WriteBatch};

use super::entry::{OutboxEntry, decode_entry};
use super::notify::HeadChanged;
use crate::error::{Error, Result};
use crate::store::open::{META_PRUNED_THROUGH, decode_seq, storage};
use crate::store::{CF_META, CF_OUTBOX, Store};

/// The store's outbox, as the relay sees it: committed entries in seq order,
/// a head that waiters can block or `.await` on, and pruning.
///
/// Seqs start at 1, are strictly increasing in commit order and gap-free:
/// every seq from [`tail`](Outbox::tail) to [`head`](Outbox::head) is
/// readable, and a reader that sees seq N sees every seq below N.
///
/// ```
/// use outboxkv::{Event, Store};
/// use std::time::Duration;
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
    /// The last committed seq (0 when nothing was ever committed).
    pub fn head(&self) -> u64 {
        self.store.inner.notifier.head()
    }

    /// The first seq still in the outbox (`head + 1` when it is empty).
    pub fn tail(&self) -> u64 {
        self.store.inner.pipeline.first_seq.load(Ordering::Acquire)
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
        let head = self.head();
        let from = from.max(self.tail());
        if from > head || max_entries == 0 {
            return Ok(Vec::new());
        }
        let cf = inner.cf(CF_OUTBOX)?;
        let mut ro = ReadOptions::default();
        ro.set_iterate_lower_bound(from.to_be_bytes().to_vec());
        // Bounded by the head read above: entries a concurrent commit is
        // writing right now are left for the next read.
        ro.set_iterate_upper_bound((head + 1).to_be_bytes().to_vec());
        let mut it = inner.db.raw_iterator_cf_opt(cf, ro);
        it.seek_to_first();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        let mut expected = from;
        while let Some((key, value)) = it.item() {
            let seq = decode_seq(key)?;
            let entry = decode_entry(value)
                .map_err(|e| Error::corruption(format!("outbox seq {seq}"), e.0))?;
            if entry.seq != seq {
                return Err(Error::corruption(
                    format!("outbox seq {seq}"),
                    format!("entry says it is seq {}", entry.seq),
                ));
            }
            if seq != expected {
                // Pruning may have raced ahead of `from`; anything else is a hole.
                if expected >= self.tail() {
                    return Err(Error::corruption(
                        format!("outbox seq {expected}"),
                        format!("missing: the next entry present is seq {seq}"),
                    ));
                }
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

    /// The entry with this seq, if it is still in the outbox.
    pub fn get(&self, seq: u64) -> Result<Option<OutboxEntry>> {
        Ok(self.read(seq, 1)?.into_iter().find(|e| e.seq == seq))
    }

    /// Removes every entry with seq `<= seq` (clamped to the head) with one
    /// range delete, and returns the new tail. Pruning below the tail is a no-op.
    pub fn prune_through(&self, seq: u64) -> Result<u64> {
        let inner = &self.store.inner;
        let _guard = inner.prune_lock.lock();
        if let Some(cause) = inner.pipeline.poisoned() {
            return Err(Error::Poisoned { cause });
        }
        let seq = seq.min(self.head());
        let tail = self.tail();
        if seq < tail {
            return Ok(tail);
        }
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(
            inner.cf(CF_OUTBOX)?,
            0u64.to_be_bytes(),
            (seq + 1).to_be_bytes(),
        );
        batch.put_cf(inner.cf(CF_META)?, META_PRUNED_THROUGH, seq.to_be_bytes());
        if let Err(e) = inner
            .db
            .write_opt(batch, inner.write_options(inner.opts.durability))
        {
            inner.pipeline.poison(format!("outbox prune failed: {e}"));
            return Err(storage("prune outbox")(e));
        }
        inner.pipeline.first_seq.store(seq + 1, Ordering::Release);
        Ok(seq + 1)
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
