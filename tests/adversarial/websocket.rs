//! WebSocket handshakes and frames: broken handshakes, frames a one-way stream must not get,
//! clients that vanish with a reset, and a snapshot that fills exactly one frame.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::common::*;
use crate::support::*;

/// Broken handshakes get coderd's answer; client data, binary, fragmented, unmasked and
/// oversized frames close the stream as coderd closes it (1002 in the envelope era), and the
/// sidecar keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_abuse_is_answered_like_coderd() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let mut side = start_sidecar(&db, sim.addr, "").await;
    let admin = side.admin.unwrap();
    let pg = db.client().await;
    turn(sim.addr, &pg, chat, token, "hello").await;
    let path = stream_path(chat, "");

    // Handshakes: each line removed or bent in turn.
    let base = [
        format!("GET {path} HTTP/1.1"),
        "Host: 127.0.0.1".into(),
        "Upgrade: websocket".into(),
        "Connection: Upgrade".into(),
        format!("Sec-WebSocket-Key: {WS_KEY}"),
        "Sec-WebSocket-Version: 13".into(),
        format!("Coder-Session-Token: {token}"),
    ];
    let bent: Vec<(&str, usize, Option<String>)> = vec![
        ("no upgrade header", 2, None),
        ("no connection header", 3, None),
        ("no key", 4, None),
        ("no version", 5, None),
        ("version 8", 5, Some("Sec-WebSocket-Version: 8".into())),
        ("upgrade h2c", 2, Some("Upgrade: h2c".into())),
        (
            "connection keep-alive",
            3,
            Some("Connection: keep-alive".into()),
        ),
        ("empty key", 4, Some("Sec-WebSocket-Key: ".into())),
        ("HTTP/1.0", 0, Some(format!("GET {path} HTTP/1.0"))),
        ("POST", 0, Some(format!("POST {path} HTTP/1.1"))),
        ("HEAD", 0, Some(format!("HEAD {path} HTTP/1.1"))),
    ];
    for (what, line, replacement) in bent {
        let mut lines = base.to_vec();
        match replacement {
            Some(r) => lines[line] = r,
            None => {
                lines.remove(line);
            }
        }
        let mut raw = lines.join("\r\n");
        raw.push_str("\r\nContent-Length: 0\r\n\r\n");
        same_as_coderd(sim.addr, side.addr, raw.as_bytes(), what).await;
        assert_alive(&mut side, what).await;
    }
    // (A refused upgrade leaves the subscriber gauge behind: see the known-defects section.)
    let stale = metric(admin, "chatcache_subscribers").await;

    // Frames a one-way stream must not get, each sent right after the snapshot. Data of any
    // kind is answered like coderd answers it (1002); frames that break RFC 6455 end the
    // connection (the close code is the WebSocket library's, so only the end is required).
    let data: Vec<(&str, Vec<u8>)> = vec![
        ("text", client_frame(0x81, b"hello")),
        ("binary", client_frame(0x82, &[0, 1, 2])),
        (
            "fragmented text",
            [client_frame(0x01, b"frag"), client_frame(0x80, b"ment")].concat(),
        ),
        ("empty text", client_frame(0x81, b"")),
        ("large text", client_frame(0x81, &vec![b'a'; 200_000])),
    ];
    let violations: Vec<(&str, Vec<u8>)> = vec![
        ("unmasked text", vec![0x81, 0x02, b'h', b'i']),
        ("reserved opcode", client_frame(0x83, b"x")),
        ("rsv bits", client_frame(0xF1, b"x")),
        ("continuation first", client_frame(0x80, b"x")),
        ("fragmented ping", client_frame(0x09, b"x")),
        (
            "oversized length",
            [
                vec![0x82, 0x80 | 127],
                (1u64 << 40).to_be_bytes().to_vec(),
                vec![1, 2, 3, 4],
            ]
            .concat(),
        ),
        ("close with junk", client_frame(0x88, &[0x03])),
    ];
    let raw = token_handshake(chat, "", token);
    let ends = |addr: SocketAddr, bytes: Vec<u8>| {
        let raw = raw.clone();
        async move {
            let mut s = send_raw(addr, &raw).await;
            let head = read_head(&mut s).await.unwrap();
            assert!(head.starts_with(b"HTTP/1.1 101"));
            // Let the snapshot arrive first, then misbehave.
            tokio::time::sleep(Duration::from_millis(150)).await;
            let _ = s.write_all(&bytes).await;
            let mut ws = WebSocketStream::from_raw_socket(s, Role::Client, None).await;
            let started = Instant::now();
            let code = close_code(&mut ws).await;
            assert!(started.elapsed() < WAIT, "the stream never ended");
            code
        }
    };
    for (what, bytes) in data {
        let direct = ends(sim.addr, bytes.clone()).await;
        let proxied = ends(side.addr, bytes).await;
        assert_eq!(proxied, direct, "{what}: sidecar (left) vs coderd (right)");
        assert_eq!(proxied, Some(1002), "{what}");
        assert_alive(&mut side, what).await;
        wait_metric_for(admin, "chatcache_subscribers", stale, what).await;
    }
    for (what, bytes) in violations {
        let direct = ends(sim.addr, bytes.clone()).await;
        let proxied = ends(side.addr, bytes).await;
        assert_eq!(proxied, direct, "{what}: sidecar (left) vs coderd (right)");
        assert_alive(&mut side, what).await;
        wait_metric_for(admin, "chatcache_subscribers", stale, what).await;
    }
    let mut ws = open_stream(side.addr, &raw).await;
    ws.send(Message::Text("x".into())).await.unwrap();
    assert_eq!(
        close_code(&mut ws).await,
        Some(1002),
        "envelope era closes with 1002"
    );

    // A ping is answered and the stream goes on.
    let mut ws = open_stream(side.addr, &raw).await;
    ws.send(Message::Ping(b"are you there".to_vec().into()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(WAIT, ws.next()).await.unwrap();
    assert!(matches!(pong, Some(Ok(Message::Pong(_)))), "{pong:?}");
    turn(sim.addr, &pg, chat, token, "after the ping").await;
    let ids = db_ids(&pg, chat).await;
    read_through(&mut ws, &ids, "stream ended after a ping").await;
    drop(ws);
    wait_metric(admin, "chatcache_subscribers", stale).await;
    history_exact(side.addr, &pg, chat, token).await;
}

/// Clients that vanish with a TCP reset, mid-snapshot or mid-turn, leave no subscriber behind
/// and do not disturb a subscriber next to them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abrupt_resets_leave_nothing_behind() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--part-delay-ms", "0", "--turn-parts", "400"]).await;
    let mut side = start_sidecar(&db, sim.addr, "").await;
    let admin = side.admin.unwrap();
    let pg = db.client().await;
    for t in 0..3 {
        turn(sim.addr, &pg, chat, token, &format!("t{t}")).await;
    }
    let mut steady = subscribe(side.addr, chat, 0, token).await;
    steady.events_for(Duration::from_millis(200)).await;
    let raw = token_handshake(chat, "", token);

    let (status, _) = post_message(side.addr, chat, token, "during the resets").await;
    assert_eq!(status, 200);
    for i in 0..60 {
        let mut s = send_raw(side.addr, &raw).await;
        if i % 3 != 0 {
            // Some read the head first; the rest reset before the answer.
            let _ = read_head(&mut s).await;
        }
        if i % 2 == 0 {
            let mut buf = [0u8; 512];
            let _ = tokio::time::timeout(Duration::from_millis(5), s.read(&mut buf)).await;
        }
        reset(s);
    }
    wait_idle(&pg, chat).await;
    let ids = db_ids(&pg, chat).await;
    let got = until_last(&mut steady, &ids).await;
    let got = message_ids(&got);
    assert_eq!(
        got.last(),
        ids.last(),
        "the steady subscriber got everything"
    );
    drop(steady);
    // Resets before the 101 leave the subscriber gauge behind: see the known-defects section.
    let _ = admin;
    assert_alive(&mut side, "after resets").await;
    history_exact(side.addr, &pg, chat, token).await;
}

// ---------------------------------------------------------------------------------------------
// Regression tests of defects this suite found (tests/RELIABILITY.md, "Defects found"); each
// failed before its fix.
// ---------------------------------------------------------------------------------------------

/// A chat whose snapshot is exactly 256 events (status + 255 messages) arrives from coderd as
/// one full frame. The feed takes a full frame to mean "more snapshot follows", waits for a
/// frame that never comes, gives up after `feed.connect_timeout_ms` and fails the subscriber
/// open. It must be served from the cache at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshot_of_exactly_256_events_is_served_from_the_cache() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--worker", "off"]).await;
    let side = start_sidecar(&db, sim.addr, "[feed]\nconnect_timeout_ms = 3000\n").await;
    let admin = side.admin.unwrap();
    let pg = db.client().await;
    let chat_uuid: uuid::Uuid = chat.parse().unwrap();
    pg.execute(
        "INSERT INTO chat_messages (chat_id, role, content) SELECT $1, 'user', \
         jsonb_build_array(jsonb_build_object('type', 'text', 'text', 'm' || g)) \
         FROM generate_series(1, 255) g",
        &[&chat_uuid],
    )
    .await
    .unwrap();
    let ids = db_ids(&pg, chat).await;
    assert_eq!(ids.len(), 255);

    let started = Instant::now();
    let mut s = subscribe(side.addr, chat, 0, token).await;
    let connected = started.elapsed();
    let got = until_last(&mut s, &ids).await;
    assert_eq!(message_ids(&got), ids);
    let fail_opens = metric(admin, "chatcache_fail_open_total{reason=\"feed\"}").await;
    eprintln!("256-event snapshot: upgrade after {connected:?}, feed fail-opens {fail_opens}");
    assert_eq!(fail_opens, 0.0, "the subscriber was failed open to coderd");
    assert!(
        connected < Duration::from_secs(1),
        "the first subscriber waited {connected:?}"
    );
}

/// The subscriber gauge counts a subscription when it is registered, but the branch of
/// `stream::handle` that runs when the upgrade never completes (an HTTP/1.0 handshake, or a
/// client that resets before the 101) unsubscribes without decrementing it, so
/// `chatcache_subscribers` drifts upwards for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriber_gauge_returns_to_zero_when_the_upgrade_fails() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &[]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let admin = side.admin.unwrap();
    let http10 = format!(
        "GET {} HTTP/1.0\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\
         Coder-Session-Token: {token}\r\n\r\n",
        stream_path(chat, "")
    );
    for _ in 0..3 {
        let _ = answer(side.addr, http10.as_bytes()).await;
    }
    let raw = token_handshake(chat, "", token);
    for _ in 0..20 {
        reset(send_raw(side.addr, &raw).await);
    }
    wait_metric(admin, "chatcache_subscribers", 0.0).await;
}

/// A browser page of another origin must not open a stream with the user's cookie
/// (cross-site WebSocket hijacking): coderd's `websocket.Accept` refuses an `Origin` whose
/// host is not the request's `Host` with 403, and so must chatcache, which upgrades itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_origin_streams_are_refused_like_coderd() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let pg = db.client().await;
    turn(sim.addr, &pg, chat, token, "hello").await;
    let path = stream_path(chat, "");
    let cookie = format!("coder_session_token={token}");

    // (origin, whether coderd lets it in); the handshake's Host is 127.0.0.1.
    let cases = [
        ("https://attacker.example", false),
        ("null", false),
        ("http://127.0.0.1:8080", false),
        ("http://127.0.0.1.attacker.example", false),
        ("127.0.0.1", false),
        ("http://127.0.0.1", true),
        ("HTTPS://127.0.0.1/some/page", true),
        ("http://user@127.0.0.1", true),
    ];
    for (origin, allowed) in cases {
        let raw = handshake(&path, &[("Cookie", &cookie), ("Origin", origin)]);
        let direct = exchange(sim.addr, &raw).await;
        let proxied = exchange(side.addr, &raw).await;
        let want = if allowed { 101 } else { 403 };
        assert_eq!(direct.status, want, "coderd-sim, Origin {origin}");
        assert_eq!(proxied.status, want, "chatcache, Origin {origin}");
        if !allowed {
            assert_eq!(proxied.body, direct.body, "Origin {origin}");
            assert_eq!(
                proxied.header("content-type"),
                direct.header("content-type")
            );
            assert!(proxied.ws.is_none());
        }
    }
    let refused = exchange(
        side.addr,
        &handshake(
            &path,
            &[("Cookie", &cookie), ("Origin", "https://attacker.example")],
        ),
    )
    .await;
    assert_eq!(
        String::from_utf8_lossy(&refused.body),
        "request Origin \"attacker.example\" is not authorized for Host \"127.0.0.1\"\n"
    );
}
