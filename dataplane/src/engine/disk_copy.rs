//! Source side of storage migration: attach a mirror to every disk, run the bulk copy (one
//! linear io_uring pass per disk), keep mirroring until the switch-over, detach on drop.
//!
//! The bulk copy claims each chunk in the mirror before its read is queued (so the read
//! sees every guest write that completed before it), hashes the blocks it read into the
//! disk's digest, sends the chunk (or a zero marker), and marks the chunk copied once the
//! destination acknowledges writing it. From then on guest writes to the chunk are
//! mirrored; see [`crate::disk::mirror`] for why nothing can be lost in between.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::info;

use super::{DiskProgress, DiskReport, EngineError, MigrationParams};
use crate::disk::uring::read_linear;
use crate::disk::{BlockRing, DiskError, Mirror, MirrorTarget, VirtualDisk, BLOCK_SIZE};
use crate::memory::{page_hash, MemoryDigest, ZERO_PAGE_HASH};
use crate::numa::{self, ThreadRole};
use crate::transport::DiskSource;

/// How long a mirrored write or a chunk may wait for the destination's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(30);
/// Chunks sent but not yet acknowledged, per unit of queue depth.
const WINDOW_PER_DEPTH: usize = 2;
/// How often the bulk copy's watcher looks at the cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(50);
/// How often the bulk copy reports progress.
/// How often the bulk copy reports its progress (the timeline samples it; the user's
/// progress display is throttled further up).
const PROGRESS_INTERVAL: Duration = Duration::from_millis(10);

/// Mirrored writes go over the migration's disk link.
struct LinkTarget(Arc<dyn DiskSource>);

impl MirrorTarget for LinkTarget {
    fn send(&self, disk: u32, offset: u64, data: &[u8]) -> Result<u32, DiskError> {
        self.0
            .send_write(disk, offset, data)
            .map_err(|e| DiskError::Mirror {
                reason: super::error_chain(&e),
            })
    }

    fn wait(&self, ticket: u32) -> Result<(), DiskError> {
        self.0
            .wait(ticket, Instant::now() + ACK_TIMEOUT)
            .map_err(|e| DiskError::Mirror {
                reason: super::error_chain(&e),
            })
    }
}

/// The disks of one outgoing migration, mirrored from [`DiskSession::attach`] until drop.
pub(super) struct DiskSession {
    disks: Vec<Arc<VirtualDisk>>,
    mirrors: Vec<Arc<Mirror>>,
    link: Option<Arc<dyn DiskSource>>,
    reports: Vec<DiskReport>,
}

impl DiskSession {
    /// A migration without disks.
    pub(super) fn empty() -> Self {
        Self {
            disks: Vec::new(),
            mirrors: Vec::new(),
            link: None,
            reports: Vec::new(),
        }
    }

    /// Starts mirroring every disk (all chunks ahead of the cursor: writes stay local until
    /// the bulk copy passes them).
    pub(super) fn attach(
        disks: &[Arc<VirtualDisk>],
        link: Arc<dyn DiskSource>,
        params: &MigrationParams,
    ) -> Result<Self, EngineError> {
        let mut session = Self {
            disks: Vec::new(),
            mirrors: Vec::new(),
            link: Some(Arc::clone(&link)),
            reports: Vec::new(),
        };
        for (index, disk) in disks.iter().enumerate() {
            let blocks = (disk.size() / BLOCK_SIZE as u64) as usize;
            let mirror = Arc::new(Mirror::new(
                index as u32,
                disk.size(),
                u64::from(params.disk_chunk_bytes),
                Arc::new(LinkTarget(Arc::clone(&link))),
                Arc::new(MemoryDigest::new_zeroed(blocks)),
            )?);
            // The session detaches what it attached, even if a later disk fails.
            disk.attach_mirror(Arc::clone(&mirror))?;
            session.disks.push(Arc::clone(disk));
            session.mirrors.push(mirror);
            session.reports.push(DiskReport {
                bytes: disk.size(),
                chunk_bytes: params.disk_chunk_bytes,
                queue_depth: params.disk_queue_depth,
                direct_io: disk.image().is_direct(),
                unmirrored_latency: disk.unmirrored_latency(),
                ..DiskReport::default()
            });
        }
        Ok(session)
    }

    pub(super) fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }

    /// Fails if any mirror has stopped (the destination no longer matches the source).
    pub(super) fn check(&self) -> Result<(), EngineError> {
        for mirror in &self.mirrors {
            if let Some(reason) = mirror.failure() {
                return Err(DiskError::Mirror { reason }.into());
            }
        }
        Ok(())
    }

    /// Each disk's digest as it stands (final once the guest is quiesced).
    pub(super) fn digests(&self) -> Vec<u64> {
        self.mirrors.iter().map(|m| m.digest().value()).collect()
    }

    /// The reports, with mirroring counters as they stand.
    pub(super) fn reports(&self) -> Vec<DiskReport> {
        let digests = self.digests();
        self.reports
            .iter()
            .zip(&self.mirrors)
            .zip(digests)
            .map(|((report, mirror), digest)| {
                let stats = mirror.stats();
                DiskReport {
                    mirrored_writes: stats.mirrored_writes,
                    mirrored_bytes: stats.mirrored_bytes,
                    local_writes: stats.local_writes,
                    waited_for_copy: stats.waited_for_copy,
                    mirrored_latency: stats.mirrored_latency,
                    local_latency: stats.local_latency,
                    digest,
                    ..report.clone()
                }
            })
            .collect()
    }

    /// Progress lines for every disk.
    pub(super) fn progress(&self) -> Vec<DiskProgress> {
        self.mirrors
            .iter()
            .zip(&self.disks)
            .map(|(mirror, disk)| {
                let stats = mirror.stats();
                DiskProgress {
                    bytes_total: disk.size(),
                    bytes_copied: (mirror.chunks_done() as u64 * mirror.chunk_bytes())
                        .min(disk.size()),
                    rate_bytes_per_s: 0,
                    eta_ms: None,
                    mirrored_writes: stats.mirrored_writes,
                    mirrored_bytes: stats.mirrored_bytes,
                }
            })
            .collect()
    }

    /// The bulk copy of every disk, one after the other. `progress` gets the per-disk view
    /// a few times per second.
    pub(super) fn bulk_copy(
        &mut self,
        params: &MigrationParams,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(Vec<DiskProgress>),
    ) -> Result<(), EngineError> {
        // A send blocked on a peer that stopped reading would not see the cancel flag: a
        // watcher closes the links when it is set, which fails the blocked call.
        let copying = AtomicBool::new(true);
        let link = self.link.clone();
        std::thread::scope(|scope| {
            numa::spawn_scoped(scope, ThreadRole::Control, "ferry-disk-cancel", || {
                while copying.load(Ordering::Relaxed) {
                    if cancel.load(Ordering::Relaxed) {
                        if let Some(link) = &link {
                            link.shutdown();
                        }
                        return;
                    }
                    std::thread::sleep(CANCEL_POLL);
                }
            })
            .expect("spawning the disk copy's cancel watcher");
            // The copy stays on this thread (progress is not Send) but runs as a disk
            // thread: on the disk's node, where its io_uring buffers are first touched.
            let result = numa::run_as(ThreadRole::Disk, || {
                self.copy_disks(params, cancel, progress)
            });
            copying.store(false, Ordering::Relaxed);
            result
        })
        .map_err(|e| {
            if cancel.load(Ordering::Relaxed) {
                EngineError::Cancelled
            } else {
                e
            }
        })
    }

    fn copy_disks(
        &mut self,
        params: &MigrationParams,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(Vec<DiskProgress>),
    ) -> Result<(), EngineError> {
        for index in 0..self.disks.len() {
            let started = Instant::now();
            let (data_bytes, zero_bytes, registered) =
                self.copy_disk(index, params, cancel, progress)?;
            let elapsed = started.elapsed().as_secs_f64();
            let report = &mut self.reports[index];
            report.data_bytes = data_bytes;
            report.zero_bytes = zero_bytes;
            report.registered_buffers = registered;
            report.copy_ms = elapsed * 1e3;
            report.copy_bytes_per_s = report.bytes as f64 / elapsed.max(1e-6);
            info!(
                disk = index,
                bytes = report.bytes,
                data_bytes,
                zero_bytes,
                ms = report.copy_ms,
                gib_per_s = report.copy_bytes_per_s / (1u64 << 30) as f64,
                "disk bulk copy done; mirroring continues"
            );
        }
        Ok(())
    }

    fn copy_disk(
        &self,
        index: usize,
        params: &MigrationParams,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(Vec<DiskProgress>),
    ) -> Result<(u64, u64, bool), EngineError> {
        let disk = &self.disks[index];
        let mirror = &self.mirrors[index];
        let image = disk.image();
        let chunk = params.disk_chunk_bytes as usize;
        let depth = params.disk_queue_depth;
        // One buffer more than the queue depth: the next read is queued before a chunk is
        // hashed and sent, so the disk never idles while this thread works.
        let mut ring = BlockRing::new(depth, depth as usize + 1, chunk)?;
        let registered = ring.registered();
        let link = self.link.as_deref().ok_or_else(|| EngineError::BadParams {
            reason: "a disk session without a disk link".into(),
        })?;
        let digest = mirror.digest();
        let window_max = WINDOW_PER_DEPTH * depth as usize;
        // (ticket, chunk index) of chunks sent and not yet acknowledged, oldest first.
        let mut window: VecDeque<(u32, usize)> = VecDeque::new();
        let mut data_bytes = 0u64;
        let mut zero_bytes = 0u64;
        let started = Instant::now();
        let mut last_emit = Instant::now();
        let mut failpoint_due = true;
        let size = disk.size();

        // Marks acknowledged chunks copied: all of them when `wait_for` is reached.
        let settle =
            |window: &mut VecDeque<(u32, usize)>, keep: usize| -> Result<(), EngineError> {
                while let Some(&(ticket, chunk_index)) = window.front() {
                    let outcome = if window.len() > keep {
                        Some(link.wait(ticket, Instant::now() + ACK_TIMEOUT))
                    } else {
                        link.poll(ticket)
                    };
                    match outcome {
                        None => break,
                        Some(result) => {
                            result?;
                            mirror.copied(chunk_index);
                            window.pop_front();
                        }
                    }
                }
                Ok(())
            };

        let window_cell = std::cell::RefCell::new(&mut window);
        read_linear::<EngineError>(
            &mut ring,
            image,
            0..size,
            chunk,
            |offset, _len| {
                if cancel.load(Ordering::Relaxed) {
                    return Err(EngineError::Cancelled);
                }
                settle(&mut window_cell.borrow_mut(), window_max - 1)?;
                mirror.claim((offset / chunk as u64) as usize)?;
                Ok(())
            },
            |offset, bytes| {
                let mut all_zero = true;
                digest.record_run(
                    (offset / BLOCK_SIZE as u64) as usize,
                    bytes.chunks_exact(BLOCK_SIZE).map(|block| {
                        let hash = page_hash(block);
                        all_zero &= hash == ZERO_PAGE_HASH;
                        hash
                    }),
                );
                let len = bytes.len() as u32;
                let ticket = if all_zero {
                    zero_bytes += len as u64;
                    link.send_chunk(mirror.disk(), offset, len, None)?
                } else {
                    data_bytes += len as u64;
                    link.send_chunk(mirror.disk(), offset, len, Some(bytes))?
                };
                window_cell
                    .borrow_mut()
                    .push_back((ticket, (offset / chunk as u64) as usize));
                if std::mem::take(&mut failpoint_due) {
                    // Fault injection (a no-op unless built for it): the copy is under way.
                    if let Some(crate::failpoint::Action::Corrupt) =
                        crate::failpoint::hit("source-disk-copy")
                    {
                        crate::failpoint::corrupt_next_frame();
                    }
                }
                if last_emit.elapsed() >= PROGRESS_INTERVAL {
                    last_emit = Instant::now();
                    let done = data_bytes + zero_bytes;
                    let rate = done as f64 / started.elapsed().as_secs_f64().max(1e-6);
                    let mut view = self.progress();
                    view[index].rate_bytes_per_s = rate as u64;
                    view[index].eta_ms =
                        (rate > 0.0).then(|| ((size - done.min(size)) as f64 / rate * 1e3) as u64);
                    progress(view);
                }
                Ok(())
            },
        )?;
        settle(&mut window, 0)?;
        self.check()?;
        Ok((data_bytes, zero_bytes, registered))
    }
}

impl Drop for DiskSession {
    fn drop(&mut self) {
        for (disk, mirror) in self.disks.iter().zip(&self.mirrors) {
            disk.detach_mirror();
            // Wakes guest writes waiting for a chunk the bulk copy will never finish.
            mirror.end();
        }
    }
}
