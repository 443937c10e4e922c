//! One mode of the scaletest: seed fresh chats, start the topology, drive the load with
//! chatload, measure what Postgres and the processes saw, and stop everything.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::http::Http;
use crate::latency::{self, ProxyLatency};
use crate::options::Params;
use crate::postgres::{self, ActivitySampler, Peaks, Statement};
use crate::procs::{self, Usage};
use crate::topology::{Binaries, Topology, Wiring};
use crate::{BenchError, Result};

/// What one run shares with each of its modes.
pub struct RunContext {
    pub params: Params,
    pub bins: Binaries,
    /// Logs, seed files, configs and chatload reports of this run.
    pub dir: PathBuf,
    pub db: String,
    pub http: Http,
}

/// Everything measured in one mode. The first block is the headline; the rest is detail.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct ModeResult {
    /// `GetChatMessagesByChatID`-shaped statements per follow-up turn (pg_stat_statements).
    pub catchup_reads_per_turn: f64,
    /// Every statement of the system under test (chatload's checks excluded) per follow-up turn.
    pub queries_per_turn: f64,
    /// Peak connections of the system under test (replicas and sidecars) to the database.
    pub peak_db_connections: u64,
    pub catchup_p50_ms: Option<f64>,
    pub catchup_p99_ms: Option<f64>,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    /// Sum over the system under test of each process's peak RSS.
    pub peak_rss_bytes: u64,
    /// CPU seconds of the system under test during the mode.
    pub cpu_seconds: f64,
    /// Only in the chatcache mode, where a proxy is in the path.
    pub proxy_added_p50_us: Option<f64>,

    /// `ok`, or what went wrong: lost messages, failed turns, timeout, setup failure.
    pub verdict: String,
    pub follow_up_turns: u64,
    pub catchup_reads: u64,
    pub queries: u64,
    /// chatload's own history checks, not counted in `queries`.
    pub judge_queries: u64,
    pub db_exec_ms: f64,
    pub catchup_exec_ms: f64,
    pub catchup_statements: Vec<Statement>,
    /// The ten most frequent statements of the system under test.
    pub top_statements: Vec<Statement>,
    pub connections: Peaks,
    pub turn_p50_ms: Option<f64>,
    pub turn_p99_ms: Option<f64>,
    pub failed_turns: u64,
    pub foreign: u64,
    pub chatload_exit: Option<i32>,
    pub chatload: Value,
    pub processes: Vec<Usage>,
    /// Each process's `/metrics` at the end of the load, by process name.
    pub metrics: BTreeMap<String, BTreeMap<String, f64>>,
    pub proxy_latency: Option<ProxyLatency>,
    /// Seeded chats of this mode that were not `waiting` once everything had stopped.
    pub chats_not_idle: BTreeMap<String, u64>,
    pub wall_seconds: f64,
}

/// The seed file, as far as the scaletest needs it.
#[derive(Debug, serde::Deserialize)]
struct Seed {
    users: Vec<SeedUser>,
}

#[derive(Debug, serde::Deserialize)]
struct SeedUser {
    token: String,
    chats: Vec<String>,
}

/// Runs one mode start to finish. The topology is stopped whatever happens inside.
pub async fn run(ctx: &RunContext, mode: &str) -> Result<ModeResult> {
    let started = Instant::now();
    let wiring = match mode {
        "baseline" => Wiring {
            stream_cache: false,
            sidecars: false,
        },
        "coderd-cache" => Wiring {
            stream_cache: true,
            sidecars: false,
        },
        _ => Wiring {
            stream_cache: true,
            sidecars: true,
        },
    };

    // Fresh chats for this mode, so every mode drives identical, empty chats.
    let seed_path = ctx.dir.join(format!("{mode}-seed.json"));
    seed(ctx, &seed_path, mode)?;
    let seed: Seed = serde_json::from_slice(
        &std::fs::read(&seed_path).map_err(BenchError::io("read the seed file"))?,
    )
    .map_err(|e| BenchError::Step(format!("seed file is not seed JSON: {e}")))?;
    let chats: Vec<String> = seed.users.iter().flat_map(|u| u.chats.clone()).collect();
    let first = seed.users.first().filter(|u| !u.chats.is_empty());
    let Some(first) = first else {
        return Err(BenchError::Step("the seed holds no chats".into()));
    };
    println!("[{mode}] seeded {} chats; starting processes", chats.len());

    let topology = Topology::start(wiring, &ctx.params, &ctx.bins, &ctx.dir, &ctx.db, mode).await;
    let topology = match topology {
        Ok(t) => t,
        Err(e) => {
            procs::kill_all();
            return Err(e);
        }
    };
    let measured = measure(ctx, mode, &topology, (&first.chats[0], &first.token)).await;
    println!("[{mode}] stopping processes");
    topology.stop().await;

    let mut result = measured?;
    result.chats_not_idle = postgres::busy_chats(&ctx.db, &chats).await?;
    if !result.chats_not_idle.is_empty() {
        println!(
            "[{mode}] chats not idle after stop: {:?}",
            result.chats_not_idle
        );
    }
    result.wall_seconds = started.elapsed().as_secs_f64();
    Ok(result)
}

fn seed(ctx: &RunContext, out: &Path, mode: &str) -> Result<()> {
    let status = Command::new(&ctx.bins.coderd_sim)
        .args(["seed", "--database-url", &postgres::url(&ctx.db)])
        .args(["--users", &ctx.params.users.to_string()])
        .args(["--chats-per-user", &ctx.params.chats_per_user.to_string()])
        .arg("--out")
        .arg(out)
        .stdout(std::process::Stdio::null())
        .status()
        .map_err(BenchError::io("run coderd-sim seed"))?;
    if !status.success() {
        return Err(BenchError::Step(format!(
            "[{mode}] coderd-sim seed failed: {status}"
        )));
    }
    Ok(())
}

/// Load and measurements, while the topology runs.
async fn measure(
    ctx: &RunContext,
    mode: &str,
    topology: &Topology,
    (chat, token): (&str, &str),
) -> Result<ModeResult> {
    // Count only what the load causes: start-up queries are forgotten.
    postgres::reset_statements(&ctx.db).await?;
    let sampler = ActivitySampler::start(&ctx.db).await?;
    let before: Vec<Usage> = topology.procs().into_iter().map(procs::usage).collect();

    println!(
        "[{mode}] chatload: {} chats x {} turns",
        ctx.params.chats, ctx.params.turns
    );
    let report_path = ctx.dir.join(format!("{mode}-chatload.json"));
    let exit = chatload(ctx, mode, &topology.targets(), &report_path).await?;
    let statements = postgres::statements(&ctx.db).await?;
    let peaks = sampler.stop();

    // Process figures, read before anything is stopped.
    let mut metrics = BTreeMap::new();
    for replica in &topology.replicas {
        let url = format!("{}/metrics", replica.base);
        let scrape = ctx.http.metrics(&url, &["coderd_sim_"]).await?;
        metrics.insert(replica.proc.name.clone(), scrape);
    }
    for sidecar in &topology.sidecars {
        let url = format!("{}/metrics", sidecar.admin);
        let scrape = ctx.http.metrics(&url, &["chatcache_"]).await?;
        metrics.insert(sidecar.proc.name.clone(), scrape);
    }
    let processes: Vec<Usage> = topology
        .procs()
        .into_iter()
        .map(procs::usage)
        .zip(&before)
        .map(|(mut after, before)| {
            after.cpu_seconds -= before.cpu_seconds;
            after
        })
        .collect();

    let proxy_latency = match (topology.replicas.first(), topology.sidecars.first()) {
        (Some(replica), Some(sidecar)) => {
            println!(
                "[{mode}] proxy latency: {} requests each way",
                latency::SAMPLES
            );
            let measured =
                latency::measure(&ctx.http, &replica.base, &sidecar.base, chat, token).await?;
            Some(measured)
        }
        _ => None,
    };

    let chatload_report: Value = std::fs::read(&report_path)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or(Value::Null);
    let raw = Raw {
        exit,
        report: chatload_report,
        statements,
        connections: peaks,
        processes,
        metrics,
        proxy_latency,
    };
    Ok(summarize(ctx.params.follow_up_turns, raw))
}

/// What a mode collected, before it is boiled down to a [`ModeResult`].
struct Raw {
    exit: Option<i32>,
    report: Value,
    statements: Vec<Statement>,
    connections: Peaks,
    processes: Vec<Usage>,
    metrics: BTreeMap<String, BTreeMap<String, f64>>,
    proxy_latency: Option<ProxyLatency>,
}

/// chatload's exit code, or `None` when it ran past its time budget and was killed.
async fn chatload(
    ctx: &RunContext,
    mode: &str,
    targets: &[String],
    report: &Path,
) -> Result<Option<i32>> {
    let p = &ctx.params;
    let mut command = Command::new(&ctx.bins.chatload);
    command
        .args(["run", "--targets", &targets.join(",")])
        .arg("--seed-file")
        .arg(ctx.dir.join(format!("{mode}-seed.json")))
        .args(["--turns", &p.turns.to_string()])
        .args([
            "--subscribers-per-chat",
            &p.subscribers_per_chat.to_string(),
        ])
        .arg("--reconnect-each-turn")
        .args(["--concurrency", &p.concurrency.to_string()])
        .args(["--database-url", &postgres::url(&ctx.db)])
        .arg("--json")
        .arg(report);
    if p.edit_every > 0 {
        command.args(["--edit-every", &p.edit_every.to_string()]);
    }

    // Relay chatload's progress lines (about ten per run) and its first errors.
    let label = mode.to_owned();
    let started = Instant::now();
    let errors = std::sync::atomic::AtomicU32::new(0);
    let on_line = move |line: &str| {
        if line.contains("turns completed") {
            let field = |key: &str| {
                line.split_whitespace()
                    .find_map(|w| w.strip_prefix(key))
                    .unwrap_or("?")
                    .to_owned()
            };
            let secs = started.elapsed().as_secs();
            println!(
                "[{label}] turns {}/{} ({secs} s)",
                field("done="),
                field("total=")
            );
        } else if line.contains("ERROR")
            && errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < 5
        {
            println!("[{label}] chatload: {line}");
        }
    };
    let log = ctx.dir.join(format!("{mode}-chatload.log"));
    let proc = procs::spawn_watched("chatload", command, &log, on_line)?;

    let deadline = Instant::now() + Duration::from_secs(p.chatload_timeout_s);
    loop {
        if let Some(status) = procs::try_wait(&proc)? {
            return Ok(Some(status.code().unwrap_or(-1)));
        }
        if Instant::now() > deadline {
            println!(
                "[{mode}] chatload ran past {} s; killing it",
                p.chatload_timeout_s
            );
            procs::stop(&proc, Duration::from_secs(2)).await;
            return Ok(None);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn summarize(follow_up: u64, raw: Raw) -> ModeResult {
    let Raw {
        exit,
        report,
        statements,
        connections,
        processes,
        metrics,
        proxy_latency,
    } = raw;
    let per_turn = |n: u64| n as f64 / follow_up.max(1) as f64;
    let (judge, product): (Vec<Statement>, Vec<Statement>) = statements
        .into_iter()
        .partition(|s| postgres::is_judge_query(&s.query));
    let catchup: Vec<Statement> = product
        .iter()
        .filter(|s| postgres::is_catchup_read(&s.query))
        .cloned()
        .collect();
    let catchup_reads = catchup.iter().map(|s| s.calls).sum();
    let queries = product.iter().map(|s| s.calls).sum();
    let count = |key: &str| report.get(key).and_then(Value::as_u64).unwrap_or(0);
    let millis = |key: &str| report.get(key).and_then(Value::as_f64);

    let mut result = ModeResult {
        catchup_reads_per_turn: per_turn(catchup_reads),
        queries_per_turn: per_turn(queries),
        peak_db_connections: connections.product,
        catchup_p50_ms: millis("catchup_p50_ms"),
        catchup_p99_ms: millis("catchup_p99_ms"),
        lost: count("lost"),
        duplicated: count("duplicated"),
        out_of_order: count("out_of_order"),
        peak_rss_bytes: processes.iter().map(|p| p.peak_rss_bytes).sum(),
        cpu_seconds: processes.iter().map(|p| p.cpu_seconds).sum(),
        proxy_added_p50_us: proxy_latency.as_ref().map(|l| l.added_p50_us),
        follow_up_turns: follow_up,
        catchup_reads,
        queries,
        judge_queries: judge.iter().map(|s| s.calls).sum(),
        db_exec_ms: product.iter().map(|s| s.exec_ms).sum(),
        catchup_exec_ms: catchup.iter().map(|s| s.exec_ms).sum(),
        catchup_statements: catchup,
        top_statements: product.into_iter().take(10).collect(),
        connections,
        turn_p50_ms: millis("turn_p50_ms"),
        turn_p99_ms: millis("turn_p99_ms"),
        failed_turns: count("failed_turns"),
        foreign: count("foreign"),
        chatload_exit: exit,
        processes,
        metrics,
        proxy_latency,
        ..ModeResult::default()
    };
    result.verdict = verdict(&result, &report);
    result.chatload = report;
    result
}

/// A short, honest word on the mode: faults are named, never hidden.
fn verdict(result: &ModeResult, report: &Value) -> String {
    let mut problems = Vec::new();
    match result.chatload_exit {
        None => problems.push("chatload timed out".to_owned()),
        Some(2) => problems.push("chatload could not set up (exit 2)".to_owned()),
        _ => {}
    }
    if report.is_null() {
        problems.push("no chatload report".to_owned());
    }
    for (what, n) in [
        ("lost", result.lost),
        ("duplicated", result.duplicated),
        ("out of order", result.out_of_order),
        ("foreign", result.foreign),
        ("failed turns", result.failed_turns),
    ] {
        if n > 0 {
            problems.push(format!("{n} {what}"));
        }
    }
    if problems.is_empty() {
        "ok".to_owned()
    } else {
        problems.join(", ")
    }
}
