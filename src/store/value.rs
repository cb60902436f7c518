//! The value frame: how a table value is stored.
//!
//! ```text
//! +---------+----------------------+------------------------------+
//! | version | crc32 (LE, 4 bytes)  | payload: bincode 2 (serde)   |
//! | 0x01    | of the payload bytes | standard config, varint ints |
//! +---------+----------------------+------------------------------+
//! ```
//!
//! The payload is the value serialized with serde through bincode 2.0.1's
//! standard configuration. Decoding checks the version byte, then the CRC,
//! then decodes with a hard byte limit of [`MAX_VALUE_BYTES`], so a corrupt or
//! hostile length prefix is rejected before it can ask for a large
//! allocation; a payload must be consumed exactly.

use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt;

/// Version byte of the current value frame.
pub const FRAME_VERSION: u8 = 1;
/// Bytes before the payload: version byte plus CRC.
pub const FRAME_HEADER: usize = 5;
/// Hard upper bound on a value's encoded size, whatever the options say.
pub const MAX_VALUE_BYTES: usize = 64 << 20;

type Config = bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<MAX_VALUE_BYTES>,
>;

const fn config() -> Config {
    bincode::config::standard().with_limit::<MAX_VALUE_BYTES>()
}

/// Why a stored frame could not be turned back into a value.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// Fewer bytes than the frame header.
    TooShort(usize),
    /// A version byte this build does not know.
    UnknownVersion(u8),
    /// The CRC stored in the frame does not match the payload.
    Checksum {
        /// CRC found in the frame.
        stored: u32,
        /// CRC computed over the payload.
        computed: u32,
    },
    /// The payload does not decode as the table's value type.
    Decode(String),
    /// The payload decoded but bytes were left over.
    TrailingBytes(usize),
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooShort(n) => {
                write!(f, "value frame is {n} bytes, shorter than its header")
            }
            FrameError::UnknownVersion(v) => write!(f, "unknown value frame version {v}"),
            FrameError::Checksum { stored, computed } => write!(
                f,
                "checksum mismatch: stored crc32 {stored:#010x}, computed {computed:#010x}"
            ),
            FrameError::Decode(e) => write!(f, "value does not decode: {e}"),
            FrameError::TrailingBytes(n) => write!(f, "{n} unexpected bytes after the value"),
        }
    }
}

impl std::error::Error for FrameError {}

/// Appends to a `Vec` without going through `std::io::Write` (bincode writes
/// many tiny slices; this keeps each one a plain `extend_from_slice`).
struct VecWriter<'a>(&'a mut Vec<u8>);

impl bincode::enc::write::Writer for VecWriter<'_> {
    #[inline]
    fn write(&mut self, bytes: &[u8]) -> Result<(), bincode::error::EncodeError> {
        // serde hands a `Vec<u8>` over one byte at a time: a push is much
        // cheaper than a copy of unknown length.
        if let [b] = bytes {
            self.0.push(*b);
        } else {
            self.0.extend_from_slice(bytes);
        }
        Ok(())
    }
}

/// Appends a framed value to `out`.
pub fn encode_value<V: Serialize + ?Sized>(
    value: &V,
    out: &mut Vec<u8>,
) -> Result<(), bincode::error::EncodeError> {
    let start = out.len();
    out.reserve(256);
    out.push(FRAME_VERSION);
    out.extend_from_slice(&[0; 4]);
    bincode::serde::encode_into_writer(value, VecWriter(out), config())?;
    let crc = crc32fast::hash(&out[start + FRAME_HEADER..]);
    out[start + 1..start + FRAME_HEADER].copy_from_slice(&crc.to_le_bytes());
    Ok(())
}

/// Checks a frame's version and CRC and returns its payload.
pub fn frame_payload(frame: &[u8]) -> Result<&[u8], FrameError> {
    let Some((header, payload)) = frame.split_first_chunk::<FRAME_HEADER>() else {
        return Err(FrameError::TooShort(frame.len()));
    };
    if header[0] != FRAME_VERSION {
        return Err(FrameError::UnknownVersion(header[0]));
    }
    let stored = u32::from_le_bytes([header[1], header[2], header[3], header[4]]);
    let computed = crc32fast::hash(payload);
    if stored != computed {
        return Err(FrameError::Checksum { stored, computed });
    }
    Ok(payload)
}

/// Decodes a framed value. Never panics, whatever the bytes.
pub fn decode_value<V: DeserializeOwned>(frame: &[u8]) -> Result<V, FrameError> {
    let payload = frame_payload(frame)?;
    let (value, used) = bincode::serde::decode_from_slice::<V, _>(payload, config())
        .map_err(|e| FrameError::Decode(e.to_string()))?;
    if used != payload.len() {
        return Err(FrameError::TrailingBytes(payload.len() - used));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_bit_flips_are_caught() {
        let mut frame = Vec::new();
        encode_value(&("order", 42u64, vec![1u8, 2, 3]), &mut frame).unwrap();
        let back: (String, u64, Vec<u8>) = decode_value(&frame).unwrap();
        assert_eq!(back, ("order".to_string(), 42, vec![1, 2, 3]));
        for i in 0..frame.len() {
            let mut bad = frame.clone();
            bad[i] ^= 0x10;
            assert!(
                decode_value::<(String, u64, Vec<u8>)>(&bad).is_err(),
                "flip at {i}"
            );
        }
    }

    #[test]
    fn hostile_length_prefix_is_rejected_without_allocating() {
        // A Vec<u8> claiming u64::MAX elements, with a valid CRC.
        let payload = [0xFD, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];
        let mut frame = vec![FRAME_VERSION];
        frame.extend_from_slice(&crc32fast::hash(&payload).to_le_bytes());
        frame.extend_from_slice(&payload);
        assert!(matches!(
            decode_value::<Vec<u8>>(&frame),
            Err(FrameError::Decode(_))
        ));
        assert!(matches!(
            decode_value::<String>(&frame),
            Err(FrameError::Decode(_))
        ));
    }
}
