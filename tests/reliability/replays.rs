//! History replays: an edit over the ring limit and a LISTEN reconnect must replay exactly
//! what coderd replays, no less and no more.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;
use crate::support::*;

// ---------------------------------------------------------------------------------------------
// Regression tests of defects this suite found (tests/RELIABILITY.md, "Defects found"); each
// failed before its fix.
// ---------------------------------------------------------------------------------------------

/// After an edit coderd resends the chat's whole visible history. When the chat has more
/// messages than `cache.max_messages_per_chat`, the refresh read is trimmed to the ring and
/// only the ring (the newest messages) is replayed, so clients that restart their view on a
/// replay, as coderd's clients do, lose the older messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_replays_the_whole_history_of_a_chat_over_the_ring_limit() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, "[cache]\nmax_messages_per_chat = 4\n").await;
    let pg = db.client().await;
    for t in 0..4 {
        post_message(sim.addr, chat, token, &format!("t{t}")).await;
        wait_idle(&pg, chat).await;
    }
    let before = db_ids(&pg, chat).await;
    let mut direct = subscribe(sim.addr, chat, *before.last().unwrap(), token).await;
    let mut cached = subscribe(side.addr, chat, *before.last().unwrap(), token).await;
    direct.events_for(Duration::from_millis(300)).await;
    cached.events_for(Duration::from_millis(300)).await;

    // Edit the newest user message: history is rewritten and replayed.
    let edited = before[before.len() - 2];
    let (status, _) = edit_message(side.addr, chat, token, edited, "edited").await;
    assert_eq!(status, 200);
    wait_idle(&pg, chat).await;
    let after = db_ids(&pg, chat).await;
    let want = until_last(&mut direct, &after).await;
    let got = until_last(&mut cached, &after).await;
    // The replay starts at the first visible message.
    let replay = |ev: &[Value]| {
        let ids = message_ids(ev);
        let start = ids.iter().rposition(|&id| id == after[0]);
        start.map(|s| ids[s..].to_vec())
    };
    assert_eq!(
        replay(&want),
        Some(after.clone()),
        "coderd replays everything"
    );
    assert_eq!(replay(&got), Some(after), "chatcache replays everything");
}

/// A LISTEN reconnect reloads every chat. When the reload finds a message the ring does not
/// hold yet (committed by another replica, its notify still to come), `finish_refresh` takes
/// the longer history for a rewritten one and replays the whole chat to every subscriber,
/// which then receives every message it already holds a second time (chatload counts these as
/// duplicates; in a load run with LISTEN kills they are thousands). Nothing was edited: the
/// subscriber must get only the new message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_reconnect_sends_no_message_twice() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let admin = side.admin.unwrap();
    let pg = db.client().await;
    post_message(side.addr, chat, token, "before").await;
    wait_idle(&pg, chat).await;
    let mut s = subscribe(side.addr, chat, 0, token).await;
    let mut seen = s.events_for(Duration::from_millis(300)).await;

    // Another replica commits a message; its notify has not arrived when LISTEN drops.
    let chat_uuid: uuid::Uuid = chat.parse().unwrap();
    pg.execute(
        "INSERT INTO chat_messages (chat_id, role, content) VALUES ($1, 'user', \
         '[{\"type\":\"text\",\"text\":\"from replica b\"}]'::jsonb)",
        &[&chat_uuid],
    )
    .await
    .unwrap();
    assert_eq!(kill_listen(&pg).await, 1);
    until_metric(admin, "chatcache_listen_reconnects_total", 1.0, WAIT).await;
    let ids = db_ids(&pg, chat).await;
    seen.extend(until_last(&mut s, &ids).await);
    seen.extend(s.events_for(Duration::from_millis(300)).await);
    assert_eq!(
        message_ids(&seen),
        ids,
        "each message exactly once, in order"
    );
}

/// An edit whose `full_refresh` notify arrives after a LISTEN reconnect: the reconnect's reload
/// already finds the rewritten history and replays it; the refresh that follows must not replay
/// it a second time (coderd replays an edit once; a client that has settled on the replayed
/// history receives every message again). Found by the LISTEN-kill load run (84 duplicates in
/// one of eight runs).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_seen_by_a_reload_is_not_replayed_again_by_its_refresh() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let admin = side.admin.unwrap();
    let pg = db.client().await;
    for t in 0..2 {
        post_message(side.addr, chat, token, &format!("t{t}")).await;
        wait_idle(&pg, chat).await;
    }
    let before = db_ids(&pg, chat).await;
    let mut s = subscribe(side.addr, chat, 0, token).await;
    let mut seen = until_last(&mut s, &before).await;

    // The edit is committed (the newest user message and its reply deleted, a replacement
    // added) but its notify is still on the way when LISTEN drops.
    let chat_uuid: uuid::Uuid = chat.parse().unwrap();
    let edited = before[before.len() - 2];
    pg.execute(
        "UPDATE chat_messages SET deleted = true WHERE chat_id = $1 AND id >= $2",
        &[&chat_uuid, &edited],
    )
    .await
    .unwrap();
    pg.execute(
        "INSERT INTO chat_messages (chat_id, role, content) VALUES ($1, 'user', \
         '[{\"type\":\"text\",\"text\":\"edited\"}]'::jsonb)",
        &[&chat_uuid],
    )
    .await
    .unwrap();
    assert_eq!(kill_listen(&pg).await, 1);
    let after = db_ids(&pg, chat).await;
    seen.extend(until_last(&mut s, &after).await);

    // Now the edit's own notify arrives.
    let deadline = Instant::now() + WAIT;
    until_metric(admin, "chatcache_listen_reconnects_total", 1.0, WAIT).await;
    notify(&pg, chat, r#"{"full_refresh":true}"#).await;
    let left = deadline.saturating_duration_since(Instant::now());
    until_metric(admin, "chatcache_full_refreshes_total", 1.0, left).await;
    seen.extend(s.events_for(Duration::from_millis(500)).await);

    // The snapshot, then one replay of the edited history (the replacement may come alone
    // first, as from coderd when a notify races the refresh): nothing more.
    let ids = message_ids(&seen);
    assert!(ids.starts_with(&before), "{ids:?}");
    assert!(ids.ends_with(&after), "{ids:?}");
    let starts = ids.iter().filter(|&&id| id == after[0]).count();
    assert_eq!(starts, 2, "the snapshot and one replay per edit: {ids:?}");
}
