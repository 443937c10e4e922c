//! `chat_messages` rows → `message` events, byte for byte as coderd's `db2sdk.ChatMessage`.
//!
//! The content column is `jsonb`, whose key order Postgres rewrites, so parts are decoded and
//! encoded again in the declaration order of coderd's `ChatMessagePart` for the configured era,
//! with its `omitempty` rules and `StripInternal` applied.

use chrono::{DateTime, Timelike, Utc};
use serde_json::{Map, Value};
use uuid::Uuid;

use crate::config::Framing;
use crate::wire::go_escape;

/// One row of the catch-up query, in the columns rendering needs.
#[derive(Debug, Clone)]
pub struct MessageRow {
    pub id: i64,
    pub chat_id: Uuid,
    pub created_by: Option<Uuid>,
    pub model_config_id: Option<Uuid>,
    pub created_at: DateTime<Utc>,
    pub role: String,
    pub content: Option<Value>,
    pub content_version: i16,
    /// input, output, total, reasoning, cache_creation, cache_read tokens and context_limit.
    pub usage: [Option<i64>; 7],
}

/// A row chatcache cannot render faithfully; the chat is left to coderd.
#[derive(Debug, thiserror::Error)]
#[error("message {id} has content_version {version}, which chatcache does not render")]
pub struct UnsupportedContent {
    pub id: i64,
    pub version: i16,
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

/// How a part field is written.
#[derive(Clone, Copy)]
enum Field {
    /// Always written; the default when absent.
    Str,
    Int,
    /// `uuid.NullUUID`: always written, `null` when unset.
    NullUuid,
    /// `omitempty` string / bool / raw JSON.
    OptStr,
    OptBool,
    OptRaw,
    /// `[]byte` with omitempty: base64 on the wire, stripped when `file_id` is set.
    Data,
    /// Internal: never reaches clients.
    Internal,
}

/// `ChatMessagePart` in declaration order. The flag marks fields that exist only in the
/// late-March 2026 struct (PR #23522 and #23592), i.e. in the array-framing era.
const PARTS: &[(&str, Field, bool)] = &[
    ("type", Field::Str, false),
    ("text", Field::Str, false),
    ("signature", Field::OptStr, false),
    ("tool_call_id", Field::OptStr, false),
    ("tool_name", Field::OptStr, false),
    ("mcp_server_config_id", Field::NullUuid, true),
    ("args", Field::OptRaw, false),
    ("args_delta", Field::OptStr, false),
    ("result", Field::OptRaw, false),
    ("result_delta", Field::OptStr, false),
    ("is_error", Field::OptBool, false),
    ("is_media", Field::OptBool, false),
    ("source_id", Field::OptStr, false),
    ("url", Field::Str, false),
    ("title", Field::OptStr, false),
    ("media_type", Field::Str, false),
    ("data", Field::Data, false),
    ("file_id", Field::NullUuid, false),
    ("file_name", Field::Str, false),
    ("start_line", Field::Int, false),
    ("end_line", Field::Int, false),
    ("content", Field::Str, false),
    ("provider_metadata", Field::Internal, false),
    ("provider_executed", Field::OptBool, false),
    ("context_file_path", Field::Str, true),
    ("context_file_content", Field::Internal, true),
    ("context_file_truncated", Field::OptBool, true),
    ("context_file_agent_id", Field::NullUuid, true),
    ("context_file_os", Field::Internal, true),
    ("context_file_directory", Field::Internal, true),
];

/// Renders a row as a complete `message` stream event.
pub fn message_event(row: &MessageRow, framing: Framing) -> Result<Vec<u8>, UnsupportedContent> {
    if row.content.is_some() && row.content_version != 1 {
        return Err(UnsupportedContent {
            id: row.id,
            version: row.content_version,
        });
    }
    let mut message = Map::new();
    message.insert("id".into(), row.id.into());
    message.insert("chat_id".into(), row.chat_id.to_string().into());
    if let Some(by) = row.created_by {
        message.insert("created_by".into(), by.to_string().into());
    }
    if let Some(mc) = row.model_config_id {
        message.insert("model_config_id".into(), mc.to_string().into());
    }
    message.insert("created_at".into(), go_time(&row.created_at).into());
    message.insert("role".into(), row.role.clone().into());
    if let Some(parts) = row.content.as_ref().and_then(|c| render_parts(c, framing)) {
        if !parts.is_empty() {
            message.insert("content".into(), Value::Array(parts));
        }
    }
    if row.usage.iter().any(Option::is_some) {
        let usage: Map<String, Value> = USAGE_KEYS
            .iter()
            .zip(row.usage.iter())
            .filter_map(|(k, v)| v.map(|v| (k.to_string(), Value::from(v))))
            .collect();
        message.insert("usage".into(), Value::Object(usage));
    }
    let mut event = Map::new();
    event.insert("type".into(), "message".into());
    event.insert("chat_id".into(), row.chat_id.to_string().into());
    event.insert("message".into(), Value::Object(message));
    let plain = serde_json::to_vec(&Value::Object(event)).expect("JSON values always encode");
    Ok(go_escape(&plain))
}

/// Go's RFC 3339 with nanoseconds trimmed of trailing zeros, in UTC.
pub fn go_time(t: &DateTime<Utc>) -> String {
    let base = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = t.nanosecond() % 1_000_000_000;
    if nanos == 0 {
        return format!("{base}Z");
    }
    let frac = format!("{nanos:09}");
    format!("{base}.{}Z", frac.trim_end_matches('0'))
}

/// Decodes stored parts like `json.Unmarshal` into `[]ChatMessagePart`; `None` on any error
/// (coderd swallows the error and sends the message without content).
fn render_parts(content: &Value, framing: Framing) -> Option<Vec<Value>> {
    let late_march = framing == Framing::Array;
    match content {
        Value::Null => Some(Vec::new()),
        Value::Array(parts) => parts.iter().map(|p| render_part(p, late_march)).collect(),
        _ => None,
    }
}

fn render_part(part: &Value, late_march: bool) -> Option<Value> {
    let obj = match part {
        Value::Object(o) => o,
        Value::Null => &Map::new(),
        _ => return None,
    };
    let file_id_set = obj
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("file_id") && matches!(v, Value::String(_)));
    let mut out = Map::new();
    for &(key, kind, late) in PARTS {
        if late && !late_march {
            continue;
        }
        // Go's decoder matches keys case-insensitively, preferring an exact match.
        let v = obj
            .get(key)
            .or_else(|| {
                obj.iter()
                    .find(|(k, _)| k.eq_ignore_ascii_case(key))
                    .map(|(_, v)| v)
            })
            .filter(|v| !v.is_null());
        match kind {
            Field::Str => {
                let s = match v {
                    Some(Value::String(s)) => s.clone(),
                    None => String::new(),
                    _ => return None,
                };
                out.insert(key.into(), s.into());
            }
            Field::Int => {
                let n = match v {
                    Some(Value::Number(n)) => n.as_i64()?,
                    None => 0,
                    _ => return None,
                };
                out.insert(key.into(), n.into());
            }
            Field::NullUuid => {
                let id = match v {
                    Some(Value::String(s)) => Value::String(s.parse::<Uuid>().ok()?.to_string()),
                    None => Value::Null,
                    _ => return None,
                };
                out.insert(key.into(), id);
            }
            Field::OptStr => match v {
                Some(Value::String(s)) if !s.is_empty() => {
                    out.insert(key.into(), s.clone().into());
                }
                Some(Value::String(_)) | None => {}
                _ => return None,
            },
            Field::OptBool => match v {
                Some(Value::Bool(true)) => {
                    out.insert(key.into(), true.into());
                }
                Some(Value::Bool(false)) | None => {}
                _ => return None,
            },
            Field::OptRaw => {
                if let Some(v) = v {
                    out.insert(key.into(), v.clone());
                }
            }
            Field::Data => match v {
                Some(Value::String(s)) if !s.is_empty() && !file_id_set => {
                    out.insert(key.into(), s.clone().into());
                }
                Some(Value::String(_)) | None => {}
                _ => return None,
            },
            Field::Internal => {}
        }
    }
    Some(Value::Object(out))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn row(content: Value) -> MessageRow {
        MessageRow {
            id: 1001,
            chat_id: "11111111-1111-4111-8111-111111111111".parse().unwrap(),
            created_by: None,
            model_config_id: Some("22222222-2222-4222-8222-222222222222".parse().unwrap()),
            created_at: Utc.with_ymd_and_hms(2026, 3, 18, 10, 0, 2).unwrap()
                + chrono::Duration::microseconds(123_456),
            role: "assistant".into(),
            content: Some(content),
            content_version: 1,
            usage: [Some(812), Some(5), Some(817), None, None, None, None],
        }
    }

    /// TV1 of the protocol doc, without the envelope.
    #[test]
    fn renders_test_vector_one() {
        let content = serde_json::json!([{"text": "Hello!", "type": "text"}]);
        let got = String::from_utf8(message_event(&row(content), Framing::Envelope).unwrap());
        let want = concat!(
            r#"{"type":"message","chat_id":"11111111-1111-4111-8111-111111111111","#,
            r#""message":{"id":1001,"chat_id":"11111111-1111-4111-8111-111111111111","#,
            r#""model_config_id":"22222222-2222-4222-8222-222222222222","#,
            r#""created_at":"2026-03-18T10:00:02.123456Z","role":"assistant","#,
            r#""content":[{"type":"text","text":"Hello!","url":"","media_type":"","#,
            r#""file_id":null,"file_name":"","start_line":0,"end_line":0,"content":""}],"#,
            r#""usage":{"input_tokens":812,"output_tokens":5,"total_tokens":817}}}"#
        );
        assert_eq!(got.unwrap(), want);
    }

    /// TV2's part, for the array era.
    #[test]
    fn renders_late_march_parts_for_array_framing() {
        let content = serde_json::json!([{"type": "text", "text": "Hello!"}]);
        let got = String::from_utf8(message_event(&row(content), Framing::Array).unwrap()).unwrap();
        assert!(got.contains(
            r#"[{"type":"text","text":"Hello!","mcp_server_config_id":null,"url":"","media_type":"","file_id":null,"file_name":"","start_line":0,"end_line":0,"content":"","context_file_path":"","context_file_agent_id":null}]"#
        ), "{got}");
    }

    #[test]
    fn strips_internal_fields_and_keeps_tool_json() {
        let content = serde_json::json!([{
            "type": "tool-call", "tool_call_id": "c1", "tool_name": "ls",
            "args": {"path": "/<tmp>"}, "provider_metadata": {"x": 1},
            "data": "AAAA", "file_id": "33333333-3333-4333-8333-333333333333"
        }]);
        let got = String::from_utf8(message_event(&row(content), Framing::Envelope).unwrap());
        let got = got.unwrap();
        assert!(
            !got.contains("provider_metadata") && !got.contains("AAAA"),
            "{got}"
        );
        assert!(
            got.contains(r#""args":{"path":"/\u003ctmp\u003e"}"#),
            "{got}"
        );
        assert!(
            got.contains(r#""file_id":"33333333-3333-4333-8333-333333333333""#),
            "{got}"
        );
    }

    #[test]
    fn malformed_content_is_dropped_and_old_versions_refused() {
        let got = message_event(&row(serde_json::json!({"not": "parts"})), Framing::Envelope);
        assert!(!String::from_utf8(got.unwrap())
            .unwrap()
            .contains("\"content\""));
        let mut old = row(serde_json::json!("hi"));
        old.content_version = 0;
        assert_eq!(
            message_event(&old, Framing::Envelope).unwrap_err().version,
            0
        );
    }

    #[test]
    fn time_trims_zeros() {
        let t = Utc.with_ymd_and_hms(2026, 3, 18, 10, 0, 2).unwrap();
        assert_eq!(go_time(&t), "2026-03-18T10:00:02Z");
        assert_eq!(
            go_time(&(t + chrono::Duration::microseconds(120_000))),
            "2026-03-18T10:00:02.12Z"
        );
    }
}
