//! The fault-injection matrix: every phase of a migration × every fault, with real agent
//! processes on two "hosts" (network namespaces joined by a veth pair, see
//! [`ferry_tests::netns`]).
//!
//! Each cell arms a failpoint in the agent that owns the phase's site (`FERRY_FAILPOINT_DIR`,
//! see `ferry_dataplane::failpoint`): `pause` stops the migration exactly there, the test
//! applies the fault and releases it; `corrupt` makes what is sent after the site arrive
//! corrupted. A killed agent is restarted on the same data directory and address. The cell
//! then waits (bounded) for the end state every cell must reach:
//! - exactly one agent lists the VM, as running, and its vCPUs advance there;
//! - `vm verify` passes there;
//! - it is the side the swap's commit point decides: the source before the commit point,
//!   the destination after it (for a fault whose outcome legitimately depends on timing,
//!   either, but never against what the migrate command reported).
//!
//! The faults: `kill -9` of an agent (restarted at once on its data directory); the link
//! between the hosts down at both ends for [`OUTAGE`]; `ferry cancel`; the destination's
//! disk full (while preparing: a tmpfs smaller than the image, so creating it fails; later:
//! its tmpfs filled up at the failpoint and its journal appends failing with ENOSPC, the
//! `journal-append` failpoint, for [`OUTAGE`]); a corrupted data frame, or once the data is
//! sent a corrupted control message (the call site at the failpoint chooses).
//!
//! Each cell prints one line, also when it fails, that `tests/matrix-table` turns into the
//! table in docs/:
//! `MATRIX|phase|fault|ended on|verify|recover ms|pass or FAIL|expected; failpoint; note`.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use ferry_tests::netns::{NsAgent, TwoHosts};
use ferry_tests::{ferry_bin, SmallFs};
use serde_json::Value;

const VM: &str = "fault-vm";
/// How long a migration may take to reach its failpoint.
const REACH_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a cut or a full disk lasts before it is healed.
const OUTAGE: Duration = Duration::from_secs(3);
/// How long after the fault the end state may take (recovery included).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);
/// The migrate command's end, after the end state was reached.
const CLI_END_TIMEOUT: Duration = Duration::from_secs(15);
/// Destination data directory when its disk is to fill up: room for the VM's 8 MiB image,
/// the journal and the identity, then a filler file takes the rest.
const FILLABLE_FS_MIB: u64 = 16;
/// Destination data directory too small for the VM's image (prepare × disk full).
const TOO_SMALL_FS_MIB: u64 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Prepare,
    DiskCopy,
    PreCopy,
    BeforeCommit,
    AfterCommit,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Prepare => "prepare",
            Phase::DiskCopy => "disk-copy",
            Phase::PreCopy => "pre-copy-round",
            Phase::BeforeCommit => "switch-over-before-commit",
            Phase::AfterCommit => "after-commit-before-resume",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    KillSource,
    KillDestination,
    Cut,
    Cancel,
    DiskFull,
    Corrupt,
}

impl Fault {
    fn name(self) -> &'static str {
        match self {
            Fault::KillSource => "kill-source",
            Fault::KillDestination => "kill-destination",
            Fault::Cut => "network-cut",
            Fault::Cancel => "cli-cancel",
            Fault::DiskFull => "destination-disk-full",
            Fault::Corrupt => "corrupt-frame",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Side {
    Source,
    Destination,
}

impl Side {
    fn name(self) -> &'static str {
        match self {
            Side::Source => "source",
            Side::Destination => "destination",
        }
    }
}

/// Where the VM must end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    On(Side),
    /// Either side is right (timing decides), as long as it agrees with what the migrate
    /// command reported when it reported an outcome.
    Either,
}

impl Expect {
    fn describe(self) -> &'static str {
        match self {
            Expect::On(Side::Source) => "source",
            Expect::On(Side::Destination) => "destination",
            Expect::Either => "either",
        }
    }
}

/// The destination's data directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DestinationFs {
    /// A temporary directory on the test's filesystem.
    Plain,
    /// A tmpfs with room for the image; filled up with a file when the fault strikes.
    Fillable,
    /// A tmpfs too small for the image.
    TooSmall,
}

/// One cell: where to stop, what to expect.
#[derive(Clone, Copy, Debug)]
struct Cell {
    phase: Phase,
    fault: Fault,
    /// The failpoint to pause (or corrupt) at, and the agent whose site it is.
    failpoint: Option<(&'static str, Side)>,
    expect: Expect,
    destination_fs: DestinationFs,
}

impl Cell {
    fn new(phase: Phase, fault: Fault) -> Cell {
        use Fault::*;
        use Phase::*;
        let source = |name| Some((name, Side::Source));
        let destination = |name| Some((name, Side::Destination));
        let failpoint = match (phase, fault) {
            // A destination without room for the image refuses the migration while
            // preparing: a real ENOSPC, no failpoint needed.
            (Prepare, DiskFull) => None,
            (Prepare, KillDestination | Cut) => destination("dest-prepare"),
            (Prepare, _) => source("source-prepare"),
            (DiskCopy, _) => source("source-disk-copy"),
            (PreCopy, _) => source("source-precopy-round"),
            (BeforeCommit, _) => source("source-before-commit"),
            (AfterCommit, KillDestination | DiskFull) => destination("dest-after-commit"),
            (AfterCommit, _) => source("source-after-commit"),
        };
        let expect = match (phase, fault) {
            // Past the commit point the VM can only live on the destination.
            (AfterCommit, _) => Expect::On(Side::Destination),
            // `Prepared` was received: nothing on the network or the destination can stop
            // the source from committing now; only its own crash or a cancel can.
            (BeforeCommit, KillSource | Cancel) => Expect::On(Side::Source),
            (BeforeCommit, Cut | DiskFull | Corrupt) => Expect::On(Side::Destination),
            // The source may commit before it notices the destination died, or abort.
            (BeforeCommit, KillDestination) => Expect::Either,
            // A short cut may just delay the migration; a corrupted page may be sent again
            // (dirtied) before the switch-over and so be healed. Verify decides.
            (_, Cut | Corrupt) => Expect::Either,
            (_, KillSource | KillDestination | Cancel | DiskFull) => Expect::On(Side::Source),
        };
        let destination_fs = match (phase, fault) {
            (Prepare, DiskFull) => DestinationFs::TooSmall,
            (_, DiskFull) => DestinationFs::Fillable,
            _ => DestinationFs::Plain,
        };
        Cell {
            phase,
            fault,
            failpoint,
            expect,
            destination_fs,
        }
    }
}

/// How a cell ended.
struct Ended {
    side: Side,
    verify_ok: bool,
    recover_ms: u128,
    note: String,
}

/// What the migrate command reported.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Reported {
    Completed,
    /// Failed before the commit point: the VM kept running on the source (why).
    FailedBack(String),
    /// Failed after the commit point: the destination did not confirm (why).
    Committed(String),
    /// No outcome (its agent died, or an error that says neither).
    Unknown(String),
}

fn classify(stdout: &str) -> Reported {
    let last = stdout.lines().rev().find(|l| !l.trim().is_empty());
    let Some(value) = last.and_then(|l| serde_json::from_str::<Value>(l).ok()) else {
        return Reported::Unknown(format!("no JSON answer: {:?}", stdout.trim()));
    };
    if value.get("downtime_ms").is_some() && value.get("total_ms").is_some() {
        return Reported::Completed;
    }
    let error = value["error"]
        .as_str()
        .map(str::to_string)
        .unwrap_or_else(|| value.to_string());
    if error.contains("commit point") {
        Reported::Committed(short_reason(&error))
    } else if error.contains("keeps running on the source") {
        Reported::FailedBack(short_reason(&error))
    } else {
        Reported::Unknown(short_reason(&error))
    }
}

/// The heart of a migrate error: after "failed: ", before "; the …", at most 100 chars.
fn short_reason(error: &str) -> String {
    let after = error.split_once("failed: ").map_or(error, |(_, rest)| rest);
    let before = after.split_once("; the ").map_or(after, |(head, _)| head);
    before.chars().take(100).collect()
}

impl std::fmt::Display for Reported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reported::Completed => write!(f, "migrate completed"),
            Reported::FailedBack(why) => write!(f, "migrate failed back ({why})"),
            Reported::Committed(why) => write!(f, "migrate committed, unconfirmed ({why})"),
            Reported::Unknown(why) => write!(f, "migrate said nothing definite ({why})"),
        }
    }
}

/// A failpoint directory of one agent: arm, reached and release files.
struct Failpoints {
    dir: PathBuf,
}

impl Failpoints {
    fn new(root: &Path, agent: &str) -> Failpoints {
        let dir = root.join(format!("failpoints-{agent}"));
        for sub in ["arm", "reached", "release"] {
            std::fs::create_dir_all(dir.join(sub)).unwrap();
        }
        Failpoints { dir }
    }

    fn arm(&self, name: &str, action: &str) {
        std::fs::write(self.dir.join("arm").join(name), action).unwrap();
    }

    fn disarm(&self, name: &str) {
        let _ = std::fs::remove_file(self.dir.join("arm").join(name));
    }

    fn reached(&self, name: &str) -> bool {
        self.dir.join("reached").join(name).exists()
    }

    fn release(&self, name: &str) {
        std::fs::write(self.dir.join("release").join(name), "").unwrap();
    }
}

/// The migrate command, run in the background, its output collected by a thread.
struct MigrateCommand {
    pid: u32,
    done: mpsc::Receiver<(bool, String, String)>,
    result: Option<(bool, String, String)>,
}

impl MigrateCommand {
    fn start(mut child: Child) -> MigrateCommand {
        let pid = child.id();
        let (tx, done) = mpsc::channel();
        std::thread::spawn(move || {
            let stdout = child.stdout.take();
            let stderr = child.stderr.take();
            let read = |r: Option<Box<dyn std::io::Read + Send>>| {
                let mut text = String::new();
                if let Some(mut r) = r {
                    let _ = r.read_to_string(&mut text);
                }
                text
            };
            let err_thread = std::thread::spawn(move || {
                read(stderr.map(|s| Box::new(s) as Box<dyn std::io::Read + Send>))
            });
            let out = read(stdout.map(|s| Box::new(s) as Box<dyn std::io::Read + Send>));
            let err = err_thread.join().unwrap_or_default();
            let ok = child.wait().is_ok_and(|s| s.success());
            let _ = tx.send((ok, out, err));
        });
        MigrateCommand {
            pid,
            done,
            result: None,
        }
    }

    fn finished(&mut self) -> bool {
        if self.result.is_none() {
            self.result = self.done.try_recv().ok();
        }
        self.result.is_some()
    }

    /// Waits for the command's end (killing it after `timeout`) and returns what it said.
    fn wait(&mut self, timeout: Duration) -> Reported {
        if self.result.is_none() {
            self.result = self.done.recv_timeout(timeout).ok();
        }
        match &self.result {
            Some((true, out, _)) => classify(out),
            Some((false, out, err)) => match classify(out) {
                Reported::Unknown(why) => {
                    Reported::Unknown(format!("{why} {}", short_reason(err.trim())))
                }
                other => other,
            },
            None => {
                // Our own child: stop it by its pid.
                let _ = std::process::Command::new("kill")
                    .args(["-9", &self.pid.to_string()])
                    .status();
                Reported::Unknown(format!(
                    "still running {} s after the end state",
                    timeout.as_secs()
                ))
            }
        }
    }
}

/// What ends an outage.
enum Heal {
    Nothing,
    /// The link comes back up.
    Link,
    /// The filler is removed and journal appends work again.
    Disk(PathBuf),
}

/// Fills the filesystem under `dir` with a file until not one more byte fits; returns the
/// file.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut file = std::fs::File::create(&path).expect("create the filler");
    // Big pieces first, then smaller ones for what is left.
    for piece in [64 << 10, 4 << 10, 1] {
        let block = vec![0xa5u8; piece];
        while file.write_all(&block).is_ok() {}
    }
    let _ = file.sync_all();
    path
}

/// One agent's view of the VM: None when not listed, else (state, running).
type Seen = Result<Option<(String, bool)>, String>;

fn seen(agent: &NsAgent) -> Seen {
    let vms = agent.vms()?;
    Ok(vms.iter().find(|vm| vm["name"] == VM).map(|vm| {
        (
            vm["state"].as_str().unwrap_or("?").to_string(),
            vm["running"].as_bool().unwrap_or(false),
        )
    }))
}

fn runs(seen: &Seen) -> bool {
    matches!(seen, Ok(Some((state, true))) if state == "running")
}

/// Polls both agents until exactly one runs the VM and the other does not list it.
fn settle(source: &NsAgent, destination: &NsAgent, deadline: Instant) -> Result<Side, String> {
    loop {
        let (s, d) = (seen(source), seen(destination));
        match (runs(&s), runs(&d), &s, &d) {
            (true, false, _, Ok(None)) => return Ok(Side::Source),
            (false, true, Ok(None), _) => return Ok(Side::Destination),
            _ => {}
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "no end state after {} s: source {s:?}, destination {d:?}",
                SETTLE_TIMEOUT.as_secs()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The VM every cell migrates. Small and busy: 16 MiB of memory dirtied uniformly, an 8 MiB
/// disk written at random.
fn create_vm(source: &NsAgent) {
    source.json(&[
        "vm",
        "create",
        VM,
        "--memory",
        "16M",
        "--vcpus",
        "1",
        "--dirty-rate",
        "4MB/s",
        "--pattern",
        "uniform",
        "--disk",
        "8M",
        "--disk-write-rate",
        "256K/s",
        "--disk-pattern",
        "random",
    ]);
}

/// Runs one cell to its end state and checks it.
fn execute(hosts: &TwoHosts, cell: &Cell, root: &Path) -> Result<Ended, String> {
    let source_data = root.join("source-data");
    std::fs::create_dir_all(&source_data).unwrap();
    let small_fs;
    let destination_data = match cell.destination_fs {
        DestinationFs::Plain => {
            let dir = root.join("destination-data");
            std::fs::create_dir_all(&dir).unwrap();
            dir
        }
        DestinationFs::Fillable | DestinationFs::TooSmall => {
            let mib = if cell.destination_fs == DestinationFs::TooSmall {
                TOO_SMALL_FS_MIB
            } else {
                FILLABLE_FS_MIB
            };
            small_fs = SmallFs::mount(mib).ok_or("cannot mount a tmpfs")?;
            small_fs.path().to_path_buf()
        }
    };
    let source_fp = Failpoints::new(root, "source");
    let destination_fp = Failpoints::new(root, "destination");
    let source_log = root.join("source.log");
    let destination_log = root.join("destination.log");
    let mut source = NsAgent::start(
        &hosts.a,
        &source_data,
        &[("FERRY_FAILPOINT_DIR", &source_fp.dir)],
        &source_log,
    );
    let mut destination = NsAgent::start(
        &hosts.b,
        &destination_data,
        &[("FERRY_FAILPOINT_DIR", &destination_fp.dir)],
        &destination_log,
    );
    let logs = || {
        format!(
            "\n--- source agent log (tail) ---\n{}\n--- destination agent log (tail) ---\n{}",
            tail(&source_log, 25),
            tail(&destination_log, 25)
        )
    };

    create_vm(&source);
    std::thread::sleep(Duration::from_millis(200));

    let fp = cell.failpoint.map(|(name, side)| {
        let dir = match side {
            Side::Source => &source_fp,
            Side::Destination => &destination_fp,
        };
        (name, dir)
    });
    let action = if cell.fault == Fault::Corrupt {
        "corrupt"
    } else {
        "pause"
    };
    if let Some((name, dir)) = &fp {
        dir.arm(name, action);
    }
    // The cap makes round 0 take ~0.5 s and a 1 ms downtime budget is never met, so there
    // are pre-copy rounds 1, 2, … up to --rounds-max, whatever the link's speed.
    let migrate_started = Instant::now();
    let mut migrate = MigrateCommand::start(source.spawn_cli(&[
        "migrate",
        VM,
        "--to",
        &destination.addr,
        "--transport",
        "tcp",
        "--streams",
        "2",
        "--max-bandwidth",
        "32MB/s",
        "--downtime-ms",
        "1",
        "--rounds-max",
        "4",
    ]));

    // Stop at the failpoint (or, for a corruption, let the migration run past it).
    if let Some((name, dir)) = &fp {
        let deadline = Instant::now() + REACH_TIMEOUT;
        while !dir.reached(name) {
            if action == "pause" && migrate.finished() || Instant::now() >= deadline {
                let said = migrate.wait(Duration::from_secs(1));
                return Err(format!(
                    "failpoint {name} was never reached (is it placed?); {said}{}",
                    logs()
                ));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let release = |fp: &Option<(&str, &Failpoints)>| {
        if let Some((name, dir)) = fp {
            dir.disarm(name);
            dir.release(name);
        }
    };
    let fault_at = Instant::now();
    let mut fault_at_ref = fault_at;
    let mut heal = Heal::Nothing;
    match cell.fault {
        Fault::KillSource => {
            source.kill();
            release(&fp);
            source.restart();
        }
        Fault::KillDestination => {
            destination.kill();
            release(&fp);
            destination.restart();
        }
        Fault::Cut => {
            hosts.cut();
            release(&fp);
            heal = Heal::Link;
        }
        Fault::Cancel => {
            let cancelled = source.try_json(&["cancel", VM]);
            release(&fp);
            cancelled.map_err(|e| format!("cancel failed: {e}"))?;
        }
        Fault::DiskFull => match cell.destination_fs {
            DestinationFs::Fillable => {
                // The filesystem really fills up; and since an append into a block the
                // journal already has may still fit, its appends fail as on a full disk
                // (`journal-append` failpoint) until the space is back.
                let filler = fill(&destination_data);
                destination_fp.arm("journal-append", "enospc");
                release(&fp);
                heal = Heal::Disk(filler);
            }
            _ => {
                // No room for the image at all: refused while preparing.
                fault_at_ref = migrate_started;
            }
        },
        Fault::Corrupt => {
            // Armed before the migration; it has run past the site by now.
            fault_at_ref = migrate_started;
            if let Some((name, dir)) = &fp {
                dir.disarm(name);
            }
        }
    }

    // An outage ends after OUTAGE, while the end state is watched for (an agent may well
    // settle during it, e.g. by failing back).
    let (settled, recover_ms) = std::thread::scope(|scope| {
        let healer = scope.spawn(|| {
            std::thread::sleep(OUTAGE);
            match &heal {
                Heal::Nothing => Ok(()),
                Heal::Link => {
                    hosts.heal();
                    Ok(())
                }
                Heal::Disk(filler) => {
                    destination_fp.disarm("journal-append");
                    std::fs::remove_file(filler).map_err(|e| format!("removing the filler: {e}"))
                }
            }
        });
        let settled = settle(&source, &destination, fault_at + OUTAGE + SETTLE_TIMEOUT);
        let recover_ms = fault_at_ref.elapsed().as_millis();
        let healed = healer.join().expect("the healer panicked");
        (healed.and(settled), recover_ms)
    });
    let reported = migrate.wait(CLI_END_TIMEOUT);
    let side = settled.map_err(|e| format!("{e}; {reported}{}", logs()))?;
    let (winner, loser) = match side {
        Side::Source => (&source, &destination),
        Side::Destination => (&destination, &source),
    };
    let verify = winner.verify(VM);
    let verify_ok = verify["ok"] == true;
    let mut problems = Vec::new();
    if !verify_ok {
        problems.push(format!("verify failed on the {}: {verify}", side.name()));
    }
    if !winner.advances(VM, Duration::from_secs(5)) {
        problems.push(format!("the VM does not advance on the {}", side.name()));
    }
    if !matches!(seen(loser), Ok(None)) {
        problems.push(format!(
            "the {} lists the VM again: {:?}",
            if side == Side::Source {
                "destination"
            } else {
                "source"
            },
            seen(loser)
        ));
    }
    match cell.expect {
        Expect::On(expected) if expected != side => problems.push(format!(
            "ended on the {} but must end on the {}",
            side.name(),
            expected.name()
        )),
        _ => {}
    }
    let agrees = !matches!(
        (&reported, side),
        (Reported::Completed | Reported::Committed(_), Side::Source)
            | (Reported::FailedBack(_), Side::Destination)
    );
    if !agrees {
        problems.push(format!("ended on the {} although {reported}", side.name()));
    }
    let note = reported.to_string();
    if problems.is_empty() {
        Ok(Ended {
            side,
            verify_ok,
            recover_ms,
            note,
        })
    } else {
        Err(format!(
            "ended on the {} in {recover_ms} ms: {}; {note}{}",
            side.name(),
            problems.join("; "),
            logs()
        ))
    }
}

/// Fails unless the `ferry` under test has failpoints: a `cargo build -p ferry-control`
/// makes one without them (only a workspace build turns the feature on), and every cell
/// would then fail for that reason alone.
fn assert_failpoints_compiled_in() {
    static CHECKED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let present = *CHECKED.get_or_init(|| {
        let binary = std::fs::read(ferry_bin()).expect("read the ferry binary");
        let needle = b"FERRY_FAILPOINT_DIR";
        binary.windows(needle.len()).any(|w| w == needle)
    });
    assert!(
        present,
        "{} has no failpoints: build it with `cargo build --release --workspace --all-targets` \
         (a `-p ferry-control` build leaves the `failpoints` feature off)",
        ferry_bin().display()
    );
}

/// Runs a cell, prints its MATRIX line, and fails the test if the cell failed.
fn run_cell(phase: Phase, fault: Fault) {
    let Some(hosts) = TwoHosts::new() else {
        return;
    };
    assert_failpoints_compiled_in();
    let cell = Cell::new(phase, fault);
    let root = tempfile::tempdir().expect("temp dir");
    let result = catch_unwind(AssertUnwindSafe(|| execute(&hosts, &cell, root.path())))
        .unwrap_or_else(|panic| {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panicked".into());
            Err(format!("panicked: {message}"))
        });
    let failpoint = cell
        .failpoint
        .map_or("no failpoint".to_string(), |(name, side)| {
            format!("{name} on the {}", side.name())
        });
    let setup = match cell.destination_fs {
        DestinationFs::Plain => "",
        DestinationFs::Fillable => {
            "; destination tmpfs filled and journal-append=enospc there for 3 s from the failpoint"
        }
        DestinationFs::TooSmall => "; destination tmpfs smaller than the image",
    };
    let expected = format!("expected {}; {failpoint}{setup}", cell.expect.describe());
    let line = match &result {
        Ok(ended) => format!(
            "MATRIX|{}|{}|{}|{}|{}|pass|{expected}; {}",
            cell.phase.name(),
            fault.name(),
            ended.side.name(),
            if ended.verify_ok { "ok" } else { "failed" },
            ended.recover_ms,
            ended.note
        ),
        Err(why) => format!(
            "MATRIX|{}|{}|-|-|-|FAIL|{expected}; {}",
            phase.name(),
            fault.name(),
            why.lines().next().unwrap_or("").replace('|', "/")
        ),
    };
    println!("{line}");
    if let Err(why) = result {
        panic!("{} × {}: {why}", phase.name(), fault.name());
    }
}

/// One test per cell: `matrix_<phase>__<fault>`.
macro_rules! matrix {
    ($($test:ident: $phase:ident, $fault:ident;)*) => {
        $(
            #[test]
            #[allow(non_snake_case)]
            fn $test() {
                run_cell(Phase::$phase, Fault::$fault);
            }
        )*
    };
}

matrix! {
    matrix_prepare__kill_source: Prepare, KillSource;
    matrix_prepare__kill_destination: Prepare, KillDestination;
    matrix_prepare__network_cut: Prepare, Cut;
    matrix_prepare__cli_cancel: Prepare, Cancel;
    matrix_prepare__destination_disk_full: Prepare, DiskFull;
    matrix_prepare__corrupt_frame: Prepare, Corrupt;

    matrix_disk_copy__kill_source: DiskCopy, KillSource;
    matrix_disk_copy__kill_destination: DiskCopy, KillDestination;
    matrix_disk_copy__network_cut: DiskCopy, Cut;
    matrix_disk_copy__cli_cancel: DiskCopy, Cancel;
    matrix_disk_copy__destination_disk_full: DiskCopy, DiskFull;
    matrix_disk_copy__corrupt_frame: DiskCopy, Corrupt;

    matrix_precopy_round__kill_source: PreCopy, KillSource;
    matrix_precopy_round__kill_destination: PreCopy, KillDestination;
    matrix_precopy_round__network_cut: PreCopy, Cut;
    matrix_precopy_round__cli_cancel: PreCopy, Cancel;
    matrix_precopy_round__destination_disk_full: PreCopy, DiskFull;
    matrix_precopy_round__corrupt_frame: PreCopy, Corrupt;

    matrix_before_commit__kill_source: BeforeCommit, KillSource;
    matrix_before_commit__kill_destination: BeforeCommit, KillDestination;
    matrix_before_commit__network_cut: BeforeCommit, Cut;
    matrix_before_commit__cli_cancel: BeforeCommit, Cancel;
    matrix_before_commit__destination_disk_full: BeforeCommit, DiskFull;
    matrix_before_commit__corrupt_frame: BeforeCommit, Corrupt;

    matrix_after_commit__kill_source: AfterCommit, KillSource;
    matrix_after_commit__kill_destination: AfterCommit, KillDestination;
    matrix_after_commit__network_cut: AfterCommit, Cut;
    matrix_after_commit__cli_cancel: AfterCommit, Cancel;
    matrix_after_commit__destination_disk_full: AfterCommit, DiskFull;
    matrix_after_commit__corrupt_frame: AfterCommit, Corrupt;
}

#[test]
fn the_cells_expect_the_commit_point_to_decide() {
    use Fault::*;
    use Phase::*;
    for fault in [KillSource, KillDestination, Cut, Cancel, DiskFull, Corrupt] {
        assert_eq!(
            Cell::new(AfterCommit, fault).expect,
            Expect::On(Side::Destination)
        );
        for phase in [Prepare, DiskCopy, PreCopy] {
            assert_ne!(
                Cell::new(phase, fault).expect,
                Expect::On(Side::Destination),
                "{phase:?} × {fault:?} is before the commit point"
            );
        }
    }
    assert_eq!(
        classify(r#"{"total_ms":5,"downtime_ms":1}"#),
        Reported::Completed
    );
    assert_eq!(
        classify(
            r#"{"error":"migration of \"x\" to y failed: z; the VM keeps running on the source"}"#
        ),
        Reported::FailedBack("z".into())
    );
    assert_eq!(
        classify(r#"{"error":"… passed the commit point but the destination did not confirm"}"#),
        Reported::Committed("… passed the commit point but the destination did not confirm".into())
    );
    assert!(matches!(classify(""), Reported::Unknown(_)));
}

/// Beyond the matrix: a cut that outlasts the switch-over bound at the worst moment (the
/// destination prepared, `Prepared` received, nothing journaled yet) makes the source fail
/// back by its bound; the destination, prepared and cut off, must not resume on its own: it
/// ends up discarding (told by the source's `Abort` once the link is back, or by asking the
/// source's agent, whose journal says aborted). The VM ends on the source, verified.
#[test]
fn a_cut_longer_than_the_switchover_bound_fails_back_and_the_prepared_destination_discards() {
    let Some(hosts) = TwoHosts::new() else {
        return;
    };
    assert_failpoints_compiled_in();
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let (source_data, destination_data) = (root.join("source-data"), root.join("destination-data"));
    for dir in [&source_data, &destination_data] {
        std::fs::create_dir_all(dir).unwrap();
    }
    let source_fp = Failpoints::new(root, "source");
    let (source_log, destination_log) = (root.join("source.log"), root.join("destination.log"));
    let source = NsAgent::start(
        &hosts.a,
        &source_data,
        &[("FERRY_FAILPOINT_DIR", &source_fp.dir)],
        &source_log,
    );
    let destination = NsAgent::start(&hosts.b, &destination_data, &[], &destination_log);
    create_vm(&source);
    source_fp.arm("source-before-commit", "pause");
    let mut migrate = MigrateCommand::start(source.spawn_cli(&[
        "migrate",
        VM,
        "--to",
        &destination.addr,
        "--transport",
        "tcp",
        "--switchover-timeout",
        "1s",
    ]));
    let deadline = Instant::now() + REACH_TIMEOUT;
    while !source_fp.reached("source-before-commit") {
        assert!(
            Instant::now() < deadline && !migrate.finished(),
            "the switch-over was never reached: {}",
            migrate.wait(Duration::from_secs(1))
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // Prepared is in hand; the link goes down and stays down past the 1 s bound.
    hosts.cut();
    std::thread::sleep(Duration::from_millis(1500));
    source_fp.disarm("source-before-commit");
    source_fp.release("source-before-commit");
    let reported = migrate.wait(CLI_END_TIMEOUT);
    assert!(
        matches!(reported, Reported::FailedBack(_)),
        "the bound must fail the migration back: {reported}"
    );
    // Cut off and prepared, the destination neither resumes nor discards yet.
    let held = seen(&destination);
    assert!(!runs(&held), "the destination resumed on its own: {held:?}");
    hosts.heal();
    let side = settle(&source, &destination, Instant::now() + SETTLE_TIMEOUT)
        .unwrap_or_else(|e| panic!("{e}\n{}", tail(&destination_log, 30)));
    assert_eq!(side, Side::Source);
    assert_eq!(source.verify(VM)["ok"], true);
    assert!(source.advances(VM, Duration::from_secs(2)));
}
