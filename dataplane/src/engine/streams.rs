//! How many data streams a migration opens when the user does not say (`--streams auto`,
//! the default): a pure function of the cores the transport may use and what is known of
//! the link, so tests can drive it with any machine.
//!
//! - **Cores.** Each stream has a sending thread on the source and a receiving thread on the
//!   destination, and each is busy copying bytes through the kernel. Two streams per
//!   transport core keep every core fed while one thread waits on its socket; more only add
//!   context switches (docs/benchmarks.md has the measurement).
//! - **The link.** A stream cannot go faster than one core can push a TCP stream
//!   ([`STREAM_BYTES_PER_S_DEFAULT`] until measured). When the link is slower than that many
//!   streams can carry, fewer streams fill it: a 10 Gb/s NIC needs one or two, not sixteen.
//!   The link rate is the NIC's speed (sysfs), and once a migration to the same peer has
//!   run, the per-stream rate it measured replaces the default.
//!
//! The count is between 1 and [`STREAMS_AUTO_MAX`]; the reason travels in the report.

use serde::{Deserialize, Serialize};

/// Most streams `auto` opens.
pub const STREAMS_AUTO_MAX: usize = 16;
/// Streams per transport core.
pub const STREAMS_PER_CORE: usize = 2;
/// What one TCP stream carries when nothing was measured yet (loopback here: ~3.3 GiB/s;
/// real NICs with interrupts and no loopback shortcut carry less per stream).
pub const STREAM_BYTES_PER_S_DEFAULT: f64 = 2.0 * (1u64 << 30) as f64;

/// What is known when the streams are chosen.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LinkFacts {
    /// Cores the transport threads may run on (the placement's transport role).
    pub transport_cores: usize,
    /// The link's line rate (bytes/s) if known: the NIC's speed. `None` for loopback,
    /// virtual links, or an unknown speed: the link is then taken to be no limit.
    pub link_bytes_per_s: Option<f64>,
    /// What one stream carried in the last migration to this peer, if there was one.
    pub measured_stream_bytes_per_s: Option<f64>,
}

/// The count and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamChoice {
    pub streams: usize,
    pub reason: String,
}

/// Chooses the number of streams for `facts`.
pub fn choose_streams(facts: &LinkFacts) -> StreamChoice {
    let cores = facts.transport_cores.max(1);
    let by_cores = (cores * STREAMS_PER_CORE).clamp(1, STREAMS_AUTO_MAX);
    let usable = |r: &f64| r.is_finite() && *r > 0.0;
    let (per_stream, measured) = match facts.measured_stream_bytes_per_s.filter(usable) {
        Some(rate) => (rate, "measured"),
        None => (STREAM_BYTES_PER_S_DEFAULT, "assumed"),
    };
    let core_reason = format!("{STREAMS_PER_CORE} per transport core × {cores}");
    match facts.link_bytes_per_s.filter(usable) {
        Some(link) => {
            // Enough streams to fill the link, plus one for headroom, never more than the
            // cores can drive.
            let by_link = ((link / per_stream).ceil() as usize + 1).clamp(1, STREAMS_AUTO_MAX);
            if by_link < by_cores {
                StreamChoice {
                    streams: by_link,
                    reason: format!(
                        "link {:.1} Gb/s over {} {:.2} GiB/s per stream, +1",
                        link * 8.0 / 1e9,
                        measured,
                        per_stream / (1u64 << 30) as f64
                    ),
                }
            } else {
                StreamChoice {
                    streams: by_cores,
                    reason: format!(
                        "{core_reason} (the {:.1} Gb/s link could take more)",
                        link * 8.0 / 1e9
                    ),
                }
            }
        }
        None => StreamChoice {
            streams: by_cores,
            reason: format!("{core_reason} (link speed unknown: loopback or virtual)"),
        },
    }
}

/// The line rate of network interface `iface` in bytes/s, from
/// `SYSFS/class/net/IFACE/speed` (Mb/s; -1 or missing when unknown, as for loopback and veth).
pub fn interface_bytes_per_s(sysfs: &std::path::Path, iface: &str) -> Option<f64> {
    let text = std::fs::read_to_string(sysfs.join("class/net").join(iface).join("speed")).ok()?;
    let mbit: i64 = text.trim().parse().ok()?;
    (mbit > 0).then(|| mbit as f64 * 1e6 / 8.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(cores: usize, link_gbit: Option<f64>, measured_gib: Option<f64>) -> LinkFacts {
        LinkFacts {
            transport_cores: cores,
            link_bytes_per_s: link_gbit.map(|g| g * 1e9 / 8.0),
            measured_stream_bytes_per_s: measured_gib.map(|g| g * (1u64 << 30) as f64),
        }
    }

    #[test]
    fn loopback_on_two_cores_opens_four_streams() {
        let c = choose_streams(&facts(2, None, None));
        assert_eq!(c.streams, 4);
        assert!(c.reason.contains("link speed unknown"), "{}", c.reason);
    }

    #[test]
    fn cores_bound_the_count() {
        assert_eq!(choose_streams(&facts(1, None, None)).streams, 2);
        assert_eq!(choose_streams(&facts(0, None, None)).streams, 2);
        assert_eq!(
            choose_streams(&facts(64, None, None)).streams,
            STREAMS_AUTO_MAX
        );
    }

    #[test]
    fn a_slow_link_needs_fewer_streams_than_the_cores_allow() {
        // 10 Gb/s = 1.16 GiB/s: one assumed 2 GiB/s stream fills it, plus one.
        let c = choose_streams(&facts(16, Some(10.0), None));
        assert_eq!(c.streams, 2);
        assert!(c.reason.contains("10.0 Gb/s") && c.reason.contains("assumed"));
        // 100 Gb/s at a measured 1.5 GiB/s per stream: 11.6 GiB/s → 8 + 1.
        let c = choose_streams(&facts(16, Some(100.0), Some(1.5)));
        assert_eq!(c.streams, 9);
        assert!(c.reason.contains("measured"), "{}", c.reason);
    }

    #[test]
    fn a_fast_link_is_bounded_by_the_cores() {
        let c = choose_streams(&facts(2, Some(400.0), Some(1.0)));
        assert_eq!(c.streams, 4);
        assert!(c.reason.contains("could take more"), "{}", c.reason);
    }

    #[test]
    fn nonsense_measurements_are_ignored() {
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            let c = choose_streams(&LinkFacts {
                transport_cores: 4,
                link_bytes_per_s: Some(bad),
                measured_stream_bytes_per_s: Some(bad),
            });
            assert_eq!(c.streams, 8, "{bad}");
        }
    }

    #[test]
    fn interface_speed_comes_from_sysfs() {
        let dir = tempfile::tempdir().unwrap();
        let net = dir.path().join("class/net");
        for (iface, speed) in [("eth0", "25000\n"), ("veth0", "-1\n"), ("bad", "x")] {
            std::fs::create_dir_all(net.join(iface)).unwrap();
            std::fs::write(net.join(iface).join("speed"), speed).unwrap();
        }
        assert_eq!(
            interface_bytes_per_s(dir.path(), "eth0"),
            Some(25_000.0 * 1e6 / 8.0)
        );
        assert_eq!(interface_bytes_per_s(dir.path(), "veth0"), None);
        assert_eq!(interface_bytes_per_s(dir.path(), "bad"), None);
        assert_eq!(interface_bytes_per_s(dir.path(), "lo"), None);
    }
}
