//! Who owns each VM, durably: the agent's half of the quiesce-and-swap barrier.
//!
//! Every decision is appended to the agent's [`Journal`] (fsynced) before it is acted on,
//! and the in-memory view here is only ever derived from what was appended. The engines'
//! barrier ([`ferry_dataplane::engine::barrier`]) calls back through [`OutgoingSwap`] and
//! [`IncomingSwap`]; a destination in doubt asks [`Ownership::answer`] on the source's
//! agent; a restarted agent follows [`Ownership::recovery_plan`].
//!
//! Epochs: a VM created on an agent has epoch 1; each completed migration makes the
//! destination's copy epoch + 1. An outcome question names the epoch and the session, so a
//! stale question can never be taken for a current one.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use ferry_dataplane::engine::barrier::{SwapJournal, SwapOutcome};
use tracing::{info, warn};

use crate::journal::{latest_by_vm, Journal, JournalError, Record};

/// Name of the journal in the data directory.
pub const JOURNAL_FILE: &str = "journal";
/// A journal with more records than this is compacted at start-up.
const COMPACT_ABOVE: usize = 4096;

/// What a restarted agent does for one VM its journal names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Recovery {
    /// The VM is ours: recover it from its files and run it (it was hosted, owned after a
    /// migration in, or its outgoing migration never committed). `unfinished`: that
    /// outgoing migration's session, to be recorded as aborted first.
    Resume {
        vm: String,
        epoch: u64,
        unfinished: Option<u64>,
    },
    /// Prepared as a destination and undecided: recover it paused and ask `from`.
    InDoubt {
        vm: String,
        epoch: u64,
        session: u64,
        from: String,
    },
    /// Handed over (committed) but never confirmed: never run it; keep its disk image.
    HandedOver { vm: String, epoch: u64, to: String },
    /// An incoming migration that never prepared: remove what it left.
    DiscardIncoming {
        vm: String,
        epoch: u64,
        session: u64,
    },
}

/// How an outgoing migration ended, as the source's agent records it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OutgoingEnd {
    /// Failed back before the commit point: the VM stays here at its epoch.
    FailedBack,
    /// Committed and the destination confirmed: the local copy is gone.
    Released,
    /// Committed, not confirmed: the VM is the destination's; the disk image stays.
    Unconfirmed,
}

#[derive(Default)]
struct View {
    /// The latest record per VM name.
    latest: BTreeMap<String, Record>,
    /// Outgoing sessions decided here: committed (`true`) or aborted.
    decided: HashMap<u64, bool>,
    /// Outgoing sessions whose engine still runs: their outcome is pending.
    active: HashSet<u64>,
}

impl View {
    fn apply(&mut self, record: &Record) {
        match record {
            Record::HandedOver { session, .. } => {
                self.decided.insert(*session, true);
            }
            Record::OutgoingAborted { session, vm, .. } => {
                self.decided.insert(*session, false);
                // An abort answered for an old session (not the VM's current migration)
                // decides that session only; it says nothing new about the VM.
                let current = matches!(self.latest.get(vm.as_str()),
                    Some(Record::OutgoingStarted { session: s, .. }) if s == session);
                if !current {
                    return;
                }
            }
            _ => {}
        }
        self.latest.insert(record.vm().to_string(), record.clone());
    }
}

/// The agent's ownership journal and what it says.
pub struct Ownership {
    journal: Journal,
    view: Mutex<View>,
}

impl Ownership {
    /// Opens (or creates) `DATA_DIR/journal`, compacting it when it grew long.
    pub fn open(data_dir: &Path) -> Result<Ownership, JournalError> {
        let (journal, opened) = Journal::open(&data_dir.join(JOURNAL_FILE))?;
        // (A torn last record was cut away and logged by the journal: never decided.)
        let mut view = View::default();
        for record in &opened.records {
            view.apply(record);
        }
        if opened.records.len() > COMPACT_ABOVE {
            // Keep the latest record per VM and every decided session's record.
            let keep: Vec<Record> = opened
                .records
                .iter()
                .filter(|r| {
                    matches!(
                        r,
                        Record::HandedOver { .. } | Record::OutgoingAborted { .. }
                    ) || view.latest.get(r.vm()) == Some(r)
                })
                .cloned()
                .collect();
            journal.rewrite(&keep)?;
            info!(
                before = opened.records.len(),
                after = keep.len(),
                "journal compacted"
            );
        }
        Ok(Ownership {
            journal,
            view: Mutex::new(view),
        })
    }

    fn view(&self) -> MutexGuard<'_, View> {
        self.view.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Appends under the view's lock, so decisions and questions are serialised.
    fn append(&self, view: &mut View, record: Record) -> Result<(), JournalError> {
        if let Some(action) = ferry_dataplane::failpoint::hit("journal-append") {
            let source = action.io_error("journal-append");
            return Err(JournalError::Io {
                op: "appending to (failpoint)",
                path: self.journal.path().to_path_buf(),
                source,
            });
        }
        self.journal.append(&record)?;
        view.apply(&record);
        Ok(())
    }

    /// Whether outgoing `session` passed its commit point (the journal holds its hand-over).
    pub fn committed(&self, session: u64) -> bool {
        self.view().decided.get(&session) == Some(&true)
    }

    /// The latest record about `vm`.
    pub fn latest(&self, vm: &str) -> Option<Record> {
        self.view().latest.get(vm).cloned()
    }

    /// The epoch at which this agent holds `vm`, if it runs (or may run) it here.
    pub fn epoch_here(&self, vm: &str) -> Option<u64> {
        match self.view().latest.get(vm)? {
            Record::Hosted { epoch, .. }
            | Record::Owned { epoch, .. }
            | Record::OutgoingStarted { epoch, .. }
            | Record::OutgoingAborted { epoch, .. }
            | Record::Prepared { epoch, .. } => Some(*epoch),
            _ => None,
        }
    }

    /// A VM created here: epoch 1 (or one past an earlier VM of the same name).
    pub fn created(&self, vm: &str) -> Result<u64, JournalError> {
        let mut view = self.view();
        let epoch = view.latest.get(vm).map_or(1, |r| r.epoch() + 1);
        self.append(
            &mut view,
            Record::Hosted {
                vm: vm.into(),
                epoch,
            },
        )?;
        Ok(epoch)
    }

    /// `vm` was destroyed here.
    pub fn destroyed(&self, vm: &str) -> Result<(), JournalError> {
        let mut view = self.view();
        let epoch = view.latest.get(vm).map_or(0, |r| r.epoch());
        self.append(
            &mut view,
            Record::Destroyed {
                vm: vm.into(),
                epoch,
            },
        )
    }

    /// An outgoing migration of `vm` starts: returns the epoch it leaves from.
    pub fn outgoing_started(&self, vm: &str, session: u64, to: &str) -> Result<u64, JournalError> {
        let mut view = self.view();
        let epoch = match view.latest.get(vm) {
            Some(
                Record::Hosted { epoch, .. }
                | Record::Owned { epoch, .. }
                | Record::OutgoingAborted { epoch, .. },
            ) => *epoch,
            other => {
                return Err(JournalError::Encode {
                    reason: format!("{vm:?} is not hosted here by the journal ({other:?})"),
                })
            }
        };
        self.append(
            &mut view,
            Record::OutgoingStarted {
                vm: vm.into(),
                epoch,
                session,
                to: to.into(),
            },
        )?;
        view.active.insert(session);
        Ok(epoch)
    }

    /// THE COMMIT POINT of `session`: refused if that session was already answered as
    /// aborted (never both).
    fn commit(&self, vm: &str, session: u64, to: &str) -> Result<(), String> {
        let mut view = self.view();
        let epoch = match view.latest.get(vm) {
            Some(Record::OutgoingStarted {
                epoch, session: s, ..
            }) if *s == session => *epoch,
            other => {
                return Err(format!(
                    "not committing: the journal's latest record for {vm:?} is {other:?}"
                ))
            }
        };
        if view.decided.get(&session) == Some(&false) {
            return Err("not committing: this swap was already answered as aborted".into());
        }
        self.append(
            &mut view,
            Record::HandedOver {
                vm: vm.into(),
                epoch: epoch + 1,
                session,
                to: to.into(),
            },
        )
        .map_err(|e| crate::error_chain(&e))?;
        info!(
            vm,
            epoch = epoch + 1,
            to,
            "commit point: VM handed over (journaled)"
        );
        Ok(())
    }

    /// The outgoing migration's engine returned.
    pub fn outgoing_finished(&self, vm: &str, session: u64, end: OutgoingEnd) {
        let mut view = self.view();
        view.active.remove(&session);
        let epoch = view.latest.get(vm).map_or(0, |r| r.epoch());
        let record = match end {
            OutgoingEnd::FailedBack if view.decided.contains_key(&session) => return,
            OutgoingEnd::FailedBack => Record::OutgoingAborted {
                vm: vm.into(),
                epoch,
                session,
            },
            OutgoingEnd::Released => Record::Released {
                vm: vm.into(),
                epoch,
                session,
            },
            OutgoingEnd::Unconfirmed => return,
        };
        if let Err(error) = self.append(&mut view, record) {
            // Harmless: an unanswered session is answered (and journaled) as aborted later,
            // and a missing Released only keeps the old disk image around.
            warn!(vm, error = %crate::error_chain(&error), "recording the end of an outgoing migration failed");
        }
    }

    /// The destination of swap `session` says it owns `vm` (it learnt of the commit by
    /// asking): the hand-over is confirmed. `true` when that was news.
    pub fn released_by_destination(&self, vm: &str, session: u64) -> bool {
        let mut view = self.view();
        let epoch = match view.latest.get(vm) {
            Some(Record::HandedOver {
                epoch, session: s, ..
            }) if *s == session => *epoch,
            _ => return false,
        };
        let record = Record::Released {
            vm: vm.into(),
            epoch,
            session,
        };
        match self.append(&mut view, record) {
            Ok(()) => true,
            Err(error) => {
                warn!(vm, error = %crate::error_chain(&error), "recording the destination's confirmation failed");
                false
            }
        }
    }

    /// A destination asks how swap `session` of `vm` (at `epoch` there) ended.
    pub fn answer(&self, vm: &str, epoch: u64, session: u64) -> SwapOutcome {
        let mut view = self.view();
        match view.decided.get(&session) {
            Some(true) => return SwapOutcome::Committed,
            Some(false) => return SwapOutcome::Aborted,
            None => {}
        }
        if view.active.contains(&session) {
            return SwapOutcome::Pending;
        }
        // Not decided and no engine runs it (this agent restarted, or the engine ended
        // without a record): decide now, durably, that it never commits.
        let record = Record::OutgoingAborted {
            vm: vm.into(),
            epoch: epoch.saturating_sub(1),
            session,
        };
        // (It becomes the VM's latest record only when it is about the VM's current
        // migration: see `View::apply`.)
        match self.append(&mut view, record) {
            Ok(()) => SwapOutcome::Aborted,
            // Could not make "aborted" durable: do not promise it.
            Err(error) => {
                warn!(vm, error = %crate::error_chain(&error), "cannot record the abort an in-doubt destination asks about; answering pending");
                SwapOutcome::Pending
            }
        }
    }

    pub fn incoming_started(
        &self,
        vm: &str,
        epoch: u64,
        session: u64,
        from: &str,
    ) -> Result<(), JournalError> {
        let mut view = self.view();
        self.append(
            &mut view,
            Record::IncomingStarted {
                vm: vm.into(),
                epoch,
                session,
                from: from.into(),
            },
        )
    }

    /// The incoming copy was discarded (its files are being removed).
    pub fn discarded(&self, vm: &str, epoch: u64, session: u64) {
        let mut view = self.view();
        if let Err(error) = self.append(
            &mut view,
            Record::Discarded {
                vm: vm.into(),
                epoch,
                session,
            },
        ) {
            warn!(vm, error = %crate::error_chain(&error), "recording a discarded incoming VM failed (a restart discards it again)");
        }
    }

    /// The source committed: this agent owns `vm` at `epoch`.
    pub fn owned(&self, vm: &str, epoch: u64, session: u64) -> Result<(), JournalError> {
        let mut view = self.view();
        self.append(
            &mut view,
            Record::Owned {
                vm: vm.into(),
                epoch,
                session,
            },
        )
    }

    /// What a restarted agent must do, per VM.
    pub fn recovery_plan(&self) -> Vec<Recovery> {
        let view = self.view();
        plan(&view.latest)
    }

    /// Records that the outgoing migration `session` never committed (recovery of a source
    /// that died mid-migration).
    pub fn abort_unfinished(&self, vm: &str, session: u64) -> Result<(), JournalError> {
        let mut view = self.view();
        let epoch = view.latest.get(vm).map_or(0, |r| r.epoch());
        self.append(
            &mut view,
            Record::OutgoingAborted {
                vm: vm.into(),
                epoch,
                session,
            },
        )
    }
}

/// Recovery, as a pure function of the latest record per VM.
pub fn plan(latest: &BTreeMap<String, Record>) -> Vec<Recovery> {
    latest
        .values()
        .filter_map(|record| match record.clone() {
            Record::Hosted { vm, epoch }
            | Record::Owned { vm, epoch, .. }
            | Record::OutgoingAborted { vm, epoch, .. } => Some(Recovery::Resume {
                vm,
                epoch,
                unfinished: None,
            }),
            Record::OutgoingStarted {
                vm, epoch, session, ..
            } => Some(Recovery::Resume {
                vm,
                epoch,
                unfinished: Some(session),
            }),
            Record::Prepared {
                vm,
                epoch,
                session,
                from,
            } => Some(Recovery::InDoubt {
                vm,
                epoch,
                session,
                from,
            }),
            Record::HandedOver { vm, epoch, to, .. } => {
                Some(Recovery::HandedOver { vm, epoch, to })
            }
            Record::IncomingStarted {
                vm, epoch, session, ..
            } => Some(Recovery::DiscardIncoming { vm, epoch, session }),
            Record::Released { .. } | Record::Discarded { .. } | Record::Destroyed { .. } => None,
        })
        .collect()
}

/// The latest record per VM of a list (recovery's input), re-exported for the simulation.
pub fn latest(records: &[Record]) -> BTreeMap<String, Record> {
    latest_by_vm(records)
}

/// The source side's journal for one outgoing migration.
pub struct OutgoingSwap<'a> {
    pub ownership: &'a Ownership,
    pub vm: String,
    pub session: u64,
    pub to: String,
}

impl SwapJournal for OutgoingSwap<'_> {
    fn commit(&self) -> Result<(), String> {
        self.ownership.commit(&self.vm, self.session, &self.to)
    }
    fn prepared(&self) -> Result<(), String> {
        Err("a source is never prepared".into())
    }
    fn owned(&self) -> Result<(), String> {
        Err("a source never takes ownership".into())
    }
}

/// The destination side's journal for one incoming migration.
pub struct IncomingSwap<'a> {
    pub ownership: &'a Ownership,
    pub vm: String,
    /// The epoch the VM has here once owned.
    pub epoch: u64,
    pub session: u64,
    /// The source agent's address, for outcome questions.
    pub from: String,
}

impl SwapJournal for IncomingSwap<'_> {
    fn commit(&self) -> Result<(), String> {
        Err("a destination never commits".into())
    }
    fn prepared(&self) -> Result<(), String> {
        let mut view = self.ownership.view();
        self.ownership
            .append(
                &mut view,
                Record::Prepared {
                    vm: self.vm.clone(),
                    epoch: self.epoch,
                    session: self.session,
                    from: self.from.clone(),
                },
            )
            .map_err(|e| crate::error_chain(&e))
    }
    fn owned(&self) -> Result<(), String> {
        self.ownership
            .owned(&self.vm, self.epoch, self.session)
            .map_err(|e| crate::error_chain(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &Path) -> Ownership {
        Ownership::open(dir).unwrap()
    }

    #[test]
    fn commit_then_answers_committed_even_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let own = open(dir.path());
        assert_eq!(own.created("a").unwrap(), 1);
        assert_eq!(own.outgoing_started("a", 7, "dst:1").unwrap(), 1);
        assert_eq!(own.answer("a", 2, 7), SwapOutcome::Pending);
        let swap = OutgoingSwap {
            ownership: &own,
            vm: "a".into(),
            session: 7,
            to: "dst:1".into(),
        };
        swap.commit().unwrap();
        assert_eq!(own.answer("a", 2, 7), SwapOutcome::Committed);
        assert_eq!(own.epoch_here("a"), None);
        drop(own);
        let own = open(dir.path());
        assert_eq!(own.answer("a", 2, 7), SwapOutcome::Committed);
        assert_eq!(
            own.recovery_plan(),
            vec![Recovery::HandedOver {
                vm: "a".into(),
                epoch: 2,
                to: "dst:1".into()
            }]
        );
        // The destination, having asked, confirms: released, once; a stranger's claim
        // about another session changes nothing.
        assert!(!own.released_by_destination("a", 8));
        assert!(own.released_by_destination("a", 7));
        assert!(!own.released_by_destination("a", 7));
        assert!(own.recovery_plan().is_empty());
        assert_eq!(own.answer("a", 2, 7), SwapOutcome::Committed);
    }

    #[test]
    fn an_unfinished_migration_is_answered_aborted_and_can_never_commit() {
        let dir = tempfile::tempdir().unwrap();
        let own = open(dir.path());
        own.created("a").unwrap();
        own.outgoing_started("a", 9, "dst:1").unwrap();
        drop(own);
        // The agent died mid-migration: it resumes the VM, and the question is answered
        // aborted, durably.
        let own = open(dir.path());
        assert_eq!(
            own.recovery_plan(),
            vec![Recovery::Resume {
                vm: "a".into(),
                epoch: 1,
                unfinished: Some(9)
            }]
        );
        assert_eq!(own.answer("a", 2, 9), SwapOutcome::Aborted);
        let swap = OutgoingSwap {
            ownership: &own,
            vm: "a".into(),
            session: 9,
            to: "dst:1".into(),
        };
        assert!(swap.commit().is_err());
        drop(own);
        let own = open(dir.path());
        assert_eq!(own.answer("a", 2, 9), SwapOutcome::Aborted);
        assert_eq!(own.epoch_here("a"), Some(1));
    }

    #[test]
    fn destination_records_and_recovery() {
        let dir = tempfile::tempdir().unwrap();
        let own = open(dir.path());
        own.incoming_started("b", 4, 11, "src:1").unwrap();
        assert_eq!(
            own.recovery_plan(),
            vec![Recovery::DiscardIncoming {
                vm: "b".into(),
                epoch: 4,
                session: 11
            }]
        );
        let swap = IncomingSwap {
            ownership: &own,
            vm: "b".into(),
            epoch: 4,
            session: 11,
            from: "src:1".into(),
        };
        swap.prepared().unwrap();
        assert_eq!(
            own.recovery_plan(),
            vec![Recovery::InDoubt {
                vm: "b".into(),
                epoch: 4,
                session: 11,
                from: "src:1".into()
            }]
        );
        swap.owned().unwrap();
        drop(own);
        let own = open(dir.path());
        assert_eq!(
            own.recovery_plan(),
            vec![Recovery::Resume {
                vm: "b".into(),
                epoch: 4,
                unfinished: None
            }]
        );
        assert_eq!(own.epoch_here("b"), Some(4));
        own.destroyed("b").unwrap();
        assert!(own.recovery_plan().is_empty());
    }

    #[test]
    fn an_abort_answered_for_an_old_session_does_not_bring_a_vm_back() {
        let dir = tempfile::tempdir().unwrap();
        let own = open(dir.path());
        own.created("a").unwrap();
        own.outgoing_started("a", 5, "dst:1").unwrap();
        own.outgoing_finished("a", 5, OutgoingEnd::FailedBack);
        own.destroyed("a").unwrap();
        // A stale question about an unknown session of a destroyed VM.
        assert_eq!(own.answer("a", 2, 77), SwapOutcome::Aborted);
        assert!(own.recovery_plan().is_empty());
        drop(own);
        let own = open(dir.path());
        assert!(own.recovery_plan().is_empty(), "{:?}", own.recovery_plan());
        assert_eq!(own.answer("a", 2, 77), SwapOutcome::Aborted);
    }
}
