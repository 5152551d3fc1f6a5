//! The data plane's one way to start a thread: [`spawn`] and [`spawn_scoped`] name it, and
//! inside it, before running its work, pin it to its role's CPUs in the process's
//! [`Placement`] ([`install`]ed once by the agent at start). Without an installed placement
//! (tests, the bench, a library user) threads are started as `std::thread` would.
//!
//! Pinning happens in the new thread (`sched_setaffinity` on itself), so a thread never
//! runs its work on the wrong CPUs, and a role's CPUs are applied even when they are wider
//! than its parent's (a vCPU started from a transport thread is not stuck on the NIC's
//! node). A pinning failure (CPUs taken away by a cgroup since) is logged once, and the
//! thread runs unpinned: placement is a performance matter, never a reason to fail.
//!
//! Work that cannot move to a thread of its own runs under [`run_as`], which pins the
//! calling thread for its duration. Buffers mostly need nothing more: Linux allocates a
//! page on the node of the thread that first touches it, so a pinned thread's buffers land
//! on its node. [`bind_buffer`] is for memory first touched elsewhere (guest memory, which
//! a VMM or the pre-fault maps before any receiver runs).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::thread::{Builder, JoinHandle, Scope, ScopedJoinHandle};

use tracing::{debug, warn};

use super::pin::{bind_memory, set_thread_affinity};
use super::plan::{Placement, ThreadRole};
use super::NumaError;

static INSTALLED: OnceLock<Placement> = OnceLock::new();
/// Threads pinned so far, per role ([`ThreadRole::index`]).
static PINNED: [AtomicU64; ThreadRole::ALL.len()] = [const { AtomicU64::new(0) }; 5];
static PIN_FAILURE_LOGGED: AtomicBool = AtomicBool::new(false);

/// Makes `placement` the process's placement, used by [`spawn`], [`spawn_scoped`] and
/// [`bind_buffer`] from now on. Once per process: a second call is refused.
pub fn install(placement: Placement) -> Result<&'static Placement, NumaError> {
    install_into(&INSTALLED, placement)
}

fn install_into(cell: &OnceLock<Placement>, placement: Placement) -> Result<&Placement, NumaError> {
    let mut placement = Some(placement);
    let installed = cell.get_or_init(|| placement.take().expect("taken once"));
    if placement.is_some() {
        return Err(NumaError::AlreadyInstalled);
    }
    Ok(installed)
}

/// The process's placement, if one was installed.
pub fn installed() -> Option<&'static Placement> {
    INSTALLED.get()
}

/// How many `role` threads can run at once: its CPUs in the installed placement, else
/// every CPU the process may use. For sizing pools of workers (trace, prefault, verify).
pub fn parallelism(role: ThreadRole) -> usize {
    parallelism_with(installed(), role)
}

fn parallelism_with(placement: Option<&Placement>, role: ThreadRole) -> usize {
    match placement.map(|p| p.cpus(role).len()) {
        Some(cpus) if cpus > 0 => cpus,
        _ => std::thread::available_parallelism().map_or(1, |n| n.get()),
    }
}

/// How many threads were pinned for `role` since the process started (all placements).
pub fn pinned_threads(role: ThreadRole) -> u64 {
    PINNED[role.index()].load(Ordering::Relaxed)
}

/// Starts a thread named `name` for `role`, pinned by the installed placement (if any).
pub fn spawn<F, T>(
    role: ThreadRole,
    name: impl Into<String>,
    f: F,
) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_pinned(cpus_for(installed(), role), role, name.into(), f)
}

/// [`spawn`] with `placement` instead of the installed one (tests, tools).
pub fn spawn_with<F, T>(
    placement: &Placement,
    role: ThreadRole,
    name: impl Into<String>,
    f: F,
) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    spawn_pinned(cpus_for(Some(placement), role), role, name.into(), f)
}

/// Starts a scoped thread named `name` for `role`, pinned by the installed placement.
pub fn spawn_scoped<'scope, 'env, F, T>(
    scope: &'scope Scope<'scope, 'env>,
    role: ThreadRole,
    name: impl Into<String>,
    f: F,
) -> std::io::Result<ScopedJoinHandle<'scope, T>>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    spawn_scoped_pinned(scope, cpus_for(installed(), role), role, name.into(), f)
}

/// [`spawn_scoped`] with `placement` instead of the installed one.
pub fn spawn_scoped_with<'scope, 'env, F, T>(
    scope: &'scope Scope<'scope, 'env>,
    placement: &Placement,
    role: ThreadRole,
    name: impl Into<String>,
    f: F,
) -> std::io::Result<ScopedJoinHandle<'scope, T>>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    spawn_scoped_pinned(scope, cpus_for(Some(placement), role), role, name.into(), f)
}

/// Runs `f` on the calling thread as a `role` thread: pinned to the role's CPUs (installed
/// placement) while it runs, then back on the CPUs it had, even if `f` panics. For work
/// that must stay on its thread because it borrows what cannot cross threads, like the
/// disk bulk copy on a migration's thread.
pub fn run_as<T>(role: ThreadRole, f: impl FnOnce() -> T) -> T {
    run_as_with(installed(), role, f)
}

/// [`run_as`] with `placement` (`None`: run `f` as it is).
pub fn run_as_with<T>(placement: Option<&Placement>, role: ThreadRole, f: impl FnOnce() -> T) -> T {
    /// Puts the thread's previous CPUs back when dropped.
    struct Restore(Vec<u32>);
    impl Drop for Restore {
        fn drop(&mut self) {
            if let Err(error) = set_thread_affinity(&self.0) {
                warn!(%error, "cannot restore a thread's CPUs after a placed section");
            }
        }
    }
    let Some(cpus) = cpus_for(placement, role) else {
        return f();
    };
    let previous = super::pin::thread_affinity();
    if previous.is_empty() {
        return f();
    }
    pin(role, Some(&cpus));
    let _restore = Restore(previous);
    f()
}

/// Binds `[ptr, ptr + len)` to the node of `role`'s buffers in the installed placement.
/// A no-op without a placement, on one node, or for a role whose buffers are not bound.
pub fn bind_buffer(role: ThreadRole, ptr: *mut u8, len: usize) -> Result<(), NumaError> {
    match installed() {
        Some(placement) => bind_buffer_with(placement, role, ptr, len),
        None => Ok(()),
    }
}

/// [`bind_buffer`] with `placement` instead of the installed one.
pub fn bind_buffer_with(
    placement: &Placement,
    role: ThreadRole,
    ptr: *mut u8,
    len: usize,
) -> Result<(), NumaError> {
    match placement.memory_node(role) {
        Some(node) => bind_memory(ptr, len, node),
        None => Ok(()),
    }
}

/// The CPUs a `role` thread is pinned to: none without a placement or CPUs.
fn cpus_for(placement: Option<&Placement>, role: ThreadRole) -> Option<Vec<u32>> {
    let cpus = placement?.cpus(role);
    (!cpus.is_empty()).then(|| cpus.to_vec())
}

/// Run first in every spawned thread.
fn pin(role: ThreadRole, cpus: Option<&[u32]>) {
    let Some(cpus) = cpus else { return };
    match set_thread_affinity(cpus) {
        Ok(()) => {
            PINNED[role.index()].fetch_add(1, Ordering::Relaxed);
            debug!(
                %role,
                thread = std::thread::current().name().unwrap_or("?"),
                cpus = %super::format_cpu_list(cpus),
                "thread pinned"
            );
        }
        Err(error) => {
            if !PIN_FAILURE_LOGGED.swap(true, Ordering::Relaxed) {
                let thread = std::thread::current();
                warn!(
                    %role,
                    thread = thread.name().unwrap_or("?"),
                    %error,
                    "cannot pin a data-plane thread: it runs unpinned (logged once)"
                );
            }
        }
    }
}

fn spawn_pinned<F, T>(
    cpus: Option<Vec<u32>>,
    role: ThreadRole,
    name: String,
    f: F,
) -> std::io::Result<JoinHandle<T>>
where
    F: FnOnce() -> T + Send + 'static,
    T: Send + 'static,
{
    Builder::new().name(name).spawn(move || {
        pin(role, cpus.as_deref());
        f()
    })
}

fn spawn_scoped_pinned<'scope, 'env, F, T>(
    scope: &'scope Scope<'scope, 'env>,
    cpus: Option<Vec<u32>>,
    role: ThreadRole,
    name: String,
    f: F,
) -> std::io::Result<ScopedJoinHandle<'scope, T>>
where
    F: FnOnce() -> T + Send + 'scope,
    T: Send + 'scope,
{
    Builder::new().name(name).spawn_scoped(scope, move || {
        pin(role, cpus.as_deref());
        f()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::numa::pin::thread_affinity;
    use crate::numa::plan::{plan, PlacementRequest};
    use crate::numa::topology::Topology;

    /// A placement for this machine restricted to its first allowed CPU.
    fn first_cpu_only() -> (Placement, u32) {
        let allowed = thread_affinity();
        let first = allowed[0];
        let placement = plan(
            &Topology::single(allowed),
            &PlacementRequest {
                allowed_cpus: Some(vec![first]),
                streams: 1,
                ..PlacementRequest::default()
            },
        );
        (placement, first)
    }

    #[test]
    fn numa_spawn_with_pins_the_thread_to_its_roles_cpus() {
        let (placement, first) = first_cpu_only();
        assert_eq!(placement.cpus(ThreadRole::Transport), &[first]);
        let before = pinned_threads(ThreadRole::Transport);
        let (name, affinity) =
            spawn_with(&placement, ThreadRole::Transport, "ferry-test-pin", || {
                (
                    std::thread::current().name().map(String::from),
                    thread_affinity(),
                )
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(name.as_deref(), Some("ferry-test-pin"));
        assert_eq!(affinity, vec![first]);
        assert!(pinned_threads(ThreadRole::Transport) > before);
    }

    #[test]
    fn numa_spawn_scoped_with_pins_and_borrows() {
        let (placement, first) = first_cpu_only();
        let borrowed = [1, 2, 3];
        let (sum, affinity) = std::thread::scope(|scope| {
            spawn_scoped_with(
                scope,
                &placement,
                ThreadRole::Tracker,
                "ferry-test-scoped",
                || (borrowed.iter().sum::<i32>(), thread_affinity()),
            )
            .unwrap()
            .join()
            .unwrap()
        });
        assert_eq!(sum, 6);
        assert_eq!(affinity, vec![first]);
    }

    #[test]
    fn numa_spawn_without_a_placement_runs_unpinned() {
        // Nothing in this test binary installs a placement (install is process-global and
        // would leak into other tests): threads keep the parent's mask.
        if installed().is_some() {
            eprintln!("skipped: a placement is installed in this test process");
            return;
        }
        let parent = thread_affinity();
        let child = spawn(ThreadRole::Disk, "ferry-test-unpinned", thread_affinity)
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(child, parent);
        let scoped = std::thread::scope(|scope| {
            spawn_scoped(
                scope,
                ThreadRole::Guest,
                "ferry-test-unpinned-scoped",
                thread_affinity,
            )
            .unwrap()
            .join()
            .unwrap()
        });
        assert_eq!(scoped, parent);
        // No placement, nothing bound.
        let mut buffer = vec![0u8; 4096];
        bind_buffer(ThreadRole::Transport, buffer.as_mut_ptr(), buffer.len()).unwrap();
    }

    #[test]
    fn numa_parallelism_is_the_roles_cpus() {
        let (placement, _) = first_cpu_only();
        assert_eq!(parallelism_with(Some(&placement), ThreadRole::Tracker), 1);
        let all = std::thread::available_parallelism().unwrap().get();
        assert_eq!(parallelism_with(None, ThreadRole::Tracker), all);
    }

    #[test]
    fn numa_run_as_pins_for_the_call_and_restores() {
        let (placement, first) = first_cpu_only();
        let (inside, after, before) = std::thread::scope(|scope| {
            // A thread of our own: the harness's thread keeps its mask whatever happens.
            spawn_scoped(scope, ThreadRole::Control, "ferry-test-run-as", || {
                let before = thread_affinity();
                let inside = run_as_with(Some(&placement), ThreadRole::Disk, thread_affinity);
                (inside, thread_affinity(), before)
            })
            .unwrap()
            .join()
            .unwrap()
        });
        assert_eq!(inside, vec![first]);
        assert_eq!(after, before);
        // No placement: nothing changes.
        assert_eq!(run_as_with(None, ThreadRole::Disk, || 5), 5);
    }

    #[test]
    fn numa_install_is_once() {
        let cell = OnceLock::new();
        let (placement, first) = first_cpu_only();
        let installed = install_into(&cell, placement.clone()).unwrap();
        assert_eq!(installed.cpus(ThreadRole::Disk), &[first]);
        let err = install_into(&cell, placement).unwrap_err();
        assert!(matches!(err, NumaError::AlreadyInstalled), "{err}");
    }

    #[test]
    fn numa_bind_buffer_is_a_no_op_on_one_node() {
        let (placement, _) = first_cpu_only();
        assert_eq!(placement.memory_node(ThreadRole::Transport), None);
        // An address nothing maps: a real mbind would fail, a skipped one cannot.
        bind_buffer_with(&placement, ThreadRole::Transport, 8 as *mut u8, 4096).unwrap();
    }

    #[test]
    fn numa_spawn_logs_and_runs_unpinned_when_pinning_fails() {
        let (mut placement, _) = first_cpu_only();
        // CPU 4095 does not exist here: sched_setaffinity refuses it.
        placement.roles[ThreadRole::Control.index()].cpus = vec![4095];
        let ran = spawn_with(
            &placement,
            ThreadRole::Control,
            "ferry-test-pin-fails",
            || 7,
        )
        .unwrap()
        .join()
        .unwrap();
        assert_eq!(ran, 7);
    }
}
