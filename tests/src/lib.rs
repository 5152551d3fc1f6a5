//! Integration test support: real `ferry agent` processes on loopback, driven through the
//! real `ferry` CLI with `--json`, so every test exercises what an operator runs.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The `ferry` binary of this build (`target/<profile>/ferry`, next to `deps/`).
pub fn ferry_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>/deps/<test>");
    let bin = profile_dir.join("ferry");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (./dev test builds the whole workspace before testing)",
        bin.display()
    );
    bin
}

/// One agent process with its own data dir; killed on drop.
pub struct Agent {
    child: Child,
    pub addr: String,
    _data_dir: tempfile::TempDir,
}

impl Agent {
    /// Starts an agent on an ephemeral loopback port and waits until it listens.
    pub fn start() -> Agent {
        let data_dir = tempfile::tempdir().expect("temp dir");
        let mut child = Command::new(ferry_bin())
            .args([
                "agent",
                "--listen",
                "127.0.0.1:0",
                "--print-addr",
                "--data-dir",
            ])
            .arg(data_dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn ferry agent");
        let stdout = child.stdout.take().expect("agent stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("agent prints its address");
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .to_string();
        Agent {
            child,
            addr,
            _data_dir: data_dir,
        }
    }

    /// Runs `ferry --agent <this> --json ARGS` and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(ferry_bin())
            .args(["--agent", &self.addr, "--json"])
            .args(args)
            .output()
            .expect("run ferry")
    }

    /// Runs a command that must succeed and returns its JSON.
    pub fn json(&self, args: &[&str]) -> Value {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "ferry {args:?} failed ({}):\nstdout: {}\nstderr: {}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        parse_json(&out.stdout)
    }

    /// Total vCPU steps of a VM on this agent.
    pub fn total_steps(&self, vm: &str) -> u64 {
        let status = self.json(&["vm", "status", vm]);
        status["total_steps"]
            .as_u64()
            .unwrap_or_else(|| panic!("no total_steps in {status}"))
    }

    /// Asserts that the VM's step counters keep increasing here.
    pub fn assert_running(&self, vm: &str) {
        let before = self.total_steps(vm);
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let after = self.total_steps(vm);
            if after > before {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{vm} is not running on {}: steps stay at {before}",
                self.addr
            );
        }
    }

    /// Verifies a VM here and returns the report (`ok` asserted by the caller).
    pub fn verify(&self, vm: &str) -> Value {
        let out = self.run(&["vm", "verify", vm]);
        parse_json(&out.stdout)
    }

    /// Names of the VMs this agent hosts.
    pub fn vm_names(&self) -> Vec<String> {
        let list = self.json(&["vm", "list"]);
        let vms = list.get("vms").unwrap_or(&list);
        vms.as_array()
            .unwrap_or_else(|| panic!("vm list is not an array: {list}"))
            .iter()
            .map(|vm| vm["name"].as_str().expect("vm name").to_string())
            .collect()
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Parses the JSON object a `--json` command prints (the last non-empty line when
/// progress lines precede it).
pub fn parse_json(stdout: &[u8]) -> Value {
    let text = String::from_utf8_lossy(stdout);
    serde_json::from_str(text.trim())
        .or_else(|_| {
            serde_json::from_str(
                text.lines()
                    .rev()
                    .find(|l| !l.trim().is_empty())
                    .unwrap_or(""),
            )
        })
        .unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}
