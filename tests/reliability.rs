//! Reliability under faults and load: the LISTEN connection killed over and over, a coderd
//! replica and the sidecar itself killed mid-turn and restarted on the same port, reconnect
//! storms, slow and stalled consumers next to fast ones under tight memory limits, edits racing
//! new messages, and two replicas publishing into one chat at once. Each fault is followed by
//! chatload's no-loss check or an exact comparison with Postgres.
//!
//! Long variants (5,000 subscribers; a Postgres restart) run only with
//! `CHATCACHE_LONG_TESTS=1`; their figures are in `tests/RELIABILITY.md`.

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

const WAIT: Duration = Duration::from_secs(20);

fn long_tests() -> bool {
    std::env::var("CHATCACHE_LONG_TESTS").is_ok_and(|v| v == "1")
}

// ---------------------------------------------------------------------------------------------
// Harness additions: chatload runs, processes on fixed ports, process figures.
// ---------------------------------------------------------------------------------------------

/// Seeds users and chats and keeps the seed file for chatload.
fn seed_file(db: &Scratch, users: usize, chats_per_user: usize) -> (PathBuf, Vec<User>) {
    let out = std::env::temp_dir().join(format!("{}.reliability.seed.json", db.name));
    run_sim(&[
        "seed",
        "--database-url",
        &db.url,
        "--users",
        &users.to_string(),
        "--chats-per-user",
        &chats_per_user.to_string(),
        "--out",
        out.to_str().unwrap(),
    ]);
    let v: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let users = v["users"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| User {
            id: u["id"].as_str().unwrap().into(),
            token: u["token"].as_str().unwrap().into(),
            chats: u["chats"]
                .as_array()
                .unwrap()
                .iter()
                .map(|c| c.as_str().unwrap().into())
                .collect(),
        })
        .collect();
    (out, users)
}

/// A chatload run in the background; killed if dropped before it ends.
struct Load {
    child: Child,
    json: PathBuf,
    log: PathBuf,
}

impl Drop for Load {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_load(db: &Scratch, seed: &std::path::Path, targets: &[&Proc], args: &[&str]) -> Load {
    let mut bin = sim_bin();
    bin.set_file_name("chatload");
    let json =
        std::env::temp_dir().join(format!("{}.{:x}.load.json", db.name, rand::random::<u32>()));
    let log = json.with_extension("log");
    let targets: Vec<String> = targets.iter().map(|p| p.base()).collect();
    let child = Command::new(bin)
        .args(["run", "--targets", &targets.join(",")])
        .args(["--seed-file", seed.to_str().unwrap()])
        .args(["--database-url", &db.url])
        .args(["--json", json.to_str().unwrap()])
        .args(args)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("spawn chatload");
    Load { child, json, log }
}

impl Load {
    fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the run to end (bounded) and returns its exit code and report.
    async fn finish(mut self, limit: Duration) -> (i32, Value) {
        let deadline = Instant::now() + limit;
        while self.running() {
            assert!(
                Instant::now() < deadline,
                "chatload did not finish in {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let code = self.child.wait().unwrap().code().unwrap_or(-1);
        let report = std::fs::read(&self.json)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_else(|| {
                let log = std::fs::read_to_string(&self.log).unwrap_or_default();
                panic!("chatload wrote no report (exit {code}):\n{log}")
            });
        (code, report)
    }
}

/// The no-loss promise: nothing lost, duplicated, reordered or foreign.
fn assert_no_loss(report: &Value, what: &str) {
    for key in ["lost", "duplicated", "out_of_order", "foreign"] {
        assert_eq!(report[key], 0, "{what}: {key} in {report:#}");
    }
    assert!(
        report["messages"].as_u64().unwrap() > 0,
        "{what}: no messages"
    );
}

/// Peak resident memory of a process (kB), from /proc.
fn vm_hwm_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Postgres connections to this test's database.
async fn pg_connections(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Every database read chatcache made, over all reasons.
async fn chatcache_reads(admin: SocketAddr) -> f64 {
    let (_, _, body) = http(admin, "GET", "/metrics", &[], "").await;
    let text = String::from_utf8_lossy(&body);
    ["repair", "refresh", "below_floor", "reload"]
        .iter()
        .map(|r| {
            metric_in(
                &text,
                &format!("chatcache_db_reads_total{{reason=\"{r}\"}}"),
            )
        })
        .sum()
}

async fn sim_reads(sim: SocketAddr) -> f64 {
    let (_, _, body) = http(sim, "GET", "/metrics", &[], "").await;
    let text = String::from_utf8_lossy(&body);
    ["stream_snapshot", "stream_notify", "rest"]
        .iter()
        .map(|c| {
            metric_in(
                &text,
                &format!("coderd_sim_message_reads_total{{caller=\"{c}\"}}"),
            )
        })
        .sum()
}

async fn kill_listen(pg: &tokio_postgres::Client) -> usize {
    pg.query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'chatcache-listen' AND datname = current_database()",
        &[],
    )
    .await
    .unwrap()
    .len()
}

/// Gives every chat `n` visible messages, written directly (fast setup for big tests).
async fn fill_chats(pg: &tokio_postgres::Client, chats: &[String], n: i32) {
    for chat in chats {
        let chat: uuid::Uuid = chat.parse().unwrap();
        pg.execute(
            "INSERT INTO chat_messages (chat_id, role, content) SELECT $1, \
             (CASE WHEN g % 2 = 1 THEN 'user' ELSE 'assistant' END)::chat_message_role, \
             jsonb_build_array(jsonb_build_object('type', 'text', 'text', \
             'message ' || g || ' ' || repeat('x', 40))) FROM generate_series(1, $2) g",
            &[&chat, &n],
        )
        .await
        .unwrap();
    }
}

/// A fresh subscriber through `addr` receives exactly Postgres's visible history.
async fn history_exact(addr: SocketAddr, pg: &tokio_postgres::Client, chat: &str, token: &str) {
    let ids = db_ids(pg, chat).await;
    let mut s = subscribe(addr, chat, 0, token).await;
    let got = s
        .until(WAIT, |ev| message_ids(ev).last() == ids.last())
        .await;
    assert_eq!(message_ids(&got), ids, "history of {chat} through {addr}");
}

// ---------------------------------------------------------------------------------------------
// Faults during chatload runs.
// ---------------------------------------------------------------------------------------------

/// chatcache's LISTEN connection is terminated every 150 ms while chatload drives chats
/// (with edits) through the sidecar: zero lost, nothing reordered or foreign, every turn
/// completes, and every kill is followed by a reconnect. (A reconnect in the middle of a turn
/// also replays history that did not change, which chatload counts as duplicates: see
/// `listen_reconnect_sends_no_message_twice` among the known defects.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_killed_repeatedly_during_a_load_run_loses_nothing() {
    let db = Scratch::new().await;
    let (seed, _) = seed_file(&db, 2, 3);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "10", "--turn-parts", "5"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let admin = side.admin.unwrap();
    let pg = db.client().await;
    let mut load = start_load(
        &db,
        &seed,
        &[&side],
        &[
            "--turns",
            "20",
            "--subscribers-per-chat",
            "3",
            "--edit-every",
            "3",
        ],
    );
    let mut kills = 0;
    while load.running() && kills < 60 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        kills += kill_listen(&pg).await;
    }
    let (code, report) = load.finish(Duration::from_secs(120)).await;
    eprintln!("LISTEN killed {kills} times; exit {code}; report {report}");
    for key in ["lost", "out_of_order", "foreign", "failed_turns"] {
        assert_eq!(report[key], 0, "{key} in {report:#}");
    }
    assert!(kills >= 5, "only {kills} kills landed during the run");
    assert!(metric(admin, "chatcache_listen_reconnects_total").await >= 5.0);
}

/// A coderd replica behind a sidecar is SIGKILLed mid-run and restarted on the same port a
/// second later, while chatload drives chats over two replicas with reconnects each turn.
/// Turns sent to the dead replica may fail; no subscriber may lose a message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn coderd_replica_killed_and_restarted_mid_turn_loses_nothing() {
    let db = Scratch::new().await;
    let (seed, users) = seed_file(&db, 2, 2);
    // The worker runs on b only: a turn claimed by a killed worker stays claimed for minutes,
    // as in coderd, which is not what this test is about.
    let a_args = ["--worker", "off", "--part-delay-ms", "10"];
    let addr_a = free_addr();
    let mut sim_a = start_sim_at(&db, "a", addr_a, &a_args).await;
    let sim_b = start_sim(&db, "b", &["--part-delay-ms", "10"]).await;
    let side_a = start_sidecar(&db, addr_a, "").await;
    let side_b = start_sidecar(&db, sim_b.addr, "").await;
    let mut load = start_load(
        &db,
        &seed,
        &[&side_a, &side_b],
        &[
            "--turns",
            "16",
            "--subscribers-per-chat",
            "3",
            "--reconnect-each-turn",
            // Generous: a turn spanning the kill must not time out on a busy 2-core machine
            // (a timeout counts the missing messages as lost).
            "--turn-timeout-ms",
            "20000",
        ],
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(load.running(), "chatload ended before the fault");
    sim_a.signal(9);
    let _ = sim_a.child.wait();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    sim_a.child = spawn_sim_at(&db, "a", addr_a, &a_args);
    wait_port(addr_a).await;
    let (code, report) = load.finish(Duration::from_secs(150)).await;
    eprintln!("replica restart: exit {code}, report {report}");
    assert_no_loss(&report, "replica restart");
    assert!(report["reconnects"].as_u64().unwrap() > 0);

    // Both sidecars serve every chat exactly afterwards.
    let pg = db.client().await;
    for user in &users {
        for chat in &user.chats {
            wait_idle(&pg, chat).await;
            history_exact(side_a.addr, &pg, chat, &user.token).await;
            history_exact(side_b.addr, &pg, chat, &user.token).await;
        }
    }
}

/// The sidecar itself is SIGKILLed mid-run and a new one starts on the same port. chatload
/// runs over that sidecar and a second one in front of the same coderd, with reconnects after
/// every turn, so subscribers come back through the new process with their after_id (and
/// turns keep running through the other sidecar meanwhile): nothing lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_killed_and_replaced_mid_turn_loses_nothing() {
    let db = Scratch::new().await;
    let (seed, users) = seed_file(&db, 2, 2);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "20", "--turn-parts", "5"]).await;
    let addr = free_addr();
    let mut side = start_sidecar_at(&db, sim.addr, "", addr).await;
    let other = start_sidecar(&db, sim.addr, "").await;
    let mut load = start_load(
        &db,
        &seed,
        &[&side, &other],
        &[
            "--turns",
            "16",
            "--subscribers-per-chat",
            "3",
            "--reconnect-each-turn",
            // Generous: a turn spanning the kill must not time out on a busy 2-core machine
            // (a timeout counts the missing messages as lost).
            "--turn-timeout-ms",
            "20000",
        ],
    );
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(load.running(), "chatload ended before the fault");
    side.signal(9);
    let _ = side.child.wait();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let side = start_sidecar_at(&db, sim.addr, "", addr).await;
    let (code, report) = load.finish(Duration::from_secs(150)).await;
    let served = metric(
        side.admin.unwrap(),
        "chatcache_catchup_total{result=\"hit\"}",
    )
    .await;
    eprintln!(
        "sidecar restart: exit {code}, new process served {served} catch-ups, report {report}"
    );
    assert_no_loss(&report, "sidecar restart");
    assert!(
        served > 0.0,
        "no subscriber came back through the new sidecar"
    );
    let pg = db.client().await;
    for user in &users {
        for chat in &user.chats {
            history_exact(side.addr, &pg, chat, &user.token).await;
        }
    }
}

/// Edits race new messages and catch-ups: chatload over two replicas, each behind a sidecar,
/// with an edit every second turn and every subscriber reconnecting after every turn.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_racing_messages_and_catch_ups_lose_nothing() {
    let db = Scratch::new().await;
    let (seed, _) = seed_file(&db, 2, 2);
    let sim_a = start_sim(&db, "a", &["--part-delay-ms", "5"]).await;
    let sim_b = start_sim(&db, "b", &["--part-delay-ms", "5"]).await;
    let side_a = start_sidecar(&db, sim_a.addr, "").await;
    let side_b = start_sidecar(&db, sim_b.addr, "").await;
    let load = start_load(
        &db,
        &seed,
        &[&side_a, &side_b],
        &[
            "--turns",
            "8",
            "--subscribers-per-chat",
            "4",
            "--reconnect-each-turn",
            "--edit-every",
            "2",
        ],
    );
    let (code, report) = load.finish(Duration::from_secs(120)).await;
    eprintln!("edits racing: report {report}");
    assert_no_loss(&report, "edits racing");
    assert_eq!(code, 0, "{report:#}");
    let refreshes = metric(side_a.admin.unwrap(), "chatcache_full_refreshes_total").await
        + metric(side_b.admin.unwrap(), "chatcache_full_refreshes_total").await;
    assert!(
        refreshes >= 8.0,
        "edits did not reach the sidecars ({refreshes})"
    );
}

/// Two replicas publish into one chat at the same moment, over and over (posts through both
/// sidecars at once, so turns queue and are promoted by either replica's worker): every
/// subscriber on either sidecar holds exactly Postgres's history, in order, without repeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_publishing_into_one_chat_at_once() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim_a = start_sim(&db, "a", &["--part-delay-ms", "2", "--turn-parts", "3"]).await;
    let sim_b = start_sim(&db, "b", &["--part-delay-ms", "2", "--turn-parts", "3"]).await;
    let side_a = start_sidecar(&db, sim_a.addr, "").await;
    let side_b = start_sidecar(&db, sim_b.addr, "").await;
    let pg = db.client().await;
    let mut subs = Vec::new();
    for addr in [side_a.addr, side_b.addr, side_a.addr, side_b.addr] {
        subs.push(subscribe(addr, chat, 0, token).await);
    }
    for round in 0..4 {
        let posts = (0..6).map(|i| {
            let addr = if i % 2 == 0 { side_a.addr } else { side_b.addr };
            async move { post_message(addr, chat, token, &format!("round {round} post {i}")).await }
        });
        for (status, body) in futures_util::future::join_all(posts).await {
            assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        }
        wait_idle(&pg, chat).await;
    }
    let ids = db_ids(&pg, chat).await;
    assert!(ids.len() >= 24 * 2, "{} messages", ids.len());
    for (n, s) in subs.iter_mut().enumerate() {
        let got = s
            .until(WAIT, |ev| message_ids(ev).last() == ids.last())
            .await;
        assert_eq!(message_ids(&got), ids, "subscriber {n}");
    }
    for side in [&side_a, &side_b] {
        history_exact(side.addr, &pg, chat, token).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Reconnect storms.
// ---------------------------------------------------------------------------------------------

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
    };
    eprintln!(
        "storm: {} subscribers over {chat_count} chats in {total:?} ({retries} connects \
         retried); catch-up p50 {:?} p99 {:?}; db reads chatcache {} sim {}; peak pg \
         connections {}; chatcache VmHWM {} kB",
        figures.subscribers,
        figures.catch_up_p50,
        figures.catch_up_p99,
        figures.chatcache_reads,
        figures.sim_reads,
        figures.peak_pg_connections,
        figures.vm_hwm_kb
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

// ---------------------------------------------------------------------------------------------
// Slow, stalled and fast consumers under tight limits.
// ---------------------------------------------------------------------------------------------

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
        let got = s
            .until(WAIT, |ev| message_ids(ev).last() == ids.last())
            .await;
        let mut held = message_ids(&got);
        if held.last() != ids.last() {
            assert!(
                per_chat_bytes < 16384,
                "fast subscriber {n} closed under roomy limits"
            );
            let after = held.last().copied().unwrap_or(0);
            let mut again = subscribe(side.addr, chat, after, token).await;
            let rest = again
                .until(WAIT, |ev| message_ids(ev).last() == ids.last())
                .await;
            held.extend(message_ids(&rest));
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
            let after = held.last().copied().unwrap_or(0);
            let mut again = subscribe(side.addr, chat, after, token).await;
            let rest = again
                .until(WAIT, |ev| message_ids(ev).last() == ids.last())
                .await;
            held.extend(message_ids(&rest));
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
    let got = last
        .until(WAIT, |ev| message_ids(ev).last() == ids.last())
        .await;
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

// ---------------------------------------------------------------------------------------------
// Postgres restart (long variant only: it restarts the shared server).
// ---------------------------------------------------------------------------------------------

/// Restarts the local Postgres under a running chatload. Runs only with
/// `CHATCACHE_LONG_TESTS=1`, and refuses to run when another client of Postgres is connected
/// to any database but its own, since other tests would be broken by the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_postgres_restart_during_a_load_run() {
    if !long_tests() {
        return;
    }
    let db = Scratch::new().await;
    let (seed, users) = seed_file(&db, 2, 2);
    let admin_pg = connect(&format!("{PG}/postgres")).await;
    let others: i64 = admin_pg
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' \
             AND datname IS NOT NULL AND datname NOT IN ($1, 'postgres')",
            &[&db.name],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        others, 0,
        "other clients use Postgres: not restarting it under them"
    );
    drop(admin_pg);
    let sim = start_sim(&db, "a", &["--part-delay-ms", "20"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let admin = side.admin.unwrap();
    let mut load = start_load(
        &db,
        &seed,
        &[&side],
        &[
            "--turns",
            "30",
            "--subscribers-per-chat",
            "3",
            "--turn-timeout-ms",
            "15000",
        ],
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(load.running(), "chatload ended before the fault");
    let cluster = std::fs::read_dir("/etc/postgresql")
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .file_name();
    let status = Command::new("pg_ctlcluster")
        .args([
            "--skip-systemctl-redirect",
            cluster.to_str().unwrap(),
            "main",
            "restart",
        ])
        .status()
        .unwrap();
    assert!(status.success());
    let (code, report) = load.finish(Duration::from_secs(300)).await;
    eprintln!(
        "postgres restart: exit {code}; report {report}; listen reconnects {}; fail-opens {}",
        metric(admin, "chatcache_listen_reconnects_total").await,
        metric(admin, "chatcache_fail_open_total{reason=\"listen_down\"}").await
    );
    // Duplicates are the replay of defect `listen_reconnect_sends_no_message_twice`.
    for key in ["lost", "out_of_order", "foreign", "failed_turns"] {
        assert_eq!(report[key], 0, "{key} in {report:#}");
    }
    let pg = db.client().await;
    for user in &users {
        for chat in &user.chats {
            wait_idle(&pg, chat).await;
            history_exact(side.addr, &pg, chat, &user.token).await;
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Known defects: each test states the correct behaviour and fails until chatcache is fixed.
// ---------------------------------------------------------------------------------------------

/// After an edit coderd resends the chat's whole visible history. When the chat has more
/// messages than `cache.max_messages_per_chat`, the refresh read is trimmed to the ring and
/// only the ring (the newest messages) is replayed, so clients that restart their view on a
/// replay, as coderd's clients do, lose the older messages.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_replays_the_whole_history_of_a_chat_over_the_ring_limit() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, "[cache]\nmax_messages_per_chat = 4\n").await;
    let pg = db.client().await;
    for t in 0..4 {
        post_message(sim.addr, chat, token, &format!("t{t}")).await;
        wait_idle(&pg, chat).await;
    }
    let before = db_ids(&pg, chat).await;
    let mut direct = subscribe(sim.addr, chat, *before.last().unwrap(), token).await;
    let mut cached = subscribe(side.addr, chat, *before.last().unwrap(), token).await;
    direct.events_for(Duration::from_millis(300)).await;
    cached.events_for(Duration::from_millis(300)).await;

    // Edit the newest user message: history is rewritten and replayed.
    let edited = before[before.len() - 2];
    let body = serde_json::json!({"content": [{"type": "text", "text": "edited"}]}).to_string();
    let path = format!("/api/experimental/chats/{chat}/messages/{edited}");
    let (status, _, _) = http(
        side.addr,
        "PATCH",
        &path,
        &[("Coder-Session-Token", token)],
        &body,
    )
    .await;
    assert_eq!(status, 200);
    wait_idle(&pg, chat).await;
    let after = db_ids(&pg, chat).await;
    let want = direct
        .until(WAIT, |ev| message_ids(ev).last() == after.last())
        .await;
    let got = cached
        .until(WAIT, |ev| message_ids(ev).last() == after.last())
        .await;
    // The replay starts at the first visible message.
    let replay = |ev: &[Value]| {
        let ids = message_ids(ev);
        let start = ids.iter().rposition(|&id| id == after[0]);
        start.map(|s| ids[s..].to_vec())
    };
    assert_eq!(
        replay(&want),
        Some(after.clone()),
        "coderd replays everything"
    );
    assert_eq!(replay(&got), Some(after), "chatcache replays everything");
}

/// A LISTEN reconnect reloads every chat. When the reload finds a message the ring does not
/// hold yet (committed by another replica, its notify still to come), `finish_refresh` takes
/// the longer history for a rewritten one and replays the whole chat to every subscriber,
/// which then receives every message it already holds a second time (chatload counts these as
/// duplicates; in a load run with LISTEN kills they are thousands). Nothing was edited: the
/// subscriber must get only the new message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_reconnect_sends_no_message_twice() {
    let db = Scratch::new().await;
    let users = seed(&db, 1, 1);
    let (token, chat) = (users[0].token.as_str(), users[0].chats[0].as_str());
    let sim = start_sim(&db, "a", &["--part-delay-ms", "1", "--turn-parts", "2"]).await;
    let side = start_sidecar(&db, sim.addr, "").await;
    let admin = side.admin.unwrap();
    let pg = db.client().await;
    post_message(side.addr, chat, token, "before").await;
    wait_idle(&pg, chat).await;
    let mut s = subscribe(side.addr, chat, 0, token).await;
    let mut seen = s.events_for(Duration::from_millis(300)).await;

    // Another replica commits a message; its notify has not arrived when LISTEN drops.
    let chat_uuid: uuid::Uuid = chat.parse().unwrap();
    pg.execute(
        "INSERT INTO chat_messages (chat_id, role, content) VALUES ($1, 'user', \
         '[{\"type\":\"text\",\"text\":\"from replica b\"}]'::jsonb)",
        &[&chat_uuid],
    )
    .await
    .unwrap();
    assert_eq!(kill_listen(&pg).await, 1);
    let deadline = Instant::now() + WAIT;
    while metric(admin, "chatcache_listen_reconnects_total").await < 1.0 {
        assert!(Instant::now() < deadline, "LISTEN never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let ids = db_ids(&pg, chat).await;
    seen.extend(
        s.until(WAIT, |ev| message_ids(ev).last() == ids.last())
            .await,
    );
    seen.extend(s.events_for(Duration::from_millis(300)).await);
    assert_eq!(
        message_ids(&seen),
        ids,
        "each message exactly once, in order"
    );
}

/// A turn whose assistant message alone exceeds `max_bytes_per_chat` trims the tool-call
/// messages inserted just before it, before subscribers pull them. No subscriber may lose
/// them silently: it is closed and catches up after reconnecting (this was a silent loss).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ring_trim_never_drops_a_message_a_subscriber_has_not_pulled() {
    tight_limits(8192, 24576).await;
}
