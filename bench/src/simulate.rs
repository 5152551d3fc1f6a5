//! `simulate`: the seeded simulation of the quiesce-and-swap barrier
//! (`ferry_control::simulation`): many seeds and their totals, or one seed and its trace.
//!
//! Not an A/B benchmark: it checks invariants, and the figures say how much fault the run
//! covered and how long it took.

use std::time::Instant;

use clap::Args;
use ferry_control::simulation::{run_seed, run_seeds, Bug, SimConfig, SimReport};

#[derive(Args, Debug)]
pub struct SimulateArgs {
    /// Seeds to run, from --first.
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u64).range(1..))]
    seeds: u64,
    /// The first seed.
    #[arg(long, default_value_t = 0)]
    first: u64,
    /// Replay this one seed and print its whole trace.
    #[arg(long)]
    seed: Option<u64>,
    /// Length of the fault window, in ticks of 10 ms of virtual time.
    #[arg(long, default_value_t = SimConfig::default().fault_ticks, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    fault_ticks: u64,
    /// Run a deliberately broken variant, to watch the checker catch it
    /// (destination-resumes-on-channel-lost, source-resumes-after-commit, commit-not-journaled).
    #[arg(long)]
    bug: Option<Bug>,
    /// Model the agent's recovery as it is: a restarted source that cannot record that its
    /// interrupted migration never committed leaves the VM stopped until its next restart
    /// (by default the simulated agent retries).
    #[arg(long)]
    no_abort_retry: bool,
    /// Worker threads (default: one per CPU).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=64))]
    threads: Option<u64>,
}

pub fn run(args: SimulateArgs, json: bool) -> anyhow::Result<()> {
    // The journals warn about every torn record and failed append the simulation injects:
    // only errors are news here (RUST_LOG overrides).
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("error")),
        )
        .init();
    let mut config = SimConfig {
        fault_ticks: args.fault_ticks,
        bug: args.bug,
        retry_unfinished_abort: !args.no_abort_retry,
        ..Default::default()
    };
    if let Some(threads) = args.threads {
        config.threads = threads as usize;
    }
    if let Some(seed) = args.seed {
        config.full_trace = true;
        let started = Instant::now();
        let result = run_seed(seed, &config);
        let elapsed_s = started.elapsed().as_secs_f64();
        return match result {
            Ok(summary) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&summary)?);
                } else {
                    for event in &summary.trace {
                        println!("{event}");
                    }
                    println!(
                        "\nseed {seed}: ok in {elapsed_s:.3} s: {} migrations, {} committed, {} failed back, {} crashes; the VM ends on {} at epoch {} after {} ticks",
                        summary.counts.migrations,
                        summary.counts.committed,
                        summary.counts.failed_back,
                        summary.counts.crashes,
                        summary.owner,
                        summary.epoch,
                        summary.counts.ticks
                    );
                }
                Ok(())
            }
            Err(failure) => {
                if json {
                    println!("{}", serde_json::to_string_pretty(&failure)?);
                } else {
                    eprintln!("{failure}");
                }
                std::process::exit(1);
            }
        };
    }
    eprintln!(
        "simulating seeds {}..{} on {} threads",
        args.first,
        args.first.saturating_add(args.seeds),
        config.threads
    );
    let started = Instant::now();
    let report = run_seeds(args.first, args.seeds, &config);
    let elapsed_s = started.elapsed().as_secs_f64();
    if json {
        #[derive(serde::Serialize)]
        struct Out<'a> {
            elapsed_s: f64,
            #[serde(flatten)]
            report: &'a SimReport,
        }
        println!(
            "{}",
            serde_json::to_string_pretty(&Out {
                elapsed_s,
                report: &report
            })?
        );
    } else {
        print(&report, elapsed_s, &config);
    }
    if let Some(first) = report.failures.first() {
        eprintln!(
            "{} of {} seeds violated an invariant; the first:\n{first}",
            report.failed, report.seeds
        );
        let seeds: Vec<String> = report.failures.iter().map(|f| f.seed.to_string()).collect();
        eprintln!("failing seeds (lowest first): {}", seeds.join(" "));
        std::process::exit(1);
    }
    Ok(())
}

fn print(r: &SimReport, elapsed_s: f64, config: &SimConfig) {
    let bug = config.bug.map_or_else(
        || "the real code".to_string(),
        |b| format!("BUG {}", b.name()),
    );
    println!(
        "## Barrier simulation: seeds {}..{} ({bug}, {} fault ticks per seed)\n",
        r.first_seed,
        r.first_seed.saturating_add(r.seeds),
        config.fault_ticks
    );
    let seeds_per_s = r.seeds as f64 / elapsed_s.max(1e-9);
    let rows: Vec<(&str, String)> = vec![
        ("seeds", r.seeds.to_string()),
        ("passed", r.passed.to_string()),
        ("failed", r.failed.to_string()),
        ("migrations started", r.counts.migrations.to_string()),
        ("commit points journaled", r.counts.committed.to_string()),
        ("fail-backs", r.counts.failed_back.to_string()),
        ("in-doubt episodes", r.counts.in_doubt.to_string()),
        (
            "in-doubt episodes resolved",
            r.counts.in_doubt_resolved.to_string(),
        ),
        (
            "  of which committed",
            r.counts.in_doubt_committed.to_string(),
        ),
        ("outcome questions", r.counts.outcome_questions.to_string()),
        ("crashes injected", r.counts.crashes.to_string()),
        ("partitions", r.counts.partitions.to_string()),
        (
            "journal appends failed",
            r.counts.journal_failures.to_string(),
        ),
        (
            "agents killed mid-append (torn)",
            r.counts.torn_appends.to_string(),
        ),
        ("messages sent", r.counts.messages.to_string()),
        ("messages dropped", r.counts.dropped.to_string()),
        ("messages duplicated", r.counts.duplicated.to_string()),
        ("messages reordered", r.counts.reordered.to_string()),
        ("highest epoch reached", r.epoch_max.to_string()),
        (
            "VM ends on A / on B",
            format!("{} / {}", r.ended_on_a, r.ended_on_b),
        ),
        (
            "max ticks to settle (seed)",
            format!("{} ({})", r.settle_ticks_max, r.settle_ticks_max_seed),
        ),
        (
            "virtual time simulated",
            format!("{:.1} h", r.counts.ticks as f64 / 100.0 / 3600.0),
        ),
        ("elapsed", format!("{elapsed_s:.1} s")),
        ("seeds per second", format!("{seeds_per_s:.0}")),
    ];
    let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
    let value_width = rows.iter().map(|(_, v)| v.len()).max().unwrap_or(0).max(5);
    println!("| {:width$} | {:>value_width$} |", "", "value");
    println!("|-{:-<width$}-|-{:->value_width$}:|", "", "");
    for (key, value) in rows {
        println!("| {key:width$} | {value:>value_width$} |");
    }
    println!();
}
