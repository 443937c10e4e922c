//! The LISTEN connection: one dedicated tokio-postgres connection (a pool cannot deliver
//! notifications) that LISTENs on `chat:stream:{id}` for every cached chat.
//!
//! Notifies are the ledger of the cache: every `after_message_id` announces one message from
//! any replica, and `full_refresh` says an edit rewrote the history. When the connection drops,
//! notifies may have been missed, so after reconnecting every cached chat is reloaded.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_postgres::{AsyncMessage, NoTls};
use uuid::Uuid;

use crate::cache::Cache;

const CHANNEL_PREFIX: &str = "chat:stream:";
/// The longest wait between LISTEN connection attempts. While LISTEN is down new streams fail
/// open to coderd, so a short cap keeps that window close to the outage itself; one connection
/// attempt every few seconds costs Postgres nothing.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ListenError {
    #[error("the LISTEN connection to Postgres is down")]
    Down,
    #[error("LISTEN failed: {0}")]
    Postgres(#[from] tokio_postgres::Error),
}

enum Command {
    Listen(Uuid, oneshot::Sender<Result<(), ListenError>>),
    Unlisten(Uuid),
}

/// A handle to the LISTEN task.
#[derive(Clone)]
pub struct Listener {
    commands: mpsc::UnboundedSender<Command>,
    up: watch::Receiver<bool>,
}

/// The part of a `ChatStreamNotifyMessage` the cache acts on; other fields are accepted and
/// left to coderd's stream.
#[derive(Debug, Default, Deserialize)]
pub struct Notify {
    #[serde(default)]
    pub after_message_id: Option<i64>,
    #[serde(default)]
    pub full_refresh: Option<bool>,
}

/// Parses a notify payload; an error means coderd sent something this version does not know.
pub fn parse_notify(payload: &str) -> Result<Notify, serde_json::Error> {
    serde_json::from_str(payload)
}

/// The chat a channel belongs to, if it is a chat stream channel.
pub fn channel_chat(channel: &str) -> Option<Uuid> {
    channel.strip_prefix(CHANNEL_PREFIX)?.parse().ok()
}

impl Listener {
    /// Starts the LISTEN task; it reconnects on its own with backoff from 1 s to
    /// [`MAX_BACKOFF`].
    pub fn start(database_url: String, cache: Arc<Cache>) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        let (up_tx, up) = watch::channel(false);
        tokio::spawn(run(database_url, cache, rx, up_tx));
        Self { commands, up }
    }

    pub fn is_up(&self) -> bool {
        *self.up.borrow()
    }

    /// LISTENs on the chat's channel; returns once Postgres confirmed it.
    pub async fn listen(&self, chat: Uuid) -> Result<(), ListenError> {
        if !self.is_up() {
            return Err(ListenError::Down);
        }
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Listen(chat, tx))
            .map_err(|_| ListenError::Down)?;
        rx.await.map_err(|_| ListenError::Down)?
    }

    pub fn unlisten(&self, chat: Uuid) {
        let _ = self.commands.send(Command::Unlisten(chat));
    }
}

fn quoted_channel(chat: Uuid) -> String {
    format!("\"{CHANNEL_PREFIX}{chat}\"")
}

async fn run(
    url: String,
    cache: Arc<Cache>,
    mut commands: mpsc::UnboundedReceiver<Command>,
    up: watch::Sender<bool>,
) {
    // LISTENs per chat: a chat that leaves the cache while a new entry for it is starting must
    // not UNLISTEN the channel under the new entry.
    let mut channels: HashMap<Uuid, usize> = HashMap::new();
    let mut backoff = Duration::from_secs(1);
    let mut connected_before = false;
    loop {
        let mut config: tokio_postgres::Config = match url.parse() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(error = %e, "database URL is invalid; LISTEN disabled");
                return;
            }
        };
        config.application_name("chatcache-listen");
        config.connect_timeout(Duration::from_secs(5));
        let (client, mut connection) = match config.connect(NoTls).await {
            Ok(pair) => pair,
            Err(e) => {
                tracing::warn!(error = %crate::db::error_chain(&e), retry_in_ms = backoff.as_millis() as u64, "LISTEN connection failed");
                fail_commands(&mut commands, &mut channels);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
                continue;
            }
        };
        let (note_tx, mut notes) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(msg) = stream.next().await {
                match msg {
                    Ok(AsyncMessage::Notification(n)) => {
                        let _ = note_tx.send((n.channel().to_string(), n.payload().to_string()));
                    }
                    Ok(_) => {}
                    Err(e) => {
                        tracing::warn!(error = %crate::db::error_chain(&e), "LISTEN connection lost");
                        break;
                    }
                }
            }
        });

        // Re-LISTEN everything first, then reload: a refresh may have happened while down.
        let relisten: Vec<Uuid> = channels.keys().copied().collect();
        let mut ok = true;
        for chat in relisten {
            if let Err(e) = client
                .batch_execute(&format!("LISTEN {}", quoted_channel(chat)))
                .await
            {
                tracing::warn!(error = %crate::db::error_chain(&e), "re-LISTEN failed");
                ok = false;
                break;
            }
        }
        if ok {
            backoff = Duration::from_secs(1);
            up.send_replace(true);
            if connected_before {
                cache.metrics.listen_reconnects.inc();
                tracing::warn!(
                    chats = channels.len(),
                    "LISTEN reconnected; reloading every chat"
                );
                cache.reload_all();
            } else {
                tracing::info!("LISTEN connection up");
            }
            connected_before = true;
            serve(&client, &cache, &mut commands, &mut notes, &mut channels).await;
        }
        up.send_replace(false);
        driver.abort();
        if ok {
            // The connection was healthy until now: try again at once, then back off.
            continue;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// While LISTEN is down, new chats cannot be served faithfully: refuse so they fail open.
fn fail_commands(
    commands: &mut mpsc::UnboundedReceiver<Command>,
    channels: &mut HashMap<Uuid, usize>,
) {
    while let Ok(cmd) = commands.try_recv() {
        match cmd {
            Command::Listen(_, reply) => {
                let _ = reply.send(Err(ListenError::Down));
            }
            Command::Unlisten(chat) => {
                release(channels, chat);
            }
        }
    }
}

async fn serve(
    client: &tokio_postgres::Client,
    cache: &Arc<Cache>,
    commands: &mut mpsc::UnboundedReceiver<Command>,
    notes: &mut mpsc::UnboundedReceiver<(String, String)>,
    channels: &mut HashMap<Uuid, usize>,
) {
    loop {
        tokio::select! {
            cmd = commands.recv() => {
                let Some(cmd) = cmd else { return };
                match cmd {
                    Command::Listen(chat, reply) if channels.contains_key(&chat) => {
                        *channels.entry(chat).or_default() += 1;
                        let _ = reply.send(Ok(()));
                    }
                    Command::Listen(chat, reply) => {
                        let sql = format!("LISTEN {}", quoted_channel(chat));
                        match client.batch_execute(&sql).await {
                            Ok(()) => {
                                tracing::debug!(chat.id = %chat, "listening");
                                channels.insert(chat, 1);
                                let _ = reply.send(Ok(()));
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e.into()));
                                return;
                            }
                        }
                    }
                    Command::Unlisten(chat) => {
                        if !release(channels, chat) {
                            continue;
                        }
                        let sql = format!("UNLISTEN {}", quoted_channel(chat));
                        if client.batch_execute(&sql).await.is_err() {
                            return;
                        }
                    }
                }
            }
            note = notes.recv() => {
                let Some((channel, payload)) = note else { return };
                dispatch(cache, &channel, &payload);
            }
        }
    }
}

/// Drops one reference; true when it was the last, so the channel should be UNLISTENed.
fn release(channels: &mut HashMap<Uuid, usize>, chat: Uuid) -> bool {
    match channels.get_mut(&chat) {
        Some(n) if *n > 1 => {
            *n -= 1;
            false
        }
        Some(_) => {
            channels.remove(&chat);
            true
        }
        None => false,
    }
}

fn dispatch(cache: &Arc<Cache>, channel: &str, payload: &str) {
    let Some(chat) = channel_chat(channel) else {
        return;
    };
    tracing::debug!(chat.id = %chat, payload, "notify");
    match parse_notify(payload) {
        Ok(n) => {
            if n.full_refresh == Some(true) {
                tracing::debug!(chat.id = %chat, "full refresh announced");
                cache.full_refresh(chat);
            } else if let Some(after) = n.after_message_id.filter(|&a| a > 0) {
                cache.announce(chat, after.saturating_add(1));
            }
        }
        Err(e) => {
            // coderd would end its streams here; the cache instead re-reads the chat, which is
            // correct whatever the payload meant.
            cache.metrics.bad_notifies.inc();
            tracing::warn!(chat.id = %chat, error = %e, "unparsable NOTIFY payload; reloading chat");
            if let Some(c) = cache.get(&chat) {
                cache.spawn_reload(c, crate::db::ReadReason::Reload);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_coderd_payloads() {
        let n = parse_notify(r#"{"after_message_id":1000}"#).unwrap();
        assert_eq!(n.after_message_id, Some(1000));
        assert_eq!(
            parse_notify(r#"{"full_refresh":true}"#)
                .unwrap()
                .full_refresh,
            Some(true)
        );
        let s = parse_notify(r#"{"status":"running","worker_id":"x","future_field":1}"#).unwrap();
        assert_eq!(s.after_message_id, None);
        assert!(parse_notify("not json").is_err());
        assert!(parse_notify(r#"{"after_message_id":"12"}"#).is_err());
    }

    #[test]
    fn channel_names_map_to_chats() {
        let id = "11111111-1111-4111-8111-111111111111";
        assert_eq!(
            channel_chat(&format!("chat:stream:{id}")),
            Some(id.parse().unwrap())
        );
        assert_eq!(channel_chat("chat:owner:x"), None);
        assert_eq!(
            quoted_channel(id.parse().unwrap()),
            format!("\"chat:stream:{id}\"")
        );
    }
}
