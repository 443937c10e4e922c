//! coderd's publish paths (`publishMessage`, `publishEditedMessage`, `publishStatus`, queue
//! changes, `publishError`): local fan-out at once, the notify through the batcher.
//!
//! Callers publish only after their transaction committed, so an announced row is always
//! visible to whoever reads it on the notify.

use uuid::Uuid;

use crate::gojson;
use crate::replica::Replica;
use crate::wire::chat::{self, ChatRow};
use crate::wire::event::StreamEvent;
use crate::wire::message::{chat_message, queued_message, MessageRow, QueuedRow};
use crate::wire::notify::{owner_channel, stream_channel, StreamNotify};

impl Replica {
    /// Converts a stored row into its `message` event.
    pub fn message_event(&self, row: &MessageRow) -> StreamEvent {
        StreamEvent::message(
            row.chat_id,
            row.id,
            chat_message(row, self.settings.framing),
        )
    }

    /// `publishMessage`: cache (when the #23218 cache is on), local fan-out, then notify
    /// `after_message_id = id - 1`.
    pub async fn publish_message(&self, row: &MessageRow) {
        let event = self.message_event(row);
        if self.settings.stream_cache {
            self.streams.cache_message(row.chat_id, &event);
        }
        self.streams.publish(row.chat_id, &event);
        self.notify_stream(row.chat_id, StreamNotify::message(row.id - 1))
            .await;
    }

    /// `publishEditedMessage`: the cache becomes just this message, local fan-out, then a
    /// `full_refresh` notify.
    pub async fn publish_edited_message(&self, row: &MessageRow) {
        let event = self.message_event(row);
        if self.settings.stream_cache {
            self.streams.reset_cache(row.chat_id, &event);
        }
        self.streams.publish(row.chat_id, &event);
        self.notify_stream(row.chat_id, StreamNotify::full_refresh())
            .await;
    }

    /// `publishStatus`: a `status` event locally, `{status, worker_id}` on the stream channel,
    /// and a `status_change` for the owner's watchers. `chat` is the row as it now stands.
    pub async fn publish_status(&self, chat: &ChatRow) {
        let event = StreamEvent::status(chat.id, &chat.status);
        self.streams.publish(chat.id, &event);
        let notify = StreamNotify::status(&chat.status, chat.worker_id);
        self.notify_stream(chat.id, notify).await;
        self.publish_watch_event(chat, "status_change").await;
    }

    /// A queue change: the whole queue locally, `{"queue_update":true}` on the channel.
    pub async fn publish_queue_update(&self, chat_id: Uuid, queue: &[QueuedRow]) {
        let framing = self.settings.framing;
        let queued = queue.iter().map(|q| queued_message(q, framing)).collect();
        self.streams
            .publish(chat_id, &StreamEvent::queue_update(chat_id, queued));
        self.notify_stream(chat_id, StreamNotify::queue_update())
            .await;
    }

    /// `publishError`: trimmed; a blank message is not published at all.
    pub async fn publish_error(&self, chat_id: Uuid, message: &str) {
        let message = message.trim();
        if message.is_empty() {
            return;
        }
        self.streams
            .publish(chat_id, &StreamEvent::error(chat_id, message));
        let notify = StreamNotify {
            error: message.to_string(),
            ..StreamNotify::default()
        };
        self.notify_stream(chat_id, notify).await;
    }

    /// A lifecycle event for `/chats/watch` on `chat:owner:{owner_id}`.
    pub async fn publish_watch_event(&self, chat: &ChatRow, kind: &str) {
        let event = serde_json::json!({ "kind": kind, "chat": chat::chat(chat) });
        self.publisher
            .publish(owner_channel(chat.owner_id), gojson::to_string(&event))
            .await;
    }

    async fn notify_stream(&self, chat_id: Uuid, notify: StreamNotify) {
        self.publisher
            .publish(stream_channel(chat_id), notify.encode())
            .await;
    }
}
