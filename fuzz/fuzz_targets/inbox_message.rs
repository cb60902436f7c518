//! Decoding a consumed message's CloudEvents attributes (structured JSON
//! body, or `ce_` / `ce-` headers) must never panic, whatever the broker
//! delivers; an accepted event has its required attributes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboxkv::codec::decode_cloudevent;

fuzz_target!(|data: &[u8]| {
    // The first byte picks how many headers the rest starts with; each
    // header is "name\0value\0".
    let Some((&n, mut rest)) = data.split_first() else {
        return;
    };
    let mut headers = Vec::new();
    for _ in 0..(n % 8) {
        let mut parts = rest.splitn(3, |&b| b == 0);
        let (Some(name), Some(value)) = (parts.next(), parts.next()) else {
            break;
        };
        headers.push((String::from_utf8_lossy(name).into_owned(), value.to_vec()));
        rest = parts.next().unwrap_or_default();
    }
    if let Ok(Some(event)) = decode_cloudevent(&headers, rest) {
        assert!(!event.id.is_empty() && !event.source.is_empty() && !event.event_type.is_empty());
    }
});
