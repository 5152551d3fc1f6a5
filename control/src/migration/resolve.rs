//! A destination in doubt: prepared (journaled), the source's decision never arrived. It
//! keeps the VM paused and asks the source's agent how the swap ended until it gets an
//! answer: committed (journal ownership, resume) or aborted (discard). The decisions are the
//! barrier's [`DestinationSwap`]; this module only asks and carries them out.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_dataplane::engine::barrier::{
    DestinationAction, DestinationInput, DestinationOutcome, DestinationSwap, SwapOutcome,
};
use ferry_dataplane::engine::destination::ASK_INTERVAL;
use ferry_dataplane::guest::reference::ReferenceVm;
use ferry_dataplane::guest::Guest;
use ferry_dataplane::wire::{read_message, write_message};
use tracing::{error, info, warn};

use super::outgoing::{connect, remove_vm_files};
use super::DATA_STREAMS_TIMEOUT;
use crate::api::VmState;
use crate::auth::ClusterKey;
use crate::disks::{DiskStore, HostedDisk};
use crate::error_chain;
use crate::ownership::Ownership;
use crate::peer::{Opening, OutcomeQuestion, PEER_MESSAGE_LEN_MAX};
use crate::registry::Registry;

/// Where the agent's services are, for the resolver.
pub struct Services<'a> {
    pub registry: &'a Registry,
    pub disks: &'a DiskStore,
    pub ownership: &'a Ownership,
    pub key: &'a ClusterKey,
    /// The agent is stopping: leave the VM in doubt (the journal keeps `Prepared`; a
    /// restart asks again).
    pub stopping: &'a AtomicBool,
}

/// The VM in doubt and the swap it waits on.
pub struct InDoubt {
    pub vm: Arc<ReferenceVm>,
    pub epoch: u64,
    pub session: u64,
    /// The source agent's address.
    pub from: String,
    /// Leave it paused once owned (`--paused` migration).
    pub start_paused: bool,
    /// The image this agent made for it, removed on discard.
    pub image: Option<HostedDisk>,
}

/// Asks until decided (or the agent stops). The VM must be registered as
/// [`VmState::InDoubt`] and paused.
pub fn resolve(services: &Services<'_>, doubt: InDoubt) {
    let name = doubt.vm.spec().name.clone();
    warn!(vm = %name, from = %doubt.from, epoch = doubt.epoch, session = format_args!("{:#018x}", doubt.session),
        "VM IN DOUBT: prepared here, the source's decision did not arrive; kept paused, asking the source agent");
    let mut swap = DestinationSwap::recovered_prepared(ASK_INTERVAL, Instant::now());
    let mut inputs = vec![DestinationInput::Tick];
    let mut asked = 0u64;
    loop {
        while let Some(input) = inputs.pop() {
            for action in swap.step(input, Instant::now()) {
                match action {
                    DestinationAction::AskOutcome => {
                        asked += 1;
                        let answer =
                            ask(services.key, &doubt.from, &name, doubt.epoch, doubt.session);
                        match &answer {
                            Ok(outcome) => info!(vm = %name, ?outcome, "the source agent answered"),
                            // Say it now and then, not at every try.
                            Err(reason) if asked == 1 || asked.is_multiple_of(20) => {
                                warn!(vm = %name, from = %doubt.from, %reason, asked, "cannot reach the source agent; the VM stays paused and in doubt");
                            }
                            Err(_) => {}
                        }
                        inputs.push(match answer {
                            Ok(outcome) => DestinationInput::Outcome(outcome),
                            Err(reason) => DestinationInput::OutcomeUnknown(reason),
                        });
                    }
                    DestinationAction::JournalOwned => {
                        if let Err(err) =
                            services.ownership.owned(&name, doubt.epoch, doubt.session)
                        {
                            warn!(vm = %name, error = %error_chain(&err), "recording ownership failed; the source's journal holds the commit");
                        }
                    }
                    DestinationAction::ResumeGuest => {
                        services.registry.set_state(&name, VmState::Running);
                        if !doubt.start_paused {
                            if let Err(err) = doubt.vm.resume() {
                                error!(vm = %name, error = %error_chain(&err), "resuming the VM failed");
                            }
                        }
                        info!(vm = %name, epoch = doubt.epoch, paused = doubt.start_paused, "the source committed: the VM is ours");
                        // The source only knows it handed the VM over; tell it we have it.
                        if let Err(reason) = tell_released(
                            services.key,
                            &doubt.from,
                            &name,
                            doubt.epoch,
                            doubt.session,
                        ) {
                            info!(vm = %name, from = %doubt.from, %reason, "could not tell the source agent the VM is ours (it keeps showing the hand-over as unconfirmed)");
                        }
                    }
                    DestinationAction::Discard => {
                        services
                            .ownership
                            .discarded(&name, doubt.epoch, doubt.session);
                        if let Some(vm) = services.registry.remove(&name) {
                            vm.shutdown();
                        }
                        remove_vm_files(&doubt.vm);
                        if let Some(image) = &doubt.image {
                            services.disks.remove(image, "the source kept the VM");
                        }
                        info!(vm = %name, "the source aborted the swap: the incoming copy is discarded");
                    }
                    // Nothing to send on a control channel that is gone.
                    DestinationAction::SendResumed
                    | DestinationAction::SendPrepared
                    | DestinationAction::SendNotInLockStep
                    | DestinationAction::SendAbort(_)
                    | DestinationAction::JournalPrepared => {}
                }
            }
        }
        match swap.outcome() {
            Some(DestinationOutcome::Owned | DestinationOutcome::Discarded(_)) => return,
            None => {}
        }
        if services.stopping.load(Ordering::SeqCst) {
            warn!(vm = %name, "agent stopping with the VM in doubt; a restart asks again");
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
        inputs.push(DestinationInput::Tick);
    }
}

/// Tells the source's agent the hand-over is confirmed (best effort: nothing depends on it
/// but the source's bookkeeping).
fn tell_released(
    key: &ClusterKey,
    from: &str,
    vm: &str,
    epoch: u64,
    session: u64,
) -> Result<(), String> {
    let mut stream = connect(from, key).map_err(|e| error_chain(&e))?;
    let released = Opening::Released(OutcomeQuestion {
        vm: vm.to_string(),
        epoch,
        session,
    });
    write_message(&mut stream, &released).map_err(|e| error_chain(&e))
}

/// One question to the source's agent, on a fresh authenticated connection.
fn ask(
    key: &ClusterKey,
    from: &str,
    vm: &str,
    epoch: u64,
    session: u64,
) -> Result<SwapOutcome, String> {
    let mut stream = connect(from, key).map_err(|e| error_chain(&e))?;
    stream
        .set_read_timeout(Some(DATA_STREAMS_TIMEOUT))
        .map_err(|e| e.to_string())?;
    let question = Opening::Outcome(OutcomeQuestion {
        vm: vm.to_string(),
        epoch,
        session,
    });
    write_message(&mut stream, &question).map_err(|e| error_chain(&e))?;
    read_message::<SwapOutcome>(&mut stream, PEER_MESSAGE_LEN_MAX).map_err(|e| {
        if matches!(&e, ferry_dataplane::wire::WireError::Io { source, .. } if source.kind() == io::ErrorKind::WouldBlock)
        {
            "no answer in time".to_string()
        } else {
            error_chain(&e)
        }
    })
}
