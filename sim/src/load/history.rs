//! What Postgres says about a chat: whether the turn is finished and which messages are visible.

use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::NoTls;
use uuid::Uuid;

/// A Postgres failure (Postgres' fault, or a wrong `--database-url`).
#[derive(Debug, thiserror::Error)]
pub enum HistoryError {
    #[error("invalid database url: {}", describe(.0))]
    Url(#[source] tokio_postgres::Error),
    #[error("cannot connect to Postgres: {}", describe(.0))]
    Connect(#[source] tokio_postgres::Error),
    #[error("no Postgres connection available: {0}")]
    Pool(#[source] bb8::RunError<tokio_postgres::Error>),
    #[error("Postgres query failed: {}", describe(.0))]
    Query(#[source] tokio_postgres::Error),
    #[error("chat {0} does not exist in Postgres")]
    NoSuchChat(Uuid),
}

/// A Postgres error with its causes (the server's message, the socket error), which the
/// driver's own display leaves out.
fn describe(err: &tokio_postgres::Error) -> String {
    let mut text = err.to_string();
    let mut cause = std::error::Error::source(err);
    while let Some(inner) = cause {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        cause = inner.source();
    }
    text
}

/// How long opening a Postgres connection (or waiting for a pooled one) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The visible history of a chat, as the stream must deliver it (protocol doc 13.2).
const VISIBLE_HISTORY: &str = "SELECT id, role::text FROM chat_messages \
     WHERE chat_id = $1 AND deleted = false AND visibility IN ('user', 'both') \
     ORDER BY created_at, id";

/// Status, queue and newest visible message of a chat, in one round trip.
const TURN_STATE: &str = "SELECT c.status::text, \
       EXISTS (SELECT 1 FROM chat_queued_messages q WHERE q.chat_id = c.id), \
       newest.id, newest.role::text \
     FROM chats c \
     LEFT JOIN LATERAL (SELECT m.id, m.role FROM chat_messages m \
        WHERE m.chat_id = c.id AND m.deleted = false AND m.visibility IN ('user', 'both') \
        ORDER BY m.created_at DESC, m.id DESC LIMIT 1) newest ON true \
     WHERE c.id = $1";

/// One row of the visible history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VisibleMessage {
    pub id: i64,
    pub role: String,
}

/// A chat's state as far as turn completion is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnState {
    pub status: String,
    pub queued: bool,
    pub newest: Option<VisibleMessage>,
}

impl TurnState {
    /// A turn whose user message has id `user_message_id` is finished when the chat is idle,
    /// nothing is queued, and an assistant message newer than the user message is the newest
    /// visible one.
    pub fn finished_after(&self, user_message_id: i64) -> bool {
        self.status == "waiting"
            && !self.queued
            && self
                .newest
                .as_ref()
                .is_some_and(|m| m.role == "assistant" && m.id > user_message_id)
    }
}

/// A small pool of Postgres connections shared by all chat drivers.
#[derive(Clone)]
pub struct History {
    pool: bb8::Pool<PostgresConnectionManager<NoTls>>,
}

impl History {
    /// Connects once up front, so a wrong URL fails the run before any traffic starts.
    pub async fn connect(url: &str, max_connections: u32) -> Result<Self, HistoryError> {
        let mut config: tokio_postgres::Config = url.parse().map_err(HistoryError::Url)?;
        config.application_name("chatload");
        config.connect_timeout(CONNECT_TIMEOUT);
        let manager = PostgresConnectionManager::new(config, NoTls);
        let pool = bb8::Pool::builder()
            .max_size(max_connections.max(1))
            .connection_timeout(CONNECT_TIMEOUT)
            .build_unchecked(manager);
        let probe = pool
            .dedicated_connection()
            .await
            .map_err(HistoryError::Connect)?;
        drop(probe);
        Ok(History { pool })
    }

    pub async fn visible(&self, chat_id: Uuid) -> Result<Vec<VisibleMessage>, HistoryError> {
        let client = self.pool.get().await.map_err(HistoryError::Pool)?;
        let rows = client
            .query(VISIBLE_HISTORY, &[&chat_id])
            .await
            .map_err(HistoryError::Query)?;
        Ok(rows
            .iter()
            .map(|row| VisibleMessage {
                id: row.get(0),
                role: row.get(1),
            })
            .collect())
    }

    pub async fn turn_state(&self, chat_id: Uuid) -> Result<TurnState, HistoryError> {
        let client = self.pool.get().await.map_err(HistoryError::Pool)?;
        let row = client
            .query_opt(TURN_STATE, &[&chat_id])
            .await
            .map_err(HistoryError::Query)?
            .ok_or(HistoryError::NoSuchChat(chat_id))?;
        let newest = row.get::<_, Option<i64>>(2).map(|id| VisibleMessage {
            id,
            role: row.get(3),
        });
        Ok(TurnState {
            status: row.get(0),
            queued: row.get(1),
            newest,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(status: &str, queued: bool, newest: Option<(i64, &str)>) -> TurnState {
        TurnState {
            status: status.into(),
            queued,
            newest: newest.map(|(id, role)| VisibleMessage {
                id,
                role: role.into(),
            }),
        }
    }

    #[test]
    fn turn_finishes_with_a_newer_assistant_message_on_an_idle_chat() {
        assert!(state("waiting", false, Some((1005, "assistant"))).finished_after(1003));
        assert!(!state("running", false, Some((1005, "assistant"))).finished_after(1003));
        assert!(!state("waiting", true, Some((1005, "assistant"))).finished_after(1003));
        assert!(!state("waiting", false, Some((1003, "user"))).finished_after(1003));
        assert!(!state("waiting", false, Some((1002, "assistant"))).finished_after(1003));
        assert!(!state("waiting", false, None).finished_after(0));
    }
}
