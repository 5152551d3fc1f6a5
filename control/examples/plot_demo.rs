//! Renders the plot of a made-up but realistic migration, to look at what
//! `ferry migrate --plot` draws:
//!
//! ```sh
//! cargo run -p ferry-control --example plot_demo                 # /tmp/ferry-plot-demo.svg
//! cargo run -p ferry-control --example plot_demo -- long out.svg # a 60 s one
//! ```
//!
//! `short` (the default): a 1 GiB disk copied in 500 ms, then 2 GiB of memory in four
//! pre-copy rounds while the guest keeps writing (its disk writes mirrored), the last two
//! rounds throttled, and a 2.6 ms pause. `long`: a 4 GiB disk over a slow link, then 8 GiB
//! of busy memory that takes a dozen rounds and a rising throttle to converge.

use std::path::PathBuf;

use ferry_control::plot::write_svg;
use ferry_dataplane::engine::timeline::{PauseSpan, RoundRecord, Timeline, TimelineSample};
use ferry_dataplane::engine::Phase;
use ferry_dataplane::PAGE_SIZE;

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

/// A migration to make up.
struct Scenario {
    title: &'static str,
    disk_bytes: f64,
    disk_ms: f64,
    memory_bytes: f64,
    /// Memory bandwidth, bytes per ms.
    bandwidth: f64,
    /// What each round leaves dirty, and the throttle it ran under.
    dirty_after: Vec<(f64, u8)>,
    /// Time to collect the dirty set between rounds.
    gap_ms: f64,
    pause_ms: f64,
    /// Guest disk writes mirrored after the copy, bytes per ms.
    mirror_rate: f64,
    /// Time between samples (the recorder's interval, doubled as its buffer fills).
    sample_ms: f64,
}

/// A round as it ran.
struct Plan {
    start_ms: f64,
    end_ms: f64,
    bytes: f64,
    dirty_after: f64,
    throttle_percent: u8,
}

fn short() -> Scenario {
    Scenario {
        title: "ferry migrate vm-demo: 2 GiB memory, 1 GiB disk, TCP × 4",
        disk_bytes: GIB,
        disk_ms: 500.0,
        memory_bytes: 2.0 * GIB,
        bandwidth: 2.45 * GIB / 1e3,
        dirty_after: vec![
            (310.0 * MIB, 0),
            (58.0 * MIB, 0),
            (14.0 * MIB, 20),
            (5.5 * MIB, 40),
        ],
        gap_ms: 1.5,
        pause_ms: 2.6,
        mirror_rate: 40.0 * MIB / 1e3,
        sample_ms: 5.0,
    }
}

fn long() -> Scenario {
    let dirty_mib = [
        2900.0, 2300.0, 1900.0, 1500.0, 1100.0, 700.0, 420.0, 230.0, 110.0, 52.0, 24.0, 9.0,
    ];
    Scenario {
        title: "ferry migrate db-7: 8 GiB busy memory, 4 GiB disk, 1 link",
        disk_bytes: 4.0 * GIB,
        disk_ms: 42_000.0,
        memory_bytes: 8.0 * GIB,
        bandwidth: 1.1 * GIB / 1e3,
        dirty_after: dirty_mib
            .iter()
            .enumerate()
            .map(|(i, &m)| (m * MIB, (i.saturating_sub(3) * 10).min(80) as u8))
            .collect(),
        gap_ms: 12.0,
        pause_ms: 9.4,
        mirror_rate: 90.0 * MIB / 1e3,
        sample_ms: 40.0,
    }
}

fn main() -> std::io::Result<()> {
    let mut args = std::env::args().skip(1).peekable();
    let scenario = match args.peek().map(String::as_str) {
        Some("long") => {
            args.next();
            long()
        }
        Some("short") => {
            args.next();
            short()
        }
        _ => short(),
    };
    let path = args
        .next()
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/tmp/ferry-plot-demo.svg"));
    let timeline = synthesize(&scenario);
    write_svg(&path, &timeline, scenario.title)?;
    println!("{}", path.display());
    Ok(())
}

/// The timeline the recorder would have taken of `s`.
fn synthesize(s: &Scenario) -> Timeline {
    // Each round sends what the one before left dirty.
    let mut plans = Vec::new();
    let mut start_ms = s.disk_ms + s.gap_ms;
    let mut bytes = s.memory_bytes;
    for &(dirty_after, throttle_percent) in &s.dirty_after {
        let end_ms = start_ms + bytes / s.bandwidth;
        plans.push(Plan {
            start_ms,
            end_ms,
            bytes,
            dirty_after,
            throttle_percent,
        });
        start_ms = end_ms + s.gap_ms;
        bytes = dirty_after;
    }
    let pause_start = start_ms + 1.0;
    let pause = PauseSpan {
        start_ms: pause_start,
        end_ms: pause_start + s.pause_ms,
        pages: (bytes / PAGE_SIZE as f64) as u64,
    };
    let final_bytes = bytes;
    let total_ms = pause.end_ms + 2.5;

    // Bytes each lane has sent by `t`, as planned.
    let memory_at = |t: f64| -> f64 {
        let spans = plans
            .iter()
            .map(|p| (p.start_ms, p.end_ms, p.bytes))
            .chain([(pause.start_ms, pause.end_ms, final_bytes)]);
        spans
            .map(|(a, b, bytes)| bytes * ((t - a) / (b - a)).clamp(0.0, 1.0))
            .sum()
    };
    let disk_at = |t: f64| s.disk_bytes * (t / s.disk_ms).clamp(0.0, 1.0);
    let mirror_at = |t: f64| s.mirror_rate * (t.min(pause.start_ms) - s.disk_ms).max(0.0);
    // Rates wobble a little around the plan, as a shared link does.
    let wobble = |t: f64| {
        let t = t / s.sample_ms * 5.0;
        1.0 + 0.04 * (t / 13.7).sin() + 0.03 * (t / 5.3 + 1.0).sin() + 0.02 * (t / 2.1 + 2.0).sin()
    };
    let phase_at = |t: f64| {
        if t < s.disk_ms {
            Phase::DiskCopy
        } else if t < pause.start_ms - 1.0 {
            Phase::MemoryPreCopy
        } else {
            Phase::SwitchOver
        }
    };
    let round_at = |t: f64| plans.iter().rposition(|p| t >= p.start_ms).unwrap_or(0) as u32;

    // Periodic samples, and the forced ones at phase changes and round ends.
    let mut times: Vec<f64> = (0..)
        .map(|i| 0.4 + i as f64 * s.sample_ms)
        .take_while(|&t| t < total_ms)
        .collect();
    times.extend([s.disk_ms, pause.start_ms - 1.0, pause.end_ms, total_ms]);
    times.extend(plans.iter().flat_map(|p| [p.start_ms, p.end_ms]));
    times.sort_by(f64::total_cmp);
    times.dedup();

    let mut samples = Vec::new();
    let (mut memory, mut disk, mut mirror) = (0.0f64, 0.0f64, 0.0f64);
    let mut prev = 0.0;
    for &t in &times {
        let w = wobble(t);
        memory = (memory + (memory_at(t) - memory_at(prev)) * w).min(memory_at(total_ms));
        disk = (disk + (disk_at(t) - disk_at(prev)) * w).min(s.disk_bytes);
        mirror += (mirror_at(t) - mirror_at(prev)) * (2.0 - w);
        // Round and phase ends land exactly on the plan.
        if plans.iter().any(|p| p.end_ms == t) || t == pause.end_ms {
            memory = memory_at(t);
        }
        if t == s.disk_ms {
            disk = s.disk_bytes;
        }
        samples.push(TimelineSample {
            t_ms: t,
            phase: Some(phase_at(t)),
            round: round_at(t),
            memory_bytes: memory as u64,
            disk_copy_bytes: disk as u64,
            disk_mirrored_bytes: mirror as u64,
        });
        prev = t;
    }

    let rounds = plans
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let bandwidth = p.bytes / ((p.end_ms - p.start_ms) / 1e3);
            RoundRecord {
                round: i as u32,
                start_ms: p.start_ms,
                end_ms: p.end_ms,
                pages: (p.bytes / PAGE_SIZE as f64) as u64,
                bytes: p.bytes as u64,
                dirty_pages_after: (p.dirty_after / PAGE_SIZE as f64) as u64,
                bandwidth_bytes_per_s: bandwidth,
                predicted_downtime_ms: p.dirty_after / bandwidth * 1e3,
                throttle_percent: p.throttle_percent,
                ..RoundRecord::default()
            }
        })
        .collect();
    Timeline {
        samples,
        rounds,
        pause: Some(pause),
        total_ms,
    }
}
