//! Lifecycle paths: migrate and seed, a lost LISTEN connection (every stream ends with
//! `dropped messages`, new streams work after the reconnect), and `/chats/watch`.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};

const WAIT: Duration = Duration::from_secs(10);

#[tokio::test]
async fn migrate_is_idempotent_and_seed_writes_usable_keys() {
    let db = ScratchDb::new().await;
    let status = Command::new(SIM)
        .args(["migrate", "--database-url", &db.url])
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(status.success(), "a second migrate must succeed");

    let seed = db.seed(2, 3);
    assert_eq!(seed.users.len(), 2);
    let client = db.connect().await;
    for user in &seed.users {
        assert_eq!(user.chats.len(), 3);
        let (id, secret) = user.token.split_once('-').unwrap();
        assert_eq!((id.len(), secret.len()), (10, 22));
        let row = client
            .query_one(
                "SELECT hashed_secret, user_id, expires_at > now() + interval '29 days' \
                 FROM api_keys WHERE id = $1",
                &[&id],
            )
            .await
            .unwrap();
        assert_eq!(
            row.get::<_, Vec<u8>>(0),
            Sha256::digest(secret.as_bytes()).to_vec()
        );
        assert_eq!(row.get::<_, uuid::Uuid>(1), user.id);
        assert!(row.get::<_, bool>(2));
        for chat in &user.chats {
            let row = client
                .query_one(
                    "SELECT status::text, last_model_config_id::text, owner_id FROM chats \
                     WHERE id = $1",
                    &[chat],
                )
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), "waiting");
            assert_eq!(row.get::<_, String>(1), MODEL_CONFIG);
            assert_eq!(row.get::<_, uuid::Uuid>(2), user.id);
        }
    }

    // Message ids start at 1000, so the first notify is never `{}`.
    let id = insert_message(&client, seed.users[0].chats[0], "user", "x").await;
    assert_eq!(id, 1000);
}

#[tokio::test]
async fn a_lost_listen_connection_ends_every_stream() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 2);
    let user = &seed.users[0];
    let sim = SimProcess::start(&db, "a", &["--worker", "off"]).await;
    let mut streams = Vec::new();
    for chat in &user.chats {
        let mut stream = StreamClient::connect(&sim.addr, &user.token, *chat, None).await;
        stream.next_events(WAIT).await.unwrap();
        streams.push(stream);
    }

    // Kill the replica's LISTEN backend (its last statement was a LISTEN).
    let client = db.connect().await;
    let killed = client
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'coderd-sim/a' \
             AND query LIKE 'LISTEN%'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(killed, 1);

    for (stream, chat) in streams.iter_mut().zip(&user.chats) {
        let frame = stream.next_frame(WAIT).await.expect("an error frame");
        let want = format!(
            "{{\"type\":\"data\",\"data\":[{{\"type\":\"error\",\"chat_id\":\"{chat}\",\
             \"error\":{{\"message\":\"dropped messages\"}}}}]}}\n"
        );
        assert_eq!(frame, want);
        assert!(stream.next_frame(WAIT).await.is_none(), "the stream ends");
    }

    // After the reconnect (1 s backoff) a new stream gets live messages again.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let chat = user.chats[0];
    let mut stream = StreamClient::connect(&sim.addr, &user.token, chat, None).await;
    stream.next_events(WAIT).await.unwrap();
    let id = post_message(&sim.addr, &user.token, chat, "after").await["message"]["id"]
        .as_i64()
        .unwrap();
    stream
        .events_until(WAIT, |events| message_ids(events).contains(&id))
        .await;
}

#[tokio::test]
async fn watch_sends_a_ping_then_owner_events() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 1);
    let user = &seed.users[0];
    let chat = user.chats[0];
    let sim = SimProcess::start(&db, "a", &["--worker", "off"]).await;

    let url = format!("ws://{}/api/experimental/chats/watch", sim.addr);
    let mut request =
        tokio_tungstenite::tungstenite::client::IntoClientRequest::into_client_request(url)
            .unwrap();
    request
        .headers_mut()
        .insert("Coder-Session-Token", user.token.parse().unwrap());
    let tcp = tokio::net::TcpStream::connect(&sim.addr).await.unwrap();
    let (ws, _) = tokio_tungstenite::client_async(request, tcp).await.unwrap();
    let mut watch = StreamClient { ws };
    assert_eq!(
        watch.next_frame(WAIT).await.unwrap(),
        "{\"type\":\"ping\",\"data\":null}\n"
    );

    post_message(&sim.addr, &user.token, chat, "hello").await;
    let frame = watch.next_frame(WAIT).await.unwrap();
    let event: serde_json::Value = serde_json::from_str(&frame).unwrap();
    assert_eq!(event["type"], "data");
    assert_eq!(event["data"]["kind"], "status_change");
    assert_eq!(event["data"]["chat"]["id"], chat.to_string());
    assert_eq!(event["data"]["chat"]["status"], "pending");
}
