//! Pruning: the write that removes delivered entries from the outbox (and
//! records the ones given up on as dead letters), and dead-letter purges.
//!
//! Both are writes of the store core, through the [`Medium`] like commits,
//! refused on a poisoned store and poisoning it when they fail.
//!
//! [`Medium`]: super::engine::medium::Medium

use rocksdb::WriteBatch;

use super::Durability;
use super::engine::medium::WriteSite;
use super::engine::{CF_DEAD, CF_META, CF_OUTBOX, META_PRUNED_THROUGH, seq_key};
use super::handle::Store;
use crate::error::{Error, Result};
use crate::invariant::invariant;
use crate::outbox::dead::DeadLetter;

/// Spans of up to this many entries are pruned with point deletes, longer
/// ones with one range delete (see [`Store::complete`]).
const POINT_DELETE_SPAN: u64 = 256;

impl Store {
    /// Completes the outbox through `seq` (clamped to the head): in one
    /// atomic write, records `dead` (entries given up on, all `<= seq`) as
    /// dead letters, deletes every entry `<= seq` and records `seq` as
    /// pruned-through. Returns the new tail (INV-TAIL: pruned-through + 1).
    /// Completing below the tail is a no-op.
    ///
    /// Written without an fsync whatever the store's durability: if a power
    /// loss undoes it, the entries come back and are delivered again (at
    /// least once, deduplicated by id where the broker can), which costs
    /// less than an fsync per relay round.
    pub(crate) fn complete(&self, seq: u64, dead: &[DeadLetter]) -> Result<u64> {
        let inner = &self.inner;
        let _guard = inner.prune_lock.lock();
        inner.pipeline.check_poisoned()?;
        let seq = seq.min(inner.notifier.head());
        let tail = inner.pipeline.tail();
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
            batch.put_cf(dead_cf, seq_key(d.entry.seq), d.encode());
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
                batch.delete_cf(outbox, seq_key(s));
            }
        } else {
            batch.delete_range_cf(outbox, seq_key(tail), seq_key(seq + 1));
        }
        // INV-TAIL: the deletes and the new pruned-through are one write.
        batch.put_cf(inner.cf(CF_META)?, META_PRUNED_THROUGH, seq_key(seq));
        self.write_or_poison(WriteSite::Prune, batch, Durability::Buffered)?;
        inner.pipeline.advance_tail(seq + 1);
        invariant!(
            inner.pipeline.tail() <= inner.notifier.head() + 1,
            "INV-TAIL: tail {} above head {} + 1",
            inner.pipeline.tail(),
            inner.notifier.head()
        );
        Ok(seq + 1)
    }

    /// Deletes the dead letters with these seqs, or every dead letter for
    /// `None`, with the store's durability.
    pub(crate) fn purge_dead(&self, seqs: Option<&[u64]>) -> Result<()> {
        let inner = &self.inner;
        inner.pipeline.check_poisoned()?;
        let cf = inner.cf(CF_DEAD)?;
        let mut batch = WriteBatch::default();
        match seqs {
            Some(seqs) => {
                for &seq in seqs {
                    batch.delete_cf(cf, seq_key(seq));
                }
            }
            None => {
                batch.delete_range_cf(cf, seq_key(0), seq_key(u64::MAX));
                batch.delete_cf(cf, seq_key(u64::MAX));
            }
        }
        self.write_or_poison(WriteSite::DeadLetterPurge, batch, inner.opts.durability)
    }

    /// Writes `batch` through the medium; a failure poisons the store.
    fn write_or_poison(
        &self,
        at: WriteSite,
        batch: WriteBatch,
        durability: Durability,
    ) -> Result<()> {
        let inner = &self.inner;
        inner
            .medium
            .write(&inner.db, at, batch, inner.write_options(durability))
            .map_err(|cause| inner.pipeline.poison(cause))
    }
}
