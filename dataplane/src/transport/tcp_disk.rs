//! Disk links over TCP: two connections per migration, a *bulk* lane for the bulk copy
//! and a *mirror* lane for mirrored guest writes, so a mirrored write never queues behind
//! megabytes of bulk chunks (or of memory pages: those have streams of their own).
//!
//! Source: requests are written with one `writev` (header + payload straight from the
//! caller's buffer); a reader thread per lane turns acks into completed tickets.
//!
//! Destination: one thread per lane reads each frame's payload straight into a registered
//! io_uring buffer, hashes its blocks while they are in cache, queues the write, and keeps
//! reading while up to `queue_depth` writes are in flight; when a write completes it records
//! the hashes in the disk's digest and only then acknowledges it. Ordering between the lanes
//! is the mirror's business ([`crate::disk::mirror`]): the source mirrors a write only into
//! a chunk the destination has already acknowledged, and never has two writes to the same
//! bytes in flight, so the destination may complete writes in any order.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Instant;

use crossbeam_channel::Sender;

use super::ack::{AckTable, LaneTickets};
use super::disk_landing::{lane_request, Landing, Request};
use super::tcp::{prepare, stop};
use super::{
    chunk_frame, mirror_frame, spawn_receiver, DiskDestination, DiskSource, LandingDisk,
    ReceiveEvent, TransportError,
};
use crate::disk::BlockRing;
use crate::numa::{self, ThreadRole};
use crate::wire::{read_exact_or_truncated, DiskFrame, WireError, ACK_OK, FRAME_HEADER_LEN};

/// Lane indices, as reported in errors (after the memory streams' indices).
pub const BULK_LANE: usize = 0;
pub const MIRROR_LANE: usize = 1;
/// Bytes the source's ack reader takes from its socket per read.
const ACK_READ_BUFFER: usize = 64 * FRAME_HEADER_LEN;
/// Writes the mirror lane keeps in flight on the destination.
pub(crate) const MIRROR_QUEUE_DEPTH: u32 = 8;

fn io_error(stream: usize, op: &'static str) -> impl Fn(std::io::Error) -> TransportError {
    move |source| TransportError::Io { stream, op, source }
}

/// Writes `header` and `payload` completely, retrying short writes.
fn write_frame(
    socket: &mut TcpStream,
    header: &[u8],
    payload: &[u8],
    stream: usize,
) -> Result<(), TransportError> {
    let mut bufs = [IoSlice::new(header), IoSlice::new(payload)];
    let mut slices = &mut bufs[..];
    while !slices.is_empty() {
        match socket.write_vectored(slices) {
            Ok(0) => {
                return Err(TransportError::Io {
                    stream,
                    op: "sending a disk frame",
                    source: std::io::ErrorKind::WriteZero.into(),
                })
            }
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(stream, "sending a disk frame")(e)),
        }
    }
    Ok(())
}

/// Source half: the two lanes, the tickets, and an ack reader per lane.
pub struct TcpDiskSource {
    lanes: [Mutex<TcpStream>; 2],
    closers: Vec<TcpStream>,
    /// Tickets per lane (the mirror lane's carry the tag bit), so an ack on one lane never
    /// wakes a thread waiting on the other.
    acks: LaneTickets,
    readers: Mutex<Vec<JoinHandle<()>>>,
    bytes: AtomicU64,
    /// Index of the bulk lane in errors (the mirror lane is the next).
    stream_base: usize,
}

impl TcpDiskSource {
    /// `bulk` and `mirror` are connected to the destination's bulk and mirror lanes;
    /// `disk_sizes` are the sizes both sides agreed on; `stream_base` numbers the lanes in
    /// errors.
    pub fn new(
        bulk: TcpStream,
        mirror: TcpStream,
        disk_sizes: Vec<u64>,
        stream_base: usize,
    ) -> Result<Self, TransportError> {
        let acks = LaneTickets::default();
        let sockets = [bulk, mirror];
        let closers = prepare(&sockets, stream_base)?;
        let mut readers = Vec::new();
        for (lane, closer) in closers.iter().enumerate() {
            let stream = stream_base + lane;
            // Buffered: the destination acknowledges a batch of writes in one send, and
            // this reads the batch in one call instead of one per 40-byte ack.
            let mut reader = std::io::BufReader::with_capacity(
                ACK_READ_BUFFER,
                closer
                    .try_clone()
                    .map_err(io_error(stream, "cloning a socket"))?,
            );
            let acks = Arc::clone(acks.lane(lane));
            let sizes = disk_sizes.clone();
            let handle = numa::spawn(
                ThreadRole::Transport,
                format!("ferry-disk-ack{lane}"),
                move || {
                    let reason = read_acks(&mut reader, &sizes, &acks, stream);
                    acks.close(reason);
                },
            )
            .map_err(io_error(stream, "spawning an ack reader"))?;
            readers.push(handle);
        }
        Ok(Self {
            lanes: sockets.map(Mutex::new),
            closers,
            acks,
            readers: Mutex::new(readers),
            bytes: AtomicU64::new(0),
            stream_base,
        })
    }

    fn send(&self, lane: usize, frame: DiskFrame, payload: &[u8]) -> Result<u32, TransportError> {
        // Fault injection: a request with a payload goes out with a byte flipped in a copy
        // of it (the source hashed the real bytes already).
        #[cfg(feature = "failpoints")]
        let corrupted = (!payload.is_empty() && crate::failpoint::take_corruption())
            .then(|| crate::failpoint::corrupted_copy(payload));
        #[cfg(feature = "failpoints")]
        let payload = corrupted.as_deref().unwrap_or(payload);
        let stream = self.stream_base + lane;
        let mut socket = self.lanes[lane]
            .lock()
            .map_err(|_| TransportError::Shutdown)?;
        write_frame(&mut socket, &frame.encode(), payload, stream)?;
        self.bytes
            .fetch_add((FRAME_HEADER_LEN + payload.len()) as u64, Ordering::Relaxed);
        Ok(frame.id())
    }

    /// The table a ticket came from.
    fn request(
        &self,
        lane: usize,
        make: impl FnOnce(u32) -> DiskFrame,
        payload: &[u8],
    ) -> Result<u32, TransportError> {
        self.acks
            .request(lane, |id| self.send(lane, make(id), payload))
    }
}

/// Ack reader: completes tickets until the link ends; returns why it ended.
fn read_acks(
    socket: &mut impl std::io::Read,
    sizes: &[u64],
    acks: &AckTable,
    stream: usize,
) -> String {
    let mut header = [0u8; FRAME_HEADER_LEN];
    loop {
        if let Err(e) = read_exact_or_truncated(socket, &mut header, "disk ack") {
            return if e.is_clean_eof() {
                format!("the destination closed disk link {stream}")
            } else {
                format!("disk link {stream}: {e}")
            };
        }
        match DiskFrame::decode(&header, sizes) {
            Ok(DiskFrame::Ack { id, status, .. }) => {
                if let Err(e) = acks.complete(id, status) {
                    return format!("disk link {stream}: {e}");
                }
            }
            Ok(other) => return format!("disk link {stream}: expected an ack, got {other:?}"),
            Err(e) => return format!("disk link {stream}: bad ack frame: {e}"),
        }
    }
}

impl DiskSource for TcpDiskSource {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn send_chunk(
        &self,
        disk: u32,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> Result<u32, TransportError> {
        debug_assert!(data.is_none_or(|d| d.len() == len as usize));
        let frame = chunk_frame(disk, offset, len, data.is_none());
        self.request(BULK_LANE, frame, data.unwrap_or(&[]))
    }

    fn send_write(&self, disk: u32, offset: u64, data: &[u8]) -> Result<u32, TransportError> {
        let frame = mirror_frame(self.stream_base + MIRROR_LANE, disk, offset, data)?;
        self.request(MIRROR_LANE, frame, data)
    }

    fn wait(&self, ticket: u32, deadline: Instant) -> Result<(), TransportError> {
        self.acks.wait(ticket, deadline)
    }

    fn poll(&self, ticket: u32) -> Option<Result<(), TransportError>> {
        self.acks.poll(ticket)
    }

    fn bytes_sent(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    fn shutdown(&self) {
        self.acks.close("the disk link was shut down");
        for s in &self.closers {
            let _ = s.shutdown(Shutdown::Both);
        }
        let readers = std::mem::take(&mut *self.readers.lock().unwrap_or_else(|p| p.into_inner()));
        for r in readers {
            let _ = r.join();
        }
    }
}

impl Drop for TcpDiskSource {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Destination half: a receiving thread per lane.
pub struct TcpDiskDestination {
    sockets: Vec<Option<TcpStream>>,
    closers: Vec<TcpStream>,
    receivers: Vec<JoinHandle<()>>,
    stream_base: usize,
}

impl TcpDiskDestination {
    pub fn new(
        bulk: TcpStream,
        mirror: TcpStream,
        stream_base: usize,
    ) -> Result<Self, TransportError> {
        let sockets = [bulk, mirror];
        let closers = prepare(&sockets, stream_base)?;
        Ok(Self {
            sockets: sockets.map(Some).into(),
            closers,
            receivers: Vec::new(),
            stream_base,
        })
    }
}

impl DiskDestination for TcpDiskDestination {
    fn start(
        &mut self,
        disks: Vec<LandingDisk>,
        chunk_bytes: usize,
        queue_depth: u32,
        events: Sender<ReceiveEvent>,
    ) -> Result<(), TransportError> {
        let disks = Arc::new(disks);
        for (lane, slot) in self.sockets.iter_mut().enumerate() {
            let stream = self.stream_base + lane;
            let socket = slot.take().ok_or(TransportError::Shutdown)?;
            let depth = if lane == BULK_LANE {
                queue_depth
            } else {
                MIRROR_QUEUE_DEPTH
            };
            let ring = BlockRing::new(depth, depth as usize, chunk_bytes)
                .map_err(|source| TransportError::Disk { stream, source })?;
            let receiver = LaneReceiver {
                stream,
                lane,
                sizes: disks.iter().map(|d| d.image.size()).collect(),
                landing: Landing::new(stream, Arc::clone(&disks), ring),
                free: (0..depth as usize).rev().collect(),
                header: [0u8; FRAME_HEADER_LEN],
                header_have: 0,
            };
            let events = events.clone();
            let mut receiver = receiver;
            let handle =
                spawn_receiver(format!("ferry-disk-rx{lane}"), stream, events, move |_| {
                    receiver.run(socket)
                })?;
            self.receivers.push(handle);
        }
        Ok(())
    }

    fn shutdown(&mut self) {
        stop(&self.closers, &mut self.receivers);
    }
}

impl Drop for TcpDiskDestination {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct LaneReceiver {
    stream: usize,
    lane: usize,
    sizes: Vec<u64>,
    /// The ring, its disks, and the writes in flight.
    landing: Landing,
    /// Idle ring buffers.
    free: Vec<usize>,
    /// The next frame's header, and how much of it has arrived: a payload's last read also
    /// takes whatever of the next header is already there (one `readv`), so a busy lane
    /// needs neither a poll nor a read of its own per header.
    header: [u8; FRAME_HEADER_LEN],
    header_have: usize,
}

impl LaneReceiver {
    fn run(&mut self, mut socket: TcpStream) -> Result<(), TransportError> {
        let result = self.receive(&mut socket);
        // Whatever happened, let queued writes finish before the buffers go away (the
        // ring's drop waits too); their acks no longer matter on error.
        if result.is_ok() {
            self.reap(&mut socket, self.landing.ring().in_flight())?;
        }
        result
    }

    fn receive(&mut self, socket: &mut TcpStream) -> Result<(), TransportError> {
        let stream = self.stream;
        let wire = |source: WireError| TransportError::Wire { stream, source };
        loop {
            // Acknowledge what has completed before blocking on the socket; and never block
            // on the socket while writes are in flight and nothing has arrived: the source
            // may be waiting for exactly those acknowledgements.
            self.reap(socket, 0)?;
            if self.header_have < FRAME_HEADER_LEN {
                let ring = self.landing.ring();
                if ring.in_flight() > 0 && !wait_readable(socket, ring.as_raw_fd()) {
                    continue;
                }
                match socket.read(&mut self.header[self.header_have..]) {
                    // A clean close between frames is how the source ends the migration.
                    Ok(0) if self.header_have == 0 => return Ok(()),
                    Ok(0) => {
                        return Err(wire(WireError::Truncated {
                            what: "disk frame header",
                            got: self.header_have,
                            want: FRAME_HEADER_LEN,
                        }))
                    }
                    Ok(n) => self.header_have += n,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io_error(stream, "receiving a disk frame")(e)),
                }
                if self.header_have < FRAME_HEADER_LEN {
                    continue;
                }
            }
            self.header_have = 0;
            let frame = DiskFrame::decode(&self.header, &self.sizes).map_err(wire)?;
            match lane_request(stream, self.lane, frame)? {
                Request::Data {
                    disk,
                    id,
                    offset,
                    len,
                } => self.land(socket, disk, id, offset, len)?,
                Request::Zero {
                    disk,
                    id,
                    offset,
                    len,
                } => self.land_zero(socket, disk, id, offset, len)?,
            }
        }
    }

    /// Reads a payload into a free ring buffer, hashes it, and queues its write.
    fn land(
        &mut self,
        socket: &mut TcpStream,
        disk: u32,
        id: u32,
        offset: u64,
        len: u32,
    ) -> Result<(), TransportError> {
        let stream = self.stream;
        let limit = self.landing.ring().buffer_len();
        if len as usize > limit {
            return Err(TransportError::DiskRequestTooLarge { stream, len, limit });
        }
        while self.free.is_empty() {
            self.reap(socket, 1)?;
        }
        let index = self.free.pop().expect("a free buffer");
        let buf = &mut self.landing.ring_mut().buffer_mut(index)[..len as usize];
        read_payload(socket, buf, &mut self.header, &mut self.header_have, stream)?;
        self.landing.write(index, disk, id, offset, len)
    }

    fn land_zero(
        &mut self,
        socket: &mut TcpStream,
        disk: u32,
        id: u32,
        offset: u64,
        len: u32,
    ) -> Result<(), TransportError> {
        self.landing.zero(disk, offset, len)?;
        self.ack(socket, disk, id, ACK_OK)
    }

    /// Collects at least `min` completed writes: records their hashes, then acknowledges.
    fn reap(&mut self, socket: &mut TcpStream, min: usize) -> Result<(), TransportError> {
        // One write for all the acknowledgements of this batch.
        let mut acks: Vec<u8> = Vec::new();
        let failure = self.landing.reap(min, &mut acks, &mut self.free)?;
        let sent = if acks.is_empty() {
            Ok(())
        } else {
            write_frame(socket, &acks, &[], self.stream)
        };
        match failure {
            Some(error) => Err(error),
            None => sent,
        }
    }

    fn ack(
        &self,
        socket: &mut TcpStream,
        disk: u32,
        id: u32,
        status: u32,
    ) -> Result<(), TransportError> {
        write_frame(
            socket,
            &DiskFrame::Ack { disk, id, status }.encode(),
            &[],
            self.stream,
        )
    }
}

/// Reads a whole payload into `buf`, and with its last read whatever of the next frame's
/// header has arrived too (into `header[*have..]`).
fn read_payload(
    socket: &mut TcpStream,
    buf: &mut [u8],
    header: &mut [u8; FRAME_HEADER_LEN],
    have: &mut usize,
    stream: usize,
) -> Result<(), TransportError> {
    let want = buf.len();
    let mut got = 0;
    while got < want {
        let mut bufs = [
            IoSliceMut::new(&mut buf[got..]),
            IoSliceMut::new(&mut header[*have..]),
        ];
        match socket.read_vectored(&mut bufs) {
            Ok(0) => {
                return Err(TransportError::Wire {
                    stream,
                    source: WireError::Truncated {
                        what: "disk payload",
                        got,
                        want,
                    },
                })
            }
            Ok(n) => {
                let into_payload = n.min(want - got);
                got += into_payload;
                *have += n - into_payload;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io_error(stream, "receiving a disk payload")(e)),
        }
    }
    Ok(())
}

/// Longest wait for the socket or a completion before looking again (a safety net: either
/// one waking the thread is the normal case).
const WAIT_SLICE_MS: i32 = 10;

/// Waits until `socket` has bytes (or an end of stream) to read, or the ring `ring_fd` has
/// completions; true when the socket is readable. Waiting on both at once means neither a
/// frame nor a finished write waits for the other.
fn wait_readable(socket: &TcpStream, ring_fd: std::os::fd::RawFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut fds = [
        libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: ring_fd,
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is an array of two valid, initialised pollfds that lives across the
    // call, and its length is passed; both descriptors stay open (borrowed from the socket
    // and the ring the caller holds).
    let ready = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, WAIT_SLICE_MS) };
    ready > 0 && fds[0].revents != 0
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::net::TcpListener;
    use std::time::Duration;

    use super::*;
    use crate::disk::{AlignedBuf, DirectIo, DiskImage, BLOCK_SIZE};
    use crate::memory::{page_hash, MemoryDigest};
    use crate::wire::WireError;

    const SIZE: u64 = 4 << 20;
    const CHUNK: usize = 128 << 10;

    fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (b, _) = listener.accept().unwrap();
        (a, b)
    }

    /// A destination on a fresh image, and the raw source ends of its two lanes.
    struct Harness {
        bulk: TcpStream,
        mirror: TcpStream,
        image: Arc<DiskImage>,
        digest: Arc<MemoryDigest>,
        events: crossbeam_channel::Receiver<ReceiveEvent>,
        _destination: TcpDiskDestination,
        _dir: tempfile::TempDir,
    }

    fn harness() -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let image =
            Arc::new(DiskImage::create(&dir.path().join("d.img"), SIZE, DirectIo::Auto).unwrap());
        let digest = Arc::new(MemoryDigest::new_zeroed(
            (SIZE / BLOCK_SIZE as u64) as usize,
        ));
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let (bulk, bulk_rx) = pair(&listener);
        let (mirror, mirror_rx) = pair(&listener);
        let mut destination = TcpDiskDestination::new(bulk_rx, mirror_rx, 4).unwrap();
        let (tx, events) = crossbeam_channel::unbounded();
        let landing = vec![LandingDisk {
            image: Arc::clone(&image),
            digest: Arc::clone(&digest),
            fresh: true,
        }];
        destination.start(landing, CHUNK, 4, tx).unwrap();
        Harness {
            bulk,
            mirror,
            image,
            digest,
            events,
            _destination: destination,
            _dir: dir,
        }
    }

    fn ack(socket: &mut TcpStream) -> DiskFrame {
        let mut header = [0u8; FRAME_HEADER_LEN];
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        socket.read_exact(&mut header).unwrap();
        DiskFrame::decode(&header, &[SIZE]).unwrap()
    }

    fn failure(h: &Harness) -> TransportError {
        match h
            .events
            .recv_timeout(Duration::from_secs(5))
            .expect("a failure event")
        {
            ReceiveEvent::Failed { error, .. } => error,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    fn send(socket: &mut TcpStream, frame: DiskFrame, payload: &[u8]) {
        write_frame(socket, &frame.encode(), payload, 0).unwrap();
    }

    #[test]
    fn chunks_and_writes_land_are_hashed_and_acknowledged() {
        let mut h = harness();
        let data: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8 + 1).collect();
        send(
            &mut h.bulk,
            DiskFrame::Chunk {
                disk: 0,
                id: 7,
                offset: 0,
                len: CHUNK as u32,
            },
            &data,
        );
        assert_eq!(
            ack(&mut h.bulk),
            DiskFrame::Ack {
                disk: 0,
                id: 7,
                status: ACK_OK
            }
        );
        send(
            &mut h.mirror,
            DiskFrame::Write {
                disk: 0,
                id: 8,
                offset: 4096,
                len: 4096,
            },
            &[9u8; 4096],
        );
        assert_eq!(
            ack(&mut h.mirror),
            DiskFrame::Ack {
                disk: 0,
                id: 8,
                status: ACK_OK
            }
        );
        send(
            &mut h.bulk,
            DiskFrame::Zero {
                disk: 0,
                id: 9,
                offset: SIZE - CHUNK as u64,
                len: CHUNK as u32,
            },
            &[],
        );
        assert_eq!(
            ack(&mut h.bulk),
            DiskFrame::Ack {
                disk: 0,
                id: 9,
                status: ACK_OK
            }
        );
        let mut on_disk = AlignedBuf::new_zeroed(CHUNK);
        h.image.read_at(&mut on_disk, 0).unwrap();
        let mut expected = data.clone();
        expected[4096..8192].fill(9);
        assert!(on_disk[..] == expected[..]);
        // The digest says exactly what landed.
        let reference = MemoryDigest::new_zeroed((SIZE / BLOCK_SIZE as u64) as usize);
        for (i, block) in expected.chunks(BLOCK_SIZE).enumerate() {
            reference.record_now(i, page_hash(block));
        }
        assert_eq!(h.digest.value(), reference.value());
    }

    #[test]
    fn a_frame_on_the_wrong_lane_is_refused() {
        let mut h = harness();
        send(
            &mut h.bulk,
            DiskFrame::Write {
                disk: 0,
                id: 1,
                offset: 0,
                len: 4096,
            },
            &[1u8; 4096],
        );
        assert!(matches!(
            failure(&h),
            TransportError::UnexpectedDiskFrame { .. }
        ));
    }

    #[test]
    fn a_request_larger_than_the_announced_chunk_is_refused_before_its_payload() {
        let mut h = harness();
        let len = 2 * CHUNK as u32;
        write_frame(
            &mut h.mirror,
            &DiskFrame::Write {
                disk: 0,
                id: 1,
                offset: 0,
                len,
            }
            .encode(),
            &[],
            0,
        )
        .unwrap();
        assert!(
            matches!(failure(&h), TransportError::DiskRequestTooLarge { len: l, .. } if l == len)
        );
        assert!(
            h.digest.value()
                == MemoryDigest::new_zeroed((SIZE / BLOCK_SIZE as u64) as usize).value()
        );
    }

    #[test]
    fn a_block_beyond_the_end_of_the_disk_is_refused() {
        let mut h = harness();
        write_frame(
            &mut h.bulk,
            &DiskFrame::Chunk {
                disk: 0,
                id: 1,
                offset: SIZE,
                len: 4096,
            }
            .encode(),
            &[],
            0,
        )
        .unwrap();
        assert!(matches!(
            failure(&h),
            TransportError::Wire {
                source: WireError::DiskOutOfRange { .. },
                ..
            }
        ));
    }

    #[test]
    fn a_payload_cut_short_is_an_error_not_a_hang() {
        let mut h = harness();
        write_frame(
            &mut h.bulk,
            &DiskFrame::Chunk {
                disk: 0,
                id: 1,
                offset: 0,
                len: 8192,
            }
            .encode(),
            &[1u8; 100],
            0,
        )
        .unwrap();
        h.bulk.shutdown(Shutdown::Write).unwrap();
        assert!(matches!(
            failure(&h),
            TransportError::Wire {
                source: WireError::Truncated { .. },
                ..
            }
        ));
    }
}
