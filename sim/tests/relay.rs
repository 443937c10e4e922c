//! The cross-replica part relay: a subscriber on a replica that does not run the chat still
//! sees the worker's `message_part` deltas, relayed with the client's credentials.

mod common;

use std::time::Duration;

use common::*;

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn a_subscriber_on_another_replica_sees_the_workers_parts() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 1);
    let user = &seed.users[0];
    let chat = user.chats[0];
    let (worker_addr, http_addr) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let worker_peers = format!("http={http_addr}");
    let http_peers = format!("worker={worker_addr}");
    let worker = SimProcess::start_on(
        &db,
        "worker",
        &worker_addr,
        &[
            "--turn-parts",
            "4",
            "--part-delay-ms",
            "100",
            "--peers",
            &worker_peers,
        ],
    )
    .await;
    let front = SimProcess::start_on(
        &db,
        "http",
        &http_addr,
        &["--worker", "off", "--peers", &http_peers],
    )
    .await;

    let mut stream = StreamClient::connect(&front.addr, &user.token, chat, None).await;
    stream.next_events(WAIT).await.unwrap();
    post_message(&front.addr, &user.token, chat, "hello").await;
    let events = stream
        .events_until(WAIT, |events| {
            events
                .iter()
                .any(|e| e["type"] == "status" && e["status"]["status"] == "waiting")
        })
        .await;

    let parts: Vec<&str> = of_type(&events, "message_part")
        .iter()
        .map(|e| e["message_part"]["part"]["text"].as_str().unwrap())
        .collect();
    assert!(!parts.is_empty(), "no relayed parts in {events:#?}");
    for (n, text) in parts.iter().enumerate() {
        assert_eq!(*text, format!("part {} of turn 1 ", n + 1));
    }
    let running = of_type(&events, "status");
    assert_eq!(running[0]["status"]["status"], "pending");
    assert_eq!(running[1]["status"]["status"], "running");
    assert_eq!(
        message_ids(&events).len(),
        2,
        "the user message and the answer"
    );

    // The worker saw the relay as a stream request from the front replica.
    let log = worker.log_text();
    assert!(log.contains(&worker_id("http").to_string()), "{log}");
    drop(worker);
}
