//! A whole load run: setup, every chat driven (a bounded number at once), and the report.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::{error, info, warn};

use super::api::ChatApi;
use super::chat::{self, RunContext};
use super::history::History;
use super::reads::ReadScraper;
use super::report::{Report, Tally};
use super::seed::{Seed, SeedError};
use super::{LoadError, RunOptions};

/// Postgres connections shared by all chat drivers; each holds one only for a short query.
const MAX_DB_CONNECTIONS: u32 = 16;
/// About this many progress lines are logged over a run.
const PROGRESS_LINES: u64 = 10;

/// Runs the load described by `options` and returns its report. Faults are in the report; an
/// error means the run could not be set up.
pub async fn run(options: RunOptions) -> Result<Report, LoadError> {
    let started = Instant::now();

    // Setup: everything that can be wrong with the command line, the seed or Postgres fails
    // here, before any traffic.
    let targets = options.targets()?;
    let seed = Seed::load(&options.seed_file)?;
    let chats = seed.chats(options.chats);
    if chats.is_empty() {
        return Err(SeedError::Empty(options.seed_file.clone()).into());
    }
    let concurrency = options.concurrency.unwrap_or(chats.len()).min(chats.len());
    let db_connections =
        u32::try_from(concurrency).map_or(MAX_DB_CONNECTIONS, |c| c.min(MAX_DB_CONNECTIONS));
    let history = History::connect(&options.database_url(), db_connections).await?;

    let chat_count = chats.len() as u64;
    let subscribers = chat_count * u64::from(options.subscribers_per_chat);
    let total_turns = chat_count * u64::from(options.turns);
    info!(
        chats = chat_count,
        subscribers,
        turns = total_turns,
        concurrency,
        targets = targets.len(),
        framing = ?options.framing,
        "load run starting"
    );

    let api = ChatApi::default();
    let bases: Vec<String> = targets.iter().map(|t| t.http_base.clone()).collect();
    let scraper = ReadScraper::new(&bases, &options.scrape);
    let reads_before = scraper.scrape(&api).await;

    let ctx = Arc::new(RunContext {
        options,
        targets: targets.into(),
        api,
        history,
        on_turn: progress_logger(total_turns),
    });

    // Drive the chats, at most `concurrency` at once; each gets its own task.
    let permits = Arc::new(Semaphore::new(concurrency));
    let mut drivers = JoinSet::new();
    let mut tally = Tally::default();
    for chat in chats {
        let permit = permits
            .clone()
            .acquire_owned()
            .await
            .expect("semaphore is never closed");
        let ctx = ctx.clone();
        drivers.spawn(async move {
            let tally = chat::drive(ctx, chat).await;
            drop(permit);
            tally
        });
        while let Some(done) = drivers.try_join_next() {
            collect(&mut tally, done);
        }
    }
    while let Some(done) = drivers.join_next().await {
        collect(&mut tally, done);
    }

    let reads_after = scraper.scrape(&ctx.api).await;
    let reads = scraper.between(&reads_before, &reads_after, tally.turns);
    if let Err(reason) = &reads {
        warn!(%reason, "database reads are not reported");
    }
    let mut report = Report::new(tally, chat_count, subscribers, started.elapsed());
    report.db_reads = reads.ok();
    info!(
        turns = report.turns,
        lost = report.lost,
        duplicated = report.duplicated,
        out_of_order = report.out_of_order,
        foreign = report.foreign,
        db_reads = report.db_reads.as_ref().map(|reads| reads.total),
        "load run finished"
    );
    Ok(report)
}

fn collect(tally: &mut Tally, done: Result<Tally, tokio::task::JoinError>) {
    match done {
        Ok(chat_tally) => tally.merge(chat_tally),
        Err(err) => {
            error!(error = %err, "chat driver failed");
            tally.error("chat driver panicked");
        }
    }
}

/// Logs one line per tenth of all turns (and at the last one) to stderr.
fn progress_logger(total_turns: u64) -> Box<dyn Fn() + Send + Sync> {
    let every = total_turns.div_ceil(PROGRESS_LINES).max(1);
    let done = AtomicU64::new(0);
    Box::new(move || {
        let now = done.fetch_add(1, Ordering::Relaxed) + 1;
        if now.is_multiple_of(every) || now == total_turns {
            info!(done = now, total = total_turns, "turns completed");
        }
    })
}
