//! `ferry-bench`: ferry measured against a baseline in the same run.
//!
//! The host is shared and noisy, so no figure here is meant to be read alone: every
//! benchmark runs its subject and its baseline alternately in the same process and reports
//! the ratio, the median over `--repeat` runs.
//!
//! - `memory`: a whole migration (reference VM, uffd-wp tracker, TCP on loopback, verify)
//!   against raw TCP moving the same bytes over the same streams.
//! - `tracking`: the guest's step rate with kernel dirty tracking on against off.
//! - `disk`: the storage path: bulk copy against a raw io_uring read of the same image,
//!   guest write latency with and without a mirror, and QEMU's blockdev-mirror when
//!   `qemu-storage-daemon` is installed.
//! - `rdma`: the memory stream over RDMA against TCP and `ib_write_bw` between the same
//!   two soft-RoCE devices (inside ../shared/rxe-vm: `bench/rxe`).
//! - `qemu`: memory migration side by side with QEMU (a TCG guest, multifd, the same
//!   streams and downtime limit) and a raw two-process TCP push; the convergence row and
//!   the out-of-the-box pair (needs `qemu-system-x86_64` and a guest kernel).
//! - `send-path`: zero-copy send (copy/zerocopy/auto), registered disk buffers, syscall batching.
//! - `all`: memory, tracking and disk, with defaults.
//! - `simulate`: the seeded simulation of the swap barrier (invariants, not A/B).
//!
//! Tables go to stdout (`--json` for machine-readable results), progress to stderr.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferry_dataplane::guest::reference::Pattern;
use ferry_dataplane::units::parse_size;
use serde::Serialize;

mod cpu;
mod disk;
mod disk_latency;
mod disk_migration;
mod link;
mod memory;
mod qemu;
mod qemu_memory;
mod qmp;
mod rdma;
mod report;
mod send_path;
mod simulate;
mod tracking;

#[derive(Parser, Debug)]
#[command(
    name = "ferry-bench",
    version,
    about = "ferry benchmarks: A/B against a baseline in the same run"
)]
struct Cli {
    /// Print machine-readable results (JSON) instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// Runs of each A/B pair, alternating order; the median is reported.
    #[arg(long, global = true, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=100))]
    repeat: u32,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// A whole migration against raw TCP over the same streams.
    Memory(MemoryArgs),
    /// vCPU step rate with dirty tracking on against off.
    Tracking(TrackingArgs),
    /// Disk bulk copy vs raw read, write latency with/without mirror, vs QEMU blockdev-mirror.
    Disk(DiskArgs),
    /// Memory stream over RDMA vs TCP vs ib_write_bw (inside the rxe VM: bench/rxe).
    Rdma(RdmaArgs),
    /// Memory migration side by side with QEMU (TCG guest, multifd) and a raw TCP push.
    Qemu(QemuArgs),
    /// Zero-copy send, registered disk buffers and syscall batching, each against its alternative.
    SendPath(send_path::SendPathArgs),
    /// Memory, tracking and disk, with their defaults.
    All,
    /// The raw TCP push's receiving process (started by `qemu`).
    #[command(hide = true)]
    RawReceive(RawReceiveArgs),
    /// The seeded simulation of the swap barrier: invariants over many seeds (not A/B).
    Simulate(simulate::SimulateArgs),
}

#[derive(Args, Debug)]
struct QemuArgs {
    /// Guest memory sizes (e.g. 1G,4G): the QEMU guest gets 256M + 1/16 more for its kernel.
    #[arg(long, value_delimiter = ',', default_value = "1G,4G", value_parser = parse_size_arg)]
    sizes: Vec<u64>,
    /// Guest dirty rates in MB/s (MiB/s; 0 = idle guest).
    #[arg(long, value_delimiter = ',', default_value = "0,50,200")]
    rates: Vec<u64>,
    /// ferry's data streams, QEMU's multifd channels and the raw push's streams.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    streams: u64,
    /// ferry's downtime target and QEMU's downtime-limit.
    #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u64).range(1..=60_000))]
    downtime_ms: u64,
    /// Dirty rate of the convergence row, in MB/s.
    #[arg(long, default_value_t = 1000)]
    converge_rate: u64,
    /// Guest size of the convergence row.
    #[arg(long, default_value = "4G", value_parser = parse_size_arg)]
    converge_size: u64,
    /// Leave out the convergence row.
    #[arg(long)]
    skip_converge: bool,
    /// Preallocate the QEMU destination's RAM in the tuned runs (off: pages are faulted in
    /// as they land, like a ferry destination that allocates on write).
    #[arg(long, value_name = "on|off", default_value = "on", action = clap::ArgAction::Set, value_parser = parse_on_off)]
    qemu_prealloc: bool,
    /// Leave out the out-of-the-box pair (QEMU defaults vs ferry without flags).
    #[arg(long)]
    skip_defaults: bool,
    /// Dirty rate of the out-of-the-box pair, in MB/s (for every --sizes).
    #[arg(long, default_value_t = 50)]
    defaults_rate: u64,
    /// Guest kernel (default: the rxe-vm's, from $RXE_VM_CACHE or /var/cache/rxe-vm).
    #[arg(long)]
    kernel: Option<std::path::PathBuf>,
    /// QEMU binary (default: qemu-system-x86_64 on PATH).
    #[arg(long)]
    qemu: Option<std::path::PathBuf>,
}

#[derive(Args, Debug)]
struct RawReceiveArgs {
    /// Bytes to receive.
    #[arg(long, value_parser = parse_size_arg)]
    bytes: u64,
    /// Streams to accept.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    streams: u64,
}

#[derive(Args, Debug)]
struct RdmaArgs {
    /// Memory moved per run.
    #[arg(long, default_value = "64M", value_parser = parse_size_arg)]
    size: u64,
    /// Streams (RDMA lanes, TCP connections), one sending thread each.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u64).range(1..=64))]
    streams: u64,
    /// Frames (1 MiB blocks) per send call: also what one RDMA announcement names at most.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=4096))]
    frames_per_send: u64,
    /// Target length of each ib_write_bw run, in seconds.
    #[arg(long, default_value_t = 4.0)]
    ib_seconds: f64,
}

#[derive(Args, Debug)]
struct MemoryArgs {
    /// Guest memory sizes (e.g. 1G,4G).
    #[arg(long, value_delimiter = ',', default_value = "1G,4G", value_parser = parse_size_arg)]
    sizes: Vec<u64>,
    /// Guest dirty rates in MB/s (0 = idle guest).
    #[arg(long, value_delimiter = ',', default_value = "0,50,200")]
    rates: Vec<u64>,
    /// Data streams, for ferry and the raw baseline alike.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=64))]
    streams: u64,
    /// The migration's downtime target.
    #[arg(long, default_value_t = 50)]
    downtime_ms: u64,
    /// Dirty pattern: uniform, hotset or sweep.
    #[arg(long, default_value = "uniform")]
    pattern: Pattern,
}

impl Default for MemoryArgs {
    fn default() -> Self {
        Self {
            sizes: vec![1 << 30, 4 << 30],
            rates: vec![0, 50, 200],
            streams: 4,
            downtime_ms: 50,
            pattern: Pattern::Uniform,
        }
    }
}

#[derive(Args, Debug)]
struct TrackingArgs {
    /// Guest memory size.
    #[arg(long, default_value = "1G", value_parser = parse_size_arg)]
    memory: u64,
    /// Length of each measured window.
    #[arg(long, default_value_t = 2.0)]
    seconds: f64,
    /// Dirty patterns of the unpaced rows: uniform, hotset, sweep.
    #[arg(long, value_delimiter = ',', default_value = "uniform,hotset,sweep")]
    patterns: Vec<Pattern>,
    /// vCPU counts of the unpaced rows.
    #[arg(long, value_delimiter = ',', default_value = "1,2", value_parser = clap::value_parser!(u32).range(1..=64))]
    vcpus: Vec<u32>,
    /// Dirty rates of the paced rows, in MB/s (MiB/s) over all vCPUs.
    #[arg(long, value_delimiter = ',', default_value = "50,200", value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    rates: Vec<u64>,
    /// vCPUs of the paced rows.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
    paced_vcpus: u32,
    /// Dirty pattern of the paced rows.
    #[arg(long, default_value = "uniform")]
    paced_pattern: Pattern,
}

impl Default for TrackingArgs {
    fn default() -> Self {
        Self {
            memory: 1 << 30,
            seconds: 2.0,
            patterns: Pattern::ALL.to_vec(),
            vcpus: vec![1, 2],
            rates: vec![50, 200],
            paced_vcpus: 2,
            paced_pattern: Pattern::Uniform,
        }
    }
}

#[derive(Args, Debug)]
struct DiskArgs {
    /// Size of the source image (filled with non-zero content once per run).
    #[arg(long, default_value = "2G", value_parser = parse_size_arg)]
    disk_size: u64,
    /// io_uring queue depths of the bulk-copy rows.
    #[arg(long, value_delimiter = ',', default_value = "1,8,32", value_parser = clap::value_parser!(u32).range(1..=256))]
    queue_depths: Vec<u32>,
    /// Chunk sizes of the bulk-copy rows (multiples of 4K in 128K..=8M).
    #[arg(long, value_delimiter = ',', default_value = "128K,1M", value_parser = parse_size_arg)]
    chunks: Vec<u64>,
    /// Guest write rate of the latency table, in MB/s (MiB/s) over both writer threads.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    write_rate: u64,
    /// Length of each latency measurement.
    #[arg(long, default_value_t = 3.0)]
    write_seconds: f64,
    /// Directory for the source images: a real disk, read with O_DIRECT.
    #[arg(long, default_value = ".")]
    dir: std::path::PathBuf,
    /// Directory for the destination images (tmpfs: this host's disk is not what is measured).
    #[arg(long, default_value = "/dev/shm")]
    destination_dir: std::path::PathBuf,
}

impl Default for DiskArgs {
    fn default() -> Self {
        Self {
            disk_size: 2 << 30,
            queue_depths: vec![1, 8, 32],
            chunks: vec![128 << 10, 1 << 20],
            write_rate: 20,
            write_seconds: 3.0,
            dir: ".".into(),
            destination_dir: "/dev/shm".into(),
        }
    }
}

fn parse_on_off(s: &str) -> Result<bool, String> {
    match s {
        "on" => Ok(true),
        "off" => Ok(false),
        _ => Err(format!("{s:?}: on or off")),
    }
}

fn parse_size_arg(s: &str) -> Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// What `--json` prints: the sections that ran.
#[derive(Serialize, Default)]
struct Results {
    host: Host,
    #[serde(skip_serializing_if = "Option::is_none")]
    memory: Option<memory::MemoryResults>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tracking: Option<tracking::TrackingResults>,
    #[serde(skip_serializing_if = "Option::is_none")]
    disk: Option<disk::DiskResults>,
    #[serde(skip_serializing_if = "Option::is_none")]
    rdma: Option<rdma::RdmaResults>,
    #[serde(skip_serializing_if = "Option::is_none")]
    qemu: Option<qemu_memory::QemuMemoryResults>,
}

/// Where the numbers came from.
#[derive(Serialize, Default)]
struct Host {
    kernel: String,
    cpus: usize,
}

impl Host {
    fn probe() -> Self {
        Self {
            kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
                .map(|s| s.trim().to_string())
                .unwrap_or_default(),
            cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // The simulation sets up its own logging (the faults it injects are not news).
    let command = match cli.command {
        Command::Simulate(args) => return simulate::run(args, cli.json),
        // A child of `qemu`: prints only what its parent reads.
        Command::RawReceive(args) => {
            return qemu_memory::raw_receive(args.bytes, args.streams as usize)
        }
        command => command,
    };
    // Engine warnings (a fail-back, a tracker fallback) matter when reading the numbers.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let repeat = cli.repeat as usize;
    let command = match command {
        Command::SendPath(args) => return send_path::run(args, repeat, cli.json).map(drop),
        command => command,
    };
    let mut rdma_args = None;
    let mut qemu_args = None;
    let (memory_args, tracking_args, disk_args) = match command {
        Command::Memory(m) => (Some(m), None, None),
        Command::Tracking(t) => (None, Some(t), None),
        Command::Disk(d) => (None, None, Some(d)),
        Command::Rdma(r) => {
            rdma_args = Some(r);
            (None, None, None)
        }
        Command::Qemu(q) => {
            qemu_args = Some(q);
            (None, None, None)
        }
        Command::All => (
            Some(MemoryArgs::default()),
            Some(TrackingArgs::default()),
            Some(DiskArgs::default()),
        ),
        Command::Simulate(_) | Command::RawReceive(_) | Command::SendPath(_) => {
            unreachable!("dispatched above")
        }
    };
    if rdma_args.is_some() {
        if let Err(e) = rdma::check_environment() {
            eprintln!("ferry-bench rdma: {e:#}");
            std::process::exit(2);
        }
    }
    let mut results = Results {
        host: Host::probe(),
        ..Default::default()
    };
    if !cli.json {
        println!(
            "# ferry-bench (kernel {}, {} CPUs)\n",
            results.host.kernel, results.host.cpus
        );
    }
    if let Some(m) = memory_args {
        anyhow::ensure!(
            !m.sizes.is_empty() && !m.rates.is_empty(),
            "--sizes and --rates need at least one value each"
        );
        let config = memory::MemoryConfig {
            sizes_bytes: m.sizes,
            rates_mb_per_s: m.rates,
            streams: m.streams as usize,
            downtime_ms: m.downtime_ms,
            pattern: m.pattern,
            repeat,
        };
        let r = memory::run(&config).context("memory benchmark")?;
        if !cli.json {
            memory::print(&r);
        }
        results.memory = Some(r);
    }
    if let Some(t) = tracking_args {
        anyhow::ensure!(
            t.seconds.is_finite() && t.seconds >= 0.2,
            "--seconds must be at least 0.2 (two collections)"
        );
        anyhow::ensure!(
            !t.patterns.is_empty() && !t.vcpus.is_empty() && !t.rates.is_empty(),
            "--patterns, --vcpus and --rates need at least one value each"
        );
        let config = tracking::TrackingConfig {
            memory_bytes: t.memory,
            window_s: t.seconds,
            patterns: t.patterns,
            vcpus: t.vcpus,
            rates_mb_per_s: t.rates,
            paced_vcpus: t.paced_vcpus,
            paced_pattern: t.paced_pattern,
            repeat,
        };
        let r = tracking::run(&config).context("tracking benchmark")?;
        if !cli.json {
            tracking::print(&r);
        }
        results.tracking = Some(r);
    }
    if let Some(d) = disk_args {
        let config = disk_config(d, repeat)?;
        let r = disk::run(&config).context("disk benchmark")?;
        if !cli.json {
            disk::print(&r);
        }
        results.disk = Some(r);
    }
    if let Some(r) = rdma_args {
        anyhow::ensure!(
            r.ib_seconds.is_finite() && (0.5..=600.0).contains(&r.ib_seconds),
            "--ib-seconds must be in 0.5..=600"
        );
        let config = rdma::RdmaConfig {
            size_bytes: r.size,
            streams: r.streams as usize,
            repeat,
            frames_per_send: r.frames_per_send as usize,
            ib_seconds: r.ib_seconds,
        };
        let r = rdma::run(&config).context("rdma benchmark")?;
        if !cli.json {
            rdma::print(&r);
        }
        results.rdma = Some(r);
    }
    if let Some(q) = qemu_args {
        anyhow::ensure!(
            !q.sizes.is_empty() && !q.rates.is_empty(),
            "--sizes and --rates need at least one value each"
        );
        for &size in q.sizes.iter().chain([&q.converge_size]) {
            anyhow::ensure!(
                size >= 64 << 20 && size.is_multiple_of(1 << 20),
                "sizes must be multiples of 1 MiB, at least 64M"
            );
        }
        let config = qemu_memory::QemuMemoryConfig {
            sizes_bytes: q.sizes,
            rates_mib_per_s: q.rates,
            streams: q.streams as usize,
            downtime_ms: q.downtime_ms,
            qemu_prealloc: q.qemu_prealloc,
            converge: (!q.skip_converge).then_some((q.converge_size, q.converge_rate)),
            defaults_rate_mib_per_s: (!q.skip_defaults).then_some(q.defaults_rate),
            repeat,
            kernel: q.kernel,
            qemu: q.qemu,
        };
        let r = qemu_memory::run(&config).context("qemu benchmark")?;
        if !cli.json {
            qemu_memory::print(&r);
        }
        results.qemu = Some(r);
    }
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}

/// Checks `ferry-bench disk`'s arguments before anything is created.
fn disk_config(d: DiskArgs, repeat: usize) -> anyhow::Result<disk::DiskConfig> {
    use ferry_dataplane::disk::{BLOCK_SIZE, CHUNK_BYTES_MAX};
    use ferry_dataplane::engine::DISK_CHUNK_BYTES_MIN;
    anyhow::ensure!(
        !d.queue_depths.is_empty() && !d.chunks.is_empty(),
        "--queue-depths and --chunks need at least one value each"
    );
    anyhow::ensure!(
        d.disk_size >= 1 << 20 && d.disk_size.is_multiple_of(1 << 20),
        "--disk-size must be a non-zero multiple of 1 MiB"
    );
    for &chunk in &d.chunks {
        anyhow::ensure!(
            (u64::from(DISK_CHUNK_BYTES_MIN)..=CHUNK_BYTES_MAX as u64).contains(&chunk)
                && chunk.is_multiple_of(BLOCK_SIZE as u64),
            "--chunks: {chunk} must be a multiple of 4 KiB in {DISK_CHUNK_BYTES_MIN}..={CHUNK_BYTES_MAX} bytes"
        );
    }
    anyhow::ensure!(
        d.write_seconds.is_finite() && (0.2..=600.0).contains(&d.write_seconds),
        "--write-seconds must be in 0.2..=600"
    );
    Ok(disk::DiskConfig {
        disk_bytes: d.disk_size,
        queue_depths: d.queue_depths,
        chunks_bytes: d.chunks.iter().map(|&c| c as u32).collect(),
        write_rate_mb_per_s: d.write_rate,
        write_seconds: d.write_seconds,
        source_dir: d.dir,
        destination_dir: d.destination_dir,
        repeat,
    })
}
