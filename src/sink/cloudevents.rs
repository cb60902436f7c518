//! CloudEvents 1.0 attributes of an outbox entry, in JSON (structured mode)
//! and as individual attribute values (binary mode, for broker headers).
//!
//! | attribute | value |
//! |---|---|
//! | `specversion` | `1.0` |
//! | `id` | the event id, `<store id>-<seq>` |
//! | `source` | `outboxkv:<store id>` of the store that committed it |
//! | `type` | the event type |
//! | `subject` | the event key (left out when the key is empty) |
//! | `time` | commit time, RFC 3339 with microseconds, UTC |
//! | `datacontenttype` | the content type (left out when empty) |
//! | `partitionkey` | the event key (partitioning extension; left out when empty) |
//! | `outboxseq` | the outbox seq (extension): an Integer up to 2^31 - 1, beyond that a String |
//! | `traceparent`, `tracestate` | from the event's headers (distributed tracing extension) |
//! | other extensions | every other event header whose name is a valid extension name (lower-case `a-z`, `0-9`, at most 20 characters, not one of the names above) |
//! | `outboxkvheaders` | the event headers that cannot be extensions (other names, repeated names), as a String holding a JSON array of `[name, value]` pairs, in order; left out when there are none |
//!
//! A JSON payload (`application/json` or `+json`) becomes `data` as JSON in
//! structured mode; any other payload `data_base64`; an empty payload no
//! data at all.
//!
//! Binary mode (Kafka: every attribute as a `ce_<name>` header, the content
//! type as `content-type`; NATS, as an option: `ce-<name>` headers with
//! percent-encoded values, per the 1.0.3 draft of the NATS binding) uses the
//! same attributes; [`binary_attributes`] lists them.

use serde_json::{Map, Value};

use crate::OutboxEntry;
use crate::outbox::event::header_name_problem;

/// The CloudEvents `specversion`.
pub const SPEC_VERSION: &str = "1.0";

/// The content type of a structured-mode CloudEvents JSON message.
pub const STRUCTURED_JSON: &str = "application/cloudevents+json; charset=utf-8";

/// The extension holding the event headers that are not extensions.
pub const HEADERS_EXTENSION: &str = "outboxkvheaders";

/// Context attributes and extensions the module sets itself: an event
/// header with one of these names is never taken for an extension.
const OWN_ATTRIBUTES: [&str; 14] = [
    "specversion",
    "id",
    "source",
    "type",
    "subject",
    "time",
    "datacontenttype",
    "dataschema",
    "data",
    "data_base64",
    "partitionkey",
    "outboxseq",
    HEADERS_EXTENSION,
    "datacontentencoding",
];

/// The `source` attribute for events of `entry`'s store.
pub fn source(entry: &OutboxEntry) -> String {
    format!("outboxkv:{}", entry.id.store)
}

/// RFC 3339 UTC timestamp with microseconds, e.g. `2026-11-26T08:39:00.123456Z`.
pub fn rfc3339_micros(micros: u64) -> String {
    let secs = micros / 1_000_000;
    let frac = micros % 1_000_000;
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{frac:06}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (H. Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Standard base64 with padding.
pub fn base64(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len().div_ceil(3) * 4);
    base64_into(&mut out, bytes);
    // Only base64 digits (ASCII) were written.
    String::from_utf8(out).unwrap_or_default()
}

/// Appends `bytes` in standard base64 with padding.
fn base64_into(out: &mut Vec<u8>, bytes: &[u8]) {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    out.reserve(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]);
            } else {
                out.push(b'=');
            }
        }
    }
}

fn is_json(content_type: &str) -> bool {
    let base = content_type.split(';').next().unwrap_or("").trim();
    base == "application/json" || base.ends_with("+json")
}

/// Whether `name` is a valid CloudEvents extension name the module may use
/// for an event header: lower-case ASCII letters and digits, 1 to 20 of
/// them, and not an attribute the module sets itself.
pub fn is_extension_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 20
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && !OWN_ATTRIBUTES.contains(&name)
}

/// The largest CloudEvents Integer.
const CE_INTEGER_MAX: u64 = i32::MAX as u64;

/// An attribute value: a String, or an Integer (`outboxseq` while it fits).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttributeValue {
    /// A CloudEvents String (and Timestamp / URI-reference, which are
    /// strings on the wire).
    String(String),
    /// A CloudEvents Integer (32-bit signed).
    Integer(i32),
}

impl AttributeValue {
    /// The value as it goes into a header (binary mode).
    pub fn to_header_value(&self) -> String {
        match self {
            AttributeValue::String(s) => s.clone(),
            AttributeValue::Integer(i) => i.to_string(),
        }
    }

    fn to_json(&self) -> Value {
        match self {
            AttributeValue::String(s) => Value::String(s.clone()),
            AttributeValue::Integer(i) => Value::from(*i),
        }
    }
}

/// Every attribute of `entry` (context attributes and extensions) except
/// `datacontenttype` and the data, in a fixed order. Binary-mode sinks put
/// each in a header; `datacontenttype` is [`content_type`].
pub fn binary_attributes(entry: &OutboxEntry) -> Vec<(String, AttributeValue)> {
    let s = |v: &str| AttributeValue::String(v.to_string());
    let mut out = vec![
        ("specversion".to_string(), s(SPEC_VERSION)),
        ("id".to_string(), s(&entry.id.to_string())),
        ("source".to_string(), s(&source(entry))),
        ("type".to_string(), s(&entry.event_type)),
    ];
    if !entry.key.is_empty() {
        out.push(("subject".to_string(), s(&entry.key)));
    }
    out.push((
        "time".to_string(),
        s(&rfc3339_micros(entry.created_at_micros)),
    ));
    if !entry.key.is_empty() {
        out.push(("partitionkey".to_string(), s(&entry.key)));
    }
    out.push((
        "outboxseq".to_string(),
        match i32::try_from(entry.seq) {
            Ok(i) if entry.seq <= CE_INTEGER_MAX => AttributeValue::Integer(i),
            _ => AttributeValue::String(entry.seq.to_string()),
        },
    ));
    let (extensions, others) = split_headers(entry);
    for (name, value) in extensions {
        out.push((name.to_string(), s(value)));
    }
    if !others.is_empty() {
        let pairs: Vec<Value> = others
            .iter()
            .map(|(n, v)| Value::Array(vec![Value::from(*n), Value::from(*v)]))
            .collect();
        out.push((
            HEADERS_EXTENSION.to_string(),
            AttributeValue::String(Value::Array(pairs).to_string()),
        ));
    }
    out
}

/// The `datacontenttype`, unless the entry's content type is empty.
pub fn content_type(entry: &OutboxEntry) -> Option<&str> {
    (!entry.content_type.is_empty()).then_some(entry.content_type.as_str())
}

/// The event headers that become extensions (first occurrence of a valid
/// extension name) and the others, both in order.
#[allow(clippy::type_complexity)]
fn split_headers(entry: &OutboxEntry) -> (Vec<(&str, &str)>, Vec<(&str, &str)>) {
    let mut extensions: Vec<(&str, &str)> = Vec::new();
    let mut others = Vec::new();
    for (name, value) in &entry.headers {
        if is_extension_name(name)
            && !extensions.iter().any(|(n, _)| n == name)
            && !value.is_empty()
        {
            extensions.push((name, value));
        } else {
            others.push((name.as_str(), value.as_str()));
        }
    }
    (extensions, others)
}

/// The entry as a structured-mode CloudEvents JSON object.
pub fn to_json(entry: &OutboxEntry) -> Value {
    let mut m = Map::new();
    for (name, value) in binary_attributes(entry) {
        m.insert(name, value.to_json());
    }
    if let Some(ct) = content_type(entry) {
        m.insert("datacontenttype".into(), ct.into());
    }
    if !entry.payload.is_empty() {
        let json = is_json(&entry.content_type)
            .then(|| serde_json::from_slice::<Value>(&entry.payload).ok())
            .flatten();
        match json {
            Some(data) => m.insert("data".into(), data),
            None => m.insert("data_base64".into(), base64(&entry.payload).into()),
        };
    }
    Value::Object(m)
}

/// The entry as a structured-mode CloudEvents JSON object, serialized: the
/// same object as [`to_json`] (attributes in the order of
/// [`binary_attributes`], then `datacontenttype` and the data), written
/// straight into the string rather than built as a [`Value`] first. What
/// the NATS sink sends as a message body.
///
/// ```
/// # use outboxkv::sink::cloudevents::{to_json, to_json_string};
/// # let dir = tempfile::tempdir()?;
/// # let store = outboxkv::Store::open(dir.path())?;
/// store.write(|tx| tx.emit(outboxkv::Event::json("orders.paid", "o-1", &serde_json::json!({"total": 5}))?))?;
/// let entry = &store.outbox().read(1, 1)?[0];
/// let parsed: serde_json::Value = serde_json::from_str(&to_json_string(entry))?;
/// assert_eq!(parsed, to_json(entry));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn to_json_string(entry: &OutboxEntry) -> String {
    let mut out: Vec<u8> = Vec::with_capacity(entry.payload.len().div_ceil(3) * 4 + 400);
    // The attributes of `binary_attributes`, in its order, written without
    // building each as a String first (the NATS sink's hot path; the
    // property test below holds the two to the same object).
    use std::io::Write as _;
    // Writing into a `Vec` cannot fail.
    let _ = write!(
        out,
        "{{\"specversion\":\"{SPEC_VERSION}\",\"id\":\"{}\",\"source\":\"outboxkv:{}\",\"type\":",
        entry.id, entry.id.store
    );
    json_str(&mut out, &entry.event_type);
    if !entry.key.is_empty() {
        out.extend_from_slice(b",\"subject\":");
        json_str(&mut out, &entry.key);
    }
    out.extend_from_slice(b",\"time\":\"");
    out.extend_from_slice(rfc3339_micros(entry.created_at_micros).as_bytes());
    out.push(b'"');
    if !entry.key.is_empty() {
        out.extend_from_slice(b",\"partitionkey\":");
        json_str(&mut out, &entry.key);
    }
    let _ = match i32::try_from(entry.seq) {
        Ok(i) if entry.seq <= CE_INTEGER_MAX => write!(out, ",\"outboxseq\":{i}"),
        _ => write!(out, ",\"outboxseq\":\"{}\"", entry.seq),
    };
    if !entry.headers.is_empty() {
        let (extensions, others) = split_headers(entry);
        for (name, value) in extensions {
            out.push(b',');
            json_str(&mut out, name);
            out.push(b':');
            json_str(&mut out, value);
        }
        if !others.is_empty() {
            let pairs: Vec<Value> = others
                .iter()
                .map(|(n, v)| Value::Array(vec![Value::from(*n), Value::from(*v)]))
                .collect();
            out.extend_from_slice(b",\"");
            out.extend_from_slice(HEADERS_EXTENSION.as_bytes());
            out.extend_from_slice(b"\":");
            json_str(&mut out, &Value::Array(pairs).to_string());
        }
    }
    if let Some(ct) = content_type(entry) {
        out.extend_from_slice(b",\"datacontenttype\":");
        json_str(&mut out, ct);
    }
    if !entry.payload.is_empty() {
        let json = is_json(&entry.content_type)
            .then(|| serde_json::from_slice::<Value>(&entry.payload).ok())
            .flatten();
        match json {
            Some(data) => {
                out.extend_from_slice(b",\"data\":");
                // Writing a `Value` into a `Vec` cannot fail.
                let _ = serde_json::to_writer(&mut out, &data);
            }
            None => {
                out.extend_from_slice(b",\"data_base64\":\"");
                base64_into(&mut out, &entry.payload);
                out.push(b'"');
            }
        }
    }
    out.push(b'}');
    // Only JSON (valid UTF-8) was written.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Appends `s` as a JSON string, escaped.
fn json_str(out: &mut Vec<u8>, s: &str) {
    let mut ser = serde_json::Serializer::new(out);
    // Serializing a string into a `Vec` cannot fail.
    let _ = serde::Serializer::serialize_str(&mut ser, s);
}

/// Percent-encodes a binary-mode header value as the HTTP binding (and the
/// NATS binding's 1.0.3 draft) prescribe: space, `"`, `%` and every byte
/// outside printable ASCII become `%XX` of their UTF-8 bytes.
pub fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for b in value.bytes() {
        if (0x21..=0x7e).contains(&b) && b != b'"' && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Why `entry` must not be published with its key and headers as broker
/// headers, if it must not: what [`Event`](crate::Event) refuses at emit
/// (control characters, reserved or malformed header names). Entries
/// written by versions that did not check may still be in an outbox; the
/// sinks reject them (the relay dead-letters them) rather than let them
/// forge headers.
pub fn unsafe_for_headers(entry: &OutboxEntry) -> Option<String> {
    if entry.event_type.is_empty()
        || entry
            .event_type
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Some("its type is empty or holds whitespace or control characters".into());
    }
    if entry.key.chars().any(char::is_control) {
        return Some("its key holds control characters".into());
    }
    if entry.content_type.chars().any(char::is_control) {
        return Some("its content type holds control characters".into());
    }
    for (name, value) in &entry.headers {
        if let Some(why) = header_name_problem(name) {
            return Some(format!("header {name:?}: {why}"));
        }
        if value.chars().any(char::is_control) {
            return Some(format!(
                "the value of header {name:?} holds control characters"
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::entry::{EventId, StoreId};

    fn entry() -> OutboxEntry {
        OutboxEntry {
            seq: 7,
            id: EventId {
                store: StoreId([1; 16]),
                seq: 7,
            },
            event_type: "orders.paid".into(),
            key: "order-1".into(),
            content_type: "application/json".into(),
            headers: vec![
                ("traceparent".into(), "00-aa-bb-01".into()),
                ("tenant".into(), "acme".into()),
                ("X-Request-Id".into(), "r1".into()),
                ("tenant".into(), "again".into()),
                ("id".into(), "not the id".into()),
            ],
            payload: br#"{"a":1}"#.to_vec(),
            created_at_micros: 0,
        }
    }

    #[test]
    fn timestamps() {
        assert_eq!(rfc3339_micros(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(
            rfc3339_micros(951_782_400_000_001),
            "2000-02-29T00:00:00.000001Z"
        );
        assert_eq!(
            rfc3339_micros(1_795_682_340_123_456),
            "2026-11-26T08:39:00.123456Z"
        );
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, out) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), out);
        }
    }

    #[test]
    fn headers_become_extensions_or_the_headers_extension() {
        let j = to_json(&entry());
        assert_eq!(j["traceparent"], "00-aa-bb-01");
        assert_eq!(j["tenant"], "acme");
        assert_eq!(j["id"], "01010101010101010101010101010101-7");
        assert_eq!(j["outboxseq"], 7);
        assert_eq!(j["data"]["a"], 1);
        let rest: Value = serde_json::from_str(j[HEADERS_EXTENSION].as_str().unwrap()).unwrap();
        assert_eq!(
            rest,
            serde_json::json!([
                ["X-Request-Id", "r1"],
                ["tenant", "again"],
                ["id", "not the id"]
            ])
        );
    }

    #[test]
    fn empty_key_payload_and_content_type_are_left_out() {
        let mut e = entry();
        e.key.clear();
        e.payload.clear();
        e.content_type.clear();
        e.headers.clear();
        let j = to_json(&e);
        for absent in [
            "subject",
            "partitionkey",
            "data",
            "data_base64",
            "datacontenttype",
            HEADERS_EXTENSION,
        ] {
            assert!(j.get(absent).is_none(), "{absent}: {j}");
        }
    }

    #[test]
    fn a_seq_beyond_the_integer_range_is_a_string() {
        let mut e = entry();
        e.seq = 1 << 31;
        assert_eq!(to_json(&e)["outboxseq"], "2147483648");
        e.seq = (1 << 31) - 1;
        assert_eq!(to_json(&e)["outboxseq"], 2147483647);
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode("a b\"c%d"), "a%20b%22c%25d");
        assert_eq!(percent_encode("ü"), "%C3%BC");
        assert_eq!(percent_encode("order-1"), "order-1");
    }

    #[test]
    fn unsafe_entries_are_named() {
        assert!(unsafe_for_headers(&entry()).is_none());
        let mut e = entry();
        e.key = "k\r\nNats-Msg-Id: x".into();
        assert!(unsafe_for_headers(&e).is_some());
        let mut e = entry();
        e.headers.push(("Nats-Rollup".into(), "all".into()));
        assert!(unsafe_for_headers(&e).is_some());
        let mut e = entry();
        e.headers.push(("x".into(), "a\nb".into()));
        assert!(unsafe_for_headers(&e).is_some());
    }

    use proptest::strategy::Strategy as _;

    proptest::proptest! {
        /// The serialized object is the object, for any entry: keys empty
        /// or not, seqs past the Integer range, headers that are
        /// extensions, repeated or not, JSON and other payloads, valid and
        /// not, strings that need escaping.
        #[test]
        fn the_string_is_the_object(
            seq in proptest::prop_oneof![1u64..1000, (i32::MAX as u64 - 2)..(i32::MAX as u64 + 2), proptest::num::u64::ANY],
            key in "(|k|[a-z\"\\\\é\u{1}]{0,6})",
            event_type in "[a-z.]{1,8}",
            content_type in proptest::prop_oneof![
                proptest::strategy::Just(String::new()),
                proptest::strategy::Just("application/json".to_string()),
                proptest::strategy::Just("application/x+json; charset=utf-8".to_string()),
                proptest::strategy::Just("text/plain".to_string()),
            ],
            headers in proptest::collection::vec(("(traceparent|tenant|x|Bad-Name|id|[a-z]{1,3})", "[ -~é]{0,5}"), 0..5),
            payload in proptest::prop_oneof![
                proptest::collection::vec(proptest::num::u8::ANY, 0..40),
                "\\{\"a\": ?[0-9]{1,3}\\}".prop_map(String::into_bytes),
                proptest::strategy::Just(b"[1, 2e400]".to_vec()),
            ],
            created in proptest::num::u64::ANY,
        ) {
            let mut e = entry();
            e.seq = seq;
            e.id.seq = seq;
            e.key = key;
            e.event_type = event_type;
            e.content_type = content_type;
            e.headers = headers;
            e.payload = payload;
            e.created_at_micros = created;
            let parsed: Value = serde_json::from_str(&to_json_string(&e))
                .map_err(|err| proptest::test_runner::TestCaseError::fail(err.to_string()))?;
            proptest::prop_assert_eq!(parsed, to_json(&e));
        }
    }
}
