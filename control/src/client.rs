//! The CLI's connection to an agent: one connection per request.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

use ferry_dataplane::engine::{MigrationParams, MigrationReport, Progress};
use ferry_dataplane::guest::reference::{VerifyReport, VmSpec};
use ferry_dataplane::wire::{read_message, write_message, WireError};

use crate::api::{DiskPlacement, ErrorKind, Request, Response, VmInfo, API_MESSAGE_LEN_MAX};
use crate::peer::Opening;

/// Connecting to the agent, per address the name resolves to.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest silence accepted from the agent. A verify of the largest VM replays all of its
/// memory and reads its whole disk, as a create with a disk writes the disk's boot content;
/// a migration sends progress several times a second.
pub const ANSWER_TIMEOUT: Duration = Duration::from_secs(600);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the agent at {addr} (is `ferry agent` running there?)")]
    Connect { addr: String, source: io::Error },
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
}

impl Client {
    pub fn new(addr: impl Into<String>) -> Self {
        Self { addr: addr.into() }
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

    fn open(&self, request: Request) -> Result<TcpStream, ClientError> {
        let connect_err = |source| ClientError::Connect {
            addr: self.addr.clone(),
            source,
        };
        let addrs: Vec<_> = self.addr.to_socket_addrs().map_err(connect_err)?.collect();
        let mut last = io::Error::new(io::ErrorKind::NotFound, "the address resolved to nothing");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, CONNECT_TIMEOUT) {
                Ok(mut stream) => {
                    let _ = stream.set_nodelay(true);
                    stream
                        .set_read_timeout(Some(ANSWER_TIMEOUT))
                        .map_err(connect_err)?;
                    stream
                        .set_write_timeout(Some(CONNECT_TIMEOUT))
                        .map_err(connect_err)?;
                    write_message(&mut stream, &Opening::Request(request)).map_err(self.wire())?;
                    return Ok(stream);
                }
                Err(err) => last = err,
            }
        }
        Err(connect_err(last))
    }

    fn read(&self, stream: &mut TcpStream) -> Result<Response, ClientError> {
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
                Response::Migrated(report) => return Ok(report),
                other => return Err(self.unexpected(&other, "Progress or Migrated")),
            }
        }
    }
}
