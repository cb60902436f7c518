//! The sidecar cursor file decoder must never panic or over-allocate, and an
//! accepted cursor must re-encode to the same bytes (a cursor of the format
//! this build writes) or at least to one that decodes the same (an older
//! format, which is re-encoded in the current one).
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboxkv::RelayCursor;
use outboxkv::codec::CURSOR_VERSION;

fuzz_target!(|data: &[u8]| {
    if let Ok(c) = RelayCursor::decode(data) {
        let again = c.encode();
        if data.get(8..12) == Some(&CURSOR_VERSION.to_le_bytes()[..]) {
            assert_eq!(again, data);
        }
        assert_eq!(RelayCursor::decode(&again).as_ref(), Ok(&c));
    }
});
