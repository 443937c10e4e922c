//! A real Postgres server stopped and started under chatcache: health transitions, pass-through
//! under load while the cache side is down, streams failing open, and subscribers that stay
//! exact across a restart. Each test owns a private cluster ([`PrivatePg`]), so the shared
//! server on 5432 is never touched.

mod common;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::private_pg::PrivatePg;
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
/// A short pool timeout: reads chatcache tries while Postgres is down give up within 500 ms.
const FAST_DB: &str = "[db]\nconnect_timeout_ms = 500\n";
const SIGNED_OUT: &str =
    "You are signed out or your session has expired. Please sign in again to continue.";

async fn get(admin: SocketAddr, path: &str) -> (u16, String) {
    let (status, _, body) = http(admin, "GET", path, &[], "").await;
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Polls `/ready` until it answers 200; returns how long that took.
async fn until_ready(admin: SocketAddr, what: &str) -> Duration {
    let started = Instant::now();
    while get(admin, "/ready").await.0 != 200 {
        assert!(started.elapsed() < WAIT, "{what}: never ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    started.elapsed()
}

/// Stops or starts the server from inside a test without stalling the runtime.
fn blocking<T>(f: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(f)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_and_live_follow_a_real_postgres_stop_and_start() {
    let pg = PrivatePg::started();
    let db = pg.scratch().await;
    let sim = start_sim(&db, "a", &[]).await;

    // Started with Postgres up: ready (start_sidecar waits for it), and live. Default config.
    let first = start_sidecar(&db, sim.addr, "").await;
    let first_admin = first.admin.unwrap();
    assert_eq!(get(first_admin, "/ready").await, (200, "ready\n".into()));
    assert_eq!(get(first_admin, "/live").await, (200, "ok\n".into()));

    // Started while Postgres is stopped: live, but not ready, for as long as it stays down.
    blocking(|| pg.stop());
    assert!(!pg.is_running());
    let second = spawn_sidecar_at(&db, sim.addr, "", free_addr()).await;
    let admin = second.admin.unwrap();
    for _ in 0..5 {
        let asked = Instant::now();
        assert_eq!(get(admin, "/live").await, (200, "ok\n".into()));
        assert_eq!(get(admin, "/ready").await, (503, "not ready\n".into()));
        // At once (LISTEN being down answers it), within a default Kubernetes probe timeout.
        assert!(
            asked.elapsed() < Duration::from_secs(1),
            "{:?}",
            asked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The sidecar that was ready before stays ready: readiness is sticky by design.
    assert_eq!(get(first_admin, "/ready").await.0, 200);
    assert_eq!(get(first_admin, "/live").await.0, 200);

    // Postgres starts: the second sidecar becomes ready within the bound.
    blocking(|| pg.start());
    let took = until_ready(admin, "after Postgres started").await;
    eprintln!("ready {took:?} after Postgres started");
    assert_eq!(
        metric(admin, "chatcache_listen_reconnects_total").await,
        0.0
    );

    // Once ready, a stopped Postgres leaves both sidecars ready and live (streams fail open).
    blocking(|| pg.stop());
    tokio::time::sleep(Duration::from_millis(500)).await;
    for a in [admin, first_admin] {
        assert_eq!(get(a, "/ready").await, (200, "ready\n".into()));
        assert_eq!(get(a, "/live").await, (200, "ok\n".into()));
    }
    // ... and after it is back, LISTEN reconnects on both.
    blocking(|| pg.start());
    for a in [admin, first_admin] {
        until_metric(a, "chatcache_listen_reconnects_total", 1.0, WAIT).await;
        assert_eq!(get(a, "/ready").await.0, 200);
    }
}

/// A request coderd answers without touching its database, and what it answers.
struct Probe {
    method: &'static str,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
    body: &'static str,
    status: u16,
    message: &'static str,
}

fn probes(chat: &str) -> Vec<Probe> {
    let probe = |method, path: String, headers, body, status, message| Probe {
        method,
        path,
        headers,
        body,
        status,
        message,
    };
    vec![
        probe(
            "GET",
            "/api/v2/buildinfo".into(),
            vec![],
            "",
            404,
            "Route not found.",
        ),
        probe(
            "DELETE",
            "/healthz".into(),
            vec![],
            "",
            404,
            "Route not found.",
        ),
        probe(
            "GET",
            "/api/experimental/chats".into(),
            vec![],
            "",
            401,
            SIGNED_OUT,
        ),
        probe(
            "GET",
            "/api/experimental/chats?limit=5".into(),
            vec![("Coder-Session-Token", "not-a-token-at-all")],
            "",
            401,
            SIGNED_OUT,
        ),
        probe(
            "POST",
            format!("/api/experimental/chats/{chat}/messages"),
            vec![],
            r#"{"content":[{"type":"text","text":"x"}]}"#,
            401,
            SIGNED_OUT,
        ),
        probe(
            "PATCH",
            format!("/api/experimental/chats/{chat}/messages/1"),
            vec![("Authorization", "Bearer short")],
            "{}",
            401,
            SIGNED_OUT,
        ),
        // The stream route without a WebSocket handshake: chatcache hands it to coderd.
        probe(
            "GET",
            format!("/api/experimental/chats/{chat}/stream?after_id=0"),
            vec![],
            "",
            401,
            SIGNED_OUT,
        ),
    ]
}

/// Status, the headers a client acts on, and the body; `Err` is a transport failure.
type Answer = Result<(u16, Vec<(String, String)>, Vec<u8>), String>;

async fn ask(addr: SocketAddr, p: &Probe) -> Answer {
    let (method, path, body) = (p.method, p.path.clone(), p.body);
    let headers = p.headers.clone();
    // `http` panics on a transport failure; a panicked task is counted as one.
    let task = tokio::spawn(async move { http(addr, method, &path, &headers, body).await });
    let (status, head, body) = task.await.map_err(|e| e.to_string())?;
    let kept = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .filter(|(k, _)| k == "content-type" || k == "www-authenticate")
        .collect();
    Ok((status, kept, body))
}

#[derive(Default, Debug)]
struct LoadFigures {
    requests: usize,
    transport_errors: Vec<String>,
    mismatches: Vec<String>,
    statuses: BTreeMap<u16, usize>,
}

/// `clients` concurrent clients each send `per_client` probes through the sidecar and the same
/// probe straight to coderd, and compare the answers.
async fn compare_load(
    side: SocketAddr,
    sim: SocketAddr,
    chat: &str,
    clients: usize,
    per_client: usize,
) -> LoadFigures {
    let mut tasks = tokio::task::JoinSet::new();
    for client in 0..clients {
        let chat = chat.to_string();
        tasks.spawn(async move {
            let probes = probes(&chat);
            let mut figures = LoadFigures::default();
            for i in 0..per_client {
                let p = &probes[(client + i) % probes.len()];
                let (via, direct) = tokio::join!(ask(side, p), ask(sim, p));
                figures.requests += 1;
                match (via, direct) {
                    (Ok(via), Ok(direct)) => {
                        *figures.statuses.entry(via.0).or_default() += 1;
                        let body: Value = serde_json::from_slice(&via.2).unwrap_or(Value::Null);
                        if via != direct || via.0 != p.status || body["message"] != p.message {
                            figures.mismatches.push(format!(
                                "{} {}: via {:?} {:?} / direct {:?} {:?}",
                                p.method,
                                p.path,
                                via.0,
                                String::from_utf8_lossy(&via.2),
                                direct.0,
                                String::from_utf8_lossy(&direct.2)
                            ));
                        }
                    }
                    (via, direct) => figures.transport_errors.push(format!(
                        "{} {}: via {via:?} direct {direct:?}",
                        p.method, p.path
                    )),
                }
            }
            figures
        });
    }
    let mut all = LoadFigures::default();
    let joined = tokio::time::timeout(Duration::from_secs(30), async {
        while let Some(done) = tasks.join_next().await {
            let f = done.expect("load client");
            all.requests += f.requests;
            all.transport_errors.extend(f.transport_errors);
            all.mismatches.extend(f.mismatches);
            for (s, n) in f.statuses {
                *all.statuses.entry(s).or_default() += n;
            }
        }
    })
    .await;
    assert!(joined.is_ok(), "the load did not finish within 30 s");
    all
}

/// Opens a stream (after_id=0) and reads until message `last` arrived.
async fn open_stream(
    addr: SocketAddr,
    chat: String,
    token: String,
    last: i64,
) -> Result<Vec<Value>, (u16, Vec<u8>)> {
    let auth = [("Coder-Session-Token", token.as_str())];
    let mut sub = try_subscribe(addr, &chat, "after_id=0", &auth).await?;
    Ok(sub
        .until(WAIT, |ev| message_ids(ev).last() == Some(&last))
        .await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_keeps_working_under_load_while_postgres_is_down() {
    let pg = PrivatePg::started();
    let db = pg.scratch().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.clone(), users[0].chats[0].clone());
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    // A long authz TTL: coderd cannot answer the probe while its database is down, and the
    // subscription must reach the listen_down check (not the authz one).
    let config = format!("{FAST_DB}[authz]\nttl_ms = 120000\n");
    let side = start_sidecar(&db, sim.addr, &config).await;
    let admin = side.admin.unwrap();

    // History, and one stream through the sidecar that caches coderd's yes for this token.
    let client = db.client().await;
    post_message(side.addr, &chat, &token, "before the outage").await;
    wait_idle(&client, &chat).await;
    let ids = db_ids(&client, &chat).await;
    let last = *ids.last().unwrap();
    let warm = open_stream(side.addr, chat.clone(), token.clone(), last).await;
    assert_eq!(message_ids(&warm.unwrap()), ids);
    let hits = metric(admin, "chatcache_catchup_total{result=\"hit\"}").await;
    drop(client);

    blocking(|| pg.stop());
    // pg_ctl returned once every backend exited: chatcache's LISTEN socket is closed by now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let fail_opens = "chatcache_fail_open_total{reason=\"listen_down\"}";
    assert_eq!(metric(admin, fail_opens).await, 0.0);

    // A stream through the sidecar fails open; the same stream goes straight to coderd. Without
    // its database coderd holds both handshakes (its pool waits for a connection).
    let via = tokio::spawn(open_stream(side.addr, chat.clone(), token.clone(), last));
    let direct = tokio::spawn(open_stream(sim.addr, chat.clone(), token.clone(), last));
    until_metric(admin, fail_opens, 1.0, WAIT).await;
    assert_eq!(
        metric(admin, "chatcache_catchup_total{result=\"fail_open\"}").await,
        1.0
    );

    // Meanwhile 8 clients x 50 requests through the sidecar, each compared with coderd's answer.
    let proxied = metric(admin, "chatcache_proxied_requests_total").await;
    let started = Instant::now();
    let load = compare_load(side.addr, sim.addr, &chat, 8, 50).await;
    eprintln!(
        "load while Postgres is down: {:?} in {:?}",
        load.statuses,
        started.elapsed()
    );
    assert_eq!(load.requests, 400);
    assert!(
        load.transport_errors.is_empty(),
        "{:#?}",
        load.transport_errors
    );
    assert!(load.mismatches.is_empty(), "{:#?}", load.mismatches);
    // Client c sends probe (c + i) % 7 as its i-th request: 115 answers 404, 285 answer 401.
    let kinds = probes(&chat);
    let mut expected = BTreeMap::new();
    for i in (0..8).flat_map(|c| (0..50).map(move |i| c + i)) {
        *expected.entry(kinds[i % kinds.len()].status).or_default() += 1;
    }
    assert_eq!(load.statuses, expected);
    assert_eq!(
        metric(admin, "chatcache_proxied_requests_total").await - proxied,
        400.0
    );
    assert!(
        !via.is_finished(),
        "coderd answered a stream without its database"
    );

    // Postgres is back: coderd's pool reconnects and answers both held handshakes the same way,
    // through the tunnel as directly.
    blocking(|| pg.start());
    let via = tokio::time::timeout(Duration::from_secs(40), via)
        .await
        .expect("via")
        .unwrap();
    let direct = tokio::time::timeout(Duration::from_secs(40), direct)
        .await
        .expect("direct")
        .unwrap();
    let (via, direct) = (
        via.expect("tunnelled stream"),
        direct.expect("direct stream"),
    );
    assert_eq!(message_ids(&via), ids);
    assert_eq!(via, direct, "the tunnelled stream is coderd's own");
    assert_eq!(via[0]["type"], "status");
    assert_eq!(metric(admin, fail_opens).await, 1.0);

    // LISTEN comes back and the cache serves again: a new turn, then a catch-up from memory.
    until_metric(admin, "chatcache_listen_reconnects_total", 1.0, WAIT).await;
    let client = db.client().await;
    let (status, _) = post_message(side.addr, &chat, &token, "after the outage").await;
    assert_eq!(status, 200);
    wait_idle(&client, &chat).await;
    let ids = db_ids(&client, &chat).await;
    let last = *ids.last().unwrap();
    let served = open_stream(side.addr, chat.clone(), token.clone(), last).await;
    assert_eq!(message_ids(&served.unwrap()), ids);
    assert_eq!(
        metric(admin, "chatcache_catchup_total{result=\"hit\"}").await,
        hits + 1.0
    );
    assert_eq!(metric(admin, fail_opens).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_survive_a_postgres_restart() {
    let pg = PrivatePg::started();
    let db = pg.scratch().await;
    let users = seed(&db, 1, 2);
    let token = users[0].token.clone();
    let chats = users[0].chats.clone();
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, FAST_DB).await;
    let admin = side.admin.unwrap();
    let client = db.client().await;
    post_message(side.addr, &chats[0], &token, "before the restart").await;
    wait_idle(&client, &chats[0]).await;

    // Three subscribers on the first chat, two on the second, each holding the history.
    let mut subs = Vec::new();
    for (chat, n) in [(&chats[0], 3), (&chats[1], 2)] {
        let ids = db_ids(&client, chat).await;
        for _ in 0..n {
            let mut s = subscribe(side.addr, chat, 0, &token).await;
            let seen = s
                .until(WAIT, |ev| {
                    message_ids(ev) == ids && ev.iter().any(|e| e["type"] == "status")
                })
                .await;
            assert_eq!(message_ids(&seen), ids);
            subs.push((chat.clone(), s, seen));
        }
    }
    drop(client);

    blocking(|| pg.restart());
    until_metric(admin, "chatcache_listen_reconnects_total", 1.0, WAIT).await;
    let client = db.client().await;

    // coderd-sim found its database again on its own: its LISTEN connection is back in use.
    let deadline = Instant::now() + WAIT;
    loop {
        let listening: i64 = client
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'coderd-sim/a' \
                 AND query LIKE 'LISTEN %'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if listening > 0 {
            break;
        }
        assert!(Instant::now() < deadline, "coderd-sim never LISTENed again");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A turn on each chat after the restart reaches every subscriber exactly once.
    for chat in &chats {
        let (status, body) = post_message(side.addr, chat, &token, "after the restart").await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    for chat in &chats {
        wait_idle(&client, chat).await;
    }
    for (chat, s, seen) in &mut subs {
        let ids = db_ids(&client, chat).await;
        let last = *ids.last().unwrap();
        seen.extend(
            s.until(WAIT, |ev| message_ids(ev).last() == Some(&last))
                .await,
        );
        seen.extend(s.events_for(Duration::from_millis(300)).await);
        assert_eq!(message_ids(seen), ids, "subscriber of {chat}");
    }
    assert_eq!(metric(admin, "chatcache_subscribers").await, 5.0);
    assert_eq!(
        metric(admin, "chatcache_catchup_total{result=\"fail_open\"}").await,
        0.0
    );
}
