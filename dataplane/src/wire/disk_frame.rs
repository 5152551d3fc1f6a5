//! Disk frames: the same 40-byte header as memory frames (see [`super::frame`]), with
//! their own kinds, on the disk links.
//!
//! ```text
//! kind         round   count          first    payload  reserved
//! Chunk  (16)  id      len            offset   len      disk      bulk copy: len bytes follow
//! Zero   (17)  id      len            offset   0        disk      bulk copy: an all-zero chunk
//! Write  (18)  id      len            offset   len      disk      mirrored guest write
//! Ack    (19)  id      status         0        0        disk      destination → source
//! ```
//! Every offset and length is a multiple of [`BLOCK_SIZE`], non-zero, at most
//! [`CHUNK_BYTES_MAX`], and inside the named disk: checked here, against the disk sizes
//! the receiver knows, before a byte of payload is read.

use super::frame::{open_header, seal_header};
use super::WireError;
use crate::disk::{BLOCK_SIZE, CHUNK_BYTES_MAX};
use crate::wire::FRAME_HEADER_LEN;

const KIND_DISK_CHUNK: u16 = 16;
const KIND_DISK_ZERO: u16 = 17;
const KIND_DISK_WRITE: u16 = 18;
const KIND_DISK_ACK: u16 = 19;

/// Ack status of a request the destination carried out.
pub const ACK_OK: u32 = 0;

/// A decoded, validated disk frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiskFrame {
    /// Bulk copy: `len` bytes of disk `disk` at `offset` follow.
    Chunk {
        disk: u32,
        id: u32,
        offset: u64,
        len: u32,
    },
    /// Bulk copy: `len` bytes at `offset` are all zero; no payload.
    Zero {
        disk: u32,
        id: u32,
        offset: u64,
        len: u32,
    },
    /// A mirrored guest write: `len` bytes at `offset` follow.
    Write {
        disk: u32,
        id: u32,
        offset: u64,
        len: u32,
    },
    /// Destination → source: request `id` is done. `status` is [`ACK_OK`] or the errno of
    /// the failed write.
    Ack { disk: u32, id: u32, status: u32 },
}

impl DiskFrame {
    /// Bytes of payload that follow the header.
    pub fn payload_len(&self) -> usize {
        match *self {
            DiskFrame::Chunk { len, .. } | DiskFrame::Write { len, .. } => len as usize,
            DiskFrame::Zero { .. } | DiskFrame::Ack { .. } => 0,
        }
    }

    pub fn disk(&self) -> u32 {
        match *self {
            DiskFrame::Chunk { disk, .. }
            | DiskFrame::Zero { disk, .. }
            | DiskFrame::Write { disk, .. }
            | DiskFrame::Ack { disk, .. } => disk,
        }
    }

    pub fn id(&self) -> u32 {
        match *self {
            DiskFrame::Chunk { id, .. }
            | DiskFrame::Zero { id, .. }
            | DiskFrame::Write { id, .. }
            | DiskFrame::Ack { id, .. } => id,
        }
    }

    pub fn encode(&self) -> [u8; FRAME_HEADER_LEN] {
        let payload = self.payload_len() as u32;
        match *self {
            DiskFrame::Chunk {
                disk,
                id,
                offset,
                len,
            } => seal_header(KIND_DISK_CHUNK, id, len, offset, payload, disk),
            DiskFrame::Zero {
                disk,
                id,
                offset,
                len,
            } => seal_header(KIND_DISK_ZERO, id, len, offset, payload, disk),
            DiskFrame::Write {
                disk,
                id,
                offset,
                len,
            } => seal_header(KIND_DISK_WRITE, id, len, offset, payload, disk),
            DiskFrame::Ack { disk, id, status } => {
                seal_header(KIND_DISK_ACK, id, status, 0, payload, disk)
            }
        }
    }

    /// Validates a header: magic, version, checksum, kind, and for data-bearing kinds the
    /// disk index, alignment, length and range against `disk_sizes` (bytes per disk).
    pub fn decode(bytes: &[u8], disk_sizes: &[u64]) -> Result<DiskFrame, WireError> {
        let h = open_header(bytes)?;
        let disk = h.reserved;
        let size = *disk_sizes.get(disk as usize).ok_or(WireError::NoSuchDisk {
            disk,
            disks: disk_sizes.len() as u32,
        })?;
        let (id, offset, len) = (h.round, h.first, h.count);
        let check_range = |kind: &'static str, payload: u32| -> Result<(), WireError> {
            if len == 0 || len as usize > CHUNK_BYTES_MAX {
                return Err(WireError::TooLong {
                    len: len as u64,
                    limit: CHUNK_BYTES_MAX as u64,
                });
            }
            if !offset.is_multiple_of(BLOCK_SIZE as u64)
                || !(len as usize).is_multiple_of(BLOCK_SIZE)
            {
                return Err(WireError::DiskMisaligned { offset, len });
            }
            if offset.checked_add(len as u64).is_none_or(|end| end > size) {
                return Err(WireError::DiskOutOfRange {
                    disk,
                    offset,
                    len,
                    size,
                });
            }
            if h.payload_len != payload {
                return Err(WireError::BadLength {
                    kind,
                    len: h.payload_len as u64,
                    expected: payload as u64,
                });
            }
            Ok(())
        };
        match h.kind {
            KIND_DISK_CHUNK => {
                check_range("disk-chunk", len)?;
                Ok(DiskFrame::Chunk {
                    disk,
                    id,
                    offset,
                    len,
                })
            }
            KIND_DISK_ZERO => {
                check_range("disk-zero", 0)?;
                Ok(DiskFrame::Zero {
                    disk,
                    id,
                    offset,
                    len,
                })
            }
            KIND_DISK_WRITE => {
                check_range("disk-write", len)?;
                Ok(DiskFrame::Write {
                    disk,
                    id,
                    offset,
                    len,
                })
            }
            KIND_DISK_ACK => {
                if h.payload_len != 0 || offset != 0 {
                    return Err(WireError::BadLength {
                        kind: "disk-ack",
                        len: h.payload_len as u64,
                        expected: 0,
                    });
                }
                Ok(DiskFrame::Ack {
                    disk,
                    id,
                    status: h.count,
                })
            }
            kind => Err(WireError::UnknownKind { kind }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Frame;

    const SIZES: [u64; 2] = [64 << 20, 1 << 20];

    #[test]
    fn every_kind_round_trips() {
        for frame in [
            DiskFrame::Chunk {
                disk: 0,
                id: 7,
                offset: 4096,
                len: 1 << 20,
            },
            DiskFrame::Zero {
                disk: 1,
                id: u32::MAX,
                offset: 0,
                len: 1 << 20,
            },
            DiskFrame::Write {
                disk: 0,
                id: 0,
                offset: (64 << 20) - 65536,
                len: 65536,
            },
            DiskFrame::Ack {
                disk: 1,
                id: 3,
                status: 28,
            },
        ] {
            assert_eq!(DiskFrame::decode(&frame.encode(), &SIZES).unwrap(), frame);
        }
    }

    #[test]
    fn lies_about_disks_lengths_and_ranges_are_refused() {
        let decode = |f: DiskFrame| DiskFrame::decode(&f.encode(), &SIZES);
        let chunk = |disk, offset, len| DiskFrame::Chunk {
            disk,
            id: 1,
            offset,
            len,
        };
        assert!(matches!(
            decode(chunk(2, 0, 4096)),
            Err(WireError::NoSuchDisk { disk: 2, disks: 2 })
        ));
        assert!(matches!(
            decode(chunk(1, 1 << 20, 4096)),
            Err(WireError::DiskOutOfRange { .. })
        ));
        assert!(matches!(
            decode(chunk(0, u64::MAX - 4095, 4096)),
            Err(WireError::DiskOutOfRange { .. })
        ));
        assert!(matches!(
            decode(chunk(0, 512, 4096)),
            Err(WireError::DiskMisaligned { .. })
        ));
        assert!(matches!(
            decode(chunk(0, 0, 1000)),
            Err(WireError::DiskMisaligned { .. })
        ));
        assert!(matches!(
            decode(chunk(0, 0, 0)),
            Err(WireError::TooLong { .. })
        ));
        assert!(matches!(
            decode(chunk(0, 0, CHUNK_BYTES_MAX as u32 + 4096)),
            Err(WireError::TooLong { .. })
        ));
        // A chunk whose header claims less payload than its length.
        let lying = seal_header(KIND_DISK_CHUNK, 1, 8192, 0, 4096, 0);
        assert!(matches!(
            DiskFrame::decode(&lying, &SIZES),
            Err(WireError::BadLength { .. })
        ));
        let zero_with_payload = seal_header(KIND_DISK_ZERO, 1, 8192, 0, 8192, 0);
        assert!(matches!(
            DiskFrame::decode(&zero_with_payload, &SIZES),
            Err(WireError::BadLength { .. })
        ));
    }

    #[test]
    fn memory_and_disk_frames_do_not_mix() {
        let page = Frame::Pages {
            round: 0,
            first: 0,
            count: 1,
        }
        .encode();
        assert!(matches!(
            DiskFrame::decode(&page, &SIZES),
            Err(WireError::UnknownKind { kind: 1 })
        ));
        let disk = DiskFrame::Ack {
            disk: 0,
            id: 0,
            status: 0,
        }
        .encode();
        assert!(matches!(
            Frame::decode(&disk, &crate::wire::FrameLimits::for_pages(10)),
            Err(WireError::UnknownKind { kind: 19 })
        ));
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_headers_never_panic_and_accepted_ones_are_in_range(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 40..41),
        ) {
            let mut h = [0u8; FRAME_HEADER_LEN];
            h.copy_from_slice(&bytes);
            h[..4].copy_from_slice(&super::super::frame::FRAME_MAGIC.to_le_bytes());
            h[4..6].copy_from_slice(&crate::wire::WIRE_VERSION.to_le_bytes());
            h[6..8].copy_from_slice(&(16 + u16::from(bytes[6] % 4)).to_le_bytes());
            h[28..32].copy_from_slice(&u32::from(bytes[28] % 3).to_le_bytes());
            let h = {
                let o = open_header_unchecked(&h);
                seal_header(o.0, o.1, o.2, o.3, o.4, o.5)
            };
            if let Ok(DiskFrame::Chunk { disk, offset, len, .. } | DiskFrame::Write { disk, offset, len, .. } | DiskFrame::Zero { disk, offset, len, .. }) = DiskFrame::decode(&h, &SIZES) {
                proptest::prop_assert!(offset + len as u64 <= SIZES[disk as usize]);
            }
        }
    }

    /// The raw fields of a header, for resealing fuzzed bytes.
    fn open_header_unchecked(h: &[u8; FRAME_HEADER_LEN]) -> (u16, u32, u32, u64, u32, u32) {
        let u16_at = |i: usize| u16::from_le_bytes([h[i], h[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().unwrap());
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().unwrap());
        (
            u16_at(6),
            u32_at(8),
            u32_at(12),
            u64_at(16),
            u32_at(24),
            u32_at(28),
        )
    }
}
