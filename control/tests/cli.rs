//! The `ferry` binary against real agent processes, asserting on `--json` output.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_control::client::Client;
use serde_json::Value;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// An agent process, shut down (or killed) when dropped.
struct Agent {
    child: Child,
    addr: String,
    data_dir: tempfile::TempDir,
}

impl Agent {
    fn start() -> Self {
        let data_dir = tempfile::tempdir().unwrap();
        let mut child = Command::new(FERRY)
            .args([
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--print-addr",
                "--data-dir",
            ])
            .arg(data_dir.path().join("agent"))
            .env("RUST_LOG", "error")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .trim()
            .to_string();
        Agent {
            child,
            addr,
            data_dir,
        }
    }

    /// Runs `ferry --agent ADDR --json ARGS…`; returns the exit code and the one JSON object.
    fn ferry(&self, args: &[&str]) -> (i32, Value) {
        ferry(&self.addr, args)
    }

    /// Stops the agent with a Shutdown request and waits for a clean exit.
    fn shutdown(mut self) {
        Client::new(self.addr.clone()).shutdown().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "agent exited with {status}");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "agent did not exit after Shutdown"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn ferry(agent: &str, args: &[&str]) -> (i32, Value) {
    let output = Command::new(FERRY)
        .args(["--agent", agent, "--json"])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "ferry {args:?}: stdout is not one JSON object ({e}): {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&output.stderr)
        )
    });
    (output.status.code().unwrap_or(-1), value)
}

fn error_of(value: &Value) -> (&str, &str) {
    (
        value["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error in {value}")),
        value["kind"].as_str().unwrap_or(""),
    )
}

#[test]
fn vm_lifecycle_and_clear_errors() {
    let agent = Agent::start();

    // The identity file records where the agent listens.
    let identity: Value = serde_json::from_slice(
        &std::fs::read(agent.data_dir.path().join("agent/agent.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(identity["listen_addr"], agent.addr.as_str());

    let (code, vm) = agent.ferry(&[
        "vm",
        "create",
        "vm1",
        "--memory",
        "64M",
        "--dirty-rate",
        "10MB/s",
        "--pattern",
        "hotset",
    ]);
    assert_eq!(code, 0, "{vm}");
    assert_eq!(vm["name"], "vm1");
    assert_eq!(vm["memory_bytes"], 64 << 20);
    assert_eq!(vm["vcpus"], 2);
    assert_eq!(vm["pattern"], "hotset");
    assert_eq!(vm["dirty_rate_bytes_per_s"], 10 << 20);
    assert_eq!(vm["state"], "running");

    let (code, err) = agent.ferry(&["vm", "create", "vm1", "--memory", "64M"]);
    assert_eq!(code, 1);
    let (message, kind) = error_of(&err);
    assert_eq!(kind, "already-exists");
    assert!(
        message.contains("vm1") && message.contains("already exists"),
        "{message}"
    );

    let (code, list) = agent.ferry(&["vm", "list"]);
    assert_eq!(code, 0);
    let vms = list["vms"].as_array().unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0]["name"], "vm1");
    assert_eq!(vms[0]["running"], true);

    let (code, status) = agent.ferry(&["vm", "status", "vm1"]);
    assert_eq!(code, 0);
    assert_eq!(status["steps"].as_array().unwrap().len(), 2);
    assert_eq!(status["throttle_percent"], 0);

    let (code, report) = agent.ferry(&["vm", "verify", "vm1"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["vm"], "vm1");
    assert_eq!(report["ok"], true);
    assert_eq!(report["pages_checked"], (64 << 20) / 4096);
    assert_eq!(report["mismatched_pages"], 0);

    let (code, cancel) = agent.ferry(&["cancel", "vm1"]);
    assert_eq!(code, 0);
    assert_eq!(cancel["was_running"], false);

    for args in [
        &["vm", "status", "nope"][..],
        &["vm", "verify", "nope"],
        &["vm", "destroy", "nope"],
        &["cancel", "nope"],
    ] {
        let (code, err) = agent.ferry(args);
        assert_eq!(code, 1, "{args:?}");
        let (message, kind) = error_of(&err);
        assert_eq!(kind, "not-found", "{args:?}");
        assert_eq!(message, "no VM named \"nope\" on this agent");
    }

    let (code, err) = agent.ferry(&["vm", "create", "bad", "--memory", "64M", "--vcpus", "0"]);
    assert_eq!(code, 1);
    let (message, kind) = error_of(&err);
    assert_eq!(kind, "bad-request");
    assert!(message.contains("vcpus"), "{message}");

    let (code, destroyed) = agent.ferry(&["vm", "destroy", "vm1"]);
    assert_eq!(code, 0);
    assert_eq!(destroyed["destroyed"], "vm1");
    let (_, list) = agent.ferry(&["vm", "list"]);
    assert_eq!(list["vms"].as_array().unwrap().len(), 0);

    agent.shutdown();
}

#[test]
fn no_agent_is_a_clear_error() {
    // A port nobody listens on.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, err) = ferry(&format!("127.0.0.1:{port}"), &["vm", "list"]);
    assert_eq!(code, 1);
    let (message, _) = error_of(&err);
    assert!(message.contains("cannot connect to the agent"), "{message}");
}

#[test]
fn migration_between_two_agents() {
    let a = Agent::start();
    let b = Agent::start();
    assert_eq!(a.ferry(&["vm", "create", "m", "--memory", "64M"]).0, 0);

    // Unknown VM, unreachable destination and a name taken on the destination all fail
    // cleanly and leave the VM running on the source.
    let (code, err) = a.ferry(&["migrate", "ghost", "--to", &b.addr]);
    assert_eq!((code, error_of(&err).1), (1, "not-found"));
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (code, err) = a.ferry(&["migrate", "m", "--to", &format!("127.0.0.1:{port}")]);
    assert_eq!(code, 1);
    let (message, kind) = error_of(&err);
    assert_eq!(kind, "migration-failed");
    assert!(
        message.contains("cannot reach the destination agent"),
        "{message}"
    );
    assert_eq!(b.ferry(&["vm", "create", "m", "--memory", "64M"]).0, 0);
    let (code, err) = a.ferry(&["migrate", "m", "--to", &b.addr]);
    assert_eq!(code, 1);
    let (message, _) = error_of(&err);
    assert!(
        message.contains("refused") && message.contains("already exists"),
        "{message}"
    );
    let (_, status) = a.ferry(&["vm", "status", "m"]);
    assert_eq!(
        (status["state"].as_str(), status["running"].as_bool()),
        (Some("running"), Some(true))
    );
    assert_eq!(b.ferry(&["vm", "destroy", "m"]).0, 0);

    // Now for real, with progress lines.
    let output = Command::new(FERRY)
        .args([
            "--agent",
            &a.addr,
            "--progress-json",
            "migrate",
            "m",
            "--to",
            &b.addr,
            "--streams",
            "2",
        ])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let lines: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let (report, progress) = lines.split_last().unwrap();
    assert!(!progress.is_empty());
    assert!(progress.iter().all(|p| p["event"] == "progress"));
    for field in [
        "total_ms",
        "downtime_ms",
        "bytes_sent",
        "rounds",
        "throughput_bytes_per_s",
        "transport",
    ] {
        assert!(!report[field].is_null(), "{field} missing from {report}");
    }
    assert_eq!(report["transport"], "tcp");
    assert_eq!(report["streams"], 2);
    assert!(report["bytes_sent"].as_u64().unwrap() >= 64 << 20);

    let (code, verify) = b.ferry(&["vm", "verify", "m"]);
    assert_eq!(code, 0, "{verify}");
    assert_eq!(verify["ok"], true);
    let (_, status) = b.ferry(&["vm", "status", "m"]);
    assert_eq!(
        (status["state"].as_str(), status["running"].as_bool()),
        (Some("running"), Some(true))
    );
    let (_, list) = a.ferry(&["vm", "list"]);
    assert_eq!(
        list["vms"].as_array().unwrap().len(),
        0,
        "the source released the VM"
    );

    a.shutdown();
    b.shutdown();
}
