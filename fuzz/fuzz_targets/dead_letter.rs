//! Dead-letter decoding must never panic or over-allocate, and an accepted
//! dead letter must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboxkv::codec::decode_dead_letter;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = decode_dead_letter(data) {
        assert_eq!(d.encode(), data);
    }
});
