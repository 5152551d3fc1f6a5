//! Command-line definitions (clap). Turning them into requests is [`crate::commands`]'s job.

use std::path::{Path, PathBuf};

use clap::{Args, Parser, Subcommand};
use ferry_dataplane::disk::{DirectIo, CHUNK_BYTES_MAX, QUEUE_DEPTH_MAX};
use ferry_dataplane::engine::collect_pause::CollectPause;
use ferry_dataplane::engine::{MigrationParams, TransportChoice, DISK_CHUNK_BYTES_MIN};
use ferry_dataplane::guest::reference::{DiskPattern, DiskSpec, Pattern, VmSpec};
use ferry_dataplane::transport::tcp::SendMode;
use ferry_dataplane::units::{format_bytes, parse_size};

use crate::api::DiskPlacement;
use crate::auth::{KEY_ENV, KEY_FILE};

/// Where agents listen, and where the CLI looks for one, unless told otherwise.
pub const DEFAULT_AGENT: &str = "127.0.0.1:7070";

#[derive(Debug, Parser)]
#[command(
    name = "ferry",
    version,
    about = "Live VM migration: agents, VMs and migrations",
    propagate_version = true
)]
pub struct Cli {
    /// Agent to talk to: HOST:PORT (over TCP, authenticated with the cluster key: see --key)
    /// or the path of its unix socket, DATA_DIR/agent.sock (anything containing '/', or
    /// unix:PATH; no key needed, the socket is the agent user's only).
    #[arg(long, global = true, default_value = DEFAULT_AGENT, value_name = "ADDR", help_heading = "Global options")]
    pub agent: String,
    /// Cluster key file [default: $FERRY_KEY]. The CLI needs it for a HOST:PORT --agent;
    /// `ferry agent` falls back to DATA_DIR/cluster.key; `ferry key init` writes it.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        help_heading = "Global options"
    )]
    pub key: Option<PathBuf>,
    /// Print JSON only: one object per command (errors as {"error": …}).
    #[arg(long, global = true, help_heading = "Global options")]
    pub json: bool,
    /// For migrate and demo: also print every progress update as one JSON line (implies --json).
    #[arg(long, global = true, help_heading = "Global options")]
    pub progress_json: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// JSON output was asked for, one way or the other.
    pub fn json(&self) -> bool {
        self.json || self.progress_json
    }

    /// The cluster key file: `--key`, else `$FERRY_KEY` (when set and not empty).
    pub fn key_path(&self) -> Option<PathBuf> {
        self.key.clone().or_else(|| {
            std::env::var_os(KEY_ENV)
                .filter(|path| !path.is_empty())
                .map(PathBuf::from)
        })
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run an agent: host VMs and serve migrations.
    Agent(AgentArgs),
    /// Create, inspect and remove VMs on an agent.
    #[command(subcommand)]
    Vm(VmCommand),
    /// Live-migrate a VM from the agent (--agent) to another agent.
    Migrate(MigrateArgs),
    /// Cancel a VM's migration (it fails back to the source).
    Cancel {
        /// VM name.
        name: String,
    },
    /// Start two agents, migrate a busy VM between them, verify it, print the report.
    Demo(DemoArgs),
    /// Manage the cluster key that agents and the CLI authenticate with.
    #[command(subcommand)]
    Key(KeyCommand),
}

#[derive(Debug, Subcommand)]
pub enum KeyCommand {
    /// Write a new random cluster key (mode 0600), to be copied to every agent.
    Init {
        /// Where to write it [default: --key, else $FERRY_KEY, else ./cluster.key].
        path: Option<PathBuf>,
        /// Replace an existing key file (every agent then needs the new key).
        #[arg(long)]
        force: bool,
    },
}

impl KeyCommand {
    /// `key init`'s file: PATH, else `key_path` (--key or $FERRY_KEY), else ./cluster.key.
    pub fn init_path(path: Option<PathBuf>, key_path: Option<PathBuf>) -> PathBuf {
        path.or(key_path).unwrap_or_else(|| PathBuf::from(KEY_FILE))
    }
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = DEFAULT_AGENT, value_name = "ADDR")]
    pub listen: String,
    /// Directory for the agent's files (created if missing): its cluster key cluster.key
    /// unless --key or $FERRY_KEY says otherwise, and its CLI socket agent.sock.
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Print `listening on ADDR` on stdout once listening.
    #[arg(long)]
    pub print_addr: bool,
    /// Where the VMs' memory lives, one directory per VM, kept across agent restarts so a
    /// restarted agent recovers its VMs. Must be tmpfs (write tracking needs shared memory);
    /// default /dev/shm/ferry-AGENT_ID.
    #[arg(long, value_name = "DIR")]
    pub memory_dir: Option<PathBuf>,
    /// CPUs the data plane may use, e.g. 0-3,8 [default: every CPU this process may use].
    /// Transport threads go to the CPUs of the NIC's NUMA node, disk threads to the
    /// disk's, the rest spread over the list (see --show-placement).
    // `::std::vec::Vec`: one value holding a list, not a repeatable option (clap).
    #[arg(long, value_name = "LIST", value_parser = ferry_dataplane::numa::parse_cpu_list)]
    pub cpus: Option<::std::vec::Vec<u32>>,
    /// Print the NUMA topology and the data plane's placement (which CPUs and memory node
    /// each kind of thread gets, and why), then exit; with --json as one JSON object.
    #[arg(long)]
    pub show_placement: bool,
}

#[derive(Debug, Subcommand)]
pub enum VmCommand {
    /// Boot a reference VM.
    Create(CreateArgs),
    /// List the VMs on the agent.
    List,
    /// Show one VM, with its per-vCPU steps.
    Status {
        /// VM name.
        name: String,
    },
    /// Replay the VM's program and check every page (exits non-zero on a mismatch).
    Verify {
        /// VM name.
        name: String,
    },
    /// Stop and remove a VM (and the disk image the agent created for it).
    Destroy {
        /// VM name.
        name: String,
    },
    /// Stop the VM's vCPUs and disk writes; it stays on the agent (see `vm resume`).
    Pause {
        /// VM name.
        name: String,
    },
    /// Let a paused VM run again (also one that arrived with `migrate --paused`).
    Resume {
        /// VM name.
        name: String,
    },
}

#[derive(Debug, Args)]
pub struct CreateArgs {
    /// VM name (unique on the agent).
    pub name: String,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub disk: DiskArgs,
}

/// What to boot (shared by `vm create` and `demo`).
#[derive(Clone, Debug, Args)]
pub struct VmArgs {
    /// Guest memory, e.g. 256M, 1G, 16G.
    #[arg(long, default_value = "1G", value_parser = parse_bytes, value_name = "SIZE")]
    pub memory: u64,
    /// vCPUs (1..=64).
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// Bytes the vCPUs write per second, in total, e.g. 100MB/s; 0 = idle, "max" = unpaced.
    #[arg(long, default_value = "100MB/s", value_parser = parse_rate, value_name = "RATE")]
    pub dirty_rate: u64,
    /// Which pages the vCPUs write: uniform, hotset or sweep.
    #[arg(long, default_value = "uniform", value_name = "PATTERN")]
    pub pattern: Pattern,
    /// Seed of the vCPUs' deterministic program.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Share of pages given content at boot (0..=100).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub fill_percent: u8,
}

impl VmArgs {
    pub fn spec(&self, name: &str) -> VmSpec {
        VmSpec {
            name: name.to_string(),
            memory_bytes: self.memory,
            vcpus: self.vcpus,
            dirty_rate_bytes_per_s: self.dirty_rate,
            pattern: self.pattern,
            seed: self.seed,
            fill_percent: self.fill_percent,
            disk: None,
        }
    }
}

/// What `--disk` asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiskArg {
    /// `--disk 0`: no disk.
    None,
    /// A new image of this many bytes under the agent's data directory.
    Size(u64),
    /// An existing file or block device on the agent's host.
    Path(PathBuf),
}

/// Disk of the default demo VM.
pub const DEMO_DISK_BYTES: u64 = 1 << 30;

/// The VM's virtual disk (shared by `vm create` and `demo`).
#[derive(Clone, Debug, Args)]
pub struct DiskArgs {
    /// Give the VM a virtual disk: a SIZE (e.g. 8G; the agent creates DATA_DIR/disks/NAME.img
    /// and deletes it with the VM) or the PATH (absolute, or containing '/': a relative one is
    /// taken from the current directory) of an existing file or block device on the agent's
    /// host. A PATH's WHOLE CONTENT IS OVERWRITTEN (zeroed,
    /// then given boot content) and its size becomes the disk's; it is never deleted. 0 = no
    /// disk. Default: none for `vm create`, 1G for `demo`.
    #[arg(long, value_parser = parse_disk_arg, value_name = "SIZE|PATH", help_heading = "Disk")]
    pub disk: Option<DiskArg>,
    /// Bytes the vCPUs write to the disk per second, in total (64 KiB writes), e.g. 20MB/s;
    /// 0 = none, "max" = unpaced.
    #[arg(long, default_value = "20MB/s", value_parser = parse_rate, value_name = "RATE", help_heading = "Disk")]
    pub disk_write_rate: u64,
    /// Which parts of the disk the vCPUs write: random, sequential or hotset.
    #[arg(
        long,
        default_value = "random",
        value_name = "PATTERN",
        help_heading = "Disk"
    )]
    pub disk_pattern: DiskPattern,
    /// Share of the disk (in 1 MiB extents) given content at boot; the rest reads as zero.
    #[arg(long, default_value = "25", value_parser = parse_percent, value_name = "PERCENT", help_heading = "Disk")]
    pub disk_fill: u8,
    /// O_DIRECT for the disk image: required (fail if the filesystem refuses it), auto
    /// (fall back to buffered I/O) or off. For `demo`, also the destination's image.
    #[arg(
        long,
        default_value = "auto",
        value_name = "MODE",
        help_heading = "Disk"
    )]
    pub direct_io: DirectIo,
}

impl DiskArgs {
    /// The disk of the spec and where its image comes from; `default` stands in for a
    /// missing `--disk`. A PATH's disk has size 0 here: the agent takes the file's size.
    pub fn resolve(&self, default: &DiskArg) -> (Option<DiskSpec>, DiskPlacement) {
        let spec = |bytes| DiskSpec {
            bytes,
            write_rate_bytes_per_s: self.disk_write_rate,
            pattern: self.disk_pattern,
            fill_percent: self.disk_fill,
        };
        let placement = |path| DiskPlacement {
            path,
            direct_io: self.direct_io,
        };
        match self.disk.as_ref().unwrap_or(default) {
            DiskArg::None => (None, placement(None)),
            DiskArg::Size(bytes) => (Some(spec(*bytes)), placement(None)),
            DiskArg::Path(path) => (Some(spec(0)), placement(Some(path.clone()))),
        }
    }

    /// `spec` with this disk (`default` when `--disk` was not given).
    pub fn apply(&self, mut spec: VmSpec, default: &DiskArg) -> (VmSpec, DiskPlacement) {
        let (disk, placement) = self.resolve(default);
        spec.disk = disk;
        (spec, placement)
    }
}

/// A short description of a VM's disk for messages: `8.00 GiB` or the path.
pub fn describe_disk(spec: &VmSpec, placement: &DiskPlacement) -> Option<String> {
    let disk = spec.disk.as_ref()?;
    Some(match &placement.path {
        Some(path) => path.display().to_string(),
        None => format_bytes(disk.bytes),
    })
}

/// How to migrate (shared by `migrate` and `demo`); defaults are the engine's.
#[derive(Clone, Debug, Args)]
pub struct MigrationArgs {
    /// Parallel data streams: 1..=64, or auto (the source agent chooses from its transport
    /// cores and the link's speed; the report says how many and why).
    #[arg(long, default_value = "auto", value_parser = parse_streams, value_name = "N|auto")]
    pub streams: usize,
    /// Pause the guest may see at switch-over, in ms.
    #[arg(long, default_value_t = MigrationParams::default().downtime_ms)]
    pub downtime_ms: u64,
    /// Cap on the data rate, e.g. 1G/s (default: as fast as the link goes).
    #[arg(long, value_parser = parse_rate, value_name = "RATE")]
    pub max_bandwidth: Option<u64>,
    /// Pre-copy rounds before switching over regardless.
    #[arg(long, default_value_t = MigrationParams::default().rounds_max)]
    pub rounds_max: u32,
    /// Pre-copy time before switching over regardless, in ms.
    #[arg(long, default_value_t = MigrationParams::default().precopy_timeout_ms)]
    pub precopy_timeout_ms: u64,
    /// Bound on the switch-over, e.g. 10s or 500ms: the destination must be prepared within
    /// this long after the VM is quiesced, or the migration fails back and the VM resumes on
    /// the source (like vMotion's switch-over bound).
    #[arg(long, default_value = "10s", value_parser = parse_duration_ms, value_name = "DURATION")]
    pub switchover_timeout: u64,
    /// The same bound in ms (overrides --switchover-timeout; kept for scripts).
    #[arg(long, hide = true)]
    pub switchover_timeout_ms: Option<u64>,
    /// Disk bulk-copy chunk, e.g. 1M (128K..=8M, a multiple of 4K).
    #[arg(long, default_value = "1M", value_parser = parse_chunk_size, value_name = "SIZE")]
    pub chunk_size: u32,
    /// io_uring queue depth of the disk bulk copy (reads on the source, writes on the
    /// destination).
    #[arg(long, default_value_t = MigrationParams::default().disk_queue_depth,
          value_parser = clap::value_parser!(u32).range(1..=i64::from(QUEUE_DEPTH_MAX)), value_name = "N")]
    pub queue_depth: u32,
    /// Data path: auto (RDMA when a local device reaches the destination and its agent can
    /// listen on one, otherwise TCP; the report says which and why), rdma (or fail), tcp.
    #[arg(long, default_value = "auto", value_name = "auto|rdma|tcp")]
    pub transport: TransportChoice,
    /// How TCP streams send pages: auto (io_uring zero-copy send, probed; switches to plain
    /// send when the kernel reports it copied anyway, as on loopback), zerocopy, copy.
    #[arg(long, default_value = "auto", value_name = "auto|zerocopy|copy")]
    pub send_mode: SendMode,
    /// Whether the vCPUs stop while pre-copy collects the dirty set: auto (when collecting
    /// under running vCPUs proved slow, as TLB shootdowns make it in VMs, and only while a
    /// stop stays within a quarter of the downtime target), always, never.
    #[arg(long, default_value = "auto", value_name = "auto|always|never")]
    pub collect_pause: CollectPause,
    /// Write a timeline of the migration as an SVG: bytes/s per phase over time, the dirty
    /// set per round, the pause.
    #[arg(long, value_name = "PATH")]
    pub plot: Option<PathBuf>,
}

impl MigrationArgs {
    /// The parameters these flags set; the rest (direct I/O of the destination's image,
    /// paused start, keeping the source's disks) at their defaults.
    pub fn params(&self) -> MigrationParams {
        MigrationParams {
            streams: self.streams,
            downtime_ms: self.downtime_ms,
            rounds_max: self.rounds_max,
            precopy_timeout_ms: self.precopy_timeout_ms,
            bandwidth_max_bytes_per_s: self.max_bandwidth,
            switchover_timeout_ms: self
                .switchover_timeout_ms
                .unwrap_or(self.switchover_timeout),
            disk_chunk_bytes: self.chunk_size,
            disk_queue_depth: self.queue_depth,
            transport: self.transport,
            send_mode: self.send_mode,
            collect_pause: self.collect_pause,
            ..MigrationParams::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct MigrateArgs {
    /// VM name.
    pub name: String,
    /// Destination agent (host:port).
    #[arg(long, value_name = "ADDR")]
    pub to: String,
    #[command(flatten)]
    pub migration: MigrationArgs,
    /// O_DIRECT for the disk image the destination creates: required, auto or off.
    #[arg(long, default_value = "auto", value_name = "MODE")]
    pub direct_io: DirectIo,
    /// The destination takes the VM over but leaves it paused until `ferry vm resume`.
    #[arg(long)]
    pub paused: bool,
    /// Keep the source's disk image after the hand-over (by default the source deletes an
    /// image its agent created; a user-supplied path is never deleted).
    #[arg(long)]
    pub keep_source_disks: bool,
}

impl MigrateArgs {
    pub fn params(&self) -> MigrationParams {
        MigrationParams {
            direct_io: self.direct_io,
            start_paused: self.paused,
            keep_source_disks: self.keep_source_disks,
            ..self.migration.params()
        }
    }
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Name of the demo VM.
    #[arg(long, default_value = "demo")]
    pub name: String,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub disk: DiskArgs,
    #[command(flatten)]
    pub migration: MigrationArgs,
}

impl DemoArgs {
    /// The demo VM: a 1 GiB disk unless `--disk` says otherwise.
    pub fn spec(&self) -> (VmSpec, DiskPlacement) {
        self.disk
            .apply(self.vm.spec(&self.name), &DiskArg::Size(DEMO_DISK_BYTES))
    }

    /// The migration: `--direct-io` applies to the destination's image too.
    pub fn params(&self) -> MigrationParams {
        MigrationParams {
            direct_io: self.disk.direct_io,
            ..self.migration.params()
        }
    }
}

/// `10s`, `500ms`, `1.5s`, `2m` → milliseconds (at least 1).
fn parse_duration_ms(input: &str) -> Result<u64, String> {
    let text = input.trim();
    let (number, scale) = if let Some(n) = text.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = text.strip_suffix('s') {
        (n, 1e3)
    } else if let Some(n) = text.strip_suffix('m') {
        (n, 60e3)
    } else {
        return Err(format!(
            "{input:?} needs a unit: ms, s or m (e.g. 10s, 500ms)"
        ));
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{input:?} is not a duration (e.g. 10s, 500ms)"))?;
    let ms = value * scale;
    if !(1.0..=86_400e3).contains(&ms) {
        return Err(format!("{input:?} must be between 1ms and 24h"));
    }
    Ok(ms.round() as u64)
}

fn parse_bytes(input: &str) -> Result<u64, String> {
    parse_size(input).map_err(|e| e.to_string())
}

fn parse_streams(input: &str) -> Result<usize, String> {
    match input.trim() {
        "auto" => Ok(ferry_dataplane::engine::STREAMS_AUTO),
        other => match other.parse::<usize>() {
            Ok(n) if (1..=64).contains(&n) => Ok(n),
            _ => Err(format!("streams must be 1..=64 or auto, not {other:?}")),
        },
    }
}

fn parse_rate(input: &str) -> Result<u64, String> {
    match input.trim() {
        "max" | "unpaced" => Ok(u64::MAX),
        other => parse_bytes(other),
    }
}

/// `--disk`: a path when absolute or containing '/', else a size (0 = no disk). A relative
/// path is taken from the CLI's current directory (the agent's host must see the same path).
fn parse_disk_arg(input: &str) -> Result<DiskArg, String> {
    let input = input.trim();
    if input.is_empty() {
        return Err("expected a size such as 8G, or the path of a file or block device".into());
    }
    if input.contains('/') {
        let path = Path::new(input);
        let path = std::path::absolute(path)
            .map_err(|e| format!("cannot make {input:?} an absolute path: {e}"))?;
        return Ok(DiskArg::Path(path));
    }
    match parse_size(input) {
        Ok(0) => Ok(DiskArg::None),
        Ok(bytes) => Ok(DiskArg::Size(bytes)),
        Err(_) => Err(format!(
            "{input:?} is neither a size (such as 8G) nor a path (absolute, or containing '/', such as ./disk.img)"
        )),
    }
}

/// A percentage, with or without `%`.
fn parse_percent(input: &str) -> Result<u8, String> {
    let digits = input.trim().trim_end_matches('%').trim();
    match digits.parse::<u8>() {
        Ok(percent) if percent <= 100 => Ok(percent),
        _ => Err(format!("{input:?} is not a percentage in 0..=100")),
    }
}

/// `--chunk-size`: checked here as the engine checks it, so a typo fails before any
/// connection.
fn parse_chunk_size(input: &str) -> Result<u32, String> {
    let bytes = parse_bytes(input)?;
    let min = u64::from(DISK_CHUNK_BYTES_MIN);
    let max = CHUNK_BYTES_MAX as u64;
    if !(min..=max).contains(&bytes) || !bytes.is_multiple_of(4096) {
        return Err(format!(
            "the chunk size must be a multiple of 4K in {}..={}, not {}",
            format_bytes(min),
            format_bytes(max),
            format_bytes(bytes)
        ));
    }
    Ok(bytes as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("ferry").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn definitions_are_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn vm_create_with_every_flag() {
        let cli = parse(&[
            "--agent",
            "10.0.0.1:1",
            "vm",
            "create",
            "web",
            "--memory",
            "16G",
            "--vcpus",
            "4",
            "--dirty-rate",
            "200MB/s",
            "--pattern",
            "hotset",
            "--seed",
            "9",
            "--fill-percent",
            "50",
        ]);
        assert_eq!(cli.agent, "10.0.0.1:1");
        let Command::Vm(VmCommand::Create(args)) = cli.command else {
            panic!("{:?}", cli.command)
        };
        assert_eq!(
            args.vm.spec(&args.name),
            VmSpec {
                name: "web".into(),
                memory_bytes: 16 << 30,
                vcpus: 4,
                dirty_rate_bytes_per_s: 200 << 20,
                pattern: Pattern::Hotset,
                seed: 9,
                fill_percent: 50,
                disk: None,
            }
        );
    }

    #[test]
    fn vm_create_defaults_match_the_demo() {
        let cli = parse(&["vm", "create", "a", "--memory", "256M"]);
        let Command::Vm(VmCommand::Create(args)) = cli.command else {
            panic!()
        };
        let spec = args.vm.spec("a");
        assert_eq!(spec.memory_bytes, 256 << 20);
        assert_eq!(
            (
                spec.vcpus,
                spec.dirty_rate_bytes_per_s,
                spec.pattern,
                spec.seed,
                spec.fill_percent
            ),
            (2, 100 << 20, Pattern::Uniform, 1, 100)
        );
        let Command::Demo(demo) = parse(&["demo"]).command else {
            panic!()
        };
        assert_eq!(demo.vm.spec("a").memory_bytes, 1 << 30);
        assert_eq!(demo.params(), MigrationParams::default());
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["vm", "create", "a", "--memory", "lots"][..],
            &["vm", "create", "a", "--pattern", "zigzag"],
            &["vm", "create", "a", "--fill-percent", "101"],
            &["vm", "create", "a", "--disk", "lots"],
            &["vm", "create", "a", "--disk", ""],
            &[
                "vm",
                "create",
                "a",
                "--disk",
                "8G",
                "--disk-pattern",
                "zigzag",
            ],
            &["vm", "create", "a", "--disk", "8G", "--disk-fill", "101"],
            &[
                "vm",
                "create",
                "a",
                "--disk",
                "8G",
                "--disk-write-rate",
                "fast",
            ],
            &[
                "vm",
                "create",
                "a",
                "--disk",
                "8G",
                "--direct-io",
                "sometimes",
            ],
            &["migrate", "a", "--to", "x:1", "--chunk-size", "64K"],
            &["migrate", "a", "--to", "x:1", "--chunk-size", "16M"],
            &["migrate", "a", "--to", "x:1", "--chunk-size", "130K"],
            &["migrate", "a", "--to", "x:1", "--queue-depth", "0"],
            &["migrate", "a", "--to", "x:1", "--queue-depth", "257"],
            &["migrate", "a", "--to", "x:1", "--direct-io", "yes"],
            &["vm", "pause"],
            &["vm", "resume"],
            &["migrate", "a"],
            &["migrate", "a", "--to", "x:1", "--max-bandwidth", "fast"],
            &["vm", "status"],
            &["agent"],
        ] {
            assert!(
                Cli::try_parse_from(std::iter::once("ferry").chain(args.iter().copied())).is_err(),
                "{args:?}"
            );
        }
    }

    #[test]
    fn migrate_flags_become_params() {
        let cli = parse(&[
            "migrate",
            "a",
            "--to",
            "h:7071",
            "--streams",
            "8",
            "--downtime-ms",
            "20",
            "--max-bandwidth",
            "1G/s",
            "--rounds-max",
            "5",
            "--precopy-timeout-ms",
            "1000",
            "--switchover-timeout-ms",
            "500",
            "--json",
        ]);
        assert!(cli.json());
        let Command::Migrate(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.to, "h:7071");
        assert_eq!(
            args.migration.params(),
            MigrationParams {
                streams: 8,
                downtime_ms: 20,
                rounds_max: 5,
                precopy_timeout_ms: 1000,
                bandwidth_max_bytes_per_s: Some(1 << 30),
                switchover_timeout_ms: 500,
                ..MigrationParams::default()
            }
        );
    }

    #[test]
    fn switchover_timeout_takes_a_duration() {
        for (flag, ms) in [
            ("10s", 10_000),
            ("500ms", 500),
            ("1.5s", 1500),
            ("2m", 120_000),
        ] {
            let cli = parse(&["migrate", "a", "--to", "h:1", "--switchover-timeout", flag]);
            let Command::Migrate(args) = cli.command else {
                panic!()
            };
            assert_eq!(args.migration.params().switchover_timeout_ms, ms, "{flag}");
        }
        let cli = parse(&["migrate", "a", "--to", "h:1"]);
        let Command::Migrate(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.migration.params().switchover_timeout_ms, 10_000);
        for bad in ["10", "s", "-1s", "0ms", "1e9s", "abc"] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn migrate_disk_flags_become_params() {
        let cli = parse(&[
            "migrate",
            "a",
            "--to",
            "h:7071",
            "--chunk-size",
            "4M",
            "--queue-depth",
            "32",
            "--direct-io",
            "required",
            "--paused",
            "--keep-source-disks",
            "--transport",
            "rdma",
        ]);
        let Command::Migrate(args) = cli.command else {
            panic!()
        };
        let params = args.params();
        assert_eq!(
            params,
            MigrationParams {
                disk_chunk_bytes: 4 << 20,
                disk_queue_depth: 32,
                direct_io: DirectIo::Required,
                start_paused: true,
                keep_source_disks: true,
                transport: TransportChoice::Rdma,
                ..MigrationParams::default()
            }
        );
        params.validate().unwrap();
        // Defaults: the engine's, and the bounds of the chunk size are the engine's.
        let Command::Migrate(args) = parse(&["migrate", "a", "--to", "h:1"]).command else {
            panic!()
        };
        assert_eq!(args.params(), MigrationParams::default());
        for (input, bytes) in [("128K", 128 << 10), ("8M", 8 << 20), ("1M", 1 << 20)] {
            assert_eq!(parse_chunk_size(input), Ok(bytes), "{input}");
            MigrationParams {
                disk_chunk_bytes: bytes,
                ..MigrationParams::default()
            }
            .validate()
            .unwrap();
        }
        let err = parse_chunk_size("9M").unwrap_err();
        assert!(err.contains("128 KiB") && err.contains("8.00 MiB"), "{err}");
    }

    #[test]
    fn disk_sizes_paths_and_none() {
        assert_eq!(parse_disk_arg("8G"), Ok(DiskArg::Size(8 << 30)));
        assert_eq!(parse_disk_arg("64M"), Ok(DiskArg::Size(64 << 20)));
        assert_eq!(parse_disk_arg(" 1GiB "), Ok(DiskArg::Size(1 << 30)));
        assert_eq!(parse_disk_arg("0"), Ok(DiskArg::None));
        assert_eq!(
            parse_disk_arg("/dev/vdb"),
            Ok(DiskArg::Path("/dev/vdb".into()))
        );
        assert_eq!(
            parse_disk_arg("/var/lib/x.img"),
            Ok(DiskArg::Path("/var/lib/x.img".into()))
        );
        // Relative paths (they contain '/') are taken from the current directory.
        let cwd = std::env::current_dir().unwrap();
        assert_eq!(
            parse_disk_arg("./disk.img"),
            Ok(DiskArg::Path(cwd.join("disk.img")))
        );
        assert_eq!(
            parse_disk_arg("images/8G"),
            Ok(DiskArg::Path(cwd.join("images/8G")))
        );
        // A bare file name is not a path: it would be too easy to mistype a size.
        let err = parse_disk_arg("disk.img").unwrap_err();
        assert!(
            err.contains("neither a size") && err.contains("path"),
            "{err}"
        );
    }

    #[test]
    fn disk_patterns_percentages_and_direct_io_modes() {
        for (input, pattern) in [
            ("random", DiskPattern::Random),
            ("sequential", DiskPattern::Sequential),
            ("hotset", DiskPattern::Hotset),
        ] {
            let cli = parse(&["vm", "create", "a", "--disk", "1G", "--disk-pattern", input]);
            let Command::Vm(VmCommand::Create(args)) = cli.command else {
                panic!()
            };
            assert_eq!(args.disk.disk_pattern, pattern);
        }
        for (input, mode) in [
            ("required", DirectIo::Required),
            ("auto", DirectIo::Auto),
            ("off", DirectIo::Off),
        ] {
            let cli = parse(&["vm", "create", "a", "--disk", "1G", "--direct-io", input]);
            let Command::Vm(VmCommand::Create(args)) = cli.command else {
                panic!()
            };
            assert_eq!(args.disk.resolve(&DiskArg::None).1.direct_io, mode);
        }
        assert_eq!(parse_percent("25"), Ok(25));
        assert_eq!(parse_percent("100%"), Ok(100));
        assert_eq!(parse_percent("0"), Ok(0));
        assert!(parse_percent("101").is_err());
        assert!(parse_percent("-1").is_err());
    }

    #[test]
    fn vm_create_with_a_disk() {
        let cli = parse(&[
            "vm",
            "create",
            "web",
            "--memory",
            "256M",
            "--disk",
            "8G",
            "--disk-write-rate",
            "50MB/s",
            "--disk-pattern",
            "hotset",
            "--disk-fill",
            "10",
            "--direct-io",
            "required",
        ]);
        let Command::Vm(VmCommand::Create(args)) = cli.command else {
            panic!()
        };
        let (spec, placement) = args.disk.apply(args.vm.spec(&args.name), &DiskArg::None);
        assert_eq!(
            spec.disk,
            Some(DiskSpec {
                bytes: 8 << 30,
                write_rate_bytes_per_s: 50 << 20,
                pattern: DiskPattern::Hotset,
                fill_percent: 10,
            })
        );
        assert_eq!(
            placement,
            DiskPlacement {
                path: None,
                direct_io: DirectIo::Required
            }
        );
        spec.validate().unwrap();
        assert_eq!(
            describe_disk(&spec, &placement).as_deref(),
            Some("8.00 GiB")
        );

        // Defaults: 20 MB/s random, 25 % filled, direct I/O auto.
        let cli = parse(&["vm", "create", "b", "--disk", "/dev/vdb"]);
        let Command::Vm(VmCommand::Create(args)) = cli.command else {
            panic!()
        };
        let (spec, placement) = args.disk.apply(args.vm.spec("b"), &DiskArg::None);
        assert_eq!(
            spec.disk,
            Some(DiskSpec {
                bytes: 0,
                write_rate_bytes_per_s: 20 << 20,
                pattern: DiskPattern::Random,
                fill_percent: 25,
            }),
            "the agent takes a path's size"
        );
        assert_eq!(placement.path, Some(PathBuf::from("/dev/vdb")));
        assert_eq!(placement.direct_io, DirectIo::Auto);
        assert_eq!(
            describe_disk(&spec, &placement).as_deref(),
            Some("/dev/vdb")
        );
    }

    #[test]
    fn the_demo_has_a_1g_disk_unless_told_otherwise() {
        let Command::Demo(demo) = parse(&["demo"]).command else {
            panic!()
        };
        let (spec, placement) = demo.spec();
        let disk = spec.disk.clone().unwrap();
        assert_eq!(
            (disk.bytes, disk.write_rate_bytes_per_s, disk.pattern),
            (1 << 30, 20 << 20, DiskPattern::Random)
        );
        assert_eq!(placement, DiskPlacement::default());
        spec.validate().unwrap();
        let Command::Demo(demo) = parse(&["demo", "--disk", "0"]).command else {
            panic!()
        };
        assert_eq!(demo.spec().0.disk, None);
        let Command::Demo(demo) = parse(&[
            "demo",
            "--disk",
            "256M",
            "--direct-io",
            "off",
            "--chunk-size",
            "512K",
            "--queue-depth",
            "4",
        ])
        .command
        else {
            panic!()
        };
        assert_eq!(demo.spec().0.disk.unwrap().bytes, 256 << 20);
        let params = demo.params();
        assert_eq!(
            (
                params.direct_io,
                params.disk_chunk_bytes,
                params.disk_queue_depth
            ),
            (DirectIo::Off, 512 << 10, 4)
        );
    }

    #[test]
    fn pause_and_resume_name_a_vm() {
        let Command::Vm(VmCommand::Pause { name }) = parse(&["vm", "pause", "x"]).command else {
            panic!()
        };
        assert_eq!(name, "x");
        let Command::Vm(VmCommand::Resume { name }) = parse(&["vm", "resume", "y"]).command else {
            panic!()
        };
        assert_eq!(name, "y");
    }

    #[test]
    fn key_flags_and_key_init() {
        let cli = parse(&["--key", "/etc/ferry/k", "vm", "list"]);
        assert_eq!(cli.key_path(), Some(PathBuf::from("/etc/ferry/k")));
        let cli = parse(&["agent", "--data-dir", "/d", "--key", "/k"]);
        assert_eq!(cli.key, Some(PathBuf::from("/k")));
        let Command::Key(KeyCommand::Init { path, force }) = parse(&["key", "init"]).command else {
            panic!()
        };
        assert_eq!((path.clone(), force), (None, false));
        assert_eq!(
            KeyCommand::init_path(path, None),
            PathBuf::from("cluster.key")
        );
        assert_eq!(
            KeyCommand::init_path(None, Some("/from/env".into())),
            PathBuf::from("/from/env")
        );
        let Command::Key(KeyCommand::Init { path, force }) =
            parse(&["key", "init", "/tmp/k", "--force"]).command
        else {
            panic!()
        };
        assert_eq!((path, force), (Some(PathBuf::from("/tmp/k")), true));
        assert_eq!(
            KeyCommand::init_path(Some("/a".into()), Some("/b".into())),
            PathBuf::from("/a")
        );
    }

    #[test]
    fn agent_and_demo_flags() {
        let cli = parse(&[
            "agent",
            "--listen",
            "127.0.0.1:0",
            "--data-dir",
            "/tmp/x",
            "--print-addr",
        ]);
        let Command::Agent(args) = cli.command else {
            panic!()
        };
        assert_eq!(
            (args.listen.as_str(), args.print_addr),
            ("127.0.0.1:0", true)
        );
        assert_eq!(args.data_dir, PathBuf::from("/tmp/x"));
        let cli = parse(&[
            "demo",
            "--memory",
            "256M",
            "--dirty-rate",
            "max",
            "--streams",
            "2",
            "--progress-json",
        ]);
        assert!(cli.json());
        let Command::Demo(args) = cli.command else {
            panic!()
        };
        assert_eq!(args.vm.dirty_rate, u64::MAX);
        assert_eq!(args.migration.streams, 2);
        assert_eq!(args.name, "demo");
    }
}
