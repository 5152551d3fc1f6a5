//! QEMU to QEMU over loopback: a source `qemu-system-x86_64` booting the dirty.c guest and
//! a destination started with `-incoming defer`, driven over QMP like libvirt would.
//!
//! Both run under TCG (`-accel tcg,thread=multi`, one vCPU); `-name …,debug-threads=on`
//! names the vCPU thread "CPU 0/TCG" so its CPU can be told apart from migration work.
//! The guest's console is QEMU's stdout (`-serial stdio`), read line by line for
//! FERRY-READY and FERRY-RATE. Every QEMU is a [`Daemon`]: killed whatever happens.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::ChildStdout;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use serde::Serialize;
use serde_json::{json, Value};

use super::guest::{self, GuestFiles};
use super::proc_cpu::{is_qemu_vcpu, CpuMeter};
use crate::qmp::{qemu_path, Daemon, Qmp};
use crate::report::median;

const GIB: f64 = (1u64 << 30) as f64;
/// Guest RAM beyond the dirty.c mapping, for the kernel: a fixed part, and 1/16 of the
/// mapping for what grows with RAM (struct pages alone are 1/64, then page tables and
/// slack). 4 GiB + 256 MiB was not enough: the guest's kernel ran out of memory filling.
pub const HEADROOM_MIB: u64 = 256;
pub const HEADROOM_DIVISOR: u64 = 16;

/// The QEMU guest's RAM (`-m`) for a dirty.c mapping of `memory_mib`.
pub fn guest_ram_mib(memory_mib: u64) -> u64 {
    memory_mib + HEADROOM_MIB + memory_mib / HEADROOM_DIVISOR
}
/// How often the source's `query-migrate` is polled: often enough to notice completion
/// promptly (the times themselves come from QEMU and from event timestamps), rarely enough
/// to cost its main loop nothing measurable.
const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// QEMU's default `max-bandwidth` (MiB/s), for the out-of-the-box timeout.
const DEFAULT_BANDWIDTH_MIB_PER_S: u64 = 128;

/// How QEMU is configured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum QemuMode {
    /// Like-for-like with ferry: multifd with `streams` channels, `downtime_ms` as the
    /// downtime limit, no bandwidth cap, auto-converge on (ferry throttles a guest that
    /// outruns the link; QEMU only does when asked), destination RAM preallocated unless
    /// `prealloc` is false (for a ferry whose destination allocates pages as they land).
    Tuned {
        streams: usize,
        downtime_ms: u64,
        prealloc: bool,
    },
    /// No migration capability or parameter set: one stream, max-bandwidth 128 MiB/s,
    /// downtime limit 300 ms, no auto-converge. The destination's RAM is preallocated as in
    /// `Tuned`, so that both destinations are in the same state when the clock starts (the
    /// issue's rule for every target; at 128 MiB/s QEMU's page faults hide behind the cap
    /// anyway).
    Defaults,
}

/// One QEMU migration.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QemuSample {
    /// From the `migrate` command to the destination's RESUME event (host clock), the
    /// span ferry's total_ms covers.
    pub total_ms: f64,
    /// From the source's STOP event to the destination's RESUME event: what the guest sees.
    pub downtime_ms: f64,
    /// QEMU's own figures (source side, `query-migrate`): total-time and downtime end when
    /// the source has sent everything, before the destination has loaded it and resumed.
    pub reported_total_ms: f64,
    pub reported_downtime_ms: f64,
    pub setup_ms: f64,
    /// ram.transferred: every byte on the wire, multifd channels included.
    pub transferred_bytes: u64,
    pub multifd_bytes: u64,
    /// transferred_bytes / (total-time − setup-time).
    pub bytes_per_s: f64,
    pub dirty_sync_count: u64,
    /// Highest cpu-throttle-percentage seen (auto-converge).
    pub throttle_percent_max: u64,
    /// Both QEMUs minus their vCPU threads, from `migrate` to RESUME.
    pub source_cpu_s: f64,
    pub destination_cpu_s: f64,
    pub cpu_s: f64,
    pub cpu_s_per_gib: f64,
    /// The guest's FERRY-RATE lines (MiB/s): median before the migration and during it.
    pub guest_rate_before: f64,
    pub guest_rate_during: f64,
    /// Boot and fill, until FERRY-READY (outside the clock).
    pub boot_ms: f64,
    /// The destination's guest printed a FERRY-RATE line after RESUME.
    pub alive_after: bool,
    pub error: Option<String>,
}

/// What every QEMU run needs.
pub struct QemuContext {
    pub binary: PathBuf,
    pub files: GuestFiles,
    pub scratch: PathBuf,
}

/// The guest console: lines with the time they arrived, read by a thread until QEMU ends.
#[derive(Clone, Default)]
struct Console {
    lines: Arc<Mutex<Vec<(Instant, String)>>>,
}

impl Console {
    fn attach(stdout: ChildStdout) -> anyhow::Result<Self> {
        let console = Self::default();
        let lines = Arc::clone(&console.lines);
        std::thread::Builder::new()
            .name("bench-qemu-console".into())
            .spawn(move || {
                for line in BufReader::new(stdout).split(b'\n').map_while(Result::ok) {
                    let text = String::from_utf8_lossy(&line).trim().to_string();
                    lines
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push((Instant::now(), text));
                }
            })?;
        Ok(console)
    }

    fn snapshot(&self) -> Vec<(Instant, String)> {
        self.lines.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn tail(&self) -> String {
        let lines = self.snapshot();
        let start = lines.len().saturating_sub(3);
        lines[start..]
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join(" / ")
    }

    /// Waits for a line after `after` that holds `marker` (the first line also carries
    /// the firmware's output, which ends without a newline); fails if QEMU exits.
    fn wait_for(
        &self,
        marker: &str,
        after: Instant,
        deadline: Instant,
        qemu: &mut Daemon,
    ) -> anyhow::Result<Instant> {
        loop {
            if let Some((at, _)) = self
                .snapshot()
                .into_iter()
                .find(|(at, line)| *at > after && line.contains(marker))
            {
                return Ok(at);
            }
            if qemu.exited() {
                bail!(
                    "QEMU exited: {} / console: {}",
                    qemu.log_tail(),
                    self.tail()
                );
            }
            if Instant::now() > deadline {
                bail!("no {marker} line in time; console: {}", self.tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Median of the FERRY-RATE figures printed in (from, to].
    fn rate(&self, from: Instant, to: Instant) -> f64 {
        median(
            self.snapshot()
                .iter()
                .filter(|(at, _)| *at > from && *at <= to)
                .filter_map(|(_, line)| parse_rate_line(line)),
        )
    }
}

/// The MiB/s of a `FERRY-RATE <MiB/s>` line.
pub fn parse_rate_line(line: &str) -> Option<f64> {
    let at = line.find("FERRY-RATE ")?;
    line[at + "FERRY-RATE ".len()..].trim().parse().ok()
}

/// The command line of one QEMU: its RAM is a `memory-backend-ram` (the same RAM block
/// name on both sides), preallocated when `prealloc`.
pub fn qemu_args(
    files: &GuestFiles,
    name: &str,
    total_mib: u64,
    cmdline: &str,
    qmp_socket: &Path,
    prealloc: bool,
    incoming: bool,
) -> Vec<String> {
    let mut args: Vec<String> = [
        "-name",
        &format!("{name},debug-threads=on"),
        "-nographic",
        "-nodefaults",
        "-no-user-config",
        "-no-reboot",
        "-accel",
        "tcg,thread=multi",
        "-smp",
        "1",
        "-m",
        &format!("{total_mib}M"),
        "-kernel",
        &qemu_path(&files.kernel),
        "-initrd",
        &qemu_path(&files.initramfs),
        "-append",
        cmdline,
        "-serial",
        "stdio",
        "-qmp",
        &format!("unix:{},server=on,wait=off", qemu_path(qmp_socket)),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "-object".to_string(),
        format!(
            "memory-backend-ram,id=ram0,size={total_mib}M{}",
            if prealloc { ",prealloc=on" } else { "" }
        ),
        "-machine".to_string(),
        "pc,memory-backend=ram0".to_string(),
    ]);
    if incoming {
        args.extend(["-incoming".to_string(), "defer".to_string()]);
    }
    args
}

/// A QMP event's host timestamp.
fn event_time(event: &Value) -> Option<SystemTime> {
    let t = &event["timestamp"];
    let seconds = t["seconds"].as_u64()?;
    let micros = t["microseconds"].as_u64()?;
    Some(UNIX_EPOCH + Duration::from_secs(seconds) + Duration::from_micros(micros))
}

fn ms_between(from: SystemTime, to: SystemTime) -> f64 {
    to.duration_since(from)
        .map_or(0.0, |d| d.as_secs_f64() * 1e3)
}

/// The figures a finished `query-migrate` answer carries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct MigrateStatus {
    pub status: String,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub setup_ms: f64,
    pub transferred_bytes: u64,
    pub multifd_bytes: u64,
    pub dirty_sync_count: u64,
    pub throttle_percent: u64,
    pub error: Option<String>,
}

/// Reads a `query-migrate` answer (absent fields read as zero: QEMU omits what does not
/// apply yet).
pub fn parse_query_migrate(value: &Value) -> MigrateStatus {
    let ram = &value["ram"];
    MigrateStatus {
        status: value["status"].as_str().unwrap_or("").to_string(),
        total_ms: value["total-time"].as_f64().unwrap_or(0.0),
        downtime_ms: value["downtime"].as_f64().unwrap_or(0.0),
        setup_ms: value["setup-time"].as_f64().unwrap_or(0.0),
        transferred_bytes: ram["transferred"].as_u64().unwrap_or(0),
        multifd_bytes: ram["multifd-bytes"].as_u64().unwrap_or(0),
        dirty_sync_count: ram["dirty-sync-count"].as_u64().unwrap_or(0),
        throttle_percent: value["cpu-throttle-percentage"].as_u64().unwrap_or(0),
        error: value["error-desc"].as_str().map(str::to_string),
    }
}

/// Connects to a QEMU's QMP socket. The socket file appears when QEMU binds it, a moment
/// before it listens: a refused connection is retried (while QEMU lives, up to a second).
fn connect(socket: &Path, greeting: Duration, qemu: &mut Daemon) -> anyhow::Result<Qmp> {
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match Qmp::connect_within(socket, greeting) {
            Ok(qmp) => return Ok(qmp),
            Err(e) if Instant::now() < deadline && !qemu.exited() => {
                let refused = e.chain().any(|c| {
                    c.downcast_ref::<std::io::Error>()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::ConnectionRefused)
                });
                if !refused {
                    return Err(e);
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(e) => return Err(e.context(qemu.log_tail())),
        }
    }
}

/// Sets the migration capabilities and parameters of `mode` (the same on both sides).
fn configure(qmp: &mut Qmp, mode: QemuMode) -> anyhow::Result<()> {
    let QemuMode::Tuned {
        streams,
        downtime_ms,
        ..
    } = mode
    else {
        return Ok(());
    };
    qmp.execute(
        "migrate-set-capabilities",
        json!({ "capabilities": [
            { "capability": "multifd", "state": true },
            { "capability": "auto-converge", "state": true },
        ]}),
    )?;
    // max-bandwidth 0 is "no limit" since QEMU 8.1: migration_rate_set() stores
    // max-bandwidth / XFER_LIMIT_RATIO and migration_rate_exceeded() returns false at once
    // for RATE_LIMIT_DISABLED (0), so the rate-limiting check is skipped altogether. A huge
    // value (QMP accepts up to SIZE_MAX) would also never be reached, but would still be
    // checked; 0 says what we mean. query-migrate-parameters echoes it back, checked below.
    qmp.execute(
        "migrate-set-parameters",
        json!({
            "multifd-channels": streams,
            "downtime-limit": downtime_ms,
            "max-bandwidth": 0,
        }),
    )?;
    let params = qmp.execute("query-migrate-parameters", json!({}))?;
    anyhow::ensure!(
        params["max-bandwidth"].as_u64() == Some(0)
            && params["multifd-channels"].as_u64() == Some(streams as u64)
            && params["downtime-limit"].as_u64() == Some(downtime_ms),
        "QEMU did not take the migration parameters: {params}"
    );
    Ok(())
}

/// Boots a source and a destination QEMU, migrates once, and tears both down.
pub fn migrate_once(
    ctx: &QemuContext,
    memory_bytes: u64,
    rate_mib_per_s: u64,
    seed: u64,
    mode: QemuMode,
    tag: &str,
) -> QemuSample {
    let mut sample = QemuSample::default();
    if let Err(e) = run(
        ctx,
        memory_bytes,
        rate_mib_per_s,
        seed,
        mode,
        tag,
        &mut sample,
    ) {
        sample.error = Some(format!("{e:#}"));
    }
    sample
}

fn run(
    ctx: &QemuContext,
    memory_bytes: u64,
    rate_mib_per_s: u64,
    seed: u64,
    mode: QemuMode,
    tag: &str,
    sample: &mut QemuSample,
) -> anyhow::Result<()> {
    let memory_mib = memory_bytes >> 20;
    let total_mib = guest_ram_mib(memory_mib);
    let gib = memory_bytes as f64 / GIB;
    let cmdline = guest::cmdline(memory_mib, rate_mib_per_s, seed);
    // The destination's RAM is preallocated (unless a tuned run is asked not to), the
    // source's is not.
    let destination_prealloc = match mode {
        QemuMode::Tuned { prealloc, .. } => prealloc,
        QemuMode::Defaults => true,
    };
    let start = |role: &str, prealloc: bool, incoming: bool| -> anyhow::Result<_> {
        let socket = ctx.scratch.join(format!("{tag}-{role}.qmp"));
        let _ = std::fs::remove_file(&socket);
        let args = qemu_args(
            &ctx.files, role, total_mib, &cmdline, &socket, prealloc, incoming,
        );
        let mut qemu = Daemon::spawn_piped(
            &ctx.binary,
            &args,
            ctx.scratch.join(format!("{tag}-{role}.log")),
        )?;
        let console = Console::attach(qemu.take_stdout().context("QEMU's stdout")?)?;
        qemu.wait_started(&socket)
            .with_context(|| format!("starting the {role} QEMU"))?;
        // Preallocation runs before QEMU's main loop, which sends the greeting.
        let greeting = Duration::from_secs(30) + Duration::from_secs_f64(10.0 * gib);
        let qmp = connect(&socket, greeting, &mut qemu)
            .with_context(|| format!("QMP of the {role} QEMU"))?;
        Ok((qemu, console, qmp))
    };
    // The destination first: it has preallocated its RAM (its QMP greeting comes after
    // that) before the source boots, so the two do not compete while the guest fills.
    let (mut destination, destination_console, mut destination_qmp) =
        start("dst", destination_prealloc, true)?;
    let booted = Instant::now();
    let (mut source, source_console, mut source_qmp) = start("src", false, false)?;
    let ready_deadline = booted + Duration::from_secs(60) + Duration::from_secs_f64(20.0 * gib);
    let ready = source_console
        .wait_for("FERRY-READY", booted, ready_deadline, &mut source)
        .context("waiting for the guest to fill its memory")?;
    sample.boot_ms = (ready - booted).as_secs_f64() * 1e3;
    // One FERRY-RATE line: the guest has dirtied memory for a second, its pattern is set.
    let settled = source_console
        .wait_for(
            "FERRY-RATE",
            ready,
            ready + Duration::from_secs(10),
            &mut source,
        )
        .context("waiting for the guest's first rate line")?;

    configure(&mut destination_qmp, mode).context("destination parameters")?;
    configure(&mut source_qmp, mode).context("source parameters")?;
    destination_qmp.execute("migrate-incoming", json!({ "uri": "tcp:127.0.0.1:0" }))?;
    let listening = destination_qmp.execute("query-migrate", json!({}))?;
    let port = listening["socket-address"][0]["port"]
        .as_str()
        .map(str::to_string)
        .or_else(|| {
            listening["socket-address"][0]["port"]
                .as_u64()
                .map(|p| p.to_string())
        })
        .with_context(|| format!("no listening port in {listening}"))?;

    let timeout = match mode {
        QemuMode::Tuned { .. } => Duration::from_secs(300),
        QemuMode::Defaults => {
            Duration::from_secs((4 * total_mib / DEFAULT_BANDWIDTH_MIB_PER_S).max(300))
        }
    };
    let meter = CpuMeter::start(&[
        (source.pid(), is_qemu_vcpu),
        (destination.pid(), is_qemu_vcpu),
    ])?;
    let migrate_wall = SystemTime::now();
    let migrate_at = Instant::now();
    source_qmp.execute("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))?;
    let status = loop {
        std::thread::sleep(POLL_INTERVAL);
        let status = parse_query_migrate(&source_qmp.execute("query-migrate", json!({}))?);
        sample.throttle_percent_max = sample.throttle_percent_max.max(status.throttle_percent);
        match status.status.as_str() {
            "completed" => break status,
            "failed" | "cancelled" => bail!(
                "migration {}: {}",
                status.status,
                status.error.as_deref().unwrap_or("no reason given")
            ),
            _ => {}
        }
        if migrate_at.elapsed() > timeout {
            let _ = source_qmp.execute("migrate_cancel", json!({}));
            bail!(
                "did not converge within {} s (dirty-sync-count {}, throttle {} %)",
                timeout.as_secs(),
                status.dirty_sync_count,
                sample.throttle_percent_max
            );
        }
    };
    let completed_at = Instant::now();
    let mut resumed = None;
    destination_qmp
        .wait_event(Instant::now() + Duration::from_secs(30), |event| {
            (event["event"] == "RESUME").then(|| {
                resumed = event_time(event);
                Ok(())
            })
        })
        .context("waiting for the destination's RESUME")?;
    let resumed_at = Instant::now();
    let cpu = meter.finish();
    let resumed = resumed.context("RESUME without a timestamp")?;
    // STOP comes before the source reports completion, so it is normally among the events
    // its query-migrate answers brought along; otherwise it is still on its way.
    let mut stopped = source_qmp
        .take_events()
        .iter()
        .find(|e| e["event"] == "STOP")
        .and_then(event_time);
    if stopped.is_none() {
        source_qmp
            .wait_event(Instant::now() + Duration::from_secs(2), |event| {
                (event["event"] == "STOP").then(|| {
                    stopped = event_time(event);
                    Ok(())
                })
            })
            .context("waiting for the source's STOP")?;
    }
    let stopped = stopped.context("STOP without a timestamp")?;

    sample.total_ms = ms_between(migrate_wall, resumed);
    sample.downtime_ms = ms_between(stopped, resumed);
    sample.reported_total_ms = status.total_ms;
    sample.reported_downtime_ms = status.downtime_ms;
    sample.setup_ms = status.setup_ms;
    sample.transferred_bytes = status.transferred_bytes;
    sample.multifd_bytes = status.multifd_bytes;
    sample.dirty_sync_count = status.dirty_sync_count;
    sample.bytes_per_s =
        status.transferred_bytes as f64 / ((status.total_ms - status.setup_ms).max(1.0) / 1e3);
    sample.source_cpu_s = cpu[0].migration_s();
    sample.destination_cpu_s = cpu[1].migration_s();
    sample.cpu_s = sample.source_cpu_s + sample.destination_cpu_s;
    sample.cpu_s_per_gib = sample.cpu_s / (status.transferred_bytes as f64 / GIB).max(1e-9);
    sample.guest_rate_before = source_console.rate(settled - Duration::from_millis(1), migrate_at);
    sample.guest_rate_during =
        source_console.rate(migrate_at + Duration::from_millis(500), completed_at);

    // The guest runs on the destination: its next rate line arrives there.
    sample.alive_after = destination_console
        .wait_for(
            "FERRY-RATE",
            resumed_at - Duration::from_millis(1),
            Instant::now() + Duration::from_secs(5),
            &mut destination,
        )
        .is_ok();
    let _ = source_qmp.execute("quit", json!({}));
    let _ = destination_qmp.execute("quit", json!({}));
    source.stop();
    destination.stop();
    anyhow::ensure!(
        sample.alive_after,
        "the guest printed nothing on the destination after RESUME; console: {}",
        destination_console.tail()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// query-migrate on the source of a finished multifd migration (QEMU 10.0.2).
    const COMPLETED: &str = r#"{"status": "completed", "setup-time": 4, "downtime": 4,
        "total-time": 210, "ram": {"total": 1342709760, "postcopy-requests": 0,
        "dirty-sync-count": 3, "multifd-bytes": 81947840, "pages-per-second": 1241358,
        "downtime-bytes": 0, "page-size": 4096, "remaining": 0, "postcopy-bytes": 0,
        "mbps": 3186.868038834951, "transferred": 82061852,
        "dirty-sync-missed-zero-copy": 0, "precopy-bytes": 32, "duplicate": 312374,
        "dirty-pages-rate": 0, "normal-bytes": 78438400, "normal": 19150}}"#;

    #[test]
    fn query_migrate_answers_parse() {
        let status = parse_query_migrate(&serde_json::from_str(COMPLETED).unwrap());
        assert_eq!(
            status,
            MigrateStatus {
                status: "completed".into(),
                total_ms: 210.0,
                downtime_ms: 4.0,
                setup_ms: 4.0,
                transferred_bytes: 82061852,
                multifd_bytes: 81947840,
                dirty_sync_count: 3,
                throttle_percent: 0,
                error: None,
            }
        );
        let failed = parse_query_migrate(&json!({
            "status": "failed", "error-desc": "Unable to write to socket: Broken pipe"
        }));
        assert_eq!(failed.status, "failed");
        assert_eq!(
            failed.error.as_deref(),
            Some("Unable to write to socket: Broken pipe")
        );
        assert_eq!(failed.transferred_bytes, 0);
        let throttled =
            parse_query_migrate(&json!({ "status": "active", "cpu-throttle-percentage": 40 }));
        assert_eq!(throttled.throttle_percent, 40);
    }

    #[test]
    fn events_carry_host_time() {
        let stop =
            json!({"timestamp": {"seconds": 1795657550, "microseconds": 256993}, "event": "STOP"});
        let resume = json!({"timestamp": {"seconds": 1795657550, "microseconds": 263498}, "event": "RESUME"});
        let ms = ms_between(event_time(&stop).unwrap(), event_time(&resume).unwrap());
        assert!((ms - 6.505).abs() < 1e-6, "{ms}");
    }

    #[test]
    fn only_the_destination_is_preallocated() {
        let files = GuestFiles {
            kernel: "/k/vmlinux".into(),
            initramfs: "/t/init,ramfs.cpio".into(),
        };
        let line = guest::cmdline(1024, 50, 1);
        let source = qemu_args(
            &files,
            "src",
            1280,
            &line,
            Path::new("/s/q.sock"),
            false,
            false,
        );
        let destination = qemu_args(
            &files,
            "dst",
            1280,
            &line,
            Path::new("/s/d.sock"),
            true,
            true,
        );
        let after = |args: &[String], flag: &str| {
            args.iter()
                .position(|a| a == flag)
                .map(|i| args[i + 1].clone())
                .unwrap_or_default()
        };
        assert_eq!(
            after(&source, "-object"),
            "memory-backend-ram,id=ram0,size=1280M"
        );
        assert_eq!(
            after(&destination, "-object"),
            "memory-backend-ram,id=ram0,size=1280M,prealloc=on"
        );
        assert_eq!(after(&destination, "-machine"), "pc,memory-backend=ram0");
        assert_eq!(after(&source, "-machine"), "pc,memory-backend=ram0");
        assert_eq!(after(&destination, "-incoming"), "defer");
        assert!(!source.contains(&"-incoming".to_string()));
        assert_eq!(after(&source, "-append"), line);
        assert_eq!(
            after(&source, "-initrd"),
            "/t/init,,ramfs.cpio",
            "commas doubled"
        );
        assert_eq!(after(&source, "-accel"), "tcg,thread=multi");
        assert_eq!(after(&source, "-name"), "src,debug-threads=on");
        assert_eq!(parse_rate_line("FERRY-RATE 199.5"), Some(199.5));
        assert_eq!(parse_rate_line("FERRY-READY"), None);
        assert_eq!(guest_ram_mib(1024), 1344);
        assert_eq!(guest_ram_mib(4096), 4608);
        assert_eq!(
            parse_rate_line("Booting from ROM..FERRY-RATE 3.0"),
            Some(3.0)
        );
    }
}

#[cfg(test)]
mod smoke {
    use super::*;

    /// One 256 MiB boot and migration, when this host has QEMU and a guest kernel:
    /// `cargo test --release -p ferry-bench -- --ignored qemu_smoke`.
    #[test]
    #[ignore = "boots QEMU guests under TCG (~15 s); needs qemu-system-x86_64 and a kernel"]
    fn qemu_smoke() {
        let Some(binary) = crate::qmp::on_path("qemu-system-x86_64") else {
            eprintln!("SKIPPED: qemu-system-x86_64 is not installed");
            return;
        };
        let kernel = match guest::find_kernel(None) {
            Ok(kernel) => kernel,
            Err(e) => {
                eprintln!("SKIPPED: {e:#}");
                return;
            }
        };
        let scratch =
            std::env::temp_dir().join(format!("ferry-bench-smoke-{}", std::process::id()));
        std::fs::create_dir_all(&scratch).unwrap();
        let ctx = QemuContext {
            binary,
            files: guest::build(kernel).unwrap(),
            scratch: scratch.clone(),
        };
        let mode = QemuMode::Tuned {
            streams: 2,
            downtime_ms: 30,
            prealloc: true,
        };
        let sample = migrate_once(&ctx, 256 << 20, 50, 1, mode, "smoke");
        let _ = std::fs::remove_dir_all(&scratch);
        assert!(sample.error.is_none(), "{:?}", sample.error);
        assert!(
            sample.alive_after && sample.transferred_bytes >= 256 << 20,
            "{sample:?}"
        );
        assert!(
            sample.downtime_ms > 0.0 && sample.total_ms >= sample.downtime_ms,
            "{sample:?}"
        );
        assert!(sample.cpu_s > 0.0, "{sample:?}");
    }
}
