//! Failpoints: named places in a migration where a test makes the process stop, fail,
//! corrupt what it sends next, or crash, exactly there.
//!
//! Compiled in only with the `failpoints` cargo feature; without it [`hit`] is an inlined
//! `None` and the corruption flags are constant `false`, so a call site costs nothing.
//!
//! With the feature, the process's configuration comes from two places, looked up at every
//! hit (hits sit at phase boundaries, so the lookup is cheap enough):
//! - `FERRY_FAILPOINT_DIR=DIR`: a file `DIR/arm/<name>` containing an action arms `<name>`
//!   while it exists (a test arms and disarms at run time);
//! - `FERRY_FAILPOINTS="name=action,name2=action"`, read once at the first hit.
//!
//! An arm file wins over the environment. Every fired failpoint writes `DIR/reached/<name>`
//! (the process id) first, so a test knows that it fired and when. Actions:
//! - `pause`: block until `DIR/release/<name>` exists (at most [`PAUSE_MAX`]), then go on
//!   as if nothing happened (`None`);
//! - `error`: [`Action::Error`], the call site fails with an injected error;
//! - `corrupt`: [`Action::Corrupt`], the call site arms [`corrupt_next_frame`] (or
//!   [`corrupt_next_control_message`] once the data is sent);
//! - `enospc`: [`Action::NoSpace`], the call site fails as if its disk were full;
//! - `abort`: `std::process::abort()` right there, a crash exactly at the site.
//!
//! A call site:
//! ```ignore
//! match failpoint::hit("source-precopy-round") {
//!     Some(failpoint::Action::Corrupt) => failpoint::corrupt_next_frame(),
//!     Some(action) => return Err(action.io_error("source-precopy-round").into()),
//!     None => {}
//! }
//! ```

/// What a fired failpoint asks its call site to do (`pause` and `abort` never return one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Fail here with an injected error.
    Error,
    /// Corrupt what is sent next: [`corrupt_next_frame`] or [`corrupt_next_control_message`].
    Corrupt,
    /// Fail here as if the disk were full (`ENOSPC`).
    NoSpace,
}

impl Action {
    /// The I/O error a call site returns for this action: `ENOSPC` for
    /// [`Action::NoSpace`], an `Other` error naming the failpoint otherwise.
    pub fn io_error(self, name: &'static str) -> std::io::Error {
        match self {
            Action::NoSpace => std::io::Error::from_raw_os_error(libc::ENOSPC),
            Action::Error | Action::Corrupt => {
                std::io::Error::other(format!("failpoint {name}: injected error"))
            }
        }
    }
}

/// Longest a `pause` waits for its release file.
pub const PAUSE_MAX: std::time::Duration = std::time::Duration::from_secs(120);

#[cfg(not(feature = "failpoints"))]
mod imp {
    use super::Action;

    /// Failpoints are compiled out: never fires.
    #[inline(always)]
    pub fn hit(_name: &'static str) -> Option<Action> {
        None
    }

    #[inline(always)]
    pub fn corrupt_next_frame() {}

    #[inline(always)]
    pub fn take_corruption() -> bool {
        false
    }

    #[inline(always)]
    pub fn corrupt_next_control_message() {}

    #[inline(always)]
    pub fn take_control_corruption() -> bool {
        false
    }
}

#[cfg(feature = "failpoints")]
mod imp {
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::OnceLock;
    use std::time::{Duration, Instant};

    use super::{Action, PAUSE_MAX};

    /// Environment variable with `name=action,…`.
    pub const ENV_FAILPOINTS: &str = "FERRY_FAILPOINTS";
    /// Environment variable naming the directory of arm, reached and release files.
    pub const ENV_FAILPOINT_DIR: &str = "FERRY_FAILPOINT_DIR";
    /// How often a paused failpoint looks for its release file.
    const RELEASE_POLL: Duration = Duration::from_millis(10);

    static CORRUPT_FRAME: AtomicBool = AtomicBool::new(false);
    static CORRUPT_CONTROL: AtomicBool = AtomicBool::new(false);

    /// An action as configured (what [`Action`] is plus the two that act in place).
    #[derive(Clone, Copy, Debug, PartialEq, Eq)]
    pub enum Configured {
        Pause,
        Error,
        Corrupt,
        NoSpace,
        Abort,
    }

    #[derive(Debug, PartialEq, Eq, thiserror::Error)]
    pub enum FailpointError {
        #[error("failpoint entry {entry:?} is not name=action")]
        NotAnAssignment { entry: String },
        #[error(
            "failpoint {name:?}: unknown action {action:?} (pause, error, corrupt, enospc, abort)"
        )]
        UnknownAction { name: String, action: String },
    }

    impl std::str::FromStr for Configured {
        type Err = String;

        fn from_str(s: &str) -> Result<Self, String> {
            match s.trim() {
                "pause" => Ok(Configured::Pause),
                "error" => Ok(Configured::Error),
                "corrupt" => Ok(Configured::Corrupt),
                "enospc" => Ok(Configured::NoSpace),
                "abort" => Ok(Configured::Abort),
                other => Err(other.to_string()),
            }
        }
    }

    /// Parses `name=action,name2=action` (blank entries and spaces around names ignored).
    pub fn parse_config(text: &str) -> Result<Vec<(String, Configured)>, FailpointError> {
        text.split(',')
            .map(str::trim)
            .filter(|entry| !entry.is_empty())
            .map(|entry| {
                let (name, action) =
                    entry
                        .split_once('=')
                        .ok_or_else(|| FailpointError::NotAnAssignment {
                            entry: entry.to_string(),
                        })?;
                let name = name.trim();
                if name.is_empty() {
                    return Err(FailpointError::NotAnAssignment {
                        entry: entry.to_string(),
                    });
                }
                let action = action
                    .parse()
                    .map_err(|action| FailpointError::UnknownAction {
                        name: name.to_string(),
                        action,
                    })?;
                Ok((name.to_string(), action))
            })
            .collect()
    }

    /// The process's configuration, read from the environment once.
    struct Config {
        from_env: Vec<(String, Configured)>,
        dir: Option<PathBuf>,
    }

    fn config() -> &'static Config {
        static CONFIG: OnceLock<Config> = OnceLock::new();
        CONFIG.get_or_init(|| {
            let from_env = match std::env::var(ENV_FAILPOINTS) {
                Ok(text) => parse_config(&text).unwrap_or_else(|err| {
                    tracing::error!(error = %err, "{ENV_FAILPOINTS} ignored");
                    Vec::new()
                }),
                Err(_) => Vec::new(),
            };
            let dir = std::env::var_os(ENV_FAILPOINT_DIR).map(PathBuf::from);
            Config { from_env, dir }
        })
    }

    /// The action `name` is armed with in `dir` (its arm file), if any.
    pub fn armed_in(dir: &Path, name: &str) -> Option<Configured> {
        let text = std::fs::read_to_string(dir.join("arm").join(name)).ok()?;
        match text.parse() {
            Ok(action) => Some(action),
            Err(action) => {
                tracing::error!(
                    failpoint = name,
                    action,
                    "unknown failpoint action in arm file; ignored"
                );
                None
            }
        }
    }

    /// What `name` is armed with: its arm file first, then the environment.
    fn lookup(config: &Config, name: &str) -> Option<Configured> {
        config
            .dir
            .as_deref()
            .and_then(|dir| armed_in(dir, name))
            .or_else(|| {
                config
                    .from_env
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|&(_, action)| action)
            })
    }

    pub fn hit(name: &'static str) -> Option<Action> {
        let config = config();
        let action = lookup(config, name)?;
        tracing::warn!(
            failpoint = name,
            ?action,
            pid = std::process::id(),
            "failpoint fired"
        );
        // Every fired failpoint leaves `reached/<name>`, so a test knows it fired (a pause
        // waits after writing it; an abort has written it before the crash).
        if let Some(dir) = &config.dir {
            mark_reached(dir, name);
        }
        match action {
            Configured::Pause => {
                match &config.dir {
                    Some(dir) => {
                        wait_for_release(dir, name, PAUSE_MAX);
                    }
                    None => {
                        tracing::error!(
                            failpoint = name,
                            "pause needs {ENV_FAILPOINT_DIR}; not pausing"
                        )
                    }
                }
                None
            }
            Configured::Error => Some(Action::Error),
            Configured::Corrupt => Some(Action::Corrupt),
            Configured::NoSpace => Some(Action::NoSpace),
            Configured::Abort => std::process::abort(),
        }
    }

    /// Writes `dir/reached/<name>` (the pid; written whole, then renamed into place).
    pub fn mark_reached(dir: &Path, name: &str) {
        let reached = dir.join("reached");
        let written = std::fs::create_dir_all(&reached).and_then(|()| {
            let tmp = reached.join(format!(".{name}.{}", std::process::id()));
            std::fs::write(&tmp, format!("{}\n", std::process::id()))?;
            std::fs::rename(&tmp, reached.join(name))
        });
        if let Err(err) = written {
            tracing::error!(failpoint = name, error = %err, "cannot write the reached file");
        }
    }

    /// Waits for `dir/release/<name>` for at most `max`; true when released.
    pub fn wait_for_release(dir: &Path, name: &str, max: Duration) -> bool {
        let release = dir.join("release").join(name);
        let deadline = Instant::now() + max;
        while !release.exists() {
            if Instant::now() >= deadline {
                tracing::error!(failpoint = name, "not released in time; going on");
                return false;
            }
            std::thread::sleep(RELEASE_POLL);
        }
        tracing::warn!(failpoint = name, "failpoint released");
        true
    }

    pub fn corrupt_next_frame() {
        CORRUPT_FRAME.store(true, Ordering::SeqCst);
    }

    pub fn take_corruption() -> bool {
        take(&CORRUPT_FRAME)
    }

    pub fn corrupt_next_control_message() {
        CORRUPT_CONTROL.store(true, Ordering::SeqCst);
    }

    pub fn take_control_corruption() -> bool {
        take(&CORRUPT_CONTROL)
    }

    /// True once per raise of `flag`. The plain load first keeps the common case (not
    /// raised) a read of a shared cache line, not a write to it per frame.
    pub fn take(flag: &AtomicBool) -> bool {
        flag.load(Ordering::Relaxed) && flag.swap(false, Ordering::SeqCst)
    }
}

#[cfg(feature = "failpoints")]
pub use imp::{parse_config, Configured, FailpointError, ENV_FAILPOINTS, ENV_FAILPOINT_DIR};

/// Fires failpoint `name` if this process armed it: `None` to go on (also after a
/// `pause`), or what the call site must do. `abort` never returns.
#[inline(always)]
pub fn hit(name: &'static str) -> Option<Action> {
    imp::hit(name)
}

/// Makes the next data frame this process sends (memory pages or a disk request) land
/// with one payload byte flipped.
#[inline(always)]
pub fn corrupt_next_frame() {
    imp::corrupt_next_frame()
}

/// True once after [`corrupt_next_frame`]: the sender that gets it corrupts its frame.
#[inline(always)]
pub fn take_corruption() -> bool {
    imp::take_corruption()
}

/// Makes the next control message this process writes (e.g. `Commit`) arrive with one
/// byte flipped, so that its checksum fails.
#[inline(always)]
pub fn corrupt_next_control_message() {
    imp::corrupt_next_control_message()
}

/// True once after [`corrupt_next_control_message`].
#[inline(always)]
pub fn take_control_corruption() -> bool {
    imp::take_control_corruption()
}

/// A copy of `payload` with one byte flipped (the middle one), as a corrupted frame
/// carries it; the sender's own bytes (guest memory, its hashes) stay as they are.
#[cfg(feature = "failpoints")]
pub fn corrupted_copy(payload: &[u8]) -> Vec<u8> {
    let mut copy = payload.to_vec();
    if let Some(byte) = copy.get_mut(payload.len() / 2) {
        *byte ^= 0xff;
    }
    copy
}

#[cfg(all(test, feature = "failpoints"))]
mod tests {
    use std::time::Duration;

    use std::sync::atomic::{AtomicBool, Ordering};

    use super::imp::{armed_in, mark_reached, take, wait_for_release};
    use super::*;

    #[test]
    fn parses_names_and_every_action() {
        let parsed = parse_config(
            " source-prepare=pause, dest-after-commit = abort,,a=error,b=corrupt,c=enospc ",
        )
        .unwrap();
        assert_eq!(
            parsed,
            vec![
                ("source-prepare".to_string(), Configured::Pause),
                ("dest-after-commit".to_string(), Configured::Abort),
                ("a".to_string(), Configured::Error),
                ("b".to_string(), Configured::Corrupt),
                ("c".to_string(), Configured::NoSpace),
            ]
        );
        assert_eq!(parse_config("").unwrap(), vec![]);
    }

    #[test]
    fn refuses_malformed_entries_with_their_text() {
        assert_eq!(
            parse_config("a=pause,oops"),
            Err(FailpointError::NotAnAssignment {
                entry: "oops".into()
            })
        );
        assert_eq!(
            parse_config("=pause"),
            Err(FailpointError::NotAnAssignment {
                entry: "=pause".into()
            })
        );
        assert_eq!(
            parse_config("a=explode"),
            Err(FailpointError::UnknownAction {
                name: "a".into(),
                action: "explode".into()
            })
        );
    }

    #[test]
    fn arm_files_arm_and_disarm_at_run_time() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(armed_in(dir.path(), "x"), None);
        std::fs::create_dir_all(dir.path().join("arm")).unwrap();
        std::fs::write(dir.path().join("arm/x"), "corrupt\n").unwrap();
        assert_eq!(armed_in(dir.path(), "x"), Some(Configured::Corrupt));
        assert_eq!(armed_in(dir.path(), "y"), None);
        std::fs::write(dir.path().join("arm/x"), "bogus").unwrap();
        assert_eq!(armed_in(dir.path(), "x"), None, "a bad action is ignored");
        std::fs::remove_file(dir.path().join("arm/x")).unwrap();
        assert_eq!(armed_in(dir.path(), "x"), None);
    }

    #[test]
    fn pause_says_reached_and_waits_for_its_release() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().to_path_buf();
        let paused = std::thread::spawn(move || {
            mark_reached(&path, "p");
            wait_for_release(&path, "p", Duration::from_secs(10))
        });
        let reached = dir.path().join("reached/p");
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !reached.exists() {
            assert!(std::time::Instant::now() < deadline, "never reached");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(
            std::fs::read_to_string(&reached).unwrap().trim(),
            std::process::id().to_string()
        );
        std::thread::sleep(Duration::from_millis(50));
        assert!(!paused.is_finished(), "returned before its release");
        std::fs::create_dir_all(dir.path().join("release")).unwrap();
        std::fs::write(dir.path().join("release/p"), "").unwrap();
        assert!(paused.join().unwrap(), "released, not timed out");
        // Unreleased, it gives up after its bound.
        assert!(!wait_for_release(
            dir.path(),
            "q",
            Duration::from_millis(30)
        ));
    }

    #[test]
    fn a_raised_flag_is_taken_once() {
        // (the process-wide flags are not raised here: other tests of this crate send
        // frames and messages concurrently and would take them)
        static FLAG: AtomicBool = AtomicBool::new(false);
        assert!(!take(&FLAG));
        FLAG.store(true, Ordering::SeqCst);
        assert!(take(&FLAG));
        assert!(!take(&FLAG));
        let copy = corrupted_copy(&[1, 2, 3, 4]);
        assert_eq!(copy, vec![1, 2, 3 ^ 0xff, 4]);
        assert!(corrupted_copy(&[]).is_empty());
    }

    #[test]
    fn actions_map_to_io_errors() {
        assert_eq!(
            Action::NoSpace.io_error("x").raw_os_error(),
            Some(libc::ENOSPC)
        );
        assert!(Action::Error
            .io_error("source-prepare")
            .to_string()
            .contains("source-prepare"));
    }
}

#[cfg(all(test, not(feature = "failpoints")))]
mod tests_compiled_out {
    use super::*;

    #[test]
    fn nothing_fires_without_the_feature() {
        corrupt_next_frame();
        corrupt_next_control_message();
        assert_eq!(hit("source-prepare"), None);
        assert!(!take_corruption());
        assert!(!take_control_corruption());
    }
}
