//! End to end: a real coderd-sim on a scratch database, a real chatcache in front of it, and
//! WebSocket subscribers through both. What chatcache sends must match what coderd sends.

mod common;

use std::time::Duration;

use common::private_pg::PrivatePg;
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

/// Messages only (type message), as (id, full JSON) pairs.
fn messages(events: &[Value]) -> Vec<Value> {
    events
        .iter()
        .filter(|e| e["type"] == "message")
        .cloned()
        .collect()
}

/// Runs `turns` turns on a chat through `addr` and waits for each to finish.
async fn run_turns(
    addr: std::net::SocketAddr,
    db: &tokio_postgres::Client,
    chat: &str,
    token: &str,
    turns: usize,
) {
    for t in 0..turns {
        let (status, body) = post_message(addr, chat, token, &format!("turn {t}")).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        wait_idle(db, chat).await;
    }
}

/// How every `GetChatMessagesByChatID`-shaped read begins, chatcache's and coderd-sim's.
const MESSAGE_READ: &str = "SELECT id, chat_id,";

/// Postgres's own count of message reads in the current database: calls of message-row
/// statements (pg_stat_statements, every client), and those it logged for chatcache and for
/// coderd-sim by `application_name` (`log_line_prefix = '%a|'`).
async fn postgres_reads(server: &PrivatePg, db: &tokio_postgres::Client) -> (i64, usize, usize) {
    let calls: i64 = db
        .query_one(
            "SELECT coalesce(sum(calls), 0)::bigint FROM pg_stat_statements s \
             JOIN pg_database d ON d.oid = s.dbid \
             WHERE d.datname = current_database() AND s.query LIKE $1 || '%FROM chat_messages%'",
            &[&MESSAGE_READ],
        )
        .await
        .unwrap()
        .get(0);
    let log = server.log();
    let logged = |app: &str| {
        log.lines()
            .filter(|l| l.starts_with(&format!("{app}|")) && l.contains(MESSAGE_READ))
            .count()
    };
    (calls, logged("chatcache"), logged("coderd-sim/a"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn catch_up_matches_coderd_and_reads_nothing_when_warm() {
    // A private server, so pg_stat_statements can be preloaded and every statement logged with
    // the client's application_name.
    let server = PrivatePg::with_settings(
        "shared_preload_libraries = 'pg_stat_statements'\n\
         log_statement = 'all'\nlog_line_prefix = '%a|'",
    );
    server.start();
    let db = server.scratch().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (&users[0].token, &users[0].chats[0]);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "2", "--turn-parts", "3"]).await;
    let pg = db.client().await;
    run_turns(sim.addr, &pg, chat, token, 4).await;
    let ids = db_ids(&pg, chat).await;
    assert!(ids.len() >= 8, "{ids:?}");

    let side = start_sidecar(&db, sim.addr, "").await;
    let admin = side.admin.unwrap();

    // The first subscriber warms the cache through the feed's snapshot.
    for after in [0, ids[2], ids[ids.len() - 1], -5] {
        let mut direct = subscribe(sim.addr, chat, after, token).await;
        let mut cached = subscribe(side.addr, chat, after, token).await;
        let want = direct.events_for(Duration::from_millis(400)).await;
        let got = cached.events_for(Duration::from_millis(400)).await;
        assert_eq!(got, want, "after_id={after}");
        assert_eq!(
            cached.frames, direct.frames,
            "frames byte for byte, after_id={after}"
        );
    }
    let reads = metric(admin, "chatcache_db_reads_total{reason=\"repair\"}").await
        + metric(admin, "chatcache_db_reads_total{reason=\"below_floor\"}").await;
    assert_eq!(reads, 0.0, "warm catch-ups must not read Postgres");
    assert!(metric(admin, "chatcache_catchup_total{result=\"hit\"}").await >= 4.0);

    // Postgres's own counts before the reconnects. chatcache filled its cache from coderd's
    // stream, not from Postgres; the log does attribute its statements (its LISTEN is there).
    pg.batch_execute("CREATE EXTENSION pg_stat_statements")
        .await
        .unwrap();
    let before = postgres_reads(&server, &pg).await;
    let listens = server
        .log()
        .lines()
        .filter(|l| l.starts_with("chatcache-listen|") && l.contains("LISTEN \"chat:stream:"))
        .count();
    assert!(
        listens >= 1,
        "chatcache's LISTEN is logged under its application_name"
    );

    // 100 reconnects with various after_id: still no reads by chatcache.
    for i in 0..100 {
        let after = ids[i % ids.len()];
        let mut s = subscribe(side.addr, chat, after, token).await;
        let want: Vec<i64> = ids.iter().copied().filter(|&id| id > after).collect();
        // The snapshot is one frame: status first, then the messages after `after`.
        let got = s.until(WAIT, |ev| !ev.is_empty()).await;
        assert_eq!(got[0]["type"], "status");
        assert_eq!(message_ids(&got), want);
    }
    let text = String::from_utf8(http(admin, "GET", "/metrics", &[], "").await.2).unwrap();
    for reason in ["repair", "proof", "below_floor", "refresh", "reload"] {
        let name = format!("chatcache_db_reads_total{{reason=\"{reason}\"}}");
        assert_eq!(metric_in(&text, &name), 0.0, "{reason}");
    }
    // No statement on chat_messages by anyone during the reconnects (pg_stat_statements), none
    // logged for chatcache, and coderd was not asked either.
    let after = postgres_reads(&server, &pg).await;
    assert_eq!(
        after, before,
        "(pg_stat_statements calls, chatcache, coderd-sim) statements"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_turns_and_edits_reach_every_subscriber() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (&users[0].token, &users[0].chats[0]);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "2", "--turn-parts", "3"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let pg = db.client().await;

    let mut direct = subscribe(sim.addr, chat, 0, token).await;
    let mut cached = subscribe(side.addr, chat, 0, token).await;
    run_turns(side.addr, &pg, chat, token, 3).await;
    let ids = db_ids(&pg, chat).await;
    let got = cached
        .until(WAIT, |ev| message_ids(ev).last() == ids.last())
        .await;
    let want = direct
        .until(WAIT, |ev| message_ids(ev).last() == ids.last())
        .await;
    assert_eq!(message_ids(&got), ids);
    assert_eq!(
        messages(&got),
        messages(&want),
        "message JSON equal to coderd's"
    );
    let parts = |ev: &[Value]| ev.iter().filter(|e| e["type"] == "message_part").count();
    assert_eq!(parts(&got), parts(&want), "every part relayed");
    assert!(parts(&got) >= 9);

    // Edit the first user message: both streams replay the new visible history.
    let first_user = ids[0];
    let (status, resp) = edit_message(side.addr, chat, token, first_user, "edited").await;
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&resp));
    wait_idle(&pg, chat).await;
    let after_edit = db_ids(&pg, chat).await;
    assert!(after_edit.len() < ids.len() + 2, "{after_edit:?}");
    let got = cached
        .until(WAIT, |ev| message_ids(ev).last() == after_edit.last())
        .await;
    let want = direct
        .until(WAIT, |ev| message_ids(ev).last() == after_edit.last())
        .await;
    // After the replay the client's view (ids from the last replay start) is the new history.
    let tail = |ev: &[Value]| {
        let ids = message_ids(ev);
        let start = ids.iter().rposition(|&id| id == after_edit[0]).unwrap_or(0);
        ids[start..].to_vec()
    };
    assert_eq!(tail(&got), after_edit);
    assert_eq!(tail(&want), after_edit);

    // A reconnect after the edit is served from memory with the new history.
    let mut late = subscribe(side.addr, chat, 0, token).await;
    let got = late
        .until(WAIT, |ev| message_ids(ev).last() == after_edit.last())
        .await;
    assert_eq!(message_ids(&got), after_edit);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cold_subscribers_share_one_load_and_below_floor_reads_once() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (&users[0].token, &users[0].chats[0]);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let pg = db.client().await;
    run_turns(sim.addr, &pg, chat, token, 3).await;
    let ids = db_ids(&pg, chat).await;
    let side = start_sidecar(&db, sim.addr, "[cache]\nmax_messages_per_chat = 3\n").await;
    let admin = side.admin.unwrap();
    let reads_before = metric(
        sim.addr,
        "coderd_sim_message_reads_total{caller=\"stream_snapshot\"}",
    )
    .await;

    let subs = futures_util::future::join_all(
        (0..20).map(|_| subscribe(side.addr, chat, ids[ids.len() - 2], token)),
    )
    .await;
    for mut s in subs {
        let got = s
            .until(WAIT, |ev| message_ids(ev).last() == ids.last())
            .await;
        assert_eq!(message_ids(&got), vec![ids[ids.len() - 1]]);
    }
    let reads_after = metric(
        sim.addr,
        "coderd_sim_message_reads_total{caller=\"stream_snapshot\"}",
    )
    .await;
    assert_eq!(
        reads_after - reads_before,
        1.0,
        "20 cold subscribers, one snapshot read"
    );

    // The ring keeps 3 messages; asking for everything reads Postgres exactly once.
    let mut s = subscribe(side.addr, chat, 0, token).await;
    let got = s
        .until(WAIT, |ev| message_ids(ev).last() == ids.last())
        .await;
    assert_eq!(message_ids(&got), ids);
    assert_eq!(
        metric(admin, "chatcache_db_reads_total{reason=\"below_floor\"}").await,
        1.0
    );
}

/// The array framing (April 2026) and queue changes, compared with coderd per event type.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn array_framing_and_queue_updates_match_coderd() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (&users[0].token, &users[0].chats[0]);
    let sim_args = [
        "--framing",
        "array",
        "--part-delay-ms",
        "20",
        "--turn-parts",
        "5",
    ];
    let sim = start_sim(&db, "a", &sim_args).await;
    let side = start_sidecar(&db, sim.addr, "framing = \"array\"\n").await;
    let pg = db.client().await;

    let mut direct = subscribe(sim.addr, chat, 0, token).await;
    let mut cached = subscribe(side.addr, chat, 0, token).await;
    // One message starts a turn; two more arrive while it runs and are queued, then promoted.
    for text in ["first", "queued one", "queued two"] {
        let (status, body) = post_message(side.addr, chat, token, text).await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
    }
    wait_idle(&pg, chat).await;
    let ids = db_ids(&pg, chat).await;
    // Three turns of user + assistant, the third with a tool call and its result.
    assert_eq!(ids.len(), 8, "{ids:?}");
    let done = |ev: &[Value]| message_ids(ev).last() == ids.last();
    let got = cached.until(WAIT, done).await;
    let want = direct.until(WAIT, done).await;
    let of = |ev: &[Value], kind: &str| -> Vec<Value> {
        ev.iter().filter(|e| e["type"] == kind).cloned().collect()
    };
    assert_eq!(message_ids(&got), ids);
    assert_eq!(of(&got, "message"), of(&want, "message"));
    assert_eq!(of(&got, "queue_update"), of(&want, "queue_update"));
    assert!(of(&got, "queue_update")
        .iter()
        .any(|q| q.get("queued_messages").is_some()));
    assert_eq!(
        of(&got, "message_part").len(),
        of(&want, "message_part").len()
    );
    for frame in &cached.frames {
        assert!(
            frame.starts_with('[') && frame.ends_with("]\n"),
            "array framing: {frame}"
        );
    }
}
