//! A small keep-alive HTTP/1.1 client for loopback: readiness probes, `/metrics` scrapes and
//! the proxy latency measurement.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

use crate::{BenchError, Result};

/// How long one request may take before it counts as failed.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A pooled client; connections are reused between requests to the same address.
#[derive(Clone)]
pub struct Http {
    client: Client<HttpConnector, Empty<Bytes>>,
}

impl Default for Http {
    fn default() -> Self {
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build_http();
        Http { client }
    }
}

impl Http {
    /// `GET url` with extra headers; returns the status and the whole body.
    pub async fn get(&self, url: &str, headers: &[(&str, &str)]) -> Result<(u16, Bytes)> {
        let mut request = http::Request::get(url);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request
            .body(Empty::new())
            .map_err(|e| BenchError::Step(format!("bad request {url}: {e}")))?;
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .map_err(|e| e.to_string())?
                .to_bytes();
            Ok::<_, String>((status, body))
        };
        match tokio::time::timeout(REQUEST_TIMEOUT, exchange).await {
            Ok(Ok(answer)) => Ok(answer),
            Ok(Err(e)) => Err(BenchError::Step(format!("GET {url}: {e}"))),
            Err(_) => Err(BenchError::Step(format!("GET {url}: timed out"))),
        }
    }

    /// Polls `url` until it answers 200, for at most `budget`.
    pub async fn wait_ready(&self, url: &str, budget: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + budget;
        let mut last = String::from("no answer");
        while tokio::time::Instant::now() < deadline {
            match self.get(url, &[]).await {
                Ok((200, _)) => return Ok(()),
                Ok((status, body)) => {
                    last = format!("{status}: {}", String::from_utf8_lossy(&body).trim());
                }
                Err(e) => last = e.to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Err(BenchError::Step(format!(
            "{url} not ready after {budget:?} ({last})"
        )))
    }

    /// Scrapes a Prometheus endpoint, keeping the series whose names start with one of
    /// `prefixes`.
    pub async fn metrics(&self, url: &str, prefixes: &[&str]) -> Result<BTreeMap<String, f64>> {
        let (status, body) = self.get(url, &[]).await?;
        if status != 200 {
            return Err(BenchError::Step(format!("{url} answered {status}")));
        }
        Ok(parse_metrics(&String::from_utf8_lossy(&body), prefixes))
    }
}

/// Parses Prometheus text exposition: `name{labels} value` lines, comments skipped.
pub fn parse_metrics(text: &str, prefixes: &[&str]) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter(|line| prefixes.iter().any(|p| line.starts_with(p)))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            Some((series.to_owned(), value.trim().parse().ok()?))
        })
        .collect()
}

/// Sum of every series of metric `name` (any labels) in a scrape.
pub fn metric_sum(scrape: &BTreeMap<String, f64>, name: &str) -> f64 {
    scrape
        .iter()
        .filter(|(series, _)| {
            series.as_str() == name
                || series
                    .strip_prefix(name)
                    .is_some_and(|r| r.starts_with('{'))
        })
        .map(|(_, v)| v)
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_series_with_labels() {
        let text = "# HELP x y\n# TYPE coderd_sim_message_reads_total counter\n\
            coderd_sim_message_reads_total{caller=\"stream_notify\"} 12\n\
            coderd_sim_message_reads_total{caller=\"rest\"} 3\n\
            coderd_sim_message_reads_total_other 5\nprocess_cpu 1.5\n";
        let scrape = parse_metrics(text, &["coderd_sim_"]);
        assert_eq!(scrape.len(), 3);
        assert_eq!(metric_sum(&scrape, "coderd_sim_message_reads_total"), 15.0);
    }
}
