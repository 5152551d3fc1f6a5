//! Storage migration between two real agents on loopback: a VM whose disk lives only on the
//! source moves to an agent that has never seen it, while its vCPUs keep writing memory and
//! disk. Checked by content: the two images are compared byte for byte at the switch-over,
//! and the destination replays the guest's program over every page and every disk block.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::{ferry_bin, first_difference, parse_json, Agent, SmallFs};
use serde_json::Value;

fn disk_steps(agent: &Agent, vm: &str) -> u64 {
    let status = agent.json(&["vm", "status", vm]);
    status["disk"]["total_steps"]
        .as_u64()
        .or_else(|| status["disk_total_steps"].as_u64())
        .unwrap_or_else(|| panic!("no disk steps in {status}"))
}

fn assert_disk_advances(agent: &Agent, vm: &str) {
    let before = disk_steps(agent, vm);
    let deadline = Instant::now() + Duration::from_secs(5);
    while disk_steps(agent, vm) <= before {
        assert!(
            Instant::now() < deadline,
            "{vm} does not write its disk on {}",
            agent.addr
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn create(agent: &Agent, vm: &str, memory: &str, disk: &str, pattern: &str) -> Value {
    agent.json(&[
        "vm",
        "create",
        vm,
        "--memory",
        memory,
        "--vcpus",
        "2",
        "--dirty-rate",
        "20MB/s",
        "--disk",
        disk,
        "--disk-write-rate",
        "20MB/s",
        "--disk-pattern",
        pattern,
    ])
}

/// 1 GiB of memory and a 2 GiB disk, both written at 20 MB/s with `pattern` on the disk,
/// migrated with the destination left paused so that its image is the one of the
/// switch-over; then resumed, and it keeps writing.
fn migrate_disk_and_compare(pattern: &str) {
    let (a, b) = (Agent::start(), Agent::start());
    let vm = format!("disk-{pattern}");
    create(&a, &vm, "1G", "2G", pattern);
    std::thread::sleep(Duration::from_millis(300));
    assert_disk_advances(&a, &vm);
    let report = a.json(&[
        "migrate",
        &vm,
        "--to",
        &b.addr,
        "--streams",
        "4",
        "--paused",
        "--keep-source-disks",
    ]);
    let disk = &report["disks"][0];
    assert_eq!(disk["bytes"], 2u64 << 30, "{report}");
    assert!(
        disk["data_bytes"].as_u64().unwrap() + disk["zero_bytes"].as_u64().unwrap() == 2u64 << 30,
        "the bulk copy covers the whole disk once: {disk}"
    );
    assert!(disk["copy_bytes_per_s"].as_f64().unwrap() > 0.0, "{disk}");
    assert!(disk["mirrored_writes"].as_u64().is_some(), "{disk}");
    assert!(disk["digest"].as_u64().is_some(), "{disk}");

    assert!(!a.vm_names().contains(&vm), "the source still hosts {vm}");
    // The source image is kept (--keep-source-disks) exactly as it was at the switch-over;
    // the destination has not run yet (--paused): the two must be the same bytes.
    let (source_image, destination_image) = (a.image_path(&vm), b.image_path(&vm));
    assert_eq!(
        first_difference(&source_image, &destination_image),
        None,
        "{} and {} differ",
        source_image.display(),
        destination_image.display()
    );
    let verify = b.verify(&vm);
    assert_eq!(
        verify["ok"], true,
        "verify failed on the destination: {verify}"
    );
    assert_eq!(verify["disk_bytes_checked"], 2u64 << 30, "{verify}");
    let status = b.json(&["vm", "status", &vm]);
    assert_eq!(status["running"], false, "--paused: {status}");
    b.json(&["vm", "resume", &vm]);
    b.assert_running(&vm);
    assert_disk_advances(&b, &vm);
    let again = b.verify(&vm);
    assert_eq!(again["ok"], true, "{again}");
}

#[test]
fn one_gib_memory_two_gib_disk_random_writes() {
    migrate_disk_and_compare("random");
}

#[test]
fn one_gib_memory_two_gib_disk_sequential_writes() {
    migrate_disk_and_compare("sequential");
}

#[test]
fn one_gib_memory_two_gib_disk_hotset_writes() {
    migrate_disk_and_compare("hotset");
}

#[test]
fn without_paused_the_source_image_is_deleted_and_the_vm_runs_on() {
    let (a, b) = (Agent::start(), Agent::start());
    create(&a, "plain", "64M", "128M", "random");
    a.json(&["migrate", "plain", "--to", &b.addr]);
    assert!(
        !a.image_path("plain").exists(),
        "the source agent deletes the image it created"
    );
    assert!(b.image_path("plain").exists());
    b.assert_running("plain");
    assert_disk_advances(&b, "plain");
    assert_eq!(b.verify("plain")["ok"], true);
}

#[test]
fn a_destination_without_space_refuses_and_the_vm_stays_on_the_source() {
    let Some(small) = SmallFs::mount(64) else {
        eprintln!("skipped: mounting a small tmpfs needs root");
        return;
    };
    let a = Agent::start();
    let b = Agent::start_in(small.path());
    create(&a, "too-big", "64M", "256M", "random");
    let out = a.run(&["migrate", "too-big", "--to", &b.addr]);
    assert!(!out.status.success(), "the migration must fail");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("free"),
        "the error says how much room there is: {text}"
    );
    assert_eq!(a.vm_names(), vec!["too-big".to_string()]);
    a.assert_running("too-big");
    assert_disk_advances(&a, "too-big");
    assert_eq!(a.verify("too-big")["ok"], true);
    assert!(b.vm_names().is_empty());
    assert!(
        !b.image_path("too-big").exists(),
        "no partial image left behind"
    );
    drop(b);
    ferry_tests::remove_memory_dir(small.path());
}

#[test]
fn a_missing_source_disk_is_a_clear_error() {
    let a = Agent::start();
    let out = a.run(&[
        "vm",
        "create",
        "ghost",
        "--memory",
        "64M",
        "--disk",
        "/nonexistent/ferry/disk.img",
    ]);
    assert!(!out.status.success());
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(
        text.contains("/nonexistent/ferry/disk.img"),
        "the error names the path: {text}"
    );
    assert!(a.vm_names().is_empty());
}

#[test]
fn a_flipped_byte_in_the_destination_image_is_found_with_its_offset() {
    let (a, b) = (Agent::start(), Agent::start());
    create(&a, "flip", "64M", "64M", "sequential");
    a.json(&["migrate", "flip", "--to", &b.addr, "--paused"]);
    let image = b.image_path("flip");
    let offset = 5 * (1 << 20) + 12345;
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[offset] ^= 0x40;
    std::fs::write(&image, &bytes).unwrap();
    let verify = b.verify("flip");
    assert_eq!(verify["ok"], false, "{verify}");
    assert_eq!(verify["mismatched_disk_blocks"], 1, "{verify}");
    assert_eq!(
        verify["first_disk_mismatches"][0]["offset"], offset as u64,
        "{verify}"
    );
}

/// Starts migrating `vm` from `a` to `b` in a CLI process and returns once the disk's bulk
/// copy is under way, with the process and the rest of its progress lines.
fn migrate_until_disk_copy(
    a: &Agent,
    b: &Agent,
    vm: &str,
) -> (std::process::Child, impl Iterator<Item = String>) {
    let mut migrate = Command::new(ferry_bin())
        .args([
            "--agent",
            &a.addr,
            "--json",
            "migrate",
            vm,
            "--to",
            &b.addr,
            "--progress-json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(migrate.stdout.take().unwrap())
        .lines()
        .map_while(Result::ok);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let line = lines.next().expect("progress before the end");
        let progress = parse_json(line.as_bytes());
        if progress["phase"] == "DiskCopy"
            && progress["disks"][0]["bytes_copied"].as_u64().unwrap_or(0) > 0
        {
            break;
        }
        assert!(Instant::now() < deadline, "the disk copy never started");
    }
    (migrate, lines)
}

/// After a failed migration: the source still hosts the VM, it runs and writes its disk,
/// and every page and block verifies.
fn assert_kept_on_source(a: &Agent, vm: &str) {
    assert_eq!(a.vm_names(), vec![vm.to_string()]);
    a.assert_running(vm);
    assert_disk_advances(a, vm);
    let verify = a.verify(vm);
    assert_eq!(verify["ok"], true, "{verify}");
    assert_eq!(verify["disk_bytes_checked"], 4u64 << 30, "{verify}");
}

#[test]
fn the_destination_dying_during_the_disk_copy_fails_back() {
    let (a, mut b) = (Agent::start(), Agent::start());
    create(&a, "crash", "256M", "4G", "random");
    let (mut migrate, rest) = migrate_until_disk_copy(&a, &b, "crash");
    b.kill();
    let rest: Vec<String> = rest.collect();
    assert!(
        !migrate.wait().unwrap().success(),
        "the migration must fail: {rest:?}"
    );
    assert_kept_on_source(&a, "crash");
}

#[test]
fn cancel_during_the_disk_copy_fails_back_and_the_destination_removes_its_image() {
    let (a, b) = (Agent::start(), Agent::start());
    create(&a, "halt", "256M", "4G", "sequential");
    let (mut migrate, rest) = migrate_until_disk_copy(&a, &b, "halt");
    a.json(&["cancel", "halt"]);
    let rest: Vec<String> = rest.collect();
    assert!(
        !migrate.wait().unwrap().success(),
        "a cancelled migration exits non-zero: {rest:?}"
    );
    assert_kept_on_source(&a, "halt");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.vm_names().is_empty() || b.image_path("halt").exists() {
        assert!(
            Instant::now() < deadline,
            "the destination keeps its half: {:?}",
            b.vm_names()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A loop device over a file, detached on drop; None when this process cannot make one.
struct LoopDevice {
    path: String,
    _backing: tempfile::TempDir,
}

impl LoopDevice {
    fn attach(mib: u64) -> Option<LoopDevice> {
        let dir = tempfile::tempdir().ok()?;
        let file = dir.path().join("backing.img");
        std::fs::File::create(&file).ok()?.set_len(mib << 20).ok()?;
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&file)
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let path = String::from_utf8(out.stdout).ok()?.trim().to_string();
        Some(LoopDevice {
            path,
            _backing: dir,
        })
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.path]).status();
    }
}

#[test]
fn a_vm_on_a_block_device_migrates_and_the_device_is_left_alone() {
    let Some(device) = LoopDevice::attach(256) else {
        eprintln!("skipped: creating a loop device needs root and losetup");
        return;
    };
    let (a, b) = (Agent::start(), Agent::start());
    create(&a, "on-device", "64M", &device.path, "hotset");
    let status = a.json(&["vm", "status", "on-device"]);
    assert_eq!(status["disk"]["bytes"], 256u64 << 20, "{status}");
    assert_eq!(status["disk"]["block_device"], true, "{status}");
    assert_disk_advances(&a, "on-device");
    let report = a.json(&["migrate", "on-device", "--to", &b.addr, "--paused"]);
    assert_eq!(report["disks"][0]["bytes"], 256u64 << 20, "{report}");
    // The source's device holds the disk as it was at the switch-over; the destination
    // made an image file of its own.
    assert_eq!(
        first_difference(
            std::path::Path::new(&device.path),
            &b.image_path("on-device")
        ),
        None
    );
    assert!(
        std::path::Path::new(&device.path).exists(),
        "a user's device is never removed"
    );
    assert_eq!(b.verify("on-device")["ok"], true);
    b.json(&["vm", "resume", "on-device"]);
    assert_disk_advances(&b, "on-device");
}
