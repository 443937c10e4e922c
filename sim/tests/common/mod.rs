//! Shared scaffolding for coderd-sim's integration tests: a scratch database per test, real
//! `coderd-sim serve` processes on free loopback ports, a raw HTTP/1.1 client, WebSocket
//! stream readers and a LISTEN tap. Everything talks to 127.0.0.1 only.

#![allow(dead_code)]

use std::net::TcpListener as StdListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use futures_util::StreamExt;
use rand::Rng;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

pub const SIM: &str = env!("CARGO_BIN_EXE_coderd-sim");
const ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
pub const CHAT: &str = "11111111-1111-4111-8111-111111111111";
pub const MODEL_CONFIG: &str = "22222222-2222-4222-8222-222222222222";

/// A database that exists for one test and is dropped (with its connections) afterwards.
pub struct ScratchDb {
    pub name: String,
    pub url: String,
}

impl ScratchDb {
    /// Creates the database and applies the schema with `coderd-sim migrate`.
    pub async fn new() -> ScratchDb {
        let suffix: u64 = rand::thread_rng().gen();
        let name = format!("sim_test_{suffix:016x}");
        admin(&format!("CREATE DATABASE {name}")).await;
        let url = format!("postgres://postgres@127.0.0.1:5432/{name}");
        let status = Command::new(SIM)
            .args(["migrate", "--database-url", &url])
            .stderr(Stdio::null())
            .status()
            .expect("run coderd-sim migrate");
        assert!(status.success(), "migrate failed");
        ScratchDb { name, url }
    }

    /// A plain connection for arranging and inspecting data.
    pub async fn connect(&self) -> tokio_postgres::Client {
        let (client, connection) = self
            .url
            .parse::<tokio_postgres::Config>()
            .unwrap()
            .options("-c TimeZone=UTC")
            .connect(NoTls)
            .await
            .expect("connect scratch db");
        tokio::spawn(connection);
        client
    }

    /// Seeds users and chats with `coderd-sim seed` and returns the seed file.
    pub fn seed(&self, users: usize, chats_per_user: usize) -> Seed {
        let out = std::env::temp_dir().join(format!("{}-seed.json", self.name));
        let status = Command::new(SIM)
            .args(["seed", "--database-url", &self.url])
            .args([
                "--users",
                &users.to_string(),
                "--chats-per-user",
                &chats_per_user.to_string(),
            ])
            .arg("--out")
            .arg(&out)
            .stderr(Stdio::null())
            .status()
            .expect("run coderd-sim seed");
        assert!(status.success(), "seed failed");
        let file: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
        let _ = std::fs::remove_file(&out);
        let users = file["users"]
            .as_array()
            .unwrap()
            .iter()
            .map(|u| SeedUser {
                id: u["id"].as_str().unwrap().parse().unwrap(),
                token: u["token"].as_str().unwrap().to_string(),
                chats: u["chats"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|c| c.as_str().unwrap().parse().unwrap())
                    .collect(),
            })
            .collect();
        Seed { users }
    }

    /// Inserts a chat with a fixed id for `owner`, as the test vectors use.
    pub async fn insert_chat(&self, id: &str, owner: Uuid) {
        let client = self.connect().await;
        let id: Uuid = id.parse().unwrap();
        let config: Uuid = MODEL_CONFIG.parse().unwrap();
        client
            .execute(
                "INSERT INTO chats (id, owner_id, title, last_model_config_id) \
                 VALUES ($1, $2, 'fixed', $3)",
                &[&id, &owner, &config],
            )
            .await
            .unwrap();
    }
}

impl Drop for ScratchDb {
    fn drop(&mut self) {
        let statement = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            runtime.unwrap().block_on(admin(&statement));
        })
        .join()
        .unwrap();
    }
}

async fn admin(statement: &str) {
    let (client, connection) = tokio_postgres::connect(ADMIN_URL, NoTls)
        .await
        .expect("admin");
    tokio::spawn(connection);
    client.batch_execute(statement).await.expect(statement);
}

pub struct Seed {
    pub users: Vec<SeedUser>,
}

pub struct SeedUser {
    pub id: Uuid,
    pub token: String,
    pub chats: Vec<Uuid>,
}

/// A running `coderd-sim serve`; killed when dropped.
pub struct SimProcess {
    pub addr: String,
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Drop for SimProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A free loopback port (bound, read, released).
pub fn free_port() -> u16 {
    StdListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl SimProcess {
    /// Starts a replica with `extra` serve flags and waits until it answers.
    pub async fn start(db: &ScratchDb, name: &str, extra: &[&str]) -> SimProcess {
        Self::start_on(db, name, &format!("127.0.0.1:{}", free_port()), extra).await
    }

    pub async fn start_on(db: &ScratchDb, name: &str, addr: &str, extra: &[&str]) -> SimProcess {
        let log = std::env::temp_dir().join(format!("{}-{name}.log", db.name));
        let child = Command::new(SIM)
            .args([
                "serve",
                "--listen",
                addr,
                "--database-url",
                &db.url,
                "--replica",
                name,
            ])
            .args(extra)
            .env("RUST_LOG", "coderd_sim=debug")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn coderd-sim serve");
        let process = SimProcess {
            addr: addr.to_string(),
            name: name.to_string(),
            child,
            log,
        };
        for _ in 0..200 {
            if TcpStream::connect(&process.addr).await.is_ok() {
                return process;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("{name} did not start: {}", process.log_text());
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One metric value from `/metrics` (0 when absent).
    pub async fn metric(&self, series: &str) -> f64 {
        let response = http(&self.addr, "GET", "/metrics", &[], None).await;
        response
            .body
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

/// A raw HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }
}

/// Sends one HTTP/1.1 request with `Connection: close` and reads the whole response.
pub async fn http(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> HttpResponse {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() || method == "POST" || method == "PATCH" {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("response in time")
        .unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let mut lines = head.lines();
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    HttpResponse {
        status,
        headers,
        body: body.to_string(),
    }
}

/// Shorthand for an authenticated JSON request.
pub async fn api(
    addr: &str,
    token: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> HttpResponse {
    let path = format!("/api/experimental{path}");
    http(addr, method, &path, &[("Coder-Session-Token", token)], body).await
}

/// Posts a text message to a chat and returns the response JSON.
pub async fn post_message(addr: &str, token: &str, chat: Uuid, text: &str) -> Value {
    let body = serde_json::json!({"content": [{"type": "text", "text": text}]}).to_string();
    let response = api(
        addr,
        token,
        "POST",
        &format!("/chats/{chat}/messages"),
        Some(&body),
    )
    .await;
    assert_eq!(response.status, 200, "{}", response.body);
    response.json()
}

/// A client WebSocket on a chat stream.
pub struct StreamClient {
    pub ws: WebSocketStream<TcpStream>,
}

impl StreamClient {
    pub async fn connect(
        addr: &str,
        token: &str,
        chat: Uuid,
        after_id: Option<i64>,
    ) -> StreamClient {
        let query = after_id
            .map(|a| format!("?after_id={a}"))
            .unwrap_or_default();
        let url = format!("ws://{addr}/api/experimental/chats/{chat}/stream{query}");
        let mut request = url.into_client_request().unwrap();
        request
            .headers_mut()
            .insert("Coder-Session-Token", token.parse().unwrap());
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (ws, _) = tokio_tungstenite::client_async(request, tcp)
            .await
            .expect("ws handshake");
        StreamClient { ws }
    }

    /// The next text frame, exactly as sent; `None` on close or after `wait`.
    pub async fn next_frame(&mut self, wait: Duration) -> Option<String> {
        loop {
            match tokio::time::timeout(wait, self.ws.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => return Some(text.as_str().to_string()),
                Ok(Some(Ok(Message::Ping(_) | Message::Pong(_)))) => continue,
                _ => return None,
            }
        }
    }

    /// The events of the next frame (either framing).
    pub async fn next_events(&mut self, wait: Duration) -> Option<Vec<Value>> {
        let frame = self.next_frame(wait).await?;
        Some(events_of(&frame))
    }

    /// Collects events until `done` says so, or panics after `wait` in total.
    pub async fn events_until(
        &mut self,
        wait: Duration,
        done: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut all = Vec::new();
        while !done(&all) {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_events(left).await {
                Some(events) => all.extend(events),
                None => panic!("stream ended or timed out; got {all:#?}"),
            }
        }
        all
    }

    /// Everything that arrives within `wait`.
    pub async fn drain(&mut self, wait: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + wait;
        let mut all = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_events(left).await {
                Some(events) => all.extend(events),
                None => return all,
            }
        }
    }
}

/// Splits a frame of either framing into its events.
pub fn events_of(frame: &str) -> Vec<Value> {
    assert!(
        frame.ends_with('\n'),
        "frame must end in a newline: {frame:?}"
    );
    match serde_json::from_str::<Value>(frame).unwrap() {
        Value::Array(events) => events,
        Value::Object(mut envelope) => {
            assert_eq!(envelope["type"], "data", "{frame}");
            match envelope.remove("data") {
                Some(Value::Array(events)) => events,
                other => panic!("bad envelope data {other:?}"),
            }
        }
        other => panic!("unexpected frame {other}"),
    }
}

/// Message ids among `events`, in order.
pub fn message_ids(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .filter(|e| e["type"] == "message")
        .map(|e| e["message"]["id"].as_i64().unwrap())
        .collect()
}

pub fn of_type<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["type"] == kind).collect()
}

/// A LISTEN connection that records every notification on the given channels.
pub struct NotifyTap {
    pub rx: mpsc::UnboundedReceiver<(String, String)>,
    _client: tokio_postgres::Client,
}

impl NotifyTap {
    pub async fn listen(db: &ScratchDb, channels: &[String]) -> NotifyTap {
        let (client, mut connection) = tokio_postgres::connect(&db.url, NoTls).await.unwrap();
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(|cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let AsyncMessage::Notification(n) = message {
                    let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
                }
            }
        });
        for channel in channels {
            client
                .batch_execute(&format!("LISTEN \"{channel}\""))
                .await
                .unwrap();
        }
        NotifyTap {
            rx,
            _client: client,
        }
    }

    /// Payloads received until `count` arrived (panics after `wait`).
    pub async fn take(&mut self, count: usize, wait: Duration) -> Vec<(String, String)> {
        let mut got = Vec::new();
        while got.len() < count {
            match tokio::time::timeout(wait, self.rx.recv()).await {
                Ok(Some(n)) => got.push(n),
                _ => panic!("expected {count} notifications, got {got:#?}"),
            }
        }
        got
    }
}

/// The `worker_id` a replica name derives to (CONTRACTS.md).
pub fn worker_id(name: &str) -> Uuid {
    coderd_sim::replica::worker_id_for(name)
}

/// Inserts a message row directly, as another replica's commit would, and returns its id.
pub async fn insert_message(
    client: &tokio_postgres::Client,
    chat: Uuid,
    role: &str,
    text: &str,
) -> i64 {
    let content = serde_json::json!([{"type": "text", "text": text}]);
    client
        .query_one(
            "INSERT INTO chat_messages (chat_id, role, content) \
             VALUES ($1, $2::text::chat_message_role, $3) RETURNING id",
            &[&chat, &role, &content],
        )
        .await
        .unwrap()
        .get(0)
}
