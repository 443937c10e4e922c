//! `codersdk.Chat`, the REST view of a `chats` row. It never travels on the message stream.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::gojson;

/// The columns of a `chats` row the sim reads.
#[derive(Debug, Clone)]
pub struct ChatRow {
    pub id: Uuid,
    pub owner_id: Uuid,
    pub workspace_id: Option<Uuid>,
    pub parent_chat_id: Option<Uuid>,
    pub root_chat_id: Option<Uuid>,
    pub last_model_config_id: Uuid,
    pub title: String,
    pub status: String,
    pub worker_id: Option<Uuid>,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub archived: bool,
    /// When the current run was claimed; with `worker_id` it identifies one claim, so a turn
    /// can tell that its chat was claimed again meanwhile. Not part of the JSON.
    pub started_at: Option<DateTime<Utc>>,
    /// Whether an assistant message newer than `last_read_message_id` exists.
    pub has_unread: bool,
}

/// Encodes a chat; optional references are omitted when NULL, `last_error` is always present.
pub fn chat(row: &ChatRow) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), row.id.to_string().into());
    m.insert("owner_id".into(), row.owner_id.to_string().into());
    let optional = [
        ("workspace_id", row.workspace_id),
        ("parent_chat_id", row.parent_chat_id),
        ("root_chat_id", row.root_chat_id),
    ];
    for (key, value) in optional {
        if let Some(id) = value {
            m.insert(key.into(), id.to_string().into());
        }
    }
    m.insert(
        "last_model_config_id".into(),
        row.last_model_config_id.to_string().into(),
    );
    m.insert("title".into(), row.title.clone().into());
    m.insert("status".into(), row.status.clone().into());
    m.insert(
        "last_error".into(),
        row.last_error.clone().map_or(Value::Null, Value::from),
    );
    m.insert("created_at".into(), gojson::rfc3339(&row.created_at).into());
    m.insert("updated_at".into(), gojson::rfc3339(&row.updated_at).into());
    m.insert("archived".into(), row.archived.into());
    m.insert("has_unread".into(), row.has_unread.into());
    Value::Object(m)
}
