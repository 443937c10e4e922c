//! chatload: load generator and no-loss checker for coderd's chat message stream.
//!
//! `chatload run ...` drives the seeded chats through coderd (or a sidecar in front of it) and
//! exits 0 when every subscriber always held exactly what Postgres shows, 1 on any fault or
//! unfinished turn, and 2 when the run could not be set up. See `coderd_sim::load`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use coderd_sim::load::{self, LoadError, RunOptions};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "chatload",
    about = "Load generator and no-loss checker for chat streams"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Drive chats and check every subscriber against Postgres after each turn.
    Run(RunOptions),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .init();

    let Command::Run(options) = cli.command;
    let json_path = options.json.clone();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("chatload: cannot start the runtime: {err}");
            return ExitCode::from(2);
        }
    };

    let report = match runtime.block_on(load::run(options)) {
        Ok(report) => report,
        Err(err) => return setup_failed(&err),
    };
    print!("{}", report.table());
    if let Some(path) = json_path {
        if let Err(err) = report.write_json(&path) {
            return setup_failed(&err);
        }
    }
    if report.failed() {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}

fn setup_failed(err: &LoadError) -> ExitCode {
    eprintln!("chatload: {err}");
    ExitCode::from(2)
}
