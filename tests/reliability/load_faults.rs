//! Faults during chatload runs: the LISTEN connection killed over and over, a coderd replica
//! and the sidecar itself killed mid-turn and restarted on the same port, edits racing new
//! messages, and two replicas publishing into one chat at once.

use std::time::Duration;

use crate::common::*;
use crate::support::*;

/// chatload's arguments for a run with a process killed in the middle: reconnects after every
/// turn, and a generous turn timeout, since a turn spanning the kill must not time out on a
/// busy 2-core machine (a timeout counts the missing messages as lost).
const RESTART_RUN: &[&str] = &[
    "--turns",
    "16",
    "--subscribers-per-chat",
    "3",
    "--reconnect-each-turn",
    "--turn-timeout-ms",
    "20000",
];

/// SIGKILLs `victim` 800 ms into the chatload run and reaps it.
async fn kill_mid_run(load: &mut Load, victim: &mut Proc) {
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(load.running(), "chatload ended before the fault");
    victim.signal(9);
    let _ = victim.child.wait();
}

/// chatcache's LISTEN connection is terminated every 150 ms while chatload drives chats
/// (with edits) through the sidecar: zero lost, nothing reordered or foreign, every turn
/// completes, nothing is delivered twice (a reconnect once replayed unchanged history: defect
/// 6), and every kill is followed by a reconnect.
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
    for key in [
        "lost",
        "duplicated",
        "out_of_order",
        "foreign",
        "failed_turns",
    ] {
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
    let mut load = start_load(&db, &seed, &[&side_a, &side_b], RESTART_RUN);
    kill_mid_run(&mut load, &mut sim_a).await;
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
    let mut load = start_load(&db, &seed, &[&side, &other], RESTART_RUN);
    kill_mid_run(&mut load, &mut side).await;
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
        let got = until_last(s, &ids).await;
        assert_eq!(message_ids(&got), ids, "subscriber {n}");
    }
    for side in [&side_a, &side_b] {
        history_exact(side.addr, &pg, chat, token).await;
    }
}
