//! The chat daemon's write paths (coderd's `chatd` send, edit, interrupt, queue operations and
//! chat creation).
//!
//! Every path takes the chat row lock (`SELECT ... FOR UPDATE`) inside its transaction, so one
//! chat's ids are allocated and committed in lock order, and publishes only after commit.

use uuid::Uuid;

use crate::db::DbError;
use crate::replica::Replica;
use crate::store::{self, NewMessage};
use crate::wire::chat::ChatRow;
use crate::wire::message::{MessageRow, QueuedRow};
use crate::wire::part::{encode_for_storage, Part};

/// `MaxQueueSize`: queued messages per chat.
pub const MAX_QUEUE_SIZE: i64 = 20;

/// Why a write was refused. Everything but `Db` is the client's doing.
#[derive(Debug, thiserror::Error)]
pub enum ChatdError {
    #[error("chat not found")]
    ChatNotFound,
    #[error("chat message queue is full")]
    QueueFull,
    #[error("chat message not found")]
    MessageNotFound,
    #[error("only user messages can be edited")]
    NotUserMessage,
    #[error("queued message not found")]
    QueuedNotFound,
    #[error(transparent)]
    Db(#[from] DbError),
}

impl From<tokio_postgres::Error> for ChatdError {
    fn from(e: tokio_postgres::Error) -> Self {
        ChatdError::Db(e.into())
    }
}

impl From<bb8::RunError<tokio_postgres::Error>> for ChatdError {
    fn from(e: bb8::RunError<tokio_postgres::Error>) -> Self {
        ChatdError::Db(e.into())
    }
}

/// What `send_message` did with the message.
pub enum Sent {
    /// The chat was idle: the message is in history and the chat is pending.
    Inserted(MessageRow),
    /// The chat was busy (or had a queue): the message waits in the queue.
    Queued(QueuedRow),
}

/// A user message as stored.
fn user_message(parts: &[Part], user_id: Uuid, model_config_id: Uuid) -> NewMessage {
    NewMessage {
        role: "user",
        content: encode_for_storage(parts),
        visibility: "both",
        created_by: Some(user_id),
        model_config_id: Some(model_config_id),
        tokens: [0; 3],
    }
}

/// The chat as it stands after a status change committed.
fn with_status(chat: &ChatRow, status: &str, worker_id: Option<Uuid>) -> ChatRow {
    ChatRow {
        status: status.to_string(),
        worker_id,
        updated_at: chrono::Utc::now(),
        ..chat.clone()
    }
}

impl Replica {
    /// `SendMessage` with busy behaviour "queue": insert and make the chat pending when it is
    /// idle with an empty queue, otherwise queue (at most 20).
    pub async fn send_message(
        &self,
        chat_id: Uuid,
        user_id: Uuid,
        parts: &[Part],
        model_config_id: Option<Uuid>,
    ) -> Result<Sent, ChatdError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let chat = store::lock_chat(&tx, chat_id)
            .await?
            .ok_or(ChatdError::ChatNotFound)?;
        let queued = store::queue_len(&tx, chat_id).await?;
        let busy = matches!(chat.status.as_str(), "running" | "pending") || queued > 0;

        if busy {
            if queued >= MAX_QUEUE_SIZE {
                return Err(ChatdError::QueueFull);
            }
            let row = store::enqueue(&tx, chat_id, &encode_for_storage(parts)).await?;
            let queue = store::queued(&tx, chat_id).await?;
            tx.commit().await?;
            self.publish_queue_update(chat_id, &queue).await;
            return Ok(Sent::Queued(row));
        }

        let config = model_config_id.unwrap_or(chat.last_model_config_id);
        let message = user_message(parts, user_id, config);
        let row = store::insert_messages(&tx, chat_id, &[message])
            .await?
            .remove(0);
        store::set_status(&tx, chat_id, "pending", None).await?;
        tx.commit().await?;

        self.publish_message(&row).await;
        self.publish_status(&with_status(&chat, "pending", None))
            .await;
        self.worker_wake.notify_one();
        Ok(Sent::Inserted(row))
    }

    /// `EditMessage`: soft-delete the edited message and everything after it, insert the new
    /// content as a fresh row, empty the queue, make the chat pending; then a full refresh,
    /// the (empty) queue and the status go out.
    pub async fn edit_message(
        &self,
        chat_id: Uuid,
        user_id: Uuid,
        message_id: i64,
        parts: &[Part],
    ) -> Result<MessageRow, ChatdError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let chat = store::lock_chat(&tx, chat_id)
            .await?
            .ok_or(ChatdError::ChatNotFound)?;
        let original = store::message_by_id(&tx, message_id)
            .await?
            .filter(|m| m.chat_id == chat_id)
            .ok_or(ChatdError::MessageNotFound)?;
        if original.role != "user" {
            return Err(ChatdError::NotUserMessage);
        }

        store::soft_delete_after(&tx, chat_id, message_id - 1).await?;
        let config = original
            .model_config_id
            .unwrap_or(chat.last_model_config_id);
        let message = user_message(parts, user_id, config);
        let row = store::insert_messages(&tx, chat_id, &[message])
            .await?
            .remove(0);
        store::clear_queue(&tx, chat_id).await?;
        store::set_status(&tx, chat_id, "pending", None).await?;
        tx.commit().await?;

        self.publish_edited_message(&row).await;
        self.publish_queue_update(chat_id, &[]).await;
        self.publish_status(&with_status(&chat, "pending", None))
            .await;
        self.worker_wake.notify_one();
        Ok(row)
    }

    /// Interrupt: the chat goes back to `waiting`; a worker still generating notices at
    /// persist time and drops its turn.
    pub async fn interrupt(&self, chat_id: Uuid) -> Result<ChatRow, ChatdError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let chat = store::lock_chat(&tx, chat_id)
            .await?
            .ok_or(ChatdError::ChatNotFound)?;
        store::set_status(&tx, chat_id, "waiting", None).await?;
        tx.commit().await?;

        let chat = with_status(&chat, "waiting", None);
        self.publish_status(&chat).await;
        Ok(chat)
    }

    /// `DeleteQueued`: scoped by chat; a missing id is not an error.
    pub async fn delete_queued(&self, chat_id: Uuid, queued_id: i64) -> Result<(), ChatdError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        store::lock_chat(&tx, chat_id)
            .await?
            .ok_or(ChatdError::ChatNotFound)?;
        store::take_queued(&tx, chat_id, queued_id).await?;
        let queue = store::queued(&tx, chat_id).await?;
        tx.commit().await?;

        self.publish_queue_update(chat_id, &queue).await;
        Ok(())
    }

    /// Manual promotion: the queued message becomes a real message with a new id and the chat
    /// goes pending (a turn in flight is dropped at its persist step).
    pub async fn promote_queued(
        &self,
        chat_id: Uuid,
        user_id: Uuid,
        queued_id: i64,
    ) -> Result<MessageRow, ChatdError> {
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let chat = store::lock_chat(&tx, chat_id)
            .await?
            .ok_or(ChatdError::ChatNotFound)?;
        let queued = store::take_queued(&tx, chat_id, queued_id)
            .await?
            .ok_or(ChatdError::QueuedNotFound)?;
        let message = NewMessage {
            content: queued.content,
            ..user_message(&[], user_id, chat.last_model_config_id)
        };
        let row = store::insert_messages(&tx, chat_id, &[message])
            .await?
            .remove(0);
        store::set_status(&tx, chat_id, "pending", None).await?;
        let queue = store::queued(&tx, chat_id).await?;
        tx.commit().await?;

        self.publish_queue_update(chat_id, &queue).await;
        self.publish_message(&row).await;
        self.publish_status(&with_status(&chat, "pending", None))
            .await;
        self.worker_wake.notify_one();
        Ok(row)
    }

    /// `CreateChat`: a pending chat holding the first user message.
    pub async fn create_chat(
        &self,
        owner_id: Uuid,
        parts: &[Part],
        model_config_id: Uuid,
    ) -> Result<ChatRow, ChatdError> {
        let title: String = parts.iter().map(|p| p.text.as_str()).collect::<String>();
        let title: String = title.chars().take(50).collect();
        let mut conn = self.pool.get().await?;
        let tx = conn.transaction().await?;
        let id: Uuid = tx
            .query_one(
                "INSERT INTO chats (owner_id, title, status, last_model_config_id) \
                 VALUES ($1, $2, 'pending', $3) RETURNING id",
                &[&owner_id, &title, &model_config_id],
            )
            .await?
            .get(0);
        let message = user_message(parts, owner_id, model_config_id);
        let row = store::insert_messages(&tx, id, &[message]).await?.remove(0);
        let chat = store::chat_by_id(&tx, id)
            .await?
            .ok_or(ChatdError::ChatNotFound)?;
        tx.commit().await?;

        self.publish_message(&row).await;
        self.publish_watch_event(&chat, "created").await;
        self.worker_wake.notify_one();
        Ok(chat)
    }
}
