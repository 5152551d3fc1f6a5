//! The SVG writer under the plots: elements with their presentation attributes inline (no
//! stylesheet, no scripts, no external fonts), text escaped, every number finite.

use std::fmt::Write as _;

const FONT_FAMILY: &str = "DejaVu Sans, Helvetica, Arial, sans-serif";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Anchor {
    Start,
    Middle,
    End,
}

/// How a piece of text is drawn.
#[derive(Clone, Copy, Debug)]
pub(super) struct Font {
    pub size: f64,
    pub fill: &'static str,
    pub anchor: Anchor,
    pub bold: bool,
    /// A white outline under the glyphs, so lines behind the text do not cut through it.
    pub halo: bool,
}

impl Font {
    pub const fn new(size: f64, fill: &'static str) -> Self {
        Self {
            size,
            fill,
            anchor: Anchor::Start,
            bold: false,
            halo: false,
        }
    }

    pub const fn anchor(mut self, anchor: Anchor) -> Self {
        self.anchor = anchor;
        self
    }

    pub const fn fill(mut self, fill: &'static str) -> Self {
        self.fill = fill;
        self
    }

    pub const fn bold(mut self) -> Self {
        self.bold = true;
        self
    }

    pub const fn halo(mut self) -> Self {
        self.halo = true;
        self
    }

    /// About how wide `s` is in this font: DejaVu Sans' advance widths, roughly, by kind
    /// of character. Enough to keep labels apart, not to typeset.
    pub fn width(&self, s: &str) -> f64 {
        let em: f64 = s
            .chars()
            .map(|c| match c {
                'i' | 'j' | 'l' | '.' | ',' | ':' | ';' | '\'' | '|' | '!' => 0.3,
                ' ' | 'f' | 't' | '(' | ')' | '[' | ']' | '-' => 0.38,
                'r' => 0.42,
                '0'..='9' => 0.64,
                'm' | 'w' | 'M' | 'W' | '%' => 0.95,
                'A'..='Z' => 0.72,
                c if c.is_ascii() => 0.62,
                _ => 0.84,
            })
            .sum();
        em * self.size * if self.bold { 1.08 } else { 1.0 }
    }

    /// The horizontal extent of `s` drawn at `x`.
    pub fn extent(&self, x: f64, s: &str) -> (f64, f64) {
        let w = self.width(s);
        match self.anchor {
            Anchor::Start => (x, x + w),
            Anchor::Middle => (x - w / 2.0, x + w / 2.0),
            Anchor::End => (x - w, x),
        }
    }
}

/// How a line is drawn.
#[derive(Clone, Copy, Debug)]
pub(super) struct Stroke {
    pub color: &'static str,
    pub width: f64,
    pub dash: Option<&'static str>,
}

impl Stroke {
    pub const fn new(color: &'static str, width: f64) -> Self {
        Self {
            color,
            width,
            dash: None,
        }
    }

    pub const fn dashed(mut self, dash: &'static str) -> Self {
        self.dash = Some(dash);
        self
    }

    fn attrs(&self) -> String {
        let mut out = format!(
            "stroke=\"{}\" stroke-width=\"{}\"",
            self.color,
            num(self.width)
        );
        if let Some(dash) = self.dash {
            let _ = write!(out, " stroke-dasharray=\"{dash}\"");
        }
        out
    }
}

/// The document being written.
pub(super) struct Svg {
    out: String,
}

impl Svg {
    /// A `width` × `height` document titled `title`, on a white background (so a dark page
    /// around it does not show through).
    pub fn new(width: f64, height: f64, title: &str) -> Self {
        let mut svg = Self {
            out: String::with_capacity(64 * 1024),
        };
        let (w, h) = (num(width), num(height));
        svg.out
            .push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        let _ = writeln!(
            svg.out,
            "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" \
             viewBox=\"0 0 {w} {h}\" font-family=\"{FONT_FAMILY}\">"
        );
        let _ = writeln!(svg.out, "<title>{}</title>", escape(title));
        svg.rect(0.0, 0.0, width, height, "#ffffff", "");
        svg
    }

    pub fn finish(mut self) -> String {
        self.out.push_str("</svg>\n");
        self.out
    }

    pub fn group(&mut self, class: &str) {
        let _ = writeln!(self.out, "<g{}>", class_attr(class));
    }

    pub fn end_group(&mut self) {
        self.out.push_str("</g>\n");
    }

    /// A filled rectangle; `extra` is more attributes, written as given.
    pub fn rect(&mut self, x: f64, y: f64, w: f64, h: f64, fill: &str, extra: &str) {
        let _ = writeln!(
            self.out,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"{fill}\"{}{extra}/>",
            num(x),
            num(y),
            num(w.max(0.0)),
            num(h.max(0.0)),
            if extra.is_empty() { "" } else { " " },
        );
    }

    /// A rectangle's outline.
    pub fn frame(&mut self, x: f64, y: f64, w: f64, h: f64, stroke: Stroke) {
        let _ = writeln!(
            self.out,
            "<rect x=\"{}\" y=\"{}\" width=\"{}\" height=\"{}\" fill=\"none\" {}/>",
            num(x),
            num(y),
            num(w.max(0.0)),
            num(h.max(0.0)),
            stroke.attrs(),
        );
    }

    pub fn line(&mut self, from: (f64, f64), to: (f64, f64), stroke: Stroke, class: &str) {
        let _ = writeln!(
            self.out,
            "<line x1=\"{}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" {}{}/>",
            num(from.0),
            num(from.1),
            num(to.0),
            num(to.1),
            stroke.attrs(),
            class_attr(class),
        );
    }

    pub fn polyline(&mut self, points: &[(f64, f64)], stroke: Stroke, class: &str) {
        let _ = writeln!(
            self.out,
            "<polyline points=\"{}\" fill=\"none\" {} stroke-linejoin=\"round\"{}/>",
            point_list(points),
            stroke.attrs(),
            class_attr(class),
        );
    }

    pub fn polygon(&mut self, points: &[(f64, f64)], fill: &str, opacity: f64, class: &str) {
        let _ = writeln!(
            self.out,
            "<polygon points=\"{}\" fill=\"{fill}\" fill-opacity=\"{}\" stroke=\"none\"{}/>",
            point_list(points),
            num_fine(opacity),
            class_attr(class),
        );
    }

    pub fn text(&mut self, x: f64, y: f64, font: Font, class: &str, text: &str) {
        self.text_with(x, y, font, class, "", text);
    }

    /// Text turned a quarter left around its anchor, for a y-axis title.
    pub fn text_up(&mut self, x: f64, y: f64, font: Font, text: &str) {
        let transform = format!("transform=\"rotate(-90 {} {})\"", num(x), num(y));
        self.text_with(x, y, font, "", &transform, text);
    }

    fn text_with(&mut self, x: f64, y: f64, font: Font, class: &str, extra: &str, text: &str) {
        let anchor = match font.anchor {
            Anchor::Start => "start",
            Anchor::Middle => "middle",
            Anchor::End => "end",
        };
        let _ = write!(
            self.out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"{anchor}\" font-size=\"{}\" fill=\"{}\"",
            num(x),
            num(y),
            num(font.size),
            font.fill,
        );
        if font.bold {
            self.out.push_str(" font-weight=\"bold\"");
        }
        if font.halo {
            self.out.push_str(
                " stroke=\"#ffffff\" stroke-width=\"3\" stroke-linejoin=\"round\" paint-order=\"stroke\"",
            );
        }
        if !extra.is_empty() {
            let _ = write!(self.out, " {extra}");
        }
        let _ = writeln!(self.out, "{}>{}</text>", class_attr(class), escape(text));
    }
}

fn class_attr(class: &str) -> String {
    if class.is_empty() {
        String::new()
    } else {
        format!(" class=\"{}\"", escape(class))
    }
}

fn point_list(points: &[(f64, f64)]) -> String {
    let mut out = String::with_capacity(points.len() * 12);
    for (i, &(x, y)) in points.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{},{}", num(x), num(y));
    }
    out
}

/// A coordinate as written into the SVG: one decimal, clamped to a sane range, and never
/// NaN or infinite (those become 0).
pub(super) fn num(v: f64) -> String {
    let v = if v.is_finite() {
        v.clamp(-1e6, 1e6)
    } else {
        0.0
    };
    let s = format!("{v:.1}");
    match s.strip_suffix(".0") {
        Some("-0") => "0".to_string(),
        Some(whole) => whole.to_string(),
        None if s == "-0.0" => "0".to_string(),
        None => s,
    }
}

/// A number in [0, 1] (an opacity), with two decimals.
fn num_fine(v: f64) -> String {
    let v = if v.is_finite() {
        v.clamp(0.0, 1.0)
    } else {
        1.0
    };
    format!("{v:.2}")
}

/// `s` as XML character data or attribute text: markup escaped, line breaks made spaces,
/// and the characters XML 1.0 does not allow (most control characters) replaced.
pub(super) fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            '\t' | '\n' | '\r' => out.push(' '),
            c if (c as u32) < 0x20 || c == '\u{fffe}' || c == '\u{ffff}' => out.push('\u{fffd}'),
            c => out.push(c),
        }
    }
    out
}

/// The horizontal extents labels on one row take, so that the next one does not overlap
/// them or leave `[lo, hi]`.
pub(super) struct LabelRow {
    lo: f64,
    hi: f64,
    taken: Vec<(f64, f64)>,
}

impl LabelRow {
    /// Room between two labels.
    const GAP: f64 = 4.0;

    pub fn new(lo: f64, hi: f64) -> Self {
        Self {
            lo,
            hi,
            taken: Vec::new(),
        }
    }

    /// Takes `extent` if it lies within the row and clear of the labels already on it.
    pub fn take(&mut self, (x0, x1): (f64, f64)) -> bool {
        if !(x0.is_finite() && x1.is_finite()) || x0 < self.lo || x1 > self.hi {
            return false;
        }
        if self
            .taken
            .iter()
            .any(|&(a, b)| x0 < b + Self::GAP && a < x1 + Self::GAP)
        {
            return false;
        }
        self.taken.push((x0, x1));
        true
    }
}
