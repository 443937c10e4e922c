//! Go-compatible text: JSON escaping, `%q` quoting, `strconv` and `google/uuid` error texts, and
//! RFC 3339 times as Go prints them.
//!
//! coderd is written in Go, so every byte a client can compare must come out as Go would write
//! it. serde_json already matches Go's structure (compact, same control-character escapes); the
//! differences live here.

use chrono::{DateTime, Utc};
use serde::Serialize;
use uuid::Uuid;

/// Encodes `value` as compact JSON with Go's default HTML escaping (`<`, `>`, `&`, U+2028,
/// U+2029 as `\uXXXX`), which `json.Marshal` and `json.Encoder` apply unless told not to.
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> String {
    let plain = serde_json::to_string(value).expect("JSON values always serialize");
    escape_html(plain)
}

/// Rewrites the characters Go escapes but serde_json does not. They can only occur inside JSON
/// strings, so a plain replacement over the whole document is exact.
pub fn escape_html(json: String) -> String {
    if !json.contains(['<', '>', '&', '\u{2028}', '\u{2029}']) {
        return json;
    }
    let mut out = String::with_capacity(json.len() + 16);
    for c in json.chars() {
        match c {
            '<' => out.push_str("\\u003c"),
            '>' => out.push_str("\\u003e"),
            '&' => out.push_str("\\u0026"),
            '\u{2028}' => out.push_str("\\u2028"),
            '\u{2029}' => out.push_str("\\u2029"),
            c => out.push(c),
        }
    }
    out
}

/// Go's `strconv.Quote` / `%q` for the strings that appear in error texts.
pub fn quote(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
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

/// Go's `strconv.ParseInt(s, 10, 64)`, with its error text on failure.
pub fn parse_int64(s: &str) -> Result<i64, String> {
    let syntax = || format!("strconv.ParseInt: parsing {}: invalid syntax", quote(s));
    let range = || format!("strconv.ParseInt: parsing {}: value out of range", quote(s));

    let (negative, digits) = match s.as_bytes().first() {
        Some(b'+') => (false, &s[1..]),
        Some(b'-') => (true, &s[1..]),
        _ => (false, s),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(syntax());
    }

    // Accumulate as a negative number so that i64::MIN parses.
    let mut value: i64 = 0;
    for b in digits.bytes() {
        let digit = i64::from(b - b'0');
        value = match value.checked_mul(10).and_then(|v| v.checked_sub(digit)) {
            Some(v) => v,
            None => return Err(range()),
        };
    }
    if negative {
        Ok(value)
    } else {
        value.checked_neg().ok_or_else(range)
    }
}

/// Go's `uuid.Parse` from google/uuid, with its error texts.
pub fn parse_uuid(s: &str) -> Result<Uuid, String> {
    const FORMAT: &str = "invalid UUID format";
    let body = match s.len() {
        36 => s,
        45 => {
            let prefix = s.get(..9).ok_or(FORMAT)?;
            if !prefix.eq_ignore_ascii_case("urn:uuid:") {
                return Err(format!("invalid urn prefix: {}", quote(prefix)));
            }
            &s[9..]
        }
        // google/uuid skips the first byte of a 38-byte input without checking for braces.
        38 => s.get(1..).ok_or(FORMAT)?,
        32 => return Uuid::try_parse_ascii(s.as_bytes()).map_err(|_| FORMAT.to_string()),
        n => return Err(format!("invalid UUID length: {n}")),
    };
    let bytes = body.as_bytes();
    if bytes[8] != b'-' || bytes[13] != b'-' || bytes[18] != b'-' || bytes[23] != b'-' {
        return Err(FORMAT.to_string());
    }
    let hex: Vec<u8> = bytes[..36].iter().copied().filter(|b| *b != b'-').collect();
    if hex.len() != 32 || !hex.iter().all(u8::is_ascii_hexdigit) {
        return Err(FORMAT.to_string());
    }
    Uuid::try_parse_ascii(&hex).map_err(|_| FORMAT.to_string())
}

/// Go's RFC3339Nano rendering of a UTC time: fractional seconds with trailing zeros trimmed,
/// none at all for a whole second, and `Z`.
pub fn rfc3339(t: &DateTime<Utc>) -> String {
    let mut out = t.format("%Y-%m-%dT%H:%M:%S").to_string();
    let nanos = t.timestamp_subsec_nanos();
    if nanos > 0 {
        let frac = format!("{nanos:09}");
        out.push('.');
        out.push_str(frac.trim_end_matches('0'));
    }
    out.push('Z');
    out
}

/// Go's `time.Time.String()` for a UTC time, as used in the expired-key detail.
pub fn go_time_string(t: &DateTime<Utc>) -> String {
    let mut out = t.format("%Y-%m-%d %H:%M:%S").to_string();
    let nanos = t.timestamp_subsec_nanos();
    if nanos > 0 {
        out.push('.');
        out.push_str(format!("{nanos:09}").trim_end_matches('0'));
    }
    out.push_str(" +0000 UTC");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_characters_are_escaped_like_go() {
        let json = to_string(&serde_json::json!({"t": "<a&b>\u{2028}"}));
        assert_eq!(json, r#"{"t":"\u003ca\u0026b\u003e\u2028"}"#);
    }

    #[test]
    fn parse_int64_matches_strconv() {
        assert_eq!(parse_int64("-9223372036854775808"), Ok(i64::MIN));
        assert_eq!(parse_int64("+12"), Ok(12));
        assert_eq!(
            parse_int64("abc").unwrap_err(),
            r#"strconv.ParseInt: parsing "abc": invalid syntax"#
        );
        assert_eq!(
            parse_int64("99999999999999999999").unwrap_err(),
            r#"strconv.ParseInt: parsing "99999999999999999999": value out of range"#
        );
    }

    #[test]
    fn parse_uuid_matches_google_uuid() {
        assert_eq!(parse_uuid("abc").unwrap_err(), "invalid UUID length: 3");
        assert_eq!(
            parse_uuid("11111111-1111-4111-8111-11111111111z").unwrap_err(),
            "invalid UUID format"
        );
        assert!(parse_uuid("11111111-1111-4111-8111-111111111111").is_ok());
        assert!(parse_uuid("{11111111-1111-4111-8111-111111111111}").is_ok());
    }

    #[test]
    fn rfc3339_trims_trailing_zeros() {
        let t = DateTime::parse_from_rfc3339("2026-03-18T10:00:02.123450Z").unwrap();
        assert_eq!(rfc3339(&t.to_utc()), "2026-03-18T10:00:02.12345Z");
        let t = DateTime::parse_from_rfc3339("2026-03-18T10:00:02Z").unwrap();
        assert_eq!(rfc3339(&t.to_utc()), "2026-03-18T10:00:02Z");
    }
}
