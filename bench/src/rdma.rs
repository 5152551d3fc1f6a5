//! `ferry-bench rdma`: the memory stream over RDMA against the same stream over TCP and
//! against `ib_write_bw`, between the same two soft-RoCE devices, in the same run.
//!
//! Runs only where there is an RDMA device and `RXE_ADDR_A` / `RXE_ADDR_B` name its two
//! ends: inside `../shared/rxe-vm` (`bench/rxe` builds and runs it there). Every
//! repetition fills a fresh source memory with pseudo-random content (every page non-zero)
//! and then runs, in alternating order,
//!
//! - **rdma**: [`RdmaSource`] / [`RdmaDestination`] on lanes from `RXE_ADDR_A` to a listener
//!   on `RXE_ADDR_B`: every page as round-0 [`Frame::Pages`] (one frame per 256-page block,
//!   the engine's page-to-stream mapping) plus a [`Frame::RoundEnd`] per stream, one
//!   sending thread per stream, timed until the destination reported every stream's round
//!   end; then the destination's bytes and digest are checked against the source;
//! - **tcp**: the same frames through [`TcpSource`] / [`TcpDestination`] on TCP connections
//!   from `RXE_ADDR_A` to `RXE_ADDR_B` (over the same veth pair), checked the same way;
//! - **ib_write_bw**: perftest's RDMA WRITE bandwidth between the same two devices, 1 MiB
//!   messages: what the devices can do with no protocol at all.
//!
//! CPU is reported twice: the process's own (`getrusage`) and the whole VM's (`/proc/stat`
//! busy time of all CPUs). soft-RoCE processes packets in kernel work queues and softirqs
//! that belong to no process, so only the VM-wide figure is fair between RDMA and TCP.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use crossbeam_channel::Receiver;
use ferry_dataplane::memory::{page_hash, GuestMemory, MemoryDigest, PAGE_SIZE};
use ferry_dataplane::transport::rdma::link::{connect, Listener, UnauthenticatedLanes};
use ferry_dataplane::transport::rdma::memory::{
    lane_caps, register_guest_memory, RdmaDestination, RdmaSource, RemoteMemory,
};
use ferry_dataplane::transport::rdma::verbs::{self, Access};
use ferry_dataplane::transport::tcp::{TcpDestination, TcpSource};
use ferry_dataplane::transport::{
    stream_for_page, DestinationTransport, ReceiveEvent, SourceTransport, BLOCK_PAGES,
};
use ferry_dataplane::wire::Frame;
use serde::Serialize;

use crate::cpu::{self, CpuTime};
use crate::report::{self, fixed, median, Table};

const MIB: f64 = (1u64 << 20) as f64;
const GIB: f64 = (1u64 << 30) as f64;

/// Connection set-up (rdma_cm lanes, TCP connects) under TCG: generous.
const SETUP_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest wait for the next round end of a stream before the run counts as hung.
const STREAM_TIMEOUT: Duration = Duration::from_secs(300);
/// perftest's message size: 1 MiB, as one ferry frame of a full block.
const IB_MESSAGE: u64 = 1 << 20;
/// First guess of `ib_write_bw`'s rate before anything was measured (MiB/s).
const IB_RATE_GUESS: f64 = 40.0;
/// Time the `ib_write_bw` server gets to start listening before the client connects.
const IB_SERVER_START: Duration = Duration::from_millis(1500);
/// perftest's port (each run uses its own, from here up).
const IB_PORT_BASE: u16 = 18515;

/// Throughput and CPU targets of the issue.
const TARGET_RDMA_VS_IB: f64 = 0.8;
const TARGET_RDMA_VS_TCP: f64 = 1.0;
const TARGET_CPU_RDMA_VS_TCP: f64 = 1.0;

/// What `ferry-bench rdma` runs.
#[derive(Clone, Debug, Serialize)]
pub struct RdmaConfig {
    pub size_bytes: u64,
    pub streams: usize,
    pub repeat: usize,
    /// Frames handed to one `SourceTransport::send` call (each frame is one 1 MiB block):
    /// the batch a sending thread hands over at once, for RDMA also the pages one
    /// announcement names at most.
    pub frames_per_send: usize,
    /// How long each `ib_write_bw` run should last (its iteration count is derived from the
    /// rate measured so far).
    pub ib_seconds: f64,
}

/// Where the run happens.
#[derive(Clone, Debug, Serialize)]
pub struct RdmaEnvironment {
    pub addr_a: String,
    pub addr_b: String,
    pub device_a: String,
    pub device_b: String,
    pub devices: Vec<String>,
    /// The source side's network device (veth0) and its MTU.
    pub netdev_a: String,
    pub mtu: Option<u32>,
}

/// One timed run of one transport.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RunSample {
    pub transport: String,
    /// Position in the repetition's order (0 = first).
    pub position: usize,
    pub bytes: u64,
    pub elapsed_ms: f64,
    pub bytes_per_s: f64,
    /// This process (all threads; for ib_write_bw: both perftest processes).
    pub process_cpu_s: f64,
    /// All CPUs of the VM: user + nice + system + irq + softirq.
    pub vm_cpu_s: f64,
    /// Cross-check of `vm_cpu_s`: CPUs × elapsed − idle − iowait (idle time is measured
    /// exactly on a tickless kernel, busy time is sampled at ticks).
    pub vm_cpu_from_idle_s: f64,
    pub process_cpu_s_per_gib: f64,
    pub vm_cpu_s_per_gib: f64,
    pub vm_cpu_from_idle_s_per_gib: f64,
    /// Bytes the source side's netdev sent during the run (the veth pair carried them).
    pub wire_bytes: Option<u64>,
    /// Destination bytes and digest equal the source's (ib_write_bw: its run succeeded).
    pub ok: bool,
    pub error: Option<String>,
    /// What else is worth knowing (RDMA counters, perftest's iterations, busiest threads).
    pub note: String,
}

/// One repetition: the three runs, in the order they ran.
#[derive(Clone, Debug, Serialize)]
pub struct Repetition {
    pub order: Vec<String>,
    pub rdma: RunSample,
    pub tcp: RunSample,
    pub ib: RunSample,
}

/// Medians of one transport over its successful runs.
#[derive(Clone, Debug, Serialize)]
pub struct TransportMedians {
    pub transport: String,
    pub runs_ok: usize,
    pub runs: usize,
    pub bytes_per_s: f64,
    pub vm_cpu_s_per_gib: f64,
    pub vm_cpu_from_idle_s_per_gib: f64,
    pub process_cpu_s_per_gib: f64,
}

/// A ratio against its target: the median of per-repetition ratios.
#[derive(Clone, Debug, Serialize)]
pub struct Target {
    pub what: String,
    pub value: f64,
    /// ">=" or "<=".
    pub relation: String,
    pub target: f64,
    pub met: Option<bool>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RdmaResults {
    pub config: RdmaConfig,
    pub environment: RdmaEnvironment,
    pub repetitions: Vec<Repetition>,
    pub medians: Vec<TransportMedians>,
    pub targets: Vec<Target>,
}

/// The soft-RoCE addresses and devices, or why this cannot run here.
fn environment() -> anyhow::Result<(IpAddr, IpAddr, RdmaEnvironment)> {
    const WHERE: &str = "ferry-bench rdma runs inside ../shared/rxe-vm (use bench/rxe)";
    let addr = |name: &str| -> anyhow::Result<(String, IpAddr)> {
        let text = std::env::var(name)
            .map_err(|_| anyhow::anyhow!("{name} is not set: no soft-RoCE pair here; {WHERE}"))?;
        let ip = text
            .parse()
            .with_context(|| format!("{name}={text:?} is not an IP address"))?;
        Ok((text, ip))
    };
    let (addr_a, a) = addr("RXE_ADDR_A")?;
    let (addr_b, b) = addr("RXE_ADDR_B")?;
    let devices = verbs::probe().map_err(|e| anyhow::anyhow!("no RDMA device: {e}; {WHERE}"))?;
    anyhow::ensure!(!devices.is_empty(), "no RDMA device on this host; {WHERE}");
    let var = |name: &str, default: &str| std::env::var(name).unwrap_or_else(|_| default.into());
    let netdev_a = var("RXE_NETDEV_A", "veth0");
    let mtu = std::fs::read_to_string(format!("/sys/class/net/{netdev_a}/mtu"))
        .ok()
        .and_then(|s| s.trim().parse().ok());
    Ok((
        a,
        b,
        RdmaEnvironment {
            addr_a,
            addr_b,
            device_a: var("RXE_DEV_A", "rxe0"),
            device_b: var("RXE_DEV_B", "rxe1"),
            devices,
            netdev_a,
            mtu,
        },
    ))
}

/// Refuses (with the reason) where there is no soft-RoCE pair to measure.
pub fn check_environment() -> anyhow::Result<()> {
    environment().map(|_| ())
}

pub fn run(config: &RdmaConfig) -> anyhow::Result<RdmaResults> {
    let (a, b, env) = environment()?;
    anyhow::ensure!(
        config.size_bytes >= IB_MESSAGE && config.size_bytes.is_multiple_of(PAGE_SIZE as u64),
        "--size must be at least 1 MiB and a multiple of 4 KiB"
    );
    anyhow::ensure!(
        config.frames_per_send >= 1,
        "--frames-per-send must be at least 1"
    );
    eprintln!(
        "[rdma] devices {:?}, {} ({}) -> {} ({}), {} MTU {}",
        env.devices,
        env.addr_a,
        env.device_a,
        env.addr_b,
        env.device_b,
        env.netdev_a,
        env.mtu.map_or("?".into(), |m| m.to_string())
    );
    let mut repetitions = Vec::with_capacity(config.repeat);
    let mut ib_rate_estimate: Option<f64> = None;
    for rep in 0..config.repeat {
        let tag = format!("[rdma run {}/{}]", rep + 1, config.repeat);
        eprintln!(
            "{tag} filling a fresh {} source",
            report::size(config.size_bytes)
        );
        let source = Arc::new(
            GuestMemory::new("bench-rdma-source", config.size_bytes)
                .context("allocating the source memory")?,
        );
        fill(&source, rep as u64);
        let expected = digest_of(&source);
        let order: Vec<&str> = if rep % 2 == 0 {
            vec!["rdma", "tcp", "ib_write_bw"]
        } else {
            vec!["ib_write_bw", "tcp", "rdma"]
        };
        let mut rdma = RunSample::default();
        let mut tcp = RunSample::default();
        let mut ib = RunSample::default();
        for (position, &transport) in order.iter().enumerate() {
            let session = 0xfe44_0000 + (rep * 8 + position) as u64;
            let mut sample = match transport {
                "rdma" => rdma_run(config, &env, a, b, &source, expected, session),
                "tcp" => tcp_run(config, &env, a, b, &source, expected),
                _ => {
                    let rate = ib_rate_estimate
                        .or((rdma.bytes_per_s > 0.0).then_some(rdma.bytes_per_s / MIB))
                        .unwrap_or(IB_RATE_GUESS);
                    let iterations =
                        (rate * config.ib_seconds).clamp(100.0, 100_000.0).round() as u64;
                    let port = IB_PORT_BASE + (rep % 64) as u16;
                    ib_run(&env, iterations, port)
                }
            }
            .unwrap_or_else(|e| RunSample {
                transport: transport.to_string(),
                error: Some(format!("{e:#}")),
                ..Default::default()
            });
            sample.position = position;
            eprintln!("{tag} {}", describe(&sample));
            match transport {
                "rdma" => rdma = sample,
                "tcp" => tcp = sample,
                _ => {
                    if sample.ok {
                        ib_rate_estimate = Some(sample.bytes_per_s / MIB);
                    }
                    ib = sample
                }
            }
        }
        repetitions.push(Repetition {
            order: order.iter().map(|s| s.to_string()).collect(),
            rdma,
            tcp,
            ib,
        });
    }
    let medians = vec![
        transport_medians("rdma", repetitions.iter().map(|r| &r.rdma)),
        transport_medians("tcp", repetitions.iter().map(|r| &r.tcp)),
        transport_medians("ib_write_bw", repetitions.iter().map(|r| &r.ib)),
    ];
    let ratio = |f: &dyn Fn(&Repetition) -> Option<f64>| median(repetitions.iter().filter_map(f));
    let both = |x: &RunSample, y: &RunSample| x.ok && y.ok;
    let targets = vec![
        target(
            "RDMA / ib_write_bw throughput",
            ratio(&|r| both(&r.rdma, &r.ib).then(|| r.rdma.bytes_per_s / r.ib.bytes_per_s)),
            ">=",
            TARGET_RDMA_VS_IB,
        ),
        target(
            "RDMA / TCP throughput",
            ratio(&|r| both(&r.rdma, &r.tcp).then(|| r.rdma.bytes_per_s / r.tcp.bytes_per_s)),
            ">=",
            TARGET_RDMA_VS_TCP,
        ),
        target(
            "RDMA / TCP CPU per GiB (VM busy ticks)",
            ratio(&|r| {
                both(&r.rdma, &r.tcp).then(|| r.rdma.vm_cpu_s_per_gib / r.tcp.vm_cpu_s_per_gib)
            }),
            "<=",
            TARGET_CPU_RDMA_VS_TCP,
        ),
        target(
            "RDMA / TCP CPU per GiB (VM CPUs x wall - idle)",
            ratio(&|r| {
                both(&r.rdma, &r.tcp)
                    .then(|| r.rdma.vm_cpu_from_idle_s_per_gib / r.tcp.vm_cpu_from_idle_s_per_gib)
            }),
            "<=",
            TARGET_CPU_RDMA_VS_TCP,
        ),
    ];
    Ok(RdmaResults {
        config: config.clone(),
        environment: env,
        repetitions,
        medians,
        targets,
    })
}

fn target(what: &str, value: f64, relation: &str, target: f64) -> Target {
    let met = value.is_finite().then(|| {
        if relation == ">=" {
            value >= target
        } else {
            value <= target
        }
    });
    Target {
        what: what.into(),
        value,
        relation: relation.into(),
        target,
        met,
    }
}

fn transport_medians<'a>(
    transport: &str,
    samples: impl Iterator<Item = &'a RunSample>,
) -> TransportMedians {
    let samples: Vec<&RunSample> = samples.collect();
    let ok: Vec<&&RunSample> = samples.iter().filter(|s| s.ok).collect();
    TransportMedians {
        transport: transport.into(),
        runs_ok: ok.len(),
        runs: samples.len(),
        bytes_per_s: median(ok.iter().map(|s| s.bytes_per_s)),
        vm_cpu_s_per_gib: median(ok.iter().map(|s| s.vm_cpu_s_per_gib)),
        vm_cpu_from_idle_s_per_gib: median(ok.iter().map(|s| s.vm_cpu_from_idle_s_per_gib)),
        process_cpu_s_per_gib: median(ok.iter().map(|s| s.process_cpu_s_per_gib)),
    }
}

fn describe(s: &RunSample) -> String {
    match &s.error {
        Some(e) => format!("{}: FAILED: {e}", s.transport),
        None => format!(
            "{}: {} MiB/s ({} ms), CPU s VM {} (from idle {}) process {}, CPU s/GiB VM {} process {}, wire {} MiB, {}{}",
            s.transport,
            fixed(s.bytes_per_s / MIB, 1),
            fixed(s.elapsed_ms, 0),
            fixed(s.vm_cpu_s, 2),
            fixed(s.vm_cpu_from_idle_s, 2),
            fixed(s.process_cpu_s, 2),
            fixed(s.vm_cpu_s_per_gib, 2),
            fixed(s.process_cpu_s_per_gib, 2),
            s.wire_bytes
                .map_or("-".into(), |w| fixed(w as f64 / MIB, 1)),
            if s.ok { "verified" } else { "NOT verified" },
            if s.note.is_empty() {
                String::new()
            } else {
                format!("; {}", s.note)
            }
        ),
    }
}

/// Fills every page with xorshift64 words: pseudo-random, and never a zero word, so every
/// page is non-zero (no transport may skip one).
fn fill(memory: &GuestMemory, seed: u64) {
    let mut state = (0x9E37_79B9_7F4A_7C15u64 ^ seed.wrapping_mul(0xBF58_476D_1CE4_E5B9)) | 1;
    let mut page = [0u8; PAGE_SIZE];
    for p in 0..memory.pages() {
        for word in page.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        memory.write_page(p, &page);
    }
}

/// The digest a destination must end with after receiving all of `memory`.
fn digest_of(memory: &GuestMemory) -> u64 {
    let digest = MemoryDigest::new_zeroed(memory.pages());
    digest.record_run(0, (0..memory.pages()).map(|p| page_hash(memory.page(p))));
    digest.value()
}

/// The blocks stream `stream` carries, as (first page, page count): the engine's mapping.
fn blocks_of(stream: usize, streams: usize, pages: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..pages.div_ceil(BLOCK_PAGES))
        .map(move |b| (b * BLOCK_PAGES, BLOCK_PAGES.min(pages - b * BLOCK_PAGES)))
        .filter(move |&(first, _)| stream_for_page(first, streams) == stream)
}

/// Per stream: one round-0 `Pages` frame per block, then the stream's `RoundEnd`.
fn plan(streams: usize, pages: usize) -> Vec<Vec<Frame>> {
    (0..streams)
        .map(|stream| {
            let mut frames: Vec<Frame> = blocks_of(stream, streams, pages)
                .map(|(first, count)| Frame::Pages {
                    round: 0,
                    first: first as u64,
                    count: count as u32,
                })
                .collect();
            let total = blocks_of(stream, streams, pages)
                .map(|(_, c)| c as u64)
                .sum();
            frames.push(Frame::RoundEnd {
                round: 0,
                pages: total,
            });
            frames
        })
        .collect()
}

/// CPU time of the whole machine (all CPUs) from `/proc/stat`, in seconds.
#[derive(Clone, Copy)]
struct VmCpu {
    /// user + nice + system + irq + softirq.
    busy: f64,
    /// idle + iowait.
    idle: f64,
}

impl VmCpu {
    fn now() -> anyhow::Result<Self> {
        let stat = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = stat
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("/proc/stat has no cpu line")?;
        let fields: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        // user nice system idle iowait irq softirq steal ...
        let at = |i: usize| fields.get(i).copied().unwrap_or(0) as f64;
        // SAFETY: sysconf takes no pointers; _SC_CLK_TCK is a valid name on Linux.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        let ticks = if ticks > 0 { ticks as f64 } else { 100.0 };
        Ok(Self {
            busy: (at(0) + at(1) + at(2) + at(5) + at(6)) / ticks,
            idle: (at(3) + at(4)) / ticks,
        })
    }
}

/// CPU seconds (user + system) of this process's terminated and waited-for children.
fn children_cpu_seconds() -> f64 {
    // SAFETY: rusage is plain integers, so all-zero bytes are a valid value; the pointer
    // handed to getrusage is to that live, aligned, writable local.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage);
        usage
    };
    let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    tv(usage.ru_utime) + tv(usage.ru_stime)
}

/// Bytes sent so far by network device `netdev`.
fn tx_bytes(netdev: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/sys/class/net/{netdev}/statistics/tx_bytes"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

/// Every `hw_counters` value of both devices' port 1, by "device/name".
fn device_counters(devices: &[&str]) -> BTreeMap<String, u64> {
    let mut counters = BTreeMap::new();
    for device in devices {
        let dir = format!("/sys/class/infiniband/{device}/ports/1/hw_counters");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(value) = std::fs::read_to_string(entry.path())
                .ok()
                .and_then(|v| v.trim().parse().ok())
            {
                counters.insert(format!("{device}/{name}"), value);
            }
        }
    }
    counters
}

/// What the devices counted between two snapshots: packets sent by the source device, and
/// every retry, duplicate or error counter that moved (soft-RoCE retransmits under load).
fn counter_note(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
    source: &str,
) -> String {
    let delta = |name: &String| after[name].saturating_sub(before.get(name).copied().unwrap_or(0));
    let mut parts: Vec<String> = Vec::new();
    let sent = format!("{source}/sent_pkts");
    if after.contains_key(&sent) {
        parts.push(format!("{sent} {}", delta(&sent)));
    }
    for name in after.keys() {
        let interesting = ["retry", "duplicate", "seq", "rnr", "err"]
            .iter()
            .any(|k| name.contains(k));
        if interesting && delta(name) > 0 {
            parts.push(format!("{name} {}", delta(name)));
        }
    }
    if parts.is_empty() {
        String::new()
    } else {
        format!("rxe: {}; ", parts.join(", "))
    }
}

/// Where a timed window started.
struct Window {
    started: Instant,
    process: CpuTime,
    vm: VmCpu,
    wire: Option<u64>,
    threads: BTreeMap<u32, (String, f64)>,
    devices: Vec<String>,
    counters: BTreeMap<String, u64>,
}

impl Window {
    fn open(netdev: &str, devices: &[&str]) -> anyhow::Result<Self> {
        Ok(Self {
            devices: devices.iter().map(|d| d.to_string()).collect(),
            counters: device_counters(devices),
            threads: cpu::thread_seconds(),
            wire: tx_bytes(netdev),
            vm: VmCpu::now()?,
            process: CpuTime::now(),
            started: Instant::now(),
        })
    }

    /// Closes the window over `bytes` moved.
    fn close(&self, transport: &str, bytes: u64, netdev: &str) -> anyhow::Result<RunSample> {
        let elapsed = self.started.elapsed();
        let process = CpuTime::now().seconds_since(&self.process);
        let vm_now = VmCpu::now()?;
        let vm = vm_now.busy - self.vm.busy;
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
        let vm_from_idle = cpus * elapsed.as_secs_f64() - (vm_now.idle - self.vm.idle);
        let wire = tx_bytes(netdev)
            .zip(self.wire)
            .map(|(after, before)| after.saturating_sub(before));
        let busiest: Vec<String> = cpu::thread_deltas(&self.threads, &cpu::thread_seconds())
            .into_iter()
            .take(4)
            .map(|(name, s)| format!("{name} {s:.2}s"))
            .collect();
        let devices: Vec<&str> = self.devices.iter().map(String::as_str).collect();
        let counters = counter_note(
            &self.counters,
            &device_counters(&devices),
            devices.first().copied().unwrap_or(""),
        );
        let gib = bytes as f64 / GIB;
        Ok(RunSample {
            transport: transport.into(),
            bytes,
            elapsed_ms: elapsed.as_secs_f64() * 1e3,
            bytes_per_s: bytes as f64 / elapsed.as_secs_f64(),
            process_cpu_s: process,
            vm_cpu_s: vm,
            vm_cpu_from_idle_s: vm_from_idle,
            vm_cpu_from_idle_s_per_gib: vm_from_idle / gib,
            process_cpu_s_per_gib: process / gib,
            vm_cpu_s_per_gib: vm / gib,
            wire_bytes: wire,
            note: format!("{counters}threads: {}", busiest.join(", ")),
            ..Default::default()
        })
    }
}

/// Sends `plan` through `transport` (one thread per stream, `frames_per_send` frames per
/// call) and times it until `events` reported every stream's round end.
fn timed_push(
    transport: &dyn SourceTransport,
    memory: &GuestMemory,
    plan: &[Vec<Frame>],
    frames_per_send: usize,
    events: &Receiver<ReceiveEvent>,
    env: &RdmaEnvironment,
) -> anyhow::Result<RunSample> {
    let bytes = memory.len() as u64;
    let netdev = env.netdev_a.as_str();
    let window = Window::open(netdev, &[&env.device_a, &env.device_b])?;
    std::thread::scope(|s| -> anyhow::Result<RunSample> {
        let senders: Vec<_> = plan
            .iter()
            .enumerate()
            .map(|(stream, frames)| {
                std::thread::Builder::new()
                    .name(format!("bench-tx-{stream}"))
                    .spawn_scoped(s, move || {
                        for chunk in frames.chunks(frames_per_send) {
                            transport.send(stream, memory, chunk)?;
                        }
                        Ok::<_, ferry_dataplane::transport::TransportError>(())
                    })
            })
            .collect::<Result<_, _>>()
            .context("spawning the senders")?;
        let waited = wait_round_ends(plan, events);
        let sample = window.close(transport.name(), bytes, netdev);
        if waited.is_err() {
            // Wake senders blocked on a destination that stopped.
            transport.shutdown();
        }
        for (stream, h) in senders.into_iter().enumerate() {
            h.join()
                .map_err(|_| anyhow::anyhow!("sender {stream} panicked"))?
                .with_context(|| format!("sending stream {stream}"))?;
        }
        waited?;
        sample
    })
}

/// Waits for every stream's round-0 end, with the page counts of `plan`.
fn wait_round_ends(plan: &[Vec<Frame>], events: &Receiver<ReceiveEvent>) -> anyhow::Result<()> {
    let mut ended = vec![false; plan.len()];
    while ended.iter().any(|e| !e) {
        match events.recv_timeout(STREAM_TIMEOUT) {
            Ok(ReceiveEvent::RoundEnd {
                stream,
                round,
                pages,
            }) => {
                let want = match plan[stream].last() {
                    Some(Frame::RoundEnd { pages, .. }) => *pages,
                    _ => 0,
                };
                anyhow::ensure!(
                    round == 0 && pages == want && !ended[stream],
                    "stream {stream}: unexpected round end {round} with {pages} pages"
                );
                ended[stream] = true;
            }
            Ok(ReceiveEvent::Failed { stream, error }) => {
                return Err(anyhow::Error::new(error).context(format!("receiving stream {stream}")))
            }
            Err(_) => anyhow::bail!(
                "no round end within {} s (streams ended: {ended:?})",
                STREAM_TIMEOUT.as_secs()
            ),
        }
    }
    Ok(())
}

/// Checks that `destination` holds exactly `source` and that the digest agrees.
fn verify(
    source: &GuestMemory,
    destination: &GuestMemory,
    digest: &MemoryDigest,
    expected: u64,
    sample: &mut RunSample,
) {
    let pages = source.pages();
    let bytes_equal = source.pages_slice(0, pages) == destination.pages_slice(0, pages);
    let digest_equal = digest.value() == expected;
    sample.ok = bytes_equal && digest_equal;
    if !sample.ok {
        let first = (0..pages).find(|&p| source.page(p) != destination.page(p));
        sample.error = Some(format!(
            "destination differs: bytes equal {bytes_equal} (first differing page {first:?}), digest {:#018x} vs source {expected:#018x}",
            digest.value()
        ));
    }
}

fn destination_memory(name: &str, bytes: u64) -> anyhow::Result<Arc<GuestMemory>> {
    let memory = GuestMemory::new(name, bytes).context("allocating the destination memory")?;
    memory
        .prefault()
        .context("pre-faulting the destination memory")?;
    Ok(Arc::new(memory))
}

fn rdma_run(
    config: &RdmaConfig,
    env: &RdmaEnvironment,
    a: IpAddr,
    b: IpAddr,
    source: &Arc<GuestMemory>,
    expected: u64,
    session: u64,
) -> anyhow::Result<RunSample> {
    let streams = config.streams;
    let destination = destination_memory("bench-rdma-destination", config.size_bytes)?;
    let listener = Listener::bind(b).context("listening for RDMA lanes")?;
    let region = Arc::new(
        register_guest_memory(listener.pd(), &destination, Access::RemoteWrite)
            .context("registering the destination memory")?,
    );
    let remote = RemoteMemory::of(&region);
    let port = listener.port();
    let caps = vec![lane_caps(); streams];
    let deadline = Instant::now() + SETUP_TIMEOUT;
    let cancel = AtomicBool::new(false);
    let (accepted, connected) = std::thread::scope(|s| {
        let accept = s.spawn(|| {
            listener.accept(
                session,
                &caps,
                |_| remote.encode(),
                &UnauthenticatedLanes,
                deadline,
                &cancel,
            )
        });
        let connected = connect(
            Some(a),
            SocketAddr::new(b, port),
            session,
            &caps,
            &UnauthenticatedLanes,
            deadline,
        );
        if connected.is_err() {
            cancel.store(true, Ordering::Relaxed);
        }
        let accepted = accept
            .join()
            .unwrap_or_else(|_| panic!("the RDMA accept thread panicked"));
        (accepted, connected)
    });
    let (source_link, private) = connected.context("connecting the RDMA lanes")?;
    let destination_link = accepted.context("accepting the RDMA lanes")?;
    let remote = RemoteMemory::decode(private.first().context("no lane accepted")?)?;
    let transport = RdmaSource::new(Arc::new(source_link), 0..streams, source.clone(), remote)
        .context("creating the RDMA source")?;
    let counters = transport.counters();
    let digest = Arc::new(MemoryDigest::new_zeroed(destination.pages()));
    let mut receiver = RdmaDestination::new(
        Arc::new(destination_link),
        0..streams,
        destination.clone(),
        region,
    );
    let (tx, rx) = crossbeam_channel::unbounded();
    receiver
        .start(destination.clone(), digest.clone(), tx)
        .context("starting the RDMA destination")?;
    let plan = plan(streams, source.pages());
    let result = timed_push(&transport, source, &plan, config.frames_per_send, &rx, env);
    drop(transport);
    receiver.shutdown();
    let mut sample = result?;
    verify(source, &destination, &digest, expected, &mut sample);
    let write_bytes = counters.write_bytes.load(Ordering::Relaxed);
    if sample.ok && write_bytes != config.size_bytes {
        sample.ok = false;
        sample.error = Some(format!(
            "the device wrote {write_bytes} bytes of {}",
            config.size_bytes
        ));
    }
    sample.note = format!(
        "{} RDMA writes, {} announcements; {}",
        counters.writes.load(Ordering::Relaxed),
        counters.sends.load(Ordering::Relaxed),
        sample.note
    );
    Ok(sample)
}

fn tcp_run(
    config: &RdmaConfig,
    env: &RdmaEnvironment,
    a: IpAddr,
    b: IpAddr,
    source: &Arc<GuestMemory>,
    expected: u64,
) -> anyhow::Result<RunSample> {
    let streams = config.streams;
    let destination = destination_memory("bench-tcp-destination", config.size_bytes)?;
    let listener = TcpListener::bind(SocketAddr::new(b, 0)).context("listening for TCP")?;
    let target = listener.local_addr()?;
    let mut source_streams = Vec::with_capacity(streams);
    let mut destination_streams = Vec::with_capacity(streams);
    for _ in 0..streams {
        let stream = TcpStream::connect_timeout(&target, SETUP_TIMEOUT)
            .with_context(|| format!("connecting to {target}"))?;
        // The ip rules of the rxe VM send unbound traffic to RXE_ADDR_B out of veth0, from
        // RXE_ADDR_A: over the same wire as the RDMA lanes (checked, and the wire bytes are
        // reported).
        let local = stream.local_addr()?.ip();
        anyhow::ensure!(
            local == a,
            "the TCP connection to {target} left from {local}, not RXE_ADDR_A {a}"
        );
        let (accepted, _) = listener.accept().context("accepting a TCP stream")?;
        source_streams.push(stream);
        destination_streams.push(accepted);
    }
    let transport = TcpSource::new(source_streams).context("creating the TCP source")?;
    let digest = Arc::new(MemoryDigest::new_zeroed(destination.pages()));
    let mut receiver =
        TcpDestination::new(destination_streams).context("creating the TCP destination")?;
    let (tx, rx) = crossbeam_channel::unbounded();
    receiver
        .start(destination.clone(), digest.clone(), tx)
        .context("starting the TCP destination")?;
    let plan = plan(streams, source.pages());
    let result = timed_push(&transport, source, &plan, config.frames_per_send, &rx, env);
    transport.shutdown();
    receiver.shutdown();
    let mut sample = result?;
    verify(source, &destination, &digest, expected, &mut sample);
    Ok(sample)
}

/// One `ib_write_bw` between the two devices: server on device B, client on device A.
fn ib_run(env: &RdmaEnvironment, iterations: u64, port: u16) -> anyhow::Result<RunSample> {
    let common = |device: &str| -> Vec<String> {
        vec![
            "-d".into(),
            device.into(),
            "-x".into(),
            "1".into(),
            "-s".into(),
            IB_MESSAGE.to_string(),
            "-n".into(),
            iterations.to_string(),
            "-p".into(),
            port.to_string(),
        ]
    };
    let children_before = children_cpu_seconds();
    let mut server = Command::new("ib_write_bw")
        .args(common(&env.device_b))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting the ib_write_bw server (is perftest installed?)")?;
    std::thread::sleep(IB_SERVER_START);
    let window = Window::open(&env.netdev_a, &[&env.device_a, &env.device_b]);
    let client = Command::new("ib_write_bw")
        .args(common(&env.device_a))
        .arg(&env.addr_b)
        .stdin(Stdio::null())
        .output();
    let closed =
        window.and_then(|w| w.close("ib_write_bw", iterations * IB_MESSAGE, &env.netdev_a));
    let client = match client {
        Ok(c) if c.status.success() => c,
        other => {
            let _ = server.kill();
            let _ = server.wait();
            return Err(match other {
                Ok(c) => anyhow::anyhow!(
                    "ib_write_bw client failed ({}): {}",
                    c.status,
                    String::from_utf8_lossy(&c.stderr).trim()
                ),
                Err(e) => anyhow::Error::new(e).context("running the ib_write_bw client"),
            });
        }
    };
    let server = server
        .wait_with_output()
        .context("waiting for the ib_write_bw server")?;
    let children = children_cpu_seconds() - children_before;
    let mut sample = closed?;
    let stdout = String::from_utf8_lossy(&client.stdout);
    let (reported_iterations, mib_per_s) = parse_ib_write_bw(&stdout)
        .with_context(|| format!("no bandwidth line in ib_write_bw's output:\n{stdout}"))?;
    anyhow::ensure!(
        server.status.success(),
        "ib_write_bw server failed ({}): {}",
        server.status,
        String::from_utf8_lossy(&server.stderr).trim()
    );
    // perftest's "MB" is 2^20 bytes (its report divides by 0x100000): MiB/s.
    let wall_bytes_per_s = sample.bytes_per_s;
    sample.bytes_per_s = mib_per_s * MIB;
    sample.process_cpu_s = children;
    sample.process_cpu_s_per_gib = children / (sample.bytes as f64 / GIB);
    sample.ok = reported_iterations == iterations;
    if !sample.ok {
        sample.error = Some(format!(
            "ib_write_bw reported {reported_iterations} iterations, {iterations} asked"
        ));
    }
    let warnings: Vec<&str> = String::from_utf8_lossy(&client.stderr)
        .lines()
        .chain(stdout.lines())
        .filter(|l| l.contains("onflicting") || l.contains("Warning"))
        .map(|_| "perftest warned (see its output)")
        .take(1)
        .collect();
    sample.note = format!(
        "{iterations} x 1 MiB; client wall {} MiB/s incl. set-up; {}{}",
        fixed(wall_bytes_per_s / MIB, 1),
        sample.note,
        warnings.first().map_or(String::new(), |w| format!("; {w}"))
    );
    Ok(sample)
}

/// `(iterations, average MB/sec)` from the line under perftest's `#bytes ... BW average`
/// header.
fn parse_ib_write_bw(stdout: &str) -> Option<(u64, f64)> {
    let mut lines = stdout.lines();
    lines.find(|l| l.contains("BW average[MB/sec]"))?;
    let fields: Vec<&str> = lines.next()?.split_whitespace().collect();
    let iterations = fields.get(1)?.parse().ok()?;
    let average = fields.get(3)?.parse().ok()?;
    Some((iterations, average))
}

pub fn print(results: &RdmaResults) {
    let c = &results.config;
    let e = &results.environment;
    println!(
        "## rdma: memory stream over RDMA vs TCP vs ib_write_bw ({} {} -> {} {}, {} MTU {}, {}, {} streams, {} frames per send, median of {})\n",
        e.device_a,
        e.addr_a,
        e.device_b,
        e.addr_b,
        e.netdev_a,
        e.mtu.map_or("?".into(), |m| m.to_string()),
        report::size(c.size_bytes),
        c.streams,
        c.frames_per_send,
        c.repeat
    );
    let mut table = Table::new(&[
        "transport",
        "MiB/s",
        "VM CPU s/GiB (busy ticks)",
        "VM CPU s/GiB (CPUs x wall - idle)",
        "process CPU s/GiB",
        "runs ok",
    ]);
    for m in &results.medians {
        table.row(vec![
            m.transport.clone(),
            fixed(m.bytes_per_s / MIB, 1),
            fixed(m.vm_cpu_s_per_gib, 2),
            fixed(m.vm_cpu_from_idle_s_per_gib, 2),
            fixed(m.process_cpu_s_per_gib, 2),
            format!("{}/{}", m.runs_ok, m.runs),
        ]);
    }
    println!("{}", table.render());
    let mut targets = Table::new(&[
        "ratio (median of per-run ratios)",
        "value",
        "target",
        "result",
    ]);
    for t in &results.targets {
        targets.row(vec![
            t.what.clone(),
            fixed(t.value, 2),
            format!("{} {:.2}", t.relation, t.target),
            match t.met {
                Some(true) => "met".into(),
                Some(false) => "not met".into(),
                None => "-".into(),
            },
        ]);
    }
    println!("{}", targets.render());
    let mut runs = Table::new(&[
        "run",
        "#",
        "transport",
        "MiB/s",
        "ms",
        "VM CPU s (ticks)",
        "VM CPU s (wall - idle)",
        "process CPU s",
        "VM s/GiB (ticks)",
        "VM s/GiB (wall - idle)",
        "process s/GiB",
        "wire MiB",
        "check",
    ]);
    for (i, r) in results.repetitions.iter().enumerate() {
        let mut samples = [&r.rdma, &r.tcp, &r.ib];
        samples.sort_by_key(|s| s.position);
        for s in samples {
            runs.row(vec![
                (i + 1).to_string(),
                (s.position + 1).to_string(),
                s.transport.clone(),
                fixed(s.bytes_per_s / MIB, 1),
                fixed(s.elapsed_ms, 0),
                fixed(s.vm_cpu_s, 2),
                fixed(s.vm_cpu_from_idle_s, 2),
                fixed(s.process_cpu_s, 2),
                fixed(s.vm_cpu_s_per_gib, 2),
                fixed(s.vm_cpu_from_idle_s_per_gib, 2),
                fixed(s.process_cpu_s_per_gib, 2),
                s.wire_bytes
                    .map_or("-".into(), |w| fixed(w as f64 / MIB, 1)),
                match (&s.error, s.ok) {
                    (Some(_), _) => "FAILED".into(),
                    (None, true) => "ok".into(),
                    (None, false) => "NOT ok".into(),
                },
            ]);
        }
    }
    println!("{}", runs.render());
    println!(
        "VM CPU is whole-VM CPU time over the timed window, and it is the fair comparison: \
         soft-RoCE (rxe) does its packet work in kernel work queues and softirqs that \
         getrusage does not charge to this process, so the process column undercounts RDMA \
         (TCP's kernel work runs in this process's syscalls and is counted). Two readings of \
         /proc/stat: busy ticks = user + nice + system + irq + softirq deltas of all CPUs; \
         CPUs x wall - idle = CPUs x elapsed - (idle + iowait) deltas. Busy time is sampled at \
         timer ticks, which under TCG lands on idle too often: busy ticks read below the \
         process's own getrusage for TCP (impossible), so trust CPUs x wall - idle, which agrees \
         with getrusage. Process CPU = getrusage of this process (source + destination \
         threads); for ib_write_bw both perftest processes (its client busy-polls a vCPU; \
         events are not supported for WRITE) and its window includes perftest's start-up. \
         ib_write_bw's MB/sec is MiB/s (perftest divides by 2^20), timed by perftest itself. \
         wire MiB = bytes {} sent.\n",
        e.netdev_a
    );
    for (i, r) in results.repetitions.iter().enumerate() {
        for s in [&r.rdma, &r.tcp, &r.ib] {
            if let Some(err) = &s.error {
                println!("run {} {}: {err}", i + 1, s.transport);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perftest_bandwidth_line_parses() {
        let out = "---\n #bytes     #iterations    BW peak[MB/sec]    BW average[MB/sec]   MsgRate[Mpps]\n 1048576    200              29.74              29.51  \t\t   0.000030\n---\n";
        assert_eq!(parse_ib_write_bw(out), Some((200, 29.51)));
        assert_eq!(parse_ib_write_bw("nothing"), None);
    }

    #[test]
    fn plan_covers_every_page_once_within_blocks() {
        let pages = 5 * BLOCK_PAGES + 17;
        let plan = plan(2, pages);
        let mut seen = vec![false; pages];
        for (stream, frames) in plan.iter().enumerate() {
            let mut counted = 0;
            for f in frames {
                match *f {
                    Frame::Pages { first, count, .. } => {
                        let first = first as usize;
                        assert_eq!(stream_for_page(first, 2), stream);
                        assert_eq!(
                            first / BLOCK_PAGES,
                            (first + count as usize - 1) / BLOCK_PAGES
                        );
                        for s in &mut seen[first..first + count as usize] {
                            assert!(!*s);
                            *s = true;
                        }
                        counted += u64::from(count);
                    }
                    Frame::RoundEnd { pages, .. } => assert_eq!(pages, counted),
                    Frame::ZeroPages { .. } => unreachable!(),
                }
            }
        }
        assert!(seen.iter().all(|s| *s));
    }

    #[test]
    fn filled_pages_are_never_zero() {
        let memory = GuestMemory::new("bench-rdma-fill", 64 * PAGE_SIZE as u64).unwrap();
        fill(&memory, 3);
        assert!((0..memory.pages()).all(|p| memory.page(p).iter().any(|&b| b != 0)));
        assert_ne!(memory.page(0), memory.page(1));
    }
}
