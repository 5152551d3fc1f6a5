//! Moving pages between hosts.
//!
//! The engine talks to a [`SourceTransport`] and a [`DestinationTransport`]; it never knows
//! whether the bytes travel over TCP or (in a later transport) RDMA. A transport preserves
//! order per stream, and the engine maps each page to a fixed stream, so a page sent twice
//! can never land out of order.

pub mod tcp;

use std::sync::Arc;

use crate::memory::{GuestMemory, MemoryDigest};
use crate::wire::WireError;

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("stream {stream}: i/o error while {op}")]
    Io { stream: usize, op: &'static str, source: std::io::Error },
    #[error("stream {stream}: bad frame")]
    Wire { stream: usize, source: WireError },
    #[error("stream {stream}: frame for round {round} arrived after round {expected} ended")]
    Sequence { stream: usize, round: u32, expected: u32 },
    #[error("stream {stream} index out of range (transport has {streams})")]
    NoSuchStream { stream: usize, streams: usize },
    #[error("transport was shut down")]
    Shutdown,
}

/// What a receiving stream reports to the destination engine.
#[derive(Debug)]
pub enum ReceiveEvent {
    /// Stream `stream` finished `round`, having landed `pages` pages in it.
    RoundEnd { stream: usize, round: u32, pages: u64 },
    /// Stream `stream` failed; the migration cannot complete.
    Failed { stream: usize, error: TransportError },
}

/// The sending half. Each stream is driven by one thread at a time.
pub trait SourceTransport: Send + Sync {
    /// "tcp", "rdma".
    fn name(&self) -> &'static str;
    fn streams(&self) -> usize;
    /// Sends pages `first..first + count` of `memory` (all non-zero) on `stream`. Returns the
    /// bytes put on the wire.
    fn send_pages(&self, stream: usize, memory: &GuestMemory, first: usize, count: usize, round: u32) -> Result<u64, TransportError>;
    /// Announces that pages `first..first + count` are all zero.
    fn send_zero_pages(&self, stream: usize, first: usize, count: usize, round: u32) -> Result<u64, TransportError>;
    /// Marks the end of `round` on `stream` (`pages` = pages this stream sent in the round).
    fn end_round(&self, stream: usize, round: u32, pages: u64) -> Result<u64, TransportError>;
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
