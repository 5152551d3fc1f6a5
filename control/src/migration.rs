//! One migration as the agents run it: the source side connects and hands the sockets to
//! `engine::source::migrate_out`; the destination side accepts, creates the incoming VM,
//! gathers the data streams and hands them to `engine::destination::migrate_in`.
//!
//! The engines own everything after the handshake (see [`crate::peer`] for its shape),
//! including the fail-back: on an error before the commit point the source engine has
//! already resumed the VM. What is left here is the registry: who hosts the VM afterwards.

mod incoming;
mod outgoing;
mod resolve;
mod streams;

use std::time::Duration;

pub use incoming::{accept_incoming, PendingSessions};
pub use outgoing::{run_outgoing, OutgoingError, OutgoingRequest, ProgressThrottle};
pub use resolve::{resolve, InDoubt, Services};

/// Connecting to the destination agent, per address it resolves to.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// `MigrateIn` to its answer: the destination allocates and pre-faults the whole guest
/// memory meanwhile, so the wait grows with the guest: this much, plus
/// [`ACCEPT_TIMEOUT_PER_GIB`] per GiB (pre-faulting runs at several hundred MiB/s or more).
pub const ACCEPT_TIMEOUT_BASE: Duration = Duration::from_secs(30);
pub const ACCEPT_TIMEOUT_PER_GIB: Duration = Duration::from_secs(10);
/// A data connection to its `Attached` answer, and the destination's wait for all of them.
pub const DATA_STREAMS_TIMEOUT: Duration = Duration::from_secs(10);
/// Progress sent to the watching CLI at most this often (plus every phase or round change).
pub const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// How long the final answer may wait for a slow watcher before it is dropped.
pub(crate) const FINAL_SEND_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the destination looks at the control connection and the cancel flag while it
/// waits for data streams.
pub(crate) const POLL_INTERVAL: Duration = Duration::from_millis(100);

/// A connected pair of loopback sockets, for tests.
#[cfg(test)]
fn tcp_pair() -> (std::net::TcpStream, std::net::TcpStream) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let a = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (b, _) = listener.accept().unwrap();
    (a, b)
}
