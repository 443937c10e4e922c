//! Database reads of chat messages during a run, from the Prometheus pages of the processes
//! that issue them.
//!
//! Before the first turn and after the last one chatload fetches `GET {target}/metrics` of every
//! target (through a sidecar that path passes to coderd, so it is the replica's page either
//! way) and of every `--scrape` URL (for instance a sidecar's admin `/metrics`), and reports
//! the growth of the message-read counters:
//!
//! * `coderd_sim_message_reads_total{caller}`: coderd-sim's `GetChatMessagesByChatID` reads;
//! * `chatcache_db_reads_total{reason}`: chatcache's reads of `chat_messages`.
//!
//! chatload's own checks read Postgres directly and are not in either counter.

use std::collections::BTreeMap;

use serde::Serialize;

use super::api::ChatApi;

/// The counters that count message reads: name, the label that splits it, and the process
/// it is reported under.
const READ_COUNTERS: [(&str, &str, &str); 2] = [
    ("coderd_sim_message_reads_total", "caller", "coderd_sim"),
    ("chatcache_db_reads_total", "reason", "chatcache"),
];

/// Counter values by series key (`coderd_sim/stream_snapshot`, `chatcache/repair`, ...),
/// summed over every scraped page.
pub type Sample = BTreeMap<String, f64>;

/// The pages scraped for read counters.
pub struct ReadScraper {
    urls: Vec<String>,
}

/// One scrape of every page: the summed sample, or why a page could not be read.
pub struct Scrape {
    sample: Sample,
    failures: Vec<String>,
}

/// The reads a run caused, as reported.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Reads {
    /// Every counted read, all processes.
    pub total: u64,
    /// `total` divided by the turns driven.
    pub per_turn: Option<f64>,
    /// Growth per series: `coderd_sim/<caller>` and `chatcache/<reason>`.
    pub by_series: BTreeMap<String, u64>,
    /// The pages scraped.
    pub pages: Vec<String>,
}

impl ReadScraper {
    /// The `/metrics` page of every distinct target plus the extra URLs, in that order.
    pub fn new(target_bases: &[String], extra: &[String]) -> Self {
        let mut urls: Vec<String> = Vec::new();
        let pages = target_bases
            .iter()
            .map(|base| format!("{base}/metrics"))
            .chain(extra.iter().map(|url| url.trim().to_owned()));
        for url in pages {
            if !url.is_empty() && !urls.contains(&url) {
                urls.push(url);
            }
        }
        ReadScraper { urls }
    }

    /// Fetches every page once.
    pub async fn scrape(&self, api: &ChatApi) -> Scrape {
        let mut scrape = Scrape {
            sample: Sample::new(),
            failures: Vec::new(),
        };
        for url in &self.urls {
            match api.get_text(url).await {
                Ok(page) => {
                    for (key, value) in read_counters(&page) {
                        *scrape.sample.entry(key).or_default() += value;
                    }
                }
                Err(err) => scrape.failures.push(err.to_string()),
            }
        }
        scrape
    }

    /// The reads between two scrapes, or why they cannot be told (a page failed either time).
    pub fn between(&self, before: &Scrape, after: &Scrape, turns: u64) -> Result<Reads, String> {
        if let Some(failure) = before.failures.iter().chain(&after.failures).next() {
            return Err(format!("read counters unavailable: {failure}"));
        }
        let by_series: BTreeMap<String, u64> = after
            .sample
            .iter()
            .map(|(key, value)| {
                let grown = value - before.sample.get(key).copied().unwrap_or(0.0);
                (key.clone(), grown.max(0.0).round() as u64)
            })
            .collect();
        let total = by_series.values().sum();
        Ok(Reads {
            total,
            per_turn: (turns > 0).then(|| total as f64 / turns as f64),
            by_series,
            pages: self.urls.clone(),
        })
    }
}

/// The read counters on one Prometheus text page, keyed `<process>/<label value>`.
pub fn read_counters(page: &str) -> Vec<(String, f64)> {
    let mut found = Vec::new();
    for line in page.lines().filter(|line| !line.starts_with('#')) {
        for (name, label, process) in READ_COUNTERS {
            let Some(rest) = line.strip_prefix(name) else {
                continue;
            };
            let Some((labels, value)) = rest.strip_prefix('{').and_then(|r| r.split_once('}'))
            else {
                continue;
            };
            let Some(label_value) = label_value(labels, label) else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            found.push((format!("{process}/{label_value}"), value));
        }
    }
    found
}

/// The value of `label` in a `a="x",b="y"` label list (values here never hold quotes).
fn label_value<'a>(labels: &'a str, label: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name.trim() == label).then(|| value.trim().trim_matches('"'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SIM_PAGE: &str = "# HELP coderd_sim_message_reads_total reads\n\
        # TYPE coderd_sim_message_reads_total counter\n\
        coderd_sim_message_reads_total{caller=\"rest\"} 2\n\
        coderd_sim_message_reads_total{caller=\"stream_snapshot\"} 40\n\
        coderd_sim_stream_subscribers 3\n";
    const SIDECAR_PAGE: &str = "chatcache_db_reads_total{reason=\"repair\"} 1\n\
        chatcache_db_reads_total{reason=\"fill\"} 5\n\
        chatcache_db_reads_total_x{reason=\"fill\"} 9\n";

    #[test]
    fn counters_are_keyed_by_process_and_label() {
        let mut found = read_counters(SIM_PAGE);
        found.extend(read_counters(SIDECAR_PAGE));
        assert_eq!(
            found,
            vec![
                ("coderd_sim/rest".to_owned(), 2.0),
                ("coderd_sim/stream_snapshot".to_owned(), 40.0),
                ("chatcache/repair".to_owned(), 1.0),
                ("chatcache/fill".to_owned(), 5.0),
            ]
        );
    }

    #[test]
    fn growth_is_summed_and_divided_by_turns() {
        let scraper = ReadScraper::new(
            &["http://a".to_owned(), "http://a".to_owned()],
            &["http://b/metrics".to_owned()],
        );
        assert_eq!(scraper.urls, vec!["http://a/metrics", "http://b/metrics"]);
        let scrape = |pairs: &[(&str, f64)]| Scrape {
            sample: pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            failures: Vec::new(),
        };
        let before = scrape(&[("coderd_sim/rest", 2.0)]);
        let after = scrape(&[("coderd_sim/rest", 5.0), ("chatcache/fill", 3.0)]);
        let reads = scraper.between(&before, &after, 4).unwrap();
        assert_eq!(reads.total, 6);
        assert_eq!(reads.per_turn, Some(1.5));
        assert_eq!(reads.by_series["coderd_sim/rest"], 3);
        assert_eq!(reads.by_series["chatcache/fill"], 3);

        let mut failed = scrape(&[]);
        failed
            .failures
            .push("cannot reach http://a/metrics".to_owned());
        assert!(scraper.between(&before, &failed, 4).is_err());
    }
}
