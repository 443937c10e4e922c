//! HTTP framing: oversized heads, and request smuggling through conflicting Content-Length and
//! Transfer-Encoding or bad chunks, with Postgres as the witness of any hidden request.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::*;
use crate::support::*;

/// Oversized heads are refused like coderd refuses them, and framing tricks (conflicting
/// Content-Length / Transfer-Encoding, bad chunks) never desynchronise the connection: every
/// request gets one answer or the connection closes, and no bytes hidden in a body ever reach
/// coderd as a request of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_framing_tricks_never_desynchronise() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--worker", "off"]).await;
    let mut side = start_sidecar(&db, sim.addr, "").await;
    let pg = db.client().await;

    // Oversized heads: one huge header, and very many small ones.
    let get = format!("/api/experimental/chats/{chat}");
    let huge = format!(
        "GET {get} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCoder-Session-Token: {token}\r\n\
         X-Big: {}\r\n\r\n",
        "a".repeat(512 * 1024)
    );
    let many = format!(
        "GET {get} HTTP/1.1\r\nHost: x\r\nConnection: close\r\nCoder-Session-Token: {token}\r\n{}\r\n",
        (0..300).map(|i| format!("X-H{i}: v\r\n")).collect::<String>()
    );
    for (what, raw) in [("huge header", &huge), ("many headers", &many)] {
        let direct = exchange(sim.addr, raw.as_bytes()).await.status;
        let proxied = exchange(side.addr, raw.as_bytes()).await.status;
        assert_eq!(proxied, direct, "{what}");
        assert_alive(&mut side, what).await;
    }
    // A stream handshake with a huge header is refused before any stream is set up.
    let raw = handshake(
        &stream_path(chat, ""),
        &[
            ("Coder-Session-Token", token),
            ("X-Big", &"b".repeat(512 * 1024)),
        ],
    );
    let r = exchange(side.addr, &raw).await;
    assert_ne!(r.status, 101);

    // Framing tricks. The hidden request would post a message with a marker text; if it ever
    // reaches coderd as a request, the marker lands in Postgres.
    let marker = "smuggled-marker";
    let hidden_body = format!(r#"{{"content":[{{"type":"text","text":"{marker}"}}]}}"#);
    let hidden = format!(
        "POST /api/experimental/chats/{chat}/messages HTTP/1.1\r\nHost: x\r\n\
         Coder-Session-Token: {token}\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{hidden_body}",
        hidden_body.len()
    );
    let follow = format!(
        "GET /api/experimental/chats/{chat} HTTP/1.1\r\nHost: x\r\nCoder-Session-Token: {token}\r\n\
         Connection: close\r\n\r\n"
    );
    let post_head = format!(
        "POST /api/experimental/chats/{chat}/interrupt HTTP/1.1\r\nHost: x\r\n\
         Coder-Session-Token: {token}\r\n"
    );
    let chunk_of = |s: &str| format!("{:x}\r\n{s}\r\n0\r\n\r\n", s.len());
    let shapes: Vec<(&str, String)> = vec![
        (
            "CL then TE, hidden after the chunks",
            format!(
                "{post_head}Content-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}",
                5 + hidden.len()
            ),
        ),
        (
            "TE then CL, hidden inside the CL body",
            format!(
                "{post_head}Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n{}",
                chunk_of(&hidden)
            ),
        ),
        (
            "two different Content-Lengths",
            format!(
                "{post_head}Content-Length: 0\r\nContent-Length: {}\r\n\r\n{hidden}",
                hidden.len()
            ),
        ),
        (
            "Content-Length list",
            format!("{post_head}Content-Length: 0, {}\r\n\r\n{hidden}", hidden.len()),
        ),
        (
            "signed Content-Length",
            format!("{post_head}Content-Length: +{}\r\n\r\n{hidden}", hidden.len()),
        ),
        (
            "TE not chunked last",
            format!("{post_head}Transfer-Encoding: chunked, identity\r\n\r\n{hidden}"),
        ),
        (
            "TE with a near miss",
            format!("{post_head}Transfer-Encoding: xchunked\r\n\r\n{hidden}"),
        ),
        (
            "TE with a space before the colon",
            format!("{post_head}Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n{hidden}"),
        ),
        (
            "folded TE",
            format!("{post_head}Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n{hidden}"),
        ),
        (
            "chunk size overflow",
            format!(
                "{post_head}Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff1\r\n{hidden}\r\n0\r\n\r\n"
            ),
        ),
        (
            "chunk extension and bare LF",
            format!("{post_head}Transfer-Encoding: chunked\r\n\r\n0;x=1\n\n{hidden}"),
        ),
    ];
    for (what, raw) in &shapes {
        let out = trick_then_follow(side.addr, raw, &follow).await;
        let out = out.unwrap_or_else(|| panic!("{what}: the connection hung"));
        let text = String::from_utf8_lossy(&out);
        let answers = text.matches("HTTP/1.1 ").count();
        assert!(answers >= 1, "{what}: no answer at all");
        // Anything but a 400 for the trick means it was read as one request with a body.
        assert!(
            answers <= 3,
            "{what}: {answers} answers for at most 3 requests:\n{text}"
        );
        assert_alive(&mut side, what).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let landed = rows_holding(&pg, "chat_messages", marker).await;
    let queued = rows_holding(&pg, "chat_queued_messages", marker).await;
    // Postgres is the witness: compare what the sim does with the same bytes.
    for (_, raw) in &shapes {
        let _ = trick_then_follow(sim.addr, raw, &follow).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let direct_landed = rows_holding(&pg, "chat_messages", marker).await - landed;
    eprintln!("hidden requests that landed: through chatcache {landed} (+{queued} queued), directly {direct_landed}");
    assert_eq!(
        landed + queued,
        0,
        "a request hidden in a body reached coderd"
    );
}

/// Sends a framing trick and then `follow` on one connection and reads until the server closes
/// it; None if it is still open after `WAIT`.
async fn trick_then_follow(addr: SocketAddr, trick: &str, follow: &str) -> Option<Vec<u8>> {
    let mut s = send_raw(addr, trick.as_bytes()).await;
    s.write_all(follow.as_bytes()).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await;
    read.is_ok().then_some(out)
}

/// Rows of `table` whose content holds `marker`.
async fn rows_holding(pg: &tokio_postgres::Client, table: &str, marker: &str) -> i64 {
    let sql = format!("SELECT count(*) FROM {table} WHERE content::text LIKE '%' || $1 || '%'");
    pg.query_one(&sql, &[&marker]).await.unwrap().get(0)
}
