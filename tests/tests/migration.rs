//! Memory migration between two real agents on loopback, checked by content: the
//! destination replays the guest's program and compares every byte (`vm verify`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::{ferry_bin, parse_json, Agent};

/// Creates a 1 GiB VM dirtying 200 MB/s with `pattern` on A, migrates it to B over 4 streams,
/// and checks the report, verify on B, that it runs on B and is gone from A.
fn migrate_and_verify(pattern: &str) {
    let (a, b) = (Agent::start(), Agent::start());
    let vm = format!("vm-{pattern}");
    a.json(&[
        "vm",
        "create",
        &vm,
        "--memory",
        "1G",
        "--vcpus",
        "2",
        "--dirty-rate",
        "200MB/s",
        "--pattern",
        pattern,
    ]);
    std::thread::sleep(Duration::from_millis(300));
    let steps_on_source = a.total_steps(&vm);
    let report = a.json(&["migrate", &vm, "--to", &b.addr, "--streams", "4"]);
    for field in [
        "total_ms",
        "downtime_ms",
        "bytes_sent",
        "rounds",
        "throughput_bytes_per_s",
    ] {
        assert!(
            report[field].as_f64().is_some_and(|v| v > 0.0),
            "{field} missing or zero in {report}"
        );
    }
    assert_eq!(report["transport"], "tcp", "{report}");
    assert!(
        report["bytes_sent"].as_u64().unwrap() >= 1 << 30,
        "round 0 sends the whole memory: {report}"
    );
    assert!(report["downtime_ms"].as_f64().unwrap() < report["total_ms"].as_f64().unwrap());

    assert!(
        !a.vm_names().contains(&vm),
        "the source still hosts {vm} after the hand-over"
    );
    assert_eq!(b.vm_names(), vec![vm.clone()]);
    let verify = b.verify(&vm);
    assert_eq!(
        verify["ok"], true,
        "verify failed on the destination: {verify}"
    );
    assert_eq!(verify["pages_checked"], (1u64 << 30) / 4096);
    let steps_verified: u64 = verify["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_u64().unwrap())
        .sum();
    assert!(
        steps_verified > steps_on_source,
        "destination state is older than the source's before migration"
    );
    b.assert_running(&vm);
    // And the continued run verifies too.
    let again = b.verify(&vm);
    assert_eq!(again["ok"], true, "{again}");
}

#[test]
fn one_gib_uniform_at_200_mb_s_over_4_streams() {
    migrate_and_verify("uniform");
}

#[test]
fn one_gib_hotset_at_200_mb_s_over_4_streams() {
    migrate_and_verify("hotset");
}

#[test]
fn one_gib_sweep_at_200_mb_s_over_4_streams() {
    migrate_and_verify("sweep");
}

#[test]
fn cancel_during_precopy_leaves_the_vm_running_and_verifiable_on_the_source() {
    let (a, b) = (Agent::start(), Agent::start());
    a.json(&[
        "vm",
        "create",
        "c1",
        "--memory",
        "256M",
        "--dirty-rate",
        "50MB/s",
    ]);
    // A bandwidth cap makes round 0 take ~5 s, so the cancel lands in pre-copy.
    let mut migrate = Command::new(ferry_bin())
        .args([
            "--agent",
            &a.addr,
            "--json",
            "migrate",
            "c1",
            "--to",
            &b.addr,
            "--max-bandwidth",
            "50MB/s",
            "--progress-json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(migrate.stdout.take().unwrap()).lines();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let line = lines.next().expect("progress before the end").unwrap();
        let progress = parse_json(line.as_bytes());
        if progress["phase"] == "MemoryPreCopy"
            && progress["round_pages_sent"].as_u64().unwrap_or(0) > 0
        {
            break;
        }
        assert!(Instant::now() < deadline, "pre-copy never started");
    }
    let cancel = a.json(&["cancel", "c1"]);
    assert!(
        cancel.to_string().contains("true"),
        "cancel should report a running migration: {cancel}"
    );
    let rest: Vec<String> = lines.map_while(Result::ok).collect();
    let status = migrate.wait().unwrap();
    assert!(
        !status.success(),
        "a cancelled migration must exit non-zero; output: {rest:?}"
    );

    assert_eq!(a.vm_names(), vec!["c1".to_string()]);
    a.assert_running("c1");
    let verify = a.verify("c1");
    assert_eq!(verify["ok"], true, "{verify}");
    // The destination discarded its half.
    let deadline = Instant::now() + Duration::from_secs(5);
    while !b.vm_names().is_empty() {
        assert!(
            Instant::now() < deadline,
            "destination still holds the incoming VM: {:?}",
            b.vm_names()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn demo_migrates_and_verifies() {
    let out = Command::new(ferry_bin())
        .args([
            "--json",
            "demo",
            "--memory",
            "256M",
            "--dirty-rate",
            "100MB/s",
        ])
        .stderr(Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "demo failed: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let report = parse_json(&out.stdout);
    assert_eq!(report["verified"], true, "{report}");
    for field in [
        "total_ms",
        "downtime_ms",
        "bytes_sent",
        "rounds",
        "throughput_bytes_per_s",
        "transport",
    ] {
        assert!(report.get(field).is_some(), "{field} missing from {report}");
    }
    assert!(report["bytes_sent"].as_u64().unwrap() >= 256 << 20);
}

#[test]
fn migrating_to_an_agent_that_is_not_there_fails_back() {
    let a = Agent::start();
    a.json(&[
        "vm",
        "create",
        "lonely",
        "--memory",
        "64M",
        "--dirty-rate",
        "10MB/s",
    ]);
    // Bind and drop a listener to get a loopback port nobody listens on.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .to_string();
    let out = a.run(&["migrate", "lonely", "--to", &dead]);
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.to_lowercase().contains("connect"),
        "the error should say the connection failed: {text}"
    );
    a.assert_running("lonely");
    assert_eq!(a.verify("lonely")["ok"], true);
}
