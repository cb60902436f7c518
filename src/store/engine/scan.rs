//! Raw reads of the outbox and dead-letter column families, shared by the
//! owning [`Store`](crate::Store) and the read-only
//! [`StoreReader`](crate::StoreReader). They check what they read (seq keys,
//! checksums, contiguity) and report damage as [`Error::Corruption`].

use rocksdb::{ColumnFamily, DB, ReadOptions};
use std::path::Path;

use super::{CF_META, CF_OUTBOX, META_PRUNED_THROUGH, column_family, decode_seq, seq_key, storage};
use crate::error::{Error, Result};
use crate::outbox::dead::{DeadLetter, decode_dead_letter};
use crate::outbox::entry::{MAX_SEQ, OutboxEntry, decode_entry};

/// Where the outbox of a database stands (what [`outbox_bounds`] finds).
pub(crate) struct Bounds {
    pub(crate) next_seq: u64,
    /// First seq not pruned: `tail` in `docs/design.md`.
    pub(crate) tail: u64,
    /// Seq the store recorded as pruned through (0: never pruned).
    pub(crate) pruned_through: u64,
    /// Oldest entry present above `pruned_through`, if any.
    pub(crate) oldest: Option<u64>,
}

/// Where the outbox stands in `db`: the next seq to assign and the first
/// seq not pruned. Shared by opening a store and by read-only views of it.
pub(crate) fn outbox_bounds(db: &DB, path: &Path) -> Result<Bounds> {
    let cf_meta = column_family(db, path, CF_META)?;
    let pruned = match db
        .get_cf(cf_meta, META_PRUNED_THROUGH)
        .map_err(storage("read outbox state"))?
    {
        Some(v) => decode_seq(&v)?,
        None => 0,
    };
    let cf_outbox = column_family(db, path, CF_OUTBOX)?;
    let mut it = db.raw_iterator_cf(cf_outbox);
    it.seek_to_last();
    let last = match it.key() {
        Some(k) => decode_seq(k)?,
        None => {
            it.status().map_err(storage("scan outbox"))?;
            0
        }
    };
    // Seqs read from disk are checked before any arithmetic: a damaged
    // `u64::MAX` must be reported, not wrap around.
    for (what, seq) in [
        ("last outbox entry", last),
        ("outbox.pruned_through", pruned),
    ] {
        if seq > MAX_SEQ {
            return Err(Error::corruption(
                format!("database {} ({what})", path.display()),
                format!("seq {seq} is beyond the highest seq a store assigns ({MAX_SEQ})"),
            ));
        }
    }
    it.seek(seq_key(pruned + 1));
    let oldest = match it.key() {
        Some(k) => Some(decode_seq(k)?),
        None => {
            it.status().map_err(storage("scan outbox"))?;
            None
        }
    };
    let next_seq = last.max(pruned) + 1;
    let first = oldest.unwrap_or(next_seq);
    Ok(Bounds {
        next_seq,
        tail: first.max(pruned + 1).min(next_seq),
        pruned_through: pruned,
        oldest,
    })
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
    db: &DB,
    cf: &ColumnFamily,
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
    ro.set_iterate_lower_bound(seq_key(from).to_vec());
    // Bounded by the head read before: entries a concurrent commit is
    // writing right now are left for the next read.
    ro.set_iterate_upper_bound(seq_key(head + 1).to_vec());
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
        // INV-CONTIG: pruning may have raced ahead of `from`; anything
        // else is a hole, reported as damage.
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
    db: &DB,
    cf: &ColumnFamily,
    from: u64,
    limit: usize,
) -> Result<Vec<DeadLetter>> {
    let mut ro = ReadOptions::default();
    ro.set_iterate_lower_bound(seq_key(from).to_vec());
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
pub(crate) fn count_keys(db: &DB, cf: &ColumnFamily) -> Result<u64> {
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
