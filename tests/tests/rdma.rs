//! Transport selection and the RDMA data path, with real agents and the real CLI.
//!
//! On the host (no RDMA device) these check the TCP fallback, the `--transport rdma` error
//! and that `ferry` runs without rdma-core at all. Inside ../shared/rxe-vm (two soft-RoCE
//! devices; `./dev test` runs this binary there too) they migrate a VM with memory and a
//! disk under load over RDMA between an agent on each device, and prove the device carried
//! the bytes with its own packet counters.

use std::process::Command;
use std::time::Duration;

use ferry_tests::Agent;
use serde_json::Value;

/// The two soft-RoCE addresses when running inside the rxe VM.
fn rxe() -> Option<(String, String)> {
    let required = std::env::var("FERRY_REQUIRE_RDMA").is_ok_and(|v| v == "1");
    let addrs = match (std::env::var("RXE_ADDR_A"), std::env::var("RXE_ADDR_B")) {
        (Ok(a), Ok(b)) if std::path::Path::new("/sys/class/infiniband").exists() => Some((a, b)),
        _ => None,
    };
    assert!(
        addrs.is_some() || !required,
        "FERRY_REQUIRE_RDMA=1 but no soft-RoCE devices here"
    );
    addrs
}

fn create_busy_vm(agent: &Agent, name: &str, memory: &str, disk: &str) {
    agent.json(&[
        "vm",
        "create",
        name,
        "--memory",
        memory,
        "--vcpus",
        "2",
        "--dirty-rate",
        "5MB/s",
        "--disk",
        disk,
        "--disk-write-rate",
        "2MB/s",
    ]);
    std::thread::sleep(Duration::from_millis(300));
}

fn stderr_of(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A device's packet counter (`/sys/class/infiniband/DEV/ports/1/hw_counters/NAME`).
fn device_counter(device: &str, name: &str) -> u64 {
    let path = format!("/sys/class/infiniband/{device}/ports/1/hw_counters/{name}");
    std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{path}: {e}"))
        .trim()
        .parse()
        .unwrap()
}

#[test]
fn auto_falls_back_to_tcp_and_says_why() {
    if rxe().is_some() {
        return; // loopback may resolve to a soft-RoCE device in the VM: host-only test
    }
    let (a, b) = (Agent::start(), Agent::start());
    create_busy_vm(&a, "auto", "32M", "16M");
    let report = a.json(&["migrate", "auto", "--to", &b.addr, "--streams", "2"]);
    assert_eq!(report["transport"], "tcp", "{report}");
    let note = report["transport_note"].as_str().unwrap();
    assert!(
        note.starts_with("tcp (auto: ") && note.contains("RDMA"),
        "auto must say why it chose TCP: {note:?}"
    );
    assert!(report["rdma"].is_null(), "{report}");
    assert_eq!(b.verify("auto")["ok"], true);
}

#[test]
fn transport_rdma_without_a_device_is_a_clear_error_and_the_vm_stays() {
    if rxe().is_some() {
        return;
    }
    let (a, b) = (Agent::start(), Agent::start());
    create_busy_vm(&a, "strict", "32M", "16M");
    let out = a.run(&["migrate", "strict", "--to", &b.addr, "--transport", "rdma"]);
    assert!(!out.status.success());
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        stderr_of(&out)
    );
    assert!(
        text.contains("--transport rdma") && text.contains("no RDMA device"),
        "unclear error: {text}"
    );
    a.assert_running("strict");
    assert_eq!(a.verify("strict")["ok"], true);
    assert!(b.vm_names().is_empty());
}

/// `ferry` must start and migrate over TCP where rdma-core is not installed: the verbs
/// libraries are loaded at run time, never linked. Hidden here by bind-mounting /dev/null
/// over them in a private mount namespace (root only; skipped otherwise).
#[test]
fn ferry_runs_over_tcp_without_rdma_core() {
    let libs: Vec<String> = ["libibverbs.so.1", "librdmacm.so.1"]
        .iter()
        .filter_map(|lib| {
            let out = Command::new("sh")
                .args([
                    "-c",
                    &format!("ldconfig -p | awk '/{lib} /{{print $NF; exit}}'"),
                ])
                .output()
                .ok()?;
            let path = String::from_utf8_lossy(&out.stdout).trim().to_string();
            (!path.is_empty()).then_some(path)
        })
        .collect();
    let is_root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    if !is_root || libs.is_empty() || rxe().is_some() {
        eprintln!("skipped: needs root and rdma-core's libraries to hide");
        return;
    }
    let hide: String = libs
        .iter()
        .map(|l| format!("mount --bind /dev/null {l} && "))
        .collect();
    let wrapped = || {
        let mut c = Command::new("unshare");
        c.args(["-m", "sh", "-c", &format!("{hide}exec \"$0\" \"$@\"")])
            .arg(ferry_tests::ferry_bin());
        c
    };
    let a = Agent::start_via(wrapped());
    let b = Agent::start_via(wrapped());
    create_busy_vm(&a, "bare", "32M", "16M");
    let report = a.json(&["migrate", "bare", "--to", &b.addr, "--streams", "2"]);
    assert_eq!(report["transport"], "tcp");
    let note = report["transport_note"].as_str().unwrap();
    assert!(note.contains("not installed"), "{note}");
    assert_eq!(b.verify("bare")["ok"], true);
}

fn migrate_over_rdma(transport: &str) {
    let Some((addr_a, addr_b)) = rxe() else {
        return;
    };
    let (a, b) = (Agent::start_on(&addr_a), Agent::start_on(&addr_b));
    let vm = format!("rdma-{transport}");
    create_busy_vm(&a, &vm, "32M", "32M");
    let sent_before = device_counter("rxe0", "sent_pkts");
    let received_before = device_counter("rxe1", "rcvd_pkts");
    let report: Value = a.json(&[
        "migrate",
        &vm,
        "--to",
        &b.addr,
        "--streams",
        "2",
        "--transport",
        transport,
    ]);
    let sent = device_counter("rxe0", "sent_pkts") - sent_before;
    let received = device_counter("rxe1", "rcvd_pkts") - received_before;
    eprintln!("{report}");
    assert_eq!(report["transport"], "rdma", "{report}");
    assert!(
        report["transport_note"]
            .as_str()
            .unwrap()
            .starts_with("rdma (rxe0 here, rxe1 at the destination)"),
        "{report}"
    );
    let rdma = &report["rdma"];
    assert_eq!(rdma["device"], "rxe0");
    assert!(rdma["memory_writes"].as_u64().unwrap() > 0, "{report}");
    assert!(
        rdma["memory_write_bytes"].as_u64().unwrap() >= 16 << 20,
        "most of the 32 MiB of memory is non-zero and travels by RDMA WRITE: {report}"
    );
    assert!(rdma["disk_writes"].as_u64().unwrap() > 0, "{report}");
    // The device itself moved the data: at most 4 KiB of payload per RoCE packet, so
    // (memory + disk bytes) / 4096 packets at the very least, on both ends.
    let moved =
        rdma["memory_write_bytes"].as_u64().unwrap() + rdma["disk_write_bytes"].as_u64().unwrap();
    assert!(
        sent >= moved / 4096 && received >= moved / 4096,
        "rxe0 sent {sent} packets, rxe1 received {received}, for {moved} bytes"
    );
    assert!(!a.vm_names().contains(&vm));
    let verify = b.verify(&vm);
    assert_eq!(verify["ok"], true, "verify on the destination: {verify}");
    assert_eq!(verify["pages_checked"], (32u64 << 20) / 4096);
    assert_eq!(verify["disk_bytes_checked"], 32u64 << 20, "{verify}");
    b.assert_running(&vm);
}

#[test]
fn memory_and_disk_under_load_move_over_rdma_between_two_agents() {
    migrate_over_rdma("rdma");
}

#[test]
fn auto_chooses_rdma_where_a_device_reaches_the_peer() {
    migrate_over_rdma("auto");
}
