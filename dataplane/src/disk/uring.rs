//! One io_uring per disk worker thread, with registered buffers, and the linear pipelined
//! read the bulk copy is built on ([`read_linear`]).
//!
//! # Ownership of memory the kernel uses
//!
//! A request names memory the kernel reads or writes until the request completes. The
//! ring keeps that sound without `unsafe` at the call site:
//!
//! - Ring buffers ([`BlockRing::read`], [`BlockRing::write`]) are owned by the ring,
//!   registered with the kernel once (`IORING_REGISTER_BUFFERS`, so each I/O skips page
//!   pinning), and marked busy while a request on them is in flight. A busy buffer cannot
//!   be borrowed ([`BlockRing::buffer`] panics rather than return a slice the kernel may
//!   be writing) nor used by a second request ([`DiskError::BadParams`]).
//! - Caller buffers ([`BlockRing::write_owned`], [`BlockRing::read_owned`]) are moved into
//!   the ring and handed back in the [`Completion`], so they cannot be touched or freed
//!   while the kernel uses them.
//! - Each request holds a reference to the image's open file until it completes, so the
//!   descriptor is not closed under it (and its number is not reused by another file when
//!   a short transfer is resubmitted).
//! - Dropping the ring waits for every request still in the kernel before freeing memory.
//!
//! # Submission and completion
//!
//! A request is submitted to the kernel as soon as it is queued (one `io_uring_enter` per
//! request: the bulk copy moves 1 MiB chunks, where a system call is noise, and a guest
//! write must not sit in the queue until somebody reaps). At most `queue_depth` requests
//! are in flight; a further request is refused with [`DiskError::BadParams`] until
//! [`BlockRing::complete`] returns one. The kernel may transfer fewer bytes than asked; the
//! ring resubmits the rest itself, so the caller sees exactly one [`Completion`] per
//! request, with the full length or an error.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use io_uring::{opcode, types, IoUring};

use super::{AlignedBuf, DiskError, DiskImage, CHUNK_BYTES_MAX, QUEUE_DEPTH_MAX};

/// Most ring buffers a ring may own (the kernel accepts 16384; each is locked memory).
pub const RING_BUFFERS_MAX: usize = 1024;
/// Bound on consecutive retries of `io_uring_enter` failing with EINTR, EAGAIN or EBUSY.
const ENTER_RETRIES_MAX: u32 = 10_000;
/// Bound on resubmissions of one request whose CQE says EINTR or EAGAIN.
const REQUEUES_MAX: u32 = 16;

/// The result of one request.
#[derive(Debug)]
pub struct Completion {
    /// As given when the request was queued.
    pub user_data: u64,
    /// The number of bytes transferred, always the full requested length; or why not.
    /// A transfer cut short by end of file is [`io::ErrorKind::UnexpectedEof`] (reads) or
    /// [`io::ErrorKind::WriteZero`] (writes).
    pub result: Result<usize, io::Error>,
    /// The caller's buffer of a [`BlockRing::write_owned`] or [`BlockRing::read_owned`]
    /// request, handed back; `None` for requests on ring buffers.
    pub buf: Option<AlignedBuf>,
}

/// A request refused before it reached the kernel, with the caller's buffer handed back.
#[derive(Debug)]
pub struct Rejected {
    pub error: DiskError,
    pub buf: AlignedBuf,
}

impl From<Rejected> for DiskError {
    fn from(rejected: Rejected) -> DiskError {
        rejected.error
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Direction {
    Read,
    Write,
}

impl Direction {
    fn op(self) -> &'static str {
        match self {
            Direction::Read => "reading",
            Direction::Write => "writing",
        }
    }
}

/// Memory a request transfers to or from.
enum Target {
    /// Ring buffer `index`.
    Ring(usize),
    /// A caller's buffer, handed back in the completion.
    Owned(AlignedBuf),
}

/// A request the caller has not been given a completion for.
struct Request {
    user_data: u64,
    direction: Direction,
    /// Keeps the descriptor open while the kernel uses it (see the module docs).
    file: Arc<File>,
    target: Target,
    offset: u64,
    len: usize,
    /// Bytes transferred so far (short transfers are resubmitted from here).
    done: usize,
    /// Resubmissions after EINTR/EAGAIN, bounded by [`REQUEUES_MAX`].
    requeues: u32,
}

/// An io_uring with `queue_depth` entries and its buffers, used by one thread.
pub struct BlockRing {
    // Field order matters for drop: the ring (and its buffer registration) goes before the
    // buffers; `Drop::drop` has already waited for every request by then.
    ring: IoUring,
    /// Requests in the kernel, keyed by the internal id carried in the SQE's user_data.
    /// Each has exactly one SQE queued or in the kernel.
    requests: BTreeMap<u64, Request>,
    next_id: u64,
    /// Finished requests whose completion has not been returned yet (kept here when
    /// `complete` fails, so no completion, and no caller buffer, is ever lost).
    ready: Vec<Completion>,
    /// SQEs pushed whose CQE has not been reaped yet (queued or in the kernel).
    sqes_in_kernel: usize,
    buffers: Vec<AlignedBuf>,
    /// `busy[i]`: a request on ring buffer `i` is in flight.
    busy: Vec<bool>,
    buffer_len: usize,
    queue_depth: u32,
    registered: bool,
    /// Reused by `complete` to drain the completion queue without allocating.
    cqes: Vec<(u64, i32)>,
}

fn bad(reason: impl Into<String>) -> DiskError {
    DiskError::BadParams {
        reason: reason.into(),
    }
}

impl BlockRing {
    /// A ring of `queue_depth` entries (1..=[`QUEUE_DEPTH_MAX`]) owning `buffers` (at most
    /// [`RING_BUFFERS_MAX`]) zeroed buffers of `buffer_len` bytes each (a non-zero multiple
    /// of [`super::BLOCK_SIZE`], at most [`CHUNK_BYTES_MAX`]; ignored when `buffers` is 0).
    ///
    /// The buffers are registered with the kernel. If that fails (RLIMIT_MEMLOCK for an
    /// unprivileged user, typically), the ring says so once per process and uses plain
    /// reads and writes; [`BlockRing::registered`] tells which.
    pub fn new(queue_depth: u32, buffers: usize, buffer_len: usize) -> Result<Self, DiskError> {
        Self::build(queue_depth, buffers, buffer_len, true)
    }

    /// As [`BlockRing::new`], but the buffers are never registered: plain reads and writes,
    /// each pinning its pages for the I/O. The baseline registration is measured against
    /// (`ferry-bench send-path`).
    pub fn unregistered(
        queue_depth: u32,
        buffers: usize,
        buffer_len: usize,
    ) -> Result<Self, DiskError> {
        Self::build(queue_depth, buffers, buffer_len, false)
    }

    /// `new`, with registration optional (tests exercise the unregistered path with it).
    fn build(
        queue_depth: u32,
        buffers: usize,
        buffer_len: usize,
        try_register: bool,
    ) -> Result<Self, DiskError> {
        if queue_depth == 0 || queue_depth > QUEUE_DEPTH_MAX {
            return Err(bad(format!(
                "io_uring queue depth {queue_depth} must be in 1..={QUEUE_DEPTH_MAX}"
            )));
        }
        if buffers > RING_BUFFERS_MAX {
            return Err(bad(format!(
                "{buffers} ring buffers requested, at most {RING_BUFFERS_MAX}"
            )));
        }
        let buffer_len = if buffers == 0 { 0 } else { buffer_len };
        if buffers > 0
            && (buffer_len == 0
                || !buffer_len.is_multiple_of(super::BLOCK_SIZE)
                || buffer_len > CHUNK_BYTES_MAX)
        {
            return Err(bad(format!(
                "ring buffer length {buffer_len} must be a non-zero multiple of {} up to {CHUNK_BYTES_MAX}",
                super::BLOCK_SIZE
            )));
        }
        let ring = IoUring::new(queue_depth).map_err(|source| DiskError::Ring {
            op: "setting up a ring",
            source,
        })?;
        let buffers: Vec<AlignedBuf> = (0..buffers)
            .map(|_| AlignedBuf::new_zeroed(buffer_len))
            .collect();
        let registered = try_register && !buffers.is_empty() && register(&ring, &buffers);
        Ok(BlockRing {
            ring,
            requests: BTreeMap::new(),
            next_id: 0,
            ready: Vec::new(),
            sqes_in_kernel: 0,
            busy: vec![false; buffers.len()],
            buffers,
            buffer_len,
            queue_depth,
            registered,
            cqes: Vec::with_capacity(2 * queue_depth as usize),
        })
    }

    /// The ring buffers are registered with the kernel (fixed-buffer reads and writes).
    /// The ring's file descriptor: it polls readable while completions are waiting, so a
    /// thread can wait for a socket and its disk writes at once.
    pub fn as_raw_fd(&self) -> std::os::fd::RawFd {
        use std::os::fd::AsRawFd;
        self.ring.as_raw_fd()
    }

    pub fn registered(&self) -> bool {
        self.registered
    }

    pub fn queue_depth(&self) -> u32 {
        self.queue_depth
    }

    pub fn buffer_count(&self) -> usize {
        self.buffers.len()
    }

    /// Length of each ring buffer in bytes (0 for a ring without buffers).
    pub fn buffer_len(&self) -> usize {
        self.buffer_len
    }

    /// Requests queued whose completion has not been returned yet.
    pub fn in_flight(&self) -> usize {
        self.requests.len() + self.ready.len()
    }

    /// Ring buffer `index`, whole.
    ///
    /// # Panics
    ///
    /// If `index` is out of range or a request on the buffer is in flight: a caller bug,
    /// like indexing a slice out of bounds. The check is an `assert!`, not a
    /// `debug_assert!`: while a read is in flight the kernel writes the buffer, and a
    /// `&[u8]` to memory written concurrently is undefined behaviour, so skipping the
    /// check in release builds would make this safe function unsound. (It costs one load.)
    /// Callers know which buffers are idle: the ones whose completion they were given.
    pub fn buffer(&self, index: usize) -> &[u8] {
        self.assert_idle(index);
        &self.buffers[index]
    }

    /// Ring buffer `index`, whole, to fill before a [`BlockRing::write`]. Panics as
    /// [`BlockRing::buffer`] does.
    pub fn buffer_mut(&mut self, index: usize) -> &mut [u8] {
        self.assert_idle(index);
        &mut self.buffers[index]
    }

    /// Address and length of ring buffer `index`, for registering it with another device
    /// (an RDMA NIC that writes payloads into it). The address is stable for the ring's
    /// life; whoever lets a device write there must keep it from doing so while a request
    /// on the buffer is in flight, and must stop it before the ring is dropped.
    ///
    /// # Panics
    ///
    /// If `index` is out of range (a caller bug, like indexing a slice out of bounds).
    pub fn buffer_region(&mut self, index: usize) -> (*mut u8, usize) {
        let buf = &mut self.buffers[index];
        (buf.as_mut_ptr(), buf.len())
    }

    fn assert_idle(&self, index: usize) {
        if let Err(e) = self.check_idle(index) {
            panic!("{e}");
        }
    }

    fn check_idle(&self, index: usize) -> Result<(), DiskError> {
        match self.busy.get(index) {
            None => Err(bad(format!(
                "ring buffer {index} does not exist (the ring has {})",
                self.buffers.len()
            ))),
            Some(true) => Err(bad(format!(
                "ring buffer {index} is in use by a request in flight"
            ))),
            Some(false) => Ok(()),
        }
    }

    /// Queues and submits a read of `len` bytes at `offset` of `image` into ring buffer
    /// `index` (a fixed-buffer read when [`BlockRing::registered`]). The buffer cannot be
    /// borrowed until the completion, carrying `user_data`, is returned by
    /// [`BlockRing::complete`].
    ///
    /// Refused before reaching the kernel: a bad `index`, a busy buffer, `len` of 0 or over
    /// [`BlockRing::buffer_len`], or a full ring ([`DiskError::BadParams`]); a range outside
    /// the image ([`DiskError::OutOfRange`]); misalignment on a direct image
    /// ([`DiskError::Misaligned`]).
    pub fn read(
        &mut self,
        image: &DiskImage,
        index: usize,
        offset: u64,
        len: usize,
        user_data: u64,
    ) -> Result<(), DiskError> {
        self.queue_ring(Direction::Read, image, index, offset, len, user_data)
    }

    /// Queues and submits a write of the first `len` bytes of ring buffer `index` at
    /// `offset` of `image`. Same rules as [`BlockRing::read`].
    pub fn write(
        &mut self,
        image: &DiskImage,
        index: usize,
        offset: u64,
        len: usize,
        user_data: u64,
    ) -> Result<(), DiskError> {
        self.queue_ring(Direction::Write, image, index, offset, len, user_data)
    }

    /// Queues and submits a write of the first `len` bytes of the caller's `buf` at
    /// `offset` of `image`. The ring owns `buf` until it returns it in the [`Completion`]
    /// (or in the [`Rejected`] error, for a request refused before reaching the kernel:
    /// same rules as [`BlockRing::read`], with `len` bounded by `buf.len()`).
    pub fn write_owned(
        &mut self,
        image: &DiskImage,
        buf: AlignedBuf,
        offset: u64,
        len: usize,
        user_data: u64,
    ) -> Result<(), Rejected> {
        self.queue_owned(Direction::Write, image, buf, offset, len, user_data)
    }

    /// Queues and submits a read of `len` bytes at `offset` of `image` into the caller's
    /// `buf`, handed back with the data in the [`Completion`]. Rules as for
    /// [`BlockRing::write_owned`].
    pub fn read_owned(
        &mut self,
        image: &DiskImage,
        buf: AlignedBuf,
        offset: u64,
        len: usize,
        user_data: u64,
    ) -> Result<(), Rejected> {
        self.queue_owned(Direction::Read, image, buf, offset, len, user_data)
    }

    fn queue_ring(
        &mut self,
        direction: Direction,
        image: &DiskImage,
        index: usize,
        offset: u64,
        len: usize,
        user_data: u64,
    ) -> Result<(), DiskError> {
        self.check_idle(index)?;
        self.check_request(direction, image, len, self.buffer_len, offset)?;
        self.busy[index] = true;
        let request = Request {
            user_data,
            direction,
            file: image.shared_file(),
            target: Target::Ring(index),
            offset,
            len,
            done: 0,
            requeues: 0,
        };
        self.start(request).map_err(|(error, _)| {
            self.busy[index] = false;
            error
        })
    }

    fn queue_owned(
        &mut self,
        direction: Direction,
        image: &DiskImage,
        buf: AlignedBuf,
        offset: u64,
        len: usize,
        user_data: u64,
    ) -> Result<(), Rejected> {
        if let Err(error) = self.check_request(direction, image, len, buf.len(), offset) {
            return Err(Rejected { error, buf });
        }
        let request = Request {
            user_data,
            direction,
            file: image.shared_file(),
            target: Target::Owned(buf),
            offset,
            len,
            done: 0,
            requeues: 0,
        };
        self.start(request)
            .map_err(|(error, request)| match request.target {
                Target::Owned(buf) => Rejected { error, buf },
                Target::Ring(_) => unreachable!("queue_owned starts owned requests"),
            })
    }

    fn check_request(
        &self,
        direction: Direction,
        image: &DiskImage,
        len: usize,
        len_max: usize,
        offset: u64,
    ) -> Result<(), DiskError> {
        if len == 0 || len > len_max {
            return Err(bad(format!(
                "io_uring {}: length {len} must be in 1..={len_max}",
                direction.op()
            )));
        }
        if self.in_flight() >= self.queue_depth as usize {
            return Err(bad(format!(
                "io_uring ring full: {} requests in flight (queue depth {}); complete some first",
                self.in_flight(),
                self.queue_depth
            )));
        }
        // Ring buffers and `AlignedBuf`s start BLOCK_SIZE-aligned, so only the range and
        // its alignment are left to check.
        image.check_io(direction.op(), offset, len as u64, None)
    }

    /// Registers `request`, pushes its SQE and submits it. If the push fails, nothing
    /// reached the kernel and the request is handed back. Once pushed, the request is
    /// committed: a failing submit leaves the SQE queued for the next `complete`, which
    /// reports the error if it persists.
    // The large error is the cold path of a private function; boxing would allocate.
    #[allow(clippy::result_large_err)]
    fn start(&mut self, request: Request) -> Result<(), (DiskError, Request)> {
        let id = self.next_id;
        self.next_id += 1;
        self.requests.insert(id, request);
        if let Err(error) = self.push(id) {
            let request = self.requests.remove(&id).expect("just inserted");
            return Err((error, request));
        }
        if let Err(e) = self.submit() {
            tracing::debug!(error = %e, "io_uring submit failed; retried when completing");
        }
        Ok(())
    }

    /// Pushes the SQE that transfers what is left of request `id`.
    fn push(&mut self, id: u64) -> Result<(), DiskError> {
        let request = self.requests.get_mut(&id).expect("push of a known request");
        let fd = types::Fd(request.file.as_raw_fd());
        let done = request.done;
        let remaining = request.len - done;
        let len = u32::try_from(remaining).expect("request lengths are at most CHUNK_BYTES_MAX");
        let offset = request.offset + done as u64;
        // Pointers are taken at the byte where the transfer resumes. Ring buffers come from
        // `self.buffers`, which lives (unmoved on the heap) as long as the ring.
        let entry = match (&mut request.target, request.direction) {
            (Target::Ring(i), Direction::Read) => {
                let ptr = self.buffers[*i][done..].as_mut_ptr();
                if self.registered {
                    opcode::ReadFixed::new(fd, ptr, len, *i as u16)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Read::new(fd, ptr, len).offset(offset).build()
                }
            }
            (Target::Ring(i), Direction::Write) => {
                let ptr = self.buffers[*i][done..].as_ptr();
                if self.registered {
                    opcode::WriteFixed::new(fd, ptr, len, *i as u16)
                        .offset(offset)
                        .build()
                } else {
                    opcode::Write::new(fd, ptr, len).offset(offset).build()
                }
            }
            (Target::Owned(buf), Direction::Read) => {
                opcode::Read::new(fd, buf[done..].as_mut_ptr(), len)
                    .offset(offset)
                    .build()
            }
            (Target::Owned(buf), Direction::Write) => {
                opcode::Write::new(fd, buf[done..].as_ptr(), len)
                    .offset(offset)
                    .build()
            }
        }
        .user_data(id);
        // SAFETY: the SQE names `len` bytes from `ptr`, inside a buffer that stays valid
        // and is not otherwise accessed until the CQE for `id` is reaped: ring buffers are
        // marked busy (no borrow is handed out) and freed only after `Drop` has waited for
        // every SQE; owned buffers are held in `self.requests[id]` until then. The file
        // descriptor is kept open by `request.file` for as long.
        unsafe { self.ring.submission().push(&entry) }.map_err(|_| DiskError::Ring {
            op: "queuing a request",
            source: io::Error::other("submission queue full"),
        })?;
        self.sqes_in_kernel += 1;
        Ok(())
    }

    /// Submits queued SQEs to the kernel (normally none: requests are submitted when
    /// queued; SQEs remain after a submit interrupted by a signal or refused with
    /// EAGAIN/EBUSY, which is not an error here). Returns how many were submitted.
    pub fn submit(&mut self) -> Result<usize, DiskError> {
        if self.ring.submission().is_empty() {
            return Ok(0);
        }
        match self.ring.submit() {
            Ok(n) => Ok(n),
            Err(e) if is_retryable(&e) => Ok(0),
            Err(source) => Err(DiskError::Ring {
                op: "submitting requests",
                source,
            }),
        }
    }

    /// Waits until at least `min` completions are available (`min` ≤
    /// [`BlockRing::in_flight`], else [`DiskError::BadParams`]), then returns all that are
    /// available; `min == 0` never blocks. A request transferred in several pieces yields
    /// one completion.
    ///
    /// On a [`DiskError::Ring`] error, completions already gathered are kept for the next
    /// call.
    pub fn complete(&mut self, min: usize) -> Result<Vec<Completion>, DiskError> {
        if min > self.in_flight() {
            return Err(bad(format!(
                "cannot wait for {min} completions with {} requests in flight",
                self.in_flight()
            )));
        }
        self.submit()?;
        let mut retries = 0;
        loop {
            self.reap();
            if self.ready.len() >= min {
                // Resubmissions of short transfers queued by `reap` start now.
                self.submit()?;
                return Ok(std::mem::take(&mut self.ready));
            }
            // Every request has an SQE queued or in the kernel, so waiting ends; should
            // that invariant break, fail rather than wait forever.
            if self.sqes_in_kernel == 0 {
                return Err(DiskError::Ring {
                    op: "waiting for completions",
                    source: io::Error::other("requests in flight but none in the kernel"),
                });
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => retries = 0,
                Err(e) if is_retryable(&e) && retries < ENTER_RETRIES_MAX => retries += 1,
                Err(source) => {
                    return Err(DiskError::Ring {
                        op: "waiting for completions",
                        source,
                    })
                }
            }
        }
    }

    /// Drains the completion queue: finished requests go to `self.ready`, short ones are
    /// resubmitted.
    fn reap(&mut self) {
        let mut cqes = std::mem::take(&mut self.cqes);
        cqes.clear();
        cqes.extend(
            self.ring
                .completion()
                .map(|cqe| (cqe.user_data(), cqe.result())),
        );
        self.sqes_in_kernel -= cqes.len();
        for &(id, res) in &cqes {
            self.on_cqe(id, res);
        }
        self.cqes = cqes;
    }

    fn on_cqe(&mut self, id: u64, res: i32) {
        let Some(request) = self.requests.get_mut(&id) else {
            debug_assert!(false, "CQE for unknown request {id}");
            tracing::error!(id, "io_uring CQE for an unknown request");
            return;
        };
        let result = if res < 0 {
            let errno = -res;
            let transient = errno == libc::EINTR || errno == libc::EAGAIN;
            if transient && request.requeues < REQUEUES_MAX {
                request.requeues += 1;
                match self.push(id) {
                    Ok(()) => return,
                    Err(e) => Err(io::Error::other(e)),
                }
            } else {
                Err(io::Error::from_raw_os_error(errno))
            }
        } else if res == 0 {
            Err(match request.direction {
                Direction::Read => io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "end of file before the requested length",
                ),
                Direction::Write => {
                    io::Error::new(io::ErrorKind::WriteZero, "write made no progress")
                }
            })
        } else {
            request.done += res as usize;
            if request.done > request.len {
                Err(io::Error::other(
                    "the kernel reported more bytes than requested",
                ))
            } else if request.done < request.len {
                match self.push(id) {
                    Ok(()) => return,
                    Err(e) => Err(io::Error::other(e)),
                }
            } else {
                Ok(request.len)
            }
        };
        let request = self.requests.remove(&id).expect("present above");
        let buf = match request.target {
            Target::Ring(i) => {
                self.busy[i] = false;
                None
            }
            Target::Owned(buf) => Some(buf),
        };
        self.ready.push(Completion {
            user_data: request.user_data,
            result,
            buf,
        });
    }
}

impl Drop for BlockRing {
    /// Waits for every SQE still queued or in the kernel before the buffers are freed. If
    /// waiting fails for good, the buffers are leaked rather than freed under the kernel.
    fn drop(&mut self) {
        let mut retries = 0;
        while self.sqes_in_kernel > 0 {
            let reaped = self.ring.completion().count();
            self.sqes_in_kernel -= reaped;
            if self.sqes_in_kernel == 0 {
                break;
            }
            match self.ring.submit_and_wait(1) {
                Ok(_) => retries = 0,
                Err(e) if is_retryable(&e) && retries < ENTER_RETRIES_MAX => retries += 1,
                Err(e) => {
                    tracing::error!(error = %e, in_kernel = self.sqes_in_kernel,
                        "io_uring: cannot wait for requests in flight; leaking their buffers");
                    std::mem::forget(std::mem::take(&mut self.buffers));
                    std::mem::forget(std::mem::take(&mut self.requests));
                    return;
                }
            }
        }
    }
}

impl std::fmt::Debug for BlockRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockRing")
            .field("queue_depth", &self.queue_depth)
            .field("buffers", &self.buffers.len())
            .field("buffer_len", &self.buffer_len)
            .field("registered", &self.registered)
            .field("in_flight", &self.in_flight())
            .finish()
    }
}

/// Registers `buffers` with the ring's kernel side; false (said once per process) if the
/// kernel refuses.
fn register(ring: &IoUring, buffers: &[AlignedBuf]) -> bool {
    static WARNED: AtomicBool = AtomicBool::new(false);
    let iovecs: Vec<libc::iovec> = buffers
        .iter()
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    // SAFETY: each iovec describes a live `AlignedBuf` owned by the `BlockRing` being
    // built. The buffers are heap allocations that never move, and they outlive the
    // registration: the ring (which unregisters on drop) is dropped before them, after
    // `Drop` has waited for every request.
    match unsafe { ring.submitter().register_buffers(&iovecs) } {
        Ok(()) => true,
        Err(e) => {
            if !WARNED.swap(true, Ordering::Relaxed) {
                tracing::warn!(error = %e, buffers = buffers.len(), bytes_each = buffers[0].len(),
                    "io_uring: cannot register buffers (RLIMIT_MEMLOCK?); using unregistered I/O");
            }
            false
        }
    }
}

fn is_retryable(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINTR) | Some(libc::EAGAIN) | Some(libc::EBUSY)
    )
}

/// Reads `range` of `image` (its start BLOCK_SIZE-aligned; on a direct image its end too)
/// in `chunk`-byte pieces (a non-zero multiple of BLOCK_SIZE, at most
/// [`BlockRing::buffer_len`]; the last piece may be shorter), with up to
/// `min(ring.queue_depth(), ring.buffer_count())` reads in flight. The ring must be idle.
///
/// Before queuing each piece's read, calls `claim(offset, len)` (the bulk copy range-locks
/// the piece against guest writes there; it may block). When a read completes, calls
/// `on_chunk(offset, bytes)`, in completion order, not necessarily offset order, and reuses
/// the buffer after it returns. Stops at the first error (from the ring, `claim` or
/// `on_chunk`) after waiting for the reads in flight, whose data is dropped; a piece
/// claimed and not handed to `on_chunk` is one whose read failed or was abandoned.
///
/// Returns the number of bytes read (`range`'s length).
pub fn read_linear<E: From<DiskError>>(
    ring: &mut BlockRing,
    image: &DiskImage,
    range: Range<u64>,
    chunk: usize,
    mut claim: impl FnMut(u64, usize) -> Result<(), E>,
    mut on_chunk: impl FnMut(u64, &[u8]) -> Result<(), E>,
) -> Result<u64, E> {
    let block = super::BLOCK_SIZE as u64;
    if range.start > range.end || range.end > image.size() {
        return Err(DiskError::OutOfRange {
            path: image.path().to_path_buf(),
            op: "reading",
            offset: range.start,
            len: range.end.saturating_sub(range.start),
            size: image.size(),
        }
        .into());
    }
    if !range.start.is_multiple_of(block) {
        return Err(DiskError::Misaligned {
            op: "reading linearly",
            offset: range.start,
            len: range.end - range.start,
            align: block,
        }
        .into());
    }
    if chunk == 0 || !chunk.is_multiple_of(super::BLOCK_SIZE) || chunk > ring.buffer_len() {
        return Err(bad(format!(
            "chunk of {chunk} bytes must be a non-zero multiple of {} up to the ring's buffer length {}",
            super::BLOCK_SIZE,
            ring.buffer_len()
        ))
        .into());
    }
    if ring.in_flight() != 0 {
        return Err(bad(format!(
            "read_linear needs an idle ring; {} requests are in flight",
            ring.in_flight()
        ))
        .into());
    }
    // Reads in flight: the queue depth. Buffers beyond it let the next read be queued
    // before a completed chunk is handed over, so reading overlaps the caller's work.
    let depth = (ring.queue_depth() as usize).min(ring.buffer_count());
    // Buffer i reads the piece at `offsets[i]`; the user_data of its read is i.
    let mut offsets = vec![0u64; ring.buffer_count()];
    let mut free: Vec<usize> = (0..ring.buffer_count()).rev().collect();
    let mut next = range.start;
    let mut total = 0u64;
    let mut first_error: Option<E> = None;
    let started = Instant::now();
    // Claims and queues reads until `depth` are in flight (or the range is done).
    let mut queue_reads = |ring: &mut BlockRing,
                           free: &mut Vec<usize>,
                           offsets: &mut [u64],
                           first_error: &mut Option<E>| {
        while first_error.is_none() && next < range.end && ring.in_flight() < depth {
            let Some(index) = free.pop() else { break };
            let len = (range.end - next).min(chunk as u64) as usize;
            if let Err(e) = claim(next, len) {
                *first_error = Some(e);
                free.push(index);
                break;
            }
            if let Err(e) = ring.read(image, index, next, len, index as u64) {
                *first_error = Some(e.into());
                free.push(index);
                break;
            }
            offsets[index] = next;
            next += len as u64;
        }
    };
    loop {
        queue_reads(ring, &mut free, &mut offsets, &mut first_error);
        if ring.in_flight() == 0 {
            break;
        }
        let completions = match ring.complete(1) {
            Ok(c) => c,
            Err(e) => {
                // The ring cannot wait: its `Drop` still waits before freeing memory.
                return Err(first_error.unwrap_or_else(|| e.into()));
            }
        };
        for c in completions {
            let index = c.user_data as usize;
            if first_error.is_some() {
                free.push(index);
                continue;
            }
            // Keep the disk busy while this chunk is handed over.
            queue_reads(ring, &mut free, &mut offsets, &mut first_error);
            match c.result {
                Ok(len) => {
                    let bytes = &ring.buffers[index][..len];
                    match on_chunk(offsets[index], bytes) {
                        Ok(()) => total += len as u64,
                        Err(e) => first_error = Some(e),
                    }
                }
                Err(source) => {
                    first_error = Some(
                        DiskError::Io {
                            path: image.path().to_path_buf(),
                            op: "reading",
                            offset: offsets[index],
                            source,
                        }
                        .into(),
                    )
                }
            }
            free.push(index);
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    debug_assert_eq!(total, range.end - range.start);
    tracing::trace!(bytes = total, elapsed = ?started.elapsed(), "read_linear done");
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DirectIo;
    use std::collections::BTreeSet;
    use std::path::Path;

    const KIB: usize = 1 << 10;
    const MIB: usize = 1 << 20;

    /// The byte at `offset` of the test images.
    fn byte_at(offset: u64) -> u8 {
        (offset.wrapping_mul(2_654_435_761) >> 13) as u8 ^ (offset / 4096) as u8
    }

    /// An image of `size` bytes whose content is `byte_at`, written through `write_at`.
    fn patterned_image(dir: &Path, size: usize, direct: DirectIo) -> DiskImage {
        let image = DiskImage::create(&dir.join("disk.raw"), size as u64, direct).unwrap();
        let mut buf = AlignedBuf::new_zeroed(MIB.min(size));
        let mut offset = 0;
        while offset < size {
            let len = (size - offset).min(buf.len());
            for (i, b) in buf[..len].iter_mut().enumerate() {
                *b = byte_at((offset + i) as u64);
            }
            image.write_at(&buf[..len], offset as u64).unwrap();
            offset += len;
        }
        image
    }

    fn assert_pattern(bytes: &[u8], offset: u64) {
        for (i, &b) in bytes.iter().enumerate() {
            if b != byte_at(offset + i as u64) {
                panic!("byte {} differs (offset {offset} + {i})", offset + i as u64);
            }
        }
    }

    fn is_bad_params(e: &DiskError) -> bool {
        matches!(e, DiskError::BadParams { .. })
    }

    #[test]
    fn new_checks_its_parameters() {
        for (qd, n, len) in [
            (0, 1, 4096),
            (QUEUE_DEPTH_MAX + 1, 1, 4096),
            (4, 1, 0),
            (4, 1, 4097),
            (4, 1, CHUNK_BYTES_MAX + 4096),
            (4, RING_BUFFERS_MAX + 1, 4096),
        ] {
            let err = BlockRing::new(qd, n, len).unwrap_err();
            assert!(is_bad_params(&err), "{qd} {n} {len}: {err:?}");
        }
        let ring = BlockRing::new(QUEUE_DEPTH_MAX, 0, 12345).unwrap();
        assert_eq!(ring.buffer_count(), 0);
        assert_eq!(ring.buffer_len(), 0);
        assert!(!ring.registered());
        let ring = BlockRing::new(8, 3, 64 * KIB).unwrap();
        assert_eq!(
            (ring.queue_depth(), ring.buffer_count(), ring.buffer_len()),
            (8, 3, 64 * KIB)
        );
        assert!(ring.buffer(2).iter().all(|&b| b == 0));
        let ring = BlockRing::unregistered(8, 3, 64 * KIB).unwrap();
        assert!(!ring.registered());
        assert_eq!(ring.buffer_count(), 3);
    }

    /// Reads `count` pieces of 64 KiB at scattered offsets through a ring of depth `qd`,
    /// keeping it full, and checks each completion's bytes against its user_data.
    fn ring_reads(image: &DiskImage, qd: u32, registered: bool, count: usize) {
        let mut ring = BlockRing::build(qd, qd as usize, 64 * KIB, registered).unwrap();
        assert_eq!(ring.registered(), registered);
        let pieces = image.size() as usize / (64 * KIB);
        // Offsets visited out of order; user_data encodes the offset and a tag.
        let offset_of = |n: usize| ((n * 7919) % pieces * 64 * KIB) as u64;
        let mut free: Vec<usize> = (0..qd as usize).collect();
        let mut owner = vec![usize::MAX; qd as usize];
        let (mut queued, mut seen) = (0, BTreeSet::new());
        while seen.len() < count {
            while queued < count {
                let Some(index) = free.pop() else { break };
                let user_data = 1_000_000 + queued as u64;
                ring.read(image, index, offset_of(queued), 64 * KIB, user_data)
                    .unwrap();
                owner[index] = queued;
                queued += 1;
            }
            assert!(ring.in_flight() <= qd as usize);
            for c in ring.complete(1).unwrap() {
                let n = (c.user_data - 1_000_000) as usize;
                let index = owner.iter().position(|&o| o == n).unwrap();
                assert_eq!(c.result.unwrap(), 64 * KIB);
                assert!(c.buf.is_none());
                assert_pattern(ring.buffer(index), offset_of(n));
                assert!(seen.insert(n), "completion {n} twice");
                owner[index] = usize::MAX;
                free.push(index);
            }
        }
        assert_eq!(ring.in_flight(), 0);
        assert!(ring.complete(0).unwrap().is_empty());
    }

    #[test]
    fn reads_carry_the_right_bytes_direct_registered_qd1_and_qd16() {
        let dir = tempfile::tempdir().unwrap();
        let image = patterned_image(dir.path(), 4 * MIB, DirectIo::Required);
        assert!(image.is_direct());
        ring_reads(&image, 1, true, 20);
        ring_reads(&image, 16, true, 200);
    }

    #[test]
    fn reads_unregistered_and_buffered() {
        let dir = tempfile::tempdir().unwrap();
        let image = patterned_image(dir.path(), 2 * MIB, DirectIo::Off);
        ring_reads(&image, 4, false, 50);
        ring_reads(&image, 4, true, 50);
    }

    #[test]
    fn writes_land_where_asked() {
        let dir = tempfile::tempdir().unwrap();
        let image =
            DiskImage::create(&dir.path().join("d"), 4 * MIB as u64, DirectIo::Required).unwrap();
        for registered in [true, false] {
            let mut ring = BlockRing::build(16, 16, 64 * KIB, registered).unwrap();
            for index in 0..16 {
                let offset = (index * 256 * KIB) as u64;
                for (i, b) in ring.buffer_mut(index).iter_mut().enumerate() {
                    *b = byte_at(offset + i as u64).wrapping_add(registered as u8);
                }
                ring.write(&image, index, offset, 64 * KIB, offset).unwrap();
            }
            assert_eq!(ring.in_flight(), 16);
            let done = ring.complete(16).unwrap();
            assert_eq!(done.len(), 16);
            let offsets: BTreeSet<u64> = done.iter().map(|c| c.user_data).collect();
            assert_eq!(offsets.len(), 16);
            for c in done {
                assert_eq!(c.result.unwrap(), 64 * KIB);
                let mut back = AlignedBuf::new_zeroed(64 * KIB);
                image.read_at(&mut back, c.user_data).unwrap();
                for (i, &b) in back.iter().enumerate() {
                    assert_eq!(
                        b,
                        byte_at(c.user_data + i as u64).wrapping_add(registered as u8)
                    );
                }
            }
        }
    }

    #[test]
    fn owned_buffers_go_in_and_come_back() {
        let dir = tempfile::tempdir().unwrap();
        let image =
            DiskImage::create(&dir.path().join("d"), MIB as u64, DirectIo::Required).unwrap();
        let mut ring = BlockRing::new(4, 0, 0).unwrap();
        let mut buf = AlignedBuf::new_zeroed(128 * KIB);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = byte_at(i as u64);
        }
        let ptr = buf.as_ptr();
        ring.write_owned(&image, buf, 0, 64 * KIB, 7).unwrap();
        let mut done = ring.complete(1).unwrap();
        let c = done.pop().unwrap();
        assert_eq!((c.user_data, c.result.unwrap()), (7, 64 * KIB));
        let buf = c.buf.expect("buffer handed back");
        assert_eq!(buf.as_ptr(), ptr);

        let mut back = AlignedBuf::new_zeroed(64 * KIB);
        image.read_at(&mut back, 0).unwrap();
        assert_pattern(&back, 0);

        ring.read_owned(&image, AlignedBuf::new_zeroed(64 * KIB), 0, 64 * KIB, 8)
            .unwrap();
        let c = ring.complete(1).unwrap().pop().unwrap();
        assert_eq!(c.user_data, 8);
        assert_pattern(&c.buf.unwrap(), 0);

        // Refused requests hand the buffer back.
        let rejected = ring.write_owned(&image, buf, 0, 256 * KIB, 9).unwrap_err();
        assert!(is_bad_params(&rejected.error), "{:?}", rejected.error);
        assert_eq!(rejected.buf.as_ptr(), ptr);
        let rejected = ring
            .write_owned(&image, rejected.buf, MIB as u64, 4096, 9)
            .unwrap_err();
        assert!(matches!(rejected.error, DiskError::OutOfRange { .. }));
        let rejected = ring
            .write_owned(&image, rejected.buf, 512, 4096, 9)
            .unwrap_err();
        assert!(matches!(rejected.error, DiskError::Misaligned { .. }));
        let _: DiskError = rejected.into();
    }

    #[test]
    fn bad_requests_are_refused_not_panicked() {
        let dir = tempfile::tempdir().unwrap();
        let image =
            DiskImage::create(&dir.path().join("d"), MIB as u64, DirectIo::Required).unwrap();
        let mut ring = BlockRing::new(2, 3, 64 * KIB).unwrap();
        let refused = |r: Result<(), DiskError>| r.unwrap_err();
        assert!(is_bad_params(&refused(ring.read(&image, 3, 0, 4096, 0))));
        assert!(is_bad_params(&refused(ring.read(
            &image,
            usize::MAX,
            0,
            4096,
            0
        ))));
        assert!(is_bad_params(&refused(ring.read(
            &image,
            0,
            0,
            64 * KIB + 4096,
            0
        ))));
        assert!(is_bad_params(&refused(ring.write(&image, 0, 0, 0, 0))));
        assert!(matches!(
            refused(ring.read(&image, 0, MIB as u64 - 4096, 8192, 0)),
            DiskError::OutOfRange { .. }
        ));
        assert!(matches!(
            refused(ring.read(&image, 0, 4096, 1000, 0)),
            DiskError::Misaligned { .. }
        ));
        assert_eq!(ring.in_flight(), 0);
        // A busy buffer cannot be reused; a full ring refuses more.
        ring.read(&image, 0, 0, 4096, 1).unwrap();
        assert!(is_bad_params(&refused(ring.read(&image, 0, 0, 4096, 2))));
        ring.read(&image, 1, 0, 4096, 2).unwrap();
        assert!(is_bad_params(&refused(ring.read(&image, 2, 0, 4096, 3))));
        assert!(is_bad_params(&ring.complete(3).unwrap_err()));
        let done = ring.complete(2).unwrap();
        assert_eq!(done.len(), 2);
        assert!(done.iter().all(|c| c.result.is_ok()));
        ring.read(&image, 2, 0, 4096, 3).unwrap();
        // Dropping with a request in flight waits for it.
        drop(ring);
    }

    #[test]
    #[should_panic(expected = "in use by a request in flight")]
    fn borrowing_a_busy_buffer_panics() {
        let dir = tempfile::tempdir().unwrap();
        let image = DiskImage::create(&dir.path().join("d"), MIB as u64, DirectIo::Auto).unwrap();
        let mut ring = BlockRing::new(2, 2, 64 * KIB).unwrap();
        ring.read(&image, 1, 0, 64 * KIB, 0).unwrap();
        let _ = ring.buffer(1);
    }

    #[test]
    fn read_past_end_of_file_is_an_error_not_a_hang() {
        let dir = tempfile::tempdir().unwrap();
        for direct in [DirectIo::Required, DirectIo::Off] {
            let path = dir.path().join(format!("{direct}"));
            let image = DiskImage::create(&path, MIB as u64, direct).unwrap();
            // The file shrinks under the open image.
            std::fs::OpenOptions::new()
                .write(true)
                .open(&path)
                .unwrap()
                .set_len(512 * KIB as u64)
                .unwrap();
            let mut ring = BlockRing::new(4, 2, 256 * KIB).unwrap();
            ring.read(&image, 0, 768 * KIB as u64, 64 * KIB, 1).unwrap();
            // Straddles the new end: a short read, then nothing.
            ring.read(&image, 1, 384 * KIB as u64, 256 * KIB, 2)
                .unwrap();
            let mut done = ring.complete(2).unwrap();
            if done.len() < 2 {
                done.extend(ring.complete(1).unwrap());
            }
            for c in done {
                let err = c.result.unwrap_err();
                assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof, "{direct}: {err}");
            }
            // The buffers are free again.
            ring.read(&image, 1, 0, 4096, 3).unwrap();
            assert!(ring.complete(1).unwrap()[0].result.is_ok());
        }
    }

    /// Drains the CQ by hand, reporting `transferred` bytes for every CQE instead of what
    /// the kernel said: short transfers on demand.
    fn reap_short(ring: &mut BlockRing, transferred: i32) {
        ring.ring.submit_and_wait(1).unwrap();
        let cqes: Vec<u64> = ring.ring.completion().map(|c| c.user_data()).collect();
        ring.sqes_in_kernel -= cqes.len();
        for id in cqes {
            ring.on_cqe(id, transferred);
        }
    }

    #[test]
    fn short_transfers_are_resubmitted() {
        let dir = tempfile::tempdir().unwrap();
        let image = patterned_image(dir.path(), MIB, DirectIo::Required);
        for registered in [true, false] {
            let mut ring = BlockRing::build(1, 1, 64 * KIB, registered).unwrap();
            ring.read(&image, 0, 128 * KIB as u64, 64 * KIB, 42)
                .unwrap();
            // Twice short (4 KiB, then 8 KiB), then the kernel's real answer.
            reap_short(&mut ring, 4096);
            assert_eq!(ring.sqes_in_kernel, 1, "remainder resubmitted");
            reap_short(&mut ring, 8192);
            let done = ring.complete(1).unwrap();
            assert_eq!(done.len(), 1);
            assert_eq!(done[0].user_data, 42);
            assert_eq!(*done[0].result.as_ref().unwrap(), 64 * KIB);
            assert_pattern(ring.buffer(0), 128 * KIB as u64);

            // A transient error is retried; a hard one is reported.
            ring.read(&image, 0, 0, 4096, 43).unwrap();
            reap_short(&mut ring, -libc::EAGAIN);
            let c = ring.complete(1).unwrap().pop().unwrap();
            assert_eq!(c.result.unwrap(), 4096);
            ring.read(&image, 0, 0, 4096, 44).unwrap();
            reap_short(&mut ring, -libc::EIO);
            let c = ring.complete(0).unwrap().pop().unwrap();
            assert_eq!(c.result.unwrap_err().raw_os_error(), Some(libc::EIO));
        }
    }

    #[derive(Debug)]
    enum TestError {
        Disk(DiskError),
        Stop(u64),
    }

    impl From<DiskError> for TestError {
        fn from(e: DiskError) -> Self {
            TestError::Disk(e)
        }
    }

    #[test]
    fn read_linear_covers_the_range_once_in_claimed_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let size = 5 * MIB + 512 * KIB;
        let image = patterned_image(dir.path(), size, DirectIo::Required);
        for (qd, buffers) in [(4, 4), (16, 3), (1, 1)] {
            let mut ring = BlockRing::new(qd, buffers, MIB).unwrap();
            let claimed = std::cell::RefCell::new(Vec::new());
            let mut seen = Vec::new();
            let mut copy = vec![0u8; size];
            let read = read_linear::<TestError>(
                &mut ring,
                &image,
                0..size as u64,
                MIB,
                |offset, len| {
                    claimed.borrow_mut().push((offset, len));
                    Ok(())
                },
                |offset, bytes| {
                    assert!(
                        claimed
                            .borrow()
                            .iter()
                            .any(|&(o, l)| o == offset && l == bytes.len()),
                        "on_chunk({offset}) before its claim"
                    );
                    seen.push((offset, bytes.len()));
                    copy[offset as usize..offset as usize + bytes.len()].copy_from_slice(bytes);
                    Ok(())
                },
            )
            .unwrap();
            assert_eq!(read, size as u64);
            let mut claimed = claimed.into_inner();
            claimed.sort();
            seen.sort();
            let expected: Vec<(u64, usize)> = (0..6)
                .map(|i| ((i * MIB) as u64, if i == 5 { 512 * KIB } else { MIB }))
                .collect();
            assert_eq!(claimed, expected, "qd {qd}");
            assert_eq!(seen, expected, "qd {qd}");
            assert_pattern(&copy, 0);
            assert_eq!(ring.in_flight(), 0);
        }
        // A sub-range starting mid-image.
        let mut ring = BlockRing::new(4, 4, MIB).unwrap();
        let mut got = 0;
        let read = read_linear::<DiskError>(
            &mut ring,
            &image,
            (3 * MIB) as u64..(4 * MIB + 8192) as u64,
            256 * KIB,
            |_, _| Ok(()),
            |offset, bytes| {
                assert_pattern(bytes, offset);
                got += bytes.len();
                Ok(())
            },
        )
        .unwrap();
        assert_eq!((read, got), ((MIB + 8192) as u64, MIB + 8192));
    }

    #[test]
    fn read_linear_stops_at_the_first_error_after_draining() {
        let dir = tempfile::tempdir().unwrap();
        let size = 8 * MIB;
        let image = patterned_image(dir.path(), size, DirectIo::Required);
        let mut ring = BlockRing::new(4, 4, MIB).unwrap();
        let mut chunks = 0;
        let mut claims = 0;
        let err = read_linear::<TestError>(
            &mut ring,
            &image,
            0..size as u64,
            MIB,
            |_, _| {
                claims += 1;
                Ok(())
            },
            |offset, _| {
                chunks += 1;
                if chunks == 2 {
                    Err(TestError::Stop(offset))
                } else {
                    Ok(())
                }
            },
        )
        .unwrap_err();
        assert!(matches!(err, TestError::Stop(_)), "{err:?}");
        assert_eq!(chunks, 2, "on_chunk not called after the error");
        assert!(claims < 8, "stopped queuing ({claims} claims)");
        assert_eq!(ring.in_flight(), 0, "reads in flight were waited for");

        // A failing claim stops it too; the ring is usable afterwards.
        let err = read_linear::<TestError>(
            &mut ring,
            &image,
            0..size as u64,
            MIB,
            |offset, _| {
                if offset == 3 * MIB as u64 {
                    Err(TestError::Stop(offset))
                } else {
                    Ok(())
                }
            },
            |_, _| Ok(()),
        )
        .unwrap_err();
        assert!(
            matches!(err, TestError::Stop(o) if o == 3 * MIB as u64),
            "{err:?}"
        );
        assert_eq!(ring.in_flight(), 0);

        // Bad parameters come back as the caller's error type.
        for (range, chunk) in [
            (0..size as u64 + 4096, MIB),
            (512..size as u64, MIB),
            (0..size as u64, 2 * MIB),
            (0..size as u64, 1000),
        ] {
            let err = read_linear::<TestError>(
                &mut ring,
                &image,
                range.clone(),
                chunk,
                |_, _| Ok(()),
                |_, _| Ok(()),
            )
            .unwrap_err();
            match err {
                TestError::Disk(e) => assert!(!e.to_string().is_empty()),
                other => panic!("{range:?} {chunk}: {other:?}"),
            }
        }
        let read = read_linear::<TestError>(
            &mut ring,
            &image,
            4096..4096,
            MIB,
            |_, _| Ok(()),
            |_, _| Ok(()),
        )
        .unwrap();
        assert_eq!(read, 0);
    }

    /// Throughput of `read_linear` on a 1 GiB O_DIRECT file in /work, QD 16 against QD 1
    /// in the same run: `cargo test --release -p ferry-dataplane --lib
    /// disk::uring::tests::read_linear_throughput -- --ignored --nocapture`.
    #[test]
    #[ignore = "writes and reads 1 GiB"]
    fn read_linear_throughput() {
        let base = std::env::var_os("FERRY_BENCH_DIR").unwrap_or_else(|| "/work".into());
        let dir = tempfile::tempdir_in(base).unwrap();
        let size = 1usize << 30;
        let image = patterned_image(dir.path(), size, DirectIo::Required);
        image.sync().unwrap();
        assert!(image.is_direct());
        for qd in [1u32, 16, 1, 16] {
            let mut ring = BlockRing::new(qd, qd as usize, MIB).unwrap();
            let mut sum = 0u64;
            let started = std::time::Instant::now();
            let read = read_linear::<DiskError>(
                &mut ring,
                &image,
                0..size as u64,
                MIB,
                |_, _| Ok(()),
                |_, bytes| {
                    sum = sum.wrapping_add(bytes[0] as u64);
                    Ok(())
                },
            )
            .unwrap();
            let secs = started.elapsed().as_secs_f64();
            println!(
                "read_linear qd {qd:2}: {read} bytes in {secs:.3} s = {:.0} MiB/s (registered {})",
                read as f64 / secs / MIB as f64,
                ring.registered()
            );
        }
        image.remove().unwrap();
    }
}
