//! The trace phase: arm the dirty tracker, just before round 0.

use std::time::{Duration, Instant};

use tracing::info;

use super::EngineError;
use crate::guest::Guest;
use crate::memory::{DirtyTracker, MemoryDigest};

/// The trace phase's result: the tracker is armed, and the source's digest starts as that
/// of fresh (all-zero) memory, which is the destination's starting state too.
///
/// Nothing is hashed here. Round 0 sends every page, and every round hashes each page as it
/// sends it, right before the socket copy reads the same bytes: the hash brings the page
/// into the cache that the copy then reads from, so hashing costs the compute alone. A
/// separate pass over memory before round 0 (what ferry did before) read all of it from
/// DRAM twice and, with the destination already prepared, sat on the critical path: about
/// 0.2 s of CPU and up to 0.4 s of wall time per GiB on the benchmark host.
///
/// Arming right before round 0, not earlier (for instance while the destination
/// pre-faults), keeps pages written before round 0 reads them out of round 1: round 0 sends
/// their newest bytes anyway.
pub(super) struct Trace {
    pub(super) digest: MemoryDigest,
    pub(super) elapsed: Duration,
}

/// Starts write tracking of every page of `guest`.
pub(super) fn trace(
    guest: &dyn Guest,
    tracker: &mut dyn DirtyTracker,
) -> Result<Trace, EngineError> {
    let started = Instant::now();
    let pages = guest.memory().pages();
    // Armed first: every hash any round takes is taken after tracking started, so a page
    // whose bytes change after its hash is in a later dirty set.
    tracker.start()?;
    let digest = MemoryDigest::new_zeroed(pages);
    let elapsed = started.elapsed();
    info!(
        pages,
        ms = elapsed.as_secs_f64() * 1e3,
        "trace phase: tracking armed"
    );
    Ok(Trace { digest, elapsed })
}
