//! ferry the way a user runs it: two `ferry agent` processes on loopback with one cluster
//! key, a reference VM created through the CLI, `ferry --json migrate`, then `vm verify` on
//! the destination. Nothing in-process: the agents' threads are metered from `/proc`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_dataplane::engine::MigrationReport;
use serde::Serialize;
use serde_json::Value;

use super::cleanup::RemovedDir;
use super::proc_cpu::{is_ferry_vcpu, CpuMeter};
use crate::qmp::Daemon;

const GIB: f64 = (1u64 << 30) as f64;
/// Bounds on an agent's start, a VM's boot, a migration and a verify.
const AGENT_START_TIMEOUT: Duration = Duration::from_secs(20);
const BOOT_TIMEOUT: Duration = Duration::from_secs(120);
const MIGRATE_TIMEOUT: Duration = Duration::from_secs(600);
/// The guest runs this long after booting before it is migrated (the QEMU guest's first
/// FERRY-RATE line comes a second after FERRY-READY).
const SETTLE: Duration = Duration::from_secs(1);

/// How `ferry migrate` is run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FerryMode {
    /// `--streams N --downtime-ms D`.
    Tuned { streams: usize, downtime_ms: u64 },
    /// No flags at all.
    Defaults,
}

/// One ferry migration.
#[derive(Clone, Debug, Default, Serialize)]
pub struct FerrySample {
    /// The report's total_ms: migrate command to the destination's confirmed resume,
    /// including the destination's pre-fault.
    pub total_ms: f64,
    /// What the migration takes when the destination is already prepared, its memory
    /// allocated and faulted in, as QEMU's preallocated destination is (see
    /// [`same_state_ms`]).
    pub same_state_ms: f64,
    /// total − max(prefault, trace) + trace: the same idea from the report's pre-fault
    /// alone, which leaves in the rest of the destination's preparation (allocating its
    /// memory file happens before and outside prefault_ms).
    pub same_state_prefault_only_ms: f64,
    pub downtime_ms: f64,
    pub prefault_ms: f64,
    pub trace_ms: f64,
    /// When pre-copy's first round began (the timeline's round 0): the preparation,
    /// pre-fault and trace included.
    pub precopy_start_ms: f64,
    pub bytes_sent: u64,
    /// The report's throughput: bytes on the wire over the time spent sending (the rounds).
    pub bytes_per_s: f64,
    /// Bytes on the wire over the whole same-state migration (handshake, trace, rounds and
    /// switch-over), the way QEMU's figure and the raw push's cover their whole transfer.
    pub migration_bytes_per_s: f64,
    pub rounds: u32,
    pub throttle_percent_max: u8,
    /// Why pre-copy stopped ("converged", "rounds-max", "timeout").
    pub stop_reason: String,
    /// Both agents minus the VM's vCPU threads, over the migrate command.
    pub source_cpu_s: f64,
    pub destination_cpu_s: f64,
    pub cpu_s: f64,
    pub cpu_s_per_gib: f64,
    /// The destination's CPU before pre-copy began (its pre-fault), left out of the
    /// same-state figure as QEMU's preallocation is left out of its run.
    pub destination_prepare_cpu_s: f64,
    pub same_state_cpu_s_per_gib: f64,
    pub verified: bool,
    pub plot: Option<PathBuf>,
    pub error: Option<String>,
}

/// What every ferry run needs.
pub struct FerryContext {
    /// target/<profile>/ferry.
    pub binary: PathBuf,
    pub scratch: PathBuf,
    pub plots: PathBuf,
}

/// The `ferry` binary beside the benchmark's executable.
pub fn find_ferry() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("locating the benchmark's executable")?;
    let mut dir = exe.parent().context("the executable has no directory")?;
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir = dir.parent().context("deps/ has no parent")?;
    }
    let ferry = dir.join("ferry");
    anyhow::ensure!(
        ferry.is_file(),
        "{} is missing: build it: cargo build --release -p ferry-control",
        ferry.display()
    );
    Ok(ferry)
}

/// One `ferry agent` process; killed on drop if [`Agent::stop`] was not reached.
struct Agent {
    daemon: Daemon,
    addr: String,
    socket: PathBuf,
}

impl Agent {
    fn start(
        ctx: &FerryContext,
        key: &Path,
        data_dir: &Path,
        memory_dir: &Path,
    ) -> anyhow::Result<Self> {
        let args: Vec<String> = vec![
            "agent".into(),
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--print-addr".into(),
            "--key".into(),
            key.display().to_string(),
            "--data-dir".into(),
            data_dir.display().to_string(),
            "--memory-dir".into(),
            memory_dir.display().to_string(),
        ];
        let mut daemon = Daemon::spawn_piped(&ctx.binary, &args, data_dir.with_extension("log"))?;
        let stdout = daemon.take_stdout().context("the agent's stdout")?;
        // The first line is "listening on ADDR"; read it on a thread so a stuck agent
        // cannot hold the benchmark past the timeout.
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::Builder::new()
            .name("bench-agent-stdout".into())
            .spawn(move || {
                let mut reader = BufReader::new(stdout);
                let mut line = String::new();
                let _ = tx.send(reader.read_line(&mut line).map(|_| line));
                // Keep the pipe open (and drained) for the agent's life.
                let _ = std::io::copy(&mut reader, &mut std::io::sink());
            })?;
        let line = match rx.recv_timeout(AGENT_START_TIMEOUT) {
            Ok(Ok(line)) => line,
            _ => bail!("the agent did not start: {}", daemon.log_tail()),
        };
        let addr = line
            .trim()
            .strip_prefix("listening on ")
            .with_context(|| format!("unexpected first line {line:?}: {}", daemon.log_tail()))?
            .to_string();
        Ok(Self {
            daemon,
            addr,
            socket: data_dir.join("agent.sock"),
        })
    }

    /// `ferry --agent <socket> --json ARGS`.
    fn cli(&self, ctx: &FerryContext, args: &[&str]) -> anyhow::Result<Output> {
        Command::new(&ctx.binary)
            .arg("--agent")
            .arg(&self.socket)
            .arg("--json")
            .args(args)
            .output()
            .with_context(|| format!("running ferry {args:?}"))
    }

    /// A command that must succeed, and its JSON.
    fn json(&self, ctx: &FerryContext, args: &[&str]) -> anyhow::Result<Value> {
        let out = self.cli(ctx, args)?;
        let value = last_json(&out.stdout);
        if !out.status.success() {
            bail!(
                "ferry {args:?} failed ({}): {}",
                out.status,
                value
                    .as_ref()
                    .and_then(|v| v["error"].as_str().map(str::to_string))
                    .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string())
            );
        }
        value.with_context(|| format!("ferry {args:?} printed no JSON"))
    }
}

/// The last JSON object a `--json` command printed.
fn last_json(stdout: &[u8]) -> Option<Value> {
    String::from_utf8_lossy(stdout)
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .and_then(|l| serde_json::from_str(l).ok())
}

/// Creates a reference VM on a fresh pair of agents, migrates it once, verifies it on the
/// destination and tears everything down.
#[allow(clippy::too_many_arguments)]
pub fn migrate_once(
    ctx: &FerryContext,
    memory_bytes: u64,
    rate_mib_per_s: u64,
    seed: u64,
    mode: FerryMode,
    tag: &str,
    plot_title: &str,
) -> FerrySample {
    let mut sample = FerrySample::default();
    if let Err(e) = run(
        ctx,
        memory_bytes,
        rate_mib_per_s,
        seed,
        mode,
        tag,
        plot_title,
        &mut sample,
    ) {
        sample.error = Some(format!("{e:#}"));
    }
    sample
}

#[allow(clippy::too_many_arguments)]
fn run(
    ctx: &FerryContext,
    memory_bytes: u64,
    rate_mib_per_s: u64,
    seed: u64,
    mode: FerryMode,
    tag: &str,
    plot_title: &str,
    sample: &mut FerrySample,
) -> anyhow::Result<()> {
    let dir = ctx.scratch.join(tag);
    std::fs::create_dir_all(&dir)?;
    let _remove_dir = RemovedDir::new(dir.clone());
    // The VMs' memory lives on tmpfs, one directory per agent, gone after the run.
    let shm = |side: &str| {
        PathBuf::from(format!(
            "/dev/shm/ferry-bench-{}-{tag}-{side}",
            std::process::id()
        ))
    };
    let (source_memory, destination_memory) = (shm("src"), shm("dst"));
    let _remove_source_memory = RemovedDir::new(source_memory.clone());
    let _remove_destination_memory = RemovedDir::new(destination_memory.clone());
    let key = dir.join("cluster.key");
    let out = Command::new(&ctx.binary)
        .args(["key", "init"])
        .arg(&key)
        .env_remove("FERRY_KEY")
        .output()
        .context("running ferry key init")?;
    anyhow::ensure!(
        out.status.success(),
        "ferry key init failed: {}",
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let mut source =
        Agent::start(ctx, &key, &dir.join("src"), &source_memory).context("the source agent")?;
    let mut destination = Agent::start(ctx, &key, &dir.join("dst"), &destination_memory)
        .context("the destination agent")?;

    let vm = format!("bench-{tag}");
    let memory = format!("{}M", memory_bytes >> 20);
    let rate = format!("{rate_mib_per_s}MB/s");
    let seed = seed.to_string();
    source.json(
        ctx,
        &[
            "vm",
            "create",
            &vm,
            "--memory",
            &memory,
            "--vcpus",
            "1",
            "--dirty-rate",
            &rate,
            "--disk",
            "0",
            "--seed",
            &seed,
        ],
    )?;
    wait_running(ctx, &source, &vm, rate_mib_per_s > 0)?;
    std::thread::sleep(SETTLE);

    let mut args: Vec<String> = vec![
        "--agent".into(),
        source.socket.display().to_string(),
        "--json".into(),
        "migrate".into(),
        vm.clone(),
        "--to".into(),
        destination.addr.clone(),
    ];
    if let FerryMode::Tuned {
        streams,
        downtime_ms,
    } = mode
    {
        args.extend([
            "--streams".into(),
            streams.to_string(),
            "--downtime-ms".into(),
            downtime_ms.to_string(),
        ]);
    }
    let meter = CpuMeter::start(&[
        (source.daemon.pid(), is_ferry_vcpu),
        (destination.daemon.pid(), is_ferry_vcpu),
    ])?;
    let out = run_bounded(&ctx.binary, &args, &dir.join("migrate"), MIGRATE_TIMEOUT);
    let cpu = meter.finish();
    let out = out?;
    let json = last_json(&out.stdout);
    if !out.status.success() {
        bail!(
            "ferry migrate failed ({}): {}",
            out.status,
            json.as_ref()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&out.stderr).trim().to_string())
        );
    }
    let report: MigrationReport = serde_json::from_value(json.context("migrate printed no JSON")?)
        .context("reading the migration report")?;

    sample.total_ms = report.total_ms;
    sample.prefault_ms = report.prefault_ms;
    sample.trace_ms = report.trace_ms;
    sample.same_state_ms = same_state_ms(&report);
    sample.same_state_prefault_only_ms = same_state_prefault_only_ms(&report);
    sample.downtime_ms = report.downtime_ms;
    sample.bytes_sent = report.bytes_sent;
    sample.bytes_per_s = report.throughput_bytes_per_s;
    sample.migration_bytes_per_s =
        report.bytes_sent as f64 / (sample.same_state_ms / 1e3).max(1e-9);
    sample.rounds = report.rounds;
    sample.throttle_percent_max = report.throttle_percent_max;
    sample.stop_reason = report.converged.clone();
    sample.source_cpu_s = cpu[0].migration_s();
    sample.destination_cpu_s = cpu[1].migration_s();
    sample.cpu_s = sample.source_cpu_s + sample.destination_cpu_s;
    let gib = (report.bytes_sent as f64 / GIB).max(1e-9);
    sample.cpu_s_per_gib = sample.cpu_s / gib;
    // Pre-copy's start, on the source's clock from the start of the migration, which began
    // a little after the command was spawned: the destination's CPU read at that offset
    // from the spawn is taken slightly early, so it under- rather than overstates the
    // pre-fault's share.
    let precopy_ms = report
        .timeline
        .rounds
        .first()
        .map_or(report.prefault_ms.max(report.trace_ms), |r| r.start_ms);
    sample.precopy_start_ms = precopy_ms;
    sample.destination_prepare_cpu_s =
        cpu[1].total_by(Duration::from_secs_f64(precopy_ms.max(0.0) / 1e3));
    sample.same_state_cpu_s_per_gib =
        (sample.cpu_s - sample.destination_prepare_cpu_s).max(0.0) / gib;

    let plot = ctx.plots.join(format!("{plot_title}.svg"));
    match ferry_control::plot::write_svg(&plot, &report.timeline, plot_title) {
        Ok(()) => sample.plot = Some(plot),
        Err(e) => eprintln!("[qemu] plot {}: {e}", plot.display()),
    }

    let verify = destination.json(ctx, &["vm", "verify", &vm]);
    sample.verified = verify
        .as_ref()
        .is_ok_and(|v| v["ok"].as_bool() == Some(true));
    let _ = destination.json(ctx, &["vm", "destroy", &vm]);
    source.daemon.stop();
    destination.daemon.stop();
    if !sample.verified {
        bail!(
            "verify on the destination failed: {}",
            match verify {
                Ok(v) => v.to_string(),
                Err(e) => format!("{e:#}"),
            }
        );
    }
    Ok(())
}

/// total − (pre-copy start − trace). The agent overlaps the source's trace with the
/// destination's preparation (creating and allocating the VM's memory, pre-faulting it), so
/// pre-copy starts after the longer of the two; with the destination already prepared, as
/// a QEMU started with `-incoming` and preallocated RAM is, it would start after the trace.
/// Without a timeline (an older ferry), [`same_state_prefault_only_ms`].
pub fn same_state_ms(report: &MigrationReport) -> f64 {
    match report.timeline.rounds.first() {
        Some(round0) => report.total_ms - (round0.start_ms - report.trace_ms).max(0.0),
        None => same_state_prefault_only_ms(report),
    }
}

/// total − max(prefault, trace) + trace (with the usual prefault ≥ trace: total − prefault
/// + trace): takes out only the part of the destination's preparation the report names.
pub fn same_state_prefault_only_ms(report: &MigrationReport) -> f64 {
    report.total_ms - report.prefault_ms.max(report.trace_ms) + report.trace_ms
}

/// Waits until the VM runs (and, if it dirties memory, has taken steps).
fn wait_running(ctx: &FerryContext, agent: &Agent, vm: &str, dirties: bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    loop {
        let status = agent.json(ctx, &["vm", "status", vm])?;
        if status["running"].as_bool() == Some(true)
            && (!dirties || status["total_steps"].as_u64().unwrap_or(0) > 0)
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("{vm} is not running after {BOOT_TIMEOUT:?}: {status}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs `program args` with stdout and stderr in files beside `base`, killed past
/// `timeout`.
fn run_bounded(
    program: &Path,
    args: &[String],
    base: &Path,
    timeout: Duration,
) -> anyhow::Result<Output> {
    let (out_path, err_path) = (base.with_extension("out"), base.with_extension("err"));
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path)?)
        .stderr(std::fs::File::create(&err_path)?)
        .spawn()
        .with_context(|| format!("starting {}", program.display()))?;
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("ferry {args:?} still running after {timeout:?}: killed");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok(Output {
        status,
        stdout: std::fs::read(&out_path)?,
        stderr: std::fs::read(&err_path)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_state_drops_the_destination_preparation_but_not_the_trace() {
        use ferry_dataplane::engine::timeline::{RoundRecord, Timeline};
        let mut report = MigrationReport {
            total_ms: 2000.0,
            prefault_ms: 900.0,
            trace_ms: 300.0,
            ..Default::default()
        };
        // No timeline: from the pre-fault alone.
        assert_eq!(same_state_ms(&report), 1400.0);
        assert_eq!(same_state_prefault_only_ms(&report), 1400.0);
        // Pre-copy began at 1100 ms: 800 ms of preparation beyond the 300 ms trace.
        report.timeline = Timeline {
            rounds: vec![RoundRecord {
                start_ms: 1100.0,
                ..Default::default()
            }],
            ..Default::default()
        };
        assert_eq!(same_state_ms(&report), 1200.0);
        assert_eq!(same_state_prefault_only_ms(&report), 1400.0);
        // A trace longer than the pre-fault: nothing to take out of the pre-fault formula.
        let trace_longer = MigrationReport {
            total_ms: 2000.0,
            prefault_ms: 100.0,
            trace_ms: 300.0,
            ..Default::default()
        };
        assert_eq!(same_state_prefault_only_ms(&trace_longer), 2000.0);
    }

    #[test]
    fn the_last_json_line_wins() {
        let out = b"{\"event\":\"progress\"}\n{\"total_ms\": 5.0}\n\n";
        assert_eq!(last_json(out).unwrap()["total_ms"], 5.0);
        assert!(last_json(b"not json").is_none());
    }
}
