//! Seeded simulation of the quiesce-and-swap barrier and the agents' ownership journals
//! (docs/simulation.md).
//!
//! Two agents, A and B, and one VM. The VM starts on A; the "user" migrates it from
//! whichever agent runs it to the other, again and again, while a fault window injects
//! crashes (at random ticks, right after a journal append, or in the middle of one),
//! partitions, lost, delayed, duplicated and reordered messages, a full disk, cancels, local
//! failures and lock-step mismatches. Then the network heals and both agents come up; the
//! run must settle; then both agents are killed and restarted once more, and it must settle
//! again on the same agent.
//!
//! Real code decides everything: [`SourceSwap`] and [`DestinationSwap`] (the barrier), one
//! [`Ownership`] per agent on a real journal file in a temporary directory (tmpfs), the
//! [`OutgoingSwap`]/[`IncomingSwap`] journal calls (behind `Faulty`, which fails an append
//! before it writes), [`Ownership::answer`] for outcome questions and
//! [`Ownership::recovery_plan`] after every restart. What is simulated around them: the
//! engines' loops that turn messages into machine inputs (a model of `engine::source` and
//! `engine::destination`), the control plane's reaction to the engines' ends (a model of
//! `migration::outgoing`, `migration::incoming`, `migration::resolve` and
//! `Agent::recover`), the network, the clock and the guest. Time is virtual (ticks of
//! [`TICK`]) and never slept on, so one seed is one deterministic run.
//!
//! The guest is a write counter: whichever agent runs it performs a write now and then and
//! acknowledges it. Its copy lives in files that survive the agent's crash (the reference
//! VM's memory file and step counters do); quiescing snapshots the counter into
//! `SwitchOver`, and the destination's copy becomes that snapshot.
//!
//! Checked on every tick: never both agents running the VM, and the running copy holds
//! every acknowledged write; whenever a copy resumes, its agent's journal holds the VM and,
//! for a destination, the source's journal holds the commit. Checked once settled: exactly
//! one agent runs the VM, the journals agree on who owns which epoch, and a restart of both
//! agents brings the VM back on the same agent. A failure names the seed and ends with the
//! last events; `ferry-bench simulate --seed N` replays it with every event.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use ferry_dataplane::engine::barrier::{
    DestinationAction, DestinationInput, DestinationOutcome, DestinationSwap, SourceAction,
    SourceInput, SourceOutcome, SourceSwap, SwapJournal, SwapOutcome,
};
use serde::Serialize;

use crate::journal::{decode, encode_record, Record};
use crate::ownership::{
    IncomingSwap, OutgoingEnd, OutgoingSwap, Ownership, Recovery, JOURNAL_FILE,
};

/// One tick of virtual time.
pub const TICK: Duration = Duration::from_millis(10);
/// The simulated VM's name.
const VM: &str = "vm0";
/// The agents' addresses (what the journals record as `to`/`from`) and short names.
const ADDR: [&str; 2] = ["agent-a:7070", "agent-b:7070"];
const NAME: [&str; 2] = ["A", "B"];
/// Failures kept in a [`SimReport`] (the count covers all).
const FAILURES_KEPT: usize = 20;

/// A deliberately broken variant of the code around the machines, to prove the checker
/// catches what it claims to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum Bug {
    /// A prepared destination resumes the guest when its control channel breaks, instead
    /// of asking the source's agent.
    DestinationResumesOnChannelLost,
    /// The source runs the guest again when its control channel breaks after the commit.
    SourceResumesAfterCommit,
    /// The source's journal claims the commit without writing it.
    CommitNotJournaled,
}

impl Bug {
    pub const ALL: [Bug; 3] = [
        Bug::DestinationResumesOnChannelLost,
        Bug::SourceResumesAfterCommit,
        Bug::CommitNotJournaled,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Bug::DestinationResumesOnChannelLost => "destination-resumes-on-channel-lost",
            Bug::SourceResumesAfterCommit => "source-resumes-after-commit",
            Bug::CommitNotJournaled => "commit-not-journaled",
        }
    }
}

impl std::str::FromStr for Bug {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Bug::ALL.into_iter().find(|b| b.name() == s).ok_or_else(|| {
            let names: Vec<&str> = Bug::ALL.iter().map(|b| b.name()).collect();
            format!("unknown bug {s:?} (one of: {})", names.join(", "))
        })
    }
}

/// What every seed shares; each seed draws its own fault rates and timings.
#[derive(Clone, Debug)]
pub struct SimConfig {
    /// Ticks during which faults are injected and migrations started.
    pub fault_ticks: u64,
    /// After the heal (and after the final restart), the run must settle within this.
    pub settle_ticks_max: u64,
    /// A deliberately broken variant (see [`Bug`]); `None` for the real code.
    pub bug: Option<Bug>,
    /// Events kept for a failure's trace.
    pub trace_len: usize,
    /// Keep every event ([`SeedSummary::trace`]), for replaying one seed.
    pub full_trace: bool,
    /// Where each run's temporary directory (the two journals) goes: tmpfs if possible.
    pub dir: PathBuf,
    /// Threads of [`run_seeds`].
    pub threads: usize,
    /// A restarted source that cannot record that its interrupted migration never
    /// committed keeps trying (and resumes the VM once it could). `false` models the agent
    /// as it is: it tries again only at its next restart, so the VM can stay stopped.
    pub retry_unfinished_abort: bool,
}

impl SimConfig {
    /// The `ferry-bench simulate` flags that select this configuration (but the seeds).
    pub fn replay_flags(&self) -> String {
        let mut flags = String::new();
        if self.fault_ticks != SimConfig::default().fault_ticks {
            flags += &format!(" --fault-ticks {}", self.fault_ticks);
        }
        if let Some(bug) = self.bug {
            flags += &format!(" --bug {}", bug.name());
        }
        if !self.retry_unfinished_abort {
            flags += " --no-abort-retry";
        }
        flags
    }
}

impl Default for SimConfig {
    fn default() -> Self {
        let shm = Path::new("/dev/shm");
        Self {
            fault_ticks: 3000,
            settle_ticks_max: 20_000,
            bug: None,
            trace_len: 40,
            full_trace: false,
            dir: if shm.is_dir() {
                shm.to_path_buf()
            } else {
                std::env::temp_dir()
            },
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            retry_unfinished_abort: true,
        }
    }
}

/// What happened in a run, counted; a seed's own, or summed over seeds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SimCounts {
    /// Virtual ticks simulated in all.
    pub ticks: u64,
    pub migrations: u64,
    /// Commit points journaled.
    pub committed: u64,
    /// Source machines that failed back.
    pub failed_back: u64,
    /// Destinations that went in doubt (the engine's, or a recovered `Prepared`).
    pub in_doubt: u64,
    /// In-doubt destinations that learnt the outcome, and of those, how many learnt it
    /// was committed.
    pub in_doubt_resolved: u64,
    pub in_doubt_committed: u64,
    /// Agents killed in the middle of a journal append (a torn record left behind).
    pub torn_appends: u64,
    pub crashes: u64,
    pub partitions: u64,
    /// Journal appends made to fail.
    pub journal_failures: u64,
    pub outcome_questions: u64,
    pub messages: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub reordered: u64,
}

impl SimCounts {
    fn add(&mut self, other: &SimCounts) {
        self.ticks += other.ticks;
        self.migrations += other.migrations;
        self.committed += other.committed;
        self.failed_back += other.failed_back;
        self.in_doubt += other.in_doubt;
        self.in_doubt_resolved += other.in_doubt_resolved;
        self.in_doubt_committed += other.in_doubt_committed;
        self.torn_appends += other.torn_appends;
        self.crashes += other.crashes;
        self.partitions += other.partitions;
        self.journal_failures += other.journal_failures;
        self.outcome_questions += other.outcome_questions;
        self.messages += other.messages;
        self.dropped += other.dropped;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
    }
}

/// What one seed did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SeedSummary {
    pub seed: u64,
    #[serde(flatten)]
    pub counts: SimCounts,
    /// Ticks from the heal until the run settled (the longer of the two settling phases).
    pub settle_ticks: u64,
    /// Who runs the VM at the end ("A" or "B"), and at which epoch.
    pub owner: &'static str,
    pub epoch: u64,
    /// Every event, with [`SimConfig::full_trace`].
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub trace: Vec<String>,
}

/// A violated invariant (or a run that did not settle), with what led to it.
#[derive(Clone, Debug, Serialize)]
pub struct SimFailure {
    pub seed: u64,
    pub tick: u64,
    pub violation: String,
    /// The `ferry-bench simulate` flags besides `--seed` that replay it.
    pub replay_flags: String,
    /// The last events, oldest first.
    pub trace: Vec<String>,
}

impl fmt::Display for SimFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "simulation seed {}: {} (tick {}); replay: ferry-bench simulate --seed {}{}",
            self.seed, self.violation, self.tick, self.seed, self.replay_flags
        )?;
        writeln!(f, "last events:")?;
        for event in &self.trace {
            writeln!(f, "  {event}")?;
        }
        Ok(())
    }
}

impl std::error::Error for SimFailure {}

/// What [`run_seeds`] found, summed over the seeds that passed.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SimReport {
    pub first_seed: u64,
    pub seeds: u64,
    pub passed: u64,
    pub failed: u64,
    /// The failures with the lowest seeds (at most 20).
    pub failures: Vec<SimFailure>,
    /// Summed over the seeds that passed.
    #[serde(flatten)]
    pub counts: SimCounts,
    pub settle_ticks_max: u64,
    pub settle_ticks_max_seed: u64,
    pub epoch_max: u64,
    /// Seeds that ended with the VM on A, and on B.
    pub ended_on_a: u64,
    pub ended_on_b: u64,
}

impl SimReport {
    fn add(&mut self, seed: u64, result: Result<SeedSummary, SimFailure>) {
        self.seeds += 1;
        match result {
            Err(failure) => {
                self.failed += 1;
                self.failures.push(failure);
            }
            Ok(s) => {
                self.passed += 1;
                self.counts.add(&s.counts);
                if s.settle_ticks > self.settle_ticks_max || self.passed == 1 {
                    self.settle_ticks_max = s.settle_ticks;
                    self.settle_ticks_max_seed = seed;
                }
                self.epoch_max = self.epoch_max.max(s.epoch);
                if s.owner == NAME[0] {
                    self.ended_on_a += 1;
                } else {
                    self.ended_on_b += 1;
                }
            }
        }
    }

    fn merge(&mut self, other: SimReport) {
        if other.passed > 0 && (self.passed == 0 || other.settle_ticks_max > self.settle_ticks_max)
        {
            self.settle_ticks_max = other.settle_ticks_max;
            self.settle_ticks_max_seed = other.settle_ticks_max_seed;
        }
        self.seeds += other.seeds;
        self.passed += other.passed;
        self.failed += other.failed;
        self.failures.extend(other.failures);
        self.counts.add(&other.counts);
        self.epoch_max = self.epoch_max.max(other.epoch_max);
        self.ended_on_a += other.ended_on_a;
        self.ended_on_b += other.ended_on_b;
    }
}

/// Runs seeds `first..first + count` on [`SimConfig::threads`] threads.
pub fn run_seeds(first: u64, count: u64, config: &SimConfig) -> SimReport {
    let threads = config.threads.clamp(1, 64).min(count.max(1) as usize);
    let next = AtomicU64::new(0);
    let parts: Vec<SimReport> = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                scope.spawn(|| {
                    let mut part = SimReport::default();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= count {
                            break part;
                        }
                        let seed = first.wrapping_add(i);
                        part.add(seed, run_seed_catching(seed, config));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .expect("a simulation worker panicked outside a seed")
            })
            .collect()
    });
    let mut report = SimReport {
        first_seed: first,
        ..Default::default()
    };
    for part in parts {
        report.merge(part);
    }
    report.failures.sort_by_key(|f| f.seed);
    report.failures.truncate(FAILURES_KEPT);
    report
}

/// [`run_seed`], with a panic in the code under test reported as that seed's failure.
fn run_seed_catching(seed: u64, config: &SimConfig) -> Result<SeedSummary, SimFailure> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run_seed(seed, config)))
        .unwrap_or_else(|panic| {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            Err(SimFailure {
                seed,
                tick: 0,
                violation: format!("panicked: {what}"),
                replay_flags: config.replay_flags(),
                trace: Vec::new(),
            })
        })
}

/// Runs one seed to its end: `Ok` when every invariant held and the run settled.
pub fn run_seed(seed: u64, config: &SimConfig) -> Result<SeedSummary, SimFailure> {
    let fail = |violation: String| SimFailure {
        seed,
        tick: 0,
        violation,
        replay_flags: config.replay_flags(),
        trace: Vec::new(),
    };
    let dir = tempfile::Builder::new()
        .prefix(&format!("ferry-sim-{seed}-"))
        .tempdir_in(&config.dir)
        .map_err(|e| {
            fail(format!(
                "cannot create a directory in {}: {e}",
                config.dir.display()
            ))
        })?;
    let mut sim = Sim::new(seed, config, dir.path()).map_err(fail)?;
    sim.run()
}

/// splitmix64: small, fast, and plenty to pick faults with. Every draw of a run comes
/// from this one stream, so the seed alone decides the run.
#[derive(Clone, Debug)]
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (`lo <= hi < u64::MAX`).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        let span = u128::from(hi - lo + 1);
        lo + ((u128::from(self.next()) * span) >> 64) as u64
    }

    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// True with probability `p` (no draw when `p` is zero).
    fn chance(&mut self, p: f64) -> bool {
        p > 0.0 && self.unit() < p
    }

    /// Swarm testing: a kind of fault is on for about half the seeds, at a rate in
    /// `lo..hi`, so some seeds stress one fault alone and others several together.
    fn maybe(&mut self, lo: f64, hi: f64) -> f64 {
        if self.chance(0.5) {
            lo + (hi - lo) * self.unit()
        } else {
            0.0
        }
    }
}

/// One seed's fault rates and timings (in ticks), drawn first.
#[derive(Clone)]
struct Profile {
    /// Per message.
    loss: f64,
    dup: f64,
    /// Per control message: may overtake the ones sent before it.
    reorder: f64,
    /// Per message: a delay of up to twice the switch-over bound.
    spike: f64,
    delay_max: u64,
    /// A broken connection is noticed by each end within this.
    detect_max: u64,
    /// Per agent and tick.
    crash: f64,
    restart_max: u64,
    /// Per tick.
    partition: f64,
    partition_max: u64,
    /// Per journal append: the disk fills up (ENOSPC), for up to `disk_full_max` ticks:
    /// every append fails before writing.
    journal_fail: f64,
    disk_full_max: u64,
    /// Per journal append of the barrier: the agent dies in the middle of it.
    torn: f64,
    /// Per journal append that succeeded: the agent dies right after it.
    crash_after_append: f64,
    /// Per tick of an outgoing migration before its commit point.
    cancel: f64,
    /// Per tick of a migration before its switch-over (a send, a stream, the guest).
    local_fail: f64,
    /// Per switch-over: the destination's digests differ.
    mismatch: f64,
    /// Per idle tick: the user starts a migration.
    start: f64,
    precopy_max: u64,
    switchover_timeout: u64,
    /// The destination waits the switch-over bound plus this for the decision.
    decision_margin: u64,
    ask_interval: u64,
    /// An outcome question without an answer by then fails (`OutcomeUnknown`).
    ask_timeout: u64,
    /// Per tick the guest runs: one acknowledged write.
    write: f64,
}

impl fmt::Debug for Profile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let p = self;
        write!(
            f,
            "rates: loss {:.3} dup {:.3} reorder {:.3} spike {:.3} crash {:.5}/tick \
             partition {:.5}/tick disk-full {:.3} torn {:.3} crash-after-append {:.3} \
             cancel {:.4}/tick local-fail {:.4}/tick mismatch {:.3} start {:.3}/tick \
             write {:.2}/tick; ticks: delay <={} detect <={} restart <={} partition <={} \
             disk-full <={} pre-copy <={} switch-over {} decision margin {} ask every {} \
             (timeout {})",
            p.loss,
            p.dup,
            p.reorder,
            p.spike,
            p.crash,
            p.partition,
            p.journal_fail,
            p.torn,
            p.crash_after_append,
            p.cancel,
            p.local_fail,
            p.mismatch,
            p.start,
            p.write,
            p.delay_max,
            p.detect_max,
            p.restart_max,
            p.partition_max,
            p.disk_full_max,
            p.precopy_max,
            p.switchover_timeout,
            p.decision_margin,
            p.ask_interval,
            p.ask_timeout
        )
    }
}

impl Profile {
    fn draw(rng: &mut Rng, fault_ticks: u64) -> Profile {
        let window = fault_ticks.max(1) as f64;
        Profile {
            loss: rng.maybe(0.0, 0.08),
            dup: rng.maybe(0.0, 0.15),
            reorder: rng.maybe(0.0, 0.3),
            spike: rng.maybe(0.0, 0.05),
            delay_max: rng.range(1, 8),
            detect_max: rng.range(1, 40),
            crash: rng.maybe(0.5, 5.0) / window,
            restart_max: rng.range(1, 300),
            partition: rng.maybe(0.5, 5.0) / window,
            partition_max: rng.range(5, 300),
            journal_fail: rng.maybe(0.0, 0.15),
            disk_full_max: rng.range(0, 200),
            torn: rng.maybe(0.0, 0.05),
            crash_after_append: rng.maybe(0.0, 0.08),
            cancel: rng.maybe(0.0, 0.01),
            local_fail: rng.maybe(0.0, 0.01),
            mismatch: rng.maybe(0.0, 0.1),
            start: 1.0 / rng.range(2, 80) as f64,
            precopy_max: rng.range(1, 60),
            switchover_timeout: rng.range(5, 80),
            decision_margin: rng.range(1, 60),
            ask_interval: rng.range(1, 60),
            ask_timeout: rng.range(2, 40),
            write: 0.2 + 0.8 * rng.unit(),
        }
    }
}

/// A control-channel message between the engines.
#[derive(Clone, Debug)]
enum Ctl {
    /// The final round and the device state: the guest's write count at the quiesce.
    SwitchOver {
        writes: u64,
    },
    Prepared,
    NotInLockStep,
    Commit,
    Abort(String),
    Resumed,
}

/// Something on its way to an agent.
#[derive(Clone, Debug)]
enum Packet {
    Control {
        conn: u64,
        to: usize,
        msg: Ctl,
    },
    /// End `to` of `conn` notices it broke or was closed.
    Lost {
        conn: u64,
        to: usize,
        why: &'static str,
    },
    /// An outcome question, on its own connection.
    Ask {
        ask: u64,
        asker: usize,
        epoch: u64,
        session: u64,
    },
    Answer {
        ask: u64,
        to: usize,
        outcome: SwapOutcome,
    },
}

/// A control connection between the two engines of one migration.
#[derive(Clone, Debug)]
struct Conn {
    /// Reset: nothing more is sent on it.
    broken: bool,
    /// Messages arriving at that end from this tick on are lost (once reset: what was
    /// already on its way may still arrive before the reset is noticed).
    deliver_until: [u64; 2],
    /// Closed by that end (its engine returned).
    closed: [bool; 2],
    /// Latest delivery tick scheduled towards each end (TCP delivers in order).
    last_at: [u64; 2],
}

impl Conn {
    fn new() -> Conn {
        Conn {
            broken: false,
            deliver_until: [u64::MAX; 2],
            closed: [false; 2],
            last_at: [0; 2],
        }
    }
}

/// The VM's files on an agent: they survive the agent's crash. `writes` is `None` for an
/// incoming copy before its device state was loaded.
#[derive(Clone, Debug)]
struct VmFiles {
    writes: Option<u64>,
}

struct Outgoing {
    swap: SourceSwap,
    session: u64,
    conn: u64,
    precopy_until: u64,
    quiesced: bool,
    resume_due: bool,
}

struct Incoming {
    swap: DestinationSwap,
    session: u64,
    /// The epoch the VM has here once owned.
    epoch: u64,
    conn: u64,
    loaded: bool,
}

enum Engine {
    Out(Outgoing),
    In(Incoming),
}

/// A prepared destination whose engine gave up waiting (or that restarted with `Prepared`
/// in its journal): the control plane keeps the copy paused and asks.
struct Doubt {
    swap: DestinationSwap,
    session: u64,
    epoch: u64,
    /// The outstanding question and when it counts as unanswered.
    asking: Option<(u64, u64)>,
}

/// The control plane records the end of an outgoing migration (a little after the engine
/// returned: a crash can fall in between).
struct Finish {
    at: u64,
    session: u64,
    end: OutgoingEnd,
}

struct Agent {
    dir: PathBuf,
    /// `None` while the agent is down.
    own: Option<Ownership>,
    restart_at: u64,
    files: Option<VmFiles>,
    running: bool,
    engine: Option<Engine>,
    doubt: Option<Doubt>,
    finish: Option<Finish>,
    /// Recovery could not record that this outgoing session never committed: the VM
    /// waits, stopped, for the next try (session, tick).
    unfinished: Option<(u64, u64)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Faults,
    Settle,
    /// Both agents were killed and restarted after the first settle.
    FinalSettle,
}

/// The journal an engine calls, with the simulated faults in front of the real one.
struct Faulty<J> {
    inner: J,
    /// The append fails before anything is written.
    fail: bool,
    /// [`Bug::CommitNotJournaled`]: claim the commit without writing it.
    pretend: bool,
}

const NO_SPACE: &str = "injected: no space left on device";

impl<J: SwapJournal> SwapJournal for Faulty<J> {
    fn commit(&self) -> Result<(), String> {
        if self.fail {
            return Err(NO_SPACE.into());
        }
        if self.pretend {
            return Ok(());
        }
        self.inner.commit()
    }
    fn prepared(&self) -> Result<(), String> {
        if self.fail {
            return Err(NO_SPACE.into());
        }
        self.inner.prepared()
    }
    fn owned(&self) -> Result<(), String> {
        if self.fail {
            return Err(NO_SPACE.into());
        }
        self.inner.owned()
    }
}

struct Sim<'c> {
    config: &'c SimConfig,
    rng: Rng,
    p: Profile,
    base: Instant,
    tick: u64,
    phase: Phase,
    phase_started: u64,
    agents: [Agent; 2],
    /// Writes acknowledged to the guest's users.
    acked: u64,
    net: BTreeMap<(u64, u64), Packet>,
    seq: u64,
    conns: BTreeMap<u64, Conn>,
    next_conn: u64,
    next_ask: u64,
    partitioned_until: u64,
    /// Each agent's disk is full until then.
    disk_full_until: [u64; 2],
    /// The owner after the first settle, which the final restart must keep.
    settled_owner: Option<usize>,
    trace: VecDeque<String>,
    violation: Option<String>,
    stats: SeedSummary,
}

fn sid(session: u64) -> String {
    format!("s{:04x}", session & 0xffff)
}

fn other(x: usize) -> usize {
    1 - x
}

impl<'c> Sim<'c> {
    fn new(seed: u64, config: &'c SimConfig, dir: &Path) -> Result<Sim<'c>, String> {
        let mut rng = Rng(seed);
        let p = Profile::draw(&mut rng, config.fault_ticks);
        let agent = |name: &str| -> Result<Agent, String> {
            let dir = dir.join(name);
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let own = Ownership::open(&dir).map_err(|e| crate::error_chain(&e))?;
            Ok(Agent {
                dir,
                own: Some(own),
                restart_at: 0,
                files: None,
                running: false,
                engine: None,
                doubt: None,
                finish: None,
                unfinished: None,
            })
        };
        let mut agents = [agent("a")?, agent("b")?];
        let epoch = match agents[0].own.as_ref() {
            Some(own) => own.created(VM).map_err(|e| crate::error_chain(&e))?,
            None => return Err("agent A has no journal".into()),
        };
        agents[0].files = Some(VmFiles { writes: Some(0) });
        agents[0].running = true;
        let mut sim = Sim {
            config,
            rng,
            p,
            base: Instant::now(),
            tick: 0,
            phase: Phase::Faults,
            phase_started: 0,
            agents,
            acked: 0,
            net: BTreeMap::new(),
            seq: 0,
            conns: BTreeMap::new(),
            next_conn: 1,
            next_ask: 1,
            partitioned_until: 0,
            disk_full_until: [0; 2],
            settled_owner: None,
            trace: VecDeque::new(),
            violation: None,
            stats: SeedSummary {
                seed,
                ..Default::default()
            },
        };
        sim.log(format!(
            "A hosts {VM} at epoch {epoch} and runs it; {:?}",
            sim.p
        ));
        Ok(sim)
    }

    fn run(&mut self) -> Result<SeedSummary, SimFailure> {
        loop {
            self.step();
            if let Some(violation) = self.violation.take() {
                return Err(self.failure(violation));
            }
            if self.phase != Phase::Faults && self.quiescent() {
                let settle = self.tick - self.phase_started;
                self.stats.settle_ticks = self.stats.settle_ticks.max(settle);
                let owner = match self.final_checks() {
                    Ok(owner) => owner,
                    Err(violation) => return Err(self.failure(violation)),
                };
                match self.phase {
                    Phase::Settle => {
                        self.log(format!(
                            "settled in {settle} ticks: {} runs the VM; killing and restarting both agents",
                            NAME[owner]
                        ));
                        self.settled_owner = Some(owner);
                        self.phase = Phase::FinalSettle;
                        self.phase_started = self.tick;
                        self.crash(0, "final restart");
                        self.crash(1, "final restart");
                    }
                    _ => {
                        if self.settled_owner != Some(owner) {
                            let v = format!(
                                "after restarting both agents the VM runs on {}, it ran on {} before",
                                NAME[owner],
                                self.settled_owner.map_or("nobody", |x| NAME[x])
                            );
                            return Err(self.failure(v));
                        }
                        self.stats.counts.ticks = self.tick;
                        self.stats.owner = NAME[owner];
                        self.stats.epoch = self.own(owner).epoch_here(VM).unwrap_or_default();
                        if self.config.full_trace {
                            self.stats.trace = self.trace.drain(..).collect();
                        }
                        return Ok(std::mem::take(&mut self.stats));
                    }
                }
            } else if self.phase != Phase::Faults
                && self.tick - self.phase_started > self.config.settle_ticks_max
            {
                let v = format!(
                    "no single owner {} ticks after the heal (liveness)",
                    self.config.settle_ticks_max
                );
                return Err(self.failure(v));
            }
            self.tick += 1;
        }
    }

    fn failure(&mut self, violation: String) -> SimFailure {
        SimFailure {
            seed: self.stats.seed,
            tick: self.tick,
            violation,
            replay_flags: self.config.replay_flags(),
            trace: self.trace.drain(..).collect(),
        }
    }

    /// One tick: heal, restarts, faults, deliveries, timers, the user, the guest, checks.
    fn step(&mut self) {
        if self.phase == Phase::Faults && self.tick >= self.config.fault_ticks {
            self.heal();
        }
        for x in 0..2 {
            if !self.up(x) && self.agents[x].restart_at <= self.tick {
                self.restart(x);
            }
        }
        if self.faulty() {
            self.inject_faults();
        }
        while self
            .net
            .first_key_value()
            .is_some_and(|(&(at, _), _)| at <= self.tick)
        {
            if let Some(((at, _), packet)) = self.net.pop_first() {
                self.deliver(at, packet);
            }
        }
        for x in 0..2 {
            self.timers(x);
        }
        if self.faulty() {
            self.maybe_start_migration();
        }
        self.guest_writes();
        self.check_tick();
    }

    fn faulty(&self) -> bool {
        self.phase == Phase::Faults
    }

    fn now(&self) -> Instant {
        self.base + Duration::from_millis(self.tick * TICK.as_millis() as u64)
    }

    /// The tick of a (simulated) instant, for the trace.
    fn tick_of(&self, at: Instant) -> u128 {
        at.saturating_duration_since(self.base).as_millis() / TICK.as_millis()
    }

    fn ticks(n: u64) -> Duration {
        Duration::from_millis(n * TICK.as_millis() as u64)
    }

    fn up(&self, x: usize) -> bool {
        self.agents[x].own.is_some()
    }

    fn own(&self, x: usize) -> &Ownership {
        self.agents[x]
            .own
            .as_ref()
            .expect("only an agent that is up is asked")
    }

    fn partitioned(&self) -> bool {
        self.tick < self.partitioned_until
    }

    fn log(&mut self, event: String) {
        self.trace.push_back(format!("t={:<5} {event}", self.tick));
        if !self.config.full_trace && self.trace.len() > self.config.trace_len.max(1) {
            self.trace.pop_front();
        }
    }

    fn violate(&mut self, violation: String) {
        if self.violation.is_none() {
            self.log(format!("VIOLATION: {violation}"));
            self.violation = Some(violation);
        }
    }

    fn heal(&mut self) {
        self.log("heal: no more faults, the network is perfect, every agent comes up".into());
        self.phase = Phase::Settle;
        self.phase_started = self.tick;
        self.partitioned_until = 0;
        for agent in &mut self.agents {
            agent.restart_at = agent.restart_at.min(self.tick);
        }
    }

    fn inject_faults(&mut self) {
        for x in 0..2 {
            if self.up(x) && self.rng.chance(self.p.crash) {
                self.crash(x, "injected crash");
            }
        }
        if !self.partitioned() && self.rng.chance(self.p.partition) {
            self.partitioned_until = self.tick + self.rng.range(1, self.p.partition_max);
            self.stats.counts.partitions += 1;
            self.log(format!("partition until t={}", self.partitioned_until));
            let open: Vec<u64> = self
                .conns
                .iter()
                .filter(|(_, c)| !c.broken)
                .map(|(&id, _)| id)
                .collect();
            for conn in open {
                self.break_conn(conn, "partition", false);
            }
        }
        // Before the commit point the source can be cancelled; before the switch-over
        // either side can fail on its own.
        enum Exposed {
            Source { quiesced: bool },
            Receiving,
        }
        for (x, name) in NAME.iter().enumerate() {
            if !self.up(x) {
                continue;
            }
            let exposed = match &self.agents[x].engine {
                Some(Engine::Out(o)) if !o.swap.committed() => Some(Exposed::Source {
                    quiesced: o.quiesced,
                }),
                Some(Engine::In(i)) if !i.loaded => Some(Exposed::Receiving),
                _ => None,
            };
            match exposed {
                Some(Exposed::Source { quiesced }) => {
                    if self.rng.chance(self.p.cancel) {
                        self.log(format!("{name}: the user cancels"));
                        self.feed_source(x, SourceInput::Cancelled);
                    } else if !quiesced && self.rng.chance(self.p.local_fail) {
                        self.log(format!("{name}: a data stream fails"));
                        let reason = "injected: a data stream failed".to_string();
                        self.feed_source(x, SourceInput::Failed(reason));
                    }
                }
                Some(Exposed::Receiving) if self.rng.chance(self.p.local_fail) => {
                    self.log(format!("{name}: landing a page fails"));
                    let reason = "injected: landing a page failed".to_string();
                    self.feed_dest(x, DestinationInput::Failed(reason));
                }
                _ => {}
            }
        }
    }

    /// The agent dies: its journal handle and everything in memory go; the VM's files stay.
    fn crash(&mut self, x: usize, why: &str) {
        if !self.up(x) {
            return;
        }
        if self.faulty() {
            self.stats.counts.crashes += 1;
        }
        let delay = if self.faulty() {
            self.rng.range(1, self.p.restart_max)
        } else {
            1
        };
        let agent = &mut self.agents[x];
        agent.own = None;
        agent.running = false;
        agent.engine = None;
        agent.doubt = None;
        agent.finish = None;
        agent.unfinished = None;
        agent.restart_at = self.tick + delay;
        self.log(format!(
            "{} CRASHES ({why}); restarts at t={}",
            NAME[x],
            self.tick + delay
        ));
        // Its connections are reset.
        let open: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| !c.broken && !c.closed[x])
            .map(|(&id, _)| id)
            .collect();
        for conn in open {
            self.break_conn(conn, "the peer's process died", true);
        }
    }

    /// A restarted agent reopens its journal and follows the recovery plan.
    fn restart(&mut self, x: usize) {
        let own = match Ownership::open(&self.agents[x].dir) {
            Ok(own) => own,
            Err(e) => {
                let v = format!(
                    "{} cannot reopen its journal: {}",
                    NAME[x],
                    crate::error_chain(&e)
                );
                self.violate(v);
                self.agents[x].restart_at = u64::MAX;
                return;
            }
        };
        let plan = own.recovery_plan();
        self.agents[x].own = Some(own);
        self.log(format!("{} restarts; recovery plan {plan:?}", NAME[x]));
        for recovery in plan {
            match recovery {
                Recovery::Resume {
                    unfinished: None, ..
                } => self.resume(x, "recovery: the journal says it is ours"),
                // A source that died mid-migration records that the swap never committed
                // before the VM runs again (as `Agent::recover` does).
                Recovery::Resume {
                    unfinished: Some(session),
                    ..
                } => {
                    if !self.abort_unfinished(x, session) {
                        return;
                    }
                }
                Recovery::InDoubt {
                    epoch,
                    session,
                    from,
                    ..
                } => {
                    if from != ADDR[other(x)] {
                        self.violate(format!("{} is in doubt about a swap from {from}", NAME[x]));
                    }
                    // As `Agent::recover`: a copy that cannot be reopened is not asked about
                    // (its discard was decided, only its record was lost).
                    if self.agents[x]
                        .files
                        .as_ref()
                        .is_none_or(|f| f.writes.is_none())
                    {
                        self.log(format!(
                            "{}: the prepared copy of {} cannot be recovered (no files)",
                            NAME[x],
                            sid(session)
                        ));
                        continue;
                    }
                    self.stats.counts.in_doubt += 1;
                    self.agents[x].doubt = Some(Doubt {
                        swap: DestinationSwap::recovered_prepared(
                            Self::ticks(self.p.ask_interval),
                            self.now(),
                        ),
                        session,
                        epoch,
                        asking: None,
                    });
                }
                Recovery::HandedOver { .. } => {}
                Recovery::DiscardIncoming { epoch, session, .. } => {
                    if !self.discard_incoming(x, epoch, session) {
                        return;
                    }
                }
            }
        }
    }

    /// Records that the interrupted outgoing `session` never committed, then resumes the
    /// VM. When the record cannot be written the VM stays stopped; the agent (today) tries
    /// again only at its next restart, the simulation (with
    /// [`SimConfig::retry_unfinished_abort`]) every ask interval. `false`: the agent died.
    fn abort_unfinished(&mut self, x: usize, session: u64) -> bool {
        let recorded = self.journal_op(x, "OutgoingAborted (recovery)", |own| {
            own.abort_unfinished(VM, session)
                .map_err(|e| crate::error_chain(&e))
        });
        match recorded {
            None => return false,
            Some(Ok(())) => {
                self.agents[x].unfinished = None;
                self.resume(x, "recovery: the interrupted migration never committed");
            }
            Some(Err(_)) => {
                self.log(format!(
                    "{}: cannot record that {} never committed: not resuming the VM",
                    NAME[x],
                    sid(session)
                ));
                self.agents[x].unfinished = self
                    .config
                    .retry_unfinished_abort
                    .then_some((session, self.tick + self.p.ask_interval));
            }
        }
        true
    }

    /// Runs a journal operation of the control plane with the simulated faults: it may
    /// fail before writing, or the agent may die right after it. `None`: the agent died.
    fn journal_op<T>(
        &mut self,
        x: usize,
        what: &str,
        op: impl FnOnce(&Ownership) -> Result<T, String>,
    ) -> Option<Result<T, String>> {
        if self.inject_journal_failure(x, what) {
            return Some(Err(NO_SPACE.into()));
        }
        let result = op(self.own(x));
        if let Err(e) = &result {
            self.log(format!("{}: journal {what} refused: {e}", NAME[x]));
        }
        if result.is_ok() && self.crash_after_append(x, what) {
            return None;
        }
        Some(result)
    }

    /// True when an append must fail before writing: the disk is full (and stays so for
    /// a while once it filled up).
    fn inject_journal_failure(&mut self, x: usize, what: &str) -> bool {
        if !self.faulty() {
            return false;
        }
        let full = self.tick < self.disk_full_until[x];
        if !full && !self.rng.chance(self.p.journal_fail) {
            return false;
        }
        if !full {
            self.disk_full_until[x] = self.tick + self.rng.range(0, self.p.disk_full_max);
            self.log(format!(
                "{}: the disk is full until t={}",
                NAME[x], self.disk_full_until[x]
            ));
        }
        self.stats.counts.journal_failures += 1;
        self.log(format!(
            "{}: journal append {what} FAILS (injected)",
            NAME[x]
        ));
        true
    }

    /// True (and the agent is down) when it dies in the middle of appending `record`: part
    /// of its frame is in the file, and the restarted agent's journal must cut it away.
    fn crash_during_append(&mut self, x: usize, record: &Record) -> bool {
        if !self.faulty() || !self.rng.chance(self.p.torn) {
            return false;
        }
        let Ok(frame) = encode_record(record) else {
            return false;
        };
        let cut = self.rng.range(1, frame.len() as u64 - 1) as usize;
        self.stats.counts.torn_appends += 1;
        self.crash(x, &format!("in the middle of appending {record:?}"));
        let path = self.agents[x].dir.join(JOURNAL_FILE);
        let torn = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, &frame[..cut]));
        if let Err(e) = torn {
            self.violate(format!(
                "cannot write a torn record to {}: {e}",
                path.display()
            ));
        }
        true
    }

    /// True (and the agent is down) when it dies right after an append.
    fn crash_after_append(&mut self, x: usize, what: &str) -> bool {
        if self.faulty() && self.rng.chance(self.p.crash_after_append) {
            self.crash(x, &format!("right after journaling {what}"));
            return true;
        }
        false
    }

    /// Runs the guest on `x` and checks that this may happen.
    fn resume(&mut self, x: usize, why: &str) {
        if self.agents[x].running {
            return;
        }
        self.agents[x].running = true;
        let writes = self.agents[x].files.as_ref().and_then(|f| f.writes);
        self.log(format!(
            "{} RESUMES the VM ({why}), writes {writes:?}",
            NAME[x]
        ));
        if self.agents[other(x)].running {
            self.violate(format!(
                "both agents run the VM ({} resumed: {why})",
                NAME[x]
            ));
        }
        if writes != Some(self.acked) {
            self.violate(format!(
                "{} resumed a copy holding {writes:?} writes, {} were acknowledged ({why})",
                NAME[x], self.acked
            ));
        }
        match self.own(x).latest(VM) {
            // A destination runs it only past the source's commit point.
            Some(Record::Owned { session, .. } | Record::Prepared { session, .. }) => {
                let committed = self.records(other(x)).is_ok_and(|records| {
                    records.iter().any(
                        |r| matches!(r, Record::HandedOver { session: s, .. } if *s == session),
                    )
                });
                if !committed {
                    self.violate(format!(
                        "{} resumed the VM of swap {}, whose commit is not in {}'s journal ({why})",
                        NAME[x],
                        sid(session),
                        NAME[other(x)]
                    ));
                }
            }
            _ if self.own(x).epoch_here(VM).is_some() => {}
            latest => self.violate(format!(
                "{} runs the VM though its journal's latest record is {latest:?}",
                NAME[x]
            )),
        }
    }

    /// The control plane drops an incoming copy. `false`: the agent died doing so.
    fn discard_incoming(&mut self, x: usize, epoch: u64, session: u64) -> bool {
        self.log(format!(
            "{} discards its incoming copy ({})",
            NAME[x],
            sid(session)
        ));
        let recorded = self.journal_op(x, "Discarded", |own| {
            own.discarded(VM, epoch, session);
            Ok(())
        });
        self.agents[x].files = None;
        if self.agents[x].running {
            self.violate(format!("{} discarded the copy it runs", NAME[x]));
        }
        recorded.is_some()
    }

    fn maybe_start_migration(&mut self) {
        if !self.rng.chance(self.p.start) {
            return;
        }
        let Some(x) = (0..2).find(|&x| self.agents[x].running) else {
            return;
        };
        let y = other(x);
        let (src, dst) = (&self.agents[x], &self.agents[y]);
        if src.engine.is_some() || src.finish.is_some() || !self.up(y) || self.partitioned() {
            return;
        }
        // The destination refuses a VM its registry holds (running, migrating, in doubt),
        // as `accept_incoming` does; it does not consult its journal.
        if dst.running || dst.engine.is_some() || dst.doubt.is_some() || dst.finish.is_some() {
            return;
        }
        let session = self.rng.next();
        let epoch = match self.journal_op(x, "OutgoingStarted", |own| {
            own.outgoing_started(VM, session, ADDR[y])
                .map_err(|e| crate::error_chain(&e))
        }) {
            None | Some(Err(_)) => return,
            Some(Ok(epoch)) => epoch,
        };
        self.log(format!(
            "{} starts migration {} of the VM (epoch {epoch}) to {}",
            NAME[x],
            sid(session),
            NAME[y]
        ));
        let accepted = self.journal_op(y, "IncomingStarted", |own| {
            own.incoming_started(VM, epoch + 1, session, ADDR[x])
                .map_err(|e| crate::error_chain(&e))
        });
        if !matches!(accepted, Some(Ok(()))) {
            // Refused before the engines ran: the source records the fail-back.
            self.log(format!("{} refuses the migration", NAME[y]));
            self.agents[x].finish = Some(Finish {
                at: self.tick,
                session,
                end: OutgoingEnd::FailedBack,
            });
            return;
        }
        self.stats.counts.migrations += 1;
        let conn = self.next_conn;
        self.next_conn += 1;
        self.conns.insert(conn, Conn::new());
        let precopy = self.rng.range(1, self.p.precopy_max);
        self.agents[y].files = Some(VmFiles { writes: None });
        self.agents[y].engine = Some(Engine::In(Incoming {
            swap: DestinationSwap::new(
                Self::ticks(self.p.switchover_timeout + self.p.decision_margin),
                Self::ticks(self.p.ask_interval),
            ),
            session,
            epoch: epoch + 1,
            conn,
            loaded: false,
        }));
        self.agents[x].engine = Some(Engine::Out(Outgoing {
            swap: SourceSwap::new(Self::ticks(self.p.switchover_timeout)),
            session,
            conn,
            precopy_until: self.tick + precopy,
            quiesced: false,
            resume_due: false,
        }));
    }

    fn guest_writes(&mut self) {
        for (x, name) in NAME.iter().enumerate() {
            if !self.agents[x].running || !self.rng.chance(self.p.write) {
                continue;
            }
            match self.agents[x].files.as_mut() {
                Some(VmFiles {
                    writes: Some(writes),
                }) => {
                    *writes += 1;
                    self.acked += 1;
                }
                _ => self.violate(format!("{name} runs a VM whose files are gone")),
            }
        }
    }

    fn check_tick(&mut self) {
        if self.agents[0].running && self.agents[1].running {
            self.violate("both agents run the VM".into());
        }
        for (x, name) in NAME.iter().enumerate() {
            let writes = self.agents[x].files.as_ref().and_then(|f| f.writes);
            if self.agents[x].running && writes != Some(self.acked) {
                self.violate(format!(
                    "{name} runs a copy holding {writes:?} writes, {} were acknowledged",
                    self.acked
                ));
            }
        }
    }

    fn quiescent(&self) -> bool {
        self.net.is_empty()
            && self.agents.iter().all(|a| {
                a.own.is_some()
                    && a.engine.is_none()
                    && a.doubt.is_none()
                    && a.finish.is_none()
                    && a.unfinished.is_none()
            })
    }

    fn records(&self, x: usize) -> Result<Vec<Record>, String> {
        let path = self.agents[x].dir.join(JOURNAL_FILE);
        let bytes = std::fs::read(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        decode(&bytes)
            .map(|d| d.records)
            .map_err(|e| crate::error_chain(&e))
    }

    /// Once settled: one agent runs the VM with every write, and the journals agree.
    fn final_checks(&self) -> Result<usize, String> {
        let runners: Vec<usize> = (0..2).filter(|&x| self.agents[x].running).collect();
        let [x] = runners[..] else {
            return Err(format!(
                "{} agents run the VM once settled (exactly one must)",
                runners.len()
            ));
        };
        let y = other(x);
        let writes = self.agents[x].files.as_ref().and_then(|f| f.writes);
        if writes != Some(self.acked) {
            return Err(format!(
                "{} runs a copy holding {writes:?} writes, {} were acknowledged",
                NAME[x], self.acked
            ));
        }
        let Some(epoch) = self.own(x).epoch_here(VM) else {
            return Err(format!(
                "{} runs the VM but its journal's latest record is {:?}",
                NAME[x],
                self.own(x).latest(VM)
            ));
        };
        let (ours, theirs) = (self.records(x)?, self.records(y)?);
        let handed_over = |records: &[Record], e: u64, s: Option<u64>, to: &str| {
            records.iter().any(|r| {
                matches!(r, Record::HandedOver { epoch, session, to: t, .. }
                    if *epoch == e && s.is_none_or(|s| s == *session) && t == to)
            })
        };
        // The other agent must not hold it, except a stale `Prepared` for a swap that
        // never committed (its discard was not recorded): recovery asks and discards it.
        match self.own(y).latest(VM) {
            Some(Record::Prepared { session, .. })
                if !ours.iter().any(
                    |r| matches!(r, Record::HandedOver { session: s, .. } if *s == session),
                ) => {}
            latest if self.own(y).epoch_here(VM).is_some() => {
                return Err(format!(
                    "{} runs the VM at epoch {epoch}, yet {}'s journal still holds it: {latest:?}",
                    NAME[x], NAME[y]
                ));
            }
            _ => {}
        }
        if epoch > 1 && !handed_over(&theirs, epoch, None, ADDR[x]) {
            return Err(format!(
                "{} runs the VM at epoch {epoch}, but {}'s journal never handed that epoch over",
                NAME[x], NAME[y]
            ));
        }
        if let Some(Record::Owned { session, .. } | Record::Prepared { session, .. }) =
            self.own(x).latest(VM)
        {
            if !handed_over(&theirs, epoch, Some(session), ADDR[x]) {
                return Err(format!(
                    "{} owns epoch {epoch} by swap {}, but {}'s journal has no HandedOver for it",
                    NAME[x],
                    sid(session),
                    NAME[y]
                ));
            }
        }
        if let Some(r) = ours
            .iter()
            .chain(&theirs)
            .find(|r| matches!(r, Record::HandedOver { epoch: e, .. } if *e > epoch))
        {
            return Err(format!(
                "{} runs the VM at epoch {epoch}, but a journal handed over a later one: {r:?}",
                NAME[x]
            ));
        }
        Ok(x)
    }

    // --- the network ---------------------------------------------------------------

    fn post(&mut self, at: u64, packet: Packet) {
        self.seq += 1;
        self.net.insert((at, self.seq), packet);
    }

    fn delay(&mut self) -> u64 {
        if !self.faulty() {
            1
        } else if self.rng.chance(self.p.spike) {
            self.rng.range(1, 2 * self.p.switchover_timeout)
        } else {
            self.rng.range(1, self.p.delay_max)
        }
    }

    /// Sends on a control connection: TCP, so a lost message resets the connection.
    fn send_control(&mut self, from: usize, conn: u64, msg: Ctl) {
        let to = other(from);
        self.stats.counts.messages += 1;
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if c.broken || c.closed[to] {
            self.log(format!(
                "{} -> {}: {msg:?} goes nowhere (connection gone)",
                NAME[from], NAME[to]
            ));
            return;
        }
        let fifo = c.last_at[to];
        let faulty = self.faulty();
        let partitioned = self.partitioned();
        if partitioned || (faulty && self.rng.chance(self.p.loss)) {
            self.stats.counts.dropped += 1;
            self.log(format!(
                "{} -> {}: {msg:?} LOST; the connection breaks",
                NAME[from], NAME[to]
            ));
            self.break_conn(conn, "a message was lost", !partitioned);
            return;
        }
        let mut at = self.tick + self.delay();
        if faulty && self.rng.chance(self.p.reorder) {
            if at < fifo {
                self.stats.counts.reordered += 1;
            }
        } else {
            at = at.max(fifo);
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.last_at[to] = fifo.max(at);
        }
        self.log(format!(
            "{} -> {}: {msg:?} (arrives t={at})",
            NAME[from], NAME[to]
        ));
        if faulty && self.rng.chance(self.p.dup) {
            self.stats.counts.duplicated += 1;
            let again = at + self.rng.range(0, self.p.delay_max);
            self.post(
                again,
                Packet::Control {
                    conn,
                    to,
                    msg: msg.clone(),
                },
            );
        }
        self.post(at, Packet::Control { conn, to, msg });
    }

    /// An outcome question or answer: its own short connection, lost as a whole.
    fn send_datagram(&mut self, to: usize, packet: Packet) {
        self.stats.counts.messages += 1;
        if self.faulty() && (self.partitioned() || self.rng.chance(self.p.loss)) {
            self.stats.counts.dropped += 1;
            self.log(format!("-> {}: {packet:?} LOST", NAME[to]));
            return;
        }
        let at = self.tick + self.delay();
        if self.faulty() && self.rng.chance(self.p.dup) {
            self.stats.counts.duplicated += 1;
            let again = at + self.rng.range(0, self.p.delay_max);
            self.post(again, packet.clone());
        }
        self.log(format!("-> {}: {packet:?} (arrives t={at})", NAME[to]));
        self.post(at, packet);
    }

    /// The connection is reset; each end notices in a while. `in_flight_arrives`: what is already on its way still
    /// arrives if it gets there before the reset is noticed (a peer that died, a lost
    /// segment); otherwise it is lost too (a partition).
    fn break_conn(&mut self, conn: u64, why: &'static str, in_flight_arrives: bool) {
        let Some(closed) = self
            .conns
            .get(&conn)
            .filter(|c| !c.broken)
            .map(|c| c.closed)
        else {
            return;
        };
        let mut deliver_until = [self.tick; 2];
        for end in 0..2 {
            if !closed[end] {
                let detect = if self.faulty() {
                    self.rng.range(1, self.p.detect_max)
                } else {
                    1
                };
                if in_flight_arrives {
                    deliver_until[end] = self.tick + detect;
                }
                self.post(self.tick + detect, Packet::Lost { conn, to: end, why });
            }
        }
        if let Some(c) = self.conns.get_mut(&conn) {
            c.broken = true;
            c.deliver_until = deliver_until;
        }
    }

    /// End `by` closes the connection (its engine returned): the other end reads the end
    /// of the stream after what was sent before.
    fn close_conn(&mut self, conn: u64, by: usize) {
        let to = other(by);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        c.closed[by] = true;
        if c.closed[to] {
            self.conns.remove(&conn);
            return;
        }
        if !c.broken {
            let fifo = c.last_at[to];
            let mut at = self.tick + 1;
            // The end of the stream can be noticed before what was sent ahead of it (the
            // data streams break first), with the reorder rate.
            if self.faulty() && self.rng.chance(self.p.reorder) {
                if at < fifo {
                    self.stats.counts.reordered += 1;
                }
            } else {
                at = at.max(fifo);
            }
            if let Some(c) = self.conns.get_mut(&conn) {
                c.last_at[to] = fifo.max(at);
            }
            self.post(
                at,
                Packet::Lost {
                    conn,
                    to,
                    why: "the peer closed the connection",
                },
            );
        }
    }

    fn deliver(&mut self, at: u64, packet: Packet) {
        match packet {
            Packet::Control { conn, to, msg } => {
                if self
                    .conns
                    .get(&conn)
                    .is_none_or(|c| at >= c.deliver_until[to])
                    || !self.up(to)
                {
                    return;
                }
                if self.partitioned() {
                    self.stats.counts.dropped += 1;
                    self.log(format!("{msg:?} to {} cut by the partition", NAME[to]));
                    self.break_conn(conn, "partition", false);
                    return;
                }
                self.on_control(to, conn, msg);
            }
            Packet::Lost { conn, to, why } => {
                if self.up(to) {
                    self.on_lost(to, conn, why);
                }
            }
            Packet::Ask {
                ask,
                asker,
                epoch,
                session,
            } => {
                let x = other(asker);
                if (self.faulty() && self.partitioned()) || !self.up(x) {
                    self.log(format!(
                        "outcome question #{ask} finds nobody at {}",
                        NAME[x]
                    ));
                    return;
                }
                // `answer` appends only to decide an undecided swap no engine runs; when
                // that append fails it answers Pending.
                let outcome = if self.answer_would_append(x, session)
                    && self.inject_journal_failure(x, "OutgoingAborted (answering)")
                {
                    SwapOutcome::Pending
                } else {
                    self.own(x).answer(VM, epoch, session)
                };
                self.log(format!(
                    "{} answers #{ask} about {} (epoch {epoch}): {outcome:?}",
                    NAME[x],
                    sid(session)
                ));
                if self.crash_after_append(x, "the answer") {
                    return;
                }
                self.send_datagram(
                    asker,
                    Packet::Answer {
                        ask,
                        to: asker,
                        outcome,
                    },
                );
            }
            Packet::Answer { ask, to, outcome } => {
                if (self.faulty() && self.partitioned()) || !self.up(to) {
                    return;
                }
                let Some(d) = self.agents[to].doubt.as_mut() else {
                    return;
                };
                if d.asking.is_some_and(|(a, _)| a == ask) {
                    d.asking = None;
                    self.feed_doubt(to, DestinationInput::Outcome(outcome));
                }
            }
        }
    }

    /// Whether [`Ownership::answer`] about `session` would append (nothing decided it and
    /// no engine of this agent runs it).
    fn answer_would_append(&self, x: usize, session: u64) -> bool {
        let agent = &self.agents[x];
        let running = matches!(&agent.engine, Some(Engine::Out(o)) if o.session == session)
            || agent.finish.as_ref().is_some_and(|f| f.session == session);
        let decided = self.records(x).is_ok_and(|records| {
            records.iter().any(|r| {
                matches!(
                    r,
                    Record::HandedOver { .. } | Record::OutgoingAborted { .. }
                ) && r.session() == Some(session)
            })
        });
        !running && !decided
    }

    fn on_control(&mut self, x: usize, conn: u64, msg: Ctl) {
        // Only the engine this connection belongs to reads it.
        let loaded = match &self.agents[x].engine {
            Some(Engine::Out(o)) if o.conn == conn => None,
            Some(Engine::In(i)) if i.conn == conn => Some(i.loaded),
            _ => return,
        };
        self.log(format!("{} reads {msg:?}", NAME[x]));
        match loaded {
            None => {
                // As `engine::source::swap_to_the_end` maps them.
                let input = match msg {
                    Ctl::Prepared => SourceInput::Prepared { matches: true },
                    Ctl::NotInLockStep => SourceInput::Prepared { matches: false },
                    Ctl::Resumed => SourceInput::Resumed,
                    Ctl::Abort(reason) => SourceInput::PeerAborted(reason),
                    other => SourceInput::ChannelLost(format!("unexpected {other:?}")),
                };
                self.feed_source(x, input);
            }
            Some(loaded) => {
                // As `engine::destination::receive` maps them, before and after the
                // switch-over.
                let input = match (loaded, msg) {
                    (false, Ctl::SwitchOver { writes }) => {
                        if let Some(Engine::In(i)) = self.agents[x].engine.as_mut() {
                            i.loaded = true;
                        }
                        if let Some(files) = self.agents[x].files.as_mut() {
                            files.writes = Some(writes);
                        }
                        let matches = !self.rng.chance(self.p.mismatch);
                        DestinationInput::LockStep { matches }
                    }
                    (_, Ctl::Abort(reason)) => DestinationInput::PeerAborted(reason),
                    (_, Ctl::Commit) => DestinationInput::Commit,
                    (false, other) => DestinationInput::Failed(format!(
                        "unexpected {other:?} before the switch-over"
                    )),
                    (true, other) => {
                        DestinationInput::ChannelLost(format!("expected Commit, got {other:?}"))
                    }
                };
                self.feed_dest(x, input);
            }
        }
    }

    fn on_lost(&mut self, x: usize, conn: u64, why: &'static str) {
        // (is the source, is past the point where only the barrier may decide)
        let (source, decided) = match &self.agents[x].engine {
            Some(Engine::Out(o)) if o.conn == conn => (true, o.swap.committed()),
            Some(Engine::In(i)) if i.conn == conn => (false, i.swap.prepared()),
            _ => return,
        };
        self.log(format!("{}: control channel lost ({why})", NAME[x]));
        if source {
            if self.config.bug == Some(Bug::SourceResumesAfterCommit) && decided {
                self.resume(x, "BUG: channel lost after the commit");
            }
            self.feed_source(x, SourceInput::ChannelLost(why.into()));
        } else {
            if self.config.bug == Some(Bug::DestinationResumesOnChannelLost) && decided {
                self.resume(x, "BUG: channel lost while prepared");
            }
            self.feed_dest(x, DestinationInput::ChannelLost(why.into()));
        }
    }

    // --- the engines and the control plane around the machines -------------------------

    fn timers(&mut self, x: usize) {
        if !self.up(x) {
            return;
        }
        if self.agents[x]
            .finish
            .as_ref()
            .is_some_and(|f| f.at <= self.tick)
        {
            if let Some(finish) = self.agents[x].finish.take() {
                self.finish_outgoing(x, finish);
            }
        }
        if !self.up(x) {
            return;
        }
        if let Some((session, at)) = self.agents[x].unfinished {
            if at <= self.tick && !self.abort_unfinished(x, session) {
                return;
            }
        }
        enum Due {
            Nothing,
            SwitchOver,
            SourceTick,
            DestinationTick,
        }
        let due = match &self.agents[x].engine {
            Some(Engine::Out(o)) if !o.quiesced => {
                if self.tick >= o.precopy_until {
                    Due::SwitchOver
                } else {
                    Due::Nothing
                }
            }
            Some(Engine::Out(_)) => Due::SourceTick,
            Some(Engine::In(_)) => Due::DestinationTick,
            None => Due::Nothing,
        };
        match due {
            Due::Nothing => {}
            Due::SwitchOver => self.switch_over(x),
            Due::SourceTick => self.feed_source(x, SourceInput::Tick),
            Due::DestinationTick => self.feed_dest(x, DestinationInput::Tick),
        }
        if !self.up(x) {
            return;
        }
        if let Some(d) = self.agents[x].doubt.as_mut() {
            if d.asking.is_some_and(|(_, until)| until <= self.tick) {
                d.asking = None;
                self.feed_doubt(
                    x,
                    DestinationInput::OutcomeUnknown("no answer in time".into()),
                );
            }
        }
        if self.up(x) && self.agents[x].doubt.is_some() {
            self.feed_doubt(x, DestinationInput::Tick);
        }
    }

    /// Pre-copy converged: quiesce, send the final round and the device state.
    fn switch_over(&mut self, x: usize) {
        let Some(Engine::Out(o)) = self.agents[x].engine.as_mut() else {
            return;
        };
        o.quiesced = true;
        let conn = o.conn;
        self.agents[x].running = false;
        let writes = self.agents[x]
            .files
            .as_ref()
            .and_then(|f| f.writes)
            .unwrap_or_default();
        self.log(format!("{} quiesces the VM at {writes} writes", NAME[x]));
        self.send_control(x, conn, Ctl::SwitchOver { writes });
        let deadline = self.now() + Self::ticks(self.p.switchover_timeout);
        self.feed_source(x, SourceInput::SwitchOverSent { deadline });
    }

    fn feed_source(&mut self, x: usize, input: SourceInput) {
        let mut o = match self.agents[x].engine.take() {
            Some(Engine::Out(o)) => o,
            engine => {
                self.agents[x].engine = engine;
                return;
            }
        };
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            let shown = match &input {
                SourceInput::Tick => None,
                SourceInput::SwitchOverSent { deadline } => Some(format!(
                    "SwitchOverSent {{ deadline: t={} }}",
                    self.tick_of(*deadline)
                )),
                input => Some(format!("{input:?}")),
            };
            let actions = o.swap.step(input, self.now());
            if shown.is_some() || !actions.is_empty() {
                let input = shown.as_deref().unwrap_or("Tick");
                self.log(format!(
                    "{} source machine: {input} -> {actions:?}",
                    NAME[x]
                ));
            }
            for action in actions {
                match action {
                    SourceAction::JournalCommit => {
                        let epoch = self.own(x).latest(VM).map_or(0, |r| r.epoch()) + 1;
                        let record = Record::HandedOver {
                            vm: VM.into(),
                            epoch,
                            session: o.session,
                            to: ADDR[other(x)].into(),
                        };
                        if self.crash_during_append(x, &record) {
                            return;
                        }
                        let fail = self.inject_journal_failure(x, "HandedOver");
                        let journal = Faulty {
                            inner: OutgoingSwap {
                                ownership: self.own(x),
                                vm: VM.into(),
                                session: o.session,
                                to: ADDR[other(x)].into(),
                            },
                            fail,
                            pretend: self.config.bug == Some(Bug::CommitNotJournaled),
                        };
                        let journaled = (&journal as &dyn SwapJournal).commit();
                        self.log(format!("{}: commit journaled: {journaled:?}", NAME[x]));
                        if journaled.is_ok() {
                            self.stats.counts.committed += 1;
                            if self.crash_after_append(x, "HandedOver") {
                                return;
                            }
                        }
                        inputs.push_back(SourceInput::CommitJournaled(journaled));
                    }
                    SourceAction::SendCommit => self.send_control(x, o.conn, Ctl::Commit),
                    SourceAction::SendAbort(reason) => {
                        self.send_control(x, o.conn, Ctl::Abort(reason))
                    }
                    SourceAction::ResumeGuest => o.resume_due = true,
                }
            }
        }
        if o.swap.outcome().is_some() {
            self.end_outgoing(x, o);
        } else {
            self.agents[x].engine = Some(Engine::Out(o));
        }
    }

    /// `migrate_out` returns: the guest resumes on a fail-back; the control plane records
    /// the end a little later.
    fn end_outgoing(&mut self, x: usize, o: Outgoing) {
        let end = match o.swap.outcome() {
            Some(SourceOutcome::FailedBack(why)) => {
                self.stats.counts.failed_back += 1;
                self.log(format!("{} fails back: {why}", NAME[x]));
                if o.resume_due {
                    self.resume(x, "fail-back");
                }
                OutgoingEnd::FailedBack
            }
            Some(SourceOutcome::HandedOver { confirmed: true }) => OutgoingEnd::Released,
            Some(SourceOutcome::HandedOver { confirmed: false }) => OutgoingEnd::Unconfirmed,
            None => return,
        };
        self.log(format!(
            "{}: the outgoing engine returns ({end:?})",
            NAME[x]
        ));
        self.close_conn(o.conn, x);
        let at = self.tick + self.rng.range(0, 2);
        self.agents[x].finish = Some(Finish {
            at,
            session: o.session,
            end,
        });
    }

    fn finish_outgoing(&mut self, x: usize, finish: Finish) {
        let Finish { session, end, .. } = finish;
        self.log(format!(
            "{}: outgoing {} finished: {end:?}",
            NAME[x],
            sid(session)
        ));
        // `outgoing_finished` only logs a failed append, after it forgot the session's
        // engine: an injected failure is the same call without its record, which is what
        // `Unconfirmed` does.
        let recorded = if self.inject_journal_failure(x, "the outgoing end") {
            self.own(x)
                .outgoing_finished(VM, session, OutgoingEnd::Unconfirmed);
            true
        } else {
            self.own(x).outgoing_finished(VM, session, end);
            !self.crash_after_append(x, "the outgoing end")
        };
        // The source deletes its copy once released.
        if recorded && end == OutgoingEnd::Released {
            self.agents[x].files = None;
        }
    }

    fn feed_dest(&mut self, x: usize, input: DestinationInput) {
        let mut i = match self.agents[x].engine.take() {
            Some(Engine::In(i)) => i,
            engine => {
                self.agents[x].engine = engine;
                return;
            }
        };
        let mut inputs = VecDeque::from([input]);
        while let Some(input) = inputs.pop_front() {
            let shown = (!matches!(input, DestinationInput::Tick)).then(|| format!("{input:?}"));
            let actions = i.swap.step(input, self.now());
            if shown.is_some() || !actions.is_empty() {
                let input = shown.as_deref().unwrap_or("Tick");
                self.log(format!(
                    "{} destination machine: {input} -> {actions:?}",
                    NAME[x]
                ));
            }
            for action in actions {
                match action {
                    DestinationAction::JournalPrepared => {
                        let result = self.journal_incoming(x, i.epoch, i.session, true);
                        let Some(result) = result else { return };
                        inputs.push_back(DestinationInput::PrepareJournaled(result));
                    }
                    DestinationAction::SendPrepared => self.send_control(x, i.conn, Ctl::Prepared),
                    DestinationAction::SendNotInLockStep => {
                        self.send_control(x, i.conn, Ctl::NotInLockStep)
                    }
                    DestinationAction::SendAbort(reason) => {
                        self.send_control(x, i.conn, Ctl::Abort(reason))
                    }
                    DestinationAction::JournalOwned => {
                        // A failure is only logged: the source's journal holds the commit.
                        if self
                            .journal_incoming(x, i.epoch, i.session, false)
                            .is_none()
                        {
                            return;
                        }
                    }
                    DestinationAction::ResumeGuest => {
                        self.resume(x, "the destination learnt of the commit")
                    }
                    DestinationAction::SendResumed => self.send_control(x, i.conn, Ctl::Resumed),
                    // The engine returns an error; the control plane discards below.
                    DestinationAction::Discard => {}
                    // The engine returns InDoubt; the control plane asks below.
                    DestinationAction::AskOutcome => {}
                }
            }
        }
        match i.swap.outcome() {
            Some(DestinationOutcome::Owned) => {
                self.log(format!("{}: the incoming engine returns: owned", NAME[x]));
                self.close_conn(i.conn, x);
            }
            Some(DestinationOutcome::Discarded(reason)) => {
                self.log(format!(
                    "{}: the incoming engine returns: {reason}",
                    NAME[x]
                ));
                self.close_conn(i.conn, x);
                self.discard_incoming(x, i.epoch, i.session);
            }
            None if i.swap.in_doubt() => {
                // `EngineError::InDoubt`: keep the copy paused and ask the source's agent.
                self.log(format!(
                    "{}: the incoming engine returns: in doubt",
                    NAME[x]
                ));
                self.close_conn(i.conn, x);
                self.stats.counts.in_doubt += 1;
                self.agents[x].doubt = Some(Doubt {
                    swap: DestinationSwap::recovered_prepared(
                        Self::ticks(self.p.ask_interval),
                        self.now(),
                    ),
                    session: i.session,
                    epoch: i.epoch,
                    asking: None,
                });
            }
            None => self.agents[x].engine = Some(Engine::In(i)),
        }
    }

    /// The destination's `Prepared` (or, `prepared == false`, `Owned`) through the real
    /// [`IncomingSwap`]. `None`: the agent died right after the append.
    fn journal_incoming(
        &mut self,
        x: usize,
        epoch: u64,
        session: u64,
        prepared: bool,
    ) -> Option<Result<(), String>> {
        let what = if prepared { "Prepared" } else { "Owned" };
        let record = if prepared {
            Record::Prepared {
                vm: VM.into(),
                epoch,
                session,
                from: ADDR[other(x)].into(),
            }
        } else {
            Record::Owned {
                vm: VM.into(),
                epoch,
                session,
            }
        };
        if self.crash_during_append(x, &record) {
            return None;
        }
        let fail = self.inject_journal_failure(x, what);
        let journal = Faulty {
            inner: IncomingSwap {
                ownership: self.own(x),
                vm: VM.into(),
                epoch,
                session,
                from: ADDR[other(x)].into(),
            },
            fail,
            pretend: false,
        };
        let journal: &dyn SwapJournal = &journal;
        let result = if prepared {
            journal.prepared()
        } else {
            journal.owned()
        };
        self.log(format!("{}: {what} journaled: {result:?}", NAME[x]));
        if result.is_ok() && self.crash_after_append(x, what) {
            return None;
        }
        Some(result)
    }

    fn feed_doubt(&mut self, x: usize, input: DestinationInput) {
        let Some(mut d) = self.agents[x].doubt.take() else {
            return;
        };
        let shown = (!matches!(input, DestinationInput::Tick)).then(|| format!("{input:?}"));
        let actions = d.swap.step(input, self.now());
        if shown.is_some() || !actions.is_empty() {
            let input = shown.as_deref().unwrap_or("Tick");
            self.log(format!(
                "{} in-doubt machine: {input} -> {actions:?}",
                NAME[x]
            ));
        }
        for action in actions {
            match action {
                DestinationAction::AskOutcome => {
                    let ask = self.next_ask;
                    self.next_ask += 1;
                    d.asking = Some((ask, self.tick + self.p.ask_timeout));
                    self.stats.counts.outcome_questions += 1;
                    self.send_datagram(
                        other(x),
                        Packet::Ask {
                            ask,
                            asker: x,
                            epoch: d.epoch,
                            session: d.session,
                        },
                    );
                }
                DestinationAction::JournalOwned => {
                    if self
                        .journal_incoming(x, d.epoch, d.session, false)
                        .is_none()
                    {
                        return;
                    }
                }
                DestinationAction::ResumeGuest => {
                    self.resume(x, "the source's agent answered Committed")
                }
                DestinationAction::Discard => {
                    if !self.discard_incoming(x, d.epoch, d.session) {
                        return;
                    }
                }
                // No connection to the source any more: it answered, nothing else to say.
                DestinationAction::SendResumed
                | DestinationAction::JournalPrepared
                | DestinationAction::SendPrepared
                | DestinationAction::SendNotInLockStep
                | DestinationAction::SendAbort(_) => {}
            }
        }
        if let Some(outcome) = d.swap.outcome() {
            self.stats.counts.in_doubt_resolved += 1;
            if *outcome == DestinationOutcome::Owned {
                self.stats.counts.in_doubt_committed += 1;
            }
        } else {
            self.agents[x].doubt = Some(d);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds the test suite runs (the bench runs 10,000: `ferry-bench simulate`).
    const TEST_SEEDS: u64 = 2_000;

    #[test]
    fn the_barrier_holds_over_two_thousand_seeds() {
        let config = SimConfig::default();
        let report = run_seeds(0, TEST_SEEDS, &config);
        if let Some(failure) = report.failures.first() {
            panic!(
                "{} of {} seeds failed; the first:\n{failure}",
                report.failed, report.seeds
            );
        }
        assert_eq!(report.passed, TEST_SEEDS);
        // The faults did happen, and every kind of ending was reached.
        assert!(report.counts.committed > TEST_SEEDS, "{report:?}");
        assert!(report.counts.failed_back > TEST_SEEDS, "{report:?}");
        assert!(report.counts.crashes > TEST_SEEDS, "{report:?}");
        assert!(
            report.counts.in_doubt > 0 && report.counts.in_doubt_resolved > 0,
            "{report:?}"
        );
        assert!(
            report.counts.dropped > 0
                && report.counts.duplicated > 0
                && report.counts.reordered > 0
        );
        assert!(report.counts.journal_failures > 0 && report.counts.partitions > 0);
        assert!(report.ended_on_a > 0 && report.ended_on_b > 0);
    }

    #[test]
    fn a_seed_replays_exactly() {
        let config = SimConfig {
            full_trace: true,
            ..Default::default()
        };
        let first = run_seed(7, &config).unwrap();
        let again = run_seed(7, &config).unwrap();
        assert!(!first.trace.is_empty());
        assert_eq!(first.trace, again.trace);
        assert_eq!(first.counts.ticks, again.counts.ticks);
    }

    #[test]
    fn the_checker_catches_each_deliberate_bug() {
        for bug in Bug::ALL {
            let config = SimConfig {
                bug: Some(bug),
                ..Default::default()
            };
            let report = run_seeds(0, 300, &config);
            let failure = report
                .failures
                .first()
                .unwrap_or_else(|| panic!("{} was not caught in 300 seeds", bug.name()));
            let text = failure.to_string();
            assert!(
                text.contains(&format!("--seed {} --bug {}", failure.seed, bug.name())),
                "{text}"
            );
            assert!(!failure.trace.is_empty());
            // The failure replays from its seed.
            let again = run_seed(failure.seed, &config).unwrap_err();
            assert_eq!(again.violation, failure.violation);
            assert_eq!(again.tick, failure.tick);
        }
    }

    /// A restarted source that cannot record that its interrupted migration never committed
    /// and never tries again leaves the VM stopped: the settle check reports it.
    #[test]
    fn the_checker_catches_a_recovery_that_gives_up() {
        let config = SimConfig {
            retry_unfinished_abort: false,
            ..Default::default()
        };
        let report = run_seeds(0, 500, &config);
        let failure = report
            .failures
            .first()
            .expect("a recovery that gives up was not caught in 500 seeds");
        assert!(
            failure.violation.contains("0 agents run the VM"),
            "{failure}"
        );
        assert!(failure.to_string().contains("--no-abort-retry"));
    }

    #[test]
    fn bug_names_parse() {
        for bug in Bug::ALL {
            assert_eq!(bug.name().parse::<Bug>(), Ok(bug));
        }
        assert!("nope"
            .parse::<Bug>()
            .unwrap_err()
            .contains("commit-not-journaled"));
    }
}
