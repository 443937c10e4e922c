//! Postgres as the judge of load: `pg_stat_statements` for what was asked, `pg_stat_activity`
//! for how many connections were open. Also the run's own database.

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_postgres::{Client, NoTls};

use crate::{BenchError, Result};

/// The only Postgres the scaletest talks to.
pub const HOST: &str = "127.0.0.1";
pub const PORT: u16 = 5432;
/// The `application_name` of the scaletest's own connections.
const APP_NAME: &str = "chatcache-bench";
/// chatload's connections: the judge, not the system under test.
pub const JUDGE_APP: &str = "chatload";

/// The URL the children get for database `db`.
pub fn url(db: &str) -> String {
    format!("postgres://postgres@{HOST}:{PORT}/{db}")
}

/// Connects to `db` as the scaletest and drives the connection on its own task.
pub async fn connect(db: &str) -> Result<Client> {
    let mut config = tokio_postgres::Config::new();
    config
        .host(HOST)
        .port(PORT)
        .user("postgres")
        .dbname(db)
        .application_name(APP_NAME)
        .connect_timeout(Duration::from_secs(5));
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// Makes sure `pg_stat_statements` is preloaded; restarts the cluster (and says so) if not.
pub async fn ensure_pg_stat_statements() -> Result<()> {
    let admin = connect("postgres").await?;
    let row = admin
        .query_one("SHOW shared_preload_libraries", &[])
        .await?;
    let current: String = row.get(0);
    if current.split(',').any(|l| l.trim() == "pg_stat_statements") {
        println!("postgres: pg_stat_statements is preloaded");
        return Ok(());
    }

    // Keep whatever else is preloaded; only add the extension's library.
    let wanted = if current.trim().is_empty() {
        "pg_stat_statements".to_owned()
    } else {
        format!("{current},pg_stat_statements")
    };
    println!(
        "postgres: shared_preload_libraries is {current:?}; running ALTER SYSTEM SET \
         shared_preload_libraries = '{wanted}' and restarting cluster 15/main (left in place \
         afterwards)"
    );
    admin
        .batch_execute(&format!(
            "ALTER SYSTEM SET shared_preload_libraries = '{wanted}'"
        ))
        .await?;
    drop(admin);
    let status = Command::new("pg_ctlcluster")
        .args(["--skip-systemctl-redirect", "15", "main", "restart"])
        .status()
        .map_err(BenchError::io("run pg_ctlcluster"))?;
    if !status.success() {
        return Err(BenchError::Step(format!(
            "pg_ctlcluster restart failed: {status}"
        )));
    }
    for _ in 0..60 {
        if let Ok(client) = connect("postgres").await {
            let row = client
                .query_one("SHOW shared_preload_libraries", &[])
                .await?;
            let now: String = row.get(0);
            println!("postgres: restarted; shared_preload_libraries = {now:?}");
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(BenchError::Step(
        "Postgres did not come back within 30 s of the restart".into(),
    ))
}

/// Creates the run's database with `pg_stat_statements` in it.
pub async fn create_database(db: &str) -> Result<()> {
    let admin = connect("postgres").await?;
    admin
        .batch_execute(&format!("CREATE DATABASE {db}"))
        .await?;
    let client = connect(db).await?;
    client
        .batch_execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        .await?;
    Ok(())
}

/// Drops the run's database, closing whatever is still connected to it.
pub async fn drop_database(db: &str) -> Result<()> {
    let admin = connect("postgres").await?;
    admin
        .batch_execute(&format!("DROP DATABASE IF EXISTS {db} WITH (FORCE)"))
        .await?;
    Ok(())
}

/// Forgets every statement counted so far, in every database. The extension's functions live
/// in the run's database, so the call is made there (and is not counted as load).
pub async fn reset_statements(db: &str) -> Result<()> {
    let admin = connect(db).await?;
    admin
        .batch_execute("SELECT pg_stat_statements_reset()")
        .await?;
    Ok(())
}

/// One normalized statement of the run's database.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Statement {
    pub query: String,
    pub calls: u64,
    pub rows: u64,
    pub exec_ms: f64,
}

/// Every statement counted in `db` since the last reset.
pub async fn statements(db: &str) -> Result<Vec<Statement>> {
    let admin = connect(db).await?;
    let rows = admin
        .query(
            "SELECT query, calls, rows, total_exec_time FROM pg_stat_statements s \
             JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = $1 ORDER BY calls DESC",
            &[&db],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| Statement {
            query: r.get(0),
            calls: r.get::<_, i64>(1).max(0) as u64,
            rows: r.get::<_, i64>(2).max(0) as u64,
            exec_ms: r.get(3),
        })
        .collect())
}

/// Whether a statement is a `GetChatMessagesByChatID`-shaped catch-up read: visible messages
/// of one chat above a cursor. Both coderd-sim's and chatcache's texts match; chatload's
/// history checks do not (they have no `id >` cursor).
pub fn is_catchup_read(query: &str) -> bool {
    let q = query.to_ascii_lowercase();
    q.trim_start().starts_with("select")
        && q.contains("from chat_messages")
        && q.contains("id > $")
        && q.contains("visibility")
}

/// Whether a statement is one of chatload's own checks (the judge's, not the load's) or the
/// scaletest's own statistics call.
pub fn is_judge_query(query: &str) -> bool {
    let q = query.trim_start();
    q.starts_with("SELECT id, role::text FROM chat_messages")
        || q.starts_with("SELECT c.status::text, EXISTS (SELECT 1 FROM chat_queued_messages")
        || q.contains("pg_stat_statements")
}

/// Peak open connections to the run's database while sampling.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Peaks {
    /// Every connection, chatload's and the scaletest's included.
    pub all: u64,
    /// Connections of the system under test: everything but chatload and the scaletest.
    pub product: u64,
    /// Per `application_name`, each its own peak.
    pub by_app: BTreeMap<String, u64>,
    /// Connections of the system under test that were running a statement or inside a
    /// transaction (`state <> 'idle'`): the work, not the pool size.
    pub product_busy: u64,
    pub busy_by_app: BTreeMap<String, u64>,
    pub samples: u64,
}

/// Samples `pg_stat_activity` every 100 ms until the returned handle is stopped.
pub struct ActivitySampler {
    peaks: Arc<Mutex<Peaks>>,
    task: tokio::task::JoinHandle<()>,
}

impl ActivitySampler {
    pub async fn start(db: &str) -> Result<ActivitySampler> {
        let client = connect("postgres").await?;
        let db = db.to_owned();
        let peaks = Arc::new(Mutex::new(Peaks::default()));
        let shared = peaks.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let Ok(rows) = client
                    .query(
                        "SELECT coalesce(application_name, ''), count(*), \
                         count(*) FILTER (WHERE state <> 'idle') FROM pg_stat_activity \
                         WHERE datname = $1 GROUP BY 1",
                        &[&db],
                    )
                    .await
                else {
                    continue;
                };
                let mut peaks = shared.lock().unwrap_or_else(|e| e.into_inner());
                let (mut all, mut product, mut product_busy) = (0, 0, 0);
                for row in rows {
                    let app: String = row.get(0);
                    let count = row.get::<_, i64>(1).max(0) as u64;
                    let busy = row.get::<_, i64>(2).max(0) as u64;
                    all += count;
                    if app != JUDGE_APP && app != APP_NAME {
                        product += count;
                        product_busy += busy;
                    }
                    let peak = peaks.busy_by_app.entry(app.clone()).or_default();
                    *peak = (*peak).max(busy);
                    let peak = peaks.by_app.entry(app).or_default();
                    *peak = (*peak).max(count);
                }
                peaks.all = peaks.all.max(all);
                peaks.product = peaks.product.max(product);
                peaks.product_busy = peaks.product_busy.max(product_busy);
                peaks.samples += 1;
            }
        });
        Ok(ActivitySampler { peaks, task })
    }

    /// The peaks seen so far, without stopping.
    pub fn peaks(&self) -> Peaks {
        self.peaks.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub fn stop(self) -> Peaks {
        self.task.abort();
        self.peaks()
    }
}

/// Chats among `chats` that are not idle (`waiting`), counted by status.
pub async fn busy_chats(db: &str, chats: &[String]) -> Result<BTreeMap<String, u64>> {
    let client = connect(db).await?;
    let rows = client
        .query(
            "SELECT status::text, count(*) FROM chats WHERE id::text = ANY($1) \
             AND status <> 'waiting' GROUP BY 1",
            &[&chats],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| (r.get::<_, String>(0), r.get::<_, i64>(1).max(0) as u64))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn catchup_shape_matches_sim_and_sidecar_but_not_the_judge() {
        let sidecar = "SELECT id, chat_id, created_by FROM chat_messages WHERE chat_id = $1 AND \
                       id > $2 AND visibility IN ('user', 'both') AND deleted = false";
        assert!(is_catchup_read(sidecar));
        let judge = "SELECT id, role::text FROM chat_messages WHERE chat_id = $1 AND deleted = \
                     false AND visibility IN ('user', 'both') ORDER BY created_at, id";
        assert!(!is_catchup_read(judge));
        assert!(is_judge_query(judge));
        assert!(!is_catchup_read(
            "UPDATE chat_messages SET deleted = true WHERE id > $2"
        ));
    }
}
