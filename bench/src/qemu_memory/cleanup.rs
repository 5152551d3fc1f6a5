//! What `ferry-bench qemu` leaves behind if it is interrupted: none of it.
//!
//! A run keeps gigabytes in `/dev/shm` (the agents' VM memory, which outlives an agent by
//! design) and starts QEMUs and agents. Ctrl-C or SIGTERM would skip every drop guard, so:
//! [`install`] blocks SIGINT, SIGTERM and SIGHUP in the calling thread (threads spawned
//! later inherit the mask; spawned processes do not, std resets it) and a thread waits for
//! them, removes every directory registered with [`RemovedDir`], and exits. The child
//! processes die with the benchmark ([`crate::qmp::Daemon`] sets `PR_SET_PDEATHSIG`).

use std::path::PathBuf;
use std::sync::{Mutex, Once};

static DIRS: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

fn dirs() -> std::sync::MutexGuard<'static, Vec<PathBuf>> {
    DIRS.lock().unwrap_or_else(|e| e.into_inner())
}

/// A directory removed, with its content, on drop, or when the benchmark is interrupted.
pub struct RemovedDir(PathBuf);

impl RemovedDir {
    pub fn new(path: PathBuf) -> Self {
        dirs().push(path.clone());
        Self(path)
    }
}

impl Drop for RemovedDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
        dirs().retain(|p| p != &self.0);
    }
}

/// Starts the signal thread (once per process); call before spawning other threads.
pub fn install() -> anyhow::Result<()> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| result = start());
    result
}

fn start() -> anyhow::Result<()> {
    // SAFETY: sigset_t is plain data, initialised by sigemptyset before use; the pointers
    // are to these locals; pthread_sigmask only changes this thread's mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        let rc = libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        anyhow::ensure!(rc == 0, "pthread_sigmask: error {rc}");
        set
    };
    std::thread::Builder::new()
        .name("bench-cleanup".into())
        .spawn(move || {
            let mut signal: libc::c_int = 0;
            // SAFETY: `set` is an initialised signal set owned by this closure and `signal`
            // a live local; sigwait only writes the signal number.
            let rc = unsafe { libc::sigwait(&set, &mut signal) };
            if rc != 0 {
                return;
            }
            let leftovers = std::mem::take(&mut *dirs());
            for dir in &leftovers {
                let _ = std::fs::remove_dir_all(dir);
            }
            eprintln!(
                "[qemu] interrupted (signal {signal}): removed {} directories; its QEMUs and \
                 agents end with it",
                leftovers.len()
            );
            std::process::exit(128 + signal);
        })?;
    Ok(())
}
