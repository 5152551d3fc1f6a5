//! Setting up a migration's RDMA connections ("lanes") with rdma_cm.
//!
//! The destination binds a [`Listener`] to the address its agent is reached at (port 0:
//! the kernel picks one, the control channel tells the source). The source connects one
//! lane at a time; each connect request carries `{magic, version, lane, session}` and is
//! refused unless the session is the one the listener expects and the lane is new. The
//! destination accepts with the lane's private data (for memory lanes: where guest memory
//! is and its rkey). A lane is usable ([`ConnectedQp`]) only once rdma_cm reports it
//! established, on both sides.
//!
//! After set-up a [`Link`] watches the event channel: a disconnect of any lane (the peer
//! closed, crashed or the port went down) moves every lane's QP to the error state, so
//! every waiting sender and receiver wakes with a flush error at once.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use super::verbs::{
    expect_event, CmEventKind, CmId, ConnectedQp, EventChannel, PendingQp, ProtectionDomain, QpCaps,
};
use super::RdmaError;
use crate::numa::{self, ThreadRole};

/// "FRYR": ferry RDMA lane.
const CONNECT_MAGIC: u32 = 0x5259_5246;
const LINK_VERSION: u16 = 2;
const REQUEST_LEN: usize = 16 + LANE_TAG_LEN;
/// Bytes of a lane's authentication tag.
pub const LANE_TAG_LEN: usize = 16;
/// Address and route resolution, each.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the monitor looks at its stop flag.
const MONITOR_SLICE: Duration = Duration::from_millis(100);

/// Proves a lane belongs to the authenticated migration: the control connection's
/// handshake gives both agents a session key; each lane's connect carries a tag made with it
/// (the listener refuses a lane whose tag does not verify). RDMA connects carry private data
/// instead of a byte stream, so this replaces the TCP challenge-response there.
pub trait LaneAuth: Send + Sync {
    fn tag(&self, session: u64, lane: u16) -> [u8; LANE_TAG_LEN];
    fn verify(&self, session: u64, lane: u16, tag: &[u8; LANE_TAG_LEN]) -> bool;
}

/// For tests of the lanes themselves: every tag is zero and verifies.
pub struct UnauthenticatedLanes;

impl LaneAuth for UnauthenticatedLanes {
    fn tag(&self, _session: u64, _lane: u16) -> [u8; LANE_TAG_LEN] {
        [0; LANE_TAG_LEN]
    }
    fn verify(&self, _session: u64, _lane: u16, _tag: &[u8; LANE_TAG_LEN]) -> bool {
        true
    }
}

/// What a connect request says: which lane of which migration, and its tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LaneRequest {
    pub session: u64,
    pub lane: u16,
    pub tag: [u8; LANE_TAG_LEN],
}

impl LaneRequest {
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut out = [0u8; REQUEST_LEN];
        out[0..4].copy_from_slice(&CONNECT_MAGIC.to_le_bytes());
        out[4..6].copy_from_slice(&LINK_VERSION.to_le_bytes());
        out[6..8].copy_from_slice(&self.lane.to_le_bytes());
        out[8..16].copy_from_slice(&self.session.to_le_bytes());
        out[16..REQUEST_LEN].copy_from_slice(&self.tag);
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RdmaError> {
        let bad = |reason: String| RdmaError::BadPeerMessage { reason };
        if bytes.len() < REQUEST_LEN {
            return Err(bad(format!(
                "connect request carries {} bytes, {REQUEST_LEN} expected",
                bytes.len()
            )));
        }
        let u32_at = |i: usize| u32::from_le_bytes(bytes[i..i + 4].try_into().expect("4 bytes"));
        let u16_at = |i: usize| u16::from_le_bytes(bytes[i..i + 2].try_into().expect("2 bytes"));
        if u32_at(0) != CONNECT_MAGIC {
            return Err(bad("not a ferry lane (bad magic)".into()));
        }
        if u16_at(4) != LINK_VERSION {
            return Err(bad(format!(
                "lane protocol version {}, this agent speaks {LINK_VERSION}",
                u16_at(4)
            )));
        }
        Ok(Self {
            lane: u16_at(6),
            session: u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes")),
            tag: bytes[16..REQUEST_LEN].try_into().expect("tag bytes"),
        })
    }
}

/// Which local RDMA device reaches `peer` (from `local`, when given): the device name, or
/// why none does. Used to choose a transport before asking the peer for RDMA.
pub fn device_for(local: Option<IpAddr>, peer: IpAddr) -> Result<String, RdmaError> {
    super::verbs::probe()?;
    let channel = EventChannel::new()?;
    let id = CmId::new(&channel)?;
    let unreachable = |reason: String| RdmaError::Unreachable {
        peer: peer.to_string(),
        reason,
    };
    id.resolve_addr(local, SocketAddr::new(peer, 0), RESOLVE_TIMEOUT)
        .map_err(|e| unreachable(error_text(&e)))?;
    expect_event(
        &id,
        CmEventKind::AddressResolved,
        Instant::now() + RESOLVE_TIMEOUT,
    )
    .map_err(|e| unreachable(error_text(&e)))?;
    id.device_name()
        .ok_or_else(|| unreachable("the address resolved to no device".into()))
}

fn error_text(e: &RdmaError) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The destination's listener for one migration's lanes.
pub struct Listener {
    id: CmId,
    pd: Arc<ProtectionDomain>,
    device: String,
    port: u16,
}

impl Listener {
    /// Listens on `ip` (an address of an RDMA device), port chosen by the kernel.
    pub fn bind(ip: IpAddr) -> Result<Self, RdmaError> {
        super::verbs::probe()?;
        let channel = EventChannel::new()?;
        let id = CmId::new(&channel)?;
        id.bind(SocketAddr::new(ip, 0))?;
        let device = id.device_name().ok_or_else(|| RdmaError::Unreachable {
            peer: ip.to_string(),
            reason: "the address is not on an RDMA device".into(),
        })?;
        let pd = ProtectionDomain::on(&id)?;
        id.listen(64)?;
        let port = id.local_port();
        Ok(Self {
            id,
            pd,
            device,
            port,
        })
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn device(&self) -> &str {
        &self.device
    }

    /// The protection domain lanes will use: register memory on it before accepting.
    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    /// Accepts lane `i` for every `caps[i]`, of migration `session`, answering each with
    /// `private(i)`; other requests are rejected (and logged). Lanes may arrive in any
    /// order.
    pub fn accept(
        &self,
        session: u64,
        caps: &[QpCaps],
        private: impl Fn(usize) -> Vec<u8>,
        auth: &dyn LaneAuth,
        deadline: Instant,
        stop: &AtomicBool,
    ) -> Result<Link, RdmaError> {
        let channel = self.id.channel().clone();
        let mut pending: HashMap<usize, (usize, PendingQp)> = HashMap::new();
        let mut connected: Vec<Option<Arc<ConnectedQp>>> = caps.iter().map(|_| None).collect();
        let mut accepted = 0;
        while accepted < caps.len() {
            let slice = deadline.min(Instant::now() + MONITOR_SLICE);
            let Some(event) = channel.next(slice)? else {
                if stop.load(Ordering::Relaxed) {
                    return Err(RdmaError::Cancelled);
                }
                if Instant::now() >= deadline {
                    return Err(RdmaError::Timeout {
                        waiting_for: CmEventKind::Established,
                    });
                }
                continue;
            };
            match event.kind() {
                CmEventKind::ConnectRequest => {
                    // SAFETY: the id of a connect request event from this channel, adopted
                    // once here.
                    let id = unsafe { CmId::adopt(event.id_ptr(), &channel)? };
                    let request = LaneRequest::decode(&event.private_data());
                    drop(event);
                    let lane = match request {
                        Ok(r) if r.session != session => {
                            warn!(
                                session = r.session,
                                "RDMA lane of another migration refused"
                            );
                            id.reject();
                            continue;
                        }
                        Ok(r) if !auth.verify(r.session, r.lane, &r.tag) => {
                            warn!(
                                lane = r.lane,
                                "RDMA lane refused: its tag does not prove the migration's session key (wrong cluster key, or not from the authenticated source)"
                            );
                            id.reject();
                            continue;
                        }
                        Ok(r)
                            if (r.lane as usize) >= caps.len()
                                || connected[r.lane as usize].is_some()
                                || pending.values().any(|(l, _)| *l == r.lane as usize) =>
                        {
                            warn!(
                                lane = r.lane,
                                "RDMA lane out of range or duplicate, refused"
                            );
                            id.reject();
                            continue;
                        }
                        Ok(r) => r.lane as usize,
                        Err(e) => {
                            warn!(error = %e, "RDMA connect request refused");
                            id.reject();
                            continue;
                        }
                    };
                    let qp = PendingQp::create(id, &self.pd, caps[lane])?;
                    let key = qp.id().as_ptr() as usize;
                    qp.accept_start(&private(lane))?;
                    pending.insert(key, (lane, qp));
                }
                CmEventKind::Established => {
                    let key = event.id_ptr() as usize;
                    drop(event);
                    if let Some((lane, qp)) = pending.remove(&key) {
                        debug!(lane, "RDMA lane established");
                        connected[lane] = Some(Arc::new(qp.established()));
                        accepted += 1;
                    }
                }
                _ => {
                    let key = event.id_ptr() as usize;
                    if pending.contains_key(&key) {
                        return Err(RdmaError::UnexpectedEvent {
                            want: CmEventKind::Established,
                            got: event.name(),
                            status: event.status(),
                        });
                    }
                }
            }
        }
        Ok(Link::new(
            channel,
            connected
                .into_iter()
                .map(|q| q.expect("every lane"))
                .collect(),
            self.pd.clone(),
            self.device.clone(),
        ))
    }
}

/// The source's side: connects lane `i` for every `caps[i]` to `peer`, from `local` (an
/// address of the device to use) when given. Returns the link and, per lane, the private
/// data the destination accepted it with.
pub fn connect(
    local: Option<IpAddr>,
    peer: SocketAddr,
    session: u64,
    caps: &[QpCaps],
    auth: &dyn LaneAuth,
    deadline: Instant,
) -> Result<(Link, Vec<Vec<u8>>), RdmaError> {
    super::verbs::probe()?;
    let channel = EventChannel::new()?;
    let mut pd: Option<Arc<ProtectionDomain>> = None;
    let mut lanes = Vec::with_capacity(caps.len());
    let mut accepted = Vec::with_capacity(caps.len());
    let mut device = String::new();
    for (lane, caps) in caps.iter().enumerate() {
        let id = CmId::new(&channel)?;
        id.resolve_addr(local, peer, RESOLVE_TIMEOUT)?;
        expect_event(&id, CmEventKind::AddressResolved, deadline)?;
        id.resolve_route(RESOLVE_TIMEOUT)?;
        expect_event(&id, CmEventKind::RouteResolved, deadline)?;
        let pd = match &pd {
            Some(pd) => pd.clone(),
            None => {
                device = id.device_name().unwrap_or_default();
                let new = ProtectionDomain::on(&id)?;
                pd = Some(new.clone());
                new
            }
        };
        let qp = PendingQp::create(id, &pd, *caps)?;
        let request = LaneRequest {
            session,
            lane: lane as u16,
            tag: auth.tag(session, lane as u16),
        };
        let (qp, data) = qp.connect(&request.encode(), deadline)?;
        lanes.push(Arc::new(qp));
        accepted.push(data);
    }
    let pd = pd.ok_or(RdmaError::NotBound)?;
    Ok((Link::new(channel, lanes, pd, device), accepted))
}

/// A migration's connected lanes, watched for disconnects.
pub struct Link {
    lanes: Vec<Arc<ConnectedQp>>,
    pd: Arc<ProtectionDomain>,
    device: String,
    broken: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
    monitor: Option<JoinHandle<()>>,
}

impl Link {
    fn new(
        channel: Arc<EventChannel>,
        lanes: Vec<Arc<ConnectedQp>>,
        pd: Arc<ProtectionDomain>,
        device: String,
    ) -> Self {
        let broken = Arc::new(Mutex::new(None));
        let stop = Arc::new(AtomicBool::new(false));
        let monitor = {
            let lanes = lanes.clone();
            let broken = broken.clone();
            let stop = stop.clone();
            numa::spawn(ThreadRole::Control, "rdma-cm-monitor", move || {
                monitor(channel, lanes, broken, stop)
            })
            .ok()
        };
        Self {
            lanes,
            pd,
            device,
            broken,
            stop,
            monitor,
        }
    }

    pub fn lanes(&self) -> &[Arc<ConnectedQp>] {
        &self.lanes
    }

    pub fn pd(&self) -> &Arc<ProtectionDomain> {
        &self.pd
    }

    /// The local device the lanes run on (`rxe0`, `mlx5_0`, …).
    pub fn device(&self) -> &str {
        &self.device
    }

    /// Why the link broke, if it did.
    pub fn broken(&self) -> Option<String> {
        self.broken
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Stops a side's receivers: raises `stop`, breaks every lane (which wakes them with
    /// flushes) and joins them.
    pub fn stop_receivers(&self, stop: &AtomicBool, receivers: &mut Vec<JoinHandle<()>>) {
        stop.store(true, Ordering::Relaxed);
        self.disconnect();
        for h in receivers.drain(..) {
            let _ = h.join();
        }
    }

    /// Breaks every lane now: posted work completes with flush errors on both sides.
    pub fn disconnect(&self) {
        for lane in &self.lanes {
            lane.id().disconnect();
        }
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.disconnect();
        if let Some(h) = self.monitor.take() {
            let _ = h.join();
        }
    }
}

fn monitor(
    channel: Arc<EventChannel>,
    lanes: Vec<Arc<ConnectedQp>>,
    broken: Arc<Mutex<Option<String>>>,
    stop: Arc<AtomicBool>,
) {
    while !stop.load(Ordering::Relaxed) {
        let event = match channel.next(Instant::now() + MONITOR_SLICE) {
            Ok(Some(e)) => e,
            Ok(None) => continue,
            Err(e) => {
                warn!(error = %e, "RDMA event channel failed");
                return;
            }
        };
        match event.kind() {
            CmEventKind::Disconnected | CmEventKind::Other(_) | CmEventKind::Rejected => {
                let what = event.name();
                drop(event);
                let mut broken = broken.lock().unwrap_or_else(|e| e.into_inner());
                if broken.is_none() {
                    // The normal end too (the peer closes when the migration is over):
                    // whether this was a failure is the engine's to say.
                    if !stop.load(Ordering::Relaxed) {
                        debug!(event = %what, "RDMA link closed: every lane is closed");
                    }
                    *broken = Some(what);
                }
                drop(broken);
                for lane in &lanes {
                    lane.id().disconnect();
                }
            }
            _ => {}
        }
    }
}
