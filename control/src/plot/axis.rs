//! Axes for the plots: data-to-canvas scales, 1-2-5 tick steps, and numbers for people.

/// Most ticks an axis draws, whatever its values.
const TICKS_MAX: usize = 24;

/// A linear (or, with `log`, log10) map from data to canvas coordinates.
#[derive(Clone, Copy, Debug)]
pub(super) struct Scale {
    pub d0: f64,
    pub d1: f64,
    pub p0: f64,
    pub p1: f64,
    /// `d0` and `d1` are powers of ten, and a value is mapped by its log10.
    pub log: bool,
}

impl Scale {
    pub fn linear(d0: f64, d1: f64, p0: f64, p1: f64) -> Self {
        Self {
            d0,
            d1,
            p0,
            p1,
            log: false,
        }
    }

    pub fn log(d0: f64, d1: f64, p0: f64, p1: f64) -> Self {
        Self {
            log: true,
            ..Self::linear(d0, d1, p0, p1)
        }
    }

    /// `v` on the canvas, clamped into the range. A non-finite `v`, or one at or below
    /// zero on a log scale, lands at the start.
    pub fn map(&self, v: f64) -> f64 {
        let v = match (self.log, v > 0.0) {
            (false, _) => v,
            (true, true) => v.log10(),
            (true, false) => return self.p0,
        };
        let f = (v - self.d0) / (self.d1 - self.d0);
        if !f.is_finite() {
            return self.p0;
        }
        let p = self.p0 + f.clamp(0.0, 1.0) * (self.p1 - self.p0);
        if p.is_finite() {
            p
        } else {
            self.p0
        }
    }
}

/// The top of an axis that starts at zero and shows `max`, and its tick step: 1, 2 or 5
/// times a power of ten, the nearest to `target` steps.
pub(super) fn nice_axis(max: f64, target: usize) -> (f64, f64) {
    if !max.is_finite() || max <= 0.0 {
        return (1.0, 0.2);
    }
    let raw = max / target.max(1) as f64;
    let exp = raw.log10().floor();
    let norm = raw / 10f64.powf(exp);
    let k = if norm < 1.5 {
        1.0
    } else if norm < 3.0 {
        2.0
    } else if norm < 7.0 {
        5.0
    } else {
        10.0
    };
    // k × 10^exp, divided rather than multiplied for a negative exponent, so that 0.2
    // and 1.2 come out as the floats that print so.
    let scaled = |m: f64| {
        if exp >= 0.0 {
            m * 10f64.powf(exp)
        } else {
            m / 10f64.powf(-exp)
        }
    };
    let step = scaled(k);
    let top = scaled((max / step - 1e-9).ceil() * k);
    if step.is_finite() && step > 0.0 && top.is_finite() && top >= max {
        (top, step)
    } else {
        (max, max)
    }
}

/// Tick values from `lo` to `hi` every `step` (at most [`TICKS_MAX`] of them).
pub(super) fn ticks(lo: f64, hi: f64, step: f64) -> Vec<f64> {
    if !(lo.is_finite() && hi.is_finite() && step.is_finite() && step > 0.0) {
        return Vec::new();
    }
    (0..TICKS_MAX)
        .map(|i| lo + i as f64 * step)
        .take_while(|&v| v <= hi + step * 1e-9)
        .collect()
}

/// A tick value with as many decimals as its step needs (`0.5`, `1.0`, `400`).
pub(super) fn fmt_tick(v: f64, step: f64) -> String {
    if !v.is_finite() {
        return String::new();
    }
    if v.abs() >= 1e6 {
        return format!("{v:e}");
    }
    let decimals = if step > 0.0 && step.is_finite() {
        (-step.log10().floor()).clamp(0.0, 6.0) as usize
    } else {
        0
    };
    format!("{v:.decimals$}")
}

/// A duration for people: `0.35 ms`, `2.6 ms`, `412 ms`, `1.23 s`, `62.1 s`.
pub(super) fn fmt_ms(ms: f64) -> String {
    if !ms.is_finite() {
        return "?".to_string();
    }
    let a = ms.abs();
    if a >= 1e9 {
        format!("{:.2e} s", ms / 1e3)
    } else if a >= 10_000.0 {
        format!("{:.1} s", ms / 1e3)
    } else if a >= 1000.0 {
        format!("{:.2} s", ms / 1e3)
    } else if a >= 10.0 {
        format!("{ms:.0} ms")
    } else if a >= 1.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

/// Bytes for people, in binary units: `512 B`, `3.50 GiB`, `310 MiB`.
pub(super) fn fmt_bytes(bytes: f64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if !bytes.is_finite() {
        return "?".to_string();
    }
    let mut v = bytes;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{v:.0} B")
    } else if v >= 100.0 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.2} {}", UNITS[unit])
    }
}

/// A value in an axis' unit with three significant digits or so: `310`, `58.0`, `0.35`.
pub(super) fn fmt_value(v: f64) -> String {
    if !v.is_finite() || v == 0.0 {
        "0".to_string()
    } else if v.abs() >= 1e6 {
        format!("{v:.2e}")
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 1.0 {
        format!("{v:.1}")
    } else {
        // Two significant digits: 0.35, 0.0039.
        let decimals = (1.0 - v.abs().log10().floor()).clamp(2.0, 12.0) as usize;
        format!("{v:.decimals$}")
    }
}
