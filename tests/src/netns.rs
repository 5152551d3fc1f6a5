//! Two hosts on one machine: two network namespaces joined by a veth pair, so that cutting
//! the network between them is a real link going down (`ip link set … down`), and agents
//! run "on" each host with data directories the test owns, kept across their restarts.
//!
//! Needs root and iproute2's `ip`; [`TwoHosts::new`] says loudly when it cannot run and
//! returns `None` (the test then passes without running). Everything it creates is removed
//! on drop, also when the test panics.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

use crate::{ferry_bin, parse_json, remove_memory_dir, Agent};

/// The port every agent listens on inside its namespace (each namespace has its own ports,
/// so this never collides): a restarted agent comes back at the address its peers know,
/// as a real agent does with its configured `--listen`.
pub const AGENT_PORT: u16 = 7070;
/// Name of the veth end in each namespace (names are per namespace).
const VETH: &str = "ferry0";

static FIXTURES: AtomicU32 = AtomicU32::new(0);

/// True when this process runs as root (uid 0), from `/proc/self/status`.
fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|l| l.strip_prefix("Uid:"))
                .and_then(|ids| ids.split_whitespace().nth(1).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

fn ip_available() -> bool {
    Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs `ip ARGS` and panics with its output when it fails.
fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// One side: a network namespace and its address on the link.
#[derive(Clone, Debug)]
pub struct Host {
    /// Name of the network namespace.
    pub ns: String,
    /// The host's address on the link between the two (no prefix).
    pub ip: String,
}

impl Host {
    /// `ip netns exec NS program`: a command that runs `program` on this host.
    pub fn command(&self, program: impl Into<OsString>) -> Command {
        let mut command = Command::new("ip");
        command
            .args(["netns", "exec", &self.ns])
            .arg(program.into());
        command
    }
}

/// Two namespaces `a` and `b` joined by a veth pair, `10.X.Y.1/24` and `10.X.Y.2/24`.
pub struct TwoHosts {
    pub a: Host,
    pub b: Host,
    /// Namespaces created so far (deleted on drop).
    created: Vec<String>,
}

impl TwoHosts {
    /// Creates the two hosts, or returns None after saying why on stderr when this process
    /// cannot (not root, or no `ip`). Panics if it could but failed.
    pub fn new() -> Option<TwoHosts> {
        if !is_root() || !ip_available() {
            eprintln!(
                "\n!!!!! SKIPPED: network namespaces need root and iproute2's `ip` (root: {}, ip: {}); \
                 this test did not run !!!!!\n",
                is_root(),
                ip_available()
            );
            return None;
        }
        let n = FIXTURES.fetch_add(1, Ordering::SeqCst);
        let pid = std::process::id();
        // Unique per fixture in this process, and (mostly) across processes; the addresses
        // live only inside the two namespaces, so a clash could not disturb anything anyway.
        let subnet = format!("10.{}.{}", 20 + pid % 200, n % 250);
        let name = |side: &str| format!("ferry-{pid}-{n}-{side}");
        let mut hosts = TwoHosts {
            a: Host {
                ns: name("a"),
                ip: format!("{subnet}.1"),
            },
            b: Host {
                ns: name("b"),
                ip: format!("{subnet}.2"),
            },
            created: Vec::new(),
        };
        for ns in [hosts.a.ns.clone(), hosts.b.ns.clone()] {
            ip(&["netns", "add", &ns]);
            hosts.created.push(ns);
        }
        // Both ends are created straight inside their namespaces.
        ip(&[
            "link",
            "add",
            VETH,
            "netns",
            &hosts.a.ns,
            "type",
            "veth",
            "peer",
            "name",
            VETH,
            "netns",
            &hosts.b.ns,
        ]);
        for host in [&hosts.a, &hosts.b] {
            ip(&["-n", &host.ns, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &host.ns,
                "addr",
                "add",
                &format!("{}/24", host.ip),
                "dev",
                VETH,
            ]);
            ip(&["-n", &host.ns, "link", "set", VETH, "up"]);
        }
        Some(hosts)
    }

    /// Cuts the network between the hosts: the link goes down at both ends.
    pub fn cut(&self) {
        for host in [&self.a, &self.b] {
            ip(&["-n", &host.ns, "link", "set", VETH, "down"]);
        }
    }

    /// Brings the link back up (and the addresses, should the kernel have dropped them).
    pub fn heal(&self) {
        for host in [&self.a, &self.b] {
            let shown = Command::new("ip")
                .args(["-n", &host.ns, "-4", "addr", "show", "dev", VETH])
                .output()
                .expect("run ip");
            if !String::from_utf8_lossy(&shown.stdout).contains(&format!("{}/24", host.ip)) {
                ip(&[
                    "-n",
                    &host.ns,
                    "addr",
                    "add",
                    &format!("{}/24", host.ip),
                    "dev",
                    VETH,
                ]);
            }
            ip(&["-n", &host.ns, "link", "set", VETH, "up"]);
        }
    }
}

impl Drop for TwoHosts {
    fn drop(&mut self) {
        // Deleting a namespace deletes its end of the veth pair, and with it the pair.
        for ns in self.created.drain(..) {
            let _ = Command::new("ip")
                .args(["netns", "del", &ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Runs `ferry` (`$1`) with `--listen IP:0` made `--listen IP:$2` (the agent's address is
/// then the same across restarts) and its log (stderr) appended to `$3`; the rest of the
/// arguments pass unchanged.
const AGENT_WRAPPER: &str = r#"ferry=$1; port=$2; log=$3; shift 3
args=(); prev=
for a in "$@"; do
  if [ "$prev" = --listen ]; then a="${a%:0}:$port"; fi
  args+=("$a"); prev=$a
done
exec "$ferry" "${args[@]}" 2>>"$log""#;

/// A `ferry agent` running on a [`Host`], on a data directory the test owns; it can be
/// killed and restarted on the same directory and address.
pub struct NsAgent {
    agent: Option<Agent>,
    host: Host,
    data_dir: PathBuf,
    env: Vec<(OsString, OsString)>,
    log: PathBuf,
    /// `IP:PORT`, the same across restarts.
    pub addr: String,
}

impl NsAgent {
    /// Starts an agent on `host` with `env` added to its environment (e.g. the failpoint
    /// directory), keeping its files in `data_dir` and appending its log to `log` (across
    /// restarts too).
    pub fn start(host: &Host, data_dir: &Path, env: &[(&str, &Path)], log: &Path) -> NsAgent {
        let mut agent = NsAgent {
            agent: None,
            host: host.clone(),
            data_dir: data_dir.to_path_buf(),
            env: env
                .iter()
                .map(|(k, v)| (OsString::from(k), v.as_os_str().to_owned()))
                .collect(),
            log: log.to_path_buf(),
            addr: format!("{}:{AGENT_PORT}", host.ip),
        };
        agent.launch();
        agent
    }

    fn launch(&mut self) {
        let mut command = self.host.command("bash");
        command
            .args(["-c", AGENT_WRAPPER, "ferry-on-host"])
            .arg(ferry_bin())
            .arg(AGENT_PORT.to_string())
            .arg(&self.log)
            .envs(self.env.iter().map(|(k, v)| (k, v)));
        let agent = Agent::spawn(command, &self.host.ip, &self.data_dir);
        assert_eq!(agent.addr, self.addr, "the agent listens where it should");
        self.agent = Some(agent);
    }

    /// Kills the agent at once (SIGKILL), as a crash would. Its data directory stays.
    pub fn kill(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
    }

    /// Starts the agent again on the same data directory and address (killing it first if
    /// it still runs).
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    pub fn is_up(&self) -> bool {
        self.agent.is_some()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Runs `ferry --json ARGS` against this agent: over its unix socket in the data
    /// directory when it has one, else from inside its namespace over TCP.
    pub fn run(&self, args: &[&str]) -> Output {
        self.cli(args).output().expect("run ferry")
    }

    /// `ferry --agent <this agent> --json ARGS`: over the agent's unix socket when it has
    /// one (no key needed), else from inside its namespace over TCP (`FERRY_KEY` of the
    /// test process, when set, authenticates it).
    fn cli(&self, args: &[&str]) -> Command {
        let socket = self.data_dir.join("agent.sock");
        let mut command = if socket.exists() {
            let mut command = Command::new(ferry_bin());
            command.arg("--agent").arg(&socket);
            command
        } else {
            let mut command = self.host.command(ferry_bin());
            command.args(["--agent", &self.addr]);
            command
        };
        command.arg("--json").args(args).stdin(Stdio::null());
        command
    }

    /// Like [`NsAgent::run`], for a long command (`migrate`): started, not waited for,
    /// with its stdout piped.
    pub fn spawn_cli(&self, args: &[&str]) -> std::process::Child {
        self.cli(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ferry")
    }

    /// The JSON of a command that succeeded, or what went wrong.
    pub fn try_json(&self, args: &[&str]) -> Result<Value, String> {
        if !self.is_up() {
            return Err("the agent is not running".into());
        }
        let out = self.run(args);
        if out.status.success() {
            Ok(parse_json(&out.stdout))
        } else {
            Err(format!(
                "ferry {args:?} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }

    /// The JSON of a command that must succeed.
    pub fn json(&self, args: &[&str]) -> Value {
        self.try_json(args).unwrap_or_else(|e| panic!("{e}"))
    }

    /// The VMs this agent lists (`vm list` entries).
    pub fn vms(&self) -> Result<Vec<Value>, String> {
        let list = self.try_json(&["vm", "list"])?;
        let vms = list.get("vms").unwrap_or(&list);
        vms.as_array()
            .cloned()
            .ok_or_else(|| format!("vm list is not an array: {list}"))
    }

    /// `vm verify NAME`'s report (its `ok` is for the caller to check).
    pub fn verify(&self, vm: &str) -> Value {
        parse_json(&self.run(&["vm", "verify", vm]).stdout)
    }

    /// Total vCPU steps of `vm` here.
    pub fn total_steps(&self, vm: &str) -> Result<u64, String> {
        let status = self.try_json(&["vm", "status", vm])?;
        status["total_steps"]
            .as_u64()
            .ok_or_else(|| format!("no total_steps in {status}"))
    }

    /// True when `vm`'s step counters increase here within `within`.
    pub fn advances(&self, vm: &str, within: Duration) -> bool {
        let Ok(before) = self.total_steps(vm) else {
            return false;
        };
        let deadline = std::time::Instant::now() + within;
        while std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            if self.total_steps(vm).is_ok_and(|now| now > before) {
                return true;
            }
        }
        false
    }
}

impl Drop for NsAgent {
    fn drop(&mut self) {
        self.kill();
        // The VMs' memory outlives an agent (a restart recovers it); the test is done with
        // this data directory now.
        remove_memory_dir(&self.data_dir);
    }
}
