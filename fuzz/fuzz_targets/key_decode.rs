//! Key decoding must never panic; a decoded key must re-encode to exactly
//! the bytes it consumed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboxkv::Key;
use outboxkv::codec::decode_exact;

fn check<K: Key + ?Sized>(data: &[u8]) {
    if let Ok(k) = decode_exact::<K>(data) {
        let mut again = Vec::new();
        k.encode_key(&mut again);
        assert_eq!(again, data, "{k:?}");
    }
}

fuzz_target!(|data: &[u8]| {
    check::<(String, u64, Vec<u8>, bool)>(data);
    check::<(i32, String)>(data);
    check::<str>(data);
    check::<i128>(data);
    check::<[u8; 5]>(data);
});
