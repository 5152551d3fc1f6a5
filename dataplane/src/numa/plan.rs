//! The placement plan: which CPUs each kind of data-plane thread runs on and which node its
//! buffers live on. A pure function of the topology and a request, so that it is tested on
//! topologies this machine does not have.
//!
//! The rules, in the order they apply:
//!
//! 1. Only allowed CPUs are used (`--cpus`, else every CPU of the topology). Allowed CPUs
//!    the topology does not have are dropped with a note; if none is left the whole
//!    topology is used, with a note (the agent refuses such a `--cpus` before planning).
//! 2. One node: every role gets every allowed CPU and no buffer is bound.
//! 3. Several nodes: transport threads go to the NIC's node (unknown: the node with the
//!    most allowed CPUs), disk threads to the disk's node (unknown: the transport's),
//!    tracker threads to the node holding guest memory (the NIC's unless told otherwise:
//!    the NIC writes incoming pages there). Each role's buffers are bound to that node.
//! 4. A role whose node has no allowed CPU runs on the allowed CPUs of the other nodes,
//!    with a note; its buffers stay on its node (the device DMAs there all the same).
//! 5. vCPUs and everything else (control) get every allowed CPU: they are not narrowed.

use std::fmt;

use serde::Serialize;

use super::cpulist::{format_cpu_list, serialize_cpus};
use super::topology::Topology;

/// What a data-plane thread does, which decides where it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ThreadRole {
    /// Data stream senders and receivers, ack readers, RDMA completion threads: next to
    /// the NIC.
    Transport,
    /// Disk bulk copy and mirroring (io_uring): next to the disk.
    Disk,
    /// Dirty tracking, hashing (trace, verify): next to guest memory.
    Tracker,
    /// The reference VM's vCPUs: not narrowed unless CPUs are restricted.
    Guest,
    /// Everything else (control channels, watchers): every allowed CPU.
    Control,
}

impl ThreadRole {
    /// Every role, in the order of [`Placement::roles`].
    pub const ALL: [ThreadRole; 5] = [
        ThreadRole::Transport,
        ThreadRole::Disk,
        ThreadRole::Tracker,
        ThreadRole::Guest,
        ThreadRole::Control,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadRole::Transport => "transport",
            ThreadRole::Disk => "disk",
            ThreadRole::Tracker => "tracker",
            ThreadRole::Guest => "guest",
            ThreadRole::Control => "control",
        }
    }

    /// Position in [`ThreadRole::ALL`].
    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for ThreadRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What the plan is asked to respect.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct PlacementRequest {
    /// CPUs the data plane may use (`--cpus`); `None`: every CPU of the topology.
    pub allowed_cpus: Option<Vec<u32>>,
    /// The node of the NIC the data streams use, when known.
    pub nic_node: Option<u32>,
    /// The node of the disk holding the VMs' images, when known.
    pub disk_node: Option<u32>,
    /// The node holding guest memory when it is not the NIC's (`None`: the NIC's).
    pub memory_node: Option<u32>,
    /// Data streams per migration (transport threads per direction).
    pub streams: usize,
}

/// Where one role runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RolePlacement {
    pub role: ThreadRole,
    /// The CPUs its threads are pinned to (never empty when the topology has CPUs).
    #[serde(serialize_with = "serialize_cpus")]
    pub cpus: Vec<u32>,
    /// The CPUs are narrower than the whole machine, or CPUs were restricted: `false`
    /// means the role may run anywhere.
    pub pinned: bool,
    /// The node those CPUs belong to (`None`: they span nodes).
    pub node: Option<u32>,
    /// The node its buffers are bound to (`None`: not bound).
    pub memory_node: Option<u32>,
    /// Why, in a few words.
    pub why: String,
}

/// The plan: one [`RolePlacement`] per [`ThreadRole`], and what the planner had to settle.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Placement {
    /// The CPUs the data plane uses (the allowed CPUs that exist).
    #[serde(serialize_with = "serialize_cpus")]
    pub allowed_cpus: Vec<u32>,
    /// NUMA nodes in the topology.
    pub nodes: usize,
    /// In [`ThreadRole::ALL`] order.
    pub roles: Vec<RolePlacement>,
    /// Fallbacks and decisions worth telling the operator.
    pub notes: Vec<String>,
}

impl Placement {
    /// The placement of `role`.
    pub fn role(&self, role: ThreadRole) -> &RolePlacement {
        &self.roles[role.index()]
    }

    /// The CPUs `role`'s threads run on.
    pub fn cpus(&self, role: ThreadRole) -> &[u32] {
        &self.role(role).cpus
    }

    /// The node `role`'s buffers are bound to (`None`: not bound).
    pub fn memory_node(&self, role: ThreadRole) -> Option<u32> {
        self.role(role).memory_node
    }
}

/// Plans where every role runs; see the module documentation for the rules.
pub fn plan(topology: &Topology, request: &PlacementRequest) -> Placement {
    let mut notes = Vec::new();
    let every_cpu = topology.cpus();
    let restricted = request.allowed_cpus.is_some();
    let allowed = match &request.allowed_cpus {
        None => every_cpu.clone(),
        Some(asked) => {
            let (known, unknown): (Vec<u32>, Vec<u32>) =
                asked.iter().partition(|cpu| every_cpu.contains(cpu));
            if known.is_empty() {
                notes.push(format!(
                    "none of the allowed CPUs {} exists: using every CPU ({})",
                    format_cpu_list(asked),
                    format_cpu_list(&every_cpu)
                ));
                every_cpu.clone()
            } else {
                if !unknown.is_empty() {
                    notes.push(format!(
                        "CPUs {} are not in the topology: ignored",
                        format_cpu_list(&unknown)
                    ));
                }
                let mut known = known;
                known.sort_unstable();
                known.dedup();
                known
            }
        }
    };
    let pinned = |cpus: &[u32]| restricted || cpus != every_cpu.as_slice();
    let node_of = |cpus: &[u32]| -> Option<u32> {
        let first = topology.node_of_cpu(*cpus.first()?)?;
        cpus.iter()
            .all(|&cpu| topology.node_of_cpu(cpu) == Some(first))
            .then_some(first)
    };
    let whole = |role: ThreadRole, memory_node: Option<u32>, why: &str| RolePlacement {
        role,
        cpus: allowed.clone(),
        pinned: pinned(&allowed),
        node: node_of(&allowed),
        memory_node,
        why: why.to_string(),
    };
    if allowed.is_empty() {
        notes.push("no CPUs known: threads are not pinned".to_string());
    }

    if topology.nodes.len() <= 1 {
        if topology.nodes.len() == 1 {
            notes.push("one NUMA node: buffers not bound".to_string());
        }
        let why = "one NUMA node";
        let roles = ThreadRole::ALL
            .iter()
            .map(|&role| whole(role, None, why))
            .collect();
        let placement = Placement {
            allowed_cpus: allowed.clone(),
            nodes: topology.nodes.len(),
            roles,
            notes,
        };
        return with_stream_note(placement, request.streams);
    }

    // Several nodes. A node named by the request that the topology lacks is unknown.
    let mut known_node = |what: &str, node: Option<u32>| -> Option<u32> {
        let node = node?;
        if topology.node(node).is_some() {
            Some(node)
        } else {
            notes.push(format!(
                "the {what}'s node {node} is not in the topology: treated as unknown"
            ));
            None
        }
    };
    let nic_node = known_node("NIC", request.nic_node);
    let disk_node = known_node("disk", request.disk_node);
    let memory_node = known_node("guest memory", request.memory_node);
    let allowed_on = |node: u32| -> Vec<u32> {
        topology
            .node(node)
            .map(|n| {
                n.cpus
                    .iter()
                    .copied()
                    .filter(|cpu| allowed.contains(cpu))
                    .collect()
            })
            .unwrap_or_default()
    };
    // The node with the most allowed CPUs, the lowest-numbered on a tie.
    let busiest = topology
        .nodes
        .iter()
        .map(|n| (allowed_on(n.os_index).len(), std::cmp::Reverse(n.os_index)))
        .max()
        .map(|(_, std::cmp::Reverse(node))| node)
        .unwrap_or(0);

    let (transport_node, transport_why) = match nic_node {
        Some(node) => (node, "the NIC's node".to_string()),
        None => {
            notes.push(format!(
                "the NIC's node is unknown: transport on node {busiest}, the one with the most allowed CPUs"
            ));
            (busiest, "NIC's node unknown: most allowed CPUs".to_string())
        }
    };
    let (disk_node, disk_why) = match disk_node {
        Some(node) => (node, "the disk's node".to_string()),
        None => (
            transport_node,
            "disk's node unknown: beside the transport".to_string(),
        ),
    };
    let (memory_node, tracker_why) = match memory_node {
        Some(node) => (node, "the node holding guest memory".to_string()),
        None => (
            transport_node,
            "guest memory's node (the NIC writes it)".to_string(),
        ),
    };

    let mut on_node = |role: ThreadRole, node: u32, why: String| -> RolePlacement {
        let cpus = allowed_on(node);
        if cpus.is_empty() {
            notes.push(format!(
                "{role}: no allowed CPU on node {node}: its threads run on {} (other nodes), its buffers stay on node {node}",
                format_cpu_list(&allowed)
            ));
            RolePlacement {
                role,
                cpus: allowed.clone(),
                pinned: pinned(&allowed),
                node: node_of(&allowed),
                memory_node: Some(node),
                why: format!("{why}, which has no allowed CPU"),
            }
        } else {
            RolePlacement {
                role,
                pinned: pinned(&cpus),
                node: Some(node),
                cpus,
                memory_node: Some(node),
                why,
            }
        }
    };
    let transport = on_node(ThreadRole::Transport, transport_node, transport_why);
    let disk = on_node(ThreadRole::Disk, disk_node, disk_why);
    let tracker = on_node(ThreadRole::Tracker, memory_node, tracker_why);
    let guest_why = if restricted {
        "vCPUs: every allowed CPU"
    } else {
        "vCPUs: not narrowed"
    };
    let guest = whole(ThreadRole::Guest, Some(memory_node), guest_why);
    let control = whole(ThreadRole::Control, None, "everything else");
    let placement = Placement {
        allowed_cpus: allowed.clone(),
        nodes: topology.nodes.len(),
        roles: vec![transport, disk, tracker, guest, control],
        notes,
    };
    with_stream_note(placement, request.streams)
}

/// Says so when the data streams outnumber the transport CPUs.
fn with_stream_note(mut placement: Placement, streams: usize) -> Placement {
    let cpus = placement.cpus(ThreadRole::Transport).len();
    if cpus > 0 && streams > cpus {
        placement.notes.push(format!(
            "{streams} data streams share {cpus} transport CPU{}",
            if cpus == 1 { "" } else { "s" }
        ));
    }
    placement
}

impl fmt::Display for Placement {
    /// A table, one role per line, then the notes:
    ///
    /// ```text
    /// role       cpus  node  memory     why
    /// transport  4-7   1     node 1     the NIC's node
    /// ```
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let rows: Vec<[String; 5]> = self
            .roles
            .iter()
            .map(|r| {
                let mut cpus = format_cpu_list(&r.cpus);
                if cpus.is_empty() {
                    cpus = "-".into();
                }
                if !r.pinned {
                    cpus.push_str(" (any)");
                }
                [
                    r.role.name().to_string(),
                    cpus,
                    r.node.map_or("-".into(), |n| n.to_string()),
                    r.memory_node
                        .map_or("not bound".into(), |n| format!("node {n}")),
                    r.why.clone(),
                ]
            })
            .collect();
        let header = ["role", "cpus", "node", "memory", "why"].map(String::from);
        let widths: Vec<usize> = (0..4)
            .map(|c| {
                std::iter::once(&header)
                    .chain(&rows)
                    .map(|row| row[c].len())
                    .max()
                    .unwrap_or(0)
            })
            .collect();
        for row in std::iter::once(&header).chain(&rows) {
            for (c, width) in widths.iter().enumerate() {
                write!(f, "{:<width$}  ", row[c])?;
            }
            writeln!(f, "{}", row[4])?;
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::topology::Node;

    fn request(nic_node: Option<u32>, disk_node: Option<u32>) -> PlacementRequest {
        PlacementRequest {
            nic_node,
            disk_node,
            streams: 4,
            ..PlacementRequest::default()
        }
    }

    fn has_note(placement: &Placement, text: &str) -> bool {
        placement.notes.iter().any(|n| n.contains(text))
    }

    #[test]
    fn plan_two_nodes_puts_transport_on_the_nics_node() {
        let topology = Topology::synthetic(2, 4);
        let placement = plan(&topology, &request(Some(1), None));
        assert_eq!(placement.cpus(ThreadRole::Transport), &[4, 5, 6, 7]);
        assert_eq!(placement.role(ThreadRole::Transport).node, Some(1));
        assert_eq!(placement.memory_node(ThreadRole::Transport), Some(1));
        // The disk's node is unknown: beside the transport. Guest memory: the NIC's node.
        assert_eq!(placement.cpus(ThreadRole::Disk), &[4, 5, 6, 7]);
        assert_eq!(placement.cpus(ThreadRole::Tracker), &[4, 5, 6, 7]);
        assert_eq!(placement.memory_node(ThreadRole::Tracker), Some(1));
        // vCPUs and control are not narrowed.
        for role in [ThreadRole::Guest, ThreadRole::Control] {
            assert_eq!(placement.cpus(role), (0..8).collect::<Vec<_>>().as_slice());
            assert!(!placement.role(role).pinned, "{role}");
        }
        assert_eq!(placement.memory_node(ThreadRole::Control), None);
        assert!(placement.role(ThreadRole::Transport).pinned);
        assert!(placement.notes.is_empty(), "{:?}", placement.notes);
    }

    #[test]
    fn plan_four_nodes_separates_disk_and_transport() {
        let topology = Topology::synthetic(4, 2);
        let placement = plan(&topology, &request(Some(1), Some(3)));
        assert_eq!(placement.cpus(ThreadRole::Transport), &[2, 3]);
        assert_eq!(placement.role(ThreadRole::Transport).node, Some(1));
        assert_eq!(placement.cpus(ThreadRole::Disk), &[6, 7]);
        assert_eq!(placement.role(ThreadRole::Disk).node, Some(3));
        assert_eq!(placement.memory_node(ThreadRole::Disk), Some(3));
        assert_eq!(placement.cpus(ThreadRole::Tracker), &[2, 3]);
        assert_eq!(placement.nodes, 4);
        // Four streams on two transport CPUs: said.
        assert!(has_note(
            &placement,
            "4 data streams share 2 transport CPUs"
        ));
    }

    #[test]
    fn plan_guest_memory_elsewhere_moves_the_tracker() {
        let topology = Topology::synthetic(2, 2);
        let mut req = request(Some(1), None);
        req.memory_node = Some(0);
        let placement = plan(&topology, &req);
        assert_eq!(placement.cpus(ThreadRole::Tracker), &[0, 1]);
        assert_eq!(placement.memory_node(ThreadRole::Guest), Some(0));
        assert_eq!(placement.cpus(ThreadRole::Transport), &[2, 3]);
    }

    #[test]
    fn plan_cpus_off_the_nics_node_fall_back_with_a_note() {
        let topology = Topology::synthetic(2, 4);
        let mut req = request(Some(1), None);
        req.allowed_cpus = Some(vec![0, 1, 2, 3]);
        let placement = plan(&topology, &req);
        assert_eq!(placement.cpus(ThreadRole::Transport), &[0, 1, 2, 3]);
        assert_eq!(placement.role(ThreadRole::Transport).node, Some(0));
        // The NIC still DMAs into node 1: its buffers stay there.
        assert_eq!(placement.memory_node(ThreadRole::Transport), Some(1));
        assert!(
            has_note(&placement, "transport: no allowed CPU on node 1"),
            "{:?}",
            placement.notes
        );
        // Every role stays inside the allowed CPUs, and all are pinned (CPUs restricted).
        for role in ThreadRole::ALL {
            assert!(placement.cpus(role).iter().all(|cpu| *cpu < 4), "{role}");
            assert!(placement.role(role).pinned, "{role}");
        }
    }

    #[test]
    fn plan_allowed_cpus_narrow_the_nics_node() {
        let topology = Topology::synthetic(2, 4);
        let mut req = request(Some(1), None);
        req.allowed_cpus = Some(vec![0, 5, 6]);
        let placement = plan(&topology, &req);
        assert_eq!(placement.cpus(ThreadRole::Transport), &[5, 6]);
        assert_eq!(placement.cpus(ThreadRole::Control), &[0, 5, 6]);
        assert_eq!(placement.cpus(ThreadRole::Guest), &[0, 5, 6]);
        assert!(placement.role(ThreadRole::Guest).pinned);
        assert_eq!(placement.role(ThreadRole::Control).node, None);
    }

    #[test]
    fn plan_one_node_uses_every_cpu_and_binds_nothing() {
        let topology = Topology::single(vec![0, 1, 2, 3]);
        let placement = plan(&topology, &request(None, None));
        for role in ThreadRole::ALL {
            assert_eq!(placement.cpus(role), &[0, 1, 2, 3], "{role}");
            assert_eq!(placement.memory_node(role), None, "{role}");
            assert_eq!(placement.role(role).node, Some(0), "{role}");
            assert!(!placement.role(role).pinned, "{role}");
        }
        assert!(has_note(&placement, "one NUMA node: buffers not bound"));
    }

    #[test]
    fn plan_one_node_with_allowed_cpus_pins_every_role() {
        let topology = Topology::single(vec![0, 1]);
        let mut req = request(None, None);
        req.allowed_cpus = Some(vec![0]);
        let placement = plan(&topology, &req);
        for role in ThreadRole::ALL {
            assert_eq!(placement.cpus(role), &[0], "{role}");
            assert!(placement.role(role).pinned, "{role}");
        }
    }

    #[test]
    fn plan_unknown_nic_node_picks_the_node_with_most_allowed_cpus() {
        let topology = Topology::synthetic(4, 2);
        let mut req = request(None, None);
        req.allowed_cpus = Some(vec![0, 4, 5, 6]);
        let placement = plan(&topology, &req);
        assert_eq!(placement.role(ThreadRole::Transport).node, Some(2));
        assert_eq!(placement.cpus(ThreadRole::Transport), &[4, 5]);
        assert!(has_note(&placement, "the NIC's node is unknown"));
        // Ties go to the lowest node.
        let placement = plan(&topology, &request(None, None));
        assert_eq!(placement.role(ThreadRole::Transport).node, Some(0));
    }

    #[test]
    fn plan_nic_node_outside_the_topology_is_unknown() {
        let topology = Topology::synthetic(2, 2);
        let placement = plan(&topology, &request(Some(7), None));
        assert!(has_note(
            &placement,
            "the NIC's node 7 is not in the topology"
        ));
        assert_eq!(placement.role(ThreadRole::Transport).node, Some(0));
    }

    #[test]
    fn plan_allowed_cpus_that_do_not_exist_are_dropped_with_a_note() {
        let topology = Topology::synthetic(2, 2);
        let mut req = request(Some(1), None);
        req.allowed_cpus = Some(vec![2, 99]);
        let placement = plan(&topology, &req);
        assert_eq!(placement.allowed_cpus, vec![2]);
        assert_eq!(placement.cpus(ThreadRole::Transport), &[2]);
        assert!(has_note(
            &placement,
            "CPUs 99 are not in the topology: ignored"
        ));
        // None exists at all: every CPU, said so (the agent refuses this before planning).
        req.allowed_cpus = Some(vec![99]);
        let placement = plan(&topology, &req);
        assert_eq!(placement.allowed_cpus, vec![0, 1, 2, 3]);
        assert!(has_note(&placement, "none of the allowed CPUs 99 exists"));
    }

    #[test]
    fn plan_skips_memory_only_nodes() {
        // Node 1 is memory only (CXL): the NIC hangs off it, its threads go elsewhere.
        let mut topology = Topology::synthetic(2, 2);
        topology.nodes[1].cpus.clear();
        topology.nodes.push(Node {
            os_index: 2,
            cpus: vec![2, 3, 4],
            memory_bytes: 1 << 30,
        });
        let placement = plan(&topology, &request(Some(1), None));
        assert_eq!(placement.cpus(ThreadRole::Transport), &[0, 1, 2, 3, 4]);
        assert_eq!(placement.memory_node(ThreadRole::Transport), Some(1));
        assert!(has_note(&placement, "no allowed CPU on node 1"));
    }

    #[test]
    fn plan_displays_a_table_and_serializes() {
        let topology = Topology::synthetic(2, 4);
        let placement = plan(&topology, &request(Some(1), None));
        let table = placement.to_string();
        let transport = table
            .lines()
            .find(|l| l.starts_with("transport"))
            .expect("a transport row");
        assert!(transport.contains("4-7"), "{table}");
        assert!(transport.contains("node 1"), "{table}");
        assert!(table.contains("0-7 (any)"), "{table}");
        let json = serde_json::to_value(&placement).unwrap();
        assert_eq!(json["roles"][0]["role"], "transport");
        assert_eq!(json["roles"][0]["cpus"], "4-7");
        assert_eq!(json["roles"][0]["memory_node"], 1);
        assert_eq!(json["allowed_cpus"], "0-7");
    }
}
