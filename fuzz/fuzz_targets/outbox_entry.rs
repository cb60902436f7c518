//! Outbox entry decoding must never panic or allocate beyond the input, and
//! an accepted entry must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboxkv::codec::decode_entry;

fuzz_target!(|data: &[u8]| {
    if let Ok(entry) = decode_entry(data) {
        assert_eq!(entry.encode(), data);
    }
});
