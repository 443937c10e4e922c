//! The run's result: one JSON file per run, and a markdown table of the headline figures.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::mode::ModeResult;
use crate::options::Params;

/// The whole result file: `{"params": ..., "modes": {...}}` plus context.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunResult {
    pub params: Params,
    pub modes: BTreeMap<String, ModeResult>,
    /// Modes that could not be measured at all, with the reason.
    pub failed_modes: BTreeMap<String, String>,
    pub started_at: String,
    pub finished_at: String,
    pub wall_seconds: f64,
    pub host: Host,
    /// How to read the figures.
    pub notes: Vec<String>,
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Host {
    pub cores: usize,
    pub postgres: String,
}

/// What every per-turn figure means; copied into each result file.
pub const NOTES: [&str; 7] = [
    "per-turn figures divide by follow-up turns = chats x (turns - 1), as coderd's scaletest did",
    "catch-up reads: pg_stat_statements calls of GetChatMessagesByChatID-shaped statements \
     (FROM chat_messages, id > $n, visibility filter), from coderd-sim and chatcache alike",
    "queries: every statement in the run's database except chatload's own history checks",
    "peak_db_connections: peak pg_stat_activity count of the system under test (coderd-sim \
     replicas and chatcache), sampled every 100 ms; chatload's pool is in connections.all",
    "peak busy DB connections (connections.product_busy): the same, counting only connections \
     that were not idle (running a statement or inside a transaction); coderd-sim keeps up to 20 \
     pooled connections open per replica, so the open count mostly shows its pool size",
    "peak_rss_bytes and cpu_seconds: sums over the system under test (replicas, sidecars)",
    "proxy_added_p50_us: p50 of GET /api/experimental/chats/{chat} through chatcache minus \
     p50 direct, 200 sequential requests each way; only meaningful in the chatcache mode",
];

/// One row of the table: a label and how to read it from a mode.
type Row = (&'static str, fn(&ModeResult) -> Option<f64>);

const ROWS: [Row; 13] = [
    ("catch-up reads / follow-up turn", |m| {
        Some(m.catchup_reads_per_turn)
    }),
    ("all queries / follow-up turn", |m| Some(m.queries_per_turn)),
    ("peak DB connections", |m| {
        Some(m.peak_db_connections as f64)
    }),
    ("peak busy DB connections", |m| {
        Some(m.connections.product_busy as f64)
    }),
    ("catch-up p50 ms", |m| m.catchup_p50_ms),
    ("catch-up p99 ms", |m| m.catchup_p99_ms),
    ("turn p99 ms", |m| m.turn_p99_ms),
    ("lost", |m| Some(m.lost as f64)),
    ("duplicated", |m| Some(m.duplicated as f64)),
    ("out of order", |m| Some(m.out_of_order as f64)),
    ("peak RSS MiB (sum)", |m| {
        Some(m.peak_rss_bytes as f64 / 1048576.0)
    }),
    ("CPU s (sum)", |m| Some(m.cpu_seconds)),
    ("proxy added p50 µs", |m| m.proxy_added_p50_us),
];

/// The markdown table: one column per mode, then chatcache/baseline and chatcache/coderd-cache.
pub fn markdown(result: &RunResult) -> String {
    let p = &result.params;
    let mut out = String::new();
    let _ = writeln!(out, "# chatcache scaletest ({} profile)\n", p.profile);
    let _ = writeln!(
        out,
        "{} chats x {} turns, {} subscribers per chat, {} replicas, edit every {}, reconnect \
         each turn; chatload --concurrency {}, sim --turn-parts {} --part-delay-ms {}. \
         Run {} ({:.0} s). Seeding: {}.\n",
        p.chats,
        p.turns,
        p.subscribers_per_chat,
        p.replicas,
        p.edit_every,
        p.concurrency,
        p.turn_parts,
        p.part_delay_ms,
        result.started_at,
        result.wall_seconds,
        p.seeding
    );

    let modes = ["baseline", "coderd-cache", "chatcache"];
    let _ = writeln!(
        out,
        "| measure | baseline | coderd-cache | chatcache | chatcache/baseline | \
         chatcache/coderd-cache |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|");
    for (label, read) in ROWS {
        let values: Vec<Option<f64>> = modes
            .iter()
            .map(|m| result.modes.get(*m).and_then(read))
            .collect();
        let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
            (Some(a), Some(b)) if b != 0.0 => format!("{:.3}", a / b),
            _ => "–".to_owned(),
        };
        let _ = writeln!(
            out,
            "| {label} | {} | {} | {} | {} | {} |",
            cell(values[0]),
            cell(values[1]),
            cell(values[2]),
            ratio(values[2], values[0]),
            ratio(values[2], values[1]),
        );
    }
    let verdicts: Vec<String> = modes
        .iter()
        .map(
            |m| match (result.modes.get(*m), result.failed_modes.get(*m)) {
                (Some(r), _) => r.verdict.clone(),
                (None, Some(why)) => format!("FAILED: {why}"),
                (None, None) => "not run".to_owned(),
            },
        )
        .collect();
    let _ = writeln!(
        out,
        "| verdict | {} | {} | {} | | |\n",
        verdicts[0], verdicts[1], verdicts[2]
    );
    for note in result.notes.iter() {
        let _ = writeln!(out, "- {note}");
    }
    out
}

fn cell(value: Option<f64>) -> String {
    match value {
        None => "–".to_owned(),
        Some(v) if v.fract() == 0.0 && v.abs() < 1e12 => format!("{v:.0}"),
        Some(v) if v.abs() >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.2}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn table_has_ratio_columns_and_dashes_for_missing_values() {
        let params = Params::resolve(&crate::options::Options::parse_from([
            "scaletest",
            "--quick",
        ]))
        .unwrap();
        let mut modes = BTreeMap::new();
        let base = ModeResult {
            catchup_reads_per_turn: 4.0,
            verdict: "ok".into(),
            ..ModeResult::default()
        };
        let cached = ModeResult {
            catchup_reads_per_turn: 0.5,
            proxy_added_p50_us: Some(120.0),
            verdict: "ok".into(),
            ..ModeResult::default()
        };
        modes.insert("baseline".to_owned(), base);
        modes.insert("chatcache".to_owned(), cached);
        let result = RunResult {
            params,
            modes,
            failed_modes: BTreeMap::new(),
            started_at: "now".into(),
            finished_at: "later".into(),
            wall_seconds: 1.0,
            host: Host {
                cores: 2,
                postgres: "15".into(),
            },
            notes: NOTES.iter().map(|n| n.to_string()).collect(),
        };
        let table = markdown(&result);
        assert!(
            table.contains("| catch-up reads / follow-up turn | 4 | – | 0.50 | 0.125 | – |"),
            "{table}"
        );
        assert!(table.contains("not run"), "{table}");
    }
}
