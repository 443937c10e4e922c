//! The batching publisher.
//!
//! coderd publishes chat notifies through a batcher: every 50 ms, all queued notifies go out
//! in one transaction on a dedicated connection. The delay is what lets notifies of two
//! replicas overtake each other, which the #23218 cache hole (and the sidecar's defences
//! against it) depend on, so it is reproduced rather than optimised away.

use std::time::Duration;

use tokio::sync::mpsc;
use tokio_postgres::Config;

use crate::db::{self, DbError, Pool};

const FLUSH_INTERVAL: Duration = Duration::from_millis(50);
const QUEUE_SIZE: usize = 8192;
/// How long a publish waits for room in a full queue before taking the direct path.
const PRESSURE_WAIT: Duration = Duration::from_millis(10);

/// One notify waiting for its batch.
struct Pending {
    channel: String,
    payload: String,
}

/// Handle to the replica's publisher. Publish only after the data transaction committed.
#[derive(Clone)]
pub struct Publisher {
    queue: mpsc::Sender<Pending>,
    pool: Pool,
}

impl Publisher {
    /// Opens the dedicated sender connection and starts the flush task.
    pub async fn start(config: Config, pool: Pool) -> Result<Publisher, DbError> {
        let client = db::connect(&config).await?;
        let (queue, rx) = mpsc::channel(QUEUE_SIZE);
        tokio::spawn(flush_loop(client, config, pool.clone(), rx));
        Ok(Publisher { queue, pool })
    }

    /// Queues a notify for the next batch; under pressure it is sent directly instead.
    pub async fn publish(&self, channel: String, payload: String) {
        let pending = Pending { channel, payload };
        if let Err(e) = self.queue.send_timeout(pending, PRESSURE_WAIT).await {
            let pending = match e {
                mpsc::error::SendTimeoutError::Timeout(p) => p,
                mpsc::error::SendTimeoutError::Closed(p) => p,
            };
            tracing::warn!(channel = %pending.channel, "notify batch queue full, publishing directly");
            publish_direct(&self.pool, &pending).await;
        }
    }
}

/// Sends one notify outside any batch, on a pooled connection.
async fn publish_direct(pool: &Pool, pending: &Pending) {
    let result = async {
        let conn = pool.get().await?;
        conn.execute(
            "SELECT pg_notify($1, $2)",
            &[&pending.channel, &pending.payload],
        )
        .await?;
        Ok::<(), DbError>(())
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(channel = %pending.channel, error = %e, "direct notify failed");
    }
}

/// Every 50 ms, sends what has queued up as one transaction. A failed batch falls back to
/// the direct path, notify by notify, and the sender connection is reopened.
async fn flush_loop(
    mut client: tokio_postgres::Client,
    config: Config,
    pool: Pool,
    mut rx: mpsc::Receiver<Pending>,
) {
    let mut ticker = tokio::time::interval(FLUSH_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::new();
    loop {
        ticker.tick().await;
        loop {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    if !batch.is_empty() {
                        let _ = send_batch(&mut client, &batch).await;
                    }
                    return;
                }
            }
        }
        if batch.is_empty() {
            continue;
        }
        if let Err(e) = send_batch(&mut client, &batch).await {
            tracing::warn!(error = %e, notifies = batch.len(), "notify batch failed, publishing directly");
            for pending in &batch {
                publish_direct(&pool, pending).await;
            }
            if client.is_closed() {
                match db::connect(&config).await {
                    Ok(c) => client = c,
                    Err(e) => tracing::warn!(error = %e, "notify sender reconnect failed"),
                }
            }
        }
        batch.clear();
    }
}

async fn send_batch(
    client: &mut tokio_postgres::Client,
    batch: &[Pending],
) -> Result<(), tokio_postgres::Error> {
    let tx = client.transaction().await?;
    for pending in batch {
        tx.execute(
            "SELECT pg_notify($1, $2)",
            &[&pending.channel, &pending.payload],
        )
        .await?;
    }
    tx.commit().await
}
