//! QEMU processes the benchmarks start, and the QMP monitor that drives them: shared by the
//! storage comparison (`qemu-storage-daemon`, [`crate::qemu`]) and the memory comparison
//! (`qemu-system-x86_64`, [`crate::qemu_memory`]).
//!
//! Every process is a [`Daemon`], killed on drop whatever happened; [`Qmp`] is one monitor
//! connection with a bound on every wait.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::{json, Value};

/// Bounds on a process's start, a QMP command's answer, and a process's exit.
pub const START_TIMEOUT: Duration = Duration::from_secs(10);
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);
const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

/// `name` on PATH, if it is there.
pub fn on_path(name: &str) -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join(name))
            .find(|p| p.is_file())
    })
}

/// A loopback port free a moment ago.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// A path as one value of a QEMU option list (commas doubled).
pub fn qemu_path(path: &Path) -> String {
    path.display().to_string().replace(',', ",,")
}

/// A process started by the benchmark; killed on drop if it is still running.
pub struct Daemon {
    child: Child,
    log: PathBuf,
}

impl Daemon {
    /// Starts `program` with its stdout and stderr in `log`.
    pub fn spawn(program: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        Self::start(program, args, log, out.try_clone()?.into(), out.into())
    }

    /// Starts `program` with its stdout a pipe ([`Daemon::take_stdout`]) and its stderr in
    /// `log`.
    pub fn spawn_piped(program: &Path, args: &[String], log: PathBuf) -> anyhow::Result<Self> {
        let err =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        Self::start(program, args, log, Stdio::piped(), err.into())
    }

    fn start(
        program: &Path,
        args: &[String],
        log: PathBuf,
        stdout: Stdio,
        stderr: Stdio,
    ) -> anyhow::Result<Self> {
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr);
        // SAFETY: the closure runs in the child between fork and exec and only calls
        // prctl, which is async-signal-safe and touches no memory of ours.
        unsafe {
            command.pre_exec(|| {
                // Die with the benchmark (a SIGKILLed or interrupted run leaves no QEMU or
                // agent behind). The signal comes when the spawning *thread* ends: every
                // daemon is started from a thread that lives as long as it is needed.
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let child = command
            .spawn()
            .with_context(|| format!("starting {}", program.display()))?;
        Ok(Self { child, log })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The pipe of a process started with [`Daemon::spawn_piped`] (once).
    pub fn take_stdout(&mut self) -> Option<ChildStdout> {
        self.child.stdout.take()
    }

    /// Whether the process has exited (and reaped it if so).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    /// The last lines the process wrote to its log.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(3).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" / ")
    }

    /// Waits until `path` exists (a pidfile or a socket: the process finished starting up)
    /// or the process exits.
    pub fn wait_started(&mut self, path: &Path) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("exited at start-up ({status}): {}", self.log_tail());
            }
            if path.exists() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("not started after {START_TIMEOUT:?}: {}", self.log_tail());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGTERM, then SIGKILL if it has not exited within [`EXIT_TIMEOUT`].
    pub fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: kill takes no pointers; the pid is our child's, which has not been
        // reaped (try_wait above saw it running), so the id is not reused.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + EXIT_TIMEOUT;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !matches!(self.child.try_wait(), Ok(Some(_))) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// A QMP connection: one JSON object per line; events that arrive while waiting for a
/// command's answer are kept for [`Qmp::wait_event`] and [`Qmp::take_events`].
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: Vec<Value>,
}

impl Qmp {
    pub fn connect(path: &Path) -> anyhow::Result<Self> {
        Self::connect_within(path, COMMAND_TIMEOUT)
    }

    /// [`Qmp::connect`] to a process that may take up to `greeting_timeout` to answer (QEMU
    /// greets once its main loop runs: after it preallocated the guest's memory).
    pub fn connect_within(path: &Path, greeting_timeout: Duration) -> anyhow::Result<Self> {
        let writer =
            UnixStream::connect(path).with_context(|| format!("connecting {}", path.display()))?;
        let mut qmp = Self {
            reader: BufReader::new(writer.try_clone()?),
            writer,
            events: Vec::new(),
        };
        let greeting = qmp.read(Instant::now() + greeting_timeout)?;
        anyhow::ensure!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self, deadline: Instant) -> anyhow::Result<Value> {
        let left = deadline.saturating_duration_since(Instant::now());
        anyhow::ensure!(!left.is_zero(), "timed out waiting for QMP");
        self.reader.get_ref().set_read_timeout(Some(left))?;
        let mut line = String::new();
        let n = self
            .reader
            .read_line(&mut line)
            .context("reading from QMP")?;
        anyhow::ensure!(n > 0, "QMP closed");
        serde_json::from_str(&line).with_context(|| format!("bad QMP line {line:?}"))
    }

    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let mut line = json!({ "execute": command, "arguments": arguments }).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let message = self.read(deadline)?;
            if message.get("event").is_some() {
                self.events.push(message);
            } else if let Some(value) = message.get("return") {
                return Ok(value.clone());
            } else if let Some(error) = message.get("error") {
                bail!("{command}: {}", error["desc"].as_str().unwrap_or("error"));
            }
        }
    }

    /// Waits for an event `pick` decides on: `Some(Ok)` ends the wait, `Some(Err)` fails it.
    pub fn wait_event(
        &mut self,
        deadline: Instant,
        mut pick: impl FnMut(&Value) -> Option<anyhow::Result<()>>,
    ) -> anyhow::Result<()> {
        for event in std::mem::take(&mut self.events) {
            if let Some(result) = pick(&event) {
                return result;
            }
        }
        loop {
            let message = self.read(deadline)?;
            if message.get("event").is_some() {
                if let Some(result) = pick(&message) {
                    return result;
                }
            }
        }
    }

    /// The events received so far and not yet consumed by [`Qmp::wait_event`].
    pub fn take_events(&mut self) -> Vec<Value> {
        std::mem::take(&mut self.events)
    }
}
