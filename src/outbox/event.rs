//! Events as a transaction emits them.

use std::borrow::Cow;

use serde::Serialize;

use super::entry::{EventId, OutboxEntry};
use crate::error::{Error, Result};

/// Content type of [`Event::json`] payloads.
pub const JSON: &str = "application/json";
/// Content type of [`Event::bytes`] payloads unless another is set.
pub const OCTET_STREAM: &str = "application/octet-stream";

/// Longest event type, content type or header name, in bytes.
pub const MAX_NAME_LEN: usize = 255;
/// Most headers one event may carry.
pub const MAX_HEADERS: usize = 64;

/// An event to append to the outbox in a transaction (see
/// [`WriteTx::emit`](crate::WriteTx::emit)).
///
/// The payload leaves the service, so it is not bincode: [`Event::json`]
/// serializes with serde_json, [`Event::bytes`] takes bytes as they are. The
/// seq, event id and timestamp are assigned at commit.
///
/// What reaches a broker's headers is checked when the event is emitted
/// ([`WriteTx::emit`](crate::WriteTx::emit) fails with
/// [`Error::InvalidEvent`] and nothing is written): the type is 1 to 255
/// bytes without whitespace or control characters; the key, the content
/// type and header values hold no control characters (a CR/LF there could
/// forge broker headers); header names are HTTP tokens, and not names the
/// sinks set themselves (`Nats-*`, `ce-*`, `ce_*`, `content-type`,
/// `outboxkv*`, any case). `traceparent` and `tracestate` are forwarded as
/// the CloudEvents tracing extension.
///
/// ```
/// use outboxkv::Event;
/// #[derive(serde::Serialize)]
/// struct OrderPaid { id: u64 }
///
/// let event = Event::json("orders.paid", "order-42", &OrderPaid { id: 42 })?
///     .with_header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert_eq!(event.payload(), br#"{"id":42}"#);
///
/// let forged = Event::bytes("orders.paid", "k\r\nNats-Msg-Id: x", Vec::new());
/// let dir = tempfile::tempdir().map_err(|e| outboxkv::Error::abort(e))?;
/// let store = outboxkv::Store::open(dir.path())?;
/// let r = store.write(|tx| tx.emit(forged.clone()));
/// assert!(matches!(r, Err(outboxkv::Error::InvalidEvent { .. })));
/// # Ok::<(), outboxkv::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub(crate) event_type: String,
    pub(crate) key: String,
    pub(crate) content_type: Cow<'static, str>,
    pub(crate) headers: Vec<(String, String)>,
    pub(crate) payload: Vec<u8>,
    /// Set when a dead letter is replayed: the event keeps its original id
    /// and commit time.
    pub(crate) origin: Option<(EventId, u64)>,
}

impl Event {
    /// The event a dead-lettered entry is replayed as: same id, type, key,
    /// payload, headers and original time.
    pub(crate) fn replay_of(entry: OutboxEntry) -> Event {
        Event {
            event_type: entry.event_type,
            key: entry.key,
            content_type: Cow::Owned(entry.content_type),
            headers: entry.headers,
            payload: entry.payload,
            origin: Some((entry.id, entry.created_at_micros)),
        }
    }

    /// An event whose payload is `value` as JSON (`application/json`).
    ///
    /// `event_type` names what happened (`orders.paid`); `key` is the ordering
    /// key: events with the same key are delivered in commit order.
    pub fn json<T: Serialize + ?Sized>(
        event_type: impl Into<String>,
        key: impl Into<String>,
        value: &T,
    ) -> Result<Event> {
        let event_type = event_type.into();
        let payload = serde_json::to_vec(value).map_err(|e| Error::Encode {
            what: format!("JSON payload of event {event_type:?}"),
            source: Box::new(e),
        })?;
        Ok(Event {
            event_type,
            key: key.into(),
            content_type: Cow::Borrowed(JSON),
            headers: Vec::new(),
            payload,
            origin: None,
        })
    }

    /// An event with an opaque payload (`application/octet-stream` unless
    /// [`with_content_type`](Self::with_content_type) says otherwise).
    pub fn bytes(
        event_type: impl Into<String>,
        key: impl Into<String>,
        payload: impl Into<Vec<u8>>,
    ) -> Event {
        Event {
            event_type: event_type.into(),
            key: key.into(),
            content_type: Cow::Borrowed(OCTET_STREAM),
            headers: Vec::new(),
            payload: payload.into(),
            origin: None,
        }
    }

    /// Sets the payload's MIME type.
    #[must_use]
    pub fn with_content_type(mut self, content_type: impl Into<String>) -> Event {
        self.content_type = Cow::Owned(content_type.into());
        self
    }

    /// Adds a header (kept in order; names may repeat). A W3C `traceparent`
    /// header is forwarded by the broker sinks.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Event {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// The event type.
    pub fn event_type(&self) -> &str {
        &self.event_type
    }

    /// The ordering key.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The payload bytes.
    pub fn payload(&self) -> &[u8] {
        &self.payload
    }

    /// The content type.
    pub fn content_type(&self) -> &str {
        &self.content_type
    }

    /// The headers.
    pub fn headers(&self) -> &[(String, String)] {
        &self.headers
    }

    /// Size counted against the `max_event_size` limit: payload, key, type,
    /// content type and headers.
    pub fn size(&self) -> usize {
        self.payload.len()
            + self.key.len()
            + self.event_type.len()
            + self.content_type.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }

    /// Checks the rules every event must follow before it can be emitted
    /// (see [`Event`] for them): [`Error::InvalidEvent`] or
    /// [`Error::TooLarge`], and nothing is written.
    pub(crate) fn validate(&self, max_event_size: usize) -> Result<()> {
        let bad = |reason: String| {
            Err(Error::InvalidEvent {
                event_type: self.event_type.clone(),
                key: self.key.clone(),
                reason,
            })
        };
        let t = &self.event_type;
        if t.is_empty() {
            return bad("the event type is empty".into());
        }
        if t.len() > MAX_NAME_LEN {
            return bad(format!(
                "the event type is longer than {MAX_NAME_LEN} bytes"
            ));
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return bad("the event type contains whitespace or control characters".into());
        }
        if self.key.chars().any(char::is_control) {
            return bad("the key contains control characters (CR, LF, NUL, ...)".into());
        }
        let ct = &self.content_type;
        if ct.len() > MAX_NAME_LEN {
            return bad(format!(
                "the content type is longer than {MAX_NAME_LEN} bytes"
            ));
        }
        if ct.chars().any(char::is_control) {
            return bad(format!(
                "the content type {ct:?} contains control characters"
            ));
        }
        if self.headers.len() > MAX_HEADERS {
            return bad(format!(
                "{} headers, more than {MAX_HEADERS}",
                self.headers.len()
            ));
        }
        for (name, value) in &self.headers {
            if let Some(why) = header_name_problem(name) {
                return bad(format!("header {name:?}: {why}"));
            }
            if value.chars().any(char::is_control) {
                return bad(format!(
                    "the value of header {name:?} contains control characters (CR, LF, NUL, ...)"
                ));
            }
        }
        let size = self.size();
        if size > max_event_size {
            return Err(Error::TooLarge {
                what: "event",
                location: format!("event type {t:?} key {:?}", self.key),
                size,
                limit: max_event_size,
            });
        }
        Ok(())
    }
}

/// Header names the sinks set themselves (case-insensitive prefixes, then
/// whole names): an event may not set them.
const RESERVED_PREFIXES: [&str; 4] = ["nats-", "ce-", "ce_", "outboxkv"];
const RESERVED_NAMES: [&str; 1] = ["content-type"];

/// Why `name` cannot be an event's header name, if it cannot: it must be
/// 1..=255 bytes of an HTTP token (letters, digits and ``!#$%&'*+-.^_`|~``,
/// which every broker's headers accept), and not reserved.
pub fn header_name_problem(name: &str) -> Option<String> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Some(format!("a name must be 1 to {MAX_NAME_LEN} bytes"));
    }
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.bytes().all(token) {
        return Some(
            "a name may hold only letters, digits and !#$%&'*+-.^_`|~ (no spaces, colons or \
             control characters)"
                .into(),
        );
    }
    let lower = name.to_ascii_lowercase();
    if RESERVED_PREFIXES.iter().any(|p| lower.starts_with(p))
        || RESERVED_NAMES.contains(&lower.as_str())
    {
        return Some(
            "the name is reserved: the sinks set Nats-*, ce-*/ce_* (CloudEvents), \
             content-type and outboxkv* themselves"
                .into(),
        );
    }
    None
}
