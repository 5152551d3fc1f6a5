//! ferry's data plane.
//!
//! Everything that touches guest bytes lives here: guest memory and its dirty tracking
//! ([`memory`]), the reference VM that stands in for a VMM ([`guest`]), the wire format
//! ([`wire`]), the transports that move pages between hosts ([`transport`]) and the
//! migration engine that drives pre-copy and the switch-over on each side ([`engine`]).
//!
//! The control plane (`ferry-control`) decides *when* things happen; this crate decides
//! *how* bytes move.

pub mod disk;
pub mod engine;
pub mod failpoint;
pub mod file_lock;
pub mod guest;
pub mod hash;
pub mod memory;
pub mod numa;
pub mod transport;
pub mod units;
pub mod wire;

pub use memory::{GuestMemory, PAGE_SIZE};
