//! chatcache: a sidecar proxy cache for coderd's chat message stream.
//!
//! It runs next to one coderd replica. Every client request passes through it to coderd
//! unchanged, except `GET /api/experimental/chats/{chat}/stream`, which it serves itself from a
//! per-chat in-memory cache of durable messages, reading Postgres only on a miss, a hole or a
//! full refresh.
//!
//! # Layout: one module per step of a subscription
//!
//! - [`config`]: TOML → typed, validated config; env overrides; the reloadable subset.
//! - [`proxy`]: the client listener; routes the stream to [`stream`], the rest to coderd.
//! - [`route`]: what counts as the stream route; coderd's errors for bad input.
//! - [`authz`]: asks coderd whether the client's credentials may read the chat.
//! - [`cache`]: the `DashMap` of chats, the byte budget, repair/refresh/reload reads.
//! - [`chat`]: one chat's state and subscribers; [`ring`]: its messages and what is proven.
//! - [`feed`]: one upstream stream per chat from coderd, and the chat's lifecycle.
//! - [`listen`]: the LISTEN connection, the ledger of announced messages.
//! - [`db`] and [`render`]: the catch-up query and row → `ChatMessage` JSON.
//! - [`stream`]: one subscriber: handshake, snapshot, live loop, framing, pings, overflow.
//! - [`wire`]: Go-compatible JSON escaping, error bodies, frames.
//! - [`metrics`] and [`admin`]: Prometheus metrics; `/live`, `/ready`, `/metrics`.

pub mod admin;
pub mod authz;
pub mod cache;
pub mod chat;
pub mod config;
pub mod db;
pub mod feed;
pub mod listen;
pub mod metrics;
pub mod proxy;
pub mod render;
pub mod ring;
pub mod route;
pub mod stream;
pub mod wire;

use std::net::SocketAddr;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::authz::Authz;
use crate::cache::Cache;
use crate::config::{Config, Framing};
use crate::feed::FeedContext;
use crate::listen::Listener;
use crate::metrics::Metrics;
use crate::proxy::PassClient;

/// Everything a request handler needs; one per process.
pub struct App {
    config: RwLock<Arc<Config>>,
    pub framing: Framing,
    pub upstream_authority: String,
    pub cache: Arc<Cache>,
    pub listener: Listener,
    pub authz: Arc<Authz>,
    pub feed: Arc<FeedContext>,
    pub pass: PassClient,
    pub metrics: Metrics,
    /// Flips to true on SIGTERM: listeners stop, subscribers get 1001.
    pub shutdown: watch::Sender<bool>,
    pub ready: AtomicBool,
}

impl App {
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies the reloadable part of a new config; reports the fields that need a restart.
    pub fn reload(&self, new: Config) -> Vec<&'static str> {
        let old = self.config();
        let mut ignored = Vec::new();
        if new.listen_addr != old.listen_addr {
            ignored.push("listen_addr");
        }
        if new.admin_addr != old.admin_addr {
            ignored.push("admin_addr");
        }
        if new.upstream_url != old.upstream_url {
            ignored.push("upstream_url");
        }
        if new.database_url != old.database_url {
            ignored.push("database_url");
        }
        if new.framing != old.framing {
            ignored.push("framing");
        }
        if new.db != old.db {
            ignored.push("db");
        }
        if new.log_format != old.log_format {
            ignored.push("log_format");
        }
        if new.authz.timeout_ms != old.authz.timeout_ms {
            ignored.push("authz.timeout_ms");
        }
        if new.feed.connect_timeout_ms != old.feed.connect_timeout_ms {
            ignored.push("feed.connect_timeout_ms");
        }
        self.cache.set_limits(new.cache.clone());
        self.authz.set_ttl(Duration::from_millis(new.authz.ttl_ms));
        *self.feed.linger.write().unwrap_or_else(|e| e.into_inner()) =
            Duration::from_millis(new.feed.linger_ms);
        let mut kept = new;
        kept.listen_addr = old.listen_addr;
        kept.admin_addr = old.admin_addr;
        kept.upstream_url = old.upstream_url.clone();
        kept.database_url = old.database_url.clone();
        kept.framing = old.framing;
        kept.db = old.db.clone();
        kept.log_format = old.log_format;
        kept.authz.timeout_ms = old.authz.timeout_ms;
        kept.feed.connect_timeout_ms = old.feed.connect_timeout_ms;
        *self.config.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(kept);
        ignored
    }
}

/// Resolves once shutdown has begun (or the sender is gone).
pub async fn shutdown_started(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Why the sidecar could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] db::DbError),
}

/// A started sidecar.
pub struct Running {
    pub app: Arc<App>,
    pub listen_addr: SocketAddr,
    pub admin_addr: SocketAddr,
    /// Ends when the client listener has drained after shutdown.
    pub proxy: tokio::task::JoinHandle<()>,
}

/// Binds both listeners and starts every task. Postgres need not be up: streams fail open
/// until it is.
pub async fn start(config: Config) -> Result<Running, StartError> {
    let bind = |what: &'static str, addr: SocketAddr| async move {
        TcpListener::bind(addr)
            .await
            .map_err(|source| StartError::Bind { what, addr, source })
    };
    let client_listener = bind("listen_addr", config.listen_addr).await?;
    let admin_listener = bind("admin_addr", config.admin_addr).await?;
    let listen_addr = client_listener.local_addr().expect("bound socket");
    let admin_addr = admin_listener.local_addr().expect("bound socket");

    let metrics = Metrics::new();
    let pool = db::connect(
        &config.database_url,
        config.db.pool_max_size,
        Duration::from_millis(config.db.connect_timeout_ms),
    )
    .await?;
    let cache = Cache::new(pool, metrics.clone(), config.framing, config.cache.clone());
    let listener = Listener::start(config.database_url.clone(), cache.clone());
    let upstream_authority = config.upstream_authority();
    let authz = Authz::new(
        config.upstream_url.trim_end_matches('/').to_string(),
        metrics.clone(),
        Duration::from_millis(config.authz.ttl_ms),
        Duration::from_millis(config.authz.timeout_ms),
    );
    let feed = Arc::new(FeedContext {
        cache: cache.clone(),
        listener: listener.clone(),
        upstream: upstream_authority.clone(),
        framing: config.framing,
        connect_timeout: Duration::from_millis(config.feed.connect_timeout_ms),
        linger: RwLock::new(Duration::from_millis(config.feed.linger_ms)),
    });
    let pass = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .pool_idle_timeout(Duration::from_secs(30))
        .build_http();
    let app = Arc::new(App {
        framing: config.framing,
        config: RwLock::new(Arc::new(config)),
        upstream_authority,
        cache,
        listener,
        authz,
        feed,
        pass,
        metrics,
        shutdown: watch::channel(false).0,
        ready: AtomicBool::new(false),
    });
    tokio::spawn(admin::serve(app.clone(), admin_listener));
    let proxy = tokio::spawn(proxy::serve(app.clone(), client_listener));
    tracing::info!(%listen_addr, %admin_addr, upstream = %app.upstream_authority, "chatcache started");
    Ok(Running {
        app,
        listen_addr,
        admin_addr,
        proxy,
    })
}
