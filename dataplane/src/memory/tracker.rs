//! Which guest pages were written: the [`DirtyTracker`] seam and its implementations.
//!
//! - [`UffdWpTracker`]: the kernel's write tracking. Guest memory is registered with a
//!   userfaultfd in asynchronous write-protect mode (Linux 6.7+): a write to a protected
//!   page is resolved by the kernel on the spot, without a message to us, and the page
//!   just loses its protection. One `PAGEMAP_SCAN` ioctl then both lists the unprotected
//!   ("written") pages and protects them again, page by page under the page-table lock, so
//!   a write that lands after its page was listed faults again and is listed next time.
//!   No soft-dirty bits (absent from this kernel) and no per-fault messages are involved.
//! - [`FullTracker`]: every page, every time. The fallback for hosts without
//!   asynchronous userfaultfd write-protection, and the baseline in tests.
//!
//! # Why a collected page is never missed
//! `collect` returns the pages written since the previous `collect`. A write that races
//! with the scan lands either before its page's entry is re-protected (listed now) or
//! after (faults and is listed next time). Writes through a CPU's stale TLB entry in
//! between are flushed before the ioctl returns, so they happen before the caller reads
//! the page to send it. The engine must therefore read page contents *after* `collect`
//! returns, which is what it does anyway.
//!
//! # What the kernel tracking does not see
//! Writes that bypass the CPU page tables: device DMA into pinned pages (RDMA, VFIO,
//! `O_DIRECT` reads into guest memory). Pinning for write counts as one write at pin
//! time; the device's later writes are invisible. Guest memory written that way on the
//! source must be handled by whoever owns the device.

use std::io;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::bitmap::DirtyBitmap;
use super::region::{GuestMemory, PAGE_SIZE};
use super::uffd::{
    PageRegion, Pagemap, PmScanArg, UffdioRange, Userfaultfd, PAGE_IS_WRITTEN,
    PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING, UFFDIO_REGISTER_MODE_WP,
    UFFDIO_WRITEPROTECT_MODE_WP, UFFDIO_WRITEPROTECT_NR, UFFD_FEATURE_WP_ASYNC,
    UFFD_FEATURE_WP_HUGETLBFS_SHMEM, UFFD_FEATURE_WP_UNPOPULATED, UFFD_USER_MODE_ONLY,
};

/// Regions one `PAGEMAP_SCAN` call may return (24 bytes each: 96 KiB). A scan that finds
/// more written runs than this continues in further calls.
pub const REGIONS_PER_SCAN_DEFAULT: usize = 4096;
/// The largest result vector [`UffdWpTracker::with_regions_per_scan`] accepts (24 MiB).
pub const REGIONS_PER_SCAN_MAX: usize = 1 << 20;

/// The userfaultfd features asynchronous write tracking of a shared memfd needs.
const FEATURES_REQUIRED: [(u64, &str); 3] = [
    (UFFD_FEATURE_WP_ASYNC, "UFFD_FEATURE_WP_ASYNC"),
    (UFFD_FEATURE_WP_UNPOPULATED, "UFFD_FEATURE_WP_UNPOPULATED"),
    (
        UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
        "UFFD_FEATURE_WP_HUGETLBFS_SHMEM",
    ),
];
const FEATURES_REQUIRED_MASK: u64 =
    UFFD_FEATURE_WP_ASYNC | UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;

/// Flags of the userfaultfd itself: we never read messages (asynchronous mode sends none),
/// so non-blocking; user-mode-only lets unprivileged processes open it.
const UFFD_OPEN_FLAGS: libc::c_int = libc::O_CLOEXEC | libc::O_NONBLOCK | UFFD_USER_MODE_ONLY;

#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("dirty tracking needs {feature}, which this host does not provide: {reason}")]
    Unsupported {
        feature: &'static str,
        reason: String,
    },
    #[error("{op} failed")]
    Syscall { op: &'static str, source: io::Error },
    #[error("guest memory of {bytes} bytes is already registered with another userfaultfd (is another tracker alive?)")]
    AlreadyRegistered { bytes: usize, source: io::Error },
    #[error("collect() called before start()")]
    NotStarted,
    #[error("start() called twice; tracking is started once, before round 0")]
    AlreadyStarted,
    #[error("PAGEMAP_SCAN returned region {start:#x}..{end:#x}, not page-aligned inside the scanned range {scan_start:#x}..{scan_end:#x}")]
    ScanRegionOutOfRange {
        start: u64,
        end: u64,
        scan_start: u64,
        scan_end: u64,
    },
    #[error("PAGEMAP_SCAN did not finish {pages} pages within {calls_max} calls")]
    ScanCallsExceeded { calls_max: usize, pages: usize },
}

/// Which guest pages were written. Every lifecycle method is required.
pub trait DirtyTracker: Send {
    /// Begins tracking: from now on every write to guest memory is recorded. Called once, before round 0.
    fn start(&mut self) -> Result<(), TrackerError>;
    /// Begins tracking with no page armed yet, instead of [`DirtyTracker::start`]: the caller
    /// arms each range with the returned [`PageArmer`] before it reads it, and must arm
    /// every page before the first collect (a page never armed is reported written).
    ///
    /// Round 0 arms each block just before sending it. A write that lands before a block is
    /// armed is in the bytes round 0 reads after arming; a write after it is tracked. So a
    /// page written early in round 0, before round 0 reached it, is not sent again in
    /// round 1, as it would be with everything armed up front (about half of round 1 on a
    /// uniformly dirtying guest).
    fn start_deferred(&mut self) -> Result<Arc<dyn PageArmer>, TrackerError>;
    /// Returns the pages written since the previous collect (or start) and re-arms tracking on them,
    /// such that a write that lands after a page was collected shows up in the NEXT collection.
    /// Also returns (and clears) anything put back with put_back.
    fn collect(&mut self) -> Result<DirtyBitmap, TrackerError>;
    /// Puts back pages that were collected but not sent (a send failed): the next collect returns them too.
    /// A collected dirty set is never lost.
    fn put_back(&mut self, pages: &DirtyBitmap);
    /// Short name for logs and reports, e.g. "uffd-wp-async".
    fn name(&self) -> &'static str;
}

/// Arms tracking of page ranges after [`DirtyTracker::start_deferred`]. Shared by the
/// sending threads; each arms its own ranges.
pub trait PageArmer: Send + Sync {
    /// From now on every write to pages `first..first + count` is recorded.
    fn arm(&self, first: usize, count: usize) -> Result<(), TrackerError>;
}

/// The armer of a tracker that needs no arming ([`FullTracker`]).
struct NothingToArm;

impl PageArmer for NothingToArm {
    fn arm(&self, _first: usize, _count: usize) -> Result<(), TrackerError> {
        Ok(())
    }
}

/// Write-protects ranges of a [`UffdWpTracker`]'s registered guest memory.
struct UffdArmer {
    uffd: Arc<Userfaultfd>,
    /// The registered range: the whole guest mapping.
    range: UffdioRange,
}

impl PageArmer for UffdArmer {
    fn arm(&self, first: usize, count: usize) -> Result<(), TrackerError> {
        let pages = self.range.len / PAGE_SIZE as u64;
        let end = first.checked_add(count).map(|e| e as u64);
        if end.is_none_or(|end| end > pages) {
            return Err(TrackerError::Syscall {
                op: "UFFDIO_WRITEPROTECT",
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("pages {first}..+{count} outside the {pages} tracked pages"),
                ),
            });
        }
        let range = UffdioRange {
            start: self.range.start + (first * PAGE_SIZE) as u64,
            len: (count * PAGE_SIZE) as u64,
        };
        self.uffd
            .write_protect(range, UFFDIO_WRITEPROTECT_MODE_WP)
            .map_err(|source| TrackerError::Syscall {
                op: "UFFDIO_WRITEPROTECT",
                source,
            })
    }
}

/// Checks, once per process, that this host can run [`UffdWpTracker`]: a userfaultfd can
/// be opened, the kernel offers asynchronous write-protection of shmem including
/// unpopulated pages, and `PAGEMAP_SCAN` exists. The error says which piece is missing
/// and why, so callers can log why they fall back to [`FullTracker`].
pub fn kernel_supports_wp_async() -> Result<(), TrackerError> {
    static PROBE: OnceLock<Result<(), (&'static str, String)>> = OnceLock::new();
    PROBE
        .get_or_init(probe_wp_async)
        .clone()
        .map_err(|(feature, reason)| TrackerError::Unsupported { feature, reason })
}

fn probe_wp_async() -> Result<(), (&'static str, String)> {
    let (uffd, source) =
        Userfaultfd::open(UFFD_OPEN_FLAGS).map_err(|e| ("userfaultfd", open_refusal_reason(&e)))?;
    // Asking for no features makes the kernel list all it has without committing to any.
    let api = uffd
        .api(0)
        .map_err(|e| ("UFFDIO_API", format!("the handshake failed: {e}")))?;
    let missing: Vec<&'static str> = FEATURES_REQUIRED
        .iter()
        .filter(|(bit, _)| api.features & bit == 0)
        .map(|(_, name)| *name)
        .collect();
    if let Some(&first) = missing.first() {
        return Err((
            first,
            format!(
                "the kernel offers userfaultfd features {:#x} and lacks {} (Linux 6.7+ with \
                 CONFIG_PTE_MARKER_UFFD_WP is needed)",
                api.features,
                missing.join(", ")
            ),
        ));
    }
    let pagemap =
        Pagemap::open().map_err(|e| ("/proc/self/pagemap", format!("cannot be opened: {e}")))?;
    // An empty, read-only scan: ENOTTY means the kernel predates PAGEMAP_SCAN (6.7).
    let mut arg = PmScanArg {
        start: 0x10000,
        end: 0x10000,
        category_mask: PAGE_IS_WRITTEN,
        return_mask: PAGE_IS_WRITTEN,
        ..PmScanArg::default()
    };
    let mut out = [PageRegion::default(); 1];
    pagemap
        .scan(&mut arg, &mut out)
        .map_err(|e| ("PAGEMAP_SCAN", format!("the ioctl is refused: {e}")))?;
    tracing::debug!(
        ?source,
        features = format_args!("{:#x}", api.features),
        "userfaultfd asynchronous write-protection available"
    );
    Ok(())
}

fn open_refusal_reason(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EPERM) => format!(
            "opening one was refused ({e}); a seccomp filter (container runtimes) or an LSM \
             blocks the syscall, and /dev/userfaultfd was not usable either"
        ),
        Some(libc::ENOSYS) => {
            format!("the kernel was built without CONFIG_USERFAULTFD ({e})")
        }
        _ => format!("opening one failed: {e}"),
    }
}

/// What the last [`UffdWpTracker::collect`] cost, for logs and benchmarks.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanStats {
    /// `PAGEMAP_SCAN` ioctls issued.
    pub calls: usize,
    /// Runs of written pages the kernel reported.
    pub regions: usize,
    /// Pages in those runs (not counting pages put back).
    pub pages: usize,
    pub elapsed: Duration,
}

/// Kernel write tracking with userfaultfd asynchronous write-protection, read and
/// re-armed with `PAGEMAP_SCAN`. See the module documentation.
///
/// The tracker holds the guest memory, so the registered range stays mapped for as long
/// as it is registered. Only one tracker can exist per guest memory at a time (the kernel
/// allows one userfaultfd per range).
pub struct UffdWpTracker {
    uffd: Arc<Userfaultfd>,
    pagemap: Pagemap,
    /// The whole guest mapping, as registered.
    range: UffdioRange,
    /// Result vector of each `PAGEMAP_SCAN` call, allocated once.
    regions: Vec<PageRegion>,
    pending: DirtyBitmap,
    started: bool,
    last_scan: ScanStats,
    /// Declared last so that it is dropped after the userfaultfd is closed.
    memory: Arc<GuestMemory>,
}

impl std::fmt::Debug for UffdWpTracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UffdWpTracker")
            .field("range", &self.range)
            .field("regions_per_scan", &self.regions.len())
            .field("pending", &self.pending.count())
            .field("started", &self.started)
            .field("last_scan", &self.last_scan)
            .finish()
    }
}

impl UffdWpTracker {
    /// Registers `memory` for write tracking; tracking begins at [`DirtyTracker::start`].
    pub fn new(memory: Arc<GuestMemory>) -> Result<Self, TrackerError> {
        Self::with_regions_per_scan(memory, REGIONS_PER_SCAN_DEFAULT)
    }

    /// Like [`UffdWpTracker::new`] with a result vector of `regions_per_scan` entries
    /// (`1..=REGIONS_PER_SCAN_MAX`, panics otherwise). Small values exercise the
    /// continuation of a scan over several calls.
    pub fn with_regions_per_scan(
        memory: Arc<GuestMemory>,
        regions_per_scan: usize,
    ) -> Result<Self, TrackerError> {
        assert!(
            (1..=REGIONS_PER_SCAN_MAX).contains(&regions_per_scan),
            "regions_per_scan {regions_per_scan} outside 1..={REGIONS_PER_SCAN_MAX}"
        );
        kernel_supports_wp_async()?;

        let (uffd, source) =
            Userfaultfd::open(UFFD_OPEN_FLAGS).map_err(|e| TrackerError::Unsupported {
                feature: "userfaultfd",
                reason: open_refusal_reason(&e),
            })?;
        let api = uffd
            .api(FEATURES_REQUIRED_MASK)
            .map_err(|source| TrackerError::Syscall {
                op: "UFFDIO_API",
                source,
            })?;
        if api.features & FEATURES_REQUIRED_MASK != FEATURES_REQUIRED_MASK {
            return Err(TrackerError::Unsupported {
                feature: "UFFD_FEATURE_WP_ASYNC",
                reason: format!(
                    "the kernel accepted the handshake but enabled only features {:#x}",
                    api.features
                ),
            });
        }

        let range = UffdioRange {
            start: memory.base_ptr() as u64,
            len: memory.len() as u64,
        };
        let ioctls =
            uffd.register(range, UFFDIO_REGISTER_MODE_WP)
                .map_err(|source| match source.raw_os_error() {
                    Some(libc::EBUSY) => TrackerError::AlreadyRegistered {
                        bytes: memory.len(),
                        source,
                    },
                    _ => TrackerError::Syscall {
                        op: "UFFDIO_REGISTER",
                        source,
                    },
                })?;
        if ioctls & (1 << UFFDIO_WRITEPROTECT_NR) == 0 {
            return Err(TrackerError::Unsupported {
                feature: "UFFDIO_WRITEPROTECT",
                reason: format!(
                    "registering guest memory offered ioctls {ioctls:#x}, without write-protect"
                ),
            });
        }
        // Opened once: every collect scans through the same descriptor.
        let pagemap = Pagemap::open().map_err(|source| TrackerError::Syscall {
            op: "open(/proc/self/pagemap)",
            source,
        })?;
        tracing::debug!(
            ?source,
            bytes = memory.len(),
            regions_per_scan,
            "guest memory registered for asynchronous write-protection"
        );
        Ok(Self {
            uffd: Arc::new(uffd),
            pagemap,
            range,
            regions: vec![PageRegion::default(); regions_per_scan],
            pending: DirtyBitmap::new(memory.pages()),
            started: false,
            last_scan: ScanStats::default(),
            memory,
        })
    }

    /// What the last successful collect cost.
    pub fn last_scan(&self) -> ScanStats {
        self.last_scan
    }

    /// Scans the guest range, adding every written page to `dirty` and re-protecting it.
    ///
    /// One call normally suffices. The loop continues only when the result vector came
    /// back full; `walk_end < end` alone is no reason (the kernel can report a short
    /// `walk_end` after a complete walk). A full call covers at least `regions.len()`
    /// pages, which bounds the number of calls.
    fn scan_into(&mut self, dirty: &mut DirtyBitmap) -> Result<ScanStats, TrackerError> {
        let began = Instant::now();
        let guest_start = self.range.start;
        let guest_end = self.range.start + self.range.len;
        let pages = self.memory.pages();
        let calls_max = pages.div_ceil(self.regions.len()) + 2;
        let mut stats = ScanStats::default();
        let mut scan_start = guest_start;
        for _ in 0..calls_max {
            let mut arg = PmScanArg {
                flags: PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC,
                start: scan_start,
                end: guest_end,
                category_mask: PAGE_IS_WRITTEN,
                return_mask: PAGE_IS_WRITTEN,
                ..PmScanArg::default()
            };
            let filled = self
                .pagemap
                .scan(&mut arg, &mut self.regions)
                .map_err(|source| TrackerError::Syscall {
                    op: "PAGEMAP_SCAN",
                    source,
                })?;
            stats.calls += 1;
            stats.regions += filled;

            let mut reported_end = scan_start;
            for region in &self.regions[..filled] {
                let page_aligned =
                    region.start % PAGE_SIZE as u64 == 0 && region.end % PAGE_SIZE as u64 == 0;
                if !page_aligned
                    || region.start < scan_start
                    || region.start >= region.end
                    || region.end > guest_end
                {
                    return Err(TrackerError::ScanRegionOutOfRange {
                        start: region.start,
                        end: region.end,
                        scan_start,
                        scan_end: guest_end,
                    });
                }
                let first = ((region.start - guest_start) / PAGE_SIZE as u64) as usize;
                let end = ((region.end - guest_start) / PAGE_SIZE as u64) as usize;
                dirty.set_range(first, end);
                stats.pages += end - first;
                reported_end = reported_end.max(region.end);
            }

            if filled < self.regions.len() {
                stats.elapsed = began.elapsed();
                return Ok(stats);
            }
            // The vector filled up: more written pages may follow. Resume where the kernel
            // says the walk stopped, but never before the end of the last run reported:
            // that keeps progress even if walk_end comes back short, and rescanning pages
            // already re-protected cannot report them twice.
            let next = if arg.walk_end <= guest_end {
                arg.walk_end.max(reported_end)
            } else {
                reported_end
            };
            tracing::trace!(
                filled,
                walk_end = format_args!("{:#x}", arg.walk_end),
                next = format_args!("{next:#x}"),
                "PAGEMAP_SCAN result vector full, continuing"
            );
            if next >= guest_end {
                stats.elapsed = began.elapsed();
                return Ok(stats);
            }
            scan_start = next;
        }
        Err(TrackerError::ScanCallsExceeded { calls_max, pages })
    }
}

impl DirtyTracker for UffdWpTracker {
    fn start(&mut self) -> Result<(), TrackerError> {
        if self.started {
            return Err(TrackerError::AlreadyStarted);
        }
        // Protects every page, populated or not (WP_UNPOPULATED installs markers), so the
        // first write to any page after this point is recorded. Writes before it are not:
        // round 0 sends every page anyway.
        self.uffd
            .write_protect(self.range, UFFDIO_WRITEPROTECT_MODE_WP)
            .map_err(|source| TrackerError::Syscall {
                op: "UFFDIO_WRITEPROTECT",
                source,
            })?;
        self.started = true;
        Ok(())
    }

    fn start_deferred(&mut self) -> Result<Arc<dyn PageArmer>, TrackerError> {
        if self.started {
            return Err(TrackerError::AlreadyStarted);
        }
        self.started = true;
        Ok(Arc::new(UffdArmer {
            uffd: Arc::clone(&self.uffd),
            range: self.range,
        }))
    }

    fn collect(&mut self) -> Result<DirtyBitmap, TrackerError> {
        if !self.started {
            return Err(TrackerError::NotStarted);
        }
        let mut dirty = self.pending.take();
        match self.scan_into(&mut dirty) {
            Ok(stats) => {
                tracing::trace!(
                    calls = stats.calls,
                    regions = stats.regions,
                    pages = stats.pages,
                    dirty = dirty.count(),
                    elapsed_us = stats.elapsed.as_micros() as u64,
                    "collected dirty pages"
                );
                self.last_scan = stats;
                Ok(dirty)
            }
            Err(e) => {
                // A failed scan may have re-protected pages it then could not report, and
                // the put-back pages were taken above. Which pages were written is unknown,
                // so the next collect returns every page.
                tracing::warn!(error = %e, "dirty page scan failed; every page will be reported dirty");
                self.pending = DirtyBitmap::full(self.memory.pages());
                Err(e)
            }
        }
    }

    fn put_back(&mut self, pages: &DirtyBitmap) {
        self.pending.merge(pages);
    }

    fn name(&self) -> &'static str {
        "uffd-wp-async"
    }
}

impl Drop for UffdWpTracker {
    fn drop(&mut self) {
        // Closing the descriptor would unregister too; doing it explicitly removes the
        // write-protection bits now and lets a failure be logged.
        if let Err(e) = self.uffd.unregister(self.range) {
            tracing::warn!(error = %e, "unregistering guest memory from the userfaultfd failed");
        }
    }
}

/// Reports every page as dirty on every collect. Needs no kernel support: the fallback on
/// hosts without userfaultfd asynchronous write-protection (pre-copy then never converges
/// on its own, so the engine's timeout policy decides when to stop and copy), and the
/// baseline in tests and benchmarks.
#[derive(Debug)]
pub struct FullTracker {
    pages: usize,
    pending: DirtyBitmap,
    started: bool,
}

impl FullTracker {
    /// A tracker over `pages` pages.
    pub fn new(pages: usize) -> Self {
        Self {
            pages,
            pending: DirtyBitmap::new(pages),
            started: false,
        }
    }
}

impl DirtyTracker for FullTracker {
    fn start(&mut self) -> Result<(), TrackerError> {
        if self.started {
            return Err(TrackerError::AlreadyStarted);
        }
        self.started = true;
        Ok(())
    }

    fn start_deferred(&mut self) -> Result<Arc<dyn PageArmer>, TrackerError> {
        self.start()?;
        Ok(Arc::new(NothingToArm))
    }

    fn collect(&mut self) -> Result<DirtyBitmap, TrackerError> {
        if !self.started {
            return Err(TrackerError::NotStarted);
        }
        // Put-back pages are a subset of "every page"; clear them so the contract holds.
        let mut dirty = self.pending.take();
        dirty.set_range(0, self.pages);
        Ok(dirty)
    }

    fn put_back(&mut self, pages: &DirtyBitmap) {
        self.pending.merge(pages);
    }

    fn name(&self) -> &'static str {
        "full"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::{self, ThreadRole};
    use std::sync::atomic::{AtomicBool, Ordering};

    /// Returns early with a visible message when the kernel cannot track writes; with
    /// FERRY_REQUIRE_UFFD set (CI on a known-good host) that is a failure instead.
    macro_rules! require_wp_async {
        ($test:literal) => {
            if let Err(e) = kernel_supports_wp_async() {
                if std::env::var_os("FERRY_REQUIRE_UFFD").is_some() {
                    panic!("{}: FERRY_REQUIRE_UFFD is set but {e}", $test);
                }
                eprintln!("SKIPPED {}: {e}", $test);
                return;
            }
        };
    }

    fn guest(bytes: u64) -> Arc<GuestMemory> {
        Arc::new(GuestMemory::new("tracker-test", bytes).unwrap())
    }

    fn started(memory: &Arc<GuestMemory>) -> UffdWpTracker {
        let mut tracker = UffdWpTracker::new(memory.clone()).unwrap();
        tracker.start().unwrap();
        tracker
    }

    fn pages_of(map: &DirtyBitmap) -> Vec<usize> {
        map.iter().collect()
    }

    fn page_of(byte: u8) -> [u8; PAGE_SIZE] {
        [byte; PAGE_SIZE]
    }

    #[test]
    fn collects_exactly_the_pages_written_and_rearms() {
        require_wp_async!("collects_exactly_the_pages_written_and_rearms");
        let memory = guest(4 << 20);
        let last = memory.pages() - 1;
        // Written before start: populated, but not to be reported.
        memory.write_page(3, &page_of(1));
        memory.write_page(5, &page_of(1));
        let mut tracker = started(&memory);
        assert!(pages_of(&tracker.collect().unwrap()).is_empty());

        for page in [0, 5, 6, 1000] {
            memory.write_page(page, &page_of(2));
        }
        memory.write_byte(7 * PAGE_SIZE as u64 + 4095, 9);
        memory.write_byte(last as u64 * PAGE_SIZE as u64, 9);
        assert_eq!(
            pages_of(&tracker.collect().unwrap()),
            vec![0, 5, 6, 7, 1000, last]
        );
        assert_eq!(tracker.last_scan().calls, 1);
        // Nothing written since: nothing to report.
        assert!(tracker.collect().unwrap().is_empty());
        // Re-armed: one more write to page 5 is seen, and only it.
        memory.write_byte(5 * PAGE_SIZE as u64 + 17, 3);
        assert_eq!(pages_of(&tracker.collect().unwrap()), vec![5]);
        assert!(tracker.collect().unwrap().is_empty());
        assert_eq!(tracker.name(), "uffd-wp-async");
    }

    #[test]
    fn deferred_start_tracks_a_range_from_its_arming_on() {
        require_wp_async!("deferred_start_tracks_a_range_from_its_arming_on");
        let memory = guest(2 << 20);
        let pages = memory.pages();
        let half = pages / 2;
        memory.write_byte(5 * PAGE_SIZE as u64, 1);
        let mut tracker = UffdWpTracker::new(Arc::clone(&memory)).unwrap();
        let armer = tracker.start_deferred().unwrap();
        assert!(matches!(
            tracker.start_deferred(),
            Err(TrackerError::AlreadyStarted)
        ));
        armer.arm(0, half).unwrap();
        // Written after the first half was armed: seen. Written before the second half is
        // armed: not seen once it is (the caller reads those bytes after arming).
        memory.write_byte(3 * PAGE_SIZE as u64, 1);
        memory.write_byte((half + 7) as u64 * PAGE_SIZE as u64, 1);
        armer.arm(half, pages - half).unwrap();
        memory.write_byte((half + 9) as u64 * PAGE_SIZE as u64, 1);
        assert_eq!(pages_of(&tracker.collect().unwrap()), vec![3, half + 9]);
        assert!(tracker.collect().unwrap().is_empty());
        // Ranges outside the guest are refused, not clamped.
        assert!(armer.arm(pages - 1, 2).is_err());
        assert!(armer.arm(usize::MAX, 2).is_err());
    }

    #[test]
    fn a_range_never_armed_is_reported_written() {
        require_wp_async!("a_range_never_armed_is_reported_written");
        let memory = guest(1 << 20);
        let pages = memory.pages();
        let mut tracker = UffdWpTracker::new(Arc::clone(&memory)).unwrap();
        let armer = tracker.start_deferred().unwrap();
        armer.arm(0, pages - 4).unwrap();
        assert_eq!(
            pages_of(&tracker.collect().unwrap()),
            (pages - 4..pages).collect::<Vec<_>>()
        );
        // The collect armed them.
        assert!(tracker.collect().unwrap().is_empty());
    }

    #[test]
    fn a_full_tracker_needs_no_arming() {
        let mut tracker = FullTracker::new(8);
        let armer = tracker.start_deferred().unwrap();
        armer.arm(0, 8).unwrap();
        assert_eq!(tracker.collect().unwrap().count(), 8);
    }

    #[test]
    fn writes_to_unpopulated_pages_are_seen_and_reads_are_not() {
        require_wp_async!("writes_to_unpopulated_pages_are_seen_and_reads_are_not");
        let memory = guest(2 << 20);
        let mut tracker = started(&memory);
        // Never touched before start: only WP_UNPOPULATED's markers can catch these.
        memory.write_byte(0, 1);
        memory.write_byte(300 * PAGE_SIZE as u64, 1);
        assert_eq!(pages_of(&tracker.collect().unwrap()), vec![0, 300]);
        // A read maps the page but is no write; a write after it is.
        assert_eq!(memory.read_byte(10 * PAGE_SIZE as u64), 0);
        assert_eq!(memory.read_byte(11 * PAGE_SIZE as u64), 0);
        assert!(tracker.collect().unwrap().is_empty());
        memory.write_byte(11 * PAGE_SIZE as u64, 1);
        assert_eq!(pages_of(&tracker.collect().unwrap()), vec![11]);
    }

    #[test]
    fn many_runs_take_several_scans_and_none_is_lost() {
        require_wp_async!("many_runs_take_several_scans_and_none_is_lost");
        let memory = guest(64 << 20);
        let mut tracker = started(&memory);
        // Every other page: 8192 separate runs, two result vectors' worth.
        for page in (0..memory.pages()).step_by(2) {
            memory.write_byte(page as u64 * PAGE_SIZE as u64, 1);
        }
        let dirty = tracker.collect().unwrap();
        assert_eq!(dirty.count(), memory.pages() / 2);
        assert!(dirty.iter().all(|p| p % 2 == 0));
        let stats = tracker.last_scan();
        assert_eq!(stats.regions, memory.pages() / 2);
        assert_eq!(stats.pages, memory.pages() / 2);
        // 8192 runs = exactly two full vectors, then one call that finds the rest empty.
        assert_eq!(stats.calls, 3);
        assert!(tracker.collect().unwrap().is_empty());
    }

    #[test]
    fn small_result_vectors_continue_exactly() {
        require_wp_async!("small_result_vectors_continue_exactly");
        let memory = guest(4 << 20);
        for (regions_per_scan, stride) in [(1, 3), (7, 3), (8, 16), (5, 1)] {
            let mut tracker =
                UffdWpTracker::with_regions_per_scan(memory.clone(), regions_per_scan).unwrap();
            tracker.start().unwrap();
            let written: Vec<usize> = (0..memory.pages()).step_by(stride).collect();
            for &page in &written {
                memory.write_byte(page as u64 * PAGE_SIZE as u64 + 1, stride as u8);
            }
            let dirty = tracker.collect().unwrap();
            assert_eq!(pages_of(&dirty), written, "vector {regions_per_scan}");
            let runs = if stride == 1 { 1 } else { written.len() };
            assert_eq!(
                tracker.last_scan().regions,
                runs,
                "vector {regions_per_scan}"
            );
            assert!(tracker.last_scan().calls >= runs.div_ceil(regions_per_scan));
            assert!(tracker.collect().unwrap().is_empty());
            drop(tracker);
        }
    }

    #[test]
    fn writes_from_another_thread_and_from_the_kernel_are_seen() {
        require_wp_async!("writes_from_another_thread_and_from_the_kernel_are_seen");
        let memory = guest(1 << 20);
        let mut tracker = started(&memory);
        let writer = {
            let memory = memory.clone();
            numa::spawn(ThreadRole::Guest, "ferry-test-writer", move || {
                for page in (1..100).step_by(7) {
                    memory.write_page(page, &page_of(page as u8));
                }
            })
            .unwrap()
        };
        writer.join().unwrap();
        let expected: Vec<usize> = (1..100).step_by(7).collect();
        assert_eq!(pages_of(&tracker.collect().unwrap()), expected);

        // read(2) into guest memory: the kernel writes through the page tables too.
        let mut fds = [0; 2];
        // SAFETY: fds is a valid array of two ints for pipe to fill.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        let message = b"written by the kernel";
        // SAFETY: fds[1] is the pipe's write end; message is valid for its length.
        let sent = unsafe { libc::write(fds[1], message.as_ptr().cast(), message.len()) };
        assert_eq!(sent, message.len() as isize);
        // SAFETY: page 200 is inside the mapping and at least message.len() bytes long;
        // nothing else accesses it during the call.
        let got = unsafe { libc::read(fds[0], memory.page_ptr(200).cast(), message.len()) };
        assert_eq!(got, message.len() as isize);
        // SAFETY: both descriptors came from pipe above and are closed once.
        unsafe {
            libc::close(fds[0]);
            libc::close(fds[1]);
        }
        assert_eq!(&memory.page(200)[..message.len()], message);
        assert_eq!(pages_of(&tracker.collect().unwrap()), vec![200]);
    }

    /// The property migration relies on: copying every collected page after collect
    /// returns, while a writer keeps running, ends (after the writer stops and one final
    /// collect) with an exact copy of memory.
    #[test]
    fn copying_collected_pages_converges_to_memory_under_concurrent_writes() {
        require_wp_async!("copying_collected_pages_converges_to_memory_under_concurrent_writes");
        let memory = guest(1 << 20);
        let pages = memory.pages();
        let mut copy = vec![0u8; memory.len()];
        let mut tracker = started(&memory);
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let memory = memory.clone();
            let stop = stop.clone();
            numa::spawn(ThreadRole::Guest, "ferry-test-writer", move || {
                let mut seed: u64 = 0x9e37_79b9_7f4a_7c15;
                let mut writes: u64 = 0;
                // Runs until told to stop, so that it overlaps every collect below.
                while !stop.load(Ordering::Relaxed) && writes < 1_000_000_000 {
                    seed = seed
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    let page = (seed >> 33) as usize % pages;
                    let offset = (seed >> 13) as usize % PAGE_SIZE;
                    memory.write_byte((page * PAGE_SIZE + offset) as u64, (seed >> 56) as u8 | 1);
                    writes += 1;
                }
                writes
            })
            .unwrap()
        };
        let mut rounds = 0;
        let mut rounds_nonempty = 0;
        let mut copied = 0;
        // At least 300 ms and 50 collects that found writes, at most 10 s.
        let began = Instant::now();
        while (began.elapsed() < Duration::from_millis(300) || rounds_nonempty < 50)
            && began.elapsed() < Duration::from_secs(10)
            && rounds < 10_000_000
        {
            let dirty = tracker.collect().unwrap();
            rounds_nonempty += usize::from(!dirty.is_empty());
            for page in dirty.iter() {
                copy[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].copy_from_slice(memory.page(page));
                copied += 1;
            }
            rounds += 1;
        }
        stop.store(true, Ordering::Relaxed);
        let writes = writer.join().unwrap();
        for page in tracker.collect().unwrap().iter() {
            copy[page * PAGE_SIZE..(page + 1) * PAGE_SIZE].copy_from_slice(memory.page(page));
        }
        eprintln!(
            "{writes} writes, {rounds} collects ({rounds_nonempty} non-empty), {copied} pages copied"
        );
        assert!(
            rounds_nonempty >= 50,
            "writer and collector did not overlap"
        );
        assert!(
            copy == memory.pages_slice(0, pages),
            "copy diverged from memory"
        );
    }

    #[test]
    fn put_back_pages_come_back_with_new_writes() {
        require_wp_async!("put_back_pages_come_back_with_new_writes");
        let memory = guest(1 << 20);
        let mut tracker = started(&memory);
        for page in [1, 2, 3] {
            memory.write_byte(page * PAGE_SIZE as u64, 1);
        }
        let failed_send = tracker.collect().unwrap();
        assert_eq!(pages_of(&failed_send), vec![1, 2, 3]);
        tracker.put_back(&failed_send);
        memory.write_byte(4 * PAGE_SIZE as u64, 1);
        memory.write_byte(2 * PAGE_SIZE as u64, 2);
        assert_eq!(pages_of(&tracker.collect().unwrap()), vec![1, 2, 3, 4]);
        assert!(tracker.collect().unwrap().is_empty());
    }

    /// Firecracker-style: force the scan to fail and prove no dirty page is lost.
    #[test]
    fn a_failed_scan_reports_every_page_next_time() {
        require_wp_async!("a_failed_scan_reports_every_page_next_time");
        let memory = guest(1 << 20);
        let mut tracker = started(&memory);
        memory.write_byte(9 * PAGE_SIZE as u64, 1);
        let mut put_back = DirtyBitmap::new(memory.pages());
        put_back.set(42);
        tracker.put_back(&put_back);
        // Pull the registration from under the tracker: PM_SCAN_CHECK_WPASYNC refuses.
        tracker.uffd.unregister(tracker.range).unwrap();
        match tracker.collect() {
            Err(TrackerError::Syscall {
                op: "PAGEMAP_SCAN",
                source,
            }) => {
                eprintln!("scan of an unregistered range: {source}")
            }
            other => panic!("expected PAGEMAP_SCAN to fail, got {other:?}"),
        }
        assert_eq!(tracker.pending.count(), memory.pages());
    }

    #[test]
    fn lifecycle_errors_and_one_tracker_per_memory() {
        require_wp_async!("lifecycle_errors_and_one_tracker_per_memory");
        let memory = guest(1 << 20);
        let mut tracker = UffdWpTracker::new(memory.clone()).unwrap();
        assert!(matches!(tracker.collect(), Err(TrackerError::NotStarted)));
        match UffdWpTracker::new(memory.clone()) {
            Err(TrackerError::AlreadyRegistered { .. }) => {}
            other => panic!("expected AlreadyRegistered, got {other:?}"),
        }
        tracker.start().unwrap();
        assert!(matches!(tracker.start(), Err(TrackerError::AlreadyStarted)));
        drop(tracker);
        // Unregistered on drop: memory stays writable and can be tracked afresh.
        memory.write_byte(0, 5);
        let mut tracker = started(&memory);
        memory.write_byte(PAGE_SIZE as u64, 5);
        assert_eq!(pages_of(&tracker.collect().unwrap()), vec![1]);
        assert_eq!(Arc::strong_count(&memory), 2);
        drop(tracker);
        assert_eq!(Arc::strong_count(&memory), 1);
    }

    #[test]
    fn full_tracker_reports_every_page() {
        let mut tracker = FullTracker::new(100);
        assert!(matches!(tracker.collect(), Err(TrackerError::NotStarted)));
        tracker.start().unwrap();
        assert!(matches!(tracker.start(), Err(TrackerError::AlreadyStarted)));
        assert_eq!(tracker.collect().unwrap(), DirtyBitmap::full(100));
        let mut some = DirtyBitmap::new(100);
        some.set(7);
        tracker.put_back(&some);
        assert_eq!(tracker.collect().unwrap(), DirtyBitmap::full(100));
        assert!(tracker.pending.is_empty());
        assert_eq!(tracker.name(), "full");
    }

    /// The contract every implementation meets, run through the trait object: a superset
    /// of the written pages, put-back pages returned, nothing before start.
    fn conformance(memory: &Arc<GuestMemory>, tracker: &mut dyn DirtyTracker) {
        assert!(matches!(tracker.collect(), Err(TrackerError::NotStarted)));
        tracker.start().unwrap();
        tracker.collect().unwrap();
        let written = [0, 17, memory.pages() - 1];
        for &page in &written {
            memory.write_byte(page as u64 * PAGE_SIZE as u64, 7);
        }
        let dirty = tracker.collect().unwrap();
        assert!(written.iter().all(|&p| dirty.get(p)), "{}", tracker.name());
        tracker.put_back(&dirty);
        let again = tracker.collect().unwrap();
        assert!(dirty.iter().all(|p| again.get(p)), "{}", tracker.name());
    }

    #[test]
    fn every_tracker_meets_the_contract() {
        let memory = guest(1 << 20);
        conformance(&memory, &mut FullTracker::new(memory.pages()));
        require_wp_async!("every_tracker_meets_the_contract (uffd part)");
        let mut uffd: Box<dyn DirtyTracker> = Box::new(UffdWpTracker::new(memory.clone()).unwrap());
        conformance(&memory, uffd.as_mut());
    }

    /// This process's page-table memory (VmPTE), in KiB.
    fn page_table_kib() -> u64 {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let line = status.lines().find(|l| l.starts_with("VmPTE:")).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// Collect cost by guest size and dirty pattern, A/B against a scan of clean memory.
    /// `cargo test -p ferry-dataplane --release --lib memory::tracker -- --ignored --nocapture`
    #[test]
    #[ignore = "benchmark; run in release mode"]
    fn bench_collect() {
        require_wp_async!("bench_collect");
        for bytes in [64u64 << 20, 1 << 30] {
            let memory = guest(bytes);
            let pages = memory.pages();
            let mut tracker = UffdWpTracker::new(memory.clone()).unwrap();
            let page_tables_before = page_table_kib();
            let began = Instant::now();
            tracker.start().unwrap();
            let start_time = began.elapsed();
            eprintln!(
                "{} MiB: page tables {page_tables_before} KiB before start, {} KiB after",
                bytes >> 20,
                page_table_kib()
            );
            eprintln!(
                "{} MiB: start (write-protect all, unpopulated) {start_time:?}",
                bytes >> 20
            );
            let patterns: [(&str, usize); 4] = [
                ("clean", 0),
                ("1% scattered", 100),
                ("50% alternate", 2),
                ("100%", 1),
            ];
            for (name, stride) in patterns {
                for round in 0..3 {
                    if stride > 0 {
                        for page in (0..pages).step_by(stride) {
                            memory.write_byte(page as u64 * PAGE_SIZE as u64, round as u8 + 1);
                        }
                    }
                    let dirty = tracker.collect().unwrap();
                    let stats = tracker.last_scan();
                    let expected = if stride == 0 {
                        0
                    } else {
                        pages.div_ceil(stride)
                    };
                    assert_eq!(dirty.count(), expected);
                    eprintln!(
                        "{} MiB {name:>14} round {round}: {:>8} pages dirty, {:>6} regions, {:>3} calls, {:?}",
                        bytes >> 20,
                        dirty.count(),
                        stats.regions,
                        stats.calls,
                        stats.elapsed
                    );
                }
            }
        }
    }
}
