//! Runs one CLI command: turns it into requests, prints the answers, picks the exit code.
//!
//! Exit codes: 0 success, 1 failure (an error, a failed verify, a failed migration),
//! 2 bad usage (clap), 130 interrupted by Ctrl-C.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use ferry_dataplane::engine::{MigrationParams, MigrationReport, Progress};
use ferry_dataplane::guest::reference::VerifyReport;
use ferry_dataplane::units::format_bytes;
use serde::Serialize;

use crate::agent::{self, AgentConfig};
use crate::api::ErrorKind;
use crate::auth::{ClusterKey, KEY_FILE};
use crate::cli::{describe_disk, Cli, Command, DiskArg, KeyCommand, MigrateArgs, VmCommand};
use crate::client::{AgentAddr, Client, ClientError};
use crate::output::{print_json, render_verify, render_vm_detail, render_vm_table};
use crate::progress::{render_report, with_spinner, ProgressView};
use crate::{demo, error_chain, sigint};

pub const EXIT_OK: i32 = 0;
pub const EXIT_FAILED: i32 = 1;

/// How output is wanted.
#[derive(Clone, Copy, Debug)]
pub struct OutputMode {
    pub json: bool,
    pub progress_json: bool,
}

/// `migrate --json` and each `--progress-json` line.
#[derive(Serialize)]
struct ProgressLine<'a> {
    event: &'static str,
    #[serde(flatten)]
    progress: &'a Progress,
}

#[derive(Serialize)]
struct MigratedJson<'a> {
    vm: &'a str,
    to: &'a str,
    #[serde(flatten)]
    report: &'a MigrationReport,
}

#[derive(Serialize)]
struct VerifiedJson<'a> {
    vm: &'a str,
    #[serde(flatten)]
    report: &'a VerifyReport,
}

#[derive(Serialize)]
struct ErrorJson<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    kind: Option<ErrorKind>,
}

/// Runs the command and returns the process exit code.
pub fn run(cli: Cli) -> i32 {
    let mode = OutputMode {
        json: cli.json(),
        progress_json: cli.progress_json,
    };
    let key_path = cli.key_path();
    let client = || connect(&cli.agent, key_path.as_deref());
    let result = match cli.command {
        Command::Agent(args) => {
            let show_placement = args.show_placement;
            let config = AgentConfig {
                key_path: key_path
                    .clone()
                    .unwrap_or_else(|| args.data_dir.join(KEY_FILE)),
                listen: args.listen,
                data_dir: args.data_dir,
                print_addr: args.print_addr,
                memory_dir: args.memory_dir,
                cpus: args.cpus,
            };
            if show_placement {
                agent::show_placement(&config, mode.json)
            } else {
                agent::run(config)
            }
            .map(|()| EXIT_OK)
        }
        Command::Vm(command) => client().and_then(|client| vm(&client, command, mode)),
        Command::Migrate(args) => client().and_then(|client| migrate(&client, &args, mode)),
        Command::Cancel { name } => client().and_then(|client| cancel(&client, &name, mode)),
        Command::Demo(args) => demo::run(&args, mode),
        Command::Key(KeyCommand::Init { path, force }) => {
            key_init(&KeyCommand::init_path(path, key_path.clone()), force, mode)
        }
    };
    match result {
        Ok(code) => code,
        Err(err) => {
            report_error(&err, mode);
            if sigint::interrupted() {
                sigint::EXIT_INTERRUPTED
            } else {
                EXIT_FAILED
            }
        }
    }
}

/// The client of `--agent`: a unix socket needs no key; TCP loads the cluster key when one
/// is named (without one, the first request says how to give it).
fn connect(agent: &str, key_path: Option<&Path>) -> anyhow::Result<Client> {
    let client = Client::new(agent);
    match (AgentAddr::parse(agent), key_path) {
        (AgentAddr::Tcp(_), Some(path)) => Ok(client.with_key(Arc::new(ClusterKey::load(path)?))),
        _ => Ok(client),
    }
}

#[derive(Serialize)]
struct KeyJson {
    key: PathBuf,
    fingerprint: String,
}

/// `ferry key init`: a new key, 0600, and what to do with it.
fn key_init(path: &Path, force: bool, mode: OutputMode) -> anyhow::Result<i32> {
    let key = ClusterKey::generate()?;
    key.write_new(path, force)?;
    let shown = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    if mode.json {
        print_json(&KeyJson {
            key: shown,
            fingerprint: key.fingerprint(),
        });
    } else {
        println!(
            "wrote a new cluster key to {} (mode 0600, fingerprint {})",
            shown.display(),
            key.fingerprint()
        );
        println!(
            "copy it to every agent and keep it mode 0600 there: an agent reads DATA_DIR/{KEY_FILE} unless given --key PATH or FERRY_KEY"
        );
        println!("whoever holds the key can drive every agent: keep it secret");
    }
    Ok(EXIT_OK)
}

/// Prints a failure: `{"error": …}` on stdout in JSON mode, `error: …` on stderr otherwise.
pub fn report_error(err: &anyhow::Error, mode: OutputMode) {
    let message = format!("{err:#}");
    if mode.json {
        let kind = err
            .downcast_ref::<ClientError>()
            .and_then(ClientError::kind);
        print_json(&ErrorJson {
            error: &message,
            kind,
        });
    } else {
        eprintln!("error: {message}");
    }
}

fn vm(client: &Client, command: VmCommand, mode: OutputMode) -> anyhow::Result<i32> {
    match command {
        VmCommand::Create(args) => {
            let (spec, placement) = args.disk.apply(args.vm.spec(&args.name), &DiskArg::None);
            let what = match describe_disk(&spec, &placement) {
                Some(disk) => format!(
                    "booting {} ({}, disk {disk}: writing its boot content)",
                    args.name,
                    format_bytes(spec.memory_bytes)
                ),
                None => format!(
                    "booting {} ({})",
                    args.name,
                    format_bytes(spec.memory_bytes)
                ),
            };
            let vm = with_spinner(&what, mode.json, || client.vm_create(spec, placement))?;
            if mode.json {
                print_json(&vm);
            } else {
                print!("created {}\n{}", vm.name, render_vm_detail(&vm));
            }
        }
        VmCommand::List => {
            let vms = client.vm_list()?;
            if mode.json {
                print_json(&serde_json::json!({ "vms": vms }));
            } else {
                print!("{}", render_vm_table(&vms));
            }
        }
        VmCommand::Status { name } => {
            let vm = client.vm_status(&name)?;
            if mode.json {
                print_json(&vm);
            } else {
                print!("{}", render_vm_detail(&vm));
            }
        }
        VmCommand::Verify { name } => {
            let what = format!("verifying {name}: replaying its program over every page");
            let report = with_spinner(&what, mode.json, || client.vm_verify(&name))?;
            if mode.json {
                print_json(&VerifiedJson {
                    vm: &name,
                    report: &report,
                });
            } else {
                print!("{}", render_verify(&name, &report));
            }
            return Ok(if report.ok { EXIT_OK } else { EXIT_FAILED });
        }
        VmCommand::Destroy { name } => {
            client.vm_destroy(&name)?;
            if mode.json {
                print_json(&serde_json::json!({ "destroyed": name }));
            } else {
                println!("destroyed {name}");
            }
        }
        VmCommand::Pause { name } => {
            let vm = client.vm_pause(&name)?;
            if mode.json {
                print_json(&vm);
            } else {
                println!("paused {name} (`ferry vm resume {name}` lets it run again)");
            }
        }
        VmCommand::Resume { name } => {
            let vm = client.vm_resume(&name)?;
            if mode.json {
                print_json(&vm);
            } else {
                println!("resumed {name}");
            }
        }
    }
    Ok(EXIT_OK)
}

fn cancel(client: &Client, name: &str, mode: OutputMode) -> anyhow::Result<i32> {
    let was_running = client.cancel(name)?;
    if mode.json {
        print_json(&serde_json::json!({ "vm": name, "was_running": was_running }));
    } else if was_running {
        println!("cancelling the migration of {name}; it fails back to the source");
    } else {
        println!("{name} is not migrating");
    }
    Ok(EXIT_OK)
}

/// Follows a migration on `client`'s agent with a progress bar (or JSON lines). Ctrl-C
/// sends `Cancel`; the agent then fails the migration back and answers with the error.
pub fn follow_migration(
    client: &Client,
    name: &str,
    to: &str,
    params: MigrationParams,
    mode: OutputMode,
) -> anyhow::Result<MigrationReport> {
    sigint::install(&[libc::SIGINT, libc::SIGTERM]).context("installing the Ctrl-C handler")?;
    let view = (!mode.json).then(|| ProgressView::new(name, to));
    let canceller = client.clone();
    let vm = name.to_string();
    let notices = view.clone();
    let notice = move |line: &str| match &notices {
        Some(view) => view.notice(line),
        None => eprintln!("{line}"),
    };
    let watcher = sigint::Watcher::spawn(move || {
        notice(&format!(
            "interrupted: cancelling the migration of {vm} (Ctrl-C again to quit at once)"
        ));
        if let Err(err) = canceller.cancel(&vm) {
            notice(&format!("cancel failed: {}", error_chain(&err)));
        }
    })
    .context("starting the Ctrl-C watcher")?;
    let result = client.migrate(name, to, params, &mut |progress| {
        if mode.progress_json {
            print_json(&ProgressLine {
                event: "progress",
                progress,
            });
        }
        if let Some(view) = &view {
            view.update(progress);
        }
    });
    if let Some(view) = &view {
        view.finish();
    }
    drop(watcher);
    Ok(result?)
}

fn migrate(client: &Client, args: &MigrateArgs, mode: OutputMode) -> anyhow::Result<i32> {
    let report = follow_migration(client, &args.name, &args.to, args.params(), mode)?;
    write_plot(
        args.migration.plot.as_deref(),
        &report,
        &format!("{} → {}", args.name, args.to),
        mode,
    )?;
    if mode.json {
        print_json(&MigratedJson {
            vm: &args.name,
            to: &args.to,
            report: &report,
        });
    } else {
        print!("{}", render_report(&args.name, &args.to, &report));
        if args.paused {
            println!(
                "{} is paused on {}: `ferry --agent {} vm resume {}` lets it run",
                args.name, args.to, args.to, args.name
            );
        }
    }
    Ok(EXIT_OK)
}

/// `--plot PATH`: writes the report's timeline as an SVG (and says so, unless `--json`).
pub fn write_plot(
    path: Option<&Path>,
    report: &MigrationReport,
    title: &str,
    mode: OutputMode,
) -> anyhow::Result<()> {
    let Some(path) = path else {
        return Ok(());
    };
    crate::plot::write_svg(path, &report.timeline, title)
        .with_context(|| format!("writing the timeline plot {}", path.display()))?;
    if !mode.json {
        println!("timeline plot written to {}", path.display());
    }
    Ok(())
}
