//! The migration engine: what the source and the destination do with guest pages, from the
//! first round of pre-copy to the switch-over.
//!
//! The control plane connects the sockets (one control channel, N data streams), creates
//! the incoming VM, and then hands everything to [`source::migrate_out`] on one side and
//! [`destination::migrate_in`] on the other. Both run to completion or fail; on any failure
//! before the commit point the source resumes the VM itself, so a caller cannot forget to.

use serde::{Deserialize, Serialize};

use crate::disk::{DirectIo, DiskError, LatencySummary};
use crate::guest::GuestError;
use crate::memory::TrackerError;
use crate::transport::TransportError;
use crate::wire::WireError;

pub mod barrier;
pub mod collect_pause;
pub mod convergence;
pub mod destination;
mod disk_copy;
pub mod pacer;
pub mod protocol;
mod sender;
pub mod source;
pub mod streams;
pub mod timeline;
pub mod trace;

/// An error and its sources as one line, for the `Abort` reason the peer logs and shows:
/// the peer cannot walk our error chain.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// How a migration is run. Defaults are what `ferry migrate` uses without flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrationParams {
    /// Parallel data streams (1..=64), or [`STREAMS_AUTO`]: the source agent chooses from
    /// its transport cores and the link ([`streams::choose_streams`]).
    pub streams: usize,
    /// Pause the guest may see at switch-over.
    pub downtime_ms: u64,
    /// Pre-copy rounds before switching over regardless (bounded downtime is then exceeded
    /// and the report says so).
    pub rounds_max: u32,
    /// Pre-copy time before switching over regardless.
    pub precopy_timeout_ms: u64,
    /// Caps the data rate (like QEMU's max-bandwidth); `None` = as fast as the link goes.
    pub bandwidth_max_bytes_per_s: Option<u64>,
    /// Bound on the switch-over: quiesce to resume.
    pub switchover_timeout_ms: u64,
    /// Bulk-copy chunk (a multiple of 4 KiB in 128 KiB..=8 MiB).
    #[serde(default = "disk_chunk_bytes_default")]
    pub disk_chunk_bytes: u32,
    /// io_uring queue depth of the bulk copy (reads on the source, writes on the destination).
    #[serde(default = "disk_queue_depth_default")]
    pub disk_queue_depth: u32,
    /// How the destination opens the disk images it creates.
    #[serde(default)]
    pub direct_io: DirectIo,
    /// The destination takes the VM over but leaves it paused until told to resume
    /// (`ferry vm resume`), like QEMU's `-S` on an incoming VM.
    #[serde(default)]
    pub start_paused: bool,
    /// After a successful hand-over the source keeps its disk images instead of deleting
    /// the ones its agent created (for inspection, or to compare with the destination's).
    #[serde(default)]
    pub keep_source_disks: bool,
    /// Which data path carries pages and disk blocks.
    #[serde(default)]
    pub transport: TransportChoice,
    /// How the TCP transport sends pages: auto (zero-copy where the kernel really avoids
    /// the copy, plain send elsewhere), zerocopy, copy.
    #[serde(default)]
    pub send_mode: crate::transport::tcp::SendMode,
    /// Whether the vCPUs stop while pre-copy collects the dirty set (see
    /// [`collect_pause`]): auto, always, never.
    #[serde(default)]
    pub collect_pause: collect_pause::CollectPause,
}

/// `--transport auto|rdma|tcp`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportChoice {
    /// RDMA when a local device reaches the peer and the peer's agent can listen on one;
    /// otherwise TCP (the report says why).
    #[default]
    Auto,
    /// RDMA or fail, with the reason.
    Rdma,
    /// TCP streams only.
    Tcp,
}

impl std::fmt::Display for TransportChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::Rdma => "rdma",
            Self::Tcp => "tcp",
        })
    }
}

impl std::str::FromStr for TransportChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "rdma" => Ok(Self::Rdma),
            "tcp" => Ok(Self::Tcp),
            other => Err(format!(
                "transport must be auto, rdma or tcp, not {other:?}"
            )),
        }
    }
}

fn disk_chunk_bytes_default() -> u32 {
    crate::disk::CHUNK_BYTES_DEFAULT as u32
}

fn disk_queue_depth_default() -> u32 {
    crate::disk::QUEUE_DEPTH_DEFAULT
}

/// `MigrationParams::streams` value that asks the source agent to choose.
pub const STREAMS_AUTO: usize = 0;

/// Smallest bulk-copy chunk: mirrored writes up to this size travel as one request.
pub const DISK_CHUNK_BYTES_MIN: u32 = 128 << 10;

impl Default for MigrationParams {
    fn default() -> Self {
        Self {
            streams: STREAMS_AUTO,
            downtime_ms: 50,
            rounds_max: 30,
            precopy_timeout_ms: 120_000,
            bandwidth_max_bytes_per_s: None,
            switchover_timeout_ms: 10_000,
            disk_chunk_bytes: disk_chunk_bytes_default(),
            disk_queue_depth: disk_queue_depth_default(),
            direct_io: DirectIo::Auto,
            start_paused: false,
            keep_source_disks: false,
            transport: TransportChoice::Auto,
            send_mode: crate::transport::tcp::SendMode::Auto,
            collect_pause: collect_pause::CollectPause::Auto,
        }
    }
}

impl MigrationParams {
    /// Checks the parameters before anything is connected.
    pub fn validate(&self) -> Result<(), EngineError> {
        let bad = |reason: String| Err(EngineError::BadParams { reason });
        if self.streams > 64 {
            return bad(format!(
                "streams must be 1..=64 (or auto), not {}",
                self.streams
            ));
        }
        if self.rounds_max == 0 {
            return bad("rounds_max must be at least 1".into());
        }
        if self.bandwidth_max_bytes_per_s == Some(0) {
            return bad("bandwidth cap must be above 0".into());
        }
        if self.switchover_timeout_ms == 0 {
            return bad("switch-over timeout must be above 0".into());
        }
        let chunk = self.disk_chunk_bytes;
        if !(DISK_CHUNK_BYTES_MIN..=crate::disk::CHUNK_BYTES_MAX as u32).contains(&chunk)
            || !(chunk as usize).is_multiple_of(crate::disk::BLOCK_SIZE)
        {
            return bad(format!(
                "disk chunk size {chunk} must be a multiple of 4 KiB in {}..={} bytes",
                DISK_CHUNK_BYTES_MIN,
                crate::disk::CHUNK_BYTES_MAX
            ));
        }
        if !(1..=crate::disk::QUEUE_DEPTH_MAX).contains(&self.disk_queue_depth) {
            return bad(format!(
                "disk queue depth must be 1..={}, not {}",
                crate::disk::QUEUE_DEPTH_MAX,
                self.disk_queue_depth
            ));
        }
        Ok(())
    }
}

/// Where a migration is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Prepare,
    DiskCopy,
    MemoryPreCopy,
    SwitchOver,
    Done,
    FailedBack,
}

impl std::fmt::Display for Phase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Phase::Prepare => "prepare",
            Phase::DiskCopy => "disk-copy",
            Phase::MemoryPreCopy => "pre-copy",
            Phase::SwitchOver => "switch-over",
            Phase::Done => "done",
            Phase::FailedBack => "failed-back",
        })
    }
}

/// A snapshot of a running migration, emitted a few times per second and at each round.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Progress {
    pub phase: Option<Phase>,
    /// Current pre-copy round (0 = the full pass).
    pub round: u32,
    /// Bytes put on the wire so far (page payload plus frame headers).
    pub bytes_sent: u64,
    /// Pages the current round must send, and how many it has sent.
    pub round_pages_total: u64,
    pub round_pages_sent: u64,
    /// Data rate over the last interval.
    pub rate_bytes_per_s: u64,
    /// Dirty pages found by the last collection.
    pub dirty_pages: u64,
    /// Predicted pause if the switch-over started now.
    pub predicted_downtime_ms: f64,
    /// vCPU throttle applied to make pre-copy converge (0 = none).
    pub throttle_percent: u8,
    /// Time since the migration started.
    pub elapsed_ms: u64,
    /// Estimated time to the end of the current round (or of the disk's bulk copy).
    pub eta_ms: Option<u64>,
    /// Per disk: the bulk copy's progress, and mirroring after it.
    #[serde(default)]
    pub disks: Vec<DiskProgress>,
}

/// One disk's bulk copy.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskProgress {
    pub bytes_total: u64,
    /// Bytes behind the cursor (written on the destination).
    pub bytes_copied: u64,
    pub rate_bytes_per_s: u64,
    pub eta_ms: Option<u64>,
    /// Guest writes mirrored so far, and their bytes.
    pub mirrored_writes: u64,
    #[serde(default)]
    pub mirrored_bytes: u64,
}

/// What happened to one disk.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskReport {
    pub bytes: u64,
    /// Bulk copy: bytes sent with payload, and bytes sent as zero markers.
    pub data_bytes: u64,
    pub zero_bytes: u64,
    pub copy_ms: f64,
    pub copy_bytes_per_s: f64,
    pub chunk_bytes: u32,
    pub queue_depth: u32,
    /// The source image was read with O_DIRECT.
    pub direct_io: bool,
    /// io_uring buffers were registered.
    pub registered_buffers: bool,
    pub mirrored_writes: u64,
    pub mirrored_bytes: u64,
    /// Guest writes ahead of the cursor during the migration (local only).
    pub local_writes: u64,
    /// Guest writes that waited for the chunk in flight.
    pub waited_for_copy: u64,
    /// Guest write latency: mirrored, ahead of the cursor, and before the migration.
    pub mirrored_latency: LatencySummary,
    pub local_latency: LatencySummary,
    pub unmirrored_latency: LatencySummary,
    /// Digest both sides agreed on.
    pub digest: u64,
}

/// The outcome of a migration, as `ferry migrate --json` prints it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationReport {
    /// From the start of the migrate command until the VM runs on the destination.
    pub total_ms: f64,
    /// From quiesce on the source to resume on the destination (as acknowledged to the source).
    pub downtime_ms: f64,
    /// Bytes on the wire (payload and frame headers).
    pub bytes_sent: u64,
    /// Pages sent with payload, and pages sent as zero markers.
    pub pages_sent: u64,
    pub zero_pages_sent: u64,
    /// Pre-copy rounds, counting round 0, not counting the final stop-and-copy.
    pub rounds: u32,
    /// bytes_sent over the time spent sending.
    pub throughput_bytes_per_s: f64,
    pub transport: String,
    /// Why this transport (`auto`'s choice and its reason, the RDMA device).
    #[serde(default)]
    pub transport_note: String,
    /// What the RDMA transport's device did (None over TCP): proof that it carried the data.
    #[serde(default)]
    pub rdma: Option<RdmaReport>,
    /// How the TCP transport sent pages (None over RDMA): zero-copy or plain, and why.
    #[serde(default)]
    pub send_path: Option<crate::transport::tcp::SendPathReport>,
    pub streams: usize,
    /// Why that many streams (`auto`'s reasoning, or "set by --streams").
    #[serde(default)]
    pub streams_reason: String,
    /// Dirty tracker used on the source.
    pub tracker: String,
    /// Time the destination spent pre-faulting its memory while preparing.
    pub prefault_ms: f64,
    /// Time the source spent in the trace phase (arming the tracker), right before round 0.
    #[serde(default)]
    pub trace_ms: f64,
    /// Highest vCPU throttle applied.
    pub throttle_percent_max: u8,
    /// Pre-copy collections taken with the vCPUs stopped (`--collect-pause`), the longest
    /// such stop and their sum: what the guest stood still outside the pause.
    #[serde(default)]
    pub collect_pauses: u32,
    #[serde(default)]
    pub collect_pause_ms_max: f64,
    #[serde(default)]
    pub collect_pause_ms_total: f64,
    /// Why pre-copy stopped: "converged", "rounds-max", "timeout".
    pub converged: String,
    /// Pages in the final stop-and-copy.
    pub final_pages: u64,
    /// Digest both sides agreed on.
    pub memory_digest: u64,
    /// Time from the start of the bulk copy to its end (0 without disks).
    #[serde(default)]
    pub disk_copy_ms: f64,
    #[serde(default)]
    pub disks: Vec<DiskReport>,
    /// What happened over time (for `ferry migrate --plot`).
    #[serde(default)]
    pub timeline: timeline::Timeline,
}

/// RDMA work the source posted during a migration.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RdmaReport {
    pub device: String,
    /// RDMA WRITEs of guest pages and the bytes they moved.
    pub memory_writes: u64,
    pub memory_write_bytes: u64,
    /// Announcements (SENDs) of memory batches.
    pub memory_sends: u64,
    /// RDMA WRITEs of disk chunks and mirrored writes, and their bytes.
    #[serde(default)]
    pub disk_writes: u64,
    #[serde(default)]
    pub disk_write_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("bad migration parameters: {reason}")]
    BadParams { reason: String },
    #[error("the peer speaks a different protocol: {reason}")]
    Protocol { reason: String },
    #[error("wire error on the {channel} channel")]
    Wire {
        channel: &'static str,
        source: WireError,
    },
    #[error("transport error")]
    Transport(#[from] TransportError),
    #[error("dirty tracking failed")]
    Tracker(#[from] TrackerError),
    #[error("guest error")]
    Guest(#[from] GuestError),
    #[error("memory digests differ after the last pages (source {source_digest:#018x}, destination {destination_digest:#018x}): the copy is not in lock-step")]
    DigestMismatch {
        source_digest: u64,
        destination_digest: u64,
    },
    #[error("the peer aborted the migration: {reason}")]
    PeerAborted { reason: String },
    #[error("cancelled")]
    Cancelled,
    #[error("switch-over did not finish within {timeout_ms} ms")]
    SwitchoverTimeout { timeout_ms: u64 },
    #[error("the VM was handed over (commit point passed) but the destination did not confirm resuming it: {reason}")]
    LostAfterCommit { reason: String },
    #[error("disk error")]
    Disk(#[from] DiskError),
    #[error("the journal could not record the decision: {reason}")]
    Journal { reason: String },
    #[error("prepared, but the source's decision did not arrive ({reason}): the VM is in doubt here until the source's agent says how the swap ended")]
    InDoubt { reason: String },
    #[error("disk digests differ at the switch-over (source {source_digests:x?}, destination {destination_digests:x?}): the disks are not in lock-step")]
    DiskDigestMismatch {
        source_digests: Vec<u64>,
        destination_digests: Vec<u64>,
    },
    #[error("disks differ: source has {source_sizes:?} bytes, destination {destination_sizes:?}")]
    DiskSizeMismatch {
        source_sizes: Vec<u64>,
        destination_sizes: Vec<u64>,
    },
    #[error("memory sizes differ: source {source_pages} pages, destination {destination_pages}")]
    SizeMismatch {
        source_pages: u64,
        destination_pages: u64,
    },
}
