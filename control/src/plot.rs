//! SVG timeline plots of one migration (`ferry migrate --plot out.svg`, the benchmarks).
//!
//! [`render_svg`] turns a [`Timeline`] into one self-contained SVG (no scripts, no external
//! fonts or images, presentation attributes inline, so it renders alike in a browser, in
//! librsvg and on a GitHub Markdown page):
//!
//! - the top panel is throughput over time per lane (memory, disk bulk copy, disk
//!   mirroring), derived from the timeline's cumulative counters
//!   ([`smoothed_rate_series`]), over the phases (a strip above the panel and a faint
//!   shading inside), with the pre-copy round boundaries, the bandwidth each round
//!   measured, the pause as a red band with its length, and each pre-copy collection taken
//!   with the vCPUs stopped (`--collect-pause`) as a short red tick at the foot of its
//!   round;
//! - the bottom panel is the dirty set each pre-copy round left, one bar per round (on a
//!   log scale when the values span more than 100×), with the vCPU throttle above a bar
//!   and the pause predicted at the end of the round under it.
//!
//! Rendering is a pure function of the timeline. Whatever is drawn is clamped into its
//! panel and every number written goes through one formatter that replaces a non-finite
//! value, so a corrupt timeline still makes a valid SVG.

mod axis;
mod svg;
#[cfg(test)]
mod tests;

use std::io::Write as _;
use std::path::Path;

use ferry_dataplane::engine::timeline::{RoundRecord, Timeline, TimelineSample};
use ferry_dataplane::engine::Phase;
use ferry_dataplane::PAGE_SIZE;

use axis::{fmt_bytes, fmt_ms, fmt_tick, fmt_value, nice_axis, ticks, Scale};
use svg::{Anchor, Font, LabelRow, Stroke, Svg};

// The canvas, top to bottom: title, subtitle, legend, phase strip, throughput panel and
// its time axis, dirty-set heading, dirty-set panel and its round labels.
const WIDTH: f64 = 900.0;
const HEIGHT: f64 = 560.0;
const LEFT: f64 = 74.0;
const RIGHT: f64 = 878.0;
const TITLE_Y: f64 = 24.0;
const SUBTITLE_Y: f64 = 43.0;
const LEGEND_Y: f64 = 64.0;
const STRIP_TOP: f64 = 74.0;
const STRIP_BOTTOM: f64 = 90.0;
const RATE_TOP: f64 = 92.0;
const RATE_BOTTOM: f64 = 318.0;
/// Rows for the round and pause labels at the top of the throughput panel: the data stays
/// below them, so a label never sits on a curve.
const RATE_DATA_TOP: f64 = RATE_TOP + 34.0;
const ROUND_LABEL_Y: f64 = RATE_TOP + 13.0;
const PAUSE_LABEL_Y: f64 = RATE_TOP + 27.0;
const TIME_TICKS_Y: f64 = RATE_BOTTOM + 14.0;
const TIME_TITLE_Y: f64 = RATE_BOTTOM + 31.0;
const DIRTY_HEADING_Y: f64 = 378.0;
const DIRTY_TOP: f64 = 386.0;
const DIRTY_BOTTOM: f64 = 500.0;
/// Room above the tallest bar for its value and throttle.
const DIRTY_DATA_TOP: f64 = DIRTY_TOP + 28.0;
const BAR_LABEL_Y: f64 = DIRTY_BOTTOM + 14.0;
const PREDICTED_Y: f64 = DIRTY_BOTTOM + 28.0;
/// The pause is drawn at least this wide, however short it was.
const PAUSE_WIDTH_MIN: f64 = 3.0;
/// A collection stop's tick: this tall, at least this wide.
const STOP_TICK_HEIGHT: f64 = 10.0;
const STOP_TICK_WIDTH_MIN: f64 = 1.5;
/// Most points one rate curve has (the smoothing window asks fewer of a short migration).
const CURVE_POINTS_MAX: usize = 600;

const INK: &str = "#1f2937";
const INK_SOFT: &str = "#6b7280";
const GRID: &str = "#e5e7eb";
const AXIS: &str = "#9ca3af";
const PAUSE: &str = "#dc2626";
const THROTTLE: &str = "#b45309";
const BAR: &str = "#3b82f6";

const TITLE: Font = Font::new(16.0, INK).bold();
const SUBTITLE: Font = Font::new(12.0, INK_SOFT);
const LEGEND: Font = Font::new(11.0, INK);
const HEADING: Font = Font::new(12.0, INK).bold();
const NOTE: Font = Font::new(10.0, INK_SOFT);
const AXIS_TITLE: Font = Font::new(11.0, INK).anchor(Anchor::Middle);
const TICK_X: Font = Font::new(10.0, INK_SOFT).anchor(Anchor::Middle);
const TICK_Y: Font = Font::new(10.0, INK_SOFT).anchor(Anchor::End);
const LABEL: Font = Font::new(10.0, INK).anchor(Anchor::Middle);
const EMPTY: Font = Font::new(13.0, INK_SOFT).anchor(Anchor::Middle);
const GRID_LINE: Stroke = Stroke::new(GRID, 1.0);
const FRAME: Stroke = Stroke::new(AXIS, 1.0);
const BOUNDARY: Stroke = Stroke::new(AXIS, 0.8).dashed("2 2");
const BANDWIDTH: Stroke = Stroke::new(INK, 1.2).dashed("4 2");

const GIB: f64 = (1u64 << 30) as f64;
const MIB: f64 = (1u64 << 20) as f64;

/// One of the cumulative byte counters a timeline samples.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Memory put on the wire (pages and frame headers), all rounds.
    Memory,
    /// Disk bytes behind the bulk-copy cursors.
    DiskCopy,
    /// Guest disk writes mirrored to the destination.
    DiskMirror,
}

impl Lane {
    pub const ALL: [Lane; 3] = [Lane::Memory, Lane::DiskCopy, Lane::DiskMirror];

    /// This lane's counter in `sample`.
    pub fn bytes(self, sample: &TimelineSample) -> u64 {
        match self {
            Lane::Memory => sample.memory_bytes,
            Lane::DiskCopy => sample.disk_copy_bytes,
            Lane::DiskMirror => sample.disk_mirrored_bytes,
        }
    }

    fn label(self) -> &'static str {
        match self {
            Lane::Memory => "memory",
            Lane::DiskCopy => "disk bulk copy",
            Lane::DiskMirror => "disk mirroring",
        }
    }

    /// The curve's class (besides `rate`).
    fn class(self) -> &'static str {
        match self {
            Lane::Memory => "memory",
            Lane::DiskCopy => "disk-copy",
            Lane::DiskMirror => "disk-mirror",
        }
    }

    fn color(self) -> &'static str {
        match self {
            Lane::Memory => "#2563eb",
            Lane::DiskCopy => "#d97706",
            Lane::DiskMirror => "#7c3aed",
        }
    }
}

/// The raw rate of `lane` between consecutive samples: one `(t_ms, bytes_per_s)` point per
/// pair of samples whose time increases, at the middle of the pair's interval. A counter
/// that went backwards counts as no bytes; a pair with a non-finite time is skipped.
pub fn rate_series(samples: &[TimelineSample], lane: Lane) -> Vec<(f64, f64)> {
    samples
        .windows(2)
        .filter_map(|pair| {
            let (a, b) = (&pair[0], &pair[1]);
            let dt_ms = b.t_ms - a.t_ms;
            if !a.t_ms.is_finite() || !b.t_ms.is_finite() || dt_ms <= 0.0 {
                return None;
            }
            let bytes = lane.bytes(b).saturating_sub(lane.bytes(a)) as f64;
            let rate = bytes / (dt_ms / 1e3);
            let t_ms = a.t_ms + dt_ms / 2.0;
            (rate.is_finite() && t_ms.is_finite()).then_some((t_ms, rate))
        })
        .collect()
}

/// The smoothing window for a migration that lasted `span_ms`: 10 ms, or 1/150 of the
/// span when that is longer, so that a 300 ms and a 60 s migration both show their shape.
pub fn smoothing_window_ms(span_ms: f64) -> f64 {
    if span_ms.is_finite() {
        (span_ms / 150.0).max(10.0)
    } else {
        10.0
    }
}

/// The rate of `lane` averaged over a sliding window of `window_ms`, as `(t_ms,
/// bytes_per_s)` points evenly spaced from the first sample to the last (at most
/// [`CURVE_POINTS_MAX`] of them).
///
/// The cumulative counter is interpolated linearly between samples, and the rate at `t` is
/// what it gained from `t - window/2` to `t + window/2` (clipped to the samples' span)
/// over that time: a constant rate comes out as itself, however the samples fall.
pub fn smoothed_rate_series(
    samples: &[TimelineSample],
    lane: Lane,
    window_ms: f64,
) -> Vec<(f64, f64)> {
    let counter = Cumulative::new(samples, lane);
    let (Some(&(t_first, _)), Some(&(t_last, _))) = (counter.points.first(), counter.points.last())
    else {
        return Vec::new();
    };
    let span_ms = t_last - t_first;
    if !span_ms.is_finite() || span_ms <= 0.0 {
        return Vec::new();
    }
    let window_ms = if window_ms.is_finite() && window_ms > 0.0 {
        window_ms
    } else {
        smoothing_window_ms(span_ms)
    };
    let step_ms = (window_ms / 3.0).max(span_ms / (CURVE_POINTS_MAX - 1) as f64);
    // `step_ms` is at least span/(max-1): this bound only guards against rounding.
    let steps = ((span_ms / step_ms).ceil() as usize).min(CURVE_POINTS_MAX - 1);
    (0..=steps)
        .filter_map(|i| {
            let t = if i == steps {
                t_last
            } else {
                t_first + i as f64 * step_ms
            };
            let lo = (t - window_ms / 2.0).max(t_first);
            let hi = (t + window_ms / 2.0).min(t_last);
            if hi <= lo {
                return None;
            }
            let rate = (counter.at(hi) - counter.at(lo)).max(0.0) / ((hi - lo) / 1e3);
            rate.is_finite().then_some((t, rate))
        })
        .collect()
}

/// A lane's cumulative counter as a piecewise-linear function of time.
struct Cumulative {
    /// `(t_ms, bytes)`: time in order, bytes never decreasing.
    points: Vec<(f64, f64)>,
}

impl Cumulative {
    fn new(samples: &[TimelineSample], lane: Lane) -> Self {
        let mut points: Vec<(f64, f64)> = samples
            .iter()
            .filter(|s| s.t_ms.is_finite())
            .map(|s| (s.t_ms, lane.bytes(s) as f64))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        // A counter only grows: a sample below an earlier one is a glitch, not bytes
        // taken back.
        let mut high = 0.0f64;
        for p in &mut points {
            high = high.max(p.1);
            p.1 = high;
        }
        Self { points }
    }

    /// The counter at `t`: interpolated between samples, held flat beyond them.
    fn at(&self, t: f64) -> f64 {
        let i = self.points.partition_point(|p| p.0 <= t);
        match (i.checked_sub(1).map(|j| self.points[j]), self.points.get(i)) {
            (Some((t0, b0)), Some(&(t1, b1))) => {
                let f = (t - t0) / (t1 - t0);
                if f.is_finite() {
                    b0 + (b1 - b0) * f
                } else {
                    b0
                }
            }
            (Some((_, b)), None) | (None, Some(&(_, b))) => b,
            (None, None) => 0.0,
        }
    }
}

/// The SVG of `timeline`, headed by `title` (escaped here).
pub fn render_svg(timeline: &Timeline, title: &str) -> String {
    let span_ms = span_ms(timeline);
    let window_ms = smoothing_window_ms(span_ms);
    let curves: Vec<(Lane, Vec<(f64, f64)>)> = Lane::ALL
        .iter()
        .filter(|&&lane| lane_total(timeline, lane) > 0)
        .map(|&lane| {
            let curve = smoothed_rate_series(&timeline.samples, lane, window_ms);
            (lane, curve)
        })
        .collect();

    let mut svg = Svg::new(WIDTH, HEIGHT, title);
    svg.text(LEFT, TITLE_Y, TITLE, "title", title);
    svg.text(
        LEFT,
        SUBTITLE_Y,
        SUBTITLE,
        "subtitle",
        &subtitle(timeline, span_ms),
    );
    let panel = RatePanel::new(timeline, &curves, span_ms, window_ms);
    panel.draw(&mut svg);
    legend(&mut svg, timeline, &curves, panel.bandwidth_drawn);
    dirty_panel(&mut svg, &timeline.rounds);
    svg.finish()
}

/// Writes [`render_svg`]'s output to `path`, through a temporary file beside it that is
/// renamed over `path`, so that a reader never sees half a plot.
pub fn write_svg(path: &Path, timeline: &Timeline, title: &str) -> std::io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{}: not a file name", path.display()),
        )
    })?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let svg = render_svg(timeline, title);
    let written = std::fs::File::create(&tmp)
        .and_then(|mut file| {
            file.write_all(svg.as_bytes())?;
            file.sync_all()
        })
        .and_then(|()| std::fs::rename(&tmp, path));
    if written.is_err() {
        // Best effort: the error worth reporting is the one above.
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// The time axis' extent: the migration's total, stretched over anything recorded after
/// it; 1 ms when nothing took any time.
fn span_ms(timeline: &Timeline) -> f64 {
    let span = std::iter::once(timeline.total_ms)
        .chain(timeline.samples.iter().map(|s| s.t_ms))
        .chain(timeline.rounds.iter().map(|r| r.end_ms))
        .chain(timeline.pause.iter().map(|p| p.end_ms))
        .filter(|t| t.is_finite())
        .fold(0.0f64, f64::max);
    if span > 0.0 {
        span
    } else {
        1.0
    }
}

/// The most `lane`'s counter reached.
fn lane_total(timeline: &Timeline, lane: Lane) -> u64 {
    timeline
        .samples
        .iter()
        .map(|s| lane.bytes(s))
        .max()
        .unwrap_or(0)
}

fn subtitle(timeline: &Timeline, span_ms: f64) -> String {
    let total_ms = if timeline.total_ms.is_finite() && timeline.total_ms > 0.0 {
        timeline.total_ms
    } else {
        span_ms
    };
    let pause = match timeline.pause {
        Some(p) => format!("pause {}", fmt_ms((p.end_ms - p.start_ms).max(0.0))),
        None => "no pause recorded".to_string(),
    };
    let moved = Lane::ALL
        .iter()
        .map(|&lane| lane_total(timeline, lane))
        .fold(0u64, u64::saturating_add);
    let rounds = timeline.rounds.len();
    let (count, longest) =
        collect_stops(timeline).fold((0usize, 0.0f64), |(n, ms), r| (n + 1, ms.max(r.collect_ms)));
    let stops = match count {
        0 => String::new(),
        n => format!(
            " · {n} collection stop{}, longest {}",
            if n == 1 { "" } else { "s" },
            fmt_ms(longest),
        ),
    };
    format!(
        "total {} · {pause} · {} moved · {rounds} pre-copy round{}{stops}",
        fmt_ms(total_ms),
        fmt_bytes(moved as f64),
        if rounds == 1 { "" } else { "s" },
    )
}

/// The legend row under the subtitle: the lanes drawn, the bandwidth marks, the pause.
fn legend(svg: &mut Svg, timeline: &Timeline, curves: &[(Lane, Vec<(f64, f64)>)], marks: bool) {
    let y = LEGEND_Y;
    let mut x = LEFT;
    let item = |svg: &mut Svg, x: &mut f64, label: &str| {
        svg.text(*x, y, LEGEND, "", label);
        *x += LEGEND.width(label) + 20.0;
    };
    for (lane, _) in curves {
        svg.line(
            (x, y - 4.0),
            (x + 18.0, y - 4.0),
            Stroke::new(lane.color(), 2.0),
            "",
        );
        x += 23.0;
        item(svg, &mut x, lane.label());
    }
    if marks {
        svg.line((x, y - 4.0), (x + 18.0, y - 4.0), BANDWIDTH, "");
        x += 23.0;
        item(svg, &mut x, "bandwidth measured in each round");
    }
    if timeline.pause.is_some() {
        svg.rect(x, y - 10.0, 10.0, 10.0, PAUSE, "fill-opacity=\"0.6\"");
        x += 15.0;
        item(svg, &mut x, "pause (vCPUs stopped)");
    }
    if collect_stops(timeline).next().is_some() {
        svg.rect(x + 4.0, y - 8.0, 2.0, 8.0, PAUSE, "");
        x += 15.0;
        item(svg, &mut x, "vCPUs stopped to collect");
    }
}

/// The pre-copy rounds whose closing collection stopped the vCPUs.
fn collect_stops(timeline: &Timeline) -> impl Iterator<Item = &RoundRecord> {
    timeline.rounds.iter().filter(|r| r.collect_paused)
}

/// The top panel: throughput over time.
struct RatePanel<'a> {
    timeline: &'a Timeline,
    curves: &'a [(Lane, Vec<(f64, f64)>)],
    span_ms: f64,
    window_ms: f64,
    time: Scale,
    rate: Scale,
    /// Bytes per second in one unit of the rate axis, and the unit's name.
    unit: (f64, &'static str),
    /// Whether any round's measured bandwidth is drawn.
    bandwidth_drawn: bool,
}

impl<'a> RatePanel<'a> {
    fn new(
        timeline: &'a Timeline,
        curves: &'a [(Lane, Vec<(f64, f64)>)],
        span_ms: f64,
        window_ms: f64,
    ) -> Self {
        let curve_max = curves
            .iter()
            .flat_map(|(_, c)| c.iter().map(|&(_, r)| r))
            .fold(0.0f64, f64::max);
        // A round's bandwidth may widen the axis, but a wild one (over 3× the most ever
        // seen on the wire) must not flatten the curves: it is left out instead.
        let sane = |b: f64| b.is_finite() && b > 0.0 && (curve_max == 0.0 || b <= 3.0 * curve_max);
        let bandwidth_max = timeline
            .rounds
            .iter()
            .map(|r| r.bandwidth_bytes_per_s)
            .filter(|&b| sane(b))
            .fold(0.0f64, f64::max);
        let max = curve_max.max(bandwidth_max);
        let unit = if max >= 0.1 * GIB || max == 0.0 {
            (GIB, "GiB/s")
        } else {
            (MIB, "MiB/s")
        };
        let (top, _) = nice_axis(max / unit.0 * 1.05, 5);
        let bandwidth_drawn = timeline.rounds.iter().any(|r| {
            sane(r.bandwidth_bytes_per_s) && r.end_ms > r.start_ms && r.start_ms.is_finite()
        });
        Self {
            timeline,
            curves,
            span_ms,
            window_ms,
            time: Scale::linear(0.0, span_ms, LEFT, RIGHT),
            rate: Scale::linear(0.0, top * unit.0, RATE_BOTTOM, RATE_DATA_TOP),
            unit,
            bandwidth_drawn,
        }
    }

    fn draw(&self, svg: &mut Svg) {
        self.phases(svg);
        self.axes(svg);
        self.rounds(svg);
        self.curves(svg);
        self.collect_stops(svg);
        self.pause(svg);
        svg.frame(LEFT, RATE_TOP, RIGHT - LEFT, RATE_BOTTOM - RATE_TOP, FRAME);
        if self.timeline.samples.len() < 2 {
            let mid = ((LEFT + RIGHT) / 2.0, (RATE_DATA_TOP + RATE_BOTTOM) / 2.0);
            svg.text(
                mid.0,
                mid.1,
                EMPTY,
                "empty",
                "not enough samples for a rate",
            );
        }
    }

    /// Phase spans from the samples: each phase runs from its first sample to the next
    /// phase's first sample, the last one to the end of the axis.
    fn phase_spans(&self) -> Vec<(Phase, f64, f64)> {
        let mut samples: Vec<&TimelineSample> = self
            .timeline
            .samples
            .iter()
            .filter(|s| s.t_ms.is_finite())
            .collect();
        samples.sort_by(|a, b| a.t_ms.total_cmp(&b.t_ms));
        let mut spans = Vec::new();
        let mut current: Option<(Option<Phase>, f64)> = None;
        for s in samples {
            match current {
                Some((phase, _)) if phase == s.phase => continue,
                Some((Some(phase), start)) => spans.push((phase, start, s.t_ms)),
                _ => {}
            }
            // The recorder's first sample comes a moment after the migration started:
            // its phase starts the axis.
            let start = if current.is_none() && s.t_ms <= self.window_ms {
                0.0
            } else {
                s.t_ms
            };
            current = Some((s.phase, start));
        }
        if let Some((Some(phase), start)) = current {
            spans.push((phase, start, self.span_ms.max(start)));
        }
        spans
    }

    /// The phase strip above the panel with the phases' names, and their shading in it.
    fn phases(&self, svg: &mut Svg) {
        let font = LABEL;
        let y = STRIP_BOTTOM - 4.5;
        let mut labels = LabelRow::new(LEFT, RIGHT);
        let mut too_narrow = Vec::new();
        for (phase, start, end) in self.phase_spans() {
            let (x0, x1) = (self.time.map(start), self.time.map(end));
            if x1 <= x0 {
                continue;
            }
            let (strip, shade) = phase_colors(phase);
            if let Some(shade) = shade {
                let h = RATE_BOTTOM - RATE_TOP;
                svg.rect(x0, RATE_TOP, x1 - x0, h, shade, "class=\"phase-shade\"");
            }
            let h = STRIP_BOTTOM - STRIP_TOP;
            svg.rect(x0, STRIP_TOP, x1 - x0, h, strip, "class=\"phase\"");
            let name = phase.to_string();
            let mid = (x0 + x1) / 2.0;
            if font.width(&name) + 6.0 <= x1 - x0 && labels.take(font.extent(mid, &name)) {
                svg.text(mid, y, font, "phase-label", &name);
            } else {
                too_narrow.push((name, x0, x1));
            }
        }
        // A phase too short for its name has it beside its span, where there is room.
        for (name, x0, x1) in too_narrow {
            let after = font.anchor(Anchor::Start).fill(INK_SOFT);
            let before = font.anchor(Anchor::End).fill(INK_SOFT);
            if labels.take(after.extent(x1 + 3.0, &name)) {
                svg.text(x1 + 3.0, y, after, "phase-label", &name);
            } else if labels.take(before.extent(x0 - 3.0, &name)) {
                svg.text(x0 - 3.0, y, before, "phase-label", &name);
            }
        }
    }

    fn axes(&self, svg: &mut Svg) {
        // Rate: gridlines and values in the unit chosen.
        let top = self.rate.d1 / self.unit.0;
        let (_, step) = nice_axis(top, 5);
        for v in ticks(0.0, top, step) {
            let y = self.rate.map(v * self.unit.0);
            svg.group("y-tick");
            svg.line((LEFT, y), (RIGHT, y), GRID_LINE, "");
            svg.text(LEFT - 6.0, y + 3.5, TICK_Y, "", &fmt_tick(v, step));
            svg.end_group();
        }
        let mid = (RATE_DATA_TOP + RATE_BOTTOM) / 2.0;
        svg.text_up(
            20.0,
            mid,
            AXIS_TITLE,
            &format!("throughput ({})", self.unit.1),
        );

        // Time: ticks under the panel, in ms or, from 2 s, in seconds.
        let (div, unit) = if self.span_ms >= 2000.0 {
            (1000.0, "s")
        } else {
            (1.0, "ms")
        };
        let (_, step) = nice_axis(self.span_ms / div, 8);
        for v in ticks(0.0, self.span_ms / div, step) {
            let x = self.time.map(v * div);
            svg.group("x-tick");
            svg.line((x, RATE_BOTTOM), (x, RATE_BOTTOM + 4.0), FRAME, "");
            svg.text(x, TIME_TICKS_Y, TICK_X, "", &fmt_tick(v, step));
            svg.end_group();
        }
        let title = format!(
            "time since the migration started ({unit}) · rates averaged over {}",
            fmt_ms(self.window_ms)
        );
        svg.text((LEFT + RIGHT) / 2.0, TIME_TITLE_Y, AXIS_TITLE, "", &title);
    }

    /// Round boundaries, names and measured bandwidths.
    fn rounds(&self, svg: &mut Svg) {
        let font = LABEL.halo();
        let mut labels = LabelRow::new(LEFT, RIGHT);
        let mut last_boundary = f64::NAN;
        let mut boundary = |svg: &mut Svg, x: f64| {
            // Back-to-back rounds share a boundary: draw it once.
            if (x - last_boundary).abs() >= 0.5 || last_boundary.is_nan() {
                svg.line((x, RATE_TOP), (x, RATE_BOTTOM), BOUNDARY, "round-boundary");
                last_boundary = x;
            }
        };
        for r in &self.timeline.rounds {
            if !r.start_ms.is_finite() || !r.end_ms.is_finite() {
                continue;
            }
            let x0 = self.time.map(r.start_ms);
            let x1 = self.time.map(r.end_ms.max(r.start_ms));
            boundary(svg, x0);
            boundary(svg, x1);
            let name = format!("r{}", r.round);
            let mid = (x0 + x1) / 2.0;
            if labels.take(font.extent(mid, &name)) {
                svg.text(mid, ROUND_LABEL_Y, font, "round-label", &name);
            }
            let b = r.bandwidth_bytes_per_s;
            if self.bandwidth_drawn && b.is_finite() && b > 0.0 && b <= self.rate.d1 && x1 > x0 {
                let y = self.rate.map(b);
                svg.line((x0, y), (x1, y), BANDWIDTH, "round-bandwidth");
            }
        }
    }

    /// Each lane's rate: a faint area under a line.
    fn curves(&self, svg: &mut Svg) {
        let base = self.rate.map(0.0);
        for (lane, curve) in self.curves {
            let points: Vec<(f64, f64)> = curve
                .iter()
                .map(|&(t, r)| (self.time.map(t), self.rate.map(r)))
                .collect();
            let (Some(&(first, _)), Some(&(last, _))) = (points.first(), points.last()) else {
                continue;
            };
            let mut area = Vec::with_capacity(points.len() + 2);
            area.push((first, base));
            area.extend_from_slice(&points);
            area.push((last, base));
            let class = lane.class();
            svg.polygon(&area, lane.color(), 0.12, &format!("rate-area {class}"));
            let stroke = Stroke::new(lane.color(), 1.6);
            svg.polyline(&points, stroke, &format!("rate {class}"));
        }
    }

    /// Each collection taken with the vCPUs stopped: a red tick at the foot of the panel,
    /// over the last `collect_ms` of its round (the collection closes the round).
    fn collect_stops(&self, svg: &mut Svg) {
        for r in collect_stops(self.timeline) {
            if !r.end_ms.is_finite() {
                continue;
            }
            let x1 = self.time.map(r.end_ms);
            let x0 = self
                .time
                .map(r.end_ms - r.collect_ms.max(0.0))
                .min(x1 - STOP_TICK_WIDTH_MIN)
                .max(LEFT);
            svg.rect(
                x0,
                RATE_BOTTOM - STOP_TICK_HEIGHT,
                x1 - x0,
                STOP_TICK_HEIGHT,
                PAUSE,
                "class=\"collect-stop\"",
            );
        }
    }

    /// The pause: a red band at least [`PAUSE_WIDTH_MIN`] wide, and its length beside it.
    fn pause(&self, svg: &mut Svg) {
        let Some(p) = self.timeline.pause else {
            return;
        };
        let (start, end) = (p.start_ms, p.end_ms.max(p.start_ms));
        let (mut x0, mut x1) = (self.time.map(start), self.time.map(end));
        if x1 - x0 < PAUSE_WIDTH_MIN {
            let mid = (x0 + x1) / 2.0;
            x1 = (mid + PAUSE_WIDTH_MIN / 2.0).clamp(LEFT + PAUSE_WIDTH_MIN, RIGHT);
            x0 = x1 - PAUSE_WIDTH_MIN;
        }
        let h = RATE_BOTTOM - RATE_TOP;
        svg.rect(
            x0,
            RATE_TOP,
            x1 - x0,
            h,
            PAUSE,
            "fill-opacity=\"0.55\" class=\"pause\"",
        );

        // Inside the band when it is wide enough, else beside it on the side with room.
        let label = format!("pause {}", fmt_ms(end - start));
        let font = Font::new(11.0, PAUSE).bold().halo();
        let y = PAUSE_LABEL_Y;
        if font.width(&label) + 8.0 <= x1 - x0 {
            let inside = font.anchor(Anchor::Middle).fill("#ffffff");
            let inside = Font {
                halo: false,
                ..inside
            };
            svg.text((x0 + x1) / 2.0, y, inside, "pause-label", &label);
        } else if x1 + 4.0 + font.width(&label) <= RIGHT {
            svg.text(x1 + 4.0, y, font, "pause-label", &label);
        } else {
            svg.text(x0 - 4.0, y, font.anchor(Anchor::End), "pause-label", &label);
        }
    }
}

/// The strip colour and the panel shading of each phase.
fn phase_colors(phase: Phase) -> (&'static str, Option<&'static str>) {
    match phase {
        Phase::Prepare => ("#e5e7eb", Some("#f7f7f8")),
        Phase::DiskCopy => ("#fde7c4", Some("#fff8ed")),
        Phase::MemoryPreCopy => ("#d3e4fb", Some("#f2f7fe")),
        Phase::SwitchOver => ("#d4efd9", Some("#f0faf2")),
        Phase::Done => ("#e5e7eb", None),
        Phase::FailedBack => ("#f9d0d0", Some("#fdf2f2")),
    }
}

/// The bottom panel: the dirty set each round left, one bar per round.
fn dirty_panel(svg: &mut Svg, rounds: &[RoundRecord]) {
    svg.text(
        LEFT,
        DIRTY_HEADING_Y,
        HEADING,
        "",
        "Dirty set at the end of each pre-copy round",
    );
    let note = "under each round: the pause predicted then · above: vCPU throttle";
    let note_font = NOTE.anchor(Anchor::End);
    svg.text(RIGHT, DIRTY_HEADING_Y, note_font, "", note);
    svg.frame(
        LEFT,
        DIRTY_TOP,
        RIGHT - LEFT,
        DIRTY_BOTTOM - DIRTY_TOP,
        FRAME,
    );
    if rounds.is_empty() {
        let mid = (LEFT + RIGHT) / 2.0;
        let y = (DIRTY_TOP + DIRTY_BOTTOM) / 2.0 + 4.0;
        svg.text(mid, y, EMPTY, "empty", "no pre-copy rounds");
        return;
    }
    let mib: Vec<f64> = rounds
        .iter()
        .map(|r| r.dirty_pages_after as f64 * PAGE_SIZE as f64 / MIB)
        .collect();
    let scale = dirty_scale(&mib);

    // Gridlines and values: every decade on a log scale (up to 5 of them), 1-2-5 steps
    // on a linear one.
    let (values, step): (Vec<f64>, Option<f64>) = if scale.log {
        let every = ((scale.d1 - scale.d0) / 4.0).ceil().max(1.0);
        let exps = ticks(scale.d0, scale.d1, every);
        (exps.iter().map(|&e| 10f64.powf(e)).collect(), None)
    } else {
        let (_, step) = nice_axis(scale.d1, 3);
        (ticks(0.0, scale.d1, step), Some(step))
    };
    for v in values {
        let y = scale.map(v);
        svg.line((LEFT, y), (RIGHT, y), GRID_LINE, "");
        let label = fmt_tick(v, step.unwrap_or(v));
        svg.text(LEFT - 6.0, y + 3.5, TICK_Y, "", &label);
    }
    let axis_title = if scale.log { "MiB (log)" } else { "MiB" };
    let mid = (DIRTY_DATA_TOP + DIRTY_BOTTOM) / 2.0;
    svg.text_up(20.0, mid, AXIS_TITLE, axis_title);

    // The bars, and their labels where a round's slot has room for them.
    let slot = (RIGHT - LEFT) / rounds.len() as f64;
    let bar_w = (slot * 0.6).min(56.0);
    let mut names = LabelRow::new(LEFT, RIGHT);
    let mut predictions = LabelRow::new(LEFT, RIGHT);
    let fits = |font: Font, s: &str| font.width(s) <= slot - 4.0;
    // Values and throttles go on every bar or on none, so that a missing one does not
    // read as a zero.
    let values: Vec<String> = mib.iter().map(|&v| fmt_value(v)).collect();
    let show_values = values.iter().all(|v| fits(LABEL, v));
    let throttle_font = LABEL.fill(THROTTLE);
    let mut throttled = rounds.iter().filter(|r| r.throttle_percent > 0);
    let throttle_long = throttled
        .clone()
        .all(|r| fits(throttle_font, &format!("throttle {} %", r.throttle_percent)));
    let throttle_short =
        throttled.all(|r| fits(throttle_font, &format!("{} %", r.throttle_percent)));
    for (i, (r, &v)) in rounds.iter().zip(&mib).enumerate() {
        let x = LEFT + slot * (i as f64 + 0.5);
        let y = scale.map(v);
        svg.rect(
            x - bar_w / 2.0,
            y,
            bar_w,
            DIRTY_BOTTOM - y,
            BAR,
            "class=\"bar\"",
        );
        let mut above = y - 4.0;
        if show_values {
            svg.text(x, above, LABEL, "bar-value", &values[i]);
            above -= 12.0;
        }
        if r.throttle_percent > 0 && (throttle_long || throttle_short) {
            let text = if throttle_long {
                format!("throttle {} %", r.throttle_percent)
            } else {
                format!("{} %", r.throttle_percent)
            };
            let y = above.max(DIRTY_TOP + 11.0);
            svg.text(x, y, throttle_font, "throttle", &text);
        }
        let name = format!("r{}", r.round);
        let font = LABEL.fill(INK);
        if names.take(font.extent(x, &name)) {
            svg.text(
                x,
                BAR_LABEL_Y,
                Font { size: 11.0, ..font },
                "bar-label",
                &name,
            );
        }
        let predicted = r.predicted_downtime_ms;
        if predicted.is_finite() && predicted >= 0.0 {
            let text = format!("≈ {}", fmt_ms(predicted));
            let font = Font::new(9.5, INK_SOFT).anchor(Anchor::Middle);
            if fits(font, &text) && predictions.take(font.extent(x, &text)) {
                svg.text(x, PREDICTED_Y, font, "predicted", &text);
            }
        }
    }
}

/// The value axis of the dirty-set panel: log10 when the non-zero values span more than
/// 100×, from a decade under the smallest (so that it still shows); else linear from 0.
fn dirty_scale(mib: &[f64]) -> Scale {
    let max = mib.iter().copied().fold(0.0f64, f64::max);
    let min = mib
        .iter()
        .copied()
        .filter(|&v| v > 0.0)
        .fold(f64::INFINITY, f64::min);
    if max > 0.0 && max / min > 100.0 {
        let lo = min.log10().ceil() - 1.0;
        let hi = max.log10().ceil().max(lo + 1.0);
        Scale::log(lo, hi, DIRTY_BOTTOM, DIRTY_DATA_TOP)
    } else {
        let (top, _) = nice_axis(max, 3);
        Scale::linear(0.0, top, DIRTY_BOTTOM, DIRTY_DATA_TOP)
    }
}
