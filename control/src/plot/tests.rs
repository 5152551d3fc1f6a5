use ferry_dataplane::engine::timeline::PauseSpan;
use proptest::prelude::*;

use super::svg::{escape, num};
use super::*;

fn sample(t_ms: f64, phase: Phase, memory: u64, disk: u64, mirrored: u64) -> TimelineSample {
    TimelineSample {
        t_ms,
        phase: Some(phase),
        round: 0,
        memory_bytes: memory,
        disk_copy_bytes: disk,
        disk_mirrored_bytes: mirrored,
    }
}

fn round(n: u32, start_ms: f64, end_ms: f64, dirty_mib: u64, throttle: u8) -> RoundRecord {
    RoundRecord {
        round: n,
        start_ms,
        end_ms,
        pages: 1000,
        bytes: 1000 * PAGE_SIZE as u64,
        dirty_pages_after: dirty_mib * (1 << 20) / PAGE_SIZE as u64,
        bandwidth_bytes_per_s: 2.0 * GIB,
        predicted_downtime_ms: dirty_mib as f64 / 2048.0 * 1e3,
        throttle_percent: throttle,
        ..RoundRecord::default()
    }
}

/// Disk copy 0–500 ms at 2 GiB/s, rounds 0..3 from 500 ms, a 2.6 ms pause at the end.
fn synthetic() -> Timeline {
    let mut samples = Vec::new();
    let disk = (1u64 << 30) / 100; // per 5 ms: 2 GiB/s
    let memory = (1u64 << 30) / 80; // per 5 ms: 2.5 GiB/s
    for i in 0..=100u64 {
        samples.push(sample(i as f64 * 5.0, Phase::DiskCopy, 0, i * disk, 0));
    }
    for i in 1..=140u64 {
        samples.push(sample(
            500.0 + i as f64 * 5.0,
            Phase::MemoryPreCopy,
            i * memory,
            100 * disk,
            i * 4096,
        ));
    }
    let last = *samples.last().unwrap();
    samples.push(TimelineSample {
        t_ms: 1201.0,
        phase: Some(Phase::SwitchOver),
        ..last
    });
    samples.push(TimelineSample {
        t_ms: 1205.0,
        memory_bytes: last.memory_bytes + (4 << 20),
        ..samples[samples.len() - 1]
    });
    Timeline {
        samples,
        rounds: vec![
            round(0, 500.0, 1000.0, 300, 0),
            round(1, 1000.0, 1120.0, 60, 0),
            round(2, 1120.0, 1180.0, 12, 20),
            round(3, 1180.0, 1200.0, 4, 40),
        ],
        pause: Some(PauseSpan {
            start_ms: 1202.0,
            end_ms: 1204.6,
            pages: 1024,
        }),
        total_ms: 1206.0,
    }
}

/// Parses `svg`, and checks that no number in it went wrong.
fn parse(svg: &str) -> roxmltree::Document<'_> {
    assert!(!svg.contains("NaN"), "NaN in the SVG");
    assert!(!svg.contains("inf"), "inf in the SVG");
    roxmltree::Document::parse(svg).unwrap_or_else(|e| panic!("invalid XML: {e}\n{svg}"))
}

fn has_class(node: &roxmltree::Node, class: &str) -> bool {
    node.attribute("class")
        .is_some_and(|c| c.split_whitespace().any(|w| w == class))
}

fn with_class<'a>(
    doc: &'a roxmltree::Document,
    tag: &str,
    class: &str,
) -> Vec<roxmltree::Node<'a, 'a>> {
    doc.descendants()
        .filter(|n| n.has_tag_name(tag) && has_class(n, class))
        .collect()
}

fn texts(doc: &roxmltree::Document, class: &str) -> Vec<String> {
    with_class(doc, "text", class)
        .iter()
        .map(|n| n.text().unwrap_or_default().to_string())
        .collect()
}

fn attr(node: &roxmltree::Node, name: &str) -> f64 {
    node.attribute(name).unwrap().parse().unwrap()
}

#[test]
fn renders_a_synthetic_migration() {
    let svg = render_svg(&synthetic(), "a<b & \"c\"");
    let doc = parse(&svg);
    assert_eq!(doc.root_element().tag_name().name(), "svg");

    // The title, escaped in the text and read back whole.
    assert!(svg.contains("a&lt;b &amp; &quot;c&quot;"));
    assert_eq!(texts(&doc, "title"), vec!["a<b & \"c\""]);
    let subtitle = &texts(&doc, "subtitle")[0];
    assert!(subtitle.contains("total 1.21 s"), "{subtitle}");
    assert!(subtitle.contains("pause 2.6 ms"), "{subtitle}");
    assert!(subtitle.contains("4 pre-copy rounds"), "{subtitle}");

    // One pause band, wide enough to see, and its length written.
    let pause = with_class(&doc, "rect", "pause");
    assert_eq!(pause.len(), 1);
    assert!(attr(&pause[0], "width") >= PAUSE_WIDTH_MIN);
    assert_eq!(texts(&doc, "pause-label"), vec!["pause 2.6 ms"]);

    // One bar per round, labelled, with the throttle where there was one.
    assert_eq!(with_class(&doc, "rect", "bar").len(), 4);
    assert_eq!(texts(&doc, "bar-label"), vec!["r0", "r1", "r2", "r3"]);
    assert_eq!(
        texts(&doc, "throttle"),
        vec!["throttle 20 %", "throttle 40 %"]
    );
    assert_eq!(texts(&doc, "predicted").len(), 4);
    // The bars shrink with the dirty set (a taller bar has a smaller y).
    let ys: Vec<f64> = with_class(&doc, "rect", "bar")
        .iter()
        .map(|n| attr(n, "y"))
        .collect();
    assert!(ys.windows(2).all(|w| w[0] < w[1]), "{ys:?}");

    // Round labels on the time axis (the short late rounds may lack room), one
    // boundary per round start plus the end of the last.
    let rounds = texts(&doc, "round-label");
    assert!(
        rounds.starts_with(&["r0".to_string(), "r1".to_string()]),
        "{rounds:?}"
    );
    assert_eq!(with_class(&doc, "line", "round-boundary").len(), 5);

    // Three lanes, the three phases named.
    for lane in ["memory", "disk-copy", "disk-mirror"] {
        assert_eq!(with_class(&doc, "polyline", lane).len(), 1, "{lane}");
    }
    let phases = texts(&doc, "phase-label");
    assert_eq!(phases, vec!["disk-copy", "pre-copy", "switch-over"]);
}

#[test]
fn collections_with_the_vcpus_stopped_are_marked() {
    let mut timeline = synthetic();
    let plain = render_svg(&timeline, "t");
    assert!(with_class(&parse(&plain), "rect", "collect-stop").is_empty());
    // Rounds 1 and 2 closed with a stopped collection of 2.5 and 3.2 ms.
    for (r, ms) in [(1usize, 2.5), (2, 3.2)] {
        timeline.rounds[r].collect_paused = true;
        timeline.rounds[r].collect_ms = ms;
    }
    timeline.rounds[3].collect_ms = 40.0; // ran under the vCPUs: not marked
    let marked = render_svg(&timeline, "t");
    let doc = parse(&marked);
    let ticks = with_class(&doc, "rect", "collect-stop");
    assert_eq!(ticks.len(), 2);
    for (tick, r) in ticks.iter().zip([1usize, 2]) {
        // Visible, and ending at its round's end.
        assert!(attr(tick, "width") >= STOP_TICK_WIDTH_MIN);
        let end = attr(tick, "x") + attr(tick, "width");
        let expected = LEFT + timeline.rounds[r].end_ms / span_ms(&timeline) * (RIGHT - LEFT);
        assert!((end - expected).abs() < 0.5, "{end} vs {expected}");
    }
    let subtitle = &texts(&doc, "subtitle")[0];
    assert!(
        subtitle.contains("2 collection stops, longest 3.2 ms"),
        "{subtitle}"
    );
    assert!(svg_text(&doc).contains("vCPUs stopped to collect"));
}

fn svg_text(doc: &roxmltree::Document) -> String {
    doc.descendants()
        .filter_map(|n| n.text())
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn rate_series_is_the_exact_rate_between_samples() {
    let gib = 1u64 << 30;
    let samples = [
        sample(0.0, Phase::MemoryPreCopy, 0, 0, 0),
        sample(1000.0, Phase::MemoryPreCopy, gib, 0, 0),
        sample(1500.0, Phase::MemoryPreCopy, gib + gib / 2, 0, 0),
        // Same time again: skipped. Then a counter going backwards: no bytes.
        sample(1500.0, Phase::MemoryPreCopy, 2 * gib, 0, 0),
        sample(1750.0, Phase::MemoryPreCopy, gib, 0, 0),
    ];
    assert_eq!(
        rate_series(&samples, Lane::Memory),
        vec![(500.0, GIB), (1250.0, GIB), (1625.0, 0.0)]
    );
    assert_eq!(
        rate_series(&samples, Lane::DiskCopy),
        vec![(500.0, 0.0), (1250.0, 0.0), (1625.0, 0.0)]
    );
    assert!(rate_series(&samples[..1], Lane::Memory).is_empty());
    assert!(rate_series(&[], Lane::Memory).is_empty());
}

#[test]
fn a_constant_rate_smooths_to_itself() {
    // 1 MB/s in 5 ms samples: 5000 bytes each.
    let samples: Vec<TimelineSample> = (0..=200u64)
        .map(|i| sample(i as f64 * 5.0, Phase::DiskCopy, 0, i * 5000, 0))
        .collect();
    let curve = smoothed_rate_series(&samples, Lane::DiskCopy, 10.0);
    assert!(!curve.is_empty() && curve.len() <= CURVE_POINTS_MAX);
    assert_eq!(curve[0].0, 0.0);
    assert_eq!(curve[curve.len() - 1].0, 1000.0);
    for &(t, r) in &curve {
        assert!((r - 1e6).abs() < 1e-6, "{r} at {t}");
    }
    // Two samples a GiB and a second apart: 1 GiB/s everywhere between.
    let two = [
        sample(0.0, Phase::MemoryPreCopy, 0, 0, 0),
        sample(1000.0, Phase::MemoryPreCopy, 1 << 30, 0, 0),
    ];
    let curve = smoothed_rate_series(&two, Lane::Memory, 10.0);
    assert!(curve.len() > 2);
    for &(t, r) in &curve {
        assert!((r / GIB - 1.0).abs() < 1e-12, "{r} at {t}");
    }
    // A step smooths into a ramp as wide as the window, centred on the step.
    let step = [
        sample(0.0, Phase::MemoryPreCopy, 0, 0, 0),
        sample(100.0, Phase::MemoryPreCopy, 0, 0, 0),
        sample(200.0, Phase::MemoryPreCopy, 100_000, 0, 0),
    ];
    let curve = smoothed_rate_series(&step, Lane::Memory, 30.0);
    let at = |t: f64| curve.iter().find(|p| p.0 == t).unwrap().1;
    let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs().max(1.0);
    assert_eq!(at(80.0), 0.0);
    assert!(close(at(100.0), 0.5e6), "{}", at(100.0));
    assert!(close(at(120.0), 1e6), "{}", at(120.0));
}

#[test]
fn smoothing_window_scales_with_the_span() {
    assert_eq!(smoothing_window_ms(300.0), 10.0);
    assert_eq!(smoothing_window_ms(60_000.0), 400.0);
    assert_eq!(smoothing_window_ms(f64::NAN), 10.0);
}

#[test]
fn the_rate_line_sits_on_its_axis_value() {
    let timeline = Timeline {
        samples: vec![
            sample(0.0, Phase::MemoryPreCopy, 0, 0, 0),
            sample(1000.0, Phase::MemoryPreCopy, 1 << 30, 0, 0),
        ],
        total_ms: 1000.0,
        ..Timeline::default()
    };
    let svg = render_svg(&timeline, "1 GiB/s");
    let doc = parse(&svg);
    let tick = doc
        .descendants()
        .filter(|n| has_class(n, "y-tick"))
        .find(|g| g.descendants().any(|n| n.text() == Some("1.0")))
        .expect("a tick at 1.0 GiB/s");
    let line = tick.children().find(|n| n.has_tag_name("line")).unwrap();
    let tick_y = attr(&line, "y1");
    let curve = &with_class(&doc, "polyline", "memory")[0];
    let points = curve.attribute("points").unwrap();
    let mut n = 0;
    for point in points.split_whitespace() {
        let (x, y) = point.split_once(',').unwrap();
        let (x, y): (f64, f64) = (x.parse().unwrap(), y.parse().unwrap());
        assert!(
            (y - tick_y).abs() < 0.11,
            "point {x},{y} vs tick at {tick_y}"
        );
        n += 1;
    }
    assert!(n > 2);
    assert_eq!(texts(&doc, "empty"), vec!["no pre-copy rounds"]);
}

#[test]
fn a_wide_dirty_range_goes_log_and_says_so() {
    let mut timeline = synthetic();
    timeline.rounds[3].dirty_pages_after = 1; // 4 KiB against 300 MiB
    let svg = render_svg(&timeline, "log");
    let doc = parse(&svg);
    assert!(doc.descendants().any(|n| n.text() == Some("MiB (log)")));
    // Bars still shrink round after round.
    let ys: Vec<f64> = with_class(&doc, "rect", "bar")
        .iter()
        .map(|n| attr(n, "y"))
        .collect();
    assert!(ys.windows(2).all(|w| w[0] < w[1]), "{ys:?}");
    // The synthetic one spans 75×: linear.
    let svg = render_svg(&synthetic(), "linear");
    assert!(!svg.contains("MiB (log)"));
}

#[test]
fn edge_cases_render_valid_svg() {
    let nan_round = RoundRecord {
        start_ms: f64::NAN,
        end_ms: f64::INFINITY,
        bandwidth_bytes_per_s: f64::NAN,
        predicted_downtime_ms: f64::INFINITY,
        throttle_percent: 255,
        dirty_pages_after: u64::MAX,
        ..RoundRecord::default()
    };
    let huge = TimelineSample {
        t_ms: 1e300,
        phase: Some(Phase::FailedBack),
        round: u32::MAX,
        memory_bytes: u64::MAX,
        disk_copy_bytes: u64::MAX,
        disk_mirrored_bytes: u64::MAX,
    };
    let cases = [
        ("empty", Timeline::default()),
        (
            "one sample",
            Timeline {
                samples: vec![sample(3.0, Phase::MemoryPreCopy, 10, 0, 0)],
                total_ms: 3.0,
                ..Timeline::default()
            },
        ),
        (
            "zero duration",
            Timeline {
                samples: vec![sample(0.0, Phase::Prepare, 0, 0, 0); 3],
                rounds: vec![round(0, 0.0, 0.0, 0, 0)],
                pause: Some(PauseSpan::default()),
                total_ms: 0.0,
            },
        ),
        (
            "no rounds, no pause",
            Timeline {
                rounds: Vec::new(),
                pause: None,
                ..synthetic()
            },
        ),
        (
            "non-finite everything",
            Timeline {
                samples: vec![
                    sample(f64::NAN, Phase::DiskCopy, 5, 5, 5),
                    sample(f64::NEG_INFINITY, Phase::DiskCopy, 5, 5, 5),
                    sample(1.0, Phase::DiskCopy, 1, 1, 1),
                ],
                rounds: vec![nan_round, nan_round],
                pause: Some(PauseSpan {
                    start_ms: f64::NAN,
                    end_ms: f64::INFINITY,
                    pages: 0,
                }),
                total_ms: f64::NAN,
            },
        ),
        (
            "huge numbers",
            Timeline {
                samples: vec![sample(0.0, Phase::DiskCopy, 0, 0, 0), huge],
                rounds: vec![
                    RoundRecord {
                        end_ms: f64::MAX,
                        bandwidth_bytes_per_s: f64::MAX,
                        predicted_downtime_ms: f64::MAX,
                        ..nan_round
                    },
                    round(1, 0.0, 1.0, 0, 0),
                ],
                pause: Some(PauseSpan {
                    start_ms: 0.0,
                    end_ms: f64::MAX,
                    pages: u64::MAX,
                }),
                total_ms: f64::MAX,
            },
        ),
        (
            "out of order, going backwards",
            Timeline {
                samples: vec![
                    sample(50.0, Phase::MemoryPreCopy, 500, 0, 0),
                    sample(10.0, Phase::DiskCopy, 900, 7, 0),
                    sample(30.0, Phase::MemoryPreCopy, 100, 0, 0),
                    sample(1e-300, Phase::DiskCopy, 0, 0, 0),
                    sample(2e-300, Phase::DiskCopy, u64::MAX, 0, 0),
                ],
                rounds: vec![round(0, 40.0, 20.0, 1, 0)],
                pause: Some(PauseSpan {
                    start_ms: 45.0,
                    end_ms: 44.0,
                    pages: 0,
                }),
                total_ms: 10.0,
            },
        ),
    ];
    for (name, timeline) in cases {
        let svg = render_svg(&timeline, name);
        let doc = parse(&svg);
        assert_eq!(
            with_class(&doc, "rect", "bar").len(),
            timeline.rounds.len(),
            "{name}"
        );
        assert_eq!(
            with_class(&doc, "rect", "pause").len(),
            usize::from(timeline.pause.is_some()),
            "{name}"
        );
    }
    let empty = render_svg(&Timeline::default(), "");
    let doc = parse(&empty);
    assert_eq!(
        texts(&doc, "empty"),
        vec!["not enough samples for a rate", "no pre-copy rounds"]
    );
}

#[test]
fn write_svg_replaces_the_file_whole() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plot.svg");
    std::fs::write(&path, "old").unwrap();
    write_svg(&path, &synthetic(), "t").unwrap();
    assert_eq!(
        std::fs::read_to_string(&path).unwrap(),
        render_svg(&synthetic(), "t")
    );
    // Nothing left beside it.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    // A directory that does not exist: an error, not a panic.
    assert!(write_svg(&dir.path().join("no/such.svg"), &synthetic(), "t").is_err());
    assert!(write_svg(Path::new("/"), &synthetic(), "t").is_err());
}

#[test]
fn numbers_read_well() {
    assert_eq!(fmt_ms(2.6), "2.6 ms");
    assert_eq!(fmt_ms(0.35), "0.35 ms");
    assert_eq!(fmt_ms(412.4), "412 ms");
    assert_eq!(fmt_ms(1234.0), "1.23 s");
    assert_eq!(fmt_ms(62_100.0), "62.1 s");
    assert_eq!(fmt_bytes(3.5 * GIB), "3.50 GiB");
    assert_eq!(fmt_bytes(512.0), "512 B");
    assert_eq!(nice_axis(1.05, 5), (1.2, 0.2));
    assert_eq!(nice_axis(1493.0, 8), (1600.0, 200.0));
    assert_eq!(nice_axis(0.0, 5), (1.0, 0.2));
    assert_eq!(fmt_tick(1.0, 0.2), "1.0");
    assert_eq!(fmt_tick(400.0, 200.0), "400");
    assert_eq!(num(f64::NAN), "0");
    assert_eq!(num(-0.01), "0");
    assert_eq!(num(12.345), "12.3");
    assert_eq!(fmt_value(310.2), "310");
    assert_eq!(fmt_value(5.5), "5.5");
    assert_eq!(fmt_value(0.0039), "0.0039");
    assert_eq!(
        escape("a<b>&'\"\u{1}"),
        "a&lt;b&gt;&amp;&apos;&quot;\u{fffd}"
    );
}

fn phase() -> impl Strategy<Value = Option<Phase>> {
    prop_oneof![
        Just(None),
        Just(Some(Phase::Prepare)),
        Just(Some(Phase::DiskCopy)),
        Just(Some(Phase::MemoryPreCopy)),
        Just(Some(Phase::SwitchOver)),
        Just(Some(Phase::Done)),
    ]
}

fn float() -> impl Strategy<Value = f64> {
    prop_oneof![
        4 => 0.0..1e5f64,
        1 => Just(f64::NAN),
        1 => Just(f64::INFINITY),
        1 => Just(f64::MAX),
        1 => Just(0.0),
    ]
}

fn round_record() -> impl Strategy<Value = RoundRecord> {
    (
        any::<u32>(),
        float(),
        float(),
        any::<u64>(),
        float(),
        float(),
        any::<u8>(),
    )
        .prop_map(
            |(round, start_ms, len_ms, dirty, bw, predicted, throttle)| RoundRecord {
                round,
                start_ms,
                end_ms: start_ms + len_ms,
                pages: 0,
                bytes: 0,
                dirty_pages_after: dirty >> (dirty % 64),
                bandwidth_bytes_per_s: bw,
                predicted_downtime_ms: predicted,
                throttle_percent: throttle,
                ..RoundRecord::default()
            },
        )
}

proptest! {
    #[test]
    fn arbitrary_monotone_timelines_render_valid_svg(
        steps in prop::collection::vec(
            (0.0..500.0f64, phase(), 0u64..1 << 32, 0u64..1 << 32, 0u64..1 << 24),
            0..120,
        ),
        rounds in prop::collection::vec(round_record(), 0..40),
        pause in prop::option::of((0.0..1e5f64, 0.0..100.0f64)),
        total_ms in float(),
        title in ".{0,40}",
    ) {
        let mut samples = Vec::new();
        let mut s = TimelineSample::default();
        for (dt, phase, memory, disk, mirrored) in steps {
            s.t_ms += dt;
            s.phase = phase;
            s.memory_bytes = s.memory_bytes.saturating_add(memory);
            s.disk_copy_bytes = s.disk_copy_bytes.saturating_add(disk);
            s.disk_mirrored_bytes = s.disk_mirrored_bytes.saturating_add(mirrored);
            samples.push(s);
        }
        let timeline = Timeline {
            samples,
            rounds,
            pause: pause.map(|(start_ms, len_ms)| PauseSpan {
                start_ms,
                end_ms: start_ms + len_ms,
                pages: 0,
            }),
            total_ms,
        };
        let svg = render_svg(&timeline, &title);
        // The title is the only text not ours: strip it before looking for bad numbers.
        let escaped = escape(&title);
        let body = svg.replace(&escaped, "");
        prop_assert!(!body.contains("NaN") && !body.contains("inf"), "{}", body);
        let doc = roxmltree::Document::parse(&svg);
        prop_assert!(doc.is_ok(), "{:?}", doc.err());
        let doc = doc.unwrap();
        prop_assert_eq!(
            doc.descendants().filter(|n| n.has_tag_name("rect") && has_class(n, "bar")).count(),
            timeline.rounds.len()
        );
    }
}
