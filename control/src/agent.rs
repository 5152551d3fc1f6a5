//! The agent: hosts VMs, serves the CLI, and runs both ends of migrations.
//!
//! One thread per connection. A TCP connection first proves it knows the cluster key
//! ([`crate::auth`]); the CLI may instead use the unix socket `DATA_DIR/agent.sock`, which
//! only this user can open. Then the first message ([`Opening`]) says what the connection
//! is: a CLI request (answered, then closed), a peer's `MigrateIn` (the connection becomes
//! the migration's control channel) or a peer's data stream (handed to its pending
//! session); the unix socket carries CLI requests only. Outgoing migrations run on their own threads, so a CLI that goes away changes
//! nothing. Disk images live under `DATA_DIR/disks/` ([`crate::disks`]).

use std::fs;
use std::io::Write;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use crossbeam_channel::bounded;
use ferry_dataplane::disk::VirtualDisk;
use ferry_dataplane::engine::MigrationParams;
use ferry_dataplane::guest::reference::{ReferenceVm, VmSpec};
use ferry_dataplane::guest::Guest;
use ferry_dataplane::numa::{self, Device, PlacementRequest, Sysfs, ThreadRole, Topology};
use ferry_dataplane::wire::{read_message, write_message};
use serde::{Deserialize, Serialize};
use tracing::{debug, error, info, warn};

use crate::api::{DiskPlacement, ErrorKind, Request, Response, VmInfo, VmState};
use crate::auth::{authenticate_server, ClusterKey};
use crate::client::Connection;
use crate::disks::{open_user_disk, zero_for_boot, DiskStore, DiskStoreError, HostedDisk};
use crate::error_chain;
use crate::journal::Record;
use crate::migration::{accept_incoming, run_outgoing, OutgoingRequest, PendingSessions};
use crate::migration::{resolve, InDoubt, Services};
use crate::ownership::{Ownership, Recovery};
use crate::peer::{DataStreamReply, MigrateInReply, Opening, PEER_MESSAGE_LEN_MAX};
use crate::recovery::{self, Placement};
use crate::registry::{Registry, RegistryError};
use crate::sigint;

/// A connection must authenticate within this time, and then say what it is within as long.
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
/// Name of the CLI's unix socket in the data directory (owner-only, no cluster key needed).
pub const SOCKET_FILE: &str = "agent.sock";
/// A unix socket's path must fit in `sockaddr_un.sun_path` (108 bytes with the NUL).
const SOCKET_PATH_LEN_MAX: usize = 107;

/// How `ferry agent` was started.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub listen: String,
    pub data_dir: PathBuf,
    /// Print `listening on ADDR` on stdout once bound (for tests and `ferry demo`).
    pub print_addr: bool,
    /// The cluster key file (`--key`, else `$FERRY_KEY`, else `DATA_DIR/cluster.key`).
    pub key_path: PathBuf,
    /// Where VMs' memory files live (tmpfs); `None`: `/dev/shm/ferry-AGENT_ID`.
    pub memory_dir: Option<PathBuf>,
    /// CPUs the data plane may use (`--cpus`); `None`: every CPU the process may use.
    pub cpus: Option<Vec<u32>>,
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
    /// Every TCP connection must prove it knows this key.
    key: Arc<ClusterKey>,
    /// The CLI's unix socket (removed when the agent stops).
    socket_path: PathBuf,
    /// Who owns each VM, durably (the journal in the data directory).
    ownership: Ownership,
    /// Where the VMs' persistent files live: `MEMORY_DIR/NAME/`.
    memory_dir: PathBuf,
}

/// Runs an agent until `Shutdown` or SIGINT/SIGTERM.
pub fn run(config: AgentConfig) -> anyhow::Result<()> {
    // A bad --cpus fails before anything is created.
    check_cpus(&config)?;
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
    // Signals are flags from the start: a SIGTERM right after `listening on` must not kill
    // the agent outright (the watcher below acts on it once the agent exists).
    sigint::install(&[libc::SIGINT, libc::SIGTERM]).context("installing signal handlers")?;
    // The key before anything listens: an agent without one serves nobody.
    let key = Arc::new(ClusterKey::load(&config.key_path)?);
    // The journal before anything listens too: who owns what decides what runs.
    let ownership = Ownership::open(&config.data_dir).with_context(|| {
        format!(
            "cannot open the ownership journal in {}",
            config.data_dir.display()
        )
    })?;
    let listener = TcpListener::bind(&config.listen)
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let local_addr = listener.local_addr().context("reading the bound address")?;
    // Placement before any data-plane thread starts (recovery below boots VMs).
    install_placement(&config, local_addr);
    let socket_path = config.data_dir.join(SOCKET_FILE);
    let unix_listener = bind_private_socket(&socket_path)?;
    let identity = write_identity(&config.data_dir, local_addr)?;
    let memory_dir = config
        .memory_dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(format!("/dev/shm/ferry-{}", identity.agent_id)));
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(&memory_dir)
        .with_context(|| {
            format!(
                "cannot create the memory directory {}",
                memory_dir.display()
            )
        })?;
    if config.print_addr {
        let mut stdout = std::io::stdout().lock();
        writeln!(stdout, "listening on {local_addr}").context("printing the address")?;
        stdout.flush().context("printing the address")?;
    }
    info!(addr = %local_addr, socket = %socket_path.display(), agent_id = %identity.agent_id, data_dir = %config.data_dir.display(), "agent listening");
    info!(key = %config.key_path.display(), fingerprint = %key.fingerprint(), "cluster key loaded: TCP peers must know it");

    let agent = Arc::new(Agent {
        registry: Registry::new(),
        sessions: PendingSessions::new(),
        disks,
        shutting_down: AtomicBool::new(false),
        local_addr,
        connections: AtomicUsize::new(0),
        key,
        socket_path,
        ownership,
        memory_dir,
    });
    // Bring back what the journal says this agent holds, before serving anyone.
    agent.recover();
    let on_signal = Arc::clone(&agent);
    let _watcher = sigint::Watcher::spawn(move || on_signal.begin_shutdown("signal"))
        .context("starting the signal watcher")?;
    let unix_agent = Arc::clone(&agent);
    // The agent's own threads are control threads: every allowed CPU (--cpus), whichever
    // thread starts them.
    numa::spawn(ThreadRole::Control, "unix-accept", move || {
        unix_agent.accept_unix(unix_listener)
    })
    .context("starting the unix socket's accept thread")?;

    for connection in listener.incoming() {
        if agent.shutting_down.load(Ordering::SeqCst) {
            break;
        }
        match connection {
            Ok(stream) => agent.serve(Connection::Tcp(stream)),
            Err(err) => {
                // Out of descriptors or a connection reset before accept: not fatal.
                warn!(error = %err, "accept failed");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
    agent.finish();
    let _ = fs::remove_file(&agent.socket_path);
    Ok(())
}

/// The data plane's NUMA placement on this host, as `ferry agent --show-placement` shows
/// it: the topology (the CPUs this process may use), the NIC holding the listen address,
/// the disk holding the data directory, and the plan.
#[derive(Debug, Serialize)]
pub struct HostPlacement {
    pub topology: Topology,
    /// `None`: listening on every address (0.0.0.0), or an address of no interface.
    pub nic: Option<Device>,
    /// `None`: the data directory is on no single disk (tmpfs, overlay).
    pub disk: Option<Device>,
    pub placement: numa::Placement,
}

/// Refuses a `--cpus` with CPUs this process may not use (a typo, or a cgroup's cpuset).
fn check_cpus(config: &AgentConfig) -> anyhow::Result<()> {
    if let Some(cpus) = &config.cpus {
        numa::check_cpus(cpus, &numa::thread_affinity()).context("--cpus")?;
    }
    Ok(())
}

/// Reads the topology and the devices' nodes and plans. Never fails for want of topology:
/// without hwloc's answer it plans for one node of the CPUs this process may use.
pub fn host_placement(config: &AgentConfig, listen: Option<SocketAddr>) -> HostPlacement {
    let allowed = numa::thread_affinity();
    let topology = match numa::read_host() {
        // hwloc reports the cgroup's CPUs; the affinity mask (taskset) may be narrower.
        Ok(topology) if !allowed.is_empty() => topology.restricted_to(&allowed),
        Ok(topology) => topology,
        Err(err) => {
            warn!(error = %error_chain(&err), "cannot read the NUMA topology: placing the data plane as on one node");
            Topology::single(allowed)
        }
    };
    let sysfs = Sysfs::host();
    // Loopback has no device: its node stays unknown.
    let nic = listen
        .and_then(|addr| numa::nic_for_addr(addr.ip()))
        .map(|iface| sysfs.nic(&topology, &iface));
    let disk = numa::disk_for_path(&config.data_dir).map(|name| sysfs.disk(&topology, &name));
    let request = PlacementRequest {
        allowed_cpus: config.cpus.clone(),
        nic_node: nic.as_ref().and_then(|d| d.node),
        disk_node: disk.as_ref().and_then(|d| d.node),
        memory_node: None,
        // Decided per migration: no stream count to plan for here.
        streams: 0,
    };
    let placement = numa::plan(&topology, &request);
    HostPlacement {
        topology,
        nic,
        disk,
        placement,
    }
}

/// Plans the placement, logs it and makes it the process's (every data-plane thread is
/// pinned by it from now on). With `--cpus`, this thread is also pinned to the allowed
/// CPUs, so that every thread the agent starts outside the data plane inherits them.
fn install_placement(config: &AgentConfig, listen: SocketAddr) {
    let host = host_placement(config, Some(listen));
    info!(
        nodes = host.topology.nodes.len(),
        cpus = %numa::format_cpu_list(&host.placement.allowed_cpus),
        nic = %describe_device(host.nic.as_ref()),
        disk = %describe_device(host.disk.as_ref()),
        "data plane placement"
    );
    for role in &host.placement.roles {
        info!(
            role = %role.role,
            cpus = %numa::format_cpu_list(&role.cpus),
            pinned = role.pinned,
            memory_node = ?role.memory_node,
            why = %role.why,
            "placement"
        );
    }
    for note in &host.placement.notes {
        info!("placement: {note}");
    }
    if config.cpus.is_some() {
        if let Err(err) = numa::set_thread_affinity(host.placement.cpus(ThreadRole::Control)) {
            warn!(error = %error_chain(&err), "cannot pin the agent to --cpus");
        }
    }
    if let Err(err) = numa::install(host.placement) {
        warn!(error = %error_chain(&err), "placement not installed");
    }
}

/// `eth0 (node 1)`, `lo (node unknown)`, `none`.
fn describe_device(device: Option<&Device>) -> String {
    match device {
        Some(Device {
            name,
            node: Some(node),
            ..
        }) => format!("{name} (node {node})"),
        Some(Device { name, .. }) => format!("{name} (node unknown)"),
        None => "none".to_string(),
    }
}

/// `ferry agent --show-placement`: prints the topology and the plan (one JSON object with
/// `json`) and touches nothing: no directory is created, nothing listens.
pub fn show_placement(config: &AgentConfig, json: bool) -> anyhow::Result<()> {
    check_cpus(config)?;
    // The address the agent would listen on, resolved but not bound.
    let listen = std::net::ToSocketAddrs::to_socket_addrs(config.listen.as_str())
        .ok()
        .and_then(|mut addrs| addrs.next());
    let host = host_placement(config, listen);
    if json {
        crate::output::print_json(&host);
        return Ok(());
    }
    let mut out = String::new();
    out.push_str(&host.topology.to_string());
    let listen_text = listen.map_or(config.listen.clone(), |addr| addr.to_string());
    let nic = match &host.nic {
        Some(nic) => describe_device(Some(nic)),
        None => "unknown (not one interface's address)".to_string(),
    };
    out.push_str(&format!("listen {listen_text}: NIC {nic}\n"));
    out.push_str(&format!(
        "data dir {}: disk {}\n\n",
        config.data_dir.display(),
        describe_device(host.disk.as_ref())
    ));
    out.push_str(&host.placement.to_string());
    let mut stdout = std::io::stdout().lock();
    stdout
        .write_all(out.as_bytes())
        .and_then(|()| stdout.flush())
        .context("printing the placement")
}

/// Binds the CLI's unix socket at `path` so that nobody but this user can connect at any
/// moment: it is bound in a fresh directory of mode 0700 beside `path` (nobody else may
/// reach a socket in there), made 0600, and only then renamed into place. A socket left by
/// an agent that died is removed; one that answers belongs to a live agent on this data
/// directory, and starting a second one there is refused.
fn bind_private_socket(path: &Path) -> anyhow::Result<UnixListener> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => {
            if UnixStream::connect(path).is_ok() {
                bail!(
                    "another agent is running on this data directory (its socket {} answers): stop it, or give this one another --data-dir",
                    path.display()
                );
            }
            fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
            debug!(socket = %path.display(), "removed a stale socket");
        }
        Ok(_) => bail!(
            "{} exists and is not a socket: move it away (the agent's socket goes there)",
            path.display()
        ),
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => {}
        Err(err) => {
            return Err(err).with_context(|| format!("cannot inspect {}", path.display()));
        }
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let staging = dir.join(format!(".sock-{}", std::process::id()));
    let staged = staging.join("s");
    if staged.as_os_str().len().max(path.as_os_str().len()) > SOCKET_PATH_LEN_MAX {
        bail!(
            "the unix socket path {} is too long (at most {SOCKET_PATH_LEN_MAX} bytes, with room to spare): use a shorter --data-dir",
            path.display()
        );
    }
    let _ = fs::remove_dir_all(&staging);
    fs::DirBuilder::new()
        .mode(0o700)
        .create(&staging)
        .with_context(|| format!("creating {}", staging.display()))?;
    let bound = UnixListener::bind(&staged)
        .with_context(|| format!("cannot listen on the unix socket {}", staged.display()))
        .and_then(|listener| {
            fs::set_permissions(&staged, fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making {} owner-only", staged.display()))?;
            fs::rename(&staged, path)
                .with_context(|| format!("moving {} to {}", staged.display(), path.display()))?;
            Ok(listener)
        });
    let _ = fs::remove_dir_all(&staging);
    bound
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

/// Migrations come over TCP, authenticated with the cluster key: a peer's opening on the
/// unix socket is answered with a refusal in its own terms.
fn refuse_peer_on_socket(stream: &mut Connection, opening: &Opening) {
    let reason = "migrations come over TCP, authenticated with the cluster key, not over the CLI's unix socket".to_string();
    let what = match opening {
        Opening::Request(_) => "Request",
        Opening::MigrateIn(_) => "MigrateIn",
        Opening::DataStream(_) => "DataStream",
        Opening::Outcome(_) => "Outcome",
        Opening::Released(_) => "Released",
    };
    warn!(opening = what, "{reason}; connection refused");
    let _ = match opening {
        Opening::MigrateIn(_) => write_message(stream, &MigrateInReply::Refused { reason }),
        _ => write_message(stream, &DataStreamReply::Refused { reason }),
    };
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
        // Wake the accept loops, which check the flag after every connection (and drop that
        // one unread: the wake-up sends nothing).
        if let Err(err) = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1)) {
            warn!(error = %err, "could not wake the accept loop");
        }
        if let Err(err) = UnixStream::connect(&self.socket_path) {
            warn!(error = %err, "could not wake the unix socket's accept loop");
        }
    }

    fn accept_unix(self: Arc<Self>, listener: UnixListener) {
        for connection in listener.incoming() {
            if self.shutting_down.load(Ordering::SeqCst) {
                break;
            }
            match connection {
                Ok(stream) => self.serve(Connection::Unix(stream)),
                Err(err) => {
                    warn!(error = %err, "accept on the unix socket failed");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Gives the connection a thread of its own, within [`CONNECTIONS_MAX`].
    fn serve(self: &Arc<Self>, stream: Connection) {
        if self.connections.fetch_add(1, Ordering::SeqCst) >= CONNECTIONS_MAX {
            self.connections.fetch_sub(1, Ordering::SeqCst);
            warn!(limit = CONNECTIONS_MAX, "too many connections; one refused");
            return;
        }
        let worker = Arc::clone(self);
        let spawned = numa::spawn(ThreadRole::Control, "connection", move || {
            let _counted = ConnectionSlot(Arc::clone(&worker));
            worker.handle_connection(stream);
        });
        if let Err(err) = spawned {
            self.connections.fetch_sub(1, Ordering::SeqCst);
            error!(error = %err, "cannot start a connection thread; connection dropped");
        }
    }

    /// Cancels migrations, gives them a bounded time to fail back, stops every VM (they stay
    /// recoverable: the journal and their files are kept).
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
        // The VMs stop at a step boundary; their files and the journal stay, so the next
        // start of this agent brings them back.
        for (vm, _disk) in self.registry.drain() {
            if let Some(vm) = vm {
                vm.shutdown();
            }
        }
        info!("agent stopped; its VMs come back when it starts again");
    }

    /// A VM's owner and epoch by the journal.
    fn with_ownership(&self, mut vm: VmInfo) -> VmInfo {
        vm.epoch = self.ownership.epoch_here(&vm.name).unwrap_or(0);
        vm.owner = match self.ownership.latest(&vm.name) {
            Some(Record::Prepared { from, .. }) => {
                format!("undecided (asking the source agent at {from})")
            }
            Some(Record::IncomingStarted { .. }) => "the source agent (migrating here)".into(),
            _ => "this agent".into(),
        };
        vm
    }

    /// `vm status` of a VM this agent does not host: what its journal knows.
    fn not_here(&self, name: &str) -> Response {
        let message = match self.ownership.latest(name) {
            Some(Record::HandedOver { epoch, to, .. }) => format!("VM {name:?} is not here: it was handed over to the agent at {to} (owner there, epoch {epoch}; not confirmed)"),
            Some(Record::Released { epoch, .. }) => format!("VM {name:?} is not here: it was handed over and the destination confirmed it (epoch {epoch} there)"),
            _ => format!("no VM named {name:?} on this agent"),
        };
        Response::error(ErrorKind::NotFound, message)
    }

    fn services(&self) -> Services<'_> {
        Services {
            registry: &self.registry,
            disks: &self.disks,
            ownership: &self.ownership,
            key: &self.key,
            stopping: &self.shutting_down,
        }
    }

    /// Follows the journal's recovery plan: VMs this agent holds run again (from their
    /// files), an undecided incoming VM waits paused while the source's agent is asked, a
    /// handed-over VM never runs here again, and an unprepared incoming VM is dropped.
    fn recover(self: &Arc<Self>) {
        for step in self.ownership.recovery_plan() {
            match step {
                Recovery::Resume {
                    vm: name,
                    epoch,
                    unfinished,
                } => {
                    match self.reopen(&name, VmState::Running) {
                        Ok(vm) => match unfinished {
                            None => self.resume_recovered(&name, epoch, &vm),
                            // Recorded before the VM runs again, so that swap can never
                            // commit; while the journal cannot take it, keep trying.
                            Some(session) => {
                                let agent = Arc::clone(self);
                                let spawned = numa::spawn(
                                    ThreadRole::Control,
                                    format!("fail-back-{name}"),
                                    move || agent.fail_back_recovered(&name, epoch, session, &vm),
                                );
                                if let Err(err) = spawned {
                                    error!(error = %err, "cannot start the recovery thread");
                                }
                            }
                        },
                        Err(reason) => {
                            error!(vm = %name, epoch, %reason, "THE JOURNAL SAYS THIS AGENT OWNS THE VM, BUT IT CANNOT BE RECOVERED")
                        }
                    }
                }
                Recovery::InDoubt {
                    vm: name,
                    epoch,
                    session,
                    from,
                } => match self.reopen(&name, VmState::InDoubt) {
                    Ok(vm) => {
                        let image = self.registry.disk_of(&name);
                        let agent = Arc::clone(self);
                        let doubt = InDoubt {
                            vm,
                            epoch,
                            session,
                            from,
                            start_paused: false,
                            image,
                        };
                        let spawned = numa::spawn(
                            ThreadRole::Control,
                            format!("in-doubt-{name}"),
                            move || resolve(&agent.services(), doubt),
                        );
                        if let Err(err) = spawned {
                            error!(vm = %name, error = %err, "cannot start asking the source; the VM stays in doubt until a restart");
                        }
                    }
                    Err(reason) => {
                        error!(vm = %name, epoch, %reason, "prepared VM cannot be recovered; the source's agent still decides")
                    }
                },
                Recovery::HandedOver {
                    vm: name,
                    epoch,
                    to,
                } => {
                    let dir = self.memory_dir.join(&name);
                    if let Err(err) = ReferenceVm::remove_files(&dir) {
                        warn!(vm = %name, error = %err, "removing a handed-over VM's files failed");
                    }
                    info!(vm = %name, epoch, %to, "handed over before the restart: the VM is the destination's and never runs here again (its disk image is kept)");
                }
                Recovery::DiscardIncoming {
                    vm: name,
                    epoch,
                    session,
                } => {
                    let dir = self.memory_dir.join(&name);
                    if let Ok(placement) = Placement::load(&dir) {
                        if let Some(disk) = placement.hosted() {
                            self.disks.remove(&disk, "an unprepared incoming migration");
                        }
                    }
                    if let Err(err) = ReferenceVm::remove_files(&dir) {
                        warn!(vm = %name, error = %err, "removing an unprepared incoming VM's files failed");
                    }
                    self.ownership.discarded(&name, epoch, session);
                    info!(vm = %name, "an incoming migration interrupted before it prepared: discarded");
                }
            }
        }
    }

    fn resume_recovered(&self, name: &str, epoch: u64, vm: &ReferenceVm) {
        match vm.resume() {
            Ok(()) => info!(vm = %name, epoch, "VM recovered and running"),
            Err(err) => {
                error!(vm = %name, error = %error_chain(&err), "VM recovered but cannot resume")
            }
        }
    }

    /// A VM whose outgoing migration the restart interrupted: journal that the migration
    /// never committed (retrying while the journal cannot take it), then run the VM.
    fn fail_back_recovered(&self, name: &str, epoch: u64, session: u64, vm: &ReferenceVm) {
        let mut tries = 0u64;
        while let Err(err) = self.ownership.abort_unfinished(name, session) {
            if tries.is_multiple_of(30) {
                error!(vm = %name, error = %error_chain(&err), "cannot record that the interrupted migration never committed; the VM stays paused until it can be");
            }
            tries += 1;
            if self.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        info!(vm = %name, session = format_args!("{session:#018x}"), "the outgoing migration interrupted by the restart never committed: failing back");
        self.resume_recovered(name, epoch, vm);
    }

    /// Reopens `name` from its files into the registry (parked), in `state`.
    fn reopen(&self, name: &str, state: VmState) -> Result<Arc<ReferenceVm>, String> {
        let (vm, disk) = recovery::reopen(&self.memory_dir.join(name))?;
        self.registry
            .reserve(vm.spec(), state, disk)
            .map_err(|e| e.to_string())?;
        self.registry.attach(name, Arc::clone(&vm));
        Ok(vm)
    }

    fn handle_connection(self: Arc<Self>, mut stream: Connection) {
        let peer = stream.peer();
        // Over TCP, nothing of the peer's is parsed before it proved it knows the key.
        let mut session_auth = None;
        if let Connection::Tcp(tcp) = &mut stream {
            let deadline = Instant::now() + OPENING_TIMEOUT;
            match authenticate_server(tcp, &self.key, deadline) {
                Ok(auth) => session_auth = Some(auth),
                Err(err) if err.is_silent_close() => {
                    // A port probe (the shutdown wake-up is never read).
                    debug!(%peer, "connection closed before the handshake");
                    return;
                }
                Err(err) => {
                    warn!(%peer, reason = %error_chain(&err), "authentication failed; connection refused");
                    return;
                }
            }
        }
        let _ = stream.set_read_timeout(Some(OPENING_TIMEOUT));
        let opening = match read_message::<Opening>(&mut stream, PEER_MESSAGE_LEN_MAX) {
            Ok(opening) => opening,
            // A CLI that gave up, or a probe of the unix socket.
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
        match (opening, stream) {
            (Opening::Request(request), stream) => self.handle_request(stream, request),
            (Opening::MigrateIn(request), Connection::Tcp(stream)) => {
                let _ = stream.set_nodelay(true);
                let Some(auth) = session_auth else {
                    return;
                };
                accept_incoming(
                    &self.services(),
                    &self.sessions,
                    &self.memory_dir,
                    stream,
                    auth,
                    request,
                )
            }
            (Opening::Released(question), Connection::Tcp(_)) => {
                if self
                    .ownership
                    .released_by_destination(&question.vm, question.session)
                {
                    let image = self.disks.image_path(&question.vm).ok();
                    info!(%peer, vm = %question.vm, epoch = question.epoch, image = ?image.filter(|p| p.exists()),
                        "the destination confirmed it owns the VM: hand-over released (a disk image kept at the hand-over can be removed)");
                }
            }
            (Opening::Outcome(question), Connection::Tcp(mut stream)) => {
                let outcome = self
                    .ownership
                    .answer(&question.vm, question.epoch, question.session);
                info!(%peer, vm = %question.vm, epoch = question.epoch, session = format_args!("{:#018x}", question.session), ?outcome, "a destination asked how a swap ended");
                let _ = write_message(&mut stream, &outcome);
            }
            (Opening::DataStream(opening), Connection::Tcp(stream)) => {
                self.sessions.route(opening, stream)
            }
            (opening, mut stream) => refuse_peer_on_socket(&mut stream, &opening),
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

    fn handle_request(self: Arc<Self>, mut stream: Connection, request: Request) {
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
                vms: self
                    .registry
                    .list()
                    .into_iter()
                    .map(|vm| self.with_ownership(vm))
                    .collect(),
            },
            Request::VmStatus { name } => match self.registry.info(&name) {
                Ok(vm) => Response::Vm {
                    vm: self.with_ownership(vm),
                },
                Err(RegistryError::NotFound { .. }) => self.not_here(&name),
                Err(err) => registry_error(err),
            },
            Request::VmVerify { name } => self.verify(name),
            Request::VmDestroy { name } => match self.registry.destroy(&name) {
                Ok(removed) => {
                    removed.vm.shutdown();
                    if let Err(err) = self.ownership.destroyed(&name) {
                        warn!(vm = %name, error = %error_chain(&err), "recording the destroy failed; a restart would bring the VM back");
                    }
                    if let Some(dir) = removed.vm.files_dir() {
                        if let Err(err) = ReferenceVm::remove_files(dir) {
                            warn!(vm = %name, error = %err, "removing the VM's files failed");
                        }
                    }
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
        let files = self.memory_dir.join(&name);
        let booted = ReferenceVm::boot_persistent(spec, disk, &files)
            .map_err(|e| error_chain(&e))
            .and_then(|vm| {
                Placement::new(hosted.as_ref(), placement.direct_io)
                    .save(&files)
                    .map_err(|e| format!("writing the VM's placement: {e}"))?;
                self.ownership.created(&name).map_err(|e| error_chain(&e))?;
                Ok(vm)
            });
        match booted {
            Ok(vm) => {
                self.registry.attach(&name, Arc::new(vm));
                info!(vm = %name, disk = ?hosted.as_ref().map(|d| &d.path), "VM created");
                match self.registry.info(&name) {
                    Ok(vm) => Response::Created { vm },
                    Err(err) => registry_error(err),
                }
            }
            Err(reason) => {
                self.registry.remove(&name);
                if let Some(disk) = &hosted {
                    self.disks.remove(disk, "booting the VM failed");
                }
                if let Err(err) = ReferenceVm::remove_files(&files) {
                    warn!(vm = %name, error = %err, "removing the files of a VM that failed to boot");
                }
                Response::error(
                    ErrorKind::Internal,
                    format!("booting {name:?} failed: {reason}"),
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
        mut stream: Connection,
        name: String,
        to: String,
        params: MigrationParams,
        received: Instant,
    ) {
        let refuse = |stream: &mut Connection, response: Response| {
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
            key: Arc::clone(&self.key),
            source_port: self.local_addr.port(),
        };
        // Coordination only: its disk copy runs as a disk thread, its senders as
        // transport threads, its trace as tracker threads (the engine places them).
        let spawned = numa::spawn(ThreadRole::Control, format!("migrate-{name}"), move || {
            run_outgoing(
                &agent.registry,
                &agent.disks,
                &agent.ownership,
                outgoing,
                request,
                events_tx,
            )
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
