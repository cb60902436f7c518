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
/// ```
/// use outboxkv::Event;
/// #[derive(serde::Serialize)]
/// struct OrderPaid { id: u64 }
///
/// let event = Event::json("orders.paid", "order-42", &OrderPaid { id: 42 })?
///     .with_header("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
/// assert_eq!(event.payload(), br#"{"id":42}"#);
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

    /// Checks the rules every event must follow before it can be emitted.
    pub(crate) fn validate(&self, max_event_size: usize) -> Result<()> {
        let bad = |why: String| Err(Error::InvalidArgument(why));
        let t = &self.event_type;
        if t.is_empty() {
            return bad("event type is empty".into());
        }
        if t.len() > MAX_NAME_LEN {
            return bad(format!(
                "event type {t:?} is longer than {MAX_NAME_LEN} bytes"
            ));
        }
        if t.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return bad(format!(
                "event type {t:?} contains whitespace or control characters"
            ));
        }
        if self.content_type.len() > MAX_NAME_LEN {
            return bad(format!(
                "content type of event {t:?} is longer than {MAX_NAME_LEN} bytes"
            ));
        }
        if self.headers.len() > MAX_HEADERS {
            return bad(format!(
                "event {t:?} has {} headers, more than {MAX_HEADERS}",
                self.headers.len()
            ));
        }
        for (name, _) in &self.headers {
            if name.is_empty() || name.len() > MAX_NAME_LEN {
                return bad(format!(
                    "event {t:?} has a header name of {} bytes (1..={MAX_NAME_LEN})",
                    name.len()
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
