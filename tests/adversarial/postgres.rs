//! Postgres feeding the cache what it does not expect: hostile NOTIFY payloads, malformed and
//! unsupported rows, and rows whose rendering must match coderd's byte for byte.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::support::*;

/// NOTIFY payloads that are not JSON, have unknown fields, or announce ids that do not exist:
/// the sidecar stays alive and every subscriber keeps exactly Postgres's history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_notifies_never_break_the_history() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let mut side = start_sidecar(&db, sim.addr, "[cache]\nhole_grace_ms = 50\n").await;
    let admin = side.admin.unwrap();
    let pg = db.client().await;
    turn(side.addr, &pg, chat, token, "before").await;
    let mut live = subscribe(side.addr, chat, 0, token).await;
    let mut seen = live.events_for(Duration::from_millis(200)).await;
    let head = *db_ids(&pg, chat).await.last().unwrap();

    let payloads = vec![
        "not json".to_string(),
        String::new(),
        "{".into(),
        "null".into(),
        "[]".into(),
        "[1000, true]".into(),
        "42".into(),
        "\"after_message_id\"".into(),
        r#"{"after_message_id":"12"}"#.into(),
        r#"{"after_message_id":1.5}"#.into(),
        r#"{"after_message_id":null,"full_refresh":null}"#.into(),
        r#"{"after_message_id":-7}"#.into(),
        r#"{"after_message_id":0}"#.into(),
        r#"{"after_message_id":9223372036854775807}"#.into(),
        r#"{"after_message_id":9223372036854775808}"#.into(),
        format!(r#"{{"after_message_id":{}}}"#, head + 1_000_000),
        format!(r#"{{"after_message_id":{}}}"#, head - 1),
        format!(r#"{{"after_message_id":{head},"future_field":{{"x":[1,2]}}}}"#),
        r#"{"full_refresh":"yes"}"#.into(),
        r#"{"full_refresh":false,"status":"running","worker_id":"x"}"#.into(),
        r#"{"full_refresh":true}"#.into(),
        r#"{"full_refresh":true,"after_message_id":1}"#.into(),
        r#"{"queue_update":true,"retry":{"attempt":"x"},"error":7}"#.into(),
        format!(
            "{{\"after_message_id\":{head},\"after_message_id\":{}}}",
            head + 5
        ),
        "{\"x\":\"\u{0}\"}".replace('\u{0}', "\\u0000"),
        "\u{FEFF}{}".into(),
        format!("{{\"deep\":{}1{}}}", "[".repeat(200), "]".repeat(200)),
        "x".repeat(7000),
    ];
    for p in &payloads {
        notify(&pg, chat, p).await;
    }
    // Announcements for ids that exist in no chat, and for another chat's id.
    notify(
        &pg,
        "11111111-1111-4111-8111-111111111111",
        r#"{"full_refresh":true}"#,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_alive(&mut side, "after hostile notifies").await;
    assert!(metric(admin, "chatcache_bad_notifies_total").await >= 5.0);

    // A real turn afterwards reaches the live subscriber, and the history is exact.
    turn(side.addr, &pg, chat, token, "after").await;
    let ids = db_ids(&pg, chat).await;
    seen.extend(until_last(&mut live, &ids).await);
    // Clients keep messages by id; replays after the refresh notifies repeat some.
    let mut got = message_ids(&seen);
    got.sort_unstable();
    got.dedup();
    assert_eq!(got, ids, "the live subscriber holds the history");
    history_exact(side.addr, &pg, chat, token).await;
    assert_alive(&mut side, "after the turn").await;
}

/// Rows written with content chatcache must parse itself (version 1, but malformed in every
/// way json.Unmarshal tolerates or refuses) render exactly as coderd renders them, both on a
/// catch-up read below the ring and on a hole repair for a live subscriber.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_rows_render_like_coderd() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--worker", "off"]).await;
    // A one-message ring: every catch-up from 0 is rendered by chatcache from rows.
    let mut side = start_sidecar(
        &db,
        sim.addr,
        "[cache]\nmax_messages_per_chat = 1\nhole_grace_ms = 50\n",
    )
    .await;
    let admin = side.admin.unwrap();
    let pg = db.client().await;

    let contents: Vec<Option<&str>> = vec![
        None,
        Some("null"),
        Some("[]"),
        Some("{}"),
        Some("\"just a string\""),
        Some("42"),
        Some("[null]"),
        Some("[1, 2]"),
        Some(r#"[{"type": 5}]"#),
        Some(r#"[{"type": "text", "text": null}]"#),
        Some(r#"[{"type": "text", "text": "a", "start_line": 1.5}]"#),
        Some(r#"[{"type": "text", "text": "a", "start_line": 1e30}]"#),
        Some(r#"[{"type": "text", "text": "a", "start_line": -3}]"#),
        Some(r#"[{"type": "file", "file_id": "not-a-uuid"}]"#),
        Some(r#"[{"type": "file", "file_id": "33333333-3333-4333-8333-33333333333Z"}]"#),
        Some(r#"[{"type": "file", "file_id": "33333333333343338333333333333333"}]"#),
        Some(r#"[{"type": "file", "data": "AAEC", "file_id": null}]"#),
        Some(r#"[{"type": "file", "data": 7}]"#),
        Some(r#"[{"type": "text", "text": "<b>&amp;\u2028\u2029\n\t\u0001\u001f"}]"#),
        Some(r#"[{"type": "text", "text": "\ud83d\ude00 \u00e9"}]"#),
        Some(r#"[{"type": "tool-call", "args": "not an object", "is_error": "yes"}]"#),
        Some(r#"[{"type": "tool-result", "result": {"nested": [[[[[{"a": null}]]]]]}}]"#),
        Some(r#"[{"type": "tool-result", "result": 12345678901234567890123}]"#),
        Some(r#"[{"type": "text", "text": "x", "provider_metadata": {"k": 1}, "unknown": 1}]"#),
        Some(r#"[{"type": "text", "text": "dup", "text": "licate"}]"#),
        Some(r#"[{"type": "reasoning", "text": "t", "signature": ""}, {"type": "text"}]"#),
    ];
    for (i, content) in contents.iter().enumerate() {
        let role = ["user", "assistant", "tool", "system"][i % 4];
        insert_row(&pg, chat, role, *content, 1).await;
    }

    // Catch-up below the ring: chatcache renders the rows; coderd renders them too.
    let mut direct = subscribe(sim.addr, chat, 0, token).await;
    let mut cached = subscribe(side.addr, chat, 0, token).await;
    let want = direct.events_for(Duration::from_millis(500)).await;
    let got = cached.events_for(Duration::from_millis(500)).await;
    assert_eq!(message_ids(&got), db_ids(&pg, chat).await);
    assert_eq!(
        cached.frames, direct.frames,
        "catch-up frames byte for byte"
    );
    assert_eq!(got, want);
    assert!(metric(admin, "chatcache_db_reads_total{reason=\"below_floor\"}").await >= 1.0);

    // A full refresh: chatcache re-reads and renders every row for its live subscribers,
    // coderd re-reads and renders them for its own. A second sidecar with a ring that holds
    // the whole chat, so the replay is all rows.
    let whole = start_sidecar(&db, sim.addr, "").await;
    let head = *db_ids(&pg, chat).await.last().unwrap();
    let mut direct = subscribe(sim.addr, chat, head, token).await;
    let mut cached = subscribe(whole.addr, chat, head, token).await;
    direct.events_for(Duration::from_millis(200)).await;
    cached.events_for(Duration::from_millis(200)).await;
    notify(&pg, chat, r#"{"full_refresh":true}"#).await;
    let ids = db_ids(&pg, chat).await;
    let want = until_last(&mut direct, &ids).await;
    let got = until_last(&mut cached, &ids).await;
    let msgs = |ev: &[Value]| -> Vec<Value> {
        ev.iter()
            .filter(|e| e["type"] == "message")
            .cloned()
            .collect()
    };
    assert_eq!(message_ids(&got), ids);
    assert_eq!(msgs(&got), msgs(&want), "replayed messages equal coderd's");
    assert_eq!(
        metric(
            whole.admin.unwrap(),
            "chatcache_db_reads_total{reason=\"refresh\"}"
        )
        .await,
        1.0
    );
    assert_alive(&mut side, "after malformed rows").await;
}

/// A row chatcache does not render (content_version 0) that coderd's stream skipped (the
/// cross-replica hole: its notify arrives after a later message) is read by a hole repair,
/// which fails with `Unsupported`. The chat must not stall behind the pending id: the
/// subscriber gets the later messages, or is closed so that it reconnects and is served
/// (by coderd if need be). Before 7af0148 the repair was retried every 500 ms forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_row_in_a_hole_does_not_stall_the_chat() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(
        &db,
        "a",
        &[
            "--stream-cache",
            "on",
            "--part-delay-ms",
            "1",
            "--turn-parts",
            "2",
        ],
    )
    .await;
    let mut side = start_sidecar(&db, sim.addr, "[cache]\nhole_grace_ms = 50\n").await;
    let admin = side.admin.unwrap();
    let pg = db.client().await;
    turn(side.addr, &pg, chat, token, "before").await;
    let mut live = subscribe(side.addr, chat, 0, token).await;
    let mut seen = live.events_for(Duration::from_millis(200)).await;

    // Replica B commits a legacy row; replica A publishes a later turn; B's notify comes last.
    let legacy = insert_row(&pg, chat, "user", Some("\"a legacy row\""), 0).await;
    turn(side.addr, &pg, chat, token, "overtakes").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    notify(
        &pg,
        chat,
        &format!("{{\"after_message_id\":{}}}", legacy - 1),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    turn(side.addr, &pg, chat, token, "after").await;
    let ids = db_ids(&pg, chat).await;
    let last = *ids.last().unwrap();
    seen.extend(live.until(WAIT, |ev| message_ids(ev).contains(&last)).await);
    // A hole repair, or (with order_proof) the proof read that covers the legacy row first.
    let repairs = metric(admin, "chatcache_hole_repairs_total").await
        + metric(admin, "chatcache_db_reads_total{reason=\"proof\"}").await;
    assert!(
        repairs >= 1.0,
        "the scenario must make chatcache read the legacy row"
    );
    if !message_ids(&seen).contains(&last) {
        // Acceptable only if the stream was closed so that the client reconnects.
        let ended = tokio::time::timeout(Duration::from_millis(100), live.ws.next()).await;
        assert!(
            matches!(ended, Ok(None | Some(Ok(Message::Close(_))) | Some(Err(_)))),
            "the subscriber neither got message {last} nor was closed ({repairs} repair reads, \
             got {:?})",
            message_ids(&seen)
        );
        history_exact(side.addr, &pg, chat, token).await;
    }
    assert_alive(&mut side, "after the legacy row").await;
}

// ---------------------------------------------------------------------------------------------
// Regression tests of defects this suite found (tests/RELIABILITY.md, "Defects found"); each
// failed before its fix.
// ---------------------------------------------------------------------------------------------

/// Go's `json.Unmarshal` matches object keys to struct fields case-insensitively, so coderd
/// renders `{"TYPE":"text","Text":"case"}` as a text part; chatcache's renderer looks keys up
/// exactly and renders an empty part when it reads such a row itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn content_keys_match_case_insensitively_like_go() {
    row_renders_like_coderd(r#"[{"TYPE": "text", "Text": "case"}]"#).await;
}

/// Go (since 1.22) escapes U+0008 and U+000C in JSON strings as `\b` and `\f`, as coderd-sim
/// and serde_json do; `wire::go_escape` rewrites them to `\u0008` / `\u000c`, so a message
/// chatcache renders from a row differs byte for byte from the same message sent by coderd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn control_characters_escape_like_go() {
    row_renders_like_coderd(r#"[{"type": "text", "text": "bell\b feed\f"}]"#).await;
}

/// A user row with `content` and a plain one after it, read from 0 through a sidecar whose
/// one-message ring makes it render `content` itself: its frames equal coderd's byte for byte.
async fn row_renders_like_coderd(content: &str) {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--worker", "off"]).await;
    let side = start_sidecar(&db, sim.addr, "[cache]\nmax_messages_per_chat = 1\n").await;
    let pg = db.client().await;
    insert_row(&pg, chat, "user", Some(content), 1).await;
    let plain = r#"[{"type": "text", "text": "plain"}]"#;
    insert_row(&pg, chat, "user", Some(plain), 1).await;
    let mut direct = subscribe(sim.addr, chat, 0, token).await;
    let mut cached = subscribe(side.addr, chat, 0, token).await;
    direct.events_for(Duration::from_millis(400)).await;
    cached.events_for(Duration::from_millis(400)).await;
    assert_eq!(cached.frames, direct.frames);
}
