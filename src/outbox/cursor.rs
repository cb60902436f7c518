//! The sidecar relay's cursor file.
//!
//! A relay running in another process (`outbox-relay run`) cannot write to
//! the store: the service holds it. It records how far it has delivered in
//! `<store>/relay/cursor` instead, and the owning [`Store`](crate::Store)
//! reads that file and prunes what was delivered (moving entries the sidecar
//! gave up on into its dead-letter table).
//!
//! # Format (version 2)
//!
//! All integers little-endian.
//!
//! | bytes | field |
//! |---|---|
//! | 8 | magic `OKVCURSR` |
//! | 4 | format version (2; version 1 is read too) |
//! | 16 | store id the cursor belongs to |
//! | 8 | `delivered_through`: every seq up to it is delivered or dead |
//! | 8 | `through_created_micros`: the commit time of the entry at `delivered_through` (0: unknown), to tell a store rolled back to an older copy of itself (whose next commits reuse the seq) from the one the sidecar read; not in version 1 |
//! | 4 | number of dead entries (at most [`MAX_DEAD`]) |
//! | per dead entry: 8 + 4 + 8 + 8 + 4 + n | seq, attempts, first failure µs, dead at µs, error length, error (UTF-8, at most [`MAX_ERROR_LEN`] bytes) |
//! | 4 | CRC-32 (crc32fast) of everything before it |
//!
//! The file is replaced atomically (written to `cursor.tmp`, fsynced,
//! renamed, directory fsynced), so a reader sees the old or the new cursor,
//! never a mix. Dead entries stay listed until the store has pruned past
//! them.

use std::path::Path;

use super::dead::MAX_ERROR_LEN;
use super::entry::{OutboxEntry, StoreId};
use crate::error::{Error, Result};

/// Magic bytes at the start of a cursor file.
pub const CURSOR_MAGIC: &[u8; 8] = b"OKVCURSR";
/// The cursor format this build writes (it reads this one and version 1).
pub const CURSOR_VERSION: u32 = 2;
/// Most dead entries one cursor file lists.
pub const MAX_DEAD: usize = 10_000;

/// An entry the sidecar dead-lettered, for the store to move into its
/// dead-letter table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CursorDead {
    /// The entry's outbox seq.
    pub seq: u64,
    /// Delivery attempts.
    pub attempts: u32,
    /// First failure, microseconds since the Unix epoch.
    pub first_failed_micros: u64,
    /// When the sidecar gave up, microseconds since the Unix epoch.
    pub dead_at_micros: u64,
    /// The sink's last error.
    pub error: String,
}

/// The content of a cursor file.
///
/// ```
/// use outboxkv::StoreId;
/// use outboxkv::RelayCursor;
/// let c = RelayCursor {
///     store: StoreId([1; 16]),
///     delivered_through: 42,
///     through_created_micros: 1_700_000_000_000_000,
///     dead: vec![],
/// };
/// assert_eq!(RelayCursor::decode(&c.encode()).unwrap(), c);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RelayCursor {
    /// The store the cursor belongs to.
    pub store: StoreId,
    /// Every seq up to this one is delivered (or listed in `dead`).
    pub delivered_through: u64,
    /// The commit time (µs since the Unix epoch) of the entry at
    /// `delivered_through`, 0 when unknown (a version 1 file, nothing
    /// delivered yet). A store whose entry at that seq has another time was
    /// rolled back: the cursor is not its own history.
    pub through_created_micros: u64,
    /// Entries up to `delivered_through` that were dead-lettered, not
    /// delivered, in seq order.
    pub dead: Vec<CursorDead>,
}

/// Why bytes are not a valid cursor file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct CursorDecodeError(pub String);

impl RelayCursor {
    /// Encodes the cursor (dead entries beyond the first 10,000 and error text
    /// beyond 64 KiB are cut, so the result always decodes).
    pub fn encode(&self) -> Vec<u8> {
        let dead = &self.dead[..self.dead.len().min(MAX_DEAD)];
        let mut out = Vec::with_capacity(48 + dead.len() * 40);
        out.extend_from_slice(CURSOR_MAGIC);
        out.extend_from_slice(&CURSOR_VERSION.to_le_bytes());
        out.extend_from_slice(&self.store.0);
        out.extend_from_slice(&self.delivered_through.to_le_bytes());
        out.extend_from_slice(&self.through_created_micros.to_le_bytes());
        out.extend_from_slice(&(dead.len() as u32).to_le_bytes());
        for d in dead {
            let error = truncate_utf8(&d.error, MAX_ERROR_LEN);
            out.extend_from_slice(&d.seq.to_le_bytes());
            out.extend_from_slice(&d.attempts.to_le_bytes());
            out.extend_from_slice(&d.first_failed_micros.to_le_bytes());
            out.extend_from_slice(&d.dead_at_micros.to_le_bytes());
            out.extend_from_slice(&(error.len() as u32).to_le_bytes());
            out.extend_from_slice(error.as_bytes());
        }
        let crc = crc32fast::hash(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Decodes a cursor file. Never panics, whatever the bytes.
    pub fn decode(bytes: &[u8]) -> Result<RelayCursor, CursorDecodeError> {
        let err = |m: String| CursorDecodeError(m);
        if bytes.len() < CURSOR_MAGIC.len() + 4 + 16 + 8 + 4 + 4 {
            return Err(err(format!("{} bytes is too short", bytes.len())));
        }
        let (body, crc) = bytes.split_at(bytes.len() - 4);
        if &body[..8] != CURSOR_MAGIC {
            return Err(err("not a cursor file (bad magic)".into()));
        }
        let mut r = Reader { buf: &body[8..] };
        let version = r.u32()?;
        if version != CURSOR_VERSION && version != 1 {
            return Err(err(format!(
                "cursor format version {version}; this build reads 1 and {CURSOR_VERSION}"
            )));
        }
        let stored = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
        let actual = crc32fast::hash(body);
        if stored != actual {
            return Err(err(format!(
                "checksum mismatch (stored {stored:08x}, computed {actual:08x})"
            )));
        }
        let store = StoreId(r.array()?);
        let delivered_through = r.u64()?;
        if delivered_through > super::entry::MAX_SEQ {
            return Err(err(format!(
                "delivered_through {delivered_through} is beyond the highest seq a store assigns"
            )));
        }
        let through_created_micros = if version == 1 { 0 } else { r.u64()? };
        let count = r.u32()? as usize;
        if count > MAX_DEAD {
            return Err(err(format!("{count} dead entries (at most {MAX_DEAD})")));
        }
        let mut dead = Vec::with_capacity(count.min(1024));
        let mut prev = None;
        for i in 0..count {
            let seq = r.u64()?;
            if seq > delivered_through || prev.is_some_and(|p| seq <= p) {
                return Err(err(format!(
                    "dead entry {i} has seq {seq}: not in order or beyond {delivered_through}"
                )));
            }
            prev = Some(seq);
            let attempts = r.u32()?;
            let first_failed_micros = r.u64()?;
            let dead_at_micros = r.u64()?;
            let len = r.u32()? as usize;
            if len > MAX_ERROR_LEN {
                return Err(err(format!(
                    "error text of {len} bytes (at most {MAX_ERROR_LEN})"
                )));
            }
            let error = std::str::from_utf8(r.take(len)?)
                .map_err(|_| err(format!("dead entry {i}: error text is not UTF-8")))?
                .to_string();
            dead.push(CursorDead {
                seq,
                attempts,
                first_failed_micros,
                dead_at_micros,
                error,
            });
        }
        if !r.buf.is_empty() {
            return Err(err(format!("{} bytes after the last field", r.buf.len())));
        }
        Ok(RelayCursor {
            store,
            delivered_through,
            through_created_micros,
            dead,
        })
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], CursorDecodeError> {
        if self.buf.len() < n {
            return Err(CursorDecodeError(format!(
                "truncated: needed {n} more bytes, {} left",
                self.buf.len()
            )));
        }
        let (head, rest) = self.buf.split_at(n);
        self.buf = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], CursorDecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }
    fn u32(&mut self) -> Result<u32, CursorDecodeError> {
        Ok(u32::from_le_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, CursorDecodeError> {
        Ok(u64::from_le_bytes(self.array()?))
    }
}

/// Checks of a cursor against the store it is applied to (by the store's
/// cursor watcher and by the sidecar when it starts).
impl RelayCursor {
    /// Refuses a cursor (read from `path`) that belongs to another store
    /// than `store`, as [`Error::Corruption`].
    pub(crate) fn check_owner(&self, path: &Path, store: StoreId) -> Result<()> {
        if self.store == store {
            return Ok(());
        }
        Err(Error::corruption(
            path.display().to_string(),
            format!(
                "the cursor belongs to store {}, not to this store ({store})",
                self.store
            ),
        ))
    }

    /// Refuses a cursor that is not the history of the store whose last seq
    /// is `head` and whose first unsettled seq is `tail` (`entry_at` reads the
    /// store's entry at a seq): one past the store's last seq, or one whose last
    /// delivered entry has another commit time than the store's entry at that
    /// seq. A sidecar ships only what is durable in the store, so either means
    /// the store was rolled back (restored from an older copy of itself);
    /// applying the cursor would prune the store's next commits unsent.
    pub(crate) fn check_history(
        &self,
        path: &Path,
        head: u64,
        tail: u64,
        entry_at: impl FnOnce(u64) -> Result<Option<OutboxEntry>>,
    ) -> Result<()> {
        let through = self.delivered_through;
        let refuse = |what: String| {
            Err(Error::corruption(
                path.display().to_string(),
                format!(
                    "{what}: the store was restored from an older copy of itself, or the cursor \
                     was; if the store is right, remove the cursor file (events it delivered may \
                     then be delivered again)"
                ),
            ))
        };
        if through > head {
            return refuse(format!(
                "the relay cursor says seq {through} was delivered, but the store's last seq is {head}"
            ));
        }
        if self.through_created_micros == 0 || through < tail {
            return Ok(());
        }
        match entry_at(through)? {
            Some(e) if e.seq == through && e.created_at_micros != self.through_created_micros => {
                refuse(format!(
                    "the relay cursor's last delivered entry (seq {through}) is not the store's \
                     entry at that seq (another commit time)"
                ))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> RelayCursor {
        RelayCursor {
            store: StoreId([9; 16]),
            delivered_through: 100,
            through_created_micros: 1_234_567,
            dead: vec![
                CursorDead {
                    seq: 7,
                    attempts: 5,
                    first_failed_micros: 1,
                    dead_at_micros: 2,
                    error: "too large".into(),
                },
                CursorDead {
                    seq: 99,
                    attempts: 1,
                    first_failed_micros: 3,
                    dead_at_micros: 4,
                    error: "ünicode".into(),
                },
            ],
        }
    }

    /// A version 1 file (no commit time of the last delivered entry) still
    /// decodes, with the time unknown (0).
    #[test]
    fn version_1_files_still_decode() {
        let c = sample();
        let v2 = c.encode();
        let mut v1 = Vec::new();
        v1.extend_from_slice(&v2[..8]);
        v1.extend_from_slice(&1u32.to_le_bytes());
        v1.extend_from_slice(&v2[12..12 + 16 + 8]);
        v1.extend_from_slice(&v2[12 + 16 + 8 + 8..v2.len() - 4]);
        let crc = crc32fast::hash(&v1);
        v1.extend_from_slice(&crc.to_le_bytes());
        let decoded = RelayCursor::decode(&v1).expect("a version 1 cursor");
        assert_eq!(
            decoded,
            RelayCursor {
                through_created_micros: 0,
                ..c
            }
        );
    }

    #[test]
    fn round_trip() {
        let c = sample();
        assert_eq!(RelayCursor::decode(&c.encode()), Ok(c));
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error() {
        let bytes = sample().encode();
        for len in 0..bytes.len() {
            assert!(RelayCursor::decode(&bytes[..len]).is_err(), "len {len}");
        }
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut b = bytes.clone();
                b[i] ^= 1 << bit;
                assert!(RelayCursor::decode(&b).is_err(), "byte {i} bit {bit}");
            }
        }
    }

    #[test]
    fn dead_entries_out_of_order_are_refused() {
        let mut c = sample();
        c.dead.swap(0, 1);
        assert!(RelayCursor::decode(&c.encode()).is_err());
        let mut c = sample();
        c.dead[1].seq = 101;
        assert!(RelayCursor::decode(&c.encode()).is_err());
    }
}
