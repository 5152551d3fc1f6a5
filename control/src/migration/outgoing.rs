//! Source side: connect to the destination agent, hand the sockets to `migrate_out`, and
//! settle the registry (and the VM's disk image) with the outcome.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
use ferry_dataplane::engine::source::{migrate_out, SourceContext};
use ferry_dataplane::engine::{
    EngineError, MigrationParams, MigrationReport, Phase, Progress, RdmaReport, TransportChoice,
};
use ferry_dataplane::guest::reference::ReferenceVm;
use ferry_dataplane::guest::Guest;
use ferry_dataplane::memory::tracker::{FullTracker, UffdWpTracker};
use ferry_dataplane::memory::{DirtyTracker, GuestMemory, TrackerError};
use ferry_dataplane::transport::rdma::link::device_for;
use ferry_dataplane::transport::rdma::memory::RdmaCounters;
use ferry_dataplane::transport::rdma::session::{connect_outgoing, OutgoingTransports};
use ferry_dataplane::transport::tcp::TcpSource;
use ferry_dataplane::transport::tcp_disk::TcpDiskSource;
use ferry_dataplane::transport::{DiskSource, SourceTransport, TransportError};
use ferry_dataplane::wire::{read_message, write_message, WireError};
use tracing::{error, info, warn};

use super::{
    ACCEPT_TIMEOUT_BASE, ACCEPT_TIMEOUT_PER_GIB, CONNECT_TIMEOUT, DATA_STREAMS_TIMEOUT,
    FINAL_SEND_TIMEOUT, POLL_INTERVAL, PROGRESS_INTERVAL,
};
use crate::api::{ErrorKind, Response, VmState};
use crate::auth::{authenticate_client, AuthError, ClusterKey, SessionAuth};
use crate::disks::DiskStore;
use crate::error_chain;
use crate::journal::JournalError;
use crate::ownership::{OutgoingEnd, OutgoingSwap, Ownership};
use crate::peer::{
    new_session_id, DataPlaneChoice, DataStream, DataStreamReply, MigrateIn, MigrateInReply,
    Opening, RdmaOffer, PEER_MESSAGE_LEN_MAX,
};
use crate::registry::{Outgoing, Registry};

#[derive(Debug, thiserror::Error)]
pub enum OutgoingError {
    #[error("cannot reach the destination agent at {to}")]
    Connect { to: String, source: io::Error },
    #[error("authentication with the destination agent at {to} failed")]
    Auth { to: String, source: AuthError },
    #[error("handshake with the destination agent at {to} failed while {step}")]
    Handshake {
        to: String,
        step: &'static str,
        source: WireError,
    },
    #[error("the destination agent at {to} refused the migration: {reason}")]
    Refused { to: String, reason: String },
    #[error("the destination agent at {to} refused data stream {index}: {reason}")]
    StreamRefused {
        to: String,
        index: u32,
        reason: String,
    },
    #[error("socket setup failed while {op}")]
    Socket { op: &'static str, source: io::Error },
    #[error("cancelled before the transfer started")]
    Cancelled,
    #[error("dirty tracking could not be set up")]
    Tracker(#[source] TrackerError),
    #[error("the TCP transport could not be set up")]
    Transport(#[source] TransportError),
    #[error("migration engine failed")]
    Engine(#[source] EngineError),
    #[error("the migration engine panicked: {message}")]
    EnginePanicked { message: String },
    #[error("--transport rdma: {reason}")]
    Rdma { reason: String },
    #[error("the ownership journal could not record the migration")]
    Journal(#[source] JournalError),
}

/// Removes a discarded VM's persistent files (its memory); its disk image is the caller's.
pub(crate) fn remove_vm_files(vm: &ReferenceVm) {
    if let Some(dir) = vm.files_dir() {
        if let Err(err) = ReferenceVm::remove_files(dir) {
            warn!(vm = %vm.spec().name, dir = %dir.display(), error = %err, "removing the VM's files failed");
        }
    }
}

/// An outgoing migration as the `Migrate` request asked for it.
#[derive(Clone, Debug)]
pub struct OutgoingRequest {
    pub to: String,
    pub params: MigrationParams,
    /// When the agent received the request: the report's `total_ms` counts from here.
    pub started: Instant,
    /// The cluster key: every connection to the destination authenticates with it.
    pub key: Arc<ClusterKey>,
    /// This agent's listening port, for a destination in doubt to ask the outcome at.
    pub source_port: u16,
}

/// Runs one outgoing migration to its end (called on the migration's own thread) and
/// updates the registry with the outcome. `events` gets progress and one final response;
/// nobody listening changes nothing.
pub fn run_outgoing(
    registry: &Registry,
    disks: &DiskStore,
    ownership: &Ownership,
    outgoing: Outgoing,
    request: OutgoingRequest,
    events: Sender<Response>,
) {
    let Outgoing { vm, cancel, disk } = outgoing;
    let name = vm.spec().name.clone();
    let to = request.to.clone();
    let _ = events.try_send(Response::Progress(Progress {
        phase: Some(Phase::Prepare),
        elapsed_ms: request.started.elapsed().as_millis() as u64,
        ..Progress::default()
    }));
    let session = new_session_id();
    let result = match ownership.outgoing_started(&name, session, &to) {
        Ok(epoch) => {
            let swap = OutgoingSwap {
                ownership,
                vm: name.clone(),
                session,
                to: to.clone(),
            };
            migrate(&vm, &cancel, &request, &events, session, epoch, &swap)
        }
        Err(err) => Err(OutgoingError::Journal(err)),
    };
    // Whatever the engine said, the journal is the truth about the commit point.
    let committed = ownership.committed(session);
    let result = match result {
        Err(OutgoingError::EnginePanicked { message }) if committed => {
            Err(OutgoingError::Engine(EngineError::LostAfterCommit {
                reason: format!("the engine panicked after the commit: {message}"),
            }))
        }
        other => other,
    };
    let end = match &result {
        Ok(_) => OutgoingEnd::Released,
        Err(OutgoingError::Engine(EngineError::LostAfterCommit { .. })) => OutgoingEnd::Unconfirmed,
        Err(_) => OutgoingEnd::FailedBack,
    };
    ownership.outgoing_finished(&name, session, end);
    let answer = match result {
        Ok(report) => {
            // The VM runs on the destination; this copy stays quiesced and is discarded,
            // with its image unless asked to keep it (a user's path is never deleted).
            // Its files are unlinked now (an incoming migration of the same VM may create
            // them again right away); its memory is freed when `vm` goes out of scope, after
            // the answer is sent: unmapping gigabytes takes tens of milliseconds per GiB
            // that the user should not wait for.
            registry.remove(&name);
            vm.shutdown();
            remove_vm_files(&vm);
            match &disk {
                Some(disk) if request.params.keep_source_disks => {
                    info!(vm = %name, path = %disk.path.display(), "source disk image kept (--keep-source-disks)");
                }
                Some(disk) => {
                    disks.remove(disk, "the VM was handed over");
                }
                None => {}
            }
            info!(
                vm = %name, %to, total_ms = report.total_ms, downtime_ms = report.downtime_ms,
                bytes_sent = report.bytes_sent, rounds = report.rounds, disk_copy_ms = report.disk_copy_ms,
                "migration completed; VM handed over"
            );
            Response::Migrated(Box::new(report))
        }
        Err(OutgoingError::Engine(err @ EngineError::LostAfterCommit { .. })) => {
            // Past the commit point the source must never run the VM again, whatever the
            // destination did: drop it here, and say so loudly. Its disk image is kept: it
            // may be the only complete copy left.
            registry.remove(&name);
            vm.shutdown();
            remove_vm_files(&vm);
            let chain = error_chain(&err);
            let kept = disk
                .as_ref()
                .map(|d| format!("; its disk image is kept at {}", d.path.display()))
                .unwrap_or_default();
            error!(vm = %name, %to, error = %chain, disk = ?disk.as_ref().map(|d| &d.path),
                "VM HANDED OVER BUT NOT CONFIRMED: the source has discarded its copy (not its disk image); check the destination agent");
            Response::error(
                ErrorKind::MigrationFailed,
                format!("migration of {name:?} to {to} passed the commit point but the destination did not confirm ({chain}); the source no longer runs it{kept}: check the destination"),
            )
        }
        Err(err @ OutgoingError::EnginePanicked { .. }) => {
            // Where the engine stopped is unknown: keep the VM here but do not resume it.
            registry.set_state(&name, VmState::Running);
            error!(vm = %name, %to, error = %err, "migration engine panicked; VM kept on the source, not resumed");
            Response::error(
                ErrorKind::MigrationFailed,
                format!("migration of {name:?} to {to} failed: {err}; the VM is kept on this agent but may be paused"),
            )
        }
        Err(err) => {
            // Before the commit point: the VM never left (the engine resumed it if it had
            // quiesced it).
            registry.set_state(&name, VmState::Running);
            let chain = error_chain(&err);
            warn!(vm = %name, %to, error = %chain, "migration failed; VM keeps running on the source");
            Response::error(
                ErrorKind::MigrationFailed,
                format!("migration of {name:?} to {to} failed: {chain}; the VM keeps running on the source"),
            )
        }
    };
    let _ = events.send_timeout(answer, FINAL_SEND_TIMEOUT);
    // A handed-over VM's memory is freed here, after the answer (see above).
    drop(vm);
}

/// The sockets of a migration once the destination accepted it.
struct Connected {
    control: TcpStream,
    /// The memory streams.
    data: Vec<TcpStream>,
    /// The disk's bulk and mirror lanes, when the VM has a disk.
    disk_lanes: Option<(TcpStream, TcpStream)>,
    /// The RDMA lanes, when they carry the data instead of the TCP streams.
    rdma: Option<OutgoingTransports>,
    /// Which transport and why.
    transport_note: String,
    prefault_ms: f64,
}

fn migrate(
    vm: &Arc<ReferenceVm>,
    cancel: &AtomicBool,
    request: &OutgoingRequest,
    events: &Sender<Response>,
    session: u64,
    epoch: u64,
    journal: &OutgoingSwap<'_>,
) -> Result<MigrationReport, OutgoingError> {
    let to = request.to.as_str();
    let (params, streams_reason) = super::streams::resolve(&request.params, to);
    let request = &OutgoingRequest {
        params,
        ..request.clone()
    };
    let streams = request.params.streams as u32;
    let has_disk = vm.disk().is_some();
    info!(vm = %vm.spec().name, %to, session = format_args!("{session:#018x}"), streams, has_disk, "starting outgoing migration");

    let mut tracker = make_tracker(vm.memory())?;
    let connected = handshake(vm, to, session, epoch, request, cancel)?;
    let Connected {
        control,
        data,
        disk_lanes,
        rdma,
        transport_note,
        prefault_ms,
    } = connected;
    info!(vm = %vm.spec().name, transport = %transport_note, "data plane chosen");
    // Fault injection (a no-op unless built for it): connected, the engine not started.
    match ferry_dataplane::failpoint::hit("source-prepare") {
        Some(ferry_dataplane::failpoint::Action::Corrupt) => {
            ferry_dataplane::failpoint::corrupt_next_control_message()
        }
        Some(_) => {
            return Err(OutgoingError::Engine(EngineError::Protocol {
                reason: "failpoint source-prepare".into(),
            }))
        }
        None => {}
    }

    let mut rdma_report = None;
    // Kept to report how the pages were sent (zero-copy or plain) once the engine is done.
    let mut tcp_source: Option<Arc<TcpSource>> = None;
    let (transport, disk_link): (Arc<dyn SourceTransport>, Option<Arc<dyn DiskSource>>) = match rdma
    {
        Some(rdma) => {
            rdma_report = Some((
                rdma.device.clone(),
                rdma.counters.clone(),
                rdma.disk_counters.clone(),
            ));
            (
                Arc::new(rdma.memory),
                rdma.disk.map(|d| Arc::new(d) as Arc<dyn DiskSource>),
            )
        }
        None => {
            let tcp = Arc::new(
                TcpSource::with_send_mode(data, request.params.send_mode)
                    .map_err(OutgoingError::Transport)?,
            );
            tcp_source = Some(Arc::clone(&tcp));
            let transport: Arc<dyn SourceTransport> = tcp;
            let disk_link = match disk_lanes {
                Some((bulk, mirror)) => {
                    let sizes = vm.disks().iter().map(|d| d.size()).collect();
                    let link = TcpDiskSource::new(bulk, mirror, sizes, streams as usize)
                        .map_err(OutgoingError::Transport)?;
                    Some(Arc::new(link) as Arc<dyn DiskSource>)
                }
                None => None,
            };
            (transport, disk_link)
        }
    };
    let mut throttle = ProgressThrottle::new(PROGRESS_INTERVAL);
    let mut on_progress = |progress: &Progress| {
        if throttle.admit(progress, Instant::now()) {
            let _ = events.try_send(Response::Progress(progress.clone()));
        }
    };
    let ctx = SourceContext {
        guest: vm.as_ref(),
        tracker: tracker.as_mut(),
        disk_link,
        control,
        transport,
        params: &request.params,
        started: request.started,
        prefault_ms,
        cancel,
        journal,
    };
    match catch_unwind(AssertUnwindSafe(|| migrate_out(ctx, &mut on_progress))) {
        Ok(result) => result.map_err(OutgoingError::Engine).map(|mut report| {
            report.transport_note = transport_note;
            report.streams_reason = streams_reason;
            report.send_path = tcp_source.map(|tcp| tcp.send_path());
            super::streams::remember(to, &report);
            report.rdma = rdma_report.map(|(device, memory, disk)| {
                let load = |c: &Option<Arc<RdmaCounters>>, f: fn(&RdmaCounters) -> &AtomicU64| {
                    c.as_ref().map_or(0, |c| f(c).load(Ordering::Relaxed))
                };
                RdmaReport {
                    device,
                    memory_writes: memory.writes.load(Ordering::Relaxed),
                    memory_write_bytes: memory.write_bytes.load(Ordering::Relaxed),
                    memory_sends: memory.sends.load(Ordering::Relaxed),
                    disk_writes: load(&disk, |c| &c.writes),
                    disk_write_bytes: load(&disk, |c| &c.write_bytes),
                }
            });
            report
        }),
        Err(panic) => Err(OutgoingError::EnginePanicked {
            message: panic_message(&panic),
        }),
    }
}

/// Proposes the migration to the destination agent and, once it accepted, opens the data
/// streams: the memory streams, then (with a disk) the bulk and mirror lanes.
fn handshake(
    vm: &ReferenceVm,
    to: &str,
    session: u64,
    epoch: u64,
    request: &OutgoingRequest,
    cancel: &AtomicBool,
) -> Result<Connected, OutgoingError> {
    let failed = |step| {
        move |source| OutgoingError::Handshake {
            to: to.to_string(),
            step,
            source,
        }
    };
    let streams = request.params.streams as u32;
    let (mut control, control_auth) = connect_authenticated(to, &request.key)?;
    let (local_ip, peer_ip) = match (control.local_addr(), control.peer_addr()) {
        (Ok(local), Ok(peer)) => (local.ip(), peer.ip()),
        (Err(source), _) | (_, Err(source)) => {
            return Err(OutgoingError::Socket {
                op: "reading the control connection's addresses",
                source,
            })
        }
    };
    let choice = request.params.transport;
    let (want_rdma, mut transport_note) = match choice {
        TransportChoice::Tcp => (false, "tcp (--transport tcp)".to_string()),
        TransportChoice::Auto | TransportChoice::Rdma => {
            match device_for(Some(local_ip), peer_ip) {
                Ok(device) => (true, format!("rdma on {device}")),
                Err(e) if choice == TransportChoice::Rdma => {
                    return Err(OutgoingError::Rdma {
                        reason: error_chain(&e),
                    })
                }
                Err(e) => (false, format!("tcp (auto: {})", error_chain(&e))),
            }
        }
    };
    let opening = MigrateIn {
        session,
        spec: vm.spec().clone(),
        streams,
        direct_io: request.params.direct_io,
        start_paused: request.params.start_paused,
        rdma: want_rdma,
        epoch,
        source_port: request.source_port,
    };
    let connections = opening.data_connections();
    write_message(&mut control, &Opening::MigrateIn(opening))
        .map_err(failed("sending MigrateIn"))?;
    let gib = spec_memory_gib(vm.spec().memory_bytes);
    let accept_deadline = Instant::now() + ACCEPT_TIMEOUT_BASE + ACCEPT_TIMEOUT_PER_GIB * gib;
    wait_readable(&control, accept_deadline, cancel, to)?;
    let offer: RdmaOffer;
    set_read_timeout(&control, Some(DATA_STREAMS_TIMEOUT))?;
    let prefault_ms = match read_message(&mut control, PEER_MESSAGE_LEN_MAX)
        .map_err(failed("waiting for the answer to MigrateIn"))?
    {
        MigrateInReply::Accepted { prefault_ms, rdma } => {
            offer = rdma;
            prefault_ms
        }
        MigrateInReply::Refused { reason } => {
            return Err(OutgoingError::Refused {
                to: to.into(),
                reason,
            })
        }
    };
    let mut data = Vec::with_capacity(connections as usize);
    for index in 0..connections {
        if cancel.load(Ordering::SeqCst) {
            return Err(OutgoingError::Cancelled);
        }
        data.push(open_data_stream(to, &request.key, session, index)?);
    }
    if cancel.load(Ordering::SeqCst) {
        return Err(OutgoingError::Cancelled);
    }
    // The engine does its own waiting with deadlines; leftover socket timeouts would turn
    // its blocking reads into spurious errors.
    for stream in std::iter::once(&control).chain(&data) {
        set_read_timeout(stream, None)?;
        stream
            .set_write_timeout(None)
            .map_err(|source| OutgoingError::Socket {
                op: "clearing the write timeout",
                source,
            })?;
    }
    // The TCP streams are open whatever happens next: an RDMA lane that fails to connect
    // falls back to them under `auto`.
    let rdma = match (want_rdma, offer) {
        (false, _) => None,
        (true, RdmaOffer::Listening { port, device }) => {
            let disk_sizes =
                (connections > streams).then(|| vm.disks().iter().map(|d| d.size()).collect());
            match connect_outgoing(
                (local_ip, std::net::SocketAddr::new(peer_ip, port)),
                session,
                streams as usize,
                disk_sizes,
                Arc::clone(vm.memory()),
                &control_auth,
                Instant::now() + DATA_STREAMS_TIMEOUT,
            ) {
                Ok(rdma) => {
                    transport_note =
                        format!("rdma ({} here, {device} at the destination)", rdma.device);
                    Some(rdma)
                }
                Err(e) if choice == TransportChoice::Rdma => {
                    return Err(OutgoingError::Rdma {
                        reason: format!("connecting the RDMA lanes: {}", error_chain(&e)),
                    })
                }
                Err(e) => {
                    warn!(error = %error_chain(&e), "RDMA lanes failed to connect; using TCP");
                    transport_note = format!("tcp (auto: RDMA lanes failed: {})", error_chain(&e));
                    None
                }
            }
        }
        (true, RdmaOffer::Unavailable { reason }) if choice == TransportChoice::Rdma => {
            return Err(OutgoingError::Rdma {
                reason: format!("the destination cannot use RDMA: {reason}"),
            })
        }
        (true, RdmaOffer::Unavailable { reason }) => {
            transport_note = format!("tcp (auto: the destination cannot use RDMA: {reason})");
            None
        }
        (true, RdmaOffer::NotAsked) => {
            transport_note = "tcp (the destination did not answer the RDMA request)".into();
            None
        }
    };
    let chosen = if rdma.is_some() {
        DataPlaneChoice::Rdma
    } else {
        DataPlaneChoice::Tcp
    };
    write_message(&mut control, &chosen).map_err(failed("sending the data plane choice"))?;
    let disk_lanes = if connections > streams {
        let mirror = data.pop().expect("a disk adds two connections");
        let bulk = data.pop().expect("a disk adds two connections");
        Some((bulk, mirror))
    } else {
        None
    };
    debug_assert_eq!(data.len(), streams as usize);
    Ok(Connected {
        control,
        data,
        disk_lanes,
        rdma,
        transport_note,
        prefault_ms,
    })
}

/// Kernel write tracking where the host has it; otherwise every page every round (pre-copy
/// then relies on the round and time bounds to stop).
fn make_tracker(memory: &Arc<GuestMemory>) -> Result<Box<dyn DirtyTracker>, OutgoingError> {
    match UffdWpTracker::new(Arc::clone(memory)) {
        Ok(tracker) => Ok(Box::new(tracker)),
        Err(err @ TrackerError::Unsupported { .. }) => {
            warn!(error = %err, "kernel write tracking unavailable; falling back to sending every page each round");
            Ok(Box::new(FullTracker::new(memory.pages())))
        }
        Err(err) => Err(OutgoingError::Tracker(err)),
    }
}

/// Connects to the destination agent and proves this agent knows the cluster key (and that
/// the destination does) before anything else is sent.
pub(crate) fn connect(to: &str, key: &ClusterKey) -> Result<TcpStream, OutgoingError> {
    connect_authenticated(to, key).map(|(stream, _)| stream)
}

/// [`connect`], also returning the handshake's session key (it authenticates the RDMA lanes
/// of a migration whose control connection this is).
fn connect_authenticated(
    to: &str,
    key: &ClusterKey,
) -> Result<(TcpStream, SessionAuth), OutgoingError> {
    let connect_err = |source| OutgoingError::Connect {
        to: to.to_string(),
        source,
    };
    let addrs: Vec<_> = to.to_socket_addrs().map_err(connect_err)?.collect();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolved to nothing");
    for addr in addrs {
        match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
            Ok(mut stream) => {
                stream
                    .set_nodelay(true)
                    .map_err(|source| OutgoingError::Socket {
                        op: "setting TCP_NODELAY",
                        source,
                    })?;
                let auth =
                    authenticate_client(&mut stream, key, Instant::now() + DATA_STREAMS_TIMEOUT)
                        .map_err(|source| OutgoingError::Auth {
                            to: to.to_string(),
                            source,
                        })?;
                stream
                    .set_write_timeout(Some(DATA_STREAMS_TIMEOUT))
                    .map_err(|source| OutgoingError::Socket {
                        op: "setting a write timeout",
                        source,
                    })?;
                return Ok((stream, auth));
            }
            Err(err) => last = err,
        }
    }
    Err(connect_err(last))
}

/// Whole GiB of guest memory, rounded up.
fn spec_memory_gib(memory_bytes: u64) -> u32 {
    u32::try_from(memory_bytes.div_ceil(1 << 30)).unwrap_or(u32::MAX)
}

/// Waits until `stream` has something to read, watching the cancel flag (a read with a
/// timeout could stop in the middle of a message and lose its framing; a peek cannot).
fn wait_readable(
    stream: &TcpStream,
    deadline: Instant,
    cancel: &AtomicBool,
    to: &str,
) -> Result<(), OutgoingError> {
    let mut byte = [0u8; 1];
    loop {
        if cancel.load(Ordering::SeqCst) {
            return Err(OutgoingError::Cancelled);
        }
        let now = Instant::now();
        if now >= deadline {
            let source = WireError::Io {
                op: "waiting for the destination to prepare",
                source: io::Error::new(io::ErrorKind::TimedOut, "no answer in time"),
            };
            return Err(OutgoingError::Handshake {
                to: to.into(),
                step: "waiting for the answer to MigrateIn",
                source,
            });
        }
        set_read_timeout(stream, Some(POLL_INTERVAL.min(deadline - now)))?;
        match stream.peek(&mut byte) {
            // Data, or end of stream: either way the read that follows will tell.
            Ok(_) => return Ok(()),
            Err(err)
                if matches!(
                    err.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            Err(source) => {
                let source = WireError::Io {
                    op: "waiting for the destination to prepare",
                    source,
                };
                return Err(OutgoingError::Handshake {
                    to: to.into(),
                    step: "waiting for the answer to MigrateIn",
                    source,
                });
            }
        }
    }
}

fn set_read_timeout(stream: &TcpStream, timeout: Option<Duration>) -> Result<(), OutgoingError> {
    stream
        .set_read_timeout(timeout)
        .map_err(|source| OutgoingError::Socket {
            op: "setting a read timeout",
            source,
        })
}

fn open_data_stream(
    to: &str,
    key: &ClusterKey,
    session: u64,
    index: u32,
) -> Result<TcpStream, OutgoingError> {
    let mut stream = connect(to, key)?;
    let handshake = |step| {
        move |source| OutgoingError::Handshake {
            to: to.to_string(),
            step,
            source,
        }
    };
    write_message(
        &mut stream,
        &Opening::DataStream(DataStream { session, index }),
    )
    .map_err(handshake("opening a data stream"))?;
    set_read_timeout(&stream, Some(DATA_STREAMS_TIMEOUT))?;
    match read_message(&mut stream, PEER_MESSAGE_LEN_MAX)
        .map_err(handshake("waiting for a data stream to attach"))?
    {
        DataStreamReply::Attached => Ok(stream),
        DataStreamReply::Refused { reason } => Err(OutgoingError::StreamRefused {
            to: to.into(),
            index,
            reason,
        }),
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".into()
    }
}

/// Lets a progress snapshot through when the phase or round changed, or when `interval` has
/// passed since the last one let through.
pub struct ProgressThrottle {
    interval: Duration,
    last: Option<(Instant, Option<Phase>, u32)>,
}

impl ProgressThrottle {
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last: None,
        }
    }

    pub fn admit(&mut self, progress: &Progress, now: Instant) -> bool {
        let admit = match self.last {
            None => true,
            Some((at, phase, round)) => {
                phase != progress.phase
                    || round != progress.round
                    || now.duration_since(at) >= self.interval
            }
        };
        if admit {
            self.last = Some((now, progress.phase, progress.round));
        }
        admit
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::tcp_pair as pair;

    fn progress(phase: Phase, round: u32) -> Progress {
        Progress {
            phase: Some(phase),
            round,
            ..Progress::default()
        }
    }

    #[test]
    fn throttle_lets_through_phase_and_round_changes_and_every_interval() {
        let mut throttle = ProgressThrottle::new(Duration::from_millis(200));
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        assert!(throttle.admit(&progress(Phase::Prepare, 0), at(0)));
        assert!(!throttle.admit(&progress(Phase::Prepare, 0), at(10)));
        assert!(throttle.admit(&progress(Phase::MemoryPreCopy, 0), at(20)));
        assert!(!throttle.admit(&progress(Phase::MemoryPreCopy, 0), at(100)));
        assert!(throttle.admit(&progress(Phase::MemoryPreCopy, 1), at(110)));
        assert!(!throttle.admit(&progress(Phase::MemoryPreCopy, 1), at(300)));
        assert!(throttle.admit(&progress(Phase::MemoryPreCopy, 1), at(310)));
        assert!(throttle.admit(&progress(Phase::Done, 1), at(311)));
    }

    #[test]
    fn waiting_for_the_destination_sees_data_cancel_and_deadline() {
        let (mut a, b) = pair();
        let cancel = AtomicBool::new(false);
        let soon = || Instant::now() + Duration::from_millis(300);
        assert!(matches!(
            wait_readable(&b, soon(), &cancel, "x"),
            Err(OutgoingError::Handshake { .. })
        ));
        io::Write::write_all(&mut a, b"x").unwrap();
        wait_readable(&b, soon(), &cancel, "x").unwrap();
        let (_a2, b2) = pair();
        cancel.store(true, Ordering::SeqCst);
        assert!(matches!(
            wait_readable(&b2, soon(), &cancel, "x"),
            Err(OutgoingError::Cancelled)
        ));
        assert_eq!(spec_memory_gib(1), 1);
        assert_eq!(spec_memory_gib(16 << 30), 16);
    }
}
