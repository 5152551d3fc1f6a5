//! Guest memory and the knowledge of which of its pages changed.
//!
//! - [`region`]: the guest's RAM, a memfd (or a tmpfs file, to outlive the process) mapped
//!   shared (so RDMA can register it and a VMM can share it).
//! - [`bitmap`]: a set of dirty pages.
//! - [`tracker`]: the [`DirtyTracker`] seam and its kernel implementation (userfaultfd
//!   write-protect in async mode, read-and-rearmed with `PAGEMAP_SCAN`).
//! - [`digest`]: per-page hashes kept up to date as pages are sent and received, so that
//!   the switch-over compares a small digest instead of rescanning memory.

pub mod bitmap;
pub mod digest;
pub mod region;
pub mod tracker;
pub mod uffd;

pub use bitmap::DirtyBitmap;
pub use digest::{page_hash, MemoryDigest, ZERO_PAGE_HASH};
pub use region::{GuestMemory, MemoryError, PAGE_SIZE};
pub use tracker::{DirtyTracker, PageArmer, TrackerError};
