//! What goes over `chat:stream:{id}` (captured by a test LISTEN), the worker's turn shape, and
//! an edit's full refresh on a live stream.

mod common;

use std::time::Duration;

use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(10);

fn payloads(notifies: Vec<(String, String)>) -> Vec<String> {
    notifies.into_iter().map(|(_, payload)| payload).collect()
}

#[tokio::test]
async fn a_turn_and_an_edit_publish_coderds_payloads() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 1);
    let user = &seed.users[0];
    let chat = user.chats[0];
    let channel = format!("chat:stream:{chat}");
    let mut tap = NotifyTap::listen(&db, std::slice::from_ref(&channel)).await;
    let sim = SimProcess::start(&db, "w", &["--turn-parts", "2", "--part-delay-ms", "10"]).await;
    let running = format!(r#"{{"status":"running","worker_id":"{}"}}"#, worker_id("w"));

    // A message on an idle chat, then the worker's turn.
    let sent = post_message(&sim.addr, &user.token, chat, "hello").await;
    let user_id = sent["message"]["id"].as_i64().unwrap();
    let got = payloads(tap.take(5, WAIT).await);
    assert_eq!(
        got,
        vec![
            format!(r#"{{"after_message_id":{}}}"#, user_id - 1),
            r#"{"status":"pending"}"#.to_string(),
            running.clone(),
            format!(r#"{{"after_message_id":{user_id}}}"#),
            r#"{"status":"waiting"}"#.to_string(),
        ]
    );

    // Subscribe at the head, then edit the first message: full refresh, empty queue, pending.
    let mut stream = StreamClient::connect(&sim.addr, &user.token, chat, Some(user_id + 1)).await;
    stream.next_events(WAIT).await.unwrap();
    let edit = r#"{"content":[{"type":"text","text":"hello again"}]}"#;
    let path = format!("/chats/{chat}/messages/{user_id}");
    let edited = api(&sim.addr, &user.token, "PATCH", &path, Some(edit)).await;
    assert_eq!(edited.status, 200, "{}", edited.body);
    let edited_id = edited.json()["id"].as_i64().unwrap();
    assert_eq!(edited_id, user_id + 2, "the replacement is a fresh row");
    let got = payloads(tap.take(6, WAIT).await);
    assert_eq!(
        got,
        vec![
            r#"{"full_refresh":true}"#.to_string(),
            r#"{"queue_update":true}"#.to_string(),
            r#"{"status":"pending"}"#.to_string(),
            running,
            format!(r#"{{"after_message_id":{edited_id}}}"#),
            r#"{"status":"waiting"}"#.to_string(),
        ]
    );

    // The stream resends the visible history from id 0: only the replacement, then the
    // answer to it; the soft-deleted rows never come back.
    let events = stream
        .events_until(WAIT, |events| {
            events
                .iter()
                .any(|e| e["type"] == "status" && e["status"]["status"] == "waiting")
        })
        .await;
    assert_eq!(message_ids(&events), vec![edited_id, edited_id + 1]);
    let queue_updates = of_type(&events, "queue_update");
    assert_eq!(queue_updates.len(), 1);
    assert!(
        queue_updates[0].get("queued_messages").is_none(),
        "the edit emptied the queue"
    );

    let page = api(
        &sim.addr,
        &user.token,
        "GET",
        &format!("/chats/{chat}/messages"),
        None,
    )
    .await;
    let ids: Vec<i64> = page.json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_i64().unwrap())
        .collect();
    assert_eq!(ids, vec![edited_id + 1, edited_id]);
}

#[tokio::test]
async fn every_third_turn_calls_a_tool_in_one_transaction() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 1);
    let user = &seed.users[0];
    let chat = user.chats[0];
    let sim = SimProcess::start(&db, "w", &["--turn-parts", "1", "--part-delay-ms", "1"]).await;
    let mut stream = StreamClient::connect(&sim.addr, &user.token, chat, None).await;
    stream.next_events(WAIT).await.unwrap();

    for turn in 1..=3 {
        post_message(&sim.addr, &user.token, chat, &format!("turn {turn}")).await;
        stream
            .events_until(WAIT, |events| {
                events
                    .iter()
                    .any(|e| e["type"] == "status" && e["status"]["status"] == "waiting")
            })
            .await;
    }

    let page = api(
        &sim.addr,
        &user.token,
        "GET",
        &format!("/chats/{chat}/messages"),
        None,
    )
    .await;
    let messages: Vec<Value> = page.json()["messages"].as_array().unwrap().clone();
    let roles: Vec<&str> = messages
        .iter()
        .rev()
        .map(|m| m["role"].as_str().unwrap())
        .collect();
    assert_eq!(
        roles,
        [
            "user",
            "assistant",
            "user",
            "assistant",
            "user",
            "assistant",
            "tool",
            "assistant"
        ]
    );
    // The three rows of the third turn share one transaction, hence one created_at.
    let turn3: Vec<&Value> = messages.iter().take(3).collect();
    assert!(turn3
        .iter()
        .all(|m| m["created_at"] == turn3[0]["created_at"]));
    let call = serde_json::to_string(&messages[2]["content"][0]).unwrap();
    assert_eq!(
        call,
        r#"{"type":"tool-call","text":"","tool_call_id":"call_3","tool_name":"echo","args":{"text":"turn 3"},"url":"","media_type":"","file_id":null,"file_name":"","start_line":0,"end_line":0,"content":""}"#
    );
    let result = &messages[1]["content"][0];
    assert_eq!(result["type"], "tool-result");
    assert_eq!(result["result"], serde_json::json!({"output": "turn 3"}));
    let answer = &messages[0];
    assert_eq!(answer["content"][0]["text"], "part 1 of turn 3 ");
    assert_eq!(
        answer["usage"],
        serde_json::json!({"input_tokens": 130, "output_tokens": 1, "total_tokens": 131})
    );
    assert!(answer.get("created_by").is_none());
}

fn settled(events: &[Value]) -> bool {
    events
        .iter()
        .any(|e| e["type"] == "status" && e["status"]["status"] == "waiting")
}

async fn history(sim: &SimProcess, token: &str, chat: uuid::Uuid) -> Vec<(String, String)> {
    let page = api(
        &sim.addr,
        token,
        "GET",
        &format!("/chats/{chat}/messages"),
        None,
    )
    .await;
    let mut messages: Vec<(String, String)> = page.json()["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let text = m["content"][0]["text"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            (m["role"].as_str().unwrap().to_string(), text)
        })
        .collect();
    messages.reverse();
    messages
}

#[tokio::test]
async fn an_edit_during_a_turn_drops_that_turn() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 1);
    let user = &seed.users[0];
    let chat = user.chats[0];
    let sim = SimProcess::start(&db, "w", &["--turn-parts", "4", "--part-delay-ms", "100"]).await;
    let mut stream = StreamClient::connect(&sim.addr, &user.token, chat, None).await;
    stream.next_events(WAIT).await.unwrap();

    let sent = post_message(&sim.addr, &user.token, chat, "first").await;
    let id = sent["message"]["id"].as_i64().unwrap();
    stream
        .events_until(WAIT, |events| !of_type(events, "message_part").is_empty())
        .await;
    let edit = r#"{"content":[{"type":"text","text":"second"}]}"#;
    let path = format!("/chats/{chat}/messages/{id}");
    assert_eq!(
        api(&sim.addr, &user.token, "PATCH", &path, Some(edit))
            .await
            .status,
        200
    );
    stream.events_until(WAIT, settled).await;
    tokio::time::sleep(Duration::from_millis(600)).await;

    // The first turn was claimed away mid-stream and stored nothing; the second answered.
    let want = vec![
        ("user".to_string(), "second".to_string()),
        (
            "assistant".to_string(),
            "part 1 of turn 1 part 2 of turn 1 part 3 of turn 1 part 4 of turn 1 ".to_string(),
        ),
    ];
    assert_eq!(history(&sim, &user.token, chat).await, want);
}

#[tokio::test]
async fn an_interrupted_turn_stores_nothing_and_the_queue_moves_on() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 1);
    let user = &seed.users[0];
    let chat = user.chats[0];
    let sim = SimProcess::start(&db, "w", &["--turn-parts", "3", "--part-delay-ms", "150"]).await;
    let mut stream = StreamClient::connect(&sim.addr, &user.token, chat, None).await;
    stream.next_events(WAIT).await.unwrap();

    post_message(&sim.addr, &user.token, chat, "first").await;
    let queued = post_message(&sim.addr, &user.token, chat, "second").await;
    assert_eq!(queued["queued"], true);
    stream
        .events_until(WAIT, |events| !of_type(events, "message_part").is_empty())
        .await;
    let interrupted = api(
        &sim.addr,
        &user.token,
        "POST",
        &format!("/chats/{chat}/interrupt"),
        None,
    )
    .await;
    assert_eq!(interrupted.json()["status"], "waiting");

    // The abandoned turn releases the chat by promoting the queued message, which is answered.
    let statuses = |events: &[Value]| -> Vec<String> {
        of_type(events, "status")
            .iter()
            .map(|e| e["status"]["status"].as_str().unwrap().to_string())
            .collect()
    };
    let events = stream
        .events_until(WAIT, |events| statuses(events).len() >= 4)
        .await;
    assert_eq!(
        statuses(&events),
        ["waiting", "pending", "running", "waiting"]
    );
    assert!(!of_type(&events, "queue_update").is_empty());
    let want = vec![
        ("user".to_string(), "first".to_string()),
        ("user".to_string(), "second".to_string()),
        (
            "assistant".to_string(),
            "part 1 of turn 2 part 2 of turn 2 part 3 of turn 2 ".to_string(),
        ),
    ];
    assert_eq!(history(&sim, &user.token, chat).await, want);
}
