//! Reconnect storms: hundreds (or, in the long variant, thousands) of subscribers drop and
//! reconnect at once with a cursor in the middle of the history, served from memory.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::support::*;

/// Subscribes like a client does in a storm: a connection refused or reset (the listen queue
/// overflowing) is retried after 50 ms, up to 100 times; refusals by the server are not.
async fn subscribe_retrying(addr: SocketAddr, chat: &str, after: i64, token: &str) -> Sub {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    for attempt in 0.. {
        let url = format!("ws://{addr}/api/experimental/chats/{chat}/stream?after_id={after}");
        let mut req = url.into_client_request().unwrap();
        req.headers_mut()
            .insert("Coder-Session-Token", token.parse().unwrap());
        match tokio_tungstenite::connect_async(req).await {
            Ok((ws, _)) => {
                if attempt > 0 {
                    STORM_RETRIES.fetch_add(attempt, std::sync::atomic::Ordering::Relaxed);
                }
                return Sub {
                    ws,
                    framing: "envelope",
                    frames: Vec::new(),
                };
            }
            Err(tokio_tungstenite::tungstenite::Error::Io(_)) if attempt < 100 => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("subscribe {chat}: {e}"),
        }
    }
    unreachable!()
}

/// Connection attempts the storm's clients had to repeat.
static STORM_RETRIES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct StormFigures {
    subscribers: usize,
    catch_up_p50: Duration,
    catch_up_p99: Duration,
    chatcache_reads: f64,
    sim_reads: f64,
    peak_pg_connections: i64,
    vm_hwm_kb: u64,
    /// Authorization probes chatcache sent coderd over the whole test.
    authz_probes: f64,
}

/// `per_chat` subscribers on each of `chats` chats connect, then all of them drop and
/// reconnect at once with after_id in the middle of the history. Every subscriber must get
/// exactly the messages after its cursor; the storm must read nothing from Postgres.
async fn reconnect_storm(chat_count: usize, per_chat: usize, messages: i32) -> StormFigures {
    let db = Scratch::new().await;
    let users = seed(&db, chat_count.div_ceil(10), 10.min(chat_count));
    let chats: Vec<(String, String)> = users
        .iter()
        .flat_map(|u| u.chats.iter().map(|c| (c.clone(), u.token.clone())))
        .take(chat_count)
        .collect();
    let pg = db.client().await;
    let chat_ids: Vec<String> = chats.iter().map(|c| c.0.clone()).collect();
    fill_chats(&pg, &chat_ids, messages).await;
    let sim = start_sim(&db, "a", &["--worker", "off"]).await;
    let side = start_sidecar(&db, sim.addr, "[db]\npool_max_size = 4\n").await;
    let admin = side.admin.unwrap();
    let mut histories = Vec::new();
    for (chat, _) in &chats {
        histories.push(db_ids(&pg, chat).await);
    }

    // Warm: every subscriber connects from 0 (a bounded number at a time).
    let connect_all = |after: &dyn Fn(&[i64]) -> i64| {
        let jobs: Vec<(SocketAddr, String, String, i64, Vec<i64>)> = chats
            .iter()
            .zip(&histories)
            .flat_map(|((chat, token), ids)| {
                let a = after(ids);
                let want: Vec<i64> = ids.iter().copied().filter(|&id| id > a).collect();
                (0..per_chat)
                    .map(move |_| (side.addr, chat.clone(), token.clone(), a, want.clone()))
            })
            .collect();
        jobs
    };
    let run = |jobs: Vec<(SocketAddr, String, String, i64, Vec<i64>)>| async move {
        let started = Instant::now();
        let tasks = jobs.into_iter().map(|(addr, chat, token, after, want)| {
            tokio::spawn(async move {
                let t = Instant::now();
                let mut s = subscribe_retrying(addr, &chat, after, &token).await;
                let got = s
                    .until(WAIT, |ev| {
                        message_ids(ev).last() == want.last() && !ev.is_empty()
                    })
                    .await;
                let took = t.elapsed();
                assert_eq!(message_ids(&got), want, "{chat} after {after}");
                (took, s)
            })
        });
        let results = futures_util::future::join_all(tasks).await;
        let mut subs = Vec::new();
        let mut times = Vec::new();
        for r in results {
            let (took, s) = r.expect("subscriber task");
            times.push(took);
            subs.push(s);
        }
        (started.elapsed(), times, subs)
    };
    let (_, _, warm) = run(connect_all(&|_| 0)).await;
    let reads_before = chatcache_reads(admin).await;
    let sim_before = sim_reads(sim.addr).await;

    // The storm: every socket closes, then all reconnect at once.
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicI64::new(0));
    let watcher = {
        let peak = peak.clone();
        let url = db.url.clone();
        tokio::spawn(async move {
            let pg = connect(&url).await;
            loop {
                let n = pg_connections(&pg).await;
                peak.fetch_max(n, std::sync::atomic::Ordering::Relaxed);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    drop(warm);
    let retries_before = STORM_RETRIES.load(std::sync::atomic::Ordering::Relaxed);
    let (total, mut times, storm) = run(connect_all(&|ids: &[i64]| ids[ids.len() / 2])).await;
    let retries = STORM_RETRIES.load(std::sync::atomic::Ordering::Relaxed) - retries_before;
    watcher.abort();
    times.sort();
    let pct = |q: f64| times[((times.len() as f64 * q).ceil() as usize).saturating_sub(1)];
    let figures = StormFigures {
        subscribers: storm.len(),
        catch_up_p50: pct(0.5),
        catch_up_p99: pct(0.99),
        chatcache_reads: chatcache_reads(admin).await - reads_before,
        sim_reads: sim_reads(sim.addr).await - sim_before,
        peak_pg_connections: peak.load(std::sync::atomic::Ordering::Relaxed),
        vm_hwm_kb: vm_hwm_kb(side.child.id()),
        authz_probes: metric(admin, "chatcache_authz_total{result=\"allowed\"}").await
            + metric(admin, "chatcache_authz_total{result=\"denied\"}").await
            + metric(admin, "chatcache_authz_total{result=\"error\"}").await,
    };
    eprintln!(
        "storm: {} subscribers over {chat_count} chats in {total:?} ({retries} connects \
         retried); catch-up p50 {:?} p99 {:?}; db reads chatcache {} sim {}; peak pg \
         connections {}; chatcache VmHWM {} kB; authz probes {}",
        figures.subscribers,
        figures.catch_up_p50,
        figures.catch_up_p99,
        figures.chatcache_reads,
        figures.sim_reads,
        figures.peak_pg_connections,
        figures.vm_hwm_kb,
        figures.authz_probes
    );
    // Subscribers of one chat with one token share a probe: one per chat while warming and at
    // most one more in the storm (once `authz.ttl_ms` has passed), not one per subscriber.
    assert!(
        figures.authz_probes <= (2 * chat_count) as f64,
        "{} probes for {chat_count} chats",
        figures.authz_probes
    );
    assert_eq!(
        metric(admin, "chatcache_subscribers").await as usize,
        chat_count * per_chat
    );
    drop(storm);
    figures
}

/// 500 subscribers over 50 chats reconnect at once: all served exactly, from memory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_storm_is_served_from_memory() {
    let f = reconnect_storm(50, 10, 30).await;
    assert_eq!(f.subscribers, 500);
    assert_eq!(
        f.chatcache_reads, 0.0,
        "the storm read Postgres through chatcache"
    );
    assert_eq!(f.sim_reads, 0.0, "the storm reached coderd's reads");
    assert!(
        f.catch_up_p99 < Duration::from_secs(5),
        "p99 {:?}",
        f.catch_up_p99
    );
}

/// The long storm: 5,000 subscribers over 200 chats. Figures go to tests/RELIABILITY.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_reconnect_storm_of_5000_subscribers() {
    if !long_tests() {
        return;
    }
    let f = reconnect_storm(200, 25, 40).await;
    assert_eq!(f.subscribers, 5000);
    assert_eq!(f.chatcache_reads, 0.0);
    assert_eq!(f.sim_reads, 0.0);
}
