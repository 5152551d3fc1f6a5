//! The VMs an agent hosts, by name.
//!
//! A name is reserved before the (slow) boot or pre-fault of its VM and released if that
//! fails, so two requests for the same name cannot both boot a VM. The map's lock is held
//! only to look up or change entries: booting, verifying and status calls run outside it on
//! a cloned `Arc`.
//!
//! States and who moves them:
//! ```text
//! create:   reserve(Running) ─▶ attach(vm)                     (release on boot failure)
//! outgoing: Running ─begin_outgoing─▶ Migrating ─▶ removed (Ok) | Running (fail-back)
//! incoming: reserve(Incoming) ─▶ attach(vm) ─▶ Running (Ok) | removed (failure)
//! ```
//!
//! An entry also remembers the VM's disk image and whether the agent owns it
//! ([`HostedDisk`]); whoever removes the entry decides about the image. Two entries never
//! share an image.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_dataplane::guest::reference::{ReferenceVm, VmSpec};

use crate::api::{DiskInfo, VmInfo, VmState};
use crate::disks::HostedDisk;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegistryError {
    #[error("no VM named {name:?} on this agent")]
    NotFound { name: String },
    #[error("a VM named {name:?} already exists on this agent")]
    AlreadyExists { name: String },
    #[error("VM {name:?} is {state}; {operation} needs a VM that is not migrating (cancel the migration first)")]
    Busy {
        name: String,
        state: VmState,
        operation: &'static str,
    },
    #[error("VM {name:?} is still being set up; try again in a moment")]
    NotReady { name: String },
    #[error("the disk {} is already the disk of VM {owner:?} on this agent", path.display())]
    DiskInUse {
        path: std::path::PathBuf,
        owner: String,
    },
}

struct Entry {
    spec: VmSpec,
    /// `None` while the VM boots (or pre-faults, when incoming).
    vm: Option<Arc<ReferenceVm>>,
    state: VmState,
    /// Cancels the migration in progress, outgoing or incoming; a fresh flag per migration.
    cancel: Arc<AtomicBool>,
    disk: Option<HostedDisk>,
    /// Incoming only: the migration has loaded the device state into the VM, so it is in
    /// its last steps (commit, resume) and about to become Running.
    state_loaded: bool,
}

/// What a started outgoing migration needs from the registry.
pub struct Outgoing {
    pub vm: Arc<ReferenceVm>,
    pub cancel: Arc<AtomicBool>,
    pub disk: Option<HostedDisk>,
}

/// A VM taken out of the registry, for the caller to shut down (and its image to delete
/// when the agent owns it).
pub struct Removed {
    pub vm: Arc<ReferenceVm>,
    pub disk: Option<HostedDisk>,
}

#[derive(Default)]
pub struct Registry {
    entries: Mutex<HashMap<String, Entry>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        // A panic while holding the lock leaves the map consistent (every change is one
        // insert, remove or field store), so a poisoned lock is still usable.
        self.entries
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Claims `spec.name` in `state` (Running for a create, Incoming for a migration) before
    /// its VM exists, and `disk`'s image, which no other entry may use (an image the agent is
    /// about to create is reserved with `agent_owned: false`, then [`Registry::claim_disk`]ed).
    /// Returns the cancel flag of the entry.
    pub fn reserve(
        &self,
        spec: &VmSpec,
        state: VmState,
        disk: Option<HostedDisk>,
    ) -> Result<Arc<AtomicBool>, RegistryError> {
        let mut entries = self.lock();
        if entries.contains_key(&spec.name) {
            return Err(RegistryError::AlreadyExists {
                name: spec.name.clone(),
            });
        }
        if let Some(disk) = &disk {
            let user = entries
                .iter()
                .find(|(_, e)| e.disk.as_ref().is_some_and(|d| d.path == disk.path));
            if let Some((owner, _)) = user {
                return Err(RegistryError::DiskInUse {
                    path: disk.path.clone(),
                    owner: owner.clone(),
                });
            }
        }
        let cancel = Arc::new(AtomicBool::new(false));
        entries.insert(
            spec.name.clone(),
            Entry {
                spec: spec.clone(),
                vm: None,
                state,
                cancel: Arc::clone(&cancel),
                disk,
                state_loaded: false,
            },
        );
        Ok(cancel)
    }

    /// Puts the booted VM into its reserved entry.
    pub fn attach(&self, name: &str, vm: Arc<ReferenceVm>) {
        match self.lock().get_mut(name) {
            Some(entry) => entry.vm = Some(vm),
            None => debug_assert!(false, "attach({name}) without a reservation"),
        }
    }

    /// Removes `name` whatever its state; returns its VM (if it had been attached) for the
    /// caller to shut down.
    pub fn remove(&self, name: &str) -> Option<Arc<ReferenceVm>> {
        self.lock().remove(name).and_then(|entry| entry.vm)
    }

    /// Marks `name`'s disk image as created by this agent (so deleted with the VM). Until
    /// then an entry only reserves the path: a file found there (a leftover) is not the
    /// agent's to delete, whoever removes the entry.
    pub fn claim_disk(&self, name: &str) {
        if let Some(disk) = self.lock().get_mut(name).and_then(|e| e.disk.as_mut()) {
            disk.agent_owned = true;
        }
    }

    /// The disk image of `name`'s entry.
    pub fn disk_of(&self, name: &str) -> Option<HostedDisk> {
        self.lock().get(name).and_then(|e| e.disk.clone())
    }

    /// Records that an incoming VM has its device state: the migration is finishing.
    pub fn mark_state_loaded(&self, name: &str) {
        if let Some(entry) = self.lock().get_mut(name) {
            entry.state_loaded = true;
        }
    }

    pub fn set_state(&self, name: &str, state: VmState) {
        if let Some(entry) = self.lock().get_mut(name) {
            entry.state = state;
        }
    }

    /// A VM that is hosted here and not moving (for verify).
    pub fn get_settled(
        &self,
        name: &str,
        operation: &'static str,
    ) -> Result<Arc<ReferenceVm>, RegistryError> {
        let entries = self.lock();
        let entry = entries
            .get(name)
            .ok_or_else(|| RegistryError::NotFound { name: name.into() })?;
        running_vm(name, entry, operation)
    }

    /// True while `name` is an incoming VM in the last steps of its migration: its device
    /// state is loaded (a VM taken over paused never runs here before `vm resume`) or its
    /// guest already runs (the engine resumed it after the source's commit), and the acceptor
    /// is about to mark it Running.
    pub fn incoming_finishing(&self, name: &str) -> bool {
        let (vm, state_loaded) = {
            let entries = self.lock();
            match entries.get(name) {
                Some(entry) if entry.state == VmState::Incoming => {
                    (entry.vm.clone(), entry.state_loaded)
                }
                _ => (None, false),
            }
        };
        vm.is_some_and(|vm| state_loaded || vm.status().running)
    }

    /// Running → Migrating, with a fresh cancel flag.
    pub fn begin_outgoing(&self, name: &str) -> Result<Outgoing, RegistryError> {
        let mut entries = self.lock();
        let entry = entries
            .get_mut(name)
            .ok_or_else(|| RegistryError::NotFound { name: name.into() })?;
        let vm = running_vm(name, entry, "migrate")?;
        entry.state = VmState::Migrating;
        entry.cancel = Arc::new(AtomicBool::new(false));
        Ok(Outgoing {
            vm,
            cancel: Arc::clone(&entry.cancel),
            disk: entry.disk.clone(),
        })
    }

    /// Removes a VM that is not migrating; returns it for the caller to shut down.
    pub fn destroy(&self, name: &str) -> Result<Removed, RegistryError> {
        let mut entries = self.lock();
        let entry = entries
            .get(name)
            .ok_or_else(|| RegistryError::NotFound { name: name.into() })?;
        running_vm(name, entry, "destroy")?;
        let entry = entries.remove(name).expect("checked above");
        Ok(Removed {
            vm: entry.vm.expect("checked above"),
            disk: entry.disk,
        })
    }

    /// Sets the cancel flag of `name`'s migration. `Ok(true)` when one was running.
    pub fn cancel(&self, name: &str) -> Result<bool, RegistryError> {
        let entries = self.lock();
        let entry = entries
            .get(name)
            .ok_or_else(|| RegistryError::NotFound { name: name.into() })?;
        if entry.state == VmState::Running {
            return Ok(false);
        }
        entry.cancel.store(true, Ordering::SeqCst);
        Ok(true)
    }

    /// Cancels every migration (agent shutdown).
    pub fn cancel_all(&self) {
        for entry in self.lock().values().filter(|e| e.state != VmState::Running) {
            entry.cancel.store(true, Ordering::SeqCst);
        }
    }

    /// Migrations in progress, either way.
    pub fn migrations_active(&self) -> usize {
        self.lock()
            .values()
            .filter(|e| e.state != VmState::Running)
            .count()
    }

    /// Removes every VM (agent shutdown); the caller shuts them down. Entries still booting
    /// have no VM but may have a disk.
    pub fn drain(&self) -> Vec<(Option<Arc<ReferenceVm>>, Option<HostedDisk>)> {
        self.lock().drain().map(|(_, e)| (e.vm, e.disk)).collect()
    }

    pub fn info(&self, name: &str) -> Result<VmInfo, RegistryError> {
        let (spec, vm, state, disk) = {
            let entries = self.lock();
            let entry = entries
                .get(name)
                .ok_or_else(|| RegistryError::NotFound { name: name.into() })?;
            (
                entry.spec.clone(),
                entry.vm.clone(),
                entry.state,
                entry.disk.clone(),
            )
        };
        let vm = vm.ok_or_else(|| RegistryError::NotReady { name: name.into() })?;
        Ok(describe(&spec, &vm, state, disk.as_ref()))
    }

    /// Every VM that exists (not those still booting), by name.
    pub fn list(&self) -> Vec<VmInfo> {
        type Snapshot = (VmSpec, Arc<ReferenceVm>, VmState, Option<HostedDisk>);
        let snapshot: Vec<Snapshot> = self
            .lock()
            .values()
            .filter_map(|e| {
                e.vm.clone()
                    .map(|vm| (e.spec.clone(), vm, e.state, e.disk.clone()))
            })
            .collect();
        let mut vms: Vec<VmInfo> = snapshot
            .iter()
            .map(|(spec, vm, state, disk)| describe(spec, vm, *state, disk.as_ref()))
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        vms
    }
}

fn describe(
    spec: &VmSpec,
    vm: &ReferenceVm,
    state: VmState,
    hosted: Option<&HostedDisk>,
) -> VmInfo {
    let status = vm.status();
    let disk = match (&spec.disk, vm.disk()) {
        (Some(disk_spec), Some(disk)) => {
            let image = disk.image();
            Some(DiskInfo {
                bytes: disk.size(),
                path: image.path().to_path_buf(),
                agent_owned: hosted.is_some_and(|h| h.agent_owned),
                block_device: image.is_block_device(),
                direct_io: image.is_direct(),
                pattern: disk_spec.pattern,
                write_rate_bytes_per_s: disk_spec.write_rate_bytes_per_s,
                fill_percent: disk_spec.fill_percent,
                total_steps: status.disk_total_steps,
                steps: status.disk_steps.clone(),
                write_errors: status.disk_write_errors,
                unmirrored_latency: disk.unmirrored_latency(),
            })
        }
        _ => None,
    };
    VmInfo {
        name: spec.name.clone(),
        memory_bytes: spec.memory_bytes,
        vcpus: spec.vcpus,
        pattern: spec.pattern,
        dirty_rate_bytes_per_s: spec.dirty_rate_bytes_per_s,
        seed: spec.seed,
        fill_percent: spec.fill_percent,
        state,
        running: status.running,
        total_steps: status.total_steps,
        steps: status.steps,
        throttle_percent: status.throttle_percent,
        disk,
        // The agent fills these in from its journal.
        epoch: 0,
        owner: String::new(),
    }
}

/// The VM of an entry that is running and ready, or why `operation` cannot touch it now.
fn running_vm(
    name: &str,
    entry: &Entry,
    operation: &'static str,
) -> Result<Arc<ReferenceVm>, RegistryError> {
    if entry.state != VmState::Running {
        return Err(RegistryError::Busy {
            name: name.into(),
            state: entry.state,
            operation,
        });
    }
    entry
        .vm
        .clone()
        .ok_or_else(|| RegistryError::NotReady { name: name.into() })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_dataplane::guest::reference::Pattern;

    fn spec(name: &str) -> VmSpec {
        VmSpec {
            name: name.into(),
            memory_bytes: 1 << 20,
            vcpus: 1,
            dirty_rate_bytes_per_s: 0,
            pattern: Pattern::Uniform,
            seed: 1,
            fill_percent: 10,
            disk: None,
        }
    }

    fn boot(registry: &Registry, name: &str) {
        registry
            .reserve(&spec(name), VmState::Running, None)
            .unwrap();
        registry.attach(name, Arc::new(ReferenceVm::boot(spec(name)).unwrap()));
    }

    fn disk(path: &str, agent_owned: bool) -> Option<HostedDisk> {
        Some(HostedDisk {
            path: path.into(),
            agent_owned,
        })
    }

    #[test]
    fn names_are_unique_even_while_booting() {
        let registry = Registry::new();
        registry
            .reserve(&spec("a"), VmState::Running, None)
            .unwrap();
        assert_eq!(
            registry.reserve(&spec("a"), VmState::Incoming, None).err(),
            Some(RegistryError::AlreadyExists { name: "a".into() })
        );
        // Not listed until attached, and not usable.
        assert!(registry.list().is_empty());
        assert_eq!(
            registry.info("a"),
            Err(RegistryError::NotReady { name: "a".into() })
        );
        assert!(registry.remove("a").is_none());
        registry
            .reserve(&spec("a"), VmState::Running, None)
            .unwrap();
    }

    #[test]
    fn two_vms_never_share_a_disk_and_removal_hands_the_disk_back() {
        let registry = Registry::new();
        registry
            .reserve(&spec("a"), VmState::Running, disk("/d/a.img", true))
            .unwrap();
        assert_eq!(
            registry
                .reserve(&spec("b"), VmState::Incoming, disk("/d/a.img", false))
                .err(),
            Some(RegistryError::DiskInUse {
                path: "/d/a.img".into(),
                owner: "a".into()
            })
        );
        registry
            .reserve(&spec("b"), VmState::Running, disk("/d/b.img", false))
            .unwrap();
        registry.attach("b", Arc::new(ReferenceVm::boot(spec("b")).unwrap()));
        let out = registry.begin_outgoing("b").unwrap();
        assert_eq!(out.disk, disk("/d/b.img", false));
        registry.set_state("b", VmState::Running);
        let removed = registry.destroy("b").unwrap();
        assert_eq!(removed.disk, disk("/d/b.img", false));
        removed.vm.shutdown();
        // The image is free again; "a" (still booting) keeps its own.
        registry
            .reserve(&spec("c"), VmState::Running, disk("/d/b.img", false))
            .unwrap();
        let drained = registry.drain();
        assert_eq!(drained.len(), 2);
        assert!(drained
            .iter()
            .any(|(vm, d)| vm.is_none() && *d == disk("/d/a.img", true)));
    }

    #[test]
    fn an_image_is_the_agents_only_once_claimed() {
        let registry = Registry::new();
        registry
            .reserve(&spec("a"), VmState::Incoming, disk("/d/a.img", false))
            .unwrap();
        let drained = registry.drain();
        assert_eq!(drained[0].1, disk("/d/a.img", false), "not created yet");
        registry
            .reserve(&spec("a"), VmState::Incoming, disk("/d/a.img", false))
            .unwrap();
        registry.claim_disk("a");
        registry.claim_disk("nobody");
        let drained = registry.drain();
        assert_eq!(drained[0].1, disk("/d/a.img", true));
    }

    #[test]
    fn an_incoming_vm_with_its_state_loaded_is_finishing() {
        let registry = Registry::new();
        registry
            .reserve(&spec("a"), VmState::Incoming, None)
            .unwrap();
        assert!(!registry.incoming_finishing("a"), "no VM yet");
        registry.attach("a", Arc::new(ReferenceVm::incoming(spec("a")).unwrap()));
        assert!(!registry.incoming_finishing("a"), "parked, no state yet");
        registry.mark_state_loaded("a");
        assert!(registry.incoming_finishing("a"));
        registry.set_state("a", VmState::Running);
        assert!(!registry.incoming_finishing("a"), "settled");
        registry.destroy("a").unwrap().vm.shutdown();
    }

    #[test]
    fn outgoing_migration_blocks_destroy_verify_and_a_second_migration() {
        let registry = Registry::new();
        boot(&registry, "a");
        assert!(!registry.cancel("a").unwrap());
        let out = registry.begin_outgoing("a").unwrap();
        assert_eq!(registry.info("a").unwrap().state, VmState::Migrating);
        assert!(matches!(
            registry.begin_outgoing("a"),
            Err(RegistryError::Busy { .. })
        ));
        assert!(matches!(
            registry.destroy("a"),
            Err(RegistryError::Busy { .. })
        ));
        assert!(matches!(
            registry.get_settled("a", "verify"),
            Err(RegistryError::Busy { .. })
        ));
        assert_eq!(registry.migrations_active(), 1);
        assert!(registry.cancel("a").unwrap());
        assert!(out.cancel.load(Ordering::SeqCst));
        // Fail-back: the next migration gets a fresh flag.
        registry.set_state("a", VmState::Running);
        let again = registry.begin_outgoing("a").unwrap();
        assert!(!again.cancel.load(Ordering::SeqCst));
        registry.set_state("a", VmState::Running);
        registry.destroy("a").unwrap().vm.shutdown();
        assert_eq!(
            registry.cancel("a"),
            Err(RegistryError::NotFound { name: "a".into() })
        );
    }

    #[test]
    fn list_is_sorted_and_drain_empties() {
        let registry = Registry::new();
        boot(&registry, "b");
        boot(&registry, "a");
        let names: Vec<String> = registry.list().into_iter().map(|v| v.name).collect();
        assert_eq!(names, ["a", "b"]);
        let vms = registry.drain();
        assert_eq!(vms.len(), 2);
        vms.iter()
            .flat_map(|(vm, _)| vm)
            .for_each(|vm| vm.shutdown());
        assert!(registry.list().is_empty());
    }
}
