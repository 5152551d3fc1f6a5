//! What a migration did over time, for plots (`ferry migrate --plot`, the benchmarks):
//! cumulative bytes per lane sampled every few milliseconds, one record per pre-copy round,
//! and the pause. Recorded by the source engine; carried in the [`super::MigrationReport`].
//!
//! Samples are cumulative counters, so a reader derives rates from any two of them and a
//! dropped sample loses resolution, not bytes. The recorder keeps at most
//! [`SAMPLES_MAX`] samples: when full, it drops every other one and doubles its interval,
//! so a long migration is covered end to end at a coarser grain.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::Phase;

/// Most samples a timeline keeps.
pub const SAMPLES_MAX: usize = 2048;
/// Interval between samples at the start (doubles whenever the buffer fills).
pub const SAMPLE_INTERVAL: Duration = Duration::from_millis(5);

/// One sample: counters since the migration started.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct TimelineSample {
    /// Time since the migration started.
    pub t_ms: f64,
    /// Phase at this instant (`None` before the first phase began).
    pub phase: Option<Phase>,
    /// Pre-copy round at this instant (meaningful in `MemoryPreCopy`).
    pub round: u32,
    /// Memory bytes put on the wire so far (pages and frame headers), all rounds.
    pub memory_bytes: u64,
    /// Disk bytes behind the bulk-copy cursors so far, all disks.
    pub disk_copy_bytes: u64,
    /// Guest disk writes mirrored so far, in bytes, all disks.
    pub disk_mirrored_bytes: u64,
}

/// One pre-copy round (round 0 = the full pass).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundRecord {
    pub round: u32,
    pub start_ms: f64,
    pub end_ms: f64,
    /// Pages the round sent (with payload or as zero markers) and the bytes on the wire.
    pub pages: u64,
    pub bytes: u64,
    /// Pages found dirty when the round ended: what the next round (or the pause) must send.
    pub dirty_pages_after: u64,
    /// Bandwidth the round measured: what the downtime prediction used.
    pub bandwidth_bytes_per_s: f64,
    /// Pause predicted at the end of the round.
    pub predicted_downtime_ms: f64,
    /// vCPU throttle applied during the round.
    pub throttle_percent: u8,
    /// The collection that ended the round: how long it took, and whether the vCPUs were
    /// stopped for it.
    #[serde(default)]
    pub collect_ms: f64,
    #[serde(default)]
    pub collect_paused: bool,
}

/// The pause: quiesce on the source to the destination's resume (as acknowledged).
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PauseSpan {
    pub start_ms: f64,
    pub end_ms: f64,
    /// Pages sent during the pause (the final stop-and-copy).
    pub pages: u64,
}

/// Everything a plot of one migration needs.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Timeline {
    pub samples: Vec<TimelineSample>,
    pub rounds: Vec<RoundRecord>,
    pub pause: Option<PauseSpan>,
    /// Time the migration took, start to resume on the destination.
    pub total_ms: f64,
}

/// Builds a [`Timeline`] while the migration runs.
#[derive(Debug)]
pub struct TimelineRecorder {
    start: Instant,
    interval: Duration,
    last_sample: Option<Instant>,
    timeline: Timeline,
}

impl TimelineRecorder {
    pub fn new(start: Instant) -> Self {
        Self {
            start,
            interval: SAMPLE_INTERVAL,
            last_sample: None,
            timeline: Timeline::default(),
        }
    }

    /// Milliseconds since the start, for `now`.
    pub fn ms(&self, now: Instant) -> f64 {
        now.saturating_duration_since(self.start).as_secs_f64() * 1e3
    }

    /// Records `sample` (its `t_ms` is set from `now`) if the interval has passed since the
    /// last one, or always when `force` (phase changes, round ends).
    pub fn sample(&mut self, now: Instant, mut sample: TimelineSample, force: bool) {
        if !force {
            if let Some(last) = self.last_sample {
                if now.saturating_duration_since(last) < self.interval {
                    return;
                }
            }
        }
        sample.t_ms = self.ms(now);
        self.last_sample = Some(now);
        if self.timeline.samples.len() >= SAMPLES_MAX {
            // Keep the first sample and every other one after it.
            let kept: Vec<TimelineSample> = self
                .timeline
                .samples
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 2 == 0)
                .map(|(_, s)| *s)
                .collect();
            self.timeline.samples = kept;
            self.interval *= 2;
        }
        self.timeline.samples.push(sample);
    }

    pub fn round(&mut self, record: RoundRecord) {
        self.timeline.rounds.push(record);
    }

    pub fn pause(&mut self, pause: PauseSpan) {
        self.timeline.pause = Some(pause);
    }

    /// The timeline, with `total_ms` set from `end`.
    pub fn finish(mut self, end: Instant) -> Timeline {
        self.timeline.total_ms = self.ms(end);
        self.timeline
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(bytes: u64) -> TimelineSample {
        TimelineSample {
            memory_bytes: bytes,
            phase: Some(Phase::MemoryPreCopy),
            ..TimelineSample::default()
        }
    }

    #[test]
    fn samples_no_faster_than_the_interval_unless_forced() {
        let start = Instant::now();
        let mut r = TimelineRecorder::new(start);
        r.sample(start, sample(1), false);
        r.sample(start + Duration::from_millis(1), sample(2), false);
        r.sample(start + Duration::from_millis(2), sample(3), true);
        r.sample(start + Duration::from_millis(8), sample(4), false);
        let t = r.finish(start + Duration::from_millis(10));
        let bytes: Vec<u64> = t.samples.iter().map(|s| s.memory_bytes).collect();
        assert_eq!(bytes, vec![1, 3, 4]);
        assert_eq!(t.samples[1].t_ms, 2.0);
        assert_eq!(t.total_ms, 10.0);
    }

    #[test]
    fn a_full_buffer_halves_and_keeps_covering_the_whole_migration() {
        let start = Instant::now();
        let mut r = TimelineRecorder::new(start);
        let n = SAMPLES_MAX as u64 * 3;
        for i in 0..n {
            r.sample(start + Duration::from_millis(i * 5), sample(i), true);
        }
        let t = r.finish(start + Duration::from_millis(n * 5));
        assert!(t.samples.len() <= SAMPLES_MAX);
        assert!(t.samples.len() >= SAMPLES_MAX / 2);
        assert_eq!(t.samples[0].memory_bytes, 0);
        assert_eq!(t.samples.last().unwrap().memory_bytes, n - 1);
        // Still in time order.
        assert!(t.samples.windows(2).all(|w| w[0].t_ms < w[1].t_ms));
    }
}
