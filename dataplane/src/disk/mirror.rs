//! The guest-facing virtual disk, and the mirror that keeps a migration destination in
//! step with it while the bulk copy runs and after.
//!
//! The bulk copy walks the disk in chunks. Each chunk is, at any instant, in one state:
//!
//! ```text
//!   Ahead ──claim (waits for local writers to drain)──▶ Copying ──destination acked──▶ Done
//! ```
//!
//! A guest write is routed by the states of the chunks it touches, decided under one lock:
//! - all **Ahead**: written locally only; the chunk's writer count is held during the write,
//!   so the bulk copy cannot start reading the chunk until the write has landed (it will
//!   read the new bytes);
//! - any **Copying**: waits until the chunk is Done (the range lock), then routes again;
//! - otherwise (**Done**, possibly mixed with Ahead): mirrored. The remote write is sent,
//!   the local write done, and the guest's write completes only once the destination has
//!   acknowledged writing it. Ahead chunks touched by a mixed write stay held as above.
//!
//! A chunk becomes Done only after the destination acknowledged *writing* it, so a
//! mirrored write to it always lands after the bulk copy's bytes. Mirrored writes to the
//! same 64 KiB unit are serialised by a striped lock across local write and remote ack, so
//! both sides apply overlapping writes in the same order.
//!
//! If the remote side fails, the mirror is marked failed and from then on writes are local
//! only: the guest never sees a migration's failure, and the migration fails back (the
//! source disk was authoritative all along).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant};

use super::latency::{LatencyHistogram, LatencySummary};
use super::{DiskError, DiskImage, BLOCK_SIZE};
use crate::memory::{page_hash, MemoryDigest};

/// Mirrored writes to the same unit of this many bytes are serialised.
const STRIPE_UNIT: u64 = 64 << 10;
/// Stripes of the write-ordering lock.
const STRIPES: usize = 256;
/// Longest a claim or a guest write waits on the chunk table before re-checking for a
/// failed mirror.
const WAIT_SLICE: Duration = Duration::from_millis(100);

/// Where mirrored writes go: the migration's disk link. `send` queues the write and
/// returns a ticket; `wait` returns once the destination has written it.
pub trait MirrorTarget: Send + Sync {
    fn send(&self, disk: u32, offset: u64, data: &[u8]) -> Result<u32, DiskError>;
    fn wait(&self, ticket: u32) -> Result<(), DiskError>;
}

/// A chunk's place relative to the bulk copy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Chunk {
    /// Not yet claimed by the bulk copy; `writers` guest writes are landing in it locally.
    Ahead { writers: u32 },
    /// Claimed: being read, sent and written on the destination.
    Copying,
    /// On the destination: writes to it are mirrored.
    Done,
}

/// How a guest write goes.
enum Route {
    Local,
    Mirrored,
}

/// Counters a mirror keeps for the report.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MirrorStats {
    pub mirrored_writes: u64,
    pub mirrored_bytes: u64,
    pub local_writes: u64,
    /// Guest writes that waited for the chunk in flight (the range lock).
    pub waited_for_copy: u64,
    pub mirrored_latency: LatencySummary,
    pub local_latency: LatencySummary,
}

/// One disk's mirror for one migration: the chunk table, the write-ordering stripes, the
/// target, and the source's per-block digest.
pub struct Mirror {
    disk: u32,
    chunk_bytes: u64,
    chunks: Mutex<Vec<Chunk>>,
    changed: Condvar,
    stripes: Box<[Mutex<()>]>,
    target: Arc<dyn MirrorTarget>,
    digest: Arc<MemoryDigest>,
    failed: AtomicBool,
    failure: Mutex<Option<String>>,
    mirrored_writes: AtomicU64,
    mirrored_bytes: AtomicU64,
    local_writes: AtomicU64,
    waited_for_copy: AtomicU64,
    mirrored_latency: LatencyHistogram,
    local_latency: LatencyHistogram,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Mirror {
    /// A mirror for disk number `disk` of `size` bytes copied in `chunk_bytes` chunks
    /// (a multiple of [`BLOCK_SIZE`]); every chunk starts Ahead. `digest` has one entry per
    /// block and is updated by the bulk copy and by mirrored writes.
    pub fn new(
        disk: u32,
        size: u64,
        chunk_bytes: u64,
        target: Arc<dyn MirrorTarget>,
        digest: Arc<MemoryDigest>,
    ) -> Result<Self, DiskError> {
        if chunk_bytes == 0 || !chunk_bytes.is_multiple_of(BLOCK_SIZE as u64) {
            return Err(DiskError::BadParams {
                reason: format!(
                    "chunk size {chunk_bytes} must be a non-zero multiple of {BLOCK_SIZE}"
                ),
            });
        }
        if digest.pages() as u64 != size / BLOCK_SIZE as u64 {
            return Err(DiskError::BadParams {
                reason: format!(
                    "digest covers {} blocks, the disk has {}",
                    digest.pages(),
                    size / BLOCK_SIZE as u64
                ),
            });
        }
        let chunks = size.div_ceil(chunk_bytes) as usize;
        Ok(Self {
            disk,
            chunk_bytes,
            chunks: Mutex::new(vec![Chunk::Ahead { writers: 0 }; chunks]),
            changed: Condvar::new(),
            stripes: (0..STRIPES).map(|_| Mutex::new(())).collect(),
            target,
            digest,
            failed: AtomicBool::new(false),
            failure: Mutex::new(None),
            mirrored_writes: AtomicU64::new(0),
            mirrored_bytes: AtomicU64::new(0),
            local_writes: AtomicU64::new(0),
            waited_for_copy: AtomicU64::new(0),
            mirrored_latency: LatencyHistogram::default(),
            local_latency: LatencyHistogram::default(),
        })
    }

    pub fn disk(&self) -> u32 {
        self.disk
    }

    pub fn chunk_bytes(&self) -> u64 {
        self.chunk_bytes
    }

    pub fn chunks(&self) -> usize {
        lock(&self.chunks).len()
    }

    pub fn digest(&self) -> &Arc<MemoryDigest> {
        &self.digest
    }

    /// Why mirroring stopped, if it did.
    pub fn failure(&self) -> Option<String> {
        lock(&self.failure).clone()
    }

    pub fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Stops mirroring: writes are local only from now on, and waiters wake up.
    pub fn fail(&self, reason: impl Into<String>) {
        let mut failure = lock(&self.failure);
        if failure.is_none() {
            let reason = reason.into();
            tracing::warn!(disk = self.disk, %reason, "disk mirror failed; guest writes are local only from now on");
            *failure = Some(reason);
        }
        self.failed.store(true, Ordering::Release);
        drop(failure);
        let _chunks = lock(&self.chunks);
        self.changed.notify_all();
    }

    /// The migration is over (handed over or failed back): guest writes still waiting on
    /// a chunk in flight go local, and nothing is mirrored any more.
    pub fn end(&self) {
        {
            let mut failure = lock(&self.failure);
            if failure.is_none() {
                *failure = Some("the migration ended".into());
            }
        }
        self.failed.store(true, Ordering::Release);
        let _chunks = lock(&self.chunks);
        self.changed.notify_all();
    }

    pub fn stats(&self) -> MirrorStats {
        MirrorStats {
            mirrored_writes: self.mirrored_writes.load(Ordering::Relaxed),
            mirrored_bytes: self.mirrored_bytes.load(Ordering::Relaxed),
            local_writes: self.local_writes.load(Ordering::Relaxed),
            waited_for_copy: self.waited_for_copy.load(Ordering::Relaxed),
            mirrored_latency: self.mirrored_latency.summary(),
            local_latency: self.local_latency.summary(),
        }
    }

    /// Bulk copy: claims chunk `index` before its read is queued. Waits until no guest
    /// write is landing in it; from then on writes to it wait until [`Mirror::copied`].
    pub fn claim(&self, index: usize) -> Result<(), DiskError> {
        let mut chunks = lock(&self.chunks);
        loop {
            if self.has_failed() {
                return Err(self.failed_error());
            }
            match chunks.get(index) {
                None => {
                    return Err(DiskError::BadParams {
                        reason: format!("chunk {index} of {}", chunks.len()),
                    })
                }
                Some(Chunk::Ahead { writers: 0 }) => {
                    chunks[index] = Chunk::Copying;
                    return Ok(());
                }
                Some(Chunk::Ahead { .. }) => {
                    chunks = self
                        .changed
                        .wait_timeout(chunks, WAIT_SLICE)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
                Some(state) => {
                    return Err(DiskError::Mirror {
                        reason: format!("chunk {index} claimed twice (it is {state:?})"),
                    })
                }
            }
        }
    }

    /// Bulk copy: chunk `index` is written on the destination. Writes to it are mirrored
    /// from now on.
    pub fn copied(&self, index: usize) {
        let mut chunks = lock(&self.chunks);
        if let Some(chunk) = chunks.get_mut(index) {
            *chunk = Chunk::Done;
        }
        self.changed.notify_all();
    }

    /// Chunks already on the destination.
    pub fn chunks_done(&self) -> usize {
        lock(&self.chunks)
            .iter()
            .filter(|c| **c == Chunk::Done)
            .count()
    }

    fn failed_error(&self) -> DiskError {
        DiskError::Mirror {
            reason: self
                .failure()
                .unwrap_or_else(|| "mirroring stopped".to_string()),
        }
    }

    /// Decides a guest write's route, waiting out chunks in flight, and holds the writer
    /// count of every Ahead chunk in `first..=last`.
    fn route(&self, first: usize, last: usize) -> Route {
        let mut chunks = lock(&self.chunks);
        let mut waited = false;
        while !self.has_failed() && chunks[first..=last].contains(&Chunk::Copying) {
            waited = true;
            chunks = self
                .changed
                .wait_timeout(chunks, WAIT_SLICE)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        if waited {
            self.waited_for_copy.fetch_add(1, Ordering::Relaxed);
        }
        let mut all_ahead = true;
        for chunk in &mut chunks[first..=last] {
            match chunk {
                Chunk::Ahead { writers } => *writers += 1,
                _ => all_ahead = false,
            }
        }
        if all_ahead || self.has_failed() {
            Route::Local
        } else {
            Route::Mirrored
        }
    }

    /// Releases the writer counts [`Mirror::route`] took.
    fn release(&self, first: usize, last: usize) {
        let mut chunks = lock(&self.chunks);
        for chunk in &mut chunks[first..=last] {
            if let Chunk::Ahead { writers } = chunk {
                *writers = writers.saturating_sub(1);
            }
        }
        self.changed.notify_all();
    }

    /// A guest write while this mirror is attached.
    fn write(&self, image: &DiskImage, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let started = Instant::now();
        let first = (offset / self.chunk_bytes) as usize;
        let last = ((offset + data.len() as u64 - 1) / self.chunk_bytes) as usize;
        let route = self.route(first, last);
        let result = match route {
            Route::Local => image.write_at(data, offset),
            Route::Mirrored => self.write_mirrored(image, offset, data),
        };
        self.release(first, last);
        match route {
            Route::Local => {
                self.local_writes.fetch_add(1, Ordering::Relaxed);
                self.local_latency.record(started.elapsed());
            }
            Route::Mirrored => {
                self.mirrored_writes.fetch_add(1, Ordering::Relaxed);
                self.mirrored_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                self.mirrored_latency.record(started.elapsed());
            }
        }
        result
    }

    fn write_mirrored(&self, image: &DiskImage, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let first_unit = offset / STRIPE_UNIT;
        let last_unit = (offset + data.len() as u64 - 1) / STRIPE_UNIT;
        let mut stripes: Vec<usize> = (first_unit..=last_unit)
            .map(|u| (u % STRIPES as u64) as usize)
            .collect();
        stripes.sort_unstable();
        stripes.dedup();
        let _held: Vec<MutexGuard<'_, ()>> =
            stripes.iter().map(|&s| lock(&self.stripes[s])).collect();
        if self.has_failed() {
            return image.write_at(data, offset);
        }
        // A write larger than a chunk goes as several requests (the destination's buffers
        // are chunk-sized); the guest's write completes when all are acknowledged.
        let mut tickets = Vec::new();
        for (i, piece) in data.chunks(self.chunk_bytes as usize).enumerate() {
            match self
                .target
                .send(self.disk, offset + (i as u64) * self.chunk_bytes, piece)
            {
                Ok(ticket) => tickets.push(ticket),
                Err(e) => {
                    self.fail(format!("sending a mirrored write failed: {e}"));
                    break;
                }
            }
        }
        let local = image.write_at(data, offset);
        if self.has_failed() {
            return local;
        }
        let remote = tickets
            .into_iter()
            .try_for_each(|ticket| self.target.wait(ticket));
        match (&local, remote) {
            (Ok(()), Ok(())) => {
                // Both sides hold these bytes now: the digest says so.
                self.digest.record_run(
                    (offset / BLOCK_SIZE as u64) as usize,
                    data.chunks_exact(BLOCK_SIZE).map(page_hash),
                );
            }
            (Err(e), _) => self.fail(format!(
                "a mirrored write failed locally after it was sent ({e}); the destination may hold bytes the source does not"
            )),
            (Ok(()), Err(e)) => {
                self.fail(format!("the destination did not confirm a mirrored write: {e}"))
            }
        }
        local
    }
}

/// A virtual disk as the guest sees it: an image, plus the mirror of the migration that
/// is moving it, if any. Every guest write goes through [`VirtualDisk::write_at`].
pub struct VirtualDisk {
    image: Arc<DiskImage>,
    mirror: RwLock<Option<Arc<Mirror>>>,
    /// Guest writes while no mirror was attached.
    unmirrored_latency: LatencyHistogram,
}

impl std::fmt::Debug for VirtualDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtualDisk")
            .field("image", &self.image)
            .field("mirrored", &self.mirror().is_some())
            .finish()
    }
}

impl VirtualDisk {
    pub fn new(image: DiskImage) -> Self {
        Self {
            image: Arc::new(image),
            mirror: RwLock::new(None),
            unmirrored_latency: LatencyHistogram::default(),
        }
    }

    pub fn image(&self) -> &Arc<DiskImage> {
        &self.image
    }

    pub fn size(&self) -> u64 {
        self.image.size()
    }

    /// The guest's write path: `offset` and `data.len()` multiples of [`BLOCK_SIZE`], `data`
    /// block-aligned in memory. Returns when the write is complete: locally, and on the
    /// destination too when it falls behind a migration's bulk-copy cursor.
    pub fn write_at(&self, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        if data.is_empty() {
            return Ok(());
        }
        if !offset.is_multiple_of(BLOCK_SIZE as u64) || !data.len().is_multiple_of(BLOCK_SIZE) {
            return Err(DiskError::Misaligned {
                op: "guest write",
                offset,
                len: data.len() as u64,
                align: BLOCK_SIZE as u64,
            });
        }
        if offset
            .checked_add(data.len() as u64)
            .is_none_or(|end| end > self.size())
        {
            return Err(DiskError::OutOfRange {
                path: self.image.path().to_path_buf(),
                op: "guest write",
                offset,
                len: data.len() as u64,
                size: self.size(),
            });
        }
        match self.mirror() {
            Some(mirror) if !mirror.has_failed() => mirror.write(&self.image, offset, data),
            _ => {
                let started = Instant::now();
                let result = self.image.write_at(data, offset);
                self.unmirrored_latency.record(started.elapsed());
                result
            }
        }
    }

    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), DiskError> {
        self.image.read_at(buf, offset)
    }

    pub fn mirror(&self) -> Option<Arc<Mirror>> {
        self.mirror
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts routing guest writes through `mirror`.
    pub fn attach_mirror(&self, mirror: Arc<Mirror>) -> Result<(), DiskError> {
        let mut slot = self.mirror.write().unwrap_or_else(|p| p.into_inner());
        if slot.is_some() {
            return Err(DiskError::Mirror {
                reason: "the disk is already being mirrored by another migration".into(),
            });
        }
        *slot = Some(mirror);
        Ok(())
    }

    /// Stops mirroring (writes in flight finish on the mirror they started on).
    pub fn detach_mirror(&self) -> Option<Arc<Mirror>> {
        self.mirror
            .write()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Latency of guest writes made while no mirror was attached.
    pub fn unmirrored_latency(&self) -> LatencySummary {
        self.unmirrored_latency.summary()
    }

    pub fn reset_unmirrored_latency(&self) {
        self.unmirrored_latency.reset();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{AlignedBuf, DirectIo};
    use crate::numa::{self, ThreadRole};
    use std::sync::atomic::AtomicU32;

    const CHUNK: u64 = 256 << 10;
    const SIZE: u64 = 4 << 20;

    /// Applies mirrored writes to a second image at once, as an acknowledged remote would.
    struct ImageTarget {
        destination: DiskImage,
        next: AtomicU32,
        fail_after: Option<u32>,
    }

    impl MirrorTarget for ImageTarget {
        fn send(&self, _disk: u32, offset: u64, data: &[u8]) -> Result<u32, DiskError> {
            let ticket = self.next.fetch_add(1, Ordering::Relaxed);
            if self.fail_after.is_some_and(|n| ticket >= n) {
                return Err(DiskError::Mirror {
                    reason: "link down".into(),
                });
            }
            self.destination.write_at(data, offset)?;
            Ok(ticket)
        }

        fn wait(&self, _ticket: u32) -> Result<(), DiskError> {
            Ok(())
        }
    }

    fn setup(
        dir: &std::path::Path,
        fail_after: Option<u32>,
    ) -> (Arc<VirtualDisk>, Arc<Mirror>, Arc<ImageTarget>) {
        let source = DiskImage::create(&dir.join("src.img"), SIZE, DirectIo::Auto).unwrap();
        let destination = DiskImage::create(&dir.join("dst.img"), SIZE, DirectIo::Auto).unwrap();
        let target = Arc::new(ImageTarget {
            destination,
            next: AtomicU32::new(0),
            fail_after,
        });
        let disk = Arc::new(VirtualDisk::new(source));
        let digest = Arc::new(MemoryDigest::new_zeroed(
            (SIZE / BLOCK_SIZE as u64) as usize,
        ));
        let mirror = Arc::new(
            Mirror::new(
                0,
                SIZE,
                CHUNK,
                Arc::clone(&target) as Arc<dyn MirrorTarget>,
                digest,
            )
            .unwrap(),
        );
        disk.attach_mirror(Arc::clone(&mirror)).unwrap();
        (disk, mirror, target)
    }

    fn unit(value: u8, len: usize) -> AlignedBuf {
        let mut buf = AlignedBuf::new_zeroed(len);
        buf.fill(value);
        buf
    }

    fn read_all(image: &DiskImage) -> Vec<u8> {
        let mut buf = AlignedBuf::new_zeroed(SIZE as usize);
        image.read_at(&mut buf, 0).unwrap();
        buf.to_vec()
    }

    /// The bulk copy as the engine does it, with the destination written directly.
    fn copy_chunk(disk: &VirtualDisk, mirror: &Mirror, target: &ImageTarget, index: usize) {
        mirror.claim(index).unwrap();
        let mut buf = AlignedBuf::new_zeroed(CHUNK as usize);
        disk.image()
            .read_at(&mut buf, index as u64 * CHUNK)
            .unwrap();
        // Give racing guest writes a chance to hit the chunk in flight.
        std::thread::sleep(Duration::from_micros(200));
        target
            .destination
            .write_at(&buf, index as u64 * CHUNK)
            .unwrap();
        mirror.copied(index);
    }

    #[test]
    fn writes_ahead_stay_local_and_writes_behind_are_mirrored() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, mirror, target) = setup(dir.path(), None);
        disk.write_at(0, &unit(1, 65536)).unwrap();
        assert!(
            read_all(&target.destination).iter().all(|&b| b == 0),
            "ahead: local only"
        );
        copy_chunk(&disk, &mirror, &target, 0);
        disk.write_at(4096, &unit(2, 8192)).unwrap();
        let dst = read_all(&target.destination);
        assert!(dst[..4096].iter().all(|&b| b == 1));
        assert!(dst[4096..12288].iter().all(|&b| b == 2), "behind: mirrored");
        // A write spanning a copied chunk and one ahead of the cursor is mirrored whole.
        disk.write_at(CHUNK - 4096, &unit(3, 8192)).unwrap();
        let dst = read_all(&target.destination);
        assert!(dst[(CHUNK - 4096) as usize..(CHUNK + 4096) as usize]
            .iter()
            .all(|&b| b == 3));
        let stats = mirror.stats();
        assert_eq!((stats.local_writes, stats.mirrored_writes), (1, 2));
        assert_eq!(stats.mirrored_bytes, 16384);
    }

    #[test]
    fn a_write_to_the_chunk_in_flight_waits_for_it() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, mirror, target) = setup(dir.path(), None);
        mirror.claim(1).unwrap();
        let writer = {
            let disk = Arc::clone(&disk);
            numa::spawn(ThreadRole::Guest, "ferry-test-writer", move || {
                disk.write_at(CHUNK, &unit(9, 4096))
            })
            .unwrap()
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!writer.is_finished(), "the range lock holds the write");
        // The "bulk copy" sends the old bytes and finishes the chunk; the write follows.
        target
            .destination
            .write_at(&unit(0, CHUNK as usize), CHUNK)
            .unwrap();
        mirror.copied(1);
        writer.join().unwrap().unwrap();
        assert_eq!(read_all(&target.destination)[CHUNK as usize], 9);
        assert_eq!(mirror.stats().waited_for_copy, 1);
    }

    #[test]
    fn guest_writes_racing_the_bulk_copy_are_never_lost() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, mirror, target) = setup(dir.path(), None);
        let chunks = mirror.chunks();
        let cursor = Arc::new(AtomicU32::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        // Writers aim at the chunk being copied and its neighbours, over and over.
        let writers: Vec<_> = (0..3u8)
            .map(|w| {
                let (disk, cursor, stop) =
                    (Arc::clone(&disk), Arc::clone(&cursor), Arc::clone(&stop));
                numa::spawn(
                    ThreadRole::Guest,
                    format!("ferry-test-writer{w}"),
                    move || {
                        let mut n = 0u64;
                        let mut buf = AlignedBuf::new_zeroed(8192);
                        while !stop.load(Ordering::Relaxed) {
                            let chunk = u64::from(cursor.load(Ordering::Relaxed)) + (n % 3);
                            let offset = (chunk * CHUNK
                                + (n * 8192 * 7 + u64::from(w) * 4096) % CHUNK)
                                .min(SIZE - 8192)
                                & !4095;
                            buf.fill((n as u8) ^ (w << 6) | 1);
                            disk.write_at(offset, &buf).unwrap();
                            n += 1;
                        }
                        n
                    },
                )
                .unwrap()
            })
            .collect();
        for index in 0..chunks {
            cursor.store(index as u32, Ordering::Relaxed);
            copy_chunk(&disk, &mirror, &target, index);
        }
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Relaxed);
        let writes: u64 = writers.into_iter().map(|w| w.join().unwrap()).sum();
        assert!(writes > 100, "only {writes} writes raced the copy");
        assert!(
            read_all(disk.image()) == read_all(&target.destination),
            "destination differs after {writes} writes"
        );
        let stats = mirror.stats();
        assert!(
            stats.mirrored_writes > 0 && stats.local_writes > 0,
            "{stats:?}"
        );
    }

    #[test]
    fn a_failed_remote_leaves_writes_local_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, mirror, target) = setup(dir.path(), Some(0));
        copy_chunk(&disk, &mirror, &target, 0);
        disk.write_at(0, &unit(5, 4096)).unwrap();
        assert!(mirror.has_failed());
        assert!(mirror.failure().unwrap().contains("link down"));
        // The guest's write landed locally, and later ones do too.
        disk.write_at(4096, &unit(6, 4096)).unwrap();
        let src = read_all(disk.image());
        assert_eq!((src[0], src[4096]), (5, 6));
        assert!(matches!(mirror.claim(1), Err(DiskError::Mirror { .. })));
        disk.detach_mirror();
        assert!(disk.mirror().is_none());
    }

    #[test]
    fn guest_writes_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (disk, _mirror, _target) = setup(dir.path(), None);
        assert!(matches!(
            disk.write_at(100, &unit(1, 4096)),
            Err(DiskError::Misaligned { .. })
        ));
        assert!(matches!(
            disk.write_at(SIZE, &unit(1, 4096)),
            Err(DiskError::OutOfRange { .. })
        ));
        assert!(matches!(
            disk.attach_mirror(Arc::clone(&_mirror)),
            Err(DiskError::Mirror { .. })
        ));
    }
}
