//! `ChatStreamNotifyMessage`, the payload on `chat:stream:{chat_id}`.
//!
//! Every field is omitempty and a payload carries only what one publish sets. Content never
//! travels here; subscribers read rows from Postgres or a cache.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::gojson;

/// One notification, fields in coderd's declaration order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StreamNotify {
    /// A message was persisted: rows with `id > after_message_id` are new (it is the new id
    /// minus one, not the chat's previous message).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub after_message_id: i64,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub status: String,
    /// The replica now running the chat; tells a relay where to dial. A plain string in
    /// coderd, parsed only where it is used, so a malformed one does not fail the decode.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub worker_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry: Option<Retry>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub error: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub queue_update: bool,
    /// History was rewritten (an edit): subscribers re-read from id 0.
    #[serde(default, skip_serializing_if = "is_false")]
    pub full_refresh: bool,
}

impl StreamNotify {
    pub fn message(after_message_id: i64) -> Self {
        StreamNotify {
            after_message_id,
            ..Self::default()
        }
    }

    pub fn full_refresh() -> Self {
        StreamNotify {
            full_refresh: true,
            ..Self::default()
        }
    }

    pub fn status(status: &str, worker_id: Option<Uuid>) -> Self {
        let worker_id = worker_id.map(|w| w.to_string()).unwrap_or_default();
        StreamNotify {
            status: status.into(),
            worker_id,
            ..Self::default()
        }
    }

    /// The worker named by a status notify; nil or unparseable counts as none.
    pub fn worker(&self) -> Option<Uuid> {
        gojson::parse_uuid(&self.worker_id)
            .ok()
            .filter(|w| !w.is_nil())
    }

    pub fn queue_update() -> Self {
        StreamNotify {
            queue_update: true,
            ..Self::default()
        }
    }

    /// The payload bytes, as `json.Marshal` writes them (no trailing newline).
    pub fn encode(&self) -> String {
        gojson::to_string(self)
    }

    /// Decodes a payload. A failure ends the stream with
    /// `unmarshal chat stream notify: <error>`.
    pub fn decode(payload: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(payload)
    }
}

/// `ChatStreamRetry`: all four fields always present, in this order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Retry {
    #[serde(default)]
    pub attempt: i64,
    #[serde(default)]
    pub delay_ms: i64,
    #[serde(default)]
    pub error: String,
    /// An RFC 3339 time, kept as written.
    #[serde(default)]
    pub retrying_at: String,
}

/// The pubsub channel of a chat's stream.
pub fn stream_channel(chat_id: Uuid) -> String {
    format!("chat:stream:{chat_id}")
}

/// The pubsub channel of an owner's lifecycle events (`/chats/watch`).
pub fn owner_channel(owner_id: Uuid) -> String {
    format!("chat:owner:{owner_id}")
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

fn is_false(v: &bool) -> bool {
    !*v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_match_tv6() {
        assert_eq!(
            StreamNotify::message(1000).encode(),
            r#"{"after_message_id":1000}"#
        );
        assert_eq!(
            StreamNotify::full_refresh().encode(),
            r#"{"full_refresh":true}"#
        );
        let worker = "44444444-4444-4444-8444-444444444444".parse().unwrap();
        assert_eq!(
            StreamNotify::status("running", Some(worker)).encode(),
            r#"{"status":"running","worker_id":"44444444-4444-4444-8444-444444444444"}"#
        );
        assert_eq!(StreamNotify::message(0).encode(), "{}");
    }
}
