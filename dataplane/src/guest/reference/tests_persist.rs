//! Tests of persistent reference VMs in one process: recovery after a clean stop, after a
//! torn step, of an incoming VM, and refusal of bad files. `tests_sigkill` kills a child
//! process instead.
//!
//! VM directories live in /dev/shm, as in production; disk images in a temporary directory
//! on the ordinary filesystem, as in `tests_disk`.

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::persist::{MEMORY_FILE, REGISTERS_FILE, SPEC_FILE};
use super::registers::{testing, RegistersState};
use super::*;
use crate::disk::{AlignedBuf, DirectIo, DiskImage};

const MIB: u64 = 1 << 20;

/// A fresh directory on tmpfs to hold VM directories.
pub(super) fn shm_dir() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm").expect("/dev/shm is a tmpfs on every Linux host")
}

pub(super) fn disk_spec(write_rate_bytes_per_s: u64) -> DiskSpec {
    DiskSpec {
        bytes: 8 * MIB,
        write_rate_bytes_per_s,
        pattern: DiskPattern::Random,
        fill_percent: 50,
    }
}

/// A small VM: 4 MiB of memory, 2 vCPUs.
pub(super) fn spec(name: &str, dirty_rate_bytes_per_s: u64, disk: Option<DiskSpec>) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_bytes: 4 * MIB,
        vcpus: 2,
        dirty_rate_bytes_per_s,
        pattern: Pattern::Uniform,
        seed: 0x9e75_1575,
        fill_percent: 100,
        disk,
    }
}

/// A fresh image of `bytes` at `dir/name`, as a virtual disk.
pub(super) fn new_disk(dir: &Path, name: &str, bytes: u64) -> (PathBuf, Arc<VirtualDisk>) {
    let path = dir.join(name);
    let image = DiskImage::create(&path, bytes, DirectIo::Auto).unwrap();
    (path, Arc::new(VirtualDisk::new(image)))
}

/// An existing image as a virtual disk.
pub(super) fn open_disk(path: &Path) -> Arc<VirtualDisk> {
    Arc::new(VirtualDisk::new(
        DiskImage::open(path, DirectIo::Auto).unwrap(),
    ))
}

/// The error of `result` with its sources, for matching on text.
pub(super) fn refusal<T>(result: Result<T, GuestError>) -> String {
    let Err(error) = result else {
        panic!("expected a refusal, got Ok");
    };
    crate::engine::error_chain(&error)
}

/// Polls `done` every millisecond for up to `limit`.
pub(super) fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Copies guest memory and the disk of `source` into `target`, as a migration would.
fn copy_guest(source: &ReferenceVm, target: &ReferenceVm) {
    let (from, to) = (source.memory(), target.memory());
    for page in 0..from.pages() {
        to.write_page(page, from.page(page).try_into().unwrap());
    }
    if let (Some(from), Some(to)) = (source.disk(), target.disk()) {
        let mut buf = AlignedBuf::new_zeroed(MIB as usize);
        for offset in (0..from.size()).step_by(MIB as usize) {
            from.read_at(offset, &mut buf).unwrap();
            to.write_at(offset, &buf).unwrap();
        }
    }
}

/// Register files of a quiesced VM, from its own state blob.
pub(super) fn registers_of(vm: &ReferenceVm) -> VmState {
    state::decode(&vm.save_state().unwrap()).unwrap()
}

pub(super) fn assert_verifies(vm: &ReferenceVm, what: &str) -> VerifyReport {
    let report = vm.verify().unwrap();
    assert!(report.ok, "{what}: {report:?}");
    report
}

/// Resumes `vm`, lets it run for `window`, quiesces it and checks that every lane moved on
/// and everything still verifies.
pub(super) fn runs_on_and_verifies(vm: &ReferenceVm, window: Duration, what: &str) {
    let before = vm.status();
    vm.resume().unwrap();
    std::thread::sleep(window);
    vm.quiesce().unwrap();
    let after = vm.status();
    for (lane, (b, a)) in before.steps.iter().zip(&after.steps).enumerate() {
        assert!(
            a > b,
            "{what}: memory lane {lane} did not run on ({b} → {a})"
        );
    }
    for (lane, (b, a)) in before.disk_steps.iter().zip(&after.disk_steps).enumerate() {
        assert!(a > b, "{what}: disk lane {lane} did not run on ({b} → {a})");
    }
    assert_verifies(vm, what);
    if let Some(dir) = vm.files_dir() {
        assert_eq!(testing::state(dir), Some(RegistersState::Parked), "{what}");
    }
}

#[test]
fn a_stopped_persistent_vm_recovers_exactly_and_runs_on() {
    let shm = shm_dir();
    let images = tempfile::tempdir().unwrap();
    for with_disk in [false, true] {
        let what = if with_disk {
            "with disk"
        } else {
            "memory only"
        };
        let dir = shm.path().join("agent").join(format!("vm-{with_disk}"));
        let disk_spec = with_disk.then(|| disk_spec(16 * MIB));
        let (image, disk) = match with_disk {
            true => {
                let (path, disk) = new_disk(images.path(), "disk.img", 8 * MIB);
                (Some(path), Some(disk))
            }
            false => (None, None),
        };
        let vm =
            ReferenceVm::boot_persistent(spec("stopped", 32 * MIB, disk_spec), disk, &dir).unwrap();
        assert_eq!(vm.files_dir(), Some(dir.as_path()));
        assert_eq!(
            std::fs::metadata(dir.join(MEMORY_FILE)).unwrap().len(),
            4 * MIB
        );
        assert!(dir.join(SPEC_FILE).is_file() && dir.join(REGISTERS_FILE).is_file());
        assert_eq!(
            testing::state(&dir),
            Some(RegistersState::Running),
            "{what}"
        );
        std::thread::sleep(Duration::from_millis(150));
        vm.shutdown();
        let stopped = vm.status();
        let saved = registers_of(&vm);
        assert!(stopped.steps.iter().all(|&s| s > 0), "{what}: {stopped:?}");
        drop(vm);
        assert_eq!(testing::state(&dir), Some(RegistersState::Parked), "{what}");

        assert_eq!(ReferenceVm::read_spec(&dir).unwrap(), saved.spec);
        let disk = image.as_deref().map(open_disk);
        let vm = ReferenceVm::recover(&dir, disk).unwrap();
        let status = vm.status();
        assert!(!status.running, "{what}: recovered parked");
        assert_eq!(status.steps, stopped.steps, "{what}");
        assert_eq!(status.disk_steps, stopped.disk_steps, "{what}");
        assert_eq!(registers_of(&vm), saved, "{what}: register files and NIC");
        let report = assert_verifies(&vm, what);
        assert_eq!(report.steps, stopped.steps);
        runs_on_and_verifies(&vm, Duration::from_millis(100), what);
        drop(vm);

        // Beside the VM's files, the caller may keep its own (a placement record).
        std::fs::write(dir.join("placement.json"), b"{}").unwrap();
        ReferenceVm::remove_files(&dir).unwrap();
        assert!(!dir.exists());
        ReferenceVm::remove_files(&dir).unwrap();
    }
}

#[test]
fn memfd_vms_have_no_files() {
    let vm = ReferenceVm::boot(spec("memfd", 0, None)).unwrap();
    assert_eq!(vm.files_dir(), None);
    let vm = ReferenceVm::incoming(spec("memfd", 0, None)).unwrap();
    assert_eq!(vm.files_dir(), None);
}

/// The lane's item (page or unit) that step `steps + 1` writes.
fn next_item(lane: &program::Lane, steps: u64) -> u64 {
    let mut regs = lane.initial_regs();
    for _ in 0..steps {
        lane.advance(&mut regs);
    }
    let (index, _) = lane.advance(&mut regs);
    lane.item_of(index)
}

/// A process killed in the middle of a step leaves that page or unit torn, with the counter
/// one behind. Verify sees the tear; recovery of a VM that was running completes the step
/// and repairs it.
#[test]
fn a_torn_step_is_completed_by_recovery() {
    let shm = shm_dir();
    let images = tempfile::tempdir().unwrap();
    let dir = shm.path().join("torn");
    let (image, disk) = new_disk(images.path(), "disk.img", 8 * MIB);
    let spec = spec("torn", 16 * MIB, Some(disk_spec(16 * MIB)));
    let vm = ReferenceVm::boot_persistent(spec.clone(), Some(disk), &dir).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    vm.shutdown();
    let stopped = vm.status();
    drop(vm);

    // Tear step n + 1 of every lane: half of its page or unit is garbage.
    let garbage = vec![0xa5u8; 2048];
    let memory = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(MEMORY_FILE))
        .unwrap();
    let program = spec.program();
    for (v, &steps) in (0..).zip(&stopped.steps) {
        let page = next_item(&program.lane(v), steps);
        memory
            .write_all_at(&garbage, page * PAGE_SIZE as u64 + 1024)
            .unwrap();
    }
    let image_file = std::fs::OpenOptions::new()
        .write(true)
        .open(&image)
        .unwrap();
    let disk_program = spec.disk_program().unwrap();
    for (v, &steps) in (0..).zip(&stopped.disk_steps) {
        let unit = next_item(&disk_program.lane(v), steps);
        let torn = vec![0x5au8; (DISK_WRITE_BYTES / 2) as usize];
        image_file
            .write_all_at(&torn, unit * DISK_WRITE_BYTES + DISK_WRITE_BYTES / 2)
            .unwrap();
    }
    drop(image_file);

    // Parked: nothing was in flight, so nothing is completed, and verify sees every tear.
    let vm = ReferenceVm::recover(&dir, Some(open_disk(&image))).unwrap();
    assert_eq!(vm.status().steps, stopped.steps);
    let report = vm.verify().unwrap();
    assert!(!report.ok);
    assert_eq!(report.mismatched_pages, 2, "{report:?}");
    assert!(report.mismatched_disk_blocks >= 2, "{report:?}");
    drop(vm);

    // Running: the step in flight on each lane is completed, and the tears are gone.
    testing::set_state(&dir, RegistersState::Running);
    let vm = ReferenceVm::recover(&dir, Some(open_disk(&image))).unwrap();
    let status = vm.status();
    let plus_one = |steps: &[u64]| steps.iter().map(|s| s + 1).collect::<Vec<_>>();
    assert_eq!(status.steps, plus_one(&stopped.steps));
    assert_eq!(status.disk_steps, plus_one(&stopped.disk_steps));
    assert_eq!(testing::state(&dir), Some(RegistersState::Parked));
    assert_verifies(&vm, "after completing the torn steps");
    runs_on_and_verifies(&vm, Duration::from_millis(50), "after the repair");
}

/// A lane with rate 0 never has a step in flight, so recovery takes none for it.
#[test]
fn recovery_completes_no_step_on_an_idle_lane() {
    let shm = shm_dir();
    let images = tempfile::tempdir().unwrap();
    let dir = shm.path().join("idle");
    let (image, disk) = new_disk(images.path(), "disk.img", 8 * MIB);
    let vm = ReferenceVm::boot_persistent(
        spec("idle-disk", 16 * MIB, Some(disk_spec(0))),
        Some(disk),
        &dir,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(50));
    vm.shutdown();
    let stopped = vm.status();
    drop(vm);
    testing::set_state(&dir, RegistersState::Running);
    let vm = ReferenceVm::recover(&dir, Some(open_disk(&image))).unwrap();
    let status = vm.status();
    assert_eq!(status.disk_steps, vec![0, 0]);
    let plus_one: Vec<u64> = stopped.steps.iter().map(|s| s + 1).collect();
    assert_eq!(status.steps, plus_one);
    assert_verifies(&vm, "idle disk lanes");
}

/// Boots a memfd source with a disk, runs it, and migrates it by hand into a persistent
/// incoming VM in `dir` with the disk image `target_image`. Returns the destination, loaded
/// and parked, and the state blob it loaded.
pub(super) fn migrate_into_persistent(
    images: &Path,
    target_image: &Path,
    dir: &Path,
    target_spec: VmSpec,
) -> (ReferenceVm, Vec<u8>) {
    let source_spec = VmSpec {
        name: "migration-source".into(),
        ..target_spec.clone()
    };
    let (_, source_disk) = new_disk(images, "source.img", 8 * MIB);
    let source = ReferenceVm::boot_with_disk(source_spec, Some(source_disk)).unwrap();
    wait_for(
        Duration::from_secs(10),
        "source steps on every lane",
        || {
            let status = source.status();
            status
                .steps
                .iter()
                .chain(&status.disk_steps)
                .all(|&s| s > 20)
        },
    );
    source.quiesce().unwrap();
    let blob = source.save_state().unwrap();
    let target =
        ReferenceVm::incoming_persistent(target_spec, Some(open_disk(target_image)), dir).unwrap();
    assert_eq!(testing::state(dir), Some(RegistersState::Invalid));
    copy_guest(&source, &target);
    target.load_state(&blob).unwrap();
    assert_eq!(testing::state(dir), Some(RegistersState::Parked));
    (target, blob)
}

#[test]
fn an_incoming_vm_recovers_exactly_the_state_it_loaded() {
    let shm = shm_dir();
    let images = tempfile::tempdir().unwrap();
    let target_spec = spec("incoming", 32 * MIB, Some(disk_spec(16 * MIB)));

    // Before load_state there is nothing to recover.
    let (unloaded_image, unloaded_disk) = new_disk(images.path(), "unloaded.img", 8 * MIB);
    let unloaded = shm.path().join("unloaded");
    drop(
        ReferenceVm::incoming_persistent(target_spec.clone(), Some(unloaded_disk), &unloaded)
            .unwrap(),
    );
    let text = refusal(ReferenceVm::recover(
        &unloaded,
        Some(open_disk(&unloaded_image)),
    ));
    assert!(text.contains("not recoverable"), "{text}");
    assert!(text.contains("did not load its state"), "{text}");
    ReferenceVm::remove_files(&unloaded).unwrap();

    let dir = shm.path().join("loaded");
    let (image, _) = new_disk(images.path(), "target.img", 8 * MIB);
    let (target, blob) = migrate_into_persistent(images.path(), &image, &dir, target_spec);
    drop(target);
    let loaded = state::decode(&blob).unwrap();
    let vm = ReferenceVm::recover(&dir, Some(open_disk(&image))).unwrap();
    let recovered = registers_of(&vm);
    assert_eq!(recovered.vcpus, loaded.vcpus);
    assert_eq!(recovered.disk_queues, loaded.disk_queues);
    assert_eq!(recovered.nic, loaded.nic);
    assert_verifies(&vm, "recovered incoming VM");
    runs_on_and_verifies(&vm, Duration::from_millis(100), "recovered incoming VM");
}

#[test]
fn a_live_vm_cannot_be_recovered_by_another_owner() {
    let shm = shm_dir();
    let dir = shm.path().join("live");
    let vm = ReferenceVm::boot_persistent(spec("live", 8 * MIB, None), None, &dir).unwrap();
    let text = refusal(ReferenceVm::recover(&dir, None));
    assert!(text.contains("in use by a live process"), "{text}");
    // The refusal did not disturb the live VM.
    assert_verifies(&vm, "after a refused recovery");
    drop(vm);
    let vm = ReferenceVm::recover(&dir, None).unwrap();
    assert_verifies(&vm, "recovered once the owner is gone");
}

#[test]
fn an_existing_directory_is_never_taken_over() {
    let shm = shm_dir();
    let dir = shm.path().join("taken");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("someone-else"), b"keep me").unwrap();
    let text = refusal(ReferenceVm::boot_persistent(
        spec("taken", 0, None),
        None,
        &dir,
    ));
    assert!(text.contains("already exists"), "{text}");
    let text = refusal(ReferenceVm::incoming_persistent(
        spec("taken", 0, None),
        None,
        &dir,
    ));
    assert!(text.contains("already exists"), "{text}");
    assert_eq!(std::fs::read(dir.join("someone-else")).unwrap(), b"keep me");
    // remove_files takes a VM directory with whatever flat files are kept beside the VM's,
    // but refuses (untouched) a directory that holds a directory: that is no VM directory.
    std::fs::create_dir(dir.join("nested")).unwrap();
    let error = ReferenceVm::remove_files(&dir).unwrap_err();
    assert_eq!(error.kind(), std::io::ErrorKind::InvalidInput);
    assert!(error.to_string().contains("nested"), "{error}");
    assert!(dir.join("someone-else").exists());
    std::fs::remove_dir(dir.join("nested")).unwrap();
    ReferenceVm::remove_files(&dir).unwrap();
    assert!(!dir.exists());
    // A bad spec creates nothing.
    let never = shm.path().join("never");
    let mut bad = spec("bad", 0, None);
    bad.vcpus = 0;
    refusal(ReferenceVm::boot_persistent(bad, None, &never));
    assert!(!never.exists());
}

/// Copies the three files of the VM directory `from` into a new directory `to`.
fn copy_vm_dir(from: &Path, to: &Path) {
    std::fs::create_dir(to).unwrap();
    for name in [SPEC_FILE, REGISTERS_FILE, MEMORY_FILE] {
        std::fs::copy(from.join(name), to.join(name)).unwrap();
    }
}

fn flip_byte(path: &Path, offset: u64) {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut byte = [0u8];
    file.read_exact_at(&mut byte, offset).unwrap();
    file.write_all_at(&[byte[0] ^ 0x10], offset).unwrap();
}

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// A broken file: what to do to a fresh copy of a good VM directory, and words the refusal
/// must contain.
type Damage = (&'static str, fn(&Path), &'static [&'static str]);

#[test]
fn damaged_files_are_refused_with_a_clear_error() {
    let shm = shm_dir();
    let good = shm.path().join("good");
    let vm = ReferenceVm::boot_persistent(spec("damaged", 8 * MIB, None), None, &good).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    drop(vm);

    let spec_len = std::fs::metadata(good.join(SPEC_FILE)).unwrap().len();
    assert!(spec_len > 24);
    let damages: &[Damage] = &[
        (
            "registers missing",
            |d| std::fs::remove_file(d.join(REGISTERS_FILE)).unwrap(),
            &["opening", "registers", "No such file"],
        ),
        (
            "registers short",
            |d| truncate(&d.join(REGISTERS_FILE), 100),
            &["registers is corrupt", "100 bytes"],
        ),
        (
            "registers empty",
            |d| truncate(&d.join(REGISTERS_FILE), 0),
            &["registers is corrupt", "0 bytes"],
        ),
        (
            "registers magic",
            |d| flip_byte(&d.join(REGISTERS_FILE), 0),
            &["registers is corrupt", "bad magic"],
        ),
        (
            "registers version",
            |d| flip_byte(&d.join(REGISTERS_FILE), 8),
            &["registers is corrupt", "format version"],
        ),
        (
            "registers NIC",
            |d| flip_byte(&d.join(REGISTERS_FILE), 35),
            &["registers is corrupt", "header checksum"],
        ),
        (
            "registers state",
            |d| flip_byte(&d.join(REGISTERS_FILE), 57),
            &["registers is corrupt", "unknown state word"],
        ),
        (
            "registers invalid",
            |d| testing::set_state(d, RegistersState::Invalid),
            &["not recoverable"],
        ),
        (
            "counter bit",
            |d| flip_byte(&d.join(REGISTERS_FILE), 64 + 64 + 2),
            &["registers is corrupt", "lane 1", "fails its check"],
        ),
        (
            "counter of another lane",
            |d| testing::set_counter(d, 0, 1, 5),
            &["registers is corrupt", "lane 0", "fails its check"],
        ),
        (
            "spec missing",
            |d| std::fs::remove_file(d.join(SPEC_FILE)).unwrap(),
            &["opening", "spec", "No such file"],
        ),
        (
            "spec short",
            |d| truncate(&d.join(SPEC_FILE), 10),
            &["spec is corrupt", "shorter than"],
        ),
        (
            "spec cut",
            |d| {
                let len = std::fs::metadata(d.join(SPEC_FILE)).unwrap().len();
                truncate(&d.join(SPEC_FILE), len - 1)
            },
            &["spec is corrupt", "payload bytes"],
        ),
        (
            "spec payload",
            |d| {
                let len = std::fs::metadata(d.join(SPEC_FILE)).unwrap().len();
                flip_byte(&d.join(SPEC_FILE), len - 1)
            },
            &["spec is corrupt", "checksum"],
        ),
        (
            "spec of another VM",
            |d| {
                std::fs::remove_file(d.join(SPEC_FILE)).unwrap();
                let other = tempfile::tempdir_in("/dev/shm").unwrap();
                let other_dir = other.path().join("other");
                drop(
                    ReferenceVm::boot_persistent(spec("someone-else", 0, None), None, &other_dir)
                        .unwrap(),
                );
                std::fs::copy(other_dir.join(SPEC_FILE), d.join(SPEC_FILE)).unwrap();
            },
            &["registers is corrupt", "spec file with checksum"],
        ),
        (
            "memory missing",
            |d| std::fs::remove_file(d.join(MEMORY_FILE)).unwrap(),
            &["opening the guest memory file", "No such file"],
        ),
        (
            "memory short",
            |d| truncate(&d.join(MEMORY_FILE), 4 * MIB - 4096),
            &["guest memory file", "expected 4194304"],
        ),
    ];
    for (i, (what, damage, words)) in damages.iter().enumerate() {
        let dir = shm.path().join(format!("case-{i}"));
        copy_vm_dir(&good, &dir);
        damage(&dir);
        let Err(error) = ReferenceVm::recover(&dir, None) else {
            panic!("{what}: recovered a damaged directory");
        };
        let text = refusal::<()>(Err(error));
        for word in *words {
            assert!(text.contains(word), "{what}: {word:?} not in {text:?}");
        }
        if what.starts_with("spec") && *what != "spec of another VM" {
            let text = refusal(ReferenceVm::read_spec(&dir));
            assert!(text.contains("spec"), "{what}: {text}");
        }
    }

    // A disk where the spec has none, and none where it has one.
    let images = tempfile::tempdir().unwrap();
    let (_, disk) = new_disk(images.path(), "stray.img", 8 * MIB);
    let text = refusal(ReferenceVm::recover(&good, Some(disk)));
    assert!(text.contains("spec has none"), "{text}");
    let with_disk = shm.path().join("with-disk");
    let (image, disk) = new_disk(images.path(), "disk.img", 8 * MIB);
    drop(
        ReferenceVm::boot_persistent(
            spec("with-disk", 0, Some(disk_spec(0))),
            Some(disk),
            &with_disk,
        )
        .unwrap(),
    );
    let text = refusal(ReferenceVm::recover(&with_disk, None));
    assert!(text.contains("none was given"), "{text}");
    let (_, small) = new_disk(images.path(), "small.img", 4 * MIB);
    let text = refusal(ReferenceVm::recover(&with_disk, Some(small)));
    assert!(
        text.contains("8388608 bytes but the disk given is 4194304"),
        "{text}"
    );
    ReferenceVm::recover(&with_disk, Some(open_disk(&image))).unwrap();

    // Nothing above touched the original.
    let vm = ReferenceVm::recover(&good, None).unwrap();
    assert_verifies(&vm, "the undamaged original");
}

/// Steps per second of an unpaced memory-only VM with one vCPU, memfd against persistent
/// (A/B, alternated, in the same run). `cargo test --release -p ferry-dataplane measure_step_rate -- --ignored
/// --nocapture`.
#[test]
#[ignore = "measurement: run by hand"]
fn measure_step_rate_memfd_vs_persistent() {
    let shm = shm_dir();
    let window = Duration::from_secs(2);
    let vm_spec = VmSpec {
        memory_bytes: 64 * MIB,
        vcpus: 1,
        ..spec("rate", u64::MAX, None)
    };
    let mut rates: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    for round in 0..4 {
        for (kind, rates) in rates.iter_mut().enumerate() {
            let dir = shm.path().join(format!("rate-{round}"));
            let vm = match kind {
                0 => ReferenceVm::boot(vm_spec.clone()).unwrap(),
                _ => ReferenceVm::boot_persistent(vm_spec.clone(), None, &dir).unwrap(),
            };
            std::thread::sleep(Duration::from_millis(200));
            let start = Instant::now();
            let before = vm.status().total_steps;
            std::thread::sleep(window);
            let steps = vm.status().total_steps - before;
            rates.push(steps as f64 / start.elapsed().as_secs_f64());
            drop(vm);
            let _ = ReferenceVm::remove_files(&dir);
        }
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    eprintln!(
        "unpaced steps/s: memfd {:.0} {:?}, persistent {:.0} {:?}",
        mean(&rates[0]),
        rates[0].iter().map(|r| *r as u64).collect::<Vec<_>>(),
        mean(&rates[1]),
        rates[1].iter().map(|r| *r as u64).collect::<Vec<_>>()
    );
}
