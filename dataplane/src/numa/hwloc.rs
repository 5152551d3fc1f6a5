//! The host's topology from hwloc (through `hwlocality`; `hwloc2` panics on hwloc 2.x NUMA
//! queries): NUMA nodes with their CPUs and memory, and the NICs and disks hwloc sees with
//! the node they hang off. hwloc reports what this process is allowed to use (cgroup
//! cpusets), not the whole machine.

use hwlocality::object::attributes::ObjectAttributes;
use hwlocality::object::types::{OSDeviceType, ObjectType};
use hwlocality::object::TopologyObject;
use hwlocality::topology::builder::TypeFilter;

use super::topology::{Device, DeviceKind, Node, Topology};
use super::NumaError;

/// Reads this host's topology. I/O discovery is on for NICs and disks (hwloc's "important"
/// I/O objects: no bridges it does not need).
pub fn read_host() -> Result<Topology, NumaError> {
    let hwloc = hwlocality::Topology::builder()
        .with_io_type_filter(TypeFilter::KeepImportant)
        .map_err(|source| NumaError::Hwloc {
            op: "asking for I/O objects",
            source: Box::new(source),
        })?
        .build()
        .map_err(|source| NumaError::Hwloc {
            op: "discovering the topology",
            source: Box::new(source),
        })?;
    from_hwloc(&hwloc)
}

/// Our model of a hwloc topology. Fails only if hwloc found no NUMA node with a CPU.
pub fn from_hwloc(hwloc: &hwlocality::Topology) -> Result<Topology, NumaError> {
    let mut nodes: Vec<Node> = hwloc
        .objects_with_type(ObjectType::NUMANode)
        .filter_map(|object| {
            let os_index = u32::try_from(object.os_index()?).ok()?;
            let cpus = object
                .cpuset()
                .map(|set| {
                    set.iter_set()
                        .filter_map(|cpu| u32::try_from(usize::from(cpu)).ok())
                        .collect()
                })
                .unwrap_or_default();
            let memory_bytes = match object.attributes() {
                Some(ObjectAttributes::NUMANode(attributes)) => attributes
                    .local_memory()
                    .map_or(object.total_memory(), |bytes| bytes.get()),
                _ => object.total_memory(),
            };
            Some(Node {
                os_index,
                cpus,
                memory_bytes,
            })
        })
        .collect();
    nodes.sort_by_key(|node| node.os_index);
    if nodes.iter().all(|node| node.cpus.is_empty()) {
        return Err(NumaError::NoNodes);
    }
    let devices = hwloc
        .io_objects()
        .filter_map(|object| {
            let kind = match object.attributes() {
                Some(ObjectAttributes::OSDevice(osdev)) => match osdev.device_type() {
                    OSDeviceType::Network => DeviceKind::Nic,
                    OSDeviceType::Storage => DeviceKind::Disk,
                    _ => return None,
                },
                _ => return None,
            };
            Some(Device {
                name: object.name()?.to_string_lossy().into_owned(),
                kind,
                node: device_node(object),
            })
        })
        .collect();
    Ok(Topology { nodes, devices })
}

/// The node an I/O object hangs off: the nodeset of its first non-I/O ancestor, when that
/// is one node (a device attached to the whole machine of several nodes is unknown).
fn device_node(object: &TopologyObject) -> Option<u32> {
    let nodeset = object.first_non_io_ancestor()?.nodeset()?;
    if nodeset.weight() != Some(1) {
        return None;
    }
    u32::try_from(usize::from(nodeset.first_set()?)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn synthetic(description: &str) -> Topology {
        let hwloc = hwlocality::Topology::builder()
            .from_synthetic(description)
            .unwrap()
            .build()
            .unwrap();
        from_hwloc(&hwloc).unwrap()
    }

    #[test]
    fn numa_hwloc_reads_synthetic_four_nodes() {
        let topology = synthetic("node:4 core:2 pu:2");
        assert_eq!(topology.nodes.len(), 4);
        for (n, node) in topology.nodes.iter().enumerate() {
            let n = n as u32;
            assert_eq!(node.os_index, n);
            assert_eq!(node.cpus, (4 * n..4 * n + 4).collect::<Vec<_>>());
            assert!(node.memory_bytes > 0);
        }
    }

    #[test]
    fn numa_hwloc_reads_synthetic_packages() {
        let topology = synthetic("pack:2 [numa] core:3 pu:1");
        assert_eq!(topology.nodes.len(), 2);
        assert_eq!(topology.nodes[1].cpus, vec![3, 4, 5]);
    }

    #[test]
    fn numa_read_host_finds_every_usable_cpu() {
        let topology = read_host().unwrap();
        assert!(!topology.nodes.is_empty());
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert!(
            topology.cpus().len() >= cpus,
            "hwloc: {:?}, available_parallelism: {cpus}",
            topology.cpus()
        );
        assert!(topology.nodes.iter().any(|n| n.memory_bytes > 0));
        // Every device has a name; on one node a known node can only be that one.
        for device in &topology.devices {
            assert!(!device.name.is_empty());
            if topology.nodes.len() == 1 {
                assert!(device.node.is_none_or(|n| n == topology.nodes[0].os_index));
            }
        }
    }
}
