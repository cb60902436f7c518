//! Order-preserving key encoding.
//!
//! Table keys are stored as bytes and RocksDB orders them bytewise, so the
//! encoding must sort exactly like the Rust values do: for every key type `K`,
//! `encode(a) < encode(b)` (bytewise) if and only if `a < b`. It is also
//! *prefix-free*: no key's encoding is a proper prefix of another key's of
//! the same type, which is what makes tuple encodings (plain concatenation)
//! sort lexicographically and lets a range bound be turned into a byte bound.
//!
//! # Format
//!
//! | type | encoding |
//! |---|---|
//! | `u8`..`u128` | big-endian, fixed width |
//! | `i8`..`i128` | sign bit flipped, then big-endian, fixed width |
//! | `bool` | one byte, `0x00` or `0x01` |
//! | `[u8; N]` | the `N` bytes as they are |
//! | `str`, `String`, `[u8]`, `Vec<u8>` | each `0x00` byte written as `0x00 0xFF`, then the terminator `0x00 0x01` |
//! | tuples up to 4 | the elements' encodings concatenated |
//!
//! The byte-string escape is the one used by FoundationDB's tuple layer and
//! MySQL's memcomparable format: a `0x00` inside the string sorts above the
//! terminator, so `"a" < "a\0" < "a\x01"` holds in bytes too.
//!
//! `usize`/`isize` are not keys on purpose: their width differs by platform and
//! a store must read the same everywhere.

use std::fmt;
use std::ops::{Bound, RangeBounds};

/// Why stored key bytes could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyDecodeError(pub &'static str);

impl fmt::Display for KeyDecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

impl std::error::Error for KeyDecodeError {}

/// A type usable as a table key, with an order-preserving encoding.
///
/// Implemented for all fixed-width integers up to 128 bits, `bool`, `str` /
/// `String`, `[u8]` / `Vec<u8>`, `[u8; N]` and tuples of up to four keys.
/// Unsized keys (`str`, `[u8]`) decode into their owned form.
///
/// An implementation must keep two promises, which the crate's property tests
/// check for every built-in type: bytewise order of encodings equals `Ord`
/// order of values, and no encoding is a proper prefix of another.
///
/// ```
/// use outboxkv::Key;
///
/// let mut a = Vec::new();
/// let mut b = Vec::new();
/// (-5i32).encode_key(&mut a);
/// 3i32.encode_key(&mut b);
/// assert!(a < b);
/// assert_eq!(i32::decode_key(&mut &b[..]).unwrap(), 3);
/// ```
pub trait Key: fmt::Debug {
    /// The type that decoding yields (`String` for `str`, `Self` for sized keys).
    type Owned: Key<Owned = Self::Owned> + Sized + fmt::Debug;

    /// Appends the encoding of `self` to `out`.
    fn encode_key(&self, out: &mut Vec<u8>);

    /// Decodes one key from the front of `input` and advances it past the
    /// bytes consumed. Never panics, whatever the input.
    fn decode_key(input: &mut &[u8]) -> Result<Self::Owned, KeyDecodeError>;
}

/// Decodes a complete key: all of `bytes` must be consumed.
pub fn decode_exact<K: Key + ?Sized>(bytes: &[u8]) -> Result<K::Owned, KeyDecodeError> {
    let mut input = bytes;
    let key = K::decode_key(&mut input)?;
    if input.is_empty() {
        Ok(key)
    } else {
        Err(KeyDecodeError("trailing bytes after key"))
    }
}

fn take<const N: usize>(input: &mut &[u8]) -> Result<[u8; N], KeyDecodeError> {
    match input.split_first_chunk::<N>() {
        Some((head, rest)) => {
            *input = rest;
            Ok(*head)
        }
        None => Err(KeyDecodeError("key bytes end early")),
    }
}

macro_rules! unsigned_key {
    ($($t:ty),*) => {$(
        impl Key for $t {
            type Owned = $t;
            #[inline]
            fn encode_key(&self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_be_bytes());
            }
            #[inline]
            fn decode_key(input: &mut &[u8]) -> Result<$t, KeyDecodeError> {
                Ok(<$t>::from_be_bytes(take(input)?))
            }
        }
    )*};
}
unsigned_key!(u8, u16, u32, u64, u128);

macro_rules! signed_key {
    ($($t:ty => $u:ty),*) => {$(
        impl Key for $t {
            type Owned = $t;
            #[inline]
            fn encode_key(&self, out: &mut Vec<u8>) {
                // Flipping the sign bit maps MIN..=MAX onto 0..=u::MAX in order.
                let flipped = (*self as $u) ^ (1 << (<$u>::BITS - 1));
                out.extend_from_slice(&flipped.to_be_bytes());
            }
            #[inline]
            fn decode_key(input: &mut &[u8]) -> Result<$t, KeyDecodeError> {
                let flipped = <$u>::from_be_bytes(take(input)?);
                Ok((flipped ^ (1 << (<$u>::BITS - 1))) as $t)
            }
        }
    )*};
}
signed_key!(i8 => u8, i16 => u16, i32 => u32, i64 => u64, i128 => u128);

impl Key for bool {
    type Owned = bool;
    fn encode_key(&self, out: &mut Vec<u8>) {
        out.push(u8::from(*self));
    }
    fn decode_key(input: &mut &[u8]) -> Result<bool, KeyDecodeError> {
        match take::<1>(input)? {
            [0] => Ok(false),
            [1] => Ok(true),
            _ => Err(KeyDecodeError("bool key byte is neither 0 nor 1")),
        }
    }
}

impl<const N: usize> Key for [u8; N] {
    type Owned = [u8; N];
    fn encode_key(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(self);
    }
    fn decode_key(input: &mut &[u8]) -> Result<[u8; N], KeyDecodeError> {
        take(input)
    }
}

const ESCAPE: u8 = 0x00;
const ESCAPED_ZERO: u8 = 0xFF;
const TERMINATOR: u8 = 0x01;

/// Appends the escaped, terminated form of a byte string.
fn encode_bytes(bytes: &[u8], out: &mut Vec<u8>) {
    out.reserve(bytes.len() + 2);
    let mut rest = bytes;
    while let Some(pos) = rest.iter().position(|&b| b == ESCAPE) {
        out.extend_from_slice(&rest[..=pos]);
        out.push(ESCAPED_ZERO);
        rest = &rest[pos + 1..];
    }
    out.extend_from_slice(rest);
    out.push(ESCAPE);
    out.push(TERMINATOR);
}

fn decode_bytes(input: &mut &[u8]) -> Result<Vec<u8>, KeyDecodeError> {
    let mut out = Vec::new();
    let mut rest = *input;
    loop {
        let Some(pos) = rest.iter().position(|&b| b == ESCAPE) else {
            return Err(KeyDecodeError("byte string key has no terminator"));
        };
        out.extend_from_slice(&rest[..pos]);
        match rest.get(pos + 1) {
            Some(&ESCAPED_ZERO) => {
                out.push(0);
                rest = &rest[pos + 2..];
            }
            Some(&TERMINATOR) => {
                *input = &rest[pos + 2..];
                return Ok(out);
            }
            Some(_) => return Err(KeyDecodeError("invalid escape in byte string key")),
            None => return Err(KeyDecodeError("byte string key has no terminator")),
        }
    }
}

impl Key for [u8] {
    type Owned = Vec<u8>;
    fn encode_key(&self, out: &mut Vec<u8>) {
        encode_bytes(self, out);
    }
    fn decode_key(input: &mut &[u8]) -> Result<Vec<u8>, KeyDecodeError> {
        decode_bytes(input)
    }
}

impl Key for Vec<u8> {
    type Owned = Vec<u8>;
    fn encode_key(&self, out: &mut Vec<u8>) {
        encode_bytes(self, out);
    }
    fn decode_key(input: &mut &[u8]) -> Result<Vec<u8>, KeyDecodeError> {
        decode_bytes(input)
    }
}

impl Key for str {
    type Owned = String;
    fn encode_key(&self, out: &mut Vec<u8>) {
        encode_bytes(self.as_bytes(), out);
    }
    fn decode_key(input: &mut &[u8]) -> Result<String, KeyDecodeError> {
        String::from_utf8(decode_bytes(input)?)
            .map_err(|_| KeyDecodeError("string key is not valid UTF-8"))
    }
}

impl Key for String {
    type Owned = String;
    fn encode_key(&self, out: &mut Vec<u8>) {
        self.as_str().encode_key(out);
    }
    fn decode_key(input: &mut &[u8]) -> Result<String, KeyDecodeError> {
        str::decode_key(input)
    }
}

macro_rules! tuple_key {
    ($($name:ident),+) => {
        impl<$($name: Key<Owned = $name> + Sized),+> Key for ($($name,)+) {
            type Owned = ($($name,)+);
            #[allow(non_snake_case)]
            fn encode_key(&self, out: &mut Vec<u8>) {
                let ($($name,)+) = self;
                $($name.encode_key(out);)+
            }
            fn decode_key(input: &mut &[u8]) -> Result<Self::Owned, KeyDecodeError> {
                Ok(($($name::decode_key(input)?,)+))
            }
        }
    };
}
tuple_key!(A);
tuple_key!(A, B);
tuple_key!(A, B, C);
tuple_key!(A, B, C, D);

/// A leading part of a tuple key, for prefix scans.
///
/// For a table keyed by `(A, B)`, the prefix `(a,)` selects every key whose
/// first element is `a`; for `(A, B, C)`, both `(a,)` and `(a, b)` work.
/// Because each element's encoding is prefix-free, "starts with the encoding
/// of the prefix" is exactly "has these leading elements".
pub trait KeyPrefix<K: ?Sized> {
    /// Appends the prefix's encoding to `out`.
    fn encode_prefix(&self, out: &mut Vec<u8>);
}

macro_rules! prefix_of {
    (($($p:ident),+) of ($($k:ident),+)) => {
        impl<$($k: Key<Owned = $k> + Sized),+> KeyPrefix<($($k,)+)> for ($($p,)+) {
            #[allow(non_snake_case)]
            fn encode_prefix(&self, out: &mut Vec<u8>) {
                let ($($p,)+) = self;
                $($p.encode_key(out);)+
            }
        }
    };
}
prefix_of!((A) of (A, B));
prefix_of!((A) of (A, B, C));
prefix_of!((A, B) of (A, B, C));
prefix_of!((A) of (A, B, C, D));
prefix_of!((A, B) of (A, B, C, D));
prefix_of!((A, B, C) of (A, B, C, D));

/// A range of keys, as taken by [`Store::range`](crate::Store::range).
///
/// Every `RangeBounds<K>` is one (`10..20`, `..=5`, `..`). For the unsized
/// key types `str` and `[u8]`, where the standard library has no
/// `RangeBounds<str>` for `"a".."b"`, the range types over references are
/// implemented directly, so `store.range(&NAMES, "a".."m")` works.
pub trait KeyRange<K: ?Sized> {
    /// The lower bound.
    fn start(&self) -> Bound<&K>;
    /// The upper bound.
    fn end(&self) -> Bound<&K>;
}

impl<K, R: RangeBounds<K>> KeyRange<K> for R {
    fn start(&self) -> Bound<&K> {
        self.start_bound()
    }
    fn end(&self) -> Bound<&K> {
        self.end_bound()
    }
}

macro_rules! unsized_ranges {
    ($($t:ty),*) => {$(
        impl KeyRange<$t> for std::ops::Range<&$t> {
            fn start(&self) -> Bound<&$t> { Bound::Included(self.start) }
            fn end(&self) -> Bound<&$t> { Bound::Excluded(self.end) }
        }
        impl KeyRange<$t> for std::ops::RangeInclusive<&$t> {
            fn start(&self) -> Bound<&$t> { Bound::Included(*self.start()) }
            fn end(&self) -> Bound<&$t> { Bound::Included(*self.end()) }
        }
        impl KeyRange<$t> for std::ops::RangeFrom<&$t> {
            fn start(&self) -> Bound<&$t> { Bound::Included(self.start) }
            fn end(&self) -> Bound<&$t> { Bound::Unbounded }
        }
        impl KeyRange<$t> for std::ops::RangeTo<&$t> {
            fn start(&self) -> Bound<&$t> { Bound::Unbounded }
            fn end(&self) -> Bound<&$t> { Bound::Excluded(self.end) }
        }
        impl KeyRange<$t> for std::ops::RangeToInclusive<&$t> {
            fn start(&self) -> Bound<&$t> { Bound::Unbounded }
            fn end(&self) -> Bound<&$t> { Bound::Included(self.end) }
        }
        impl KeyRange<$t> for std::ops::RangeFull {
            fn start(&self) -> Bound<&$t> { Bound::Unbounded }
            fn end(&self) -> Bound<&$t> { Bound::Unbounded }
        }
        impl<'a> KeyRange<$t> for (Bound<&'a $t>, Bound<&'a $t>) {
            fn start(&self) -> Bound<&$t> { self.0 }
            fn end(&self) -> Bound<&$t> { self.1 }
        }
    )*};
}
unsized_ranges!(str, [u8]);

/// Renders the encoded key as its decoded `Debug` form, for error messages.
/// Falls back to the raw bytes when they do not decode.
pub(crate) fn render<K: Key + ?Sized>(encoded: &[u8]) -> String {
    match decode_exact::<K>(encoded) {
        Ok(key) => format!("{key:?}"),
        Err(_) => format!("{encoded:02x?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn enc<K: Key + ?Sized>(k: &K) -> Vec<u8> {
        let mut v = Vec::new();
        k.encode_key(&mut v);
        v
    }

    #[test]
    fn strings_with_zero_bytes_sort_correctly() {
        let a = enc("a");
        let a0 = enc("a\0");
        let a1 = enc("a\u{1}");
        let ab = enc("ab");
        assert!(a < a0 && a0 < a1 && a1 < ab);
        assert_eq!(decode_exact::<str>(&a0).unwrap(), "a\0");
    }

    #[test]
    fn truncated_input_is_an_error_not_a_panic() {
        let full = enc(&(7u64, String::from("xy")));
        for cut in 0..full.len() {
            assert!(
                decode_exact::<(u64, String)>(&full[..cut]).is_err(),
                "cut {cut}"
            );
        }
    }

    #[test]
    fn prefix_matches_tuple_encoding() {
        let mut p = Vec::new();
        KeyPrefix::<(u32, String)>::encode_prefix(&(5u32,), &mut p);
        assert!(enc(&(5u32, String::from("z"))).starts_with(&p));
        assert!(!enc(&(6u32, String::new())).starts_with(&p));
    }
}
