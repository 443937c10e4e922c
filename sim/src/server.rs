//! `coderd-sim serve`: one replica. Several processes on one database act as replicas.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::Notify;

use crate::db::{self, DbError};
use crate::metrics::Metrics;
use crate::pubsub::listener::Listener;
use crate::pubsub::publisher::Publisher;
use crate::replica::{worker_id_for, Peer, Replica, Settings};
use crate::stream::state::StreamStates;

/// Why a replica could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("bind {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error("invalid --peers entry {0:?}: expected NAME=ADDR")]
    Peer(String),
}

/// Parses `NAME=ADDR,...` into peers keyed by the worker id each name derives to.
pub fn parse_peers(spec: &str) -> Result<HashMap<uuid::Uuid, Peer>, ServeError> {
    let mut peers = HashMap::new();
    for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        let (name, addr) = entry
            .split_once('=')
            .ok_or_else(|| ServeError::Peer(entry.into()))?;
        let peer = Peer {
            name: name.to_string(),
            addr: addr.to_string(),
        };
        peers.insert(worker_id_for(name), peer);
    }
    Ok(peers)
}

/// Starts the replica and serves until Ctrl-C or SIGTERM.
pub async fn serve(
    listen: &str,
    database_url: &str,
    settings: Settings,
    peers: HashMap<uuid::Uuid, Peer>,
) -> Result<(), ServeError> {
    let name = settings.name.clone();
    let pool = db::pool(database_url, &name, settings.db_pool_size).await?;
    let listener = Listener::start(db::config(database_url, &name)?).await?;
    let publisher = Publisher::start(db::config(database_url, &name)?, pool.clone()).await?;
    let tcp = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen.to_string(),
            source,
        })?;

    let replica = Arc::new(Replica {
        worker_id: worker_id_for(&name),
        settings,
        pool,
        listener,
        publisher,
        streams: Arc::new(StreamStates::default()),
        metrics: Metrics::new(),
        peers,
        worker_wake: Notify::new(),
    });
    if replica.settings.worker {
        tokio::spawn(crate::worker::run(replica.clone()));
    }
    tracing::info!(replica = %name, listen, worker.id = %replica.worker_id,
        framing = ?replica.settings.framing, stream_cache = replica.settings.stream_cache,
        "replica serving");

    let shutdown = shutdown_signal();
    tokio::pin!(shutdown);
    loop {
        let accepted = tokio::select! {
            accepted = tcp.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "accept failed");
                continue;
            }
        };
        let replica = replica.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req| {
                let replica = replica.clone();
                async move { Ok::<_, Infallible>(crate::api::handle(replica, req).await) }
            });
            let connection = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .with_upgrades();
            if let Err(e) = connection.await {
                tracing::debug!(client.addr = %peer, error = %e, "connection ended with error");
            }
        });
    }

    // Give the batcher two flush intervals, so notifies of writes that already committed
    // still go out (coderd flushes its batch on shutdown too).
    tracing::info!(replica = %name, "replica stopping");
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// Resolves on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => return std::future::pending().await,
            };
        tokio::select! {
            _ = interrupt => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}
