//! The latency chatcache adds to a request it only passes through: the same REST call
//! (`GET /api/experimental/chats/{chat}`), sent directly to a replica and through its sidecar.

use serde::{Deserialize, Serialize};

use crate::http::Http;
use crate::{BenchError, Result};

/// Requests each way that are measured.
pub const SAMPLES: usize = 200;
/// Requests each way sent first and not measured (connection set-up, caches).
const WARMUP: usize = 20;

/// Medians of both paths, in microseconds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProxyLatency {
    pub direct_p50_us: f64,
    pub via_chatcache_p50_us: f64,
    pub direct_p99_us: f64,
    pub via_chatcache_p99_us: f64,
    /// `via_chatcache_p50_us - direct_p50_us`.
    pub added_p50_us: f64,
    pub samples_each_way: usize,
}

/// Sends the request alternately direct and through the sidecar, sequentially, so that both
/// paths see the same machine load.
pub async fn measure(
    http: &Http,
    replica_base: &str,
    sidecar_base: &str,
    chat: &str,
    token: &str,
) -> Result<ProxyLatency> {
    let path = format!("/api/experimental/chats/{chat}");
    let headers = [("Coder-Session-Token", token)];
    let direct_url = format!("{replica_base}{path}");
    let via_url = format!("{sidecar_base}{path}");

    let timed = |url: String| {
        let http = http.clone();
        async move {
            let started = std::time::Instant::now();
            let (status, body) = http.get(&url, &headers).await?;
            let micros = started.elapsed().as_secs_f64() * 1e6;
            if status != 200 {
                return Err(BenchError::Step(format!(
                    "GET {url} answered {status}: {}",
                    String::from_utf8_lossy(&body).trim()
                )));
            }
            Ok(micros)
        }
    };

    for _ in 0..WARMUP {
        timed(direct_url.clone()).await?;
        timed(via_url.clone()).await?;
    }
    let mut direct = Vec::with_capacity(SAMPLES);
    let mut via = Vec::with_capacity(SAMPLES);
    for _ in 0..SAMPLES {
        direct.push(timed(direct_url.clone()).await?);
        via.push(timed(via_url.clone()).await?);
    }
    let (direct_p50_us, via_chatcache_p50_us) = (percentile(&direct, 0.5), percentile(&via, 0.5));
    Ok(ProxyLatency {
        direct_p50_us,
        via_chatcache_p50_us,
        direct_p99_us: percentile(&direct, 0.99),
        via_chatcache_p99_us: percentile(&via, 0.99),
        added_p50_us: via_chatcache_p50_us - direct_p50_us,
        samples_each_way: SAMPLES,
    })
}

/// Nearest-rank percentile of non-empty samples.
fn percentile(samples: &[f64], q: f64) -> f64 {
    let mut sorted = samples.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = (q * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let samples: Vec<f64> = (1..=200).map(f64::from).collect();
        assert_eq!(percentile(&samples, 0.5), 100.0);
        assert_eq!(percentile(&samples, 0.99), 198.0);
        assert_eq!(percentile(&[3.0], 0.5), 3.0);
    }
}
