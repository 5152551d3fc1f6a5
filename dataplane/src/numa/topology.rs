//! The host as the planner sees it: NUMA nodes (their CPUs and memory) and the node of the
//! devices the data plane talks to. Plain data, so that the planner can be tested on
//! machines this one is not ([`Topology::synthetic`]); [`super::read_host`] fills it from
//! hwloc and sysfs.

use std::fmt;

use serde::Serialize;

use super::cpulist::{format_cpu_list, serialize_cpus};
use crate::units::format_bytes;

/// NUMA nodes and devices.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Topology {
    /// In ascending `os_index` order.
    pub nodes: Vec<Node>,
    /// The NICs and disks found, with their node when the platform says it.
    pub devices: Vec<Device>,
}

/// One NUMA node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Node {
    /// The kernel's node number (`/sys/devices/system/node/nodeN`, `mbind`'s bit).
    pub os_index: u32,
    /// Its CPUs (kernel ids, sorted); empty for a memory-only node (CXL, HBM).
    #[serde(serialize_with = "serialize_cpus")]
    pub cpus: Vec<u32>,
    /// Memory local to the node.
    pub memory_bytes: u64,
}

/// What a device is to the data plane.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Nic,
    Disk,
}

/// A NIC or disk and the node it hangs off (`None`: unknown, e.g. a virtual device or a
/// platform that does not say).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Device {
    /// The kernel's name: `eth0`, `nvme0n1`.
    pub name: String,
    pub kind: DeviceKind,
    pub node: Option<u32>,
}

impl Topology {
    /// `nodes` nodes of `cpus_per_node` CPUs each, numbered like Linux on a typical
    /// two-socket machine: node `n` holds CPUs `n * cpus_per_node ..`, 1 GiB each.
    pub fn synthetic(nodes: u32, cpus_per_node: u32) -> Self {
        Self {
            nodes: (0..nodes)
                .map(|n| Node {
                    os_index: n,
                    cpus: (n * cpus_per_node..(n + 1) * cpus_per_node).collect(),
                    memory_bytes: 1 << 30,
                })
                .collect(),
            devices: Vec::new(),
        }
    }

    /// One node (node 0) holding `cpus`, memory unknown (0): what a machine without NUMA
    /// looks like, and the fallback when the topology cannot be read.
    pub fn single(cpus: Vec<u32>) -> Self {
        let mut cpus = cpus;
        cpus.sort_unstable();
        cpus.dedup();
        Self {
            nodes: vec![Node {
                os_index: 0,
                cpus,
                memory_bytes: 0,
            }],
            devices: Vec::new(),
        }
    }

    /// This topology with `device` added (replacing one of the same name and kind).
    pub fn with_device(mut self, device: Device) -> Self {
        self.devices
            .retain(|d| !(d.name == device.name && d.kind == device.kind));
        self.devices.push(device);
        self
    }

    /// Every CPU of every node, sorted.
    pub fn cpus(&self) -> Vec<u32> {
        let mut cpus: Vec<u32> = self.nodes.iter().flat_map(|n| n.cpus.clone()).collect();
        cpus.sort_unstable();
        cpus.dedup();
        cpus
    }

    /// The node `os_index`, if the topology has it.
    pub fn node(&self, os_index: u32) -> Option<&Node> {
        self.nodes.iter().find(|n| n.os_index == os_index)
    }

    /// The node holding `cpu`.
    pub fn node_of_cpu(&self, cpu: u32) -> Option<u32> {
        self.nodes
            .iter()
            .find(|n| n.cpus.contains(&cpu))
            .map(|n| n.os_index)
    }

    /// The node of the device `name` of kind `kind`, when known.
    pub fn device_node(&self, kind: DeviceKind, name: &str) -> Option<u32> {
        self.devices
            .iter()
            .find(|d| d.kind == kind && d.name == name)
            .and_then(|d| d.node)
    }

    /// The same machine seen by a process allowed to run on `allowed` only (its affinity
    /// mask, a cgroup's cpuset): every node keeps its memory, loses the other CPUs.
    pub fn restricted_to(&self, allowed: &[u32]) -> Self {
        let mut restricted = self.clone();
        for node in &mut restricted.nodes {
            node.cpus.retain(|cpu| allowed.contains(cpu));
        }
        restricted
    }
}

impl fmt::Display for Topology {
    /// `NUMA nodes: 2`, then one line per node and per device.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "NUMA nodes: {}", self.nodes.len())?;
        for node in &self.nodes {
            let cpus = if node.cpus.is_empty() {
                "none".to_string()
            } else {
                format_cpu_list(&node.cpus)
            };
            let memory = if node.memory_bytes == 0 {
                "unknown".to_string()
            } else {
                format_bytes(node.memory_bytes)
            };
            writeln!(f, "  node {}: cpus {cpus}, memory {memory}", node.os_index)?;
        }
        for device in &self.devices {
            let kind = match device.kind {
                DeviceKind::Nic => "nic",
                DeviceKind::Disk => "disk",
            };
            match device.node {
                Some(node) => writeln!(f, "  {kind} {}: node {node}", device.name)?,
                None => writeln!(f, "  {kind} {}: node unknown", device.name)?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topology_synthetic_numbers_cpus_by_node() {
        let topology = Topology::synthetic(2, 4);
        assert_eq!(topology.nodes.len(), 2);
        assert_eq!(topology.nodes[1].cpus, vec![4, 5, 6, 7]);
        assert_eq!(topology.cpus(), (0..8).collect::<Vec<_>>());
        assert_eq!(topology.node_of_cpu(5), Some(1));
        assert_eq!(topology.node_of_cpu(8), None);
    }

    #[test]
    fn topology_restricted_keeps_nodes_and_drops_cpus() {
        let topology = Topology::synthetic(2, 2).restricted_to(&[0, 3]);
        assert_eq!(topology.nodes[0].cpus, vec![0]);
        assert_eq!(topology.nodes[1].cpus, vec![3]);
        assert_eq!(topology.nodes[1].memory_bytes, 1 << 30);
    }

    #[test]
    fn topology_devices_are_found_by_kind_and_name() {
        let topology = Topology::single(vec![1, 0]).with_device(Device {
            name: "eth0".into(),
            kind: DeviceKind::Nic,
            node: Some(0),
        });
        assert_eq!(topology.nodes[0].cpus, vec![0, 1]);
        assert_eq!(topology.device_node(DeviceKind::Nic, "eth0"), Some(0));
        assert_eq!(topology.device_node(DeviceKind::Disk, "eth0"), None);
        let shown = topology.to_string();
        assert!(
            shown.contains("node 0: cpus 0-1, memory unknown"),
            "{shown}"
        );
        assert!(shown.contains("nic eth0: node 0"), "{shown}");
    }
}
