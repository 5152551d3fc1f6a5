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

/// Clock ticks per second of the times in `/proc/.../stat` (`sysconf(_SC_CLK_TCK)`).
pub(crate) fn ticks_per_s() -> f64 {
    // SAFETY: sysconf takes no pointers; _SC_CLK_TCK is a valid name on Linux.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

/// The command name and user + system CPU seconds of a `/proc/<pid>/stat` or
/// `/proc/<pid>/task/<tid>/stat` line. The name is between the first `(` and the *last* `)`
/// (it may itself contain parentheses); utime and stime are fields 14 and 15.
pub(crate) fn parse_stat(line: &str) -> Option<(String, f64)> {
    let open = line.find('(')?;
    let close = line.rfind(')')?;
    let name = line.get(open + 1..close)?.to_string();
    // Fields after the name start at field 3 (state).
    let rest: Vec<&str> = line.get(close + 1..)?.split_whitespace().collect();
    let utime: u64 = rest.get(11)?.parse().ok()?;
    let stime: u64 = rest.get(12)?.parse().ok()?;
    Some((name, (utime + stime) as f64 / ticks_per_s()))
}

/// User + system CPU seconds of another process (all its threads), from `/proc/<pid>/stat`;
/// `None` once it has gone. Resolution: one clock tick (10 ms).
pub fn process_seconds(pid: u32) -> Option<f64> {
    let line = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    parse_stat(&line).map(|(_, s)| s)
}

/// Each thread of a process (`/proc/PID/task`, or `self`) whose stat could be read: its
/// id, name and CPU seconds. A thread that ended between the listing and the read is left
/// out.
pub fn threads_of(pid: &str) -> Vec<(u32, String, f64)> {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    tasks
        .flatten()
        .filter_map(|task| {
            let tid = task.file_name().to_str()?.parse::<u32>().ok()?;
            let line = std::fs::read_to_string(task.path().join("stat")).ok()?;
            let (name, seconds) = parse_stat(&line)?;
            Some((tid, name, seconds))
        })
        .collect()
}

/// CPU seconds of every thread of this process, by thread id, with the thread's name.
pub fn thread_seconds() -> std::collections::BTreeMap<u32, (String, f64)> {
    threads_of("self")
        .into_iter()
        .map(|(tid, name, seconds)| (tid, (name, seconds)))
        .collect()
}

/// CPU seconds each thread name spent between two [`thread_seconds`] snapshots (threads
/// born in between count from zero), busiest first.
pub fn thread_deltas(
    before: &std::collections::BTreeMap<u32, (String, f64)>,
    after: &std::collections::BTreeMap<u32, (String, f64)>,
) -> Vec<(String, f64)> {
    let mut by_name: std::collections::BTreeMap<String, f64> = Default::default();
    for (tid, (name, seconds)) in after {
        let earlier = before.get(tid).map_or(0.0, |(_, s)| *s);
        // The kernel names an io_uring worker after the thread whose request it serves:
        // "iou-wrk-<tid>". Name the thread instead, so the work is attributed to it.
        let name = match name
            .strip_prefix("iou-wrk-")
            .and_then(|t| t.parse::<u32>().ok())
            .and_then(|owner| after.get(&owner).or_else(|| before.get(&owner)))
        {
            Some((owner, _)) => format!("iou-wrk({owner})"),
            None => name.clone(),
        };
        *by_name.entry(name).or_default() += (seconds - earlier).max(0.0);
    }
    let mut v: Vec<(String, f64)> = by_name.into_iter().filter(|(_, s)| *s > 0.0).collect();
    v.sort_by(|a, b| b.1.total_cmp(&a.1));
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_names_parse() {
        let line =
            "1234 (qemu (x) d) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 3 0 5 0 0";
        let (name, seconds) = parse_stat(line).unwrap();
        assert_eq!(name, "qemu (x) d");
        assert!((seconds - 300.0 / ticks_per_s()).abs() < 1e-9);
        assert!(process_seconds(std::process::id()).is_some());
        assert!(!thread_seconds().is_empty());
    }
}
