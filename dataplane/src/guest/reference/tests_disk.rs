//! Tests of the reference VM's virtual disk: I/O threads, boot fill, verify, state
//! transfer, determinism and write errors. Disks are small image files in a temporary
//! directory, opened with `DirectIo::Auto`.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::disk_program::fill_block;
use super::program::{BOOT_VERSION, STEPS_MAX};
use super::*;
use crate::disk::{AlignedBuf, DirectIo, DiskImage, BLOCK_SIZE};
use crate::memory::region::is_zero;

const MIB: u64 = 1 << 20;

fn disk_spec(bytes: u64, rate: u64, pattern: DiskPattern, fill_percent: u8) -> DiskSpec {
    DiskSpec {
        bytes,
        write_rate_bytes_per_s: rate,
        pattern,
        fill_percent,
    }
}

/// A small VM (4 MiB of memory, 2 vCPUs) with `disk`.
fn spec(name: &str, disk: DiskSpec) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_bytes: 4 * MIB,
        vcpus: 2,
        dirty_rate_bytes_per_s: 8 * MIB,
        pattern: Pattern::Uniform,
        seed: 0xd15c,
        fill_percent: 100,
        disk: Some(disk),
    }
}

/// A fresh image of `bytes` at `dir/name`, as a virtual disk.
fn new_disk(dir: &Path, name: &str, bytes: u64) -> (PathBuf, Arc<VirtualDisk>) {
    let path = dir.join(name);
    let image = DiskImage::create(&path, bytes, DirectIo::Auto).unwrap();
    (path, Arc::new(VirtualDisk::new(image)))
}

/// An existing image as a virtual disk.
fn open_disk(path: &Path) -> Arc<VirtualDisk> {
    Arc::new(VirtualDisk::new(
        DiskImage::open(path, DirectIo::Auto).unwrap(),
    ))
}

/// Copies `source` into `target` through the guest-facing API, 1 MiB at a time.
fn copy_disk(source: &VirtualDisk, target: &VirtualDisk) {
    assert_eq!(source.size(), target.size());
    let mut buf = AlignedBuf::new_zeroed(MIB as usize);
    for offset in (0..source.size()).step_by(MIB as usize) {
        source.read_at(offset, &mut buf).unwrap();
        target.write_at(offset, &buf).unwrap();
    }
}

/// Polls `done` every millisecond for up to `limit`.
fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn read_byte(path: &Path, offset: u64) -> u8 {
    let mut byte = [0u8];
    std::fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut byte, offset)
        .unwrap();
    byte[0]
}

/// Writes one byte behind the guest's back (through the page cache; an O_DIRECT read
/// writes dirty cached pages back before it reads).
fn write_byte(path: &Path, offset: u64, byte: u8) {
    let file = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    file.write_all_at(&[byte], offset).unwrap();
}

#[test]
fn every_disk_pattern_writes_and_verifies() {
    let dir = tempfile::tempdir().unwrap();
    for pattern in DiskPattern::ALL {
        let (_, disk) = new_disk(dir.path(), pattern.as_str(), 16 * MIB);
        let s = spec(pattern.as_str(), disk_spec(16 * MIB, 32 * MIB, pattern, 50));
        let vm = ReferenceVm::boot_with_disk(s, Some(Arc::clone(&disk))).unwrap();
        assert_eq!(vm.disks().len(), 1);
        assert!(Arc::ptr_eq(vm.disk().unwrap(), &disk));
        std::thread::sleep(Duration::from_millis(250));
        let report = vm.verify().unwrap();
        assert!(report.ok, "{pattern}: {report:?}");
        assert_eq!(report.disk_bytes_checked, 16 * MIB);
        assert!(
            report.disk_steps.iter().all(|&s| s > 0),
            "{pattern}: {report:?}"
        );
        let status = vm.status();
        assert!(status.disk_total_steps > 0);
        assert_eq!(status.disk_write_errors, 0);
        // verify resumed the VM: the disk keeps being written.
        wait_for(Duration::from_secs(1), "disk steps after verify", || {
            vm.status().disk_total_steps > status.disk_total_steps
        });
    }
}

#[test]
fn disk_writes_hold_the_set_rate_and_ignore_the_throttle() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = new_disk(dir.path(), "rate", 16 * MIB);
    let s = spec(
        "rate",
        disk_spec(16 * MIB, 16 * MIB, DiskPattern::Random, 0),
    );
    let vm = ReferenceVm::boot_with_disk(s, Some(disk)).unwrap();
    vm.set_throttle(90);
    std::thread::sleep(Duration::from_millis(20));
    let start = Instant::now();
    let before = vm.status().disk_total_steps;
    std::thread::sleep(Duration::from_millis(300));
    let steps = vm.status().disk_total_steps - before;
    // 16 MiB/s of 64 KiB writes = 256 steps/s, throttle or not.
    let expected = 256.0 * start.elapsed().as_secs_f64();
    let ratio = steps as f64 / expected;
    assert!(
        (0.5..=1.3).contains(&ratio),
        "{steps} disk steps, expected about {expected:.0}"
    );
}

#[test]
fn boot_fills_whole_extents_and_leaves_the_rest_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = new_disk(dir.path(), "fill", 32 * MIB);
    let s = spec("fill", disk_spec(32 * MIB, 0, DiskPattern::Random, 50));
    let program = s.disk_program().unwrap();
    let vm = ReferenceVm::boot_with_disk(s, Some(Arc::clone(&disk))).unwrap();
    let mut buf = AlignedBuf::new_zeroed(MIB as usize);
    let mut zero_extents = 0;
    for extent in 0..32 {
        disk.read_at(extent * MIB, &mut buf).unwrap();
        if program.is_extent_filled(extent) {
            // Every block of a filled extent holds boot content.
            let mut expected = [0u8; BLOCK_SIZE];
            for (i, block) in buf.chunks_exact(BLOCK_SIZE).enumerate() {
                fill_block(
                    program.seed,
                    extent * 256 + i as u64,
                    BOOT_VERSION,
                    &mut expected,
                );
                assert_eq!(block, &expected[..], "extent {extent} block {i}");
            }
        } else {
            assert!(is_zero(&buf), "extent {extent} should be zero");
            zero_extents += 1;
        }
    }
    assert!((6..=26).contains(&zero_extents), "{zero_extents} of 32");
    let report = vm.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.disk_steps, vec![0, 0], "write rate 0 is idle");
}

#[test]
fn a_single_flipped_disk_byte_is_reported_with_its_offset() {
    let dir = tempfile::tempdir().unwrap();
    let (path, disk) = new_disk(dir.path(), "flip", 16 * MIB);
    let s = spec(
        "flip",
        disk_spec(16 * MIB, 64 * MIB, DiskPattern::Hotset, 50),
    );
    let program = s.disk_program().unwrap();
    let vm = ReferenceVm::boot_with_disk(s, Some(disk)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    vm.quiesce().unwrap();
    assert!(vm.status().disk_steps.iter().all(|&s| s > 0));

    // A unit vCPU 1 wrote (its first step), a filled extent and a zero extent (expected
    // byte 0), the first and the last byte of the disk.
    let lane = program.lane(1);
    let written_unit = lane.item_of(lane.advance(&mut lane.initial_regs()).0);
    let filled = (0..16).find(|&e| program.is_extent_filled(e)).unwrap();
    let empty = (0..16).find(|&e| !program.is_extent_filled(e)).unwrap();
    let offsets = [
        written_unit * DISK_WRITE_BYTES + 5 * 4096 + 77,
        filled * MIB + 300_001,
        empty * MIB + 4096 * 3 + 9,
        0,
        16 * MIB - 1,
    ];
    for offset in offsets {
        let original = read_byte(&path, offset);
        let flipped = original ^ 0x5a;
        write_byte(&path, offset, flipped);
        let report = vm.verify().unwrap();
        assert!(!report.ok, "offset {offset:#x}");
        assert_eq!(report.mismatched_disk_blocks, 1, "offset {offset:#x}");
        assert_eq!(report.mismatched_pages, 0);
        assert!(report.disk_register_mismatches.is_empty());
        assert_eq!(
            report.first_disk_mismatches,
            vec![DiskMismatch {
                block: offset / 4096,
                offset,
                expected: original,
                found: flipped,
            }]
        );
        write_byte(&path, offset, original);
        assert!(vm.verify().unwrap().ok, "restored {offset:#x}");
    }
    assert!(!vm.status().running, "verify leaves a quiesced VM quiesced");
}

#[test]
fn many_disk_mismatches_are_counted_and_the_lowest_listed() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = new_disk(dir.path(), "many", 8 * MIB);
    let s = spec("many", disk_spec(8 * MIB, 0, DiskPattern::Sequential, 100));
    let vm = ReferenceVm::boot_with_disk(s, Some(Arc::clone(&disk))).unwrap();
    vm.quiesce().unwrap();
    // Zero every 10th block of the disk: 205 blocks.
    let zero = AlignedBuf::new_zeroed(BLOCK_SIZE);
    for block in (0..2048u64).step_by(10) {
        disk.write_at(block * 4096, &zero).unwrap();
    }
    let report = vm.verify().unwrap();
    assert_eq!(report.mismatched_disk_blocks, 205);
    let blocks: Vec<u64> = report
        .first_disk_mismatches
        .iter()
        .map(|m| m.block)
        .collect();
    assert_eq!(
        blocks,
        (0..MISMATCHES_LISTED_MAX as u64)
            .map(|i| i * 10)
            .collect::<Vec<_>>()
    );
}

#[test]
fn disk_registers_survive_save_and_load() {
    let dir = tempfile::tempdir().unwrap();
    let (_, disk) = new_disk(dir.path(), "state", 8 * MIB);
    let s = spec(
        "state",
        disk_spec(8 * MIB, 32 * MIB, DiskPattern::Random, 100),
    );
    let vm = ReferenceVm::boot_with_disk(s.clone(), Some(disk)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    vm.quiesce().unwrap();
    let disk_steps = vm.status().disk_steps;
    assert!(disk_steps.iter().all(|&s| s > 0));
    let blob = vm.save_state().unwrap();
    let state = state::decode(&blob).unwrap();
    assert_eq!(
        state
            .disk_queues
            .iter()
            .map(|q| q.steps)
            .collect::<Vec<_>>(),
        disk_steps
    );
    assert_eq!(state.spec, s);

    // Loading it back is a no-op that still verifies.
    vm.load_state(&blob).unwrap();
    assert_eq!(vm.status().disk_steps, disk_steps);
    assert!(vm.verify().unwrap().ok);

    // A disk register file that does not belong to its step count is found by verify.
    let mut wrong = state.clone();
    wrong.disk_queues[1].rng = s.disk_program().unwrap().lane(1).initial_regs().rng.s;
    vm.load_state(&state::encode(&wrong).unwrap()).unwrap();
    let report = vm.verify().unwrap();
    assert!(!report.ok);
    assert_eq!(report.disk_register_mismatches.len(), 1);
    assert_eq!(report.disk_register_mismatches[0].vcpu, 1);
    vm.load_state(&blob).unwrap();
    assert!(vm.verify().unwrap().ok);

    // A disk-less VM refuses a state with a disk.
    let mut diskless = s.clone();
    diskless.disk = None;
    let plain = ReferenceVm::incoming(diskless).unwrap();
    match plain.load_state(&blob) {
        Err(GuestError::BadState { reason }) => assert!(reason.contains("no disk"), "{reason}"),
        other => panic!("expected BadState, got {other:?}"),
    }
}

/// A migration by hand: quiesce the source, copy memory and disk, load the state on the
/// destination, resume it there, and verify both.
#[test]
fn a_manual_migration_with_disk_verifies_on_the_destination() {
    let dir = tempfile::tempdir().unwrap();
    let (_, source_disk) = new_disk(dir.path(), "source", 16 * MIB);
    let s = spec(
        "src",
        disk_spec(16 * MIB, 48 * MIB, DiskPattern::Hotset, 50),
    );
    let source = ReferenceVm::boot_with_disk(s.clone(), Some(Arc::clone(&source_disk))).unwrap();
    std::thread::sleep(Duration::from_millis(150));
    source.quiesce().unwrap();
    let saved = source.status();
    assert!(saved.disk_steps.iter().all(|&s| s > 0));
    let blob = source.save_state().unwrap();

    let (_, dest_disk) = new_disk(dir.path(), "dest", 16 * MIB);
    let mut dest_spec = s.clone();
    dest_spec.name = "dst".into();
    let dest = ReferenceVm::incoming_with_disk(dest_spec, Some(Arc::clone(&dest_disk))).unwrap();
    assert!(!dest.status().running);
    assert_eq!(dest.status().disk_total_steps, 0);
    for page in 0..source.memory().pages() {
        let bytes: &[u8; 4096] = source.memory().page(page).try_into().unwrap();
        dest.memory().write_page(page, bytes);
    }
    copy_disk(&source_disk, &dest_disk);
    dest.load_state(&blob).unwrap();
    assert_eq!(dest.status().disk_steps, saved.disk_steps);
    let report = dest.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.disk_steps, saved.disk_steps);

    dest.resume().unwrap();
    std::thread::sleep(Duration::from_millis(150));
    let report = dest.verify().unwrap();
    assert!(report.ok, "{report:?}");
    for (now, before) in report.disk_steps.iter().zip(&saved.disk_steps) {
        assert!(
            now > before,
            "disk steps {:?} after {:?}",
            report.disk_steps,
            saved.disk_steps
        );
    }
    // The source, still quiesced, is unchanged.
    assert!(source.verify().unwrap().ok);

    // A destination whose disk missed the copy fails verify on the disk alone.
    let (_, empty_disk) = new_disk(dir.path(), "empty", 16 * MIB);
    let careless = ReferenceVm::incoming_with_disk(s, Some(empty_disk)).unwrap();
    for page in 0..source.memory().pages() {
        let bytes: &[u8; 4096] = source.memory().page(page).try_into().unwrap();
        careless.memory().write_page(page, bytes);
    }
    careless.load_state(&blob).unwrap();
    let report = careless.verify().unwrap();
    assert!(!report.ok);
    assert_eq!(report.mismatched_pages, 0);
    assert!(report.mismatched_disk_blocks > 0);
}

/// Two VMs from the same seed and boot image, run to the same step counts, write the
/// same disk image, whatever the timing.
#[test]
fn same_seed_and_steps_give_the_same_disk() {
    const STEPS: u64 = 150;
    let dir = tempfile::tempdir().unwrap();
    let mut s = spec("same", disk_spec(8 * MIB, 0, DiskPattern::Random, 50));
    s.dirty_rate_bytes_per_s = 0;

    // Boot content is deterministic.
    let mut boot_images = Vec::new();
    for name in ["boot-a", "boot-b"] {
        let (path, disk) = new_disk(dir.path(), name, 8 * MIB);
        let vm = ReferenceVm::boot_with_disk(s.clone(), Some(disk)).unwrap();
        vm.shutdown();
        drop(vm);
        boot_images.push(std::fs::read(&path).unwrap());
    }
    assert_eq!(boot_images[0], boot_images[1]);

    // Start both disk lanes STEPS short of STEPS_MAX: a lane that reaches STEPS_MAX
    // idles, so both VMs stop at exactly the same step counts.
    let program = s.disk_program().unwrap();
    let state = VmState {
        spec: s.clone(),
        vcpus: (0..2)
            .map(|v| VcpuState::from(s.program().lane(v).initial_regs()))
            .collect(),
        disk_queues: (0..2)
            .map(|v| {
                let mut regs = program.lane(v).initial_regs();
                regs.steps = STEPS_MAX - STEPS;
                VcpuState::from(regs)
            })
            .collect(),
        nic: NicState::from_seed(s.seed),
    };
    let blob = state::encode(&state).unwrap();
    s.disk.as_mut().unwrap().write_rate_bytes_per_s = u64::MAX;
    let mut images = Vec::new();
    for name in ["run-a", "run-b"] {
        let path = dir.path().join(name);
        std::fs::write(&path, &boot_images[0]).unwrap();
        let vm = ReferenceVm::incoming_with_disk(s.clone(), Some(open_disk(&path))).unwrap();
        vm.load_state(&blob).unwrap();
        vm.resume().unwrap();
        wait_for(Duration::from_secs(2), "the disk lanes to finish", || {
            vm.status().disk_steps.iter().all(|&s| s == STEPS_MAX)
        });
        vm.shutdown();
        drop(vm);
        images.push(std::fs::read(&path).unwrap());
    }
    assert_ne!(images[0], boot_images[0], "the lanes wrote");
    assert!(images[0] == images[1], "the two runs wrote different disks");
}

#[test]
fn the_disk_must_match_the_spec() {
    let dir = tempfile::tempdir().unwrap();
    let (_, small) = new_disk(dir.path(), "small", 8 * MIB);
    let s = spec("mismatch", disk_spec(16 * MIB, 0, DiskPattern::Random, 100));
    let reason = |result: Result<ReferenceVm, GuestError>| match result {
        Err(GuestError::BadSpec { reason }) => reason,
        other => panic!("expected BadSpec, got {other:?}"),
    };
    let why = reason(ReferenceVm::boot_with_disk(
        s.clone(),
        Some(Arc::clone(&small)),
    ));
    assert!(why.contains("16777216") && why.contains("8388608"), "{why}");
    let why = reason(ReferenceVm::incoming_with_disk(
        s.clone(),
        Some(Arc::clone(&small)),
    ));
    assert!(why.contains("8388608"), "{why}");
    assert!(reason(ReferenceVm::boot(s.clone())).contains("needs a disk"));
    assert!(reason(ReferenceVm::incoming(s.clone())).contains("needs a disk"));
    let mut diskless = s;
    diskless.disk = None;
    assert!(reason(ReferenceVm::boot_with_disk(diskless, Some(small))).contains("spec has none"));
}

#[test]
fn disk_specs_are_validated() {
    let good = spec("v", disk_spec(4 * MIB, 0, DiskPattern::Random, 100));
    good.validate().unwrap();
    type DiskChange = fn(&mut VmSpec);
    let cases: [(DiskChange, &str); 6] = [
        (|s| s.disk.as_mut().unwrap().bytes = 0, "disk bytes"),
        (
            |s| s.disk.as_mut().unwrap().bytes += 4096,
            "multiple of 1048576",
        ),
        (
            |s| s.disk.as_mut().unwrap().bytes = DISK_BYTES_MAX + MIB,
            "disk bytes",
        ),
        (|s| s.vcpus = 65, "vcpus"),
        (
            |s| {
                s.vcpus = 64;
                s.disk.as_mut().unwrap().bytes = MIB;
            },
            "fewer than the 64 vCPUs",
        ),
        (
            |s| s.disk.as_mut().unwrap().fill_percent = 101,
            "disk fill_percent",
        ),
    ];
    for (change, what) in cases {
        let mut s = good.clone();
        change(&mut s);
        match s.validate() {
            Err(GuestError::BadSpec { reason }) => assert!(reason.contains(what), "{reason}"),
            other => panic!("{what}: {other:?}"),
        }
    }
}

#[test]
fn disk_patterns_parse_and_print() {
    for pattern in DiskPattern::ALL {
        assert_eq!(pattern.to_string().parse::<DiskPattern>(), Ok(pattern));
    }
    let err = "sweep".parse::<DiskPattern>().unwrap_err().to_string();
    assert!(
        err.contains("\"sweep\"") && err.contains("sequential"),
        "{err}"
    );
    let s = spec("p", disk_spec(MIB, 1, DiskPattern::Sequential, 7));
    let back: VmSpec = postcard::from_bytes(&postcard::to_stdvec(&s).unwrap()).unwrap();
    assert_eq!(back, s);
}

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (mount's syntax), or says why the test is skipped.
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "none"])
            .arg(dir.path())
            .output();
        match out {
            Ok(out) if out.status.success() => Some(Tmpfs { dir }),
            Ok(out) => {
                println!(
                    "skipped: needs root (mount -t tmpfs failed: {})",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
                None
            }
            Err(e) => {
                println!("skipped: needs root and mount(8) ({e})");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let status = std::process::Command::new("umount")
            .arg(self.dir.path())
            .status();
        if !matches!(status, Ok(s) if s.success()) {
            let _ = std::process::Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

/// A full filesystem makes guest writes fail: they are counted and retried as the same
/// step, quiesce still works, and once there is room the disk catches up and verifies.
#[test]
fn failed_disk_writes_are_retried_without_advancing() {
    let Some(fs) = Tmpfs::mount("9m") else {
        return;
    };
    // A sparse 8 MiB image on a 9 MiB filesystem that a filler leaves ~1 MiB of.
    let filler = fs.dir.path().join("filler");
    std::fs::write(&filler, vec![1u8; 8 * MIB as usize]).unwrap();
    let path = fs.dir.path().join("disk.raw");
    std::fs::File::create(&path)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let s = spec(
        "enospc",
        disk_spec(8 * MIB, u64::MAX, DiskPattern::Sequential, 0),
    );
    let vm = ReferenceVm::boot_with_disk(s, Some(open_disk(&path))).unwrap();
    wait_for(Duration::from_secs(2), "a failed disk write", || {
        vm.status().disk_write_errors > 0
    });
    let start = Instant::now();
    vm.quiesce().unwrap();
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "quiesce during write errors"
    );
    let stuck = vm.status();
    assert!(
        stuck.disk_total_steps < 8 * MIB / DISK_WRITE_BYTES,
        "{stuck:?}"
    );

    std::fs::remove_file(&filler).unwrap();
    vm.resume().unwrap();
    // Every unit written at least once: the whole disk is the lanes' content.
    wait_for(Duration::from_secs(2), "the disk to fill", || {
        vm.status().disk_total_steps > 2 * 8 * MIB / DISK_WRITE_BYTES
    });
    let report = vm.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert!(vm.status().disk_write_errors >= stuck.disk_write_errors);
}

/// Release-mode measurement: `cargo test --release -p ferry-dataplane --lib
/// guest::reference::tests_disk::measure -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; run in release mode"]
fn measure_disk_verify_throughput() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = 1 << 30;
    let (_, disk) = new_disk(dir.path(), "measure", bytes);
    let mut s = spec(
        "measure",
        disk_spec(bytes, 256 * MIB, DiskPattern::Random, 100),
    );
    s.dirty_rate_bytes_per_s = 0;
    let start = Instant::now();
    let vm = ReferenceVm::boot_with_disk(s, Some(disk)).unwrap();
    let boot = start.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    vm.quiesce().unwrap();
    for _ in 0..2 {
        let report = vm.verify().unwrap();
        assert!(report.ok);
        println!(
            "1 GiB disk: boot fill {:.0} ms ({:.0} MiB/s), verify {:.0} ms ({:.0} MiB/s, {} disk steps)",
            boot.as_secs_f64() * 1e3,
            1024.0 / boot.as_secs_f64(),
            report.elapsed_ms,
            1024.0 / (report.elapsed_ms / 1e3),
            report.disk_steps.iter().sum::<u64>()
        );
    }
}
