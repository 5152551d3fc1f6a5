//! Tests of the whole reference VM: threads, pacing, quiesce, state transfer and verify.
//! Timing assertions are generous: tests run on a loaded two-core machine.

use std::time::{Duration, Instant};

use crate::hash::xxh3_64;

use super::*;

const MIB: u64 = 1 << 20;

/// An edit to a spec, for table-driven tests.
type SpecChange = fn(&mut VmSpec);

fn spec(name: &str, rate: u64, pattern: Pattern) -> VmSpec {
    VmSpec {
        name: name.into(),
        memory_bytes: 16 * MIB,
        vcpus: 2,
        dirty_rate_bytes_per_s: rate,
        pattern,
        seed: 0x5eed,
        fill_percent: 100,
        disk: None,
    }
}

fn memory_hash(vm: &ReferenceVm) -> u64 {
    let memory = vm.memory();
    xxh3_64(memory.pages_slice(0, memory.pages()))
}

/// Steps taken over `window`, and the time actually measured.
fn steps_over(vm: &ReferenceVm, window: Duration) -> (u64, Duration) {
    let start = Instant::now();
    let before = vm.status().total_steps;
    std::thread::sleep(window);
    let after = vm.status().total_steps;
    (after - before, start.elapsed())
}

#[test]
fn every_pattern_runs_and_verifies() {
    for pattern in Pattern::ALL {
        let vm = ReferenceVm::boot(spec(pattern.as_str(), 50 * MIB, pattern)).unwrap();
        assert_eq!(vm.prefault_ms(), 0.0);
        std::thread::sleep(Duration::from_millis(200));
        let report = vm.verify().unwrap();
        assert!(report.ok, "{pattern}: {report:?}");
        assert_eq!(report.pages_checked, 4096);
        assert!(report.steps.iter().all(|&s| s > 0), "{pattern}: {report:?}");
        // verify resumed the VM: it keeps stepping.
        assert!(vm.status().running);
        let before = vm.status().total_steps;
        std::thread::sleep(Duration::from_millis(50));
        assert!(vm.status().total_steps > before, "{pattern} did not resume");
    }
}

#[test]
fn boot_content_respects_fill_percent() {
    let mut s = spec("fill", 0, Pattern::Uniform);
    s.fill_percent = 50;
    let vm = ReferenceVm::boot(s).unwrap();
    let zero_pages = (0..vm.memory().pages())
        .filter(|&p| crate::memory::region::is_zero(vm.memory().page(p)))
        .count();
    assert!((1600..=2500).contains(&zero_pages), "{zero_pages} of 4096");
    let report = vm.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.steps, vec![0, 0], "rate 0 is idle");
}

#[test]
fn a_single_flipped_byte_is_reported_with_its_address() {
    let mut s = spec("flip", 50 * MIB, Pattern::Hotset);
    s.fill_percent = 50;
    let vm = ReferenceVm::boot(s).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    vm.quiesce().unwrap();
    let last = vm.memory().len() as u64 - 1;
    let mut addrs = vec![0, last, last / 2 + 123, 4096 * 77 + 4095];
    // A page that boot left zero and no vCPU wrote: its expected byte is 0.
    let zero_page = (0..vm.memory().pages())
        .find(|&p| crate::memory::region::is_zero(vm.memory().page(p)))
        .expect("half the pages are unfilled");
    addrs.push(zero_page as u64 * 4096 + 9);
    for addr in addrs {
        let original = vm.memory().read_byte(addr);
        let flipped = original ^ 0x5a;
        vm.memory().write_byte(addr, flipped);
        let report = vm.verify().unwrap();
        assert!(!report.ok);
        assert_eq!(report.mismatched_pages, 1, "addr {addr:#x}");
        assert!(report.register_mismatches.is_empty());
        assert_eq!(
            report.first_mismatches,
            vec![Mismatch {
                page: addr / 4096,
                addr,
                expected: original,
                found: flipped,
            }]
        );
        vm.memory().write_byte(addr, original);
        assert!(vm.verify().unwrap().ok, "restored {addr:#x}");
    }
    assert!(!vm.status().running, "verify leaves a quiesced VM quiesced");
}

#[test]
fn tiny_and_unevenly_split_vms_verify() {
    for (pages, vcpus, pattern) in [
        (1, 1, Pattern::Hotset),
        (5, 3, Pattern::Hotset),
        (7, 4, Pattern::Sweep),
        (11, 2, Pattern::Uniform),
    ] {
        let mut s = spec("tiny", u64::MAX, pattern);
        s.memory_bytes = pages * 4096;
        s.vcpus = vcpus;
        let vm = ReferenceVm::boot(s).unwrap();
        // Every vCPU has stepped (a loaded host may take longer than a fixed sleep).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while vm.status().steps.contains(&0) {
            assert!(std::time::Instant::now() < deadline, "a vCPU never ran");
            std::thread::sleep(Duration::from_millis(5));
        }
        let report = vm.verify().unwrap();
        assert!(report.ok, "{pages} pages, {vcpus} vCPUs: {report:?}");
        assert!(report.steps.iter().all(|&s| s > 0), "{report:?}");
    }
}

#[test]
fn many_mismatches_are_counted_and_the_first_listed() {
    let vm = ReferenceVm::boot(spec("many", 0, Pattern::Sweep)).unwrap();
    for page in (0..100u64).map(|p| p * 40) {
        vm.memory().write_byte(page * 4096 + 1, 0);
        vm.memory().write_byte(page * 4096, 0);
        vm.memory().write_byte(page * 4096 + 1, 0);
    }
    let report = vm.verify().unwrap();
    assert_eq!(report.mismatched_pages, 100);
    assert_eq!(report.first_mismatches.len(), MISMATCHES_LISTED_MAX);
    let pages: Vec<u64> = report.first_mismatches.iter().map(|m| m.page).collect();
    assert_eq!(pages, (0..16u64).map(|p| p * 40).collect::<Vec<_>>());
}

#[test]
fn save_load_resume_continues_exactly() {
    let source = ReferenceVm::boot(spec("src", 50 * MIB, Pattern::Uniform)).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert!(matches!(
        source.save_state(),
        Err(GuestError::NotQuiesced {
            operation: "save_state"
        })
    ));
    source.quiesce().unwrap();
    let saved_steps = source.status().steps;
    assert!(saved_steps.iter().all(|&s| s > 0));
    let blob = source.save_state().unwrap();

    let mut dest_spec = spec("dst", 50 * MIB, Pattern::Uniform);
    dest_spec.name = "dst".into();
    let dest = ReferenceVm::incoming(dest_spec).unwrap();
    assert!(dest.prefault_ms() > 0.0);
    assert!(!dest.status().running);
    for page in 0..source.memory().pages() {
        let bytes: &[u8; 4096] = source.memory().page(page).try_into().unwrap();
        dest.memory().write_page(page, bytes);
    }
    dest.load_state(&blob).unwrap();
    assert_eq!(dest.status().steps, saved_steps);
    assert_eq!(dest.nic(), source.nic());
    let report = dest.verify().unwrap();
    assert!(report.ok, "{report:?}");
    assert_eq!(report.steps, saved_steps);

    dest.resume().unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let report = dest.verify().unwrap();
    assert!(report.ok, "{report:?}");
    for (now, saved) in report.steps.iter().zip(&saved_steps) {
        assert!(
            now > saved,
            "steps {:?} after {saved_steps:?}",
            report.steps
        );
    }
    // The source, still quiesced, is unchanged and still verifies.
    assert!(source.verify().unwrap().ok);
    assert!(matches!(
        dest.load_state(&blob),
        Err(GuestError::NotQuiesced { .. })
    ));
}

#[test]
fn corrupt_or_foreign_state_is_refused_with_a_reason() {
    let source = ReferenceVm::boot(spec("src", 10 * MIB, Pattern::Sweep)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    source.quiesce().unwrap();
    let blob = source.save_state().unwrap();
    let dest = ReferenceVm::incoming(spec("dst", 10 * MIB, Pattern::Sweep)).unwrap();

    let reason = |blob: &[u8]| match dest.load_state(blob) {
        Err(GuestError::BadState { reason }) => reason,
        other => panic!("expected BadState, got {other:?}"),
    };
    let mut flipped = blob.clone();
    flipped[blob.len() / 2] ^= 0x10;
    assert!(reason(&flipped).contains("checksum"));
    assert!(reason(&blob[..blob.len() - 3]).contains("payload bytes"));
    assert!(reason(&blob[..5]).contains("shorter"));
    let mut wrong_magic = blob.clone();
    wrong_magic[..8].copy_from_slice(b"NOTSTATE");
    assert!(reason(&wrong_magic).contains("magic"));
    let mut wrong_version = blob.clone();
    wrong_version[8..10].copy_from_slice(&7u16.to_le_bytes());
    assert!(reason(&wrong_version).contains("format version 7"));

    for (what, change) in [
        ("seed", (|s: &mut VmSpec| s.seed += 1) as SpecChange),
        ("vcpus", |s| s.vcpus = 4),
        ("memory_bytes", |s| s.memory_bytes *= 2),
        ("pattern", |s| s.pattern = Pattern::Hotset),
    ] {
        let mut other = spec("other", 10 * MIB, Pattern::Sweep);
        change(&mut other);
        let foreign = ReferenceVm::incoming(other).unwrap();
        match foreign.load_state(&blob) {
            Err(GuestError::BadState { reason }) => assert!(reason.contains(what), "{reason}"),
            other => panic!("{what}: expected BadState, got {other:?}"),
        }
    }
    // None of that touched the destination: a good blob still loads.
    dest.load_state(&blob).unwrap();
}

#[test]
fn quiesce_stops_writes_and_resume_restarts_them() {
    let vm = ReferenceVm::boot(spec("quiet", u64::MAX, Pattern::Uniform)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    vm.quiesce().unwrap();
    vm.quiesce().unwrap(); // idempotent
    assert!(!vm.status().running);
    let steps = vm.status().total_steps;
    let hash = memory_hash(&vm);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(memory_hash(&vm), hash);
    assert_eq!(vm.status().total_steps, steps);

    vm.resume().unwrap();
    vm.resume().unwrap(); // idempotent
    std::thread::sleep(Duration::from_millis(50));
    assert_ne!(memory_hash(&vm), hash);
    assert!(vm.status().total_steps > steps);
    assert!(vm.verify().unwrap().ok);
}

#[test]
fn rapid_quiesce_resume_cycles_lose_nothing() {
    let vm = ReferenceVm::boot(spec("cycles", u64::MAX, Pattern::Hotset)).unwrap();
    for _ in 0..200 {
        vm.quiesce().unwrap();
        vm.resume().unwrap();
    }
    let report = vm.verify().unwrap();
    assert!(report.ok, "{report:?}");
}

#[test]
fn idle_vcpus_quiesce_promptly() {
    let vm = ReferenceVm::boot(spec("idle", 0, Pattern::Uniform)).unwrap();
    let start = Instant::now();
    vm.quiesce().unwrap();
    assert!(start.elapsed() < Duration::from_secs(1));
    assert_eq!(vm.status().total_steps, 0);
}

#[test]
fn throttle_reduces_the_step_rate() {
    for rate in [u64::MAX, 400 * MIB] {
        let mut s = spec("throttle", rate, Pattern::Uniform);
        s.vcpus = 1;
        let vm = ReferenceVm::boot(s).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let (full, full_time) = steps_over(&vm, Duration::from_millis(300));
        vm.set_throttle(90);
        assert_eq!(vm.status().throttle_percent, 90);
        std::thread::sleep(Duration::from_millis(20));
        let (slow, slow_time) = steps_over(&vm, Duration::from_millis(300));
        let full_rate = full as f64 / full_time.as_secs_f64();
        let slow_rate = slow as f64 / slow_time.as_secs_f64();
        assert!(slow > 0, "rate {rate}: a throttled guest still runs");
        assert!(
            slow_rate < full_rate * 0.5,
            "rate {rate}: {slow_rate:.0} steps/s at 90% vs {full_rate:.0} at 0%"
        );
        vm.set_throttle(200);
        assert_eq!(vm.status().throttle_percent, THROTTLE_PERCENT_MAX);
    }
}

#[test]
fn pacing_holds_the_set_rate() {
    let vm = ReferenceVm::boot(spec("paced", 40 * MIB, Pattern::Uniform)).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let (steps, elapsed) = steps_over(&vm, Duration::from_millis(300));
    let expected = 40.0 * MIB as f64 / 4096.0 * elapsed.as_secs_f64();
    let ratio = steps as f64 / expected;
    assert!(
        (0.5..=1.3).contains(&ratio),
        "{steps} steps in {elapsed:?}, expected about {expected:.0}"
    );
}

#[test]
fn resume_does_not_catch_up_the_pause() {
    let vm = ReferenceVm::boot(spec("no-burst", 4 * MIB, Pattern::Sweep)).unwrap();
    vm.quiesce().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    vm.resume().unwrap();
    // 4 MiB/s = 1024 steps/s; 300 ms of catch-up would be ~300 steps at once.
    let (steps, elapsed) = steps_over(&vm, Duration::from_millis(30));
    let expected = 1024.0 * elapsed.as_secs_f64();
    assert!(
        (steps as f64) < expected + 60.0,
        "{steps} steps in {elapsed:?} right after resume"
    );
}

#[test]
fn shutdown_is_final_and_idempotent() {
    let vm = ReferenceVm::boot(spec("down", 50 * MIB, Pattern::Uniform)).unwrap();
    std::thread::sleep(Duration::from_millis(30));
    vm.shutdown();
    vm.shutdown();
    assert!(!vm.status().running);
    assert!(matches!(
        vm.resume(),
        Err(GuestError::Stopped {
            operation: "resume"
        })
    ));
    vm.quiesce().unwrap();
    // The register files were written back on the way out.
    assert!(vm.verify().unwrap().ok);
    assert!(vm.save_state().is_ok());
}

#[test]
fn specs_are_validated() {
    let good = spec("v", 0, Pattern::Uniform);
    good.validate().unwrap();
    let cases: [(SpecChange, &str); 7] = [
        (|s| s.name.clear(), "name"),
        (|s| s.memory_bytes += 1, "memory_bytes"),
        (|s| s.memory_bytes = 0, "memory_bytes"),
        (|s| s.memory_bytes = 4096, "fewer than the 2 vCPUs"),
        (|s| s.vcpus = 0, "vcpus"),
        (|s| s.vcpus = 65, "vcpus"),
        (|s| s.fill_percent = 101, "fill_percent"),
    ];
    for (change, what) in cases {
        let mut s = good.clone();
        change(&mut s);
        match s.validate() {
            Err(GuestError::BadSpec { reason }) => assert!(reason.contains(what), "{reason}"),
            other => panic!("{what}: {other:?}"),
        }
        assert!(ReferenceVm::boot(s).is_err());
    }
}

#[test]
fn patterns_parse_and_print() {
    for pattern in Pattern::ALL {
        assert_eq!(pattern.to_string().parse::<Pattern>(), Ok(pattern));
    }
    let err = "random".parse::<Pattern>().unwrap_err().to_string();
    assert!(
        err.contains("\"random\"") && err.contains("hotset"),
        "{err}"
    );
    let json = postcard::to_stdvec(&spec("p", 1, Pattern::Sweep)).unwrap();
    let back: VmSpec = postcard::from_bytes(&json).unwrap();
    assert_eq!(back.pattern, Pattern::Sweep);
}

/// Release-mode measurements: `cargo test --release -p ferry-dataplane --lib
/// guest::reference::tests::measure -- --ignored --nocapture`.
#[test]
#[ignore = "measurement; run in release mode"]
fn measure_verify_time_for_1_gib() {
    // Paced (few steps to replay), then unpaced for a second (millions of steps).
    for (rate, run) in [(256 * MIB, 500), (u64::MAX, 1000)] {
        let mut s = spec("measure-verify", rate, Pattern::Uniform);
        s.memory_bytes = 1 << 30;
        s.vcpus = 4;
        let start = Instant::now();
        let vm = ReferenceVm::boot(s).unwrap();
        let boot = start.elapsed();
        std::thread::sleep(Duration::from_millis(run));
        vm.quiesce().unwrap();
        let report = vm.verify().unwrap();
        assert!(report.ok);
        println!(
            "1 GiB: boot {:.0} ms, verify {:.1} ms ({} steps replayed)",
            boot.as_secs_f64() * 1e3,
            report.elapsed_ms,
            report.steps.iter().sum::<u64>()
        );
    }
}

#[test]
#[ignore = "measurement; run in release mode"]
fn measure_unpaced_step_rate() {
    let mut s = spec("measure-rate", u64::MAX, Pattern::Uniform);
    s.memory_bytes = 64 * MIB;
    s.vcpus = 1;
    let vm = ReferenceVm::boot(s).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let (steps, elapsed) = steps_over(&vm, Duration::from_secs(1));
    let rate = steps as f64 / elapsed.as_secs_f64();
    println!(
        "unpaced: {rate:.0} steps/s per vCPU ({:.0} MiB/s)",
        rate * 4096.0 / MIB as f64
    );
}
