//! The trace phase: arm the dirty tracker, then hash every page once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tracing::info;

use super::EngineError;
use crate::guest::Guest;
use crate::memory::{page_hash, DirtyTracker, MemoryDigest};
use crate::numa::{self, ThreadRole};
use crate::transport::BLOCK_PAGES;

/// The trace phase's result: the tracker is armed and every page has been hashed once.
///
/// Made by [`trace`], ideally while the destination prepares (it pre-faults its memory,
/// which takes longer than hashing here), so that round 0 streams pages without hashing
/// them on the way: on a CPU-bound link this is what lets the stream run at raw TCP speed.
///
/// Why hashes taken before the send are sound: the tracker was armed before any page was
/// hashed. A page whose bytes change between its hash and its round-0 send was written
/// after tracking started, so it is in the next collection and is sent (and hashed) again.
/// Zero pages found here go out as zero markers in round 0 on the same argument.
pub struct Trace {
    pub(super) digest: MemoryDigest,
    pub(super) traced_pages: usize,
    elapsed: Duration,
}

impl Trace {
    /// How long hashing took.
    pub fn elapsed(&self) -> Duration {
        self.elapsed
    }
}

/// Pages each hashing task takes at a time (cancel is checked in between).
const TRACE_CHUNK_PAGES: usize = 16 * BLOCK_PAGES;

/// Starts write tracking and hashes every page of `guest` (on all cores). Cancellable.
pub fn trace(
    guest: &dyn Guest,
    tracker: &mut dyn DirtyTracker,
    cancel: &AtomicBool,
) -> Result<Trace, EngineError> {
    let started = Instant::now();
    let memory = guest.memory();
    // Arm first: every hash below is taken after tracking started.
    tracker.start()?;
    let digest = MemoryDigest::new_zeroed(memory.pages());
    let pages = memory.pages();
    let next_chunk = AtomicUsize::new(0);
    // One per tracker CPU (every core without a placement).
    let workers = numa::parallelism(ThreadRole::Tracker).min(pages.div_ceil(TRACE_CHUNK_PAGES));
    std::thread::scope(|scope| {
        for worker in 0..workers {
            let (digest, next_chunk) = (&digest, &next_chunk);
            numa::spawn_scoped(
                scope,
                ThreadRole::Tracker,
                format!("ferry-trace-{worker}"),
                move || loop {
                    let first = next_chunk.fetch_add(TRACE_CHUNK_PAGES, Ordering::Relaxed);
                    if first >= pages || cancel.load(Ordering::Relaxed) {
                        return;
                    }
                    let delta =
                        (first..(first + TRACE_CHUNK_PAGES).min(pages)).fold(0u64, |acc, page| {
                            acc.wrapping_add(digest.record(page, page_hash(memory.page(page))))
                        });
                    digest.apply(delta);
                },
            )
            .expect("spawning a trace thread");
        }
    });
    if cancel.load(Ordering::Relaxed) {
        return Err(EngineError::Cancelled);
    }
    info!(
        pages,
        ms = started.elapsed().as_secs_f64() * 1e3,
        "trace phase: tracking armed, every page hashed"
    );
    Ok(Trace {
        digest,
        traced_pages: pages,
        elapsed: started.elapsed(),
    })
}
