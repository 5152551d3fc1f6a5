//! Exclusive `flock`s on files that say "a live process owns this" (an agent's journal, a
//! persistent VM's registers). The kernel drops the lock when the process dies.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

/// How long a lock held by someone else is waited for: a child forked by any thread of this
/// process holds inherited descriptors (and their locks) until it execs, for a moment.
pub const LOCK_RETRY_FOR: Duration = Duration::from_secs(1);

/// Takes the exclusive `flock` of `file`, retrying for [`LOCK_RETRY_FOR`]. A lock still held
/// after that is `WouldBlock`.
pub fn lock_exclusive(file: &File) -> io::Result<()> {
    let deadline = Instant::now() + LOCK_RETRY_FOR;
    loop {
        // SAFETY: `file` owns an open descriptor for the duration of the call; flock takes no
        // pointers.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc == 0 {
            return Ok(());
        }
        let err = io::Error::last_os_error();
        match err.kind() {
            io::ErrorKind::WouldBlock if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            io::ErrorKind::Interrupted => {}
            _ => return Err(err),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_lock_waits_then_is_refused_and_a_released_one_is_taken() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let first = File::create(&path).unwrap();
        lock_exclusive(&first).unwrap();
        let second = File::open(&path).unwrap();
        let started = Instant::now();
        let err = lock_exclusive(&second).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        assert!(started.elapsed() >= LOCK_RETRY_FOR);
        drop(first);
        lock_exclusive(&second).unwrap();
    }
}
