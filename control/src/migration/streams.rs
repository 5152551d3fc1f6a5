//! `--streams auto` on the source agent: the facts [`choose_streams`] needs, gathered from
//! this host (the placement's transport cores, the speed of the interface that reaches the
//! peer) and from the last migration to the same peer (what one stream carried then).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::path::Path;
use std::sync::Mutex;

use ferry_dataplane::engine::streams::{choose_streams, interface_bytes_per_s, LinkFacts};
use ferry_dataplane::engine::{MigrationParams, MigrationReport, STREAMS_AUTO};
use ferry_dataplane::numa;

/// What one stream carried in the last TCP migration to each peer (bytes/s), this process.
static MEASURED: Mutex<Option<HashMap<IpAddr, f64>>> = Mutex::new(None);

/// `params` with the stream count resolved, and why.
pub fn resolve(params: &MigrationParams, to: &str) -> (MigrationParams, String) {
    let mut params = params.clone();
    if params.streams != STREAMS_AUTO {
        return (params, "set by --streams".to_string());
    }
    let peer = peer_ip(to);
    let facts = LinkFacts {
        transport_cores: transport_cores(),
        link_bytes_per_s: peer
            .and_then(local_ip_towards)
            .and_then(numa::nic_for_addr)
            .and_then(|iface| interface_bytes_per_s(Path::new("/sys"), &iface)),
        measured_stream_bytes_per_s: peer.and_then(measured),
    };
    let choice = choose_streams(&facts);
    params.streams = choice.streams;
    (params, format!("auto: {}", choice.reason))
}

/// Remembers what one stream carried in `report`'s first round (the full pass, the
/// cleanest measurement), for the next `auto` choice towards `to`. TCP only: RDMA lanes
/// are not limited the same way.
pub fn remember(to: &str, report: &MigrationReport) {
    if report.transport != "tcp" || report.streams == 0 {
        return;
    }
    let (Some(peer), Some(round)) = (peer_ip(to), report.timeline.rounds.first()) else {
        return;
    };
    let per_stream = round.bandwidth_bytes_per_s / report.streams as f64;
    if per_stream.is_finite() && per_stream > 0.0 {
        let mut map = MEASURED.lock().unwrap_or_else(|e| e.into_inner());
        map.get_or_insert_with(HashMap::new)
            .insert(peer, per_stream);
    }
}

fn measured(peer: IpAddr) -> Option<f64> {
    let map = MEASURED.lock().unwrap_or_else(|e| e.into_inner());
    map.as_ref()?.get(&peer).copied()
}

/// Cores of the transport role in the installed placement, else all this process may use.
fn transport_cores() -> usize {
    numa::installed()
        .map(|p| p.cpus(numa::ThreadRole::Transport).len())
        .filter(|n| *n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

fn peer_ip(to: &str) -> Option<IpAddr> {
    to.to_socket_addrs().ok()?.next().map(|a| a.ip())
}

/// The local address the kernel would send from to reach `peer` (a connected UDP socket
/// routes without sending anything).
fn local_ip_towards(peer: IpAddr) -> Option<IpAddr> {
    let bind: SocketAddr = match peer {
        IpAddr::V4(_) => "0.0.0.0:0".parse().ok()?,
        IpAddr::V6(_) => "[::]:0".parse().ok()?,
    };
    let socket = UdpSocket::bind(bind).ok()?;
    socket.connect(SocketAddr::new(peer, 9)).ok()?;
    socket.local_addr().ok().map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fixed_count_is_kept() {
        let params = MigrationParams {
            streams: 3,
            ..MigrationParams::default()
        };
        let (resolved, reason) = resolve(&params, "127.0.0.1:7070");
        assert_eq!(resolved.streams, 3);
        assert_eq!(reason, "set by --streams");
    }

    #[test]
    fn auto_on_loopback_follows_the_cores() {
        let (resolved, reason) = resolve(&MigrationParams::default(), "127.0.0.1:7070");
        assert_eq!(resolved.streams, (transport_cores() * 2).clamp(1, 16));
        assert!(reason.starts_with("auto: ") && reason.contains("link speed unknown"));
    }

    #[test]
    fn the_local_address_towards_loopback_is_loopback() {
        let ip = local_ip_towards("127.0.0.1".parse().unwrap()).unwrap();
        assert!(ip.is_loopback());
    }
}
