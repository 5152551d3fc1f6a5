//! The quiesce-and-swap barrier as two pure state machines, one per side.
//!
//! They decide; they do no I/O. The engines feed them what happened (a message arrived, the
//! channel broke, the deadline passed, the journal wrote a record) and carry out the
//! actions they return (append to the journal, send, resume or discard the guest). The
//! seeded simulation drives the very same machines over a simulated network with crashes,
//! so what it proves is about this code.
//!
//! ```text
//! source                                         destination
//!   Migrating ── SwitchOver sent ─▶ AwaitingPrepared     Receiving ── lock-step ok ─▶ Preparing
//!   AwaitingPrepared ── Prepared ─▶ Committing           Preparing ── journaled ─▶ send Prepared,
//!   Committing ── HandedOver journaled (COMMIT POINT)                                AwaitingDecision
//!       ─▶ send Commit, AwaitingResumed                  AwaitingDecision ── Commit ─▶ journal Owned,
//!   AwaitingResumed ── Resumed / silence ─▶ HandedOver                         resume, send Resumed
//!   any failure before the commit point ─▶ send Abort,   AwaitingDecision ── Abort ─▶ Discarded
//!                                 resume: FailedBack     AwaitingDecision ── silence / channel lost
//!                                                            ─▶ InDoubt: ask the source's agent
//!                                                        InDoubt ── Committed ─▶ Owned
//!                                                        InDoubt ── Aborted ─▶ Discarded
//! ```
//!
//! The only two ways a guest runs: the source resumes it ([`SourceAction::ResumeGuest`],
//! emitted only before the commit was journaled) or the destination does
//! ([`DestinationAction::ResumeGuest`], emitted only after it learnt of the commit). The
//! source journals the commit before it sends `Commit`, so a destination can never learn of
//! a commit the source could still undo.

use std::time::{Duration, Instant};

/// Where the engines record the barrier's decisions before acting on them (the agent's
/// journal, fsynced). Each call returns once the record is durable.
pub trait SwapJournal: Send + Sync {
    /// Source: THE COMMIT POINT. `Ok`: the hand-over is recorded; the source never runs
    /// the guest again. `Err`: not committed (the source fails back).
    fn commit(&self) -> Result<(), String>;
    /// Destination: lock-step proven, device state loaded; the copy is recoverable and
    /// `Prepared` recorded. `Err`: not prepared (the destination aborts).
    fn prepared(&self) -> Result<(), String>;
    /// Destination: the source committed; ownership recorded. A failure is only logged: the
    /// source's journal holds the commit, and a restarted destination asks it.
    fn owned(&self) -> Result<(), String>;
}

/// Decisions kept in memory only: for tests, benchmarks and embedders without an agent.
pub struct VolatileJournal;

impl SwapJournal for VolatileJournal {
    fn commit(&self) -> Result<(), String> {
        Ok(())
    }
    fn prepared(&self) -> Result<(), String> {
        Ok(())
    }
    fn owned(&self) -> Result<(), String> {
        Ok(())
    }
}

/// What the source's machine is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceInput {
    /// The guest is quiesced and `SwitchOver` was sent; the switch-over must finish by
    /// `deadline`.
    SwitchOverSent { deadline: Instant },
    /// The destination proved lock-step and is prepared (`matches`: its digests equal ours).
    Prepared { matches: bool },
    /// The destination's digests differ: it is not prepared.
    NotInLockStep,
    /// The destination gave up, with its reason.
    PeerAborted(String),
    /// The control channel broke, or a message on it could not be read.
    ChannelLost(String),
    /// Something on this side failed (a send, the transport, the guest).
    Failed(String),
    /// The user cancelled.
    Cancelled,
    /// Time passed (the engine ticks at least every 50 ms while it waits).
    Tick,
    /// The journal's answer to [`SourceAction::JournalCommit`].
    CommitJournaled(Result<(), String>),
    /// The destination says the guest runs there.
    Resumed,
}

/// What the source's machine wants done, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceAction {
    /// Durably record the hand-over (the commit point); answer with
    /// [`SourceInput::CommitJournaled`].
    JournalCommit,
    SendCommit,
    SendAbort(String),
    /// Fail back: run the guest here again.
    ResumeGuest,
}

/// How the source's side ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceOutcome {
    /// Before the commit point: the guest runs here again.
    FailedBack(FailBack),
    /// Past the commit point: the guest is the destination's; `confirmed` once it said it
    /// resumed.
    HandedOver { confirmed: bool },
}

/// Why the source failed back.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FailBack {
    /// The switch-over did not reach `Prepared` within its bound.
    Timeout,
    /// The destination's digests differ from ours.
    NotInLockStep,
    PeerAborted(String),
    ChannelLost(String),
    Failed(String),
    /// The journal could not record the commit: not committed.
    JournalFailed(String),
    Cancelled,
}

impl std::fmt::Display for FailBack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Timeout => f.write_str("the switch-over did not finish within its bound"),
            Self::NotInLockStep => f.write_str("the destination is not in lock-step"),
            Self::PeerAborted(r) => write!(f, "the destination aborted: {r}"),
            Self::ChannelLost(r) => write!(f, "the control channel was lost: {r}"),
            Self::Failed(r) => f.write_str(r),
            Self::JournalFailed(r) => write!(f, "the commit could not be journaled: {r}"),
            Self::Cancelled => f.write_str("cancelled"),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum SourceState {
    Migrating,
    AwaitingPrepared { deadline: Instant },
    Committing,
    AwaitingResumed { deadline: Instant },
    Done(SourceOutcome),
}

/// The source's side of the barrier.
#[derive(Clone, Debug)]
pub struct SourceSwap {
    state: SourceState,
    /// How long the destination gets to confirm the resume after the commit.
    resume_wait: Duration,
}

impl SourceSwap {
    /// A migration in progress (pre-copy or earlier).
    pub fn new(resume_wait: Duration) -> Self {
        Self {
            state: SourceState::Migrating,
            resume_wait,
        }
    }

    /// The end, once reached.
    pub fn outcome(&self) -> Option<&SourceOutcome> {
        match &self.state {
            SourceState::Done(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// Past the commit point (the hand-over is journaled, or being journaled).
    pub fn committed(&self) -> bool {
        matches!(
            self.state,
            SourceState::AwaitingResumed { .. }
                | SourceState::Done(SourceOutcome::HandedOver { .. })
        )
    }

    /// Feeds one event; returns what to do, in order.
    pub fn step(&mut self, input: SourceInput, now: Instant) -> Vec<SourceAction> {
        use SourceAction as A;
        use SourceInput as I;
        use SourceState as S;
        let fail = |this: &mut Self, why: FailBack, tell_peer: bool| {
            this.state = S::Done(SourceOutcome::FailedBack(why.clone()));
            let mut actions = Vec::with_capacity(2);
            if tell_peer {
                actions.push(A::SendAbort(why.to_string()));
            }
            actions.push(A::ResumeGuest);
            actions
        };
        match (self.state.clone(), input) {
            (S::Done(_), _) => Vec::new(),
            // Before the commit point every failure fails back.
            (S::Migrating | S::AwaitingPrepared { .. }, I::Failed(r)) => {
                fail(self, FailBack::Failed(r), true)
            }
            (S::Migrating | S::AwaitingPrepared { .. }, I::Cancelled) => {
                fail(self, FailBack::Cancelled, true)
            }
            (S::Migrating | S::AwaitingPrepared { .. }, I::PeerAborted(r)) => {
                fail(self, FailBack::PeerAborted(r), false)
            }
            (S::Migrating | S::AwaitingPrepared { .. }, I::ChannelLost(r)) => {
                fail(self, FailBack::ChannelLost(r), true)
            }
            (S::Migrating, I::SwitchOverSent { deadline }) => {
                self.state = S::AwaitingPrepared { deadline };
                Vec::new()
            }
            (S::AwaitingPrepared { deadline }, I::Prepared { .. } | I::Tick) if now >= deadline => {
                fail(self, FailBack::Timeout, true)
            }
            (S::AwaitingPrepared { .. }, I::Prepared { matches: true }) => {
                self.state = S::Committing;
                vec![A::JournalCommit]
            }
            (S::AwaitingPrepared { .. }, I::Prepared { matches: false }) => {
                fail(self, FailBack::NotInLockStep, true)
            }
            (S::AwaitingPrepared { .. }, I::NotInLockStep) => {
                fail(self, FailBack::NotInLockStep, false)
            }
            (S::Committing, I::CommitJournaled(Ok(()))) => {
                self.state = S::AwaitingResumed {
                    deadline: now + self.resume_wait,
                };
                vec![A::SendCommit]
            }
            (S::Committing, I::CommitJournaled(Err(r))) => {
                fail(self, FailBack::JournalFailed(r), true)
            }
            // While the journal writes, nothing else decides.
            (S::Committing, _) => Vec::new(),
            (S::AwaitingResumed { .. }, I::Resumed) => {
                self.state = S::Done(SourceOutcome::HandedOver { confirmed: true });
                Vec::new()
            }
            // Past the commit point nothing brings the guest back here.
            (S::AwaitingResumed { deadline }, I::Tick) if now < deadline => Vec::new(),
            (
                S::AwaitingResumed { .. },
                I::Tick
                | I::ChannelLost(_)
                | I::PeerAborted(_)
                | I::Failed(_)
                | I::NotInLockStep
                | I::Prepared { .. },
            ) => {
                self.state = S::Done(SourceOutcome::HandedOver { confirmed: false });
                Vec::new()
            }
            // Inputs that mean nothing in the current state (a stray message, a tick, a
            // cancel after the commit) change nothing.
            (_, _) => Vec::new(),
        }
    }
}

/// What the source's agent answers a destination that asks how a swap ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SwapOutcome {
    /// The source journaled the hand-over: the destination owns the guest.
    Committed,
    /// The source will never commit this swap: the destination discards its copy.
    Aborted,
    /// Not decided yet (the source is still in the switch-over): ask again.
    Pending,
}

/// What the destination's machine is told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestinationInput {
    /// The final round landed and the digests were compared (`matches`) and, when they
    /// matched, the device state was loaded.
    LockStep {
        matches: bool,
    },
    /// The journal's answer to [`DestinationAction::JournalPrepared`].
    PrepareJournaled(Result<(), String>),
    Commit,
    PeerAborted(String),
    /// The control channel broke or carried garbage.
    ChannelLost(String),
    /// Something on this side failed before `Prepared` was sent.
    Failed(String),
    Tick,
    /// The source agent's answer to [`DestinationAction::AskOutcome`].
    Outcome(SwapOutcome),
    /// The source agent could not be asked (unreachable, refused): ask again later.
    OutcomeUnknown(String),
}

/// What the destination's machine wants done, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestinationAction {
    /// Durably record `Prepared` (the copy is recoverable); answer with
    /// [`DestinationInput::PrepareJournaled`].
    JournalPrepared,
    SendPrepared,
    SendNotInLockStep,
    SendAbort(String),
    /// Durably record ownership (a failure is logged: the source's journal holds the commit).
    JournalOwned,
    ResumeGuest,
    SendResumed,
    /// Record the discard and drop the incoming copy.
    Discard,
    /// Ask the source's agent how the swap ended (on a new connection); answer with
    /// [`DestinationInput::Outcome`] or [`DestinationInput::OutcomeUnknown`].
    AskOutcome,
}

/// How the destination's side ended (or where it waits).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DestinationOutcome {
    /// The source committed: the guest is ours (and runs, unless taken over paused).
    Owned,
    /// The source keeps the guest.
    Discarded(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum DestinationState {
    Receiving,
    Preparing,
    AwaitingDecision {
        deadline: Instant,
    },
    /// Prepared, and the source's decision did not arrive: only the source's agent can
    /// tell. Never resumes and never discards on its own.
    InDoubt {
        next_ask: Instant,
    },
    AskingOutcome,
    Done(DestinationOutcome),
}

/// The destination's side of the barrier.
#[derive(Clone, Debug)]
pub struct DestinationSwap {
    state: DestinationState,
    /// How long to wait for `Commit`/`Abort` after `Prepared` before asking.
    decision_wait: Duration,
    /// Between two questions to the source's agent.
    ask_interval: Duration,
}

impl DestinationSwap {
    pub fn new(decision_wait: Duration, ask_interval: Duration) -> Self {
        Self {
            state: DestinationState::Receiving,
            decision_wait,
            ask_interval,
        }
    }

    /// A destination that restarted and found `Prepared` in its journal: it asks at once.
    pub fn recovered_prepared(ask_interval: Duration, now: Instant) -> Self {
        Self {
            state: DestinationState::InDoubt { next_ask: now },
            decision_wait: Duration::ZERO,
            ask_interval,
        }
    }

    pub fn outcome(&self) -> Option<&DestinationOutcome> {
        match &self.state {
            DestinationState::Done(outcome) => Some(outcome),
            _ => None,
        }
    }

    /// Prepared and waiting for the source's agent to say how the swap ended.
    pub fn in_doubt(&self) -> bool {
        matches!(
            self.state,
            DestinationState::InDoubt { .. } | DestinationState::AskingOutcome
        )
    }

    /// `Prepared` was sent (or journaled): from here only the source's decision counts.
    pub fn prepared(&self) -> bool {
        matches!(
            self.state,
            DestinationState::AwaitingDecision { .. }
                | DestinationState::InDoubt { .. }
                | DestinationState::AskingOutcome
        )
    }

    pub fn step(&mut self, input: DestinationInput, now: Instant) -> Vec<DestinationAction> {
        use DestinationAction as A;
        use DestinationInput as I;
        use DestinationState as S;
        let discard = |this: &mut Self, why: String| {
            this.state = S::Done(DestinationOutcome::Discarded(why));
            vec![A::Discard]
        };
        let own = |this: &mut Self| {
            this.state = S::Done(DestinationOutcome::Owned);
            vec![A::JournalOwned, A::ResumeGuest, A::SendResumed]
        };
        let doubt = |this: &mut Self| {
            this.state = S::AskingOutcome;
            vec![A::AskOutcome]
        };
        match (self.state.clone(), input) {
            (S::Done(_), _) => Vec::new(),
            (S::Receiving, I::LockStep { matches: true }) => {
                self.state = S::Preparing;
                vec![A::JournalPrepared]
            }
            (S::Receiving, I::LockStep { matches: false }) => {
                self.state = S::Done(DestinationOutcome::Discarded(
                    "not in lock-step with the source".into(),
                ));
                vec![A::SendNotInLockStep, A::Discard]
            }
            (S::Receiving, I::Failed(r)) => {
                let mut actions = vec![A::SendAbort(r.clone())];
                actions.extend(discard(self, r));
                actions
            }
            (S::Receiving, I::PeerAborted(r) | I::ChannelLost(r)) => discard(self, r),
            // A commit can only follow our Prepared: before it, a Commit is a protocol lie.
            (S::Receiving, I::Commit) => {
                let r = "Commit before Prepared".to_string();
                let mut actions = vec![A::SendAbort(r.clone())];
                actions.extend(discard(self, r));
                actions
            }
            (S::Preparing, I::PrepareJournaled(Ok(()))) => {
                self.state = S::AwaitingDecision {
                    deadline: now + self.decision_wait,
                };
                vec![A::SendPrepared]
            }
            (S::Preparing, I::PrepareJournaled(Err(r))) => {
                let r = format!("recording Prepared failed: {r}");
                let mut actions = vec![A::SendAbort(r.clone())];
                actions.extend(discard(self, r));
                actions
            }
            (S::Preparing, _) => Vec::new(),
            (
                S::AwaitingDecision { .. } | S::InDoubt { .. } | S::AskingOutcome,
                I::Commit | I::Outcome(SwapOutcome::Committed),
            ) => own(self),
            (
                S::AwaitingDecision { .. } | S::InDoubt { .. } | S::AskingOutcome,
                I::PeerAborted(r),
            ) => discard(self, r),
            (
                S::AwaitingDecision { .. } | S::InDoubt { .. } | S::AskingOutcome,
                I::Outcome(SwapOutcome::Aborted),
            ) => discard(self, "the source aborted the swap".into()),
            (S::AwaitingDecision { .. }, I::ChannelLost(_) | I::Failed(_)) => doubt(self),
            (S::AwaitingDecision { deadline }, I::Tick) if now >= deadline => doubt(self),
            (S::AskingOutcome, I::Outcome(SwapOutcome::Pending) | I::OutcomeUnknown(_)) => {
                self.state = S::InDoubt {
                    next_ask: now + self.ask_interval,
                };
                Vec::new()
            }
            (S::InDoubt { next_ask }, I::Tick) if now >= next_ask => doubt(self),
            (_, _) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(1);

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn source_commits_only_after_the_journal_and_never_resumes_after() {
        let t0 = Instant::now();
        let mut s = SourceSwap::new(WAIT);
        assert!(s
            .step(
                SourceInput::SwitchOverSent {
                    deadline: at(t0, 100)
                },
                t0
            )
            .is_empty());
        assert_eq!(
            s.step(SourceInput::Prepared { matches: true }, at(t0, 10)),
            vec![SourceAction::JournalCommit]
        );
        // Nothing decides while the journal writes.
        assert!(s
            .step(SourceInput::ChannelLost("x".into()), at(t0, 11))
            .is_empty());
        assert_eq!(
            s.step(SourceInput::CommitJournaled(Ok(())), at(t0, 12)),
            vec![SourceAction::SendCommit]
        );
        assert!(s.committed());
        for input in [
            SourceInput::Cancelled,
            SourceInput::Failed("late".into()),
            SourceInput::NotInLockStep,
        ] {
            let actions = s.step(input, at(t0, 20));
            assert!(!actions.contains(&SourceAction::ResumeGuest));
        }
        assert_eq!(
            s.outcome(),
            Some(&SourceOutcome::HandedOver { confirmed: false })
        );
    }

    #[test]
    fn source_confirmed_and_timeouts() {
        let t0 = Instant::now();
        let mut s = SourceSwap::new(WAIT);
        s.step(
            SourceInput::SwitchOverSent {
                deadline: at(t0, 100),
            },
            t0,
        );
        s.step(SourceInput::Prepared { matches: true }, at(t0, 1));
        s.step(SourceInput::CommitJournaled(Ok(())), at(t0, 2));
        assert!(s.step(SourceInput::Tick, at(t0, 500)).is_empty());
        assert!(s.outcome().is_none());
        s.step(SourceInput::Resumed, at(t0, 600));
        assert_eq!(
            s.outcome(),
            Some(&SourceOutcome::HandedOver { confirmed: true })
        );

        // Prepared too late: fail back, telling the destination.
        let mut s = SourceSwap::new(WAIT);
        s.step(
            SourceInput::SwitchOverSent {
                deadline: at(t0, 100),
            },
            t0,
        );
        assert!(s.step(SourceInput::Tick, at(t0, 99)).is_empty());
        let actions = s.step(SourceInput::Prepared { matches: true }, at(t0, 100));
        assert_eq!(actions.last(), Some(&SourceAction::ResumeGuest));
        assert!(matches!(actions[0], SourceAction::SendAbort(_)));
        assert_eq!(
            s.outcome(),
            Some(&SourceOutcome::FailedBack(FailBack::Timeout))
        );
    }

    #[test]
    fn source_fails_back_on_every_failure_before_the_commit() {
        let t0 = Instant::now();
        let inputs = [
            SourceInput::Failed("f".into()),
            SourceInput::Cancelled,
            SourceInput::PeerAborted("p".into()),
            SourceInput::ChannelLost("c".into()),
            SourceInput::NotInLockStep,
            SourceInput::Prepared { matches: false },
        ];
        for input in inputs {
            let mut s = SourceSwap::new(WAIT);
            s.step(
                SourceInput::SwitchOverSent {
                    deadline: at(t0, 100),
                },
                t0,
            );
            let actions = s.step(input.clone(), at(t0, 1));
            assert_eq!(
                actions.last(),
                Some(&SourceAction::ResumeGuest),
                "{input:?}"
            );
            assert!(matches!(s.outcome(), Some(SourceOutcome::FailedBack(_))));
        }
        // A journal that cannot record the commit: not committed.
        let mut s = SourceSwap::new(WAIT);
        s.step(
            SourceInput::SwitchOverSent {
                deadline: at(t0, 100),
            },
            t0,
        );
        s.step(SourceInput::Prepared { matches: true }, at(t0, 1));
        let actions = s.step(
            SourceInput::CommitJournaled(Err("ENOSPC".into())),
            at(t0, 2),
        );
        assert_eq!(actions.last(), Some(&SourceAction::ResumeGuest));
        assert!(!s.committed());
    }

    #[test]
    fn destination_resumes_only_on_the_commit_and_waits_in_doubt() {
        let t0 = Instant::now();
        let ask = Duration::from_millis(200);
        let mut d = DestinationSwap::new(WAIT, ask);
        assert_eq!(
            d.step(DestinationInput::LockStep { matches: true }, t0),
            vec![DestinationAction::JournalPrepared]
        );
        assert_eq!(
            d.step(DestinationInput::PrepareJournaled(Ok(())), t0),
            vec![DestinationAction::SendPrepared]
        );
        assert!(d.prepared());
        // Channel lost: ask, never resume or discard on its own.
        assert_eq!(
            d.step(DestinationInput::ChannelLost("cut".into()), at(t0, 5)),
            vec![DestinationAction::AskOutcome]
        );
        assert!(d
            .step(
                DestinationInput::OutcomeUnknown("unreachable".into()),
                at(t0, 6)
            )
            .is_empty());
        assert!(d.step(DestinationInput::Tick, at(t0, 100)).is_empty());
        assert_eq!(
            d.step(DestinationInput::Tick, at(t0, 300)),
            vec![DestinationAction::AskOutcome]
        );
        d.step(DestinationInput::Outcome(SwapOutcome::Pending), at(t0, 301));
        assert!(d.in_doubt());
        d.step(DestinationInput::Tick, at(t0, 600));
        assert_eq!(
            d.step(
                DestinationInput::Outcome(SwapOutcome::Committed),
                at(t0, 601)
            ),
            vec![
                DestinationAction::JournalOwned,
                DestinationAction::ResumeGuest,
                DestinationAction::SendResumed
            ]
        );
        assert_eq!(d.outcome(), Some(&DestinationOutcome::Owned));
    }

    #[test]
    fn destination_discards_before_prepared_and_on_abort() {
        let t0 = Instant::now();
        let mut d = DestinationSwap::new(WAIT, WAIT);
        assert_eq!(
            d.step(DestinationInput::LockStep { matches: false }, t0),
            vec![
                DestinationAction::SendNotInLockStep,
                DestinationAction::Discard
            ]
        );
        let mut d = DestinationSwap::new(WAIT, WAIT);
        d.step(DestinationInput::LockStep { matches: true }, t0);
        let actions = d.step(DestinationInput::PrepareJournaled(Err("full".into())), t0);
        assert_eq!(actions.last(), Some(&DestinationAction::Discard));
        let mut d = DestinationSwap::new(WAIT, WAIT);
        d.step(DestinationInput::LockStep { matches: true }, t0);
        d.step(DestinationInput::PrepareJournaled(Ok(())), t0);
        assert_eq!(
            d.step(DestinationInput::Tick, at(t0, 1000)),
            vec![DestinationAction::AskOutcome]
        );
        assert_eq!(
            d.step(
                DestinationInput::Outcome(SwapOutcome::Aborted),
                at(t0, 1001)
            ),
            vec![DestinationAction::Discard]
        );
        // A Commit before Prepared is refused.
        let mut d = DestinationSwap::new(WAIT, WAIT);
        let actions = d.step(DestinationInput::Commit, t0);
        assert!(!actions.contains(&DestinationAction::ResumeGuest));
        // A recovered, prepared destination asks at once.
        let mut d = DestinationSwap::recovered_prepared(WAIT, t0);
        assert_eq!(
            d.step(DestinationInput::Tick, t0),
            vec![DestinationAction::AskOutcome]
        );
    }
}
