//! RDMA transport: pages and disk blocks written by the source's device straight into the
//! destination's registered memory (RDMA WRITE over reliable connections set up with
//! rdma_cm), each batch announced by a SEND so the destination's digest and bookkeeping
//! stay exact.
//!
//! - [`verbs`]: the only module that calls libibverbs/librdmacm (loaded at run time).
//! - [`link`]: connection set-up: a listener on the destination, lanes connected from the
//!   source, and a monitor that breaks every lane when rdma_cm reports a disconnect.
//! - [`memory`]: [`memory::RdmaSource`] / [`memory::RdmaDestination`], the memory streams.
//! - [`disk`]: the disk lanes (bulk and mirror) through registered staging buffers.

pub mod disk;
pub mod link;
pub mod memory;
pub mod session;
pub mod verbs;

use verbs::CmEventKind;

#[derive(Debug, thiserror::Error)]
pub enum RdmaError {
    #[error("libibverbs/librdmacm are not installed on this host (install rdma-core)")]
    NoLibrary,
    #[error("no RDMA device on this host")]
    NoDevice,
    #[error("no RDMA device on this host (the kernel has no RDMA support)")]
    NoKernelSupport,
    #[error("{op}")]
    Verbs {
        op: &'static str,
        source: std::io::Error,
    },
    #[error("the rdma_cm id is not bound to an RDMA device")]
    NotBound,
    #[error("the connection resolved to another RDMA device than the first one")]
    OtherDevice,
    #[error("timed out waiting for rdma_cm event {waiting_for:?}")]
    Timeout { waiting_for: CmEventKind },
    #[error("waiting for rdma_cm event {want:?}, got {got} (status {status})")]
    UnexpectedEvent {
        want: CmEventKind,
        got: String,
        status: i32,
    },
    #[error("{len} bytes of private data exceed what a connect carries")]
    PrivateDataTooLong { len: usize },
    #[error("{len} bytes at offset {offset} fall outside a {region}-byte registered region")]
    OutOfRegion { offset: u64, len: u64, region: u64 },
    #[error("the peer's connection message is invalid: {reason}")]
    BadPeerMessage { reason: String },
    #[error("pages of a guest memory that was not registered for this link")]
    UnregisteredMemory,
    #[error("stopped while waiting for the peer's lanes")]
    Cancelled,
    #[error("no RDMA device reaches {peer}: {reason}")]
    Unreachable { peer: String, reason: String },
}

/// Test support: the two soft-RoCE addresses of ../shared/rxe-vm (`RXE_ADDR_A` for the
/// source, `RXE_ADDR_B` for the destination), or `None` where there is no RDMA device —
/// then the caller skips, unless `FERRY_REQUIRE_RDMA=1` says the run must have one.
pub fn test_addresses() -> Option<(std::net::IpAddr, std::net::IpAddr)> {
    let required = std::env::var("FERRY_REQUIRE_RDMA").is_ok_and(|v| v == "1");
    let addrs = (|| {
        verbs::probe().ok()?;
        let a = std::env::var("RXE_ADDR_A").ok()?.parse().ok()?;
        let b = std::env::var("RXE_ADDR_B").ok()?.parse().ok()?;
        Some((a, b))
    })();
    if addrs.is_none() {
        assert!(
            !required,
            "FERRY_REQUIRE_RDMA=1 but no RDMA device or no RXE_ADDR_A/RXE_ADDR_B"
        );
        eprintln!("skipped: no RDMA device here (runs inside ../shared/rxe-vm)");
    }
    addrs
}
