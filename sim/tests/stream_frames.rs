//! Stream frames byte for byte (test vectors TV1–TV5 of the protocol document, in both
//! framings), the snapshot order, the 256-event frame limit and the one-way policing.

mod common;

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

const WAIT: Duration = Duration::from_secs(10);

/// TV1's message 1001, inserted with fixed values (the sequence is moved past it).
async fn insert_tv1(db: &ScratchDb) {
    let client = db.connect().await;
    client
        .batch_execute(&format!(
            "INSERT INTO chat_messages (id, chat_id, model_config_id, created_at, role, content, \
             input_tokens, output_tokens, total_tokens) VALUES (1001, '{CHAT}', '{MODEL_CONFIG}', \
             '2026-03-18T10:00:02.123456Z', 'assistant', '[{{\"type\":\"text\",\"text\":\"Hello!\"}}]', \
             812, 5, 817); SELECT setval('chat_messages_id_seq', 5000)"
        ))
        .await
        .unwrap();
}

fn status_event(status: &str) -> String {
    format!(r#"{{"type":"status","chat_id":"{CHAT}","status":{{"status":"{status}"}}}}"#)
}

const TV1_MESSAGE: &str = concat!(
    r#"{"type":"message","chat_id":"11111111-1111-4111-8111-111111111111","#,
    r#""message":{"id":1001,"chat_id":"11111111-1111-4111-8111-111111111111","#,
    r#""model_config_id":"22222222-2222-4222-8222-222222222222","#,
    r#""created_at":"2026-03-18T10:00:02.123456Z","role":"assistant","#,
    r#""content":[{"type":"text","text":"Hello!","url":"","media_type":"","file_id":null,"#,
    r#""file_name":"","start_line":0,"end_line":0,"content":""}],"#,
    r#""usage":{"input_tokens":812,"output_tokens":5,"total_tokens":817}}}"#
);

const TV2_MESSAGE: &str = concat!(
    r#"{"type":"message","chat_id":"11111111-1111-4111-8111-111111111111","#,
    r#""message":{"id":1001,"chat_id":"11111111-1111-4111-8111-111111111111","#,
    r#""model_config_id":"22222222-2222-4222-8222-222222222222","#,
    r#""created_at":"2026-03-18T10:00:02.123456Z","role":"assistant","#,
    r#""content":[{"type":"text","text":"Hello!","mcp_server_config_id":null,"url":"","#,
    r#""media_type":"","file_id":null,"file_name":"","start_line":0,"end_line":0,"content":"","#,
    r#""context_file_path":"","context_file_agent_id":null}],"#,
    r#""usage":{"input_tokens":812,"output_tokens":5,"total_tokens":817}}}"#
);

const TV5: &str = r#"{"type":"queue_update","chat_id":"11111111-1111-4111-8111-111111111111"}"#;

fn tv3_part(text: &str) -> String {
    format!(
        r#"{{"type":"message_part","chat_id":"{CHAT}","message_part":{{"role":"assistant","part":{{"type":"text","text":"{text}","url":"","media_type":"","file_id":null,"file_name":"","start_line":0,"end_line":0,"content":""}}}}}}"#
    )
}

/// Reads frames until one contains `needle`, returning all of them.
async fn frames_until(stream: &mut StreamClient, needle: &str) -> Vec<String> {
    let mut frames = Vec::new();
    while !frames.iter().any(|f: &String| f.contains(needle)) {
        match stream.next_frame(WAIT).await {
            Some(frame) => frames.push(frame),
            None => panic!("no frame with {needle}; got {frames:#?}"),
        }
    }
    frames
}

#[tokio::test]
async fn envelope_frames_match_test_vectors() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 0);
    let user = &seed.users[0];
    db.insert_chat(CHAT, user.id).await;
    insert_tv1(&db).await;
    let chat: Uuid = CHAT.parse().unwrap();
    let sim = SimProcess::start(&db, "a", &["--turn-parts", "2", "--part-delay-ms", "30"]).await;

    // Snapshot: status first, then the message; one frame, one trailing newline.
    let mut stream = StreamClient::connect(&sim.addr, &user.token, chat, None).await;
    let snapshot = stream.next_frame(WAIT).await.unwrap();
    let want = format!(
        r#"{{"type":"data","data":[{},{TV1_MESSAGE}]}}"#,
        status_event("waiting")
    );
    assert_eq!(snapshot, format!("{want}\n"));

    // A queue change with an empty queue: TV5, alone in its frame.
    let path = format!("/chats/{chat}/queue/42");
    assert_eq!(
        api(&sim.addr, &user.token, "DELETE", &path, None)
            .await
            .status,
        204
    );
    let frame = stream.next_frame(WAIT).await.unwrap();
    assert_eq!(frame, format!("{{\"type\":\"data\",\"data\":[{TV5}]}}\n"));

    // A worker turn: TV4 (running) and TV3-shaped deltas, every frame an envelope.
    post_message(&sim.addr, &user.token, chat, "hello").await;
    let frames = frames_until(&mut stream, &status_event("waiting")).await;
    for frame in &frames {
        assert!(frame.starts_with(r#"{"type":"data","data":[{"#), "{frame}");
        assert!(frame.ends_with("}]}\n"), "{frame}");
    }
    let all = frames.concat();
    assert!(all.contains(&status_event("running")), "{all}");
    assert!(all.contains(&tv3_part("part 1 of turn 1 ")), "{all}");
    assert!(all.contains(&tv3_part("part 2 of turn 1 ")), "{all}");
}

#[tokio::test]
async fn array_frames_match_test_vectors() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 0);
    let user = &seed.users[0];
    db.insert_chat(CHAT, user.id).await;
    insert_tv1(&db).await;
    let chat: Uuid = CHAT.parse().unwrap();
    let sim = SimProcess::start(&db, "a", &["--framing", "array", "--worker", "off"]).await;

    let mut stream = StreamClient::connect(&sim.addr, &user.token, chat, Some(1000)).await;
    let snapshot = stream.next_frame(WAIT).await.unwrap();
    assert_eq!(
        snapshot,
        format!("[{},{TV2_MESSAGE}]\n", status_event("waiting"))
    );

    let path = format!("/chats/{chat}/queue/42");
    assert_eq!(
        api(&sim.addr, &user.token, "DELETE", &path, None)
            .await
            .status,
        204
    );
    assert_eq!(stream.next_frame(WAIT).await.unwrap(), format!("[{TV5}]\n"));

    // after_id is exclusive: from 1001 on, the snapshot is the status alone.
    let mut later = StreamClient::connect(&sim.addr, &user.token, chat, Some(1001)).await;
    assert_eq!(
        later.next_frame(WAIT).await.unwrap(),
        format!("[{}]\n", status_event("waiting"))
    );
}

#[tokio::test]
async fn snapshot_order_while_a_turn_runs() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 1);
    let user = &seed.users[0];
    let chat = user.chats[0];
    let sim = SimProcess::start(&db, "a", &["--turn-parts", "6", "--part-delay-ms", "200"]).await;

    // Start a turn, queue a second message, and wait for two buffered parts.
    let mut watcher = StreamClient::connect(&sim.addr, &user.token, chat, None).await;
    let first = post_message(&sim.addr, &user.token, chat, "first").await;
    let first_id = first["message"]["id"].as_i64().unwrap();
    watcher
        .events_until(WAIT, |events| of_type(events, "message_part").len() >= 2)
        .await;
    let queued = post_message(&sim.addr, &user.token, chat, "second").await;
    assert_eq!(queued["queued"], true);

    let mut late = StreamClient::connect(&sim.addr, &user.token, chat, None).await;
    let snapshot = late.next_events(WAIT).await.unwrap();
    let kinds: Vec<&str> = snapshot
        .iter()
        .map(|e| e["type"].as_str().unwrap())
        .collect();
    assert_eq!(kinds[0], "status");
    assert_eq!(snapshot[0]["status"]["status"], "running");
    let parts = kinds
        .iter()
        .take_while(|k| **k != "message")
        .skip(1)
        .count();
    assert!(parts >= 2, "{kinds:?}");
    assert!(
        kinds[1..=parts].iter().all(|k| *k == "message_part"),
        "{kinds:?}"
    );
    assert_eq!(message_ids(&snapshot), vec![first_id]);
    assert_eq!(kinds.last(), Some(&"queue_update"));
    assert_eq!(
        snapshot.last().unwrap()["queued_messages"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(kinds.len(), 1 + parts + 1 + 1, "{kinds:?}");
}

#[tokio::test]
async fn snapshots_are_split_into_frames_of_256_events() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 1);
    let user = &seed.users[0];
    let chat = user.chats[0];
    let client = db.connect().await;
    client
        .execute(
            "INSERT INTO chat_messages (chat_id, role, content) SELECT $1, 'user', \
             '[{\"type\":\"text\",\"text\":\"x\"}]' FROM generate_series(1, 300)",
            &[&chat],
        )
        .await
        .unwrap();
    let sim = SimProcess::start(&db, "a", &["--worker", "off"]).await;

    let mut stream = StreamClient::connect(&sim.addr, &user.token, chat, None).await;
    let first = stream.next_events(WAIT).await.unwrap();
    let second = stream.next_events(WAIT).await.unwrap();
    assert_eq!((first.len(), second.len()), (256, 45));
    assert_eq!(first[0]["type"], "status");
    let ids = [message_ids(&first), message_ids(&second)].concat();
    assert_eq!(ids.len(), 300);
    assert!(ids.windows(2).all(|w| w[0] < w[1]));
}

#[tokio::test]
async fn client_messages_close_the_stream() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 1);
    let user = &seed.users[0];
    let chat = user.chats[0];
    for (framing, code, reason) in [
        (
            "envelope",
            1002u16,
            "Clients cannot send messages for one-way WebSockets",
        ),
        ("array", 1008, "unexpected data message"),
    ] {
        let sim = SimProcess::start(&db, framing, &["--framing", framing, "--worker", "off"]).await;
        let mut stream = StreamClient::connect(&sim.addr, &user.token, chat, None).await;
        stream.next_frame(WAIT).await.unwrap();
        stream.ws.send(Message::text("hello")).await.unwrap();
        let close = loop {
            match tokio::time::timeout(WAIT, stream.ws.next()).await.unwrap() {
                Some(Ok(Message::Close(frame))) => break frame.unwrap(),
                Some(Ok(_)) => continue,
                other => panic!("expected a close frame, got {other:?}"),
            }
        };
        assert_eq!(
            (u16::from(close.code), close.reason.as_str()),
            (code, reason)
        );
    }
}
