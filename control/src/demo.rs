//! `ferry demo`: two agents on loopback (child processes of this binary), a busy VM (with a
//! 1 GiB disk unless `--disk 0`) on the first, migrated live to the second, verified there
//! (memory and disk), and the report. The two agents share a cluster key generated for the
//! demo in its temporary directory.
//!
//! The agents never outlive the demo: each is asked to shut down and killed if it does not
//! go within a few seconds, on success, failure or Ctrl-C alike; they run in their own
//! process group (so the terminal's Ctrl-C reaches only the demo, which cancels the
//! migration first) and die with the demo if it is killed outright (`PR_SET_PDEATHSIG`).

use std::fs::File;
use std::io::{BufRead, BufReader};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use crossbeam_channel::bounded;
use ferry_dataplane::engine::MigrationReport;
use ferry_dataplane::units::format_bytes;
use serde::Serialize;

use crate::auth::{ClusterKey, KEY_FILE};
use crate::cli::{describe_disk, DemoArgs};
use crate::client::Client;
use crate::commands::{follow_migration, OutputMode, EXIT_FAILED, EXIT_OK};
use crate::output::{format_dirty_rate, print_json, render_verify};
use crate::progress::{render_report, with_spinner};
use crate::sigint;

/// An agent must print its address within this time.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(30);
/// After `Shutdown`, how long an agent gets to exit before it is killed.
const AGENT_STOP_TIMEOUT: Duration = Duration::from_secs(5);
/// The VM runs this long on the source before the migration, so it is busy.
const WARM_UP: Duration = Duration::from_millis(300);
/// Gap between the two status calls that show the VM running on the destination.
const STEPS_GAP: Duration = Duration::from_millis(300);
/// After Ctrl-C, how long the demo's own clean-up may take before the agents are killed.
const INTERRUPT_GRACE: Duration = Duration::from_secs(10);
/// Log lines shown per agent when the demo fails.
const LOG_TAIL_LINES: usize = 15;

/// `demo --json`: the report's fields plus what the demo checked.
#[derive(Serialize)]
struct DemoJson<'a> {
    vm: &'a str,
    #[serde(flatten)]
    report: &'a MigrationReport,
    /// The VM's memory and registers matched the replay of its program on the destination.
    verified: bool,
    pages_checked: u64,
    mismatched_pages: u64,
    /// Disk bytes read and checked on the destination (0 without a disk).
    disk_bytes_checked: u64,
    mismatched_disk_blocks: u64,
    /// Total vCPU steps on the destination, `STEPS_GAP` apart: the VM runs there.
    steps_before: u64,
    steps_after: u64,
    /// Disk writes on the destination, `STEPS_GAP` apart (0 without a disk).
    disk_steps_before: u64,
    disk_steps_after: u64,
    /// The source agent no longer hosts the VM.
    source_released: bool,
    source_agent: &'a str,
    destination_agent: &'a str,
}

/// One agent child process.
struct AgentProcess {
    label: &'static str,
    child: Child,
    addr: String,
    log: PathBuf,
    key: Arc<ClusterKey>,
}

/// Pids of the agents still running, for the Ctrl-C watcher's last resort.
type LivePids = Arc<Mutex<Vec<u32>>>;

impl AgentProcess {
    fn spawn(
        label: &'static str,
        dir: &Path,
        key: &Arc<ClusterKey>,
        live: &LivePids,
    ) -> anyhow::Result<Self> {
        let exe = std::env::current_exe().context("finding this executable")?;
        let data_dir = dir.join(format!("agent-{label}"));
        let log = dir.join(format!("agent-{label}.log"));
        let log_file = File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let mut command = Command::new(exe);
        command
            .args(["agent", "--listen", "127.0.0.1:0", "--print-addr", "--key"])
            .arg(dir.join(KEY_FILE))
            .arg("--data-dir")
            .arg(&data_dir)
            .arg("--memory-dir")
            .arg(memory_dir().join(label))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log_file)
            .process_group(0);
        // SAFETY: the closure runs in the child between fork and exec and only makes the
        // prctl system call (async-signal-safe); it touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = command
            .spawn()
            .with_context(|| format!("starting agent {label}"))?;
        live.lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(child.id());
        let stdout = child.stdout.take().expect("stdout is piped");
        // The address comes on the first line; the rest (nothing, normally) is drained so
        // the agent never blocks on a full pipe.
        let (tx, rx) = bounded(1);
        std::thread::Builder::new()
            .name(format!("agent-{label}-stdout"))
            .spawn(move || {
                let mut lines = BufReader::new(stdout).lines();
                let _ = tx.send(lines.next());
                for _ in lines {}
            })
            .context("starting a reader thread")?;
        let mut agent = Self {
            label,
            child,
            addr: String::new(),
            log,
            key: Arc::clone(key),
        };
        let first = rx
            .recv_timeout(AGENT_START_TIMEOUT)
            .ok()
            .flatten()
            .and_then(Result::ok);
        match first
            .as_deref()
            .and_then(|line| line.strip_prefix("listening on "))
        {
            Some(addr) => agent.addr = addr.trim().to_string(),
            None => {
                let tail = agent.log_tail();
                agent.stop(live);
                bail!("agent {label} did not report its address (got {first:?}); its log:\n{tail}");
            }
        }
        Ok(agent)
    }

    fn client(&self) -> Client {
        Client::new(self.addr.clone()).with_key(Arc::clone(&self.key))
    }

    /// Asks the agent to shut down; kills it if it has not exited in time. Idempotent.
    fn stop(&mut self, live: &LivePids) {
        if matches!(self.child.try_wait(), Ok(None)) {
            if !self.addr.is_empty() {
                let _ = self.client().shutdown();
            }
            let deadline = Instant::now() + AGENT_STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if matches!(self.child.try_wait(), Ok(None)) {
                eprintln!(
                    "agent {} did not stop within {} s; killing it",
                    self.label,
                    AGENT_STOP_TIMEOUT.as_secs()
                );
                let _ = self.child.kill();
            }
        }
        // Forget the pid before reaping, so the watcher never signals a reused pid.
        live.lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|&pid| pid != self.child.id());
        let _ = self.child.wait();
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

/// Stops every agent when dropped: the demo's success, failure and unwinding paths alike.
struct Agents {
    list: Vec<AgentProcess>,
    live: LivePids,
}

impl Agents {
    fn print_log_tails(&self) {
        for agent in &self.list {
            eprintln!(
                "--- last lines of agent {}'s log ({}) ---\n{}",
                agent.label,
                agent.log.display(),
                agent.log_tail()
            );
        }
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for agent in &mut self.list {
            agent.stop(&self.live);
        }
    }
}

/// Sets its flag when dropped.
struct SetOnDrop(Arc<AtomicBool>);

impl Drop for SetOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::SeqCst);
    }
}

/// Where the demo's agents keep their VMs' memory (tmpfs, removed with the demo).
fn memory_dir() -> &'static Path {
    static DIR: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    DIR.get_or_init(|| PathBuf::from(format!("/dev/shm/ferry-demo-{}", std::process::id())))
}

/// Removes the demo's memory directory when the demo ends, however it ends.
struct MemoryDirGuard;

impl Drop for MemoryDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(memory_dir());
    }
}

/// Runs the demo; returns the exit code.
pub fn run(args: &DemoArgs, mode: OutputMode) -> anyhow::Result<i32> {
    sigint::install(&[libc::SIGINT, libc::SIGTERM]).context("installing the Ctrl-C handler")?;
    let dir = tempfile::Builder::new()
        .prefix("ferry-demo-")
        .tempdir()
        .context("creating a temporary directory")?;
    let _memory = MemoryDirGuard;
    let key = Arc::new(ClusterKey::generate()?);
    key.write_new(&dir.path().join(KEY_FILE), false)
        .context("writing the demo's cluster key")?;
    let live: LivePids = Arc::default();
    // Last resort after Ctrl-C: if the demo's own clean-up has not finished in time, kill
    // the agents and leave.
    let live_for_watcher = Arc::clone(&live);
    let finished = Arc::new(AtomicBool::new(false));
    let finished_seen = Arc::clone(&finished);
    let _last_resort = sigint::Watcher::spawn(move || {
        let deadline = Instant::now() + INTERRUPT_GRACE;
        while Instant::now() < deadline {
            if finished_seen.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        eprintln!(
            "clean-up did not finish within {} s; killing the agents",
            INTERRUPT_GRACE.as_secs()
        );
        for pid in live_for_watcher
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            // SAFETY: kill takes plain integers; the pids are children not yet reaped
            // (removed from the list before `wait`), so they cannot have been reused.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
        std::process::exit(sigint::EXIT_INTERRUPTED);
    })
    .context("starting the Ctrl-C watcher")?;
    // Dropped in reverse order: the agents are stopped first, then the watcher is told the
    // clean-up is over, then it is joined.
    let _finished = SetOnDrop(finished);
    let mut agents = Agents {
        list: Vec::with_capacity(2),
        live: Arc::clone(&live),
    };
    agents
        .list
        .push(AgentProcess::spawn("a", dir.path(), &key, &live)?);
    agents
        .list
        .push(AgentProcess::spawn("b", dir.path(), &key, &live)?);
    let result = demo(args, mode, &agents.list[0], &agents.list[1]);
    if result.is_err() || matches!(result, Ok(EXIT_FAILED)) {
        agents.print_log_tails();
    }
    result
}

fn check_interrupted() -> anyhow::Result<()> {
    if sigint::interrupted() {
        bail!("interrupted");
    }
    Ok(())
}

fn demo(
    args: &DemoArgs,
    mode: OutputMode,
    a: &AgentProcess,
    b: &AgentProcess,
) -> anyhow::Result<i32> {
    let human = !mode.json;
    let name = args.name.as_str();
    let (spec, placement) = args.spec();
    let (source, destination) = (a.client(), b.client());
    if human {
        println!("ferry demo: two agents on loopback");
        println!("  agent A  {}  (source)", a.addr);
        println!("  agent B  {}  (destination)", b.addr);
    }
    let disk = describe_disk(&spec, &placement);
    let what = match &disk {
        Some(disk) => format!("booting {name} on A (disk {disk}: writing its boot content)"),
        None => format!("booting {name} on A"),
    };
    with_spinner(&what, !human, || {
        source.vm_create(spec.clone(), placement.clone())
    })
    .with_context(|| format!("creating {name} on agent A"))?;
    if human {
        println!(
            "created {name} on A: {}, {} vCPUs, {} {}, seed {}",
            format_bytes(spec.memory_bytes),
            spec.vcpus,
            format_dirty_rate(spec.dirty_rate_bytes_per_s),
            spec.pattern,
            spec.seed
        );
        if let (Some(disk), Some(disk_spec)) = (&disk, &spec.disk) {
            let writes = match disk_spec.write_rate_bytes_per_s {
                0 => "no writes".to_string(),
                rate => format!("{} {} writes", format_dirty_rate(rate), disk_spec.pattern),
            };
            println!(
                "  disk {disk}: {writes}, {}% filled at boot, direct I/O {}",
                disk_spec.fill_percent, placement.direct_io
            );
        }
    }
    std::thread::sleep(WARM_UP);
    check_interrupted()?;

    // The watcher in follow_migration turns Ctrl-C into a Cancel to agent A.
    let report = follow_migration(&source, name, &b.addr, args.params(), mode)
        .with_context(|| format!("migrating {name} from A to B"))?;
    if human {
        print!("{}", render_report(name, &b.addr, &report));
    }
    crate::commands::write_plot(
        args.migration.plot.as_deref(),
        &report,
        &format!("ferry demo: {name}, A → B"),
        mode,
    )?;
    check_interrupted()?;

    let verify = destination
        .vm_verify(name)
        .with_context(|| format!("verifying {name} on agent B"))?;
    if human {
        print!("on B: {}", render_verify(name, &verify));
    }
    let before = destination
        .vm_status(name)
        .with_context(|| format!("status of {name} on agent B"))?;
    std::thread::sleep(STEPS_GAP);
    let after = destination
        .vm_status(name)
        .with_context(|| format!("status of {name} on agent B"))?;
    let steps_increase = after.total_steps > before.total_steps;
    let idle = spec.dirty_rate_bytes_per_s == 0;
    let disk_steps = |vm: &crate::api::VmInfo| vm.disk.as_ref().map_or(0, |d| d.total_steps);
    let (disk_before, disk_after) = (disk_steps(&before), disk_steps(&after));
    // Without a disk, or with a disk nobody writes, there is nothing to see advance.
    let disk_idle = spec
        .disk
        .as_ref()
        .is_none_or(|d| d.write_rate_bytes_per_s == 0);
    let disk_writing = disk_after > disk_before;
    let source_released = !source
        .vm_list()
        .context("listing agent A's VMs")?
        .iter()
        .any(|vm| vm.name == name);
    if human {
        println!(
            "on B: {name} {} (steps {} → {} in {} ms)",
            if steps_increase {
                "keeps running"
            } else if idle {
                "is idle"
            } else {
                "is NOT running"
            },
            before.total_steps,
            after.total_steps,
            STEPS_GAP.as_millis()
        );
        if spec.disk.is_some() {
            println!(
                "on B: {name}'s disk {} (disk writes {disk_before} → {disk_after} in {} ms)",
                if disk_writing {
                    "keeps being written"
                } else if disk_idle {
                    "is idle"
                } else {
                    "is NOT being written"
                },
                STEPS_GAP.as_millis()
            );
        }
        println!(
            "on A: {name} {}",
            if source_released {
                "released"
            } else {
                "STILL HOSTED"
            }
        );
    }
    // An idle VM (dirty rate 0) takes no steps; its liveness cannot be shown this way (nor
    // a disk's, without disk writes).
    let passed =
        verify.ok && (steps_increase || idle) && (disk_writing || disk_idle) && source_released;
    if mode.json {
        print_json(&DemoJson {
            vm: name,
            report: &report,
            verified: verify.ok,
            pages_checked: verify.pages_checked,
            mismatched_pages: verify.mismatched_pages,
            disk_bytes_checked: verify.disk_bytes_checked,
            mismatched_disk_blocks: verify.mismatched_disk_blocks,
            steps_before: before.total_steps,
            steps_after: after.total_steps,
            disk_steps_before: disk_before,
            disk_steps_after: disk_after,
            source_released,
            source_agent: &a.addr,
            destination_agent: &b.addr,
        });
    } else {
        println!("{}", if passed { "demo passed" } else { "demo FAILED" });
    }
    if !passed {
        return Ok(EXIT_FAILED);
    }
    Ok(EXIT_OK)
}
