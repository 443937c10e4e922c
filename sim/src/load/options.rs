//! The `chatload run` command line.

use std::time::Duration;

use super::LoadError;

/// Connection string used when neither `--database-url` nor `DATABASE_URL` is given.
const DEFAULT_DATABASE_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";

/// Options of `chatload run`. Field docs double as `--help` text.
#[derive(Debug, Clone, clap::Args)]
pub struct RunOptions {
    /// coderd bases (`http://host:port`), comma separated; subscribers and turns rotate over them.
    #[arg(long, value_delimiter = ',', required = true)]
    pub targets: Vec<String>,

    /// Seed file written by `coderd-sim seed`.
    #[arg(long)]
    pub seed_file: String,

    /// Turns to drive per chat.
    #[arg(long)]
    pub turns: u32,

    /// WebSocket subscribers per chat.
    #[arg(long)]
    pub subscribers_per_chat: u32,

    /// After each turn, every subscriber closes and reconnects with after_id = its last held id.
    #[arg(long)]
    pub reconnect_each_turn: bool,

    /// Every K-th turn (K, 2K, ...) edits the newest visible user message instead of sending one.
    #[arg(long, value_name = "K")]
    pub edit_every: Option<u32>,

    /// Stream framing the targets speak.
    #[arg(long, value_enum, default_value_t = Framing::Envelope)]
    pub framing: Framing,

    /// Postgres of the targets [default: env DATABASE_URL, else postgres://postgres@127.0.0.1:5432/postgres].
    #[arg(long)]
    pub database_url: Option<String>,

    /// Drive only the first N chats of the seed file.
    #[arg(long, value_name = "N")]
    pub chats: Option<usize>,

    /// Chats driven at once [default: all].
    #[arg(long, value_name = "C")]
    pub concurrency: Option<usize>,

    /// How long one turn may take, from sending it until every subscriber holds the history.
    #[arg(long, default_value_t = 30_000)]
    pub turn_timeout_ms: u64,

    /// Extra Prometheus pages whose message-read counters are reported with the targets' own
    /// (for instance a sidecar's admin `http://host:port/metrics`), comma separated.
    #[arg(long, value_delimiter = ',', value_name = "URL")]
    pub scrape: Vec<String>,

    /// Also write the report as JSON to this file.
    #[arg(long, value_name = "OUT")]
    pub json: Option<String>,
}

/// How the targets frame stream events (protocol doc 4.5 and 4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Framing {
    /// `{"type":"data","data":[events]}` per frame (the March 2026 target).
    Envelope,
    /// The bare `[events]` array per frame (April 2026 on).
    Array,
}

/// One coderd replica (or sidecar in front of one) that chatload talks to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// `http://host:port`, without a trailing slash; REST calls go here.
    pub http_base: String,
    /// `ws://host:port`; stream subscriptions go here.
    pub ws_base: String,
}

impl Target {
    /// Parses a `http://host:port` base. TLS is not supported: chatload only talks to loopback.
    pub fn parse(raw: &str) -> Result<Self, LoadError> {
        let trimmed = raw.trim().trim_end_matches('/');
        let Some(authority) = trimmed.strip_prefix("http://") else {
            return Err(LoadError::Usage(format!(
                "target {raw:?} must start with http:// (https is not supported)"
            )));
        };
        if authority.is_empty() || authority.contains('/') {
            return Err(LoadError::Usage(format!(
                "target {raw:?} must be http://host:port"
            )));
        }
        Ok(Target {
            http_base: trimmed.to_owned(),
            ws_base: format!("ws://{authority}"),
        })
    }
}

impl RunOptions {
    /// Checks what clap cannot and returns the parsed targets.
    pub fn targets(&self) -> Result<Vec<Target>, LoadError> {
        let targets = self
            .targets
            .iter()
            .filter(|raw| !raw.trim().is_empty())
            .map(|raw| Target::parse(raw))
            .collect::<Result<Vec<_>, _>>()?;
        if targets.is_empty() {
            return Err(LoadError::Usage("--targets names no target".into()));
        }
        if self.subscribers_per_chat == 0 {
            return Err(LoadError::Usage(
                "--subscribers-per-chat must be at least 1".into(),
            ));
        }
        if self.edit_every == Some(0) {
            return Err(LoadError::Usage("--edit-every must be at least 1".into()));
        }
        if self.concurrency == Some(0) {
            return Err(LoadError::Usage("--concurrency must be at least 1".into()));
        }
        if self.turn_timeout_ms == 0 {
            return Err(LoadError::Usage(
                "--turn-timeout-ms must be positive".into(),
            ));
        }
        Ok(targets)
    }

    /// The Postgres connection string: the option, else `DATABASE_URL`, else the local default.
    pub fn database_url(&self) -> String {
        self.database_url
            .clone()
            .or_else(|| {
                std::env::var("DATABASE_URL")
                    .ok()
                    .filter(|url| !url.is_empty())
            })
            .unwrap_or_else(|| DEFAULT_DATABASE_URL.to_owned())
    }

    /// The per-turn time budget.
    pub fn turn_timeout(&self) -> Duration {
        Duration::from_millis(self.turn_timeout_ms)
    }

    /// Whether turn `k` (0-based) edits instead of sending a new message.
    pub fn is_edit_turn(&self, k: u32) -> bool {
        matches!(self.edit_every, Some(every) if k > 0 && k.is_multiple_of(every))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_keeps_host_and_port() {
        let target = Target::parse("http://127.0.0.1:8080/").unwrap();
        assert_eq!(target.http_base, "http://127.0.0.1:8080");
        assert_eq!(target.ws_base, "ws://127.0.0.1:8080");
    }

    #[test]
    fn target_rejects_tls_and_paths() {
        assert!(Target::parse("https://127.0.0.1:8080").is_err());
        assert!(Target::parse("http://127.0.0.1:8080/api").is_err());
        assert!(Target::parse("127.0.0.1:8080").is_err());
    }
}
