//! Everything that is not a chat stream reaches coderd unchanged, and a stream is only served
//! to credentials coderd approves: both checked against the sim answering directly.

mod common;

use std::time::Duration;

use common::*;

/// A named request: what it is, its path or query, and its headers.
type Case<'a, P> = (&'a str, P, Vec<(&'a str, &'a str)>);

/// Status, content type and body of a response; what must be identical through chatcache.
fn essence(resp: &(u16, String, Vec<u8>)) -> (u16, Option<String>, Vec<u8>) {
    let ct = resp
        .1
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("content-type:"))
        .map(|l| l.to_string());
    (resp.0, ct, resp.2.clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rest_and_errors_pass_through_byte_identical() {
    let db = Scratch::new().await;
    let users = seed(&db, 2, 1);
    let (token, chat) = (&users[0].token, &users[0].chats[0]);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let pg = db.client().await;
    let (status, _) = post_message(side.addr, chat, token, "hello <world> & all").await;
    assert_eq!(status, 200);
    wait_idle(&pg, chat).await;

    let auth = [("Coder-Session-Token", token.as_str())];
    let cases: Vec<Case<String>> = vec![
        (
            "GET",
            format!("/api/experimental/chats/{chat}"),
            auth.to_vec(),
        ),
        (
            "GET",
            format!("/api/experimental/chats/{chat}/messages?limit=2"),
            auth.to_vec(),
        ),
        (
            "GET",
            format!("/api/experimental/chats/{chat}/messages?limit=0"),
            auth.to_vec(),
        ),
        (
            "GET",
            format!("/api/experimental/chats/{}", users[1].chats[0]),
            auth.to_vec(),
        ),
        (
            "GET",
            "/api/experimental/chats/not-a-uuid".to_string(),
            auth.to_vec(),
        ),
        ("GET", format!("/api/experimental/chats/{chat}"), vec![]),
        (
            "GET",
            format!("/api/experimental/chats/{chat}"),
            vec![("Coder-Session-Token", "bad")],
        ),
        ("GET", "/api/experimental/nope".to_string(), auth.to_vec()),
        // The stream path without a WebSocket handshake, and with a bad chat id, is coderd's.
        (
            "GET",
            format!("/api/experimental/chats/{chat}/stream"),
            auth.to_vec(),
        ),
        (
            "GET",
            "/api/experimental/chats/xyz/stream".to_string(),
            auth.to_vec(),
        ),
    ];
    for (method, path, headers) in cases {
        let direct = http(sim.addr, method, &path, &headers, "").await;
        let proxied = http(side.addr, method, &path, &headers, "").await;
        assert_eq!(essence(&proxied), essence(&direct), "{method} {path}");
    }

    // A chunked upload arrives whole and is answered as directly.
    let body = r#"{"content":[{"type":"text","text":"chunked upload"}]}"#;
    let (a, b) = body.split_at(10);
    let raw = format!(
        "POST /api/experimental/chats/{chat}/messages HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
         Coder-Session-Token: {token}\r\nContent-Type: application/json\r\n\
         Transfer-Encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
        a.len(),
        b.len()
    );
    let resp = raw_exchange(side.addr, raw.as_bytes()).await;
    let text = String::from_utf8_lossy(&resp);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    wait_idle(&pg, chat).await;
    let ids = db_ids(&pg, chat).await;
    let list = format!("/api/experimental/chats/{chat}/messages");
    let direct = http(sim.addr, "GET", &list, &auth, "").await;
    let proxied = http(side.addr, "GET", &list, &auth, "").await;
    assert_eq!(essence(&proxied), essence(&direct));
    assert!(
        String::from_utf8_lossy(&direct.2).contains("chunked upload"),
        "{ids:?}"
    );
}

/// Sends a GET and returns how long after the first body bytes the last ones arrived.
async fn body_spread(addr: std::net::SocketAddr, path: &str, token: &str) -> Duration {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut socket = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCoder-Session-Token: {token}\r\n\r\n"
    );
    socket.write_all(request.as_bytes()).await.unwrap();
    let (mut seen, mut first_body, mut last) = (Vec::new(), None, None);
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buf))
            .await
            .expect("download stalled")
            .unwrap();
        if n == 0 {
            break;
        }
        seen.extend_from_slice(&buf[..n]);
        let head_end = seen.windows(4).position(|w| w == b"\r\n\r\n");
        if matches!(head_end, Some(end) if seen.len() > end + 4) {
            let now = tokio::time::Instant::now();
            first_body.get_or_insert(now);
            last = Some(now);
        }
    }
    last.unwrap() - first_body.expect("a body arrived")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_downloads_pass_through_as_they_come() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let token = users[0].token.as_str();
    let sim = start_sim(&db, "a", &[]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let auth = [("Coder-Session-Token", token)];

    // Large and fast, small and slow, and a refused one: identical through chatcache.
    for query in [
        "chunks=64&chunk_bytes=65536&delay_ms=0",
        "chunks=5&chunk_bytes=7&delay_ms=50",
        "chunks=-1",
    ] {
        let path = format!("/api/experimental/sim/download?{query}");
        let direct = http(sim.addr, "GET", &path, &auth, "").await;
        let proxied = http(side.addr, "GET", &path, &auth, "").await;
        assert_eq!(essence(&proxied), essence(&direct), "{path}");
    }
    let path = "/api/experimental/sim/download?chunks=64&chunk_bytes=65536&delay_ms=0";
    let proxied = http(side.addr, "GET", path, &auth, "").await;
    assert_eq!(proxied.0, 200);
    assert_eq!(proxied.2.len(), 64 * 65536);
    assert!(proxied
        .2
        .iter()
        .enumerate()
        .all(|(i, b)| *b == b'a' + (i % 26) as u8));

    // Five pieces 200 ms apart: the proxy passes each on as it comes, so the body's bytes
    // arrive over at least 800 ms, not at once after buffering (allowing half for jitter).
    let path = "/api/experimental/sim/download?chunks=5&chunk_bytes=100&delay_ms=200";
    let spread = body_spread(side.addr, path, token).await;
    assert!(
        spread >= Duration::from_millis(400),
        "body arrived within {spread:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_websockets_are_tunnelled() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (&users[0].token, &users[0].chats[0]);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let pg = db.client().await;

    // /chats/watch goes to coderd through a raw tunnel: its first frame is coderd's ping.
    use futures_util::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = format!("ws://{}/api/experimental/chats/watch", side.addr)
        .into_client_request()
        .unwrap();
    req.headers_mut()
        .insert("Coder-Session-Token", token.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("watch through chatcache");
    let first = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(
        first.into_text().unwrap().trim_end(),
        r#"{"type":"ping","data":null}"#
    );
    let (status, _) = post_message(side.addr, chat, token, "watched").await;
    assert_eq!(status, 200);
    let event = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(event.into_text().unwrap().contains(chat.as_str()));
    wait_idle(&pg, chat).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_are_served_only_to_what_coderd_approves() {
    let db = Scratch::new().await;
    let users = seed(&db, 2, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let other_chat = users[1].chats[0].as_str();
    let sim = start_sim(&db, "a", &[]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let admin = side.admin.unwrap();

    let cookie = format!("coder_session_token={token}");
    let bearer = format!("Bearer {token}");
    let bad_cookie = "coder_session_token=abc".to_string();
    let denied: Vec<Case<String>> = vec![
        ("no token", "after_id=0".into(), vec![]),
        (
            "malformed",
            "after_id=0".into(),
            vec![("Coder-Session-Token", "nodash")],
        ),
        (
            "unknown key",
            "after_id=0".into(),
            vec![("Coder-Session-Token", "abcdefghij-0123456789012345678901")],
        ),
        (
            "bad cookie beats good header",
            "after_id=0".into(),
            vec![("Cookie", &bad_cookie), ("Coder-Session-Token", token)],
        ),
        (
            "bad after_id",
            "after_id=abc".into(),
            vec![("Coder-Session-Token", token)],
        ),
        (
            "huge after_id",
            "after_id=99999999999999999999".into(),
            vec![("Coder-Session-Token", token)],
        ),
    ];
    for (what, query, headers) in &denied {
        let direct = try_subscribe(sim.addr, chat, query, headers).await.err();
        let proxied = try_subscribe(side.addr, chat, query, headers).await.err();
        assert!(direct.is_some(), "{what}: coderd accepted");
        assert_eq!(proxied, direct, "{what}");
    }
    // Another user's chat is a 404 from coderd, relayed.
    let direct = try_subscribe(
        sim.addr,
        other_chat,
        "after_id=0",
        &[("Coder-Session-Token", token)],
    )
    .await
    .err();
    let proxied = try_subscribe(
        side.addr,
        other_chat,
        "after_id=0",
        &[("Coder-Session-Token", token)],
    )
    .await
    .err();
    assert_eq!(direct.as_ref().map(|d| d.0), Some(404));
    assert_eq!(proxied, direct);

    // Every token source that coderd accepts is accepted.
    let q_token = format!("after_id=0&coder_session_token={token}");
    let q_access = format!("after_id=0&access_token={token}");
    let accepted: Vec<Case<&str>> = vec![
        ("cookie", "after_id=0", vec![("Cookie", cookie.as_str())]),
        ("query", &q_token, vec![]),
        ("header", "after_id=0", vec![("Coder-Session-Token", token)]),
        (
            "bearer",
            "after_id=0",
            vec![("Authorization", bearer.as_str())],
        ),
        ("access_token", &q_access, vec![]),
    ];
    for (what, query, headers) in accepted {
        let direct = try_subscribe(sim.addr, chat, query, &headers).await;
        let proxied = try_subscribe(side.addr, chat, query, &headers).await;
        assert_eq!(direct.is_ok(), proxied.is_ok(), "{what}");
        let mut sub = proxied.unwrap_or_else(|e| panic!("{what}: {e:?}"));
        let events = sub.until(Duration::from_secs(5), |ev| !ev.is_empty()).await;
        assert_eq!(events[0]["type"], "status", "{what}");
    }
    assert_eq!(
        metric(admin, "chatcache_fail_open_total{reason=\"authz_error\"}").await,
        0.0
    );
    // no token, malformed, unknown key, bad cookie and the other user's chat.
    assert_eq!(
        metric(admin, "chatcache_authz_total{result=\"denied\"}").await,
        5.0
    );
}
