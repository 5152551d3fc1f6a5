//! A shared bandwidth cap for the sending threads (`--max-bandwidth`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Spreads `bytes_per_s` over every thread that calls [`Pacer::acquire`]: each call books
/// its bytes on a shared ledger and sleeps until the ledger's schedule reaches them.
pub struct Pacer {
    bytes_per_s: Option<u64>,
    start: Instant,
    booked: AtomicU64,
}

impl Pacer {
    pub fn new(bytes_per_s: Option<u64>) -> Self {
        Self {
            bytes_per_s,
            start: Instant::now(),
            booked: AtomicU64::new(0),
        }
    }

    /// Waits until `bytes` more may be sent. Sleeps in slices of at most 50 ms and returns
    /// early (false) when `stop()` becomes true.
    pub fn acquire(&self, bytes: u64, stop: &dyn Fn() -> bool) -> bool {
        let Some(rate) = self.bytes_per_s else {
            return true;
        };
        let booked = self.booked.fetch_add(bytes, Ordering::Relaxed);
        let due = self.start + Duration::from_secs_f64(booked as f64 / rate as f64);
        loop {
            let now = Instant::now();
            if now >= due {
                return true;
            }
            if stop() {
                return false;
            }
            std::thread::sleep((due - now).min(Duration::from_millis(50)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_the_rate() {
        let pacer = Pacer::new(Some(10 << 20));
        let start = Instant::now();
        for _ in 0..4 {
            assert!(pacer.acquire(1 << 20, &|| false));
        }
        // The 4th MiB is due at 0.3 s at 10 MiB/s.
        assert!(
            start.elapsed() >= Duration::from_millis(290),
            "{:?}",
            start.elapsed()
        );
        assert!(Pacer::new(None).acquire(u64::MAX, &|| false));
        let stopped = Pacer::new(Some(1));
        stopped.acquire(1000, &|| false);
        assert!(!stopped.acquire(1000, &|| true));
    }
}
