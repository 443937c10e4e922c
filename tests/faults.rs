//! Faults the cache must survive without losing a message: coderd's cross-replica hole, a lost
//! LISTEN connection, and a subscriber that stops reading.

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(15);

/// Inserts a user message the way another replica would (row lock, commit), without notifying.
async fn insert_silently(pg: &tokio_postgres::Client, chat: &str, user: &str) -> i64 {
    let chat: uuid::Uuid = chat.parse().unwrap();
    let user: uuid::Uuid = user.parse().unwrap();
    pg.batch_execute("BEGIN").await.unwrap();
    pg.query("SELECT id FROM chats WHERE id = $1 FOR UPDATE", &[&chat])
        .await
        .unwrap();
    let row = pg
        .query_one(
            "INSERT INTO chat_messages (chat_id, role, content, created_by, content_version) \
             VALUES ($1, 'user', '[{\"type\":\"text\",\"text\":\"from replica b\"}]'::jsonb, $2, 1) \
             RETURNING id",
            &[&chat, &user],
        )
        .await
        .unwrap();
    pg.batch_execute("COMMIT").await.unwrap();
    row.get(0)
}

/// The hazard of coderd's #23218 cache (protocol doc §10): replica B commits message X, replica
/// A commits and publishes Y > X, and B's notify for X arrives last. A subscriber on A with the
/// cache on never gets X. Through chatcache it does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cross_replica_hole_is_repaired() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat, user) = (&users[0].token, &users[0].chats[0], &users[0].id);
    let sim = start_sim(&db, "a", &["--stream-cache", "on", "--part-delay-ms", "1"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let pg = db.client().await;
    post_message(sim.addr, chat, token, "warm up").await;
    wait_idle(&pg, chat).await;
    let before = db_ids(&pg, chat).await;

    let mut direct = subscribe(sim.addr, chat, *before.last().unwrap(), token).await;
    let mut cached = subscribe(side.addr, chat, *before.last().unwrap(), token).await;
    direct.events_for(Duration::from_millis(300)).await;
    cached.events_for(Duration::from_millis(300)).await;

    let x = insert_silently(&pg, chat, user).await;
    let (status, _) = post_message(sim.addr, chat, token, "from replica a").await;
    assert_eq!(status, 200);
    wait_idle(&pg, chat).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    notify(&pg, chat, &format!("{{\"after_message_id\":{}}}", x - 1)).await;

    let all = db_ids(&pg, chat).await;
    let new: Vec<i64> = all
        .iter()
        .copied()
        .filter(|id| id > before.last().unwrap())
        .collect();
    assert!(new.contains(&x) && new.len() >= 3, "{new:?}");

    // With order_proof the hole arrives first, in order, so wait for all of them.
    let all_seen = |ev: &[serde_json::Value]| {
        let ids = message_ids(ev);
        new.iter().all(|id| ids.contains(id))
    };
    let mut got = message_ids(&cached.until(WAIT, all_seen).await);
    got.sort_unstable();
    assert_eq!(
        got, new,
        "chatcache delivers every message, the hole included"
    );
    let seen_direct = message_ids(&direct.events_for(Duration::from_secs(1)).await);
    assert!(
        !seen_direct.contains(&x),
        "coderd's cache skips {x}: {seen_direct:?}"
    );
    // Read from Postgres either as a hole repair or, with order_proof, by the proof read that
    // released the later messages (and so delivered the hole first, in order).
    let admin = side.admin.unwrap();
    let reads = metric(admin, "chatcache_hole_repairs_total").await
        + metric(admin, "chatcache_db_reads_total{reason=\"proof\"}").await;
    assert!(reads >= 1.0);
}

async fn wait_for_listen(pg: &tokio_postgres::Client) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let n = pg
            .query(
                "SELECT 1 FROM pg_stat_activity WHERE application_name = 'chatcache-listen' \
                 AND datname = current_database()",
                &[],
            )
            .await
            .unwrap()
            .len();
        if n == 1 {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "LISTEN connection never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Kill chatcache's LISTEN connection mid-turn: subscribers stay and lose nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_connection_loss_loses_nothing() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (&users[0].token, &users[0].chats[0]);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "20", "--turn-parts", "10"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let pg = db.client().await;
    let mut cached = subscribe(side.addr, chat, 0, token).await;
    cached.events_for(Duration::from_millis(200)).await;

    for turn in 0..3 {
        wait_for_listen(&pg).await;
        let (status, _) = post_message(side.addr, chat, token, &format!("turn {turn}")).await;
        assert_eq!(status, 200);
        tokio::time::sleep(Duration::from_millis(60)).await;
        let killed = pg
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE application_name = 'chatcache-listen' AND datname = current_database()",
                &[],
            )
            .await
            .unwrap();
        assert_eq!(killed.len(), 1, "one LISTEN connection per sidecar");
        wait_idle(&pg, chat).await;
    }
    let ids = db_ids(&pg, chat).await;
    let got = cached
        .until(WAIT, |ev| message_ids(ev).last() == ids.last())
        .await;
    let mut got = message_ids(&got);
    got.dedup();
    assert_eq!(got, ids);
    let admin = side.admin.unwrap();
    until_metric(admin, "chatcache_listen_reconnects_total", 3.0, WAIT).await;
    // A new subscriber after the reconnects is served from the cache, not failed open.
    let mut late = subscribe(side.addr, chat, 0, token).await;
    let got = late
        .until(WAIT, |ev| message_ids(ev).last() == ids.last())
        .await;
    assert_eq!(message_ids(&got), ids);
    assert_eq!(
        metric(admin, "chatcache_fail_open_total{reason=\"listen_down\"}").await,
        0.0
    );
}

/// A subscriber that stops reading is closed with coderd's error; the others see everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_subscriber_is_closed_and_others_are_unaffected() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (&users[0].token, &users[0].chats[0]);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "0", "--turn-parts", "30000"]).await;
    let side = start_sidecar(&db, sim.addr, "[stream]\nsubscriber_queue_events = 512\n").await;
    let pg = db.client().await;
    let mut fast = subscribe(side.addr, chat, 0, token).await;

    // The stalled client: a raw socket with a tiny receive buffer that never reads.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stalled = socket.connect(side.addr).await.unwrap();
    let handshake = format!(
        "GET /api/experimental/chats/{chat}/stream HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n\
         Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Version: 13\r\nCoder-Session-Token: {token}\r\n\r\n"
    );
    tokio::io::AsyncWriteExt::write_all(&mut stalled, handshake.as_bytes())
        .await
        .unwrap();

    let (status, _) = post_message(side.addr, chat, token, "flood").await;
    assert_eq!(status, 200);
    let got = fast
        .until(Duration::from_secs(60), |ev| {
            ev.iter()
                .any(|e| e["type"] == "message" && e["message"]["role"] == "assistant")
        })
        .await;
    let parts = got.iter().filter(|e| e["type"] == "message_part").count();
    assert_eq!(parts, 30000, "the fast subscriber gets every part");
    wait_idle(&pg, chat).await;
    let admin = side.admin.unwrap();
    let within = Duration::from_secs(20);
    until_metric(admin, "chatcache_overflow_closes_total", 1.0, within).await;
    assert_eq!(metric(admin, "chatcache_subscribers").await, 1.0);
    drop(stalled);
}

/// A row chatcache cannot render (content_version 0) leaves the chat to coderd: the client
/// still gets coderd's own answer, and the fail-open is counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unrenderable_rows_fail_open_to_coderd() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat, user) = (&users[0].token, &users[0].chats[0], &users[0].id);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let pg = db.client().await;
    let chat_id: uuid::Uuid = chat.parse().unwrap();
    let user_id: uuid::Uuid = user.parse().unwrap();
    pg.execute(
        "INSERT INTO chat_messages (chat_id, role, content, created_by, content_version) \
         VALUES ($1, 'user', '\"legacy text\"'::jsonb, $2, 0)",
        &[&chat_id, &user_id],
    )
    .await
    .unwrap();
    for t in 0..2 {
        post_message(sim.addr, chat, token, &format!("t{t}")).await;
        wait_idle(&pg, chat).await;
    }
    let ids = db_ids(&pg, chat).await;
    let side = start_sidecar(&db, sim.addr, "[cache]\nmax_messages_per_chat = 2\n").await;
    let admin = side.admin.unwrap();

    // Warm the chat with a tail subscriber, then ask for everything: below the floor, the read
    // meets the legacy row, and the subscription goes to coderd untouched.
    let mut tail = subscribe(side.addr, chat, ids[ids.len() - 2], token).await;
    tail.events_for(Duration::from_millis(300)).await;
    let mut direct = subscribe(sim.addr, chat, 0, token).await;
    let mut full = subscribe(side.addr, chat, 0, token).await;
    let want = direct.events_for(Duration::from_millis(500)).await;
    let got = full.events_for(Duration::from_millis(500)).await;
    assert_eq!(message_ids(&got), ids);
    assert_eq!(got, want);
    assert_eq!(
        metric(
            admin,
            "chatcache_fail_open_total{reason=\"content_version\"}"
        )
        .await,
        1.0
    );
    // And for a while every new subscription of that chat goes to coderd.
    let mut again = subscribe(side.addr, chat, 0, token).await;
    assert_eq!(
        message_ids(&again.events_for(Duration::from_millis(300)).await),
        ids
    );
    assert_eq!(
        metric(
            admin,
            "chatcache_fail_open_total{reason=\"content_version\"}"
        )
        .await,
        2.0
    );
    let (live, _, _) = http(admin, "GET", "/live", &[], "").await;
    assert_eq!(live, 200);
}
