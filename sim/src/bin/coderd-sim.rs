//! coderd-sim: the coderd chat stand-in. See the `coderd_sim` crate documentation.

use std::process::ExitCode;

use clap::Parser;
use coderd_sim::cli::{Cli, Command};
use coderd_sim::{migrate, seed, server};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Migrate { database_url } => {
            migrate::migrate(&database_url).await.map_err(Into::into)
        }
        Command::Seed {
            database_url,
            users,
            chats_per_user,
            out,
        } => {
            let plan = seed::SeedPlan {
                users,
                chats_per_user,
            };
            match seed::seed(&database_url, &plan).await {
                Ok(file) => {
                    let json = serde_json::to_string_pretty(&file).expect("seed file serializes");
                    std::fs::write(&out, json).map_err(Into::into)
                }
                Err(e) => Err(e.into()),
            }
        }
        Command::Serve(args) => match server::parse_peers(&args.peers) {
            Ok(peers) => {
                let settings = args.settings();
                server::serve(&args.listen, &args.database_url, settings, peers)
                    .await
                    .map_err(Into::into)
            }
            Err(e) => Err(e.into()),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "coderd-sim failed");
            ExitCode::FAILURE
        }
    }
}
