//! End to end: two coderd-sim replicas on a scratch database, driven and checked by chatload.
//!
//! Needs Postgres on 127.0.0.1:5432 with user `postgres` (override with `CHATLOAD_E2E_ADMIN_URL`).
//! Each test creates its own database and drops it at the end.

use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::Value;

const SIM: &str = env!("CARGO_BIN_EXE_coderd-sim");
const CHATLOAD: &str = env!("CARGO_BIN_EXE_chatload");
const DEFAULT_ADMIN_URL: &str = "postgres://postgres@127.0.0.1:5432/postgres";
/// Upper bound for any one command, so a hung child cannot hang the test suite.
const COMMAND_LIMIT: Duration = Duration::from_secs(50);

/// A database that exists for one test; dropped (with its connections) on drop.
struct ScratchDatabase {
    admin_url: String,
    name: String,
    url: String,
}

impl ScratchDatabase {
    fn create(tag: &str) -> Self {
        let admin_url =
            std::env::var("CHATLOAD_E2E_ADMIN_URL").unwrap_or_else(|_| DEFAULT_ADMIN_URL.into());
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let name = format!("chatload_e2e_{tag}_{}_{nanos}", std::process::id());
        admin(&admin_url, &format!("CREATE DATABASE {name}"));
        let url = format!("{}/{name}", admin_url.rsplit_once('/').unwrap().0);
        ScratchDatabase {
            admin_url,
            name,
            url,
        }
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        admin(
            &self.admin_url,
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

/// Runs one statement on the admin database.
fn admin(url: &str, statement: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("Postgres on 127.0.0.1:5432 (user postgres) is needed for this test");
        let driver = tokio::spawn(connection);
        client.batch_execute(statement).await.unwrap();
        drop(client);
        let _ = driver.await;
    });
}

/// A scratch directory for seed, logs and the report.
struct Workdir(PathBuf);

impl Workdir {
    fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("chatload-e2e-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Workdir(dir)
    }

    fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// A `coderd-sim serve` replica, killed on drop.
struct Replica {
    child: Child,
    addr: String,
    log: PathBuf,
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("--- {} log ({}) ---", self.addr, self.log.display());
            eprintln!("{}", tail(&self.log));
        }
    }
}

fn free_loopback_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(40)..].join("\n")
}

/// Runs a command to completion within `COMMAND_LIMIT`, output into `log`.
fn run(command: &mut Command, log: &Path) -> ExitStatus {
    let out = File::create(log).unwrap();
    let mut child = command
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let started = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if started.elapsed() > COMMAND_LIMIT {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{command:?} did not finish in time:\n{}", tail(log));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn sim(work: &Workdir, db: &ScratchDatabase, args: &[&str], log: &str) {
    let log = work.path(log);
    let status = run(
        Command::new(SIM)
            .args(args)
            .args(["--database-url", &db.url]),
        &log,
    );
    assert!(
        status.success(),
        "coderd-sim {args:?} failed:\n{}",
        tail(&log)
    );
}

/// Starts two replicas that know each other, on free loopback ports.
fn start_replicas(work: &Workdir, db: &ScratchDatabase, framing: &str) -> Vec<Replica> {
    let addrs = [free_loopback_port(), free_loopback_port()].map(|p| format!("127.0.0.1:{p}"));
    let names = ["a", "b"];
    let replicas: Vec<Replica> = (0..2)
        .map(|n| {
            let other = 1 - n;
            let peers = format!("{}={}", names[other], addrs[other]);
            let log = work.path(&format!("replica-{}.log", names[n]));
            let out = File::create(&log).unwrap();
            let child = Command::new(SIM)
                .args(["serve", "--listen", &addrs[n], "--database-url", &db.url])
                .args(["--replica", names[n], "--framing", framing])
                .args([
                    "--stream-cache",
                    "off",
                    "--part-delay-ms",
                    "5",
                    "--peers",
                    &peers,
                ])
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .stdin(Stdio::null())
                .spawn()
                .unwrap();
            Replica {
                child,
                addr: addrs[n].clone(),
                log,
            }
        })
        .collect();

    // A replica is ready once its listener accepts.
    let started = Instant::now();
    for replica in &replicas {
        while TcpStream::connect(&replica.addr).is_err() {
            assert!(
                started.elapsed() < Duration::from_secs(15),
                "replica {} did not listen:\n{}",
                replica.addr,
                tail(&replica.log)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    replicas
}

/// Migrates, seeds `chats` chats (two per user), starts two replicas, runs chatload with
/// `extra` arguments and returns its JSON report.
fn chatload_against_two_replicas(tag: &str, framing: &str, chats: u32, extra: &[&str]) -> Value {
    let work = Workdir::new(tag);
    let db = ScratchDatabase::create(tag);
    let seed = work.path("seed.json");
    let users = chats.div_ceil(2).to_string();
    sim(&work, &db, &["migrate"], "migrate.log");
    sim(
        &work,
        &db,
        &[
            "seed",
            "--users",
            &users,
            "--chats-per-user",
            "2",
            "--out",
            seed.to_str().unwrap(),
        ],
        "seed.log",
    );
    let replicas = start_replicas(&work, &db, framing);

    let targets = replicas
        .iter()
        .map(|replica| format!("http://{}", replica.addr))
        .collect::<Vec<_>>()
        .join(",");
    let report = work.path("report.json");
    let log = work.path("chatload.log");
    let chats = chats.to_string();
    let status = run(
        Command::new(CHATLOAD)
            .args([
                "run",
                "--targets",
                &targets,
                "--seed-file",
                seed.to_str().unwrap(),
            ])
            .args([
                "--database-url",
                &db.url,
                "--framing",
                framing,
                "--chats",
                &chats,
            ])
            .args([
                "--turn-timeout-ms",
                "10000",
                "--json",
                report.to_str().unwrap(),
            ])
            .args(extra),
        &log,
    );
    assert!(
        status.success(),
        "chatload exited with {status}:\n{}",
        tail(&log)
    );

    let text = std::fs::read_to_string(&report).expect("chatload wrote its JSON report");
    let report: Value = serde_json::from_str(&text).unwrap();
    drop(replicas);
    report
}

fn assert_no_faults(report: &Value) {
    for key in [
        "lost",
        "duplicated",
        "out_of_order",
        "foreign",
        "failed_turns",
    ] {
        assert_eq!(report[key], 0, "{key} in {report:#}");
    }
    assert!(report["messages"].as_u64().unwrap() > 0, "{report:#}");
    assert!(report["turn_p50_ms"].as_f64().unwrap() > 0.0, "{report:#}");
    assert!(report["catchup_p99_ms"].as_f64().is_some(), "{report:#}");
}

/// The acceptance run: 50 chats × 5 turns × 3 subscribers on two `--stream-cache off`
/// replicas, every subscriber reconnecting after each turn, one edit per chat (the fourth turn).
#[test]
fn envelope_reconnects_and_edits_lose_nothing() {
    let report = chatload_against_two_replicas(
        "envelope",
        "envelope",
        50,
        &[
            "--turns",
            "5",
            "--subscribers-per-chat",
            "3",
            "--reconnect-each-turn",
            "--edit-every",
            "3",
        ],
    );
    assert_no_faults(&report);
    assert_eq!(report["turns"], 250, "{report:#}");
    assert_eq!(report["subscribers"], 150, "{report:#}");
    // Every subscriber reconnects once per turn.
    let reconnects = report["reconnects"].as_u64().unwrap();
    assert!(reconnects >= 750, "{report:#}");

    // The reads, from both replicas' /metrics: without coderd's cache every connect reads one
    // snapshot (relay streams between the replicas read theirs too) and every message notify
    // is read again by each subscriber; chatload sends no REST reads.
    let reads = &report["db_reads"];
    let series = &reads["by_series"];
    let snapshots = series["coderd_sim/stream_snapshot"].as_u64().unwrap();
    assert!(snapshots >= 150 + reconnects, "{reads:#}");
    assert_eq!(series["coderd_sim/rest"], 0, "{reads:#}");
    let notify = series["coderd_sim/stream_notify"].as_u64().unwrap();
    assert!(notify >= 250, "{reads:#}");
    assert_eq!(reads["total"], snapshots + notify, "{reads:#}");
    let per_turn = reads["per_turn"].as_f64().unwrap();
    assert!((per_turn - reads["total"].as_f64().unwrap() / 250.0).abs() < 1e-9);
    assert_eq!(reads["pages"].as_array().unwrap().len(), 2, "{reads:#}");
}

#[test]
fn array_framing_with_edits_every_turn_loses_nothing() {
    let report = chatload_against_two_replicas(
        "array",
        "array",
        4,
        &[
            "--turns",
            "3",
            "--subscribers-per-chat",
            "2",
            "--edit-every",
            "1",
            "--concurrency",
            "2",
        ],
    );
    assert_no_faults(&report);
    assert_eq!(report["turns"], 12, "{report:#}");
}
