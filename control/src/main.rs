//! `ferry`: the agent and the CLI in one binary.

use std::io::IsTerminal;

use clap::Parser;
use ferry_control::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

fn main() {
    let cli = Cli::parse();
    // The agent logs its work (info); the CLI only warnings, so its output stays readable.
    // RUST_LOG overrides either.
    let default_filter = match cli.command {
        // --show-placement prints its answer: the log would only repeat it.
        Command::Agent(ref args) if args.show_placement => "warn",
        Command::Agent(_) => "info",
        _ => "warn",
    };
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    // Colours only on a terminal: agents' logs usually go to files.
    let ansi = std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none();
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(ansi)
        .init();
    std::process::exit(ferry_control::commands::run(cli));
}
