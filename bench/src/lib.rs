//! chatcache-bench: the scaletest that measures how much Postgres load chatcache takes off
//! coderd's chat streams.
//!
//! One run seeds chats into a fresh database and drives them with `chatload` three times, each
//! time through a different topology, measuring what Postgres itself saw:
//!
//! | Mode | Topology |
//! |---|---|
//! | `baseline` | R `coderd-sim` replicas with `--stream-cache off`; chatload talks to them |
//! | `coderd-cache` | the same replicas with coderd's #23218 cache (`--stream-cache on`) |
//! | `chatcache` | the cached replicas, each behind its own `chatcache` sidecar |
//!
//! # Layout
//!
//! One module per step of a run:
//!
//! | Module | Step |
//! |---|---|
//! | [`options`] | the command line and the resolved run parameters |
//! | [`procs`] | child processes: spawn, log, stop, kill on exit; RSS and CPU from `/proc` |
//! | [`postgres`] | `pg_stat_statements`, the run's database, statement and connection stats |
//! | [`http`] | a small keep-alive HTTP client for readiness probes, `/metrics` and latency |
//! | [`latency`] | the latency chatcache adds to a request it passes through |
//! | [`topology`] | the processes of one mode: replicas and sidecars on loopback ports |
//! | [`mode`] | one mode: seed, load, measure, stop |
//! | [`report`] | the JSON result, the markdown table |
//! | [`chart`] | the PNG chart |
//! | [`run`] | the whole run: build, database, the three modes, results |

pub mod chart;
pub mod http;
pub mod latency;
pub mod mode;
pub mod options;
pub mod postgres;
pub mod procs;
pub mod report;
pub mod run;
pub mod topology;

/// Why a run stopped early. Faults found by chatload are not errors: the report shows them.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// Postgres was unreachable or refused a setup step.
    #[error("postgres: {}", postgres_detail(.0))]
    Postgres(#[from] tokio_postgres::Error),
    /// A child process or a file could not be handled.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A step of the run failed for a reason described in the message.
    #[error("{0}")]
    Step(String),
}

impl BenchError {
    pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> BenchError {
        let what = what.into();
        move |source| BenchError::Io { what, source }
    }
}

/// The server's message when there is one; tokio-postgres' own text is only "db error".
fn postgres_detail(e: &tokio_postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{}: {}", db.code().code(), db.message()),
        None => e.to_string(),
    }
}

pub type Result<T, E = BenchError> = std::result::Result<T, E>;
