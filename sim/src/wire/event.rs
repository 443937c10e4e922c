//! `ChatStreamEvent`s, encoded once when they are made, and the WebSocket frames that carry
//! them.
//!
//! An event is encoded at its source and then shared (cache, local fan-out, every subscriber),
//! so frames are built by concatenation, as a Go `json.Encoder` would have written them.

use std::sync::Arc;

use serde_json::{Map, Value};
use uuid::Uuid;

use super::part::Part;
use super::Framing;
use crate::gojson;

/// The `type` of a stream event, kept beside its bytes so routing needs no re-parse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventKind {
    Message,
    MessagePart,
    Status,
    Error,
    Retry,
    QueueUpdate,
}

/// One encoded `ChatStreamEvent`.
#[derive(Debug, Clone)]
pub struct StreamEvent {
    pub kind: EventKind,
    /// The message id of a `message` event (the cache and cursor key); 0 otherwise.
    pub message_id: i64,
    /// Compact JSON with Go's HTML escaping, without a trailing newline.
    pub json: Arc<str>,
}

impl StreamEvent {
    fn build(kind: EventKind, message_id: i64, chat_id: Uuid, key: &str, payload: Value) -> Self {
        let mut m = Map::new();
        m.insert("type".into(), type_name(kind).into());
        m.insert("chat_id".into(), chat_id.to_string().into());
        if !key.is_empty() {
            m.insert(key.into(), payload);
        }
        let json = gojson::to_string(&Value::Object(m));
        StreamEvent {
            kind,
            message_id,
            json: json.into(),
        }
    }

    /// A durable message; `message` is the `ChatMessage` JSON of the row.
    pub fn message(chat_id: Uuid, message_id: i64, message: Value) -> Self {
        Self::build(EventKind::Message, message_id, chat_id, "message", message)
    }

    /// A streamed delta (`ChatStreamMessagePart{role, part}`), already stripped of internals.
    pub fn message_part(chat_id: Uuid, role: &str, part: &Part, framing: Framing) -> Self {
        let mut payload = Map::new();
        if !role.is_empty() {
            payload.insert("role".into(), role.into());
        }
        let mut part = part.clone();
        part.strip_internal(framing);
        payload.insert("part".into(), part.encode(framing));
        Self::build(
            EventKind::MessagePart,
            0,
            chat_id,
            "message_part",
            Value::Object(payload),
        )
    }

    pub fn status(chat_id: Uuid, status: &str) -> Self {
        let payload = serde_json::json!({ "status": status });
        Self::build(EventKind::Status, 0, chat_id, "status", payload)
    }

    /// An in-band error event; `ChatStreamError` at the target is `{"message": ...}` only.
    pub fn error(chat_id: Uuid, message: &str) -> Self {
        let payload = serde_json::json!({ "message": message });
        Self::build(EventKind::Error, 0, chat_id, "error", payload)
    }

    pub fn retry(chat_id: Uuid, retry: Value) -> Self {
        Self::build(EventKind::Retry, 0, chat_id, "retry", retry)
    }

    /// The whole current queue; an empty queue has no `queued_messages` key (omitempty).
    pub fn queue_update(chat_id: Uuid, queued: Vec<Value>) -> Self {
        let key = if queued.is_empty() {
            ""
        } else {
            "queued_messages"
        };
        Self::build(
            EventKind::QueueUpdate,
            0,
            chat_id,
            key,
            Value::Array(queued),
        )
    }

    /// An event received from another replica's stream, kept as it came. Only its kind is
    /// needed here; the relay forwards parts alone.
    pub fn relayed(kind: EventKind, json: String) -> Self {
        StreamEvent {
            kind,
            message_id: 0,
            json: json.into(),
        }
    }
}

/// The wire name of an event kind.
pub fn type_name(kind: EventKind) -> &'static str {
    match kind {
        EventKind::Message => "message",
        EventKind::MessagePart => "message_part",
        EventKind::Status => "status",
        EventKind::Error => "error",
        EventKind::Retry => "retry",
        EventKind::QueueUpdate => "queue_update",
    }
}

/// One WebSocket text message holding `events`, ending in the newline `json.Encoder` writes.
pub fn frame(events: &[StreamEvent], framing: Framing) -> String {
    let body: usize = events.iter().map(|e| e.json.len() + 1).sum();
    let mut out = String::with_capacity(body + 32);
    if framing == Framing::Envelope {
        out.push_str(r#"{"type":"data","data":"#);
    }
    out.push('[');
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(&event.json);
    }
    out.push(']');
    if framing == Framing::Envelope {
        out.push('}');
    }
    out.push('\n');
    out
}

/// The envelope `error` frame (a `codersdk.Response`), sent only when Subscribe fails.
pub fn envelope_error_frame(message: &str, detail: &str) -> String {
    let body = serde_json::json!({"type": "error", "data": {"message": message, "detail": detail}});
    let mut out = gojson::to_string(&body);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat() -> Uuid {
        "11111111-1111-4111-8111-111111111111".parse().unwrap()
    }

    #[test]
    fn status_and_empty_queue_match_tv4_tv5() {
        let status = StreamEvent::status(chat(), "running");
        let want = r#"{"type":"status","chat_id":"11111111-1111-4111-8111-111111111111","status":{"status":"running"}}"#;
        assert_eq!(&*status.json, want);
        let queue = StreamEvent::queue_update(chat(), vec![]);
        let want = r#"{"type":"queue_update","chat_id":"11111111-1111-4111-8111-111111111111"}"#;
        assert_eq!(&*queue.json, want);
    }

    #[test]
    fn part_event_matches_tv3() {
        let event =
            StreamEvent::message_part(chat(), "assistant", &Part::text("Hel"), Framing::Envelope);
        let want = concat!(
            r#"{"type":"message_part","chat_id":"11111111-1111-4111-8111-111111111111","#,
            r#""message_part":{"role":"assistant","part":{"type":"text","text":"Hel","url":"","#,
            r#""media_type":"","file_id":null,"file_name":"","start_line":0,"end_line":0,"#,
            r#""content":""}}}"#
        );
        assert_eq!(&*event.json, want);
    }

    #[test]
    fn frames_end_in_a_newline() {
        let events = [StreamEvent::status(chat(), "waiting")];
        let envelope = frame(&events, Framing::Envelope);
        assert!(envelope.starts_with(r#"{"type":"data","data":[{"#) && envelope.ends_with("]}\n"));
        let array = frame(&events, Framing::Array);
        assert!(array.starts_with("[{") && array.ends_with("}]\n"));
    }
}
