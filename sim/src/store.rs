//! The SQL the sim runs, named after coderd's queries where one exists.
//!
//! Functions take any `GenericClient`, so the same query runs on a pooled connection or inside
//! a write transaction that holds the chat row lock.

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::{GenericClient, Row};
use uuid::Uuid;

use crate::db::DbError;
use crate::wire::chat::ChatRow;
use crate::wire::message::{MessageRow, QueuedRow};

const MESSAGE_COLUMNS: &str = "id, chat_id, model_config_id, created_at, role::text AS role, \
    content, content_version, input_tokens, output_tokens, total_tokens, reasoning_tokens, \
    cache_creation_tokens, cache_read_tokens, context_limit, created_by";

const CHAT_COLUMNS: &str = "c.id, c.owner_id, c.workspace_id, c.parent_chat_id, c.root_chat_id, \
    c.last_model_config_id, c.title, c.status::text AS status, c.worker_id, c.last_error, \
    c.created_at, c.updated_at, c.archived, c.started_at, \
    EXISTS (SELECT 1 FROM chat_messages m WHERE m.chat_id = c.id AND m.role = 'assistant' \
        AND NOT m.deleted AND m.id > COALESCE(c.last_read_message_id, 0)) AS has_unread";

/// A message about to be inserted.
#[derive(Debug, Clone)]
pub struct NewMessage {
    pub role: &'static str,
    pub content: Value,
    pub visibility: &'static str,
    pub created_by: Option<Uuid>,
    pub model_config_id: Option<Uuid>,
    /// Input, output and total tokens; zero is stored as NULL, as coderd does.
    pub tokens: [i64; 3],
}

fn message_row(row: &Row) -> MessageRow {
    MessageRow {
        id: row.get("id"),
        chat_id: row.get("chat_id"),
        model_config_id: row.get("model_config_id"),
        created_at: row.get("created_at"),
        role: row.get("role"),
        content: row.get("content"),
        content_version: row.get("content_version"),
        tokens: [
            row.get("input_tokens"),
            row.get("output_tokens"),
            row.get("total_tokens"),
            row.get("reasoning_tokens"),
            row.get("cache_creation_tokens"),
            row.get("cache_read_tokens"),
            row.get("context_limit"),
        ],
        created_by: row.get("created_by"),
    }
}

fn chat_row(row: &Row) -> ChatRow {
    ChatRow {
        id: row.get("id"),
        owner_id: row.get("owner_id"),
        workspace_id: row.get("workspace_id"),
        parent_chat_id: row.get("parent_chat_id"),
        root_chat_id: row.get("root_chat_id"),
        last_model_config_id: row.get("last_model_config_id"),
        title: row.get("title"),
        status: row.get("status"),
        worker_id: row.get("worker_id"),
        last_error: row.get("last_error"),
        created_at: row.get("created_at"),
        updated_at: row.get("updated_at"),
        archived: row.get("archived"),
        started_at: row.get("started_at"),
        has_unread: row.get("has_unread"),
    }
}

fn queued_row(row: &Row) -> QueuedRow {
    QueuedRow {
        id: row.get("id"),
        chat_id: row.get("chat_id"),
        content: row.get("content"),
        created_at: row.get("created_at"),
    }
}

/// `GetChatMessagesByChatID`: visible, non-deleted rows after `after_id`, no limit. Ordered by
/// `(created_at, id)`, not coderd's `created_at` alone, so rows of one transaction cannot swap.
pub async fn messages_after(
    c: &impl GenericClient,
    chat_id: Uuid,
    after_id: i64,
) -> Result<Vec<MessageRow>, DbError> {
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE chat_id = $1 AND id > $2 \
         AND visibility IN ('user', 'both') AND deleted = false ORDER BY created_at, id"
    );
    let rows = c.query(&sql, &[&chat_id, &after_id]).await?;
    Ok(rows.iter().map(message_row).collect())
}

/// `GetChatMessagesByChatIDDescPaginated`: newest first, `id < before_id` when it is positive.
pub async fn messages_page_desc(
    c: &impl GenericClient,
    chat_id: Uuid,
    before_id: i64,
    limit: i64,
) -> Result<Vec<MessageRow>, DbError> {
    let sql = format!(
        "SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE chat_id = $1 \
         AND ($2::bigint <= 0 OR id < $2::bigint) AND visibility IN ('user', 'both') AND deleted = false \
         ORDER BY id DESC LIMIT $3::bigint"
    );
    let rows = c.query(&sql, &[&chat_id, &before_id, &limit]).await?;
    Ok(rows.iter().map(message_row).collect())
}

/// `GetChatMessageByID`: one non-deleted row.
pub async fn message_by_id(c: &impl GenericClient, id: i64) -> Result<Option<MessageRow>, DbError> {
    let sql = format!("SELECT {MESSAGE_COLUMNS} FROM chat_messages WHERE id = $1 AND NOT deleted");
    Ok(c.query_opt(&sql, &[&id]).await?.as_ref().map(message_row))
}

/// `GetChatQueuedMessages`, oldest first.
pub async fn queued(c: &impl GenericClient, chat_id: Uuid) -> Result<Vec<QueuedRow>, DbError> {
    let rows = c
        .query(
            "SELECT id, chat_id, content, created_at FROM chat_queued_messages \
             WHERE chat_id = $1 ORDER BY id",
            &[&chat_id],
        )
        .await?;
    Ok(rows.iter().map(queued_row).collect())
}

/// `GetChatByID`.
pub async fn chat_by_id(c: &impl GenericClient, chat_id: Uuid) -> Result<Option<ChatRow>, DbError> {
    let sql = format!("SELECT {CHAT_COLUMNS} FROM chats c WHERE c.id = $1");
    Ok(c.query_opt(&sql, &[&chat_id]).await?.as_ref().map(chat_row))
}

/// `GetChatByIDForUpdate`: the per-chat write lock, held until the transaction ends.
pub async fn lock_chat(c: &impl GenericClient, chat_id: Uuid) -> Result<Option<ChatRow>, DbError> {
    let sql = format!("SELECT {CHAT_COLUMNS} FROM chats c WHERE c.id = $1 FOR UPDATE OF c");
    Ok(c.query_opt(&sql, &[&chat_id]).await?.as_ref().map(chat_row))
}

/// `InsertChatMessages`: inserts rows in order (so ids ascend within the batch), moves
/// `chats.last_model_config_id` along, and returns the stored rows.
pub async fn insert_messages(
    c: &impl GenericClient,
    chat_id: Uuid,
    messages: &[NewMessage],
) -> Result<Vec<MessageRow>, DbError> {
    let sql = format!(
        "INSERT INTO chat_messages (chat_id, model_config_id, role, content, visibility, \
         input_tokens, output_tokens, total_tokens, created_by, content_version) \
         VALUES ($1, $2, $3::text::chat_message_role, $4, $5::text::chat_message_visibility, \
         NULLIF($6::bigint, 0), NULLIF($7::bigint, 0), NULLIF($8::bigint, 0), $9, 1) RETURNING {MESSAGE_COLUMNS}"
    );
    let mut stored = Vec::with_capacity(messages.len());
    for m in messages {
        let [input, output, total] = m.tokens;
        let row = c
            .query_one(
                &sql,
                &[
                    &chat_id,
                    &m.model_config_id,
                    &m.role,
                    &m.content,
                    &m.visibility,
                    &input,
                    &output,
                    &total,
                    &m.created_by,
                ],
            )
            .await?;
        stored.push(message_row(&row));
    }
    if let Some(config) = messages.iter().rev().find_map(|m| m.model_config_id) {
        c.execute(
            "UPDATE chats SET last_model_config_id = $2 WHERE id = $1",
            &[&chat_id, &config],
        )
        .await?;
    }
    Ok(stored)
}

/// Sets a chat's status and worker; `updated_at` moves with it.
pub async fn set_status(
    c: &impl GenericClient,
    chat_id: Uuid,
    status: &str,
    worker_id: Option<Uuid>,
) -> Result<(), DbError> {
    c.execute(
        "UPDATE chats SET status = $2::text::chat_status, worker_id = $3, updated_at = now(), \
         heartbeat_at = CASE WHEN $3::uuid IS NULL THEN NULL ELSE now() END, \
         started_at = CASE WHEN $3::uuid IS NULL THEN NULL ELSE started_at END WHERE id = $1",
        &[&chat_id, &status, &worker_id],
    )
    .await?;
    Ok(())
}

/// `SoftDeleteChatMessagesAfterID`: hides every row with `id > after_id`.
pub async fn soft_delete_after(
    c: &impl GenericClient,
    chat_id: Uuid,
    after_id: i64,
) -> Result<(), DbError> {
    c.execute(
        "UPDATE chat_messages SET deleted = true WHERE chat_id = $1 AND id > $2",
        &[&chat_id, &after_id],
    )
    .await?;
    Ok(())
}

pub async fn queue_len(c: &impl GenericClient, chat_id: Uuid) -> Result<i64, DbError> {
    let row = c
        .query_one(
            "SELECT count(*) FROM chat_queued_messages WHERE chat_id = $1",
            &[&chat_id],
        )
        .await?;
    Ok(row.get(0))
}

pub async fn enqueue(
    c: &impl GenericClient,
    chat_id: Uuid,
    content: &Value,
) -> Result<QueuedRow, DbError> {
    let row = c
        .query_one(
            "INSERT INTO chat_queued_messages (chat_id, content) VALUES ($1, $2) \
             RETURNING id, chat_id, content, created_at",
            &[&chat_id, content],
        )
        .await?;
    Ok(queued_row(&row))
}

/// Removes one queue row of the chat and returns it, if it existed.
pub async fn take_queued(
    c: &impl GenericClient,
    chat_id: Uuid,
    id: i64,
) -> Result<Option<QueuedRow>, DbError> {
    let row = c
        .query_opt(
            "DELETE FROM chat_queued_messages WHERE id = $1 AND chat_id = $2 \
             RETURNING id, chat_id, content, created_at",
            &[&id, &chat_id],
        )
        .await?;
    Ok(row.as_ref().map(queued_row))
}

/// Removes the oldest queue row of the chat, for auto-promotion.
pub async fn take_queue_head(
    c: &impl GenericClient,
    chat_id: Uuid,
) -> Result<Option<QueuedRow>, DbError> {
    let row = c
        .query_opt(
            "DELETE FROM chat_queued_messages WHERE id = (SELECT id FROM chat_queued_messages \
             WHERE chat_id = $1 ORDER BY id LIMIT 1) RETURNING id, chat_id, content, created_at",
            &[&chat_id],
        )
        .await?;
    Ok(row.as_ref().map(queued_row))
}

/// `DeleteAllChatQueuedMessages`.
pub async fn clear_queue(c: &impl GenericClient, chat_id: Uuid) -> Result<(), DbError> {
    c.execute(
        "DELETE FROM chat_queued_messages WHERE chat_id = $1",
        &[&chat_id],
    )
    .await?;
    Ok(())
}

/// `AcquireChats`: claims up to `limit` pending chats (and running chats whose worker stopped
/// heartbeating `stale` ago; coderd: 5 minutes) for this worker, skipping chats another
/// transaction holds. Returns each claimed chat with its claim time.
pub async fn acquire_chats(
    c: &impl GenericClient,
    worker_id: Uuid,
    limit: i64,
    stale: std::time::Duration,
) -> Result<Vec<(Uuid, DateTime<Utc>)>, DbError> {
    let stale_ms = i64::try_from(stale.as_millis()).unwrap_or(i64::MAX);
    let rows = c
        .query(
            "UPDATE chats SET status = 'running', worker_id = $1, started_at = now(), \
             heartbeat_at = now(), updated_at = now() WHERE id IN (SELECT id FROM chats \
             WHERE status = 'pending' OR (status = 'running' AND heartbeat_at < now() - \
             make_interval(secs => $3::bigint / 1000.0)) ORDER BY updated_at LIMIT $2 \
             FOR UPDATE SKIP LOCKED) RETURNING id, started_at",
            &[&worker_id, &limit, &stale_ms],
        )
        .await?;
    Ok(rows.iter().map(|r| (r.get(0), r.get(1))).collect())
}

/// `markChatAsRead`: the owner has seen the newest assistant message.
pub async fn mark_read(c: &impl GenericClient, chat_id: Uuid) -> Result<(), DbError> {
    c.execute(
        "UPDATE chats SET last_read_message_id = (SELECT max(id) FROM chat_messages \
         WHERE chat_id = $1 AND role = 'assistant' AND NOT deleted) WHERE id = $1",
        &[&chat_id],
    )
    .await?;
    Ok(())
}

/// Counts user messages still in the chat's history; the worker numbers its turns by it.
pub async fn user_message_count(c: &impl GenericClient, chat_id: Uuid) -> Result<i64, DbError> {
    let row = c
        .query_one(
            "SELECT count(*) FROM chat_messages WHERE chat_id = $1 AND role = 'user' \
             AND NOT deleted",
            &[&chat_id],
        )
        .await?;
    Ok(row.get(0))
}
