//! Outbox entries, event ids and the on-disk entry format.

use std::fmt;
use std::str::FromStr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::event::Event;
use crate::invariant::invariant;

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
    /// 32 lowercase hex digits. Written in one go: it is part of every
    /// event id a sink sends.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HEX: &[u8; 16] = b"0123456789abcdef";
        let mut out = [0u8; 32];
        for (i, b) in self.0.iter().enumerate() {
            out[2 * i] = HEX[usize::from(b >> 4)];
            out[2 * i + 1] = HEX[usize::from(b & 0xf)];
        }
        // Only ASCII hex digits were written.
        f.write_str(std::str::from_utf8(&out).map_err(|_| fmt::Error)?)
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

/// Highest seq a store assigns: far beyond any real use, and low enough
/// that seq arithmetic (`seq + 1`, `head + 1`) cannot overflow. A seq above
/// it read from disk or a file is reported as corruption.
pub(crate) const MAX_SEQ: u64 = 1 << 62;

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

    /// Encodes this entry in the on-disk format (described in
    /// `docs/design.md`, "Record formats").
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
    let start = encode_unchecked(out, seq, id, created_at_micros, f);
    let crc = crc32fast::hash(&out[start + 5..]);
    out[start + 1..start + 5].copy_from_slice(&crc.to_le_bytes());
}

/// [`encode_parts`] without the CRC (left zero); returns where the entry
/// starts in `out`.
fn encode_unchecked(
    out: &mut Vec<u8>,
    seq: u64,
    id: EventId,
    created_at_micros: u64,
    f: EntryFields<'_>,
) -> usize {
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
    start
}

/// Where, in an encoded entry, the fields start that a commit learns only
/// once it is ordered: the seq, then (16 bytes of store id later) the event
/// id's seq and the creation time. The CRC covers everything from `SEQ_AT`
/// on.
const SEQ_AT: usize = 5;
const ID_SEQ_AT: usize = SEQ_AT + 8 + 16;
const CREATED_AT: usize = ID_SEQ_AT + 8;
/// End of the fixed-width fields (seq, store id, origin seq, created at).
const FIXED_END: usize = CREATED_AT + 8;
/// Entries whose variable part is longer than this get its CRC computed
/// when they are encoded, and sealing combines it with the CRC of the fixed
/// fields; shorter ones are simply checksummed whole when sealed (cheaper
/// than a CRC combination).
const COMBINE_ABOVE: usize = 4096;

/// One entry encoded before its commit was ordered, in
/// [`EncodedEntries::buf`]: every byte but its seq (and, for an event of
/// this store, its event id's seq and creation time) and its CRC, which
/// [`EncodedEntries::seal`] fills in. Large entries carry the CRC of their
/// variable part, so sealing costs the same for a 10 MiB entry as for a
/// small one.
#[derive(Debug, Clone, Copy)]
struct Unsealed {
    start: usize,
    len: usize,
    /// CRC of the bytes after the fixed-width fields, for large entries.
    rest_crc: Option<u32>,
    /// The event is this store's own (not a replay): its id is
    /// `(this store, seq)` and its time the commit's.
    own: bool,
}

/// A commit's outbox entries, encoded outside the commit pipeline's lock
/// (see `store::commit`) and sealed with their seqs once the commit is
/// ordered.
#[derive(Debug, Default)]
pub(crate) struct EncodedEntries {
    buf: Vec<u8>,
    /// The first entry, kept inline: most commits emit one event, and need
    /// no second allocation then.
    first: Option<Unsealed>,
    more: Vec<Unsealed>,
}

thread_local! {
    /// A buffer a sealed commit gave back, for the next commit this thread
    /// encodes (a thread that leads its own commits allocates none).
    static SPARE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Buffers larger than this are freed, not kept as the spare.
const SPARE_MAX: usize = 64 << 10;

impl EncodedEntries {
    /// Encodes `events` for the store `store` (replayed events keep their
    /// own id and time).
    pub(crate) fn encode(events: &[Event], store: StoreId) -> Self {
        if events.is_empty() {
            return EncodedEntries::default();
        }
        let size: usize = events
            .iter()
            .map(|e| ENTRY_OVERHEAD + 6 * e.headers.len() + e.size())
            .sum();
        // `try_with`: during thread exit the spare may be gone already.
        let mut buf = SPARE.try_with(std::cell::Cell::take).unwrap_or_default();
        buf.clear();
        buf.reserve(size);
        let mut first = None;
        let mut more = Vec::with_capacity(events.len().saturating_sub(1));
        for event in events {
            let (id, at, own) = match event.origin {
                Some((id, at)) => (id, at, false),
                None => (EventId { store, seq: 0 }, 0, true),
            };
            let start = encode_unchecked(&mut buf, 0, id, at, EntryFields::from(event));
            let rest = &buf[start + FIXED_END..];
            let entry = Unsealed {
                start,
                len: buf.len() - start,
                rest_crc: (rest.len() > COMBINE_ABOVE).then(|| crc32fast::hash(rest)),
                own,
            };
            if first.is_none() {
                first = Some(entry);
            } else {
                more.push(entry);
            }
        }
        EncodedEntries { buf, first, more }
    }

    /// Bytes of the encoded entries.
    pub(crate) fn bytes(&self) -> usize {
        self.buf.len()
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        usize::from(self.first.is_some()) + self.more.len()
    }

    /// Gives the entries seqs `first..` (and this store's own events the
    /// creation time `created_at_micros`), fixes their CRCs, and hands each
    /// `(seq, bytes)` to `put`, in seq order. Call it once. `false` (no
    /// entry handed over) if an entry lies outside the buffer, which would
    /// be a bug: the caller must then fail the commit, not leave a hole.
    #[must_use]
    pub(crate) fn seal(
        &mut self,
        first: u64,
        created_at_micros: u64,
        mut put: impl FnMut(u64, &[u8]),
    ) -> bool {
        if self.first.is_none() {
            return true;
        }
        let fits = self
            .first
            .iter()
            .chain(&self.more)
            .all(|u| u.start + u.len <= self.buf.len() && u.len >= FIXED_END);
        invariant!(fits, "an entry lies outside its commit's buffer");
        if !fits {
            return false;
        }
        for (i, u) in self.first.iter().chain(&self.more).enumerate() {
            let seq = first + i as u64;
            let Some(entry) = self.buf.get_mut(u.start..u.start + u.len) else {
                continue;
            };
            entry[SEQ_AT..SEQ_AT + 8].copy_from_slice(&seq.to_be_bytes());
            if u.own {
                entry[ID_SEQ_AT..ID_SEQ_AT + 8].copy_from_slice(&seq.to_be_bytes());
                entry[CREATED_AT..FIXED_END].copy_from_slice(&created_at_micros.to_be_bytes());
            }
            let crc = match u.rest_crc {
                None => crc32fast::hash(&entry[SEQ_AT..]),
                Some(rest) => {
                    let mut crc = crc32fast::Hasher::new();
                    crc.update(&entry[SEQ_AT..FIXED_END]);
                    crc.combine(&crc32fast::Hasher::new_with_initial_len(
                        rest,
                        (u.len - FIXED_END) as u64,
                    ));
                    crc.finalize()
                }
            };
            entry[1..SEQ_AT].copy_from_slice(&crc.to_le_bytes());
            put(seq, entry);
        }
        // The bytes are in the write batch now: keep the buffer for reuse
        // (unless the thread is exiting and its spare is gone).
        self.first = None;
        self.more.clear();
        let buf = std::mem::take(&mut self.buf);
        if buf.capacity() <= SPARE_MAX {
            let _ = SPARE.try_with(|spare| spare.set(buf));
        }
        true
    }

    /// About the bytes these events' entries add to a RocksDB write batch.
    pub(crate) fn batch_bytes(events: &[Event]) -> usize {
        events.iter().map(Self::entry_batch_bytes).sum()
    }

    /// About the bytes one event's entry adds to a write batch: the record
    /// (tag, column family, two lengths), the 8-byte key and the entry.
    pub(crate) fn entry_batch_bytes(event: &Event) -> usize {
        const RECORD: usize = 12;
        RECORD + 8 + ENTRY_OVERHEAD + 6 * event.headers.len() + event.size()
    }
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
    fn sealed_entries_equal_entries_encoded_with_their_seq() {
        let store = StoreId([9; 16]);
        let replayed = Event::replay_of(sample());
        let events = vec![
            Event::bytes("a", "k1", vec![1, 2, 3]).with_header("h", "v"),
            replayed,
            Event::bytes("b", "k2", vec![7; 100_000]),
        ];
        let mut enc = EncodedEntries::encode(&events, store);
        assert_eq!(enc.len(), 3);
        let mut sealed = Vec::new();
        assert!(enc.seal(40, 1234, |seq, bytes| sealed.push((seq, bytes.to_vec()))));
        assert_eq!(sealed.len(), 3);
        for (i, (seq, bytes)) in sealed.iter().enumerate() {
            assert_eq!(*seq, 40 + i as u64);
            let e = decode_entry(bytes).expect("a sealed entry decodes");
            assert_eq!(e.seq, *seq);
            let (id, at) = events[i]
                .origin
                .unwrap_or((EventId { store, seq: *seq }, 1234));
            assert_eq!((e.id, e.created_at_micros), (id, at));
            let mut plain = Vec::new();
            encode_parts(&mut plain, *seq, id, at, EntryFields::from(&events[i]));
            assert_eq!(bytes, &plain, "entry {i}");
        }
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

    fn spare_capacity() -> usize {
        let v = SPARE.take();
        let c = v.capacity();
        SPARE.set(v);
        c
    }

    /// Sealing a commit without events (a group member with writes only)
    /// keeps the spare buffer the previous member gave back.
    #[test]
    fn sealing_an_event_less_commit_keeps_the_spare() {
        let store = StoreId([1; 16]);
        // Group member 1: one event.
        let mut a = EncodedEntries::encode(&[Event::bytes("a", "k", vec![0; 1000])], store);
        assert!(a.seal(1, 0, |_, _| {}));
        let kept = spare_capacity();
        assert!(kept >= 1000, "the sealed buffer became the spare");
        // Group member 2: writes only, no events (EncodedEntries::default()).
        let mut none = EncodedEntries::encode(&[], store);
        assert!(none.seal(2, 0, |_, _| {}));
        assert_eq!(
            spare_capacity(),
            kept,
            "an event-less commit's empty buffer replaced the spare"
        );
    }
}
