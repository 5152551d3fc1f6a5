//! CPU time of other processes minus their vCPU threads, from `/proc`.
//!
//! "CPU per GiB migrated" must count what the migration costs the two hosts and not what
//! the guest itself runs: for QEMU every thread of both processes except `CPU n/TCG`, for
//! ferry every thread of both agents except the reference VM's `ferry-vcpu*`.
//!
//! A process's own `/proc/PID/stat` includes threads that have already exited (QEMU's
//! multifd threads, ferry's per-migration senders and receivers end with the migration),
//! but a vCPU thread can exit too (the source's reference VM goes once handed over). So a
//! [`CpuMeter`] takes the process totals at both ends and polls the vCPU threads while
//! the migration runs, keeping the last figure each one showed: the migration's CPU is
//! the process delta minus the vCPU threads' deltas. It also keeps the process totals it
//! polled, so a caller can read a process's CPU at an instant inside the window.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cpu::{process_seconds, threads_of};

/// Tells a process's vCPU threads by name.
pub type IsVcpu = fn(&str) -> bool;

/// How often the meter polls.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// One watched process.
struct Watched {
    pid: u32,
    is_vcpu: IsVcpu,
    process_start_s: f64,
    /// Per vCPU thread: CPU seconds when first seen (0 for one born inside the window)
    /// and the latest.
    vcpus: BTreeMap<u32, (f64, f64)>,
    /// Threads known not to be vCPUs (their names are read once).
    others: std::collections::BTreeSet<u32>,
    /// (time since the meter started, process CPU seconds).
    samples: Vec<(Duration, f64)>,
}

impl Watched {
    fn new(pid: u32, is_vcpu: IsVcpu) -> Self {
        let mut w = Self {
            pid,
            is_vcpu,
            process_start_s: process_seconds(pid).unwrap_or(0.0),
            vcpus: BTreeMap::new(),
            others: Default::default(),
            samples: Vec::new(),
        };
        w.poll_threads(true);
        w
    }

    /// Reads the vCPU threads; `initial`: threads present now count from their current
    /// figure, later ones from zero.
    fn poll_threads(&mut self, initial: bool) {
        for (tid, name, seconds) in threads_of(&self.pid.to_string()) {
            if self.others.contains(&tid) {
                continue;
            }
            if !(self.is_vcpu)(&name) {
                self.others.insert(tid);
                continue;
            }
            let first = if initial { seconds } else { 0.0 };
            self.vcpus.entry(tid).or_insert((first, seconds)).1 = seconds;
        }
    }

    fn poll(&mut self, since: Instant) {
        self.poll_threads(false);
        if let Some(s) = process_seconds(self.pid) {
            self.samples.push((since.elapsed(), s));
        }
    }
}

/// The CPU a process spent over a [`CpuMeter`]'s window.
#[derive(Clone, Debug, Default)]
pub struct ProcessCpu {
    /// Every thread, exited ones included.
    pub total_s: f64,
    /// The vCPU threads.
    pub vcpu_s: f64,
    /// (time since the window opened, process CPU seconds since then), every poll.
    pub samples: Vec<(Duration, f64)>,
}

impl ProcessCpu {
    /// What the process spent outside its vCPU threads.
    pub fn migration_s(&self) -> f64 {
        (self.total_s - self.vcpu_s).max(0.0)
    }

    /// Process CPU (vCPUs included) spent by `at` into the window: the last poll at or
    /// before it (an underestimate by at most one poll interval).
    pub fn total_by(&self, at: Duration) -> f64 {
        self.samples
            .iter()
            .take_while(|(t, _)| *t <= at)
            .last()
            .map_or(0.0, |(_, s)| *s)
    }
}

/// Meters the CPU of some processes from [`CpuMeter::start`] to [`CpuMeter::finish`].
pub struct CpuMeter {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Vec<Watched>>,
}

impl CpuMeter {
    /// Opens the window: reads each process's total and vCPU threads now, then polls every
    /// [`POLL_INTERVAL`] on a thread of its own.
    pub fn start(processes: &[(u32, IsVcpu)]) -> anyhow::Result<Self> {
        let mut watched: Vec<Watched> = processes
            .iter()
            .map(|&(pid, is_vcpu)| Watched::new(pid, is_vcpu))
            .collect();
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = Arc::clone(&stop);
        let handle = std::thread::Builder::new()
            .name("bench-cpu-meter".into())
            .spawn(move || {
                let started = Instant::now();
                while !stopping.load(Ordering::Relaxed) {
                    std::thread::sleep(POLL_INTERVAL);
                    for w in &mut watched {
                        w.poll(started);
                    }
                }
                // One last reading, after the caller's window closed.
                for w in &mut watched {
                    w.poll(started);
                }
                watched
            })?;
        Ok(Self { stop, handle })
    }

    /// Closes the window: per process, in the order given to [`CpuMeter::start`].
    pub fn finish(self) -> Vec<ProcessCpu> {
        self.stop.store(true, Ordering::Relaxed);
        let watched = self.handle.join().unwrap_or_default();
        watched
            .into_iter()
            .map(|w| {
                let end = w.samples.last().map_or(w.process_start_s, |(_, s)| *s);
                ProcessCpu {
                    total_s: (end - w.process_start_s).max(0.0),
                    vcpu_s: w
                        .vcpus
                        .values()
                        .map(|(first, last)| (last - first).max(0.0))
                        .sum(),
                    samples: w
                        .samples
                        .iter()
                        .map(|&(t, s)| (t, (s - w.process_start_s).max(0.0)))
                        .collect(),
                }
            })
            .collect()
    }
}

/// QEMU names its vCPU threads "CPU <n>/<accelerator>" (with `-name …,debug-threads=on`).
pub fn is_qemu_vcpu(name: &str) -> bool {
    name.starts_with("CPU ") && name.contains('/')
}

/// The reference VM's vCPU threads: "ferry-vcpu<n>" (memory) and "ferry-vcpu<n>-io" (disk).
pub fn is_ferry_vcpu(name: &str) -> bool {
    name.starts_with("ferry-vcpu")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::parse_stat;

    #[test]
    fn stat_names_with_spaces_slashes_and_parentheses() {
        let tick = crate::cpu::ticks_per_s();
        let line =
            "4242 (CPU 0/TCG) R 1 4242 4242 0 -1 4194624 12 0 0 0 731 29 0 0 20 0 1 0 99 0 0";
        assert_eq!(
            parse_stat(line),
            Some(("CPU 0/TCG".to_string(), 760.0 / tick))
        );
        let odd = "7 (a (b) c)) S 1 7 7 0 -1 0 0 0 0 0 5 6 0 0 20 0 1 0 1 0 0";
        assert_eq!(parse_stat(odd), Some(("a (b) c)".to_string(), 11.0 / tick)));
        assert_eq!(parse_stat("7 (truncated) S 1 2"), None);
        assert!(is_qemu_vcpu("CPU 0/TCG") && is_qemu_vcpu("CPU 12/KVM"));
        assert!(!is_qemu_vcpu("mig/src/send_0") && !is_qemu_vcpu("qemu-system-x86"));
        assert!(is_ferry_vcpu("ferry-vcpu0") && is_ferry_vcpu("ferry-vcpu3-io"));
        assert!(!is_ferry_vcpu("ferry-tx-0"));
    }

    #[test]
    fn a_meter_sees_its_own_process() {
        let meter = CpuMeter::start(&[(std::process::id(), is_ferry_vcpu)]).unwrap();
        let spin = Instant::now();
        let mut x = 0u64;
        while spin.elapsed() < Duration::from_millis(60) {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let cpu = meter.finish();
        assert_eq!(cpu.len(), 1);
        assert!(cpu[0].total_s > 0.0, "{cpu:?}");
        assert_eq!(cpu[0].vcpu_s, 0.0);
        assert!(cpu[0].total_by(Duration::from_secs(3600)) <= cpu[0].total_s + 1e-9);
    }
}
