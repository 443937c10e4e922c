//! Postgres restarted under a running chatload, on a private server of its own.

use std::time::Duration;

use crate::common;
use crate::common::*;
use crate::support::*;

/// Restarts Postgres under a running chatload. The server is a private cluster of this test
/// (`common::private_pg`), so other tests may run alongside: the shared server is never
/// restarted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_restart_during_a_load_run_loses_nothing() {
    let server = common::private_pg::PrivatePg::started();
    let db = server.scratch().await;
    let (seed, users) = seed_file(&db, 2, 2);
    // A turn whose writes the restart cuts leaves its chat `running`; coderd claims such a chat
    // again after 5 minutes without a heartbeat, the sim here after 3 s.
    let sim = start_sim(
        &db,
        "a",
        &["--part-delay-ms", "20", "--stale-chat-ms", "3000"],
    )
    .await;
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
    // pg_ctl stop -m fast, then start: what `pg_ctlcluster restart` did to the shared server.
    tokio::task::block_in_place(|| server.restart());
    let (code, report) = load.finish(Duration::from_secs(300)).await;
    eprintln!(
        "postgres restart: exit {code}; report {report}; listen reconnects {}; fail-opens {}",
        metric(admin, "chatcache_listen_reconnects_total").await,
        metric(admin, "chatcache_fail_open_total{reason=\"listen_down\"}").await
    );
    for key in ["lost", "duplicated", "out_of_order", "foreign"] {
        assert_eq!(report[key], 0, "{key} in {report:#}");
    }
    // coderd answers 500 to a turn whose query the restart cuts (at most the one turn in
    // flight per chat); chatload counts it as failed and goes on.
    let failed = report["failed_turns"].as_u64().unwrap();
    assert!(failed <= users.len() as u64 * 2, "{report:#}");
    let pg = db.client().await;
    for user in &users {
        for chat in &user.chats {
            wait_idle(&pg, chat).await;
            history_exact(side.addr, &pg, chat, &user.token).await;
        }
    }
}
