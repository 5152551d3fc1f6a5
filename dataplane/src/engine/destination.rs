//! Destination side of a migration.
use std::net::TcpStream;
use std::sync::atomic::AtomicBool;

use super::EngineError;
use crate::guest::Guest;
use crate::transport::DestinationTransport;

/// Everything the destination needs; the control plane fills it in after accepting.
pub struct DestinationContext<'a> {
    /// The incoming guest: memory allocated (and pre-faulted), vCPUs parked.
    pub guest: &'a dyn Guest,
    pub control: TcpStream,
    pub transport: Box<dyn DestinationTransport>,
    pub cancel: &'a AtomicBool,
}

/// What the destination saw.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct IncomingReport {
    pub pages_received: u64,
    pub rounds: u32,
    pub memory_digest: u64,
}

/// Receives pages until the switch-over. `Ok`: device state loaded, digest matched, the
/// source committed and the guest has been resumed here. `Err`: the guest was not resumed
/// and must be discarded (the source keeps or resumes the VM).
pub fn migrate_in(ctx: DestinationContext<'_>) -> Result<IncomingReport, EngineError> {
    let _ = ctx;
    unimplemented!()
}
