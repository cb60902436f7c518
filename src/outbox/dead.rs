//! Dead letters: outbox entries the relay gave up on, with why.

use super::entry::{EntryDecodeError, OutboxEntry, decode_entry};

/// An entry the relay could not deliver (the broker rejected it for good, or
/// after the configured number of attempts), kept with the error.
///
/// Dead letters are written atomically with advancing past the entry, so an
/// entry is always either in the outbox or in the dead-letter table. They can
/// be listed, replayed (appended to the outbox again with the same event id,
/// so a deduplicating broker still recognises it) and purged; see
/// [`DeadLetters`](crate::DeadLetters).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The entry as it was in the outbox (its `seq` is the dead letter's key).
    pub entry: OutboxEntry,
    /// The last error, as the sink reported it.
    pub error: String,
    /// How many times delivery was attempted.
    pub attempts: u32,
    /// When the first attempt failed, microseconds since the Unix epoch.
    pub first_failed_micros: u64,
    /// When the entry was moved to the dead-letter table.
    pub dead_at_micros: u64,
}

/// Version byte of the dead-letter format.
pub const DEAD_LETTER_VERSION: u8 = 1;
/// Longest error text kept with a dead letter (longer ones are truncated).
pub const MAX_ERROR_LEN: usize = 64 << 10;

impl DeadLetter {
    /// Encodes the dead letter:
    ///
    /// ```text
    /// version u8 = 1 | crc32 LE u32 over everything after it
    /// attempts u32 | first_failed_micros u64 | dead_at_micros u64
    /// error (u32 len + UTF-8) | the entry in its own format (rest)
    /// ```
    /// Integers after the CRC are big-endian.
    pub fn encode(&self) -> Vec<u8> {
        let entry = self.entry.encode();
        let mut out = Vec::with_capacity(entry.len() + self.error.len() + 32);
        out.push(DEAD_LETTER_VERSION);
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.attempts.to_be_bytes());
        out.extend_from_slice(&self.first_failed_micros.to_be_bytes());
        out.extend_from_slice(&self.dead_at_micros.to_be_bytes());
        let error = truncate(&self.error, MAX_ERROR_LEN);
        out.extend_from_slice(&(error.len() as u32).to_be_bytes());
        out.extend_from_slice(error.as_bytes());
        out.extend_from_slice(&entry);
        let crc = crc32fast::hash(&out[5..]);
        out[1..5].copy_from_slice(&crc.to_le_bytes());
        out
    }
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Why stored dead-letter bytes are not a valid dead letter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DeadLetterDecodeError(pub String);

impl From<EntryDecodeError> for DeadLetterDecodeError {
    fn from(e: EntryDecodeError) -> Self {
        DeadLetterDecodeError(format!("entry: {}", e.0))
    }
}

/// Decodes a dead letter. Never panics, whatever the bytes.
pub fn decode_dead_letter(bytes: &[u8]) -> Result<DeadLetter, DeadLetterDecodeError> {
    let err = |s: &str| DeadLetterDecodeError(s.to_string());
    let Some((header, body)) = bytes.split_first_chunk::<5>() else {
        return Err(err("dead letter shorter than its header"));
    };
    if header[0] != DEAD_LETTER_VERSION {
        return Err(DeadLetterDecodeError(format!(
            "unknown dead-letter format version {}",
            header[0]
        )));
    }
    if u32::from_le_bytes([header[1], header[2], header[3], header[4]]) != crc32fast::hash(body) {
        return Err(err("dead-letter checksum mismatch"));
    }
    let Some((fixed, rest)) = body.split_first_chunk::<24>() else {
        return Err(err("dead letter ends early"));
    };
    let attempts = u32::from_be_bytes([fixed[0], fixed[1], fixed[2], fixed[3]]);
    let mut first = [0u8; 8];
    first.copy_from_slice(&fixed[4..12]);
    let mut dead = [0u8; 8];
    dead.copy_from_slice(&fixed[12..20]);
    let len = u32::from_be_bytes([fixed[20], fixed[21], fixed[22], fixed[23]]) as usize;
    if len > MAX_ERROR_LEN {
        return Err(err(
            "dead-letter error text is longer than the format allows",
        ));
    }
    if rest.len() < len {
        return Err(err("dead-letter error text ends early"));
    }
    let (error, entry) = rest.split_at(len);
    let error =
        String::from_utf8(error.to_vec()).map_err(|_| err("dead-letter error is not UTF-8"))?;
    Ok(DeadLetter {
        entry: decode_entry(entry)?,
        error,
        attempts,
        first_failed_micros: u64::from_be_bytes(first),
        dead_at_micros: u64::from_be_bytes(dead),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::entry::{EventId, StoreId};

    #[test]
    fn round_trip_and_damage() {
        let d = DeadLetter {
            entry: OutboxEntry {
                seq: 9,
                id: EventId {
                    store: StoreId([1; 16]),
                    seq: 9,
                },
                event_type: "t".into(),
                key: "k".into(),
                content_type: "application/json".into(),
                headers: vec![],
                payload: b"{}".to_vec(),
                created_at_micros: 5,
            },
            error: "message too large".into(),
            attempts: 3,
            first_failed_micros: 10,
            dead_at_micros: 20,
        };
        let b = d.encode();
        assert_eq!(decode_dead_letter(&b), Ok(d));
        for i in 0..b.len() {
            let mut bad = b.clone();
            bad[i] ^= 4;
            assert!(decode_dead_letter(&bad).is_err());
            assert!(decode_dead_letter(&b[..i]).is_err());
        }
    }
}
