//! vCPU threads: run the program at a paced rate, park at step boundaries on request.
//!
//! The park protocol, all under [`Vcpus::control`]:
//!
//! ```text
//!            resume (desired = Run, notify `wake`)
//!   Parked ───────────────────────────────────────▶ Running
//!     ▲                                                │ sees `park_requested` between steps,
//!     └──────────── write regs back, parked += 1, ─────┘ or desired = Stop
//!                   notify `parked_changed`
//!   Stop: a parked or running vCPU writes its regs back and exits (exited += 1).
//! ```
//!
//! A running vCPU keeps its register file in a local copy and writes it back to
//! [`Vcpus::regs`] before it counts itself parked, so once `quiesce` has seen every vCPU
//! parked the register files are exact and stay so until `resume`. Step counters are also
//! published in atomics after each step, for status while running.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::program::{fill_content, Lane, Program, VcpuRegs, STEPS_MAX};
use crate::guest::GuestError;
use crate::memory::{GuestMemory, PAGE_SIZE};

/// How long `quiesce` waits for every vCPU to reach a step boundary.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a vCPU sleeps without looking at its flags (pacing and stun naps are cut into
/// pieces of this size), so a quiesce is seen within about this long.
const NAP_SLICE: Duration = Duration::from_millis(1);

/// Most steps a paced vCPU takes back to back before it looks at the clock again.
const BURST_STEPS_MAX: u64 = 64;

/// A paced vCPU saves up at most this much time's worth of steps, so an oversleep is made
/// up but a long stall is not turned into a storm.
const CREDIT_WINDOW_S: f64 = 0.02;

/// Period of the stun cycle for unpaced, throttled vCPUs: run `100 - t` % of it, sleep `t` %.
const STUN_PERIOD: Duration = Duration::from_millis(10);

/// The highest throttle; at 100 % a paced vCPU would never run again.
pub const THROTTLE_PERCENT_MAX: u8 = 99;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Desired {
    Run,
    Park,
    Stop,
}

#[derive(Debug)]
pub struct Control {
    pub desired: Desired,
    /// vCPUs waiting at a step boundary.
    parked: u32,
    /// vCPUs whose thread has returned (after Stop, or never started).
    exited: u32,
}

/// How fast the vCPUs run.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// Never step (dirty rate 0).
    Idle,
    /// Steps per second per vCPU at throttle 0.
    PagesPerS(f64),
    /// As fast as possible.
    Unpaced,
}

impl Pace {
    pub fn from_rate(dirty_rate_bytes_per_s: u64, vcpus: u32) -> Self {
        match dirty_rate_bytes_per_s {
            0 => Pace::Idle,
            u64::MAX => Pace::Unpaced,
            rate => Pace::PagesPerS(rate as f64 / f64::from(vcpus) / PAGE_SIZE as f64),
        }
    }
}

/// State shared by the vCPU threads and the VM handle.
pub struct Vcpus {
    pub program: Program,
    pub memory: Arc<GuestMemory>,
    pace: Pace,
    pub control: Mutex<Control>,
    /// vCPUs wait here while parked (and while idle).
    wake: Condvar,
    /// `quiesce` waits here for `parked + exited` to reach the vCPU count.
    parked_changed: Condvar,
    /// Fast-path copy of `desired != Run`, read between steps.
    park_requested: AtomicBool,
    /// Register files; exact while the vCPU is parked or exited.
    regs: Box<[Mutex<VcpuRegs>]>,
    /// Step counters, published after each step.
    steps: Box<[AtomicU64]>,
    throttle_percent: AtomicU8,
}

/// Locks a mutex, recovering from poisoning: the data under these locks (counters, a
/// register file written whole) stays consistent even if a holder panicked.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Vcpus {
    pub fn new(program: Program, memory: Arc<GuestMemory>, pace: Pace, desired: Desired) -> Self {
        let regs: Vec<_> = (0..program.vcpus)
            .map(|v| Mutex::new(program.lane(v).initial_regs()))
            .collect();
        let steps: Vec<_> = (0..program.vcpus).map(|_| AtomicU64::new(0)).collect();
        Self {
            program,
            memory,
            pace,
            control: Mutex::new(Control {
                desired,
                parked: 0,
                exited: 0,
            }),
            wake: Condvar::new(),
            parked_changed: Condvar::new(),
            park_requested: AtomicBool::new(desired != Desired::Run),
            regs: regs.into_boxed_slice(),
            steps: steps.into_boxed_slice(),
            throttle_percent: AtomicU8::new(0),
        }
    }

    /// Starts one thread per vCPU. On failure the threads already started are stopped and
    /// joined before the error returns.
    pub fn spawn(self: &Arc<Self>) -> Result<Vec<JoinHandle<()>>, GuestError> {
        let mut handles = Vec::with_capacity(self.program.vcpus as usize);
        for v in 0..self.program.vcpus {
            let vcpus = Arc::clone(self);
            let spawned = std::thread::Builder::new()
                .name(format!("ferry-vcpu{v}"))
                .spawn(move || vcpus.run(v));
            match spawned {
                Ok(handle) => handles.push(handle),
                Err(source) => {
                    // Count the vCPUs that will never run as exited, so stop() agrees.
                    lock(&self.control).exited += self.program.vcpus - v;
                    self.stop(handles);
                    return Err(GuestError::Spawn { vcpu: v, source });
                }
            }
        }
        Ok(handles)
    }

    pub fn throttle_percent(&self) -> u8 {
        self.throttle_percent.load(Ordering::Relaxed)
    }

    pub fn set_throttle(&self, percent: u8) {
        self.throttle_percent
            .store(percent.min(THROTTLE_PERCENT_MAX), Ordering::Relaxed);
    }

    pub fn steps(&self) -> Vec<u64> {
        self.steps
            .iter()
            .map(|s| s.load(Ordering::Acquire))
            .collect()
    }

    pub fn desired(&self) -> Desired {
        lock(&self.control).desired
    }

    /// Asks every vCPU to park and waits until all have (or have exited).
    pub fn quiesce(&self) -> Result<(), GuestError> {
        let mut control = lock(&self.control);
        if control.desired == Desired::Run {
            control.desired = Desired::Park;
            self.park_requested.store(true, Ordering::Release);
            // Idle vCPUs sleep on `wake`; let them see the request now.
            self.wake.notify_all();
        }
        let vcpus = self.program.vcpus;
        let (control, timeout) = self
            .parked_changed
            .wait_timeout_while(control, QUIESCE_TIMEOUT, |c| c.parked + c.exited < vcpus)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if timeout.timed_out() {
            return Err(GuestError::Timeout {
                operation: "quiesce",
                waited_ms: QUIESCE_TIMEOUT.as_millis() as u64,
                detail: format!(
                    "{} of {vcpus} vCPUs parked, {} exited",
                    control.parked, control.exited
                ),
            });
        }
        Ok(())
    }

    /// True when every vCPU is at rest (parked or exited) and none will start by itself.
    pub fn is_quiesced(&self) -> bool {
        let control = lock(&self.control);
        control.desired != Desired::Run && control.parked + control.exited == self.program.vcpus
    }

    /// Lets parked vCPUs run. Does not wait for them to start.
    pub fn resume(&self) -> Result<(), GuestError> {
        let mut control = lock(&self.control);
        match control.desired {
            Desired::Stop => Err(GuestError::Stopped {
                operation: "resume",
            }),
            Desired::Run => Ok(()),
            Desired::Park => {
                control.desired = Desired::Run;
                self.park_requested.store(false, Ordering::Release);
                self.wake.notify_all();
                Ok(())
            }
        }
    }

    /// Tells every vCPU to exit and joins `handles`.
    pub fn stop(&self, handles: Vec<JoinHandle<()>>) {
        {
            let mut control = lock(&self.control);
            control.desired = Desired::Stop;
            self.park_requested.store(true, Ordering::Release);
            self.wake.notify_all();
        }
        for handle in handles {
            if handle.join().is_err() {
                tracing::error!("a vCPU thread panicked");
            }
        }
    }

    /// Register files of every vCPU. Exact only while quiesced.
    pub fn regs(&self) -> Vec<VcpuRegs> {
        self.regs.iter().map(|r| *lock(r)).collect()
    }

    /// Replaces every register file (and the published step counters). The caller has
    /// checked that the guest is quiesced and that `regs` has one entry per vCPU.
    pub fn load_regs(&self, regs: &[VcpuRegs]) {
        assert_eq!(regs.len(), self.regs.len());
        for ((slot, counter), new) in self.regs.iter().zip(self.steps.iter()).zip(regs) {
            *lock(slot) = *new;
            counter.store(new.steps, Ordering::Release);
        }
    }

    /// Thread body of vCPU `v`.
    fn run(&self, v: u32) {
        let lane = self.program.lane(v);
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        let mut running: Option<VcpuRegs> = None;
        // Each pass: park (writing back the regs of the last run), then run until asked to
        // park again.
        while let Some(mut regs) = self.park(v, running.take()) {
            self.run_until_parked(&lane, &mut regs, &mut buf);
            running = Some(regs);
        }
    }

    /// Parks vCPU `v`: writes `regs` back, counts itself parked and waits for Run or Stop.
    /// Returns the register file to run with, or None to exit.
    fn park(&self, v: u32, regs: Option<VcpuRegs>) -> Option<VcpuRegs> {
        let mut control = lock(&self.control);
        if let Some(regs) = regs {
            *lock(&self.regs[v as usize]) = regs;
        }
        control.parked += 1;
        self.parked_changed.notify_all();
        loop {
            match control.desired {
                Desired::Run => {
                    control.parked -= 1;
                    // load_state may have replaced the register file while we were parked.
                    return Some(*lock(&self.regs[v as usize]));
                }
                Desired::Stop => {
                    control.parked -= 1;
                    control.exited += 1;
                    self.parked_changed.notify_all();
                    return None;
                }
                Desired::Park => {
                    control = self
                        .wake
                        .wait(control)
                        .unwrap_or_else(|poisoned| poisoned.into_inner());
                }
            }
        }
    }

    fn should_park(&self) -> bool {
        self.park_requested.load(Ordering::Acquire)
    }

    /// One step: advance the registers, write the page, publish the counter.
    #[inline]
    fn step(&self, lane: &Lane, regs: &mut VcpuRegs, buf: &mut [u8; PAGE_SIZE]) {
        let (index, version) = lane.advance(regs);
        let page = lane.page_of(index);
        fill_content(self.program.seed, page, version, buf);
        self.memory.write_page(page as usize, buf);
        self.steps[lane.vcpu() as usize].store(regs.steps, Ordering::Release);
    }

    /// Sleeps for `duration` in slices, returning early when a park is requested.
    fn nap(&self, duration: Duration) {
        let until = Instant::now() + duration;
        loop {
            if self.should_park() {
                return;
            }
            let now = Instant::now();
            if now >= until {
                return;
            }
            std::thread::sleep((until - now).min(NAP_SLICE));
        }
    }

    /// Waits on `wake` until a park or stop is requested (an idle vCPU).
    fn idle_until_parked(&self) {
        let control = lock(&self.control);
        let _control = self
            .wake
            .wait_while(control, |c| c.desired == Desired::Run)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
    }

    /// Runs steps at the configured pace until a park is requested. Pacing state starts
    /// fresh here, so time spent parked is never "caught up".
    fn run_until_parked(&self, lane: &Lane, regs: &mut VcpuRegs, buf: &mut [u8; PAGE_SIZE]) {
        match self.pace {
            Pace::Idle => self.idle_until_parked(),
            Pace::PagesPerS(rate) => self.run_paced(lane, regs, buf, rate),
            Pace::Unpaced => self.run_unpaced(lane, regs, buf),
        }
    }

    /// Token bucket: credit accrues at the (throttled) rate, capped at
    /// [`CREDIT_WINDOW_S`]; each step spends one; without credit the vCPU naps ~1 ms.
    fn run_paced(&self, lane: &Lane, regs: &mut VcpuRegs, buf: &mut [u8; PAGE_SIZE], rate: f64) {
        let mut credit = 0.0f64;
        let mut last = Instant::now();
        while !self.should_park() {
            let now = Instant::now();
            let throttle = f64::from(self.throttle_percent());
            let effective = rate * (100.0 - throttle) / 100.0;
            let cap = (effective * CREDIT_WINDOW_S).max(1.0);
            credit = (credit + now.duration_since(last).as_secs_f64() * effective).min(cap);
            last = now;
            if credit < 1.0 || regs.steps >= STEPS_MAX {
                self.nap(NAP_SLICE);
                continue;
            }
            let burst = (credit as u64).min(BURST_STEPS_MAX);
            for _ in 0..burst {
                if self.should_park() {
                    return;
                }
                self.step(lane, regs, buf);
                credit -= 1.0;
            }
        }
    }

    /// As fast as possible; a throttle of `t` % makes the vCPU sleep `t` % of each
    /// [`STUN_PERIOD`].
    fn run_unpaced(&self, lane: &Lane, regs: &mut VcpuRegs, buf: &mut [u8; PAGE_SIZE]) {
        // Start of the current stun period and steps taken in it; None while unthrottled,
        // so a throttle set later starts a fresh period instead of napping at once.
        let mut period: Option<(Instant, u64)> = None;
        while !self.should_park() {
            if regs.steps >= STEPS_MAX {
                self.nap(NAP_SLICE);
                continue;
            }
            let throttle = u32::from(self.throttle_percent());
            if throttle == 0 {
                period = None;
            } else {
                let (start, steps) = period.get_or_insert_with(|| (Instant::now(), 0));
                // At least one step per period: on a loaded host the thread may wake after
                // its run window has passed, and a throttle must slow a guest, not stop it.
                if *steps > 0 && start.elapsed() >= STUN_PERIOD * (100 - throttle) / 100 {
                    self.nap(STUN_PERIOD * throttle / 100);
                    period = Some((Instant::now(), 0));
                    continue;
                }
                *steps += 1;
            }
            self.step(lane, regs, buf);
        }
    }
}
