//! The destination's landing of disk requests, shared by the TCP and RDMA disk lanes.
//!
//! A request's payload arrives in an io_uring ring buffer (read from a socket, or written
//! there by the source's RDMA device); [`Landing::write`] hashes its blocks while they are
//! in cache and queues the write; [`Landing::reap`] collects finished writes, records their
//! hashes in the disk's digest, and only then produces their acknowledgements. Zero chunks
//! ([`Landing::zero`]) are carried out at once.

use std::sync::Arc;

use super::tcp_disk::{BULK_LANE, MIRROR_LANE};
use super::{LandingDisk, TransportError};
use crate::disk::{BlockRing, DiskError, BLOCK_SIZE};
use crate::memory::{page_hash, ZERO_PAGE_HASH};
use crate::wire::{DiskFrame, ACK_OK};

/// What a disk request asks of a lane's receiver, once its frame was checked against the
/// lane: data to land (a bulk chunk on the bulk lane, a guest write on the mirror lane)
/// or a zero chunk (bulk lane).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Request {
    Data {
        disk: u32,
        id: u32,
        offset: u64,
        len: u32,
    },
    Zero {
        disk: u32,
        id: u32,
        offset: u64,
        len: u32,
    },
}

/// `frame` as a request of lane `lane` ([`BULK_LANE`] or [`MIRROR_LANE`]); any other kind
/// of frame on that lane is refused.
pub(crate) fn lane_request(
    stream: usize,
    lane: usize,
    frame: DiskFrame,
) -> Result<Request, TransportError> {
    match (lane, frame) {
        (
            BULK_LANE,
            DiskFrame::Chunk {
                disk,
                id,
                offset,
                len,
            },
        )
        | (
            MIRROR_LANE,
            DiskFrame::Write {
                disk,
                id,
                offset,
                len,
            },
        ) => Ok(Request::Data {
            disk,
            id,
            offset,
            len,
        }),
        (
            BULK_LANE,
            DiskFrame::Zero {
                disk,
                id,
                offset,
                len,
            },
        ) => Ok(Request::Zero {
            disk,
            id,
            offset,
            len,
        }),
        (_, other) => Err(TransportError::UnexpectedDiskFrame {
            stream,
            what: format!("{other:?} on the {} lane", lane_name(lane)),
        }),
    }
}

pub(crate) fn lane_name(lane: usize) -> &'static str {
    if lane == BULK_LANE {
        "bulk"
    } else {
        "mirror"
    }
}

/// A write queued in the ring: what to record and acknowledge when it completes.
struct InFlight {
    disk: u32,
    id: u32,
    first_block: usize,
    hashes: Vec<u64>,
}

/// One lane's ring, its disks, and the writes in flight from its buffers.
pub(crate) struct Landing {
    stream: usize,
    disks: Arc<Vec<LandingDisk>>,
    ring: BlockRing,
    /// Per ring buffer: the write queued from it.
    flights: Vec<Option<InFlight>>,
}

impl Landing {
    pub(crate) fn new(stream: usize, disks: Arc<Vec<LandingDisk>>, ring: BlockRing) -> Self {
        Self {
            stream,
            disks,
            flights: (0..ring.buffer_count()).map(|_| None).collect(),
            ring,
        }
    }

    pub(crate) fn ring(&self) -> &BlockRing {
        &self.ring
    }

    /// The ring, to fill an idle buffer (or to look up its address).
    pub(crate) fn ring_mut(&mut self) -> &mut BlockRing {
        &mut self.ring
    }

    /// Ring buffer `index` holds a write in flight.
    pub(crate) fn busy(&self, index: usize) -> bool {
        self.flights.get(index).is_some_and(Option::is_some)
    }

    /// Hashes the first `len` bytes of ring buffer `index` and queues their write at
    /// `offset` of disk `disk`, to be acknowledged as request `id`. The caller has checked
    /// the request against the disk's size (`DiskFrame::decode`) and the buffer's length.
    pub(crate) fn write(
        &mut self,
        index: usize,
        disk: u32,
        id: u32,
        offset: u64,
        len: u32,
    ) -> Result<(), TransportError> {
        let stream = self.stream;
        if index >= self.flights.len() || self.busy(index) {
            return Err(TransportError::Disk {
                stream,
                source: DiskError::BadParams {
                    reason: format!("ring buffer {index} is missing or busy"),
                },
            });
        }
        let landing = &self.disks[disk as usize];
        let hashes: Vec<u64> = self.ring.buffer(index)[..len as usize]
            .chunks_exact(BLOCK_SIZE)
            .map(page_hash)
            .collect();
        self.ring
            .write(&landing.image, index, offset, len as usize, index as u64)
            .map_err(|source| TransportError::Disk { stream, source })?;
        self.flights[index] = Some(InFlight {
            disk,
            id,
            first_block: (offset / BLOCK_SIZE as u64) as usize,
            hashes,
        });
        Ok(())
    }

    /// An all-zero chunk: zeroes the range (unless the image is fresh) and records zero
    /// hashes. The caller acknowledges it.
    pub(crate) fn zero(&self, disk: u32, offset: u64, len: u32) -> Result<(), TransportError> {
        let landing = &self.disks[disk as usize];
        if !landing.fresh {
            landing
                .image
                .zero_range(offset, len as u64)
                .map_err(|source| TransportError::Disk {
                    stream: self.stream,
                    source,
                })?;
        }
        landing.digest.record_run(
            (offset / BLOCK_SIZE as u64) as usize,
            std::iter::repeat_n(ZERO_PAGE_HASH, len as usize / BLOCK_SIZE),
        );
        Ok(())
    }

    /// Collects at least `min` completed writes (0: whatever has completed, without
    /// waiting): records their hashes in the digests, appends an ack header per write to
    /// `acks` and its buffer index to `freed`.
    ///
    /// `Err`: the ring failed (nothing appended). `Ok(Some(error))`: a write failed; its ack
    /// (carrying the errno) is appended like the others, and the caller sends the acks
    /// before reporting the error.
    pub(crate) fn reap(
        &mut self,
        min: usize,
        acks: &mut Vec<u8>,
        freed: &mut Vec<usize>,
    ) -> Result<Option<TransportError>, TransportError> {
        if self.ring.in_flight() == 0 {
            return Ok(None);
        }
        let stream = self.stream;
        let done = self
            .ring
            .complete(min)
            .map_err(|source| TransportError::Disk { stream, source })?;
        let mut failure = None;
        for completion in done {
            let index = completion.user_data as usize;
            let Some(flight) = self.flights.get_mut(index).and_then(Option::take) else {
                continue;
            };
            freed.push(index);
            let status = match completion.result {
                Ok(_) => {
                    self.disks[flight.disk as usize]
                        .digest
                        .record_run(flight.first_block, flight.hashes);
                    ACK_OK
                }
                Err(source) => {
                    let errno = source.raw_os_error().unwrap_or(libc::EIO) as u32;
                    let image = &self.disks[flight.disk as usize].image;
                    failure.get_or_insert(TransportError::Disk {
                        stream,
                        source: DiskError::Io {
                            path: image.path().to_path_buf(),
                            op: "writing a received disk chunk",
                            offset: flight.first_block as u64 * BLOCK_SIZE as u64,
                            source,
                        },
                    });
                    errno
                }
            };
            acks.extend_from_slice(
                &DiskFrame::Ack {
                    disk: flight.disk,
                    id: flight.id,
                    status,
                }
                .encode(),
            );
        }
        Ok(failure)
    }
}
