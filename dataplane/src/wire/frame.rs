//! Data frames: a fixed 40-byte header, optionally followed by page bytes.
//!
//! ```text
//! 0       4       6       8          12         16                 24         28     32                 40
//! | magic | ver   | kind  | round    | count    | first (page)     | payload  | rsvd | header xxh3     |
//! ```
//! All fields little-endian. The header carries its own checksum, so a corrupt or
//! misaligned stream is caught before its lengths are trusted. Page payloads are not
//! checksummed per frame: they are received straight into guest memory, hashed as they
//! land, and proven equal to the source by the digest compared at switch-over.

use crate::hash::xxh3_64;
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use super::{WireError, WIRE_VERSION};
use crate::memory::PAGE_SIZE;

/// "FRYD": ferry data.
pub const FRAME_MAGIC: u32 = 0x4459_5246;
/// Size of [`FrameHeader`] on the wire.
pub const FRAME_HEADER_LEN: usize = 40;
/// Most pages one frame may carry (1 MiB of payload).
pub const FRAME_PAGES_MAX: u32 = 256;

#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct FrameHeader {
    magic: U32,
    version: U16,
    kind: U16,
    round: U32,
    count: U32,
    first: U64,
    payload_len: U32,
    reserved: U32,
    checksum: U64,
}

const _: () = assert!(std::mem::size_of::<FrameHeader>() == FRAME_HEADER_LEN);

const KIND_PAGES: u16 = 1;
const KIND_ZERO_PAGES: u16 = 2;
const KIND_ROUND_END: u16 = 3;

/// A decoded, validated frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Frame {
    /// `count` pages starting at `first` follow as payload (`count * PAGE_SIZE` bytes).
    Pages { round: u32, first: u64, count: u32 },
    /// Pages `first..first + count` are all zero; no payload.
    ZeroPages { round: u32, first: u64, count: u32 },
    /// This stream has sent everything for `round`: `pages` pages in all.
    RoundEnd { round: u32, pages: u64 },
}

/// What a receiver accepts.
#[derive(Clone, Copy, Debug)]
pub struct FrameLimits {
    /// Pages of guest memory: every page a frame names must be below this.
    pub pages: u64,
    /// Most pages per frame.
    pub pages_per_frame_max: u32,
}

impl FrameLimits {
    pub fn for_pages(pages: u64) -> Self {
        Self {
            pages,
            pages_per_frame_max: FRAME_PAGES_MAX,
        }
    }
}

impl Frame {
    /// Bytes of payload that follow the header.
    pub fn payload_len(&self) -> usize {
        match *self {
            Frame::Pages { count, .. } => count as usize * PAGE_SIZE,
            Frame::ZeroPages { .. } | Frame::RoundEnd { .. } => 0,
        }
    }

    /// The header that announces this frame.
    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let (kind, round, count, first) = match *self {
            Frame::Pages {
                round,
                first,
                count,
            } => (KIND_PAGES, round, count, first),
            Frame::ZeroPages {
                round,
                first,
                count,
            } => (KIND_ZERO_PAGES, round, count, first),
            Frame::RoundEnd { round, pages } => (KIND_ROUND_END, round, 0, pages),
        };
        seal_header(kind, round, count, first, self.payload_len() as u32, 0)
    }

    /// Validates a header against `limits`: magic, version, checksum, kind, lengths and page
    /// range. Nothing in a header is trusted before this returns `Ok`.
    pub fn decode(bytes: &[u8], limits: &FrameLimits) -> Result<Frame, WireError> {
        let header = open_header(bytes)?;
        let round = header.round;
        let count = header.count;
        let first = header.first;
        let payload_len = header.payload_len as u64;
        let check_pages = |kind: &'static str, expected_payload: u64| -> Result<(), WireError> {
            if count == 0 || count > limits.pages_per_frame_max {
                return Err(WireError::TooLong {
                    len: count as u64 * PAGE_SIZE as u64,
                    limit: limits.pages_per_frame_max as u64 * PAGE_SIZE as u64,
                });
            }
            if first
                .checked_add(count as u64)
                .is_none_or(|end| end > limits.pages)
            {
                return Err(WireError::OutOfRange {
                    first,
                    count: count as u64,
                    pages: limits.pages,
                });
            }
            if payload_len != expected_payload {
                return Err(WireError::BadLength {
                    kind,
                    len: payload_len,
                    expected: expected_payload,
                });
            }
            Ok(())
        };
        match header.kind {
            KIND_PAGES => {
                check_pages("pages", count as u64 * PAGE_SIZE as u64)?;
                Ok(Frame::Pages {
                    round,
                    first,
                    count,
                })
            }
            KIND_ZERO_PAGES => {
                check_pages("zero-pages", 0)?;
                Ok(Frame::ZeroPages {
                    round,
                    first,
                    count,
                })
            }
            KIND_ROUND_END => {
                if payload_len != 0 || count != 0 {
                    return Err(WireError::BadLength {
                        kind: "round-end",
                        len: payload_len,
                        expected: 0,
                    });
                }
                if first > limits.pages {
                    return Err(WireError::OutOfRange {
                        first: 0,
                        count: first,
                        pages: limits.pages,
                    });
                }
                Ok(Frame::RoundEnd {
                    round,
                    pages: first,
                })
            }
            kind => Err(WireError::UnknownKind { kind }),
        }
    }
}

/// Builds and checksums a header (shared by memory and disk frames).
pub(super) fn seal_header(
    kind: u16,
    round: u32,
    count: u32,
    first: u64,
    payload_len: u32,
    reserved: u32,
) -> [u8; FRAME_HEADER_LEN] {
    let mut header = FrameHeader {
        magic: FRAME_MAGIC.into(),
        version: WIRE_VERSION.into(),
        kind: kind.into(),
        round: round.into(),
        count: count.into(),
        first: first.into(),
        payload_len: payload_len.into(),
        reserved: reserved.into(),
        checksum: 0.into(),
    };
    header.checksum = header_checksum(header.as_bytes()).into();
    let mut out = [0u8; FRAME_HEADER_LEN];
    out.copy_from_slice(header.as_bytes());
    out
}

/// The fields of a header whose magic, version and checksum have been checked; nothing
/// else about it is trusted yet.
pub(super) struct OpenHeader {
    pub(super) kind: u16,
    pub(super) round: u32,
    pub(super) count: u32,
    pub(super) first: u64,
    pub(super) payload_len: u32,
    pub(super) reserved: u32,
}

/// Checks magic, version and checksum (shared by memory and disk frames).
pub(super) fn open_header(bytes: &[u8]) -> Result<OpenHeader, WireError> {
    let header = FrameHeader::read_from_bytes(bytes).map_err(|_| WireError::Truncated {
        what: "frame header",
        got: bytes.len(),
        want: FRAME_HEADER_LEN,
    })?;
    if header.magic.get() != FRAME_MAGIC {
        return Err(WireError::BadMagic {
            expected: FRAME_MAGIC,
            found: header.magic.get(),
        });
    }
    if header.version.get() != WIRE_VERSION {
        return Err(WireError::BadVersion {
            found: header.version.get(),
            supported: WIRE_VERSION,
        });
    }
    let computed = header_checksum(bytes);
    if computed != header.checksum.get() {
        return Err(WireError::BadHeaderChecksum {
            computed,
            claimed: header.checksum.get(),
        });
    }
    Ok(OpenHeader {
        kind: header.kind.get(),
        round: header.round.get(),
        count: header.count.get(),
        first: header.first.get(),
        payload_len: header.payload_len.get(),
        reserved: header.reserved.get(),
    })
}

fn header_checksum(header: &[u8]) -> u64 {
    xxh3_64(&header[..FRAME_HEADER_LEN - 8])
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: FrameLimits = FrameLimits {
        pages: 1000,
        pages_per_frame_max: FRAME_PAGES_MAX,
    };

    fn reseal(mut bytes: [u8; FRAME_HEADER_LEN]) -> [u8; FRAME_HEADER_LEN] {
        let sum = header_checksum(&bytes);
        bytes[32..].copy_from_slice(&sum.to_le_bytes());
        bytes
    }

    #[test]
    fn every_kind_round_trips() {
        for frame in [
            Frame::Pages {
                round: 3,
                first: 10,
                count: 256,
            },
            Frame::Pages {
                round: 0,
                first: 999,
                count: 1,
            },
            Frame::ZeroPages {
                round: 7,
                first: 0,
                count: 5,
            },
            Frame::RoundEnd {
                round: 9,
                pages: 1000,
            },
        ] {
            assert_eq!(Frame::decode(&frame.encode(), &LIMITS).unwrap(), frame);
        }
        assert_eq!(
            Frame::Pages {
                round: 0,
                first: 0,
                count: 2
            }
            .payload_len(),
            2 * PAGE_SIZE
        );
    }

    #[test]
    fn truncated_header() {
        let bytes = Frame::ZeroPages {
            round: 0,
            first: 0,
            count: 1,
        }
        .encode();
        for cut in 0..FRAME_HEADER_LEN {
            assert!(matches!(
                Frame::decode(&bytes[..cut], &LIMITS),
                Err(WireError::Truncated { .. })
            ));
        }
    }

    #[test]
    fn corrupt_header_is_caught_by_magic_version_or_checksum() {
        let good = Frame::Pages {
            round: 1,
            first: 2,
            count: 3,
        }
        .encode();
        for byte in 0..FRAME_HEADER_LEN {
            for bit in 0..8 {
                let mut bad = good;
                bad[byte] ^= 1 << bit;
                let err = Frame::decode(&bad, &LIMITS).unwrap_err();
                assert!(
                    matches!(
                        err,
                        WireError::BadMagic { .. }
                            | WireError::BadVersion { .. }
                            | WireError::BadHeaderChecksum { .. }
                    ),
                    "byte {byte} bit {bit}: {err}"
                );
            }
        }
    }

    #[test]
    fn wrong_version_is_named() {
        let mut bytes = Frame::RoundEnd { round: 0, pages: 0 }.encode();
        bytes[4] = 2;
        match Frame::decode(&reseal(bytes), &LIMITS) {
            Err(WireError::BadVersion {
                found: 2,
                supported: WIRE_VERSION,
            }) => {}
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn out_of_range_and_oversized_frames() {
        let past_end = Frame::Pages {
            round: 0,
            first: 999,
            count: 2,
        }
        .encode();
        assert!(matches!(
            Frame::decode(&past_end, &LIMITS),
            Err(WireError::OutOfRange { .. })
        ));
        let wraps = Frame::ZeroPages {
            round: 0,
            first: u64::MAX,
            count: 2,
        }
        .encode();
        assert!(matches!(
            Frame::decode(&wraps, &LIMITS),
            Err(WireError::OutOfRange { .. })
        ));
        let oversized = Frame::Pages {
            round: 0,
            first: 0,
            count: FRAME_PAGES_MAX + 1,
        }
        .encode();
        assert!(matches!(
            Frame::decode(&oversized, &LIMITS),
            Err(WireError::TooLong { .. })
        ));
        let empty = Frame::Pages {
            round: 0,
            first: 0,
            count: 0,
        }
        .encode();
        assert!(matches!(
            Frame::decode(&empty, &LIMITS),
            Err(WireError::TooLong { .. })
        ));
        let too_many = Frame::RoundEnd {
            round: 0,
            pages: 1001,
        }
        .encode();
        assert!(matches!(
            Frame::decode(&too_many, &LIMITS),
            Err(WireError::OutOfRange { .. })
        ));
    }

    #[test]
    fn lying_payload_length_and_unknown_kind() {
        let mut bytes = Frame::Pages {
            round: 0,
            first: 0,
            count: 2,
        }
        .encode();
        bytes[24..28].copy_from_slice(&(3 * PAGE_SIZE as u32).to_le_bytes());
        assert!(matches!(
            Frame::decode(&reseal(bytes), &LIMITS),
            Err(WireError::BadLength { .. })
        ));
        let mut bytes = Frame::ZeroPages {
            round: 0,
            first: 0,
            count: 2,
        }
        .encode();
        bytes[24..28].copy_from_slice(&4096u32.to_le_bytes());
        assert!(matches!(
            Frame::decode(&reseal(bytes), &LIMITS),
            Err(WireError::BadLength { .. })
        ));
        let mut bytes = Frame::RoundEnd { round: 0, pages: 0 }.encode();
        bytes[6..8].copy_from_slice(&77u16.to_le_bytes());
        assert!(matches!(
            Frame::decode(&reseal(bytes), &LIMITS),
            Err(WireError::UnknownKind { kind: 77 })
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_headers_never_panic_and_accepted_ones_are_in_range(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            pages in 1u64..1_000_000,
        ) {
            let limits = FrameLimits::for_pages(pages);
            if let Ok(Frame::Pages { first, count, .. } | Frame::ZeroPages { first, count, .. }) = Frame::decode(&bytes, &limits) {
                proptest::prop_assert!(first + count as u64 <= pages);
            }
            // Sealed random headers exercise the field checks, not just the checksum.
            if bytes.len() >= FRAME_HEADER_LEN {
                let mut h = [0u8; FRAME_HEADER_LEN];
                h.copy_from_slice(&bytes[..FRAME_HEADER_LEN]);
                h[..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
                h[4..6].copy_from_slice(&WIRE_VERSION.to_le_bytes());
                if let Ok(Frame::Pages { first, count, .. } | Frame::ZeroPages { first, count, .. }) = Frame::decode(&reseal(h), &limits) {
                    proptest::prop_assert!(first + count as u64 <= pages && count <= FRAME_PAGES_MAX);
                }
            }
        }
    }
}
