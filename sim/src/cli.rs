//! The `coderd-sim` command line (fixed in CONTRACTS.md).

use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::replica::Settings;
use crate::wire::Framing;

#[derive(Debug, Parser)]
#[command(
    name = "coderd-sim",
    about = "coderd chat streaming stand-in on real Postgres"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Apply the schema (idempotent) and start message ids at 1000 or above.
    Migrate {
        #[arg(long)]
        database_url: String,
    },
    /// Create users, API keys and chats, and write the seed file.
    Seed {
        #[arg(long)]
        database_url: String,
        #[arg(long)]
        users: usize,
        #[arg(long)]
        chats_per_user: usize,
        #[arg(long)]
        out: std::path::PathBuf,
    },
    /// Run one replica.
    Serve(ServeArgs),
}

/// An on/off switch as the command line spells it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Switch {
    On,
    Off,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to listen on, e.g. 127.0.0.1:8080.
    #[arg(long)]
    pub listen: String,
    #[arg(long)]
    pub database_url: String,
    /// Replica name; its worker_id derives from it.
    #[arg(long)]
    pub replica: String,
    #[arg(long, value_enum, default_value = "envelope")]
    pub framing: Framing,
    /// The #23218 per-chat durable message cache.
    #[arg(long, value_enum, default_value = "on")]
    pub stream_cache: Switch,
    /// Whether this replica claims and runs pending chats.
    #[arg(long, value_enum, default_value = "on")]
    pub worker: Switch,
    /// Text deltas per worker turn.
    #[arg(long, default_value_t = 5)]
    pub turn_parts: u32,
    /// Milliseconds between two deltas.
    #[arg(long, default_value_t = 20)]
    pub part_delay_ms: u64,
    /// Other replicas, `NAME=ADDR,...`, for the part relay.
    #[arg(long, default_value = "")]
    pub peers: String,
    /// A running chat whose worker has not heartbeated for this long is claimed again
    /// (coderd: 5 minutes). Fault tests shorten it so a turn cut by a database restart is
    /// retried within the test.
    #[arg(long, default_value_t = 300_000, value_parser = clap::value_parser!(u64).range(1..))]
    pub stale_chat_ms: u64,
    /// Connections in the query pool.
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=1000))]
    pub db_pool_size: u32,
}

impl ServeArgs {
    pub fn settings(&self) -> Settings {
        Settings {
            name: self.replica.clone(),
            framing: self.framing,
            stream_cache: self.stream_cache == Switch::On,
            worker: self.worker == Switch::On,
            turn_parts: self.turn_parts,
            part_delay: Duration::from_millis(self.part_delay_ms),
            access_url: format!("http://{}", self.listen),
            db_pool_size: self.db_pool_size,
            stale_chat: Duration::from_millis(self.stale_chat_ms),
        }
    }
}
