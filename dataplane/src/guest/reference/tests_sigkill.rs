//! The real test of persistence: a child process (this test binary, re-run with
//! `--exact persist_child`) runs a persistent VM and is killed with SIGKILL at a random
//! moment; the parent recovers the VM from its files and verifies every page and block.

use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::program::splitmix64;
use super::registers::{testing, RegistersState};
use super::tests_persist::{
    assert_verifies, disk_spec, migrate_into_persistent, new_disk, open_disk, refusal,
    registers_of, runs_on_and_verifies, shm_dir, spec, wait_for,
};
use super::*;

const MIB: u64 = 1 << 20;

/// Environment of the child process the SIGKILL tests start: its role, and paths.
const CHILD_ROLE_ENV: &str = "FERRY_TEST_PERSIST_CHILD";
const CHILD_DIR_ENV: &str = "FERRY_TEST_PERSIST_DIR";
const CHILD_DISK_ENV: &str = "FERRY_TEST_PERSIST_DISK";
const CHILD_MARKER_ENV: &str = "FERRY_TEST_PERSIST_MARKER";

/// The VM the child runs: unpaced memory writes, a high disk write rate.
fn child_spec() -> VmSpec {
    spec("sigkill", u64::MAX, Some(disk_spec(128 * MIB)))
}

/// Not a test of its own: the body of the child process that the SIGKILL tests start (it
/// returns at once in a normal test run). It runs a persistent VM until it is killed.
#[test]
fn persist_child() {
    let Ok(role) = std::env::var(CHILD_ROLE_ENV) else {
        return;
    };
    let path = |name: &str| PathBuf::from(std::env::var_os(name).expect(name));
    let (dir, image, marker) = (
        path(CHILD_DIR_ENV),
        path(CHILD_DISK_ENV),
        path(CHILD_MARKER_ENV),
    );
    let vm = match role.as_str() {
        "run" => {
            let vm =
                ReferenceVm::boot_persistent(child_spec(), Some(open_disk(&image)), &dir).unwrap();
            wait_for(Duration::from_secs(20), "steps on every lane", || {
                let status = vm.status();
                status
                    .steps
                    .iter()
                    .chain(&status.disk_steps)
                    .all(|&s| s > 0)
            });
            write_marker(&marker, b"running");
            vm
        }
        "incoming" => {
            let images = marker.parent().unwrap();
            let (vm, blob) = migrate_into_persistent(images, &image, &dir, child_spec());
            write_marker(&marker, &blob);
            vm
        }
        other => panic!("unknown child role {other:?}"),
    };
    // Wait to be killed; a child whose parent is gone ends by itself.
    std::thread::sleep(Duration::from_secs(30));
    drop(vm);
}

/// Writes `marker` whole (through a rename), so the parent never reads it half written.
fn write_marker(marker: &Path, contents: &[u8]) {
    let partial = marker.with_extension("partial");
    std::fs::write(&partial, contents).unwrap();
    std::fs::rename(&partial, marker).unwrap();
}

/// Starts this test binary as the child `role`.
fn spawn_child(role: &str, dir: &Path, image: &Path, marker: &Path) -> Child {
    let module = module_path!();
    let test = format!(
        "{}::persist_child",
        module.split_once("::").map_or(module, |(_, rest)| rest)
    );
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", &test, "--nocapture", "--test-threads=1"])
        .env(CHILD_ROLE_ENV, role)
        .env(CHILD_DIR_ENV, dir)
        .env(CHILD_DISK_ENV, image)
        .env(CHILD_MARKER_ENV, marker)
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

/// Starts this test binary as the child `role`, waits for its marker and returns it with
/// the marker's contents.
fn start_child(role: &str, dir: &Path, image: &Path, marker: &Path) -> (Child, Vec<u8>) {
    let mut child = spawn_child(role, dir, image, marker);
    let start = Instant::now();
    while !marker.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the {role} child exited before it was ready: {status}");
        }
        if start.elapsed() > Duration::from_secs(60) {
            child.kill().unwrap();
            panic!("the {role} child did not get ready in 60 s");
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    let contents = std::fs::read(marker).unwrap();
    (child, contents)
}

/// SIGKILLs `child` and reaps it.
fn kill(mut child: Child) {
    child.kill().unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
}

/// A seed for the kill delays, printed so a failure can be reproduced.
fn delay_seed() -> u64 {
    let seed = std::env::var("FERRY_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("kill delays from FERRY_TEST_SEED={seed}");
    seed
}

/// THE test of persistence: a child process runs a persistent VM with unpaced memory writes
/// and a high disk write rate, is SIGKILLed at a random moment, and the VM recovered from
/// its files verifies, page by page and block by block, then runs on and verifies again.
#[test]
fn a_vm_killed_with_sigkill_recovers_and_verifies() {
    let shm = shm_dir();
    let scratch = tempfile::tempdir().unwrap();
    let mut seed = delay_seed();
    for round in 0..5 {
        seed = splitmix64(seed);
        let delay = Duration::from_millis(200 + seed % 201);
        let dir = shm.path().join(format!("vm-{round}"));
        let (image, _) = new_disk(scratch.path(), &format!("disk-{round}.img"), 8 * MIB);
        let marker = scratch.path().join(format!("running-{round}"));
        let (child, _) = start_child("run", &dir, &image, &marker);
        std::thread::sleep(delay);
        kill(child);
        let what = format!("round {round}, killed after {delay:?}");
        // The VM died running, with steps in flight.
        assert_eq!(
            testing::state(&dir),
            Some(RegistersState::Running),
            "{what}"
        );

        let spec = ReferenceVm::read_spec(&dir).unwrap();
        assert_eq!(spec, child_spec());
        let vm = ReferenceVm::recover(&dir, Some(open_disk(&image))).unwrap();
        let status = vm.status();
        assert!(!status.running, "{what}");
        assert!(
            status
                .steps
                .iter()
                .chain(&status.disk_steps)
                .all(|&s| s > 1),
            "{what}: {status:?}"
        );
        let report = assert_verifies(&vm, &what);
        eprintln!(
            "{what}: recovered {:?} memory and {:?} disk steps, verified in {:.0} ms",
            report.steps, report.disk_steps, report.elapsed_ms
        );
        runs_on_and_verifies(&vm, Duration::from_millis(50), &what);
        drop(vm);
        ReferenceVm::remove_files(&dir).unwrap();
    }
}

/// A destination killed after `load_state` recovers exactly the state it loaded, even
/// though its spec has vCPUs that would run.
#[test]
fn an_incoming_vm_killed_after_load_state_recovers_the_loaded_state() {
    let shm = shm_dir();
    let scratch = tempfile::tempdir().unwrap();
    let dir = shm.path().join("incoming");
    let (image, _) = new_disk(scratch.path(), "target.img", 8 * MIB);
    let marker = scratch.path().join("loaded");
    let (child, blob) = start_child("incoming", &dir, &image, &marker);
    std::thread::sleep(Duration::from_millis(delay_seed() % 100));
    kill(child);
    assert_eq!(testing::state(&dir), Some(RegistersState::Parked));

    let loaded = state::decode(&blob).unwrap();
    let vm = ReferenceVm::recover(&dir, Some(open_disk(&image))).unwrap();
    let status = vm.status();
    let loaded_steps: Vec<u64> = loaded.vcpus.iter().map(|r| r.steps).collect();
    let loaded_disk_steps: Vec<u64> = loaded.disk_queues.iter().map(|r| r.steps).collect();
    assert_eq!(status.steps, loaded_steps);
    assert_eq!(status.disk_steps, loaded_disk_steps);
    let recovered = registers_of(&vm);
    assert_eq!(recovered.vcpus, loaded.vcpus);
    assert_eq!(recovered.disk_queues, loaded.disk_queues);
    assert_eq!(recovered.nic, loaded.nic);
    assert_verifies(&vm, "incoming VM after SIGKILL");
    runs_on_and_verifies(&vm, Duration::from_millis(50), "incoming VM after SIGKILL");
}

/// A VM killed while it is being created (files half made, boot content half written) is
/// refused cleanly as having nothing to recover, or, if its boot had finished, recovers
/// and verifies; either way its files can be removed.
#[test]
fn a_vm_killed_while_booting_is_refused_or_recovers() {
    let shm = shm_dir();
    let scratch = tempfile::tempdir().unwrap();
    let mut seed = delay_seed();
    let mut outcomes = Vec::new();
    for round in 0..6 {
        seed = splitmix64(seed);
        let delay = Duration::from_millis(seed % 60);
        let dir = shm.path().join(format!("vm-{round}"));
        let (image, _) = new_disk(scratch.path(), &format!("disk-{round}.img"), 8 * MIB);
        let marker = scratch.path().join(format!("running-{round}"));
        let child = spawn_child("run", &dir, &image, &marker);
        std::thread::sleep(delay);
        kill(child);
        let what = format!("round {round}, killed {delay:?} after the start");
        let outcome = if !dir.exists() {
            "not started".to_string()
        } else {
            match ReferenceVm::recover(&dir, Some(open_disk(&image))) {
                Ok(vm) => {
                    assert_verifies(&vm, &what);
                    "recovered".to_string()
                }
                Err(error) => {
                    let text = refusal::<()>(Err(error));
                    assert!(
                        text.contains("not recoverable") || text.contains("No such file"),
                        "{what}: {text}"
                    );
                    format!("refused ({text})")
                }
            }
        };
        ReferenceVm::remove_files(&dir).unwrap();
        assert!(!dir.exists(), "{what}");
        outcomes.push(format!("{what}: {outcome}"));
    }
    eprintln!("{}", outcomes.join("\n"));
}
