//! Integration test support: real `ferry agent` processes on loopback, driven through the
//! real `ferry` CLI with `--json`, so every test exercises what an operator runs.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
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
    data_dir: PathBuf,
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

    /// Starts an agent through `command` (a wrapper that ends by running the `ferry`
    /// binary with the arguments appended), on loopback.
    pub fn start_via(command: Command) -> Agent {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut agent = Self::spawn(command, "127.0.0.1", dir.path());
        agent._owned_dir = Some(dir);
        agent
    }

    fn spawn(mut command: Command, ip: &str, data_dir: &Path) -> Agent {
        let listen = format!("{ip}:0");
        let mut child = command
            .args(["agent", "--listen", &listen, "--print-addr", "--data-dir"])
            .arg(data_dir)
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
            data_dir: data_dir.to_path_buf(),
            _owned_dir: None,
        }
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
