//! `db2sdk.ChatMessage` and `db2sdk.ChatQueuedMessage`: rows of `chat_messages` and
//! `chat_queued_messages` turned into coderd's client JSON.

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use super::part::{decode_content, Part};
use super::Framing;
use crate::gojson;

/// The columns of a `chat_messages` row that reach clients, as `GetChatMessagesByChatID`
/// returns them.
#[derive(Debug, Clone)]
pub struct MessageRow {
    pub id: i64,
    pub chat_id: Uuid,
    pub model_config_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub role: String,
    pub content: Option<Value>,
    pub content_version: i16,
    /// The seven token columns in `ChatMessageUsage` order: input, output, total, reasoning,
    /// cache creation, cache read, context limit.
    pub tokens: [Option<i64>; 7],
    pub created_by: Option<Uuid>,
}

/// A queued user message as `GetChatQueuedMessages` returns it.
#[derive(Debug, Clone)]
pub struct QueuedRow {
    pub id: i64,
    pub chat_id: Uuid,
    pub content: Value,
    pub created_at: DateTime<Utc>,
}

const USAGE_KEYS: [&str; 7] = [
    "input_tokens",
    "output_tokens",
    "total_tokens",
    "reasoning_tokens",
    "cache_creation_tokens",
    "cache_read_tokens",
    "context_limit",
];

/// Converts a message row into `ChatMessage` JSON (keys in Go declaration order).
pub fn chat_message(row: &MessageRow, framing: Framing) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), row.id.into());
    m.insert("chat_id".into(), row.chat_id.to_string().into());
    if let Some(by) = row.created_by {
        m.insert("created_by".into(), by.to_string().into());
    }
    if let Some(config) = row.model_config_id {
        m.insert("model_config_id".into(), config.to_string().into());
    }
    m.insert("created_at".into(), gojson::rfc3339(&row.created_at).into());
    m.insert("role".into(), row.role.clone().into());

    // A content parse error is swallowed, as in coderd: the message goes out without content.
    if let Some(parts) = row
        .content
        .as_ref()
        .and_then(|c| parse_parts(c, row, framing))
    {
        if !parts.is_empty() {
            m.insert("content".into(), encode_parts(parts, framing));
        }
    }

    if row.tokens.iter().any(Option::is_some) {
        let mut usage = Map::new();
        for (key, value) in USAGE_KEYS.iter().zip(row.tokens) {
            if let Some(v) = value {
                usage.insert((*key).into(), v.into());
            }
        }
        m.insert("usage".into(), Value::Object(usage));
    }
    Value::Object(m)
}

/// Converts a queue row into `ChatQueuedMessage` JSON; `content` has no omitempty, so a parse
/// error or a JSON `null` is written as `null`.
pub fn queued_message(row: &QueuedRow, framing: Framing) -> Value {
    let content = match decode_content(&row.content, framing) {
        Ok(Some(parts)) => encode_parts(parts, framing),
        Ok(None) => Value::Null,
        Err(e) => {
            tracing::debug!(queued.id = row.id, error = %e, "queued message content unreadable");
            Value::Null
        }
    };
    let mut m = Map::new();
    m.insert("id".into(), row.id.into());
    m.insert("chat_id".into(), row.chat_id.to_string().into());
    m.insert("content".into(), content);
    m.insert("created_at".into(), gojson::rfc3339(&row.created_at).into());
    Value::Object(m)
}

/// `ParseContent`: version 1 decodes straight into parts; the stand-in never writes version 0,
/// so it is treated like any other unsupported version.
fn parse_parts(content: &Value, row: &MessageRow, framing: Framing) -> Option<Vec<Part>> {
    if row.content_version != 1 {
        tracing::debug!(
            message.id = row.id,
            content_version = row.content_version,
            "unsupported content version"
        );
        return None;
    }
    match decode_content(content, framing) {
        Ok(parts) => parts,
        Err(e) => {
            tracing::debug!(message.id = row.id, error = %e, "message content unreadable");
            None
        }
    }
}

fn encode_parts(mut parts: Vec<Part>, framing: Framing) -> Value {
    for part in &mut parts {
        part.strip_internal(framing);
    }
    Value::Array(parts.iter().map(|p| p.encode(framing)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row() -> MessageRow {
        MessageRow {
            id: 1001,
            chat_id: "11111111-1111-4111-8111-111111111111".parse().unwrap(),
            model_config_id: Some("22222222-2222-4222-8222-222222222222".parse().unwrap()),
            created_at: DateTime::parse_from_rfc3339("2026-03-18T10:00:02.123456Z")
                .unwrap()
                .to_utc(),
            role: "assistant".into(),
            content: Some(json!([{"text": "Hello!", "type": "text"}])),
            content_version: 1,
            tokens: [Some(812), Some(5), Some(817), None, None, None, None],
            created_by: None,
        }
    }

    #[test]
    fn assistant_message_matches_tv1() {
        let got = gojson::to_string(&chat_message(&row(), Framing::Envelope));
        let want = concat!(
            r#"{"id":1001,"chat_id":"11111111-1111-4111-8111-111111111111","#,
            r#""model_config_id":"22222222-2222-4222-8222-222222222222","#,
            r#""created_at":"2026-03-18T10:00:02.123456Z","role":"assistant","#,
            r#""content":[{"type":"text","text":"Hello!","url":"","media_type":"","#,
            r#""file_id":null,"file_name":"","start_line":0,"end_line":0,"content":""}],"#,
            r#""usage":{"input_tokens":812,"output_tokens":5,"total_tokens":817}}"#
        );
        assert_eq!(got, want);
    }

    #[test]
    fn unreadable_content_is_dropped_and_usage_omitted() {
        let mut r = row();
        r.content = Some(json!({"not": "an array"}));
        r.tokens = [None; 7];
        let got = chat_message(&r, Framing::Envelope);
        assert!(got.get("content").is_none() && got.get("usage").is_none());
    }
}
