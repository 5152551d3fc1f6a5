//! The VM as the migration engine sees it: the [`Guest`] seam, and the reference VM that
//! implements it inside the agent process.

use std::sync::Arc;

use crate::disk::{DiskError, VirtualDisk};
use crate::memory::GuestMemory;

pub mod reference;

#[derive(Debug, thiserror::Error)]
pub enum GuestError {
    #[error("device state blob is invalid: {reason}")]
    BadState { reason: String },
    #[error("the guest is not quiesced; {operation} needs a quiesced guest")]
    NotQuiesced { operation: &'static str },
    #[error("guest memory: {0}")]
    Memory(#[from] crate::memory::MemoryError),
    #[error("guest spec is invalid: {reason}")]
    BadSpec { reason: String },
    #[error("{operation} timed out after {waited_ms} ms: {detail}")]
    Timeout {
        operation: &'static str,
        waited_ms: u64,
        detail: String,
    },
    #[error("the guest has been shut down; {operation} needs a live guest")]
    Stopped { operation: &'static str },
    #[error("virtual disk")]
    Disk(#[from] DiskError),
    #[error("starting the thread of vCPU {vcpu} failed")]
    Spawn { vcpu: u32, source: std::io::Error },
    #[error("the VM's persistent files")]
    Persist(#[source] Box<reference::persist::PersistError>),
}

/// What the migration engine needs from a VM. Every lifecycle method is required: a guest
/// that forgets one must not compile (a defaulted `save_state` would lose device state
/// silently).
pub trait Guest: Send + Sync {
    /// The guest's RAM.
    fn memory(&self) -> &Arc<GuestMemory>;
    /// The guest's virtual disks (possibly none). Every guest write to them passes through
    /// [`VirtualDisk::write_at`], which is what lets a migration mirror them.
    fn disks(&self) -> &[Arc<VirtualDisk>];
    /// Stops every vCPU at an instruction (step) boundary and returns once all have stopped.
    /// Idempotent.
    fn quiesce(&self) -> Result<(), GuestError>;
    /// Lets the vCPUs run again. Idempotent.
    fn resume(&self) -> Result<(), GuestError>;
    /// Device state (vCPU registers, adapters) as a versioned, checksummed blob. Needs a
    /// quiesced guest.
    fn save_state(&self) -> Result<Vec<u8>, GuestError>;
    /// Loads a blob made by `save_state` (on the destination, before `resume`).
    fn load_state(&self, blob: &[u8]) -> Result<(), GuestError>;
    /// Slows the vCPUs to `100 - percent` % of their speed so pre-copy can converge
    /// (0 = full speed, at most 99).
    fn set_throttle(&self, percent: u8);
}
