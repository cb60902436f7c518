//! The `OUTBOXKV` file: what makes a directory an outboxkv store.
//!
//! ```text
//! offset  size  field
//!      0     8  magic "OUTBOXKV"
//!      8     4  format version, u32 little-endian (this build: 1)
//!     12     4  flags, u32 little-endian (0; reserved)
//!     16    16  store id (random, made at creation)
//!     32     4  crc32 of bytes 0..32, little-endian
//! ```
//!
//! The file is written once, atomically (temporary file, fsync, rename,
//! fsync of the directory), before the database is created. `open` reads it
//! before touching anything else: no file in a non-empty directory means "not
//! a store", a newer version means "upgrade outboxkv", and nothing is written
//! in either case. Later format versions keep the magic and the version field
//! where they are, so an old build can always say which version it found.

use std::fmt;

use crate::outbox::entry::StoreId;

/// Name of the identity file inside a store directory.
pub const META_FILE: &str = "OUTBOXKV";
/// The on-disk format version this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"OUTBOXKV";
const LEN: usize = 36;

/// The decoded `OUTBOXKV` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoreMeta {
    /// On-disk format version.
    pub format_version: u32,
    /// The store's identity.
    pub store_id: StoreId,
}

/// Why an `OUTBOXKV` file was rejected.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MetaError {
    /// The file does not start with the magic bytes.
    BadMagic,
    /// A format version this build does not read.
    Version(u32),
    /// The file has the wrong length for its version.
    Length(usize),
    /// The CRC does not match.
    Checksum,
    /// The reserved flags are not 0: written by a build that knows more.
    Flags(u32),
}

impl fmt::Display for MetaError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MetaError::BadMagic => write!(
                f,
                "{META_FILE} does not start with the outboxkv magic bytes"
            ),
            MetaError::Version(v) => write!(f, "{META_FILE} has format version {v}"),
            MetaError::Length(n) => write!(f, "{META_FILE} is {n} bytes, expected {LEN}"),
            MetaError::Checksum => write!(f, "{META_FILE} checksum does not match"),
            MetaError::Flags(x) => write!(
                f,
                "{META_FILE} has flags {x:#x}, which this build does not know (written by a newer outboxkv?)"
            ),
        }
    }
}

impl std::error::Error for MetaError {}

impl StoreMeta {
    /// The file's bytes.
    pub fn encode(&self) -> [u8; LEN] {
        let mut out = [0u8; LEN];
        out[..8].copy_from_slice(MAGIC);
        out[8..12].copy_from_slice(&self.format_version.to_le_bytes());
        out[16..32].copy_from_slice(&self.store_id.0);
        let crc = crc32fast::hash(&out[..32]);
        out[32..].copy_from_slice(&crc.to_le_bytes());
        out
    }

    /// Parses the file's bytes. Never panics.
    pub fn decode(bytes: &[u8]) -> Result<StoreMeta, MetaError> {
        if bytes.len() < 12 || &bytes[..8] != MAGIC {
            return Err(MetaError::BadMagic);
        }
        let version = u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]);
        if version != FORMAT_VERSION {
            return Err(MetaError::Version(version));
        }
        if bytes.len() != LEN {
            return Err(MetaError::Length(bytes.len()));
        }
        let stored = u32::from_le_bytes([bytes[32], bytes[33], bytes[34], bytes[35]]);
        if stored != crc32fast::hash(&bytes[..32]) {
            return Err(MetaError::Checksum);
        }
        let flags = u32::from_le_bytes([bytes[12], bytes[13], bytes[14], bytes[15]]);
        if flags != 0 {
            return Err(MetaError::Flags(flags));
        }
        let mut id = [0u8; 16];
        id.copy_from_slice(&bytes[16..32]);
        Ok(StoreMeta {
            format_version: version,
            store_id: StoreId(id),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let m = StoreMeta {
            format_version: FORMAT_VERSION,
            store_id: StoreId([9; 16]),
        };
        let b = m.encode();
        assert_eq!(StoreMeta::decode(&b), Ok(m));
        let mut newer = b;
        newer[8] = 2;
        assert_eq!(StoreMeta::decode(&newer), Err(MetaError::Version(2)));
        let mut flipped = b;
        flipped[20] ^= 1;
        assert_eq!(StoreMeta::decode(&flipped), Err(MetaError::Checksum));
        assert_eq!(StoreMeta::decode(&b[..30]), Err(MetaError::Length(30)));
    }

    /// Found by the store_meta fuzz target: non-zero reserved flags with a
    /// matching checksum were accepted (and lost on re-encoding).
    #[test]
    fn unknown_flags_are_refused() {
        let crash: [u8; 36] = [
            79, 85, 84, 66, 79, 88, 75, 86, 1, 0, 0, 0, 84, 66, 79, 1, 0, 86, 1, 0, 0, 0, 10, 0,
            10, 0, 0, 0, 0, 0, 0, 3, 206, 125, 176, 189,
        ];
        assert_eq!(
            StoreMeta::decode(&crash),
            Err(MetaError::Flags(u32::from_le_bytes([84, 66, 79, 1])))
        );
    }
}
