//! A lock-free latency histogram: log-linear buckets (16 per power of two, so a reported
//! percentile is within ~4.5 % of the true value), recorded from many threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Sub-buckets per power of two.
const SUB_BITS: u32 = 4;
const SUB: u64 = 1 << SUB_BITS;
/// Covers 0 ns ..= 2^40 ns (about 18 minutes); longer values land in the last bucket.
const BUCKETS: usize = (41 * SUB) as usize;

pub struct LatencyHistogram {
    buckets: Box<[AtomicU64]>,
}

/// Percentiles of a histogram, in microseconds.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LatencySummary {
    pub count: u64,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        Self {
            buckets: (0..BUCKETS).map(|_| AtomicU64::new(0)).collect(),
        }
    }
}

fn bucket_of(ns: u64) -> usize {
    if ns < SUB {
        return ns as usize;
    }
    let power = 63 - ns.leading_zeros(); // ≥ SUB_BITS
    let sub = (ns >> (power - SUB_BITS)) & (SUB - 1);
    (((power - SUB_BITS + 1) as u64 * SUB + sub) as usize).min(BUCKETS - 1)
}

/// The largest value that falls in `bucket`.
fn upper_of(bucket: usize) -> u64 {
    let bucket = bucket as u64;
    if bucket < SUB {
        return bucket;
    }
    let power = bucket / SUB - 1 + u64::from(SUB_BITS);
    let sub = bucket % SUB;
    ((SUB + sub + 1) << (power - u64::from(SUB_BITS))) - 1
}

impl LatencyHistogram {
    pub fn record(&self, elapsed: Duration) {
        let ns = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.buckets[bucket_of(ns)].fetch_add(1, Ordering::Relaxed);
    }

    pub fn reset(&self) {
        for b in self.buckets.iter() {
            b.store(0, Ordering::Relaxed);
        }
    }

    pub fn summary(&self) -> LatencySummary {
        let counts: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| b.load(Ordering::Relaxed))
            .collect();
        let count: u64 = counts.iter().sum();
        if count == 0 {
            return LatencySummary::default();
        }
        let percentile = |p: f64| {
            let rank = ((count as f64 * p).ceil() as u64).clamp(1, count);
            let mut seen = 0;
            for (i, c) in counts.iter().enumerate() {
                seen += c;
                if seen >= rank {
                    return upper_of(i) as f64 / 1000.0;
                }
            }
            upper_of(BUCKETS - 1) as f64 / 1000.0
        };
        let max = counts.iter().rposition(|&c| c > 0).map_or(0, upper_of);
        LatencySummary {
            count,
            p50_us: percentile(0.50),
            p99_us: percentile(0.99),
            max_us: max as f64 / 1000.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_monotonic_and_bound_their_values() {
        let mut last = 0;
        for ns in (0..100_000u64).chain([1 << 20, 1 << 30, 1 << 39]) {
            let b = bucket_of(ns);
            assert!(b >= last || ns == 1 << 20, "ns {ns}");
            assert!(
                upper_of(b) >= ns,
                "ns {ns} bucket {b} upper {}",
                upper_of(b)
            );
            assert!(upper_of(b) as f64 <= ns as f64 * 1.07 + 1.0, "ns {ns}");
            last = b;
        }
    }

    #[test]
    fn percentiles_of_a_known_distribution() {
        let h = LatencyHistogram::default();
        for us in 1..=1000u64 {
            h.record(Duration::from_micros(us));
        }
        let s = h.summary();
        assert_eq!(s.count, 1000);
        assert!((s.p50_us - 500.0).abs() / 500.0 < 0.07, "{s:?}");
        assert!((s.p99_us - 990.0).abs() / 990.0 < 0.07, "{s:?}");
        assert!(s.max_us >= 1000.0 && s.max_us < 1070.0, "{s:?}");
        h.reset();
        assert_eq!(h.summary(), LatencySummary::default());
    }
}
