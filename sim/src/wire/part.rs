//! `ChatMessagePart`: decoding stored content (content_version 1) and encoding it for clients.
//!
//! The same struct is coderd's storage and wire format, but the wire shape differs by era: the
//! target (envelope framing) writes the struct as it was after PR #23250, the array era adds
//! `mcp_server_config_id` and the `context_file_*` fields. Decoding follows Go's
//! `json.Unmarshal`: keys match fields exactly or case-insensitively, unknown keys are ignored,
//! `null` leaves a field at its zero value, and any type mismatch fails the whole content.

use base64::Engine;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::Framing;
use crate::gojson;

/// One decoded part. Field order and types mirror coderd's struct; see `encode` for which of
/// them reach the wire in each era.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Part {
    pub kind: String,
    pub text: String,
    pub signature: String,
    pub tool_call_id: String,
    pub tool_name: String,
    pub mcp_server_config_id: Option<Uuid>,
    /// Raw JSON kept as a value; Go re-compacts a `json.RawMessage` when it writes it.
    pub args: Option<Value>,
    pub args_delta: String,
    pub result: Option<Value>,
    pub result_delta: String,
    pub is_error: bool,
    pub is_media: bool,
    pub source_id: String,
    pub url: String,
    pub title: String,
    pub media_type: String,
    pub data: Option<Vec<u8>>,
    pub file_id: Option<Uuid>,
    pub file_name: String,
    pub start_line: i64,
    pub end_line: i64,
    pub content: String,
    /// Internal to coderd; always removed by `strip_internal` before a client sees it.
    pub provider_metadata: Option<Value>,
    pub provider_executed: bool,
    pub context_file_path: String,
    pub context_file_content: String,
    pub context_file_truncated: bool,
    pub context_file_agent_id: Option<Uuid>,
    pub context_file_os: String,
    pub context_file_directory: String,
}

/// Why stored content could not be decoded. coderd swallows this and sends the message
/// without content, so the text only reaches logs.
#[derive(Debug, thiserror::Error)]
#[error("parse chat message content: {0}")]
pub struct ContentError(String);

impl Part {
    /// A plain text part, as users and the simulated model write them.
    pub fn text(text: impl Into<String>) -> Part {
        Part {
            kind: "text".into(),
            text: text.into(),
            ..Part::default()
        }
    }

    /// Removes what coderd never lets a client see: provider metadata, inline data of a part
    /// that references a file, and (array era) the context file's internal fields.
    pub fn strip_internal(&mut self, framing: Framing) {
        self.provider_metadata = None;
        if self.file_id.is_some() {
            self.data = None;
        }
        if framing == Framing::Array {
            self.context_file_content.clear();
            self.context_file_os.clear();
            self.context_file_directory.clear();
        }
    }

    /// Encodes the part in Go's field order for the given era.
    pub fn encode(&self, framing: Framing) -> Value {
        let array = framing == Framing::Array;
        let mut m = Map::new();
        m.insert("type".into(), self.kind.clone().into());
        m.insert("text".into(), self.text.clone().into());
        put_str(&mut m, "signature", &self.signature);
        put_str(&mut m, "tool_call_id", &self.tool_call_id);
        put_str(&mut m, "tool_name", &self.tool_name);
        if array {
            m.insert(
                "mcp_server_config_id".into(),
                uuid_or_null(self.mcp_server_config_id),
            );
        }
        put_raw(&mut m, "args", &self.args);
        put_str(&mut m, "args_delta", &self.args_delta);
        put_raw(&mut m, "result", &self.result);
        put_str(&mut m, "result_delta", &self.result_delta);
        put_bool(&mut m, "is_error", self.is_error);
        put_bool(&mut m, "is_media", self.is_media);
        put_str(&mut m, "source_id", &self.source_id);
        m.insert("url".into(), self.url.clone().into());
        put_str(&mut m, "title", &self.title);
        m.insert("media_type".into(), self.media_type.clone().into());
        if let Some(data) = self.data.as_ref().filter(|d| !d.is_empty()) {
            let encoded = base64::engine::general_purpose::STANDARD.encode(data);
            m.insert("data".into(), encoded.into());
        }
        m.insert("file_id".into(), uuid_or_null(self.file_id));
        m.insert("file_name".into(), self.file_name.clone().into());
        m.insert("start_line".into(), self.start_line.into());
        m.insert("end_line".into(), self.end_line.into());
        m.insert("content".into(), self.content.clone().into());
        put_raw(&mut m, "provider_metadata", &self.provider_metadata);
        put_bool(&mut m, "provider_executed", self.provider_executed);
        if array {
            m.insert(
                "context_file_path".into(),
                self.context_file_path.clone().into(),
            );
            put_str(&mut m, "context_file_content", &self.context_file_content);
            put_bool(
                &mut m,
                "context_file_truncated",
                self.context_file_truncated,
            );
            m.insert(
                "context_file_agent_id".into(),
                uuid_or_null(self.context_file_agent_id),
            );
            put_str(&mut m, "context_file_os", &self.context_file_os);
            put_str(
                &mut m,
                "context_file_directory",
                &self.context_file_directory,
            );
        }
        Value::Object(m)
    }

    /// Decodes one element of a content array, as `json.Unmarshal` fills the struct.
    fn decode(value: &Value, framing: Framing) -> Result<Part, ContentError> {
        let mut part = Part::default();
        let object = match value {
            Value::Null => return Ok(part),
            Value::Object(object) => object,
            other => return Err(mismatch("ChatMessagePart", other)),
        };
        for (key, value) in object {
            let Some(field) = field_for(key, framing) else {
                continue;
            };
            part.set(field, value)?;
        }
        Ok(part)
    }

    fn set(&mut self, field: &'static str, v: &Value) -> Result<(), ContentError> {
        match field {
            "type" => set_str(&mut self.kind, field, v),
            "text" => set_str(&mut self.text, field, v),
            "signature" => set_str(&mut self.signature, field, v),
            "tool_call_id" => set_str(&mut self.tool_call_id, field, v),
            "tool_name" => set_str(&mut self.tool_name, field, v),
            "mcp_server_config_id" => set_uuid(&mut self.mcp_server_config_id, field, v),
            "args" => {
                self.args = Some(v.clone());
                Ok(())
            }
            "args_delta" => set_str(&mut self.args_delta, field, v),
            "result" => {
                self.result = Some(v.clone());
                Ok(())
            }
            "result_delta" => set_str(&mut self.result_delta, field, v),
            "is_error" => set_bool(&mut self.is_error, field, v),
            "is_media" => set_bool(&mut self.is_media, field, v),
            "source_id" => set_str(&mut self.source_id, field, v),
            "url" => set_str(&mut self.url, field, v),
            "title" => set_str(&mut self.title, field, v),
            "media_type" => set_str(&mut self.media_type, field, v),
            "data" => set_bytes(&mut self.data, field, v),
            "file_id" => set_uuid(&mut self.file_id, field, v),
            "file_name" => set_str(&mut self.file_name, field, v),
            "start_line" => set_int(&mut self.start_line, field, v),
            "end_line" => set_int(&mut self.end_line, field, v),
            "content" => set_str(&mut self.content, field, v),
            "provider_metadata" => {
                self.provider_metadata = Some(v.clone());
                Ok(())
            }
            "provider_executed" => set_bool(&mut self.provider_executed, field, v),
            "context_file_path" => set_str(&mut self.context_file_path, field, v),
            "context_file_content" => set_str(&mut self.context_file_content, field, v),
            "context_file_truncated" => set_bool(&mut self.context_file_truncated, field, v),
            "context_file_agent_id" => set_uuid(&mut self.context_file_agent_id, field, v),
            "context_file_os" => set_str(&mut self.context_file_os, field, v),
            "context_file_directory" => set_str(&mut self.context_file_directory, field, v),
            _ => Ok(()),
        }
    }
}

/// Decodes a content_version 1 column into parts, as `json.Unmarshal` into a slice does.
/// `Ok(None)` is Go's nil slice (JSON `null`), which omitempty drops.
pub fn decode_content(value: &Value, framing: Framing) -> Result<Option<Vec<Part>>, ContentError> {
    match value {
        Value::Null => Ok(None),
        Value::Array(items) => items
            .iter()
            .map(|item| Part::decode(item, framing))
            .collect::<Result<_, _>>()
            .map(Some),
        other => Err(mismatch("[]ChatMessagePart", other)),
    }
}

/// Encodes parts as coderd stores them in `chat_messages.content` (the target's struct).
pub fn encode_for_storage(parts: &[Part]) -> Value {
    Value::Array(parts.iter().map(|p| p.encode(Framing::Envelope)).collect())
}

/// Field names of the struct in each era, in declaration order.
const TARGET_FIELDS: &[&str] = &[
    "type",
    "text",
    "signature",
    "tool_call_id",
    "tool_name",
    "args",
    "args_delta",
    "result",
    "result_delta",
    "is_error",
    "is_media",
    "source_id",
    "url",
    "title",
    "media_type",
    "data",
    "file_id",
    "file_name",
    "start_line",
    "end_line",
    "content",
    "provider_metadata",
    "provider_executed",
];
const ARRAY_ONLY_FIELDS: &[&str] = &[
    "mcp_server_config_id",
    "context_file_path",
    "context_file_content",
    "context_file_truncated",
    "context_file_agent_id",
    "context_file_os",
    "context_file_directory",
];

/// Finds the struct field a JSON key fills: an exact match first, else Go's case-insensitive
/// match.
fn field_for(key: &str, framing: Framing) -> Option<&'static str> {
    let extra: &[&'static str] = if framing == Framing::Array {
        ARRAY_ONLY_FIELDS
    } else {
        &[]
    };
    let fields = || TARGET_FIELDS.iter().chain(extra.iter()).copied();
    fields()
        .find(|f| *f == key)
        .or_else(|| fields().find(|f| f.eq_ignore_ascii_case(key)))
}

fn mismatch(target: &str, value: &Value) -> ContentError {
    let kind = match value {
        Value::Null => "null",
        Value::Bool(_) => "bool",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    };
    ContentError(format!(
        "json: cannot unmarshal {kind} into Go value of type {target}"
    ))
}

fn set_str(slot: &mut String, field: &str, v: &Value) -> Result<(), ContentError> {
    match v {
        Value::Null => Ok(()),
        Value::String(s) => {
            *slot = s.clone();
            Ok(())
        }
        other => Err(mismatch(&format!("string (field {field})"), other)),
    }
}

fn set_bool(slot: &mut bool, field: &str, v: &Value) -> Result<(), ContentError> {
    match v {
        Value::Null => Ok(()),
        Value::Bool(b) => {
            *slot = *b;
            Ok(())
        }
        other => Err(mismatch(&format!("bool (field {field})"), other)),
    }
}

fn set_int(slot: &mut i64, field: &str, v: &Value) -> Result<(), ContentError> {
    match v {
        Value::Null => Ok(()),
        Value::Number(n) if n.is_i64() => {
            *slot = n.as_i64().unwrap_or_default();
            Ok(())
        }
        other => Err(mismatch(&format!("int (field {field})"), other)),
    }
}

/// `uuid.NullUUID`: `null` is "not set", a string must parse, anything else fails.
fn set_uuid(slot: &mut Option<Uuid>, field: &str, v: &Value) -> Result<(), ContentError> {
    match v {
        Value::Null => {
            *slot = None;
            Ok(())
        }
        Value::String(s) => match gojson::parse_uuid(s) {
            Ok(id) => {
                *slot = Some(id);
                Ok(())
            }
            Err(e) => Err(ContentError(e)),
        },
        other => Err(mismatch(&format!("uuid.UUID (field {field})"), other)),
    }
}

/// `[]byte`: standard base64 with padding; Go's decoder skips CR and LF.
fn set_bytes(slot: &mut Option<Vec<u8>>, field: &str, v: &Value) -> Result<(), ContentError> {
    match v {
        Value::Null => {
            *slot = None;
            Ok(())
        }
        Value::String(s) => {
            let cleaned: String = s.chars().filter(|c| *c != '\r' && *c != '\n').collect();
            match base64::engine::general_purpose::STANDARD.decode(cleaned) {
                Ok(bytes) => {
                    *slot = Some(bytes);
                    Ok(())
                }
                Err(e) => Err(ContentError(format!(
                    "illegal base64 data (field {field}): {e}"
                ))),
            }
        }
        other => Err(mismatch(&format!("[]uint8 (field {field})"), other)),
    }
}

fn put_str(m: &mut Map<String, Value>, key: &str, value: &str) {
    if !value.is_empty() {
        m.insert(key.into(), value.into());
    }
}

fn put_bool(m: &mut Map<String, Value>, key: &str, value: bool) {
    if value {
        m.insert(key.into(), true.into());
    }
}

fn put_raw(m: &mut Map<String, Value>, key: &str, value: &Option<Value>) {
    if let Some(v) = value {
        m.insert(key.into(), v.clone());
    }
}

fn uuid_or_null(id: Option<Uuid>) -> Value {
    id.map_or(Value::Null, |id| id.to_string().into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn text_part_has_the_target_shape() {
        let got = gojson::to_string(&Part::text("Hello!").encode(Framing::Envelope));
        let want = r#"{"type":"text","text":"Hello!","url":"","media_type":"","file_id":null,"file_name":"","start_line":0,"end_line":0,"content":""}"#;
        assert_eq!(got, want);
    }

    #[test]
    fn text_part_has_the_array_era_shape() {
        let got = gojson::to_string(&Part::text("Hello!").encode(Framing::Array));
        let want = concat!(
            r#"{"type":"text","text":"Hello!","mcp_server_config_id":null,"url":"","#,
            r#""media_type":"","file_id":null,"file_name":"","start_line":0,"end_line":0,"#,
            r#""content":"","context_file_path":"","context_file_agent_id":null}"#
        );
        assert_eq!(got, want);
    }

    #[test]
    fn decoding_follows_go_rules() {
        let stored = json!([{"TEXT": "hi", "type": "text", "unknown": 1, "start_line": null}]);
        let parts = decode_content(&stored, Framing::Envelope).unwrap().unwrap();
        assert_eq!(parts, vec![Part::text("hi")]);
        assert!(decode_content(&json!([{"text": 3}]), Framing::Envelope).is_err());
        assert!(decode_content(&json!([{"start_line": 1.5}]), Framing::Envelope).is_err());
        assert!(decode_content(&json!({"text": "x"}), Framing::Envelope).is_err());
        assert_eq!(
            decode_content(&Value::Null, Framing::Envelope).unwrap(),
            None
        );
    }

    #[test]
    fn strip_internal_drops_data_of_file_parts() {
        let stored = json!([{"type": "file", "data": "AAE=", "provider_metadata": {"a": 1},
            "file_id": "11111111-1111-4111-8111-111111111111"}]);
        let mut parts = decode_content(&stored, Framing::Envelope).unwrap().unwrap();
        parts[0].strip_internal(Framing::Envelope);
        let got = gojson::to_string(&parts[0].encode(Framing::Envelope));
        assert!(
            !got.contains("data") && !got.contains("provider_metadata"),
            "{got}"
        );
    }
}
