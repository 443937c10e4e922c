//! The shared LISTEN connection.
//!
//! A subscriber is registered before its channel is LISTENed, and `subscribe` returns only
//! after the LISTEN has completed, so everything published after `subscribe` returns reaches
//! it — the property the stream's "listen before you load" order depends on.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, Config, NoTls};

use super::{Delivery, Dropped};
use crate::db::DbError;

/// Notifications one subscriber may have waiting before it is told it dropped some.
const SUBSCRIBER_QUEUE: usize = 2048;
/// Reconnect backoff bounds of coderd's listener.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(60);

/// Failures to subscribe. The caller runs without pubsub, as coderd does.
#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("LISTEN connection is down")]
    Disconnected,
    #[error("LISTEN failed: {0}")]
    Listen(#[from] tokio_postgres::Error),
}

/// Handle to the process-wide listener.
#[derive(Clone)]
pub struct Listener {
    shared: Arc<Shared>,
}

struct Shared {
    /// Subscribers and the live client. A std mutex: it is never held across an await.
    state: Mutex<State>,
    /// Channels LISTENed on the current connection. The async lock also serializes LISTEN and
    /// UNLISTEN, so reference counting cannot race with the commands themselves.
    listening: tokio::sync::Mutex<HashSet<String>>,
}

#[derive(Default)]
struct State {
    client: Option<Arc<Client>>,
    channels: HashMap<String, HashMap<u64, mpsc::Sender<Delivery>>>,
    next_id: u64,
}

/// One local subscription. Dropping it unregisters, and UNLISTENs when it was the last.
pub struct Subscription {
    pub rx: mpsc::Receiver<Delivery>,
    channel: String,
    id: u64,
    shared: Arc<Shared>,
}

impl Listener {
    /// Connects and starts the task that owns the connection and reconnects it.
    pub async fn start(config: Config) -> Result<Listener, DbError> {
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            listening: tokio::sync::Mutex::new(HashSet::new()),
        });
        let (client, connection) = config.connect(NoTls).await?;
        shared.state.lock().expect("listener state").client = Some(Arc::new(client));
        tokio::spawn(supervise(shared.clone(), config, connection));
        Ok(Listener { shared })
    }

    /// Registers a subscriber on `channel` and makes sure the channel is LISTENed.
    pub async fn subscribe(&self, channel: &str) -> Result<Subscription, ListenError> {
        let mut listening = self.shared.listening.lock().await;
        let (tx, rx) = mpsc::channel(SUBSCRIBER_QUEUE);
        let (id, client) = {
            let mut state = self.shared.state.lock().expect("listener state");
            let client = state.client.clone().ok_or(ListenError::Disconnected)?;
            state.next_id += 1;
            let id = state.next_id;
            state
                .channels
                .entry(channel.to_string())
                .or_default()
                .insert(id, tx);
            (id, client)
        };
        let subscription = Subscription {
            rx,
            channel: channel.to_string(),
            id,
            shared: self.shared.clone(),
        };
        if !listening.contains(channel) {
            client
                .batch_execute(&format!("LISTEN {}", quote_ident(channel)))
                .await?;
            listening.insert(channel.to_string());
        }
        Ok(subscription)
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let now_empty = {
            let mut state = self.shared.state.lock().expect("listener state");
            match state.channels.get_mut(&self.channel) {
                Some(subs) => {
                    subs.remove(&self.id);
                    let empty = subs.is_empty();
                    if empty {
                        state.channels.remove(&self.channel);
                    }
                    empty
                }
                None => true,
            }
        };
        if now_empty {
            let shared = self.shared.clone();
            let channel = std::mem::take(&mut self.channel);
            tokio::spawn(async move { shared.unlisten_if_unused(&channel).await });
        }
    }
}

impl Shared {
    /// UNLISTENs a channel nobody subscribes to any more. Checked again under the lock: a new
    /// subscriber may have arrived since the last one left.
    async fn unlisten_if_unused(&self, channel: &str) {
        let mut listening = self.listening.lock().await;
        let client = {
            let state = self.state.lock().expect("listener state");
            if state.channels.contains_key(channel) || !listening.contains(channel) {
                return;
            }
            state.client.clone()
        };
        listening.remove(channel);
        if let Some(client) = client {
            let sql = format!("UNLISTEN {}", quote_ident(channel));
            if let Err(e) = client.batch_execute(&sql).await {
                tracing::debug!(channel, error = %e, "UNLISTEN failed");
            }
        }
    }

    /// Hands a notification to every subscriber of its channel. A subscriber whose queue is
    /// full is removed and told `Dropped` once there is room again; it must resubscribe.
    fn deliver(&self, channel: &str, payload: &str) {
        let mut state = self.state.lock().expect("listener state");
        let Some(subs) = state.channels.get_mut(channel) else {
            return;
        };
        subs.retain(|_, tx| match tx.try_send(Ok(payload.to_string())) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Closed(_)) => false,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(channel, "pubsub subscriber queue full, dropping it");
                let tx = tx.clone();
                tokio::spawn(async move { tx.send(Err(Dropped)).await });
                false
            }
        });
    }

    /// The connection is gone: every subscriber may have missed notifications.
    fn connection_lost(&self) {
        let mut state = self.state.lock().expect("listener state");
        state.client = None;
        for (_, subs) in state.channels.drain() {
            for (_, tx) in subs {
                tokio::spawn(async move { tx.send(Err(Dropped)).await });
            }
        }
    }
}

/// Drives the connection, delivers notifications, and reconnects with backoff when it ends.
async fn supervise(
    shared: Arc<Shared>,
    config: Config,
    mut connection: tokio_postgres::Connection<
        tokio_postgres::Socket,
        tokio_postgres::tls::NoTlsStream,
    >,
) {
    loop {
        let mut messages = futures_util::stream::poll_fn(|cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => shared.deliver(n.channel(), n.payload()),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(error = %e, "LISTEN connection failed");
                    break;
                }
            }
        }
        tracing::warn!("LISTEN connection lost; every stream subscriber is dropped");

        // Hold the LISTEN lock while reconnecting, so new subscribers wait for the new
        // connection instead of registering on the dead one.
        let mut listening = shared.listening.lock().await;
        shared.connection_lost();
        listening.clear();
        let mut backoff = BACKOFF_MIN;
        loop {
            tokio::time::sleep(backoff).await;
            match config.connect(NoTls).await {
                Ok((client, conn)) => {
                    shared.state.lock().expect("listener state").client = Some(Arc::new(client));
                    connection = conn;
                    tracing::info!("LISTEN connection re-established");
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64,
                        "LISTEN reconnect failed");
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Quotes a channel name as an identifier; `chat:stream:<uuid>` needs it for the colons.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
