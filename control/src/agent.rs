//! The agent: hosts VMs, serves the CLI, and runs both ends of migrations.
//!
//! One thread per connection. The first message on a connection ([`Opening`]) says what it
//! is: a CLI request (answered, then closed), a peer's `MigrateIn` (the connection becomes
//! the migration's control channel) or a peer's data stream (handed to its pending
//! session). Outgoing migrations run on their own threads, so a CLI that goes away changes
//! nothing. Disk images live under `DATA_DIR/disks/` ([`crate::disks`]).

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use crossbeam_channel::bounded;
use ferry_dataplane::disk::VirtualDisk;
use ferry_dataplane::engine::MigrationParams;
use ferry_dataplane::guest::reference::{ReferenceVm, VmSpec};
use ferry_dataplane::guest::Guest;
use ferry_dataplane::wire::{read_message, write_message};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use crate::api::{DiskPlacement, ErrorKind, Request, Response, VmState};
use crate::disks::{open_user_disk, zero_for_boot, DiskStore, DiskStoreError, HostedDisk};
use crate::error_chain;
use crate::migration::{accept_incoming, run_outgoing, OutgoingRequest, PendingSessions};
use crate::peer::{Opening, PEER_MESSAGE_LEN_MAX};
use crate::registry::{Registry, RegistryError};
use crate::sigint;

/// A connection must say what it is within this time.
const OPENING_TIMEOUT: Duration = Duration::from_secs(10);
/// A CLI that stops reading its answers is dropped after this long (the work goes on).
const ANSWER_WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Progress and final answers buffered for the watching CLI.
const PROGRESS_QUEUE: usize = 64;
/// On shutdown, how long cancelled migrations get to fail back before the VMs are stopped.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(15);
/// Connections served at once (a migration with 64 streams uses 65); beyond this new
/// connections are closed at once rather than given a thread each.
const CONNECTIONS_MAX: usize = 1024;
/// The source learns that a migration completed a moment before the destination's
/// registry does; requests in that gap wait this long for it instead of failing as busy.
const INCOMING_SETTLE_MAX: Duration = Duration::from_secs(2);
/// Name of the identity file in the data directory.
pub const IDENTITY_FILE: &str = "agent.json";

/// How `ferry agent` was started.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    /// Print `listening on ADDR` on stdout once bound (for tests and `ferry demo`).
    pub print_addr: bool,
}

/// Who this agent is, kept in the data directory. The id survives restarts; the rest
/// describes the current run. (Which VMs it owns is in memory only for now.)
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AgentIdentity {
    pub agent_id: String,
    pub listen_addr: String,
    pub pid: u32,
    pub started_unix_ms: u64,
    pub version: String,
}

/// State shared by every connection thread.
pub struct Agent {
    registry: Registry,
    sessions: PendingSessions,
    disks: DiskStore,
    shutting_down: AtomicBool,
    local_addr: SocketAddr,
    connections: AtomicUsize,
}

/// Runs an agent until `Shutdown` or SIGINT/SIGTERM.
pub fn run(config: AgentConfig) -> anyhow::Result<()> {
    fs::create_dir_all(&config.data_dir).with_context(|| {
        format!(
            "cannot create the data directory {}",
            config.data_dir.display()
        )
    })?;
    let disks = DiskStore::open(&config.data_dir).with_context(|| {
        format!(
            "cannot create the disks directory in {}",
            config.data_dir.display()
        )
    })?;
    let listener = TcpListener::bind(&config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local_addr = listener.local_addr().context("reading the bound address")?;
    let identity = write_identity(&config.data_dir, local_addr)?;
    if config.print_addr {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {local_addr}").context("printing the address")?;
        stdout.flush().context("printing the address")?;
    }
    info!(addr = %local_addr, agent_id = %identity.agent_id, data_dir = %config.data_dir.display(), "agent listening");

    let agent = Arc::new(Agent {
        registry: Registry::new(),
        sessions: PendingSessions::new(),
        disks,
        shutting_down: AtomicBool::new(false),
        local_addr,
        connections: AtomicUsize::new(0),
    });
    sigint::install(&[libc::SIGINT, libc::SIGTERM]).context("installing signal handlers")?;
    let on_signal = Arc::clone(&agent);
    let _watcher = sigint::Watcher::spawn(move || on_signal.begin_shutdown("signal"))
        .context("starting the signal watcher")?;

    for connection in listener.incoming() {
        if agent.shutting_down.load(Ordering::SeqCst) {
            break;
        }
        match connection {
            Ok(stream) => {
                if agent.connections.fetch_add(1, Ordering::SeqCst) >= CONNECTIONS_MAX {
                    agent.connections.fetch_sub(1, Ordering::SeqCst);
                    warn!(limit = CONNECTIONS_MAX, "too many connections; one refused");
                    continue;
                }
                let worker = Arc::clone(&agent);
                let spawned =
                    std::thread::Builder::new()
                        .name("connection".into())
                        .spawn(move || {
                            let _counted = ConnectionSlot(Arc::clone(&worker));
                            worker.handle_connection(stream);
                        });
                if let Err(err) = spawned {
                    agent.connections.fetch_sub(1, Ordering::SeqCst);
                    error!(error = %err, "cannot start a connection thread; connection dropped");
                }
            }
            Err(err) => {
                // Out of descriptors or a connection reset before accept: not fatal.
                warn!(error = %err, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    agent.finish();
    Ok(())
}

/// Gives a connection's slot back however its thread ends.
struct ConnectionSlot(Arc<Agent>);

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::SeqCst);
    }
}

fn write_identity(dir: &Path, local_addr: SocketAddr) -> anyhow::Result<AgentIdentity> {
    let path = dir.join(IDENTITY_FILE);
    let previous_id = fs::read(&path)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<AgentIdentity>(&bytes).ok())
        .map(|identity| identity.agent_id);
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let identity = AgentIdentity {
        agent_id: previous_id.unwrap_or_else(|| format!("{:016x}", crate::peer::new_session_id())),
        listen_addr: local_addr.to_string(),
        pid: std::process::id(),
        started_unix_ms: now_ms,
        version: env!("CARGO_PKG_VERSION").to_string(),
    };
    // Write-then-rename so that a crash never leaves a torn file.
    let tmp = dir.join(format!("{IDENTITY_FILE}.tmp"));
    let json = serde_json::to_vec_pretty(&identity).expect("plain struct serializes");
    fs::write(&tmp, json).with_context(|| format!("writing {}", tmp.display()))?;
    fs::rename(&tmp, &path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    Ok(identity)
}

fn registry_error(err: RegistryError) -> Response {
    let kind = match err {
        RegistryError::NotFound { .. } => ErrorKind::NotFound,
        RegistryError::AlreadyExists { .. } => ErrorKind::AlreadyExists,
        RegistryError::Busy { .. } | RegistryError::NotReady { .. } => ErrorKind::Busy,
        RegistryError::DiskInUse { .. } => ErrorKind::BadRequest,
    };
    Response::error(kind, err.to_string())
}

impl Agent {
    fn begin_shutdown(&self, why: &str) {
        if self.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        info!(reason = why, "agent shutting down");
        // Wake the accept loop, which checks the flag after every connection.
        if let Err(err) = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1)) {
            warn!(error = %err, "could not wake the accept loop");
        }
    }

    /// Cancels migrations, gives them a bounded time to fail back, stops every VM. VMs
    /// live only in this process, so their agent-owned disk images go with them.
    fn finish(&self) {
        self.registry.cancel_all();
        let deadline = Instant::now() + SHUTDOWN_GRACE;
        while self.registry.migrations_active() > 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let active = self.registry.migrations_active();
        if active > 0 {
            warn!(
                active,
                "migrations still running at shutdown; stopping their VMs anyway"
            );
        }
        for (vm, disk) in self.registry.drain() {
            if let Some(vm) = vm {
                vm.shutdown();
            }
            if let Some(disk) = disk {
                self.disks.remove(&disk, "agent shutdown");
            }
        }
        info!("agent stopped");
    }

    fn handle_connection(self: Arc<Self>, mut stream: TcpStream) {
        let peer = stream
            .peer_addr()
            .map_or_else(|_| "?".to_string(), |a| a.to_string());
        let _ = stream.set_read_timeout(Some(OPENING_TIMEOUT));
        let opening = match read_message::<Opening>(&mut stream, PEER_MESSAGE_LEN_MAX) {
            Ok(opening) => opening,
            // The shutdown wake-up, or a port probe.
            Err(err) if err.is_clean_eof() => {
                debug!(%peer, "connection closed without a message");
                return;
            }
            Err(err) => {
                warn!(%peer, error = %error_chain(&err), "bad opening message; connection dropped");
                return;
            }
        };
        let _ = stream.set_read_timeout(None);
        match opening {
            Opening::Request(request) => self.handle_request(stream, request),
            Opening::MigrateIn(request) => {
                let _ = stream.set_nodelay(true);
                accept_incoming(
                    &self.registry,
                    &self.sessions,
                    &self.disks,
                    stream,
                    request,
                    &self.shutting_down,
                )
            }
            Opening::DataStream(opening) => self.sessions.route(opening, stream),
        }
    }

    /// Waits (boundedly) while `name` is an incoming VM that already runs here, so that a
    /// request sent right after the source reported success finds it settled.
    fn settle(&self, name: &str) {
        let deadline = Instant::now() + INCOMING_SETTLE_MAX;
        while self.registry.incoming_finishing(name) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn handle_request(self: Arc<Self>, mut stream: TcpStream, request: Request) {
        let received = Instant::now();
        let _ = stream.set_write_timeout(Some(ANSWER_WRITE_TIMEOUT));
        if let Request::VmStatus { name }
        | Request::VmVerify { name }
        | Request::VmDestroy { name }
        | Request::VmPause { name }
        | Request::VmResume { name }
        | Request::Migrate { name, .. } = &request
        {
            self.settle(name);
        }
        let response = match request {
            Request::Migrate { name, to, params } => {
                return self.serve_migrate(stream, name, to, params, received)
            }
            Request::Shutdown => {
                let _ = write_message(&mut stream, &Response::ShuttingDown);
                self.begin_shutdown("Shutdown request");
                return;
            }
            Request::VmCreate { spec, disk } => self.create(spec, disk),
            Request::VmList => Response::Vms {
                vms: self.registry.list(),
            },
            Request::VmStatus { name } => match self.registry.info(&name) {
                Ok(vm) => Response::Vm { vm },
                Err(err) => registry_error(err),
            },
            Request::VmVerify { name } => self.verify(name),
            Request::VmDestroy { name } => match self.registry.destroy(&name) {
                Ok(removed) => {
                    removed.vm.shutdown();
                    // Close the image before deleting it (unlinking an open file works,
                    // but a verify still holding the VM would then read a ghost).
                    drop(removed.vm);
                    if let Some(disk) = &removed.disk {
                        self.disks.remove(disk, "VM destroyed");
                    }
                    info!(vm = %name, "VM destroyed");
                    Response::Destroyed { name }
                }
                Err(err) => registry_error(err),
            },
            Request::VmPause { name } => self.pause_or_resume(name, false),
            Request::VmResume { name } => self.pause_or_resume(name, true),
            Request::Cancel { name } => match self.registry.cancel(&name) {
                Ok(was_running) => {
                    info!(vm = %name, was_running, "cancel requested");
                    Response::Cancelled { name, was_running }
                }
                Err(err) => registry_error(err),
            },
        };
        if let Err(err) = write_message(&mut stream, &response) {
            debug!(error = %error_chain(&err), "the CLI went away before its answer");
        }
    }

    fn create(&self, mut spec: VmSpec, placement: DiskPlacement) -> Response {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Response::error(ErrorKind::ShuttingDown, "the agent is shutting down");
        }
        let disk_error = |err: DiskStoreError| Response::error(err.kind(), error_chain(&err));
        // A user's file or device: opened (not yet touched) first, since its size is the
        // disk's and the spec is checked with it.
        let mut user_image = None;
        let hosted = match (&mut spec.disk, &placement.path) {
            (None, None) => None,
            (None, Some(path)) => {
                return Response::error(
                    ErrorKind::BadRequest,
                    format!(
                        "a disk path ({}) was given for a VM without a disk",
                        path.display()
                    ),
                )
            }
            (Some(disk), Some(path)) => match open_user_disk(path, placement.direct_io) {
                Ok((path, image)) => {
                    disk.bytes = image.size();
                    user_image = Some(image);
                    Some(HostedDisk {
                        path,
                        agent_owned: false,
                    })
                }
                Err(err) => return disk_error(err),
            },
            // Reserved, not yet owned: see `Registry::claim_disk`.
            (Some(_), None) => match self.disks.image_path(&spec.name) {
                Ok(path) => Some(HostedDisk {
                    path,
                    agent_owned: false,
                }),
                Err(err) => return disk_error(err),
            },
        };
        if let Err(err) = spec.validate() {
            return Response::error(ErrorKind::BadRequest, error_chain(&err));
        }
        let name = spec.name.clone();
        if let Err(err) = self
            .registry
            .reserve(&spec, VmState::Running, hosted.clone())
        {
            return registry_error(err);
        }
        // Zeroing a device or writing gigabytes of boot content takes seconds: done outside
        // the registry lock, under the name's (and the image's) reservation.
        let disk = match (&spec.disk, user_image) {
            (None, _) => Ok(None),
            (Some(_), Some(image)) => zero_for_boot(image).map(Some),
            (Some(disk), None) => self
                .disks
                .create(&name, disk.bytes, placement.direct_io)
                .map(|image| {
                    self.registry.claim_disk(&name);
                    Some(Arc::new(VirtualDisk::new(image)))
                }),
        };
        let disk = match disk {
            Ok(disk) => disk,
            Err(err) => {
                // A create that failed removed what it made; a leftover stays.
                self.registry.remove(&name);
                return disk_error(err);
            }
        };
        // The image exists now: one the agent created is its to delete.
        let hosted = hosted.map(|disk| HostedDisk {
            agent_owned: placement.path.is_none(),
            ..disk
        });
        match ReferenceVm::boot_with_disk(spec, disk) {
            Ok(vm) => {
                self.registry.attach(&name, Arc::new(vm));
                info!(vm = %name, disk = ?hosted.as_ref().map(|d| &d.path), "VM created");
                match self.registry.info(&name) {
                    Ok(vm) => Response::Created { vm },
                    Err(err) => registry_error(err),
                }
            }
            Err(err) => {
                self.registry.remove(&name);
                if let Some(disk) = &hosted {
                    self.disks.remove(disk, "booting the VM failed");
                }
                Response::error(
                    ErrorKind::Internal,
                    format!("booting {name:?} failed: {}", error_chain(&err)),
                )
            }
        }
    }

    /// `vm pause` / `vm resume`: only for a VM hosted here and not migrating.
    fn pause_or_resume(&self, name: String, resume: bool) -> Response {
        let operation = if resume { "resume" } else { "pause" };
        let vm = match self.registry.get_settled(&name, operation) {
            Ok(vm) => vm,
            Err(err) => return registry_error(err),
        };
        let result = if resume { vm.resume() } else { vm.quiesce() };
        if let Err(err) = result {
            return Response::error(
                ErrorKind::Internal,
                format!("{operation} of {name:?} failed: {}", error_chain(&err)),
            );
        }
        info!(vm = %name, "VM {}", if resume { "resumed" } else { "paused" });
        match self.registry.info(&name) {
            Ok(vm) => Response::Vm { vm },
            Err(err) => registry_error(err),
        }
    }

    fn verify(&self, name: String) -> Response {
        let vm = match self.registry.get_settled(&name, "verify") {
            Ok(vm) => vm,
            Err(err) => return registry_error(err),
        };
        match vm.verify() {
            Ok(report) => {
                info!(vm = %name, ok = report.ok, pages_checked = report.pages_checked, mismatched_pages = report.mismatched_pages, "VM verified");
                Response::Verified { name, report }
            }
            Err(err) => Response::error(
                ErrorKind::Internal,
                format!("verifying {name:?} failed: {}", error_chain(&err)),
            ),
        }
    }

    /// Starts the migration on its own thread, then relays its progress to this connection
    /// for as long as the CLI listens.
    fn serve_migrate(
        self: Arc<Self>,
        mut stream: TcpStream,
        name: String,
        to: String,
        params: MigrationParams,
        received: Instant,
    ) {
        let refuse = |stream: &mut TcpStream, response: Response| {
            let _ = write_message(stream, &response);
        };
        if self.shutting_down.load(Ordering::SeqCst) {
            return refuse(
                &mut stream,
                Response::error(ErrorKind::ShuttingDown, "the agent is shutting down"),
            );
        }
        if let Err(err) = params.validate() {
            return refuse(
                &mut stream,
                Response::error(ErrorKind::BadRequest, err.to_string()),
            );
        }
        if to.trim().is_empty() {
            return refuse(
                &mut stream,
                Response::error(ErrorKind::BadRequest, "the destination address is empty"),
            );
        }
        let outgoing = match self.registry.begin_outgoing(&name) {
            Ok(outgoing) => outgoing,
            Err(err) => return refuse(&mut stream, registry_error(err)),
        };
        let (events_tx, events) = bounded(PROGRESS_QUEUE);
        let agent = Arc::clone(&self);
        let request = OutgoingRequest {
            to,
            params,
            started: received,
        };
        let spawned = std::thread::Builder::new()
            .name(format!("migrate-{name}"))
            .spawn(move || {
                run_outgoing(&agent.registry, &agent.disks, outgoing, request, events_tx)
            });
        if let Err(err) = spawned {
            self.registry.set_state(&name, VmState::Running);
            let message = format!("cannot start the migration thread: {err}");
            return refuse(&mut stream, Response::error(ErrorKind::Internal, message));
        }
        for event in events {
            let last = !matches!(event, Response::Progress(_));
            if let Err(err) = write_message(&mut stream, &event) {
                info!(vm = %name, error = %error_chain(&err), "the CLI stopped watching; the migration goes on");
                return;
            }
            if last {
                return;
            }
        }
    }
}
