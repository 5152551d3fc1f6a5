//! `ferry-bench`: ferry measured against a baseline in the same run.
//!
//! The host is shared and noisy, so no figure here is meant to be read alone: every
//! benchmark runs its subject and its baseline alternately in the same process and reports
//! the ratio, the median over `--repeat` runs.
//!
//! - `memory`: a whole migration (reference VM, uffd-wp tracker, TCP on loopback, verify)
//!   against raw TCP moving the same bytes over the same streams.
//! - `tracking`: the guest's step rate with kernel dirty tracking on against off.
//! - `all`: both, with defaults.
//!
//! Tables go to stdout (`--json` for machine-readable results), progress to stderr.

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use ferry_dataplane::guest::reference::Pattern;
use ferry_dataplane::units::parse_size;
use serde::Serialize;

mod cpu;
mod link;
mod memory;
mod report;
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
    /// Both, with their defaults.
    All,
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
    // Engine warnings (a fail-back, a tracker fallback) matter when reading the numbers.
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();

    let repeat = cli.repeat as usize;
    let (memory_args, tracking_args) = match cli.command {
        Command::Memory(m) => (Some(m), None),
        Command::Tracking(t) => (None, Some(t)),
        Command::All => (Some(MemoryArgs::default()), Some(TrackingArgs::default())),
    };
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
    if cli.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(())
}
