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

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_dataplane::guest::reference::{ReferenceVm, VmSpec};

use crate::api::{VmInfo, VmState};

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
}

struct Entry {
    spec: VmSpec,
    /// `None` while the VM boots (or pre-faults, when incoming).
    vm: Option<Arc<ReferenceVm>>,
    state: VmState,
    /// Cancels the migration in progress, outgoing or incoming; a fresh flag per migration.
    cancel: Arc<AtomicBool>,
}

/// What a started outgoing migration needs from the registry.
pub struct Outgoing {
    pub vm: Arc<ReferenceVm>,
    pub cancel: Arc<AtomicBool>,
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
    /// its VM exists. Returns the cancel flag of the entry.
    pub fn reserve(&self, spec: &VmSpec, state: VmState) -> Result<Arc<AtomicBool>, RegistryError> {
        let mut entries = self.lock();
        if entries.contains_key(&spec.name) {
            return Err(RegistryError::AlreadyExists {
                name: spec.name.clone(),
            });
        }
        let cancel = Arc::new(AtomicBool::new(false));
        entries.insert(
            spec.name.clone(),
            Entry {
                spec: spec.clone(),
                vm: None,
                state,
                cancel: Arc::clone(&cancel),
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

    /// Removes `name` whatever its state; returns its VM for the caller to shut down.
    pub fn remove(&self, name: &str) -> Option<Arc<ReferenceVm>> {
        self.lock().remove(name).and_then(|entry| entry.vm)
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

    /// True while `name` is an incoming VM whose guest already runs: the engine has resumed
    /// it after the source's commit and the acceptor is about to mark it Running.
    pub fn incoming_finishing(&self, name: &str) -> bool {
        let vm = {
            let entries = self.lock();
            match entries.get(name) {
                Some(entry) if entry.state == VmState::Incoming => entry.vm.clone(),
                _ => None,
            }
        };
        vm.is_some_and(|vm| vm.status().running)
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
        })
    }

    /// Removes a VM that is not migrating; returns it for the caller to shut down.
    pub fn destroy(&self, name: &str) -> Result<Arc<ReferenceVm>, RegistryError> {
        let mut entries = self.lock();
        let entry = entries
            .get(name)
            .ok_or_else(|| RegistryError::NotFound { name: name.into() })?;
        running_vm(name, entry, "destroy")?;
        Ok(entries
            .remove(name)
            .and_then(|e| e.vm)
            .expect("checked above"))
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

    /// Removes every VM (agent shutdown); the caller shuts them down.
    pub fn drain(&self) -> Vec<Arc<ReferenceVm>> {
        self.lock().drain().filter_map(|(_, e)| e.vm).collect()
    }

    pub fn info(&self, name: &str) -> Result<VmInfo, RegistryError> {
        let (spec, vm, state) = {
            let entries = self.lock();
            let entry = entries
                .get(name)
                .ok_or_else(|| RegistryError::NotFound { name: name.into() })?;
            (entry.spec.clone(), entry.vm.clone(), entry.state)
        };
        let vm = vm.ok_or_else(|| RegistryError::NotReady { name: name.into() })?;
        Ok(describe(&spec, &vm, state))
    }

    /// Every VM that exists (not those still booting), by name.
    pub fn list(&self) -> Vec<VmInfo> {
        let snapshot: Vec<(VmSpec, Arc<ReferenceVm>, VmState)> = self
            .lock()
            .values()
            .filter_map(|e| e.vm.clone().map(|vm| (e.spec.clone(), vm, e.state)))
            .collect();
        let mut vms: Vec<VmInfo> = snapshot
            .iter()
            .map(|(spec, vm, state)| describe(spec, vm, *state))
            .collect();
        vms.sort_by(|a, b| a.name.cmp(&b.name));
        vms
    }
}

fn describe(spec: &VmSpec, vm: &ReferenceVm, state: VmState) -> VmInfo {
    let status = vm.status();
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
        }
    }

    fn boot(registry: &Registry, name: &str) {
        registry.reserve(&spec(name), VmState::Running).unwrap();
        registry.attach(name, Arc::new(ReferenceVm::boot(spec(name)).unwrap()));
    }

    #[test]
    fn names_are_unique_even_while_booting() {
        let registry = Registry::new();
        registry.reserve(&spec("a"), VmState::Running).unwrap();
        assert_eq!(
            registry.reserve(&spec("a"), VmState::Incoming).err(),
            Some(RegistryError::AlreadyExists { name: "a".into() })
        );
        // Not listed until attached, and not usable.
        assert!(registry.list().is_empty());
        assert_eq!(
            registry.info("a"),
            Err(RegistryError::NotReady { name: "a".into() })
        );
        assert!(registry.remove("a").is_none());
        registry.reserve(&spec("a"), VmState::Running).unwrap();
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
        registry.destroy("a").unwrap().shutdown();
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
        vms.iter().for_each(|vm| vm.shutdown());
        assert!(registry.list().is_empty());
    }
}
