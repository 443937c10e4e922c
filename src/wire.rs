//! Bytes on the wire, as coderd writes them: Go-escaped JSON, error bodies and stream frames.
//!
//! Events are kept as their encoded JSON so that a frame is built by concatenation, and so that
//! bytes received from coderd reach clients unchanged.

use bytes::Bytes;
use serde::Serialize;
use uuid::Uuid;

use crate::config::Framing;

/// coderd's `chatStreamBatchSize`: events per WebSocket frame at most.
pub const MAX_EVENTS_PER_FRAME: usize = 256;

/// WebSocket settings for every socket chatcache holds: small buffers, because a sidecar holds a
/// socket per subscriber and per cached chat (tungstenite's defaults are 128 KiB each way), and
/// the message limit of coderd's stock client (4 MiB) for what it reads from coderd.
pub fn websocket_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    let mut config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default();
    config.read_buffer_size = 8 << 10;
    config.write_buffer_size = 0;
    config.max_message_size = Some(4 << 20);
    config.max_frame_size = Some(4 << 20);
    config
}

/// Encodes a value as Go's `json.Encoder` would with HTML escaping on (no trailing newline).
pub fn go_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let plain = serde_json::to_vec(value).expect("serializing plain data cannot fail");
    go_escape(&plain)
}

/// Rewrites serde_json output into Go's escaping: `<`, `>`, `&`, U+2028 and U+2029 become
/// `\u003c`-style escapes. (Go writes `\b` and `\f` short since 1.22, as serde_json does.)
///
/// The HTML characters and the two separators can only occur inside strings in valid JSON, so a
/// scan that tracks escapes is enough.
pub fn go_escape(json: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(json.len() + 16);
    let mut i = 0;
    while i < json.len() {
        let b = json[i];
        match b {
            b'\\' if i + 1 < json.len() => {
                out.push(b'\\');
                out.push(json[i + 1]);
                i += 2;
                continue;
            }
            b'<' => out.extend_from_slice(b"\\u003c"),
            b'>' => out.extend_from_slice(b"\\u003e"),
            b'&' => out.extend_from_slice(b"\\u0026"),
            0xE2 if json.get(i + 1) == Some(&0x80)
                && matches!(json.get(i + 2), Some(0xA8 | 0xA9)) =>
            {
                let last = if json[i + 2] == 0xA8 {
                    b"\\u2028"
                } else {
                    b"\\u2029"
                };
                out.extend_from_slice(last);
                i += 3;
                continue;
            }
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// `codersdk.Response`: the body of every coderd HTTP error.
#[derive(Debug, Serialize)]
pub struct ErrorBody<'a> {
    pub message: &'a str,
    #[serde(skip_serializing_if = "str::is_empty")]
    pub detail: &'a str,
}

/// An error body exactly as `httpapi.Write` sends it: compact, escaped, newline-terminated.
pub fn error_body(message: &str, detail: &str) -> Bytes {
    let mut body = go_json(&ErrorBody { message, detail });
    body.push(b'\n');
    Bytes::from(body)
}

/// An in-band `error` event (`ChatStreamError` at the target is just `{"message"}`).
pub fn error_event(chat: Uuid, message: &str) -> Bytes {
    #[derive(Serialize)]
    struct StreamError<'a> {
        message: &'a str,
    }
    #[derive(Serialize)]
    struct Event<'a> {
        #[serde(rename = "type")]
        kind: &'static str,
        chat_id: Uuid,
        error: StreamError<'a>,
    }
    Bytes::from(go_json(&Event {
        kind: "error",
        chat_id: chat,
        error: StreamError { message },
    }))
}

/// Builds one frame from at most [`MAX_EVENTS_PER_FRAME`] encoded events.
pub fn frame(framing: Framing, events: &[Bytes]) -> Vec<u8> {
    let payload: usize = events.iter().map(|e| e.len() + 1).sum();
    let mut out = Vec::with_capacity(payload + 24);
    match framing {
        Framing::Envelope => out.extend_from_slice(b"{\"type\":\"data\",\"data\":["),
        Framing::Array => out.push(b'['),
    }
    for (i, event) in events.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(event);
    }
    match framing {
        Framing::Envelope => out.extend_from_slice(b"]}\n"),
        Framing::Array => out.extend_from_slice(b"]\n"),
    }
    out
}

/// Splits a received frame into its events, keeping each event's exact bytes.
pub fn split_frame(framing: Framing, text: &str) -> Result<FrameContent, String> {
    use serde_json::value::RawValue;
    match framing {
        Framing::Array => {
            let events: Vec<Box<RawValue>> =
                serde_json::from_str(text).map_err(|e| e.to_string())?;
            Ok(FrameContent::Events(
                events.into_iter().map(raw_bytes).collect(),
            ))
        }
        Framing::Envelope => {
            #[derive(serde::Deserialize)]
            struct Envelope<'a> {
                #[serde(rename = "type")]
                kind: &'a str,
                #[serde(borrow)]
                data: Option<&'a RawValue>,
            }
            let env: Envelope<'_> = serde_json::from_str(text).map_err(|e| e.to_string())?;
            match env.kind {
                "data" => {
                    let data = env.data.ok_or("data frame without data")?;
                    let events: Vec<Box<RawValue>> =
                        serde_json::from_str(data.get()).map_err(|e| e.to_string())?;
                    Ok(FrameContent::Events(
                        events.into_iter().map(raw_bytes).collect(),
                    ))
                }
                "ping" => Ok(FrameContent::Events(Vec::new())),
                "error" => Ok(FrameContent::Error(
                    env.data.map(|d| d.get().to_string()).unwrap_or_default(),
                )),
                other => Err(format!("unknown envelope type {other:?}")),
            }
        }
    }
}

#[allow(clippy::boxed_local)] // serde hands RawValues out boxed
fn raw_bytes(raw: Box<serde_json::value::RawValue>) -> Bytes {
    Bytes::from(raw.get().as_bytes().to_vec())
}

/// What one upstream frame held.
#[derive(Debug)]
pub enum FrameContent {
    Events(Vec<Bytes>),
    /// An envelope `error` frame: the upstream subscription failed.
    Error(String),
}

/// The parts of an event chatcache needs to route it; the bytes stay as received.
#[derive(Debug, serde::Deserialize)]
pub struct EventHead {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub message: Option<MessageHead>,
    #[serde(default)]
    pub status: Option<StatusHead>,
    #[serde(default)]
    pub queued_messages: Option<serde::de::IgnoredAny>,
    #[serde(default)]
    pub error: Option<ErrorHead>,
}

#[derive(Debug, serde::Deserialize)]
pub struct MessageHead {
    pub id: i64,
    #[serde(default)]
    pub role: Option<String>,
}

#[derive(Debug, serde::Deserialize)]
pub struct StatusHead {
    pub status: String,
}

#[derive(Debug, serde::Deserialize)]
pub struct ErrorHead {
    #[serde(default)]
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_like_go() {
        let v = serde_json::json!({"a": "<b>&\u{2028}\u{8}\u{c}\\b"});
        assert_eq!(
            String::from_utf8(go_json(&v)).unwrap(),
            r#"{"a":"\u003cb\u003e\u0026\u2028\b\f\\b"}"#
        );
    }

    #[test]
    fn after_id_error_body_matches_coderd() {
        let body = error_body(
            "Invalid after_id parameter.",
            r#"strconv.ParseInt: parsing "abc": invalid syntax"#,
        );
        assert_eq!(
            &body[..],
            b"{\"message\":\"Invalid after_id parameter.\",\"detail\":\"strconv.ParseInt: parsing \\\"abc\\\": invalid syntax\"}\n"
        );
        assert_eq!(&error_body("Nope.", "")[..], b"{\"message\":\"Nope.\"}\n");
    }

    #[test]
    fn frames_round_trip_in_both_framings() {
        let events = vec![
            Bytes::from_static(b"{\"type\":\"status\"}"),
            Bytes::from_static(b"{}"),
        ];
        for framing in [Framing::Envelope, Framing::Array] {
            let f = frame(framing, &events);
            assert_eq!(*f.last().unwrap(), b'\n');
            let text = std::str::from_utf8(&f).unwrap();
            match split_frame(framing, text).unwrap() {
                FrameContent::Events(got) => assert_eq!(got, events),
                FrameContent::Error(e) => panic!("{e}"),
            }
        }
        assert_eq!(
            frame(Framing::Envelope, &events),
            b"{\"type\":\"data\",\"data\":[{\"type\":\"status\"},{}]}\n"
        );
    }

    #[test]
    fn error_event_has_coderd_shape() {
        let chat: Uuid = "11111111-1111-4111-8111-111111111111".parse().unwrap();
        assert_eq!(
            &error_event(chat, "dropped messages")[..],
            br#"{"type":"error","chat_id":"11111111-1111-4111-8111-111111111111","error":{"message":"dropped messages"}}"#
        );
    }
}
