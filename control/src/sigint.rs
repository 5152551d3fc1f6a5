//! Ctrl-C (and SIGTERM) as a flag that ordinary threads poll.
//!
//! The handler only stores to an atomic, which is async-signal-safe; the work a signal
//! asks for (send `Cancel`, stop the agents, shut an agent down) is done by a thread that
//! polls [`interrupted`]. A second signal while the first is being handled exits at once
//! with status 130, so a stuck clean-up can always be interrupted.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

/// Exit status of a process stopped by Ctrl-C (128 + SIGINT), by shell convention.
pub const EXIT_INTERRUPTED: i32 = 130;

extern "C" fn on_signal(_signal: libc::c_int) {
    if INTERRUPTED.swap(true, Ordering::SeqCst) {
        // SAFETY: _exit is async-signal-safe and takes no pointers.
        unsafe { libc::_exit(EXIT_INTERRUPTED) };
    }
}

/// Routes `signals` (e.g. `SIGINT`, `SIGTERM`) to the flag. `SA_RESTART` keeps blocking
/// reads and accepts elsewhere in the process from failing with `EINTR`.
pub fn install(signals: &[libc::c_int]) -> io::Result<()> {
    for &signal in signals {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; the handler is
        // an `extern "C" fn(c_int)` that only touches an atomic; sigemptyset and sigaction
        // get pointers to live locals.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(signal, &action, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// True once a signal has arrived.
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

/// A thread that runs `on_interrupt` once when a signal arrives, unless stopped first.
pub struct Watcher {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

/// How often the watcher looks at the flag.
const POLL: Duration = Duration::from_millis(50);

impl Watcher {
    pub fn spawn(on_interrupt: impl FnOnce() + Send + 'static) -> io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stop_seen = Arc::clone(&stop);
        let thread = std::thread::Builder::new()
            .name("signal-watcher".into())
            .spawn(move || {
                while !stop_seen.load(Ordering::SeqCst) {
                    if interrupted() {
                        on_interrupt();
                        return;
                    }
                    std::thread::sleep(POLL);
                }
            })?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            // The callback may be running (it was interrupted): wait for it, it is bounded.
            let _ = thread.join();
        }
    }
}
