//! The `ferry` binary against real agent processes, asserting on `--json` output.

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use ferry_control::auth::ClusterKey;
use ferry_control::client::Client;
use serde_json::Value;

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

const MIB: u64 = 1 << 20;

/// The cluster key of every agent these tests start (and of the CLI talking to them over
/// TCP): written once per test process by `ferry key init`.
fn test_key() -> &'static Path {
    static KEY: OnceLock<PathBuf> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("ferry-cli-test-key-")
            .tempdir()
            .unwrap()
            .keep();
        let path = dir.join("cluster.key");
        let status = Command::new(FERRY)
            .args(["key", "init"])
            .arg(&path)
            .stdout(Stdio::null())
            .status()
            .unwrap();
        assert!(status.success(), "ferry key init failed");
        path
    })
}

/// An agent process, shut down (or killed) when dropped.
struct Agent {
    child: Child,
    addr: String,
    /// The agent's data directory.
    data_dir: PathBuf,
    /// Holds a temporary data directory for as long as the agent runs.
    _temp: Option<tempfile::TempDir>,
    /// The VMs' memory (tmpfs), removed with the agent.
    _memory: tempfile::TempDir,
}

impl Agent {
    fn start() -> Self {
        let temp = tempfile::tempdir().unwrap();
        let mut agent = Self::start_in(&temp.path().join("agent"));
        agent._temp = Some(temp);
        agent
    }

    /// An agent whose data directory is `data_dir` (created by the agent).
    fn start_in(data_dir: &Path) -> Self {
        let memory = tempfile::Builder::new()
            .prefix("ferry-cli-test-")
            .tempdir_in("/dev/shm")
            .unwrap();
        let mut child = Command::new(FERRY)
            .args(["agent", "--listen", "127.0.0.1:0", "--print-addr", "--key"])
            .arg(test_key())
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--memory-dir")
            .arg(memory.path())
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
            data_dir: data_dir.to_path_buf(),
            _temp: None,
            _memory: memory,
        }
    }

    /// Where the agent keeps the disk image it creates for VM `name`.
    fn image(&self, name: &str) -> PathBuf {
        self.data_dir.join("disks").join(format!("{name}.img"))
    }

    /// Runs `ferry --agent ADDR --json ARGS…`; returns the exit code and the one JSON object.
    fn ferry(&self, args: &[&str]) -> (i32, Value) {
        ferry(&self.addr, args)
    }

    /// Stops the agent with a Shutdown request and waits for a clean exit.
    fn shutdown(mut self) {
        let key = ClusterKey::load(test_key()).unwrap();
        Client::new(self.addr.clone())
            .with_key(Arc::new(key))
            .shutdown()
            .unwrap();
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
        .args(["--agent", agent, "--json", "--key"])
        .arg(test_key())
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
    let identity: Value =
        serde_json::from_slice(&std::fs::read(agent.data_dir.join("agent.json")).unwrap()).unwrap();
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

    // Now for real, with progress lines and a timeline plot.
    let plot_dir = tempfile::tempdir().unwrap();
    let plot = plot_dir.path().join("m.svg");
    let output = Command::new(FERRY)
        .args([
            "--agent",
            &a.addr,
            "--key",
            test_key().to_str().unwrap(),
            "--progress-json",
            "migrate",
            "m",
            "--to",
            &b.addr,
            "--streams",
            "2",
            "--plot",
            plot.to_str().unwrap(),
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
    assert_eq!(report["streams_reason"], "set by --streams");
    assert!(report["bytes_sent"].as_u64().unwrap() >= 64 << 20);
    // The send path says what it did over loopback (the kernel copies zero-copy sends).
    assert_eq!(report["send_path"]["mode"], "auto");
    assert!(report["send_path"]["plain_sends"].as_u64().unwrap() > 0);
    // The timeline: one record per round, the pause, and the plot drawn from it.
    let timeline = &report["timeline"];
    assert_eq!(
        timeline["rounds"].as_array().unwrap().len() as u64,
        report["rounds"].as_u64().unwrap()
    );
    assert!(timeline["pause"]["end_ms"].as_f64() > timeline["pause"]["start_ms"].as_f64());
    let svg = std::fs::read_to_string(&plot).unwrap();
    assert!(
        svg.starts_with("<svg") || svg.starts_with("<?xml"),
        "{svg:.100}"
    );
    assert!(svg.contains("pause") && svg.trim_end().ends_with("</svg>"));

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

/// The VM's disk writes so far (`vm status --json`).
fn disk_steps(agent: &Agent, name: &str) -> u64 {
    let (code, status) = agent.ferry(&["vm", "status", name]);
    assert_eq!(code, 0, "{status}");
    status["disk"]["total_steps"]
        .as_u64()
        .unwrap_or_else(|| panic!("no disk steps in {status}"))
}

/// Waits (boundedly) until the VM's disk writes pass `than`.
fn disk_steps_advance(agent: &Agent, name: &str, than: u64) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if disk_steps(agent, name) > than {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

#[test]
fn vm_with_a_disk_pause_resume_destroy() {
    let agent = Agent::start();
    let image = agent.image("d");

    let (code, vm) = agent.ferry(&["vm", "create", "d", "--memory", "64M", "--disk", "64M"]);
    assert_eq!(code, 0, "{vm}");
    let disk = &vm["disk"];
    assert_eq!(disk["bytes"], 64 * MIB);
    assert_eq!(disk["path"], image.to_str().unwrap());
    assert_eq!(disk["agent_owned"], true);
    assert_eq!(disk["pattern"], "random");
    assert_eq!(disk["write_rate_bytes_per_s"], 20 * MIB);
    assert_eq!(disk["fill_percent"], 25);
    assert_eq!(std::fs::metadata(&image).unwrap().len(), 64 * MIB);

    let (code, status) = agent.ferry(&["vm", "status", "d"]);
    assert_eq!(code, 0);
    assert_eq!(status["disk"]["steps"].as_array().unwrap().len(), 2);
    assert_eq!(status["disk"]["write_errors"], 0);
    assert!(
        disk_steps_advance(&agent, "d", 0),
        "the disk is written at 20 MB/s"
    );
    let (_, list) = agent.ferry(&["vm", "list"]);
    assert_eq!(list["vms"][0]["disk"]["bytes"], 64 * MIB);

    // Paused: neither memory nor disk moves, and it says so.
    let (code, paused) = agent.ferry(&["vm", "pause", "d"]);
    assert_eq!(code, 0, "{paused}");
    assert_eq!(paused["running"], false);
    let at_pause = disk_steps(&agent, "d");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(disk_steps(&agent, "d"), at_pause);
    let (_, status) = agent.ferry(&["vm", "status", "d"]);
    assert_eq!(
        (status["state"].as_str(), status["running"].as_bool()),
        (Some("running"), Some(false))
    );
    // Verify leaves a paused VM paused.
    let (code, report) = agent.ferry(&["vm", "verify", "d"]);
    assert_eq!(code, 0, "{report}");
    assert_eq!(report["ok"], true);
    assert_eq!(report["disk_bytes_checked"], 64 * MIB);
    assert_eq!(report["mismatched_disk_blocks"], 0);
    assert_eq!(disk_steps(&agent, "d"), at_pause);

    let (code, resumed) = agent.ferry(&["vm", "resume", "d"]);
    assert_eq!(code, 0, "{resumed}");
    assert_eq!(resumed["running"], true);
    assert!(disk_steps_advance(&agent, "d", at_pause));
    let (code, report) = agent.ferry(&["vm", "verify", "d"]);
    assert_eq!((code, &report["ok"]), (0, &Value::Bool(true)), "{report}");

    for args in [&["vm", "pause", "nope"][..], &["vm", "resume", "nope"]] {
        let (code, err) = agent.ferry(args);
        assert_eq!((code, error_of(&err).1), (1, "not-found"), "{args:?}");
    }

    let (code, _) = agent.ferry(&["vm", "destroy", "d"]);
    assert_eq!(code, 0);
    assert!(!image.exists(), "destroy deletes the agent's image");

    agent.shutdown();
}

#[test]
fn disks_at_user_paths_leftovers_and_bad_names() {
    let agent = Agent::start();
    let dir = tempfile::tempdir().unwrap();

    // A user's file: overwritten (zero, then boot content), its size taken, never deleted.
    let user = dir.path().join("user.img");
    std::fs::write(&user, vec![0xa5u8; 32 << 20]).unwrap();
    let user_arg = user.to_str().unwrap();
    let (code, vm) = agent.ferry(&["vm", "create", "u", "--memory", "64M", "--disk", user_arg]);
    assert_eq!(code, 0, "{vm}");
    assert_eq!(vm["disk"]["bytes"], 32 * MIB);
    assert_eq!(vm["disk"]["agent_owned"], false);
    let (code, report) = agent.ferry(&["vm", "verify", "u"]);
    assert_eq!((code, &report["ok"]), (0, &Value::Bool(true)), "{report}");
    // One image, one VM.
    let (code, err) = agent.ferry(&["vm", "create", "u2", "--memory", "64M", "--disk", user_arg]);
    assert_eq!(code, 1);
    let (message, kind) = error_of(&err);
    assert_eq!(kind, "bad-request");
    assert!(
        message.contains("already the disk of VM \"u\""),
        "{message}"
    );
    assert_eq!(agent.ferry(&["vm", "destroy", "u"]).0, 0);
    let content = std::fs::read(&user).unwrap();
    assert_eq!(
        content.len() as u64,
        32 * MIB,
        "a user's disk is never deleted"
    );
    // Verify passed, so every block holds what the replay expects; unfilled extents (75 %
    // by default) read as zero, where the old content was all 0xa5.
    let zeros = content.iter().filter(|&&b| b == 0).count();
    assert!(
        zeros > content.len() / 2,
        "its whole content was overwritten"
    );

    // A size that is not whole MiB is refused before the file is touched.
    let odd = dir.path().join("odd.img");
    std::fs::write(&odd, vec![0x11u8; 3 << 12]).unwrap();
    let (code, err) = agent.ferry(&["vm", "create", "o", "--disk", odd.to_str().unwrap()]);
    assert_eq!((code, error_of(&err).1), (1, "bad-request"), "{err}");
    assert!(std::fs::read(&odd).unwrap().iter().all(|&b| b == 0x11));
    let (code, err) = agent.ferry(&[
        "vm",
        "create",
        "o",
        "--disk",
        dir.path().join("missing.img").to_str().unwrap(),
    ]);
    assert_eq!((code, error_of(&err).1), (1, "bad-request"), "{err}");
    assert!(error_of(&err).0.contains("missing.img"), "{err}");

    // A file left under the agent's name for a VM is refused, never overwritten.
    let leftover = agent.image("left");
    std::fs::write(&leftover, b"keep me").unwrap();
    let (code, err) = agent.ferry(&["vm", "create", "left", "--memory", "64M", "--disk", "64M"]);
    assert_eq!(code, 1);
    let (message, kind) = error_of(&err);
    assert_eq!(kind, "already-exists");
    assert!(message.contains(leftover.to_str().unwrap()), "{message}");
    assert_eq!(std::fs::read(&leftover).unwrap(), b"keep me");
    let (_, list) = agent.ferry(&["vm", "list"]);
    assert_eq!(list["vms"].as_array().unwrap().len(), 0, "{list}");

    // A name that cannot be a file name gets no disk.
    let (code, err) = agent.ferry(&["vm", "create", "a/b", "--memory", "64M", "--disk", "64M"]);
    assert_eq!((code, error_of(&err).1), (1, "bad-request"), "{err}");

    agent.shutdown();
}

/// A filesystem mounted on a temporary directory, unmounted on drop.
struct Mount {
    dir: tempfile::TempDir,
}

impl Mount {
    /// Mounts `fstype`, or says why not (the caller skips its test, visibly).
    fn new(fstype: &str) -> Result<Mount, String> {
        let dir = tempfile::tempdir().unwrap();
        let output = Command::new("mount")
            .args(["-t", fstype, "none"])
            .arg(dir.path())
            .output()
            .map_err(|e| format!("cannot run mount(8): {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "mount -t {fstype} failed (needs root): {}",
                String::from_utf8_lossy(&output.stderr).trim()
            ));
        }
        Ok(Mount { dir })
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let unmounted = Command::new("umount")
            .arg(self.dir.path())
            .status()
            .is_ok_and(|s| s.success());
        if !unmounted {
            let _ = Command::new("umount")
                .arg("-l")
                .arg(self.dir.path())
                .status();
        }
    }
}

#[test]
fn direct_io_required_on_ramfs_is_a_clear_error() {
    let mount = match Mount::new("ramfs") {
        Ok(mount) => mount,
        Err(reason) => {
            println!("SKIPPED direct_io_required_on_ramfs_is_a_clear_error: {reason}");
            return;
        }
    };
    let agent = Agent::start_in(&mount.dir.path().join("agent"));
    let (code, err) = agent.ferry(&[
        "vm",
        "create",
        "r",
        "--memory",
        "64M",
        "--disk",
        "64M",
        "--direct-io",
        "required",
    ]);
    assert_eq!(code, 1);
    let (message, kind) = error_of(&err);
    assert_eq!(kind, "bad-request");
    assert!(message.contains("O_DIRECT"), "{message}");
    assert!(message.contains("--direct-io auto"), "{message}");
    assert!(!agent.image("r").exists(), "nothing is left behind");
    let (_, list) = agent.ferry(&["vm", "list"]);
    assert_eq!(list["vms"].as_array().unwrap().len(), 0);

    // auto falls back to buffered I/O, and says so in the status.
    let (code, vm) = agent.ferry(&["vm", "create", "r", "--memory", "64M", "--disk", "64M"]);
    assert_eq!(code, 0, "{vm}");
    assert_eq!(vm["disk"]["direct_io"], false);
    assert_eq!(agent.ferry(&["vm", "destroy", "r"]).0, 0);
    assert!(!agent.image("r").exists());
    agent.shutdown();
    drop(mount);
}

/// `migrate --progress-json`: the progress lines and the report.
fn migrate(a: &Agent, name: &str, to: &Agent, extra: &[&str]) -> (Vec<Value>, Value) {
    let output = Command::new(FERRY)
        .args(["--agent", &a.addr, "--progress-json", "migrate", name])
        .arg("--key")
        .arg(test_key())
        .args(["--to", &to.addr, "--streams", "2"])
        .args(extra)
        .output()
        .unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    assert!(
        output.status.success(),
        "migrate failed: {stdout}; stderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let mut lines: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let report = lines.pop().unwrap();
    (lines, report)
}

#[test]
fn migration_with_a_disk() {
    let a = Agent::start();
    let b = Agent::start();
    let create = |name: &str| {
        let (code, vm) = a.ferry(&[
            "vm",
            "create",
            name,
            "--memory",
            "64M",
            "--disk",
            "128M",
            "--disk-write-rate",
            "20MB/s",
        ]);
        assert_eq!(code, 0, "{vm}");
    };
    create("m");

    // A file left where the destination would create the image: refused, not overwritten,
    // and the VM keeps running on the source.
    std::fs::write(b.image("m"), b"leftover").unwrap();
    let (code, err) = a.ferry(&["migrate", "m", "--to", &b.addr]);
    assert_eq!(code, 1);
    let (message, _) = error_of(&err);
    assert!(
        message.contains("refused") && message.contains(b.image("m").to_str().unwrap()),
        "{message}"
    );
    assert_eq!(std::fs::read(b.image("m")).unwrap(), b"leftover");
    let (_, status) = a.ferry(&["vm", "status", "m"]);
    assert_eq!(
        (status["state"].as_str(), status["running"].as_bool()),
        (Some("running"), Some(true))
    );
    std::fs::remove_file(b.image("m")).unwrap();

    let (progress, report) = migrate(&a, "m", &b, &[]);
    assert!(
        progress
            .iter()
            .any(|p| p["phase"] == "DiskCopy" && p["disks"][0]["bytes_total"] == 128 * MIB),
        "no disk-copy progress in {progress:?}"
    );
    assert_eq!(report["disks"][0]["bytes"], 128 * MIB, "{report}");
    assert!(report["disks"][0]["mirrored_writes"].as_u64().is_some());
    assert!(report["disk_copy_ms"].as_f64().unwrap() > 0.0);
    let (code, verify) = b.ferry(&["vm", "verify", "m"]);
    assert_eq!(code, 0, "{verify}");
    assert_eq!(verify["ok"], true);
    assert_eq!(verify["disk_bytes_checked"], 128 * MIB);
    assert!(!a.image("m").exists(), "the source deletes its image");
    assert_eq!(std::fs::metadata(b.image("m")).unwrap().len(), 128 * MIB);
    assert!(disk_steps_advance(&b, "m", disk_steps(&b, "m")));

    // Paused on arrival, and the source keeps its image: both images are the same bytes.
    create("p");
    let (_, report) = migrate(&a, "p", &b, &["--paused", "--keep-source-disks"]);
    assert_eq!(report["disks"][0]["bytes"], 128 * MIB, "{report}");
    let (_, list) = a.ferry(&["vm", "list"]);
    assert_eq!(list["vms"].as_array().unwrap().len(), 0, "{list}");
    let source_image = std::fs::read(a.image("p")).expect("the source kept its image");
    let destination_image = std::fs::read(b.image("p")).unwrap();
    assert_eq!(source_image.len() as u64, 128 * MIB);
    assert!(
        source_image == destination_image,
        "the images differ after the hand-over"
    );
    drop((source_image, destination_image));
    let (_, status) = b.ferry(&["vm", "status", "p"]);
    assert_eq!(
        (status["state"].as_str(), status["running"].as_bool()),
        (Some("running"), Some(false)),
        "{status}"
    );
    let parked = disk_steps(&b, "p");
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(disk_steps(&b, "p"), parked, "a paused VM does not write");
    let (code, resumed) = b.ferry(&["vm", "resume", "p"]);
    assert_eq!(code, 0, "{resumed}");
    assert_eq!(resumed["running"], true);
    assert!(disk_steps_advance(&b, "p", parked));
    let (code, verify) = b.ferry(&["vm", "verify", "p"]);
    assert_eq!(code, 0, "{verify}");
    assert_eq!(verify["ok"], true);

    // Destroying on the destination deletes its images; the source's kept one stays.
    assert_eq!(b.ferry(&["vm", "destroy", "p"]).0, 0);
    assert!(!b.image("p").exists());
    assert!(a.image("p").exists());
    a.shutdown();
    b.shutdown();
}
