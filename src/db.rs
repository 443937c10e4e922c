//! The Postgres pool and the one query chatcache runs: coderd's `GetChatMessagesByChatID`.
//!
//! Every call is counted in `chatcache_db_reads_total{reason}` so that the reads the cache saves
//! (and the ones it still makes) are visible to operators.

use std::time::Duration;

use bb8_postgres::PostgresConnectionManager;
use tokio_postgres::NoTls;
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::render::MessageRow;

pub type Pool = bb8::Pool<PostgresConnectionManager<NoTls>>;

/// Why a database read failed; Postgres's fault or the network's, never the client's.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("invalid database URL: {}", error_chain(.0))]
    Url(#[source] tokio_postgres::Error),
    #[error("no Postgres connection available: {0}")]
    Pool(String),
    #[error("Postgres query failed: {}", error_chain(.0))]
    Query(#[from] tokio_postgres::Error),
}

/// An error with its causes, `outer: inner: root`: tokio-postgres says only "db error" at the
/// top and keeps the server's message (e.g. `database "coder" does not exist`) in the source.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.ends_with(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// Why a read was made; the label of `chatcache_db_reads_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadReason {
    /// An announced message never reached the cache through the feed.
    Repair,
    /// Messages from the feed are released only once a read covers them (`order_proof`).
    Proof,
    /// An edit rewrote the history (`full_refresh`).
    Refresh,
    /// A client asked for messages older than the cache holds.
    BelowFloor,
    /// The LISTEN connection was lost, so a refresh may have been missed.
    Reload,
}

impl ReadReason {
    pub fn label(self) -> &'static str {
        match self {
            ReadReason::Repair => "repair",
            ReadReason::Proof => "proof",
            ReadReason::Refresh => "refresh",
            ReadReason::BelowFloor => "below_floor",
            ReadReason::Reload => "reload",
        }
    }
}

/// Same filter as coderd, with the `(created_at, id)` order coderd should have (doc 9.4).
const MESSAGES_AFTER: &str = "SELECT id, chat_id, created_by, model_config_id, created_at, \
     role::text, content, content_version, input_tokens, output_tokens, total_tokens, \
     reasoning_tokens, cache_creation_tokens, cache_read_tokens, context_limit \
     FROM chat_messages \
     WHERE chat_id = $1 AND id > $2 AND visibility IN ('user', 'both') AND deleted = false \
     ORDER BY created_at, id";

/// Opens the pool. Connections announce themselves as `chatcache` and use UTC, so times render
/// with `Z` exactly as coderd's do.
pub async fn connect(url: &str, max_size: u32, timeout: Duration) -> Result<Pool, DbError> {
    let mut config: tokio_postgres::Config = url.parse().map_err(DbError::Url)?;
    config.application_name("chatcache");
    config.options("-c TimeZone=UTC");
    config.connect_timeout(timeout);
    let manager = PostgresConnectionManager::new(config, NoTls);
    Ok(bb8::Pool::builder()
        .max_size(max_size)
        .min_idle(Some(0))
        .connection_timeout(timeout)
        .build_unchecked(manager))
}

/// Reads every visible message of `chat` with `id > after_id`.
pub async fn messages_after(
    pool: &Pool,
    metrics: &Metrics,
    reason: ReadReason,
    chat: Uuid,
    after_id: i64,
) -> Result<Vec<MessageRow>, DbError> {
    metrics.db_reads.with_label_values(&[reason.label()]).inc();
    let conn = pool
        .get()
        .await
        .map_err(|e| DbError::Pool(error_chain(&e)))?;
    let rows = conn.query(MESSAGES_AFTER, &[&chat, &after_id]).await?;
    rows.iter().map(row_to_message).collect()
}

fn row_to_message(row: &tokio_postgres::Row) -> Result<MessageRow, DbError> {
    let mut usage = [None; 7];
    for (i, slot) in usage.iter_mut().enumerate() {
        *slot = row.try_get::<_, Option<i64>>(8 + i)?;
    }
    Ok(MessageRow {
        id: row.try_get(0)?,
        chat_id: row.try_get(1)?,
        created_by: row.try_get(2)?,
        model_config_id: row.try_get(3)?,
        created_at: row.try_get(4)?,
        role: row.try_get(5)?,
        content: row.try_get(6)?,
        content_version: row.try_get(7)?,
        usage,
    })
}

/// A cheap liveness probe for `/ready`.
pub async fn ping(pool: &Pool) -> Result<(), DbError> {
    let conn = pool
        .get()
        .await
        .map_err(|e| DbError::Pool(error_chain(&e)))?;
    conn.simple_query("SELECT 1").await?;
    Ok(())
}
