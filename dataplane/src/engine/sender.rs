//! One stream's share of a pre-copy round: walk the stream's blocks of the dirty set, turn
//! runs of pages into frames (zero pages as markers), hash pages as they are sent, and hand
//! batches to the transport.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use super::pacer::Pacer;
use super::EngineError;
use crate::memory::{
    page_hash, DirtyBitmap, GuestMemory, MemoryDigest, PageArmer, PAGE_SIZE, ZERO_PAGE_HASH,
};
use crate::transport::{SourceTransport, TransportError, BLOCK_PAGES};
use crate::wire::{Frame, FRAME_HEADER_LEN};

/// Frames gathered before one transport call.
const FRAMES_PER_BATCH: usize = 128;
/// Payload gathered before one transport call.
const BATCH_BYTES: u64 = 256 << 10;

/// Tells the round's driver that a sender finished, even if it panicked.
pub(super) struct DoneOnDrop(pub(super) crossbeam_channel::Sender<()>);

impl Drop for DoneOnDrop {
    fn drop(&mut self) {
        let _ = self.0.send(());
    }
}

#[derive(Default)]
pub(super) struct RoundCounters {
    pub(super) bytes: AtomicU64,
    pub(super) pages: AtomicU64,
}

pub(super) struct StreamSent {
    pub(super) bytes: u64,
    pub(super) pages: u64,
    pub(super) zero_pages: u64,
}

/// One stream's share of a round: the blocks `b` with `b % streams == stream`.
pub(super) struct StreamSender<'a> {
    pub(super) stream: usize,
    pub(super) streams: usize,
    pub(super) round: u32,
    pub(super) memory: &'a GuestMemory,
    pub(super) digest: &'a MemoryDigest,
    /// Round 0 only: arms each block of the tracker before its pages are read.
    pub(super) armer: Option<&'a dyn PageArmer>,
    pub(super) transport: &'a dyn SourceTransport,
    pub(super) pacer: &'a Pacer,
    pub(super) counters: &'a RoundCounters,
    pub(super) abort: &'a AtomicBool,
}

impl StreamSender<'_> {
    pub(super) fn send(&self, pages: &DirtyBitmap) -> Result<StreamSent, EngineError> {
        let mut out = StreamSent {
            bytes: 0,
            pages: 0,
            zero_pages: 0,
        };
        let mut frames: Vec<Frame> = Vec::with_capacity(FRAMES_PER_BATCH + 2);
        let mut payload = 0u64;
        let total_pages = self.memory.pages();
        let blocks = total_pages.div_ceil(BLOCK_PAGES);
        for block in (self.stream..blocks).step_by(self.streams) {
            let start = block * BLOCK_PAGES;
            let end = (start + BLOCK_PAGES).min(total_pages);
            if let Some(armer) = self.armer {
                // Before any page of the block is read: a write from now on is tracked, a
                // write before it is in the bytes read below.
                armer.arm(start, end - start)?;
            }
            for (first, count) in pages.runs_in(start, end, BLOCK_PAGES) {
                let mut delta = 0u64;
                for page in first..first + count {
                    // Hashed as sent, right before the transport reads the same bytes
                    // (see memory::digest for why a racing write is harmless).
                    let hash = page_hash(self.memory.page(page));
                    delta = delta.wrapping_add(self.digest.record(page, hash));
                    let zero = hash == ZERO_PAGE_HASH;
                    push_page(&mut frames, self.round, page as u64, zero);
                    if zero {
                        out.zero_pages += 1;
                    } else {
                        out.pages += 1;
                        payload += PAGE_SIZE as u64;
                    }
                }
                self.digest.apply(delta);
                if frames.len() >= FRAMES_PER_BATCH || payload >= BATCH_BYTES {
                    out.bytes += self.flush(&mut frames, &mut payload)?;
                }
            }
        }
        frames.push(Frame::RoundEnd {
            round: self.round,
            pages: out.pages + out.zero_pages,
        });
        out.bytes += self.flush(&mut frames, &mut payload)?;
        Ok(out)
    }

    fn flush(&self, frames: &mut Vec<Frame>, payload: &mut u64) -> Result<u64, EngineError> {
        let pages: u64 = frames
            .iter()
            .map(|f| match *f {
                Frame::Pages { count, .. } | Frame::ZeroPages { count, .. } => count as u64,
                Frame::RoundEnd { .. } => 0,
            })
            .sum();
        let wire_bytes = *payload + (frames.len() * FRAME_HEADER_LEN) as u64;
        let stop = || self.abort.load(Ordering::Relaxed);
        if !self.pacer.acquire(wire_bytes, &stop) || stop() {
            return Err(TransportError::Shutdown.into());
        }
        let sent = self.transport.send(self.stream, self.memory, frames)?;
        self.counters.bytes.fetch_add(sent, Ordering::Relaxed);
        self.counters.pages.fetch_add(pages, Ordering::Relaxed);
        frames.clear();
        *payload = 0;
        Ok(sent)
    }
}

/// Appends `page` to the last frame when it continues it (same kind, next page, same
/// block), else starts a new frame.
fn push_page(frames: &mut Vec<Frame>, round: u32, page: u64, zero: bool) {
    let same_block = |first: u64| first as usize / BLOCK_PAGES == page as usize / BLOCK_PAGES;
    match frames.last_mut() {
        Some(Frame::Pages { first, count, .. })
            if !zero && *first + *count as u64 == page && same_block(*first) =>
        {
            *count += 1
        }
        Some(Frame::ZeroPages { first, count, .. })
            if zero && *first + *count as u64 == page && same_block(*first) =>
        {
            *count += 1
        }
        _ if zero => frames.push(Frame::ZeroPages {
            round,
            first: page,
            count: 1,
        }),
        _ => frames.push(Frame::Pages {
            round,
            first: page,
            count: 1,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_follow_runs_and_block_boundaries() {
        let mut frames = Vec::new();
        for (page, zero) in [
            (0, false),
            (1, false),
            (2, true),
            (3, true),
            (5, false),
            (255, false),
            (256, false),
        ] {
            push_page(&mut frames, 7, page, zero);
        }
        assert_eq!(
            frames,
            vec![
                Frame::Pages {
                    round: 7,
                    first: 0,
                    count: 2
                },
                Frame::ZeroPages {
                    round: 7,
                    first: 2,
                    count: 2
                },
                Frame::Pages {
                    round: 7,
                    first: 5,
                    count: 1
                },
                Frame::Pages {
                    round: 7,
                    first: 255,
                    count: 1
                },
                Frame::Pages {
                    round: 7,
                    first: 256,
                    count: 1
                },
            ]
        );
    }
}
