//! Storage migration through the real engine, transports and io_uring, in one process:
//! bulk copy, mirroring under load, lock-step digests, and fail-back on disk faults.

mod support;

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_dataplane::disk::{AlignedBuf, DiskImage};
use ferry_dataplane::engine::{EngineError, MigrationParams};
use ferry_dataplane::guest::reference::{DiskPattern, ReferenceVm};
use ferry_dataplane::guest::Guest;
use ferry_dataplane::transport::{DiskSource, TransportError};
use support::*;

fn read_image(image: &DiskImage) -> Vec<u8> {
    let mut buf = AlignedBuf::new_zeroed(image.size() as usize);
    image.read_at(&mut buf, 0).unwrap();
    buf.to_vec()
}

fn first_difference(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter().zip(b).position(|(x, y)| x != y)
}

fn params() -> MigrationParams {
    MigrationParams {
        streams: 2,
        start_paused: true,
        ..MigrationParams::default()
    }
}

/// Migrates with the destination paused, compares the images, resumes the destination,
/// and checks it keeps writing and verifies.
fn migrate_and_compare(
    vm: &ReferenceVm,
    incoming: &ReferenceVm,
    params: MigrationParams,
    hooks: Hooks<'_>,
) {
    let mut tracker = kernel_tracker(vm);
    let cancel = AtomicBool::new(false);
    let outcome = migrate_with(vm, incoming, params, &mut tracker, hooks, &cancel);
    let report = outcome.source.expect("source side");
    let incoming_report = outcome.destination.expect("destination side");
    eprintln!(
        "downtime {:.2} ms, total {:.0} ms, disk copy {:.0} ms at {:.2} GiB/s, mirrored {} writes p50 {:.0} us p99 {:.0} us (unmirrored p50 {:.0} us p99 {:.0} us), waited {}",
        report.downtime_ms,
        report.total_ms,
        report.disk_copy_ms,
        report.disks[0].copy_bytes_per_s / (1u64 << 30) as f64,
        report.disks[0].mirrored_writes,
        report.disks[0].mirrored_latency.p50_us,
        report.disks[0].mirrored_latency.p99_us,
        report.disks[0].unmirrored_latency.p50_us,
        report.disks[0].unmirrored_latency.p99_us,
        report.disks[0].waited_for_copy,
    );
    assert_eq!(report.disks.len(), 1);
    assert_eq!(incoming_report.disk_digests, vec![report.disks[0].digest]);
    assert!(
        !incoming.status().running,
        "--paused leaves the destination paused"
    );
    let (source_bytes, destination_bytes) = (
        read_image(vm.disk().unwrap().image()),
        read_image(incoming.disk().unwrap().image()),
    );
    assert!(
        source_bytes == destination_bytes,
        "images differ at byte {:?}",
        first_difference(&source_bytes, &destination_bytes)
    );
    let verified = incoming.verify().unwrap();
    assert!(verified.ok, "{verified:?}");
    assert_eq!(verified.disk_bytes_checked, vm.disk().unwrap().size());
    incoming.resume().unwrap();
    let before = incoming.status().disk_total_steps;
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        incoming.status().disk_total_steps > before,
        "the destination keeps writing its disk"
    );
    assert!(incoming.verify().unwrap().ok);
}

#[test]
fn disk_and_memory_arrive_in_lock_step_under_load_in_every_pattern() {
    for pattern in DiskPattern::ALL {
        let dir = tempfile::tempdir().unwrap();
        let spec = disk_spec(pattern.as_str(), 64, 20, 256, 20, pattern);
        let (vm, incoming) = boot_pair_with_disk(spec, dir.path());
        // Let the guest write for a moment so the disk holds more than boot content.
        std::thread::sleep(Duration::from_millis(100));
        migrate_and_compare(&vm, &incoming, params(), Hooks::default());
    }
}

#[test]
fn guest_writes_into_the_chunk_being_copied_are_not_lost() {
    let dir = tempfile::tempdir().unwrap();
    // A small disk written as fast as the vCPUs can, copied in small chunks one at a time,
    // slowed down so that the chunk in flight is hit many times.
    let spec = disk_spec("racing", 32, 0, 16, u64::MAX >> 20, DiskPattern::Sequential);
    let (vm, incoming) = boot_pair_with_disk(spec, dir.path());
    // The writer catches the cursor only from behind, with mirrored writes: the copy must
    // advance slower than they do. Over soft-RoCE under TCG a mirrored 64 KiB write takes
    // ~8 ms (host: ~0.2 ms), so the chunk in flight is held longer there.
    let pause = Duration::from_millis(if over_rdma() { 30 } else { 2 });
    let hooks = hooked(
        Box::new(move |inner, disk, offset, len, data| {
            std::thread::sleep(pause);
            inner.send_chunk(disk, offset, len, data)
        }),
        pass_writes(),
    );
    let params = MigrationParams {
        disk_chunk_bytes: 128 << 10,
        disk_queue_depth: 1,
        ..params()
    };
    let mut tracker = kernel_tracker(&vm);
    let cancel = AtomicBool::new(false);
    let outcome = migrate_with(&vm, &incoming, params, &mut tracker, hooks, &cancel);
    let report = outcome.source.expect("source side");
    outcome.destination.expect("destination side");
    let disk = &report.disks[0];
    assert!(
        disk.waited_for_copy > 0,
        "no write hit the chunk in flight: {disk:?}"
    );
    assert!(disk.mirrored_writes > 100, "{disk:?}");
    assert!(read_image(vm.disk().unwrap().image()) == read_image(incoming.disk().unwrap().image()));
    assert!(incoming.verify().unwrap().ok);
}

/// A disk link whose requests go through a test's hook.
type ChunkHook = dyn Fn(&dyn DiskSource, u32, u64, u32, Option<&[u8]>) -> Result<u32, TransportError>
    + Send
    + Sync;
type WriteHook =
    dyn Fn(&dyn DiskSource, u32, u64, &[u8]) -> Result<u32, TransportError> + Send + Sync;

struct HookedDisk {
    inner: Arc<dyn DiskSource>,
    on_chunk: Box<ChunkHook>,
    on_write: Box<WriteHook>,
}

impl DiskSource for HookedDisk {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn send_chunk(
        &self,
        disk: u32,
        offset: u64,
        len: u32,
        data: Option<&[u8]>,
    ) -> Result<u32, TransportError> {
        (self.on_chunk)(self.inner.as_ref(), disk, offset, len, data)
    }
    fn send_write(&self, disk: u32, offset: u64, data: &[u8]) -> Result<u32, TransportError> {
        (self.on_write)(self.inner.as_ref(), disk, offset, data)
    }
    fn wait(&self, ticket: u32, deadline: Instant) -> Result<(), TransportError> {
        self.inner.wait(ticket, deadline)
    }
    fn poll(&self, ticket: u32) -> Option<Result<(), TransportError>> {
        self.inner.poll(ticket)
    }
    fn bytes_sent(&self) -> u64 {
        self.inner.bytes_sent()
    }
    fn shutdown(&self) {
        self.inner.shutdown()
    }
}

fn hooked(on_chunk: Box<ChunkHook>, on_write: Box<WriteHook>) -> Hooks<'static> {
    Hooks {
        wrap_disk: Box::new(move |inner| {
            Arc::new(HookedDisk {
                inner,
                on_chunk,
                on_write,
            }) as Arc<dyn DiskSource>
        }),
        ..Hooks::default()
    }
}

fn pass_writes() -> Box<WriteHook> {
    Box::new(|inner, disk, offset, data| inner.send_write(disk, offset, data))
}

/// Runs a migration expected to fail; the source must run on with its disk intact.
fn expect_fail_back(vm: &ReferenceVm, incoming: &ReferenceVm, hooks: Hooks<'_>) -> EngineError {
    let mut tracker = kernel_tracker(vm);
    let cancel = AtomicBool::new(false);
    let outcome = migrate_with(vm, incoming, params(), &mut tracker, hooks, &cancel);
    assert_failed_back(vm, &outcome);
    assert!(
        vm.disk().unwrap().mirror().is_none(),
        "fail-back detaches the mirror"
    );
    let before = vm.status().disk_total_steps;
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        vm.status().disk_total_steps > before
            || vm.spec().disk.as_ref().unwrap().write_rate_bytes_per_s == 0
    );
    outcome.source.unwrap_err()
}

#[test]
fn a_peer_that_writes_beyond_the_disk_is_refused_and_the_source_fails_back() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, incoming) = boot_pair_with_disk(
        disk_spec("liar", 16, 5, 32, 5, DiskPattern::Random),
        dir.path(),
    );
    let size = vm.disk().unwrap().size();
    let hooks = hooked(
        Box::new(move |inner, disk, offset, len, data| {
            // The third chunk claims to lie past the end of the disk.
            let offset = if offset == 2 * u64::from(len) {
                size
            } else {
                offset
            };
            inner.send_chunk(disk, offset, len, data)
        }),
        pass_writes(),
    );
    let error = expect_fail_back(&vm, &incoming, hooks);
    let text = ferry_dataplane::engine::error_chain(&error);
    assert!(text.contains("outside disk 0"), "{text}");
}

#[test]
fn a_disk_read_error_mid_copy_fails_back() {
    let dir = tempfile::tempdir().unwrap();
    // A disk of zeros and no writes, so shrinking and restoring its file loses nothing.
    let mut spec = disk_spec("unreadable", 16, 5, 64, 0, DiskPattern::Random);
    spec.disk.as_mut().unwrap().fill_percent = 0;
    let (vm, incoming) = boot_pair_with_disk(spec, dir.path());
    let path = vm.disk().unwrap().image().path().to_path_buf();
    let size = vm.disk().unwrap().size();
    let shrink = |path: &Path, len: u64| {
        std::fs::OpenOptions::new()
            .write(true)
            .open(path)
            .unwrap()
            .set_len(len)
            .unwrap()
    };
    let hooks = hooked(
        Box::new({
            let path = path.clone();
            move |inner, disk, offset, len, data| {
                if offset == 0 {
                    // The rest of the disk becomes unreadable (reads end early).
                    shrink(&path, 4 << 20);
                }
                inner.send_chunk(disk, offset, len, data)
            }
        }),
        pass_writes(),
    );
    let mut tracker = kernel_tracker(&vm);
    let cancel = AtomicBool::new(false);
    let outcome = migrate_with(&vm, &incoming, params(), &mut tracker, hooks, &cancel);
    shrink(&path, size);
    assert_failed_back(&vm, &outcome);
    let text = ferry_dataplane::engine::error_chain(&outcome.source.unwrap_err());
    assert!(text.contains("disk"), "{text}");
}

#[test]
fn a_mirror_that_breaks_during_pre_copy_fails_back() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, incoming) = boot_pair_with_disk(
        disk_spec("mirror-down", 64, 20, 32, 50, DiskPattern::Random),
        dir.path(),
    );
    let hooks = hooked(
        Box::new(|inner, disk, offset, len, data| inner.send_chunk(disk, offset, len, data)),
        Box::new(|_, _, _, _| {
            Err(TransportError::LinkClosed {
                reason: "mirror lane cut by the test".into(),
            })
        }),
    );
    let error = expect_fail_back(&vm, &incoming, hooks);
    let text = ferry_dataplane::engine::error_chain(&error);
    assert!(text.contains("mirror lane cut by the test"), "{text}");
}

#[test]
fn cancel_during_the_bulk_copy_fails_back() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, incoming) = boot_pair_with_disk(
        disk_spec("cancelled", 16, 5, 128, 5, DiskPattern::Hotset),
        dir.path(),
    );
    let cancel = Arc::new(AtomicBool::new(false));
    let hooks = hooked(
        Box::new({
            let cancel = Arc::clone(&cancel);
            move |inner, disk, offset, len, data| {
                if offset > 0 {
                    cancel.store(true, Ordering::Relaxed);
                }
                inner.send_chunk(disk, offset, len, data)
            }
        }),
        pass_writes(),
    );
    let mut tracker = kernel_tracker(&vm);
    let outcome = migrate_with(&vm, &incoming, params(), &mut tracker, hooks, &cancel);
    assert!(
        matches!(outcome.source, Err(EngineError::Cancelled)),
        "{:?}",
        outcome.source
    );
    // The cancel flag of the harness is the one set above; the VM runs on.
    assert!(vm.status().running);
    assert!(vm.verify().unwrap().ok);
    assert!(vm.disk().unwrap().mirror().is_none());
}

#[test]
fn a_corrupted_chunk_is_caught_by_the_disk_digest_and_the_source_fails_back() {
    let dir = tempfile::tempdir().unwrap();
    let (vm, incoming) = boot_pair_with_disk(
        disk_spec("corrupt", 16, 5, 32, 5, DiskPattern::Random),
        dir.path(),
    );
    let corrupted = AtomicBool::new(false);
    let hooks = hooked(
        Box::new(move |inner, disk, offset, len, data| match data {
            // One flipped bit in the first chunk with data, after the source hashed it.
            Some(bytes) if !corrupted.swap(true, Ordering::Relaxed) => {
                let mut bad = bytes.to_vec();
                bad[100] ^= 1;
                inner.send_chunk(disk, offset, len, Some(&bad))
            }
            _ => inner.send_chunk(disk, offset, len, data),
        }),
        pass_writes(),
    );
    let error = expect_fail_back(&vm, &incoming, hooks);
    assert!(
        matches!(error, EngineError::DiskDigestMismatch { .. }),
        "{error:?}"
    );
}
