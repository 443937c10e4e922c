//! Slow, stalled and fast consumers next to each other under tight per-chat and global memory
//! limits, with bursts larger than a ring.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use crate::support::*;

/// Chats over the per-chat limits, a global budget smaller than the working set, bursts of
/// 600 parts per turn, and next to each fast subscriber a slow one and a stalled one: fast
/// subscribers get everything in order without waiting for the others, slow ones lose nothing
/// (at worst they are closed and catch up on reconnect), memory stays within the limits, and
/// idle chats are evicted to honour the global budget.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_stalled_consumers_under_tight_limits() {
    // Rings of 16 messages / 32 KiB; a global budget below the working set (~90 KiB).
    tight_limits(32768, 40960).await;
}

async fn tight_limits(per_chat_bytes: usize, max_bytes: usize) {
    #[allow(non_snake_case)]
    let (PER_CHAT_BYTES, MAX_BYTES) = (per_chat_bytes, max_bytes);
    let db = Scratch::new().await;
    let users = seed(&db, 1, 6);
    let token = users[0].token.as_str();
    let chats = users[0].chats.clone();
    let pg = db.client().await;
    fill_chats(&pg, &chats, 40).await;
    let sim = start_sim(&db, "a", &["--part-delay-ms", "0", "--turn-parts", "600"]).await;
    let config = format!(
        "[cache]\nmax_messages_per_chat = 16\nmax_bytes_per_chat = {PER_CHAT_BYTES}\n\
         max_bytes = {MAX_BYTES}\n[stream]\nsubscriber_queue_events = 256\n\
         [feed]\nlinger_ms = 60000\n"
    );
    let side = start_sidecar(&db, sim.addr, &config).await;
    let admin = side.admin.unwrap();

    // Chats 0..3 are followed; 3..6 are warmed and then left idle (eviction candidates).
    for chat in &chats[3..] {
        history_exact(side.addr, &pg, chat, token).await;
    }
    let mut fast = Vec::new();
    let mut slow = Vec::new();
    let mut stalled = Vec::new();
    for chat in &chats[..3] {
        fast.push(subscribe(side.addr, chat, 0, token).await);
        slow.push(subscribe(side.addr, chat, 0, token).await);
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(4096).unwrap();
        let mut s = socket.connect(side.addr).await.unwrap();
        let handshake = format!(
            "GET /api/experimental/chats/{chat}/stream HTTP/1.1\r\nHost: x\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Coder-Session-Token: {token}\r\n\r\n"
        );
        tokio::io::AsyncWriteExt::write_all(&mut s, handshake.as_bytes())
            .await
            .unwrap();
        stalled.push(s);
    }

    // Two turns on every followed chat at once: bursts of 600 parts and new messages.
    let started = Instant::now();
    for round in 0..2 {
        let text = format!("burst {round}");
        let posts = chats[..3]
            .iter()
            .map(|chat| post_message(side.addr, chat, token, &text));
        for (status, _) in futures_util::future::join_all(posts).await {
            assert_eq!(status, 200);
        }
        for chat in &chats[..3] {
            wait_idle(&pg, chat).await;
        }
    }
    let mut peak_bytes = 0.0f64;
    // Fast subscribers: everything, in order, soon after coderd finished. When one turn is
    // larger than the ring (the 8 KiB variant), a subscriber woken for messages that were
    // trimmed before it pulled them is closed with `dropped messages` instead of silently
    // missing them; it reconnects with its newest id, as clients do, and gets the rest.
    for (n, (s, chat)) in fast.iter_mut().zip(&chats[..3]).enumerate() {
        let ids = db_ids(&pg, chat).await;
        let got = until_last(s, &ids).await;
        let mut held = message_ids(&got);
        if held.last() != ids.last() {
            assert!(
                per_chat_bytes < 16384,
                "fast subscriber {n} closed under roomy limits"
            );
            catch_up(side.addr, chat, token, &mut held, &ids).await;
        } else {
            let parts = got.iter().filter(|e| e["type"] == "message_part").count();
            assert_eq!(parts, 1200, "fast subscriber {n} got every part");
        }
        assert_eq!(held, ids, "fast subscriber {n}");
        peak_bytes = peak_bytes.max(metric(admin, "chatcache_bytes_held").await);
    }
    let fast_done = started.elapsed();
    // Slow subscribers: read with a pause per frame; closed for lag at worst, then catch up.
    for (n, (s, chat)) in slow.iter_mut().zip(&chats[..3]).enumerate() {
        let ids = db_ids(&pg, chat).await;
        let mut held: Vec<i64> = Vec::new();
        let deadline = Instant::now() + WAIT;
        loop {
            match tokio::time::timeout(Duration::from_secs(5), s.ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) => {
                    held.extend(message_ids(&decode_frame(t.as_str())));
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                Ok(Some(Ok(_))) => {}
                _ => break,
            }
            if held.last() == ids.last() || Instant::now() > deadline {
                break;
            }
        }
        if held.last() != ids.last() {
            // Closed for being slow: reconnect with the newest id held, as clients do.
            catch_up(side.addr, chat, token, &mut held, &ids).await;
        }
        assert_eq!(held, ids, "slow subscriber {n}");
    }
    // The stalled sockets hold what their buffers take; they are closed only when their
    // queue overflows or a write stalls for 10 s, neither of which has to happen here.
    let overflow = metric(admin, "chatcache_overflow_closes_total").await;

    // Memory: each ring within its limit while all are active.
    let chats_held = metric(admin, "chatcache_chats_held").await;
    let bytes = metric(admin, "chatcache_bytes_held").await;
    peak_bytes = peak_bytes.max(bytes);
    // A ring keeps its newest message even when that one alone is over the byte limit (a
    // 600-part answer is ~12 KiB), so allow one such message per chat.
    assert!(
        peak_bytes <= chats_held.max(3.0) * (PER_CHAT_BYTES + 16384) as f64,
        "{peak_bytes} bytes over {chats_held} chats"
    );
    // The followed chats leave; one more turn on a followed chat enforces the global budget
    // by evicting idle chats.
    drop(fast);
    drop(slow);
    drop(stalled);
    let mut last = subscribe(side.addr, &chats[0], 0, token).await;
    post_message(side.addr, &chats[0], token, "after the others left").await;
    wait_idle(&pg, &chats[0]).await;
    let ids = db_ids(&pg, &chats[0]).await;
    let got = until_last(&mut last, &ids).await;
    assert_eq!(message_ids(&got), ids);
    let bytes = metric(admin, "chatcache_bytes_held").await;
    let evictions = metric(admin, "chatcache_evictions_total").await;
    eprintln!(
        "tight limits: fast subscribers done after {fast_done:?}; peak bytes held {peak_bytes}; \
         overflow closes {overflow}; evictions {evictions}; bytes held at the end {bytes}; \
         chatcache VmHWM {} kB",
        vm_hwm_kb(side.child.id())
    );
    assert!(evictions >= 1.0, "no idle chat was evicted");
    assert!(
        bytes <= MAX_BYTES.max(PER_CHAT_BYTES) as f64,
        "{bytes} bytes held over the budget"
    );
    // Every chat, evicted or not, is still served exactly.
    for chat in &chats {
        history_exact(side.addr, &pg, chat, token).await;
    }
}

/// Reconnects after the newest id in `held`, as clients do, and appends the rest of `ids`.
async fn catch_up(addr: SocketAddr, chat: &str, token: &str, held: &mut Vec<i64>, ids: &[i64]) {
    let after = held.last().copied().unwrap_or(0);
    let mut again = subscribe(addr, chat, after, token).await;
    held.extend(message_ids(&until_last(&mut again, ids).await));
}

// ---------------------------------------------------------------------------------------------
// Regression tests of defects this suite found (tests/RELIABILITY.md, "Defects found"); each
// failed before its fix.
// ---------------------------------------------------------------------------------------------

/// A turn whose assistant message alone exceeds `max_bytes_per_chat` trims the tool-call
/// messages inserted just before it, before subscribers pull them. No subscriber may lose
/// them silently: it is closed and catches up after reconnecting (this was a silent loss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_trim_never_drops_a_message_a_subscriber_has_not_pulled() {
    tight_limits(8192, 24576).await;
}
