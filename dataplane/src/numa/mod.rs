//! NUMA placement of the data plane: which CPUs its threads run on and which node its
//! buffers live on.
//!
//! On a machine with several NUMA nodes a page crosses the interconnect every time a thread
//! touches memory, or a NIC DMAs into memory, of another node. The data plane avoids that
//! by placing each kind of thread ([`ThreadRole`]) next to what it touches: transport
//! threads on the NIC's node, disk threads on the disk's node, dirty tracking and hashing
//! next to guest memory (which the NIC writes on the destination, so the NIC's node too).
//!
//! The pieces, in the order the agent uses them at start:
//!
//! 1. [`read_host`] ([`hwloc`]): the [`Topology`] — NUMA nodes, their CPUs and memory, and
//!    the devices hwloc sees — from hwloc through `hwlocality`.
//! 2. [`nic_for_addr`], [`disk_for_path`], [`Sysfs`] ([`sysfs`]): the NIC of the listen
//!    address and the disk of the data directory, and their nodes from sysfs.
//! 3. [`plan()`] ([`plan`](mod@plan)): a pure function from the topology and a
//!    [`PlacementRequest`] (allowed CPUs, device nodes) to a [`Placement`] — per role, the
//!    CPUs and the memory node, with the reasons — printed by `ferry agent
//!    --show-placement`.
//! 4. [`install`] ([`spawn`](mod@spawn)): the placement becomes the process's; from then on
//!    every data-plane thread, started through [`spawn()`] or [`spawn_scoped`], pins itself to
//!    its role's CPUs ([`run_as`] pins the calling thread for a section), and
//!    [`bind_buffer`] binds a role's buffers to its node (`mbind`).
//!
//! The system calls are in [`pin`]. Without an installed placement (tests, benches, a
//! library user) nothing is pinned or bound: placement only ever changes where work runs,
//! never whether it runs.

pub mod cpulist;
pub mod hwloc;
pub mod pin;
pub mod plan;
pub mod spawn;
pub mod sysfs;
pub mod topology;

pub use cpulist::{format_cpu_list, parse_cpu_list, CPU_ID_LIMIT};
pub use hwloc::read_host;
pub use pin::{bind_memory, set_thread_affinity, thread_affinity};
pub use plan::{plan, Placement, PlacementRequest, RolePlacement, ThreadRole};
pub use spawn::{
    bind_buffer, bind_buffer_with, install, installed, parallelism, pinned_threads, run_as,
    run_as_with, spawn, spawn_scoped, spawn_scoped_with, spawn_with,
};
pub use sysfs::{disk_for_path, nic_for_addr, Sysfs};
pub use topology::{Device, DeviceKind, Node, Topology};

/// What can go wrong reading the topology, pinning or binding.
#[derive(Debug, thiserror::Error)]
pub enum NumaError {
    #[error("bad CPU list `{list}`: {reason}")]
    CpuList { list: String, reason: String },
    #[error("CPUs {requested} are not available to this process (it may use {allowed})")]
    CpusNotAllowed { requested: String, allowed: String },
    #[error("pinning a thread to CPUs {cpus} failed")]
    Affinity {
        cpus: String,
        source: std::io::Error,
    },
    #[error("binding {len} bytes to NUMA node {node} failed")]
    Bind {
        node: u32,
        len: usize,
        source: std::io::Error,
    },
    #[error("hwloc failed {op}")]
    Hwloc {
        op: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("hwloc found no NUMA node with a CPU")]
    NoNodes,
    #[error("a placement is already installed in this process")]
    AlreadyInstalled,
}

/// Checks that every CPU of `requested` (`--cpus`) is in `allowed` (the process's affinity),
/// so that a typo fails at start instead of leaving threads unpinned.
pub fn check_cpus(requested: &[u32], allowed: &[u32]) -> Result<(), NumaError> {
    let missing: Vec<u32> = requested
        .iter()
        .copied()
        .filter(|cpu| !allowed.contains(cpu))
        .collect();
    if missing.is_empty() && !requested.is_empty() {
        return Ok(());
    }
    Err(NumaError::CpusNotAllowed {
        requested: format_cpu_list(if missing.is_empty() {
            requested
        } else {
            &missing
        }),
        allowed: format_cpu_list(allowed),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numa_check_cpus_names_the_missing_ones() {
        check_cpus(&[0, 1], &[0, 1, 2]).unwrap();
        let err = check_cpus(&[1, 99, 100], &[0, 1]).unwrap_err().to_string();
        assert_eq!(
            err,
            "CPUs 99-100 are not available to this process (it may use 0-1)"
        );
    }
}
