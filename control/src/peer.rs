//! What opens a connection to an agent, and the agent ↔ agent handshake that sets up a
//! migration before the engines take over.
//!
//! ```text
//! source agent                                   destination agent
//!   connect #0: MigrateIn{session, spec, streams, …} ▶ create DATA_DIR/disks/NAME.img (with a disk),
//!                                                      ReferenceVm::incoming_with_disk(spec, disk)
//!              ◀ Accepted{prefault_ms} | Refused{reason}
//!   connect: DataStream{session, index}  (index 0..N, then N and N+1 with a disk)
//!                                                    ▶ routed to the pending session
//!              ◀ Attached | Refused{reason}
//!   ── connection #0 becomes the engines' control channel, data streams 0..N carry memory,
//!      N the disk's bulk copy and N+1 its mirrored guest writes ──
//! ```
//!
//! The session number ties the data connections to their control connection; it is random
//! so that a stray or stale data connection does not attach to the wrong migration.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use ferry_dataplane::disk::DirectIo;
use ferry_dataplane::guest::reference::VmSpec;
use serde::{Deserialize, Serialize};

use crate::api::Request;

/// Largest opening or handshake message: a spec with a 255-byte name is far below this.
pub const PEER_MESSAGE_LEN_MAX: u32 = 64 << 10;

/// Memory data streams a migration may use (the engine accepts 1..=64).
pub const STREAMS_MAX: u32 = 64;
/// Data connections a disk adds after the memory streams: its bulk lane and its mirror lane.
pub const DISK_LANES: u32 = 2;

/// The first message on every connection to an agent says what the connection is.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Opening {
    /// A CLI request.
    Request(Request),
    /// A source agent proposes a migration; this connection becomes its control channel.
    MigrateIn(MigrateIn),
    /// A data stream of an accepted migration.
    DataStream(DataStream),
    /// A destination in doubt asks how a swap ended; answered with a
    /// [`ferry_dataplane::engine::barrier::SwapOutcome`], then closed.
    Outcome(OutcomeQuestion),
    /// A destination that learnt of the commit by asking tells the source it owns the VM
    /// now (the source then records the release); no answer.
    Released(OutcomeQuestion),
}

/// "How did swap `session` of `vm` end?" (`epoch`: the one the VM would have on the asking
/// destination).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeQuestion {
    pub vm: String,
    pub epoch: u64,
    pub session: u64,
}

/// A source agent asks to migrate a VM here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct MigrateIn {
    pub session: u64,
    pub spec: VmSpec,
    /// Memory data streams that will follow (1..=[`STREAMS_MAX`]); a VM with a disk
    /// (`spec.disk`) adds [`DISK_LANES`] more (see [`MigrateIn::data_connections`]).
    pub streams: u32,
    /// How the destination opens the disk image it creates for the VM.
    pub direct_io: DirectIo,
    /// The destination takes the VM over but leaves it paused until `vm resume`.
    pub start_paused: bool,
    /// The source would like RDMA lanes (it has a device that reaches this agent).
    pub rdma: bool,
    /// The VM's epoch on the source; the destination owns it at `epoch + 1` once committed.
    pub epoch: u64,
    /// The source agent's listening port (at the control connection's peer address): where
    /// an in-doubt destination asks for the outcome.
    pub source_port: u16,
}

impl MigrateIn {
    /// Data connections that follow the handshake: the memory streams, then the disk lanes.
    pub fn data_connections(&self) -> u32 {
        data_connections(self.streams, self.spec.disk.is_some())
    }
}

/// Data connections of a migration with `streams` memory streams, with or without a disk.
pub fn data_connections(streams: u32, has_disk: bool) -> u32 {
    streams + if has_disk { DISK_LANES } else { 0 }
}

/// The destination's answer to [`MigrateIn`].
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum MigrateInReply {
    /// The incoming VM exists (memory pre-faulted, vCPUs parked); open the data streams.
    Accepted {
        prefault_ms: f64,
        /// The answer to [`MigrateIn::rdma`].
        rdma: RdmaOffer,
    },
    Refused {
        reason: String,
    },
}

/// Whether the destination listens for RDMA lanes of this migration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RdmaOffer {
    /// Not asked for.
    NotAsked,
    /// rdma_cm listens on the control connection's local address, at `port`.
    Listening { port: u16, device: String },
    /// Asked for, but this agent cannot (no rdma-core, no device on that address, …).
    Unavailable { reason: String },
}

/// Sent by the source on the control connection once the TCP data streams are open (and,
/// when offered, the RDMA lanes were tried): which one the engines use. The TCP streams
/// are always opened, so an RDMA lane that fails to connect falls back without a new
/// handshake.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DataPlaneChoice {
    Tcp,
    Rdma,
}

/// Opens data connection `index` of `session`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataStream {
    pub session: u64,
    pub index: u32,
}

/// The destination's answer on a data connection, sent before any frame.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum DataStreamReply {
    Attached,
    Refused { reason: String },
}

/// A fresh, unpredictable-enough session number (never 0).
///
/// std's `RandomState` is keyed from the OS's random source once per process; mixing in the
/// time and a counter makes every call different.
pub fn new_session_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    hasher.write_u128(nanos);
    hasher.finish().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_dataplane::guest::reference::{DiskPattern, DiskSpec, Pattern};
    use ferry_dataplane::wire::message::{decode_message, encode_message};

    fn round_trip<T>(value: &T) -> T
    where
        T: Serialize + serde::de::DeserializeOwned,
    {
        let buf = encode_message(value).unwrap();
        decode_message(&buf, PEER_MESSAGE_LEN_MAX).unwrap()
    }

    #[test]
    fn openings_and_replies_round_trip() {
        let spec = VmSpec {
            name: "x".repeat(255),
            memory_bytes: 1 << 30,
            vcpus: 64,
            dirty_rate_bytes_per_s: u64::MAX,
            pattern: Pattern::Uniform,
            seed: u64::MAX,
            fill_percent: 0,
            disk: Some(DiskSpec {
                bytes: 16 << 40,
                write_rate_bytes_per_s: u64::MAX,
                pattern: DiskPattern::Hotset,
                fill_percent: 100,
            }),
        };
        let incoming = MigrateIn {
            session: 42,
            spec: spec.clone(),
            streams: STREAMS_MAX,
            direct_io: DirectIo::Required,
            start_paused: true,
            rdma: true,
            epoch: 3,
            source_port: 4242,
        };
        assert_eq!(incoming.data_connections(), STREAMS_MAX + DISK_LANES);
        let without_disk = MigrateIn {
            spec: VmSpec {
                disk: None,
                ..spec.clone()
            },
            ..incoming.clone()
        };
        assert_eq!(without_disk.data_connections(), STREAMS_MAX);
        let openings = [
            Opening::Request(Request::VmList),
            Opening::MigrateIn(incoming),
            Opening::MigrateIn(without_disk),
            Opening::DataStream(DataStream {
                session: u64::MAX,
                index: 63,
            }),
            Opening::Outcome(OutcomeQuestion {
                vm: "v".into(),
                epoch: 2,
                session: 9,
            }),
        ];
        for opening in openings {
            assert_eq!(round_trip(&opening), opening);
        }
        for reply in [
            MigrateInReply::Accepted {
                prefault_ms: 12.25,
                rdma: RdmaOffer::Listening {
                    port: 4791,
                    device: "rxe1".into(),
                },
            },
            MigrateInReply::Accepted {
                prefault_ms: 0.0,
                rdma: RdmaOffer::Unavailable {
                    reason: "no RDMA device".into(),
                },
            },
            MigrateInReply::Refused {
                reason: "no".into(),
            },
        ] {
            assert_eq!(round_trip(&reply), reply);
        }
        for choice in [DataPlaneChoice::Tcp, DataPlaneChoice::Rdma] {
            assert_eq!(round_trip(&choice), choice);
        }
        for reply in [
            DataStreamReply::Attached,
            DataStreamReply::Refused {
                reason: "unknown session".into(),
            },
        ] {
            assert_eq!(round_trip(&reply), reply);
        }
    }

    #[test]
    fn an_oversized_opening_is_refused() {
        let opening = Opening::Request(Request::VmStatus {
            name: "n".repeat(PEER_MESSAGE_LEN_MAX as usize),
        });
        let buf = encode_message(&opening).unwrap();
        assert!(decode_message::<Opening>(&buf, PEER_MESSAGE_LEN_MAX).is_err());
    }

    #[test]
    fn session_ids_differ_and_are_never_zero() {
        let ids: std::collections::HashSet<u64> = (0..1000).map(|_| new_session_id()).collect();
        assert_eq!(ids.len(), 1000);
        assert!(!ids.contains(&0));
    }
}
