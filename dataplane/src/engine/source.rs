//! Source side of a migration: pre-copy rounds, then quiesce, last pages, device state and
//! the commit.
//!
//! Order inside a round matters: the dirty set is collected (and re-armed) *before* the
//! round's pages are sent, so a write that lands during the send is caught by the next
//! collection. If a round cannot be sent, its pages are put back into the tracker: a
//! collected dirty set is never lost.

use std::collections::VecDeque;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::barrier::{FailBack, SourceAction, SourceInput, SourceOutcome, SourceSwap, SwapJournal};
use super::collect_pause::CollectPolicy;
use super::convergence::{predicted_downtime_ms, Convergence, Decision, RoundMeasurement};
use super::disk_copy::DiskSession;
use super::pacer::Pacer;
use super::protocol::{ControlChannel, ToDestination, ToSource, PROTOCOL_VERSION};
use super::sender::{DoneOnDrop, RoundCounters, StreamSender, StreamSent};
use super::timeline::{PauseSpan, RoundRecord, TimelineRecorder, TimelineSample};
use super::trace::trace;
use super::{EngineError, MigrationParams, MigrationReport, Phase, Progress};
use crate::failpoint;
use crate::guest::Guest;
use crate::memory::{DirtyBitmap, DirtyTracker, GuestMemory, MemoryDigest, PageArmer, PAGE_SIZE};
use crate::numa::{self, ThreadRole};
use crate::transport::{DiskSource, SourceTransport};

/// How often progress is reported while a round is sent.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(200);
/// How often the round driver wakes while senders run (cancel, progress, timeline).
const ROUND_POLL: Duration = Duration::from_millis(5);
/// Wait for the destination's answer to `Hello`.
const HELLO_TIMEOUT: Duration = Duration::from_secs(30);

/// Everything the source needs; the control plane fills it in after connecting.
pub struct SourceContext<'a> {
    pub guest: &'a dyn Guest,
    /// The guest's tracker, not started yet: the engine arms it right before pre-copy's
    /// round 0 (after the disks' bulk copy, as the phases require).
    pub tracker: &'a mut dyn DirtyTracker,
    /// The disk links, when the guest has disks.
    pub disk_link: Option<Arc<dyn DiskSource>>,
    /// Control channel to the destination engine (already past the agents' handshake).
    pub control: TcpStream,
    pub transport: Arc<dyn SourceTransport>,
    pub params: &'a MigrationParams,
    /// When the migrate command started: `total_ms` counts from here.
    pub started: Instant,
    /// What the destination reported for pre-faulting while preparing.
    pub prefault_ms: f64,
    /// Set to cancel; the migration fails back at the next check (at least every 200 ms).
    pub cancel: &'a AtomicBool,
    /// Where the commit point is recorded before `Commit` is sent.
    pub journal: &'a dyn SwapJournal,
}

/// Runs pre-copy and the switch-over.
///
/// `Ok`: the VM now runs on the destination; the source guest stays quiesced and must be
/// discarded. `Err(EngineError::LostAfterCommit)`: the commit point was passed but the
/// destination did not confirm; the source must still never run the VM again. Any other
/// `Err`: the migration failed before the commit point and the source guest has already
/// been resumed (fail-back).
pub fn migrate_out(
    ctx: SourceContext<'_>,
    progress: &mut dyn FnMut(&Progress),
) -> Result<MigrationReport, EngineError> {
    ctx.params.validate()?;
    let guest = ctx.guest;
    if !guest.disks().is_empty() && ctx.disk_link.is_none() {
        return Err(EngineError::BadParams {
            reason: "the guest has disks but the migration has no disk link".into(),
        });
    }
    let transport = Arc::clone(&ctx.transport);
    let mut control = ControlChannel::<ToSource>::new(ctx.control)?;
    let mut run = SourceRun {
        memory: Arc::clone(guest.memory()),
        digest: None,
        armer: None,
        disk_link: ctx.disk_link,
        transport: Arc::clone(&transport),
        params: ctx.params,
        started: ctx.started,
        cancel: ctx.cancel,
        report: MigrationReport {
            transport: transport.name().to_string(),
            streams: transport.streams(),
            tracker: ctx.tracker.name().to_string(),
            prefault_ms: ctx.prefault_ms,
            ..Default::default()
        },
        progress: Progress::default(),
        send_ms_total: 0.0,
        swap: SourceSwap::new(Duration::from_millis(ctx.params.switchover_timeout_ms)),
        journal: ctx.journal,
        resume_due: false,
        timeline: TimelineRecorder::new(ctx.started),
        last_user_emit: None,
    };
    let result = run.run(guest, ctx.tracker, &mut control, progress);
    match result {
        Ok(()) => {
            run.progress.phase = Some(Phase::Done);
            run.emit(progress);
            Ok(run.report)
        }
        Err(error @ EngineError::LostAfterCommit { .. }) => {
            transport.shutdown();
            Err(error)
        }
        Err(error) => {
            // A broken data or disk link is usually the destination giving up: prefer its
            // reason when it sends one.
            let error = match error {
                EngineError::Transport(_) => peer_reason(&control).unwrap_or(error),
                error => error,
            };
            // The barrier decides (it may have done so already, in the switch-over): before
            // the commit point it fails back.
            let input = match &error {
                EngineError::Cancelled => SourceInput::Cancelled,
                EngineError::PeerAborted { reason } => SourceInput::PeerAborted(reason.clone()),
                error => SourceInput::Failed(super::error_chain(error)),
            };
            let mut resume = run.resume_due;
            for action in run.swap.step(input, Instant::now()) {
                match action {
                    SourceAction::SendAbort(reason) => {
                        let _ = control.send(&ToDestination::Abort { reason });
                    }
                    SourceAction::ResumeGuest => resume = true,
                    SourceAction::JournalCommit | SourceAction::SendCommit => {}
                }
            }
            transport.shutdown();
            if resume {
                // Fail back: the VM resumes here with its own memory; nothing was handed over.
                warn!(%error, "migration failed before the commit point; resuming the VM on the source");
                guest.set_throttle(0);
                if let Err(resume_error) = guest.resume() {
                    warn!(%resume_error, "resuming the source VM after fail-back failed");
                }
                run.progress.phase = Some(Phase::FailedBack);
                run.emit(progress);
            } else if run.swap.committed() {
                return Err(EngineError::LostAfterCommit {
                    reason: super::error_chain(&error),
                });
            }
            Err(error)
        }
    }
}

/// How long a failed source waits for the destination's reason.
const ABORT_GRACE: Duration = Duration::from_millis(300);

/// The destination's `Abort`, if it sends one shortly.
fn peer_reason(control: &ControlChannel<ToSource>) -> Option<EngineError> {
    let deadline = Instant::now() + ABORT_GRACE;
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match control.inbox().recv_timeout(left) {
            Ok(Ok(ToSource::Abort { reason })) => return Some(EngineError::PeerAborted { reason }),
            Ok(Ok(_)) => continue,
            _ => return None,
        }
    }
    None
}

struct SourceRun<'a> {
    memory: Arc<GuestMemory>,
    /// Set by the trace phase (before the first round).
    digest: Option<MemoryDigest>,
    /// Arms each block as round 0 reaches it; set by the trace phase, dropped after round 0.
    armer: Option<Arc<dyn PageArmer>>,
    disk_link: Option<Arc<dyn DiskSource>>,
    transport: Arc<dyn SourceTransport>,
    params: &'a MigrationParams,
    started: Instant,
    cancel: &'a AtomicBool,
    report: MigrationReport,
    progress: Progress,
    send_ms_total: f64,
    /// The quiesce-and-swap barrier's source side.
    swap: SourceSwap,
    journal: &'a dyn SwapJournal,
    /// The barrier failed back: resume the guest once the migration's links are down.
    resume_due: bool,
    /// What happened over time, for the report's plot.
    timeline: TimelineRecorder,
    /// When the disk copy last passed its progress on to the caller.
    last_user_emit: Option<Instant>,
}

/// What sending one round produced.
struct RoundSent {
    bytes: u64,
    elapsed: Duration,
}

impl SourceRun<'_> {
    fn memory_digest(&self) -> &MemoryDigest {
        self.digest
            .as_ref()
            .expect("the trace phase sets the digest before the first round")
    }

    fn emit(&mut self, progress: &mut dyn FnMut(&Progress)) {
        self.progress.elapsed_ms = self.started.elapsed().as_millis() as u64;
        self.progress.bytes_sent = self.report.bytes_sent;
        self.sample(true);
        progress(&self.progress);
    }

    /// Adds the current counters to the timeline (at most every few ms unless `force`).
    fn sample(&mut self, force: bool) {
        let sample = timeline_sample(&self.progress, self.report.bytes_sent);
        self.timeline.sample(Instant::now(), sample, force);
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    /// A failpoint between two steps of the migration (a no-op unless built for fault
    /// injection): `error` fails the migration here, `corrupt` corrupts the next frame.
    fn failpoint(&self, name: &'static str) -> Result<(), EngineError> {
        match failpoint::hit(name) {
            Some(failpoint::Action::Error | failpoint::Action::NoSpace) => {
                Err(EngineError::Protocol {
                    reason: format!("failpoint {name}"),
                })
            }
            Some(failpoint::Action::Corrupt) => {
                failpoint::corrupt_next_frame();
                Ok(())
            }
            _ => Ok(()),
        }
    }

    fn run(
        &mut self,
        guest: &dyn Guest,
        tracker: &mut dyn DirtyTracker,
        control: &mut ControlChannel<ToSource>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), EngineError> {
        let pages = self.memory.pages() as u64;
        let disk_sizes: Vec<u64> = guest.disks().iter().map(|d| d.size()).collect();
        self.progress.phase = Some(Phase::Prepare);
        self.emit(progress);
        control.send(&ToDestination::Hello {
            protocol: PROTOCOL_VERSION,
            pages,
            streams: self.transport.streams() as u32,
            transport: self.transport.name().to_string(),
            disks: disk_sizes.clone(),
            disk_chunk_bytes: self.params.disk_chunk_bytes,
            disk_queue_depth: self.params.disk_queue_depth,
            switchover_timeout_ms: self.params.switchover_timeout_ms,
        })?;
        let cancel = || self.cancelled();
        match control.recv(
            Instant::now() + HELLO_TIMEOUT,
            &cancel,
            "the destination's hello",
        )? {
            ToSource::HelloAck {
                pages: theirs,
                disks,
            } if theirs == pages && disks == disk_sizes => {}
            ToSource::HelloAck { pages: theirs, .. } if theirs != pages => {
                return Err(EngineError::SizeMismatch {
                    source_pages: pages,
                    destination_pages: theirs,
                })
            }
            ToSource::HelloAck { disks, .. } => {
                return Err(EngineError::DiskSizeMismatch {
                    source_sizes: disk_sizes,
                    destination_sizes: disks,
                })
            }
            ToSource::Abort { reason } => return Err(EngineError::PeerAborted { reason }),
            other => {
                return Err(EngineError::Protocol {
                    reason: format!("expected HelloAck, got {other:?}"),
                })
            }
        }

        // Storage first: attach the mirrors, then one bulk pass per disk. Mirroring goes
        // on until the session drops (after the hand-over, or on fail-back).
        let disks = match &self.disk_link {
            Some(link) => DiskSession::attach(guest.disks(), Arc::clone(link), self.params)?,
            None => DiskSession::empty(),
        };
        let disks = self.copy_disks(disks, progress)?;
        self.precopy_and_switch_over(guest, tracker, control, &disks, progress)
    }

    /// The disk-copy phase: every disk's bulk copy, reported per disk. Nothing to do for a
    /// memory-only VM.
    fn copy_disks(
        &mut self,
        mut disks: DiskSession,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<DiskSession, EngineError> {
        if disks.is_empty() {
            return Ok(disks);
        }
        self.progress.phase = Some(Phase::DiskCopy);
        self.progress.disks = disks.progress();
        self.emit(progress);
        let copy_started = Instant::now();
        let (cancel, params) = (self.cancel, self.params);
        let mut on_disk_progress = |view: Vec<super::DiskProgress>| {
            self.progress.disks = view;
            self.progress.eta_ms = self.progress.disks.iter().find_map(|d| d.eta_ms);
            self.progress.rate_bytes_per_s =
                self.progress.disks.iter().map(|d| d.rate_bytes_per_s).sum();
            // Memory bytes, as in the report; the disks' own progress is in `disks`.
            self.progress.bytes_sent = self.report.bytes_sent;
            self.progress.elapsed_ms = self.started.elapsed().as_millis() as u64;
            // Every call feeds the timeline; the caller hears a few times per second.
            self.sample(false);
            if self
                .last_user_emit
                .is_none_or(|at| at.elapsed() >= PROGRESS_INTERVAL)
            {
                self.last_user_emit = Some(Instant::now());
                progress(&self.progress);
            }
        };
        disks.bulk_copy(params, cancel, &mut on_disk_progress)?;
        // A cancel that came as the copy ended may have closed the disk links already.
        if self.cancelled() {
            return Err(EngineError::Cancelled);
        }
        self.report.disk_copy_ms = copy_started.elapsed().as_secs_f64() * 1e3;
        self.progress.disks = disks.progress();
        self.progress.eta_ms = None;
        Ok(disks)
    }

    /// The trace phase, pre-copy and the switch-over.
    fn precopy_and_switch_over(
        &mut self,
        guest: &dyn Guest,
        tracker: &mut dyn DirtyTracker,
        control: &mut ControlChannel<ToSource>,
        disks: &DiskSession,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<(), EngineError> {
        let pages = self.memory.pages() as u64;
        self.progress.phase = Some(Phase::MemoryPreCopy);
        self.emit(progress);
        let traced = trace(guest, tracker)?;
        self.report.trace_ms = traced.elapsed.as_secs_f64() * 1e3;
        self.digest = Some(traced.digest);
        self.armer = Some(traced.armer);
        let precopy_started = Instant::now();
        let pacer = Pacer::new(self.params.bandwidth_max_bytes_per_s);
        let mut convergence = Convergence::default();
        let mut collect_policy =
            CollectPolicy::new(self.params.collect_pause, self.params.downtime_ms);
        let mut round = 0u32;
        let mut to_send = DirtyBitmap::full(pages as usize);
        // When the pages of the next collection began to be written: tracking's start, then
        // each collection.
        let mut last_collect = Instant::now();
        self.progress.phase = Some(Phase::MemoryPreCopy);
        let stop_reason = loop {
            if self.cancelled() {
                return Err(EngineError::Cancelled);
            }
            disks.check()?;
            self.progress.round = round;
            let to_send_pages = to_send.count() as u64;
            let round_start_ms = self.timeline.ms(Instant::now());
            let sent =
                self.send_round_or_put_back(tracker, &to_send, round, &pacer, None, progress)?;
            self.report.rounds = round + 1;
            if round == 0 {
                // Every page is armed now.
                self.armer = None;
                self.failpoint("source-precopy-round")?;
            }
            // Collect (and re-arm) before deciding: these pages are what the next round, or
            // the switch-over, must send.
            let collect = self.collect(guest, tracker, &mut collect_policy)?;
            to_send = collect.dirty;
            let collected = Instant::now();
            let since_collect = collected.duration_since(last_collect);
            last_collect = collected;
            let dirty_bytes = to_send.count() as u64 * PAGE_SIZE as u64;
            let measurement = RoundMeasurement {
                round,
                since_collect_ms: since_collect.as_secs_f64() * 1000.0,
                round_bytes: to_send_pages * PAGE_SIZE as u64,
                dirty_bytes,
                bandwidth_bytes_per_s: sent.bytes as f64 / sent.elapsed.as_secs_f64().max(1e-6),
                round_ms: sent.elapsed.as_secs_f64() * 1000.0,
                precopy_ms: precopy_started.elapsed().as_secs_f64() * 1000.0,
            };
            self.progress.dirty_pages = to_send.count() as u64;
            self.progress.predicted_downtime_ms =
                predicted_downtime_ms(dirty_bytes, measurement.bandwidth_bytes_per_s);
            let decision = convergence.decide(self.params, &measurement);
            self.timeline.round(RoundRecord {
                round,
                start_ms: round_start_ms,
                end_ms: self.timeline.ms(Instant::now()),
                pages: to_send_pages,
                bytes: sent.bytes,
                dirty_pages_after: self.progress.dirty_pages,
                bandwidth_bytes_per_s: measurement.bandwidth_bytes_per_s,
                predicted_downtime_ms: self.progress.predicted_downtime_ms,
                throttle_percent: self.progress.throttle_percent,
                collect_ms: collect.ms,
                collect_paused: collect.paused,
            });
            info!(
                round,
                dirty_pages = to_send.count(),
                bandwidth = measurement.bandwidth_bytes_per_s as u64,
                predicted_downtime_ms = self.progress.predicted_downtime_ms,
                ?decision,
                "pre-copy round done"
            );
            match decision {
                Decision::SwitchOver { reason } => break reason,
                Decision::Continue { throttle_percent } => {
                    if throttle_percent != self.progress.throttle_percent {
                        info!(
                            throttle_percent,
                            "dirty rate outruns the link: throttling the vCPUs"
                        );
                        guest.set_throttle(throttle_percent);
                        self.progress.throttle_percent = throttle_percent;
                        self.report.throttle_percent_max =
                            self.report.throttle_percent_max.max(throttle_percent);
                    }
                }
            }
            if !disks.is_empty() {
                self.progress.disks = disks.progress();
            }
            self.emit(progress);
            round += 1;
        };
        self.report.converged = stop_reason.as_str().to_string();

        // Switch-over: from quiesce on, the clock of the pause runs.
        self.progress.phase = Some(Phase::SwitchOver);
        self.emit(progress);
        let quiesced_at = Instant::now();
        let deadline = quiesced_at + Duration::from_millis(self.params.switchover_timeout_ms);
        guest.quiesce()?;
        let mut last = tracker.collect()?;
        last.merge(&to_send);
        let final_round = round + 1;
        self.report.final_pages = last.count() as u64;
        self.progress.round = final_round;
        self.send_round_or_put_back(
            tracker,
            &last,
            final_round,
            &Pacer::new(None),
            Some(deadline),
            progress,
        )?;
        let device_state = guest.save_state()?;
        let digest = self.memory_digest().value();
        // Quiesced: no guest write is in flight, every mirrored one was acknowledged.
        disks.check()?;
        let disk_digests = disks.digests();
        control.send(&ToDestination::SwitchOver {
            final_round,
            device_state,
            digest,
            disk_digests: disk_digests.clone(),
        })?;
        self.report.memory_digest = digest;
        self.report.disks = disks.reports();
        self.swap_to_the_end(control, deadline, digest, &disk_digests)?;
        let resumed_at = Instant::now();
        self.report.downtime_ms = (resumed_at - quiesced_at).as_secs_f64() * 1000.0;
        self.report.total_ms = (resumed_at - self.started).as_secs_f64() * 1000.0;
        self.timeline.pause(PauseSpan {
            start_ms: self.timeline.ms(quiesced_at),
            end_ms: self.timeline.ms(resumed_at),
            pages: self.report.final_pages,
        });
        self.progress.phase = Some(Phase::Done);
        self.sample(true);
        let timeline = std::mem::replace(&mut self.timeline, TimelineRecorder::new(self.started));
        self.report.timeline = timeline.finish(resumed_at);
        self.report.throughput_bytes_per_s =
            self.report.bytes_sent as f64 / (self.send_ms_total / 1000.0).max(1e-6);
        self.transport.shutdown();
        info!(
            downtime_ms = self.report.downtime_ms,
            total_ms = self.report.total_ms,
            "VM handed over"
        );
        Ok(())
    }

    /// Drives the barrier from `SwitchOver` sent to its end: `Ok` once the destination
    /// confirmed the resume; otherwise the error (the barrier has already resumed the guest
    /// if it failed back before the commit point).
    fn swap_to_the_end(
        &mut self,
        control: &mut ControlChannel<ToSource>,
        deadline: Instant,
        digest: u64,
        disk_digests: &[u64],
    ) -> Result<(), EngineError> {
        let mut theirs: Option<(u64, Vec<u64>)> = None;
        let mut lost: Option<EngineError> = None;
        let mut inputs = VecDeque::from([SourceInput::SwitchOverSent { deadline }]);
        loop {
            while let Some(input) = inputs.pop_front() {
                for action in self.swap.step(input, Instant::now()) {
                    match action {
                        SourceAction::JournalCommit => {
                            let journaled = self.journal.commit();
                            if journaled.is_ok() {
                                if let Some(failpoint::Action::Corrupt) =
                                    failpoint::hit("source-after-commit")
                                {
                                    failpoint::corrupt_next_control_message();
                                }
                            }
                            inputs.push_back(SourceInput::CommitJournaled(journaled));
                        }
                        SourceAction::SendCommit => {
                            if let Err(error) = control.send(&ToDestination::Commit) {
                                warn!(%error, "Commit could not be sent; the VM is the destination's (committed), it will learn the outcome from this agent");
                                inputs.push_back(SourceInput::ChannelLost(error.to_string()));
                            }
                        }
                        SourceAction::SendAbort(reason) => {
                            let _ = control.send(&ToDestination::Abort { reason });
                        }
                        SourceAction::ResumeGuest => self.resume_due = true,
                    }
                }
            }
            match self.swap.outcome().cloned() {
                Some(SourceOutcome::HandedOver { confirmed: true }) => return Ok(()),
                Some(SourceOutcome::HandedOver { confirmed: false }) => {
                    return Err(EngineError::LostAfterCommit {
                        reason: lost.map_or_else(
                            || "no Resumed within the bound".to_string(),
                            |e| e.to_string(),
                        ),
                    })
                }
                Some(SourceOutcome::FailedBack(why)) => {
                    return Err(match (why, theirs.take()) {
                        (FailBack::Timeout, _) => EngineError::SwitchoverTimeout {
                            timeout_ms: self.params.switchover_timeout_ms,
                        },
                        (FailBack::NotInLockStep, Some((their_digest, _)))
                            if their_digest != digest =>
                        {
                            EngineError::DigestMismatch {
                                source_digest: digest,
                                destination_digest: their_digest,
                            }
                        }
                        (FailBack::NotInLockStep, Some((_, their_disks))) => {
                            EngineError::DiskDigestMismatch {
                                source_digests: disk_digests.to_vec(),
                                destination_digests: their_disks,
                            }
                        }
                        (FailBack::PeerAborted(reason), _) => EngineError::PeerAborted { reason },
                        (FailBack::JournalFailed(reason), _) => EngineError::Journal { reason },
                        (FailBack::Cancelled, _) => EngineError::Cancelled,
                        (FailBack::ChannelLost(reason) | FailBack::Failed(reason), _) => {
                            lost.take().unwrap_or(EngineError::Protocol { reason })
                        }
                        (FailBack::NotInLockStep, None) => EngineError::Protocol {
                            reason: "the destination is not in lock-step".into(),
                        },
                    })
                }
                None => {}
            }
            if self.cancelled() && !self.swap.committed() {
                inputs.push_back(SourceInput::Cancelled);
                continue;
            }
            let input = match control.inbox().recv_timeout(Duration::from_millis(50)) {
                Ok(Ok(
                    ToSource::Prepared {
                        digest: their_digest,
                        disk_digests: their_disks,
                    }
                    | ToSource::NotInLockStep {
                        digest: their_digest,
                        disk_digests: their_disks,
                    },
                )) => {
                    let matches = their_digest == digest && their_disks == disk_digests;
                    theirs = Some((their_digest, their_disks));
                    // Fault injection (a no-op unless built for it): prepared, not yet
                    // committed; the data is all sent, so `corrupt` hits the next control
                    // message (the Commit).
                    match failpoint::hit("source-before-commit") {
                        Some(failpoint::Action::Error | failpoint::Action::NoSpace) => {
                            SourceInput::Failed("failpoint source-before-commit".into())
                        }
                        other => {
                            if other == Some(failpoint::Action::Corrupt) {
                                failpoint::corrupt_next_control_message();
                            }
                            // A cancel that came before the commit point wins.
                            if self.cancelled() {
                                SourceInput::Cancelled
                            } else {
                                SourceInput::Prepared { matches }
                            }
                        }
                    }
                }
                Ok(Ok(ToSource::Resumed)) => SourceInput::Resumed,
                Ok(Ok(ToSource::Abort { reason })) => SourceInput::PeerAborted(reason),
                Ok(Ok(other)) => {
                    let reason = format!("unexpected {other:?} in the switch-over");
                    lost = Some(EngineError::Protocol {
                        reason: reason.clone(),
                    });
                    SourceInput::ChannelLost(reason)
                }
                Ok(Err(source)) => {
                    let reason = source.to_string();
                    lost = Some(EngineError::Wire {
                        channel: "control",
                        source,
                    });
                    SourceInput::ChannelLost(reason)
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => SourceInput::Tick,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    SourceInput::ChannelLost("the control channel closed".into())
                }
            };
            inputs.push_back(input);
        }
    }

    /// One pre-copy collection, with the vCPUs stopped for it when the policy says so (see
    /// [`collect_pause`](super::collect_pause)). A stopped guest runs again before any error
    /// is returned.
    fn collect(
        &mut self,
        guest: &dyn Guest,
        tracker: &mut dyn DirtyTracker,
        policy: &mut CollectPolicy,
    ) -> Result<Collected, EngineError> {
        let paused = policy.pause_next();
        let began = Instant::now();
        if paused {
            if let Err(e) = guest.quiesce() {
                let _ = guest.resume();
                return Err(e.into());
            }
        }
        let dirty = tracker.collect();
        if paused {
            guest.resume()?;
        }
        let dirty = dirty?;
        let ms = began.elapsed().as_secs_f64() * 1000.0;
        if paused {
            self.report.collect_pauses += 1;
            self.report.collect_pause_ms_max = self.report.collect_pause_ms_max.max(ms);
            self.report.collect_pause_ms_total += ms;
        }
        if policy.record(paused, ms) {
            info!(
                collect_ms = ms,
                stall_cap_ms = policy.stall_cap_ms(),
                "collecting under running vCPUs is slow (TLB shootdowns): stopping them for each collection"
            );
        }
        if paused && policy.given_up() {
            warn!(
                stall_ms = ms,
                stall_cap_ms = policy.stall_cap_ms(),
                "a collection with the vCPUs stopped outlasted a quarter of the downtime target: collecting under running vCPUs from now on"
            );
        }
        Ok(Collected { dirty, ms, paused })
    }

    /// Sends one round; if it fails, the round's pages go back to the tracker.
    fn send_round_or_put_back(
        &mut self,
        tracker: &mut dyn DirtyTracker,
        pages: &DirtyBitmap,
        round: u32,
        pacer: &Pacer,
        deadline: Option<Instant>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<RoundSent, EngineError> {
        self.send_round(pages, round, pacer, deadline, progress)
            .inspect_err(|_| tracker.put_back(pages))
    }

    /// Sends every page of `pages` over all streams in parallel, then a round-end marker on
    /// each stream. Reports progress while it runs; stops on cancel or `deadline`.
    fn send_round(
        &mut self,
        pages: &DirtyBitmap,
        round: u32,
        pacer: &Pacer,
        deadline: Option<Instant>,
        progress: &mut dyn FnMut(&Progress),
    ) -> Result<RoundSent, EngineError> {
        let total = pages.count() as u64;
        self.progress.round_pages_total = total;
        self.progress.round_pages_sent = 0;
        let counters = RoundCounters::default();
        let abort = AtomicBool::new(false);
        let started = Instant::now();
        let bytes_before = self.report.bytes_sent;
        let streams = self.transport.streams();
        let cancel = self.cancel;
        let SourceRun {
            memory,
            digest,
            armer,
            transport,
            report,
            progress: snapshot,
            started: migration_started,
            timeline,
            ..
        } = self;
        let armer = armer.as_deref().filter(|_| round == 0);
        let digest = digest
            .as_ref()
            .expect("the trace phase sets the digest before the first round");
        let (memory, transport) = (&**memory, transport.as_ref());
        let (done_tx, done_rx) = crossbeam_channel::bounded::<()>(streams);
        let results: Vec<Result<StreamSent, EngineError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..streams)
                .map(|stream| {
                    let sender = StreamSender {
                        stream,
                        streams,
                        round,
                        memory,
                        digest,
                        armer,
                        transport,
                        pacer,
                        counters: &counters,
                        abort: &abort,
                    };
                    let done = DoneOnDrop(done_tx.clone());
                    numa::spawn_scoped(
                        scope,
                        ThreadRole::Transport,
                        format!("ferry-tx-{stream}"),
                        move || {
                            let _done = done;
                            sender.send(pages)
                        },
                    )
                    .expect("spawning a sender thread")
                })
                .collect();
            let mut last_emit = Instant::now();
            let mut last_bytes = 0u64;
            // Wake on each sender's completion (the round ends the moment the last one does:
            // in the final round this is downtime) and every few ms for cancel, progress and
            // the timeline.
            let mut finished = 0;
            while finished < streams {
                if done_rx.recv_timeout(ROUND_POLL).is_ok() {
                    finished += 1;
                    continue;
                }
                let sample = timeline_sample(
                    snapshot,
                    bytes_before + counters.bytes.load(Ordering::Relaxed),
                );
                timeline.sample(Instant::now(), sample, false);
                let timed_out = deadline.is_some_and(|d| Instant::now() >= d);
                if (cancel.load(Ordering::Relaxed) || timed_out)
                    && !abort.swap(true, Ordering::Relaxed)
                {
                    // Unblock senders stuck in a send to a dead or slow peer.
                    transport.shutdown();
                }
                if last_emit.elapsed() >= PROGRESS_INTERVAL {
                    let bytes = counters.bytes.load(Ordering::Relaxed);
                    let sent_pages = counters.pages.load(Ordering::Relaxed);
                    let rate = (bytes - last_bytes) as f64 / last_emit.elapsed().as_secs_f64();
                    snapshot.rate_bytes_per_s = rate as u64;
                    snapshot.round_pages_sent = sent_pages;
                    snapshot.eta_ms = (rate > 0.0).then(|| {
                        ((total - sent_pages.min(total)) as f64 * PAGE_SIZE as f64 / rate * 1000.0)
                            as u64
                    });
                    report.bytes_sent = bytes_before + bytes;
                    snapshot.bytes_sent = report.bytes_sent;
                    snapshot.elapsed_ms = migration_started.elapsed().as_millis() as u64;
                    progress(snapshot);
                    last_emit = Instant::now();
                    last_bytes = bytes;
                }
            }
            handles
                .into_iter()
                .map(|h| h.join().expect("sender thread panicked"))
                .collect()
        });
        let elapsed = started.elapsed();
        let mut bytes = 0;
        let mut first_error = None;
        for result in results {
            match result {
                Ok(sent) => {
                    bytes += sent.bytes;
                    self.report.pages_sent += sent.pages;
                    self.report.zero_pages_sent += sent.zero_pages;
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        if self.cancelled() {
            return Err(EngineError::Cancelled);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(EngineError::SwitchoverTimeout {
                timeout_ms: self.params.switchover_timeout_ms,
            });
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        self.report.bytes_sent = bytes_before + bytes;
        self.send_ms_total += elapsed.as_secs_f64() * 1000.0;
        self.progress.round_pages_sent = total;
        self.progress.rate_bytes_per_s = (bytes as f64 / elapsed.as_secs_f64().max(1e-6)) as u64;
        self.emit(progress);
        Ok(RoundSent { bytes, elapsed })
    }
}

/// A pre-copy collection's dirty set, how long it took and whether the vCPUs stood for it.
struct Collected {
    dirty: DirtyBitmap,
    ms: f64,
    paused: bool,
}

/// The timeline's view of a progress snapshot, with `memory_bytes` on the wire so far.
fn timeline_sample(progress: &Progress, memory_bytes: u64) -> TimelineSample {
    TimelineSample {
        t_ms: 0.0,
        phase: progress.phase,
        round: progress.round,
        memory_bytes,
        disk_copy_bytes: progress.disks.iter().map(|d| d.bytes_copied).sum(),
        disk_mirrored_bytes: progress.disks.iter().map(|d| d.mirrored_bytes).sum(),
    }
}
