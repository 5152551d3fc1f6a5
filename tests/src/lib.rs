//! Integration test support: real `ferry agent` processes on loopback, driven through the
//! real `ferry` CLI with `--json`, so every test exercises what an operator runs.
//!
//! Every agent started here has the one cluster key of this test process
//! ([`test_key_path`]); the CLI reaches an agent over its unix socket ([`Agent::run`]) or,
//! with the key, over TCP ([`Agent::run_tcp`]).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

pub mod netns;

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

/// Environment variable naming the cluster key file (the agent's and the CLI's).
pub const KEY_ENV: &str = "FERRY_KEY";

/// The cluster key every agent of this test process is started with: made once by
/// `ferry key init` in a temporary directory (0600), which stays for the life of the
/// process. The process's `FERRY_KEY` is set to it as well, so that a `ferry` the tests run
/// with a HOST:PORT `--agent` authenticates, as an operator's does with `FERRY_KEY` set
/// (a test that wants a CLI without the key removes it from that command's environment).
pub fn test_key_path() -> &'static Path {
    static KEY: OnceLock<PathBuf> = OnceLock::new();
    KEY.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("ferry-test-key-")
            .tempdir()
            .expect("temp dir")
            .keep();
        let path = dir.join("cluster.key");
        init_key(&path);
        // Set while no other thread of this process reads the environment through std
        // (std serializes environment access; the test harness's threads only spawn).
        std::env::set_var(KEY_ENV, &path);
        path
    })
}

/// Writes a new cluster key at `path` with `ferry key init` (which must succeed).
pub fn init_key(path: &Path) {
    let out = Command::new(ferry_bin())
        .args(["key", "init"])
        .arg(path)
        .env_remove(KEY_ENV)
        .output()
        .expect("run ferry key init");
    assert!(
        out.status.success(),
        "ferry key init {} failed: {}",
        path.display(),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One agent process with its own data dir; killed on drop.
pub struct Agent {
    child: Child,
    pub addr: String,
    data_dir: PathBuf,
    /// Where its stderr goes, when the test asked to keep it ([`Agent::start_logged`]).
    log: Option<PathBuf>,
    _owned_dir: Option<tempfile::TempDir>,
}

impl Agent {
    /// Starts an agent on an ephemeral loopback port and waits until it listens.
    pub fn start() -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut agent = Self::start_in(dir.path());
        agent._owned_dir = Some(dir);
        agent
    }

    /// Starts an agent whose data directory is `data_dir` (kept after the agent ends).
    pub fn start_in(data_dir: &Path) -> Agent {
        Self::spawn(Command::new(ferry_bin()), "127.0.0.1", data_dir)
    }

    /// Starts an agent listening on `ip` (an ephemeral port), e.g. a soft-RoCE address.
    pub fn start_on(ip: &str) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut agent = Self::spawn(Command::new(ferry_bin()), ip, dir.path());
        agent._owned_dir = Some(dir);
        agent
    }

    /// Starts an agent on loopback with `key` as its cluster key and its log (stderr) kept
    /// for [`Agent::log`].
    pub fn start_logged(key: &Path) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("agent.log");
        let file = std::fs::File::create(&log).expect("create the agent's log");
        let mut agent = Self::spawn_with(
            Command::new(ferry_bin()),
            "127.0.0.1",
            dir.path(),
            key,
            Stdio::from(file),
        );
        agent.log = Some(log);
        agent._owned_dir = Some(dir);
        agent
    }

    /// Starts an agent through `command` (a wrapper that ends by running the `ferry`
    /// binary with the arguments appended), on loopback.
    pub fn start_via(command: Command) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut agent = Self::spawn(command, "127.0.0.1", dir.path());
        agent._owned_dir = Some(dir);
        agent
    }

    /// Starts an agent through `command` (`ferry`, or a wrapper that runs it with the
    /// arguments appended) listening on `ip` (an ephemeral port), with its files in
    /// `data_dir` and the test key; waits until it listens.
    pub fn spawn(command: Command, ip: &str, data_dir: &Path) -> Agent {
        Self::spawn_with(command, ip, data_dir, test_key_path(), Stdio::inherit())
    }

    /// [`Agent::spawn`] with another cluster key and somewhere else for its stderr.
    pub fn spawn_with(
        mut command: Command,
        ip: &str,
        data_dir: &Path,
        key: &Path,
        stderr: Stdio,
    ) -> Agent {
        let listen = format!("{ip}:0");
        let mut child = command
            .args(["agent", "--listen", &listen, "--print-addr", "--key"])
            .arg(key)
            .arg("--data-dir")
            .arg(data_dir)
            .arg("--memory-dir")
            .arg(memory_dir_for(data_dir))
            .stdout(Stdio::piped())
            .stderr(stderr)
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
            data_dir: data_dir.to_path_buf(),
            log: None,
            _owned_dir: None,
        }
    }

    /// Stops the agent as an operator would (SIGTERM) and waits for it to exit. Only once
    /// it has served a request: it announces its address a moment before its signal
    /// handlers are in place, and a SIGTERM in between kills it outright.
    pub fn stop(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the agent") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the agent did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the agent logged so far (only for [`Agent::start_logged`]).
    pub fn log(&self) -> String {
        let path = self
            .log
            .as_ref()
            .expect("the agent was started with start_logged");
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// Waits (up to 5 s) until the agent's log has a line containing every one of
    /// `needles`, and returns that line.
    pub fn wait_for_log_line(&self, needles: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let log = self.log();
            if let Some(line) = log
                .lines()
                .find(|line| needles.iter().all(|needle| line.contains(needle)))
            {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no line with {needles:?} in the agent's log:\n{log}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// The agent's unix socket, for a CLI on this host (no key needed).
    pub fn socket(&self) -> PathBuf {
        self.data_dir.join("agent.sock")
    }

    /// Kills the agent process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where this agent keeps the disk image it created for `vm`.
    pub fn image_path(&self, vm: &str) -> PathBuf {
        self.data_dir.join("disks").join(format!("{vm}.img"))
    }

    /// Runs `ferry --agent <its unix socket> --json ARGS` and returns its output.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new(ferry_bin())
            .arg("--agent")
            .arg(self.socket())
            .arg("--json")
            .args(args)
            .output()
            .expect("run ferry")
    }

    /// Runs `ferry --agent <its TCP address> --key <test key> --json ARGS`.
    pub fn run_tcp(&self, args: &[&str]) -> Output {
        Command::new(ferry_bin())
            .args(["--agent", &self.addr, "--key"])
            .arg(test_key_path())
            .arg("--json")
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
        // The VMs' memory outlives the agent (so a restart recovers them): a data directory
        // the harness made goes with its memory; a test that owns its data directory calls
        // `remove_memory_dir` when done with it.
        if self._owned_dir.is_some() {
            remove_memory_dir(&self.data_dir);
        }
    }
}

/// Where the harness puts the VMs' memory of the agent on `data_dir`: on tmpfs (write
/// tracking needs shared memory), the same directory for every restart on that data dir.
pub fn memory_dir_for(data_dir: &Path) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    data_dir.hash(&mut hasher);
    PathBuf::from(format!("/dev/shm/ferry-test-{:016x}", hasher.finish()))
}

/// Removes the VMs' memory files of the agent(s) on `data_dir`.
pub fn remove_memory_dir(data_dir: &Path) {
    let _ = std::fs::remove_dir_all(memory_dir_for(data_dir));
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

/// The first byte offset where two files differ (a shorter file differs where it ends), or
/// None when they are byte-identical. Reads both in 8 MiB pieces.
pub fn first_difference(a: &Path, b: &Path) -> Option<u64> {
    use std::io::Read;
    let open = |p: &Path| std::fs::File::open(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    let (mut fa, mut fb) = (open(a), open(b));
    let (mut ba, mut bb) = (vec![0u8; 8 << 20], vec![0u8; 8 << 20]);
    let mut offset = 0u64;
    loop {
        let na = read_full(&mut fa, &mut ba);
        let nb = read_full(&mut fb, &mut bb);
        if let Some(i) = ba[..na.min(nb)]
            .iter()
            .zip(&bb[..na.min(nb)])
            .position(|(x, y)| x != y)
        {
            return Some(offset + i as u64);
        }
        if na != nb {
            return Some(offset + na.min(nb) as u64);
        }
        if na == 0 {
            return None;
        }
        offset += na as u64;
    }

    fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> usize {
        let mut got = 0;
        while got < buf.len() {
            match f.read(&mut buf[got..]).expect("reading an image") {
                0 => break,
                n => got += n,
            }
        }
        got
    }
}

/// A tmpfs of `mib` MiB mounted on a fresh directory; unmounted on drop. None when this
/// process may not mount (not root).
pub struct SmallFs {
    dir: tempfile::TempDir,
}

impl SmallFs {
    pub fn mount(mib: u64) -> Option<SmallFs> {
        let dir = tempfile::tempdir().expect("temp dir");
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "ferry-test"])
            .arg(dir.path())
            .status()
            .ok()?;
        status.success().then_some(SmallFs { dir })
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(self.dir.path())
            .status();
    }
}
