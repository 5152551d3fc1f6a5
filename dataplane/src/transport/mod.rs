//! Moving pages between hosts.
//!
//! The engine talks to a [`SourceTransport`] and a [`DestinationTransport`]; it never knows
//! whether the bytes travel over TCP or (in a later transport) RDMA. A transport preserves
//! order per stream, and the engine maps each page to a fixed stream, so a page sent twice
//! can never land out of order.

pub mod tcp;

use std::sync::Arc;

use crate::memory::{GuestMemory, MemoryDigest};
use crate::wire::{Frame, WireError};

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
