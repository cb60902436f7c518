//! [`Message`]: one message as a broker delivered it, and the CloudEvents
//! attributes read from it ([`CloudEvent`]).
//!
//! Decoding never panics and never fails the message: what cannot be read
//! as a CloudEvent leaves [`Message::event`] empty and says why in
//! [`Message::event_error`]; the handler decides (and a handler error
//! dead-letters the message after its attempts). The decoder is fuzzed
//! (`fuzz/fuzz_targets/inbox_message.rs`).

use std::collections::BTreeMap;
use std::time::Instant;

use serde_json::Value;

use crate::outbox::entry::EventId;

/// Longest body the CloudEvents decoder looks into (larger bodies are still
/// delivered, undecoded): 16 MiB.
const MAX_DECODE: usize = 16 << 20;

/// The CloudEvents 1.0 attributes of a message, structured (JSON body) or
/// binary (`ce_` / `ce-` headers) mode.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
#[non_exhaustive]
pub struct CloudEvent {
    /// `id`.
    pub id: String,
    /// `source`.
    pub source: String,
    /// `type`.
    pub event_type: String,
    /// `subject`, when present.
    pub subject: Option<String>,
    /// `time` as sent (RFC 3339), when present.
    pub time: Option<String>,
    /// `datacontenttype`, when present.
    pub data_content_type: Option<String>,
    /// Every other attribute (extensions such as `traceparent`,
    /// `correlationid`, `outboxseq`), as strings.
    pub extensions: BTreeMap<String, String>,
    /// The event data: `data_base64` decoded, a JSON `data` as JSON text, a
    /// string `data` of a non-JSON content type as its text; the body in
    /// binary mode.
    pub data: Vec<u8>,
}

impl CloudEvent {
    /// The id of the outboxkv event this is, when it was published by an
    /// outboxkv relay (`source` `outboxkv:<store id>`, `id`
    /// `<store id>-<seq>` of that store).
    pub fn outboxkv_id(&self) -> Option<EventId> {
        let store = self.source.strip_prefix("outboxkv:")?;
        let id: EventId = self.id.parse().ok()?;
        (id.store.to_string() == store).then_some(id)
    }
}

/// One message as delivered by a broker, with where it sits in its stream.
///
/// The readers ([`NatsReader`](crate::inbox::nats::NatsReader),
/// [`KafkaReader`](crate::inbox::kafka::KafkaReader)) build these; a reader
/// of another broker builds them with [`Message::new`].
///
/// ```
/// use outboxkv::inbox::Message;
/// let msg = Message::new("orders", 3, 41, br#"{"id":7}"#.to_vec())
///     .with_header("content-type", "application/json");
/// assert_eq!(msg.data(), br#"{"id":7}"#);
/// assert!(msg.event.is_none());
/// ```
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct Message {
    /// The stream: the JetStream stream, the Kafka topic.
    pub stream: String,
    /// The partition: the Kafka partition; 0 for JetStream.
    pub partition: u32,
    /// The position in the partition: the Kafka offset, the JetStream
    /// stream sequence.
    pub position: u64,
    /// The NATS subject; the Kafka topic.
    pub subject: String,
    /// The Kafka message key; `None` for NATS.
    pub key: Option<Vec<u8>>,
    /// The broker headers, in order, values as sent.
    pub headers: Vec<(String, Vec<u8>)>,
    /// The body as delivered.
    pub body: Vec<u8>,
    /// Which attempt at this message this is, from 1: the broker's delivery
    /// count (JetStream) or the reader's own count, whichever is higher.
    pub attempt: u32,
    /// The CloudEvents attributes, when the message is a CloudEvent.
    pub event: Option<CloudEvent>,
    /// Why a message that looks like a CloudEvent could not be read as one.
    pub event_error: Option<String>,
    /// Every position of this partition below this one is known to be done
    /// (applied, skipped or dead-lettered) or not for this consumer. Kafka:
    /// the message's own offset (partitions are applied in order);
    /// JetStream: the consumer's acknowledgement floor + 1.
    pub(crate) done_below: u64,
    /// Every position in `done_from..position` is known to hold nothing
    /// this consumer has yet to apply (a filtered JetStream consumer's
    /// skipped sequences): marked done with this message. Default: the
    /// message's own position (nothing known).
    pub(crate) done_from: u64,
    /// When the reader received it.
    pub(crate) received: Instant,
}

impl Message {
    /// A message at `position` of `partition` of `stream`, first attempt,
    /// body `body`. Positions of one partition are taken as applied in
    /// order: once this one is applied, every lower position counts as
    /// done (see [`Message::with_done_below`] for sources that deliver out
    /// of order).
    pub fn new(stream: impl Into<String>, partition: u32, position: u64, body: Vec<u8>) -> Self {
        let stream = stream.into();
        Message {
            subject: stream.clone(),
            stream,
            partition,
            position,
            key: None,
            headers: Vec::new(),
            body,
            attempt: 1,
            event: None,
            event_error: None,
            done_below: position,
            done_from: position,
            received: Instant::now(),
        }
    }

    /// Adds a header and decodes the CloudEvents attributes again.
    #[must_use]
    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self.decode();
        self
    }

    /// Sets the key.
    #[must_use]
    pub fn with_key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Sets the subject (default: the stream name).
    #[must_use]
    pub fn with_subject(mut self, subject: impl Into<String>) -> Self {
        self.subject = subject.into();
        self
    }

    /// Sets the attempt number (from 1).
    #[must_use]
    pub fn with_attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt.max(1);
        self
    }

    /// For sources that deliver a partition out of order (redeliveries,
    /// several unacknowledged at once): only positions below `floor` are
    /// known done once this message is applied; the inbox then keeps this
    /// position, and the others done above the floor, until a later message
    /// brings a higher floor. Default: the message's own position.
    #[must_use]
    pub fn with_done_below(mut self, floor: u64) -> Self {
        self.done_below = floor.min(self.position);
        self
    }

    /// For sources that know a stretch of positions just below this
    /// message holds nothing for the consumer that is not done: marks
    /// `first..position` done with it, so out-of-order completion is kept
    /// as one range rather than a position per message (see
    /// [`Position`](super::Position)). Never set it past a position that
    /// may still be delivered: that message would be skipped. Default: the
    /// message's own position (nothing).
    #[must_use]
    pub fn with_done_from(mut self, first: u64) -> Self {
        self.done_from = first.min(self.position);
        self
    }

    /// The event data when the message is a CloudEvent, else the body.
    pub fn data(&self) -> &[u8] {
        match &self.event {
            Some(e) => &e.data,
            None => &self.body,
        }
    }

    /// The first header named `name` (ASCII case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// The id this message's effects are caused by: the CloudEvents id, or
    /// `<stream>/<partition>/<position>` for a message without one.
    pub fn causation_id(&self) -> String {
        match &self.event {
            Some(e) if !e.id.is_empty() => e.id.clone(),
            _ => format!("{}/{}/{}", self.stream, self.partition, self.position),
        }
    }

    /// The correlation id: the message's own `correlationid` (extension or
    /// header), else its causation id (it starts a conversation).
    pub fn correlation_id(&self) -> String {
        if let Some(c) = self
            .event
            .as_ref()
            .and_then(|e| e.extensions.get("correlationid"))
            .filter(|c| !c.is_empty())
        {
            return c.clone();
        }
        if let Some(c) = self
            .header("correlationid")
            .and_then(|v| std::str::from_utf8(v).ok())
            .filter(|c| !c.is_empty())
        {
            return c.to_string();
        }
        self.causation_id()
    }

    /// The W3C `traceparent` of the message (extension or header), when
    /// well-formed.
    pub fn traceparent(&self) -> Option<&str> {
        let ext = self
            .event
            .as_ref()
            .and_then(|e| e.extensions.get("traceparent"))
            .map(String::as_str);
        let header = || {
            self.header("traceparent")
                .and_then(|v| std::str::from_utf8(v).ok())
        };
        ext.or_else(header)
            .filter(|t| parse_traceparent(t).is_some())
    }

    /// Decodes the CloudEvents attributes from the headers and body.
    pub(crate) fn decode(&mut self) {
        match decode_cloudevent(&self.headers, &self.body) {
            Ok(event) => {
                self.event = event;
                self.event_error = None;
            }
            Err(why) => {
                self.event = None;
                self.event_error = Some(why);
            }
        }
    }
}

/// The trace id and flags of a W3C `traceparent` (`00-<32 hex>-<16 hex>-<2
/// hex>`, ids not all zero).
pub(crate) fn parse_traceparent(t: &str) -> Option<(&str, &str)> {
    let mut parts = t.split('-');
    let (version, trace, span, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let ok = parts.next().is_none()
        && version == "00"
        && hex(trace, 32)
        && hex(span, 16)
        && hex(flags, 2)
        && trace.bytes().any(|b| b != b'0')
        && span.bytes().any(|b| b != b'0');
    ok.then_some((trace, flags))
}

/// The CloudEvent in `headers` and `body`: `Ok(None)` for a message that is
/// not one, `Err` for one that claims to be and is broken.
///
/// Structured mode: a `content-type` of `application/cloudevents+json`, or
/// no content type and a JSON object body with a `specversion`. Binary
/// mode: a `ce_specversion` (Kafka) or `ce-specversion` (NATS, values
/// percent-encoded) header.
pub fn decode_cloudevent(
    headers: &[(String, Vec<u8>)],
    body: &[u8],
) -> Result<Option<CloudEvent>, String> {
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    };
    let content_type = header("content-type").map(|v| String::from_utf8_lossy(v).into_owned());
    let structured_type = content_type
        .as_deref()
        .is_some_and(|c| c.trim_start().starts_with("application/cloudevents+json"));
    let binary = headers.iter().find_map(|(n, _)| {
        let lower = n.to_ascii_lowercase();
        if lower == "ce_specversion" {
            Some(("ce_", false))
        } else if lower == "ce-specversion" {
            Some(("ce-", true))
        } else {
            None
        }
    });
    if let Some((prefix, percent)) = binary
        && !structured_type
    {
        return decode_binary(headers, body, prefix, percent, content_type).map(Some);
    }
    let looks_structured = structured_type
        || (content_type.is_none() && body.first() == Some(&b'{') && body.len() <= MAX_DECODE);
    if !looks_structured {
        return Ok(None);
    }
    if body.len() > MAX_DECODE {
        return Err(format!(
            "structured CloudEvent of {} bytes is larger than the {MAX_DECODE} bytes decoded",
            body.len()
        ));
    }
    let value: Value = match serde_json::from_slice(body) {
        Ok(v) => v,
        Err(e) if structured_type => return Err(format!("structured CloudEvent: {e}")),
        Err(_) => return Ok(None),
    };
    let Value::Object(map) = value else {
        return if structured_type {
            Err("structured CloudEvent is not a JSON object".into())
        } else {
            Ok(None)
        };
    };
    if !structured_type && !map.contains_key("specversion") {
        return Ok(None);
    }
    decode_structured(map)
}

fn decode_structured(map: serde_json::Map<String, Value>) -> Result<Option<CloudEvent>, String> {
    let mut event = CloudEvent::default();
    let mut data: Option<Value> = None;
    let mut data_base64: Option<String> = None;
    let mut spec = None;
    for (name, value) in map {
        match name.as_str() {
            "data" => data = Some(value),
            "data_base64" => match value {
                Value::String(s) => data_base64 = Some(s),
                _ => return Err("data_base64 is not a string".into()),
            },
            _ => {
                let text = match value {
                    Value::String(s) => s,
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    Value::Null => continue,
                    _ => {
                        return Err(format!(
                            "attribute {name:?} is not a string, number or bool"
                        ));
                    }
                };
                set_attribute(&mut event, &mut spec, name, text);
            }
        }
    }
    check_required(spec.as_deref(), &event)?;
    event.data = match (data, data_base64) {
        (Some(_), Some(_)) => return Err("both data and data_base64 are present".into()),
        (None, Some(b)) => base64_decode(&b).ok_or("data_base64 is not valid base64")?,
        (Some(Value::String(s)), None) if !is_json(event.data_content_type.as_deref()) => {
            s.into_bytes()
        }
        (Some(v), None) => serde_json::to_vec(&v).map_err(|e| format!("data: {e}"))?,
        (None, None) => Vec::new(),
    };
    Ok(Some(event))
}

fn decode_binary(
    headers: &[(String, Vec<u8>)],
    body: &[u8],
    prefix: &str,
    percent: bool,
    content_type: Option<String>,
) -> Result<CloudEvent, String> {
    let mut event = CloudEvent {
        data_content_type: content_type,
        data: body.to_vec(),
        ..CloudEvent::default()
    };
    let mut spec = None;
    for (name, value) in headers {
        let Some(attr) = name
            .get(..prefix.len())
            .filter(|p| p.eq_ignore_ascii_case(prefix))
            .and_then(|_| name.get(prefix.len()..))
        else {
            continue;
        };
        let attr = attr.to_ascii_lowercase();
        let text =
            std::str::from_utf8(value).map_err(|_| format!("header {name:?} is not UTF-8"))?;
        let text = if percent {
            percent_decode(text)
                .ok_or_else(|| format!("header {name:?} is badly percent-encoded"))?
        } else {
            text.to_string()
        };
        set_attribute(&mut event, &mut spec, attr, text);
    }
    check_required(spec.as_deref(), &event)?;
    Ok(event)
}

/// Sets the attribute `name` (lowercase, without a binding's prefix) of
/// `event` to `text`; `specversion` goes to `spec`, unknown names to the
/// extensions. Both the structured and the binary decoders use it.
fn set_attribute(event: &mut CloudEvent, spec: &mut Option<String>, name: String, text: String) {
    match name.as_str() {
        "specversion" => *spec = Some(text),
        "id" => event.id = text,
        "source" => event.source = text,
        "type" => event.event_type = text,
        "subject" => event.subject = Some(text),
        "time" => event.time = Some(text),
        "datacontenttype" => event.data_content_type = Some(text),
        _ => {
            event.extensions.insert(name, text);
        }
    }
}

fn check_required(spec: Option<&str>, event: &CloudEvent) -> Result<(), String> {
    match spec {
        Some("1.0") => {}
        Some(other) => return Err(format!("specversion {other:?} is not 1.0")),
        None => return Err("no specversion".into()),
    }
    for (name, value) in [
        ("id", &event.id),
        ("source", &event.source),
        ("type", &event.event_type),
    ] {
        if value.is_empty() {
            return Err(format!("required attribute {name} is missing or empty"));
        }
    }
    Ok(())
}

fn is_json(content_type: Option<&str>) -> bool {
    match content_type {
        None => true,
        Some(c) => {
            let media = c
                .split(';')
                .next()
                .unwrap_or("")
                .trim()
                .to_ascii_lowercase();
            media == "application/json" || media.ends_with("+json") || media == "text/json"
        }
    }
}

/// Standard base64 (RFC 4648, with or without padding); `None` when it is
/// not.
fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let s = s.trim_end_matches('=');
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let mut acc: u32 = 0;
    let mut bits = 0;
    for b in s.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A lone sixth-bit group cannot end valid base64.
    (bits < 6).then_some(out)
}

fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let hex = std::str::from_utf8(hex).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn structured_json_data_and_base64() {
        let body = br#"{"specversion":"1.0","id":"a-1","source":"s","type":"t","data":{"x":1},"traceparent":"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01","outboxseq":7}"#;
        let e = decode_cloudevent(
            &h(&[("content-type", "application/cloudevents+json")]),
            body,
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.data, br#"{"x":1}"#);
        assert_eq!(e.extensions["outboxseq"], "7");
        let body =
            br#"{"specversion":"1.0","id":"a","source":"s","type":"t","data_base64":"AAEC/w=="}"#;
        let e = decode_cloudevent(&[], body).unwrap().unwrap();
        assert_eq!(e.data, [0, 1, 2, 255]);
    }

    #[test]
    fn binary_kafka_and_nats() {
        let e = decode_cloudevent(
            &h(&[
                ("ce_specversion", "1.0"),
                ("ce_id", "i"),
                ("ce_source", "s"),
                ("ce_type", "t"),
                ("content-type", "text/plain"),
            ]),
            b"hello",
        )
        .unwrap()
        .unwrap();
        assert_eq!((e.id.as_str(), e.data.as_slice()), ("i", &b"hello"[..]));
        assert_eq!(e.data_content_type.as_deref(), Some("text/plain"));
        let e = decode_cloudevent(
            &h(&[
                ("ce-specversion", "1.0"),
                ("ce-id", "i%20d"),
                ("ce-source", "s"),
                ("ce-type", "t"),
            ]),
            b"",
        )
        .unwrap()
        .unwrap();
        assert_eq!(e.id, "i d");
    }

    #[test]
    fn plain_and_broken_messages() {
        assert_eq!(decode_cloudevent(&[], b"plain"), Ok(None));
        assert_eq!(decode_cloudevent(&[], br#"{"a":1}"#), Ok(None));
        assert_eq!(decode_cloudevent(&[], b"{not json"), Ok(None));
        let ce = h(&[("content-type", "application/cloudevents+json")]);
        assert!(decode_cloudevent(&ce, b"{not json").is_err());
        assert!(
            decode_cloudevent(
                &ce,
                br#"{"specversion":"1.0","id":"","source":"s","type":"t"}"#
            )
            .is_err()
        );
        assert!(
            decode_cloudevent(
                &ce,
                br#"{"specversion":"0.3","id":"i","source":"s","type":"t"}"#
            )
            .is_err()
        );
        assert!(
            decode_cloudevent(
                &ce,
                br#"{"specversion":"1.0","id":"i","source":"s","type":"t","data_base64":"!!"}"#
            )
            .is_err()
        );
        assert!(
            decode_cloudevent(&h(&[("ce-specversion", "1.0"), ("ce-id", "%zz")]), b"").is_err()
        );
        assert_eq!(base64_decode("QQ"), Some(b"A".to_vec()));
        assert_eq!(base64_decode("Q"), None);
    }

    #[test]
    fn causation_correlation_trace() {
        let m = Message::new("S", 0, 9, b"x".to_vec());
        assert_eq!(m.causation_id(), "S/0/9");
        assert_eq!(m.correlation_id(), "S/0/9");
        let m = m.with_header("correlationid", "order-1").with_header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        );
        assert_eq!(m.correlation_id(), "order-1");
        assert!(m.traceparent().is_some());
        assert!(
            parse_traceparent("00-00000000000000000000000000000000-b7ad6b7169203331-01").is_none()
        );
        assert!(
            parse_traceparent("00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331").is_none()
        );
    }
}
