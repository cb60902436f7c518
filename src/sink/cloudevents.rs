//! CloudEvents 1.0 attributes of an outbox entry, in JSON (structured mode)
//! and as individual attribute values (binary mode, for broker headers).
//!
//! | attribute | value |
//! |---|---|
//! | `specversion` | `1.0` |
//! | `id` | the event id, `<store id>-<seq>` |
//! | `source` | `outboxkv:<store id>` of the store that committed it |
//! | `type` | the event type |
//! | `subject` | the event key |
//! | `time` | commit time, RFC 3339 with microseconds, UTC |
//! | `datacontenttype` | the content type |
//! | `partitionkey` | the event key (partitioning extension) |
//! | `outboxseq` | the outbox seq (extension) |
//! | `traceparent`, `tracestate` | from the event's headers (distributed tracing extension) |
//!
//! A JSON payload becomes `data` as JSON; any other payload `data_base64`.

use serde_json::{Map, Value};

use crate::outbox::entry::OutboxEntry;

/// The CloudEvents `specversion`.
pub const SPEC_VERSION: &str = "1.0";

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
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn is_json(content_type: &str) -> bool {
    let base = content_type.split(';').next().unwrap_or("").trim();
    base == "application/json" || base.ends_with("+json")
}

/// The entry as a structured-mode CloudEvents JSON object.
pub fn to_json(entry: &OutboxEntry) -> Value {
    let mut m = Map::new();
    m.insert("specversion".into(), SPEC_VERSION.into());
    m.insert("id".into(), entry.id.to_string().into());
    m.insert("source".into(), source(entry).into());
    m.insert("type".into(), entry.event_type.clone().into());
    m.insert("subject".into(), entry.key.clone().into());
    m.insert(
        "time".into(),
        rfc3339_micros(entry.created_at_micros).into(),
    );
    m.insert("datacontenttype".into(), entry.content_type.clone().into());
    m.insert("partitionkey".into(), entry.key.clone().into());
    m.insert("outboxseq".into(), entry.seq.into());
    for name in ["traceparent", "tracestate"] {
        if let Some(v) = entry.header(name) {
            m.insert(name.into(), v.into());
        }
    }
    let json = is_json(&entry.content_type)
        .then(|| serde_json::from_slice::<Value>(&entry.payload).ok())
        .flatten();
    match json {
        Some(data) => m.insert("data".into(), data),
        None => m.insert("data_base64".into(), base64(&entry.payload).into()),
    };
    Value::Object(m)
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
