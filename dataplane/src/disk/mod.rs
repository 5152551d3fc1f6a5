//! Virtual disks and the storage engine that moves them.
//!
//! - [`buffer`]: 4 KiB-aligned buffers for O_DIRECT.
//! - [`image`]: a raw disk image (file or block device) opened with the chosen direct-I/O
//!   policy; positioned reads and writes, preallocation, zeroing.
//! - [`uring`]: an io_uring ring per disk worker thread with registered buffers, and the
//!   linear pipelined read the bulk copy is built on.
//! - [`latency`]: the histogram guest write latencies are reported from.
//! - [`mirror`]: the guest-facing [`mirror::VirtualDisk`]: every guest write passes through
//!   it, and while a migration mirrors the disk it orders guest writes against the bulk
//!   copy's cursor (range lock) and completes a write behind the cursor only when both the
//!   local and the remote write have completed.

pub mod buffer;
pub mod image;
pub mod latency;
pub mod mirror;
pub mod uring;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use buffer::AlignedBuf;
pub use image::DiskImage;
pub use latency::{LatencyHistogram, LatencySummary};
pub use mirror::{Mirror, MirrorStats, MirrorTarget, VirtualDisk};
pub use uring::BlockRing;

/// Unit of alignment, hashing and zero detection on disks (equal to the page size).
pub const BLOCK_SIZE: usize = 4096;
/// Bulk-copy chunk by default.
pub const CHUNK_BYTES_DEFAULT: usize = 1 << 20;
/// Largest bulk-copy chunk accepted (and largest disk frame payload).
pub const CHUNK_BYTES_MAX: usize = 8 << 20;
/// io_uring queue depth of the bulk copy by default.
pub const QUEUE_DEPTH_DEFAULT: u32 = 16;
/// Largest queue depth accepted.
pub const QUEUE_DEPTH_MAX: u32 = 256;

/// Whether disk I/O bypasses the page cache.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirectIo {
    /// O_DIRECT or fail, explaining why.
    Required,
    /// O_DIRECT where the filesystem accepts it; otherwise buffered I/O, said once.
    #[default]
    Auto,
    /// Buffered I/O.
    Off,
}

impl DirectIo {
    pub const ALL: [DirectIo; 3] = [DirectIo::Required, DirectIo::Auto, DirectIo::Off];

    pub fn as_str(self) -> &'static str {
        match self {
            DirectIo::Required => "required",
            DirectIo::Auto => "auto",
            DirectIo::Off => "off",
        }
    }
}

impl fmt::Display for DirectIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("unknown direct-I/O mode {input:?}; expected one of: required, auto, off")]
pub struct ParseDirectIoError {
    pub input: String,
}

impl FromStr for DirectIo {
    type Err = ParseDirectIoError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        DirectIo::ALL
            .into_iter()
            .find(|m| m.as_str() == input)
            .ok_or_else(|| ParseDirectIoError {
                input: input.to_string(),
            })
    }
}

/// Everything that can go wrong with a disk. Every variant names the path (or the ring
/// operation) so the message stands on its own.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk image {path}: cannot open")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path}: already exists")]
    Exists { path: PathBuf },
    #[error("disk image {path}: the filesystem refuses O_DIRECT; direct I/O is required (use --direct-io auto to fall back to buffered I/O)")]
    DirectIoRefused {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("disk image {path}: {what}")]
    Unsupported { path: PathBuf, what: String },
    #[error("disk image {path}: needs {needed} bytes, the filesystem has {available} free")]
    NoSpace {
        path: PathBuf,
        needed: u64,
        available: u64,
    },
    #[error("disk image {path}: i/o error while {op} at offset {offset}")]
    Io {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        source: std::io::Error,
    },
    #[error("disk image {path}: {op} of {len} bytes at offset {offset} is outside the disk ({size} bytes)")]
    OutOfRange {
        path: PathBuf,
        op: &'static str,
        offset: u64,
        len: u64,
        size: u64,
    },
    #[error("{op}: offset {offset} and length {len} must be multiples of {align}")]
    Misaligned {
        op: &'static str,
        offset: u64,
        len: u64,
        align: u64,
    },
    #[error("io_uring: {op} failed")]
    Ring {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("bad disk parameter: {reason}")]
    BadParams { reason: String },
    #[error("disk mirror: {reason}")]
    Mirror { reason: String },
}
