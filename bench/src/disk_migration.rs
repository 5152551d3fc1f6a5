//! One whole migration of a VM that owns a disk, in one process: the harness of
//! `ferry-bench disk`, cut down from the engine tests' `boot_pair_with_disk` and
//! `migrate_with` (the bench cannot import test code).
//!
//! The guest is a small, idle reference VM (memory, vCPU registers, device state) with the
//! disk image attached beside it ([`DiskGuest`]). `ReferenceVm::boot_with_disk` would write
//! its boot content over every filled extent at each boot: 2 GiB of writes per migration
//! for a full 2 GiB disk. Attaching the disk beside the VM lets one filled image serve
//! every run of the benchmark. The engine reaches disks only through the [`Guest`] seam, so
//! what it does with them (mirror, bulk copy, lock-step digests) is the same.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use ferry_dataplane::disk::{AlignedBuf, DirectIo, DiskImage, VirtualDisk};
use ferry_dataplane::engine::destination::{migrate_in, DestinationContext};
use ferry_dataplane::engine::source::{migrate_out, SourceContext};
use ferry_dataplane::engine::{MigrationParams, Phase, Progress};
use ferry_dataplane::guest::reference::{Pattern, ReferenceVm, VmSpec};
use ferry_dataplane::guest::{Guest, GuestError};
use ferry_dataplane::memory::tracker::UffdWpTracker;
use ferry_dataplane::memory::GuestMemory;
use ferry_dataplane::transport::tcp::{TcpDestination, TcpSource};
use ferry_dataplane::transport::tcp_disk::{TcpDiskDestination, TcpDiskSource};
use serde::Serialize;

use crate::cpu::{thread_deltas, thread_seconds, CpuTime};
use crate::link::{loopback_pairs, Link};

const GIB: f64 = (1u64 << 30) as f64;

/// Memory of the VM that owns the disk: small, so the bulk copy dominates the migration.
const GUEST_MEMORY_BYTES: u64 = 64 << 20;

/// Bytes written per piece when filling an image.
const FILL_PIECE_BYTES: usize = 8 << 20;

/// Pieces compared between source and destination image after a copy.
const COMPARE_SAMPLES: u64 = 16;

/// A reference VM with a disk attached beside it (see the module docs).
pub struct DiskGuest {
    vm: ReferenceVm,
    disks: Vec<Arc<VirtualDisk>>,
}

impl DiskGuest {
    pub fn new(vm: ReferenceVm, disk: Arc<VirtualDisk>) -> Self {
        Self {
            vm,
            disks: vec![disk],
        }
    }
}

impl Guest for DiskGuest {
    fn memory(&self) -> &Arc<GuestMemory> {
        Guest::memory(&self.vm)
    }
    fn disks(&self) -> &[Arc<VirtualDisk>] {
        &self.disks
    }
    fn quiesce(&self) -> Result<(), GuestError> {
        self.vm.quiesce()
    }
    fn resume(&self) -> Result<(), GuestError> {
        self.vm.resume()
    }
    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        self.vm.save_state()
    }
    fn load_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        self.vm.load_state(blob)
    }
    fn set_throttle(&self, percent: u8) {
        self.vm.set_throttle(percent)
    }
}

/// A directory created for one benchmark run and removed with everything in it on drop.
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    pub fn new(parent: &Path, what: &str) -> anyhow::Result<Self> {
        let path = parent.join(format!("ferry-bench-{what}.{}", std::process::id()));
        std::fs::create_dir_all(&path)
            .with_context(|| format!("creating the scratch directory {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            eprintln!("warning: cannot remove {}: {e}", self.0.display());
        }
    }
}

/// Removes a file on drop (a destination image, whatever happened to the run).
pub struct RemoveOnDrop(pub PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// Fills `buf` with xorshift64* output seeded by `seed`: no 8-byte word is zero (the
/// generator's state never is and the multiplier is odd), so no block reads as zero.
pub fn fill_pattern(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for word in buf.chunks_exact_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        word.copy_from_slice(&x.wrapping_mul(0x2545_f491_4f6c_dd1d).to_le_bytes());
    }
}

/// Creates an image of `size` bytes at `path` (O_DIRECT where the filesystem allows it)
/// and writes non-zero content over all of it in big pieces, then makes it durable.
pub fn create_filled_image(path: &Path, size: u64) -> anyhow::Result<DiskImage> {
    let image = DiskImage::create(path, size, DirectIo::Auto)
        .with_context(|| format!("creating {}", path.display()))?;
    let mut buf = AlignedBuf::new_zeroed(FILL_PIECE_BYTES);
    let mut offset = 0u64;
    while offset < size {
        let len = (size - offset).min(FILL_PIECE_BYTES as u64) as usize;
        fill_pattern(&mut buf[..len], offset / FILL_PIECE_BYTES as u64 + 1);
        image
            .write_at(&buf[..len], offset)
            .with_context(|| format!("filling {}", path.display()))?;
        offset += len as u64;
    }
    image.sync()?;
    Ok(image)
}

/// Compares [`COMPARE_SAMPLES`] pieces of 1 MiB spread over both images (first and last
/// included): a cheap check that a copy landed where it should, next to the digests.
pub fn compare_samples(a: &DiskImage, b: &DiskImage) -> anyhow::Result<()> {
    anyhow::ensure!(a.size() == b.size(), "sizes differ");
    let len = a.size().min(1 << 20);
    let mut x = AlignedBuf::new_zeroed(len as usize);
    let mut y = AlignedBuf::new_zeroed(len as usize);
    let last = a.size() - len;
    for i in 0..COMPARE_SAMPLES {
        let offset = (last * i / (COMPARE_SAMPLES - 1)) / 4096 * 4096;
        a.read_at(&mut x, offset)?;
        b.read_at(&mut y, offset)?;
        anyhow::ensure!(
            x[..] == y[..],
            "{} and {} differ in the MiB at offset {offset}",
            a.path().display(),
            b.path().display()
        );
    }
    Ok(())
}

/// A thread (by name) and the CPU it spent during the bulk copy.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ThreadBusy {
    pub name: String,
    pub cpu_s: f64,
    /// CPU seconds over the bulk copy's wall time.
    pub busy_percent: f64,
}

/// One migration's bulk copy, as its report and the bench's own clocks saw it.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CopySample {
    /// The engine's figures (`report.disks[0]`).
    pub copy_ms: f64,
    pub copy_bytes_per_s: f64,
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub source_direct: bool,
    pub destination_direct: bool,
    pub registered_buffers: bool,
    /// Process CPU (user + sys) from the start of the disk-copy phase to the start of
    /// memory pre-copy: source and destination threads alike.
    pub cpu_s: f64,
    pub cpu_s_per_gib: f64,
    /// Threads by CPU over that window, busiest first (the ones above 1 %).
    pub threads: Vec<ThreadBusy>,
    /// The whole migration (disk, 64 MiB of memory, switch-over).
    pub total_ms: f64,
    /// Why the migration or a check after it failed.
    pub error: Option<String>,
}

fn guest_spec() -> VmSpec {
    VmSpec {
        name: "bench-disk".into(),
        memory_bytes: GUEST_MEMORY_BYTES,
        vcpus: 1,
        dirty_rate_bytes_per_s: 0,
        pattern: Pattern::Uniform,
        seed: 42,
        fill_percent: 100,
        disk: None,
    }
}

/// Migrates an idle VM owning `source_disk` to a fresh image in `destination_dir` named
/// after `tag`, removed afterwards. A failure is in `error`, never a panic.
pub fn migrate(
    source_disk: &Arc<VirtualDisk>,
    destination_dir: &Path,
    tag: &str,
    params: &MigrationParams,
) -> CopySample {
    let mut sample = CopySample::default();
    if let Err(e) = migrate_into(source_disk, destination_dir, tag, params, &mut sample) {
        sample.error = Some(format!("{e:#}"));
    }
    sample
}

/// CPU clocks at a point of the migration.
struct Snapshot {
    at: Instant,
    cpu: CpuTime,
    threads: std::collections::BTreeMap<u32, (String, f64)>,
}

impl Snapshot {
    fn now() -> Self {
        Self {
            at: Instant::now(),
            cpu: CpuTime::now(),
            threads: thread_seconds(),
        }
    }
}

fn migrate_into(
    source_disk: &Arc<VirtualDisk>,
    destination_dir: &Path,
    tag: &str,
    params: &MigrationParams,
    sample: &mut CopySample,
) -> anyhow::Result<()> {
    let size = source_disk.size();
    let destination_path = destination_dir.join(format!("{tag}.img"));
    let _remove = RemoveOnDrop(destination_path.clone());
    let destination_image = DiskImage::create(&destination_path, size, DirectIo::Auto)
        .context("creating the destination image")?;
    sample.destination_direct = destination_image.is_direct();
    let destination_disk = Arc::new(VirtualDisk::new(destination_image));
    let spec = guest_spec();
    let incoming = DiskGuest::new(
        ReferenceVm::incoming(spec.clone()).context("creating the incoming VM")?,
        Arc::clone(&destination_disk),
    );
    let source = DiskGuest::new(
        ReferenceVm::boot(spec).context("booting the source VM")?,
        Arc::clone(source_disk),
    );

    // As the agents connect them: the memory streams, then the bulk and mirror lanes.
    let Link {
        source_control,
        source_data,
        destination_control,
        destination_data,
    } = Link::loopback(params.streams)?;
    let mut lanes = loopback_pairs(2)?.into_iter();
    let (bulk_source, bulk_destination) = lanes.next().expect("two lanes");
    let (mirror_source, mirror_destination) = lanes.next().expect("two lanes");
    let disk_source = Arc::new(TcpDiskSource::new(
        bulk_source,
        mirror_source,
        vec![size],
        params.streams,
    )?);
    let disk_destination = Box::new(TcpDiskDestination::new(
        bulk_destination,
        mirror_destination,
        params.streams,
    )?);

    // The bulk copy's window: from the disk-copy phase to the start of memory pre-copy
    // (the engine emits both; the second comes after the last chunk was acknowledged).
    let mut copy_start: Option<Snapshot> = None;
    let mut copy_end: Option<Snapshot> = None;
    let mut on_progress = |p: &Progress| match p.phase {
        Some(Phase::DiskCopy) if copy_start.is_none() => copy_start = Some(Snapshot::now()),
        Some(Phase::MemoryPreCopy) if copy_start.is_some() && copy_end.is_none() => {
            copy_end = Some(Snapshot::now())
        }
        _ => {}
    };

    let source_cancel = AtomicBool::new(false);
    let destination_cancel = AtomicBool::new(false);
    let started = Instant::now();
    let (source_result, destination_result) = std::thread::scope(|s| {
        let destination = std::thread::Builder::new()
            .name("bench-destination".into())
            .spawn_scoped(s, || -> anyhow::Result<_> {
                Ok(migrate_in(DestinationContext {
                    guest: &incoming,
                    control: destination_control,
                    transport: Box::new(TcpDestination::new(destination_data)?),
                    disk_transport: Some(disk_destination),
                    fresh_disks: true,
                    start_paused: false,
                    cancel: &destination_cancel,
                    journal: &ferry_dataplane::engine::barrier::VolatileJournal,
                })?)
            })?;
        let source_thread = std::thread::Builder::new()
            .name("bench-source".into())
            .spawn_scoped(s, || -> anyhow::Result<_> {
                let mut tracker = UffdWpTracker::new(Arc::clone(Guest::memory(&source)))
                    .context("registering the uffd-wp tracker (this benchmark needs it)")?;
                let transport = Arc::new(TcpSource::new(source_data)?);
                // With disks the engine traces after the bulk copy, as the agent has it.
                Ok(migrate_out(
                    SourceContext {
                        guest: &source,
                        tracker: &mut tracker,
                        disk_link: Some(disk_source),
                        control: source_control,
                        transport,
                        params,
                        started,
                        prefault_ms: incoming.vm.prefault_ms(),
                        cancel: &source_cancel,
                        journal: &ferry_dataplane::engine::barrier::VolatileJournal,
                    },
                    &mut on_progress,
                )?)
            })
            .inspect_err(|_| destination_cancel.store(true, Ordering::SeqCst))?;
        let source_result = source_thread
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the source thread panicked")));
        if source_result.is_err() {
            // Never leave the destination waiting for a source that gave up.
            destination_cancel.store(true, Ordering::SeqCst);
        }
        let destination_result = destination
            .join()
            .unwrap_or_else(|_| Err(anyhow::anyhow!("the destination thread panicked")));
        Ok::<_, anyhow::Error>((source_result, destination_result))
    })?;
    sample.total_ms = started.elapsed().as_secs_f64() * 1e3;
    let report = source_result.context("source")?;
    let incoming_report = destination_result.context("destination")?;

    let disk = report
        .disks
        .first()
        .context("the report has no disk")?
        .clone();
    sample.copy_ms = disk.copy_ms;
    sample.copy_bytes_per_s = disk.copy_bytes_per_s;
    sample.data_bytes = disk.data_bytes;
    sample.zero_bytes = disk.zero_bytes;
    sample.source_direct = disk.direct_io;
    sample.registered_buffers = disk.registered_buffers;
    if let (Some(a), Some(b)) = (&copy_start, &copy_end) {
        let wall = b.at.duration_since(a.at).as_secs_f64();
        sample.cpu_s = b.cpu.seconds_since(&a.cpu);
        sample.cpu_s_per_gib = sample.cpu_s / (size as f64 / GIB);
        sample.threads = thread_deltas(&a.threads, &b.threads)
            .into_iter()
            .map(|(name, cpu_s)| ThreadBusy {
                name,
                cpu_s,
                busy_percent: 100.0 * cpu_s / wall.max(1e-9),
            })
            .filter(|t| t.busy_percent >= 1.0)
            .collect();
    }

    anyhow::ensure!(
        incoming_report.disk_digests == vec![disk.digest],
        "disk digests differ: source {:#018x}, destination {:x?}",
        disk.digest,
        incoming_report.disk_digests
    );
    anyhow::ensure!(
        report.memory_digest == incoming_report.memory_digest,
        "memory digests differ"
    );
    let verify = incoming.vm.verify().context("verifying the destination")?;
    anyhow::ensure!(verify.ok, "the destination VM does not verify");
    compare_samples(source_disk.image(), destination_disk.image())?;
    source.vm.shutdown();
    incoming.vm.shutdown();
    Ok(())
}
