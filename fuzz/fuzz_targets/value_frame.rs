//! The value frame decoder must never panic or over-allocate, and whatever
//! it accepts must re-encode to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use outboxkv::codec::{decode_value, encode_value};

#[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
struct Order {
    id: u64,
    customer: String,
    lines: Vec<(String, u32, i64)>,
    note: Option<String>,
    blob: Vec<u8>,
}

fuzz_target!(|data: &[u8]| {
    if let Ok(order) = decode_value::<Order>(data) {
        let mut again = Vec::new();
        encode_value(&order, &mut again).expect("re-encode");
        assert_eq!(decode_value::<Order>(&again).ok(), Some(order));
    }
    let _ = decode_value::<String>(data);
    let _ = decode_value::<Vec<Vec<u8>>>(data);
});
