//! The trace phase: start the dirty tracker, just before round 0, which arms it block by
//! block.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use super::EngineError;
use crate::guest::Guest;
use crate::memory::{DirtyTracker, MemoryDigest, PageArmer};

/// The trace phase's result: the tracker is started, with `armer` to arm each block just
/// before round 0 reads it ([`DirtyTracker::start_deferred`]), and the source's digest
/// starts as that of fresh (all-zero) memory, which is the destination's starting state
/// too.
///
/// Nothing is hashed here. Round 0 sends every page, and every round hashes each page as it
/// sends it, right before the socket copy reads the same bytes from the cache the hash
/// filled. A separate pass over memory before round 0 (what ferry did before) read all of
/// it from DRAM a second time and, with the destination already prepared, sat on the
/// critical path: about 0.5 s of CPU and 0.3–0.6 s of wall time per GiB on the benchmark
/// host.
///
/// Arming each block as round 0 reaches it, not all of memory up front (let alone while the
/// destination pre-faults), keeps pages written before round 0 reaches them out of round 1:
/// round 0 sends their newest bytes anyway. It also takes write-protecting the page tables
/// (25 ms per GiB) off the critical path and spreads it over the senders.
pub(super) struct Trace {
    pub(super) digest: MemoryDigest,
    pub(super) armer: Arc<dyn PageArmer>,
    pub(super) elapsed: Duration,
}

/// Starts write tracking of `guest`, deferred: round 0 arms each block before it reads it,
/// so every hash any round takes is taken after its page was armed, and a page whose bytes
/// change after its hash is in a later dirty set.
pub(super) fn trace(
    guest: &dyn Guest,
    tracker: &mut dyn DirtyTracker,
) -> Result<Trace, EngineError> {
    let started = Instant::now();
    let pages = guest.memory().pages();
    let armer = tracker.start_deferred()?;
    let digest = MemoryDigest::new_zeroed(pages);
    let elapsed = started.elapsed();
    info!(
        pages,
        ms = elapsed.as_secs_f64() * 1e3,
        "trace phase: tracking started; round 0 arms each block as it reaches it"
    );
    Ok(Trace {
        digest,
        armer,
        elapsed,
    })
}
