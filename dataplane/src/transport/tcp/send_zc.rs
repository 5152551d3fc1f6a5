//! io_uring zero-copy send for one TCP stream: the gather list the plain path would hand to
//! `writev` goes to the kernel as `IORING_OP_SENDMSG_ZC` requests instead, and the kernel
//! sends from those pages without copying them into socket buffers.
//!
//! # Requests and notifications
//!
//! A zero-copy request completes twice: its CQE says how many bytes went into the socket
//! (with `IORING_CQE_F_MORE` set when a notification follows), and a second CQE, flagged
//! `IORING_CQE_F_NOTIF`, says when the kernel no longer needs the pages (the data was
//! acknowledged, or copied). With `IORING_SEND_ZC_REPORT_USAGE` set on the request, the
//! notification's result has `IORING_NOTIF_USAGE_ZC_COPIED` set if the kernel had to copy
//! after all: always on loopback, where the receiving socket cannot keep the sender's pages.
//! [`ZcSender::send_all`] counts both outcomes, which is how the transport's `Auto` mode
//! decides whether zero-copy pays on this path.
//!
//! # Ownership of memory the kernel uses
//!
//! `send_all` returns only when every request it queued has completed *and* every
//! notification has arrived, so the engine's synchronous `send` contract holds: when the
//! call returns, the kernel holds nothing of the caller's — not the frame headers, not the
//! guest pages, not the `iovec`/`msghdr` arrays built for the call. (Waiting for the
//! notification costs, on a real network, the time until the peer acknowledges the batch;
//! see the transport's module documentation.)
//!
//! The one exception is a transport shut down while notifications are outstanding (a peer
//! that stopped acknowledging): the wait then gives up, and the sender refuses any further
//! send. That is still sound: every request has completed, so the kernel no longer reads
//! the arrays, and it holds references to the pages it still transmits from, so nothing is
//! freed under it; at worst the aborted stream carries bytes changed since.
//!
//! # Requests of one call
//!
//! The gather list is cut into spans of at most [`IOVECS_PER_MSG`] iovecs (the kernel's
//! `UIO_MAXIOV`), one request each, queued as one chain (`IOSQE_IO_LINK`) so the kernel runs
//! them in order: two requests on one stream in flight unlinked could interleave their
//! bytes. `MSG_WAITALL` makes the kernel finish a request whose send was cut short by a full
//! socket buffer itself; a request that still ends short (an error after part of it was
//! sent) breaks the chain, the kernel cancels the rest (`ECANCELED`), and the sender
//! resubmits from the first unsent byte.

use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use io_uring::types::{SubmitArgs, Timespec};
use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

/// `IORING_SEND_ZC_REPORT_USAGE` (in a zero-copy request's `ioprio`): the notification
/// reports whether the kernel copied the data after all.
const SEND_ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED`: set in a notification's result (with
/// [`SEND_ZC_REPORT_USAGE`]) when the kernel copied some of the request's bytes.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;
/// iovecs per `SENDMSG_ZC` request: the kernel's `UIO_MAXIOV`.
pub(super) const IOVECS_PER_MSG: usize = 1024;
/// Bound on resubmissions in one call after a request failed with EINTR or EAGAIN.
const REQUEUES_MAX: u32 = 16;
/// Bound on consecutive `io_uring_enter` calls failing with EINTR, EAGAIN or EBUSY.
const ENTER_RETRIES_MAX: u32 = 10_000;
/// How often a wait for notifications checks whether the transport was shut down.
const NOTIFICATION_POLL: Duration = Duration::from_millis(100);

/// How a call's gather list becomes requests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Shape {
    /// One `SENDMSG_ZC` per [`IOVECS_PER_MSG`] iovecs: a batch is normally one request.
    MessagePerBatch,
    /// One `SEND_ZC` per slice, chained (a frame header is a request of its own). Kept to
    /// measure against [`Shape::MessagePerBatch`]: it loses (see the transport's docs).
    #[cfg_attr(not(test), allow(dead_code))]
    SendPerSlice,
}

impl Shape {
    /// Requests one chain may hold, which is also the ring's size: with a notification
    /// each, the completion queue (twice the ring) holds every CQE of a chain.
    fn chain_max(self) -> usize {
        match self {
            Shape::MessagePerBatch => 8,
            Shape::SendPerSlice => 128,
        }
    }

    fn iovecs_per_request(self) -> usize {
        match self {
            Shape::MessagePerBatch => IOVECS_PER_MSG,
            Shape::SendPerSlice => 1,
        }
    }
}

/// What one [`ZcSender::send_all`] call did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Usage {
    /// Requests whose notification arrived (each a send of its own).
    pub(super) sends: u64,
    /// Of those, the ones the kernel reported it copied.
    pub(super) copied: u64,
    /// `io_uring_enter` calls made.
    pub(super) enters: u64,
}

/// A call that did not send everything.
#[derive(Debug)]
pub(super) struct ZcError {
    /// Bytes from the start of the gather list known to be on the wire (the stream is
    /// consistent up to there: a caller may go on from that byte some other way).
    pub(super) sent: usize,
    /// What was asked so far: the sends made before the failure count too.
    pub(super) usage: Usage,
    pub(super) op: &'static str,
    pub(super) source: io::Error,
}

impl ZcError {
    /// The kernel refused zero-copy send on this socket or ring (not a network error): a
    /// caller in `Auto` mode goes on with plain send.
    pub(super) fn is_unsupported(&self) -> bool {
        matches!(
            self.source.raw_os_error(),
            Some(libc::EINVAL | libc::EOPNOTSUPP | libc::ENOSYS)
        )
    }
}

/// One request of the chain in flight.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    /// Bytes the request asks to send.
    expected: usize,
    /// Its completion's result, once reaped.
    res: Option<i32>,
    /// Its completion said a notification follows (`IORING_CQE_F_MORE`).
    more: bool,
    /// Its notification arrived: whether the kernel copied.
    notified: Option<bool>,
}

impl Slot {
    fn waiting_for_notification(&self) -> bool {
        self.more && self.notified.is_none()
    }
}

/// A small io_uring sending on one stream, used by one thread at a time.
pub(super) struct ZcSender {
    ring: IoUring,
    shape: Shape,
    /// Tags the user_data of a chain's requests: a CQE of another chain is a bug.
    generation: u64,
    /// A wait for notifications was abandoned: the kernel may post CQEs of an old chain,
    /// so the ring is not used again.
    abandoned: bool,
}

impl std::fmt::Debug for ZcSender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ZcSender")
            .field("shape", &self.shape)
            .field("abandoned", &self.abandoned)
            .finish()
    }
}

impl ZcSender {
    /// A ring for one stream; fails (with the reason) when the kernel lacks io_uring or
    /// the zero-copy send opcode the shape needs.
    pub(super) fn new(shape: Shape) -> io::Result<Self> {
        let ring = IoUring::new(shape.chain_max() as u32)?;
        let mut probe = Probe::new();
        ring.submitter().register_probe(&mut probe)?;
        let (code, name) = match shape {
            Shape::MessagePerBatch => (opcode::SendMsgZc::CODE, "IORING_OP_SENDMSG_ZC"),
            Shape::SendPerSlice => (opcode::SendZc::CODE, "IORING_OP_SEND_ZC"),
        };
        if !probe.is_supported(code) {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("this kernel's io_uring has no {name} (Linux 6.1 or later has)"),
            ));
        }
        Ok(Self {
            ring,
            shape,
            generation: 0,
            abandoned: false,
        })
    }

    /// Sends every byte of `slices`, in order, on `socket`, and returns once the kernel
    /// is done with all of them (see the module docs). `closed` is the transport's
    /// shutdown flag: once set, a wait for notifications gives up.
    pub(super) fn send_all(
        &mut self,
        socket: BorrowedFd<'_>,
        slices: &[IoSlice<'_>],
        closed: &AtomicBool,
    ) -> Result<Usage, ZcError> {
        let mut usage = Usage::default();
        if self.abandoned {
            return Err(ZcError {
                sent: 0,
                usage,
                op: "sending pages (io_uring SEND_ZC)",
                source: io::Error::new(
                    io::ErrorKind::NotConnected,
                    "an earlier send on this stream was abandoned at shutdown",
                ),
            });
        }
        // The kernel reads these arrays until each request's CQE: they live (unmoved, on
        // the heap) until the end of the call, or are leaked if it cannot wait.
        let mut iov: Vec<libc::iovec> = slices
            .iter()
            .filter(|s| !s.is_empty())
            .map(|s| libc::iovec {
                iov_base: s.as_ptr() as *mut libc::c_void,
                iov_len: s.len(),
            })
            .collect();
        let chain_max = self.shape.chain_max();
        // SAFETY: all-zero bytes are a valid msghdr (null pointers, zero lengths).
        let mut msgs: Vec<libc::msghdr> = vec![unsafe { std::mem::zeroed() }; chain_max];
        let mut slots = vec![Slot::default(); chain_max];
        let mut cursor = 0usize; // first iovec not (wholly) sent
        let mut sent = 0usize;
        let mut requeues = 0u32;
        let fail = |sent, usage, op, source| ZcError {
            sent,
            usage,
            op,
            source,
        };
        while cursor < iov.len() {
            // Queue the chain: spans of the gather list from the cursor.
            self.generation += 1;
            let per_request = self.shape.iovecs_per_request();
            let mut spans = 0usize;
            let mut at = cursor;
            while at < iov.len() && spans < chain_max {
                let end = (at + per_request).min(iov.len());
                slots[spans] = Slot {
                    expected: iov[at..end].iter().map(|v| v.iov_len).sum(),
                    ..Slot::default()
                };
                let last = end == iov.len() || spans + 1 == chain_max;
                let entry = self.entry(socket, &iov[at..end], &mut msgs[spans], spans, last);
                // SAFETY: the entry names `iov[at..end]` (and, for SENDMSG_ZC, the msghdr
                // `msgs[spans]` pointing at them), and through them the caller's slices.
                // All stay valid and unchanged until the request's CQE has been reaped:
                // `iov` and `msgs` are neither resized nor written while the chain is in
                // flight (`wait_chain` returns only when every CQE is in, and leaks both
                // if it cannot wait), and the slices are borrowed for the whole call. The
                // socket descriptor is borrowed for the call too.
                if unsafe { self.ring.submission().push(&entry) }.is_err() {
                    // The ring has `chain_max` entries and is empty between chains.
                    unreachable!("a chain fits the submission queue");
                }
                spans += 1;
                at = end;
            }
            let waited = self.wait_chain(&mut slots[..spans], &mut usage, closed);
            if let Err((op, source, in_kernel)) = waited {
                if in_kernel {
                    // The kernel may still read the arrays: they must never be freed.
                    std::mem::forget(std::mem::take(&mut iov));
                    std::mem::forget(std::mem::take(&mut msgs));
                }
                return Err(fail(sent, usage, op, source));
            }
            // The requests ran in order; the first that did not send all it asked for
            // broke the chain and the kernel cancelled the ones after it.
            let mut broken: Option<i32> = None;
            for slot in &slots[..spans] {
                let res = slot.res.expect("wait_chain reaped every request");
                if let Some(first) = broken {
                    if res > 0 {
                        return Err(fail(
                            sent,
                            usage,
                            "sending pages (io_uring SEND_ZC)",
                            io::Error::other(format!(
                                "a linked send went on after one that ended with {first}: \
                                 the stream's bytes are out of order"
                            )),
                        ));
                    }
                    continue;
                }
                if res >= 0 && res as usize == slot.expected {
                    sent += slot.expected;
                    cursor = advance(&mut iov, cursor, slot.expected);
                    continue;
                }
                if res as usize > slot.expected && res > 0 {
                    return Err(fail(
                        sent,
                        usage,
                        "sending pages (io_uring SEND_ZC)",
                        io::Error::other("the kernel reported more bytes sent than asked"),
                    ));
                }
                if res > 0 {
                    // Short: go on from the first unsent byte.
                    sent += res as usize;
                    cursor = advance(&mut iov, cursor, res as usize);
                }
                broken = Some(res);
            }
            match broken {
                None => {}
                Some(res) if res > 0 => {}
                Some(0) => {
                    return Err(fail(
                        sent,
                        usage,
                        "sending pages (io_uring SEND_ZC)",
                        io::ErrorKind::WriteZero.into(),
                    ))
                }
                Some(res)
                    if (res == -libc::EINTR || res == -libc::EAGAIN) && requeues < REQUEUES_MAX =>
                {
                    requeues += 1;
                }
                Some(res) => {
                    return Err(fail(
                        sent,
                        usage,
                        "sending pages (io_uring SEND_ZC)",
                        io::Error::from_raw_os_error(-res),
                    ))
                }
            }
            if closed.load(Ordering::Relaxed) && cursor < iov.len() {
                return Err(fail(
                    sent,
                    usage,
                    "sending pages (io_uring SEND_ZC)",
                    io::Error::new(io::ErrorKind::NotConnected, "the transport was shut down"),
                ));
            }
        }
        Ok(usage)
    }

    /// The request sending `iov` (request `index` of the chain; linked to the next unless
    /// `last`). For SENDMSG_ZC, `msg` is filled to point at `iov`.
    fn entry(
        &self,
        socket: BorrowedFd<'_>,
        iov: &[libc::iovec],
        msg: &mut libc::msghdr,
        index: usize,
        last: bool,
    ) -> squeue::Entry {
        let fd = types::Fd(socket.as_raw_fd());
        // MSG_WAITALL: the kernel itself finishes a send cut short by a full buffer.
        // MSG_NOSIGNAL: a closed peer is an EPIPE result, not a signal.
        let flags = libc::MSG_WAITALL | libc::MSG_NOSIGNAL;
        let entry = match self.shape {
            Shape::MessagePerBatch => {
                msg.msg_iov = iov.as_ptr() as *mut libc::iovec;
                msg.msg_iovlen = iov.len();
                opcode::SendMsgZc::new(fd, msg as *const libc::msghdr)
                    .ioprio(SEND_ZC_REPORT_USAGE)
                    .flags(flags as u32)
                    .build()
            }
            Shape::SendPerSlice => {
                let len = u32::try_from(iov[0].iov_len).expect("slices are at most 1 MiB");
                opcode::SendZc::new(fd, iov[0].iov_base as *const u8, len)
                    .flags(flags)
                    .zc_flags(SEND_ZC_REPORT_USAGE)
                    .build()
            }
        };
        let entry = entry.user_data((self.generation << 8) | index as u64);
        if last {
            entry
        } else {
            entry.flags(squeue::Flags::IO_LINK)
        }
    }

    /// Submits the queued chain and waits for every request's CQE and every notification
    /// announced. On error, says whether requests may still be in the kernel.
    fn wait_chain(
        &mut self,
        slots: &mut [Slot],
        usage: &mut Usage,
        closed: &AtomicBool,
    ) -> Result<(), (&'static str, io::Error, bool)> {
        let mut retries = 0u32;
        loop {
            self.reap(slots, usage);
            let requests = slots.iter().filter(|s| s.res.is_none()).count();
            let notifications = slots
                .iter()
                .filter(|s| s.waiting_for_notification())
                .count();
            if requests + notifications == 0 {
                return Ok(());
            }
            // Wait for everything outstanding in one call: a request still in the kernel
            // normally brings a notification too (only one that fails before it sends
            // anything does not), so count one each. Should that overshoot, the timeout
            // ends the wait and the next count is exact.
            let want = 2 * requests + notifications;
            usage.enters += 1;
            let timeout = Timespec::from(NOTIFICATION_POLL);
            let args = SubmitArgs::new().timespec(&timeout);
            match self.ring.submitter().submit_with_args(want, &args) {
                Ok(_) => retries = 0,
                Err(e) if e.raw_os_error() == Some(libc::ETIME) => {
                    // Requests end by themselves (a shut-down socket fails them) and must
                    // be waited for; a notification waits for the peer's acknowledgement,
                    // which may never come once the transport is shut down.
                    if requests == 0 && closed.load(Ordering::Relaxed) {
                        self.abandoned = true;
                        return Err((
                            "waiting for zero-copy notifications",
                            io::Error::new(
                                io::ErrorKind::NotConnected,
                                "the transport was shut down with sends unacknowledged",
                            ),
                            false,
                        ));
                    }
                }
                Err(e) if is_retryable(&e) && retries < ENTER_RETRIES_MAX => retries += 1,
                Err(e) => {
                    self.abandoned = true;
                    return Err(("waiting for io_uring SEND_ZC completions", e, requests > 0));
                }
            }
        }
    }

    /// Drains the completion queue into `slots`.
    fn reap(&mut self, slots: &mut [Slot], usage: &mut Usage) {
        let generation = self.generation;
        for cqe in self.ring.completion() {
            let tag = cqe.user_data();
            let index = (tag & 0xff) as usize;
            let Some(slot) = slots.get_mut(index).filter(|_| tag >> 8 == generation) else {
                debug_assert!(false, "CQE {tag:#x} of another chain");
                tracing::error!(tag, "io_uring SEND_ZC: CQE of another chain");
                continue;
            };
            if cqueue::notif(cqe.flags()) {
                let copied = cqe.result() as u32 & NOTIF_USAGE_ZC_COPIED != 0;
                slot.notified = Some(copied);
                usage.sends += 1;
                usage.copied += u64::from(copied);
            } else {
                slot.res = Some(cqe.result());
                slot.more = cqueue::more(cqe.flags());
            }
        }
    }
}

/// Moves `cursor` (the first iovec not wholly sent) past `n` more sent bytes, trimming a
/// partly sent iovec in place. Returns the new cursor.
fn advance(iov: &mut [libc::iovec], mut cursor: usize, mut n: usize) -> usize {
    while n > 0 {
        let v = &mut iov[cursor];
        if n >= v.iov_len {
            n -= v.iov_len;
            cursor += 1;
        } else {
            // SAFETY: n < iov_len, so the new base stays inside the same slice.
            v.iov_base = unsafe { (v.iov_base as *mut u8).add(n) } as *mut libc::c_void;
            v.iov_len -= n;
            n = 0;
        }
    }
    cursor
}

fn is_retryable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::Instant;

    fn pair() -> (TcpStream, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        (a, listener.accept().unwrap().0)
    }

    /// Reads everything `peer` receives until it closes, on a thread.
    fn drain(mut peer: TcpStream) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut all = Vec::new();
            peer.read_to_end(&mut all).unwrap();
            all
        })
    }

    #[test]
    fn advance_trims_a_partly_sent_iovec() {
        let bytes = [0u8; 10];
        let mut iov: Vec<libc::iovec> = [3usize, 4, 3]
            .iter()
            .scan(0, |at, &len| {
                let v = libc::iovec {
                    iov_base: bytes[*at..].as_ptr() as *mut libc::c_void,
                    iov_len: len,
                };
                *at += len;
                Some(v)
            })
            .collect();
        assert_eq!(advance(&mut iov, 0, 0), 0);
        assert_eq!(advance(&mut iov, 0, 3), 1);
        assert_eq!(advance(&mut iov, 1, 2), 1);
        assert_eq!(iov[1].iov_len, 2);
        assert_eq!(iov[1].iov_base as usize, bytes[5..].as_ptr() as usize);
        assert_eq!(advance(&mut iov, 1, 5), 3);
    }

    #[test]
    fn both_shapes_send_every_byte_in_order_and_report_usage() {
        // Slices of odd lengths, some empty, more than one chain's worth of requests.
        let data: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i * 7 + i / 4093) as u8)
            .collect();
        let mut slices = Vec::new();
        let mut at = 0;
        let mut len = 1;
        while at < data.len() {
            let end = (at + len).min(data.len());
            slices.push(IoSlice::new(&data[at..end]));
            slices.push(IoSlice::new(&[]));
            at = end;
            len = len * 3 % 70_001 + 1;
        }
        for shape in [Shape::MessagePerBatch, Shape::SendPerSlice] {
            let (tx, rx) = pair();
            let reader = drain(rx);
            let mut zc = ZcSender::new(shape).unwrap();
            let usage = zc
                .send_all(tx.as_fd(), &slices, &AtomicBool::new(false))
                .unwrap();
            drop(tx);
            assert!(reader.join().unwrap() == data, "{shape:?}: bytes differ");
            let requests = match shape {
                Shape::MessagePerBatch => slices.len().div_ceil(2).div_ceil(IOVECS_PER_MSG),
                Shape::SendPerSlice => slices.len() / 2,
            } as u64;
            assert_eq!(usage.sends, requests, "{shape:?}: {usage:?}");
            // Loopback: the receiving socket cannot keep the sender's pages.
            assert_eq!(usage.copied, usage.sends, "{shape:?}: {usage:?}");
            assert!(usage.enters >= 1);
        }
    }

    #[test]
    fn a_socket_without_zero_copy_is_refused_before_anything_is_sent() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut zc = ZcSender::new(Shape::MessagePerBatch).unwrap();
        let payload = [1u8; 4096];
        let err = zc
            .send_all(
                a.as_fd(),
                &[IoSlice::new(&payload)],
                &AtomicBool::new(false),
            )
            .unwrap_err();
        assert!(err.is_unsupported(), "{err:?}");
        assert_eq!(err.sent, 0);
        // The ring is still usable after a refused request.
        let (tx, rx) = pair();
        let reader = drain(rx);
        zc.send_all(
            tx.as_fd(),
            &[IoSlice::new(&payload)],
            &AtomicBool::new(false),
        )
        .unwrap();
        drop(tx);
        assert_eq!(reader.join().unwrap(), payload);
    }

    /// SENDMSG_ZC per batch against chained SEND_ZC per slice against plain `writev`, on
    /// loopback: `cargo test --release -p ferry-dataplane --lib
    /// transport::tcp::send_zc::tests::shapes_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "measures; sends several GiB"]
    fn shapes_throughput() {
        const HEADER: usize = 40;
        let memory = vec![7u8; 64 << 20];
        let headers = vec![[1u8; HEADER]; 256];
        // Gather lists of the engine's two batch kinds: one 1 MiB frame; 64 single pages.
        let big: Vec<IoSlice<'_>> =
            vec![IoSlice::new(&headers[0]), IoSlice::new(&memory[..1 << 20])];
        let scattered: Vec<IoSlice<'_>> = (0..64)
            .flat_map(|i| {
                [
                    IoSlice::new(&headers[i]),
                    IoSlice::new(&memory[i * 8192..i * 8192 + 4096]),
                ]
            })
            .collect();
        for (name, batch) in [("1 MiB frame", &big), ("64 single pages", &scattered)] {
            let bytes: usize = batch.iter().map(|s| s.len()).sum();
            let calls = (1usize << 30) / bytes;
            for round in 0..2 {
                for kind in ["writev", "SENDMSG_ZC", "SEND_ZC chained"] {
                    let (mut tx, rx) = pair();
                    tx.set_nodelay(true).unwrap();
                    let reader = std::thread::spawn(move || {
                        let mut rx = rx;
                        let mut buf = vec![0u8; 1 << 20];
                        while rx.read(&mut buf).unwrap() > 0 {}
                    });
                    let mut zc = match kind {
                        "SENDMSG_ZC" => Some(ZcSender::new(Shape::MessagePerBatch).unwrap()),
                        "SEND_ZC chained" => Some(ZcSender::new(Shape::SendPerSlice).unwrap()),
                        _ => None,
                    };
                    let closed = AtomicBool::new(false);
                    let mut enters = 0;
                    let started = Instant::now();
                    for _ in 0..calls {
                        match &mut zc {
                            Some(zc) => {
                                enters += zc.send_all(tx.as_fd(), batch, &closed).unwrap().enters
                            }
                            None => {
                                let mut iov = batch.clone();
                                let mut slices = &mut iov[..];
                                while !slices.is_empty() {
                                    let n = tx.write_vectored(slices).unwrap();
                                    IoSlice::advance_slices(&mut slices, n);
                                    enters += 1;
                                }
                            }
                        }
                    }
                    tx.flush().unwrap();
                    drop(tx);
                    reader.join().unwrap();
                    let secs = started.elapsed().as_secs_f64();
                    println!(
                        "round {round} {name:>15} {kind:>15}: {:.2} GiB/s, {:.1} syscalls per call",
                        (calls * bytes) as f64 / secs / (1u64 << 30) as f64,
                        enters as f64 / calls as f64
                    );
                }
            }
        }
    }
}
