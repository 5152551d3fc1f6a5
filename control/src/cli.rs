//! Command-line definitions (clap). Turning them into requests is [`crate::commands`]'s job.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};
use ferry_dataplane::engine::MigrationParams;
use ferry_dataplane::guest::reference::{Pattern, VmSpec};
use ferry_dataplane::units::parse_size;

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
    /// Agent to talk to (host:port).
    #[arg(long, global = true, default_value = DEFAULT_AGENT, value_name = "ADDR", help_heading = "Global options")]
    pub agent: String,
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
}

#[derive(Debug, Args)]
pub struct AgentArgs {
    /// Address to listen on (port 0 picks a free one).
    #[arg(long, default_value = DEFAULT_AGENT, value_name = "ADDR")]
    pub listen: String,
    /// Directory for the agent's files (created if missing).
    #[arg(long, value_name = "DIR")]
    pub data_dir: PathBuf,
    /// Print `listening on ADDR` on stdout once listening.
    #[arg(long)]
    pub print_addr: bool,
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
    /// Stop and remove a VM.
    Destroy {
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
        }
    }
}

/// How to migrate (shared by `migrate` and `demo`); defaults are the engine's.
#[derive(Clone, Debug, Args)]
pub struct MigrationArgs {
    /// Parallel data streams (1..=64).
    #[arg(long, default_value_t = MigrationParams::default().streams)]
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
    /// Bound on the switch-over (quiesce to resume), in ms.
    #[arg(long, default_value_t = MigrationParams::default().switchover_timeout_ms)]
    pub switchover_timeout_ms: u64,
}

impl MigrationArgs {
    pub fn params(&self) -> MigrationParams {
        MigrationParams {
            streams: self.streams,
            downtime_ms: self.downtime_ms,
            rounds_max: self.rounds_max,
            precopy_timeout_ms: self.precopy_timeout_ms,
            bandwidth_max_bytes_per_s: self.max_bandwidth,
            switchover_timeout_ms: self.switchover_timeout_ms,
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
}

#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Name of the demo VM.
    #[arg(long, default_value = "demo")]
    pub name: String,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub migration: MigrationArgs,
}

fn parse_bytes(input: &str) -> Result<u64, String> {
    parse_size(input).map_err(|e| e.to_string())
}

fn parse_rate(input: &str) -> Result<u64, String> {
    match input.trim() {
        "max" | "unpaced" => Ok(u64::MAX),
        other => parse_bytes(other),
    }
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
        assert_eq!(demo.migration.params(), MigrationParams::default());
    }

    #[test]
    fn bad_values_are_refused() {
        for args in [
            &["vm", "create", "a", "--memory", "lots"][..],
            &["vm", "create", "a", "--pattern", "zigzag"],
            &["vm", "create", "a", "--fill-percent", "101"],
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
            }
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
