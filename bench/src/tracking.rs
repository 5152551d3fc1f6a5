//! `ferry-bench tracking`: what kernel dirty tracking costs the guest.
//!
//! An unpaced guest (its vCPUs write pages as fast as they can, uniformly over memory) is
//! measured in alternating windows: without a tracker, and with the uffd-wp tracker started
//! and collected every 100 ms, as pre-copy would. With tracking on, the first write to a
//! page after each collection takes a write-protect fault, and the collecting thread takes
//! CPU from the vCPUs; the ratio of step rates is the price the guest pays.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ferry_dataplane::guest::reference::{Pattern, ReferenceVm, VmSpec};
use ferry_dataplane::guest::Guest;
use ferry_dataplane::memory::tracker::UffdWpTracker;
use ferry_dataplane::memory::DirtyTracker;
use serde::Serialize;

use crate::report::{self, fixed, max, mean, median, Table};

/// How often the tracked window collects, like pre-copy between rounds of a busy guest.
const COLLECT_INTERVAL: Duration = Duration::from_millis(100);

/// Let the guest run this long after boot before the first window.
const WARM_UP: Duration = Duration::from_millis(300);

#[derive(Clone, Debug, Serialize)]
pub struct TrackingConfig {
    pub memory_bytes: u64,
    pub window_s: f64,
    pub vcpus: Vec<u32>,
    pub repeat: usize,
}

/// One measured window.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Window {
    pub tracking: bool,
    pub steps: u64,
    pub elapsed_s: f64,
    pub steps_per_s: f64,
    /// With tracking: every collect() call's duration, and the pages it returned.
    pub collect_us: Vec<f64>,
    pub collect_pages: Vec<usize>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrackingRow {
    pub vcpus: u32,
    pub off_steps_per_s: f64,
    pub on_steps_per_s: f64,
    /// Median of the per-repetition ratios on / off (each pair from the same repetition).
    pub ratio: f64,
    pub collect_us_mean: f64,
    pub collect_us_max: f64,
    pub collect_pages_mean: f64,
    pub windows: Vec<Window>,
}

#[derive(Clone, Debug, Serialize)]
pub struct TrackingResults {
    pub config: TrackingConfig,
    pub rows: Vec<TrackingRow>,
}

pub fn run(config: &TrackingConfig) -> anyhow::Result<TrackingResults> {
    let window = Duration::from_secs_f64(config.window_s);
    let mut rows = Vec::new();
    for &vcpus in &config.vcpus {
        let label = format!(
            "{} unpaced, {vcpus} vCPU",
            report::size(config.memory_bytes)
        );
        eprintln!("[tracking {label}] booting");
        let vm = ReferenceVm::boot(VmSpec {
            name: "bench-tracking".into(),
            memory_bytes: config.memory_bytes,
            vcpus,
            dirty_rate_bytes_per_s: u64::MAX,
            pattern: Pattern::Uniform,
            seed: 7,
            fill_percent: 100,
        })
        .context("booting the tracking guest")?;
        std::thread::sleep(WARM_UP);
        let mut windows = Vec::with_capacity(2 * config.repeat);
        let mut ratios = Vec::with_capacity(config.repeat);
        for rep in 0..config.repeat {
            // Alternate which window goes first.
            let order = if rep % 2 == 0 {
                [false, true]
            } else {
                [true, false]
            };
            let mut pair = [0.0f64; 2];
            for tracking in order {
                let w = measure(&vm, tracking, window)?;
                eprintln!(
                    "[tracking {label}, run {}/{}] tracking {}: {:.0} steps/s{}",
                    rep + 1,
                    config.repeat,
                    if tracking { "on " } else { "off" },
                    w.steps_per_s,
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
                pair[usize::from(tracking)] = w.steps_per_s;
                windows.push(w);
            }
            ratios.push(pair[1] / pair[0]);
        }
        vm.shutdown();
        drop(vm);
        let of = |tracking: bool| windows.iter().filter(move |w| w.tracking == tracking);
        let collects = || of(true).flat_map(|w| w.collect_us.iter().copied());
        rows.push(TrackingRow {
            vcpus,
            off_steps_per_s: median(of(false).map(|w| w.steps_per_s)),
            on_steps_per_s: median(of(true).map(|w| w.steps_per_s)),
            ratio: median(ratios),
            collect_us_mean: mean(collects()),
            collect_us_max: max(collects()),
            collect_pages_mean: mean(
                of(true).flat_map(|w| w.collect_pages.iter().map(|&p| p as f64)),
            ),
            windows,
        });
    }
    Ok(TrackingResults {
        config: config.clone(),
        rows,
    })
}

/// Counts the guest's steps over `window`, with or without a tracker collecting.
fn measure(vm: &ReferenceVm, tracking: bool, window: Duration) -> anyhow::Result<Window> {
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
    drop(tracker);
    w.steps = steps_after - steps_before;
    w.elapsed_s = elapsed.as_secs_f64();
    w.steps_per_s = w.steps as f64 / w.elapsed_s;
    Ok(w)
}

pub fn print(results: &TrackingResults) {
    let c = &results.config;
    println!(
        "## tracking: vCPU step rate with uffd-wp tracking on vs off ({} guest, unpaced, uniform, {} s windows, collect every {} ms, median of {})\n",
        report::size(c.memory_bytes),
        c.window_s,
        COLLECT_INTERVAL.as_millis(),
        c.repeat
    );
    let mut table = Table::new(&[
        "vCPUs",
        "steps/s off",
        "steps/s on",
        "ratio on/off",
        "collect mean us",
        "collect max us",
        "pages per collect",
    ]);
    for row in &results.rows {
        table.row(vec![
            row.vcpus.to_string(),
            fixed(row.off_steps_per_s, 0),
            fixed(row.on_steps_per_s, 0),
            fixed(row.ratio, 3),
            fixed(row.collect_us_mean, 0),
            fixed(row.collect_us_max, 0),
            fixed(row.collect_pages_mean, 0),
        ]);
    }
    print!("{}", table.render());
    println!(
        "\nA step writes one whole 4 KiB page. ratio: median of on/off pairs from the same run (target >= 0.95).\n"
    );
}
