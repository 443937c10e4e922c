//! Raw clients for the adversarial suite: exact bytes out, exact answers back, and the few
//! Postgres writes that stand in for another replica.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::common::*;

pub const WAIT: Duration = Duration::from_secs(10);
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";

/// One answer to a raw request; `ws` is the socket when the answer was 101.
pub struct Reply {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
    pub ws: Option<WebSocketStream<TcpStream>>,
}

impl Reply {
    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// The first data frame of a 101 (the snapshot), pings skipped.
    pub async fn first_frame(&mut self) -> Option<String> {
        let ws = self.ws.as_mut()?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        loop {
            match tokio::time::timeout_at(deadline, ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => return Some(t.to_string()),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                _ => return None,
            }
        }
    }
}

/// Reads a response head byte by byte, so nothing after it is consumed.
pub async fn read_head(s: &mut TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    let deadline = tokio::time::Instant::now() + WAIT;
    while !head.ends_with(b"\r\n\r\n") {
        match tokio::time::timeout_at(deadline, s.read(&mut byte)).await {
            Ok(Ok(1)) => head.push(byte[0]),
            _ => return (!head.is_empty()).then_some(head),
        }
    }
    Some(head)
}

/// Sends `raw` on a new connection and reads one answer.
pub async fn exchange(addr: SocketAddr, raw: &[u8]) -> Reply {
    read_reply(send_raw(addr, raw).await).await
}

/// A new connection to `addr` with `raw` written on it.
pub async fn send_raw(addr: SocketAddr, raw: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(raw).await.unwrap();
    s
}

async fn read_reply(mut s: TcpStream) -> Reply {
    let Some(head) = read_head(&mut s).await else {
        return Reply {
            status: 0,
            head: String::new(),
            body: Vec::new(),
            ws: None,
        };
    };
    let head = String::from_utf8_lossy(&head).to_string();
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut reply = Reply {
        status,
        head,
        body: Vec::new(),
        ws: None,
    };
    if status == 101 {
        reply.ws = Some(WebSocketStream::from_raw_socket(s, Role::Client, None).await);
        return reply;
    }
    if let Some(len) = reply
        .header("content-length")
        .and_then(|v| v.parse::<usize>().ok())
    {
        let mut body = vec![0u8; len];
        let _ = tokio::time::timeout(WAIT, s.read_exact(&mut body)).await;
        reply.body = body;
    } else {
        let mut body = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(2), s.read_to_end(&mut body)).await;
        reply.body = body;
    }
    reply
}

/// A WebSocket handshake for `target` (the request-target exactly as written) plus headers.
pub fn handshake(target: &str, headers: &[(&str, &str)]) -> Vec<u8> {
    let mut req = format!(
        "GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n"
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    req.into_bytes()
}

pub fn stream_path(chat: &str, query: &str) -> String {
    format!("/api/experimental/chats/{chat}/stream{query}")
}

/// A handshake for `chat`'s stream with `query`, the token in `Coder-Session-Token`.
pub fn token_handshake(chat: &str, query: &str, token: &str) -> Vec<u8> {
    handshake(&stream_path(chat, query), &[("Coder-Session-Token", token)])
}

/// Opens a stream with the handshake `raw` and returns its socket once the snapshot is in.
pub async fn open_stream(addr: SocketAddr, raw: &[u8]) -> WebSocketStream<TcpStream> {
    let mut reply = exchange(addr, raw).await;
    reply.first_frame().await.expect("a snapshot frame");
    reply.ws.expect("an upgraded stream")
}

/// Reads `ws` until the last of `ids` has arrived; the stream ending first fails as `what`.
pub async fn read_through(ws: &mut WebSocketStream<TcpStream>, ids: &[i64], what: &str) {
    let mut events = Vec::new();
    while message_ids(&events).last() != ids.last() {
        match tokio::time::timeout(WAIT, ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => events.extend(decode_frame(t.as_str())),
            Ok(Some(Ok(_))) => {}
            other => panic!("{what}: {other:?}"),
        }
    }
}

/// Closes `s` with a TCP reset: a zero linger, so the close never blocks.
pub fn reset(s: TcpStream) {
    #[allow(deprecated)]
    s.set_linger(Some(Duration::ZERO)).unwrap();
    drop(s);
}

/// Status and, for 101, the snapshot frame; otherwise content type and body.
pub async fn answer(addr: SocketAddr, raw: &[u8]) -> (u16, Option<String>, Vec<u8>) {
    let mut r = exchange(addr, raw).await;
    if r.status == 101 {
        let frame = r.first_frame().await.unwrap_or_default();
        return (101, None, frame.into_bytes());
    }
    (r.status, r.header("content-type"), r.body)
}

/// Sends the same bytes to the sim and to the sidecar and requires the same answer.
pub async fn same_as_coderd(sim: SocketAddr, side: SocketAddr, raw: &[u8], what: &str) -> u16 {
    let direct = answer(sim, raw).await;
    let proxied = answer(side, raw).await;
    assert_eq!(
        (proxied.0, &proxied.1, String::from_utf8_lossy(&proxied.2)),
        (direct.0, &direct.1, String::from_utf8_lossy(&direct.2)),
        "{what}: sidecar (left) differs from coderd (right)"
    );
    direct.0
}

/// A masked client frame.
pub fn client_frame(first_byte: u8, payload: &[u8]) -> Vec<u8> {
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut out = vec![first_byte];
    match payload.len() {
        n if n < 126 => out.push(0x80 | n as u8),
        n if n <= 0xFFFF => {
            out.push(0x80 | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(0x80 | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out
}

/// Reads frames until a close frame (its code) or the end of the connection (None).
pub async fn close_code(ws: &mut WebSocketStream<TcpStream>) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            _ => return None,
        }
    }
}

pub async fn assert_alive(side: &mut Proc, what: &str) {
    assert!(
        side.child.try_wait().unwrap().is_none(),
        "{what}: chatcache exited"
    );
    let admin = side.admin.unwrap();
    assert_eq!(
        http(admin, "GET", "/live", &[], "").await.0,
        200,
        "{what}: /live"
    );
}

/// Waits until a gauge reads `want`.
pub async fn wait_metric(admin: SocketAddr, name: &str, want: f64) {
    wait_metric_for(admin, name, want, "").await;
}

pub async fn wait_metric_for(admin: SocketAddr, name: &str, want: f64, what: &str) {
    let deadline = Instant::now() + WAIT;
    loop {
        let got = metric(admin, name).await;
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: {name} stays {got}, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Inserts a row the way another replica would (row lock, commit) and returns its id.
pub async fn insert_row(
    pg: &tokio_postgres::Client,
    chat: &str,
    role: &str,
    content: Option<&str>,
    version: i16,
) -> i64 {
    let chat: uuid::Uuid = chat.parse().unwrap();
    pg.batch_execute("BEGIN").await.unwrap();
    pg.query("SELECT id FROM chats WHERE id = $1 FOR UPDATE", &[&chat])
        .await
        .unwrap();
    let row = pg
        .query_one(
            "INSERT INTO chat_messages (chat_id, role, content, content_version) \
             VALUES ($1, $2::text::chat_message_role, $3::text::jsonb, $4) RETURNING id",
            &[&chat, &role, &content, &version],
        )
        .await
        .unwrap();
    pg.batch_execute("COMMIT").await.unwrap();
    row.get(0)
}

/// Runs one turn through `addr` and waits for it to finish.
pub async fn turn(
    addr: SocketAddr,
    pg: &tokio_postgres::Client,
    chat: &str,
    token: &str,
    text: &str,
) {
    let (status, body) = post_message(addr, chat, token, text).await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    wait_idle(pg, chat).await;
}
