//! `ferry-bench qemu`: ferry's memory migration side by side with QEMU's, and both against
//! a raw two-process TCP push, in the same run (issue 6).
//!
//! - QEMU ([`qemu_vm`]): a TCG guest whose /init is `bench/guest/dirty.c` ([`guest`]) fills
//!   M MiB with non-zero data and dirties R MiB/s; migrated QEMU to QEMU over loopback
//!   with multifd (channels = ferry's streams), the same downtime limit, no bandwidth cap,
//!   the destination's RAM preallocated.
//! - ferry ([`ferry_vm`]): two real `ferry agent` processes and the CLI, a reference VM of
//!   the same M and R (one vCPU), `ferry migrate --streams N --downtime-ms D`, verified on
//!   the destination.
//! - raw ([`raw_push`]): M bytes over N streams between two processes, nothing else.
//!
//! Runs alternate (QEMU then ferry, ferry then QEMU, …); the raw push runs once per size
//! per repetition. Then the convergence row (M = 4G, R = 1000 MB/s by default) and the
//! out-of-the-box pair (QEMU with every migration default against `ferry migrate` with no
//! flags; QEMU's destination RAM still preallocated, so both destinations start alike).
//! CPU is both sides' processes minus their vCPU threads ([`proc_cpu`]).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use serde::Serialize;

use crate::report::{self, fixed, median};

mod cleanup;
mod ferry_vm;
mod guest;
mod proc_cpu;
mod qemu_vm;
pub mod raw_push;
mod tables;

pub use tables::print;

use ferry_vm::{FerryContext, FerryMode, FerrySample};
use qemu_vm::{QemuContext, QemuMode, QemuSample};
use raw_push::RawSample;

const GIB: f64 = (1u64 << 30) as f64;
const QEMU: &str = "qemu-system-x86_64";

pub struct QemuMemoryConfig {
    pub sizes_bytes: Vec<u64>,
    pub rates_mib_per_s: Vec<u64>,
    pub streams: usize,
    pub downtime_ms: u64,
    /// Preallocate the tuned QEMU destination's RAM (off: it faults pages in as they land,
    /// like a ferry destination that allocates on write).
    pub qemu_prealloc: bool,
    /// The convergence row: (size, dirty rate), or None to skip it.
    pub converge: Option<(u64, u64)>,
    /// The out-of-the-box pair at this dirty rate for every size, or None to skip it.
    pub defaults_rate_mib_per_s: Option<u64>,
    pub repeat: usize,
    pub kernel: Option<PathBuf>,
    pub qemu: Option<PathBuf>,
}

/// One (size, rate) of QEMU against ferry: every run, and the medians.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PairRow {
    pub size_bytes: u64,
    pub rate_mib_per_s: u64,
    pub qemu: Vec<QemuSample>,
    pub ferry: Vec<FerrySample>,
    pub medians: PairMedians,
}

/// Medians over each side's successful runs; ratios over the repetitions where both
/// sides (and the raw push, for its ratio) succeeded, the median of the per-run ratios.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PairMedians {
    pub qemu_total_ms: f64,
    pub qemu_downtime_ms: f64,
    pub qemu_reported_downtime_ms: f64,
    pub qemu_bytes_per_s: f64,
    pub qemu_cpu_s_per_gib: f64,
    pub qemu_guest_rate_before: f64,
    pub qemu_guest_rate_during: f64,
    pub qemu_dirty_sync_count: f64,
    pub qemu_throttle_percent_max: f64,
    pub ferry_total_ms: f64,
    pub ferry_same_state_ms: f64,
    pub ferry_downtime_ms: f64,
    pub ferry_bytes_per_s: f64,
    pub ferry_cpu_s_per_gib: f64,
    pub ferry_same_state_cpu_s_per_gib: f64,
    pub ferry_rounds: f64,
    pub ferry_throttle_percent_max: f64,
    pub raw_bytes_per_s: f64,
    pub raw_cpu_s_per_gib: f64,
    /// ferry / QEMU throughput.
    pub throughput_ratio: f64,
    /// ferry / raw push throughput.
    pub raw_ratio: f64,
    /// ferry same-state CPU per GiB / QEMU's.
    pub cpu_ratio: f64,
    /// ferry / QEMU guest-visible downtime.
    pub downtime_ratio: f64,
    /// QEMU total / ferry same-state total (tuned), or / ferry total (out of the box).
    pub total_ratio: f64,
    /// QEMU total / ferry same-state total (in every table).
    pub same_state_ratio: f64,
}

/// The raw push of one size, one sample per repetition.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RawRow {
    pub size_bytes: u64,
    pub samples: Vec<RawSample>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct QemuMemoryResults {
    pub qemu_version: String,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    pub streams: usize,
    pub downtime_ms: u64,
    pub qemu_prealloc: bool,
    pub repeat: usize,
    pub rows: Vec<PairRow>,
    pub raw: Vec<RawRow>,
    pub converge: Option<PairRow>,
    pub defaults: Vec<PairRow>,
    pub plots_dir: PathBuf,
    pub elapsed_s: f64,
}

/// A file's modification time, as seconds since the epoch (to tell builds apart).
fn modified(path: &std::path::Path) -> String {
    std::fs::metadata(path)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or("?".to_string(), |d| format!("at unix time {}", d.as_secs()))
}

/// `ferry-bench raw-receive`.
pub fn raw_receive(bytes: u64, streams: usize) -> anyhow::Result<()> {
    raw_push::receive_main(bytes, streams)
}

pub fn run(config: &QemuMemoryConfig) -> anyhow::Result<QemuMemoryResults> {
    let started = Instant::now();
    cleanup::install()?;
    let binary = match &config.qemu {
        Some(path) => path.clone(),
        None => crate::qmp::on_path(QEMU).with_context(|| {
            format!("{QEMU} is not installed: apt-get install qemu-system-x86 (./dev bench installs it)")
        })?,
    };
    let version = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.lines().next().map(str::to_string))
        .unwrap_or_default();
    let ferry = ferry_vm::find_ferry()?;
    let kernel = guest::find_kernel(config.kernel.as_deref())?;
    let files = guest::build(kernel)?;
    let scratch = std::env::temp_dir().join(format!("ferry-bench-qemu-{}", std::process::id()));
    std::fs::create_dir_all(&scratch)?;
    let _remove_scratch = cleanup::RemovedDir::new(scratch.clone());
    let plots = guest::target_dir()?.join("ferry-bench-plots");
    std::fs::create_dir_all(&plots)?;
    let qemu = QemuContext {
        binary,
        files: files.clone(),
        scratch: scratch.clone(),
    };
    // The workspace is shared and `target/release/ferry` may be rebuilt while this runs:
    // every ferry run uses one snapshot of it, taken now.
    let snapshot = scratch.join("ferry");
    std::fs::copy(&ferry, &snapshot)
        .with_context(|| format!("copying {} to {}", ferry.display(), snapshot.display()))?;
    eprintln!(
        "[qemu] ferry: {} (modified {}), run from a copy taken now",
        ferry.display(),
        modified(&ferry)
    );
    let ferry = FerryContext {
        binary: snapshot,
        scratch: scratch.clone(),
        plots: plots.clone(),
    };
    eprintln!(
        "[qemu] {version}; kernel {}; {} streams, downtime {} ms, {} run(s) per pair",
        files.kernel.display(),
        config.streams,
        config.downtime_ms,
        config.repeat
    );
    let tuned_qemu = QemuMode::Tuned {
        streams: config.streams,
        downtime_ms: config.downtime_ms,
        prealloc: config.qemu_prealloc,
    };
    let tuned_ferry = FerryMode::Tuned {
        streams: config.streams,
        downtime_ms: config.downtime_ms,
    };

    let mut rows: Vec<PairRow> = config
        .sizes_bytes
        .iter()
        .flat_map(|&size_bytes| {
            config
                .rates_mib_per_s
                .iter()
                .map(move |&rate_mib_per_s| PairRow {
                    size_bytes,
                    rate_mib_per_s,
                    ..Default::default()
                })
        })
        .collect();
    let mut raw: Vec<RawRow> = config
        .sizes_bytes
        .iter()
        .map(|&size_bytes| RawRow {
            size_bytes,
            samples: Vec::new(),
        })
        .collect();
    let modes = (tuned_qemu, tuned_ferry);
    for rep in 0..config.repeat {
        for (s, raw_row) in raw.iter_mut().enumerate() {
            let size = raw_row.size_bytes;
            let sample = raw_push::push(size, config.streams, rep as u64 + 1, &scratch);
            eprintln!(
                "[qemu {} raw, run {}/{}] {}",
                report::size(size),
                rep + 1,
                config.repeat,
                match &sample.error {
                    None => format!(
                        "{} GiB/s, {} CPU s/GiB",
                        fixed(sample.bytes_per_s / GIB, 2),
                        fixed(sample.cpu_s_per_gib, 2)
                    ),
                    Some(e) => format!("FAILED: {e}"),
                }
            );
            raw_row.samples.push(sample);
            let per_size = config.rates_mib_per_s.len();
            for (r, row) in rows[s * per_size..(s + 1) * per_size]
                .iter_mut()
                .enumerate()
            {
                pair(
                    &qemu,
                    &ferry,
                    row,
                    rep,
                    config.repeat,
                    (rep + s + r) % 2 == 0,
                    modes,
                    "",
                );
            }
        }
    }
    for row in &mut rows {
        let raw_samples = raw
            .iter()
            .find(|r| r.size_bytes == row.size_bytes)
            .map(|r| r.samples.as_slice());
        row.medians = medians(row, raw_samples, false);
    }

    let converge = config.converge.map(|(size_bytes, rate_mib_per_s)| {
        let mut row = PairRow {
            size_bytes,
            rate_mib_per_s,
            ..Default::default()
        };
        for rep in 0..config.repeat {
            pair(
                &qemu,
                &ferry,
                &mut row,
                rep,
                config.repeat,
                rep % 2 == 0,
                modes,
                "converge-",
            );
        }
        row.medians = medians(&row, None, false);
        row
    });

    let mut defaults = Vec::new();
    if let Some(rate_mib_per_s) = config.defaults_rate_mib_per_s {
        defaults = config
            .sizes_bytes
            .iter()
            .map(|&size_bytes| PairRow {
                size_bytes,
                rate_mib_per_s,
                ..Default::default()
            })
            .collect();
        for rep in 0..config.repeat {
            for (s, row) in defaults.iter_mut().enumerate() {
                pair(
                    &qemu,
                    &ferry,
                    row,
                    rep,
                    config.repeat,
                    (rep + s) % 2 == 0,
                    (QemuMode::Defaults, FerryMode::Defaults),
                    "defaults-",
                );
            }
        }
        for row in &mut defaults {
            row.medians = medians(row, None, true);
        }
    }

    Ok(QemuMemoryResults {
        qemu_version: version,
        kernel: files.kernel,
        initramfs: files.initramfs,
        streams: config.streams,
        downtime_ms: config.downtime_ms,
        qemu_prealloc: config.qemu_prealloc,
        repeat: config.repeat,
        rows,
        raw,
        converge,
        defaults,
        plots_dir: plots,
        elapsed_s: started.elapsed().as_secs_f64(),
    })
}

/// One repetition of a pair, in the order given, appended to `row`.
#[allow(clippy::too_many_arguments)]
fn pair(
    qemu: &QemuContext,
    ferry: &FerryContext,
    row: &mut PairRow,
    rep: usize,
    repeat: usize,
    qemu_first: bool,
    (qemu_mode, ferry_mode): (QemuMode, FerryMode),
    kind: &str,
) {
    let (size, rate) = (report::size(row.size_bytes), row.rate_mib_per_s);
    let tag = format!("{kind}{size}-{rate}-{}", rep + 1);
    let seed = rep as u64 + 1;
    let run_qemu = || {
        let s = qemu_vm::migrate_once(qemu, row.size_bytes, rate, seed, qemu_mode, &tag);
        eprintln!(
            "[qemu {kind}{size} {rate} MB/s, run {}/{repeat}] QEMU: {}",
            rep + 1,
            match &s.error {
                None => format!(
                    "total {} ms, downtime {} ms (QEMU says {}), {} GiB/s, {} CPU s/GiB, \
                     {} syncs, throttle {} %, guest {}/{} MiB/s, boot {} ms",
                    fixed(s.total_ms, 0),
                    fixed(s.downtime_ms, 1),
                    fixed(s.reported_downtime_ms, 0),
                    fixed(s.bytes_per_s / GIB, 2),
                    fixed(s.cpu_s_per_gib, 2),
                    s.dirty_sync_count,
                    s.throttle_percent_max,
                    fixed(s.guest_rate_before, 0),
                    fixed(s.guest_rate_during, 0),
                    fixed(s.boot_ms, 0)
                ),
                Some(e) => format!("FAILED: {e}"),
            }
        );
        s
    };
    let plot_title = format!("ferry-{size}-{rate}-{kind}{}", rep + 1);
    let run_ferry = || {
        let s = ferry_vm::migrate_once(
            ferry,
            row.size_bytes,
            rate,
            seed,
            ferry_mode,
            &tag,
            &plot_title,
        );
        eprintln!(
            "[qemu {kind}{size} {rate} MB/s, run {}/{repeat}] ferry: {}",
            rep + 1,
            match &s.error {
                None => format!(
                    "total {} ms (same-state {}; prefault {}, trace {}, pre-copy from {}), downtime {} ms, \
                     {} GiB/s (rounds {}), {} CPU s/GiB (same-state {}), {} rounds, throttle {} %, {}",
                    fixed(s.total_ms, 0),
                    fixed(s.same_state_ms, 0),
                    fixed(s.prefault_ms, 0),
                    fixed(s.trace_ms, 0),
                    fixed(s.precopy_start_ms, 0),
                    fixed(s.downtime_ms, 1),
                    fixed(s.migration_bytes_per_s / GIB, 2),
                    fixed(s.bytes_per_s / GIB, 2),
                    fixed(s.cpu_s_per_gib, 2),
                    fixed(s.same_state_cpu_s_per_gib, 2),
                    s.rounds,
                    s.throttle_percent_max,
                    s.stop_reason
                ),
                Some(e) => format!("FAILED: {e}"),
            }
        );
        s
    };
    if qemu_first {
        let q = run_qemu();
        let f = run_ferry();
        row.qemu.push(q);
        row.ferry.push(f);
    } else {
        let f = run_ferry();
        let q = run_qemu();
        row.qemu.push(q);
        row.ferry.push(f);
    }
}

fn medians(row: &PairRow, raw: Option<&[RawSample]>, out_of_the_box: bool) -> PairMedians {
    let qemu_ok: Vec<&QemuSample> = row.qemu.iter().filter(|s| s.error.is_none()).collect();
    let ferry_ok: Vec<&FerrySample> = row.ferry.iter().filter(|s| s.error.is_none()).collect();
    let q = |f: fn(&QemuSample) -> f64| median(qemu_ok.iter().map(|s| f(s)));
    let fe = |f: fn(&FerrySample) -> f64| median(ferry_ok.iter().map(|s| f(s)));
    let pairs: Vec<(&QemuSample, &FerrySample, usize)> = row
        .qemu
        .iter()
        .zip(&row.ferry)
        .enumerate()
        .filter(|(_, (q, f))| q.error.is_none() && f.error.is_none())
        .map(|(i, (q, f))| (q, f, i))
        .collect();
    let ratio = |f: &dyn Fn(&QemuSample, &FerrySample) -> f64| {
        median(pairs.iter().map(|(q, fe, _)| f(q, fe)))
    };
    let raw_ok = |i: usize| raw.and_then(|r| r.get(i)).filter(|r| r.error.is_none());
    let raw_median = |f: fn(&RawSample) -> f64| {
        median(
            raw.unwrap_or_default()
                .iter()
                .filter(|r| r.error.is_none())
                .map(f),
        )
    };
    PairMedians {
        qemu_total_ms: q(|s| s.total_ms),
        qemu_downtime_ms: q(|s| s.downtime_ms),
        qemu_reported_downtime_ms: q(|s| s.reported_downtime_ms),
        qemu_bytes_per_s: q(|s| s.bytes_per_s),
        qemu_cpu_s_per_gib: q(|s| s.cpu_s_per_gib),
        qemu_guest_rate_before: q(|s| s.guest_rate_before),
        qemu_guest_rate_during: q(|s| s.guest_rate_during),
        qemu_dirty_sync_count: q(|s| s.dirty_sync_count as f64),
        qemu_throttle_percent_max: q(|s| s.throttle_percent_max as f64),
        ferry_total_ms: fe(|s| s.total_ms),
        ferry_same_state_ms: fe(|s| s.same_state_ms),
        ferry_downtime_ms: fe(|s| s.downtime_ms),
        ferry_bytes_per_s: fe(|s| s.migration_bytes_per_s),
        ferry_cpu_s_per_gib: fe(|s| s.cpu_s_per_gib),
        ferry_same_state_cpu_s_per_gib: fe(|s| s.same_state_cpu_s_per_gib),
        ferry_rounds: fe(|s| s.rounds as f64),
        ferry_throttle_percent_max: fe(|s| s.throttle_percent_max as f64),
        raw_bytes_per_s: raw_median(|r| r.bytes_per_s),
        raw_cpu_s_per_gib: raw_median(|r| r.cpu_s_per_gib),
        throughput_ratio: ratio(&|q, f| f.migration_bytes_per_s / q.bytes_per_s),
        raw_ratio: median(
            row.ferry
                .iter()
                .enumerate()
                .filter(|(_, f)| f.error.is_none())
                .filter_map(|(i, f)| raw_ok(i).map(|r| f.migration_bytes_per_s / r.bytes_per_s)),
        ),
        cpu_ratio: if out_of_the_box {
            ratio(&|q, f| f.cpu_s_per_gib / q.cpu_s_per_gib)
        } else {
            ratio(&|q, f| f.same_state_cpu_s_per_gib / q.cpu_s_per_gib)
        },
        downtime_ratio: ratio(&|q, f| f.downtime_ms / q.downtime_ms),
        same_state_ratio: ratio(&|q, f| q.total_ms / f.same_state_ms),
        total_ratio: if out_of_the_box {
            ratio(&|q, f| q.total_ms / f.total_ms)
        } else {
            ratio(&|q, f| q.total_ms / f.same_state_ms)
        },
    }
}
