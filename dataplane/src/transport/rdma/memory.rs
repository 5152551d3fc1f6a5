//! Memory streams over RDMA: one reliable connection (lane) per stream.
//!
//! Source: guest memory is registered once (local read). A [`Frame::Pages`] run becomes one
//! RDMA WRITE from the source's guest pages straight into the same pages of the
//! destination's registered guest memory; the frames' headers (the same 40-byte headers TCP
//! sends) are gathered into a registered announcement slot and SENT after the writes of
//! the batch, on the same connection. A reliable connection delivers in order, so when the
//! destination sees an announcement, every page it names has landed. Only the
//! announcement is signalled; its completion retires every write before it. A lane has at
//! most [`SEND_QUEUE`] work requests and [`ANNOUNCE_SLOTS`] announcements in flight; a
//! completion thread (one per source) retires them and wakes the senders.
//!
//! Zero pages: in round 0 they are only announced (the destination's memory is fresh and
//! reads as zero); in later rounds a page that became zero is written from a registered
//! zero region like any other page, so that it can never be zeroed on the destination
//! after a later write of it landed.
//!
//! Destination: guest memory is registered once (remote write) before the lanes are
//! accepted; its address and rkey travel in the accept. One receiver thread per lane
//! takes announcements, checks each header exactly as the TCP receiver does (round,
//! owning stream, counts: [`super::super::ledger`]), hashes the named pages from guest
//! memory into the digest, and reposts the buffer.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;

use super::link::Link;
use super::verbs::{
    wait_any, Access, Completion, ConnectedQp, MemoryRegion, ProtectionDomain, QpCaps,
    RegisteredBuffer, RemoteAddr, WorkRequest,
};
use super::RdmaError;
use crate::memory::{page_hash, GuestMemory, MemoryDigest, PAGE_SIZE, ZERO_PAGE_HASH};
use crate::numa::{self, ThreadRole};
use crate::transport::ledger::{check_owner, Next, StreamLedger};
use crate::transport::{
    spawn_receiver, DestinationTransport, ReceiveEvent, SourceTransport, TransportError,
};
use crate::wire::frame::FRAME_PAGES_MAX;
use crate::wire::{Frame, FrameLimits, WireError, FRAME_HEADER_LEN};

/// Bytes of one announcement (frame headers of one batch).
pub const ANNOUNCE_BYTES: usize = 4096;
/// Announcements in flight per lane (registered send slots on the source).
pub const ANNOUNCE_SLOTS: usize = 32;
/// Send work requests in flight per lane.
pub const SEND_QUEUE: u32 = 256;
/// Page bytes posted and not yet completed, per lane: like a socket's send buffer, it
/// keeps the device busy without letting `send` run far ahead of what the destination
/// has (the engine's round rates and downtime estimates are measured at `send`).
pub const IN_FLIGHT_BYTES: u64 = 4 << 20;
/// A batch is announced once it carries this many page bytes (or a full announcement).
const BATCH_BYTES: u64 = 1 << 20;
/// Receive buffers posted per lane on the destination.
const RECEIVE_SLOTS: usize = 2 * ANNOUNCE_SLOTS;
/// How long a waiting thread sleeps before it looks at the stop flag again.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Queue sizes of a memory lane.
pub fn lane_caps() -> QpCaps {
    QpCaps {
        send_wr: SEND_QUEUE,
        recv_wr: RECEIVE_SLOTS as u32,
    }
}

/// Where the destination's guest memory is: what a memory lane's accept carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RemoteMemory {
    pub addr: u64,
    pub len: u64,
    pub rkey: u32,
}

const REMOTE_MEMORY_LEN: usize = 20;

impl RemoteMemory {
    pub fn of(region: &MemoryRegion) -> Self {
        Self {
            addr: region.addr(),
            len: region.len() as u64,
            rkey: region.rkey(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(REMOTE_MEMORY_LEN);
        out.extend_from_slice(&self.addr.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&self.rkey.to_le_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RdmaError> {
        if bytes.len() < REMOTE_MEMORY_LEN {
            return Err(RdmaError::BadPeerMessage {
                reason: format!(
                    "memory lane accepted with {} bytes, {REMOTE_MEMORY_LEN} expected",
                    bytes.len()
                ),
            });
        }
        let u64_at = |i: usize| u64::from_le_bytes(bytes[i..i + 8].try_into().expect("8 bytes"));
        Ok(Self {
            addr: u64_at(0),
            len: u64_at(8),
            rkey: u32::from_le_bytes(bytes[16..20].try_into().expect("4 bytes")),
        })
    }
}

/// Registers `memory` for the device on `pd`: for the source (`Access::LocalRead`) or the
/// destination (`Access::RemoteWrite`).
pub fn register_guest_memory(
    pd: &Arc<ProtectionDomain>,
    memory: &Arc<GuestMemory>,
    access: Access,
) -> Result<MemoryRegion, RdmaError> {
    // SAFETY: the mapping of `memory` lives as long as the GuestMemory; every holder of
    // the region (RdmaSource, RdmaDestination) also holds an Arc of the memory, so it
    // stays mapped until the region is deregistered. Device writes (destination) land in
    // guest memory, which ferry already treats as shared (raw-pointer access, hashed only
    // after the announcement that follows the writes).
    unsafe { MemoryRegion::register(pd, memory.base_ptr(), memory.len(), access) }
}

/// Counters that prove the device moved the bytes (not a log line): read by tests and
/// the report.
#[derive(Debug, Default)]
pub struct RdmaCounters {
    pub writes: AtomicU64,
    pub write_bytes: AtomicU64,
    pub sends: AtomicU64,
}

/// Per-lane progress, updated by the completion thread.
#[derive(Default)]
struct LaneProgress {
    state: Mutex<LaneState>,
    changed: Condvar,
}

#[derive(Default)]
struct LaneState {
    /// Announcements completed: every batch with a sequence number below it.
    completed: u64,
    error: Option<String>,
}

struct SourceLane {
    qp: Arc<ConnectedQp>,
    announce: RegisteredBuffer,
    next_seq: u64,
    posted_wrs: u64,
    posted_bytes: u64,
    /// `(seq, posted_wrs, posted_bytes after it)` of batches not known to be complete.
    batches: VecDeque<(u64, u64, u64)>,
    retired_wrs: u64,
    retired_bytes: u64,
}

/// Source half: N memory lanes of a [`Link`].
pub struct RdmaSource {
    lanes: Vec<Mutex<SourceLane>>,
    progress: Vec<Arc<LaneProgress>>,
    local: MemoryRegion,
    zeros: RegisteredBuffer,
    remote: RemoteMemory,
    memory: Arc<GuestMemory>,
    counters: Arc<RdmaCounters>,
    stop: Arc<AtomicBool>,
    completer: Option<JoinHandle<()>>,
    link: Arc<Link>,
}

impl RdmaSource {
    /// Uses `link`'s lanes `lanes` as memory streams 0..; `remote` is what the destination
    /// accepted them with (all the same).
    pub fn new(
        link: Arc<Link>,
        lanes: std::ops::Range<usize>,
        memory: Arc<GuestMemory>,
        remote: RemoteMemory,
    ) -> Result<Self, RdmaError> {
        if remote.len != memory.len() as u64 {
            return Err(RdmaError::BadPeerMessage {
                reason: format!(
                    "destination registered {} bytes of guest memory, the source has {}",
                    remote.len,
                    memory.len()
                ),
            });
        }
        let pd = link.pd().clone();
        let local = register_guest_memory(&pd, &memory, Access::LocalRead)?;
        let zeros =
            RegisteredBuffer::new(&pd, FRAME_PAGES_MAX as usize * PAGE_SIZE, Access::LocalRead)?;
        let mut source_lanes = Vec::new();
        let mut progress = Vec::new();
        for qp in &link.lanes()[lanes] {
            source_lanes.push(Mutex::new(SourceLane {
                qp: qp.clone(),
                announce: RegisteredBuffer::new(
                    &pd,
                    ANNOUNCE_SLOTS * ANNOUNCE_BYTES,
                    Access::LocalRead,
                )?,
                next_seq: 0,
                posted_wrs: 0,
                posted_bytes: 0,
                batches: VecDeque::new(),
                retired_wrs: 0,
                retired_bytes: 0,
            }));
            progress.push(Arc::new(LaneProgress::default()));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let completer = {
            let qps: Vec<Arc<ConnectedQp>> = source_lanes
                .iter()
                .map(|l| l.lock().expect("fresh lock").qp.clone())
                .collect();
            let progress = progress.clone();
            let stop = stop.clone();
            numa::spawn(ThreadRole::Transport, "ferry-rdma-cq", move || {
                complete_sends(qps, progress, stop)
            })
            .map_err(|source| RdmaError::Verbs {
                op: "spawning the completion thread",
                source,
            })?
        };
        Ok(Self {
            lanes: source_lanes,
            progress,
            local,
            zeros,
            remote,
            memory,
            counters: Arc::new(RdmaCounters::default()),
            stop,
            completer: Some(completer),
            link,
        })
    }

    pub fn counters(&self) -> Arc<RdmaCounters> {
        self.counters.clone()
    }

    pub fn device(&self) -> &str {
        self.link.device()
    }

    /// Posts one batch: `writes`, then the announcement `headers`.
    fn post_batch(
        &self,
        stream: usize,
        lane: &mut SourceLane,
        writes: &mut Vec<WorkRequest>,
        headers: &mut Vec<u8>,
    ) -> Result<(), TransportError> {
        if headers.is_empty() {
            return Ok(());
        }
        let needed = writes.len() as u64 + 1;
        let bytes: u64 = writes
            .iter()
            .map(|w| match w {
                WorkRequest::Write { local, .. } | WorkRequest::Send { local } => local.len as u64,
            })
            .sum();
        let seq = lane.next_seq;
        // Room: the announcement slot `seq % ANNOUNCE_SLOTS` is free once batch
        // `seq - ANNOUNCE_SLOTS` completed, and the send queue has `needed` entries.
        let progress = &self.progress[stream];
        let mut state = progress
            .state
            .lock()
            .map_err(|_| TransportError::Shutdown)?;
        loop {
            if let Some(error) = &state.error {
                return Err(lane_failed(stream, error));
            }
            if self.stop.load(Ordering::Relaxed) {
                return Err(TransportError::Shutdown);
            }
            while lane
                .batches
                .front()
                .is_some_and(|&(s, _, _)| s < state.completed)
            {
                let (_, wrs, bytes) = lane.batches.pop_front().expect("a batch");
                lane.retired_wrs = wrs;
                lane.retired_bytes = bytes;
            }
            let slot_free = seq < state.completed + ANNOUNCE_SLOTS as u64;
            let queue_free = lane.posted_wrs - lane.retired_wrs + needed <= SEND_QUEUE as u64;
            // A batch larger than the bound alone still goes (when nothing is in flight).
            let in_flight = lane.posted_bytes - lane.retired_bytes;
            let bytes_free = in_flight == 0 || in_flight + bytes <= IN_FLIGHT_BYTES;
            if slot_free && queue_free && bytes_free {
                break;
            }
            state = progress
                .changed
                .wait_timeout(state, WAIT_SLICE)
                .map_err(|_| TransportError::Shutdown)?
                .0;
        }
        drop(state);
        let slot = (seq % ANNOUNCE_SLOTS as u64) as usize;
        lane.announce.write(slot * ANNOUNCE_BYTES, headers);
        let local = lane
            .announce
            .region()
            .sge(slot * ANNOUNCE_BYTES, headers.len())
            .map_err(|e| rdma_error(stream, e))?;
        writes.push(WorkRequest::Send { local });
        lane.qp
            .post(writes, seq)
            .map_err(|e| rdma_error(stream, e))?;
        lane.next_seq += 1;
        lane.posted_wrs += needed;
        lane.posted_bytes += bytes;
        lane.batches
            .push_back((seq, lane.posted_wrs, lane.posted_bytes));
        self.counters.sends.fetch_add(1, Ordering::Relaxed);
        writes.clear();
        headers.clear();
        Ok(())
    }

    fn lane(&self, stream: usize) -> Result<std::sync::MutexGuard<'_, SourceLane>, TransportError> {
        self.lanes
            .get(stream)
            .ok_or(TransportError::NoSuchStream {
                stream,
                streams: self.lanes.len(),
            })?
            .lock()
            .map_err(|_| TransportError::Shutdown)
    }

    /// Sends `bytes` as one announcement on `stream`, as is, with no writes: for tests
    /// that show the destination refuses what a broken or lying source could send.
    pub fn send_raw_announcement(&self, stream: usize, bytes: &[u8]) -> Result<(), TransportError> {
        let mut lane = self.lane(stream)?;
        let mut headers = bytes[..bytes.len().min(ANNOUNCE_BYTES)].to_vec();
        self.post_batch(stream, &mut lane, &mut Vec::new(), &mut headers)
    }

    fn write_request(
        &self,
        stream: usize,
        frame: &Frame,
    ) -> Result<Option<WorkRequest>, TransportError> {
        let (first, count, zero) = match *frame {
            Frame::Pages { first, count, .. } => (first, count, false),
            // Round 0: the destination's pages already read as zero.
            Frame::ZeroPages { round: 0, .. } | Frame::RoundEnd { .. } => return Ok(None),
            Frame::ZeroPages { first, count, .. } => (first, count, true),
        };
        let offset = first as usize * PAGE_SIZE;
        let len = count as usize * PAGE_SIZE;
        let local = if zero {
            self.zeros.region().sge(0, len)
        } else {
            self.local.sge(offset, len)
        }
        .map_err(|e| rdma_error(stream, e))?;
        self.counters.writes.fetch_add(1, Ordering::Relaxed);
        self.counters
            .write_bytes
            .fetch_add(len as u64, Ordering::Relaxed);
        Ok(Some(WorkRequest::Write {
            local,
            remote: RemoteAddr {
                addr: self.remote.addr + offset as u64,
                rkey: self.remote.rkey,
            },
        }))
    }
}

fn rdma_error(stream: usize, e: RdmaError) -> TransportError {
    TransportError::Rdma { stream, source: e }
}

fn lane_failed(stream: usize, error: &str) -> TransportError {
    TransportError::LinkClosed {
        reason: format!("RDMA lane {stream}: {error}"),
    }
}

impl SourceTransport for RdmaSource {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn streams(&self) -> usize {
        self.lanes.len()
    }

    fn send(
        &self,
        stream: usize,
        memory: &GuestMemory,
        frames: &[Frame],
    ) -> Result<u64, TransportError> {
        if stream >= self.lanes.len() {
            return Err(TransportError::NoSuchStream {
                stream,
                streams: self.lanes.len(),
            });
        }
        if memory.base_ptr() != self.memory.base_ptr() {
            return Err(rdma_error(stream, RdmaError::UnregisteredMemory));
        }
        let mut lane = self.lane(stream)?;
        let mut writes: Vec<WorkRequest> = Vec::new();
        let mut headers: Vec<u8> = Vec::with_capacity(ANNOUNCE_BYTES);
        let mut total = 0u64;
        let mut batch_bytes = 0u64;
        for frame in frames {
            if let Frame::Pages { first, count, .. } | Frame::ZeroPages { first, count, .. } =
                *frame
            {
                check_owner(stream, self.lanes.len(), first, count)?;
            }
            if headers.len() + FRAME_HEADER_LEN > ANNOUNCE_BYTES
                || writes.len() + 2 > SEND_QUEUE as usize / 2
                || batch_bytes >= BATCH_BYTES
            {
                self.post_batch(stream, &mut lane, &mut writes, &mut headers)?;
                batch_bytes = 0;
            }
            if let Some(write) = self.write_request(stream, frame)? {
                if let WorkRequest::Write { local, .. } = &write {
                    batch_bytes += local.len as u64;
                }
                writes.push(write);
            }
            headers.extend_from_slice(&frame.encode());
            total += (FRAME_HEADER_LEN + frame.payload_len()) as u64;
        }
        self.post_batch(stream, &mut lane, &mut writes, &mut headers)?;
        Ok(total)
    }

    fn shutdown(&self) {
        self.stop.store(true, Ordering::Relaxed);
        self.link.disconnect();
        for p in &self.progress {
            p.changed.notify_all();
        }
    }
}

impl Drop for RdmaSource {
    fn drop(&mut self) {
        self.shutdown();
        if let Some(h) = self.completer.take() {
            let _ = h.join();
        }
    }
}

/// The source's completion thread: retires announcements on every lane.
fn complete_sends(
    qps: Vec<Arc<ConnectedQp>>,
    progress: Vec<Arc<LaneProgress>>,
    stop: Arc<AtomicBool>,
) {
    let fds: Vec<_> = qps.iter().map(|q| q.send_cq().fd()).collect();
    let mut completions: Vec<Completion> = Vec::new();
    loop {
        for (i, qp) in qps.iter().enumerate() {
            completions.clear();
            let polled = qp.send_cq().poll(&mut completions, 256);
            let mut state = progress[i].state.lock().unwrap_or_else(|e| e.into_inner());
            match polled {
                Ok(_) => {
                    for c in &completions {
                        match c.error {
                            None => state.completed = state.completed.max(c.wr_id + 1),
                            Some((_, text)) => {
                                state
                                    .error
                                    .get_or_insert_with(|| format!("send failed: {text}"));
                            }
                        }
                    }
                }
                Err(e) => {
                    state.error.get_or_insert_with(|| e.to_string());
                }
            }
            if !completions.is_empty() || state.error.is_some() {
                progress[i].changed.notify_all();
            }
        }
        if stop.load(Ordering::Relaxed) {
            return;
        }
        match wait_any(&fds, Instant::now() + WAIT_SLICE) {
            Ok(ready) => {
                for (i, r) in ready.into_iter().enumerate() {
                    if r {
                        let _ = qps[i].send_cq().wait(Instant::now());
                    }
                }
            }
            Err(_) => std::thread::sleep(WAIT_SLICE),
        }
    }
}

/// Destination half: N memory lanes of a [`Link`], landing in registered guest memory.
pub struct RdmaDestination {
    link: Arc<Link>,
    lanes: std::ops::Range<usize>,
    memory: Arc<GuestMemory>,
    _region: Arc<MemoryRegion>,
    stop: Arc<AtomicBool>,
    receivers: Vec<JoinHandle<()>>,
}

impl RdmaDestination {
    /// `region` is `memory` registered for remote write on the link's PD (before the
    /// lanes were accepted with its [`RemoteMemory`]).
    pub fn new(
        link: Arc<Link>,
        lanes: std::ops::Range<usize>,
        memory: Arc<GuestMemory>,
        region: Arc<MemoryRegion>,
    ) -> Self {
        Self {
            link,
            lanes,
            memory,
            _region: region,
            stop: Arc::new(AtomicBool::new(false)),
            receivers: Vec::new(),
        }
    }
}

impl DestinationTransport for RdmaDestination {
    fn name(&self) -> &'static str {
        "rdma"
    }

    fn streams(&self) -> usize {
        self.lanes.len()
    }

    fn start(
        &mut self,
        memory: Arc<GuestMemory>,
        digest: Arc<MemoryDigest>,
        events: Sender<ReceiveEvent>,
    ) -> Result<(), TransportError> {
        if memory.base_ptr() != self.memory.base_ptr() {
            return Err(TransportError::Shutdown);
        }
        let streams = self.lanes.len();
        for (stream, lane) in self.lanes.clone().enumerate() {
            let qp = self.link.lanes()[lane].clone();
            let buffers = RegisteredBuffer::new(
                self.link.pd(),
                RECEIVE_SLOTS * ANNOUNCE_BYTES,
                Access::LocalWrite,
            )
            .map_err(|e| rdma_error(stream, e))?;
            for slot in 0..RECEIVE_SLOTS {
                let sge = buffers
                    .region()
                    .sge(slot * ANNOUNCE_BYTES, ANNOUNCE_BYTES)
                    .map_err(|e| rdma_error(stream, e))?;
                qp.post_recv(slot as u64, sge)
                    .map_err(|e| rdma_error(stream, e))?;
            }
            let mut receiver = LaneReceiver {
                stream,
                qp,
                buffers,
                memory: memory.clone(),
                digest: digest.clone(),
                limits: FrameLimits::for_pages(memory.pages() as u64),
                ledger: StreamLedger::new(stream, streams),
                stop: self.stop.clone(),
            };
            let handle = spawn_receiver(
                format!("ferry-rdma-rx-{stream}"),
                stream,
                events.clone(),
                move |events| receiver.run(events),
            )?;
            self.receivers.push(handle);
        }
        Ok(())
    }

    fn shutdown(&mut self) {
        self.link.stop_receivers(&self.stop, &mut self.receivers);
    }
}

impl Drop for RdmaDestination {
    fn drop(&mut self) {
        self.shutdown();
    }
}

struct LaneReceiver {
    stream: usize,
    qp: Arc<ConnectedQp>,
    buffers: RegisteredBuffer,
    memory: Arc<GuestMemory>,
    digest: Arc<MemoryDigest>,
    limits: FrameLimits,
    ledger: StreamLedger,
    stop: Arc<AtomicBool>,
}

impl LaneReceiver {
    fn run(&mut self, events: &Sender<ReceiveEvent>) -> Result<(), TransportError> {
        let stream = self.stream;
        let mut completions: Vec<Completion> = Vec::new();
        let mut message = vec![0u8; ANNOUNCE_BYTES];
        loop {
            completions.clear();
            self.qp
                .recv_cq()
                .poll(&mut completions, RECEIVE_SLOTS)
                .map_err(|e| rdma_error(stream, e))?;
            for c in &completions {
                if let Some((_, text)) = c.error {
                    // A flush is how a closed link ends (the source finished, or shut the
                    // link down): like a clean close between frames on TCP. The control
                    // channel tells the engine whether that was the end or a failure.
                    if c.is_flush() || self.stop.load(Ordering::Relaxed) {
                        return Ok(());
                    }
                    return Err(TransportError::LinkClosed {
                        reason: format!("RDMA lane {stream}: receive failed: {text}"),
                    });
                }
                let slot = c.wr_id as usize;
                let len = c.byte_len as usize;
                if slot >= RECEIVE_SLOTS || len > ANNOUNCE_BYTES {
                    return Err(rdma_error(
                        stream,
                        RdmaError::BadPeerMessage {
                            reason: format!("announcement of {len} bytes in slot {slot}"),
                        },
                    ));
                }
                self.buffers
                    .read(slot * ANNOUNCE_BYTES, &mut message[..len]);
                let sge = self
                    .buffers
                    .region()
                    .sge(slot * ANNOUNCE_BYTES, ANNOUNCE_BYTES)
                    .map_err(|e| rdma_error(stream, e))?;
                self.qp
                    .post_recv(slot as u64, sge)
                    .map_err(|e| rdma_error(stream, e))?;
                if self.land(&message[..len], events)? == Next::Stop {
                    return Ok(());
                }
            }
            if self.stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            if completions.is_empty() {
                self.qp
                    .recv_cq()
                    .wait(Instant::now() + WAIT_SLICE)
                    .map_err(|e| rdma_error(stream, e))?;
            }
        }
    }

    /// Accounts for one announcement: its pages have landed already.
    fn land(
        &mut self,
        message: &[u8],
        events: &Sender<ReceiveEvent>,
    ) -> Result<Next, TransportError> {
        let stream = self.stream;
        let wire = |source: WireError| TransportError::Wire { stream, source };
        if message.is_empty() || !message.len().is_multiple_of(FRAME_HEADER_LEN) {
            return Err(wire(WireError::Truncated {
                what: "announcement",
                got: message.len() % FRAME_HEADER_LEN,
                want: FRAME_HEADER_LEN,
            }));
        }
        for header in message.chunks_exact(FRAME_HEADER_LEN) {
            let frame = Frame::decode(header, &self.limits).map_err(wire)?;
            self.ledger.admit(&frame)?;
            match frame {
                Frame::Pages { first, count, .. } => {
                    let first = first as usize;
                    let delta = (first..first + count as usize).fold(0u64, |acc, p| {
                        acc.wrapping_add(self.digest.record(p, page_hash(self.memory.page(p))))
                    });
                    self.digest.apply(delta);
                    self.ledger.landed(count);
                }
                Frame::ZeroPages { first, count, .. } => {
                    let first = first as usize;
                    let delta = (first..first + count as usize).fold(0u64, |acc, p| {
                        acc.wrapping_add(self.digest.record(p, ZERO_PAGE_HASH))
                    });
                    self.digest.apply(delta);
                    self.ledger.landed(count);
                }
                Frame::RoundEnd { round, pages } => {
                    if self.ledger.round_end(round, pages, events)? == Next::Stop {
                        return Ok(Next::Stop);
                    }
                }
            }
        }
        Ok(Next::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::rdma::link::{connect, Listener, UnauthenticatedLanes};
    use crate::transport::rdma::test_addresses;
    use std::net::SocketAddr;

    fn memory(name: &str, pages: usize) -> Arc<GuestMemory> {
        Arc::new(GuestMemory::new(name, (pages * PAGE_SIZE) as u64).unwrap())
    }

    /// Tags made from a one-byte key: enough to tell two keys apart.
    struct ByteKey(u8);

    impl crate::transport::rdma::link::LaneAuth for ByteKey {
        fn tag(&self, session: u64, lane: u16) -> [u8; 16] {
            let mut tag = [self.0; 16];
            tag[..8].copy_from_slice(&(session ^ u64::from(lane)).to_le_bytes());
            tag
        }
        fn verify(&self, session: u64, lane: u16, tag: &[u8; 16]) -> bool {
            &self.tag(session, lane) == tag
        }
    }

    #[test]
    fn a_lane_whose_tag_does_not_verify_is_refused() {
        let Some((a, b)) = test_addresses() else {
            return;
        };
        let listener = Listener::bind(b).unwrap();
        let port = listener.port();
        let caps = vec![lane_caps(); 1];
        let deadline = Instant::now() + Duration::from_secs(5);
        let stop = AtomicBool::new(false);
        std::thread::scope(|s| {
            let accept = numa::spawn_scoped(s, ThreadRole::Transport, "ferry-test-accept", || {
                listener.accept(9, &caps, |_| Vec::new(), &ByteKey(1), deadline, &stop)
            })
            .unwrap();
            let wrong = connect(
                Some(a),
                SocketAddr::new(b, port),
                9,
                &caps,
                &ByteKey(2),
                deadline,
            );
            assert!(wrong.is_err(), "a lane with the wrong key was accepted");
            // The right key is accepted on the same listener afterwards.
            let right = connect(
                Some(a),
                SocketAddr::new(b, port),
                9,
                &caps,
                &ByteKey(1),
                deadline,
            );
            assert!(right.is_ok(), "{:?}", right.err());
            assert!(accept.join().unwrap().is_ok());
        });
    }

    #[test]
    fn pages_land_by_rdma_write_and_are_announced() {
        let Some((a, b)) = test_addresses() else {
            return;
        };
        let pages = 1024;
        let src = memory("rdma-src", pages);
        let dst = memory("rdma-dst", pages);
        for p in 0..pages {
            let mut page = [0u8; PAGE_SIZE];
            if p % 7 != 0 {
                page.fill((p % 251) as u8 + 1);
            }
            src.write_page(p, &page);
        }
        let listener = Listener::bind(b).unwrap();
        let region =
            Arc::new(register_guest_memory(listener.pd(), &dst, Access::RemoteWrite).unwrap());
        let remote = RemoteMemory::of(&region);
        let port = listener.port();
        let streams = 2;
        let caps = vec![lane_caps(); streams];
        let deadline = Instant::now() + Duration::from_secs(20);
        let (dest_link, source) = std::thread::scope(|s| {
            let accept = numa::spawn_scoped(s, ThreadRole::Transport, "ferry-test-accept", || {
                listener.accept(
                    7,
                    &caps,
                    |_| remote.encode(),
                    &UnauthenticatedLanes,
                    deadline,
                    &AtomicBool::new(false),
                )
            })
            .unwrap();
            let (link, accepted) = connect(
                Some(a),
                SocketAddr::new(b, port),
                7,
                &caps,
                &UnauthenticatedLanes,
                deadline,
            )
            .unwrap();
            let remote = RemoteMemory::decode(&accepted[0]).unwrap();
            let source = RdmaSource::new(Arc::new(link), 0..streams, src.clone(), remote).unwrap();
            (accept.join().unwrap().unwrap(), source)
        });
        let dest_link = Arc::new(dest_link);
        let digest = Arc::new(MemoryDigest::new_zeroed(pages));
        let mut destination = RdmaDestination::new(dest_link, 0..streams, dst.clone(), region);
        let (tx, rx) = crossbeam_channel::unbounded();
        destination.start(dst.clone(), digest.clone(), tx).unwrap();
        for stream in 0..streams {
            let mut frames = Vec::new();
            let mut count = 0u64;
            for block in (0..pages / 256).filter(|b| b % streams == stream) {
                for run in 0..4u64 {
                    let first = (block * 256) as u64 + run * 64;
                    let zero = (first / 64).is_multiple_of(5);
                    frames.push(if zero {
                        Frame::ZeroPages {
                            round: 0,
                            first,
                            count: 64,
                        }
                    } else {
                        Frame::Pages {
                            round: 0,
                            first,
                            count: 64,
                        }
                    });
                    count += 64;
                }
            }
            frames.push(Frame::RoundEnd {
                round: 0,
                pages: count,
            });
            source.send(stream, &src, &frames).unwrap();
        }
        for _ in 0..streams {
            match rx.recv_timeout(Duration::from_secs(20)).unwrap() {
                ReceiveEvent::RoundEnd { round: 0, .. } => {}
                other => panic!("{other:?}"),
            }
        }
        let counters = source.counters();
        assert!(counters.writes.load(Ordering::Relaxed) > 0);
        for p in 0..pages {
            let zero_announced = (p / 64).is_multiple_of(5);
            if !zero_announced {
                assert_eq!(src.page(p), dst.page(p), "page {p}");
                assert_eq!(
                    digest.hash_of(p),
                    page_hash(src.page(p)),
                    "digest of page {p}"
                );
            } else {
                assert_eq!(digest.hash_of(p), ZERO_PAGE_HASH);
            }
        }
        drop(source);
        destination.shutdown();
    }
}
