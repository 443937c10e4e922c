//! Configuration: TOML file → typed, validated [`Config`].
//!
//! Every field has a default (one place: the `Default` impls below), names carry their unit
//! (`_ms`, `_bytes`), and unknown fields are an error so that a typo never silently falls back to
//! a default. Four environment variables override the file because scripts and Kubernetes set
//! them per pod: `CHATCACHE_LISTEN_ADDR`, `CHATCACHE_ADMIN_ADDR`, `CHATCACHE_UPSTREAM_URL` and
//! `CHATCACHE_DATABASE_URL`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Why a configuration could not be used. Always the operator's to fix.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("config field `{field}` is invalid: {reason}")]
    Invalid { field: &'static str, reason: String },
}

/// Which stream framing coderd speaks (protocol doc 4.5 and 4.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Framing {
    /// `{"type":"data","data":[...]}` per frame: coderd of March 2026, the target.
    Envelope,
    /// A bare JSON array per frame: coderd from April 2026 (PR #24148).
    Array,
}

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

/// The whole configuration of one sidecar.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Where clients connect: the port the Kubernetes Service points at.
    pub listen_addr: SocketAddr,
    /// Health and metrics; kept off the client port so probes never mix with traffic.
    pub admin_addr: SocketAddr,
    /// The local coderd replica, normally on loopback in the same pod.
    pub upstream_url: String,
    /// coderd's Postgres. A secret: prefer `CHATCACHE_DATABASE_URL` or `database_url_file`.
    pub database_url: String,
    /// A file holding the database URL (a mounted Kubernetes Secret); wins over `database_url`.
    pub database_url_file: Option<PathBuf>,
    /// The framing coderd speaks and chatcache serves.
    pub framing: Framing,
    pub log_format: LogFormat,
    /// A `tracing` filter such as `info` or `chatcache=debug,info`; reloadable.
    pub log_level: String,
    /// How long proxied requests may finish after SIGTERM before the process exits.
    pub shutdown_grace_ms: u64,
    pub cache: CacheConfig,
    pub feed: FeedConfig,
    pub authz: AuthzConfig,
    pub stream: StreamConfig,
    pub db: DbConfig,
}

/// Memory bounds of the message cache; all reloadable.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CacheConfig {
    /// Messages kept per chat; older ones are trimmed by raising the chat's floor.
    pub max_messages_per_chat: usize,
    /// Bytes of message JSON kept per chat.
    pub max_bytes_per_chat: usize,
    /// Bytes of message JSON kept over all chats; idle chats are evicted first.
    pub max_bytes: usize,
    /// How long an announced message may be missing before a database read repairs it.
    pub hole_grace_ms: u64,
    /// How long a message from coderd's stream is held after its announcement, so that a
    /// lower id announced by another replica's notify batch (flushed every 50 ms) is still
    /// delivered first. 0 delivers at once and may deliver such a message late.
    pub order_settle_ms: u64,
    /// Release a message from coderd's stream only after a database read has proven that no
    /// lower id is missing: strict id order even when Postgres notifies lag by seconds, for
    /// one coalesced read per chat per burst of messages. Off, ordering relies on
    /// `order_settle_ms` and a lagging lower id is delivered late instead.
    pub order_proof: bool,
}

/// The shared upstream stream per chat.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FeedConfig {
    /// How long a chat's feed and cache stay warm after its last subscriber left.
    pub linger_ms: u64,
    /// Budget for opening the upstream WebSocket.
    pub connect_timeout_ms: u64,
}

/// Asking coderd whether credentials may read a chat.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthzConfig {
    /// How long a positive answer is reused; also the longest a revoked token keeps streaming
    /// access to a chat it could read before.
    pub ttl_ms: u64,
    /// Budget for coderd's answer.
    pub timeout_ms: u64,
}

/// One subscriber's stream.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StreamConfig {
    /// WebSocket ping control frames, as coderd sends them.
    pub ping_interval_ms: u64,
    /// Events queued for one subscriber before it is closed as too slow.
    pub subscriber_queue_events: usize,
}

/// The Postgres pool used for catch-up, repair and refresh reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DbConfig {
    pub pool_max_size: u32,
    pub connect_timeout_ms: u64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen_addr: "0.0.0.0:8080".parse().expect("static address"),
            admin_addr: "0.0.0.0:9090".parse().expect("static address"),
            upstream_url: "http://127.0.0.1:3000".to_string(),
            database_url: "postgres://postgres@127.0.0.1:5432/coder".to_string(),
            database_url_file: None,
            framing: Framing::Envelope,
            log_format: LogFormat::Text,
            log_level: "info".to_string(),
            shutdown_grace_ms: 30_000,
            cache: CacheConfig::default(),
            feed: FeedConfig::default(),
            authz: AuthzConfig::default(),
            stream: StreamConfig::default(),
            db: DbConfig::default(),
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            max_messages_per_chat: 2048,
            max_bytes_per_chat: 4 << 20,
            max_bytes: 256 << 20,
            hole_grace_ms: 250,
            order_settle_ms: 75,
            order_proof: true,
        }
    }
}

impl Default for FeedConfig {
    fn default() -> Self {
        Self {
            linger_ms: 30_000,
            connect_timeout_ms: 5_000,
        }
    }
}

impl Default for AuthzConfig {
    fn default() -> Self {
        Self {
            ttl_ms: 5_000,
            timeout_ms: 5_000,
        }
    }
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            ping_interval_ms: 15_000,
            subscriber_queue_events: 1024,
        }
    }
}

impl Default for DbConfig {
    fn default() -> Self {
        Self {
            pool_max_size: 4,
            connect_timeout_ms: 5_000,
        }
    }
}

/// A bad URL that came from the environment is named by its variable too, so the operator does
/// not look for it in a file that is fine.
fn name_env_source(error: ConfigError) -> ConfigError {
    let from_env = |name: &str| std::env::var_os(name).is_some();
    match error {
        ConfigError::Invalid { field, reason }
            if field == "upstream_url" && from_env("CHATCACHE_UPSTREAM_URL") =>
        {
            ConfigError::Invalid {
                field: "upstream_url (CHATCACHE_UPSTREAM_URL)",
                reason,
            }
        }
        ConfigError::Invalid { field, reason }
            if field == "database_url" && from_env("CHATCACHE_DATABASE_URL") =>
        {
            ConfigError::Invalid {
                field: "database_url (CHATCACHE_DATABASE_URL)",
                reason,
            }
        }
        other => other,
    }
}

impl Config {
    /// Reads a file, applies the environment overrides and validates the result.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let mut config = Self::parse(&text, path)?;
        config.apply_env(|name| std::env::var(name).ok())?;
        config.resolve_secret_file()?;
        config.validate().map_err(name_env_source)?;
        Ok(config)
    }

    /// Embedded defaults plus the environment: what `chatcache` runs with when given no file.
    pub fn from_env() -> Result<Self, ConfigError> {
        let mut config = Self::default();
        config.apply_env(|name| std::env::var(name).ok())?;
        config.validate().map_err(name_env_source)?;
        Ok(config)
    }

    pub fn parse(text: &str, path: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// Applies the four documented overrides; `lookup` is the environment.
    pub fn apply_env(
        &mut self,
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(), ConfigError> {
        if let Some(v) = lookup("CHATCACHE_LISTEN_ADDR") {
            self.listen_addr = parse_addr("listen_addr (CHATCACHE_LISTEN_ADDR)", &v)?;
        }
        if let Some(v) = lookup("CHATCACHE_ADMIN_ADDR") {
            self.admin_addr = parse_addr("admin_addr (CHATCACHE_ADMIN_ADDR)", &v)?;
        }
        if let Some(v) = lookup("CHATCACHE_UPSTREAM_URL") {
            self.upstream_url = v;
        }
        if let Some(v) = lookup("CHATCACHE_DATABASE_URL") {
            self.database_url = v;
            self.database_url_file = None;
        }
        Ok(())
    }

    fn resolve_secret_file(&mut self) -> Result<(), ConfigError> {
        if let Some(path) = &self.database_url_file {
            let url = std::fs::read_to_string(path).map_err(|e| ConfigError::Invalid {
                field: "database_url_file",
                reason: format!("cannot read {}: {e}", path.display()),
            })?;
            self.database_url = url.trim().to_string();
        }
        Ok(())
    }

    /// Checks every value that parsing alone cannot, naming the field at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let url = self
            .upstream_url
            .parse::<http::Uri>()
            .map_err(|e| ConfigError::Invalid {
                field: "upstream_url",
                reason: e.to_string(),
            })?;
        if url.scheme_str() != Some("http") || url.authority().is_none() {
            return Err(invalid("upstream_url", "must be an http://host:port URL"));
        }
        let plain = !url.authority().is_some_and(|a| a.as_str().contains('@'))
            && matches!(url.path(), "" | "/")
            && url.query().is_none();
        if !plain {
            return Err(invalid(
                "upstream_url",
                "must be http://host:port, without user info, path or query",
            ));
        }
        match self.database_url.parse::<tokio_postgres::Config>() {
            Ok(db) if db.get_hosts().is_empty() => {
                return Err(invalid("database_url", "not a Postgres URL with a host"));
            }
            Ok(db) => {
                use tokio_postgres::config::SslMode;
                if !matches!(db.get_ssl_mode(), SslMode::Disable | SslMode::Prefer) {
                    return Err(invalid(
                        "database_url",
                        "TLS to Postgres is not supported: sslmode must be disable or prefer",
                    ));
                }
            }
            Err(_) => return Err(invalid("database_url", "not a Postgres URL with a host")),
        }
        if !valid_log_filter(&self.log_level) {
            return Err(invalid(
                "log_level",
                "not a filter of levels, e.g. \"info\" or \"chatcache=debug,info\"",
            ));
        }
        let positive: [(&'static str, u64); 8] = [
            (
                "cache.max_messages_per_chat",
                self.cache.max_messages_per_chat as u64,
            ),
            (
                "cache.max_bytes_per_chat",
                self.cache.max_bytes_per_chat as u64,
            ),
            ("cache.max_bytes", self.cache.max_bytes as u64),
            ("feed.connect_timeout_ms", self.feed.connect_timeout_ms),
            ("authz.timeout_ms", self.authz.timeout_ms),
            ("stream.ping_interval_ms", self.stream.ping_interval_ms),
            (
                "stream.subscriber_queue_events",
                self.stream.subscriber_queue_events as u64,
            ),
            ("db.pool_max_size", self.db.pool_max_size as u64),
        ];
        for (field, value) in positive {
            if value == 0 {
                return Err(invalid(field, "must be greater than 0"));
            }
        }
        if self.cache.max_bytes < self.cache.max_bytes_per_chat {
            return Err(invalid(
                "cache.max_bytes",
                "must be at least cache.max_bytes_per_chat",
            ));
        }
        Ok(())
    }

    /// The effective configuration as TOML, with the database password hidden.
    pub fn redacted_toml(&self) -> String {
        let mut shown = self.clone();
        shown.database_url = redact_url(&self.database_url);
        toml::to_string(&shown).unwrap_or_else(|e| format!("# cannot render config: {e}\n"))
    }

    pub fn upstream_authority(&self) -> String {
        self.upstream_url
            .parse::<http::Uri>()
            .ok()
            .and_then(|u| u.authority().map(|a| a.to_string()))
            .unwrap_or_default()
    }

    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_millis(self.shutdown_grace_ms)
    }
}

fn invalid(field: &'static str, reason: &str) -> ConfigError {
    ConfigError::Invalid {
        field,
        reason: reason.to_string(),
    }
}

fn parse_addr(field: &'static str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| ConfigError::Invalid {
        field,
        reason: format!("{value:?} is not an address like 0.0.0.0:8080"),
    })
}

/// A `tracing` filter whose every directive names a level: `level` or `target=level`.
/// (`EnvFilter` itself accepts any word as a target, which would silently turn logging off.)
fn valid_log_filter(filter: &str) -> bool {
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    let directives: Vec<&str> = filter.split(',').map(str::trim).collect();
    !filter.trim().is_empty()
        && directives.iter().all(|d| {
            let level = d.rsplit_once('=').map_or(*d, |(target, level)| {
                if target.is_empty() || target.contains(char::is_whitespace) {
                    ""
                } else {
                    level
                }
            });
            LEVELS.contains(&level.to_ascii_lowercase().as_str())
        })
        && filter.parse::<tracing_subscriber::EnvFilter>().is_ok()
}

/// Hides the password of a `postgres://user:password@host/db` URL (also a `password=` query
/// parameter) or a `password=` key.
pub fn redact_url(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        // The password may hold `?`, `/` or `@` unencoded: user info is whatever precedes the
        // last `@`, which hides too much rather than too little.
        let rest = match rest.rfind('@') {
            Some(at) if rest[..at].contains(':') => {
                let user = rest[..at].split(':').next().unwrap_or("");
                format!("{user}:REDACTED@{}", &rest[at + 1..])
            }
            _ => rest.to_string(),
        };
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r.to_string(), Some(q)),
            None => (rest.clone(), None),
        };
        let query = query.map(|q| {
            let pairs: Vec<&str> = q
                .split('&')
                .map(|kv| {
                    if kv.starts_with("password=") {
                        "password=REDACTED"
                    } else {
                        kv
                    }
                })
                .collect();
            format!("?{}", pairs.join("&"))
        });
        return format!("{scheme}://{rest}{}", query.unwrap_or_default());
    }
    // key=value form: a value may be quoted ('a b', with \' inside).
    let Some(start) = url.find("password=") else {
        return url.to_string();
    };
    let value = &url[start + "password=".len()..];
    let end = if let Some(quoted) = value.strip_prefix('\'') {
        let mut escaped = false;
        let close = quoted.char_indices().find(|&(_, c)| {
            let closes = c == '\'' && !escaped;
            escaped = c == '\\' && !escaped;
            closes
        });
        close.map_or(value.len(), |(i, _)| i + 2)
    } else {
        value.find(char::is_whitespace).unwrap_or(value.len())
    };
    let after = redact_url(&value[end..]);
    format!("{}password=REDACTED{after}", &url[..start])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    /// The shipped config.toml documents exactly the defaults.
    #[test]
    fn shipped_config_is_the_defaults() {
        let shipped = Config::parse(include_str!("../config.toml"), Path::new("config.toml"));
        assert_eq!(
            shipped.unwrap().redacted_toml(),
            Config::default().redacted_toml()
        );
    }

    #[test]
    fn unknown_field_names_the_field() {
        let err = Config::parse("listen_adr = \"1.2.3.4:1\"", Path::new("x.toml")).unwrap_err();
        assert!(err.to_string().contains("listen_adr"), "{err}");
    }

    #[test]
    fn zero_limit_is_rejected_with_its_name() {
        let mut c = Config::default();
        c.cache.max_messages_per_chat = 0;
        let err = c.validate().unwrap_err().to_string();
        assert!(err.contains("cache.max_messages_per_chat"), "{err}");
    }

    #[test]
    fn log_filters_must_name_levels_and_urls_a_host() {
        for ok in [
            "info",
            "chatcache=debug,info",
            "WARN",
            "hyper=off,chatcache=trace",
        ] {
            assert!(valid_log_filter(ok), "{ok}");
        }
        for bad in ["", "nonsense level", "chatcache=verbose", "=info", "info,"] {
            assert!(!valid_log_filter(bad), "{bad}");
        }
        let c = Config {
            database_url: String::new(),
            ..Config::default()
        };
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("database_url"));
    }

    #[test]
    fn env_overrides_file() {
        let mut c = Config::parse("listen_addr = \"127.0.0.1:1\"", Path::new("x")).unwrap();
        c.apply_env(|k| (k == "CHATCACHE_LISTEN_ADDR").then(|| "127.0.0.1:2".to_string()))
            .unwrap();
        assert_eq!(c.listen_addr.port(), 2);
        let err = c.apply_env(|k| (k == "CHATCACHE_ADMIN_ADDR").then(|| "nope".into()));
        assert!(err
            .unwrap_err()
            .to_string()
            .contains("CHATCACHE_ADMIN_ADDR"));
    }

    #[test]
    fn awkward_passwords_are_redacted() {
        for (url, secret) in [
            ("postgres://u:p?ss@127.0.0.1/coder", "ss@"),
            ("postgres://u:p@ss@host/db", "ss@"),
            ("postgres://u:p/ss@host/db", "p/ss"),
            ("host=h password='a b' user=u", "b'"),
            ("host=h password='it\\'s secret' dbname=x", "secret"),
            ("password=x host=h password=y", "=y"),
        ] {
            let shown = redact_url(url);
            assert!(!shown.contains(secret), "{url} shown as {shown}");
            assert!(shown.contains("REDACTED"), "{shown}");
        }
        assert_eq!(
            redact_url("host=h password='a b' user=u"),
            "host=h password=REDACTED user=u"
        );
        assert_eq!(
            redact_url("postgres://u:p?ss@127.0.0.1/coder?sslmode=disable"),
            "postgres://u:REDACTED@127.0.0.1/coder?sslmode=disable"
        );
    }

    #[test]
    fn password_is_redacted() {
        assert_eq!(
            redact_url("postgres://u:secret@h/db"),
            "postgres://u:REDACTED@h/db"
        );
        assert_eq!(
            redact_url("host=h password=secret"),
            "host=h password=REDACTED"
        );
        let c = Config {
            database_url: "postgres://u:hunter2@h/db".into(),
            ..Config::default()
        };
        assert!(!c.redacted_toml().contains("hunter2"));
    }
}
