//! Messages on the migration control channel between the two engines.
//!
//! ```text
//! source                                    destination
//!   Hello{pages, streams, disks} ────────▶   checks sizes
//!                         ◀───────────────   HelloAck{pages, disks}
//!   (bulk copy of each disk on the disk links; mirrored writes from then on)
//!   (rounds of pages on the data streams, each ending with a RoundEnd frame per stream)
//!   quiesce, final round
//!   SwitchOver{final_round, state,     ──▶ waits for every stream's final RoundEnd,
//!              digest, disk_digests}          syncs the disks, compares digests, loads the state
//!                                             journals Prepared (the copy is recoverable)
//!                         ◀───────────────   Prepared{digests}   (or NotInLockStep{digests}, Abort{reason})
//!   journals HandedOver ── COMMIT POINT: the source will never run the VM again ──
//!   Commit ──────────────────────────────▶   journals Owned, resumes the guest
//!                         ◀───────────────   Resumed
//! ```
//! Either side may send `Abort{reason}` before the commit point; the source then resumes.
//! The decisions are the barrier's ([`super::barrier`]); a destination that is prepared and
//! hears neither `Commit` nor `Abort` asks the source's agent (outside this channel).

use std::net::TcpStream;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use super::EngineError;
use crate::numa::{self, ThreadRole};
use crate::wire::{read_message, write_message, WireError};

/// Version of this message set (independent of the frame format).
pub const PROTOCOL_VERSION: u32 = 3;
/// Largest control message: the device state travels in `SwitchOver`.
pub const CONTROL_MESSAGE_MAX: u32 = 8 << 20;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToDestination {
    Hello {
        protocol: u32,
        pages: u64,
        streams: u32,
        transport: String,
        /// Size of each disk, in bytes (empty: memory only).
        disks: Vec<u64>,
        /// Largest disk request (bulk chunk or mirrored write piece) the source sends.
        disk_chunk_bytes: u32,
        /// Writes the destination keeps in flight per disk lane.
        disk_queue_depth: u32,
        /// The source's bound on the switch-over: the destination waits this long (and a
        /// margin) for the decision after `Prepared` before it asks the source's agent.
        switchover_timeout_ms: u64,
    },
    SwitchOver {
        final_round: u32,
        device_state: Vec<u8>,
        digest: u64,
        disk_digests: Vec<u64>,
    },
    Commit,
    Abort {
        reason: String,
    },
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum ToSource {
    HelloAck {
        pages: u64,
        disks: Vec<u64>,
    },
    Prepared {
        digest: u64,
        disk_digests: Vec<u64>,
    },
    /// The destination's digests differ from the source's: not prepared.
    NotInLockStep {
        digest: u64,
        disk_digests: Vec<u64>,
    },
    Resumed,
    Abort {
        reason: String,
    },
}

/// The control channel: a writer, and a reader thread feeding a channel so that every wait
/// has a deadline and notices cancellation.
pub struct ControlChannel<In> {
    writer: TcpStream,
    inbox: Receiver<Result<In, WireError>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl<In: DeserializeOwned + Send + 'static> ControlChannel<In> {
    pub fn new(stream: TcpStream) -> Result<Self, EngineError> {
        let io = |source| EngineError::Wire {
            channel: "control",
            source: WireError::Io {
                op: "setting up the control channel",
                source,
            },
        };
        stream.set_nodelay(true).map_err(io)?;
        let mut reader_stream = stream.try_clone().map_err(io)?;
        let (tx, inbox) = crossbeam_channel::bounded(16);
        let reader = numa::spawn(ThreadRole::Control, "ferry-control-rx", move || loop {
            let msg = read_message::<In>(&mut reader_stream, CONTROL_MESSAGE_MAX);
            let stop = msg.is_err();
            if tx.send(msg).is_err() || stop {
                return;
            }
        })
        .map_err(io)?;
        Ok(Self {
            writer: stream,
            inbox,
            reader: Some(reader),
        })
    }

    pub fn send<Out: Serialize>(&mut self, msg: &Out) -> Result<(), EngineError> {
        write_message(&mut self.writer, msg).map_err(|source| EngineError::Wire {
            channel: "control",
            source,
        })
    }

    /// Waits for the next message until `deadline`, checking `cancel` every 50 ms.
    pub fn recv(
        &self,
        deadline: Instant,
        cancel: &dyn Fn() -> bool,
        waiting_for: &'static str,
    ) -> Result<In, EngineError> {
        loop {
            if cancel() {
                return Err(EngineError::Cancelled);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(EngineError::Protocol {
                    reason: format!("timed out waiting for {waiting_for}"),
                });
            }
            match self
                .inbox
                .recv_timeout((deadline - now).min(Duration::from_millis(50)))
            {
                Ok(Ok(msg)) => return Ok(msg),
                Ok(Err(source)) => {
                    return Err(EngineError::Wire {
                        channel: "control",
                        source,
                    })
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(EngineError::Protocol {
                        reason: format!("control channel closed while waiting for {waiting_for}"),
                    })
                }
            }
        }
    }

    /// The receiving side, for `select!` with other event sources.
    pub fn inbox(&self) -> &Receiver<Result<In, WireError>> {
        &self.inbox
    }
}

impl<In> Drop for ControlChannel<In> {
    fn drop(&mut self) {
        let _ = self.writer.shutdown(std::net::Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}
