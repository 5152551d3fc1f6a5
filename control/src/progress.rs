//! A migration as a person watches it: the live progress bar and the final report.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ferry_dataplane::engine::{DiskProgress, DiskReport, MigrationReport, Phase, Progress};
use ferry_dataplane::units::{format_bytes, format_rate};
use ferry_dataplane::PAGE_SIZE;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output::{format_latency, format_ms};

/// Redraws per second at most.
const REDRAW_HZ: u8 = 10;

/// Runs `work` under a spinner saying `what` (on stderr, hidden when stderr is not a
/// terminal or when `quiet`): for calls that take seconds, such as booting a 16 GiB guest
/// or verifying it.
pub fn with_spinner<T>(what: &str, quiet: bool, work: impl FnOnce() -> T) -> T {
    if quiet {
        return work();
    }
    let spinner =
        ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(REDRAW_HZ));
    spinner.set_style(
        ProgressStyle::with_template("{spinner:.green} {msg} {elapsed}")
            .expect("the template is valid"),
    );
    spinner.set_message(what.to_string());
    spinner.enable_steady_tick(Duration::from_millis(100));
    let result = work();
    spinner.finish_and_clear();
    result
}

/// The live view of one migration, drawn on stderr (hidden when stderr is not a terminal).
/// Clones draw on the same bar.
///
/// The bar counts the disks' bytes during their bulk copy (the line above it has one entry
/// per disk), then the pages of the current pre-copy round.
#[derive(Clone)]
pub struct ProgressView {
    bar: ProgressBar,
    /// The bar counts disk bytes (its style says so).
    counting_disk: Arc<AtomicBool>,
}

fn bar_style(disk: bool) -> ProgressStyle {
    let template = if disk {
        "{spinner:.green} {prefix:.bold} {msg}\n  [{bar:40.cyan/blue}] {bytes}/{total_bytes} of disk copied in bulk"
    } else {
        "{spinner:.green} {prefix:.bold} {msg}\n  [{bar:40.cyan/blue}] {pos}/{len} pages in this round"
    };
    ProgressStyle::with_template(template)
        .expect("the template is valid")
        .progress_chars("=> ")
}

impl ProgressView {
    pub fn new(vm: &str, to: &str) -> Self {
        let bar =
            ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(REDRAW_HZ));
        bar.set_style(bar_style(false));
        bar.set_prefix(format!("migrating {vm} → {to}"));
        bar.set_message("preparing");
        bar.enable_steady_tick(Duration::from_millis(100));
        Self {
            bar,
            counting_disk: Arc::new(AtomicBool::new(false)),
        }
    }

    pub fn update(&self, progress: &Progress) {
        let disk_copy = progress.phase == Some(Phase::DiskCopy);
        if self.counting_disk.swap(disk_copy, Ordering::Relaxed) != disk_copy {
            self.bar.set_style(bar_style(disk_copy));
        }
        let (position, length) = if disk_copy {
            let total = progress.disks.iter().map(|d| d.bytes_total).sum::<u64>();
            let copied = progress.disks.iter().map(|d| d.bytes_copied).sum::<u64>();
            (copied, total)
        } else {
            (progress.round_pages_sent, progress.round_pages_total)
        };
        self.bar.set_length(length);
        self.bar.set_position(position.min(length));
        self.bar.set_message(describe(progress));
    }

    /// Prints a line above the bar without disturbing it.
    pub fn notice(&self, line: &str) {
        if self.bar.is_hidden() {
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
    }

    /// Removes the bar (before the report is printed).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

/// One line: phase, round, bytes sent, rate, dirty set, predicted downtime, throttle, ETA;
/// during the disks' bulk copy, each disk's copy instead, and afterwards the writes
/// mirrored so far.
pub fn describe(progress: &Progress) -> String {
    let phase = progress
        .phase
        .map_or_else(|| "starting".to_string(), |p| p.to_string());
    if progress.phase == Some(Phase::DiskCopy) {
        return describe_disk_copy(progress);
    }
    let mut line = phase;
    if matches!(
        progress.phase,
        Some(Phase::MemoryPreCopy) | Some(Phase::SwitchOver)
    ) {
        let _ = write!(line, " round {}", progress.round);
    }
    let _ = write!(
        line,
        " · sent {} @ {}",
        format_bytes(progress.bytes_sent),
        format_rate(progress.rate_bytes_per_s as f64),
    );
    // Nothing has been collected before round 0 ends: say so rather than "0 B".
    let measured = progress.round > 0 || progress.phase == Some(Phase::SwitchOver);
    if measured {
        let _ = write!(
            line,
            " · dirty {} · downtime≈{}",
            format_bytes(progress.dirty_pages.saturating_mul(PAGE_SIZE as u64)),
            format_ms(progress.predicted_downtime_ms),
        );
    } else {
        line.push_str(" · dirty set after the first pass");
    }
    if progress.throttle_percent > 0 {
        let _ = write!(line, " · throttle {}%", progress.throttle_percent);
    }
    if !progress.disks.is_empty() {
        let mirrored: u64 = progress.disks.iter().map(|d| d.mirrored_writes).sum();
        let _ = write!(line, " · mirrored {mirrored} writes");
    }
    if let Some(eta_ms) = progress.eta_ms {
        let _ = write!(line, " · ETA {}", format_ms(eta_ms as f64));
    }
    let _ = write!(line, " · {}", format_ms(progress.elapsed_ms as f64));
    line
}

/// The disks' bulk copy: per disk, bytes copied of the total, rate, ETA and the guest
/// writes mirrored behind the cursor meanwhile.
fn describe_disk_copy(progress: &Progress) -> String {
    let mut line = String::from("disk-copy");
    for (index, disk) in progress.disks.iter().enumerate() {
        let _ = write!(line, " · disk {index}: {}", describe_disk_progress(disk));
    }
    if progress.disks.is_empty() {
        line.push_str(" · starting");
    }
    let _ = write!(line, " · {}", format_ms(progress.elapsed_ms as f64));
    line
}

fn describe_disk_progress(disk: &DiskProgress) -> String {
    let percent = if disk.bytes_total == 0 {
        100.0
    } else {
        disk.bytes_copied as f64 * 100.0 / disk.bytes_total as f64
    };
    let mut text = format!(
        "{} of {} ({percent:.0}%) @ {}",
        format_bytes(disk.bytes_copied),
        format_bytes(disk.bytes_total),
        format_rate(disk.rate_bytes_per_s as f64)
    );
    if let Some(eta_ms) = disk.eta_ms {
        let _ = write!(text, ", ETA {}", format_ms(eta_ms as f64));
    }
    let _ = write!(text, ", mirrored {} writes", disk.mirrored_writes);
    text
}

/// The report in human form.
pub fn render_report(vm: &str, to: &str, report: &MigrationReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "migrated {vm} to {to}");
    let rows: [(&str, String); 13] = [
        ("total time", format_ms(report.total_ms)),
        ("downtime", format_ms(report.downtime_ms)),
        (
            "sent",
            format!(
                "{} ({} pages, {} zero pages, {} in the final stop-and-copy)",
                format_bytes(report.bytes_sent),
                report.pages_sent,
                report.zero_pages_sent,
                report.final_pages
            ),
        ),
        (
            "rounds",
            format!("{} pre-copy (stopped: {})", report.rounds, report.converged),
        ),
        ("throughput", format_rate(report.throughput_bytes_per_s)),
        ("transport", {
            // The note starts with the transport's name ("rdma (rxe0 here, …)").
            let note = report
                .transport_note
                .strip_prefix(report.transport.as_str())
                .unwrap_or(&report.transport_note)
                .trim();
            let mut row = format!("{} × {} streams", report.transport, report.streams);
            if !note.is_empty() {
                row = format!("{row} {note}");
            }
            if let Some(rdma) = &report.rdma {
                row = format!(
                    "{row}; RDMA WRITEs: {} of memory ({}), {} of disk ({})",
                    rdma.memory_writes,
                    format_bytes(rdma.memory_write_bytes),
                    rdma.disk_writes,
                    format_bytes(rdma.disk_write_bytes),
                );
            }
            row
        }),
        ("streams", {
            if report.streams_reason.is_empty() {
                report.streams.to_string()
            } else {
                format!("{} ({})", report.streams, report.streams_reason)
            }
        }),
        ("send path", {
            match &report.send_path {
                Some(path) if !path.note.is_empty() => format!("{}: {}", path.mode, path.note),
                Some(path) => path.mode.to_string(),
                None => "rdma writes".to_string(),
            }
        }),
        ("tracker", report.tracker.clone()),
        ("throttle max", format!("{}%", report.throttle_percent_max)),
        (
            "prefault",
            format!(
                "{} (destination, before the transfer)",
                format_ms(report.prefault_ms)
            ),
        ),
        (
            "trace",
            format!(
                "{} (source: arming the dirty tracker{})",
                format_ms(report.trace_ms),
                // With disks the trace follows their bulk copy, so that memory tracking
                // starts when memory pre-copy does.
                if report.disks.is_empty() {
                    ""
                } else {
                    ", after the disk copy"
                }
            ),
        ),
        ("collections", collections_row(report)),
    ];
    for (label, value) in rows {
        let _ = writeln!(out, "  {label:<13} {value}");
    }
    let _ = writeln!(
        out,
        "  {:<13} {:#018x}",
        "memory digest", report.memory_digest
    );
    if !report.disks.is_empty() {
        let _ = writeln!(
            out,
            "  {:<13} {} (bulk copy of every disk, before memory pre-copy)",
            "disk copy",
            format_ms(report.disk_copy_ms)
        );
    }
    for (index, disk) in report.disks.iter().enumerate() {
        render_disk_report(&mut out, index, disk);
    }
    out
}

/// A disk's lines of the report: size, what the bulk copy sent and how fast, how, the
/// mirrored writes, guest write latency in the three situations, and the digest.
fn render_disk_report(out: &mut String, index: usize, disk: &DiskReport) {
    let label = format!("disk {index}");
    let yes_no = |b: bool| if b { "yes" } else { "no" };
    let lines = [
        format!(
            "{}: {} data + {} zero",
            format_bytes(disk.bytes),
            format_bytes(disk.data_bytes),
            format_bytes(disk.zero_bytes)
        ),
        format!(
            "bulk copy {} at {} ({} chunks, queue depth {}, direct I/O {}, registered buffers {})",
            format_ms(disk.copy_ms),
            format_rate(disk.copy_bytes_per_s),
            format_bytes(u64::from(disk.chunk_bytes)),
            disk.queue_depth,
            yes_no(disk.direct_io),
            yes_no(disk.registered_buffers)
        ),
        format!(
            "mirrored {} writes ({}); {} writes ahead of the cursor, {} waited for the chunk in flight",
            disk.mirrored_writes,
            format_bytes(disk.mirrored_bytes),
            disk.local_writes,
            disk.waited_for_copy
        ),
        format!(
            "guest write p50/p99: mirrored {} · ahead of the cursor {} · before the migration {}",
            format_latency(&disk.mirrored_latency),
            format_latency(&disk.local_latency),
            format_latency(&disk.unmirrored_latency)
        ),
        format!("digest {:#018x}", disk.digest),
    ];
    for (i, line) in lines.iter().enumerate() {
        let label = if i == 0 { label.as_str() } else { "" };
        let _ = writeln!(out, "  {label:<13} {line}");
    }
}

/// How the pre-copy collections treated the vCPUs (`--collect-pause`).
fn collections_row(report: &MigrationReport) -> String {
    if report.collect_pauses == 0 {
        return "the vCPUs ran through every pre-copy collection".to_string();
    }
    format!(
        "{} with the vCPUs stopped for them: longest {}, {} in all",
        report.collect_pauses,
        format_ms(report.collect_pause_ms_max),
        format_ms(report.collect_pause_ms_total),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_line_names_everything() {
        let line = describe(&Progress {
            phase: Some(Phase::MemoryPreCopy),
            round: 2,
            bytes_sent: 3 << 30,
            rate_bytes_per_s: 1 << 30,
            dirty_pages: 256,
            predicted_downtime_ms: 12.5,
            throttle_percent: 20,
            eta_ms: Some(1500),
            elapsed_ms: 2500,
            ..Progress::default()
        });
        for part in [
            "pre-copy round 2",
            "sent 3.00 GiB",
            "1.00 GiB/s",
            "dirty 1.00 MiB",
            "12.5 ms",
            "throttle 20%",
            "ETA 1.50 s",
        ] {
            assert!(line.contains(part), "{part:?} missing from {line:?}");
        }
    }

    #[test]
    fn round_zero_has_no_dirty_set_yet() {
        let line = describe(&Progress {
            phase: Some(Phase::MemoryPreCopy),
            round: 0,
            ..Progress::default()
        });
        assert!(line.contains("dirty set after the first pass"), "{line}");
        assert!(!line.contains("downtime≈"), "{line}");
    }

    #[test]
    fn disk_copy_shows_each_disk_and_pre_copy_the_mirrored_writes() {
        let disk = DiskProgress {
            bytes_total: 1 << 30,
            bytes_copied: 256 << 20,
            rate_bytes_per_s: 512 << 20,
            eta_ms: Some(1500),
            mirrored_writes: 42,
            mirrored_bytes: 0,
        };
        let line = describe(&Progress {
            phase: Some(Phase::DiskCopy),
            disks: vec![disk.clone()],
            elapsed_ms: 700,
            ..Progress::default()
        });
        for part in [
            "disk-copy",
            "disk 0: 256 MiB of 1.00 GiB (25%)",
            "512 MiB/s",
            "ETA 1.50 s",
            "mirrored 42 writes",
        ] {
            assert!(line.contains(part), "{part:?} missing from {line:?}");
        }
        assert!(!line.contains("pre-copy"), "{line}");
        let line = describe(&Progress {
            phase: Some(Phase::MemoryPreCopy),
            round: 1,
            disks: vec![DiskProgress {
                bytes_copied: 1 << 30,
                eta_ms: None,
                mirrored_writes: 1234,
                ..disk
            }],
            ..Progress::default()
        });
        assert!(line.contains("pre-copy round 1"), "{line}");
        assert!(line.contains("mirrored 1234 writes"), "{line}");
        let line = describe(&Progress {
            phase: Some(Phase::MemoryPreCopy),
            round: 1,
            ..Progress::default()
        });
        assert!(!line.contains("mirrored"), "no disk, no mirror: {line}");
    }

    #[test]
    fn report_shows_every_disk() {
        let latency = |p50_us, p99_us| ferry_dataplane::disk::LatencySummary {
            count: 10,
            p50_us,
            p99_us,
            max_us: p99_us,
        };
        let report = MigrationReport {
            disk_copy_ms: 1500.0,
            disks: vec![DiskReport {
                bytes: 1 << 30,
                data_bytes: 256 << 20,
                zero_bytes: 768 << 20,
                copy_ms: 1400.0,
                copy_bytes_per_s: (1u64 << 30) as f64,
                chunk_bytes: 1 << 20,
                queue_depth: 16,
                direct_io: true,
                registered_buffers: true,
                mirrored_writes: 321,
                mirrored_bytes: 321 * (64 << 10),
                local_writes: 50,
                waited_for_copy: 2,
                mirrored_latency: latency(400.0, 2500.0),
                local_latency: latency(60.0, 300.0),
                unmirrored_latency: latency(50.0, 200.0),
                digest: 0xabcdef,
            }],
            ..MigrationReport::default()
        };
        let text = render_report("vm1", "h:1", &report);
        for part in [
            "disk copy",
            "1.50 s",
            "disk 0",
            "1.00 GiB: 256 MiB data + 768 MiB zero",
            "bulk copy 1.40 s at 1.00 GiB/s",
            "1.00 MiB chunks, queue depth 16, direct I/O yes",
            "mirrored 321 writes (20.06 MiB)",
            "50 writes ahead of the cursor",
            "mirrored 400 µs / 2.50 ms",
            "ahead of the cursor 60 µs / 300 µs",
            "before the migration 50 µs / 200 µs",
            "digest 0x0000000000abcdef",
            "after the disk copy",
        ] {
            assert!(text.contains(part), "{part:?} missing from {text}");
        }
        let without = render_report("vm1", "h:1", &MigrationReport::default());
        assert!(!without.contains("disk"), "{without}");
    }

    #[test]
    fn report_names_the_numbers_people_look_for() {
        let text = render_report(
            "vm1",
            "h:1",
            &MigrationReport {
                total_ms: 1234.0,
                downtime_ms: 9.5,
                bytes_sent: 1 << 30,
                rounds: 3,
                throughput_bytes_per_s: (2u64 << 30) as f64,
                transport: "tcp".into(),
                streams: 4,
                prefault_ms: 80.0,
                ..MigrationReport::default()
            },
        );
        for part in [
            "migrated vm1 to h:1",
            "1.23 s",
            "9.50 ms",
            "1.00 GiB",
            "3 pre-copy",
            "2.00 GiB/s",
            "tcp × 4 streams",
            "80.0 ms",
        ] {
            assert!(text.contains(part), "{part:?} missing from {text}");
        }
    }
}
