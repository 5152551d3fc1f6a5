//! Destination side of a migration: land pages, then prove lock-step, load the device
//! state, and resume only when the source has committed.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{select, unbounded, RecvTimeoutError};
use tracing::{info, warn};

use super::barrier::{
    DestinationAction, DestinationInput, DestinationOutcome, DestinationSwap, SwapJournal,
};
use super::protocol::{ControlChannel, ToDestination, ToSource, PROTOCOL_VERSION};
use super::EngineError;
use crate::disk::{BLOCK_SIZE, CHUNK_BYTES_MAX, QUEUE_DEPTH_MAX};
use crate::guest::Guest;
use crate::memory::MemoryDigest;
use crate::transport::{DestinationTransport, DiskDestination, LandingDisk, ReceiveEvent};

/// How long the destination waits for anything from the source before giving up. Pre-copy
/// rounds report nothing on the control channel, so this bounds silence on the data streams
/// too (each round ends with a marker on every stream).
const SOURCE_SILENCE_MAX: Duration = Duration::from_secs(120);
/// How long a broken stream waits for the source's reason.
const ABORT_GRACE: Duration = Duration::from_millis(300);
/// After `Prepared`, the destination waits the source's switch-over bound plus this for the
/// decision before it asks the source's agent.
const DECISION_MARGIN: Duration = Duration::from_secs(5);
/// Between two questions of an in-doubt destination (the control plane asks; the engine
/// hands over at the first).
pub const ASK_INTERVAL: Duration = Duration::from_millis(500);

/// Everything the destination needs; the control plane fills it in after accepting.
pub struct DestinationContext<'a> {
    /// The incoming guest: memory allocated (and pre-faulted), vCPUs parked.
    pub guest: &'a dyn Guest,
    pub control: TcpStream,
    pub transport: Box<dyn DestinationTransport>,
    /// The disk links, when the guest has disks.
    pub disk_transport: Option<Box<dyn DiskDestination>>,
    /// The guest's disk images were created for this migration and read as zero.
    pub fresh_disks: bool,
    /// Take ownership at the commit but leave the guest paused.
    pub start_paused: bool,
    pub cancel: &'a AtomicBool,
    /// Where `Prepared` and ownership are recorded before they are acted on.
    pub journal: &'a dyn SwapJournal,
}

/// What the destination saw.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct IncomingReport {
    pub pages_received: u64,
    pub rounds: u32,
    pub memory_digest: u64,
    #[serde(default)]
    pub disk_digests: Vec<u64>,
}

/// Receives pages until the switch-over. `Ok`: device state loaded, digest matched, the
/// source committed and the guest has been resumed here. `Err(EngineError::InDoubt)`: the
/// destination is prepared (journaled) but the source's decision did not arrive: the guest
/// must be kept, paused, until the source's agent says how the swap ended. Any other `Err`:
/// the guest was not resumed and must be discarded (the source keeps or resumes the VM).
pub fn migrate_in(ctx: DestinationContext<'_>) -> Result<IncomingReport, EngineError> {
    let DestinationContext {
        guest,
        control,
        mut transport,
        mut disk_transport,
        fresh_disks,
        start_paused,
        cancel,
        journal,
    } = ctx;
    let mut control = ControlChannel::<ToDestination>::new(control)?;
    let incoming = Incoming {
        guest,
        fresh_disks,
        start_paused,
        cancel,
        journal,
    };
    let result = receive(
        &incoming,
        &mut control,
        transport.as_mut(),
        &mut disk_transport,
    );
    transport.shutdown();
    if let Some(disk_transport) = disk_transport.as_mut() {
        disk_transport.shutdown();
    }
    if let Err(error @ EngineError::InDoubt { .. }) = &result {
        warn!(%error, "incoming migration prepared but undecided; keeping the paused VM");
    } else if let Err(error) = &result {
        warn!(%error, "incoming migration failed; the VM stays with the source");
        // The peer already knows when it aborted, when we answered NotInLockStep, or when
        // the barrier told it.
        if !matches!(
            error,
            EngineError::PeerAborted { .. }
                | EngineError::DigestMismatch { .. }
                | EngineError::DiskDigestMismatch { .. }
                | EngineError::Journal { .. }
        ) {
            let _ = control.send(&ToSource::Abort {
                reason: super::error_chain(&error),
            });
        }
    }
    result
}

/// Waits briefly for an `Abort` from the source (it explains why the streams broke).
fn abort_reason(control: &ControlChannel<ToDestination>) -> Option<String> {
    match control.inbox().recv_timeout(ABORT_GRACE) {
        Ok(Ok(ToDestination::Abort { reason })) => Some(reason),
        _ => None,
    }
}

/// The incoming guest and how to take it over (the context without its channels).
struct Incoming<'a> {
    guest: &'a dyn Guest,
    fresh_disks: bool,
    start_paused: bool,
    cancel: &'a AtomicBool,
    journal: &'a dyn SwapJournal,
}

fn receive(
    incoming: &Incoming<'_>,
    control: &mut ControlChannel<ToDestination>,
    transport: &mut dyn DestinationTransport,
    disk_transport: &mut Option<Box<dyn DiskDestination>>,
) -> Result<IncomingReport, EngineError> {
    let &Incoming {
        guest,
        fresh_disks,
        start_paused,
        cancel,
        journal,
    } = incoming;
    let memory = Arc::clone(guest.memory());
    let our_disks: Vec<u64> = guest.disks().iter().map(|d| d.size()).collect();
    let disk_link_params;
    let decision_wait;
    let pages = memory.pages() as u64;
    let is_cancelled = || cancel.load(Ordering::Relaxed);
    match control.recv(
        Instant::now() + SOURCE_SILENCE_MAX,
        &is_cancelled,
        "the source's hello",
    )? {
        ToDestination::Hello {
            protocol,
            pages: theirs,
            streams,
            transport: kind,
            disks,
            disk_chunk_bytes,
            disk_queue_depth,
            switchover_timeout_ms,
        } => {
            decision_wait = Duration::from_millis(switchover_timeout_ms) + DECISION_MARGIN;
            if protocol != PROTOCOL_VERSION {
                return Err(EngineError::Protocol {
                    reason: format!("source speaks migration protocol {protocol}, this agent {PROTOCOL_VERSION}"),
                });
            }
            if theirs != pages {
                control.send(&ToSource::HelloAck {
                    pages,
                    disks: our_disks,
                })?;
                return Err(EngineError::SizeMismatch {
                    source_pages: theirs,
                    destination_pages: pages,
                });
            }
            if streams as usize != transport.streams() || kind != transport.name() {
                return Err(EngineError::Protocol {
                    reason: format!(
                        "source uses {streams} {kind} streams, destination has {} {}",
                        transport.streams(),
                        transport.name()
                    ),
                });
            }
            if disks != our_disks {
                control.send(&ToSource::HelloAck {
                    pages,
                    disks: our_disks.clone(),
                })?;
                return Err(EngineError::DiskSizeMismatch {
                    source_sizes: disks,
                    destination_sizes: our_disks,
                });
            }
            let chunk = disk_chunk_bytes as usize;
            if !disks.is_empty()
                && (!(BLOCK_SIZE..=CHUNK_BYTES_MAX).contains(&chunk)
                    || !chunk.is_multiple_of(BLOCK_SIZE)
                    || !(1..=QUEUE_DEPTH_MAX).contains(&disk_queue_depth))
            {
                return Err(EngineError::Protocol {
                    reason: format!("source announced disk chunks of {chunk} bytes with queue depth {disk_queue_depth}: out of bounds"),
                });
            }
            disk_link_params = (chunk, disk_queue_depth);
        }
        ToDestination::Abort { reason } => return Err(EngineError::PeerAborted { reason }),
        other => {
            return Err(EngineError::Protocol {
                reason: format!("expected Hello, got {other:?}"),
            })
        }
    }
    let digest = Arc::new(MemoryDigest::new_zeroed(pages as usize));
    let (events_tx, events) = unbounded();
    let disk_digests: Vec<Arc<MemoryDigest>> = guest
        .disks()
        .iter()
        .map(|d| {
            Arc::new(MemoryDigest::new_zeroed(
                (d.size() / BLOCK_SIZE as u64) as usize,
            ))
        })
        .collect();
    if !guest.disks().is_empty() {
        let Some(disk_transport) = disk_transport.as_mut() else {
            return Err(EngineError::Protocol {
                reason: "the guest has disks but the migration has no disk link".into(),
            });
        };
        let landing = guest
            .disks()
            .iter()
            .zip(&disk_digests)
            .map(|(disk, digest)| LandingDisk {
                image: Arc::clone(disk.image()),
                digest: Arc::clone(digest),
                fresh: fresh_disks,
            })
            .collect();
        let (chunk, depth) = disk_link_params;
        disk_transport.start(landing, chunk, depth, events_tx.clone())?;
    }
    transport.start(Arc::clone(&memory), Arc::clone(&digest), events_tx)?;
    control.send(&ToSource::HelloAck {
        pages,
        disks: our_disks,
    })?;

    let streams = transport.streams();
    // Next round each stream will end, and pages landed.
    let mut stream_round = vec![0u32; streams];
    let mut pages_received = 0u64;
    let mut switchover: Option<(u32, Vec<u8>, u64, Vec<u64>)> = None;
    let mut last_heard = Instant::now();
    let mut presynced = guest.disks().is_empty();
    loop {
        if is_cancelled() {
            return Err(EngineError::Cancelled);
        }
        if let Some((final_round, _, _, _)) = &switchover {
            if stream_round.iter().all(|&r| r > *final_round) {
                break;
            }
        }
        if last_heard.elapsed() > SOURCE_SILENCE_MAX {
            return Err(EngineError::Protocol {
                reason: "the source went silent".into(),
            });
        }
        select! {
            recv(events) -> event => match event {
                Ok(ReceiveEvent::RoundEnd { stream, round, pages }) => {
                    last_heard = Instant::now();
                    stream_round[stream] = round + 1;
                    pages_received += pages;
                    // Memory round 0 starts after the disks' bulk copy ended: flush those
                    // writes now, so the sync inside the switch-over only has the
                    // mirrored writes since to make durable.
                    if !presynced && stream_round.iter().all(|&r| r >= 1) {
                        presynced = true;
                        for disk in guest.disks() {
                            disk.image().sync()?;
                        }
                    }
                }
                Ok(ReceiveEvent::Failed { stream, error }) => {
                    // A source that aborts closes its streams first; prefer its reason.
                    if let Some(reason) = abort_reason(control) {
                        return Err(EngineError::PeerAborted { reason });
                    }
                    warn!(stream, %error, "data stream failed");
                    return Err(error.into());
                }
                Err(_) => {
                    if let Some(reason) = abort_reason(control) {
                        return Err(EngineError::PeerAborted { reason });
                    }
                    return Err(EngineError::Protocol { reason: "every data stream closed before the switch-over".into() });
                }
            },
            recv(control.inbox()) -> msg => match msg {
                Ok(Ok(ToDestination::SwitchOver { final_round, device_state, digest, disk_digests })) => {
                    last_heard = Instant::now();
                    switchover = Some((final_round, device_state, digest, disk_digests));
                }
                Ok(Ok(ToDestination::Abort { reason })) => return Err(EngineError::PeerAborted { reason }),
                Ok(Ok(other)) => return Err(EngineError::Protocol { reason: format!("unexpected {other:?} before the switch-over") }),
                Ok(Err(source)) => return Err(EngineError::Wire { channel: "control", source }),
                Err(_) => return Err(EngineError::Protocol { reason: "control channel closed".into() }),
            },
            default(Duration::from_millis(50)) => {}
        }
    }
    let (final_round, device_state, source_digest, source_disk_digests) =
        switchover.expect("loop ends only after the switch-over");
    // Every disk write was acknowledged before the source quiesced; make them durable
    // before saying prepared.
    for disk in guest.disks() {
        disk.image().sync()?;
    }
    // Lock-step proof: the digests both sides kept while pages and blocks were sent and
    // landed.
    let ours = digest.value();
    let our_disk_digests: Vec<u64> = disk_digests.iter().map(|d| d.value()).collect();
    let matches = ours == source_digest && our_disk_digests == source_disk_digests;
    let mut lost: Option<String> = None;
    let mut aborted: Option<String> = None;
    if matches {
        guest.load_state(&device_state)?;
    }
    // The barrier decides from here (see `barrier`): prepared only once journaled, resumed
    // only on the source's commit, and in doubt (handed to the control plane, which asks the
    // source's agent) when the decision does not arrive.
    let mut swap = DestinationSwap::new(decision_wait, ASK_INTERVAL);
    let mut inputs = VecDeque::from([DestinationInput::LockStep { matches }]);
    loop {
        while let Some(input) = inputs.pop_front() {
            for action in swap.step(input, Instant::now()) {
                match action {
                    DestinationAction::JournalPrepared => {
                        inputs.push_back(DestinationInput::PrepareJournaled(journal.prepared()));
                    }
                    DestinationAction::SendPrepared => {
                        if let Err(error) = control.send(&ToSource::Prepared {
                            digest: ours,
                            disk_digests: our_disk_digests.clone(),
                        }) {
                            inputs.push_back(DestinationInput::ChannelLost(error.to_string()));
                        }
                    }
                    DestinationAction::SendNotInLockStep => {
                        let _ = control.send(&ToSource::NotInLockStep {
                            digest: ours,
                            disk_digests: our_disk_digests.clone(),
                        });
                    }
                    DestinationAction::SendAbort(reason) => {
                        let _ = control.send(&ToSource::Abort { reason });
                    }
                    DestinationAction::JournalOwned => {
                        if let Some(
                            crate::failpoint::Action::Error | crate::failpoint::Action::NoSpace,
                        ) = crate::failpoint::hit("dest-after-commit")
                        {
                            warn!("failpoint dest-after-commit: not journaling Owned");
                        } else if let Err(error) = journal.owned() {
                            warn!(%error, "recording ownership failed; the VM is ours anyway (the source journaled the commit)");
                        }
                    }
                    DestinationAction::ResumeGuest => {
                        if !start_paused {
                            guest.resume()?;
                        }
                    }
                    DestinationAction::SendResumed => {
                        if let Err(error) = control.send(&ToSource::Resumed) {
                            warn!(%error, "could not confirm the resume to the source; the VM is ours (the source committed)");
                        }
                    }
                    // The caller discards the incoming guest on any error.
                    DestinationAction::Discard => {}
                    DestinationAction::AskOutcome => {
                        return Err(EngineError::InDoubt {
                            reason: lost.take().unwrap_or_else(|| {
                                "no decision within the switch-over bound".into()
                            }),
                        })
                    }
                }
            }
        }
        match swap.outcome() {
            Some(DestinationOutcome::Owned) => break,
            Some(DestinationOutcome::Discarded(reason)) => {
                return Err(if ours != source_digest {
                    EngineError::DigestMismatch {
                        source_digest,
                        destination_digest: ours,
                    }
                } else if our_disk_digests != source_disk_digests {
                    EngineError::DiskDigestMismatch {
                        source_digests: source_disk_digests,
                        destination_digests: our_disk_digests,
                    }
                } else if let Some(reason) = aborted.take() {
                    EngineError::PeerAborted { reason }
                } else {
                    EngineError::Journal {
                        reason: reason.clone(),
                    }
                })
            }
            None => {}
        }
        let input = match control.inbox().recv_timeout(Duration::from_millis(50)) {
            Ok(Ok(ToDestination::Commit)) => DestinationInput::Commit,
            Ok(Ok(ToDestination::Abort { reason })) => {
                aborted = Some(reason.clone());
                DestinationInput::PeerAborted(reason)
            }
            Ok(Ok(other)) => {
                let reason = format!("expected Commit, got {other:?}");
                lost = Some(reason.clone());
                DestinationInput::ChannelLost(reason)
            }
            Ok(Err(error)) => {
                let reason = format!("control channel: {error}");
                lost = Some(reason.clone());
                DestinationInput::ChannelLost(reason)
            }
            Err(RecvTimeoutError::Timeout) => DestinationInput::Tick,
            Err(RecvTimeoutError::Disconnected) => {
                let reason = "the control channel closed".to_string();
                lost = Some(reason.clone());
                DestinationInput::ChannelLost(reason)
            }
        };
        inputs.push_back(input);
    }
    info!(
        pages_received,
        rounds = final_round + 1,
        "VM resumed on the destination"
    );
    Ok(IncomingReport {
        pages_received,
        rounds: final_round + 1,
        memory_digest: ours,
        disk_digests: our_disk_digests,
    })
}
