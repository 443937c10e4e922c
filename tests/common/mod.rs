//! Shared harness for the integration tests: a scratch database per test on the local Postgres,
//! real `coderd-sim` and `chatcache` processes on loopback ports, and small raw clients.
#![allow(dead_code)]

pub mod private_pg;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

pub const PG: &str = "postgres://postgres@127.0.0.1:5432";

/// A database that exists for one test and is dropped after it.
pub struct Scratch {
    pub name: String,
    pub url: String,
    /// The server it lives on, as `postgres://user@host:port` (no database).
    pub server: String,
}

impl Scratch {
    /// A scratch database on the shared local Postgres.
    pub async fn new() -> Self {
        Self::on(PG).await
    }

    /// A scratch database with coderd's schema on the server at `server` (no database part).
    pub async fn on(server: &str) -> Self {
        let name = format!("chatcache_test_{:016x}", rand::random::<u64>());
        let admin = connect(&format!("{server}/postgres")).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create db");
        let url = format!("{server}/{name}");
        run_sim(&["migrate", "--database-url", &url]);
        Self {
            name,
            url,
            server: server.to_string(),
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        connect(&self.url).await
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let (name, server) = (self.name.clone(), self.server.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                // A test may leave its (private) server stopped: then there is nothing to drop.
                let url = format!("{server}/postgres");
                let Ok((admin, conn)) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await
                else {
                    return;
                };
                tokio::spawn(conn);
                let _ = admin
                    .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                    .await;
            });
        })
        .join();
    }
}

pub async fn connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("pg");
    tokio::spawn(conn);
    client
}

/// The workspace's `coderd-sim` binary, built next to this test's binary.
pub fn sim_bin() -> PathBuf {
    let mut dir = std::env::current_exe().expect("test exe");
    dir.pop();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let bin = dir.join("coderd-sim");
    assert!(
        bin.exists(),
        "{} missing: run `cargo build --workspace --bins` first",
        bin.display()
    );
    bin
}

pub fn run_sim(args: &[&str]) {
    let status = Command::new(sim_bin())
        .args(args)
        .status()
        .expect("run coderd-sim");
    assert!(status.success(), "coderd-sim {args:?} failed");
}

/// A seeded user and their chats.
#[derive(Debug, Clone)]
pub struct User {
    pub id: String,
    pub token: String,
    pub chats: Vec<String>,
}

pub fn seed(db: &Scratch, users: usize, chats_per_user: usize) -> Vec<User> {
    let (file, users) = seed_file(db, users, chats_per_user);
    let _ = std::fs::remove_file(file);
    users
}

/// Seeds users and chats (`coderd-sim seed`) and keeps the seed file, for chatload.
pub fn seed_file(db: &Scratch, users: usize, chats_per_user: usize) -> (PathBuf, Vec<User>) {
    let out = std::env::temp_dir().join(format!("{}.seed.json", db.name));
    let (u, c) = (users.to_string(), chats_per_user.to_string());
    let out_s = out.to_str().unwrap();
    run_sim(&[
        "seed",
        "--database-url",
        &db.url,
        "--users",
        &u,
        "--chats-per-user",
        &c,
        "--out",
        out_s,
    ]);
    let v: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let users = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| User {
            id: u["id"].as_str().unwrap().into(),
            token: u["token"].as_str().unwrap().into(),
            chats: u["chats"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().into())
                .collect(),
        })
        .collect();
    (out, users)
}

/// A child process killed when dropped.
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn base(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Sends a signal (by number) to the process.
    pub fn signal(&self, sig: i32) {
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status();
    }
}

pub fn free_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

pub async fn wait_port(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while TcpStream::connect(addr).await.is_err() {
        assert!(Instant::now() < deadline, "{addr} never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn quiet() -> Stdio {
    if std::env::var_os("TEST_LOGS").is_some() {
        Stdio::inherit()
    } else {
        Stdio::null()
    }
}

/// Starts one coderd-sim replica.
pub async fn start_sim(db: &Scratch, replica: &str, extra: &[&str]) -> Proc {
    start_sim_at(db, replica, free_addr(), extra).await
}

/// Starts one coderd-sim replica on a given address (a restart keeps its port).
pub async fn start_sim_at(db: &Scratch, replica: &str, addr: SocketAddr, extra: &[&str]) -> Proc {
    let child = spawn_sim_at(db, replica, addr, extra);
    wait_port(addr).await;
    Proc {
        child,
        addr,
        admin: None,
    }
}

/// Spawns a coderd-sim replica without waiting for its port.
pub fn spawn_sim_at(db: &Scratch, replica: &str, addr: SocketAddr, extra: &[&str]) -> Child {
    Command::new(sim_bin())
        .args([
            "serve",
            "--listen",
            &addr.to_string(),
            "--database-url",
            &db.url,
        ])
        .args(["--replica", replica])
        // Small pools: tests run side by side on one Postgres with 100 connections.
        .args(["--db-pool-size", "4"])
        .args(extra)
        .stdout(quiet())
        .stderr(quiet())
        .spawn()
        .expect("spawn coderd-sim")
}

/// Starts a chatcache in front of `upstream` with a written config file plus `extra` TOML.
pub async fn start_sidecar(db: &Scratch, upstream: SocketAddr, extra: &str) -> Proc {
    start_sidecar_at(db, upstream, extra, free_addr()).await
}

pub async fn start_sidecar_at(
    db: &Scratch,
    upstream: SocketAddr,
    extra: &str,
    addr: SocketAddr,
) -> Proc {
    let p = spawn_sidecar_at(db, upstream, extra, addr).await;
    let admin = p.admin.unwrap();
    // Ready means LISTEN and the pool are up, so the first stream is served, not failed open.
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(admin, "GET", "/ready", &[], "").await.0 != 200 {
        assert!(Instant::now() < deadline, "chatcache never became ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p
}

/// Starts a chatcache like [`start_sidecar_at`] but returns once its ports listen, ready or not.
pub async fn spawn_sidecar_at(
    db: &Scratch,
    upstream: SocketAddr,
    extra: &str,
    addr: SocketAddr,
) -> Proc {
    let admin = free_addr();
    let path = std::env::temp_dir().join(format!("chatcache-{}-{}.toml", db.name, addr.port()));
    let config = format!(
        "listen_addr = \"{addr}\"\nadmin_addr = \"{admin}\"\nupstream_url = \"http://{upstream}\"\n\
         database_url = \"{}\"\n{extra}",
        db.url
    );
    std::fs::write(&path, config).unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_chatcache"))
        .args(["--config", path.to_str().unwrap()])
        .stdout(quiet())
        .stderr(quiet())
        .spawn()
        .expect("spawn chatcache");
    wait_port(addr).await;
    wait_port(admin).await;
    Proc {
        child,
        addr,
        admin: Some(admin),
    }
}

/// One raw HTTP/1.1 request with `Connection: close`; returns (status, headers, body bytes).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> (u16, String, Vec<u8>) {
    let mut req = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method == "POST" || method == "PATCH" {
        req.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    req.push_str("\r\n");
    req.push_str(body);
    let raw = raw_exchange(addr, req.as_bytes()).await;
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let status = head.split(' ').nth(1).unwrap().parse().unwrap();
    let mut body = raw[split + 4..].to_vec();
    if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        body = dechunk(&body);
    }
    (status, head, body)
}

pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap_or(0);
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[nl + 2 + size + 2..];
    }
}

/// A stream client that decodes frames into events.
pub struct Sub {
    pub ws: tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>,
    pub framing: &'static str,
    /// Raw frames received, in order.
    pub frames: Vec<String>,
}

pub async fn subscribe(addr: SocketAddr, chat: &str, after_id: i64, token: &str) -> Sub {
    try_subscribe(
        addr,
        chat,
        &format!("after_id={after_id}"),
        &[("Coder-Session-Token", token)],
    )
    .await
    .expect("subscribe")
}

pub async fn try_subscribe(
    addr: SocketAddr,
    chat: &str,
    query: &str,
    headers: &[(&str, &str)],
) -> Result<Sub, (u16, Vec<u8>)> {
    let url = format!("ws://{addr}/api/experimental/chats/{chat}/stream?{query}");
    let mut req = url.into_client_request().unwrap();
    for (k, v) in headers {
        req.headers_mut().insert(
            http::HeaderName::from_bytes(k.as_bytes()).unwrap(),
            v.parse().unwrap(),
        );
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((ws, _)) => Ok(Sub {
            ws,
            framing: "envelope",
            frames: Vec::new(),
        }),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            let status = resp.status().as_u16();
            Err((status, resp.into_body().unwrap_or_default()))
        }
        Err(e) => panic!("websocket error: {e}"),
    }
}

impl Sub {
    /// Events received within `wait` (stops early after `quiet` without frames).
    pub async fn events_for(&mut self, wait: Duration) -> Vec<Value> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while let Ok(Some(msg)) = tokio::time::timeout_at(deadline, self.ws.next()).await {
            match msg {
                Ok(Message::Text(t)) => {
                    self.frames.push(t.to_string());
                    out.extend(decode_frame(t.as_str()));
                }
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(_) => {}
            }
        }
        out
    }

    /// Reads until `pred` holds for the events gathered so far, or `wait` passes.
    pub async fn until(&mut self, wait: Duration, pred: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        let deadline = tokio::time::Instant::now() + wait;
        while !pred(&out) {
            match tokio::time::timeout_at(deadline, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    self.frames.push(t.to_string());
                    out.extend(decode_frame(t.as_str()));
                }
                Ok(Some(Ok(Message::Close(_)))) | Ok(Some(Err(_))) | Ok(None) | Err(_) => break,
                Ok(Some(Ok(_))) => {}
            }
        }
        out
    }

    pub async fn send_text(&mut self, text: &str) {
        let _ = self.ws.send(Message::Text(text.into())).await;
    }
}

/// Events of one frame in either framing.
pub fn decode_frame(text: &str) -> Vec<Value> {
    let v: Value = serde_json::from_str(text).expect("frame is JSON");
    match v {
        Value::Array(events) => events,
        Value::Object(ref o) if o.get("type") == Some(&Value::from("data")) => {
            o["data"].as_array().cloned().unwrap_or_default()
        }
        other => vec![other],
    }
}

pub fn message_ids(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| e["message"]["id"].as_i64().unwrap())
        .collect()
}

/// Visible message ids of a chat, as Postgres holds them.
pub async fn db_ids(db: &tokio_postgres::Client, chat: &str) -> Vec<i64> {
    let chat: uuid::Uuid = chat.parse().unwrap();
    db.query(
        "SELECT id FROM chat_messages WHERE chat_id = $1 AND deleted = false \
         AND visibility IN ('user','both') ORDER BY created_at, id",
        &[&chat],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| r.get(0))
    .collect()
}

/// Posts a user message through `addr`.
pub async fn post_message(addr: SocketAddr, chat: &str, token: &str, text: &str) -> (u16, Vec<u8>) {
    let body = serde_json::json!({"content": [{"type": "text", "text": text}]}).to_string();
    let path = format!("/api/experimental/chats/{chat}/messages");
    let (status, _, body) = http(
        addr,
        "POST",
        &path,
        &[("Coder-Session-Token", token)],
        &body,
    )
    .await;
    (status, body)
}

/// Edits user message `message` of `chat` to `text` (`PATCH .../messages/{id}`).
pub async fn edit_message(
    addr: SocketAddr,
    chat: &str,
    token: &str,
    message: i64,
    text: &str,
) -> (u16, Vec<u8>) {
    let body = serde_json::json!({"content": [{"type": "text", "text": text}]}).to_string();
    let path = format!("/api/experimental/chats/{chat}/messages/{message}");
    let (status, _, body) = http(
        addr,
        "PATCH",
        &path,
        &[("Coder-Session-Token", token)],
        &body,
    )
    .await;
    (status, body)
}

/// Waits until the chat is idle (status waiting, queue empty) in Postgres.
pub async fn wait_idle(db: &tokio_postgres::Client, chat: &str) {
    let chat: uuid::Uuid = chat.parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let row = db
            .query_one(
                "SELECT status::text, (SELECT count(*) FROM chat_queued_messages q WHERE q.chat_id = c.id) \
                 FROM chats c WHERE id = $1",
                &[&chat],
            )
            .await
            .unwrap();
        let (status, queued): (String, i64) = (row.get(0), row.get(1));
        if status == "waiting" && queued == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "chat never went idle ({status}, {queued} queued)"
        );
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
}

/// Scrapes one sample from a Prometheus text page; 0 when absent.
pub async fn metric(admin: SocketAddr, name_with_labels: &str) -> f64 {
    let (_, _, body) = http(admin, "GET", "/metrics", &[], "").await;
    metric_in(&String::from_utf8_lossy(&body), name_with_labels)
}

/// Polls chatcache's `/metrics` until `name_with_labels` reaches `at_least`; fails after `within`.
pub async fn until_metric(
    admin: SocketAddr,
    name_with_labels: &str,
    at_least: f64,
    within: Duration,
) {
    let deadline = Instant::now() + within;
    while metric(admin, name_with_labels).await < at_least {
        assert!(
            Instant::now() < deadline,
            "{name_with_labels} never reached {at_least} within {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn metric_in(text: &str, name_with_labels: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            (name == name_with_labels).then(|| value.parse().unwrap_or(0.0))
        })
        .unwrap_or(0.0)
}

/// Reads `s` until the last of `ids` has arrived, or 20 s have passed; returns the events read.
pub async fn until_last(s: &mut Sub, ids: &[i64]) -> Vec<Value> {
    s.until(Duration::from_secs(20), |ev| {
        message_ids(ev).last() == ids.last()
    })
    .await
}

/// A new subscriber from `after_id = 0` through `addr` receives exactly the chat's visible
/// history as Postgres holds it, in order.
pub async fn history_exact(addr: SocketAddr, pg: &tokio_postgres::Client, chat: &str, token: &str) {
    let ids = db_ids(pg, chat).await;
    let mut s = subscribe(addr, chat, 0, token).await;
    let got = until_last(&mut s, &ids).await;
    assert_eq!(message_ids(&got), ids, "history of {chat} through {addr}");
}

/// Publishes `payload` on the chat's stream channel, as a coderd replica would.
pub async fn notify(pg: &tokio_postgres::Client, chat: &str, payload: &str) {
    pg.execute(
        "SELECT pg_notify($1, $2)",
        &[&format!("chat:stream:{chat}"), &payload],
    )
    .await
    .unwrap();
}
