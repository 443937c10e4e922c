//! The properties the fuzz targets check, shared by the libFuzzer binaries in `fuzz_targets/`
//! and by `tests/adversarial/`, which runs them over a seeded corpus on stable Rust.
//!
//! Each function takes arbitrary bytes and panics only when a property does not hold.

use chatcache::config::Framing;
use serde_json::Value;

const FRAMINGS: [Framing; 2] = [Framing::Envelope, Framing::Array];

/// `listen::parse_notify`: never panics; it accepts only what is valid JSON, and a number it
/// reports is the one in the payload.
pub fn notify(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = chatcache::listen::parse_notify(text);
    let value: Result<Value, _> = serde_json::from_str(text);
    if let Ok(n) = &parsed {
        assert!(value.is_ok(), "accepted invalid JSON {text:?}");
        if let (Some(id), Ok(Value::Object(o))) = (n.after_message_id, &value) {
            assert_eq!(o.get("after_message_id").and_then(Value::as_i64), Some(id));
        }
    }
    // A channel name never panics either, and maps only chat stream channels.
    if let Some(chat) = chatcache::listen::channel_chat(text) {
        assert!(text.starts_with("chat:stream:"), "{text:?} -> {chat}");
    }
}

/// `wire::split_frame` in both framings: never panics; every event it returns is valid JSON
/// kept byte for byte, and building a frame from them splits back into the same events.
pub fn frame(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    for framing in FRAMINGS {
        // The raw input, and the input wrapped the way each framing wraps events.
        let wrapped = match framing {
            Framing::Envelope => format!("{{\"type\":\"data\",\"data\":[{text}]}}"),
            Framing::Array => format!("[{text}]"),
        };
        for input in [text.as_ref(), wrapped.as_str()] {
            let Ok(chatcache::wire::FrameContent::Events(events)) =
                chatcache::wire::split_frame(framing, input)
            else {
                continue;
            };
            for e in &events {
                // Syntax only: a number like 1E2036854775808 is valid JSON no f64 can hold.
                let raw = serde_json::from_slice::<Box<serde_json::value::RawValue>>(e);
                assert!(raw.is_ok(), "event is not JSON: {e:?}");
            }
            let rebuilt = chatcache::wire::frame(framing, &events);
            let rebuilt = std::str::from_utf8(&rebuilt).expect("frames are UTF-8");
            match chatcache::wire::split_frame(framing, rebuilt) {
                Ok(chatcache::wire::FrameContent::Events(again)) => assert_eq!(again, events),
                other => panic!("rebuilt frame does not split: {other:?}"),
            }
        }
    }
}

/// `render::message_event` with arbitrary content: never panics, always yields one JSON
/// `message` event for the row's id, escaped as Go escapes (no raw `<`, `>`, `&`, U+2028,
/// U+2029), and a text part's text survives the round trip.
pub fn render(data: &[u8]) {
    let text = String::from_utf8_lossy(data).into_owned();
    let mut contents: Vec<Option<Value>> = vec![
        Some(serde_json::json!([{"type": "text", "text": text}])),
        Some(Value::String(text.clone())),
    ];
    if let Ok(v) = serde_json::from_slice::<Value>(data) {
        contents.push(Some(v));
    }
    for content in contents {
        for framing in FRAMINGS {
            let row = chatcache::render::MessageRow {
                id: 1000 + data.len() as i64,
                chat_id: uuid::Uuid::from_u128(0x1111_1111_1111_4111_8111_1111_1111_1111),
                created_by: None,
                model_config_id: None,
                created_at: chrono::DateTime::from_timestamp(1_773_828_002, 123_456_000)
                    .expect("valid time"),
                role: "assistant".into(),
                content: content.clone(),
                content_version: 1,
                usage: [None, Some(1), None, None, None, None, Some(-1)],
            };
            let out = chatcache::render::message_event(&row, framing).expect("version 1");
            let s = std::str::from_utf8(&out).expect("UTF-8 output");
            assert!(
                !s.contains(['<', '>', '&', '\u{2028}', '\u{2029}']),
                "unescaped: {s}"
            );
            let v: Value = serde_json::from_str(s).expect("valid JSON");
            assert_eq!(v["type"], "message");
            assert_eq!(v["message"]["id"], row.id);
            if let Some(parts) = v["message"].get("content") {
                let parts = parts.as_array().expect("content is an array");
                assert!(!parts.is_empty(), "empty content is omitted");
            }
            if content.as_ref().and_then(|c| c[0]["text"].as_str()) == Some(text.as_str()) {
                assert_eq!(v["message"]["content"][0]["text"], text.as_str());
            }
        }
    }
}

/// `route::match_stream` and `parse_after_id`: never panic; only the exact stream path with a
/// plain segment is matched, and a cursor is either an integer or coderd's error text.
pub fn route(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let prefixed = format!("/api/experimental/chats/{text}/stream");
    for path in [text.as_ref(), prefixed.as_str()] {
        for method in [http::Method::GET, http::Method::POST] {
            let Some(found) = chatcache::route::match_stream(&method, path) else {
                continue;
            };
            assert_eq!(method, http::Method::GET);
            let segment = path
                .strip_prefix("/api/experimental/chats/")
                .and_then(|p| p.strip_suffix("/stream"))
                .unwrap_or_else(|| panic!("matched a foreign path {path:?}"));
            assert!(
                !segment.is_empty() && !segment.contains(['/', '%', '.']),
                "matched a path coderd may read differently: {path:?}"
            );
            if let chatcache::route::StreamRoute::Chat(id) = found {
                let simple: String = segment
                    .chars()
                    .filter(|c| c.is_ascii_hexdigit())
                    .collect::<String>()
                    .to_ascii_lowercase();
                assert!(
                    simple.ends_with(&id.simple().to_string()),
                    "{path:?} -> {id}"
                );
            }
        }
    }
    for query in [text.to_string(), format!("after_id={text}")] {
        match chatcache::route::parse_after_id(Some(&query)) {
            Ok(_) => {}
            Err(detail) => assert!(
                detail.starts_with("strconv.ParseInt: parsing \"")
                    && (detail.ends_with("\": invalid syntax")
                        || detail.ends_with("\": value out of range")),
                "{detail}"
            ),
        }
    }
    if let Ok(n) = chatcache::route::parse_after_id(Some(&format!("after_id={text}"))) {
        if !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit() || b == b'-') {
            assert_eq!(text.parse::<i64>().ok(), Some(n), "{text:?}");
        }
    }
    let _ = chatcache::route::parse_go_uuid(&text);
}

/// Inputs worth starting from: real payloads, frames, contents, paths and cursors.
pub fn seeds() -> Vec<Vec<u8>> {
    let chat = "11111111-1111-4111-8111-111111111111";
    let event = format!(
        "{{\"type\":\"message\",\"chat_id\":\"{chat}\",\"message\":{{\"id\":1001,\"role\":\"user\"}}}}"
    );
    let texts = vec![
        r#"{"after_message_id":1000}"#.to_string(),
        r#"{"full_refresh":true}"#.into(),
        r#"{"status":"running","worker_id":"x","queue_update":true}"#.into(),
        format!("chat:stream:{chat}"),
        format!("{{\"type\":\"data\",\"data\":[{event},{{\"type\":\"status\"}}]}}"),
        format!("[{event}]"),
        r#"{"type":"ping"}"#.into(),
        r#"{"type":"error","data":{"message":"dropped messages"}}"#.into(),
        event.clone(),
        r#"[{"type":"text","text":"Hello!"}]"#.into(),
        r#"[{"type":"tool-call","tool_call_id":"c1","args":{"path":"/<tmp>"},"data":"AAAA","file_id":"33333333-3333-4333-8333-333333333333"}]"#.into(),
        r#"[{"type":"file","start_line":3,"end_line":1e3,"is_error":true}]"#.into(),
        format!("/api/experimental/chats/{chat}/stream"),
        format!("/api/experimental/chats/{}/stream", chat.to_uppercase()),
        format!("/api/experimental/chats/{{{chat}}}/stream"),
        format!("/api/experimental/chats/urn:uuid:{chat}/stream"),
        chat.replace('-', ""),
        "after_id=42&after_id=7".into(),
        "after_id=-9223372036854775808".into(),
        "after_id=%2B7".into(),
        "after_id=%ZZ".into(),
        "9223372036854775808".into(),
    ];
    texts.into_iter().map(String::into_bytes).collect()
}
