//! One WebSocket text frame of the chat stream, decoded into the events chatload cares about.
//!
//! Only what the client model needs is decoded: the event type, `chat_id`, and the message's
//! `id`, `chat_id` and `role`. Everything else in an event is skipped unread.

use serde::Deserialize;
use uuid::Uuid;

use super::Framing;

/// A decoded frame.
#[derive(Debug, PartialEq)]
pub enum Frame {
    /// A batch of stream events (a `data` envelope, or a bare array).
    Events(Vec<StreamEvent>),
    /// An envelope `error` frame: the server could not subscribe (protocol doc 4.3).
    Refused(Refusal),
    /// An envelope of another type (e.g. a `ping`); coderd's client skips these too.
    Ignored,
}

/// Why a frame could not be decoded (the server's fault).
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("malformed {framing:?} frame: {source}")]
    Malformed {
        framing: Framing,
        #[source]
        source: serde_json::Error,
    },
}

/// A `ChatStreamEvent`, reduced to what the client model checks.
#[derive(Debug, PartialEq, Deserialize)]
pub struct StreamEvent {
    #[serde(rename = "type")]
    pub kind: EventKind,
    /// The chat the event belongs to; `None` when the server left it out.
    #[serde(default)]
    pub chat_id: Option<Uuid>,
    #[serde(default)]
    pub message: Option<MessageHead>,
    #[serde(default)]
    pub error: Option<StreamError>,
}

/// Event types of the target era; later additions decode as `Other`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Message,
    MessagePart,
    Status,
    QueueUpdate,
    Retry,
    Error,
    #[serde(other)]
    Other,
}

/// The part of a `ChatMessage` the ledger needs.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct MessageHead {
    pub id: i64,
    #[serde(default)]
    pub chat_id: Option<Uuid>,
    #[serde(default)]
    pub role: String,
}

/// `ChatStreamError`: the payload of an `error` event.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct StreamError {
    #[serde(default)]
    pub message: String,
}

/// The `codersdk.Response` carried by an envelope `error` frame.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Refusal {
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub detail: String,
}

/// The envelope of protocol doc 4.5, by its `type`.
#[derive(Deserialize)]
#[serde(tag = "type", content = "data", rename_all = "snake_case")]
enum Envelope {
    Data(Vec<StreamEvent>),
    Error(Refusal),
    #[serde(other)]
    Other,
}

/// Decodes one text frame in the given framing. Trailing whitespace (the newline every coderd
/// frame ends with) is accepted; whether it was there is reported by [`ends_with_newline`].
pub fn decode(framing: Framing, text: &str) -> Result<Frame, FrameError> {
    let malformed = |source| FrameError::Malformed { framing, source };
    match framing {
        Framing::Envelope => match serde_json::from_str::<Envelope>(text).map_err(malformed)? {
            Envelope::Data(events) => Ok(Frame::Events(events)),
            Envelope::Error(refusal) => Ok(Frame::Refused(refusal)),
            Envelope::Other => Ok(Frame::Ignored),
        },
        Framing::Array => serde_json::from_str(text)
            .map(Frame::Events)
            .map_err(malformed),
    }
}

/// coderd ends every frame with one newline in both framings (protocol doc 4.5, 4.6).
pub fn ends_with_newline(text: &str) -> bool {
    text.ends_with('\n')
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = "11111111-1111-4111-8111-111111111111";

    /// Protocol doc 16, TV1: an envelope `data` frame with assistant message 1001.
    const TV1: &str = concat!(
        r#"{"type":"data","data":[{"type":"message","chat_id":"11111111-1111-4111-8111-111111111111","#,
        r#""message":{"id":1001,"chat_id":"11111111-1111-4111-8111-111111111111","#,
        r#""model_config_id":"22222222-2222-4222-8222-222222222222","created_at":"2026-03-18T10:00:02.123456Z","#,
        r#""role":"assistant","content":[{"type":"text","text":"Hello!","url":"","media_type":"","file_id":null,"#,
        r#""file_name":"","start_line":0,"end_line":0,"content":""}],"#,
        r#""usage":{"input_tokens":812,"output_tokens":5,"total_tokens":817}}}]}"#,
        "\n"
    );

    /// Protocol doc 16, TV2: the same event in the array framing.
    const TV2: &str = concat!(
        r#"[{"type":"message","chat_id":"11111111-1111-4111-8111-111111111111","#,
        r#""message":{"id":1001,"chat_id":"11111111-1111-4111-8111-111111111111","#,
        r#""model_config_id":"22222222-2222-4222-8222-222222222222","created_at":"2026-03-18T10:00:02.123456Z","#,
        r#""role":"assistant","content":[{"type":"text","text":"Hello!","mcp_server_config_id":null,"url":"","#,
        r#""media_type":"","file_id":null,"file_name":"","start_line":0,"end_line":0,"content":"","#,
        r#""context_file_path":"","context_file_agent_id":null}],"#,
        r#""usage":{"input_tokens":812,"output_tokens":5,"total_tokens":817}}}]"#,
        "\n"
    );

    fn message_1001() -> StreamEvent {
        let chat = Uuid::parse_str(CHAT).unwrap();
        StreamEvent {
            kind: EventKind::Message,
            chat_id: Some(chat),
            message: Some(MessageHead {
                id: 1001,
                chat_id: Some(chat),
                role: "assistant".into(),
            }),
            error: None,
        }
    }

    #[test]
    fn tv1_envelope_frame_holds_message_1001() {
        assert!(ends_with_newline(TV1));
        let frame = decode(Framing::Envelope, TV1).unwrap();
        assert_eq!(frame, Frame::Events(vec![message_1001()]));
    }

    #[test]
    fn tv2_array_frame_holds_message_1001() {
        assert!(ends_with_newline(TV2));
        let frame = decode(Framing::Array, TV2).unwrap();
        assert_eq!(frame, Frame::Events(vec![message_1001()]));
    }

    #[test]
    fn framings_are_not_interchangeable() {
        assert!(decode(Framing::Array, TV1).is_err());
        assert!(decode(Framing::Envelope, TV2).is_err());
    }

    #[test]
    fn envelope_error_frame_is_a_refusal() {
        let text = concat!(
            r#"{"type":"error","data":{"message":"Chat streaming is not available.","#,
            r#""detail":"Chat stream state is not configured."}}"#,
            "\n"
        );
        let Frame::Refused(refusal) = decode(Framing::Envelope, text).unwrap() else {
            panic!("expected a refusal");
        };
        assert_eq!(refusal.message, "Chat streaming is not available.");
        assert_eq!(refusal.detail, "Chat stream state is not configured.");
    }

    #[test]
    fn ping_envelope_is_ignored() {
        let frame = decode(Framing::Envelope, "{\"type\":\"ping\",\"data\":null}\n").unwrap();
        assert_eq!(frame, Frame::Ignored);
    }

    #[test]
    fn other_event_types_decode_without_payload() {
        let text = concat!(
            r#"[{"type":"status","chat_id":"11111111-1111-4111-8111-111111111111","status":{"status":"running"}},"#,
            r#"{"type":"queue_update","chat_id":"11111111-1111-4111-8111-111111111111"},"#,
            r#"{"type":"error","chat_id":"11111111-1111-4111-8111-111111111111","error":{"message":"dropped messages"}},"#,
            r#"{"type":"history_reset","chat_id":"11111111-1111-4111-8111-111111111111"}]"#
        );
        let Frame::Events(events) = decode(Framing::Array, text).unwrap() else {
            panic!("expected events");
        };
        let kinds: Vec<_> = events.iter().map(|event| event.kind).collect();
        assert_eq!(
            kinds,
            [
                EventKind::Status,
                EventKind::QueueUpdate,
                EventKind::Error,
                EventKind::Other
            ]
        );
        assert_eq!(
            events[2].error.as_ref().unwrap().message,
            "dropped messages"
        );
        assert!(!ends_with_newline(text));
    }
}
