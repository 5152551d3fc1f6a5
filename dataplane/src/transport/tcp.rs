//! TCP transport: N connections, pages sent straight from guest memory with vectored
//! writes or io_uring zero-copy sends, and received straight into destination guest memory.
//!
//! Sender: a batch's frames become one gather list (header and page bytes as separate
//! slices, payload straight from guest memory), so a scattered round of single pages costs
//! one system call per batch, not per page. Measured (`ferry-bench send-path`, one stream
//! of single-page frames on loopback): 128 frames a call instead of 1 cut the send system
//! calls from 260,000 to 2,000 per GiB and CPU from 1.0–1.2 to 0.8 s/GiB, for 1.2–1.4× the
//! throughput. How the list goes out is the source's [`SendMode`]:
//!
//! - `Copy`: `writev`, at most `IOVECS_PER_WRITE` slices a call; the kernel copies the
//!   bytes into socket buffers.
//! - `ZeroCopy`: io_uring `SENDMSG_ZC` (`send_zc`), one request per batch: the kernel
//!   sends from the guest pages themselves. `send` returns once the kernel's notification
//!   says it is done with them (the engine's `send` is synchronous: header buffers and the
//!   borrow of guest memory end with the call). On a real network that notification waits
//!   for the peer's acknowledgement, so a stream moves at most one batch per round trip.
//! - `Auto` (the default): zero-copy for each stream's first sends (8, or 4 MiB), with
//!   `IORING_SEND_ZC_REPORT_USAGE`; if the kernel reports it copied at least half of them,
//!   the stream switches to `writev` for the rest of the migration, logs it once, and
//!   [`TcpSource::send_path`] says so. Without io_uring `SENDMSG_ZC` it sends plain and says
//!   why.
//!
//! Measured on loopback (Linux 6.18, 2 cores, 1 GiB in 1 MiB frames, `ferry-bench
//! send-path`): the kernel copied every zero-copy send (a local receiving socket cannot
//! keep the sender's pages), and zero-copy cost 30–40 % more CPU per GiB than `writev`
//! (0.9–1.1 against 0.7–0.8 CPU s/GiB) and 15–25 % of throughput, as issue 2 had found;
//! `Auto` probed, switched, and ran within noise of `Copy`. One `SENDMSG_ZC` per batch beat
//! a chain of `SEND_ZC` per slice by 10–30 %. Zero-copy is for a NIC that sends from user
//! pages; it has not been measured on one here.
//!
//! Receiver: payload is read straight into guest memory, in 64 KiB pieces, each page hashed
//! as soon as it is complete while the kernel's copy is still in cache; the last piece of a
//! frame is read together with the next frame's header (one `readv`). After a small frame
//! (the scattered dirty pages of later rounds) that read also takes up to 64 KiB more into
//! a read-ahead buffer (`staging`), and the frames found there are copied into place from
//! cache: single-page frames went from 1.6 to 2.1 GiB/s and from 1.18 to 0.90 CPU s/GiB
//! (4 streams, 1 GiB, every other page), while 1 MiB frames still land with no copy.

use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crossbeam_channel::Sender;
use serde::{Deserialize, Serialize};

use send_zc::{Shape, Usage, ZcSender};
use staging::{Staging, STAGING_BYTES};

use super::ledger::{check_owner, Next, StreamLedger};
use super::{spawn_receiver, DestinationTransport, ReceiveEvent, SourceTransport, TransportError};
use crate::memory::{page_hash, GuestMemory, MemoryDigest, PAGE_SIZE};
use crate::wire::{Frame, FrameLimits, WireError, FRAME_HEADER_LEN};

mod send_zc;
mod staging;

/// Payload bytes received per `readv`, then hashed while the kernel's copy is still in
/// cache. Measured (1 GiB, 4 streams, ratio to raw TCP): whole frames 0.79, 16 KiB 0.83,
/// 32 KiB 0.87–0.91, 64 KiB 0.88–0.94, 128 KiB 0.91.
const RECEIVE_CHUNK: usize = 64 << 10;
/// After a frame of at most this many pages a receiver reads ahead ([`Staging`]).
const SMALL_FRAME_PAGES: usize = 4;
/// iovecs per `writev` (below IOV_MAX = 1024).
const IOVECS_PER_WRITE: usize = 512;

fn tune(stream: &TcpStream, index: usize) -> Result<(), TransportError> {
    stream
        .set_nodelay(true)
        .map_err(|source| TransportError::Io {
            stream: index,
            op: "setting TCP_NODELAY",
            source,
        })
}

/// Tunes every stream and returns a handle per stream that `shutdown` closes, waking any
/// thread blocked on it. `first` is the index of `streams[0]` in errors.
pub(super) fn prepare(
    streams: &[TcpStream],
    first: usize,
) -> Result<Vec<TcpStream>, TransportError> {
    streams
        .iter()
        .enumerate()
        .map(|(i, s)| {
            tune(s, first + i)?;
            s.try_clone().map_err(|source| TransportError::Io {
                stream: first + i,
                op: "cloning a socket",
                source,
            })
        })
        .collect()
}

/// Closes `closers` (waking every thread blocked on them) and joins `receivers`.
pub(super) fn stop(closers: &[TcpStream], receivers: &mut Vec<JoinHandle<()>>) {
    for s in closers {
        let _ = s.shutdown(Shutdown::Both);
    }
    for h in receivers.drain(..) {
        let _ = h.join();
    }
}

/// How the source puts pages on the wire (`--send-mode auto|zerocopy|copy`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SendMode {
    /// io_uring `SENDMSG_ZC` for each stream's first batches; a stream whose sends the
    /// kernel reports it copied anyway (loopback, a NIC without scatter-gather) switches to
    /// plain send for the rest of the migration. Plain send when io_uring lacks `SEND_ZC`.
    #[default]
    Auto,
    /// io_uring `SENDMSG_ZC` for every batch, whatever the kernel reports (setting up the
    /// transport fails where it is unavailable).
    ZeroCopy,
    /// Plain `writev`: the kernel copies every byte into socket buffers.
    Copy,
}

impl SendMode {
    pub const ALL: [SendMode; 3] = [SendMode::Auto, SendMode::ZeroCopy, SendMode::Copy];

    pub fn as_str(self) -> &'static str {
        match self {
            SendMode::Auto => "auto",
            SendMode::ZeroCopy => "zerocopy",
            SendMode::Copy => "copy",
        }
    }
}

impl std::fmt::Display for SendMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for SendMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SendMode::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| format!("send mode must be auto, zerocopy or copy, not {s:?}"))
    }
}

/// How a [`TcpSource`]'s streams sent, summed over its streams.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct SendPathReport {
    pub mode: SendMode,
    /// io_uring zero-copy sends the kernel reported it did not copy.
    pub zero_copy_sends: u64,
    /// io_uring zero-copy sends the kernel reported it copied after all.
    pub copied_sends: u64,
    /// `writev` calls.
    pub plain_sends: u64,
    /// System calls spent sending: `writev` plus `io_uring_enter`.
    pub syscalls: u64,
    /// One line on what was used and why: "zero-copy probed on 4 streams: the kernel copied
    /// 32/32 sends (loopback), switched to plain send".
    pub note: String,
}

/// An `Auto` stream probes zero-copy for this many sends…
const PROBE_SENDS: u64 = 8;
/// …or this many bytes, whichever comes first, then decides.
const PROBE_BYTES: u64 = 4 << 20;

/// How one stream sends now.
enum TxPath {
    Plain,
    /// `Auto`, deciding: counts of the sends so far.
    Probing {
        zc: ZcSender,
        sends: u64,
        copied: u64,
        bytes: u64,
    },
    ZeroCopy(ZcSender),
}

/// One stream's socket and path, used by one sending thread at a time.
struct StreamTx {
    socket: TcpStream,
    path: TxPath,
}

/// What a stream's path is, for [`TcpSource::send_path`]'s note.
#[derive(Clone, Debug)]
enum PathState {
    /// `Copy` mode.
    Copy,
    /// `ZeroCopy` mode.
    ZeroCopy,
    /// `Auto`, still probing.
    Probing,
    /// `Auto`: the probe's sends were copied; plain send since.
    Switched { sends: u64, copied: u64 },
    /// `Auto`: the probe's sends were zero-copy; kept.
    Kept { sends: u64, copied: u64 },
    /// `Auto`: no `SEND_ZC` here (the reason).
    Unavailable(String),
    /// `Auto`: the kernel refused a zero-copy send on this socket (the reason).
    Refused(String),
}

/// One stream's counters; read by `send_path` without waiting for a send to finish.
#[derive(Debug)]
struct StreamStats {
    zero_copy: AtomicU64,
    copied: AtomicU64,
    plain: AtomicU64,
    syscalls: AtomicU64,
    state: Mutex<PathState>,
}

impl StreamStats {
    fn new(state: PathState) -> Self {
        Self {
            zero_copy: AtomicU64::new(0),
            copied: AtomicU64::new(0),
            plain: AtomicU64::new(0),
            syscalls: AtomicU64::new(0),
            state: Mutex::new(state),
        }
    }

    fn record_zc(&self, usage: Usage) {
        self.zero_copy
            .fetch_add(usage.sends - usage.copied, Ordering::Relaxed);
        self.copied.fetch_add(usage.copied, Ordering::Relaxed);
        self.syscalls.fetch_add(usage.enters, Ordering::Relaxed);
    }

    fn record_plain(&self, calls: u64) {
        self.plain.fetch_add(calls, Ordering::Relaxed);
        self.syscalls.fetch_add(calls, Ordering::Relaxed);
    }

    fn set_state(&self, state: PathState) {
        *self.state.lock().unwrap_or_else(|p| p.into_inner()) = state;
    }
}

/// Source half over N TCP streams.
pub struct TcpSource {
    streams: Vec<Mutex<StreamTx>>,
    stats: Vec<StreamStats>,
    closers: Vec<TcpStream>,
    mode: SendMode,
    /// Every stream's peer is on this host (the kernel always copies zero-copy sends there).
    loopback: bool,
    /// `shutdown` was called: a wait for zero-copy notifications gives up.
    closed: AtomicBool,
    /// The `Auto` decision was logged (once per transport, not per stream).
    announced: AtomicBool,
}

impl TcpSource {
    /// Takes connected streams; stream `i` must be the destination's stream `i`. Sends in
    /// [`SendMode::Auto`].
    pub fn new(streams: Vec<TcpStream>) -> Result<Self, TransportError> {
        Self::with_send_mode(streams, SendMode::Auto)
    }

    /// As [`TcpSource::new`], sending the way `mode` says. [`SendMode::ZeroCopy`] fails
    /// here if io_uring `SENDMSG_ZC` is unavailable; [`SendMode::Auto`] then uses plain
    /// send and says why (in the log and in [`TcpSource::send_path`]).
    pub fn with_send_mode(streams: Vec<TcpStream>, mode: SendMode) -> Result<Self, TransportError> {
        let closers = prepare(&streams, 0)?;
        let loopback = !streams.is_empty()
            && streams
                .iter()
                .all(|s| s.peer_addr().is_ok_and(|a| a.ip().is_loopback()));
        let mut txs = Vec::with_capacity(streams.len());
        let mut stats = Vec::with_capacity(streams.len());
        let mut unavailable = None;
        for (index, socket) in streams.into_iter().enumerate() {
            let (path, state) = match mode {
                SendMode::Copy => (TxPath::Plain, PathState::Copy),
                SendMode::ZeroCopy => {
                    let zc = ZcSender::new(Shape::MessagePerBatch).map_err(|source| {
                        TransportError::Io {
                            stream: index,
                            op: "setting up io_uring SENDMSG_ZC",
                            source,
                        }
                    })?;
                    (TxPath::ZeroCopy(zc), PathState::ZeroCopy)
                }
                SendMode::Auto => match ZcSender::new(Shape::MessagePerBatch) {
                    Ok(zc) => (
                        TxPath::Probing {
                            zc,
                            sends: 0,
                            copied: 0,
                            bytes: 0,
                        },
                        PathState::Probing,
                    ),
                    Err(e) => {
                        let reason = format!("io_uring SENDMSG_ZC unavailable: {e}");
                        unavailable.get_or_insert_with(|| reason.clone());
                        (TxPath::Plain, PathState::Unavailable(reason))
                    }
                },
            };
            txs.push(Mutex::new(StreamTx { socket, path }));
            stats.push(StreamStats::new(state));
        }
        let announced = AtomicBool::new(false);
        if let Some(reason) = unavailable {
            tracing::info!("zero-copy send: {reason}; using plain send");
            announced.store(true, Ordering::Relaxed);
        }
        Ok(Self {
            streams: txs,
            stats,
            closers,
            mode,
            loopback,
            closed: AtomicBool::new(false),
            announced,
        })
    }

    /// What the streams have sent, and how, so far.
    pub fn send_path(&self) -> SendPathReport {
        let sum = |f: &dyn Fn(&StreamStats) -> &AtomicU64| {
            self.stats
                .iter()
                .map(|s| f(s).load(Ordering::Relaxed))
                .sum::<u64>()
        };
        SendPathReport {
            mode: self.mode,
            zero_copy_sends: sum(&|s| &s.zero_copy),
            copied_sends: sum(&|s| &s.copied),
            plain_sends: sum(&|s| &s.plain),
            syscalls: sum(&|s| &s.syscalls),
            note: self.note(),
        }
    }

    /// The report's one line.
    fn note(&self) -> String {
        let states: Vec<PathState> = self
            .stats
            .iter()
            .map(|s| s.state.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect();
        let n = states.len();
        let plural = |k: usize| if k == 1 { "stream" } else { "streams" };
        let where_ = if self.loopback { " (loopback)" } else { "" };
        let report = self.send_path_counts();
        match self.mode {
            SendMode::Copy => format!("plain send (writev) on {n} {}, as asked", plural(n)),
            SendMode::ZeroCopy => format!(
                "io_uring SEND_ZC on {n} {}, as asked: the kernel copied {}/{} sends{where_}",
                plural(n),
                report.1,
                report.0 + report.1
            ),
            SendMode::Auto => {
                let (mut switched, mut kept, mut probing) = (0usize, 0usize, 0usize);
                let (mut s_sends, mut s_copied, mut k_sends, mut k_copied) = (0, 0, 0, 0);
                let mut reasons: Vec<String> = Vec::new();
                for state in &states {
                    match state {
                        PathState::Switched { sends, copied } => {
                            switched += 1;
                            s_sends += sends;
                            s_copied += copied;
                        }
                        PathState::Kept { sends, copied } => {
                            kept += 1;
                            k_sends += sends;
                            k_copied += copied;
                        }
                        PathState::Probing => probing += 1,
                        PathState::Unavailable(r) | PathState::Refused(r) => {
                            if !reasons.contains(r) {
                                reasons.push(r.clone());
                            }
                        }
                        PathState::Copy | PathState::ZeroCopy => {}
                    }
                }
                let mut parts = Vec::new();
                let probed = switched + kept;
                if switched > 0 && kept == 0 {
                    parts.push(format!(
                        "zero-copy probed on {probed} {}: the kernel copied {s_copied}/{s_sends} sends{where_}, switched to plain send",
                        plural(probed)
                    ));
                } else if kept > 0 && switched == 0 {
                    parts.push(format!(
                        "zero-copy probed on {probed} {}: the kernel copied {k_copied}/{k_sends} sends{where_}, kept SEND_ZC",
                        plural(probed)
                    ));
                } else if probed > 0 {
                    parts.push(format!(
                        "zero-copy probed on {probed} streams: {switched} switched to plain send (the kernel copied {s_copied}/{s_sends} sends), {kept} kept SEND_ZC ({k_copied}/{k_sends} copied)"
                    ));
                }
                if probing > 0 {
                    parts.push(format!(
                        "zero-copy probing on {probing} {}: the kernel copied {}/{} sends so far",
                        plural(probing),
                        report.1,
                        report.0 + report.1
                    ));
                }
                let fallen = n - probed - probing;
                if fallen > 0 {
                    parts.push(format!(
                        "plain send on {fallen} {}: {}",
                        plural(fallen),
                        reasons.join("; ")
                    ));
                }
                if parts.is_empty() {
                    "no streams".to_string()
                } else {
                    parts.join("; ")
                }
            }
        }
    }

    /// (zero-copy sends, copied sends) over every stream.
    fn send_path_counts(&self) -> (u64, u64) {
        self.stats.iter().fold((0, 0), |(z, c), s| {
            (
                z + s.zero_copy.load(Ordering::Relaxed),
                c + s.copied.load(Ordering::Relaxed),
            )
        })
    }

    /// Puts all of `iov` on stream `stream` the way its path says, deciding an `Auto`
    /// stream's path once its probe is over.
    fn transmit(
        &self,
        stream: usize,
        tx: &mut StreamTx,
        iov: &mut [IoSlice<'_>],
    ) -> Result<(), TransportError> {
        let stats = &self.stats[stream];
        let StreamTx { socket, path } = tx;
        let io = |op, source| TransportError::Io { stream, op, source };
        match path {
            TxPath::Plain => {
                let mut calls = 0;
                let sent = write_all_plain(socket, iov, stream, &mut calls);
                stats.record_plain(calls);
                sent
            }
            TxPath::ZeroCopy(zc) => match zc.send_all(socket.as_fd(), iov, &self.closed) {
                Ok(usage) => {
                    stats.record_zc(usage);
                    Ok(())
                }
                Err(e) => {
                    stats.record_zc(e.usage);
                    Err(io(e.op, e.source))
                }
            },
            TxPath::Probing {
                zc,
                sends,
                copied,
                bytes,
            } => {
                let batch: u64 = iov.iter().map(|s| s.len() as u64).sum();
                match zc.send_all(socket.as_fd(), iov, &self.closed) {
                    Ok(usage) => {
                        stats.record_zc(usage);
                        *sends += usage.sends;
                        *copied += usage.copied;
                        *bytes += batch;
                        if *sends >= PROBE_SENDS || *bytes >= PROBE_BYTES {
                            let (sends, copied) = (*sends, *copied);
                            *path = self.decide(stream, zc_take(path), sends, copied);
                        }
                        Ok(())
                    }
                    Err(e) if e.is_unsupported() => {
                        // Not a network error: the kernel will not send zero-copy on this
                        // socket. The stream is intact up to `e.sent`; the rest goes plain.
                        stats.record_zc(e.usage);
                        let reason = format!("the kernel refused SENDMSG_ZC ({})", e.source);
                        if !self.announced.swap(true, Ordering::Relaxed) {
                            tracing::info!("zero-copy send: {reason}; using plain send");
                        }
                        stats.set_state(PathState::Refused(reason));
                        *path = TxPath::Plain;
                        let mut rest = &mut iov[..];
                        IoSlice::advance_slices(&mut rest, e.sent);
                        let mut calls = 0;
                        let sent = write_all_plain(socket, rest, stream, &mut calls);
                        stats.record_plain(calls);
                        sent
                    }
                    Err(e) => {
                        stats.record_zc(e.usage);
                        Err(io(e.op, e.source))
                    }
                }
            }
        }
    }

    /// The path of an `Auto` stream whose probe is over: plain send if the kernel copied
    /// at least half of the probe's sends (zero-copy then only adds the notification
    /// round trip and the page pinning to a copy), zero-copy otherwise.
    fn decide(&self, stream: usize, zc: ZcSender, sends: u64, copied: u64) -> TxPath {
        let switch = copied * 2 >= sends;
        let where_ = if self.loopback { " (loopback)" } else { "" };
        let first = !self.announced.swap(true, Ordering::Relaxed);
        if switch {
            if first {
                tracing::info!(
                    stream,
                    "zero-copy send: the kernel copied {copied}/{sends} probe sends{where_}; using plain send"
                );
            }
            self.stats[stream].set_state(PathState::Switched { sends, copied });
            TxPath::Plain
        } else {
            if first {
                tracing::info!(
                    stream,
                    "zero-copy send: the kernel sent {}/{sends} probe sends without copying; keeping SEND_ZC",
                    sends - copied
                );
            }
            self.stats[stream].set_state(PathState::Kept { sends, copied });
            TxPath::ZeroCopy(zc)
        }
    }
}

/// Takes the sender out of a probing path (leaving it plain for the moment).
fn zc_take(path: &mut TxPath) -> ZcSender {
    match std::mem::replace(path, TxPath::Plain) {
        TxPath::Probing { zc, .. } | TxPath::ZeroCopy(zc) => zc,
        TxPath::Plain => unreachable!("only a probing path is decided"),
    }
}

impl SourceTransport for TcpSource {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn streams(&self) -> usize {
        self.streams.len()
    }

    fn send(
        &self,
        stream: usize,
        memory: &GuestMemory,
        frames: &[Frame],
    ) -> Result<u64, TransportError> {
        let tx = self
            .streams
            .get(stream)
            .ok_or(TransportError::NoSuchStream {
                stream,
                streams: self.streams.len(),
            })?;
        let mut tx = tx.lock().map_err(|_| TransportError::Shutdown)?;
        // Nothing goes out unless every frame is this stream's.
        for frame in frames {
            if let Frame::Pages { first, count, .. } | Frame::ZeroPages { first, count, .. } =
                *frame
            {
                check_owner(stream, self.streams.len(), first, count)?;
            }
        }
        // Header buffers live until this call returns, which is after the kernel is done
        // with them in every mode (zero-copy waits for its notifications).
        let headers: Vec<[u8; FRAME_HEADER_LEN]> = frames.iter().map(Frame::encode).collect();
        // Fault injection: the first page frame of this batch goes out with a byte flipped
        // in a copy of its payload (guest memory and the source's hashes stay right).
        #[cfg(feature = "failpoints")]
        let corrupted = frames
            .iter()
            .find_map(|f| match *f {
                Frame::Pages { first, count, .. } => Some((first, count)),
                _ => None,
            })
            .filter(|_| crate::failpoint::take_corruption())
            .map(|(first, count)| {
                let payload = memory.pages_slice(first as usize, count as usize);
                (first, crate::failpoint::corrupted_copy(payload))
            });
        // One gather list for the batch: header and payload of each frame as separate
        // slices, payload straight from guest memory.
        let mut iov: Vec<IoSlice<'_>> = Vec::with_capacity(2 * frames.len());
        for (frame, header) in frames.iter().zip(&headers) {
            iov.push(IoSlice::new(header));
            if let Frame::Pages { first, count, .. } = *frame {
                let payload = memory.pages_slice(first as usize, count as usize);
                #[cfg(feature = "failpoints")]
                let payload = match &corrupted {
                    Some((at, copy)) if *at == first => copy.as_slice(),
                    _ => payload,
                };
                iov.push(IoSlice::new(payload));
            }
        }
        let total: u64 = iov.iter().map(|s| s.len() as u64).sum();
        self.transmit(stream, &mut tx, &mut iov)?;
        Ok(total)
    }

    fn shutdown(&self) {
        self.closed.store(true, Ordering::Relaxed);
        for s in &self.closers {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// Writes every slice of `iov` with `writev`, at most [`IOVECS_PER_WRITE`] slices a call
/// (`iov` is consumed), counting the calls in `calls`.
fn write_all_plain(
    socket: &mut TcpStream,
    iov: &mut [IoSlice<'_>],
    stream: usize,
    calls: &mut u64,
) -> Result<(), TransportError> {
    let error = |source| TransportError::Io {
        stream,
        op: "sending pages",
        source,
    };
    for chunk in iov.chunks_mut(IOVECS_PER_WRITE) {
        let mut slices = chunk;
        while !slices.is_empty() {
            *calls += 1;
            match socket.write_vectored(slices) {
                Ok(0) => return Err(error(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => IoSlice::advance_slices(&mut slices, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => return Err(error(source)),
            }
        }
    }
    Ok(())
}

/// Destination half over N TCP streams.
pub struct TcpDestination {
    streams: Vec<Option<TcpStream>>,
    closers: Vec<TcpStream>,
    receivers: Vec<JoinHandle<()>>,
}

impl TcpDestination {
    /// Takes accepted streams; stream `i` must be the source's stream `i`.
    pub fn new(streams: Vec<TcpStream>) -> Result<Self, TransportError> {
        let closers = prepare(&streams, 0)?;
        Ok(Self {
            streams: streams.into_iter().map(Some).collect(),
            closers,
            receivers: Vec::new(),
        })
    }
}

impl DestinationTransport for TcpDestination {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn streams(&self) -> usize {
        self.streams.len()
    }

    fn start(
        &mut self,
        memory: Arc<GuestMemory>,
        digest: Arc<MemoryDigest>,
        events: Sender<ReceiveEvent>,
    ) -> Result<(), TransportError> {
        let streams = self.streams.len();
        for (index, slot) in self.streams.iter_mut().enumerate() {
            let Some(socket) = slot.take() else {
                return Err(TransportError::Shutdown);
            };
            let receiver = StreamReceiver {
                index,
                streams,
                memory: Arc::clone(&memory),
                digest: Arc::clone(&digest),
                limits: FrameLimits::for_pages(memory.pages() as u64),
            };
            let handle = spawn_receiver(
                format!("ferry-rx-{index}"),
                index,
                events.clone(),
                move |events| receiver.run(socket, events),
            )?;
            self.receivers.push(handle);
        }
        Ok(())
    }

    fn shutdown(&mut self) {
        stop(&self.closers, &mut self.receivers);
    }
}

impl Drop for TcpDestination {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// One receiving stream: lands frames in guest memory and keeps the digest.
struct StreamReceiver {
    index: usize,
    streams: usize,
    memory: Arc<GuestMemory>,
    digest: Arc<MemoryDigest>,
    limits: FrameLimits,
}

impl StreamReceiver {
    fn run(
        &self,
        mut socket: TcpStream,
        events: &Sender<ReceiveEvent>,
    ) -> Result<(), TransportError> {
        let stream = self.index;
        let wire = |source: WireError| TransportError::Wire { stream, source };
        let io = |source: std::io::Error| TransportError::Io {
            stream,
            op: "receiving pages",
            source,
        };
        let mut staging = Staging::new();
        // Read ahead past the next header: after small frames, which come in long runs.
        let mut greedy = false;
        let mut ledger = StreamLedger::new(stream, self.streams);
        loop {
            while staging.len() < FRAME_HEADER_LEN {
                let have = staging.len();
                let want = if greedy {
                    STAGING_BYTES
                } else {
                    FRAME_HEADER_LEN - have
                };
                match socket.read(staging.spare(want)) {
                    // A clean close between frames is how the source ends the migration.
                    Ok(0) if staging.is_empty() => return Ok(()),
                    Ok(0) => {
                        return Err(wire(WireError::Truncated {
                            what: "frame header",
                            got: have,
                            want: FRAME_HEADER_LEN,
                        }))
                    }
                    Ok(n) => staging.filled(n),
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(io(e)),
                }
            }
            let frame =
                Frame::decode(&staging.staged()[..FRAME_HEADER_LEN], &self.limits).map_err(wire)?;
            staging.consume(FRAME_HEADER_LEN);
            ledger.admit(&frame)?;
            match frame {
                Frame::Pages { first, count, .. } => {
                    let (first, count) = (first as usize, count as usize);
                    greedy = count <= SMALL_FRAME_PAGES;
                    // SAFETY: check_owner proved these pages belong to this stream's blocks, and
                    // each stream has exactly one receiver thread, so no other reference to
                    // these pages exists while the slice lives; no vCPU runs on the destination
                    // before the switch-over.
                    let dst = unsafe { self.memory.pages_slice_mut(first, count) };
                    let want = dst.len();
                    // What was read ahead first, copied from cache; then the rest straight
                    // into place, in RECEIVE_CHUNK pieces, each page hashed as soon as it is
                    // complete, while the bytes the kernel just copied are still in cache
                    // (hashing a whole frame after its last byte read it back from DRAM).
                    let mut got = staging.len().min(want);
                    dst[..got].copy_from_slice(&staging.staged()[..got]);
                    staging.consume(got);
                    let mut hashed = 0usize;
                    let mut delta = 0u64;
                    loop {
                        while hashed < got / PAGE_SIZE {
                            let bytes = &dst[hashed * PAGE_SIZE..(hashed + 1) * PAGE_SIZE];
                            delta = delta
                                .wrapping_add(self.digest.record(first + hashed, page_hash(bytes)));
                            hashed += 1;
                        }
                        if got == want {
                            break;
                        }
                        // The staged bytes were all payload, so the buffer is empty here: the
                        // last piece also reads the next header (and more after a small frame).
                        let end = (got + RECEIVE_CHUNK).min(want);
                        let tail: &mut [u8] = if end == want {
                            staging.spare(if greedy {
                                STAGING_BYTES
                            } else {
                                FRAME_HEADER_LEN
                            })
                        } else {
                            &mut []
                        };
                        let mut bufs = [IoSliceMut::new(&mut dst[got..end]), IoSliceMut::new(tail)];
                        match socket.read_vectored(&mut bufs) {
                            Ok(0) => {
                                return Err(wire(WireError::Truncated {
                                    what: "page payload",
                                    got,
                                    want,
                                }))
                            }
                            Ok(n) => {
                                let into_payload = n.min(end - got);
                                got += into_payload;
                                staging.filled(n - into_payload);
                            }
                            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                            Err(e) => return Err(io(e)),
                        }
                    }
                    self.digest.apply(delta);
                    ledger.landed(count as u32);
                }
                Frame::ZeroPages { first, count, .. } => {
                    ledger.land_zero(&self.memory, &self.digest, first, count);
                }
                Frame::RoundEnd { round, pages } => {
                    if ledger.round_end(round, pages, events)? == Next::Stop {
                        return Ok(()); // the engine is gone; nothing left to report to
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transport::{stream_for_page, BLOCK_PAGES};
    use crossbeam_channel::Receiver;
    use std::net::TcpListener;
    use std::time::Duration;

    /// `count` connected loopback pairs: (source ends, destination ends).
    fn pairs(count: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        (0..count)
            .map(|_| {
                let a = TcpStream::connect(addr).unwrap();
                (a, listener.accept().unwrap().0)
            })
            .unzip()
    }

    /// Page `p` of the test memories is zero when `p % 7 == 3`, else stamped with `p`.
    fn page_content(p: usize) -> [u8; PAGE_SIZE] {
        let mut page = [0u8; PAGE_SIZE];
        if p % 7 != 3 {
            for (i, chunk) in page.chunks_mut(8).enumerate() {
                chunk.copy_from_slice(&((p as u64) << 20 | i as u64).to_le_bytes());
            }
        }
        page
    }

    fn source_memory(pages: usize) -> GuestMemory {
        let memory = GuestMemory::new("tcp-test-source", (pages * PAGE_SIZE) as u64).unwrap();
        for p in 0..pages {
            memory.write_page(p, &page_content(p));
        }
        memory
    }

    /// Every page of every block of `stream`, as frames of three shapes by block: the whole
    /// block in one frame; one frame per page (zero pages as markers); runs of 5 pages.
    fn frames_of(stream: usize, streams: usize, pages: usize, round: u32) -> Vec<Frame> {
        let mut frames = Vec::new();
        for block in (0..pages.div_ceil(BLOCK_PAGES)).filter(|&b| b % streams == stream) {
            let start = block * BLOCK_PAGES;
            let end = (start + BLOCK_PAGES).min(pages);
            assert_eq!(stream_for_page(start, streams), stream);
            match block % 3 {
                0 => frames.push(Frame::Pages {
                    round,
                    first: start as u64,
                    count: (end - start) as u32,
                }),
                1 => frames.extend((start..end).map(|p| {
                    let (first, count) = (p as u64, 1);
                    if p % 7 == 3 {
                        Frame::ZeroPages {
                            round,
                            first,
                            count,
                        }
                    } else {
                        Frame::Pages {
                            round,
                            first,
                            count,
                        }
                    }
                })),
                _ => frames.extend((start..end).step_by(5).map(|p| Frame::Pages {
                    round,
                    first: p as u64,
                    count: 5.min(end - p) as u32,
                })),
            }
        }
        frames
    }

    fn pages_in(frames: &[Frame]) -> u64 {
        frames
            .iter()
            .map(|f| match *f {
                Frame::Pages { count, .. } | Frame::ZeroPages { count, .. } => count as u64,
                Frame::RoundEnd { .. } => 0,
            })
            .sum()
    }

    /// The real receiving half, landing into memory first filled with 0xAA.
    struct Receiving {
        _destination: TcpDestination,
        memory: Arc<GuestMemory>,
        digest: Arc<MemoryDigest>,
        events: Receiver<ReceiveEvent>,
    }

    fn receive(streams: Vec<TcpStream>, pages: usize) -> Receiving {
        let memory =
            Arc::new(GuestMemory::new("tcp-test-destination", (pages * PAGE_SIZE) as u64).unwrap());
        for p in 0..pages {
            memory.write_page(p, &[0xAA; PAGE_SIZE]);
        }
        let digest = Arc::new(MemoryDigest::new_zeroed(pages));
        let (tx, events) = crossbeam_channel::unbounded();
        let mut destination = TcpDestination::new(streams).unwrap();
        destination
            .start(Arc::clone(&memory), Arc::clone(&digest), tx)
            .unwrap();
        Receiving {
            _destination: destination,
            memory,
            digest,
            events,
        }
    }

    impl Receiving {
        /// Waits for every stream to end `round`.
        fn round_ends(&self, streams: usize, round: u32) {
            let mut ended = vec![false; streams];
            while ended.iter().any(|e| !e) {
                match self.events.recv_timeout(Duration::from_secs(60)) {
                    Ok(ReceiveEvent::RoundEnd {
                        stream, round: r, ..
                    }) if r == round => ended[stream] = true,
                    Ok(other) => panic!("unexpected event {other:?}"),
                    Err(e) => panic!("no round end within 60 s: {e}"),
                }
            }
        }

        /// Every page equal, and the receivers' digest equal to the source memory's.
        fn assert_same_as(&self, source: &GuestMemory) {
            let expected = MemoryDigest::new_zeroed(source.pages());
            for p in 0..source.pages() {
                assert!(
                    self.memory.page(p) == source.page(p),
                    "page {p} differs at the destination"
                );
                expected.record_now(p, page_hash(source.page(p)));
            }
            assert_eq!(self.digest.value(), expected.value(), "digests differ");
        }
    }

    /// Sends round `round` of all of `memory` on every stream at once (a thread each, as
    /// the engine does), in batches of `batch` frames; returns the number of send calls.
    fn send_round(source: &TcpSource, memory: &GuestMemory, round: u32, batch: usize) -> u64 {
        let streams = source.streams();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..streams)
                .map(|stream| {
                    s.spawn(move || {
                        let frames = frames_of(stream, streams, memory.pages(), round);
                        let mut calls = 0;
                        for chunk in frames.chunks(batch) {
                            source.send(stream, memory, chunk).unwrap();
                            calls += 1;
                        }
                        let end = Frame::RoundEnd {
                            round,
                            pages: pages_in(&frames),
                        };
                        source.send(stream, memory, &[end]).unwrap();
                        calls + 1
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        })
    }

    #[test]
    fn every_mode_lands_exactly_the_bytes() {
        let pages = 24 * BLOCK_PAGES + 17; // 24 MiB and a partial block
        let memory = source_memory(pages);
        for mode in SendMode::ALL {
            let (tx, rx) = pairs(2);
            let receiving = receive(rx, pages);
            let source = TcpSource::with_send_mode(tx, mode).unwrap();
            let mut batches = 0;
            for round in 0..2 {
                batches += send_round(&source, &memory, round, 64);
                receiving.round_ends(2, round);
            }
            receiving.assert_same_as(&memory);
            let report = source.send_path();
            assert_eq!(report.mode, mode);
            let zc = report.zero_copy_sends + report.copied_sends;
            match mode {
                SendMode::Copy => {
                    assert_eq!(zc, 0, "{report:?}");
                    assert!(report.plain_sends >= batches, "{report:?}");
                    assert_eq!(report.syscalls, report.plain_sends);
                }
                SendMode::ZeroCopy => {
                    // One SENDMSG_ZC (and notification) per batch: none has 1024 iovecs.
                    assert_eq!(zc, batches, "{report:?}");
                    assert_eq!(report.plain_sends, 0, "{report:?}");
                    assert!(report.syscalls >= batches, "{report:?}");
                }
                SendMode::Auto => {
                    // Loopback: the kernel copies every zero-copy send, and each stream
                    // switches after its probe (PROBE_SENDS sends or PROBE_BYTES).
                    assert!((2..=2 * PROBE_SENDS).contains(&zc), "{report:?}");
                    assert!(report.copied_sends * 2 >= zc, "{report:?}");
                    assert!(report.copied_sends > 0, "{report:?}");
                    // A short `writev` is resumed by another call.
                    assert!(report.plain_sends + zc >= batches, "{report:?}");
                    assert!(report.plain_sends > 0, "{report:?}");
                    assert!(
                        report.note.contains("switched to plain send")
                            && report.note.contains("(loopback)"),
                        "{}",
                        report.note
                    );
                }
            }
            eprintln!("{mode}: {report:?}");
        }
    }

    #[test]
    fn a_batch_of_thousands_of_iovecs_and_many_mib_lands_whole() {
        // 64 MiB on one stream in one send call: 1 MiB frames and single-page frames,
        // some 16,000 iovecs, so zero-copy needs several requests in two chains, and the
        // socket buffer fills many times over (the kernel finishes short sends).
        let pages = 64 * BLOCK_PAGES;
        let memory = source_memory(pages);
        for mode in [SendMode::ZeroCopy, SendMode::Copy, SendMode::Auto] {
            let (tx, rx) = pairs(1);
            let receiving = receive(rx, pages);
            let source = TcpSource::with_send_mode(tx, mode).unwrap();
            let frames = frames_of(0, 1, pages, 0);
            let iovecs = frames.len()
                + frames
                    .iter()
                    .filter(|f| matches!(f, Frame::Pages { .. }))
                    .count();
            assert!(iovecs > 8 * send_zc::IOVECS_PER_MSG, "{iovecs} iovecs");
            let sent = source.send(0, &memory, &frames).unwrap();
            let payload: u64 = frames.iter().map(|f| f.payload_len() as u64).sum();
            assert_eq!(sent, payload + (frames.len() * FRAME_HEADER_LEN) as u64);
            let end = Frame::RoundEnd {
                round: 0,
                pages: pages_in(&frames),
            };
            source.send(0, &memory, &[end]).unwrap();
            receiving.round_ends(1, 0);
            receiving.assert_same_as(&memory);
            let report = source.send_path();
            if mode == SendMode::ZeroCopy {
                let requests = iovecs.div_ceil(send_zc::IOVECS_PER_MSG) as u64 + 1;
                assert_eq!(report.zero_copy_sends + report.copied_sends, requests);
            }
            eprintln!("{mode}: {iovecs} iovecs: {report:?}");
        }
    }

    #[test]
    fn a_peer_that_closes_mid_send_is_an_error_not_a_hang() {
        let pages = 64 * BLOCK_PAGES;
        let memory = Arc::new(source_memory(pages));
        for mode in SendMode::ALL {
            let (mut tx, mut rx) = pairs(1);
            let source = Arc::new(TcpSource::with_send_mode(vec![tx.remove(0)], mode).unwrap());
            let mut peer = rx.remove(0);
            let frames = frames_of(0, 1, pages, 0);
            let (done, outcome) = crossbeam_channel::bounded(1);
            let sender = {
                let (source, memory) = (Arc::clone(&source), Arc::clone(&memory));
                std::thread::spawn(move || {
                    // Each call is 64 frames; the peer goes away during the first calls.
                    let mut result = Ok(0);
                    for chunk in frames.chunks(64) {
                        result = source.send(0, &memory, chunk);
                        if result.is_err() {
                            break;
                        }
                    }
                    let _ = done.send(result);
                })
            };
            let mut buf = vec![0u8; 1 << 20];
            peer.read_exact(&mut buf).unwrap();
            drop(peer); // unread data: the kernel resets the connection
            match outcome.recv_timeout(Duration::from_secs(30)) {
                Ok(Err(TransportError::Io { stream: 0, op, .. })) => {
                    assert!(op.contains("sending"), "{mode}: {op}")
                }
                Ok(other) => panic!("{mode}: {other:?}"),
                Err(_) => panic!("{mode}: send still blocked 30 s after the peer closed"),
            }
            sender.join().unwrap();
        }
    }

    #[test]
    fn shutdown_wakes_a_sender_blocked_on_a_peer_that_stopped_reading() {
        let pages = 64 * BLOCK_PAGES;
        let memory = Arc::new(source_memory(pages));
        for mode in SendMode::ALL {
            let (mut tx, rx) = pairs(1);
            let source = Arc::new(TcpSource::with_send_mode(vec![tx.remove(0)], mode).unwrap());
            let frames = frames_of(0, 1, pages, 0);
            let (done, outcome) = crossbeam_channel::bounded(1);
            let sender = {
                let (source, memory) = (Arc::clone(&source), Arc::clone(&memory));
                std::thread::spawn(move || {
                    let _ = done.send(source.send(0, &memory, &frames));
                })
            };
            // 64 MiB do not fit in the socket buffers of a peer that reads nothing.
            assert!(outcome.recv_timeout(Duration::from_millis(500)).is_err());
            source.shutdown();
            match outcome.recv_timeout(Duration::from_secs(30)) {
                Ok(Err(TransportError::Io { .. })) => {}
                Ok(other) => panic!("{mode}: {other:?}"),
                Err(_) => panic!("{mode}: send still blocked 30 s after shutdown"),
            }
            sender.join().unwrap();
            // A zero-copy stream whose wait was abandoned refuses further sends.
            match source.send(0, &memory, &frames_of(0, 1, 256, 0)[..1]) {
                Err(TransportError::Io { source, .. }) if mode != SendMode::Copy => {
                    assert_eq!(source.kind(), std::io::ErrorKind::NotConnected, "{mode}")
                }
                Err(TransportError::Io { .. }) => {}
                other => panic!("{mode}: {other:?}"),
            }
            drop(rx);
        }
    }

    #[test]
    fn send_modes_parse_print_and_serialize_in_lowercase() {
        use serde::de::value::{Error, StrDeserializer};
        use serde::de::IntoDeserializer;
        for mode in SendMode::ALL {
            assert_eq!(mode.to_string().parse::<SendMode>().unwrap(), mode);
            let name: StrDeserializer<'_, Error> = mode.as_str().into_deserializer();
            assert_eq!(SendMode::deserialize(name).unwrap(), mode);
        }
        assert_eq!(SendMode::default(), SendMode::Auto);
        assert!("zero-copy".parse::<SendMode>().is_err());
        let report = SendPathReport {
            mode: SendMode::ZeroCopy,
            copied_sends: 3,
            note: "n".into(),
            ..SendPathReport::default()
        };
        let bytes = postcard::to_stdvec(&report).unwrap();
        assert_eq!(
            postcard::from_bytes::<SendPathReport>(&bytes).unwrap(),
            report
        );
    }
}
