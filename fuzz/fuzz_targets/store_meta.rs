//! The OUTBOXKV identity file parser must never panic; an accepted file must
//! re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboxkv::codec::StoreMeta;

fuzz_target!(|data: &[u8]| {
    if let Ok(meta) = StoreMeta::decode(data) {
        assert_eq!(meta.encode().as_slice(), data);
    }
});
