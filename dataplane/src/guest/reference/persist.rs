//! Persistence of a reference VM across the death of its process.
//!
//! A persistent VM keeps everything another process needs to take it over in one directory
//! that the caller picks (on tmpfs, e.g. `/dev/shm/ferry-<agent>/<vm>`; see
//! [`GuestMemory::create_file`] for why tmpfs):
//!
//! ```text
//! DIR/spec       the VmSpec, in the container of `state` (magic "FRYSPEC\0"): written once
//! DIR/registers  a header and one step counter per lane, mapped shared, updated in place
//! DIR/memory     the guest's RAM, mapped shared (GuestMemory::create_file)
//! ```
//!
//! The disk image is not in the directory: the caller owns it and hands it in again.
//!
//! # Why step counters are enough
//!
//! A lane's register file is a pure function of its step count (replay from the initial
//! registers, as `verify` does), and each step writes one whole page or disk unit that only
//! that step's (lane, step) decides. A worker writes the page or unit first and then stores
//! its new count in the registers file (one atomic store, Release). So whenever the process
//! dies, every lane with count `n` has completed steps `1..=n`, has not begun step `n + 2`,
//! and may have left step `n + 1` absent, torn or complete. [`ReferenceVm::recover`] replays
//! `n` steps and then takes step `n + 1` again, writing its page or unit whole (idempotent
//! if it was complete, a repair if torn), and stores `n + 1`. The result is exactly the VM
//! after `n + 1` steps on that lane, which `verify` checks byte for byte.
//!
//! Everything survives the death of the process (SIGKILL, abort, OOM kill): the files live
//! in the page cache. Nothing is synced, so a crash of the host loses them (and tmpfs would
//! anyway).
//!
//! The registers file ([`super::registers`]) holds the counters, a state word that says
//! whether they are exact (`PARKED`), may lag a step in flight (`RUNNING`) or mean nothing
//! (`INVALID`: boot unfinished, an incoming VM that has not loaded its state), and the NIC.
//! The VM holds an exclusive `flock` on it while it lives, so a second process cannot
//! recover a VM that is still alive.

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use super::disk_io::disk_step;
use super::program::{Lane, VcpuRegs, STEPS_MAX};
use super::registers::{Registers, RegistersState};
use super::state::{self, STATE_HEADER_LEN, STATE_PAYLOAD_BYTES_MAX};
use super::vcpu::{lock, memory_step, Desired};
use super::verify::{cores, in_parallel};
use super::{check_disk, write_boot_content, NicState, ReferenceVm, VmSpec, DISK_WRITE_BYTES};
use crate::disk::{AlignedBuf, VirtualDisk};
use crate::guest::GuestError;
use crate::hash::xxh3_64;
use crate::memory::{GuestMemory, PAGE_SIZE};

/// Name of the guest memory file in a VM directory.
pub const MEMORY_FILE: &str = "memory";
/// Name of the spec file in a VM directory.
pub const SPEC_FILE: &str = "spec";
/// Name of the registers file in a VM directory.
pub const REGISTERS_FILE: &str = "registers";
/// Suffix of a spec or registers file being written: each is written whole under this name
/// and then renamed, so a process killed while creating a VM never leaves a half-written
/// spec or registers file under its final name.
pub const PARTIAL_SUFFIX: &str = ".partial";

/// `dir/name` while it is being written (see [`PARTIAL_SUFFIX`]).
pub(super) fn partial_path(dir: &Path, name: &str) -> PathBuf {
    dir.join(format!("{name}{PARTIAL_SUFFIX}"))
}

/// Renames the whole file `from` to `to`.
pub(super) fn publish_file(from: &Path, to: &Path) -> Result<(), PersistError> {
    std::fs::rename(from, to).map_err(io_error("renaming", from))
}

/// "FRYSPEC\0".
pub const SPEC_MAGIC: [u8; 8] = *b"FRYSPEC\0";
/// Bumped on any change to the spec file's encoding.
pub const SPEC_FORMAT_VERSION: u16 = 1;

/// Why the files of a persistent VM could not be created, read or recovered.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{op} {path} failed")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("the VM directory {path} already exists")]
    Exists { path: PathBuf },
    #[error("{path} is corrupt: {reason}")]
    Corrupt { path: PathBuf, reason: String },
    #[error("the VM in {dir} is not recoverable: {reason}")]
    NotRecoverable { dir: PathBuf, reason: String },
    #[error("the VM in {dir} is in use by a live process (its registers file is locked)")]
    InUse { dir: PathBuf },
}

/// The error a [`ReferenceVm`] method returns for a [`PersistError`]: `GuestError` has no
/// variant of its own for these yet, so the whole chain goes into `BadState`'s reason.
pub(super) fn into_guest_error(error: PersistError) -> GuestError {
    GuestError::Persist(Box::new(error))
}

/// Maps an I/O error of `op` on `path` to [`PersistError::Io`].
pub(super) fn io_error<'a>(
    op: &'static str,
    path: &'a Path,
) -> impl FnOnce(io::Error) -> PersistError + 'a {
    move |source| PersistError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `spec` to `dir/spec` (O_EXCL, 0600; through a partial file) and returns the
/// checksum of the file.
fn write_spec(dir: &Path, spec: &VmSpec) -> Result<u64, PersistError> {
    let path = partial_path(dir, SPEC_FILE);
    let corrupt = |reason: String| PersistError::Corrupt {
        path: path.clone(),
        reason,
    };
    let payload =
        postcard::to_stdvec(spec).map_err(|e| corrupt(format!("encoding the spec failed: {e}")))?;
    let blob = state::seal(SPEC_MAGIC, SPEC_FORMAT_VERSION, &payload)
        .map_err(|reason| corrupt(format!("spec of {} bytes: {reason}", payload.len())))?;
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(io_error("creating", &path))?;
    file.write_all_at(&blob, 0)
        .map_err(io_error("writing", &path))?;
    publish_file(&path, &dir.join(SPEC_FILE))?;
    Ok(xxh3_64(&blob))
}

/// Reads and checks `dir/spec`: the spec and the checksum of the file.
fn read_spec_file(dir: &Path) -> Result<(VmSpec, u64), PersistError> {
    let path = dir.join(SPEC_FILE);
    let corrupt = |reason: String| PersistError::Corrupt {
        path: path.clone(),
        reason,
    };
    let file = File::open(&path).map_err(io_error("opening", &path))?;
    // Read at most one byte more than the largest valid file, so a huge file is refused
    // without reading it all.
    let limit = (STATE_HEADER_LEN as u64) + u64::from(STATE_PAYLOAD_BYTES_MAX) + 1;
    let mut blob = Vec::new();
    file.take(limit)
        .read_to_end(&mut blob)
        .map_err(io_error("reading", &path))?;
    let payload = state::unseal(&blob, SPEC_MAGIC, SPEC_FORMAT_VERSION).map_err(corrupt)?;
    let (spec, rest): (VmSpec, _) = postcard::take_from_bytes(payload)
        .map_err(|e| corrupt(format!("the spec does not decode: {e}")))?;
    if !rest.is_empty() {
        return Err(corrupt(format!(
            "{} bytes follow the encoded spec",
            rest.len()
        )));
    }
    spec.validate()
        .map_err(|e| corrupt(format!("the spec is invalid: {e}")))?;
    Ok((spec, xxh3_64(&blob)))
}

/// Creates the VM directory `dir` (mode 0700; its parents as needed). It must not exist:
/// the directory is what makes a VM's files its own.
fn create_vm_dir(dir: &Path) -> Result<(), PersistError> {
    if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(parent)
            .map_err(io_error("creating", parent))?;
    }
    DirBuilder::new()
        .mode(0o700)
        .create(dir)
        .map_err(|source| match source.kind() {
            io::ErrorKind::AlreadyExists => PersistError::Exists {
                path: dir.to_path_buf(),
            },
            _ => io_error("creating", dir)(source),
        })
}

/// Creates the spec, registers and memory files of a new VM in `dir` (which exists and is
/// empty). The registers start `INVALID`.
fn create_files(spec: &VmSpec, dir: &Path) -> Result<(Arc<GuestMemory>, Registers), GuestError> {
    let spec_xxh3 = write_spec(dir, spec).map_err(into_guest_error)?;
    let registers = Registers::create(dir, spec, spec_xxh3).map_err(into_guest_error)?;
    let memory = Arc::new(GuestMemory::create_file(
        &dir.join(MEMORY_FILE),
        spec.memory_bytes,
    )?);
    Ok((memory, registers))
}

/// Replays every lane of `lanes` from its initial registers for its step count.
fn replay(lanes: &[Lane], steps: &[u64]) -> Vec<VcpuRegs> {
    assert_eq!(lanes.len(), steps.len());
    in_parallel(lanes.len() as u64, cores(), |range| {
        range
            .map(|i| {
                let lane = &lanes[i as usize];
                let mut regs = lane.initial_regs();
                for _ in 0..steps[i as usize] {
                    lane.advance(&mut regs);
                }
                regs
            })
            .collect::<Vec<_>>()
    })
    .into_iter()
    .flatten()
    .collect()
}

/// Takes step `n + 1` again on every lane that may have had it in flight (not idle, not at
/// [`STEPS_MAX`]): writes its page or unit whole and publishes `n + 1`. Returns the number
/// of steps taken. A failed disk write is an error; the state stays `RUNNING`, so a later
/// recovery tries again.
fn complete_interrupted_steps(
    spec: &VmSpec,
    memory: &GuestMemory,
    disk: Option<&VirtualDisk>,
    registers: &Registers,
    regs: &mut [VcpuRegs],
    disk_regs: &mut [VcpuRegs],
) -> Result<u32, GuestError> {
    let mut completed = 0;
    // A lane with rate 0 never steps (Pace::Idle), so none of its steps can be in flight.
    if spec.dirty_rate_bytes_per_s != 0 {
        let program = spec.program();
        let mut buf = Box::new([0u8; PAGE_SIZE]);
        for (v, regs) in (0..).zip(regs.iter_mut()) {
            if regs.steps < STEPS_MAX {
                memory_step(program.seed, &program.lane(v), memory, regs, &mut buf);
                registers.publish_memory(v, regs.steps);
                completed += 1;
            }
        }
    }
    let disk_lanes = spec
        .disk
        .as_ref()
        .filter(|disk_spec| disk_spec.write_rate_bytes_per_s != 0)
        .and(spec.disk_program())
        .zip(disk);
    if let Some((program, disk)) = disk_lanes {
        let mut buf = AlignedBuf::new_zeroed(DISK_WRITE_BYTES as usize);
        for (v, regs) in (0..).zip(disk_regs.iter_mut()) {
            if regs.steps < STEPS_MAX {
                disk_step(&program, &program.lane(v), disk, regs, &mut buf)
                    .map_err(|(_, error)| GuestError::Disk(error))?;
                registers.publish_disk(v, regs.steps);
                completed += 1;
            }
        }
    }
    Ok(completed)
}

impl ReferenceVm {
    /// Like [`ReferenceVm::boot_with_disk`], but recoverable after this process dies: the
    /// memory, spec and step counters live in files in `dir` (see [`persist`](self)), which
    /// is created (mode 0700, parents as needed) and must not exist. The disk image is the
    /// caller's, as for `boot_with_disk`. Dropping or shutting the VM down leaves the files
    /// (parked: recoverable exactly); [`ReferenceVm::remove_files`] removes them. On
    /// failure, the directory is removed again.
    pub fn boot_persistent(
        spec: VmSpec,
        disk: Option<Arc<VirtualDisk>>,
        dir: &Path,
    ) -> Result<Self, GuestError> {
        spec.validate()?;
        check_disk(&spec, disk.as_deref())?;
        create_vm_dir(dir).map_err(into_guest_error)?;
        let booted = (|| {
            let (memory, registers) = create_files(&spec, dir)?;
            write_boot_content(&spec, &memory, disk.as_deref())?;
            // The boot content is in the page cache: from here the counters describe the VM,
            // and the workers may have a step in flight at any time.
            registers.mark_booted();
            Self::start(
                spec,
                memory,
                disk,
                Desired::Run,
                0.0,
                registers,
                Some(dir.to_path_buf()),
            )
        })();
        match booted {
            Ok(vm) => {
                tracing::info!(name = %vm.spec.name, dir = %dir.display(), "persistent reference VM booted");
                Ok(vm)
            }
            Err(error) => {
                remove_files_after_failure(dir);
                Err(error)
            }
        }
    }

    /// Like [`ReferenceVm::incoming_with_disk`], with the files in `dir` (created; must not
    /// exist). The registers are not valid until `load_state` has loaded the migrated state:
    /// before that, [`ReferenceVm::recover`] refuses the directory. On failure, the
    /// directory is removed again.
    pub fn incoming_persistent(
        spec: VmSpec,
        disk: Option<Arc<VirtualDisk>>,
        dir: &Path,
    ) -> Result<Self, GuestError> {
        spec.validate()?;
        check_disk(&spec, disk.as_deref())?;
        create_vm_dir(dir).map_err(into_guest_error)?;
        let ready = (|| {
            let (memory, registers) = create_files(&spec, dir)?;
            let prefault = memory.prefault()?;
            Self::start(
                spec,
                memory,
                disk,
                Desired::Park,
                prefault.as_secs_f64() * 1e3,
                registers,
                Some(dir.to_path_buf()),
            )
        })();
        match ready {
            Ok(vm) => {
                tracing::info!(name = %vm.spec.name, dir = %dir.display(), prefault_ms = vm.prefault_ms, "persistent reference VM ready for incoming migration");
                Ok(vm)
            }
            Err(error) => {
                remove_files_after_failure(dir);
                Err(error)
            }
        }
    }

    /// The spec of the persistent VM in `dir`, checked (so the caller can open its disk
    /// image before [`ReferenceVm::recover`]).
    pub fn read_spec(dir: &Path) -> Result<VmSpec, GuestError> {
        read_spec_file(dir)
            .map(|(spec, _)| spec)
            .map_err(into_guest_error)
    }

    /// Takes over the persistent VM in `dir` after the process that ran it died: maps its
    /// memory, rebuilds every lane's registers by replaying its step count, and, if the VM
    /// was running, completes on every lane the step that may have been interrupted (see
    /// [`persist`](self)). Returns the VM parked (quiesced) with its files still in `dir`:
    /// the caller resumes, verifies or migrates it. `disk` must be the VM's disk image when
    /// its spec has one.
    ///
    /// Refused (an error, never a panic): a directory whose registers are not valid (boot
    /// unfinished, or an incoming VM that never loaded state); missing, short or corrupt
    /// files; a VM still alive in another process; a disk that does not match the spec.
    pub fn recover(dir: &Path, disk: Option<Arc<VirtualDisk>>) -> Result<Self, GuestError> {
        let started = Instant::now();
        let (spec, spec_xxh3) = read_spec_file(dir).map_err(into_guest_error)?;
        check_disk(&spec, disk.as_deref())?;
        let registers = Registers::open(dir, &spec, spec_xxh3).map_err(into_guest_error)?;
        let (state, steps, disk_steps) = registers.recoverable(dir).map_err(into_guest_error)?;
        let nic = registers
            .read_header()
            .map_err(into_guest_error)?
            .map_or_else(|| NicState::from_seed(spec.seed), |h| h.nic());
        let memory = Arc::new(GuestMemory::open_file(
            &dir.join(MEMORY_FILE),
            spec.memory_bytes,
        )?);

        let program = spec.program();
        let lanes: Vec<Lane> = (0..spec.vcpus).map(|v| program.lane(v)).collect();
        let mut regs = replay(&lanes, &steps);
        let mut disk_regs = match spec.disk_program() {
            Some(disk_program) => {
                let lanes: Vec<Lane> = (0..spec.vcpus).map(|v| disk_program.lane(v)).collect();
                replay(&lanes, &disk_steps)
            }
            None => Vec::new(),
        };
        let completed = match state {
            RegistersState::Running => complete_interrupted_steps(
                &spec,
                &memory,
                disk.as_deref(),
                &registers,
                &mut regs,
                &mut disk_regs,
            )?,
            RegistersState::Parked | RegistersState::Invalid => 0,
        };
        // Every lane is at a step boundary now, and its counter says which.
        registers.mark_loaded();

        let vm = Self::start(
            spec,
            memory,
            disk,
            Desired::Park,
            0.0,
            registers,
            Some(dir.to_path_buf()),
        )?;
        vm.vcpus.load_regs(&regs, &disk_regs);
        *lock(&vm.nic) = nic;
        tracing::info!(
            name = %vm.spec.name,
            dir = %dir.display(),
            was = ?state,
            steps_completed = completed,
            total_steps = steps.iter().chain(&disk_steps).sum::<u64>(),
            recover_ms = started.elapsed().as_secs_f64() * 1e3,
            "persistent reference VM recovered"
        );
        Ok(vm)
    }

    /// The directory of a persistent VM's files; None for a memfd VM.
    pub fn files_dir(&self) -> Option<&Path> {
        self.files_dir.as_deref()
    }

    /// Removes the VM directory `dir` with every file in it (the VM's own, partial files of
    /// a creation cut short, and whatever the caller keeps beside them, such as a placement
    /// record). Already gone is fine. The registers file goes first, so a removal cut short
    /// leaves no recoverable VM. A VM directory is flat: one that holds a subdirectory is
    /// not one, and is refused untouched (ErrorKind::InvalidInput) rather than removed
    /// recursively.
    pub fn remove_files(dir: &Path) -> io::Result<()> {
        let entries = match std::fs::read_dir(dir) {
            Ok(entries) => entries.collect::<io::Result<Vec<_>>>()?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e),
        };
        for entry in &entries {
            if entry.file_type()?.is_dir() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!(
                        "{} holds the directory {:?}, so it is not a VM directory; left as it is",
                        dir.display(),
                        entry.file_name()
                    ),
                ));
            }
        }
        let registers = dir.join(REGISTERS_FILE);
        let others = entries
            .iter()
            .map(|entry| entry.path())
            .filter(|path| *path != registers);
        for path in std::iter::once(registers.clone()).chain(others) {
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        match std::fs::remove_dir(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Removes what a failed boot or incoming left in `dir` (which it created), logging a
/// failure: the caller already has the error that matters.
fn remove_files_after_failure(dir: &Path) {
    if let Err(e) = ReferenceVm::remove_files(dir) {
        tracing::warn!(dir = %dir.display(), error = %e, "cannot remove the files of a VM that failed to start");
    }
}
