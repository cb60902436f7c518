//! The sidecar cursor file decoder must never panic or over-allocate, and an
//! accepted cursor must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboxkv::outbox::cursor::RelayCursor;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = RelayCursor::decode(data) {
        assert_eq!(c.encode(), data);
    }
});
