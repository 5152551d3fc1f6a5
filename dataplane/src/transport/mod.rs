//! Moving pages between hosts.
//!
//! The engine talks to a [`SourceTransport`] and a [`DestinationTransport`]; it never knows
//! whether the bytes travel over TCP or (in a later transport) RDMA. A transport preserves
//! order per stream, and the engine maps each page to a fixed stream, so a page sent twice
//! can never land out of order.

pub mod ack;
mod disk_landing;
mod ledger;
pub mod rdma;
pub mod tcp;
pub mod tcp_disk;

use std::sync::Arc;

use std::time::Instant;

use crate::disk::{DiskError, DiskImage};
use crate::memory::{GuestMemory, MemoryDigest};
use crate::numa::{self, ThreadRole};
use crate::wire::{self, Frame, WireError};

/// Pages per block: the unit of the page-to-stream mapping (1 MiB).
pub const BLOCK_PAGES: usize = 256;

/// The stream that carries `page`. Fixed for a migration, so that a page sent in two rounds
/// travels on one ordered stream and the older copy can never land after the newer one,
/// and so that each destination page is written by exactly one receiver.
pub fn stream_for_page(page: usize, streams: usize) -> usize {
    (page / BLOCK_PAGES) % streams
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("stream {stream}: i/o error while {op}")]
    Io {
        stream: usize,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("stream {stream}: bad frame")]
    Wire { stream: usize, source: WireError },
    #[error("stream {stream}: frame for round {round} arrived after round {expected} ended")]
    Sequence {
        stream: usize,
        round: u32,
        expected: u32,
    },
    #[error(
        "stream {stream}: pages {first}..{first}+{count} belong to another stream or cross a block"
    )]
    WrongStream {
        stream: usize,
        first: u64,
        count: u64,
    },
    #[error("stream {stream}: round {round} ended with {claimed} pages, but {landed} landed")]
    CountMismatch {
        stream: usize,
        round: u32,
        claimed: u64,
        landed: u64,
    },
    #[error("stream {stream} index out of range (transport has {streams})")]
    NoSuchStream { stream: usize, streams: usize },
    #[error("transport was shut down")]
    Shutdown,
    #[error("disk link closed: {reason}")]
    LinkClosed { reason: String },
    #[error("the destination acknowledged request {id}, which was never sent (or twice)")]
    UnexpectedAck { id: u32 },
    #[error("request {id} has no ticket")]
    UnknownTicket { id: u32 },
    #[error("the destination did not acknowledge request {id} in time")]
    AckTimeout { id: u32 },
    #[error("the destination failed to write request {id}: {}", std::io::Error::from_raw_os_error(*errno as i32))]
    PeerWriteFailed { id: u32, errno: u32 },
    #[error("disk link {stream}: a {len}-byte request exceeds the {limit}-byte buffers announced for this migration")]
    DiskRequestTooLarge {
        stream: usize,
        len: u32,
        limit: usize,
    },
    #[error("disk link {stream}: frame of an unexpected kind: {what}")]
    UnexpectedDiskFrame { stream: usize, what: String },
    #[error("disk link {stream}")]
    Disk { stream: usize, source: DiskError },
    #[error("RDMA lane {stream}")]
    Rdma {
        stream: usize,
        source: rdma::RdmaError,
    },
}

/// What a receiving stream reports to the destination engine.
#[derive(Debug)]
pub enum ReceiveEvent {
    /// Stream `stream` finished `round`, having landed `pages` pages in it.
    RoundEnd {
        stream: usize,
        round: u32,
        pages: u64,
    },
    /// Stream `stream` failed; the migration cannot complete.
    Failed {
        stream: usize,
        error: TransportError,
    },
}

/// Starts a receiver thread named `name` for `stream` (a transport thread, on the NIC's
/// node: [`crate::numa`]): it runs `run` and reports an error it returns to the engine as
/// [`ReceiveEvent::Failed`] (a clean end reports nothing).
pub(crate) fn spawn_receiver(
    name: String,
    stream: usize,
    events: crossbeam_channel::Sender<ReceiveEvent>,
    run: impl FnOnce(&crossbeam_channel::Sender<ReceiveEvent>) -> Result<(), TransportError>
        + Send
        + 'static,
) -> Result<std::thread::JoinHandle<()>, TransportError> {
    numa::spawn(ThreadRole::Transport, name, move || {
        if let Err(error) = run(&events) {
            let _ = events.send(ReceiveEvent::Failed { stream, error });
        }
    })
    .map_err(|source| TransportError::Io {
        stream,
        op: "spawning a receiver",
        source,
    })
}

/// The frame of bulk-copy request `id`: `len` bytes at `offset` of `disk`, carrying data
/// or (`zero`) a zero marker.
pub(crate) fn chunk_frame(
    disk: u32,
    offset: u64,
    len: u32,
    zero: bool,
) -> impl Fn(u32) -> wire::DiskFrame {
    move |id| {
        if zero {
            wire::DiskFrame::Zero {
                disk,
                id,
                offset,
                len,
            }
        } else {
            wire::DiskFrame::Chunk {
                disk,
                id,
                offset,
                len,
            }
        }
    }
}

/// The frame of mirrored write request `id` of `data` at `offset` of `disk` (`stream` is
/// the mirror lane's number in errors).
pub(crate) fn mirror_frame(
    stream: usize,
    disk: u32,
    offset: u64,
    data: &[u8],
) -> Result<impl Fn(u32) -> wire::DiskFrame, TransportError> {
    let len = u32::try_from(data.len()).map_err(|_| TransportError::DiskRequestTooLarge {
        stream,
        len: u32::MAX,
        limit: u32::MAX as usize,
    })?;
    Ok(move |id| wire::DiskFrame::Write {
        disk,
        id,
        offset,
        len,
    })
}

/// The sending half. Each stream is driven by one thread at a time.
pub trait SourceTransport: Send + Sync {
    /// "tcp", "rdma".
    fn name(&self) -> &'static str;
    fn streams(&self) -> usize;
    /// Sends `frames` in order on `stream`; a [`Frame::Pages`] carries its pages from
    /// `memory`. Every page a frame names must belong to `stream` ([`stream_for_page`]) and a
    /// frame must not cross a block. Returns the bytes put on the wire.
    fn send(
        &self,
        stream: usize,
        memory: &GuestMemory,
        frames: &[Frame],
    ) -> Result<u64, TransportError>;
    /// Closes every stream (wakes any blocked sender with an error).
    fn shutdown(&self);
}

/// The receiving half: lands pages straight into guest memory and keeps the digest.
pub trait DestinationTransport: Send {
    fn name(&self) -> &'static str;
    fn streams(&self) -> usize;
    /// Starts one receiver per stream; each reports to `events` and exits on error or shutdown.
    fn start(
        &mut self,
        memory: Arc<GuestMemory>,
        digest: Arc<MemoryDigest>,
        events: crossbeam_channel::Sender<ReceiveEvent>,
    ) -> Result<(), TransportError>;
    /// Stops the receivers and joins them.
    fn shutdown(&mut self);
}

/// The source's half of the disk path: a bulk lane (chunks, zero markers) and a mirror lane
/// (guest writes), each ordered, with an acknowledgement coming back for every request once
/// the destination has written it.
pub trait DiskSource: Send + Sync {
    fn name(&self) -> &'static str;
    /// Sends a bulk-copy chunk of `len` bytes at `offset`: `data` (len bytes), or `None`
    /// for a chunk that is all zero. Returns the ticket its acknowledgement completes.
    fn send_chunk(
        &self,
        disk: u32,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> Result<u32, TransportError>;
    /// Sends a mirrored guest write.
    fn send_write(&self, disk: u32, offset: u64, data: &[u8]) -> Result<u32, TransportError>;
    /// Waits for a ticket's acknowledgement.
    fn wait(&self, ticket: u32, deadline: Instant) -> Result<(), TransportError>;
    /// A ticket's outcome if already known.
    fn poll(&self, ticket: u32) -> Option<Result<(), TransportError>>;
    /// Bytes put on the wire so far (headers included).
    fn bytes_sent(&self) -> u64;
    /// Closes both lanes; every wait fails.
    fn shutdown(&self);
}

/// A disk as the destination lands it.
pub struct LandingDisk {
    pub image: Arc<DiskImage>,
    /// One entry per block, updated when a write completes (before its ack).
    pub digest: Arc<MemoryDigest>,
    /// The image was created for this migration and reads as zero: zero chunks need no write.
    pub fresh: bool,
}

/// The destination's half of the disk path.
pub trait DiskDestination: Send {
    /// Starts the receivers: `chunk_bytes` is the largest request the source announced.
    fn start(
        &mut self,
        disks: Vec<LandingDisk>,
        chunk_bytes: usize,
        queue_depth: u32,
        events: crossbeam_channel::Sender<ReceiveEvent>,
    ) -> Result<(), TransportError>;
    /// Stops the receivers and joins them.
    fn shutdown(&mut self);
}
