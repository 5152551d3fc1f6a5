//! The CLI's connection to an agent: one connection per request, over the agent's unix
//! socket (its file permissions are the authentication) or over TCP (the cluster key's
//! handshake, [`crate::auth`], comes first).

use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_dataplane::engine::{MigrationParams, MigrationReport, Progress};
use ferry_dataplane::guest::reference::{VerifyReport, VmSpec};
use ferry_dataplane::wire::{read_message, write_message, WireError};

use crate::api::{DiskPlacement, ErrorKind, Request, Response, VmInfo, API_MESSAGE_LEN_MAX};
use crate::auth::{authenticate_client, AuthError, ClusterKey};
use crate::peer::Opening;

/// Connecting to the agent, per address the name resolves to; also the bound on the
/// authentication handshake.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence accepted from the agent. A verify of the largest VM replays all of its
/// memory and reads its whole disk, as a create with a disk writes the disk's boot content;
/// a migration sends progress several times a second.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

/// Where an agent is reached: `--agent` is a unix socket path when it contains a '/' or
/// starts with `unix:`, else HOST:PORT.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentAddr {
    Unix(PathBuf),
    Tcp(String),
}

impl AgentAddr {
    pub fn parse(addr: &str) -> AgentAddr {
        match addr.strip_prefix("unix:") {
            Some(path) => AgentAddr::Unix(PathBuf::from(path)),
            None if addr.contains('/') => AgentAddr::Unix(PathBuf::from(addr)),
            None => AgentAddr::Tcp(addr.to_string()),
        }
    }
}

/// A connection between the CLI and an agent, either side: TCP (authenticated with the
/// cluster key) or the agent's unix socket.
#[derive(Debug)]
pub enum Connection {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Connection {
    pub fn set_read_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_read_timeout(timeout),
            Connection::Unix(s) => s.set_read_timeout(timeout),
        }
    }

    pub fn set_write_timeout(&self, timeout: Option<Duration>) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_write_timeout(timeout),
            Connection::Unix(s) => s.set_write_timeout(timeout),
        }
    }

    /// The peer, for logs: its address, or `unix socket`.
    pub fn peer(&self) -> String {
        match self {
            Connection::Tcp(s) => s
                .peer_addr()
                .map_or_else(|_| "?".to_string(), |a| a.to_string()),
            Connection::Unix(_) => "unix socket".to_string(),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.read(buf),
            Connection::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.write(buf),
            Connection::Unix(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Connection::Tcp(s) => s.flush(),
            Connection::Unix(s) => s.flush(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent at {addr} (is `ferry agent` running there?)")]
    Connect { addr: String, source: io::Error },
    #[error("talking to the agent at {addr} over TCP needs the cluster key: pass --key PATH or set FERRY_KEY (or use the agent's unix socket: --agent DATA_DIR/agent.sock)")]
    NoKey { addr: String },
    #[error("authenticating with the agent at {addr} failed")]
    Auth { addr: String, source: AuthError },
    #[error("talking to the agent at {addr} failed")]
    Wire { addr: String, source: WireError },
    /// The agent refused or failed the request; `message` says why.
    #[error("{message}")]
    Agent { kind: ErrorKind, message: String },
    #[error("the agent at {addr} answered {got} where {expected} was expected")]
    Unexpected {
        addr: String,
        got: &'static str,
        expected: &'static str,
    },
}

impl ClientError {
    /// The agent's error kind, when the agent answered with an error.
    pub fn kind(&self) -> Option<ErrorKind> {
        match self {
            ClientError::Agent { kind, .. } => Some(*kind),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct Client {
    addr: String,
    /// The cluster key, for TCP.
    key: Option<Arc<ClusterKey>>,
}

impl Client {
    /// A client of the agent at `addr` ([`AgentAddr::parse`]); TCP needs [`Client::with_key`].
    pub fn new(addr: impl Into<String>) -> Self {
        Self {
            addr: addr.into(),
            key: None,
        }
    }

    /// The client of an agent's unix socket.
    pub fn unix(path: &Path) -> Self {
        Self::new(format!("unix:{}", path.display()))
    }

    /// Authenticates TCP connections with `key` (a unix socket needs none).
    pub fn with_key(mut self, key: Arc<ClusterKey>) -> Self {
        self.key = Some(key);
        self
    }

    pub fn addr(&self) -> &str {
        &self.addr
    }

    fn wire(&self) -> impl Fn(WireError) -> ClientError + '_ {
        move |source| ClientError::Wire {
            addr: self.addr.clone(),
            source,
        }
    }

    fn unexpected(&self, got: &Response, expected: &'static str) -> ClientError {
        ClientError::Unexpected {
            addr: self.addr.clone(),
            got: got.variant(),
            expected,
        }
    }

    fn open(&self, request: Request) -> Result<Connection, ClientError> {
        let connect_err = |source| ClientError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let stream = match AgentAddr::parse(&self.addr) {
            AgentAddr::Unix(path) => {
                Connection::Unix(UnixStream::connect(path).map_err(connect_err)?)
            }
            AgentAddr::Tcp(addr) => Connection::Tcp(self.connect_tcp(&addr)?),
        };
        stream
            .set_read_timeout(Some(ANSWER_TIMEOUT))
            .map_err(connect_err)?;
        stream
            .set_write_timeout(Some(CONNECT_TIMEOUT))
            .map_err(connect_err)?;
        let mut stream = stream;
        write_message(&mut stream, &Opening::Request(request)).map_err(self.wire())?;
        Ok(stream)
    }

    /// Connects to the first address `addr` resolves to that answers, and authenticates.
    fn connect_tcp(&self, addr: &str) -> Result<TcpStream, ClientError> {
        let key = self.key.as_ref().ok_or_else(|| ClientError::NoKey {
            addr: self.addr.clone(),
        })?;
        let connect_err = |source| ClientError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let addrs: Vec<_> = addr.to_socket_addrs().map_err(connect_err)?.collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolved to nothing");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(mut stream) => {
                    let _ = stream.set_nodelay(true);
                    authenticate_client(&mut stream, key, Instant::now() + CONNECT_TIMEOUT)
                        .map_err(|source| ClientError::Auth {
                            addr: self.addr.clone(),
                            source,
                        })?;
                    return Ok(stream);
                }
                Err(err) => last = err,
            }
        }
        Err(connect_err(last))
    }

    fn read(&self, stream: &mut Connection) -> Result<Response, ClientError> {
        match read_message(stream, API_MESSAGE_LEN_MAX).map_err(self.wire())? {
            Response::Error { kind, message } => Err(ClientError::Agent { kind, message }),
            response => Ok(response),
        }
    }

    /// Sends one request and returns its answer (an agent error becomes `Err(Agent)`).
    pub fn call(&self, request: Request) -> Result<Response, ClientError> {
        let mut stream = self.open(request)?;
        self.read(&mut stream)
    }

    pub fn vm_create(&self, spec: VmSpec, disk: DiskPlacement) -> Result<VmInfo, ClientError> {
        match self.call(Request::VmCreate { spec, disk })? {
            Response::Created { vm } => Ok(vm),
            other => Err(self.unexpected(&other, "Created")),
        }
    }

    pub fn vm_list(&self) -> Result<Vec<VmInfo>, ClientError> {
        match self.call(Request::VmList)? {
            Response::Vms { vms } => Ok(vms),
            other => Err(self.unexpected(&other, "Vms")),
        }
    }

    pub fn vm_status(&self, name: &str) -> Result<VmInfo, ClientError> {
        match self.call(Request::VmStatus { name: name.into() })? {
            Response::Vm { vm } => Ok(vm),
            other => Err(self.unexpected(&other, "Vm")),
        }
    }

    pub fn vm_verify(&self, name: &str) -> Result<VerifyReport, ClientError> {
        match self.call(Request::VmVerify { name: name.into() })? {
            Response::Verified { report, .. } => Ok(report),
            other => Err(self.unexpected(&other, "Verified")),
        }
    }

    pub fn vm_destroy(&self, name: &str) -> Result<(), ClientError> {
        match self.call(Request::VmDestroy { name: name.into() })? {
            Response::Destroyed { .. } => Ok(()),
            other => Err(self.unexpected(&other, "Destroyed")),
        }
    }

    /// Stops the VM's vCPUs; returns the VM as it is then.
    pub fn vm_pause(&self, name: &str) -> Result<VmInfo, ClientError> {
        match self.call(Request::VmPause { name: name.into() })? {
            Response::Vm { vm } => Ok(vm),
            other => Err(self.unexpected(&other, "Vm")),
        }
    }

    /// Lets the VM's vCPUs run again; returns the VM as it is then.
    pub fn vm_resume(&self, name: &str) -> Result<VmInfo, ClientError> {
        match self.call(Request::VmResume { name: name.into() })? {
            Response::Vm { vm } => Ok(vm),
            other => Err(self.unexpected(&other, "Vm")),
        }
    }

    /// Whether a migration of `name` was running (and is now cancelled).
    pub fn cancel(&self, name: &str) -> Result<bool, ClientError> {
        match self.call(Request::Cancel { name: name.into() })? {
            Response::Cancelled { was_running, .. } => Ok(was_running),
            other => Err(self.unexpected(&other, "Cancelled")),
        }
    }

    pub fn shutdown(&self) -> Result<(), ClientError> {
        match self.call(Request::Shutdown)? {
            Response::ShuttingDown => Ok(()),
            other => Err(self.unexpected(&other, "ShuttingDown")),
        }
    }

    /// Asks the agent to migrate `name` to `to` and follows it to the end, passing every
    /// progress snapshot to `on_progress`.
    pub fn migrate(
        &self,
        name: &str,
        to: &str,
        params: MigrationParams,
        on_progress: &mut dyn FnMut(&Progress),
    ) -> Result<MigrationReport, ClientError> {
        let mut stream = self.open(Request::Migrate {
            name: name.into(),
            to: to.into(),
            params,
        })?;
        loop {
            match self.read(&mut stream)? {
                Response::Progress(progress) => on_progress(&progress),
                Response::Migrated(report) => return Ok(*report),
                other => return Err(self.unexpected(&other, "Progress or Migrated")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_addresses_are_sockets_or_host_ports() {
        for (input, parsed) in [
            ("127.0.0.1:7070", AgentAddr::Tcp("127.0.0.1:7070".into())),
            ("src:7070", AgentAddr::Tcp("src:7070".into())),
            ("[::1]:7070", AgentAddr::Tcp("[::1]:7070".into())),
            (
                "/var/lib/ferry/agent.sock",
                AgentAddr::Unix("/var/lib/ferry/agent.sock".into()),
            ),
            ("./agent.sock", AgentAddr::Unix("./agent.sock".into())),
            ("unix:agent.sock", AgentAddr::Unix("agent.sock".into())),
        ] {
            assert_eq!(AgentAddr::parse(input), parsed, "{input}");
        }
    }

    #[test]
    fn tcp_without_a_key_is_a_clear_error_before_connecting() {
        // Nothing listens there; the missing key is reported first.
        let err = Client::new("127.0.0.1:1").vm_list().unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(err, ClientError::NoKey { .. })
                && text.contains("--key")
                && text.contains("FERRY_KEY"),
            "{text}"
        );
    }
}
