//! A migration as a person watches it: the live progress bar and the final report.

use std::fmt::Write as _;
use std::time::Duration;

use ferry_dataplane::engine::{MigrationReport, Phase, Progress};
use ferry_dataplane::units::{format_bytes, format_rate};
use ferry_dataplane::PAGE_SIZE;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::output::format_ms;

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
#[derive(Clone)]
pub struct ProgressView {
    bar: ProgressBar,
}

impl ProgressView {
    pub fn new(vm: &str, to: &str) -> Self {
        let bar =
            ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr_with_hz(REDRAW_HZ));
        let style = ProgressStyle::with_template(
            "{spinner:.green} {prefix:.bold} {msg}\n  [{bar:40.cyan/blue}] {pos}/{len} pages in this round",
        )
        .expect("the template is valid")
        .progress_chars("=> ");
        bar.set_style(style);
        bar.set_prefix(format!("migrating {vm} → {to}"));
        bar.set_message("preparing");
        bar.enable_steady_tick(Duration::from_millis(100));
        Self { bar }
    }

    pub fn update(&self, progress: &Progress) {
        self.bar.set_length(progress.round_pages_total);
        self.bar
            .set_position(progress.round_pages_sent.min(progress.round_pages_total));
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

/// One line: phase, round, bytes sent, rate, dirty set, predicted downtime, throttle, ETA.
pub fn describe(progress: &Progress) -> String {
    let phase = progress
        .phase
        .map_or_else(|| "starting".to_string(), |p| p.to_string());
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
    if let Some(eta_ms) = progress.eta_ms {
        let _ = write!(line, " · ETA {}", format_ms(eta_ms as f64));
    }
    let _ = write!(line, " · {}", format_ms(progress.elapsed_ms as f64));
    line
}

/// The report in human form.
pub fn render_report(vm: &str, to: &str, report: &MigrationReport) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "migrated {vm} to {to}");
    let rows: [(&str, String); 10] = [
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
        (
            "transport",
            format!("{} × {} streams", report.transport, report.streams),
        ),
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
                "{} (source: tracking armed, pages hashed, during the pre-fault)",
                format_ms(report.trace_ms)
            ),
        ),
    ];
    for (label, value) in rows {
        let _ = writeln!(out, "  {label:<13} {value}");
    }
    let _ = writeln!(
        out,
        "  {:<13} {:#018x}",
        "memory digest", report.memory_digest
    );
    out
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
