//! Tallies of a run, their percentiles, and the report in table and JSON form.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;

use super::ledger::Faults;
use super::reads::Reads;
use super::LoadError;

/// Everything counted while driving chats; tallies of chats are merged into one for the report.
#[derive(Debug, Default)]
pub struct Tally {
    /// Turns driven (sent or attempted).
    pub turns: u64,
    /// Turns that could not be sent, or that coderd did not finish in time.
    pub failed_turns: u64,
    pub faults: Faults,
    /// `message` events received by all subscribers.
    pub messages: u64,
    /// Connects after a subscriber's first one, planned or not.
    pub reconnects: u64,
    /// Error events, refusals and transport failures, by message.
    pub errors: BTreeMap<String, u64>,
    /// One sample per (re)connect that caught up, in milliseconds.
    pub catch_up_ms: Vec<f64>,
    /// One sample per turn that completed in time, from sending it until every subscriber held
    /// the visible history, in milliseconds.
    pub turn_ms: Vec<f64>,
}

impl Tally {
    pub fn error(&mut self, message: impl Into<String>) {
        *self.errors.entry(message.into()).or_default() += 1;
    }

    pub fn merge(&mut self, other: Tally) {
        self.turns += other.turns;
        self.failed_turns += other.failed_turns;
        self.faults.add(other.faults);
        self.messages += other.messages;
        self.reconnects += other.reconnects;
        for (message, count) in other.errors {
            *self.errors.entry(message).or_default() += count;
        }
        self.catch_up_ms.extend(other.catch_up_ms);
        self.turn_ms.extend(other.turn_ms);
    }
}

/// Milliseconds of a duration, with sub-millisecond precision.
pub fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1000.0
}

/// The nearest-rank percentile (`q` in 0..=1) of unsorted samples; `None` without samples.
pub fn percentile(samples: &[f64], q: f64) -> Option<f64> {
    if samples.is_empty() {
        return None;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q.clamp(0.0, 1.0) * sorted.len() as f64).ceil() as usize;
    Some(sorted[rank.saturating_sub(1)])
}

/// The run's result. Field names are the JSON keys.
#[derive(Debug, Serialize)]
pub struct Report {
    pub chats: u64,
    pub subscribers: u64,
    pub turns: u64,
    pub failed_turns: u64,
    pub messages: u64,
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub foreign: u64,
    pub reconnects: u64,
    pub catchup_p50_ms: Option<f64>,
    pub catchup_p99_ms: Option<f64>,
    pub turn_p50_ms: Option<f64>,
    pub turn_p99_ms: Option<f64>,
    pub total_ms: f64,
    /// Total of `errors_by_message`.
    pub errors: u64,
    pub errors_by_message: BTreeMap<String, u64>,
    /// Message reads the targets (and `--scrape` pages) counted during the run; `null` when a
    /// page could not be read.
    pub db_reads: Option<Reads>,
}

impl Report {
    pub fn new(tally: Tally, chats: u64, subscribers: u64, total: Duration) -> Self {
        Report {
            chats,
            subscribers,
            turns: tally.turns,
            failed_turns: tally.failed_turns,
            messages: tally.messages,
            lost: tally.faults.lost,
            duplicated: tally.faults.duplicated,
            out_of_order: tally.faults.out_of_order,
            foreign: tally.faults.foreign,
            reconnects: tally.reconnects,
            catchup_p50_ms: percentile(&tally.catch_up_ms, 0.50),
            catchup_p99_ms: percentile(&tally.catch_up_ms, 0.99),
            turn_p50_ms: percentile(&tally.turn_ms, 0.50),
            turn_p99_ms: percentile(&tally.turn_ms, 0.99),
            total_ms: millis(total),
            errors: tally.errors.values().sum(),
            errors_by_message: tally.errors,
            db_reads: None,
        }
    }

    /// Faults that break the no-loss promise; any of them fails the run.
    pub fn violations(&self) -> u64 {
        self.lost + self.duplicated + self.out_of_order + self.foreign
    }

    /// Whether the run failed: a violation, or turns that never completed.
    pub fn failed(&self) -> bool {
        self.violations() > 0 || self.failed_turns > 0
    }

    /// Writes the report as one JSON object to `path`.
    pub fn write_json(&self, path: &str) -> Result<(), LoadError> {
        let mut text = serde_json::to_string_pretty(self).expect("a report always serializes");
        text.push('\n');
        std::fs::write(path, text).map_err(|source| LoadError::WriteReport {
            path: path.to_owned(),
            source,
        })
    }

    /// The plain-text table printed to stdout.
    pub fn table(&self) -> String {
        let ms = |value: Option<f64>| value.map_or_else(|| "-".to_owned(), |v| format!("{v:.1}"));
        let rows = [
            ("chats", self.chats.to_string()),
            ("subscribers", self.subscribers.to_string()),
            ("turns", self.turns.to_string()),
            ("failed turns", self.failed_turns.to_string()),
            ("messages", self.messages.to_string()),
            ("lost", self.lost.to_string()),
            ("duplicated", self.duplicated.to_string()),
            ("out of order", self.out_of_order.to_string()),
            ("foreign", self.foreign.to_string()),
            ("reconnects", self.reconnects.to_string()),
            ("catch-up p50 ms", ms(self.catchup_p50_ms)),
            ("catch-up p99 ms", ms(self.catchup_p99_ms)),
            ("turn p50 ms", ms(self.turn_p50_ms)),
            ("turn p99 ms", ms(self.turn_p99_ms)),
            ("total ms", format!("{:.0}", self.total_ms)),
            ("errors", self.errors.to_string()),
        ];

        let mut out = String::new();
        for (name, value) in rows {
            let _ = writeln!(out, "{name:<16} {value:>12}");
        }
        match &self.db_reads {
            Some(reads) => {
                let _ = writeln!(out, "{:<16} {:>12}", "db reads", reads.total);
                let _ = writeln!(out, "{:<16} {:>12}", "db reads/turn", ms(reads.per_turn));
                for (series, count) in reads.by_series.iter().filter(|(_, count)| **count > 0) {
                    let _ = writeln!(out, "  reads {series}: {count}");
                }
            }
            None => {
                let _ = writeln!(out, "{:<16} {:>12}", "db reads", "-");
            }
        }
        for (message, count) in &self.errors_by_message {
            let _ = writeln!(out, "  error x{count}: {message}");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentile_uses_nearest_rank() {
        let samples: Vec<f64> = (1..=100).rev().map(f64::from).collect();
        assert_eq!(percentile(&samples, 0.50), Some(50.0));
        assert_eq!(percentile(&samples, 0.99), Some(99.0));
        assert_eq!(percentile(&samples, 1.0), Some(100.0));
        assert_eq!(percentile(&samples, 0.0), Some(1.0));
    }

    #[test]
    fn percentile_of_few_samples() {
        assert_eq!(percentile(&[], 0.5), None);
        assert_eq!(percentile(&[7.0], 0.99), Some(7.0));
        assert_eq!(percentile(&[3.0, 1.0], 0.50), Some(1.0));
        assert_eq!(percentile(&[3.0, 1.0], 0.99), Some(3.0));
        assert_eq!(percentile(&[4.0, 1.0, 2.0, 3.0], 0.5), Some(2.0));
    }

    #[test]
    fn merged_tallies_make_one_report() {
        let mut total = Tally::default();
        for lost in [0, 2] {
            let mut tally = Tally {
                turns: 3,
                messages: 10,
                turn_ms: vec![5.0],
                ..Tally::default()
            };
            tally.faults.lost = lost;
            tally.error("dropped messages");
            total.merge(tally);
        }

        let report = Report::new(total, 2, 6, Duration::from_millis(1500));
        assert_eq!((report.turns, report.messages, report.lost), (6, 20, 2));
        assert_eq!(report.errors, 2);
        assert_eq!(report.turn_p99_ms, Some(5.0));
        assert_eq!(report.catchup_p50_ms, None);
        assert!(report.failed());

        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["lost"], 2);
        assert_eq!(json["total_ms"], 1500.0);
        assert!(json["catchup_p99_ms"].is_null());
        assert!(report.table().contains("dropped messages"));
    }
}
