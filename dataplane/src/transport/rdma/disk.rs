//! Disk lanes over RDMA: a *bulk* lane (bulk-copy chunks, zero markers) and a *mirror* lane
//! (mirrored guest writes), each one reliable connection of a [`Link`], with the same
//! semantics as the TCP disk link ([`crate::transport::tcp_disk`]): every request gets a
//! ticket, completed by the destination's acknowledgement once the data is on disk and in
//! the digest.
//!
//! Destination: each lane owns an io_uring [`BlockRing`] (bulk: `queue_depth` buffers, mirror:
//! [`MIRROR_QUEUE_DEPTH`]) of `chunk_bytes` each. Every ring buffer is registered with the
//! RDMA device for remote write: these are the lane's *staging slots*, listed (address,
//! rkey, length) in a staging message the destination SENDs on the lane when it starts.
//!
//! Source: a request takes a free slot (free again once its acknowledgement arrived and
//! its post completed locally), copies the payload into the same slot of its own
//! registered staging buffer, and posts an RDMA WRITE into the destination's slot followed
//! by an announcement SEND: the request's 40-byte [`DiskFrame`] header and the slot index.
//! A reliable connection delivers in order, so when the destination sees the announcement
//! the payload is in the slot. A zero chunk is an announcement only. At most
//! [`POSTS_MAX`] posts (two work requests each) are in flight per lane.
//!
//! Destination, per lane, one thread waiting on the receive queue and the ring at once:
//! it validates each announcement exactly as the TCP receiver validates a header (disk,
//! range, alignment, kind for the lane, length against the slot, slot index and idleness),
//! hashes the slot's blocks, queues the write, and when the write completes records the
//! hashes and only then acknowledges (batched ack headers in one SEND). The landing
//! bookkeeping is shared with TCP ([`crate::transport::disk_landing`]). A refused
//! announcement ends the lane: the destination reports the error to its engine, tells the
//! source why in a refusal message, and breaks the link.
//!
//! Source, one completion thread for both lanes: retires posts, reposts receive buffers,
//! turns ack headers into completed tickets and free slots, and the staging message into
//! slots to use. A flush (the link closed) or a refusal fails every ticket of the lane.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::link::Link;
use super::memory::RdmaCounters;
use super::verbs::{
    wait_any, Access, Completion, ConnectedQp, MemoryRegion, ProtectionDomain, QpCaps,
    RegisteredBuffer, RemoteAddr, WorkRequest,
};
use super::RdmaError;
use crate::disk::{BlockRing, BLOCK_SIZE, CHUNK_BYTES_MAX, QUEUE_DEPTH_MAX};
use crate::numa::{self, ThreadRole};
use crate::transport::ack::LaneTickets;
use crate::transport::disk_landing::{lane_request, Landing, Request};
use crate::transport::tcp_disk::{BULK_LANE, MIRROR_LANE, MIRROR_QUEUE_DEPTH};
use crate::transport::{
    chunk_frame, mirror_frame, DiskDestination, DiskSource, LandingDisk, ReceiveEvent,
    TransportError,
};
use crate::wire::{DiskFrame, FRAME_HEADER_LEN};

/// Send work requests per lane (both sides).
pub const SEND_QUEUE: u32 = 256;
/// Requests (posts of at most two work requests) in flight per lane on the source.
pub const POSTS_MAX: u64 = SEND_QUEUE as u64 / 2;
/// An announcement: a disk frame header and the slot index.
pub const ANNOUNCE_LEN: usize = FRAME_HEADER_LEN + 8;
/// Bytes between announcement buffers (source send slots, destination receive buffers).
const ANNOUNCE_STRIDE: usize = 64;
/// Receive buffers the destination posts per lane: one per announcement in flight.
const DEST_RECEIVES: usize = POSTS_MAX as usize;
/// Bytes of a destination → source message (staging, acks, refusal).
const MESSAGE_BYTES: usize = 8192;
/// Receive buffers the source posts per lane.
const SOURCE_RECEIVES: usize = 32;
/// Messages the destination has in flight per lane.
const MESSAGE_SLOTS: u64 = 16;
/// Ack headers per message.
const ACKS_PER_MESSAGE: usize = MESSAGE_BYTES / FRAME_HEADER_LEN;
/// The slot field of an announcement that has no payload (a zero chunk).
const NO_SLOT: u64 = u64::MAX;
/// How long a waiting thread sleeps before it looks at the stop flag again.
const WAIT_SLICE: Duration = Duration::from_millis(100);
/// How long a failing destination lane waits for its refusal message to be delivered.
const REFUSAL_WAIT: Duration = Duration::from_secs(1);

const STAGING_MAGIC: u32 = u32::from_le_bytes(*b"FDSG");
const REFUSAL_MAGIC: u32 = u32::from_le_bytes(*b"FDRF");
const STAGING_VERSION: u16 = 1;
const STAGING_HEADER_LEN: usize = 16;
const STAGING_ENTRY_LEN: usize = 16;
/// Most slots a staging message may list (a bulk lane has at most the deepest queue).
const STAGING_SLOTS_MAX: usize = QUEUE_DEPTH_MAX as usize;

/// Queue sizes of a disk lane.
pub fn lane_caps() -> QpCaps {
    QpCaps {
        send_wr: SEND_QUEUE,
        recv_wr: DEST_RECEIVES.max(SOURCE_RECEIVES) as u32,
    }
}

/// One staging slot of the destination: where the source writes a request's payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagingSlot {
    pub addr: u64,
    pub rkey: u32,
    pub len: u32,
}

/// The staging message: a lane's slots, all of one length.
///
/// ```text
/// magic "FDSG" u32 | version u16 | reserved u16 (0) | count u32 | reserved u32 (0)
/// count × (addr u64 | rkey u32 | len u32)            all little-endian
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Staging {
    pub slots: Vec<StagingSlot>,
}

fn bad_message(reason: impl Into<String>) -> RdmaError {
    RdmaError::BadPeerMessage {
        reason: reason.into(),
    }
}

impl Staging {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(STAGING_HEADER_LEN + self.slots.len() * STAGING_ENTRY_LEN);
        out.extend_from_slice(&STAGING_MAGIC.to_le_bytes());
        out.extend_from_slice(&STAGING_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&(self.slots.len() as u32).to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        for slot in &self.slots {
            out.extend_from_slice(&slot.addr.to_le_bytes());
            out.extend_from_slice(&slot.rkey.to_le_bytes());
            out.extend_from_slice(&slot.len.to_le_bytes());
        }
        out
    }

    /// Validates everything: magic, version, reserved fields, count (1..=256) against the
    /// message length, and slot lengths (equal, a non-zero multiple of the block size, at
    /// most the largest chunk).
    pub fn decode(bytes: &[u8]) -> Result<Self, RdmaError> {
        if bytes.len() < STAGING_HEADER_LEN {
            return Err(bad_message(format!(
                "staging message of {} bytes, at least {STAGING_HEADER_LEN} expected",
                bytes.len()
            )));
        }
        let u16_at = |i: usize| u16::from_le_bytes([bytes[i], bytes[i + 1]]);
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        if u32_at(0) != STAGING_MAGIC {
            return Err(bad_message("staging message without its magic"));
        }
        if u16_at(4) != STAGING_VERSION {
            return Err(bad_message(format!(
                "staging message version {}, {STAGING_VERSION} expected",
                u16_at(4)
            )));
        }
        if u16_at(6) != 0 || u32_at(12) != 0 {
            return Err(bad_message("staging message with reserved fields set"));
        }
        let count = u32_at(8) as usize;
        if count == 0 || count > STAGING_SLOTS_MAX {
            return Err(bad_message(format!(
                "staging message lists {count} slots, 1..={STAGING_SLOTS_MAX} expected"
            )));
        }
        if bytes.len() != STAGING_HEADER_LEN + count * STAGING_ENTRY_LEN {
            return Err(bad_message(format!(
                "staging message of {} bytes for {count} slots",
                bytes.len()
            )));
        }
        let slots: Vec<StagingSlot> = (0..count)
            .map(|i| {
                let at = STAGING_HEADER_LEN + i * STAGING_ENTRY_LEN;
                StagingSlot {
                    addr: u64_at(at),
                    rkey: u32_at(at + 8),
                    len: u32_at(at + 12),
                }
            })
            .collect();
        let len = slots[0].len as usize;
        if len == 0 || !len.is_multiple_of(BLOCK_SIZE) || len > CHUNK_BYTES_MAX {
            return Err(bad_message(format!(
                "staging slots of {len} bytes: a non-zero multiple of {BLOCK_SIZE} up to {CHUNK_BYTES_MAX} expected"
            )));
        }
        if slots.iter().any(|s| s.len as usize != len) {
            return Err(bad_message("staging slots of different lengths"));
        }
        Ok(Self { slots })
    }

    fn slot_len(&self) -> usize {
        self.slots[0].len as usize
    }
}

fn rdma_error(stream: usize) -> impl Fn(RdmaError) -> TransportError {
    move |source| TransportError::Rdma { stream, source }
}

fn lane_failed(error: &str) -> TransportError {
    TransportError::LinkClosed {
        reason: error.to_string(),
    }
}

/// An error with its sources, on one line (for the refusal message).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

// ---------------------------------------------------------------------------------------
// Source
// ---------------------------------------------------------------------------------------

/// A lane's state shared by the requesters and the completion thread.
#[derive(Default)]
struct LaneShared {
    state: Mutex<LaneState>,
    changed: Condvar,
}

impl LaneShared {
    fn lock(&self) -> MutexGuard<'_, LaneState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[derive(Default)]
struct LaneState {
    /// Posts completed locally: every post with a sequence number below it.
    completed: u64,
    error: Option<String>,
    /// The destination's slots, once its staging message arrived.
    remote: Option<Arc<Staging>>,
    /// Slots whose request was acknowledged, each with the `completed` count its last
    /// post needs before the slot's local buffer may be written again.
    free: Vec<(usize, u64)>,
    /// Requests in flight on a slot: ticket → (slot, post sequence number).
    slot_of: HashMap<u32, (usize, u64)>,
}

/// What the requesters of one lane own (behind the lane's mutex).
struct SourceLane {
    qp: Arc<ConnectedQp>,
    /// Announcement send slots, `POSTS_MAX` of [`ANNOUNCE_STRIDE`] bytes.
    announce: RegisteredBuffer,
    /// Payload staging: the same slots as the destination's, allocated once they are
    /// known.
    staging: Option<RegisteredBuffer>,
    next_seq: u64,
}

/// Source half: the bulk and mirror lanes of a [`Link`], their tickets, and a completion
/// thread.
pub struct RdmaDiskSource {
    lanes: [Mutex<SourceLane>; 2],
    shared: [Arc<LaneShared>; 2],
    /// Tickets per lane (the mirror lane's carry the tag bit), as on TCP.
    acks: Arc<LaneTickets>,
    bytes: AtomicU64,
    counters: Arc<RdmaCounters>,
    stream_base: usize,
    stop: Arc<AtomicBool>,
    completer: Mutex<Option<JoinHandle<()>>>,
    link: Arc<Link>,
}

fn pick_lanes(link: &Link, bulk: usize, mirror: usize) -> Result<[Arc<ConnectedQp>; 2], RdmaError> {
    let lanes = link.lanes();
    if bulk == mirror || bulk >= lanes.len() || mirror >= lanes.len() {
        return Err(RdmaError::Verbs {
            op: "choosing the disk lanes (two distinct lanes of the link)",
            source: std::io::ErrorKind::InvalidInput.into(),
        });
    }
    Ok([lanes[bulk].clone(), lanes[mirror].clone()])
}

impl RdmaDiskSource {
    /// Uses `link`'s lanes `bulk_lane` and `mirror_lane`; `sizes` are the disk sizes both
    /// sides agreed on; `stream_base` numbers the lanes in errors (bulk, then mirror).
    pub fn new(
        link: Arc<Link>,
        bulk_lane: usize,
        mirror_lane: usize,
        sizes: Vec<u64>,
        stream_base: usize,
    ) -> Result<Self, RdmaError> {
        let qps = pick_lanes(&link, bulk_lane, mirror_lane)?;
        let pd = link.pd().clone();
        let mut receives = Vec::new();
        let mut lanes = Vec::new();
        for qp in &qps {
            let buffers =
                RegisteredBuffer::new(&pd, SOURCE_RECEIVES * MESSAGE_BYTES, Access::LocalWrite)?;
            for slot in 0..SOURCE_RECEIVES {
                qp.post_recv(
                    slot as u64,
                    buffers.region().sge(slot * MESSAGE_BYTES, MESSAGE_BYTES)?,
                )?;
            }
            receives.push(buffers);
            lanes.push(Mutex::new(SourceLane {
                qp: qp.clone(),
                announce: RegisteredBuffer::new(
                    &pd,
                    POSTS_MAX as usize * ANNOUNCE_STRIDE,
                    Access::LocalRead,
                )?,
                staging: None,
                next_seq: 0,
            }));
        }
        let shared = [
            Arc::new(LaneShared::default()),
            Arc::new(LaneShared::default()),
        ];
        let acks = Arc::new(LaneTickets::default());
        let stop = Arc::new(AtomicBool::new(false));
        let completer = Completer {
            qps,
            receives: receives.try_into().map_err(|_| ()).expect("two lanes"),
            shared: shared.clone(),
            acks: acks.clone(),
            sizes,
            stream_base,
            stop: stop.clone(),
        };
        let handle = numa::spawn(ThreadRole::Transport, "ferry-rdma-disk-cq", move || {
            completer.run()
        })
        .map_err(|source| RdmaError::Verbs {
            op: "spawning the disk completion thread",
            source,
        })?;
        Ok(Self {
            lanes: lanes.try_into().map_err(|_| ()).expect("two lanes"),
            shared,
            acks,
            bytes: AtomicU64::new(0),
            counters: Arc::new(RdmaCounters::default()),
            stream_base,
            stop,
            completer: Mutex::new(Some(handle)),
            link,
        })
    }

    pub fn device(&self) -> &str {
        self.link.device()
    }

    /// RDMA WRITEs (chunks and mirrored writes) and announcements posted so far.
    pub fn counters(&self) -> Arc<RdmaCounters> {
        self.counters.clone()
    }

    /// The table a ticket came from.
    fn request(
        &self,
        lane: usize,
        make: impl FnOnce(u32) -> DiskFrame,
        payload: Option<&[u8]>,
    ) -> Result<u32, TransportError> {
        self.acks
            .request(lane, |id| self.post(lane, id, make(id), payload))
    }

    /// Waits for the staging slots, room in the send queue and (with a payload) a free
    /// slot; then posts the payload's WRITE and the announcement.
    fn post(
        &self,
        lane_index: usize,
        id: u32,
        frame: DiskFrame,
        payload: Option<&[u8]>,
    ) -> Result<(), TransportError> {
        let stream = self.stream_base + lane_index;
        let mut lane = self.lanes[lane_index]
            .lock()
            .map_err(|_| TransportError::Shutdown)?;
        let shared = &self.shared[lane_index];
        let seq = lane.next_seq;
        let mut state = shared.lock();
        let (remote, slot) = loop {
            if let Some(error) = &state.error {
                return Err(lane_failed(error));
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err(TransportError::Shutdown);
            }
            if let Some(remote) = state.remote.clone() {
                let limit = remote.slot_len();
                if let Some(data) = payload.filter(|d| d.len() > limit) {
                    return Err(TransportError::DiskRequestTooLarge {
                        stream,
                        len: u32::try_from(data.len()).unwrap_or(u32::MAX),
                        limit,
                    });
                }
                if seq < state.completed + POSTS_MAX {
                    if payload.is_none() {
                        break (remote, None);
                    }
                    let completed = state.completed;
                    if let Some(i) = state.free.iter().position(|&(_, need)| need <= completed) {
                        let (slot, _) = state.free.swap_remove(i);
                        state.slot_of.insert(id, (slot, seq));
                        break (remote, Some(slot));
                    }
                }
            }
            state = shared
                .changed
                .wait_timeout(state, WAIT_SLICE)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        };
        drop(state);
        let posted = self.post_on(&mut lane, &remote, seq, frame, slot.zip(payload));
        if let Err(e) = posted {
            if let Some(slot) = slot {
                let mut state = shared.lock();
                state.slot_of.remove(&id);
                state.free.push((slot, 0));
            }
            return Err(rdma_error(stream)(e));
        }
        lane.next_seq += 1;
        let payload_len = payload.map_or(0, <[u8]>::len);
        self.bytes
            .fetch_add((ANNOUNCE_LEN + payload_len) as u64, Ordering::Relaxed);
        Ok(())
    }

    fn post_on(
        &self,
        lane: &mut SourceLane,
        remote: &Staging,
        seq: u64,
        frame: DiskFrame,
        payload: Option<(usize, &[u8])>,
    ) -> Result<(), RdmaError> {
        let mut requests = Vec::with_capacity(2);
        let mut slot_field = NO_SLOT;
        if let Some((slot, data)) = payload {
            let slot_len = remote.slot_len();
            if lane.staging.is_none() {
                lane.staging = Some(RegisteredBuffer::new(
                    self.link.pd(),
                    remote.slots.len() * slot_len,
                    Access::LocalRead,
                )?);
            }
            let staging = lane.staging.as_ref().expect("allocated above");
            // The slot's previous request was acknowledged and its post completed: the
            // device no longer reads these bytes.
            staging.write(slot * slot_len, data);
            self.counters.writes.fetch_add(1, Ordering::Relaxed);
            self.counters
                .write_bytes
                .fetch_add(data.len() as u64, Ordering::Relaxed);
            requests.push(WorkRequest::Write {
                local: staging.region().sge(slot * slot_len, data.len())?,
                remote: RemoteAddr {
                    addr: remote.slots[slot].addr,
                    rkey: remote.slots[slot].rkey,
                },
            });
            slot_field = slot as u64;
        }
        let mut announcement = [0u8; ANNOUNCE_LEN];
        announcement[..FRAME_HEADER_LEN].copy_from_slice(&frame.encode());
        announcement[FRAME_HEADER_LEN..].copy_from_slice(&slot_field.to_le_bytes());
        // Announcement slot `seq % POSTS_MAX` is free: post `seq - POSTS_MAX` completed.
        let at = (seq % POSTS_MAX) as usize * ANNOUNCE_STRIDE;
        lane.announce.write(at, &announcement);
        requests.push(WorkRequest::Send {
            local: lane.announce.region().sge(at, ANNOUNCE_LEN)?,
        });
        self.counters.sends.fetch_add(1, Ordering::Relaxed);
        lane.qp.post(&requests, seq)
    }
}

impl DiskSource for RdmaDiskSource {
    fn name(&self) -> &'static str {
        "rdma"
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
        self.request(BULK_LANE, frame, data)
    }

    fn send_write(&self, disk: u32, offset: u64, data: &[u8]) -> Result<u32, TransportError> {
        let frame = mirror_frame(self.stream_base + MIRROR_LANE, disk, offset, data)?;
        self.request(MIRROR_LANE, frame, Some(data))
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
        self.stop.store(true, Ordering::Relaxed);
        self.link.disconnect();
        for shared in &self.shared {
            shared.changed.notify_all();
        }
        let completer = self
            .completer
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(handle) = completer {
            let _ = handle.join();
        }
    }
}

impl Drop for RdmaDiskSource {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// The source's completion thread: both lanes' send and receive queues.
struct Completer {
    qps: [Arc<ConnectedQp>; 2],
    /// Receive buffers per lane, [`SOURCE_RECEIVES`] of [`MESSAGE_BYTES`].
    receives: [RegisteredBuffer; 2],
    shared: [Arc<LaneShared>; 2],
    acks: Arc<LaneTickets>,
    sizes: Vec<u64>,
    stream_base: usize,
    stop: Arc<AtomicBool>,
}

impl Completer {
    fn run(self) {
        let fds: Vec<RawFd> = self
            .qps
            .iter()
            .flat_map(|q| [q.send_cq().fd(), q.recv_cq().fd()])
            .collect();
        let mut completions: Vec<Completion> = Vec::new();
        let mut message = vec![0u8; MESSAGE_BYTES];
        loop {
            for lane in 0..2 {
                self.poll_sends(lane, &mut completions);
                self.poll_receives(lane, &mut completions, &mut message);
            }
            if self.stop.load(Ordering::Relaxed) {
                return;
            }
            match wait_any(&fds, Instant::now() + WAIT_SLICE) {
                Ok(ready) => {
                    for (i, ready) in ready.into_iter().enumerate() {
                        if ready {
                            let qp = &self.qps[i / 2];
                            let cq = if i % 2 == 0 {
                                qp.send_cq()
                            } else {
                                qp.recv_cq()
                            };
                            let _ = cq.wait(Instant::now());
                        }
                    }
                }
                Err(_) => std::thread::sleep(WAIT_SLICE),
            }
        }
    }

    /// Fails the lane: every current and future request and wait gets `reason`.
    fn fail(&self, lane: usize, reason: String) {
        let mut state = self.shared[lane].lock();
        state.error.get_or_insert_with(|| reason.clone());
        drop(state);
        self.acks.lane(lane).close(reason);
        self.shared[lane].changed.notify_all();
    }

    fn closed_reason(&self, lane: usize, c: &Completion, text: &str, what: &str) -> String {
        let stream = self.stream_base + lane;
        if c.is_flush() {
            format!(
                "RDMA disk lane {stream} ({}) closed",
                crate::transport::disk_landing::lane_name(lane)
            )
        } else {
            format!("RDMA disk lane {stream}: {what} failed: {text}")
        }
    }

    fn poll_sends(&self, lane: usize, completions: &mut Vec<Completion>) {
        completions.clear();
        if let Err(e) = self.qps[lane]
            .send_cq()
            .poll(completions, SEND_QUEUE as usize)
        {
            self.fail(
                lane,
                format!("RDMA disk lane {}: {e}", self.stream_base + lane),
            );
            return;
        }
        if completions.is_empty() {
            return;
        }
        let mut failure = None;
        {
            let mut state = self.shared[lane].lock();
            for c in completions.iter() {
                match c.error {
                    None => state.completed = state.completed.max(c.wr_id + 1),
                    Some((_, text)) => {
                        failure.get_or_insert_with(|| self.closed_reason(lane, c, text, "a send"));
                    }
                }
            }
        }
        self.shared[lane].changed.notify_all();
        if let Some(reason) = failure {
            self.fail(lane, reason);
        }
    }

    fn poll_receives(&self, lane: usize, completions: &mut Vec<Completion>, message: &mut [u8]) {
        let stream = self.stream_base + lane;
        let qp = &self.qps[lane];
        completions.clear();
        if let Err(e) = qp.recv_cq().poll(completions, SOURCE_RECEIVES) {
            self.fail(lane, format!("RDMA disk lane {stream}: {e}"));
            return;
        }
        for c in completions.iter() {
            if let Some((_, text)) = c.error {
                self.fail(lane, self.closed_reason(lane, c, text, "a receive"));
                continue;
            }
            let slot = c.wr_id as usize;
            let len = c.byte_len as usize;
            if slot >= SOURCE_RECEIVES || len > MESSAGE_BYTES {
                self.fail(
                    lane,
                    format!(
                        "RDMA disk lane {stream}: message of {len} bytes in receive buffer {slot}"
                    ),
                );
                continue;
            }
            let buffers = &self.receives[lane];
            buffers.read(slot * MESSAGE_BYTES, &mut message[..len]);
            let reposted = buffers
                .region()
                .sge(slot * MESSAGE_BYTES, MESSAGE_BYTES)
                .and_then(|sge| qp.post_recv(slot as u64, sge));
            if let Err(e) = reposted {
                self.fail(lane, format!("RDMA disk lane {stream}: {e}"));
            }
            if let Err(reason) = self.handle(lane, &message[..len]) {
                self.fail(lane, format!("RDMA disk lane {stream}: {reason}"));
            }
        }
    }

    /// One message from the destination: the staging slots, a refusal, or acks.
    fn handle(&self, lane: usize, message: &[u8]) -> Result<(), String> {
        let magic = message
            .get(..4)
            .map(|m| u32::from_le_bytes(m.try_into().expect("4 bytes")));
        if magic == Some(STAGING_MAGIC) {
            let staging = Staging::decode(message).map_err(|e| e.to_string())?;
            let mut state = self.shared[lane].lock();
            if state.remote.is_some() {
                return Err("the destination sent its staging slots twice".into());
            }
            state.free = (0..staging.slots.len()).map(|slot| (slot, 0)).collect();
            state.remote = Some(Arc::new(staging));
            drop(state);
            self.shared[lane].changed.notify_all();
            return Ok(());
        }
        if magic == Some(REFUSAL_MAGIC) {
            return Err(format!(
                "the destination refused a request: {}",
                String::from_utf8_lossy(&message[4..])
            ));
        }
        if message.is_empty() || !message.len().is_multiple_of(FRAME_HEADER_LEN) {
            return Err(format!("an ack message of {} bytes", message.len()));
        }
        let mut freed = false;
        for header in message.chunks_exact(FRAME_HEADER_LEN) {
            match DiskFrame::decode(header, &self.sizes) {
                Ok(DiskFrame::Ack { id, status, .. }) => {
                    self.acks
                        .lane(lane)
                        .complete(id, status)
                        .map_err(|e| e.to_string())?;
                    let mut state = self.shared[lane].lock();
                    if let Some((slot, seq)) = state.slot_of.remove(&id) {
                        state.free.push((slot, seq + 1));
                        freed = true;
                    }
                }
                Ok(other) => return Err(format!("expected an ack, got {other:?}")),
                Err(e) => return Err(format!("bad ack frame: {e}")),
            }
        }
        if freed {
            self.shared[lane].changed.notify_all();
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------
// Destination
// ---------------------------------------------------------------------------------------

/// Destination half: a receiving thread per lane, landing through registered ring buffers.
pub struct RdmaDiskDestination {
    link: Arc<Link>,
    lanes: [usize; 2],
    stream_base: usize,
    started: bool,
    stop: Arc<AtomicBool>,
    receivers: Vec<JoinHandle<()>>,
}

impl RdmaDiskDestination {
    pub fn new(link: Arc<Link>, bulk_lane: usize, mirror_lane: usize, stream_base: usize) -> Self {
        Self {
            link,
            lanes: [bulk_lane, mirror_lane],
            stream_base,
            started: false,
            stop: Arc::new(AtomicBool::new(false)),
            receivers: Vec::new(),
        }
    }
}

impl DiskDestination for RdmaDiskDestination {
    fn start(
        &mut self,
        disks: Vec<LandingDisk>,
        chunk_bytes: usize,
        queue_depth: u32,
        events: Sender<ReceiveEvent>,
    ) -> Result<(), TransportError> {
        if self.started {
            return Err(TransportError::Shutdown);
        }
        self.started = true;
        let qps = pick_lanes(&self.link, self.lanes[0], self.lanes[1])
            .map_err(rdma_error(self.stream_base))?;
        let sizes: Vec<u64> = disks.iter().map(|d| d.image.size()).collect();
        let disks = Arc::new(disks);
        for (lane, qp) in qps.into_iter().enumerate() {
            let stream = self.stream_base + lane;
            let depth = if lane == BULK_LANE {
                queue_depth
            } else {
                MIRROR_QUEUE_DEPTH
            };
            let ring = BlockRing::new(depth, depth as usize, chunk_bytes)
                .map_err(|source| TransportError::Disk { stream, source })?;
            let mut receiver = LaneReceiver::new(
                self.link.pd(),
                stream,
                lane,
                sizes.clone(),
                qp,
                Landing::new(stream, Arc::clone(&disks), ring),
                self.stop.clone(),
            )
            .map_err(rdma_error(stream))?;
            let staging = receiver.staging().encode();
            receiver.post_message(&staging).map_err(|stop| match stop {
                Stop::Failed(error) => error,
                Stop::Ended => TransportError::LinkClosed {
                    reason: format!("RDMA disk lane {stream} closed before it started"),
                },
            })?;
            let events = events.clone();
            let handle = numa::spawn(
                ThreadRole::Transport,
                format!("ferry-rdma-disk-rx{lane}"),
                move || receiver.run(&events),
            )
            .map_err(|source| TransportError::Io {
                stream,
                op: "spawning a disk receiver",
                source,
            })?;
            self.receivers.push(handle);
        }
        Ok(())
    }

    fn shutdown(&mut self) {
        self.link.stop_receivers(&self.stop, &mut self.receivers);
    }
}

impl Drop for RdmaDiskDestination {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Why a destination lane stopped.
enum Stop {
    /// The link closed (or shutdown): the clean end.
    Ended,
    Failed(TransportError),
}

impl From<TransportError> for Stop {
    fn from(e: TransportError) -> Self {
        Stop::Failed(e)
    }
}

struct LaneReceiver {
    stream: usize,
    lane: usize,
    sizes: Vec<u64>,
    qp: Arc<ConnectedQp>,
    // Field order matters for drop: the registrations of the ring buffers go before the
    // ring (and its buffers).
    regions: Vec<MemoryRegion>,
    landing: Landing,
    /// Announcement receive buffers, [`DEST_RECEIVES`] of [`ANNOUNCE_STRIDE`].
    receives: RegisteredBuffer,
    /// Message send slots, [`MESSAGE_SLOTS`] of [`MESSAGE_BYTES`].
    messages: RegisteredBuffer,
    next_message: u64,
    messages_done: u64,
    /// Ack headers not sent yet.
    acks: Vec<u8>,
    stop: Arc<AtomicBool>,
}

impl LaneReceiver {
    /// Registers the ring buffers for remote write and posts the receive buffers.
    fn new(
        pd: &Arc<ProtectionDomain>,
        stream: usize,
        lane: usize,
        sizes: Vec<u64>,
        qp: Arc<ConnectedQp>,
        mut landing: Landing,
        stop: Arc<AtomicBool>,
    ) -> Result<Self, RdmaError> {
        let mut regions = Vec::new();
        for index in 0..landing.ring().buffer_count() {
            let (ptr, len) = landing.ring_mut().buffer_region(index);
            // SAFETY: ring buffer `index` is a heap allocation owned by the ring, at a
            // stable address for the ring's life; the region is dropped before the ring
            // (field order of `LaneReceiver`, which owns both; on an error here the local
            // `regions` goes first too, declared after `landing`). The device writes the
            // buffer only when the source posts a WRITE into its slot, which an honest
            // source does only while the buffer is idle (its previous request
            // acknowledged); the buffer is read (hashed, written to disk) only after the
            // announcement that follows the WRITE on the same connection.
            let region = unsafe { MemoryRegion::register(pd, ptr, len, Access::RemoteWrite)? };
            regions.push(region);
        }
        let receives =
            RegisteredBuffer::new(pd, DEST_RECEIVES * ANNOUNCE_STRIDE, Access::LocalWrite)?;
        for slot in 0..DEST_RECEIVES {
            qp.post_recv(
                slot as u64,
                receives
                    .region()
                    .sge(slot * ANNOUNCE_STRIDE, ANNOUNCE_STRIDE)?,
            )?;
        }
        let messages = RegisteredBuffer::new(
            pd,
            MESSAGE_SLOTS as usize * MESSAGE_BYTES,
            Access::LocalRead,
        )?;
        Ok(Self {
            stream,
            lane,
            sizes,
            qp,
            regions,
            landing,
            receives,
            messages,
            next_message: 0,
            messages_done: 0,
            acks: Vec::new(),
            stop,
        })
    }

    fn staging(&self) -> Staging {
        Staging {
            slots: self
                .regions
                .iter()
                .map(|r| StagingSlot {
                    addr: r.addr(),
                    rkey: r.rkey(),
                    len: r.len() as u32,
                })
                .collect(),
        }
    }

    fn run(mut self, events: &Sender<ReceiveEvent>) {
        let stream = self.stream;
        match self.receive() {
            Ok(()) | Err(Stop::Ended) => self.drain(),
            Err(Stop::Failed(error)) => {
                let reason = error_chain(&error);
                let _ = events.send(ReceiveEvent::Failed { stream, error });
                self.refuse(&reason);
                // Like a TCP receiver dropping its socket: the source's requests fail now
                // rather than wait for acks that will not come.
                self.qp.id().disconnect();
                self.drain();
            }
        }
    }

    /// Lets queued writes finish and records them (their acks no longer reach anyone).
    fn drain(&mut self) {
        let in_flight = self.landing.ring().in_flight();
        if in_flight > 0 {
            let _ = self
                .landing
                .reap(in_flight, &mut Vec::new(), &mut Vec::new());
        }
    }

    fn receive(&mut self) -> Result<(), Stop> {
        let stream = self.stream;
        let ring_fd = self.landing.ring().as_raw_fd();
        let fds = [ring_fd, self.qp.recv_cq().fd()];
        let mut completions: Vec<Completion> = Vec::new();
        let mut message = [0u8; ANNOUNCE_STRIDE];
        loop {
            self.reap(0)?;
            self.retire_messages(false)?;
            completions.clear();
            self.qp
                .recv_cq()
                .poll(&mut completions, DEST_RECEIVES)
                .map_err(rdma_error(stream))?;
            for c in &completions {
                if let Some((_, text)) = c.error {
                    // A flush is how a closed link ends (the source finished, or shut the
                    // link down): like a clean close between frames on TCP.
                    if c.is_flush() || self.stop.load(Ordering::Relaxed) {
                        return Err(Stop::Ended);
                    }
                    return Err(Stop::Failed(TransportError::LinkClosed {
                        reason: format!("RDMA disk lane {stream}: receive failed: {text}"),
                    }));
                }
                let slot = c.wr_id as usize;
                let len = c.byte_len as usize;
                if slot >= DEST_RECEIVES || len > ANNOUNCE_STRIDE {
                    return Err(rdma_error(stream)(bad_message(format!(
                        "announcement of {len} bytes in receive buffer {slot}"
                    )))
                    .into());
                }
                self.receives
                    .read(slot * ANNOUNCE_STRIDE, &mut message[..len]);
                let sge = self
                    .receives
                    .region()
                    .sge(slot * ANNOUNCE_STRIDE, ANNOUNCE_STRIDE)
                    .map_err(rdma_error(stream))?;
                self.qp
                    .post_recv(slot as u64, sge)
                    .map_err(rdma_error(stream))?;
                self.handle(&message[..len])?;
            }
            self.flush_acks()?;
            if self.stop.load(Ordering::Relaxed) {
                return Err(Stop::Ended);
            }
            if completions.is_empty() {
                let ready =
                    wait_any(&fds, Instant::now() + WAIT_SLICE).map_err(rdma_error(stream))?;
                if ready[1] {
                    self.qp
                        .recv_cq()
                        .wait(Instant::now())
                        .map_err(rdma_error(stream))?;
                }
            }
        }
    }

    /// One announcement: validated, then its payload queued for writing (or its zero
    /// chunk carried out and acknowledged).
    fn handle(&mut self, message: &[u8]) -> Result<(), TransportError> {
        let stream = self.stream;
        if message.len() != ANNOUNCE_LEN {
            return Err(rdma_error(stream)(bad_message(format!(
                "announcement of {} bytes, {ANNOUNCE_LEN} expected",
                message.len()
            ))));
        }
        let frame = DiskFrame::decode(&message[..FRAME_HEADER_LEN], &self.sizes)
            .map_err(|source| TransportError::Wire { stream, source })?;
        let slot = u64::from_le_bytes(message[FRAME_HEADER_LEN..].try_into().expect("8 bytes"));
        match lane_request(stream, self.lane, frame)? {
            Request::Data {
                disk,
                id,
                offset,
                len,
            } => {
                let limit = self.landing.ring().buffer_len();
                if len as usize > limit {
                    return Err(TransportError::DiskRequestTooLarge { stream, len, limit });
                }
                let slots = self.regions.len();
                if slot >= slots as u64 {
                    return Err(rdma_error(stream)(bad_message(format!(
                        "request {id} names staging slot {slot}; the lane has {slots}"
                    ))));
                }
                if self.landing.busy(slot as usize) {
                    return Err(rdma_error(stream)(bad_message(format!(
                        "request {id} names staging slot {slot}, whose previous write is still in flight"
                    ))));
                }
                self.landing.write(slot as usize, disk, id, offset, len)
            }
            Request::Zero {
                disk,
                id,
                offset,
                len,
            } => {
                self.landing.zero(disk, offset, len)?;
                self.acks.extend_from_slice(
                    &DiskFrame::Ack {
                        disk,
                        id,
                        status: crate::wire::ACK_OK,
                    }
                    .encode(),
                );
                Ok(())
            }
        }
    }

    /// Collects completed writes (recorded in the digests) and sends their acks.
    fn reap(&mut self, min: usize) -> Result<(), Stop> {
        let failure = self.landing.reap(min, &mut self.acks, &mut Vec::new())?;
        self.flush_acks()?;
        match failure {
            Some(error) => Err(Stop::Failed(error)),
            None => Ok(()),
        }
    }

    fn flush_acks(&mut self) -> Result<(), Stop> {
        if self.acks.is_empty() {
            return Ok(());
        }
        let acks = std::mem::take(&mut self.acks);
        for batch in acks.chunks(ACKS_PER_MESSAGE * FRAME_HEADER_LEN) {
            self.post_message(batch)?;
        }
        Ok(())
    }

    /// SENDs `bytes` from a free message slot, waiting for one if all are in flight.
    fn post_message(&mut self, bytes: &[u8]) -> Result<(), Stop> {
        while self.next_message - self.messages_done >= MESSAGE_SLOTS {
            self.retire_messages(true)?;
        }
        let stream = self.stream;
        let at = (self.next_message % MESSAGE_SLOTS) as usize * MESSAGE_BYTES;
        self.messages.write(at, bytes);
        let local = self
            .messages
            .region()
            .sge(at, bytes.len())
            .map_err(rdma_error(stream))?;
        self.qp
            .post(&[WorkRequest::Send { local }], self.next_message)
            .map_err(rdma_error(stream))?;
        self.next_message += 1;
        Ok(())
    }

    /// Takes send completions; with `block`, waits (up to a slice) when there are none.
    fn retire_messages(&mut self, block: bool) -> Result<(), Stop> {
        let stream = self.stream;
        let mut completions = Vec::new();
        self.qp
            .send_cq()
            .poll(&mut completions, MESSAGE_SLOTS as usize)
            .map_err(rdma_error(stream))?;
        for c in &completions {
            if let Some((_, text)) = c.error {
                if c.is_flush() || self.stop.load(Ordering::Relaxed) {
                    return Err(Stop::Ended);
                }
                return Err(Stop::Failed(TransportError::LinkClosed {
                    reason: format!("RDMA disk lane {stream}: sending failed: {text}"),
                }));
            }
            self.messages_done = self.messages_done.max(c.wr_id + 1);
        }
        if block && completions.is_empty() {
            if self.stop.load(Ordering::Relaxed) {
                return Err(Stop::Ended);
            }
            self.qp
                .send_cq()
                .wait(Instant::now() + WAIT_SLICE)
                .map_err(rdma_error(stream))?;
        }
        Ok(())
    }

    /// Best effort: tells the source why the lane ends, and waits a little for the
    /// message to be delivered before the caller breaks the link.
    fn refuse(&mut self, reason: &str) {
        let mut message = REFUSAL_MAGIC.to_le_bytes().to_vec();
        let text = reason.as_bytes();
        message.extend_from_slice(&text[..text.len().min(MESSAGE_BYTES - 4)]);
        let deadline = Instant::now() + REFUSAL_WAIT;
        while self.next_message - self.messages_done >= MESSAGE_SLOTS {
            if Instant::now() >= deadline || self.retire_messages(true).is_err() {
                return;
            }
        }
        if self.post_message(&message).is_err() {
            return;
        }
        while self.messages_done < self.next_message && Instant::now() < deadline {
            if self.retire_messages(true).is_err() {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::disk::{AlignedBuf, DirectIo, DiskImage};
    use crate::memory::{page_hash, MemoryDigest, ZERO_PAGE_HASH};
    use crate::transport::rdma::link::UnauthenticatedLanes;
    use crate::transport::rdma::link::{connect, Listener};
    use crate::transport::rdma::test_addresses;
    use crate::wire::WireError;

    const SIZE: u64 = 4 << 20;
    const CHUNK: usize = 256 << 10;
    const BLOCKS: usize = SIZE as usize / BLOCK_SIZE;
    const DEPTH: u32 = 4;
    const LONG: Duration = Duration::from_secs(30);

    struct Harness {
        source: RdmaDiskSource,
        destination: RdmaDiskDestination,
        image: Arc<DiskImage>,
        digest: Arc<MemoryDigest>,
        events: crossbeam_channel::Receiver<ReceiveEvent>,
        _dir: tempfile::TempDir,
    }

    /// A connected source and destination over two lanes of a soft-RoCE link, on a 4 MiB
    /// image in /tmp; the destination is started when `start`. `None` without RDMA.
    fn harness(session: u64, start: bool, prefill: Option<u8>) -> Option<Harness> {
        let (a, b) = test_addresses()?;
        let dir = tempfile::tempdir_in("/tmp").unwrap();
        let image =
            Arc::new(DiskImage::create(&dir.path().join("d.img"), SIZE, DirectIo::Auto).unwrap());
        if let Some(byte) = prefill {
            let mut buf = AlignedBuf::new_zeroed(1 << 20);
            buf.fill(byte);
            for at in (0..SIZE).step_by(1 << 20) {
                image.write_at(&buf, at).unwrap();
            }
        }
        let digest = Arc::new(MemoryDigest::new_zeroed(BLOCKS));
        let listener = Listener::bind(b).unwrap();
        let port = listener.port();
        let caps = vec![lane_caps(); 2];
        let deadline = Instant::now() + LONG;
        let (source_link, destination_link) = std::thread::scope(|s| {
            let accept = numa::spawn_scoped(s, ThreadRole::Transport, "ferry-test-accept", || {
                listener.accept(
                    session,
                    &caps,
                    |_| Vec::new(),
                    &UnauthenticatedLanes,
                    deadline,
                    &AtomicBool::new(false),
                )
            })
            .unwrap();
            let (link, _) = connect(
                Some(a),
                SocketAddr::new(b, port),
                session,
                &caps,
                &UnauthenticatedLanes,
                deadline,
            )
            .unwrap();
            (link, accept.join().unwrap().unwrap())
        });
        let source = RdmaDiskSource::new(Arc::new(source_link), 0, 1, vec![SIZE], 4).unwrap();
        let mut destination = RdmaDiskDestination::new(Arc::new(destination_link), 0, 1, 4);
        let (tx, events) = crossbeam_channel::unbounded();
        if start {
            let landing = vec![LandingDisk {
                image: Arc::clone(&image),
                digest: Arc::clone(&digest),
                fresh: prefill.is_none(),
            }];
            destination.start(landing, CHUNK, DEPTH, tx).unwrap();
        }
        Some(Harness {
            source,
            destination,
            image,
            digest,
            events,
            _dir: dir,
        })
    }

    fn failure(h: &Harness) -> TransportError {
        match h.events.recv_timeout(LONG).expect("a failure event") {
            ReceiveEvent::Failed { error, .. } => error,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    /// Waits until the lane has the destination's staging slots.
    fn staged(source: &RdmaDiskSource, lane: usize) -> Arc<Staging> {
        let deadline = Instant::now() + LONG;
        loop {
            if let Some(remote) = source.shared[lane].lock().remote.clone() {
                return remote;
            }
            assert!(Instant::now() < deadline, "no staging message");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Posts an announcement the source itself would never send (no WRITE before it),
    /// registered as a ticket; returns the ticket.
    fn forge(
        source: &RdmaDiskSource,
        lane: usize,
        make: impl FnOnce(u32) -> DiskFrame,
        slot: u64,
    ) -> u32 {
        staged(source, lane);
        let id = source.acks.lane(lane).register().unwrap();
        let mut l = source.lanes[lane].lock().unwrap();
        let seq = l.next_seq;
        let mut announcement = [0u8; ANNOUNCE_LEN];
        announcement[..FRAME_HEADER_LEN].copy_from_slice(&make(id).encode());
        announcement[FRAME_HEADER_LEN..].copy_from_slice(&slot.to_le_bytes());
        let at = (seq % POSTS_MAX) as usize * ANNOUNCE_STRIDE;
        l.announce.write(at, &announcement);
        let local = l.announce.region().sge(at, ANNOUNCE_LEN).unwrap();
        l.qp.post(&[WorkRequest::Send { local }], seq).unwrap();
        l.next_seq += 1;
        id
    }

    fn refused(h: &Harness, ticket: u32) -> String {
        match h.source.wait(ticket, Instant::now() + LONG) {
            Err(TransportError::LinkClosed { reason }) => reason,
            other => panic!("expected the lane to fail, got {other:?}"),
        }
    }

    fn chunk_data(i: usize) -> Vec<u8> {
        (0..CHUNK)
            .map(|j| ((j / BLOCK_SIZE * 31 + i * 7 + j) % 251) as u8 + 1)
            .collect()
    }

    #[test]
    fn chunks_zero_chunks_and_mirrored_writes_land_hashed_and_acknowledged() {
        let Some(h) = harness(11, true, Some(0xAA)) else {
            return;
        };
        let mut expected = vec![0u8; SIZE as usize];
        let mut tickets = Vec::new();
        let mut payload = 0usize;
        // 16 chunks on 4 staging slots: slots are reused as acks come back.
        for i in 0..SIZE as usize / CHUNK {
            let offset = (i * CHUNK) as u64;
            let ticket = if i % 5 == 2 {
                h.source.send_chunk(0, offset, CHUNK as u32, None).unwrap()
            } else {
                let data = chunk_data(i);
                expected[i * CHUNK..(i + 1) * CHUNK].copy_from_slice(&data);
                payload += data.len();
                h.source
                    .send_chunk(0, offset, CHUNK as u32, Some(&data))
                    .unwrap()
            };
            tickets.push(ticket);
        }
        for &t in &tickets {
            h.source.wait(t, Instant::now() + LONG).unwrap();
        }
        // Mirrored writes (12 on 8 slots), into chunks already acknowledged.
        let mut writes = Vec::new();
        for k in 0..12usize {
            let offset = k * (320 << 10) + BLOCK_SIZE;
            let data = vec![0x40 + k as u8; 2 * BLOCK_SIZE];
            expected[offset..offset + data.len()].copy_from_slice(&data);
            payload += data.len();
            let t = h.source.send_write(0, offset as u64, &data).unwrap();
            assert!(h.source.acks.lane(MIRROR_LANE).owns(t));
            writes.push(t);
        }
        for &t in &writes {
            h.source.wait(t, Instant::now() + LONG).unwrap();
        }
        // A waited ticket is consumed, as on TCP.
        assert!(matches!(
            h.source.poll(writes[0]),
            Some(Err(TransportError::UnknownTicket { .. }))
        ));
        assert!(h.source.bytes_sent() >= payload as u64);
        let mut on_disk = AlignedBuf::new_zeroed(SIZE as usize);
        h.image.read_at(&mut on_disk, 0).unwrap();
        assert!(
            on_disk[..] == expected[..],
            "image differs from what was sent"
        );
        let reference = MemoryDigest::new_zeroed(BLOCKS);
        for (i, block) in expected.chunks(BLOCK_SIZE).enumerate() {
            let hash = if block.iter().all(|&b| b == 0) {
                ZERO_PAGE_HASH
            } else {
                page_hash(block)
            };
            reference.record_now(i, hash);
        }
        for i in 0..BLOCKS {
            assert_eq!(
                h.digest.hash_of(i),
                reference.hash_of(i),
                "digest of block {i}"
            );
        }
        assert_eq!(h.digest.value(), reference.value());
        assert!(
            h.events.try_recv().is_err(),
            "no failure on the destination"
        );
    }

    #[test]
    fn a_request_larger_than_a_slot_is_refused() {
        let Some(h) = harness(12, true, None) else {
            return;
        };
        // By the source, once it knows the slots; the lane stays usable.
        let big = vec![1u8; 2 * CHUNK];
        assert!(matches!(
            h.source.send_write(0, 0, &big),
            Err(TransportError::DiskRequestTooLarge { len, limit, .. })
                if len as usize == 2 * CHUNK && limit == CHUNK
        ));
        assert!(matches!(
            h.source.send_chunk(0, 0, 2 * CHUNK as u32, Some(&big)),
            Err(TransportError::DiskRequestTooLarge { .. })
        ));
        let t = h.source.send_write(0, 0, &[3u8; BLOCK_SIZE]).unwrap();
        h.source.wait(t, Instant::now() + LONG).unwrap();
        // By the destination, should a source announce one anyway.
        let forged = forge(
            &h.source,
            MIRROR_LANE,
            |id| DiskFrame::Write {
                disk: 0,
                id,
                offset: 0,
                len: 2 * CHUNK as u32,
            },
            0,
        );
        assert!(matches!(
            failure(&h),
            TransportError::DiskRequestTooLarge { stream: 5, len, .. } if len as usize == 2 * CHUNK
        ));
        let reason = refused(&h, forged);
        assert!(reason.contains("refused"), "{reason}");
    }

    #[test]
    fn a_block_beyond_the_end_of_the_disk_is_refused() {
        let Some(h) = harness(13, true, None) else {
            return;
        };
        let t = h
            .source
            .send_chunk(0, SIZE, BLOCK_SIZE as u32, Some(&[1u8; BLOCK_SIZE]))
            .unwrap();
        assert!(matches!(
            failure(&h),
            TransportError::Wire {
                stream: 4,
                source: WireError::DiskOutOfRange { .. },
            }
        ));
        let reason = refused(&h, t);
        assert!(reason.contains("refused"), "{reason}");
        // Nothing was recorded.
        assert_eq!(h.digest.value(), MemoryDigest::new_zeroed(BLOCKS).value());
        // Later requests fail at once instead of waiting for acks.
        assert!(h.source.send_chunk(0, 0, BLOCK_SIZE as u32, None).is_err());
    }

    #[test]
    fn a_slot_out_of_range_or_on_the_wrong_lane_is_refused() {
        let Some(h) = harness(14, true, None) else {
            return;
        };
        let forged = forge(
            &h.source,
            BULK_LANE,
            |id| DiskFrame::Chunk {
                disk: 0,
                id,
                offset: 0,
                len: BLOCK_SIZE as u32,
            },
            DEPTH as u64,
        );
        assert!(matches!(
            failure(&h),
            TransportError::Rdma {
                stream: 4,
                source: RdmaError::BadPeerMessage { .. }
            }
        ));
        refused(&h, forged);

        let Some(h) = harness(15, true, None) else {
            return;
        };
        forge(
            &h.source,
            BULK_LANE,
            |id| DiskFrame::Write {
                disk: 0,
                id,
                offset: 0,
                len: BLOCK_SIZE as u32,
            },
            0,
        );
        assert!(matches!(
            failure(&h),
            TransportError::UnexpectedDiskFrame { stream: 4, .. }
        ));
    }

    #[test]
    fn shutdown_wakes_a_waiter() {
        // The destination never starts: no staging slots, no acks.
        let Some(h) = harness(16, false, None) else {
            return;
        };
        let ticket = h.source.acks.lane(BULK_LANE).register().unwrap();
        let started = Instant::now();
        std::thread::scope(|s| {
            let sender = numa::spawn_scoped(s, ThreadRole::Transport, "ferry-test-sender", || {
                h.source.send_write(0, 0, &[1u8; BLOCK_SIZE])
            })
            .unwrap();
            let waiter = numa::spawn_scoped(s, ThreadRole::Disk, "ferry-test-waiter", || {
                h.source.wait(ticket, Instant::now() + LONG)
            })
            .unwrap();
            std::thread::sleep(Duration::from_millis(300));
            assert!(!sender.is_finished() && !waiter.is_finished());
            h.source.shutdown();
            assert!(matches!(
                sender.join().unwrap(),
                Err(TransportError::Shutdown | TransportError::LinkClosed { .. })
            ));
            assert!(matches!(
                waiter.join().unwrap(),
                Err(TransportError::LinkClosed { .. })
            ));
        });
        assert!(started.elapsed() < Duration::from_secs(10));
        assert!(matches!(
            h.source.send_chunk(0, 0, BLOCK_SIZE as u32, None),
            Err(TransportError::LinkClosed { .. } | TransportError::Shutdown)
        ));
        drop(h.destination);
    }

    #[test]
    fn staging_messages_round_trip_and_lies_are_refused() {
        let staging = Staging {
            slots: (0..4)
                .map(|i| StagingSlot {
                    addr: 0x1000 * (i + 1),
                    rkey: 7 + i as u32,
                    len: CHUNK as u32,
                })
                .collect(),
        };
        let bytes = staging.encode();
        assert_eq!(Staging::decode(&bytes).unwrap(), staging);
        let refused = |bytes: &[u8]| Staging::decode(bytes).is_err();
        assert!(refused(&bytes[..bytes.len() - 1]));
        assert!(refused(&bytes[..8]));
        let mut bad = bytes.clone();
        bad[0] ^= 1;
        assert!(refused(&bad), "magic");
        let mut bad = bytes.clone();
        bad[4] = 2;
        assert!(refused(&bad), "version");
        let mut bad = bytes.clone();
        bad[8] = 5;
        assert!(refused(&bad), "count");
        let mut bad = bytes.clone();
        bad[8..12].copy_from_slice(&0u32.to_le_bytes());
        assert!(refused(&bad[..STAGING_HEADER_LEN]), "no slots");
        let mut uneven = staging.clone();
        uneven.slots[1].len = 2 * CHUNK as u32;
        assert!(refused(&uneven.encode()), "slot lengths differ");
        let mut odd = staging.clone();
        for s in &mut odd.slots {
            s.len = 1000;
        }
        assert!(refused(&odd.encode()), "misaligned slots");
        let mut huge = staging;
        for s in &mut huge.slots {
            s.len = CHUNK_BYTES_MAX as u32 + BLOCK_SIZE as u32;
        }
        assert!(refused(&huge.encode()), "slots too long");
    }
}
