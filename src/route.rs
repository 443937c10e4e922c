//! Which requests chatcache answers itself, and the exact errors coderd gives for bad input.
//!
//! Only `GET /api/experimental/chats/{uuid}/stream` is intercepted. The match is strict on
//! purpose: anything else, including encoded slashes, `..`, double slashes, trailing segments or
//! other methods, goes to coderd untouched so that coderd decides what it means.

use uuid::Uuid;

const PREFIX: &str = "/api/experimental/chats/";
const SUFFIX: &str = "/stream";

/// A request for a chat's message stream, as far as the path tells.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamRoute {
    /// A well-formed stream request.
    Chat(Uuid),
    /// The stream path with a `{chat}` segment that is not a UUID: coderd answers 400.
    BadChatId { raw: String, detail: String },
}

/// Matches the stream route. `None` means "not ours, proxy it".
pub fn match_stream(method: &http::Method, path: &str) -> Option<StreamRoute> {
    if method != http::Method::GET {
        return None;
    }
    let raw = path.strip_prefix(PREFIX)?.strip_suffix(SUFFIX)?;
    // A segment with '/', '%' or '.' is left to coderd's router, which may read it differently.
    if raw.is_empty() || raw.contains(['/', '%', '.']) {
        return None;
    }
    Some(match parse_go_uuid(raw) {
        Ok(id) => StreamRoute::Chat(id),
        Err(detail) => StreamRoute::BadChatId {
            raw: raw.to_string(),
            detail,
        },
    })
}

/// Parses a UUID the way `google/uuid.Parse` does, returning its error text on failure.
pub fn parse_go_uuid(raw: &str) -> Result<Uuid, String> {
    let len = raw.len();
    // Byte slicing below is only done on ASCII input; anything else is not a UUID anyway.
    if !raw.is_ascii() {
        return match len {
            32 | 36 | 38 | 45 => Err("invalid UUID format".to_string()),
            _ => Err(format!("invalid UUID length: {len}")),
        };
    }
    let body = match len {
        36 => raw,
        38 if raw.starts_with('{') && raw.ends_with('}') => &raw[1..37],
        45 if raw[..9].eq_ignore_ascii_case("urn:uuid:") => &raw[9..],
        32 => raw,
        _ => return Err(format!("invalid UUID length: {len}")),
    };
    if body.len() == 36 {
        let bytes = body.as_bytes();
        if bytes[8] != b'-' || bytes[13] != b'-' || bytes[18] != b'-' || bytes[23] != b'-' {
            return Err("invalid UUID format".to_string());
        }
    }
    Uuid::parse_str(body).map_err(|_| "invalid UUID format".to_string())
}

/// The `after_id` cursor of a stream request, parsed like Go's `strconv.ParseInt(v, 10, 64)`.
///
/// Missing or empty means 0 (the whole history); negative values are kept as given.
pub fn parse_after_id(query: Option<&str>) -> Result<i64, String> {
    let Some(raw) = query_param_bytes(query, "after_id") else {
        return Ok(0);
    };
    if raw.is_empty() {
        return Ok(0);
    }
    match String::from_utf8(raw) {
        Ok(text) => parse_go_int(&text),
        // Go strings are bytes: such a value is simply not a number.
        Err(e) => Err(format!(
            "strconv.ParseInt: parsing {}: invalid syntax",
            go_quote_bytes(e.as_bytes())
        )),
    }
}

fn parse_go_int(raw: &str) -> Result<i64, String> {
    let quoted = go_quote(raw);
    let digits = raw.strip_prefix(['+', '-']).unwrap_or(raw);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "strconv.ParseInt: parsing {quoted}: invalid syntax"
        ));
    }
    raw.parse::<i64>()
        .map_err(|_| format!("strconv.ParseInt: parsing {quoted}: value out of range"))
}

/// Go's `strconv.Quote` of bytes that are not valid UTF-8: valid runs as text, the rest `\xNN`.
/// coderd accepts a stream WebSocket only from its own origin (`websocket.Accept` without
/// options): when the handshake carries an `Origin` whose host differs from `Host` (ASCII case
/// folded), the reason coderd refuses it with 403. `None` when there is no `Origin` (CLIs) or
/// it matches.
pub fn foreign_origin(origin: Option<&[u8]>, host: Option<&[u8]>) -> Option<String> {
    let origin = String::from_utf8_lossy(origin?);
    let host = String::from_utf8_lossy(host.unwrap_or_default());
    let authority = match origin.find("://") {
        Some(at) => {
            let rest = &origin[at + 3..];
            let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
            let authority = &rest[..end];
            authority
                .rfind('@')
                .map_or(authority, |at| &authority[at + 1..])
        }
        None => "",
    };
    if authority.is_empty() {
        return Some(format!(
            "request Origin {} is not a valid URL with a host",
            go_quote(&origin)
        ));
    }
    if authority.eq_ignore_ascii_case(&host) {
        return None;
    }
    Some(format!(
        "request Origin {} is not authorized for Host {}",
        go_quote(authority),
        go_quote(&host)
    ))
}

fn go_quote_bytes(raw: &[u8]) -> String {
    let mut inner = String::new();
    for chunk in raw.utf8_chunks() {
        let quoted = go_quote(chunk.valid());
        inner.push_str(&quoted[1..quoted.len() - 1]);
        for b in chunk.invalid() {
            inner.push_str(&format!("\\x{b:02x}"));
        }
    }
    format!("\"{inner}\"")
}

/// Go's `strconv.Quote` for the printable ASCII that query strings normally carry.
fn go_quote(raw: &str) -> String {
    let mut out = String::with_capacity(raw.len() + 2);
    out.push('"');
    for c in raw.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            '\u{7}' => out.push_str("\\a"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            '\u{b}' => out.push_str("\\v"),
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The first value of a query parameter, percent-decoded; `+` means space as in Go's forms.
/// Like Go's `url.ParseQuery`, a pair with an invalid escape is skipped, not kept.
pub fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    query_param_bytes(query, name).map(|v| String::from_utf8_lossy(&v).into_owned())
}

/// [`query_param`] as raw bytes (Go strings may hold any bytes, e.g. `%FF`).
pub fn query_param_bytes(query: Option<&str>, name: &str) -> Option<Vec<u8>> {
    query?.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let (k, v) = (percent_decode(k)?, percent_decode(v)?);
        (k == name.as_bytes()).then_some(v)
    })
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = bytes.get(i + 1..i + 3)?;
                let hex = std::str::from_utf8(hex).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::Method;

    const CHAT: &str = "11111111-1111-4111-8111-111111111111";

    #[test]
    fn only_the_exact_stream_path_matches() {
        let ok = format!("/api/experimental/chats/{CHAT}/stream");
        assert_eq!(
            match_stream(&Method::GET, &ok),
            Some(StreamRoute::Chat(CHAT.parse().unwrap()))
        );
        for path in [
            format!("/api/experimental/chats/{CHAT}/stream/"),
            format!("/api/experimental/chats/{CHAT}/stream/git"),
            format!("/api/experimental/chats/{CHAT}"),
            format!("/api/experimental//chats/{CHAT}/stream"),
            format!("/api/experimental/chats/..%2F{CHAT}/stream"),
            format!("/api/experimental/chats/x/../{CHAT}/stream"),
            format!("/API/experimental/chats/{CHAT}/stream"),
            "/api/experimental/chats/watch".to_string(),
        ] {
            assert_eq!(match_stream(&Method::GET, &path), None, "{path}");
        }
        assert_eq!(match_stream(&Method::POST, &ok), None);
    }

    #[test]
    fn bad_chat_ids_get_google_uuid_details() {
        let r = match_stream(&Method::GET, "/api/experimental/chats/abc/stream");
        assert_eq!(
            r,
            Some(StreamRoute::BadChatId {
                raw: "abc".into(),
                detail: "invalid UUID length: 3".into()
            })
        );
        assert_eq!(
            parse_go_uuid("zzzzzzzz-1111-4111-8111-111111111111").unwrap_err(),
            "invalid UUID format"
        );
        assert!(parse_go_uuid(&CHAT.to_uppercase()).is_ok());
    }

    #[test]
    fn after_id_parses_like_strconv() {
        assert_eq!(parse_after_id(None), Ok(0));
        assert_eq!(parse_after_id(Some("after_id=")), Ok(0));
        assert_eq!(parse_after_id(Some("x=1&after_id=42")), Ok(42));
        assert_eq!(parse_after_id(Some("after_id=-5")), Ok(-5));
        assert_eq!(parse_after_id(Some("after_id=%2B7")), Ok(7));
        assert_eq!(
            parse_after_id(Some("after_id=abc")).unwrap_err(),
            r#"strconv.ParseInt: parsing "abc": invalid syntax"#
        );
        assert_eq!(
            parse_after_id(Some("after_id=99999999999999999999")).unwrap_err(),
            r#"strconv.ParseInt: parsing "99999999999999999999": value out of range"#
        );
        assert_eq!(
            parse_after_id(Some("after_id=1.5")).unwrap_err(),
            r#"strconv.ParseInt: parsing "1.5": invalid syntax"#
        );
        assert_eq!(parse_after_id(Some("after_id=1&after_id=2")), Ok(1));
        // Go skips pairs with bad escapes: the cursor is then missing, i.e. 0.
        assert_eq!(parse_after_id(Some("after_id=%ZZ")), Ok(0));
        assert_eq!(parse_after_id(Some("after_id=5%")), Ok(0));
        assert_eq!(
            parse_after_id(Some("after_id=%07")).unwrap_err(),
            r#"strconv.ParseInt: parsing "\a": invalid syntax"#
        );
        assert_eq!(
            parse_after_id(Some("after_id=%FF")).unwrap_err(),
            r#"strconv.ParseInt: parsing "\xff": invalid syntax"#
        );
        // A 45-byte segment with a multi-byte character across byte 9 is simply not a UUID.
        let odd = format!("urn:uuid{}{}", '\u{e9}', "x".repeat(35));
        assert_eq!(odd.len(), 45);
        assert_eq!(parse_go_uuid(&odd).unwrap_err(), "invalid UUID format");
    }
}
