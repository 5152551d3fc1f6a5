//! The vCPUs' disk workers: each runs its vCPU's disk lane, writing one 64 KiB unit per
//! step through [`VirtualDisk::write_at`] (so a migration can mirror it), under the same
//! park protocol as the memory workers ([`super::vcpu`]).
//!
//! A step is computed on a copy of the register file and committed only once the write
//! has returned Ok, so a failed write is retried as the same step and the register file
//! never runs ahead of the disk: replay stays exact whatever the disk does.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::disk_program::DiskProgram;
use super::disk_spec::DISK_WRITE_BYTES;
use super::program::{Lane, VcpuRegs};
use super::vcpu::{lock, Pace, Step, Vcpus};
use crate::disk::{AlignedBuf, DiskError, VirtualDisk};

/// Pause before a failed disk write is retried (cut into slices that honour a park).
const WRITE_RETRY_NAP: Duration = Duration::from_millis(10);

/// After the first, one failed write in this many is logged; all are counted.
const WRITE_ERRORS_LOGGED_EVERY: u64 = 1000;

/// The disk side of the vCPUs: program, disk, pace and the disk lanes' register files.
pub struct DiskLanes {
    pub program: DiskProgram,
    pub disk: Arc<VirtualDisk>,
    pub pace: Pace,
    /// Register files of the disk lanes; exact while the worker is parked or exited. (Their
    /// step counters are published in the VM's registers, after the memory lanes'.)
    regs: Box<[Mutex<VcpuRegs>]>,
    /// Failed guest disk writes, over all lanes.
    write_errors: AtomicU64,
}

impl DiskLanes {
    pub fn new(program: DiskProgram, disk: Arc<VirtualDisk>, pace: Pace) -> Self {
        assert_eq!(disk.size(), program.bytes, "disk size and program agree");
        let regs: Vec<_> = (0..program.vcpus)
            .map(|v| Mutex::new(program.lane(v).initial_regs()))
            .collect();
        Self {
            program,
            disk,
            pace,
            regs: regs.into_boxed_slice(),
            write_errors: AtomicU64::new(0),
        }
    }

    pub fn regs_slot(&self, vcpu: u32) -> &Mutex<VcpuRegs> {
        &self.regs[vcpu as usize]
    }

    /// Register files of every disk lane. Exact only while quiesced.
    pub fn regs(&self) -> Vec<VcpuRegs> {
        self.regs.iter().map(|r| *lock(r)).collect()
    }

    /// Replaces every register file (the guest is quiesced; the caller publishes the step
    /// counters).
    pub fn load_regs(&self, regs: &[VcpuRegs]) {
        assert_eq!(regs.len(), self.regs.len());
        for (slot, new) in self.regs.iter().zip(regs) {
            *lock(slot) = *new;
        }
    }

    pub fn write_errors(&self) -> u64 {
        self.write_errors.load(Ordering::Relaxed)
    }
}

/// A disk worker's step: write one unit of its lane.
pub(super) struct DiskStep<'a> {
    lanes: &'a DiskLanes,
    lane: Lane,
    /// One unit, 4 KiB-aligned for O_DIRECT.
    buf: AlignedBuf,
}

impl<'a> DiskStep<'a> {
    pub fn new(lanes: &'a DiskLanes, vcpu: u32) -> Self {
        Self {
            lanes,
            lane: lanes.program.lane(vcpu),
            buf: AlignedBuf::new_zeroed(DISK_WRITE_BYTES as usize),
        }
    }
}

impl Step for DiskStep<'_> {
    /// The guest throttle is for memory pre-copy; see [`Vcpus::set_throttle`].
    const THROTTLED: bool = false;

    fn step(&mut self, vcpus: &Vcpus, regs: &mut VcpuRegs) {
        match disk_step(
            &self.lanes.program,
            &self.lane,
            &self.lanes.disk,
            regs,
            &mut self.buf,
        ) {
            Ok(()) => vcpus.registers.publish_disk(self.lane.vcpu(), regs.steps),
            Err((unit, error)) => {
                let failed = self.lanes.write_errors.fetch_add(1, Ordering::Relaxed) + 1;
                if failed == 1 || failed.is_multiple_of(WRITE_ERRORS_LOGGED_EVERY) {
                    tracing::warn!(
                        vcpu = self.lane.vcpu(),
                        unit,
                        write_errors = failed,
                        error = %crate::engine::error_chain(&error),
                        "guest disk write failed; retrying"
                    );
                }
                vcpus.nap(WRITE_RETRY_NAP);
            }
        }
    }
}

/// One step of a disk lane: writes the whole unit the next step picks and, only once the
/// write has returned Ok, advances `regs`. On failure `regs` is unchanged and the unit is
/// returned with the error. Shared by the workers and by recovery, which completes a step a
/// killed worker may have left torn.
pub(super) fn disk_step(
    program: &DiskProgram,
    lane: &Lane,
    disk: &VirtualDisk,
    regs: &mut VcpuRegs,
    buf: &mut AlignedBuf,
) -> Result<(), (u64, DiskError)> {
    let mut next = *regs;
    let (index, version) = lane.advance(&mut next);
    let unit = lane.item_of(index);
    program.fill_unit(unit, version, buf);
    disk.write_at(DiskProgram::unit_offset(unit), buf)
        .map_err(|error| (unit, error))?;
    *regs = next;
    Ok(())
}
