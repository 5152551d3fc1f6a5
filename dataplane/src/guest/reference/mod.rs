//! The reference VM: stands in for a VMM so that everything else in ferry is real.
//!
//! vCPU threads run a deterministic program from a seed, stamping whole pages at a set
//! dirty rate and pattern ([`program`]); with a virtual disk, each vCPU also has an I/O
//! thread writing 64 KiB units of the disk at a set rate and pattern ([`disk_program`]);
//! the register files and a NIC are the device state ([`state`]); and because the program
//! is deterministic, [`ReferenceVm::verify`] replays it from the seed and checks every byte
//! of every page and every disk block, so a lost, stale or duplicated write is found, not
//! guessed.
//!
//! Lifecycle on each side of a migration:
//!
//! ```text
//! source:      boot ─▶ running ─▶ quiesce ─▶ save_state ─▶ (shutdown after switch-over)
//! destination: incoming (parked, memory pre-faulted) ─▶ receive memory (and disk) ─▶ load_state ─▶ resume
//! ```
//!
//! A *persistent* VM ([`ReferenceVm::boot_persistent`], [`ReferenceVm::incoming_persistent`])
//! keeps its memory, spec and step counters in files of one directory, so that after its
//! process is killed another process can [`ReferenceVm::recover`] it ([`persist`]).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use serde::{Deserialize, Serialize};

use self::disk_io::DiskLanes;
use self::disk_program::DiskProgram;
use self::program::Program;
use self::registers::Registers;
use self::vcpu::{lock, Desired, Pace, Vcpus};
use super::{Guest, GuestError};
use crate::disk::VirtualDisk;
use crate::memory::region::{MEMORY_BYTES_MAX, MEMORY_BYTES_MIN};
use crate::memory::{GuestMemory, PAGE_SIZE};

mod disk_io;
pub mod disk_program;
mod disk_spec;
mod disk_verify;
pub mod persist;
pub mod program;
mod registers;
pub mod state;
mod vcpu;
mod verify;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_disk;
#[cfg(test)]
mod tests_persist;
#[cfg(test)]
mod tests_sigkill;

pub use disk_spec::{
    DiskPattern, DiskSpec, ParseDiskPatternError, DISK_BYTES_MAX, DISK_BYTES_MIN,
    DISK_EXTENT_BYTES, DISK_WRITE_BYTES,
};
pub use state::{NicState, VcpuState, VmState};
pub use vcpu::{QUIESCE_TIMEOUT, THROTTLE_PERCENT_MAX};
pub use verify::MISMATCHES_LISTED_MAX;

/// Most vCPUs a reference VM may have.
pub const VCPUS_MAX: u32 = 64;
/// Longest VM name accepted, in bytes.
pub const NAME_BYTES_MAX: usize = 255;
/// `fill_percent` when a serialized spec leaves it out.
pub const FILL_PERCENT_DEFAULT: u8 = 100;

fn fill_percent_default() -> u8 {
    FILL_PERCENT_DEFAULT
}

/// What to boot: size, vCPUs and the program they run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmSpec {
    pub name: String,
    /// A multiple of the page size in `MEMORY_BYTES_MIN..=MEMORY_BYTES_MAX`.
    pub memory_bytes: u64,
    /// `1..=VCPUS_MAX`.
    pub vcpus: u32,
    /// Total over all vCPUs; 0 = vCPUs idle; `u64::MAX` = unpaced (as fast as possible).
    pub dirty_rate_bytes_per_s: u64,
    pub pattern: Pattern,
    pub seed: u64,
    /// Share of pages given non-zero content at boot (0..=100).
    #[serde(default = "fill_percent_default")]
    pub fill_percent: u8,
    /// A virtual disk the vCPUs write to, if any. The disk itself is handed to
    /// [`ReferenceVm::boot_with_disk`] or [`ReferenceVm::incoming_with_disk`].
    #[serde(default)]
    pub disk: Option<DiskSpec>,
}

impl VmSpec {
    pub fn validate(&self) -> Result<(), GuestError> {
        let bad = |reason: String| Err(GuestError::BadSpec { reason });
        if self.name.is_empty() || self.name.len() > NAME_BYTES_MAX {
            return bad(format!(
                "name must be 1..={NAME_BYTES_MAX} bytes, got {}",
                self.name.len()
            ));
        }
        if !self.memory_bytes.is_multiple_of(PAGE_SIZE as u64)
            || !(MEMORY_BYTES_MIN..=MEMORY_BYTES_MAX).contains(&self.memory_bytes)
        {
            return bad(format!(
                "memory_bytes {} must be a multiple of {PAGE_SIZE} in {MEMORY_BYTES_MIN}..={MEMORY_BYTES_MAX}",
                self.memory_bytes
            ));
        }
        if !(1..=VCPUS_MAX).contains(&self.vcpus) {
            return bad(format!("vcpus {} must be in 1..={VCPUS_MAX}", self.vcpus));
        }
        // Every vCPU must own at least one page.
        let pages = self.memory_bytes / PAGE_SIZE as u64;
        if pages < u64::from(self.vcpus) {
            return bad(format!(
                "memory_bytes {} holds {pages} pages, fewer than the {} vCPUs (each owns at least one)",
                self.memory_bytes, self.vcpus
            ));
        }
        if self.fill_percent > 100 {
            return bad(format!(
                "fill_percent {} must be in 0..=100",
                self.fill_percent
            ));
        }
        if let Some(disk) = &self.disk {
            disk.validate(self.vcpus)?;
        }
        Ok(())
    }

    /// The parts of the spec that decide disk contents, if the VM has a disk.
    fn disk_program(&self) -> Option<DiskProgram> {
        self.disk
            .as_ref()
            .map(|disk| DiskProgram::new(self.seed, self.vcpus, disk))
    }

    /// The parts of the spec that decide memory contents.
    fn program(&self) -> Program {
        Program {
            seed: self.seed,
            pattern: self.pattern,
            pages: self.memory_bytes / PAGE_SIZE as u64,
            vcpus: self.vcpus,
            fill_percent: self.fill_percent,
        }
    }
}

/// How a vCPU picks the page of its next step, among the pages it owns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Pattern {
    /// A uniformly random page.
    Uniform,
    /// 90 % of writes to a hot 10 % of the pages, the rest uniform.
    Hotset,
    /// Every page in turn, wrapping.
    Sweep,
}

impl Pattern {
    pub const ALL: [Pattern; 3] = [Pattern::Uniform, Pattern::Hotset, Pattern::Sweep];

    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::Uniform => "uniform",
            Pattern::Hotset => "hotset",
            Pattern::Sweep => "sweep",
        }
    }
}

impl fmt::Display for Pattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown dirty pattern {input:?}; expected one of: uniform, hotset, sweep")]
pub struct ParsePatternError {
    pub input: String,
}

impl FromStr for Pattern {
    type Err = ParsePatternError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        Pattern::ALL
            .into_iter()
            .find(|p| p.as_str() == input)
            .ok_or_else(|| ParsePatternError {
                input: input.to_string(),
            })
    }
}

/// A snapshot of the VM for status and progress displays.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmStatus {
    /// vCPUs are (or have been told to be) running.
    pub running: bool,
    /// Steps taken, per vCPU.
    pub steps: Vec<u64>,
    pub total_steps: u64,
    pub throttle_percent: u8,
    /// Disk writes completed, per vCPU (empty without a disk).
    #[serde(default)]
    pub disk_steps: Vec<u64>,
    #[serde(default)]
    pub disk_total_steps: u64,
    /// Guest disk writes that failed (each is retried until it succeeds).
    #[serde(default)]
    pub disk_write_errors: u64,
}

/// What [`ReferenceVm::verify`] found.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VerifyReport {
    /// No page, no disk block and no register file differs from the replay.
    pub ok: bool,
    pub pages_checked: u64,
    pub mismatched_pages: u64,
    /// The lowest-numbered mismatched pages, at most [`MISMATCHES_LISTED_MAX`].
    pub first_mismatches: Vec<Mismatch>,
    /// vCPUs whose live PRNG state differs from the one replayed to their step count.
    #[serde(default)]
    pub register_mismatches: Vec<RegisterMismatch>,
    /// Step counts the replay ran to, per vCPU.
    pub steps: Vec<u64>,
    /// Disk bytes read and checked (0 without a disk).
    #[serde(default)]
    pub disk_bytes_checked: u64,
    #[serde(default)]
    pub mismatched_disk_blocks: u64,
    /// The lowest-numbered mismatched disk blocks, at most [`MISMATCHES_LISTED_MAX`].
    #[serde(default)]
    pub first_disk_mismatches: Vec<DiskMismatch>,
    /// Disk lanes whose live PRNG state differs from the one replayed to their step count.
    #[serde(default)]
    pub disk_register_mismatches: Vec<RegisterMismatch>,
    /// Step counts the disk replay ran to, per vCPU (empty without a disk).
    #[serde(default)]
    pub disk_steps: Vec<u64>,
    /// Memory and disk together.
    pub elapsed_ms: f64,
}

/// The first differing byte of a page.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mismatch {
    pub page: u64,
    /// Guest-physical address of the first differing byte.
    pub addr: u64,
    pub expected: u8,
    pub found: u8,
}

/// The first differing byte of a disk block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskMismatch {
    pub block: u64,
    /// Byte offset in the disk of the first differing byte.
    pub offset: u64,
    pub expected: u8,
    pub found: u8,
}

/// A vCPU register file that does not match the replay of its step count.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegisterMismatch {
    pub vcpu: u32,
    pub steps: u64,
    pub expected_rng: [u64; 4],
    pub found_rng: [u64; 4],
}

/// A running (or parked) reference VM. Dropping it stops the vCPUs.
pub struct ReferenceVm {
    spec: VmSpec,
    memory: Arc<GuestMemory>,
    /// The disk of `spec.disk` (or none); also held by the vCPUs' disk lanes.
    disks: Vec<Arc<VirtualDisk>>,
    vcpus: Arc<Vcpus>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    nic: Mutex<NicState>,
    /// Serialises quiesce, resume, verify, state save/load and shutdown, so that verify's
    /// "quiesce, check, resume if it was running" is not interleaved with another caller's
    /// transition.
    lifecycle: Mutex<()>,
    prefault_ms: f64,
    /// The directory of a persistent VM's files (see [`persist`]); None for a memfd VM.
    files_dir: Option<PathBuf>,
}

impl fmt::Debug for ReferenceVm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ReferenceVm")
            .field("spec", &self.spec)
            .field("status", &self.status())
            .finish()
    }
}

impl ReferenceVm {
    /// Source side of a disk-less VM: see [`Self::boot_with_disk`].
    pub fn boot(spec: VmSpec) -> Result<Self, GuestError> {
        Self::boot_with_disk(spec, None)
    }

    /// Destination side of a disk-less VM: see [`Self::incoming_with_disk`].
    pub fn incoming(spec: VmSpec) -> Result<Self, GuestError> {
        Self::incoming_with_disk(spec, None)
    }

    /// Source side: creates memory, writes the boot content (version 0) into every filled
    /// page and every filled disk extent, starts the vCPUs running. `disk` must be given
    /// exactly when the spec has one, of its size, and read as zero (a fresh image): only
    /// filled extents are written.
    pub fn boot_with_disk(
        spec: VmSpec,
        disk: Option<Arc<VirtualDisk>>,
    ) -> Result<Self, GuestError> {
        spec.validate()?;
        check_disk(&spec, disk.as_deref())?;
        let memory = Arc::new(GuestMemory::new(&spec.name, spec.memory_bytes)?);
        let registers = Registers::anonymous(&spec)?;
        write_boot_content(&spec, &memory, disk.as_deref())?;
        let vm = Self::start(spec, memory, disk, Desired::Run, 0.0, registers, None)?;
        tracing::info!(name = %vm.spec.name, "reference VM booted");
        Ok(vm)
    }

    /// Destination side: zeroed memory, pre-faulted (see [`Self::prefault_ms`]); the disk (if
    /// the spec has one) is not written: its content comes from the migration. The vCPU
    /// threads exist but are parked until `load_state` and `resume`.
    pub fn incoming_with_disk(
        spec: VmSpec,
        disk: Option<Arc<VirtualDisk>>,
    ) -> Result<Self, GuestError> {
        spec.validate()?;
        check_disk(&spec, disk.as_deref())?;
        let memory = Arc::new(GuestMemory::new(&spec.name, spec.memory_bytes)?);
        let registers = Registers::anonymous(&spec)?;
        let prefault = memory.prefault()?;
        let vm = Self::start(
            spec,
            memory,
            disk,
            Desired::Park,
            prefault.as_secs_f64() * 1e3,
            registers,
            None,
        )?;
        tracing::info!(name = %vm.spec.name, prefault_ms = vm.prefault_ms, "reference VM ready for incoming migration");
        Ok(vm)
    }

    /// Starts the vCPU threads over `memory` and `disk`, publishing step counters in
    /// `registers` (whose lane counts match the spec).
    fn start(
        spec: VmSpec,
        memory: Arc<GuestMemory>,
        disk: Option<Arc<VirtualDisk>>,
        desired: Desired,
        prefault_ms: f64,
        registers: Registers,
        files_dir: Option<PathBuf>,
    ) -> Result<Self, GuestError> {
        let pace = Pace::from_rate(spec.dirty_rate_bytes_per_s, spec.vcpus, PAGE_SIZE as u64);
        // `check_disk` has paired the disk with the spec's.
        let disk_lanes = match (&spec.disk, &disk) {
            (Some(disk_spec), Some(disk)) => Some(DiskLanes::new(
                DiskProgram::new(spec.seed, spec.vcpus, disk_spec),
                Arc::clone(disk),
                Pace::from_rate(
                    disk_spec.write_rate_bytes_per_s,
                    spec.vcpus,
                    DISK_WRITE_BYTES,
                ),
            )),
            _ => None,
        };
        let vcpus = Arc::new(Vcpus::new(
            spec.program(),
            Arc::clone(&memory),
            pace,
            disk_lanes,
            desired,
            registers,
        ));
        let threads = vcpus.spawn()?;
        let vm = Self {
            nic: Mutex::new(NicState::from_seed(spec.seed)),
            spec,
            memory,
            disks: disk.into_iter().collect(),
            vcpus,
            threads: Mutex::new(threads),
            lifecycle: Mutex::new(()),
            prefault_ms,
            files_dir,
        };
        if desired == Desired::Park {
            // Return only once every thread sits parked, so the VM is quiesced (and
            // `load_state` accepted) from the moment the caller holds it. On error, drop
            // stops the threads.
            vm.vcpus.quiesce()?;
        }
        Ok(vm)
    }

    /// The VM's virtual disk, if it has one.
    pub fn disk(&self) -> Option<&Arc<VirtualDisk>> {
        self.disks.first()
    }

    pub fn spec(&self) -> &VmSpec {
        &self.spec
    }

    /// How long pre-faulting the destination's memory took; 0 for `boot`.
    pub fn prefault_ms(&self) -> f64 {
        self.prefault_ms
    }

    /// The NIC (derived from the seed at boot, replaced by `load_state`).
    pub fn nic(&self) -> NicState {
        *lock(&self.nic)
    }

    pub fn status(&self) -> VmStatus {
        let steps = self.vcpus.steps();
        let disk_steps = self.vcpus.disk_steps();
        let disk_write_errors = self.vcpus.disk.as_ref().map_or(0, DiskLanes::write_errors);
        VmStatus {
            running: self.vcpus.desired() == Desired::Run,
            total_steps: steps.iter().sum(),
            steps,
            throttle_percent: self.vcpus.throttle_percent(),
            disk_total_steps: disk_steps.iter().sum(),
            disk_steps,
            disk_write_errors,
        }
    }

    /// Quiesces if running, replays the program from the seed up to the current step
    /// counts, checks every byte of every page and of the disk, and resumes if it was
    /// running. A failed disk read is an error (after the resume).
    pub fn verify(&self) -> Result<VerifyReport, GuestError> {
        let _lifecycle = lock(&self.lifecycle);
        let was_running = self.vcpus.desired() == Desired::Run;
        self.vcpus.quiesce()?;
        let disk_regs = self.vcpus.disk_regs();
        let disk_program = self.spec.disk_program();
        let disk = match (&disk_program, &self.vcpus.disk) {
            (Some(program), Some(lanes)) => Some(verify::DiskUnderTest {
                program,
                disk: &lanes.disk,
                live: &disk_regs,
            }),
            _ => None,
        };
        let checked = verify::verify(&self.spec.program(), &self.memory, &self.vcpus.regs(), disk);
        if was_running {
            self.vcpus.resume()?;
        }
        let report = checked?;
        if !report.ok {
            tracing::warn!(
                name = %self.spec.name,
                mismatched_pages = report.mismatched_pages,
                register_mismatches = report.register_mismatches.len(),
                mismatched_disk_blocks = report.mismatched_disk_blocks,
                disk_register_mismatches = report.disk_register_mismatches.len(),
                "reference VM verify failed"
            );
        }
        Ok(report)
    }

    /// Stops and joins the vCPU threads. Idempotent; also done on drop. Afterwards the
    /// register files are final: `save_state` and `verify` still work, `resume` does not.
    pub fn shutdown(&self) {
        let _lifecycle = lock(&self.lifecycle);
        let handles = std::mem::take(&mut *lock(&self.threads));
        self.vcpus.stop(handles);
    }
}

impl Drop for ReferenceVm {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Guest for ReferenceVm {
    fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    fn disks(&self) -> &[Arc<VirtualDisk>] {
        &self.disks
    }

    fn quiesce(&self) -> Result<(), GuestError> {
        let _lifecycle = lock(&self.lifecycle);
        self.vcpus.quiesce()
    }

    fn resume(&self) -> Result<(), GuestError> {
        let _lifecycle = lock(&self.lifecycle);
        self.vcpus.resume()
    }

    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        let _lifecycle = lock(&self.lifecycle);
        if !self.vcpus.is_quiesced() {
            return Err(GuestError::NotQuiesced {
                operation: "save_state",
            });
        }
        let state = VmState {
            spec: self.spec.clone(),
            vcpus: self.vcpus.regs().into_iter().map(VcpuState::from).collect(),
            disk_queues: self
                .vcpus
                .disk_regs()
                .into_iter()
                .map(VcpuState::from)
                .collect(),
            nic: self.nic(),
        };
        state::encode(&state)
    }

    fn load_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        let _lifecycle = lock(&self.lifecycle);
        if !self.vcpus.is_quiesced() {
            return Err(GuestError::NotQuiesced {
                operation: "load_state",
            });
        }
        let state = state::decode(blob)?;
        state::check_compatible(&self.spec, &state)?;
        let regs: Vec<_> = state.vcpus.iter().copied().map(Into::into).collect();
        let disk_regs: Vec<_> = state.disk_queues.iter().copied().map(Into::into).collect();
        // A persistent VM killed half way through must not recover a mix of old and new
        // counters: they are invalid while they change, and valid (parked: no step in
        // flight) once all of them and the NIC are written.
        let registers = &self.vcpus.registers;
        registers.mark_invalid();
        self.vcpus.load_regs(&regs, &disk_regs);
        registers
            .set_nic(&state.nic)
            .map_err(persist::into_guest_error)?;
        registers.mark_loaded();
        *lock(&self.nic) = state.nic;
        Ok(())
    }

    /// Slows the memory workers only; disk writes keep their pace (see
    /// `Vcpus::set_throttle`).
    fn set_throttle(&self, percent: u8) {
        self.vcpus.set_throttle(percent);
    }
}

/// Writes the boot content (version 0) into every filled page and every filled disk extent.
fn write_boot_content(
    spec: &VmSpec,
    memory: &GuestMemory,
    disk: Option<&VirtualDisk>,
) -> Result<(), GuestError> {
    verify::write_boot_content(&spec.program(), memory);
    if let (Some(program), Some(disk)) = (spec.disk_program(), disk) {
        let start = std::time::Instant::now();
        disk_verify::write_boot_content(&program, disk)?;
        tracing::debug!(name = %spec.name, disk_fill_ms = start.elapsed().as_secs_f64() * 1e3, "disk boot content written");
    }
    Ok(())
}

/// Checks that `disk` is given exactly when `spec` has a disk, and is of its size.
fn check_disk(spec: &VmSpec, disk: Option<&VirtualDisk>) -> Result<(), GuestError> {
    let reason = match (&spec.disk, disk) {
        (None, None) => return Ok(()),
        (Some(wanted), Some(disk)) if wanted.bytes == disk.size() => return Ok(()),
        (Some(wanted), Some(disk)) => format!(
            "the spec's disk is {} bytes but the disk given is {} bytes",
            wanted.bytes,
            disk.size()
        ),
        (Some(wanted), None) => format!(
            "the spec needs a disk of {} bytes and none was given (boot_with_disk / incoming_with_disk)",
            wanted.bytes
        ),
        (None, Some(disk)) => format!(
            "a disk of {} bytes was given but the spec has none",
            disk.size()
        ),
    };
    Err(GuestError::BadSpec { reason })
}
