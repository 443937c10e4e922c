//! Paths, chat ids and cursors: no request-target trick, `after_id` shape or query escape gets
//! an answer from the sidecar that coderd would not give to the same bytes.

use crate::common::*;
use crate::support::*;

/// No path trick routes a request to the cache that coderd would route elsewhere, and no
/// cached snapshot reaches the wrong chat: every answer (status and snapshot bytes, or error
/// body) equals coderd's for the same request, while both chats are warm in the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_tricks_get_coderds_answer() {
    let db = Scratch::new().await;
    let users = seed(&db, 2, 2);
    let token = users[0].token.as_str();
    let (a, a2, b) = (
        users[0].chats[0].as_str(),
        users[0].chats[1].as_str(),
        users[1].chats[0].as_str(),
    );
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let pg = db.client().await;
    turn(sim.addr, &pg, a, token, "first chat").await;
    turn(sim.addr, &pg, a2, token, "second chat").await;
    // Both chats are held by the cache while the tricks run.
    let _warm_a = subscribe(side.addr, a, 0, token).await;
    let _warm_a2 = subscribe(side.addr, a2, 0, token).await;
    wait_metric(side.admin.unwrap(), "chatcache_chats_held", 2.0).await;

    let upper = a.to_uppercase();
    let nodash = a.replace('-', "");
    let targets = vec![
        stream_path(a, ""),
        stream_path(&upper, ""),
        stream_path(&nodash, ""),
        stream_path(&format!("{{{a}}}"), ""),
        stream_path(&format!("urn:uuid:{a}"), ""),
        stream_path(&format!("%7B{a}%7D"), ""),
        format!("/api/experimental/chats/{a}%2Fstream"),
        format!("/api/experimental/chats/{a}%2fstream"),
        stream_path(&format!("{a2}%2F..%2F{a}"), ""),
        stream_path(&format!("{a2}/../{a}"), ""),
        stream_path(&format!("./{a}"), ""),
        stream_path(&format!("{a}/."), ""),
        format!("/api/experimental//chats/{a}/stream"),
        format!("//api/experimental/chats/{a}/stream"),
        format!("/api/experimental/chats/{a}//stream"),
        format!("/api/experimental/chats/{a}/stream/"),
        format!("/api/experimental/chats/{a}/stream/{a2}"),
        format!("/api/experimental/chats/{a}/stream/../../{a2}/stream"),
        format!("/API/experimental/chats/{a}/stream"),
        format!("/api/experimental/chats/{a}/STREAM"),
        format!("/api/experimental/chats/{a}/stream%3Fafter_id=0"),
        format!("/api/experimental/chats/{a}/stream;{a2}"),
        stream_path(a, &format!("?after_id=0&x=/../{a2}/stream")),
        stream_path(&format!("{a}%00"), ""),
        stream_path(&format!("{a}x"), ""),
        stream_path(&a[..35], ""),
        stream_path("", ""),
        stream_path("not-a-uuid", ""),
        stream_path("00000000-0000-0000-0000-000000000000", ""),
        stream_path(b, ""),
        stream_path(&b.to_uppercase(), ""),
        stream_path(&format!("{b}%2F..%2F{a}"), ""),
        format!("http://127.0.0.1/api/experimental/chats/{a}/stream"),
        format!("http://127.0.0.1/api/experimental/chats/{a2}/stream"),
    ];
    let auth = [("Coder-Session-Token", token)];
    let mut upgraded = 0;
    for target in &targets {
        let status = same_as_coderd(sim.addr, side.addr, &handshake(target, &auth), target).await;
        upgraded += usize::from(status == 101);
    }
    // The checks above compare answers; make sure some of them were real streams.
    assert!(upgraded >= 5, "only {upgraded} upgrades");
}

/// Every `after_id` shape gets coderd's answer: the same 400 body, or the same snapshot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_id_shapes_get_coderds_answer() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let pg = db.client().await;
    for t in 0..3 {
        turn(sim.addr, &pg, chat, token, &format!("t{t}")).await;
    }
    let ids = db_ids(&pg, chat).await;
    let (mid, head) = (ids[ids.len() / 2], *ids.last().unwrap());
    // coderd sends a short turn's `running` and `waiting` notifies in one 50 ms batch after
    // the commit: a feed opened before that batch goes out receives them after its snapshot
    // and shows `running` for a moment. Let the batch go out first.
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let _warm = subscribe(side.addr, chat, 0, token).await;

    let queries = vec![
        String::new(),
        "?".into(),
        "?after_id".into(),
        "?after_id=".into(),
        "?after_id=0".into(),
        format!("?after_id={mid}"),
        format!("?after_id={head}"),
        format!("?after_id={}", head + 1_000_000),
        "?after_id=-1".into(),
        "?after_id=-0".into(),
        "?after_id=+5".into(),
        "?after_id=%2B5".into(),
        "?after_id=%2D5".into(),
        "?after_id=--5".into(),
        "?after_id=+-5".into(),
        "?after_id=-".into(),
        "?after_id=+".into(),
        "?after_id=9223372036854775807".into(),
        "?after_id=9223372036854775808".into(),
        "?after_id=-9223372036854775808".into(),
        "?after_id=-9223372036854775809".into(),
        "?after_id=99999999999999999999999999999".into(),
        "?after_id=0000000000000000000000000000001".into(),
        "?after_id=abc".into(),
        "?after_id=1.5".into(),
        "?after_id=1e3".into(),
        "?after_id=0x10".into(),
        "?after_id=1_000".into(),
        "?after_id=%205".into(),
        "?after_id=5%20".into(),
        "?after_id=%D9%A1".into(),
        "?after_id=%22%5C".into(),
        "?after_id=%3Cscript%3E".into(),
        "?after_id=%0A".into(),
        "?after_id=+5+".into(),
        format!("?after_id={mid}&after_id=abc"),
        format!("?after_id=abc&after_id={mid}"),
        format!("?after_id=&after_id={mid}"),
        format!("?after_id={mid}&after_id="),
        "?AFTER_ID=abc".into(),
        "?after%5Fid=abc".into(),
        format!("?x=1&&after_id={mid}&"),
        format!("?after_id={mid}#frag"),
    ];
    let mut refused = 0;
    for q in &queries {
        let status = same_as_coderd(sim.addr, side.addr, &token_handshake(chat, q, token), q).await;
        refused += usize::from(status == 400);
    }
    assert!(refused >= 10, "only {refused} refusals");
    assert_eq!(
        metric(
            side.admin.unwrap(),
            "chatcache_fail_open_total{reason=\"feed\"}"
        )
        .await,
        0.0
    );
}

// ---------------------------------------------------------------------------------------------
// Regression tests of defects this suite found (tests/RELIABILITY.md, "Defects found"); each
// failed before its fix.
// ---------------------------------------------------------------------------------------------

/// A stream path whose chat segment is 45 bytes long with a multi-byte character across byte
/// 9 makes `route::parse_go_uuid` slice inside a character and panic (found by the `route`
/// fuzz target); coderd answers 400. The request must get coderd's answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn multibyte_chat_segment_gets_coderds_answer() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let token = users[0].token.as_str();
    let sim = start_sim(&db, "a", &[]).await;
    let mut side = start_sidecar(&db, sim.addr, "").await;
    let segment = format!("12345678\u{e9}{}", "a".repeat(35));
    assert_eq!(segment.len(), 45);
    let raw = token_handshake(&segment, "", token);
    let status = same_as_coderd(sim.addr, side.addr, &raw, "45-byte segment").await;
    assert_eq!(status, 400);
    assert_alive(&mut side, "multibyte segment").await;
}

/// coderd's query parser skips pairs with invalid escapes or invalid UTF-8 (`url.ParseQuery`);
/// the sidecar keeps them, so a cursor or a query token coderd never sees decides the answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_pairs_with_invalid_escapes_are_skipped_as_in_coderd() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &[]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let header = [("Coder-Session-Token", token)];
    let query_token = format!("?coder_session_token=%FF&coder_session_token={token}");
    let cases: Vec<(String, &[(&str, &str)])> = vec![
        ("?after_id=%ZZ".into(), &header),
        ("?after_id=5%".into(), &header),
        // `%FF` is left out: Go decodes it to the byte 0xFF (not a number: 400), while the
        // sim drops the pair; chatcache follows Go (unit test in src/route.rs).
        ("?after_id=%ZZ&after_id=3".into(), &header),
        ("?coder_session_token=%ZZ".into(), &header),
        (query_token, &[]),
    ];
    for (query, headers) in cases {
        let raw = handshake(&stream_path(chat, &query), headers);
        same_as_coderd(sim.addr, side.addr, &raw, &query).await;
    }
}

/// Go's `strconv.Quote` writes `\a`, `\b`, `\f` and `\v` for those control characters; the
/// sidecar's 400 detail for a bad `after_id` writes `\x07`-style escapes instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_id_error_detail_quotes_like_go() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &[]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    for escape in ["%07", "%08", "%0B", "%0C"] {
        let raw = token_handshake(chat, &format!("?after_id=1{escape}"), token);
        same_as_coderd(sim.addr, side.addr, &raw, escape).await;
    }
}
