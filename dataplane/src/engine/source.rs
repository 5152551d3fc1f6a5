//! Source side of a migration.
use std::net::TcpStream;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use super::{EngineError, MigrationParams, MigrationReport, Progress};
use crate::guest::Guest;
use crate::memory::DirtyTracker;
use crate::transport::SourceTransport;

/// Everything the source needs; the control plane fills it in after connecting.
pub struct SourceContext<'a> {
    pub guest: &'a dyn Guest,
    pub tracker: &'a mut dyn DirtyTracker,
    /// Control channel to the destination engine (already past the agents' handshake).
    pub control: TcpStream,
    pub transport: Arc<dyn SourceTransport>,
    pub params: &'a MigrationParams,
    /// When the migrate command started: `total_ms` counts from here.
    pub started: Instant,
    /// What the destination reported for pre-faulting while preparing.
    pub prefault_ms: f64,
    /// Set to cancel; the migration fails back at the next check (at least every 100 ms).
    pub cancel: &'a AtomicBool,
}

/// Runs pre-copy and the switch-over.
///
/// `Ok`: the VM now runs on the destination; the source guest stays quiesced and must be
/// discarded. `Err(EngineError::LostAfterCommit)`: the commit point was passed but the
/// destination did not confirm; the source must still never run the VM again. Any other
/// `Err`: the migration failed before the commit point and the source guest has already
/// been resumed (fail-back).
pub fn migrate_out(ctx: SourceContext<'_>, progress: &mut dyn FnMut(&Progress)) -> Result<MigrationReport, EngineError> {
    let _ = (ctx, progress);
    unimplemented!()
}
