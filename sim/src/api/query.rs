//! Query strings and cookies read the way Go's `net/http` reads them.

/// `r.URL.Query().Get(key)`: the first value, with `+` as space and `%XX` decoded. Pairs whose
/// escapes are invalid are skipped, as `url.ParseQuery` does.
pub fn get(query: Option<&str>, key: &str) -> Option<String> {
    for pair in query?.split('&') {
        if pair.is_empty() {
            continue;
        }
        let (raw_key, raw_value) = pair.split_once('=').unwrap_or((pair, ""));
        let (Some(k), Some(v)) = (unescape(raw_key), unescape(raw_value)) else {
            continue;
        };
        if k == key {
            return Some(v);
        }
    }
    None
}

fn unescape(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// `r.Cookie(name).Value`: the first cookie of that name across all `Cookie` headers, with
/// surrounding double quotes removed.
pub fn cookie<'a>(headers: impl Iterator<Item = &'a str>, name: &str) -> Option<String> {
    for header in headers {
        for pair in header.split(';') {
            let Some((k, v)) = pair.trim().split_once('=') else {
                continue;
            };
            if k == name {
                let v = v
                    .strip_prefix('"')
                    .and_then(|v| v.strip_suffix('"'))
                    .unwrap_or(v);
                return Some(v.to_string());
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_decoded() {
        assert_eq!(
            get(Some("a=1&after_id=%31+2"), "after_id").as_deref(),
            Some("1 2")
        );
        assert_eq!(
            get(Some("after_id=&after_id=3"), "after_id").as_deref(),
            Some("")
        );
        assert_eq!(
            get(Some("x=%zz&after_id=4"), "after_id").as_deref(),
            Some("4")
        );
        assert_eq!(get(None, "after_id"), None);
    }

    #[test]
    fn cookies_are_found_across_headers() {
        let headers = ["a=b", "coder_session_token=\"tok\"; c=d"];
        assert_eq!(
            cookie(headers.into_iter(), "coder_session_token").as_deref(),
            Some("tok")
        );
    }
}
