//! vCPU threads: run the program at a paced rate, park at step boundaries on request.
//!
//! Each vCPU has a memory thread (`ferry-vcpu{v}`) and, when the VM has a disk, an I/O
//! thread (`ferry-vcpu{v}-io`) that runs the vCPU's disk lane ([`super::disk_io`]). Both
//! kinds are *workers* under one park protocol, so a quiesced VM has no page write and no
//! guest disk write in flight.
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
//! A running worker keeps its register file in a local copy and writes it back to its slot
//! (in [`Vcpus::regs`] or the disk lanes' registers) before it counts itself parked, so once
//! `quiesce` has seen every worker parked the register files are exact and stay so until
//! `resume`. Step counters are also published after each step, in the VM's [`Registers`]:
//! for status while running, and (in the registers file of a persistent VM) so that the VM
//! can be recovered after its process dies. A step writes its page or unit first and
//! publishes its counter after, so a published count is always a completed step.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::disk_io::{DiskLanes, DiskStep};
use super::program::{fill_content, Lane, Program, VcpuRegs, STEPS_MAX};
use super::registers::Registers;
use crate::guest::GuestError;
use crate::memory::{GuestMemory, PAGE_SIZE};
use crate::numa::{self, ThreadRole};

/// How long `quiesce` waits for every vCPU to reach a step boundary.
pub const QUIESCE_TIMEOUT: Duration = Duration::from_secs(10);

/// Longest a worker sleeps without looking at its flags (pacing and stun naps are cut into
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
    /// Workers waiting at a step boundary.
    parked: u32,
    /// Workers whose thread has returned (after Stop, or never started).
    exited: u32,
}

/// How fast a worker runs.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Pace {
    /// Never step (rate 0).
    Idle,
    /// Steps per second per worker at throttle 0.
    StepsPerS(f64),
    /// As fast as possible.
    Unpaced,
}

impl Pace {
    /// The pace of each of `vcpus` workers sharing `rate_bytes_per_s`, each step writing
    /// `bytes_per_step`.
    pub fn from_rate(rate_bytes_per_s: u64, vcpus: u32, bytes_per_step: u64) -> Self {
        match rate_bytes_per_s {
            0 => Pace::Idle,
            u64::MAX => Pace::Unpaced,
            rate => Pace::StepsPerS(rate as f64 / f64::from(vcpus) / bytes_per_step as f64),
        }
    }
}

/// What a worker does at each step: a memory worker writes a page, a disk worker a unit.
/// The pacing loops are shared and call this.
pub(super) trait Step {
    /// Whether the guest throttle (`set_throttle`) slows this worker.
    const THROTTLED: bool;
    /// Takes one step from `regs`. A step that cannot complete (a failed disk write) leaves
    /// `regs` as it was and returns after a pause, to be retried.
    fn step(&mut self, vcpus: &Vcpus, regs: &mut VcpuRegs);
}

/// A memory worker's step: stamp one page of its lane.
struct MemoryStep {
    lane: Lane,
    buf: Box<[u8; PAGE_SIZE]>,
}

impl Step for MemoryStep {
    const THROTTLED: bool = true;

    #[inline]
    fn step(&mut self, vcpus: &Vcpus, regs: &mut VcpuRegs) {
        memory_step(
            vcpus.program.seed,
            &self.lane,
            &vcpus.memory,
            regs,
            &mut self.buf,
        );
        vcpus.registers.publish_memory(self.lane.vcpu(), regs.steps);
    }
}

/// One step of a memory lane: advances `regs` and writes the whole page it picks. Shared by
/// the workers and by recovery, which completes a step a killed worker may have left torn.
#[inline]
pub(super) fn memory_step(
    seed: u64,
    lane: &Lane,
    memory: &GuestMemory,
    regs: &mut VcpuRegs,
    buf: &mut [u8; PAGE_SIZE],
) {
    let (index, version) = lane.advance(regs);
    let page = lane.item_of(index);
    fill_content(seed, page, version, buf);
    memory.write_page(page as usize, buf);
}

/// State shared by the vCPU threads and the VM handle.
pub struct Vcpus {
    pub program: Program,
    pub memory: Arc<GuestMemory>,
    pace: Pace,
    /// The disk lanes, when the VM has a disk.
    pub disk: Option<DiskLanes>,
    pub control: Mutex<Control>,
    /// Workers wait here while parked (and while idle).
    wake: Condvar,
    /// `quiesce` waits here for `parked + exited` to reach the worker count.
    parked_changed: Condvar,
    /// Fast-path copy of `desired != Run`, read between steps.
    park_requested: AtomicBool,
    /// Register files; exact while the vCPU is parked or exited.
    regs: Box<[Mutex<VcpuRegs>]>,
    /// Step counters of every lane, published after each step, and whether they are exact
    /// (parked) or may lag a step in flight (running).
    pub registers: Registers,
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
    /// The register files start at the lanes' initial registers; `registers` is left as
    /// it is (the caller loads matching register files when its counters are not zero).
    pub fn new(
        program: Program,
        memory: Arc<GuestMemory>,
        pace: Pace,
        disk: Option<DiskLanes>,
        desired: Desired,
        registers: Registers,
    ) -> Self {
        if let Some(disk) = &disk {
            assert_eq!(disk.program.vcpus, program.vcpus);
        }
        assert_eq!(registers.memory_lanes(), program.vcpus);
        assert_eq!(
            registers.disk_lanes(),
            if disk.is_some() { program.vcpus } else { 0 }
        );
        let regs: Vec<_> = (0..program.vcpus)
            .map(|v| Mutex::new(program.lane(v).initial_regs()))
            .collect();
        Self {
            program,
            memory,
            pace,
            disk,
            control: Mutex::new(Control {
                desired,
                parked: 0,
                exited: 0,
            }),
            wake: Condvar::new(),
            parked_changed: Condvar::new(),
            park_requested: AtomicBool::new(desired != Desired::Run),
            regs: regs.into_boxed_slice(),
            registers,
            throttle_percent: AtomicU8::new(0),
        }
    }

    /// Worker threads: one per vCPU, two with a disk.
    fn workers(&self) -> u32 {
        let per_vcpu = if self.disk.is_some() { 2 } else { 1 };
        self.program.vcpus * per_vcpu
    }

    /// Starts the worker threads of every vCPU. On failure the threads already started are
    /// stopped and joined before the error returns.
    pub fn spawn(self: &Arc<Self>) -> Result<Vec<JoinHandle<()>>, GuestError> {
        let workers = self.workers();
        let mut handles = Vec::with_capacity(workers as usize);
        for v in 0..self.program.vcpus {
            let memory_worker = Arc::clone(self);
            let mut spawned = numa::spawn(ThreadRole::Guest, format!("ferry-vcpu{v}"), move || {
                memory_worker.run_memory(v)
            })
            .map(|handle| handles.push(handle));
            if spawned.is_ok() && self.disk.is_some() {
                let disk_worker = Arc::clone(self);
                spawned = numa::spawn(ThreadRole::Guest, format!("ferry-vcpu{v}-io"), move || {
                    disk_worker.run_disk(v)
                })
                .map(|handle| handles.push(handle));
            }
            if let Err(source) = spawned {
                // Count the workers that will never run as exited, so stop() agrees.
                lock(&self.control).exited += workers - handles.len() as u32;
                self.stop(handles);
                return Err(GuestError::Spawn { vcpu: v, source });
            }
        }
        Ok(handles)
    }

    pub fn throttle_percent(&self) -> u8 {
        self.throttle_percent.load(Ordering::Relaxed)
    }

    /// Throttles the memory workers only. Disk writes keep their pace: the throttle exists
    /// so that memory pre-copy converges, and a disk migration mirrors guest writes
    /// synchronously instead of re-copying them, so slowing disk writes would cost the
    /// guest without helping convergence.
    pub fn set_throttle(&self, percent: u8) {
        self.throttle_percent
            .store(percent.min(THROTTLE_PERCENT_MAX), Ordering::Relaxed);
    }

    /// Steps taken, per memory lane.
    pub fn steps(&self) -> Vec<u64> {
        (0..self.program.vcpus)
            .map(|v| self.registers.memory_steps(v))
            .collect()
    }

    /// Disk writes completed, per disk lane (empty without a disk).
    pub fn disk_steps(&self) -> Vec<u64> {
        (0..self.registers.disk_lanes())
            .map(|v| self.registers.disk_steps(v))
            .collect()
    }

    pub fn desired(&self) -> Desired {
        lock(&self.control).desired
    }

    /// Asks every worker to park and waits until all have (or have exited).
    pub fn quiesce(&self) -> Result<(), GuestError> {
        let mut control = lock(&self.control);
        if control.desired == Desired::Run {
            control.desired = Desired::Park;
            self.park_requested.store(true, Ordering::Release);
            // Idle vCPUs sleep on `wake`; let them see the request now.
            self.wake.notify_all();
        }
        let workers = self.workers();
        let (control, timeout) = self
            .parked_changed
            .wait_timeout_while(control, QUIESCE_TIMEOUT, |c| c.parked + c.exited < workers)
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if timeout.timed_out() {
            return Err(GuestError::Timeout {
                operation: "quiesce",
                waited_ms: QUIESCE_TIMEOUT.as_millis() as u64,
                detail: format!(
                    "{} of {workers} vCPU threads parked, {} exited",
                    control.parked, control.exited
                ),
            });
        }
        // Every worker published its last step before it counted itself parked.
        self.registers.mark_parked();
        Ok(())
    }

    /// True when every worker is at rest (parked or exited) and none will start by itself.
    pub fn is_quiesced(&self) -> bool {
        let control = lock(&self.control);
        control.desired != Desired::Run && control.parked + control.exited == self.workers()
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
                // Before any worker can take a step: from here a step may be in flight.
                self.registers.mark_running();
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
        let mut all_clean = true;
        for handle in handles {
            if handle.join().is_err() {
                all_clean = false;
                tracing::error!("a vCPU thread panicked");
            }
        }
        // Every worker published its last step before it exited; a worker that panicked may
        // have left a step half done, which recovery completes only while "running".
        if all_clean && lock(&self.control).exited == self.workers() {
            self.registers.mark_parked();
        }
    }

    /// Memory register files of every vCPU. Exact only while quiesced.
    pub fn regs(&self) -> Vec<VcpuRegs> {
        self.regs.iter().map(|r| *lock(r)).collect()
    }

    /// Disk register files of every vCPU (empty without a disk). Exact only while quiesced.
    pub fn disk_regs(&self) -> Vec<VcpuRegs> {
        self.disk.as_ref().map_or_else(Vec::new, DiskLanes::regs)
    }

    /// Replaces every register file (and the published step counters). The caller has
    /// checked that the guest is quiesced, that `regs` has one entry per vCPU and
    /// `disk_regs` one per disk lane.
    pub fn load_regs(&self, regs: &[VcpuRegs], disk_regs: &[VcpuRegs]) {
        assert_eq!(regs.len(), self.regs.len());
        for ((v, slot), new) in (0..).zip(self.regs.iter()).zip(regs) {
            *lock(slot) = *new;
            self.registers.publish_memory(v, new.steps);
        }
        match &self.disk {
            Some(disk) => {
                disk.load_regs(disk_regs);
                for (v, new) in (0..).zip(disk_regs) {
                    self.registers.publish_disk(v, new.steps);
                }
            }
            None => assert!(disk_regs.is_empty(), "disk registers for a VM without disk"),
        }
    }

    /// Thread body of vCPU `v`'s memory worker.
    fn run_memory(&self, v: u32) {
        let mut step = MemoryStep {
            lane: self.program.lane(v),
            buf: Box::new([0u8; PAGE_SIZE]),
        };
        self.run_worker(&self.regs[v as usize], self.pace, &mut step);
    }

    /// Thread body of vCPU `v`'s disk worker.
    fn run_disk(&self, v: u32) {
        let disk = self
            .disk
            .as_ref()
            .expect("disk workers run only with a disk");
        let mut step = DiskStep::new(disk, v);
        self.run_worker(disk.regs_slot(v), disk.pace, &mut step);
    }

    /// A worker's life: park (writing back the regs of the last run), then run until asked
    /// to park again; until told to stop.
    fn run_worker(&self, slot: &Mutex<VcpuRegs>, pace: Pace, step: &mut impl Step) {
        let mut running: Option<VcpuRegs> = None;
        while let Some(mut regs) = self.park(slot, running.take()) {
            self.run_until_parked(pace, step, &mut regs);
            running = Some(regs);
        }
    }

    /// Parks a worker: writes `regs` back to `slot`, counts itself parked and waits for Run
    /// or Stop. Returns the register file to run with, or None to exit.
    fn park(&self, slot: &Mutex<VcpuRegs>, regs: Option<VcpuRegs>) -> Option<VcpuRegs> {
        let mut control = lock(&self.control);
        if let Some(regs) = regs {
            *lock(slot) = regs;
        }
        control.parked += 1;
        self.parked_changed.notify_all();
        loop {
            match control.desired {
                Desired::Run => {
                    control.parked -= 1;
                    // load_state may have replaced the register file while we were parked.
                    return Some(*lock(slot));
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

    /// The throttle that applies to a worker of kind `S`.
    fn throttle_for<S: Step>(&self) -> u8 {
        if S::THROTTLED {
            self.throttle_percent()
        } else {
            0
        }
    }

    /// Sleeps for `duration` in slices, returning early when a park is requested.
    pub(super) fn nap(&self, duration: Duration) {
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

    /// Runs steps at `pace` until a park is requested. Pacing state starts fresh here, so
    /// time spent parked is never "caught up".
    fn run_until_parked(&self, pace: Pace, step: &mut impl Step, regs: &mut VcpuRegs) {
        match pace {
            Pace::Idle => self.idle_until_parked(),
            Pace::StepsPerS(rate) => self.run_paced(step, regs, rate),
            Pace::Unpaced => self.run_unpaced(step, regs),
        }
    }

    /// Token bucket: credit accrues at the (throttled) rate, capped at
    /// [`CREDIT_WINDOW_S`]; each step spends one; without credit the worker naps ~1 ms.
    fn run_paced<S: Step>(&self, step: &mut S, regs: &mut VcpuRegs, rate: f64) {
        let mut credit = 0.0f64;
        let mut last = Instant::now();
        while !self.should_park() {
            let now = Instant::now();
            let throttle = f64::from(self.throttle_for::<S>());
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
                step.step(self, regs);
                credit -= 1.0;
            }
        }
    }

    /// As fast as possible; a throttle of `t` % makes the worker sleep `t` % of each
    /// [`STUN_PERIOD`].
    fn run_unpaced<S: Step>(&self, step: &mut S, regs: &mut VcpuRegs) {
        // Start of the current stun period and steps taken in it; None while unthrottled,
        // so a throttle set later starts a fresh period instead of napping at once.
        let mut period: Option<(Instant, u64)> = None;
        while !self.should_park() {
            if regs.steps >= STEPS_MAX {
                self.nap(NAP_SLICE);
                continue;
            }
            let throttle = u32::from(self.throttle_for::<S>());
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
            step.step(self, regs);
        }
    }
}
