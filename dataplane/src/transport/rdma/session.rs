//! One migration's RDMA data plane, from set-up to transports: what the agents call.
//!
//! Lanes of a link: memory streams `0..streams`, then (with a disk) the bulk lane and the
//! mirror lane, the same order as the TCP data connections.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Instant;

use super::disk::{self as rdma_disk, RdmaDiskDestination, RdmaDiskSource};
use super::link::{connect, LaneAuth, Listener};
use super::memory::{
    self as rdma_memory, register_guest_memory, RdmaCounters, RdmaDestination, RdmaSource,
    RemoteMemory,
};
use super::verbs::{Access, MemoryRegion, QpCaps};
use super::RdmaError;
use crate::memory::GuestMemory;

fn lane_caps(streams: usize, disk: bool) -> Vec<QpCaps> {
    let mut caps = vec![rdma_memory::lane_caps(); streams];
    if disk {
        caps.extend([rdma_disk::lane_caps(), rdma_disk::lane_caps()]);
    }
    caps
}

/// The destination's side before the source connects: listening, guest memory registered.
pub struct IncomingRdma {
    listener: Listener,
    region: Arc<MemoryRegion>,
    memory: Arc<GuestMemory>,
}

/// The destination's transports over RDMA.
pub struct IncomingTransports {
    pub memory: RdmaDestination,
    pub disk: Option<RdmaDiskDestination>,
    pub device: String,
}

impl IncomingRdma {
    /// Listens on `ip` (the address the source reached this agent at) and registers
    /// `memory` for remote writes.
    pub fn listen(ip: IpAddr, memory: Arc<GuestMemory>) -> Result<Self, RdmaError> {
        let listener = Listener::bind(ip)?;
        let region = Arc::new(register_guest_memory(
            listener.pd(),
            &memory,
            Access::RemoteWrite,
        )?);
        Ok(Self {
            listener,
            region,
            memory,
        })
    }

    pub fn port(&self) -> u16 {
        self.listener.port()
    }

    pub fn device(&self) -> &str {
        self.listener.device()
    }

    /// Accepts the lanes of `session` (until `deadline`, or `stop`).
    pub fn accept(
        self,
        session: u64,
        streams: usize,
        disk: bool,
        auth: &dyn LaneAuth,
        deadline: Instant,
        stop: &AtomicBool,
    ) -> Result<IncomingTransports, RdmaError> {
        let remote = RemoteMemory::of(&self.region).encode();
        let caps = lane_caps(streams, disk);
        let link = self.listener.accept(
            session,
            &caps,
            |lane| {
                if lane < streams {
                    remote.clone()
                } else {
                    Vec::new()
                }
            },
            auth,
            deadline,
            stop,
        )?;
        let device = link.device().to_string();
        let link = Arc::new(link);
        let memory = RdmaDestination::new(link.clone(), 0..streams, self.memory, self.region);
        let disk =
            disk.then(|| RdmaDiskDestination::new(link.clone(), streams, streams + 1, streams));
        Ok(IncomingTransports {
            memory,
            disk,
            device,
        })
    }
}

/// The source's transports over RDMA.
pub struct OutgoingTransports {
    pub memory: RdmaSource,
    pub disk: Option<RdmaDiskSource>,
    pub device: String,
    /// What the memory lanes posted.
    pub counters: Arc<RdmaCounters>,
    /// What the disk lanes posted (None without a disk).
    pub disk_counters: Option<Arc<RdmaCounters>>,
}

/// Connects the lanes of `session` to the destination's listener at `route.1`, from the
/// local address `route.0`, and registers `memory` for the device to read.
pub fn connect_outgoing(
    route: (IpAddr, SocketAddr),
    session: u64,
    streams: usize,
    disk_sizes: Option<Vec<u64>>,
    memory: Arc<GuestMemory>,
    auth: &dyn LaneAuth,
    deadline: Instant,
) -> Result<OutgoingTransports, RdmaError> {
    let caps = lane_caps(streams, disk_sizes.is_some());
    let (local, peer) = route;
    let (link, accepted) = connect(Some(local), peer, session, &caps, auth, deadline)?;
    let remote = RemoteMemory::decode(accepted.first().map_or(&[][..], |a| a.as_slice()))?;
    let device = link.device().to_string();
    let link = Arc::new(link);
    let memory = RdmaSource::new(link.clone(), 0..streams, memory, remote)?;
    let counters = memory.counters();
    let disk = match disk_sizes {
        Some(sizes) => Some(RdmaDiskSource::new(
            link.clone(),
            streams,
            streams + 1,
            sizes,
            streams,
        )?),
        None => None,
    };
    let disk_counters = disk.as_ref().map(RdmaDiskSource::counters);
    Ok(OutgoingTransports {
        memory,
        disk,
        device,
        counters,
        disk_counters,
    })
}
