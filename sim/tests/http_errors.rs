//! Error responses, byte for byte: authentication (401 and its challenge), the chat parameter
//! (400/404), `after_id`, the queue limit (429) and the message and queue id checks.

mod common;

use common::*;

const SIGNED_OUT: &str =
    "You are signed out or your session has expired. Please sign in again to continue.";

fn unauthorized_body(detail: &str) -> String {
    let detail = detail.replace('"', "\\\"");
    format!("{{\"message\":\"{SIGNED_OUT}\",\"detail\":\"{detail}\"}}\n")
}

#[tokio::test]
async fn authentication_failures_match_coderd() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 1);
    let user = &seed.users[0];
    let chat = user.chats[0];
    let sim = SimProcess::start(&db, "a", &["--worker", "off"]).await;
    let path = format!("/api/experimental/chats/{chat}");

    // No token at all: the challenge names this replica's access URL.
    let response = http(&sim.addr, "GET", &path, &[], None).await;
    assert_eq!(response.status, 401);
    assert_eq!(
        response.body,
        unauthorized_body(r#"Cookie "coder_session_token" or query parameter must be provided."#)
    );
    assert_eq!(
        response.header("content-type"),
        Some("application/json; charset=utf-8")
    );
    let challenge = format!(
        "Bearer realm=\"coder\", error=\"invalid_token\", error_description=\"The access token \
         is invalid\", resource_metadata=\"http://{}/.well-known/oauth-protected-resource\"",
        sim.addr
    );
    assert_eq!(
        response.header("www-authenticate"),
        Some(challenge.as_str())
    );

    // Malformed, unknown and wrong tokens.
    let (key_id, _) = user.token.split_once('-').unwrap();
    let wrong_secret = format!("{key_id}-0123456789012345678901");
    let cases = [
        (
            "abc",
            "Invalid API key format: incorrect amount of API key parts, expected 2 got 1",
        ),
        (
            "a-b-c",
            "Invalid API key format: incorrect amount of API key parts, expected 2 got 3",
        ),
        (
            "abc-def",
            "Invalid API key format: invalid API key ID length, expected 10 got 3",
        ),
        (
            "0123456789-short",
            "Invalid API key format: invalid API key secret length, expected 22 got 5",
        ),
        ("zzzzzzzzzz-0123456789012345678901", "API key is invalid."),
        (wrong_secret.as_str(), "API key secret is invalid."),
    ];
    for (token, detail) in cases {
        let response = http(
            &sim.addr,
            "GET",
            &path,
            &[("Coder-Session-Token", token)],
            None,
        )
        .await;
        assert_eq!(
            (response.status, response.body),
            (401, unauthorized_body(detail)),
            "{token}"
        );
    }

    // An expired key names its expiry in Go's time format, and the challenge says so.
    let client = db.connect().await;
    client
        .execute(
            "INSERT INTO api_keys (id, hashed_secret, user_id, expires_at) VALUES ('expiredkey', \
             sha256(convert_to('0123456789012345678901', 'UTF8')), $1, \
             '2026-01-02 03:04:05.5+00')",
            &[&user.id],
        )
        .await
        .unwrap();
    let expired = "expiredkey-0123456789012345678901";
    let response = http(
        &sim.addr,
        "GET",
        &path,
        &[("Coder-Session-Token", expired)],
        None,
    )
    .await;
    assert_eq!(
        response.body,
        unauthorized_body(r#"API key expired at "2026-01-02 03:04:05.5 +0000 UTC"."#)
    );
    assert!(response
        .header("www-authenticate")
        .unwrap()
        .contains("The access token has expired"));

    // Source order: a present-but-invalid cookie wins over a valid header.
    let cookie = "coder_session_token=abc".to_string();
    let headers = [
        ("Cookie", cookie.as_str()),
        ("Coder-Session-Token", user.token.as_str()),
    ];
    let response = http(&sim.addr, "GET", &path, &headers, None).await;
    assert_eq!(response.status, 401);
    // Every source works on its own.
    let bearer = format!("bearer  {} ", user.token);
    let cookie = format!("coder_session_token={}", user.token);
    for (query, headers) in [
        (format!("?coder_session_token={}", user.token), vec![]),
        (format!("?access_token=%20{}", user.token), vec![]),
        (String::new(), vec![("Authorization", bearer.as_str())]),
        (String::new(), vec![("Cookie", cookie.as_str())]),
    ] {
        let response = http(&sim.addr, "GET", &format!("{path}{query}"), &headers, None).await;
        assert_eq!(
            response.status, 200,
            "{query} {headers:?}: {}",
            response.body
        );
    }
}

#[tokio::test]
async fn chat_parameter_and_after_id_errors() {
    let db = ScratchDb::new().await;
    let seed = db.seed(2, 1);
    let (user, other) = (&seed.users[0], &seed.users[1]);
    let sim = SimProcess::start(&db, "a", &["--worker", "off"]).await;
    let token = user.token.as_str();

    let response = api(&sim.addr, token, "GET", "/chats/abc", None).await;
    assert_eq!(response.status, 400);
    assert_eq!(
        response.body,
        "{\"message\":\"Invalid UUID \\\"abc\\\".\",\"detail\":\"invalid UUID length: 3\"}\n"
    );
    let bad = "11111111-1111-4111-8111-11111111111z";
    let response = api(
        &sim.addr,
        token,
        "GET",
        &format!("/chats/{bad}/stream"),
        None,
    )
    .await;
    assert_eq!(
        response.body,
        format!(
            "{{\"message\":\"Invalid UUID \\\"{bad}\\\".\",\"detail\":\"invalid UUID format\"}}\n"
        )
    );

    // A missing chat and another user's chat give the same 404.
    let not_found =
        "{\"message\":\"Resource not found or you do not have access to this resource\"}\n";
    for chat in [uuid::Uuid::new_v4(), other.chats[0]] {
        let response = api(
            &sim.addr,
            token,
            "GET",
            &format!("/chats/{chat}/messages"),
            None,
        )
        .await;
        assert_eq!((response.status, response.body.as_str()), (404, not_found));
    }

    let response = api(&sim.addr, token, "GET", "/nope", None).await;
    assert_eq!(
        (response.status, response.body.as_str()),
        (404, "{\"message\":\"Route not found.\"}\n")
    );

    let chat = user.chats[0];
    let cases = [
        (
            "abc",
            r#"strconv.ParseInt: parsing \"abc\": invalid syntax"#,
        ),
        (
            "99999999999999999999",
            r#"strconv.ParseInt: parsing \"99999999999999999999\": value out of range"#,
        ),
    ];
    for (after_id, detail) in cases {
        let path = format!("/chats/{chat}/stream?after_id={after_id}");
        let response = api(&sim.addr, token, "GET", &path, None).await;
        let want =
            format!("{{\"message\":\"Invalid after_id parameter.\",\"detail\":\"{detail}\"}}\n");
        assert_eq!((response.status, response.body), (400, want));
    }
}

#[tokio::test]
async fn queue_limit_and_id_checks() {
    let db = ScratchDb::new().await;
    let seed = db.seed(1, 1);
    let user = &seed.users[0];
    let chat = user.chats[0];
    let sim = SimProcess::start(&db, "a", &["--worker", "off"]).await;
    let token = user.token.as_str();

    // The first message goes into history (chat now pending); the next twenty are queued.
    let first = post_message(&sim.addr, token, chat, "first").await;
    assert_eq!(first["queued"], false);
    let first_id = first["message"]["id"].as_i64().unwrap();
    let mut queued_ids = Vec::new();
    for n in 0..20 {
        let response = post_message(&sim.addr, token, chat, &format!("queued {n}")).await;
        assert_eq!(response["queued"], true);
        queued_ids.push(response["queued_message"]["id"].as_i64().unwrap());
    }
    let body = r#"{"content":[{"type":"text","text":"one too many"}]}"#;
    let response = api(
        &sim.addr,
        token,
        "POST",
        &format!("/chats/{chat}/messages"),
        Some(body),
    )
    .await;
    assert_eq!(response.status, 429);
    assert_eq!(
        response.body,
        "{\"message\":\"Message queue is full.\",\"detail\":\"Maximum 20 messages can be queued.\"}\n"
    );

    // Queue ids: not a number is 400 with the strconv text; a missing id is still 204.
    let response = api(
        &sim.addr,
        token,
        "DELETE",
        &format!("/chats/{chat}/queue/x"),
        None,
    )
    .await;
    assert_eq!(
        (response.status, response.body.as_str()),
        (400, "{\"message\":\"Invalid queued message ID.\",\"detail\":\"strconv.ParseInt: parsing \\\"x\\\": invalid syntax\"}\n")
    );
    let response = api(
        &sim.addr,
        token,
        "DELETE",
        &format!("/chats/{chat}/queue/1"),
        None,
    )
    .await;
    assert_eq!((response.status, response.body.as_str()), (204, ""));
    let path = format!("/chats/{chat}/queue/{}", queued_ids[0]);
    assert_eq!(
        api(&sim.addr, token, "DELETE", &path, None).await.status,
        204
    );

    // Message ids for edits.
    let edit = r#"{"content":[{"type":"text","text":"edited"}]}"#;
    for raw in ["0", "-1", "x"] {
        let path = format!("/chats/{chat}/messages/{raw}");
        let response = api(&sim.addr, token, "PATCH", &path, Some(edit)).await;
        assert_eq!(
            (response.status, response.body.as_str()),
            (400, "{\"message\":\"Invalid chat message ID.\",\"detail\":\"Message ID must be a positive integer.\"}\n")
        );
    }
    let path = format!("/chats/{chat}/messages/{}", first_id + 100_000);
    let response = api(&sim.addr, token, "PATCH", &path, Some(edit)).await;
    assert_eq!(
        (response.status, response.body.as_str()),
        (404, "{\"message\":\"Chat message not found.\"}\n")
    );

    let client = db.connect().await;
    let assistant = insert_message(&client, chat, "assistant", "hi").await;
    let path = format!("/chats/{chat}/messages/{assistant}");
    let response = api(&sim.addr, token, "PATCH", &path, Some(edit)).await;
    assert_eq!(
        (response.status, response.body.as_str()),
        (400, "{\"message\":\"Only user messages can be edited.\"}\n")
    );
}
