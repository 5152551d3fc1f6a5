//! `ferry-bench disk`, table 3: QEMU's `blockdev-mirror` of the same image against ferry's
//! bulk copy (chunk 1 MiB, queue depth 16), alternating, in the same run.
//!
//! Only when `qemu-storage-daemon` is on PATH. Two daemons, on loopback only:
//!
//! - destination: a raw file on tmpfs, exported writable over NBD on 127.0.0.1;
//! - source: the image (`cache.direct=on`; `aio=io_uring`, else `native`, else `threads`)
//!   and a QMP socket. Over QMP: `qmp_capabilities`, `blockdev-add` an NBD client node of
//!   the export, `blockdev-mirror` (sync=full, QEMU's defaults otherwise), and the time from
//!   the command to the `BLOCK_JOB_READY` event is the bulk copy. Then `block-job-cancel`
//!   (a ready mirror completes without pivoting) and `quit`.
//!
//! CPU is the daemons' own (utime + stime of both, from `/proc/PID/stat`), next to ferry's
//! process CPU over its disk-copy phase (source and destination alike). A daemon is killed
//! whatever happens ([`Daemon`]'s drop, in [`crate::qmp`]).

use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_dataplane::disk::{DirectIo, DiskImage, VirtualDisk};
use serde::Serialize;
use serde_json::json;

use crate::cpu::process_seconds;
use crate::disk::{self, DiskConfig};
use crate::disk_migration::{self, compare_samples, CopySample, RemoveOnDrop};
use crate::qmp::{free_port, on_path, qemu_path, Daemon, Qmp, COMMAND_TIMEOUT};
use crate::report::{self, fixed, median, Table};

const GIB: f64 = (1u64 << 30) as f64;
const DAEMON: &str = "qemu-storage-daemon";
/// ferry's side of the comparison.
const FERRY_CHUNK_BYTES: u32 = 1 << 20;
const FERRY_QUEUE_DEPTH: u32 = 16;
/// AIO engines tried for the source, best first.
const AIO_MODES: [&str; 3] = ["io_uring", "native", "threads"];
/// The slowest mirror waited for: this rate, or a minute, whichever is longer.
const MIRROR_RATE_MIN_BYTES_PER_S: u64 = 20 << 20;
const JOB: &str = "ferry-bench-mirror";

/// One QEMU mirror of the whole image.
#[derive(Clone, Debug, Default, Serialize)]
pub struct QemuSample {
    pub aio: String,
    pub copy_ms: f64,
    pub bytes_per_s: f64,
    /// Both daemons, from the mirror command to ready.
    pub cpu_s: f64,
    pub source_cpu_s: f64,
    pub destination_cpu_s: f64,
    pub cpu_s_per_gib: f64,
    pub error: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct QemuMedians {
    pub qemu_bytes_per_s: f64,
    pub qemu_copy_ms: f64,
    pub qemu_cpu_s_per_gib: f64,
    pub ferry_bytes_per_s: f64,
    pub ferry_copy_ms: f64,
    pub ferry_cpu_s_per_gib: f64,
    /// Median of the per-repetition ratios ferry / QEMU.
    pub ratio: f64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct QemuResults {
    /// Why the comparison did not run.
    pub skipped: Option<String>,
    pub version: String,
    pub ok: bool,
    pub medians: QemuMedians,
    pub qemu: Vec<QemuSample>,
    pub ferry: Vec<CopySample>,
}

pub fn run(
    config: &DiskConfig,
    source_disk: &Arc<VirtualDisk>,
    scratch: &Path,
    destination_dir: &Path,
) -> QemuResults {
    let mut results = QemuResults::default();
    let Some(daemon) = on_path(DAEMON) else {
        results.skipped = Some(format!("{DAEMON} is not on PATH"));
        eprintln!("[disk qemu] skipped: {DAEMON} is not on PATH");
        return results;
    };
    results.version = Command::new(&daemon)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    let params = disk::params(FERRY_CHUNK_BYTES, FERRY_QUEUE_DEPTH);
    let image_path = source_disk.image().path().to_path_buf();
    let size = source_disk.size();
    for rep in 0..config.repeat {
        let tag = format!("[disk qemu, run {}/{}]", rep + 1, config.repeat);
        let qemu_first = rep % 2 == 0;
        let mirror = || {
            let mut sample = QemuSample::default();
            if let Err(e) = mirror_once(
                &daemon,
                &image_path,
                size,
                scratch,
                destination_dir,
                rep,
                &mut sample,
            ) {
                sample.error = Some(format!("{e:#}"));
            }
            sample
        };
        if qemu_first {
            results.qemu.push(mirror());
        }
        results.ferry.push(disk_migration::migrate(
            source_disk,
            destination_dir,
            &format!("qemu-compare-run{rep}"),
            &params,
        ));
        if !qemu_first {
            results.qemu.push(mirror());
        }
        let (q, f) = (
            results.qemu.last().expect("pushed"),
            results.ferry.last().expect("pushed"),
        );
        eprintln!(
            "{tag} qemu: {} | ferry: {}",
            match &q.error {
                None => format!(
                    "{} GiB/s (aio={}, {} ms, {} CPU s/GiB)",
                    fixed(q.bytes_per_s / GIB, 2),
                    q.aio,
                    fixed(q.copy_ms, 0),
                    fixed(q.cpu_s_per_gib, 2)
                ),
                Some(e) => format!("FAILED: {e}"),
            },
            match &f.error {
                None => format!(
                    "{} GiB/s ({} ms, {} CPU s/GiB)",
                    fixed(f.copy_bytes_per_s / GIB, 2),
                    fixed(f.copy_ms, 0),
                    fixed(f.cpu_s_per_gib, 2)
                ),
                Some(e) => format!("FAILED: {e}"),
            }
        );
    }
    let good: Vec<usize> = (0..config.repeat)
        .filter(|&i| results.qemu[i].error.is_none() && results.ferry[i].error.is_none())
        .collect();
    let (q, f) = (&results.qemu, &results.ferry);
    let over_good = |g: &dyn Fn(usize) -> f64| median(good.iter().map(|&i| g(i)));
    results.medians = QemuMedians {
        qemu_bytes_per_s: over_good(&|i| q[i].bytes_per_s),
        qemu_copy_ms: over_good(&|i| q[i].copy_ms),
        qemu_cpu_s_per_gib: over_good(&|i| q[i].cpu_s_per_gib),
        ferry_bytes_per_s: over_good(&|i| f[i].copy_bytes_per_s),
        ferry_copy_ms: over_good(&|i| f[i].copy_ms),
        ferry_cpu_s_per_gib: over_good(&|i| f[i].cpu_s_per_gib),
        ratio: over_good(&|i| f[i].copy_bytes_per_s / q[i].bytes_per_s),
    };
    results.ok = !good.is_empty() && good.len() == config.repeat;
    results
}

/// One mirror of the whole image into a fresh file on tmpfs.
fn mirror_once(
    daemon: &Path,
    image: &Path,
    size: u64,
    scratch: &Path,
    destination_dir: &Path,
    rep: usize,
    sample: &mut QemuSample,
) -> anyhow::Result<()> {
    let destination_path = destination_dir.join(format!("qemu-destination-{rep}.img"));
    let _remove = RemoveOnDrop(destination_path.clone());
    // Preallocated as ferry's destination images are.
    DiskImage::create(&destination_path, size, DirectIo::Off)
        .context("creating the destination file")?;
    let socket = scratch.join(format!("qmp-{rep}.sock"));
    let _remove_socket = RemoveOnDrop(socket.clone());

    // The source first: it settles which AIO engine this QEMU and kernel accept.
    let mut source = None;
    let mut refusals = Vec::new();
    for aio in AIO_MODES {
        let pidfile = scratch.join(format!("qsd-source-{rep}-{aio}.pid"));
        let _remove_pid = RemoveOnDrop(pidfile.clone());
        let _ = std::fs::remove_file(&socket);
        let args = vec![
            "--blockdev".into(),
            format!(
                "driver=file,node-name=src,filename={},cache.direct=on,aio={aio}",
                qemu_path(image)
            ),
            "--chardev".into(),
            format!(
                "socket,id=qmp0,path={},server=on,wait=off",
                qemu_path(&socket)
            ),
            "--monitor".into(),
            "chardev=qmp0".into(),
            "--pidfile".into(),
            qemu_path(&pidfile),
        ];
        let mut d = Daemon::spawn(
            daemon,
            &args,
            scratch.join(format!("qsd-source-{rep}-{aio}.log")),
        )?;
        match d.wait_started(&pidfile) {
            Ok(()) => {
                sample.aio = aio.to_string();
                source = Some(d);
                break;
            }
            Err(e) => refusals.push(format!("aio={aio}: {e:#}")),
        }
    }
    let Some(mut source) = source else {
        bail!("the source daemon did not start: {}", refusals.join("; "));
    };
    // Same engine on the destination, except native AIO, which needs O_DIRECT.
    let destination_aio = if sample.aio == "native" {
        "threads"
    } else {
        sample.aio.as_str()
    };
    let mut destination = None;
    let mut refusals = Vec::new();
    // The port was free a moment ago; another process may take it in between.
    for attempt in 0..3 {
        let port = free_port()?;
        let pidfile = scratch.join(format!("qsd-destination-{rep}-{attempt}.pid"));
        let _remove_pid = RemoveOnDrop(pidfile.clone());
        let args = vec![
            "--blockdev".into(),
            format!(
                "driver=file,node-name=dst,filename={},aio={destination_aio}",
                qemu_path(&destination_path)
            ),
            "--nbd-server".into(),
            format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
            "--export".into(),
            "type=nbd,id=exp0,node-name=dst,name=dst,writable=on".into(),
            "--pidfile".into(),
            qemu_path(&pidfile),
        ];
        let mut d = Daemon::spawn(
            daemon,
            &args,
            scratch.join(format!("qsd-destination-{rep}-{attempt}.log")),
        )?;
        match d.wait_started(&pidfile) {
            Ok(()) => {
                destination = Some((d, port));
                break;
            }
            Err(e) => refusals.push(format!("{e:#}")),
        }
    }
    let Some((mut destination, port)) = destination else {
        bail!(
            "the destination daemon did not start: {}",
            refusals.join("; ")
        );
    };

    let mut qmp = Qmp::connect(&socket).context("source QMP")?;
    qmp.execute(
        "blockdev-add",
        json!({
            "driver": "nbd",
            "node-name": "tgt",
            "server": { "type": "inet", "host": "127.0.0.1", "port": port.to_string() },
            "export": "dst",
        }),
    )?;
    let cpu = |d: &Daemon| process_seconds(d.pid()).context("reading a daemon's CPU time");
    let (source_cpu, destination_cpu) = (cpu(&source)?, cpu(&destination)?);
    let started = Instant::now();
    qmp.execute(
        "blockdev-mirror",
        json!({ "job-id": JOB, "device": "src", "target": "tgt", "sync": "full" }),
    )?;
    let wait = Duration::from_secs((size / MIRROR_RATE_MIN_BYTES_PER_S).max(60));
    qmp.wait_event(started + wait, |event| {
        let name = event["event"].as_str().unwrap_or("");
        let data = &event["data"];
        if data["device"].as_str() != Some(JOB) {
            return None;
        }
        match name {
            "BLOCK_JOB_READY" => Some(Ok(())),
            "BLOCK_JOB_ERROR" | "BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED" => {
                Some(Err(anyhow::anyhow!("mirror ended before ready: {event}")))
            }
            _ => None,
        }
    })
    .context("waiting for BLOCK_JOB_READY")?;
    let elapsed = started.elapsed().as_secs_f64();
    sample.source_cpu_s = cpu(&source)? - source_cpu;
    sample.destination_cpu_s = cpu(&destination)? - destination_cpu;
    sample.cpu_s = sample.source_cpu_s + sample.destination_cpu_s;
    sample.copy_ms = elapsed * 1e3;
    sample.bytes_per_s = size as f64 / elapsed;
    sample.cpu_s_per_gib = sample.cpu_s / (size as f64 / GIB);

    // A ready mirror cancelled completes without pivoting.
    qmp.execute("block-job-cancel", json!({ "device": JOB }))?;
    qmp.wait_event(Instant::now() + COMMAND_TIMEOUT, |event| {
        let done = matches!(
            event["event"].as_str(),
            Some("BLOCK_JOB_COMPLETED" | "BLOCK_JOB_CANCELLED")
        ) && event["data"]["device"].as_str() == Some(JOB);
        done.then_some(Ok(()))
    })
    .context("waiting for the mirror to end")?;
    let _ = qmp.execute("quit", json!({}));
    drop(qmp);
    source.stop();
    destination.stop();

    let copy = DiskImage::open(&destination_path, DirectIo::Off)?;
    let original = DiskImage::open(image, DirectIo::Auto)?;
    compare_samples(&original, &copy).context("checking the mirror's copy")?;
    Ok(())
}

pub fn print(config: &DiskConfig, results: &QemuResults) {
    println!(
        "## disk 3: ferry bulk copy vs QEMU blockdev-mirror ({} image, median of {})\n",
        report::size(config.disk_bytes),
        config.repeat
    );
    if let Some(reason) = &results.skipped {
        println!("skipped: {reason}.\n");
        return;
    }
    let m = &results.medians;
    let aio = results
        .qemu
        .iter()
        .find(|q| q.error.is_none())
        .map_or("-".to_string(), |q| q.aio.clone());
    let mut table = Table::new(&["copy", "GiB/s", "copy ms", "CPU s/GiB", "status"]);
    let status = |errors: Vec<&str>| {
        if errors.is_empty() {
            "ok".to_string()
        } else {
            format!(
                "FAILED ({}/{} ok; {})",
                config.repeat - errors.len(),
                config.repeat,
                errors[0]
            )
        }
    };
    table.row(vec![
        format!(
            "ferry (chunk {}, QD {FERRY_QUEUE_DEPTH})",
            disk::chunk_label(FERRY_CHUNK_BYTES)
        ),
        fixed(m.ferry_bytes_per_s / GIB, 2),
        fixed(m.ferry_copy_ms, 0),
        fixed(m.ferry_cpu_s_per_gib, 2),
        status(
            results
                .ferry
                .iter()
                .filter_map(|f| f.error.as_deref())
                .collect(),
        ),
    ]);
    table.row(vec![
        format!("QEMU blockdev-mirror (aio={aio})"),
        fixed(m.qemu_bytes_per_s / GIB, 2),
        fixed(m.qemu_copy_ms, 0),
        fixed(m.qemu_cpu_s_per_gib, 2),
        status(
            results
                .qemu
                .iter()
                .filter_map(|q| q.error.as_deref())
                .collect(),
        ),
    ]);
    print!("{}", table.render());
    println!(
        "\nferry / QEMU: {} (median of per-run ratios; target >= 1.5: {}).\n\
         {}: source image with cache.direct=on, destination a raw file on {} exported over NBD on 127.0.0.1,\n\
         blockdev-mirror sync=full with QEMU's defaults; time from the command to BLOCK_JOB_READY.\n\
         QEMU CPU: utime+stime of both daemons (/proc/PID/stat, 10 ms ticks); ferry CPU: this process over the disk-copy phase.\n",
        fixed(m.ratio, 2),
        if !m.ratio.is_finite() {
            "-"
        } else if m.ratio >= 1.5 {
            "met"
        } else {
            "NOT met"
        },
        results.version,
        config.destination_dir.display(),
    );
}
