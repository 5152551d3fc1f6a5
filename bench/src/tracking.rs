//! `ferry-bench tracking`: what kernel dirty tracking costs the guest.
//!
//! The guest is measured in alternating windows: without a tracker, and with the uffd-wp
//! tracker started and collected every 100 ms, as pre-copy would. With tracking on, the
//! first write to a page after each collection takes a write-protect fault (resolved by
//! the kernel in the writing vCPU thread), and the collecting thread takes CPU from the
//! vCPUs.
//!
//! Two measurements:
//!
//! - **Unpaced** (one row per pattern and vCPU count): the vCPUs write pages as fast as
//!   they can, so the ratio of step rates on / off is the price a guest that does nothing
//!   but dirty memory pays. With the uniform pattern nearly every step is the first write
//!   to a protected page: the worst case.
//! - **Paced** (one row per dirty rate): the step rate is fixed by the guest's pacing, so
//!   the price shows up as vCPU CPU time, not as steps. The vCPU threads' CPU time (from
//!   `/proc/self/task/<tid>/schedstat`) per step is compared on / off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_dataplane::guest::reference::{Pattern, ReferenceVm, VmSpec};
use ferry_dataplane::guest::Guest;
use ferry_dataplane::memory::tracker::UffdWpTracker;
use ferry_dataplane::memory::{DirtyTracker, PAGE_SIZE};
use serde::Serialize;

use crate::report::{self, fixed, max, mean, median, Table};

/// How often the tracked window collects, like pre-copy between rounds of a busy guest.
const COLLECT_INTERVAL: Duration = Duration::from_millis(100);

/// Let the guest run this long after boot before the first window (and before its vCPU
/// threads are looked up by name, which they set once running).
const WARM_UP: Duration = Duration::from_millis(300);

/// What the reference VM names its vCPU threads (`ferry-vcpu0`, `ferry-vcpu1`, ...).
const VCPU_THREAD_PREFIX: &str = "ferry-vcpu";

#[derive(Clone, Debug, Serialize)]
pub struct TrackingConfig {
    pub memory_bytes: u64,
    pub window_s: f64,
    /// Unpaced rows: every pattern with every vCPU count.
    pub patterns: Vec<Pattern>,
    pub vcpus: Vec<u32>,
    /// Paced rows: one per dirty rate (MiB/s), all with `paced_vcpus` and `paced_pattern`.
    pub rates_mb_per_s: Vec<u64>,
    pub paced_vcpus: u32,
    pub paced_pattern: Pattern,
    pub repeat: usize,
}

/// Where the vCPU threads' CPU time was read from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum CpuClock {
    /// `/proc/<tid>/schedstat`: nanoseconds on CPU.
    #[default]
    Schedstat,
    /// `/proc/<tid>/stat` utime + stime: clock ticks (10 ms), for kernels without
    /// schedstat. Too coarse for the paced rows.
    Stat,
}

/// One measured window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Window {
    pub tracking: bool,
    pub steps: u64,
    pub elapsed_s: f64,
    pub steps_per_s: f64,
    /// CPU time of all vCPU threads together over the window.
    pub vcpu_cpu_s: f64,
    pub vcpu_cpu_us_per_step: f64,
    /// With tracking: every collect() call's duration, and the pages it returned.
    pub collect_us: Vec<f64>,
    pub collect_pages: Vec<usize>,
    /// With tracking: how long re-populating guest memory writable took after the tracker
    /// was dropped (not part of the window).
    pub restore_ms: f64,
}

/// An unpaced guest: step rate on against off.
#[derive(Clone, Debug, Serialize)]
pub struct TrackingRow {
    pub pattern: Pattern,
    pub vcpus: u32,
    pub off_steps_per_s: f64,
    pub on_steps_per_s: f64,
    /// Median of the per-repetition ratios on / off (each pair from the same repetition).
    pub ratio: f64,
    pub off_cpu_us_per_step: f64,
    pub on_cpu_us_per_step: f64,
    pub collect_us_mean: f64,
    pub collect_us_max: f64,
    pub collect_pages_mean: f64,
    pub cpu_clock: CpuClock,
    pub windows: Vec<Window>,
}

/// A paced guest: vCPU CPU time per step on against off.
#[derive(Clone, Debug, Serialize)]
pub struct PacedRow {
    pub rate_mb_per_s: u64,
    pub pattern: Pattern,
    pub vcpus: u32,
    /// What the pacing asks for: rate / page size.
    pub target_steps_per_s: f64,
    pub off_steps_per_s: f64,
    pub on_steps_per_s: f64,
    /// vCPU threads' CPU time per step, all vCPUs together (includes the pacing naps).
    pub off_cpu_us_per_step: f64,
    pub on_cpu_us_per_step: f64,
    /// Median over repetitions of (on - off) CPU per step.
    pub extra_cpu_us_per_step: f64,
    /// Median over repetitions of the extra vCPU CPU per second of the tracked window,
    /// (on - off) per step times the tracked step rate, in cores (1.0 = one whole core).
    pub extra_cpu_cores: f64,
    /// Median over repetitions of (CPU per step off) / (CPU per step on): the step rate a
    /// vCPU bound by exactly this work (steps plus pacing) would keep.
    pub effective_ratio: f64,
    /// 1 / (1 + extra_cpu_cores / vcpus): the speed a guest whose vCPUs are busy all the
    /// time, and dirty memory at this rate, would keep.
    pub busy_guest_ratio: f64,
    pub collect_us_mean: f64,
    pub collect_us_max: f64,
    pub collect_pages_mean: f64,
    pub cpu_clock: CpuClock,
    pub windows: Vec<Window>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrackingResults {
    pub config: TrackingConfig,
    /// Unpaced rows.
    pub rows: Vec<TrackingRow>,
    pub paced: Vec<PacedRow>,
}

/// One repetition: the untracked and the tracked window.
struct Pair {
    off: Window,
    on: Window,
}

/// A booted guest whose vCPU threads have been found.
struct Subject {
    vm: ReferenceVm,
    threads: VcpuThreads,
    label: String,
}

impl Subject {
    fn boot(
        memory_bytes: u64,
        vcpus: u32,
        pattern: Pattern,
        dirty_rate_bytes_per_s: u64,
        label: String,
    ) -> anyhow::Result<Self> {
        eprintln!("[tracking {label}] booting");
        let vm = ReferenceVm::boot(VmSpec {
            name: "bench-tracking".into(),
            memory_bytes,
            vcpus,
            dirty_rate_bytes_per_s,
            pattern,
            seed: 7,
            fill_percent: 100,
            disk: None,
        })
        .context("booting the tracking guest")?;
        std::thread::sleep(WARM_UP);
        let threads = VcpuThreads::find(vcpus)?;
        Ok(Self { vm, threads, label })
    }

    /// `repeat` pairs of windows, alternating which goes first.
    fn alternate(&self, window: Duration, repeat: usize) -> anyhow::Result<Vec<Pair>> {
        let mut pairs = Vec::with_capacity(repeat);
        for rep in 0..repeat {
            let order = if rep % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            let mut got: [Option<Window>; 2] = [None, None];
            for tracking in order {
                let w = measure(&self.vm, &self.threads, tracking, window)?;
                eprintln!(
                    "[tracking {}, run {}/{repeat}] tracking {}: {:.0} steps/s, vCPU {} us/step{}",
                    self.label,
                    rep + 1,
                    if tracking { "on " } else { "off" },
                    w.steps_per_s,
                    fixed(w.vcpu_cpu_us_per_step, 3),
                    if tracking {
                        format!(
                            ", {} collects, mean {} us, max {} us",
                            w.collect_us.len(),
                            fixed(mean(w.collect_us.iter().copied()), 0),
                            fixed(max(w.collect_us.iter().copied()), 0)
                        )
                    } else {
                        String::new()
                    }
                );
                got[usize::from(tracking)] = Some(w);
            }
            let [Some(off), Some(on)] = got else {
                unreachable!("both windows of a pair are measured");
            };
            pairs.push(Pair { off, on });
        }
        Ok(pairs)
    }

    fn finish(self) {
        self.vm.shutdown();
    }
}

/// Collect statistics over the tracked windows of `pairs`: mean and max us, mean pages.
fn collect_stats(pairs: &[Pair]) -> (f64, f64, f64) {
    let us = || pairs.iter().flat_map(|p| p.on.collect_us.iter().copied());
    let pages = pairs
        .iter()
        .flat_map(|p| p.on.collect_pages.iter().map(|&n| n as f64));
    (mean(us()), max(us()), mean(pages))
}

fn windows_of(pairs: Vec<Pair>) -> Vec<Window> {
    pairs.into_iter().flat_map(|p| [p.off, p.on]).collect()
}

pub fn run(config: &TrackingConfig) -> anyhow::Result<TrackingResults> {
    let window = Duration::from_secs_f64(config.window_s);
    let size = report::size(config.memory_bytes);
    let mut rows = Vec::new();
    for &pattern in &config.patterns {
        for &vcpus in &config.vcpus {
            let subject = Subject::boot(
                config.memory_bytes,
                vcpus,
                pattern,
                u64::MAX,
                format!("{size} unpaced {pattern}, {vcpus} vCPU"),
            )?;
            let pairs = subject.alternate(window, config.repeat)?;
            let cpu_clock = subject.threads.clock;
            subject.finish();
            let (collect_us_mean, collect_us_max, collect_pages_mean) = collect_stats(&pairs);
            rows.push(TrackingRow {
                pattern,
                vcpus,
                off_steps_per_s: median(pairs.iter().map(|p| p.off.steps_per_s)),
                on_steps_per_s: median(pairs.iter().map(|p| p.on.steps_per_s)),
                ratio: median(pairs.iter().map(|p| p.on.steps_per_s / p.off.steps_per_s)),
                off_cpu_us_per_step: median(pairs.iter().map(|p| p.off.vcpu_cpu_us_per_step)),
                on_cpu_us_per_step: median(pairs.iter().map(|p| p.on.vcpu_cpu_us_per_step)),
                collect_us_mean,
                collect_us_max,
                collect_pages_mean,
                cpu_clock,
                windows: windows_of(pairs),
            });
        }
    }

    let mut paced = Vec::new();
    let (vcpus, pattern) = (config.paced_vcpus, config.paced_pattern);
    for &rate in &config.rates_mb_per_s {
        let rate_bytes = rate << 20;
        let subject = Subject::boot(
            config.memory_bytes,
            vcpus,
            pattern,
            rate_bytes,
            format!("{size} paced {rate} MB/s {pattern}, {vcpus} vCPU"),
        )?;
        let pairs = subject.alternate(window, config.repeat)?;
        let cpu_clock = subject.threads.clock;
        subject.finish();
        let (collect_us_mean, collect_us_max, collect_pages_mean) = collect_stats(&pairs);
        let extra = |p: &Pair| p.on.vcpu_cpu_us_per_step - p.off.vcpu_cpu_us_per_step;
        let extra_cpu_cores = median(pairs.iter().map(|p| extra(p) * p.on.steps_per_s / 1e6));
        paced.push(PacedRow {
            rate_mb_per_s: rate,
            pattern,
            vcpus,
            target_steps_per_s: rate_bytes as f64 / PAGE_SIZE as f64,
            off_steps_per_s: median(pairs.iter().map(|p| p.off.steps_per_s)),
            on_steps_per_s: median(pairs.iter().map(|p| p.on.steps_per_s)),
            off_cpu_us_per_step: median(pairs.iter().map(|p| p.off.vcpu_cpu_us_per_step)),
            on_cpu_us_per_step: median(pairs.iter().map(|p| p.on.vcpu_cpu_us_per_step)),
            extra_cpu_us_per_step: median(pairs.iter().map(extra)),
            extra_cpu_cores,
            effective_ratio: median(
                pairs
                    .iter()
                    .map(|p| p.off.vcpu_cpu_us_per_step / p.on.vcpu_cpu_us_per_step),
            ),
            busy_guest_ratio: 1.0 / (1.0 + extra_cpu_cores / f64::from(vcpus)),
            collect_us_mean,
            collect_us_max,
            collect_pages_mean,
            cpu_clock,
            windows: windows_of(pairs),
        });
    }
    Ok(TrackingResults {
        config: config.clone(),
        rows,
        paced,
    })
}

/// The guest's vCPU threads, found by name under `/proc/self/task`.
struct VcpuThreads {
    tids: Vec<u32>,
    clock: CpuClock,
}

impl VcpuThreads {
    /// Finds exactly `vcpus` threads named `ferry-vcpu*` (the bench runs one guest at a
    /// time, and the previous one's threads were joined at its shutdown).
    fn find(vcpus: u32) -> anyhow::Result<Self> {
        let mut tids = Vec::new();
        for entry in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
            let entry = entry.context("listing /proc/self/task")?;
            let Some(tid) = entry
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<u32>().ok())
            else {
                continue;
            };
            // A thread may exit between the listing and this read; it is then not ours.
            let Ok(comm) = std::fs::read_to_string(entry.path().join("comm")) else {
                continue;
            };
            if comm.trim_end().starts_with(VCPU_THREAD_PREFIX) {
                tids.push(tid);
            }
        }
        anyhow::ensure!(
            tids.len() == vcpus as usize,
            "found {} threads named {VCPU_THREAD_PREFIX}*, expected {vcpus}",
            tids.len()
        );
        let clock = if std::fs::metadata(format!("/proc/self/task/{}/schedstat", tids[0])).is_ok() {
            CpuClock::Schedstat
        } else {
            eprintln!("[tracking] no /proc/<tid>/schedstat: vCPU CPU time has 10 ms resolution");
            CpuClock::Stat
        };
        Ok(Self { tids, clock })
    }

    /// CPU time (user + system) of all the vCPU threads so far.
    fn cpu(&self) -> anyhow::Result<Duration> {
        let mut total = Duration::ZERO;
        for &tid in &self.tids {
            total += thread_cpu(tid, self.clock)?;
        }
        Ok(total)
    }
}

fn thread_cpu(tid: u32, clock: CpuClock) -> anyhow::Result<Duration> {
    match clock {
        CpuClock::Schedstat => {
            // "<ns on CPU> <ns waiting on a runqueue> <timeslices>"
            let path = format!("/proc/self/task/{tid}/schedstat");
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            let ns = text
                .split_whitespace()
                .next()
                .and_then(|f| f.parse::<u64>().ok())
                .with_context(|| format!("parsing {path}: {text:?}"))?;
            Ok(Duration::from_nanos(ns))
        }
        CpuClock::Stat => {
            // Fields after the parenthesised comm start at field 3 (state); utime and
            // stime are fields 14 and 15, in USER_HZ ticks (100 per second on Linux).
            let path = format!("/proc/self/task/{tid}/stat");
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
            let fields: Vec<&str> = text
                .rsplit_once(')')
                .map(|(_, rest)| rest.split_whitespace().collect())
                .unwrap_or_default();
            let tick = |i: usize| fields.get(i).and_then(|f| f.parse::<u64>().ok());
            let (Some(utime), Some(stime)) = (tick(11), tick(12)) else {
                anyhow::bail!("parsing {path}: {text:?}");
            };
            Ok(Duration::from_millis((utime + stime) * 10))
        }
    }
}

/// Counts the guest's steps and its vCPUs' CPU time over `window`, with or without a
/// tracker collecting.
fn measure(
    vm: &ReferenceVm,
    threads: &VcpuThreads,
    tracking: bool,
    window: Duration,
) -> anyhow::Result<Window> {
    let mut w = Window {
        tracking,
        ..Default::default()
    };
    // Registered per window and dropped (unregistered) at its end, so the untracked window
    // really runs without write protection.
    let mut tracker = if tracking {
        let mut t = UffdWpTracker::new(Arc::clone(vm.memory()))
            .context("registering the uffd-wp tracker")?;
        t.start().context("starting the tracker")?;
        Some(t)
    } else {
        None
    };
    let cpu_before = threads.cpu()?;
    let steps_before = vm.status().total_steps;
    let started = Instant::now();
    let end = started + window;
    let mut next = started + COLLECT_INTERVAL;
    while next <= end {
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        if let Some(t) = tracker.as_mut() {
            let t0 = Instant::now();
            let dirty = t.collect().context("collecting dirty pages")?;
            w.collect_us.push(t0.elapsed().as_secs_f64() * 1e6);
            w.collect_pages.push(dirty.count());
        }
        next += COLLECT_INTERVAL;
    }
    std::thread::sleep(end.saturating_duration_since(Instant::now()));
    let steps_after = vm.status().total_steps;
    let elapsed = started.elapsed();
    let cpu_after = threads.cpu()?;
    if let Some(t) = tracker {
        drop(t);
        // Unregistering leaves the pages that were protected at that moment mapped
        // read-only, so without this the next untracked window would pay a (non-uffd)
        // write fault on the first write to each of them, and look like tracking. Making
        // every mapping writable again here, outside the measured time, keeps that out of
        // the untracked window: it costs a migration once, at the end, not per write.
        w.restore_ms = vm
            .memory()
            .prefault()
            .context("making guest memory writable again after tracking")?
            .as_secs_f64()
            * 1e3;
    }
    w.steps = steps_after - steps_before;
    w.elapsed_s = elapsed.as_secs_f64();
    w.steps_per_s = w.steps as f64 / w.elapsed_s;
    w.vcpu_cpu_s = cpu_after.saturating_sub(cpu_before).as_secs_f64();
    w.vcpu_cpu_us_per_step = if w.steps == 0 {
        f64::NAN
    } else {
        w.vcpu_cpu_s * 1e6 / w.steps as f64
    };
    Ok(w)
}

pub fn print(results: &TrackingResults) {
    let c = &results.config;
    let size = report::size(c.memory_bytes);
    if !results.rows.is_empty() {
        println!(
            "## tracking, unpaced: vCPU step rate with uffd-wp tracking on vs off ({size} guest, {} s windows, collect every {} ms, median of {})\n",
            c.window_s,
            COLLECT_INTERVAL.as_millis(),
            c.repeat
        );
        let mut table = Table::new(&[
            "pattern",
            "vCPUs",
            "steps/s off",
            "steps/s on",
            "ratio on/off",
            "vCPU CPU us/step off",
            "vCPU CPU us/step on",
            "collect mean us",
            "collect max us",
            "pages per collect",
        ]);
        for row in &results.rows {
            table.row(vec![
                row.pattern.to_string(),
                row.vcpus.to_string(),
                fixed(row.off_steps_per_s, 0),
                fixed(row.on_steps_per_s, 0),
                fixed(row.ratio, 3),
                fixed(row.off_cpu_us_per_step, 3),
                fixed(row.on_cpu_us_per_step, 3),
                fixed(row.collect_us_mean, 0),
                fixed(row.collect_us_max, 0),
                fixed(row.collect_pages_mean, 0),
            ]);
        }
        print!("{}", table.render());
        println!(
            "\nA step writes one whole 4 KiB page, as fast as the vCPU can. ratio: median of on/off pairs from the same run (target >= 0.95). \
             hotset: 90 % of writes to 10 % of the pages; sweep: every page in turn. \
             vCPU CPU us/step: CPU time of all vCPU threads over the window / steps.\n"
        );
    }
    if !results.paced.is_empty() {
        println!(
            "## tracking, paced: vCPU CPU per step with uffd-wp tracking on vs off ({size} guest, {}, {} vCPUs, {} s windows, collect every {} ms, median of {})\n",
            c.paced_pattern,
            c.paced_vcpus,
            c.window_s,
            COLLECT_INTERVAL.as_millis(),
            c.repeat
        );
        let mut table = Table::new(&[
            "MB/s",
            "steps/s target",
            "steps/s off",
            "steps/s on",
            "vCPU CPU us/step off",
            "vCPU CPU us/step on",
            "extra us/step",
            "extra CPU % of a core",
            "effective ratio",
            "busy-guest ratio",
            "collect mean us",
            "collect max us",
            "pages per collect",
        ]);
        for row in &results.paced {
            table.row(vec![
                row.rate_mb_per_s.to_string(),
                fixed(row.target_steps_per_s, 0),
                fixed(row.off_steps_per_s, 0),
                fixed(row.on_steps_per_s, 0),
                fixed(row.off_cpu_us_per_step, 3),
                fixed(row.on_cpu_us_per_step, 3),
                fixed(row.extra_cpu_us_per_step, 3),
                fixed(row.extra_cpu_cores * 100.0, 2),
                fixed(row.effective_ratio, 3),
                fixed(row.busy_guest_ratio, 3),
                fixed(row.collect_us_mean, 0),
                fixed(row.collect_us_max, 0),
                fixed(row.collect_pages_mean, 0),
            ]);
        }
        print!("{}", table.render());
        println!(
            "\nMB/s are MiB/s over all vCPUs; the pacing fixes the step rate, so the cost is vCPU CPU time (all vCPU threads, from /proc schedstat, pacing naps included). \
             extra CPU: (on - off) us/step x steps/s on, in % of one core. \
             effective ratio: us/step off / us/step on, the step rate a vCPU bound by this work would keep. \
             busy-guest ratio: 1 / (1 + extra CPU per vCPU), the speed a guest whose vCPUs are always busy would keep while dirtying memory at this rate.\n"
        );
    }
}
