//! coderd's PR #23218 durable cache: what it saves (read counts in both modes) and the
//! cross-replica hole it opens (a message published by another replica is skipped).

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(10);

fn has_message(id: i64) -> impl Fn(&[serde_json::Value]) -> bool {
    move |events| message_ids(events).contains(&id)
}

#[tokio::test]
async fn read_counts_with_and_without_the_cache() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 2);
    let user = &seed.users[0];
    let (cached_chat, plain_chat) = (user.chats[0], user.chats[1]);
    let cached = SimProcess::start(&db, "cached", &["--worker", "off"]).await;
    let plain =
        SimProcess::start(&db, "plain", &["--worker", "off", "--stream-cache", "off"]).await;

    let mut on_cached = Vec::new();
    let mut on_plain = Vec::new();
    for _ in 0..3 {
        on_cached.push(StreamClient::connect(&cached.addr, &user.token, cached_chat, None).await);
        on_plain.push(StreamClient::connect(&plain.addr, &user.token, plain_chat, None).await);
    }
    for stream in on_cached.iter_mut().chain(on_plain.iter_mut()) {
        stream.next_events(WAIT).await.unwrap();
    }

    // Each replica publishes one message of the chat its subscribers watch.
    let a = post_message(&cached.addr, &user.token, cached_chat, "a").await["message"]["id"]
        .as_i64()
        .unwrap();
    let b = post_message(&plain.addr, &user.token, plain_chat, "b").await["message"]["id"]
        .as_i64()
        .unwrap();
    for stream in &mut on_cached {
        stream.events_until(WAIT, has_message(a)).await;
    }
    for stream in &mut on_plain {
        stream.events_until(WAIT, has_message(b)).await;
    }

    let reads = |caller: &str| format!("coderd_sim_message_reads_total{{caller=\"{caller}\"}}");
    assert_eq!(cached.metric(&reads("stream_snapshot")).await, 3.0);
    assert_eq!(cached.metric(&reads("stream_notify")).await, 0.0);
    assert_eq!(
        cached.metric("coderd_sim_stream_cache_hits_total").await,
        3.0
    );
    assert_eq!(plain.metric(&reads("stream_snapshot")).await, 3.0);
    assert_eq!(
        plain.metric(&reads("stream_notify")).await,
        3.0,
        "one reread per subscriber"
    );
    assert_eq!(
        plain.metric("coderd_sim_stream_cache_hits_total").await,
        0.0
    );
    assert_eq!(cached.metric("coderd_sim_stream_subscribers").await, 3.0);

    // A message published by the other replica misses the cache: one read per subscriber.
    let path = format!("/chats/{cached_chat}/interrupt");
    assert_eq!(
        api(&cached.addr, &user.token, "POST", &path, None)
            .await
            .status,
        200
    );
    let c = post_message(&plain.addr, &user.token, cached_chat, "c").await["message"]["id"]
        .as_i64()
        .unwrap();
    for stream in &mut on_cached {
        stream.events_until(WAIT, has_message(c)).await;
    }
    assert_eq!(cached.metric(&reads("stream_notify")).await, 3.0);
    assert_eq!(
        cached.metric("coderd_sim_stream_cache_hits_total").await,
        3.0
    );

    drop(on_cached);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(cached.metric("coderd_sim_stream_subscribers").await, 0.0);
}

/// Section 10 of the protocol document. Another replica ("B", played by this test through
/// SQL) commits message M1; replica A commits M2 and caches it; A's notify reaches A's
/// subscriber before B's. The cache answers "some message above the cursor" with [M2], the
/// cursor jumps past M1, and M1 is never delivered. Without the cache the same order loses
/// nothing, because the notify is answered by a read of `id > cursor`.
#[tokio::test]
async fn the_cache_skips_a_message_another_replica_published() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 1);
    let user = &seed.users[0];
    let chat = user.chats[0];
    let a = SimProcess::start(&db, "a", &["--worker", "off"]).await;
    let plain =
        SimProcess::start(&db, "plain", &["--worker", "off", "--stream-cache", "off"]).await;
    let mut on_a = StreamClient::connect(&a.addr, &user.token, chat, None).await;
    let mut on_plain = StreamClient::connect(&plain.addr, &user.token, chat, None).await;
    on_a.next_events(WAIT).await.unwrap();
    on_plain.next_events(WAIT).await.unwrap();

    // B commits M1 but its notify is still in B's batch.
    let client = db.connect().await;
    let m1 = insert_message(&client, chat, "assistant", "from replica B").await;

    // A commits M2, caches it, and notifies.
    let m2 = post_message(&a.addr, &user.token, chat, "from replica A").await["message"]["id"]
        .as_i64()
        .unwrap();
    assert_eq!(m2, m1 + 1);
    let mut seen_on_a = on_a.events_until(WAIT, has_message(m2)).await;
    let mut seen_on_plain = on_plain.events_until(WAIT, has_message(m2)).await;

    // B's notify arrives last.
    client
        .execute(
            "SELECT pg_notify($1, $2)",
            &[
                &format!("chat:stream:{chat}"),
                &format!("{{\"after_message_id\":{}}}", m1 - 1),
            ],
        )
        .await
        .unwrap();
    seen_on_a.extend(on_a.drain(Duration::from_millis(500)).await);
    seen_on_plain.extend(on_plain.drain(Duration::from_millis(300)).await);

    assert_eq!(message_ids(&seen_on_a), vec![m2], "cache on: M1 is lost");
    assert_eq!(
        message_ids(&seen_on_plain),
        vec![m1, m2],
        "cache off: nothing is lost"
    );
    assert_eq!(a.metric("coderd_sim_stream_cache_hits_total").await, 1.0);

    // M1 is durable and visible: a reconnect from 0 shows it.
    let mut again = StreamClient::connect(&a.addr, &user.token, chat, None).await;
    assert_eq!(
        message_ids(&again.next_events(WAIT).await.unwrap()),
        vec![m1, m2]
    );
}
