//! What every memory receiver checks and counts, whatever carried the bytes: frames of the
//! current round only, pages of this stream only, zero pages landed, and a round's end
//! matching the pages that landed in it. TCP reads payload into place itself; RDMA finds it
//! already written by the source's device; both account here.

use crossbeam_channel::Sender;

use super::{stream_for_page, ReceiveEvent, TransportError, BLOCK_PAGES};
use crate::memory::{GuestMemory, MemoryDigest, ZERO_PAGE_HASH};
use crate::wire::Frame;

pub(super) struct StreamLedger {
    stream: usize,
    streams: usize,
    round: u32,
    landed_in_round: u64,
}

/// Whether the receiver goes on after a frame.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Next {
    Continue,
    /// The engine is gone: nothing left to report to.
    Stop,
}

impl StreamLedger {
    pub(super) fn new(stream: usize, streams: usize) -> Self {
        Self {
            stream,
            streams,
            round: 0,
            landed_in_round: 0,
        }
    }

    /// Checks a page-carrying frame before its payload is touched: it belongs to the
    /// current round and to this stream's blocks.
    pub(super) fn admit(&self, frame: &Frame) -> Result<(), TransportError> {
        if let Frame::Pages {
            round,
            first,
            count,
        }
        | Frame::ZeroPages {
            round,
            first,
            count,
        } = *frame
        {
            self.check_round(round)?;
            check_owner(self.stream, self.streams, first, count)?;
        }
        Ok(())
    }

    fn check_round(&self, round: u32) -> Result<(), TransportError> {
        if round != self.round {
            return Err(TransportError::Sequence {
                stream: self.stream,
                round,
                expected: self.round,
            });
        }
        Ok(())
    }

    /// `count` pages of an admitted frame have landed and been recorded in the digest.
    pub(super) fn landed(&mut self, count: u32) {
        self.landed_in_round += count as u64;
    }

    /// Lands an admitted zero-pages frame.
    pub(super) fn land_zero(
        &mut self,
        memory: &GuestMemory,
        digest: &MemoryDigest,
        first: u64,
        count: u32,
    ) {
        let (first, count) = (first as usize, count as usize);
        let delta = (first..first + count).fold(0u64, |acc, p| {
            memory.zero_page(p);
            acc.wrapping_add(digest.record(p, ZERO_PAGE_HASH))
        });
        digest.apply(delta);
        self.landed(count as u32);
    }

    /// A round-end frame: checks it and reports the round to the engine.
    pub(super) fn round_end(
        &mut self,
        round: u32,
        pages: u64,
        events: &Sender<ReceiveEvent>,
    ) -> Result<Next, TransportError> {
        self.check_round(round)?;
        if pages != self.landed_in_round {
            return Err(TransportError::CountMismatch {
                stream: self.stream,
                round,
                claimed: pages,
                landed: self.landed_in_round,
            });
        }
        let event = ReceiveEvent::RoundEnd {
            stream: self.stream,
            round,
            pages,
        };
        if events.send(event).is_err() {
            return Ok(Next::Stop);
        }
        self.round += 1;
        self.landed_in_round = 0;
        Ok(Next::Continue)
    }
}

/// Pages `first..first + count` are a non-empty run within one block of `stream`.
pub(super) fn check_owner(
    stream: usize,
    streams: usize,
    first: u64,
    count: u32,
) -> Result<(), TransportError> {
    let wrong = TransportError::WrongStream {
        stream,
        first,
        count: count as u64,
    };
    if count == 0 {
        return Err(wrong);
    }
    let last = first + count as u64 - 1;
    let same_block = first as usize / BLOCK_PAGES == last as usize / BLOCK_PAGES;
    if !same_block || stream_for_page(first as usize, streams) != stream {
        return Err(wrong);
    }
    Ok(())
}
