//! What an operator relies on: config errors, health transitions while Postgres goes away and
//! comes back, SIGTERM with open streams, SIGHUP changing a limit live, and the metrics.

mod common;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::Message;

fn check_config(text: &str, env: &[(&str, &str)]) -> (bool, String, String) {
    let path = std::env::temp_dir().join(format!("cc-check-{:x}.toml", rand::random::<u64>()));
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_chatcache"))
        .args(["--check-config", path.to_str().unwrap()])
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let _ = std::fs::remove_file(&path);
    let text = |b: Vec<u8>| String::from_utf8(b).unwrap();
    (out.status.success(), text(out.stdout), text(out.stderr))
}

#[test]
fn config_errors_name_the_field_and_secrets_are_redacted() {
    let bad = [
        ("listen_adr = \"127.0.0.1:1\"", "listen_adr"),
        ("[cache]\nmax_bytes = -1", "max_bytes"),
        (
            "[cache]\nmax_messages_per_chat = 0",
            "cache.max_messages_per_chat",
        ),
        ("framing = \"xml\"", "framing"),
        ("upstream_url = \"ftp://x\"", "upstream_url"),
        (
            "upstream_url = \"http://127.0.0.1:3000/prefix\"",
            "without user info, path or query",
        ),
        (
            "upstream_url = \"http://u:p@127.0.0.1:3000\"",
            "upstream_url",
        ),
        ("log_level = \"[[\"", "log_level"),
        (
            "database_url_file = \"/nonexistent/secret\"",
            "database_url_file",
        ),
        ("[stream]\nping_interval_ms = 0", "stream.ping_interval_ms"),
        (
            "database_url = \"postgres://u@db/coder?sslmode=require\"",
            "TLS to Postgres is not supported",
        ),
    ];
    for (text, field) in bad {
        let (ok, _, err) = check_config(text, &[]);
        assert!(!ok, "{text} accepted");
        assert!(err.contains(field), "{text}: {err}");
    }
    let (ok, _, err) = check_config("", &[("CHATCACHE_LISTEN_ADDR", "nope")]);
    assert!(!ok && err.contains("CHATCACHE_LISTEN_ADDR"), "{err}");
    let (ok, _, err) = check_config("", &[("CHATCACHE_UPSTREAM_URL", "ftp://x")]);
    assert!(!ok && err.contains("CHATCACHE_UPSTREAM_URL"), "{err}");
    let (ok, _, err) = check_config("", &[("CHATCACHE_DATABASE_URL", "nope")]);
    assert!(!ok && err.contains("CHATCACHE_DATABASE_URL"), "{err}");

    let (ok, out, _) = check_config(
        "database_url = \"postgres://u:hunter2@db/coder\"",
        &[("CHATCACHE_ADMIN_ADDR", "127.0.0.1:9999")],
    );
    assert!(ok);
    assert!(
        out.contains("postgres://u:REDACTED@db/coder") && !out.contains("hunter2"),
        "{out}"
    );
    assert!(out.contains("admin_addr = \"127.0.0.1:9999\""), "{out}");
}

/// A TCP relay to Postgres that the test can cut and restore.
struct Relay {
    addr: SocketAddr,
    open: Arc<AtomicBool>,
    generation: Arc<tokio::sync::watch::Sender<u64>>,
}

impl Relay {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let open = Arc::new(AtomicBool::new(true));
        let generation = Arc::new(tokio::sync::watch::channel(0u64).0);
        let (o, g) = (open.clone(), generation.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut client, _)) = listener.accept().await else {
                    return;
                };
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: the connection is refused in effect
                }
                let mut cut = g.subscribe();
                tokio::spawn(async move {
                    let Ok(mut pg) = TcpStream::connect("127.0.0.1:5432").await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut pg) => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            open,
            generation,
        }
    }

    fn cut(&self) {
        self.open.store(false, Ordering::SeqCst);
        self.generation.send_modify(|g| *g += 1);
    }

    fn restore(&self) {
        self.open.store(true, Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_survives_postgres_blips_and_streams_fail_open_meanwhile() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (&users[0].token, &users[0].chats[0]);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let relay = Relay::start().await;
    relay.cut();

    // Start chatcache against the relay while Postgres is unreachable: live, not ready.
    let addr = free_addr();
    let admin = free_addr();
    let url = format!("postgres://postgres@{}/{}", relay.addr, db.name);
    let path = std::env::temp_dir().join(format!("cc-ops-{}.toml", admin.port()));
    std::fs::write(
        &path,
        format!(
            "listen_addr = \"{addr}\"\nadmin_addr = \"{admin}\"\nupstream_url = \"http://{}\"\n\
             database_url = \"{url}\"\n[db]\nconnect_timeout_ms = 500\n",
            sim.addr
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_chatcache"))
        .args(["--config", path.to_str().unwrap()])
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let side = Proc {
        child,
        addr,
        admin: Some(admin),
    };
    wait_port(admin).await;
    assert_eq!(http(admin, "GET", "/live", &[], "").await.0, 200);
    assert_eq!(http(admin, "GET", "/ready", &[], "").await.0, 503);

    // Streams fail open to coderd and still work; REST passes through.
    let mut s = subscribe(addr, chat, 0, token).await;
    let ev = s.until(Duration::from_secs(5), |ev| !ev.is_empty()).await;
    assert_eq!(ev[0]["type"], "status");
    assert!(metric(admin, "chatcache_fail_open_total{reason=\"listen_down\"}").await >= 1.0);
    let (status, _) = post_message(addr, chat, token, "while the cache is down").await;
    assert_eq!(status, 200);

    // Postgres comes back: ready, and streams are served from the cache again.
    relay.restore();
    let deadline = Instant::now() + Duration::from_secs(20);
    while http(admin, "GET", "/ready", &[], "").await.0 != 200 {
        assert!(
            Instant::now() < deadline,
            "never ready after Postgres came back"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pg = db.client().await;
    wait_idle(&pg, chat).await;
    let ids = db_ids(&pg, chat).await;
    let mut s = subscribe(addr, chat, 0, token).await;
    let got = s
        .until(Duration::from_secs(5), |ev| {
            message_ids(ev).last() == ids.last()
        })
        .await;
    assert_eq!(message_ids(&got), ids);
    assert!(metric(admin, "chatcache_catchup_total{result=\"hit\"}").await >= 1.0);

    // A blip after that keeps the sidecar ready (streams fail open meanwhile).
    relay.cut();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(http(admin, "GET", "/ready", &[], "").await.0, 200);
    relay.restore();
    drop(side);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_closes_streams_with_1001_and_exits_zero() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (&users[0].token, &users[0].chats[0]);
    let sim = start_sim(&db, "a", &[]).await;
    let mut side = start_sidecar(&db, sim.addr, "shutdown_grace_ms = 3000\n").await;
    let mut s = subscribe(side.addr, chat, 0, token).await;
    s.until(Duration::from_secs(5), |ev| !ev.is_empty()).await;

    let started = Instant::now();
    side.signal(15);
    let close = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(msg) = s.ws.next().await {
            if let Ok(Message::Close(frame)) = msg {
                return frame.map(|f| u16::from(f.code));
            }
        }
        None
    })
    .await
    .expect("no close frame");
    assert_eq!(close, Some(1001));
    let status = loop {
        if let Some(status) = side.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "did not exit within the grace"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "{status:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_changes_a_limit_live() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (&users[0].token, &users[0].chats[0]);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let admin = side.admin.unwrap();
    let pg = db.client().await;
    let mut s = subscribe(side.addr, chat, 0, token).await;
    for t in 0..2 {
        post_message(side.addr, chat, token, &format!("t{t}")).await;
        wait_idle(&pg, chat).await;
    }
    let ids = db_ids(&pg, chat).await;
    s.until(Duration::from_secs(5), |ev| {
        message_ids(ev).last() == ids.last()
    })
    .await;

    // Rewrite the config with a 2-message ring and reload; the next insert trims the ring.
    let path =
        std::env::temp_dir().join(format!("chatcache-{}-{}.toml", db.name, side.addr.port()));
    let mut text = std::fs::read_to_string(&path).unwrap();
    text.push_str("[cache]\nmax_messages_per_chat = 2\n");
    std::fs::write(&path, text).unwrap();
    side.signal(1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    post_message(side.addr, chat, token, "after reload").await;
    wait_idle(&pg, chat).await;
    let ids = db_ids(&pg, chat).await;
    s.until(Duration::from_secs(5), |ev| {
        message_ids(ev).last() == ids.last()
    })
    .await;
    assert_eq!(
        metric(admin, "chatcache_db_reads_total{reason=\"below_floor\"}").await,
        0.0
    );
    let mut full = subscribe(side.addr, chat, 0, token).await;
    let got = full
        .until(Duration::from_secs(5), |ev| {
            message_ids(ev).last() == ids.last()
        })
        .await;
    assert_eq!(message_ids(&got), ids);
    assert_eq!(
        metric(admin, "chatcache_db_reads_total{reason=\"below_floor\"}").await,
        1.0
    );
    assert!(metric(admin, "chatcache_bytes_held").await > 0.0);
    assert_eq!(metric(admin, "chatcache_chats_held").await, 1.0);
    assert_eq!(metric(admin, "chatcache_feeds").await, 1.0);
    // The first subscriber may have been closed to catch up: a tool-call turn inserts more
    // messages at once than the 2-message ring holds.
    assert!(metric(admin, "chatcache_subscribers").await >= 1.0);
    assert!(metric(admin, "process_resident_memory_bytes").await > 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_and_never_contain_credentials() {
    let db = Scratch::new().await;
    let users = seed(&db, 2, 1);
    let (token, chat) = (&users[0].token, &users[0].chats[0]);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let (addr, admin) = (free_addr(), free_addr());
    let dir = std::env::temp_dir();
    let config = dir.join(format!("cc-json-{}.toml", admin.port()));
    let log = dir.join(format!("cc-json-{}.log", admin.port()));
    std::fs::write(
        &config,
        format!(
            "listen_addr = \"{addr}\"\nadmin_addr = \"{admin}\"\nupstream_url = \"http://{}\"\n\
             database_url = \"{}\"\nlog_format = \"json\"\nlog_level = \"debug\"\n",
            sim.addr, db.url
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_chatcache"))
        .args(["--config", config.to_str().unwrap()])
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let side = Proc {
        child,
        addr,
        admin: Some(admin),
    };
    wait_port(admin).await;
    while http(admin, "GET", "/ready", &[], "").await.0 != 200 {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let pg = db.client().await;
    let cookie = format!("coder_session_token={token}");
    let mut s = try_subscribe(addr, chat, "after_id=0", &[("Cookie", &cookie)])
        .await
        .unwrap();
    post_message(addr, chat, token, "logged").await;
    wait_idle(&pg, chat).await;
    s.events_for(Duration::from_millis(300)).await;
    let denied = try_subscribe(
        addr,
        &users[1].chats[0],
        "after_id=0",
        &[("Cookie", &cookie)],
    )
    .await;
    assert_eq!(denied.err().map(|e| e.0), Some(404));
    side.signal(15);
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(side);

    let text = std::fs::read_to_string(&log).unwrap();
    let _ = std::fs::remove_file(&log);
    let secret = token.split_once('-').unwrap().1;
    assert!(text.lines().count() >= 5, "{text}");
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
        assert!(
            v["level"].is_string() && v["fields"]["message"].is_string(),
            "{line}"
        );
        assert!(!line.contains(secret), "credential in a log line: {line}");
    }
    assert!(
        text.contains(&format!("\"chat.id\":\"{chat}\"")),
        "chat logs carry chat.id"
    );
}

/// `feed.linger_ms = 0` (no warm cache after the last subscriber leaves) still serves streams
/// from the cache: a new chat is not given up before its first subscriber is attached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn zero_linger_still_serves_from_the_cache() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, "[feed]\nlinger_ms = 0\n").await;
    let admin = side.admin.unwrap();
    let pg = db.client().await;
    let (status, _) = post_message(sim.addr, chat, token, "hello").await;
    assert_eq!(status, 200);
    wait_idle(&pg, chat).await;
    let ids = db_ids(&pg, chat).await;
    let mut s = subscribe(side.addr, chat, 0, token).await;
    assert_eq!(message_ids(&until_last(&mut s, &ids).await), ids);
    assert_eq!(
        metric(admin, "chatcache_catchup_total{result=\"hit\"}").await,
        1.0
    );
    assert_eq!(
        metric(admin, "chatcache_fail_open_total{reason=\"feed\"}").await,
        0.0
    );
}
