//! Destination side: accept a `MigrateIn`, create the incoming VM (and the image of its
//! disk), gather the data streams (routed here by session), and hand everything to
//! `migrate_in`.

use std::collections::HashMap;
use std::io;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use ferry_dataplane::disk::VirtualDisk;
use ferry_dataplane::engine::destination::{migrate_in, DestinationContext};
use ferry_dataplane::engine::EngineError;
use ferry_dataplane::guest::reference::ReferenceVm;
use ferry_dataplane::guest::{Guest, GuestError};
use ferry_dataplane::memory::GuestMemory;
use ferry_dataplane::numa::{self, ThreadRole};
use ferry_dataplane::transport::rdma::session::{IncomingRdma, IncomingTransports};
use ferry_dataplane::transport::rdma::RdmaError;
use ferry_dataplane::transport::tcp::TcpDestination;
use ferry_dataplane::transport::tcp_disk::TcpDiskDestination;
use ferry_dataplane::transport::{DestinationTransport, DiskDestination};
use ferry_dataplane::wire::{read_message, write_message};
use tracing::{error, info, warn};

use super::resolve::{resolve, InDoubt, Services};
use super::{DATA_STREAMS_TIMEOUT, POLL_INTERVAL};
use crate::api::VmState;
use crate::auth::SessionAuth;
use crate::disks::{DiskStore, HostedDisk};
use crate::error_chain;
use crate::ownership::{IncomingSwap, Ownership};
use crate::peer::{
    DataPlaneChoice, DataStream, DataStreamReply, MigrateIn, MigrateInReply, RdmaOffer,
    PEER_MESSAGE_LEN_MAX, STREAMS_MAX,
};
use crate::recovery::Placement;
use crate::registry::{Registry, RegistryError};

/// Data connections that arrived for an incoming session not yet started: session → the
/// channel its acceptor reads them from.
#[derive(Default)]
pub struct PendingSessions {
    sessions: Mutex<HashMap<u64, Sender<(DataStream, TcpStream)>>>,
}

impl PendingSessions {
    pub fn new() -> Self {
        Self::default()
    }

    fn open(&self, session: u64, streams: u32) -> Option<Receiver<(DataStream, TcpStream)>> {
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        if sessions.contains_key(&session) {
            return None;
        }
        let (tx, rx) = bounded(streams as usize);
        sessions.insert(session, tx);
        Some(rx)
    }

    fn close(&self, session: u64) {
        self.sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&session);
    }

    /// Hands a data connection to its session, or refuses it.
    pub fn route(&self, opening: DataStream, mut stream: TcpStream) {
        let sender = self
            .sessions
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&opening.session)
            .cloned();
        let refused = match sender {
            Some(sender) => match sender.try_send((opening, stream)) {
                Ok(()) => return,
                Err(err) => {
                    stream = err.into_inner().1;
                    "the session has all its data streams already"
                }
            },
            None => "no pending migration with that session (timed out, failed or never accepted)",
        };
        warn!(
            session = format_args!("{:#018x}", opening.session),
            index = opening.index,
            reason = refused,
            "data stream refused"
        );
        let _ = write_message(
            &mut stream,
            &DataStreamReply::Refused {
                reason: refused.into(),
            },
        );
    }
}

/// Removes the pending session however the acceptor leaves.
struct SessionGuard<'a> {
    sessions: &'a PendingSessions,
    session: u64,
}

impl Drop for SessionGuard<'_> {
    fn drop(&mut self) {
        self.sessions.close(self.session);
    }
}

/// Discards the incoming VM, and the disk image created for it, unless the migration
/// completed; also when the engine panics.
struct IncomingGuard<'a> {
    registry: &'a Registry,
    disks: &'a DiskStore,
    ownership: &'a Ownership,
    name: String,
    epoch: u64,
    session: u64,
    /// The image this migration created (set once it exists).
    image: Option<HostedDisk>,
    /// The VM's persistent files (memory, registers), once created.
    files: Option<PathBuf>,
    completed: bool,
}

impl Drop for IncomingGuard<'_> {
    fn drop(&mut self) {
        if self.completed {
            return;
        }
        self.ownership
            .discarded(&self.name, self.epoch, self.session);
        if let Some(vm) = self.registry.remove(&self.name) {
            vm.shutdown();
        }
        if let Some(dir) = &self.files {
            if let Err(err) = ReferenceVm::remove_files(dir) {
                warn!(vm = %self.name, dir = %dir.display(), error = %err, "removing the incoming VM's files failed");
            }
        }
        if let Some(image) = &self.image {
            if self.disks.remove(image, "the incoming migration failed") {
                info!(vm = %self.name, path = %image.path.display(), "removed the partial image");
            }
        }
    }
}

/// The incoming VM as the engine sees it: the VM itself, plus a note in the registry once
/// the device state is loaded, so that requests in the last moments of the migration wait
/// for it to settle instead of failing as busy (see [`Registry::incoming_finishing`]).
struct ObservedGuest<'a> {
    vm: &'a ReferenceVm,
    registry: &'a Registry,
    name: &'a str,
    state_loaded: AtomicBool,
}

impl Guest for ObservedGuest<'_> {
    fn memory(&self) -> &Arc<GuestMemory> {
        self.vm.memory()
    }

    fn disks(&self) -> &[Arc<VirtualDisk>] {
        self.vm.disks()
    }

    fn quiesce(&self) -> Result<(), GuestError> {
        self.vm.quiesce()
    }

    fn resume(&self) -> Result<(), GuestError> {
        self.vm.resume()
    }

    fn save_state(&self) -> Result<Vec<u8>, GuestError> {
        self.vm.save_state()
    }

    fn load_state(&self, blob: &[u8]) -> Result<(), GuestError> {
        self.vm.load_state(blob)?;
        self.state_loaded.store(true, Ordering::SeqCst);
        self.registry.mark_state_loaded(self.name);
        Ok(())
    }

    fn set_throttle(&self, percent: u8) {
        self.vm.set_throttle(percent)
    }
}

/// Serves a `MigrateIn` on `control` (called on that connection's thread) until the
/// migration completes or fails.
pub fn accept_incoming(
    services: &Services<'_>,
    sessions: &PendingSessions,
    memory_dir: &Path,
    mut control: TcpStream,
    control_auth: SessionAuth,
    request: MigrateIn,
) {
    let Services {
        registry,
        disks,
        ownership,
        stopping: shutting_down,
        ..
    } = *services;
    let connections = request.data_connections();
    let MigrateIn {
        session,
        spec,
        streams,
        direct_io,
        start_paused,
        rdma,
        epoch: source_epoch,
        source_port,
    } = request;
    let epoch = source_epoch.saturating_add(1);
    let name = spec.name.clone();
    let refuse = |control: &mut TcpStream, reason: String| {
        warn!(vm = %name, session = format_args!("{session:#018x}"), %reason, "incoming migration refused");
        let _ = write_message(control, &MigrateInReply::Refused { reason });
    };
    if shutting_down.load(Ordering::SeqCst) {
        return refuse(
            &mut control,
            "the destination agent is shutting down".into(),
        );
    }
    if !(1..=STREAMS_MAX).contains(&streams) {
        return refuse(
            &mut control,
            format!("streams must be 1..={STREAMS_MAX}, not {streams}"),
        );
    }
    if let Err(err) = spec.validate() {
        return refuse(&mut control, error_chain(&err));
    }
    // The image this agent creates for the VM's disk, named after the VM: reserved now,
    // the agent's once created (a leftover found there is not).
    let hosted = match spec.disk {
        Some(_) => match disks.image_path(&name) {
            Ok(path) => Some(HostedDisk {
                path,
                agent_owned: false,
            }),
            Err(err) => return refuse(&mut control, error_chain(&err)),
        },
        None => None,
    };
    let cancel = match registry.reserve(&spec, VmState::Incoming, hosted) {
        Ok(cancel) => cancel,
        Err(RegistryError::AlreadyExists { .. }) => {
            return refuse(
                &mut control,
                format!("a VM named {name:?} already exists there"),
            )
        }
        Err(err) => return refuse(&mut control, err.to_string()),
    };
    // Where an in-doubt destination asks for the outcome: the source agent's listener at
    // the address this connection came from.
    let from = match control.peer_addr() {
        Ok(peer) => std::net::SocketAddr::new(peer.ip(), source_port).to_string(),
        Err(err) => {
            registry.remove(&name);
            return refuse(&mut control, format!("reading the source's address: {err}"));
        }
    };
    if let Err(err) = ownership.incoming_started(&name, epoch, session, &from) {
        registry.remove(&name);
        return refuse(&mut control, error_chain(&err));
    }
    let mut guard = IncomingGuard {
        registry,
        disks,
        ownership,
        name: name.clone(),
        epoch,
        session,
        image: None,
        files: None,
        completed: false,
    };
    // A fresh image: it reads as zero, so the bulk copy's zero chunks need no write. A
    // leftover file is refused (never overwritten); no room, or O_DIRECT refused under
    // `required`, is refused with its reason, and the source keeps running the VM.
    let disk = match &spec.disk {
        Some(disk) => match disks.create(&name, disk.bytes, direct_io) {
            Ok(image) => {
                registry.claim_disk(&name);
                guard.image = Some(HostedDisk {
                    path: image.path().to_path_buf(),
                    agent_owned: true,
                });
                Some(Arc::new(VirtualDisk::new(image)))
            }
            Err(err) => return refuse(&mut control, error_chain(&err)),
        },
        None => None,
    };
    let files = memory_dir.join(&name);
    guard.files = Some(files.clone());
    let vm = match ReferenceVm::incoming_persistent(spec, disk, &files) {
        Ok(vm) => Arc::new(vm),
        Err(err) => {
            return refuse(
                &mut control,
                format!("creating the incoming VM failed: {}", error_chain(&err)),
            )
        }
    };
    registry.attach(&name, Arc::clone(&vm));
    if let Err(err) = Placement::new(guard.image.as_ref(), direct_io).save(&files) {
        return refuse(
            &mut control,
            format!("writing the incoming VM's placement failed: {err}"),
        );
    }
    let Some(arrivals) = sessions.open(session, connections) else {
        return refuse(
            &mut control,
            format!("session {session:#018x} is already in use"),
        );
    };
    let session_guard = SessionGuard { sessions, session };
    // RDMA, when the source asked: listen on the address it reached us at, with guest
    // memory registered for its writes, and accept its lanes while the TCP streams arrive.
    let (offer, listening) = if rdma {
        let ip = control.local_addr().map(|a| a.ip());
        match ip.map_err(|e| e.to_string()).and_then(|ip| {
            IncomingRdma::listen(ip, Arc::clone(vm.memory())).map_err(|e| error_chain(&e))
        }) {
            Ok(listening) => (
                RdmaOffer::Listening {
                    port: listening.port(),
                    device: listening.device().to_string(),
                },
                Some(listening),
            ),
            Err(reason) => {
                info!(vm = %name, %reason, "RDMA asked for but unavailable here; offering TCP");
                (RdmaOffer::Unavailable { reason }, None)
            }
        }
    } else {
        (RdmaOffer::NotAsked, None)
    };
    if let Err(err) = write_message(
        &mut control,
        &MigrateInReply::Accepted {
            prefault_ms: vm.prefault_ms(),
            rdma: offer,
        },
    ) {
        warn!(vm = %name, error = %error_chain(&err), "the source agent went away before the data streams");
        return;
    }
    info!(vm = %name, session = format_args!("{session:#018x}"), streams, connections,
        disk = ?guard.image.as_ref().map(|d| &d.path), start_paused,
        prefault_ms = vm.prefault_ms(), "incoming migration accepted");

    // Fault injection (a no-op unless built for it): accepted, no data stream yet.
    if let Some(action) = ferry_dataplane::failpoint::hit("dest-prepare") {
        if action == ferry_dataplane::failpoint::Action::Corrupt {
            ferry_dataplane::failpoint::corrupt_next_control_message();
        } else {
            warn!(vm = %name, "failpoint dest-prepare: abandoning the incoming migration");
            return;
        }
    }
    let has_disk = connections > streams;
    let stop_lanes = Arc::new(AtomicBool::new(false));
    let lanes = listening.map(|listening| {
        let stop = Arc::clone(&stop_lanes);
        numa::spawn(
            ThreadRole::Transport,
            "ferry-rdma-accept",
            move || -> Result<IncomingTransports, RdmaError> {
                listening.accept(
                    session,
                    streams as usize,
                    has_disk,
                    &control_auth,
                    Instant::now() + DATA_STREAMS_TIMEOUT,
                    &stop,
                )
            },
        )
        .expect("spawning the RDMA lane acceptor")
    });
    let stop_accepting = |lanes: Option<std::thread::JoinHandle<_>>| {
        stop_lanes.store(true, Ordering::SeqCst);
        if let Some(h) = lanes {
            let _ = h.join();
        }
    };
    let mut data = match gather_streams(&control, &arrivals, connections, &cancel) {
        Ok(data) => data,
        Err(reason) => {
            stop_accepting(lanes);
            warn!(vm = %name, %reason, "incoming migration abandoned before the transfer");
            return;
        }
    };
    drop(session_guard);
    let choice = read_choice(&mut control);
    let rdma_transports = match (choice, lanes) {
        (Ok(DataPlaneChoice::Rdma), Some(lanes)) => match lanes.join() {
            Ok(Ok(transports)) => Some(transports),
            Ok(Err(err)) => {
                warn!(vm = %name, error = %error_chain(&err), "incoming migration: RDMA lanes failed");
                return;
            }
            Err(_) => {
                error!(vm = %name, "incoming migration: the RDMA accept thread panicked");
                return;
            }
        },
        (Ok(DataPlaneChoice::Rdma), None) => {
            warn!(vm = %name, "the source chose RDMA, which this agent did not offer");
            return;
        }
        (Ok(DataPlaneChoice::Tcp), lanes) => {
            stop_accepting(lanes);
            None
        }
        (Err(reason), lanes) => {
            stop_accepting(lanes);
            warn!(vm = %name, %reason, "incoming migration abandoned before the transfer");
            return;
        }
    };
    if let Some(t) = &rdma_transports {
        info!(vm = %name, device = %t.device, "data plane: RDMA");
    }
    // Memory streams first, then the disk's bulk and mirror lanes.
    let lanes = data.split_off(streams as usize);
    let (transport, disk_transport) = if let Some(t) = rdma_transports {
        (
            Box::new(t.memory) as Box<dyn DestinationTransport>,
            t.disk.map(|d| Box::new(d) as Box<dyn DiskDestination>),
        )
    } else {
        let disk_transport = match <[TcpStream; 2]>::try_from(lanes) {
            Ok([bulk, mirror]) => match TcpDiskDestination::new(bulk, mirror, streams as usize) {
                Ok(link) => Some(Box::new(link) as Box<dyn DiskDestination>),
                Err(err) => {
                    warn!(vm = %name, error = %error_chain(&err), "incoming migration: disk link setup failed");
                    return;
                }
            },
            Err(lanes) => {
                debug_assert!(lanes.is_empty(), "a disk adds exactly two connections");
                None
            }
        };
        let transport = match TcpDestination::new(data) {
            Ok(transport) => Box::new(transport) as Box<dyn DestinationTransport>,
            Err(err) => {
                warn!(vm = %name, error = %error_chain(&err), "incoming migration: transport setup failed");
                return;
            }
        };
        (transport, disk_transport)
    };
    let guest = ObservedGuest {
        vm: vm.as_ref(),
        registry,
        name: &name,
        state_loaded: AtomicBool::new(false),
    };
    let journal = IncomingSwap {
        ownership,
        vm: name.clone(),
        epoch,
        session,
        from: from.clone(),
    };
    let ctx = DestinationContext {
        journal: &journal,
        guest: &guest,
        control,
        transport,
        disk_transport,
        fresh_disks: true,
        start_paused,
        cancel: &cancel,
    };
    let result = migrate_in(ctx);
    match result {
        Ok(report) => {
            registry.set_state(&name, VmState::Running);
            guard.completed = true;
            info!(vm = %name, pages_received = report.pages_received, rounds = report.rounds,
                paused = start_paused, "incoming migration completed; VM hosted here");
        }
        // Prepared and undecided: keep the paused VM and ask the source's agent (never
        // resumed before it learns of the commit, never discarded before it learns of the
        // abort).
        Err(EngineError::InDoubt { .. }) => {
            registry.set_state(&name, VmState::InDoubt);
            guard.completed = true;
            resolve(
                services,
                InDoubt {
                    vm: Arc::clone(&vm),
                    epoch,
                    session,
                    from,
                    start_paused,
                    image: guard.image.clone(),
                },
            );
        }
        // The engine resumes the guest only after the source's Commit; an error after that
        // (telling the source `Resumed` failed) must not discard the only running copy.
        Err(err) if vm.status().running => {
            registry.set_state(&name, VmState::Running);
            guard.completed = true;
            error!(vm = %name, error = %error_chain(&err),
                "incoming migration reported an error after the VM was resumed here; keeping it (the source committed)");
        }
        Err(err) => {
            warn!(vm = %name, error = %error_chain(&err), "incoming migration failed; discarding the incoming VM");
        }
    }
}

/// The source's [`DataPlaneChoice`], sent once its streams (and lanes) are up.
fn read_choice(control: &mut TcpStream) -> Result<DataPlaneChoice, String> {
    control
        .set_read_timeout(Some(DATA_STREAMS_TIMEOUT))
        .map_err(|e| format!("setting a timeout: {e}"))?;
    let choice = read_message(control, PEER_MESSAGE_LEN_MAX)
        .map_err(|e| format!("waiting for the data plane choice: {}", error_chain(&e)));
    control
        .set_read_timeout(None)
        .map_err(|e| format!("clearing a timeout: {e}"))?;
    choice
}

/// Waits for every data stream of the session, answering each, in index order.
fn gather_streams(
    control: &TcpStream,
    arrivals: &Receiver<(DataStream, TcpStream)>,
    streams: u32,
    cancel: &AtomicBool,
) -> Result<Vec<TcpStream>, String> {
    let deadline = Instant::now() + DATA_STREAMS_TIMEOUT;
    let mut slots: Vec<Option<TcpStream>> = (0..streams).map(|_| None).collect();
    let mut attached = 0;
    while attached < streams {
        if cancel.load(Ordering::SeqCst) {
            return Err("cancelled".into());
        }
        if peer_closed(control) {
            return Err("the source agent closed the control connection".into());
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(format!(
                "only {attached} of {streams} data streams arrived within {} s",
                DATA_STREAMS_TIMEOUT.as_secs()
            ));
        }
        let (opening, mut stream) = match arrivals.recv_timeout(POLL_INTERVAL.min(deadline - now)) {
            Ok(arrival) => arrival,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => return Err("the session was closed".into()),
        };
        let slot = slots.get_mut(opening.index as usize);
        let reason = match slot {
            Some(slot @ None) => {
                write_message(&mut stream, &DataStreamReply::Attached).map_err(|e| {
                    format!(
                        "answering data stream {}: {}",
                        opening.index,
                        error_chain(&e)
                    )
                })?;
                *slot = Some(stream);
                attached += 1;
                continue;
            }
            Some(Some(_)) => format!("data stream {} arrived twice", opening.index),
            None => format!(
                "data stream index {} is outside 0..{streams}",
                opening.index
            ),
        };
        let _ = write_message(
            &mut stream,
            &DataStreamReply::Refused {
                reason: reason.clone(),
            },
        );
        return Err(reason);
    }
    Ok(slots
        .into_iter()
        .map(|s| s.expect("every slot is filled"))
        .collect())
}

/// True when the peer has closed (or reset) `stream`; never consumes data.
fn peer_closed(stream: &TcpStream) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return false;
    }
    let mut byte = [0u8; 1];
    let closed = match stream.peek(&mut byte) {
        Ok(0) => true,
        Ok(_) => false,
        Err(err) => !matches!(
            err.kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    };
    let _ = stream.set_nonblocking(false);
    closed
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ferry_dataplane::wire::read_message;

    use super::*;
    use crate::migration::tcp_pair as pair;
    use crate::peer::PEER_MESSAGE_LEN_MAX;

    #[test]
    fn peer_closed_sees_eof_but_not_pending_data() {
        let (mut a, b) = pair();
        assert!(!peer_closed(&b));
        io::Write::write_all(&mut a, b"x").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(!peer_closed(&b));
        drop(a);
        std::thread::sleep(Duration::from_millis(20));
        // Pending data is still readable, so the connection does not look closed yet.
        assert!(!peer_closed(&b));
        let (_a2, b2) = pair();
        drop(_a2);
        std::thread::sleep(Duration::from_millis(20));
        assert!(peer_closed(&b2));
    }

    #[test]
    fn data_streams_are_attached_in_index_order_and_unknown_sessions_refused() {
        let sessions = PendingSessions::new();
        let arrivals = sessions.open(7, 2).unwrap();
        assert!(
            sessions.open(7, 2).is_none(),
            "a session number is used once"
        );
        let (control_src, control_dst) = pair();
        let (mut s1, d1) = pair();
        let (mut s0, d0) = pair();
        sessions.route(
            DataStream {
                session: 7,
                index: 1,
            },
            d1,
        );
        sessions.route(
            DataStream {
                session: 7,
                index: 0,
            },
            d0,
        );
        let (mut stray, stray_dst) = pair();
        sessions.route(
            DataStream {
                session: 8,
                index: 0,
            },
            stray_dst,
        );
        assert!(matches!(
            read_message::<DataStreamReply>(&mut stray, PEER_MESSAGE_LEN_MAX).unwrap(),
            DataStreamReply::Refused { .. }
        ));

        let cancel = AtomicBool::new(false);
        let data = gather_streams(&control_dst, &arrivals, 2, &cancel).unwrap();
        for s in [&mut s0, &mut s1] {
            assert_eq!(
                read_message::<DataStreamReply>(s, PEER_MESSAGE_LEN_MAX).unwrap(),
                DataStreamReply::Attached
            );
        }
        // Index 0 first: its peer is s0.
        assert_eq!(data[0].peer_addr().unwrap(), s0.local_addr().unwrap());
        assert_eq!(data[1].peer_addr().unwrap(), s1.local_addr().unwrap());
        sessions.close(7);
        drop(control_src);
    }

    #[test]
    fn gathering_stops_when_the_source_goes_away() {
        let sessions = PendingSessions::new();
        let arrivals = sessions.open(9, 1).unwrap();
        let (control_src, control_dst) = pair();
        drop(control_src);
        let cancel = AtomicBool::new(false);
        let started = Instant::now();
        let err = gather_streams(&control_dst, &arrivals, 1, &cancel).unwrap_err();
        assert!(err.contains("closed the control connection"), "{err}");
        assert!(started.elapsed() < Duration::from_secs(2));
    }
}
