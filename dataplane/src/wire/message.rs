//! Control messages: `magic | version | length | xxh3(payload) | postcard payload`.
//!
//! Used for the CLI↔agent API and the migration control channel between agents. Small
//! (bounded by [`MESSAGE_LEN_MAX`]) and self-checking, so a corrupt or hostile peer is
//! refused before the payload is allocated or decoded.

use std::io::{Read, Write};

use crate::hash::xxh3_64;
use serde::{de::DeserializeOwned, Serialize};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{read_exact_or_truncated, WireError, WIRE_VERSION};

/// "FRYC": ferry control.
pub const MESSAGE_MAGIC: u32 = 0x4359_5246;
/// Largest control message (device state travels in one; 16 MiB is far above any real one).
pub const MESSAGE_LEN_MAX: u32 = 16 << 20;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug)]
#[repr(C)]
struct MessageHeader {
    magic: U32,
    version: U16,
    reserved: U16,
    len: U32,
    reserved2: U32,
    checksum: U64,
}

const MESSAGE_HEADER_LEN: usize = std::mem::size_of::<MessageHeader>();

/// Encodes `msg` into one buffer (header + payload).
pub fn encode_message<T: Serialize>(msg: &T) -> Result<Vec<u8>, WireError> {
    let payload = postcard::to_stdvec(msg).map_err(|e| WireError::Encode {
        reason: e.to_string(),
    })?;
    if payload.len() as u64 > MESSAGE_LEN_MAX as u64 {
        return Err(WireError::TooLong {
            len: payload.len() as u64,
            limit: MESSAGE_LEN_MAX as u64,
        });
    }
    Ok(seal(&payload))
}

/// Header + `payload`: the message as it goes on the wire.
fn seal(payload: &[u8]) -> Vec<u8> {
    let header = MessageHeader {
        magic: MESSAGE_MAGIC.into(),
        version: WIRE_VERSION.into(),
        reserved: 0.into(),
        len: (payload.len() as u32).into(),
        reserved2: 0.into(),
        checksum: xxh3_64(payload).into(),
    };
    let mut out = Vec::with_capacity(MESSAGE_HEADER_LEN + payload.len());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// Writes one message and flushes it.
pub fn write_message<T: Serialize>(w: &mut impl Write, msg: &T) -> Result<(), WireError> {
    #[cfg_attr(not(feature = "failpoints"), allow(unused_mut))]
    let mut buf = encode_message(msg)?;
    // Fault injection: the last byte flipped, so the receiver's payload checksum fails.
    #[cfg(feature = "failpoints")]
    if crate::failpoint::take_control_corruption() {
        if let Some(last) = buf.last_mut() {
            *last ^= 0xff;
        }
    }
    w.write_all(&buf).map_err(|source| WireError::Io {
        op: "writing a message",
        source,
    })?;
    w.flush().map_err(|source| WireError::Io {
        op: "flushing a message",
        source,
    })
}

/// Reads one message of at most `len_max` payload bytes (≤ [`MESSAGE_LEN_MAX`]).
pub fn read_message<T: DeserializeOwned>(r: &mut impl Read, len_max: u32) -> Result<T, WireError> {
    let mut head = [0u8; MESSAGE_HEADER_LEN];
    read_exact_or_truncated(r, &mut head, "message header")?;
    let len = check_header(&head, len_max)?;
    let mut payload = vec![0u8; len];
    read_exact_or_truncated(r, &mut payload, "message payload")?;
    decode_payload(&head, &payload)
}

/// Decodes a message from a complete buffer (header + payload), as the fuzzer feeds it.
pub fn decode_message<T: DeserializeOwned>(buf: &[u8], len_max: u32) -> Result<T, WireError> {
    if buf.len() < MESSAGE_HEADER_LEN {
        return Err(WireError::Truncated {
            what: "message header",
            got: buf.len(),
            want: MESSAGE_HEADER_LEN,
        });
    }
    let (head, rest) = buf.split_at(MESSAGE_HEADER_LEN);
    let len = check_header(head, len_max)?;
    if rest.len() != len {
        return Err(WireError::Truncated {
            what: "message payload",
            got: rest.len(),
            want: len,
        });
    }
    decode_payload(head, rest)
}

fn check_header(head: &[u8], len_max: u32) -> Result<usize, WireError> {
    let header = MessageHeader::read_from_bytes(head).map_err(|_| WireError::Truncated {
        what: "message header",
        got: head.len(),
        want: MESSAGE_HEADER_LEN,
    })?;
    if header.magic.get() != MESSAGE_MAGIC {
        return Err(WireError::BadMagic {
            expected: MESSAGE_MAGIC,
            found: header.magic.get(),
        });
    }
    if header.version.get() != WIRE_VERSION {
        return Err(WireError::BadVersion {
            found: header.version.get(),
            supported: WIRE_VERSION,
        });
    }
    let limit = len_max.min(MESSAGE_LEN_MAX);
    if header.len.get() > limit {
        return Err(WireError::TooLong {
            len: header.len.get() as u64,
            limit: limit as u64,
        });
    }
    Ok(header.len.get() as usize)
}

fn decode_payload<T: DeserializeOwned>(head: &[u8], payload: &[u8]) -> Result<T, WireError> {
    let header = MessageHeader::read_from_bytes(head).expect("checked by check_header");
    let computed = xxh3_64(payload);
    if computed != header.checksum.get() {
        return Err(WireError::BadPayloadChecksum {
            computed,
            claimed: header.checksum.get(),
        });
    }
    postcard::from_bytes(payload).map_err(|e| WireError::Decode {
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Serialize, Deserialize, Debug, PartialEq)]
    enum Msg {
        Hello { name: String, n: u64 },
        Blob(Vec<u8>),
    }

    fn sample() -> Vec<u8> {
        encode_message(&Msg::Hello {
            name: "vm1".into(),
            n: 42,
        })
        .unwrap()
    }

    #[test]
    fn round_trip_over_a_stream() {
        let mut buf = Vec::new();
        write_message(
            &mut buf,
            &Msg::Hello {
                name: "a".into(),
                n: 1,
            },
        )
        .unwrap();
        write_message(&mut buf, &Msg::Blob(vec![9; 1000])).unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_message::<Msg>(&mut r, MESSAGE_LEN_MAX).unwrap(),
            Msg::Hello {
                name: "a".into(),
                n: 1
            }
        );
        assert_eq!(
            read_message::<Msg>(&mut r, MESSAGE_LEN_MAX).unwrap(),
            Msg::Blob(vec![9; 1000])
        );
        let eof = read_message::<Msg>(&mut r, MESSAGE_LEN_MAX).unwrap_err();
        assert!(eof.is_clean_eof(), "{eof}");
    }

    #[test]
    fn truncated_is_refused_at_every_length() {
        let buf = sample();
        for cut in 0..buf.len() {
            let err = decode_message::<Msg>(&buf[..cut], MESSAGE_LEN_MAX).unwrap_err();
            assert!(
                matches!(err, WireError::Truncated { .. }),
                "cut {cut}: {err}"
            );
            let err = read_message::<Msg>(&mut &buf[..cut], MESSAGE_LEN_MAX).unwrap_err();
            assert!(
                matches!(err, WireError::Truncated { .. }),
                "cut {cut}: {err}"
            );
        }
    }

    #[test]
    fn corrupt_magic_version_checksum_and_length() {
        let mut bad = sample();
        bad[0] ^= 1;
        assert!(matches!(
            decode_message::<Msg>(&bad, MESSAGE_LEN_MAX),
            Err(WireError::BadMagic { .. })
        ));
        let mut bad = sample();
        bad[4] = 99;
        assert!(matches!(
            decode_message::<Msg>(&bad, MESSAGE_LEN_MAX),
            Err(WireError::BadVersion { found: 99, .. })
        ));
        let mut bad = sample();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert!(matches!(
            decode_message::<Msg>(&bad, MESSAGE_LEN_MAX),
            Err(WireError::BadPayloadChecksum { .. })
        ));
        // A peer that lies about the length: refused before anything is allocated.
        let mut bad = sample();
        bad[8..12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            read_message::<Msg>(&mut &bad[..], MESSAGE_LEN_MAX),
            Err(WireError::TooLong { .. })
        ));
        // A caller's tighter limit applies.
        assert!(matches!(
            decode_message::<Msg>(&sample(), 4),
            Err(WireError::TooLong { .. })
        ));
    }

    #[test]
    fn well_framed_garbage_is_a_decode_error() {
        let buf = seal(&[0xffu8; 9]);
        assert!(matches!(
            decode_message::<Msg>(&buf, MESSAGE_LEN_MAX),
            Err(WireError::Decode { .. })
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256)) {
            let _ = decode_message::<Msg>(&bytes, MESSAGE_LEN_MAX);
            let _ = read_message::<Msg>(&mut &bytes[..], MESSAGE_LEN_MAX);
        }
    }
}
