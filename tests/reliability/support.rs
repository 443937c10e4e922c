//! Harness additions for the reliability suite: chatload runs, seed files, process and
//! Postgres figures, and the LISTEN connection's kill switch.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::common::*;

pub const WAIT: Duration = Duration::from_secs(20);

pub fn long_tests() -> bool {
    std::env::var("CHATCACHE_LONG_TESTS").is_ok_and(|v| v == "1")
}

/// A chatload run in the background; killed if dropped before it ends.
pub struct Load {
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

pub fn start_load(db: &Scratch, seed: &std::path::Path, targets: &[&Proc], args: &[&str]) -> Load {
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
    pub fn running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// Waits for the run to end (bounded) and returns its exit code and report.
    pub async fn finish(mut self, limit: Duration) -> (i32, Value) {
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
pub fn assert_no_loss(report: &Value, what: &str) {
    for key in ["lost", "duplicated", "out_of_order", "foreign"] {
        assert_eq!(report[key], 0, "{what}: {key} in {report:#}");
    }
    assert!(
        report["messages"].as_u64().unwrap() > 0,
        "{what}: no messages"
    );
}

/// Peak resident memory of a process (kB), from /proc.
pub fn vm_hwm_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Postgres connections to this test's database.
pub async fn pg_connections(pg: &tokio_postgres::Client) -> i64 {
    pg.query_one(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
        &[],
    )
    .await
    .unwrap()
    .get(0)
}

/// Every database read chatcache made, over all reasons.
pub async fn chatcache_reads(admin: SocketAddr) -> f64 {
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

pub async fn sim_reads(sim: SocketAddr) -> f64 {
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

pub async fn kill_listen(pg: &tokio_postgres::Client) -> usize {
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
pub async fn fill_chats(pg: &tokio_postgres::Client, chats: &[String], n: i32) {
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
