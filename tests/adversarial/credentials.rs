//! Credentials and authorization: every credential shape, contradicting sources, revoked keys
//! and deleted chats are answered as coderd answers them, within the authz cache's TTL.

use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::*;

/// A named request: its query string and its header lines.
type CredentialCase<'a> = (&'a str, String, Vec<(&'a str, String)>);

/// Every credential shape is answered as coderd answers it, including expired keys and
/// sources that contradict each other (coderd takes the first present source).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_get_coderds_answer() {
    let db = Scratch::new().await;
    let users = seed(&db, 3, 1);
    let good = users[0].token.as_str();
    let chat = users[0].chats[0].as_str();
    let expired = users[2].token.as_str();
    let sim = start_sim(&db, "a", &[]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let pg = db.client().await;
    let expired_id = expired.split('-').next().unwrap();
    pg.execute(
        "UPDATE api_keys SET expires_at = now() - interval '1 hour' WHERE id = $1",
        &[&expired_id],
    )
    .await
    .unwrap();
    // A token of the right shape with a wrong secret, and a foreign user's valid token.
    let wrong_secret = format!("{}-{}", good.split('-').next().unwrap(), "x".repeat(22));
    let foreign = users[1].token.as_str();

    // Header lines, each a credential source coderd reads.
    let session = |t: &str| ("Coder-Session-Token", t.to_string());
    let cookie = |t: &str| ("Cookie", format!("coder_session_token={t}"));
    let bearer = |t: &str| ("Authorization", format!("Bearer {t}"));
    let q = |name: &str, t: &str| format!("?after_id=0&{name}={t}");
    let cases: Vec<CredentialCase> = vec![
        ("none", String::new(), vec![]),
        ("empty header", String::new(), vec![session("")]),
        ("no dash", String::new(), vec![session("nodash")]),
        ("three parts", String::new(), vec![session("a-b-c")]),
        ("wrong secret", String::new(), vec![session(&wrong_secret)]),
        ("expired", String::new(), vec![session(expired)]),
        ("foreign user", String::new(), vec![session(foreign)]),
        ("cookie", String::new(), vec![cookie(good)]),
        (
            "quoted cookie",
            String::new(),
            vec![("Cookie", format!("coder_session_token=\"{good}\""))],
        ),
        (
            "cookie among others",
            String::new(),
            vec![("Cookie", format!("a=b; coder_session_token={good}; c=d"))],
        ),
        ("query token", q("coder_session_token", good), vec![]),
        ("header", String::new(), vec![session(good)]),
        ("bearer", String::new(), vec![bearer(good)]),
        (
            "lower-case bearer",
            String::new(),
            vec![("Authorization", format!("bearer {good}"))],
        ),
        (
            "basic auth",
            String::new(),
            vec![("Authorization", format!("Basic {good}"))],
        ),
        ("access_token", q("access_token", good), vec![]),
        (
            "access_token with spaces",
            q("access_token", &format!("%20{good}%20")),
            vec![],
        ),
        ("expired cookie", String::new(), vec![cookie(expired)]),
        ("expired bearer", String::new(), vec![bearer(expired)]),
        (
            "bad cookie, good header",
            String::new(),
            vec![cookie("abc"), session(good)],
        ),
        (
            "good cookie, bad header",
            String::new(),
            vec![cookie(good), session("abc")],
        ),
        (
            "empty cookie, good header",
            String::new(),
            vec![cookie(""), session(good)],
        ),
        (
            "bad query token, good header",
            q("coder_session_token", "abc"),
            vec![session(good)],
        ),
        (
            "good query token, expired header",
            q("coder_session_token", good),
            vec![session(expired)],
        ),
        (
            "bad header, good bearer",
            String::new(),
            vec![session("abc"), bearer(good)],
        ),
        (
            "bad bearer, good access_token",
            q("access_token", good),
            vec![bearer("abc")],
        ),
        (
            "foreign cookie, good header",
            String::new(),
            vec![cookie(foreign), session(good)],
        ),
        (
            "two session headers, bad first",
            String::new(),
            vec![session("abc"), session(good)],
        ),
        (
            "two session headers, good first",
            String::new(),
            vec![session(good), session("abc")],
        ),
        (
            "empty then good query token",
            format!("?coder_session_token=&coder_session_token={good}"),
            vec![],
        ),
    ];
    let mut allowed = 0;
    for (what, query, headers) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let raw = handshake(&stream_path(chat, query), &headers);
        let status = same_as_coderd(sim.addr, side.addr, &raw, what).await;
        allowed += usize::from(status == 101);
    }
    assert!(allowed >= 8, "only {allowed} accepted");
    // Every refusal is coderd's, so the sidecar never had to fail open.
    let admin = side.admin.unwrap();
    assert_eq!(
        metric(admin, "chatcache_fail_open_total{reason=\"authz_error\"}").await,
        0.0
    );
}

/// A token deleted while the sidecar still holds coderd's "yes" for it opens new streams only
/// until `authz.ttl_ms` has passed; streams already open stay open, as in coderd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoked_token_is_refused_within_the_authz_ttl() {
    const TTL_MS: u64 = 3000;
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &[]).await;
    let side = start_sidecar(&db, sim.addr, &format!("[authz]\nttl_ms = {TTL_MS}\n")).await;
    let pg = db.client().await;
    let raw = token_handshake(chat, "", token);

    let mut open = open_stream(side.addr, &raw).await;
    let approved_at = Instant::now();
    let key_id = token.split('-').next().unwrap();
    let deleted = pg
        .execute("DELETE FROM api_keys WHERE id = $1", &[&key_id])
        .await
        .unwrap();
    assert_eq!(deleted, 1);
    assert_eq!(
        exchange(sim.addr, &raw).await.status,
        401,
        "coderd refuses at once"
    );

    // The cached yes still opens streams right after the revocation...
    let first = exchange(side.addr, &raw).await.status;
    assert_eq!(first, 101, "the cached yes is in effect within the TTL");
    // ...and stops doing so no later than the TTL after coderd's last yes.
    let refused_after = loop {
        let status = exchange(side.addr, &raw).await.status;
        if status == 401 {
            break approved_at.elapsed();
        }
        assert_eq!(status, 101);
        assert!(
            approved_at.elapsed() < Duration::from_millis(TTL_MS + 1000),
            "a revoked token still opens streams after the TTL"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    eprintln!("revoked token refused {refused_after:?} after coderd's last yes (ttl {TTL_MS} ms)");
    assert!(refused_after <= Duration::from_millis(TTL_MS + 1000));

    // The stream opened before the revocation keeps running (the owner posts with a new key).
    let fresh = add_api_key(&pg, &users[0].id).await;
    turn(sim.addr, &pg, chat, &fresh, "after revocation").await;
    let ids = db_ids(&pg, chat).await;
    read_through(
        &mut open,
        &ids,
        "the open stream ended after the revocation",
    )
    .await;
}

/// Adds an API key for `user` and returns its token.
async fn add_api_key(pg: &tokio_postgres::Client, user: &str) -> String {
    let user: uuid::Uuid = user.parse().unwrap();
    let id = format!("{:010x}", rand::random::<u32>())[..10].to_string();
    let secret = "s".repeat(22);
    pg.execute(
        "INSERT INTO api_keys (id, hashed_secret, user_id, expires_at) \
         VALUES ($1, sha256(convert_to($2, 'UTF8')), $3, now() + interval '1 day')",
        &[&id, &secret, &user],
    )
    .await
    .unwrap();
    format!("{id}-{secret}")
}

/// A chat deleted from Postgres is refused (coderd's 404) once the cached yes expires, even
/// though the cache still holds its history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_chat_is_refused_after_the_authz_ttl() {
    const TTL_MS: u64 = 1000;
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, &format!("[authz]\nttl_ms = {TTL_MS}\n")).await;
    let pg = db.client().await;
    turn(sim.addr, &pg, chat, token, "soon gone").await;
    let raw = token_handshake(chat, "", token);
    let _warm = open_stream(side.addr, &raw).await;
    let approved_at = Instant::now();
    let chat_uuid: uuid::Uuid = chat.parse().unwrap();
    pg.execute("DELETE FROM chats WHERE id = $1", &[&chat_uuid])
        .await
        .unwrap();
    let direct = answer(sim.addr, &raw).await;
    assert_eq!(direct.0, 404);
    tokio::time::sleep(Duration::from_millis(TTL_MS + 100).saturating_sub(approved_at.elapsed()))
        .await;
    let proxied = answer(side.addr, &raw).await;
    assert_eq!(
        proxied, direct,
        "after the TTL the sidecar relays coderd's 404"
    );
}

// ---------------------------------------------------------------------------------------------
// Regression tests of defects this suite found (tests/RELIABILITY.md, "Defects found"); each
// failed before its fix.
// ---------------------------------------------------------------------------------------------

/// coderd reads the session cookie from every `Cookie` header; the sidecar's authorization
/// probe carries only the first. A request whose second Cookie header holds an invalid token
/// (which coderd refuses, 401, whatever other source follows) is approved through the sidecar
/// when another source holds a valid token; a valid token in the second header is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_cookie_header_counts_as_in_coderd() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &[]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let good_cookie = format!("coder_session_token={token}");
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        (
            "bad session cookie in the second header, good header token",
            vec![
                ("Cookie", "theme=dark"),
                ("Cookie", "coder_session_token=abc"),
                ("Coder-Session-Token", token),
            ],
        ),
        (
            "good session cookie in the second header",
            vec![("Cookie", "theme=dark"), ("Cookie", &good_cookie)],
        ),
    ];
    for (what, headers) in cases {
        let raw = handshake(&stream_path(chat, ""), &headers);
        same_as_coderd(sim.addr, side.addr, &raw, what).await;
    }
}
