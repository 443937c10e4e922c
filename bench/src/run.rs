//! A whole scaletest run: build the binaries, prepare Postgres, run each mode, write results.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use crate::chart;
use crate::http::Http;
use crate::mode::{self, RunContext};
use crate::options::{Options, Params};
use crate::postgres;
use crate::procs;
use crate::report::{self, Host, RunResult};
use crate::topology::Binaries;
use crate::{BenchError, Result};

/// Names of one run, fixed before anything starts so cleanup can find them.
#[derive(Debug, Clone)]
pub struct RunNames {
    /// `20260101T120000Z`: the result file's name.
    pub stamp: String,
    /// `scaletest_20260101_120000`.
    pub db: String,
}

impl RunNames {
    pub fn now() -> RunNames {
        let now = chrono::Utc::now();
        RunNames {
            stamp: now.format("%Y%m%dT%H%M%SZ").to_string(),
            db: now.format("scaletest_%Y%m%d_%H%M%S").to_string(),
        }
    }
}

/// `bench/`, where results are written.
fn bench_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Runs the scaletest; returns whether the chatcache mode ran clean.
pub async fn run(options: &Options, names: &RunNames) -> Result<bool> {
    let started = Instant::now();
    let started_at = chrono::Utc::now().to_rfc3339();
    let mut params = Params::resolve(options).map_err(BenchError::Step)?;
    // Only the named profiles, whole, may replace their `latest` files.
    let custom = options.chats.is_some()
        || options.turns.is_some()
        || options.subscribers_per_chat.is_some()
        || options.replicas.is_some()
        || options.edit_every.is_some()
        || !options.modes.is_empty();
    if custom {
        params.profile = "custom".to_owned();
    }
    println!(
        "scaletest {}: {}",
        names.stamp,
        serde_json::to_string(&params).unwrap_or_default()
    );

    // Binaries, from the same target directory and profile as this one.
    if !options.skip_build {
        build()?;
    }
    let bins = Binaries::beside_self()?;
    for bin in [&bins.coderd_sim, &bins.chatload, &bins.chatcache] {
        if !bin.exists() {
            return Err(BenchError::Step(format!(
                "{} is missing; build it",
                bin.display()
            )));
        }
    }
    let run_dir = bins
        .chatload
        .parent()
        .and_then(Path::parent)
        .unwrap_or(Path::new("."))
        .join("scaletest")
        .join(&names.stamp);
    std::fs::create_dir_all(&run_dir).map_err(BenchError::io("create the run directory"))?;
    println!("phase: logs, seeds and configs go to {}", run_dir.display());
    let with_text = chart::ensure_font();

    // One database, migrated once; each mode seeds its own chats into it.
    println!("phase: postgres");
    postgres::ensure_pg_stat_statements().await?;
    postgres::create_database(&names.db).await?;
    println!(
        "phase: created database {} with pg_stat_statements",
        names.db
    );
    migrate(&bins, &names.db)?;

    let ctx = RunContext {
        params: params.clone(),
        bins,
        dir: run_dir,
        db: names.db.clone(),
        http: Http::default(),
    };
    let mut modes = BTreeMap::new();
    let mut failed_modes = BTreeMap::new();
    for name in &params.modes {
        println!("phase: mode {name}");
        match mode::run(&ctx, name).await {
            Ok(result) => {
                println!(
                    "[{name}] done in {:.0} s: {:.3} catch-up reads/turn, {:.2} queries/turn, \
                     peak {} connections, catch-up p99 {:?} ms, verdict: {}",
                    result.wall_seconds,
                    result.catchup_reads_per_turn,
                    result.queries_per_turn,
                    result.peak_db_connections,
                    result.catchup_p99_ms,
                    result.verdict
                );
                modes.insert(name.clone(), result);
            }
            Err(e) => {
                println!("[{name}] FAILED: {e}");
                procs::kill_all();
                failed_modes.insert(name.clone(), e.to_string());
            }
        }
    }

    // Results: the run's own file, the profile's latest copies, the table and the chart.
    println!("phase: results");
    let postgres_version = postgres_version().await;
    let result = RunResult {
        params,
        modes,
        failed_modes,
        started_at,
        finished_at: chrono::Utc::now().to_rfc3339(),
        wall_seconds: started.elapsed().as_secs_f64(),
        host: Host {
            cores: std::thread::available_parallelism().map_or(0, |n| n.get()),
            postgres: postgres_version,
        },
        notes: report::NOTES.iter().map(|n| n.to_string()).collect(),
    };
    write_results(&result, names, with_text)?;
    if !options.keep {
        postgres::drop_database(&names.db).await?;
        println!("phase: dropped database {}", names.db);
    }
    let clean = result
        .modes
        .get("chatcache")
        .is_some_and(|m| m.verdict == "ok");
    Ok(clean)
}

fn build() -> Result<()> {
    println!("phase: cargo build --release -p coderd-sim -p chatcache --bins");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let workspace = bench_dir().join("..");
    let status = Command::new(cargo)
        .current_dir(workspace)
        .args([
            "build",
            "--release",
            "-p",
            "coderd-sim",
            "-p",
            "chatcache",
            "--bins",
        ])
        .status()
        .map_err(BenchError::io("run cargo build"))?;
    if !status.success() {
        return Err(BenchError::Step(format!("cargo build failed: {status}")));
    }
    Ok(())
}

fn migrate(bins: &Binaries, db: &str) -> Result<()> {
    let status = Command::new(&bins.coderd_sim)
        .args(["migrate", "--database-url", &postgres::url(db)])
        .status()
        .map_err(BenchError::io("run coderd-sim migrate"))?;
    if !status.success() {
        return Err(BenchError::Step(format!(
            "coderd-sim migrate failed: {status}"
        )));
    }
    println!("phase: migrated {db}");
    Ok(())
}

async fn postgres_version() -> String {
    match postgres::connect("postgres").await {
        Ok(client) => match client.query_one("SHOW server_version", &[]).await {
            Ok(row) => row.get(0),
            Err(_) => String::new(),
        },
        Err(_) => String::new(),
    }
}

fn write_results(result: &RunResult, names: &RunNames, with_text: bool) -> Result<()> {
    let dir = bench_dir().join("results");
    std::fs::create_dir_all(&dir).map_err(BenchError::io("create bench/results"))?;
    let json = serde_json::to_string_pretty(result)
        .map_err(|e| BenchError::Step(format!("cannot encode results: {e}")))?;
    let own = dir.join(format!("{}.json", names.stamp));
    std::fs::write(&own, format!("{json}\n")).map_err(BenchError::io("write results"))?;

    let prefix = latest_prefix(&result.params.profile);
    let latest = dir.join(format!("{prefix}.json"));
    std::fs::copy(&own, &latest).map_err(BenchError::io("copy results"))?;
    let (table, md, png) = table_and_chart(result, &dir, &prefix, with_text)?;
    println!("\n{table}");
    println!(
        "results: {} (copied to {}), {}, {}",
        own.display(),
        latest.display(),
        md.display(),
        png.display()
    );
    Ok(())
}

/// `latest` for the default profile, `<profile>-latest` for the others.
fn latest_prefix(profile: &str) -> String {
    match profile {
        "default" => "latest".to_owned(),
        other => format!("{other}-latest"),
    }
}

/// Writes `<prefix>.md` and `<prefix>.png` into `dir`; returns the table and both paths.
fn table_and_chart(
    result: &RunResult,
    dir: &Path,
    prefix: &str,
    with_text: bool,
) -> Result<(String, PathBuf, PathBuf)> {
    let table = report::markdown(result);
    let md = dir.join(format!("{prefix}.md"));
    std::fs::write(&md, &table).map_err(BenchError::io("write the table"))?;
    let png = dir.join(format!("{prefix}.png"));
    chart::draw(result, &png, with_text)?;
    Ok((table, md, png))
}

/// Redraws the table and chart of a result file next to it, under its profile's prefix.
pub fn replot(path: &Path) -> Result<()> {
    let text = std::fs::read(path).map_err(BenchError::io(format!("read {}", path.display())))?;
    let result: RunResult = serde_json::from_slice(&text)
        .map_err(|e| BenchError::Step(format!("{} is not a result file: {e}", path.display())))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let prefix = latest_prefix(&result.params.profile);
    let (_, md, png) = table_and_chart(&result, dir, &prefix, chart::ensure_font())?;
    println!("redrew {} and {}", md.display(), png.display());
    Ok(())
}
