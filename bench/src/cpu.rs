//! Process CPU time, for "CPU seconds per GiB moved".
//!
//! `getrusage(RUSAGE_SELF)` counts every thread of the process. The benchmarks run the
//! source, the destination and the guest's vCPU threads in one process, so a delta covers
//! all of them: it is an upper bound on what one side would spend, and it is comparable
//! between ferry and the raw baseline only because both are measured the same way.

use std::time::Duration;

/// User plus system CPU time consumed by the whole process so far.
#[derive(Clone, Copy, Debug)]
pub struct CpuTime {
    user: Duration,
    system: Duration,
}

impl CpuTime {
    pub fn now() -> Self {
        // SAFETY: rusage is plain integers, so all-zero bytes are a valid value; the
        // pointer handed to getrusage is to that live, aligned, writable local, and
        // RUSAGE_SELF is a constant the call accepts.
        let (rc, usage) = unsafe {
            let mut usage: libc::rusage = std::mem::zeroed();
            let rc = libc::getrusage(libc::RUSAGE_SELF, &mut usage);
            (rc, usage)
        };
        assert_eq!(
            rc, 0,
            "getrusage(RUSAGE_SELF) cannot fail with valid arguments"
        );
        let tv = |t: libc::timeval| {
            Duration::from_secs(t.tv_sec as u64) + Duration::from_micros(t.tv_usec as u64)
        };
        Self {
            user: tv(usage.ru_utime),
            system: tv(usage.ru_stime),
        }
    }

    /// CPU seconds (user + system) spent since `earlier`.
    pub fn seconds_since(&self, earlier: &CpuTime) -> f64 {
        let user = self.user.saturating_sub(earlier.user);
        let system = self.system.saturating_sub(earlier.system);
        (user + system).as_secs_f64()
    }
}
