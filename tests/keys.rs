//! Key encoding properties: order preservation, round trip, prefix-freeness.

use std::fmt::Debug;

use outboxkv::Key;
use outboxkv::codec::decode_exact;
use proptest::prelude::*;

fn enc<K: Key + ?Sized>(k: &K) -> Vec<u8> {
    let mut v = Vec::new();
    k.encode_key(&mut v);
    v
}

fn check_pair<K>(a: &K, b: &K) -> Result<(), TestCaseError>
where
    K: Key<Owned = K> + Ord + Debug + Clone,
{
    let (ea, eb) = (enc(a), enc(b));
    prop_assert_eq!(ea.cmp(&eb), a.cmp(b), "order of {:?} vs {:?}", a, b);
    prop_assert_eq!(
        &decode_exact::<K>(&ea).map_err(|e| TestCaseError::fail(e.to_string()))?,
        a
    );
    if ea != eb {
        prop_assert!(
            !eb.starts_with(&ea),
            "{:?} encodes as a prefix of {:?}",
            a,
            b
        );
        prop_assert!(
            !ea.starts_with(&eb),
            "{:?} encodes as a prefix of {:?}",
            b,
            a
        );
    }
    Ok(())
}

macro_rules! key_props {
    ($($name:ident: $t:ty = $strat:expr;)*) => {
        proptest! {
            #![proptest_config(ProptestConfig::with_cases(512))]
            $(
                #[test]
                fn $name(a in $strat, b in $strat) {
                    check_pair::<$t>(&a, &b)?;
                    check_pair::<$t>(&a, &a)?;
                }
            )*
        }
    };
}

// Byte strings are drawn from a small alphabet that includes the escape
// bytes 0x00, 0x01 and 0xFF, so the escaping is exercised on most cases.
fn tricky_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(
        prop::sample::select(vec![0u8, 1, 2, 0x7F, 0xFE, 0xFF]),
        0..8,
    )
}

fn tricky_string() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop::sample::select(vec!['\0', '\u{1}', 'a', 'b', 'é', '\u{FFFF}']),
        0..6,
    )
    .prop_map(|cs| cs.into_iter().collect())
}

key_props! {
    u8_order: u8 = any::<u8>();
    u16_order: u16 = any::<u16>();
    u32_order: u32 = any::<u32>();
    u64_order: u64 = any::<u64>();
    u128_order: u128 = any::<u128>();
    i8_order: i8 = any::<i8>();
    i16_order: i16 = any::<i16>();
    i32_order: i32 = any::<i32>();
    i64_order: i64 = any::<i64>();
    i128_order: i128 = any::<i128>();
    bool_order: bool = any::<bool>();
    string_order: String = tricky_string();
    any_string_order: String = any::<String>();
    bytes_order: Vec<u8> = tricky_bytes();
    array_order: [u8; 4] = any::<[u8; 4]>();
    pair_order: (u32, String) = (0u32..4, tricky_string());
    triple_order: (String, i64, bool) = (tricky_string(), -3i64..3, any::<bool>());
    quad_order: (i16, Vec<u8>, u8, String) = (-2i16..2, tricky_bytes(), 0u8..3, tricky_string());
}

proptest! {
    #[test]
    fn str_and_string_encode_the_same(s in any::<String>()) {
        prop_assert_eq!(enc(s.as_str()), enc(&s));
        prop_assert_eq!(enc(s.as_bytes()), enc(&s.clone().into_bytes()));
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
        let _ = decode_exact::<(String, u64, Vec<u8>, bool)>(&bytes);
        let _ = decode_exact::<i128>(&bytes);
        let _ = decode_exact::<[u8; 3]>(&bytes);
    }
}
