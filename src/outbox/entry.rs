//! Outbox entries, event ids and the on-disk entry format.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::event::Event;

/// The random identity of a store, made once when the store is created and
/// kept in its `OUTBOXKV` file. Event ids are derived from it, which makes
/// them unique across stores.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StoreId(pub [u8; 16]);

impl StoreId {
    /// A fresh random id from the operating system's generator.
    pub fn random() -> std::io::Result<Self> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(StoreId(bytes))
    }
}

impl fmt::Display for StoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for StoreId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreId({self})")
    }
}

impl FromStr for StoreId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, ParseIdError> {
        if s.len() != 32 || !s.is_ascii() {
            return Err(ParseIdError("store id must be 32 hex digits"));
        }
        let mut out = [0u8; 16];
        for (i, byte) in out.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16)
                .map_err(|_| ParseIdError("store id must be 32 hex digits"))?;
        }
        Ok(StoreId(out))
    }
}

/// Why a string is not a valid [`StoreId`] or [`EventId`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseIdError(&'static str);

impl fmt::Display for ParseIdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for ParseIdError {}

/// The globally unique id of an event: the id of the store that committed it
/// and the outbox sequence number it was first given.
///
/// It is fixed at commit and never changes: a retry, a relay restart or a
/// dead-letter replay (which gives the entry a new seq) ships the same id, so
/// brokers that deduplicate by id (JetStream's `Nats-Msg-Id`) see a duplicate.
/// Its text form is `<32 hex digits of the store id>-<seq in decimal>`.
///
/// ```
/// use outboxkv::{EventId, StoreId};
/// let id = EventId { store: StoreId([0xab; 16]), seq: 42 };
/// assert_eq!(id.to_string(), "abababababababababababababababab-42");
/// assert_eq!(id.to_string().parse::<EventId>().unwrap(), id);
/// ```
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId {
    /// The store that committed the event.
    pub store: StoreId,
    /// The seq the event was committed with.
    pub seq: u64,
}

impl fmt::Display for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.store, self.seq)
    }
}

impl fmt::Debug for EventId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "EventId({self})")
    }
}

impl FromStr for EventId {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, ParseIdError> {
        let (store, seq) = s
            .split_once('-')
            .ok_or(ParseIdError("event id must be <store id>-<seq>"))?;
        let seq = seq
            .parse()
            .map_err(|_| ParseIdError("event id seq must be a decimal u64"))?;
        Ok(EventId {
            store: store.parse()?,
            seq,
        })
    }
}

/// Microseconds since the Unix epoch (0 if the clock is before it): the
/// timestamps of entries and dead letters.
pub(crate) fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

/// One committed event as the outbox holds it.
///
/// Read with [`Outbox::read`](crate::Outbox::read); what the relay ships.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxEntry {
    /// Position in the outbox: strictly increasing in commit order, gap-free.
    pub seq: u64,
    /// Globally unique, stable event id (see [`EventId`]).
    pub id: EventId,
    /// Event type, e.g. `orders.paid`.
    pub event_type: String,
    /// Ordering / partition key: events with the same key are delivered in seq order.
    pub key: String,
    /// MIME type of the payload, e.g. `application/json`.
    pub content_type: String,
    /// The event's own headers, in the order they were added.
    pub headers: Vec<(String, String)>,
    /// The payload bytes, exactly as given to [`Event`].
    pub payload: Vec<u8>,
    /// Commit time, microseconds since the Unix epoch.
    pub created_at_micros: u64,
}

impl OutboxEntry {
    /// Commit time as a `SystemTime`.
    pub fn created_at(&self) -> SystemTime {
        UNIX_EPOCH + Duration::from_micros(self.created_at_micros)
    }

    /// The value of the first header named `name` (exact match), if any.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Approximate size in bytes, used for batch byte limits.
    pub fn size_hint(&self) -> usize {
        self.payload.len()
            + self.event_type.len()
            + self.key.len()
            + self.content_type.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
            + 48
    }

    /// Encodes this entry in the on-disk format (see [`decode_entry`]).
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.size_hint() + 16);
        encode_parts(
            &mut out,
            self.seq,
            self.id,
            self.created_at_micros,
            EntryFields {
                event_type: &self.event_type,
                key: &self.key,
                content_type: &self.content_type,
                headers: &self.headers,
                payload: &self.payload,
            },
        );
        out
    }
}

/// Version byte of the current entry format.
pub const ENTRY_VERSION: u8 = 1;

/// Bytes of an encoded entry besides its strings, payload and headers (see
/// [`encode_parts`]); each header adds 6 more.
pub(crate) const ENTRY_OVERHEAD: usize = 1 + 4 + 8 + 16 + 8 + 8 + 2 + 4 + 2 + 2 + 4;

pub(crate) struct EntryFields<'a> {
    pub event_type: &'a str,
    pub key: &'a str,
    pub content_type: &'a str,
    pub headers: &'a [(String, String)],
    pub payload: &'a [u8],
}

impl<'a> From<&'a Event> for EntryFields<'a> {
    fn from(e: &'a Event) -> Self {
        EntryFields {
            event_type: &e.event_type,
            key: &e.key,
            content_type: &e.content_type,
            headers: &e.headers,
            payload: &e.payload,
        }
    }
}

fn put_str16(out: &mut Vec<u8>, s: &str) {
    // Lengths were validated when the event was built (see Event::validate).
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_bytes32(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_be_bytes());
    out.extend_from_slice(b);
}

/// Writes an entry in the on-disk format.
///
/// ```text
/// version u8 = 1 | crc32 LE u32 over everything after it
/// seq u64 | store id [16] | origin seq u64 | created_at_micros u64
/// type (u16 len + UTF-8) | key (u32 len + UTF-8) | content type (u16 len + UTF-8)
/// header count u16, each: name (u16 len + UTF-8), value (u32 len + UTF-8)
/// payload (u32 len + bytes)
/// ```
/// All integers after the CRC are big-endian.
pub(crate) fn encode_parts(
    out: &mut Vec<u8>,
    seq: u64,
    id: EventId,
    created_at_micros: u64,
    f: EntryFields<'_>,
) {
    let start = out.len();
    out.push(ENTRY_VERSION);
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&seq.to_be_bytes());
    out.extend_from_slice(&id.store.0);
    out.extend_from_slice(&id.seq.to_be_bytes());
    out.extend_from_slice(&created_at_micros.to_be_bytes());
    put_str16(out, f.event_type);
    put_bytes32(out, f.key.as_bytes());
    put_str16(out, f.content_type);
    out.extend_from_slice(&(f.headers.len() as u16).to_be_bytes());
    for (name, value) in f.headers {
        put_str16(out, name);
        put_bytes32(out, value.as_bytes());
    }
    put_bytes32(out, f.payload);
    let crc = crc32fast::hash(&out[start + 5..]);
    out[start + 1..start + 5].copy_from_slice(&crc.to_le_bytes());
}

/// Why stored entry bytes are not a valid entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct EntryDecodeError(pub String);

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize, what: &str) -> Result<&'a [u8], EntryDecodeError> {
        if self.0.len() < n {
            return Err(EntryDecodeError(format!(
                "{what}: needs {n} bytes, {} left",
                self.0.len()
            )));
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(head)
    }
    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], EntryDecodeError> {
        let b = self.bytes(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(b);
        Ok(a)
    }
    fn u16(&mut self, what: &str) -> Result<u16, EntryDecodeError> {
        Ok(u16::from_be_bytes(self.array(what)?))
    }
    fn u32(&mut self, what: &str) -> Result<u32, EntryDecodeError> {
        Ok(u32::from_be_bytes(self.array(what)?))
    }
    fn u64(&mut self, what: &str) -> Result<u64, EntryDecodeError> {
        Ok(u64::from_be_bytes(self.array(what)?))
    }
    fn string(&mut self, len: usize, what: &str) -> Result<String, EntryDecodeError> {
        // `bytes` checks the length against what is left before anything is allocated.
        let b = self.bytes(len, what)?;
        String::from_utf8(b.to_vec()).map_err(|_| EntryDecodeError(format!("{what} is not UTF-8")))
    }
    fn str16(&mut self, what: &str) -> Result<String, EntryDecodeError> {
        let n = self.u16(what)? as usize;
        self.string(n, what)
    }
    fn str32(&mut self, what: &str) -> Result<String, EntryDecodeError> {
        let n = self.u32(what)? as usize;
        self.string(n, what)
    }
}

/// Decodes an entry written by [`OutboxEntry::encode`]. Never panics and never
/// allocates more than the input's length, whatever the bytes.
pub fn decode_entry(bytes: &[u8]) -> Result<OutboxEntry, EntryDecodeError> {
    let Some((header, body)) = bytes.split_first_chunk::<5>() else {
        return Err(EntryDecodeError(format!(
            "entry is {} bytes, shorter than its header",
            bytes.len()
        )));
    };
    if header[0] != ENTRY_VERSION {
        return Err(EntryDecodeError(format!(
            "unknown entry format version {}",
            header[0]
        )));
    }
    let stored = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let computed = crc32fast::hash(body);
    if stored != computed {
        return Err(EntryDecodeError(format!(
            "checksum mismatch: stored crc32 {stored:#010x}, computed {computed:#010x}"
        )));
    }
    let mut r = Reader(body);
    let seq = r.u64("seq")?;
    let store = StoreId(r.array("store id")?);
    let origin = r.u64("event id seq")?;
    let created_at_micros = r.u64("created_at")?;
    let event_type = r.str16("event type")?;
    let key = r.str32("key")?;
    let content_type = r.str16("content type")?;
    let count = r.u16("header count")? as usize;
    let mut headers = Vec::with_capacity(count.min(r.0.len() / 6));
    for _ in 0..count {
        let name = r.str16("header name")?;
        let value = r.str32("header value")?;
        headers.push((name, value));
    }
    let n = r.u32("payload length")? as usize;
    let payload = r.bytes(n, "payload")?.to_vec();
    if !r.0.is_empty() {
        return Err(EntryDecodeError(format!(
            "{} unexpected bytes after the payload",
            r.0.len()
        )));
    }
    Ok(OutboxEntry {
        seq,
        id: EventId { store, seq: origin },
        event_type,
        key,
        content_type,
        headers,
        payload,
        created_at_micros,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> OutboxEntry {
        OutboxEntry {
            seq: 7,
            id: EventId {
                store: StoreId([3; 16]),
                seq: 5,
            },
            event_type: "orders.paid".into(),
            key: "order-42".into(),
            content_type: "application/json".into(),
            headers: vec![("traceparent".into(), "00-abc".into())],
            payload: b"{\"id\":42}".to_vec(),
            created_at_micros: 1_700_000_000_000_000,
        }
    }

    #[test]
    fn round_trip() {
        let e = sample();
        assert_eq!(decode_entry(&e.encode()).unwrap(), e);
    }

    #[test]
    fn overhead_is_the_encoded_size_besides_the_fields() {
        let e = sample();
        let fields: usize = e.event_type.len()
            + e.key.len()
            + e.content_type.len()
            + e.payload.len()
            + e.headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        assert_eq!(
            e.encode().len(),
            ENTRY_OVERHEAD + 6 * e.headers.len() + fields
        );
    }

    #[test]
    fn every_truncation_and_bit_flip_is_an_error() {
        let bytes = sample().encode();
        for cut in 0..bytes.len() {
            assert!(decode_entry(&bytes[..cut]).is_err());
        }
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 1;
            assert!(decode_entry(&bad).is_err(), "flip at {i}");
        }
    }
}
