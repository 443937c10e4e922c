//! The Prometheus registry: every `chatcache_*` metric, plus the process collector.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// All metrics of one sidecar. Cloning is cheap: the handles share their values.
#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Catch-ups by how they were served: hit, miss, below_floor, fail_open.
    pub catchups: IntCounterVec,
    /// Message reads from Postgres by reason: repair, refresh, below_floor, reload.
    pub db_reads: IntCounterVec,
    pub full_refreshes: IntCounter,
    pub hole_repairs: IntCounter,
    pub evictions: IntCounter,
    pub bytes_held: IntGauge,
    pub chats_held: IntGauge,
    pub subscribers: IntGauge,
    pub feeds: IntGauge,
    pub listen_reconnects: IntCounter,
    /// Subscriptions handed to coderd untouched, by reason.
    pub fail_opens: IntCounterVec,
    /// Authorization answers: allowed, denied, cached, error.
    pub authz: IntCounterVec,
    pub overflow_closes: IntCounter,
    pub proxied_requests: IntCounter,
    /// NOTIFY payloads that could not be understood.
    pub bad_notifies: IntCounter,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let counter_vec = |name: &str, help: &str, label: &str| {
            let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help).expect("valid metric");
            registry
                .register(Box::new(g.clone()))
                .expect("unique metric");
            g
        };
        let metrics = Self {
            catchups: counter_vec(
                "chatcache_catchup_total",
                "Stream catch-ups by how they were served.",
                "result",
            ),
            db_reads: counter_vec(
                "chatcache_db_reads_total",
                "Message reads from Postgres by reason.",
                "reason",
            ),
            full_refreshes: counter("chatcache_full_refreshes_total", "Edits replayed."),
            hole_repairs: counter(
                "chatcache_hole_repairs_total",
                "Announced messages that had to be read from Postgres.",
            ),
            evictions: counter("chatcache_evictions_total", "Chats dropped from the cache."),
            bytes_held: gauge(
                "chatcache_bytes_held",
                "Bytes of message JSON in the cache.",
            ),
            chats_held: gauge("chatcache_chats_held", "Chats in the cache."),
            subscribers: gauge("chatcache_subscribers", "Open stream subscribers."),
            feeds: gauge("chatcache_feeds", "Open upstream streams to coderd."),
            listen_reconnects: counter(
                "chatcache_listen_reconnects_total",
                "Times the LISTEN connection was re-established.",
            ),
            fail_opens: counter_vec(
                "chatcache_fail_open_total",
                "Subscriptions passed to coderd because chatcache could not serve them.",
                "reason",
            ),
            authz: counter_vec(
                "chatcache_authz_total",
                "Authorization answers for stream requests.",
                "result",
            ),
            overflow_closes: counter(
                "chatcache_overflow_closes_total",
                "Subscribers closed because they could not keep up.",
            ),
            proxied_requests: counter(
                "chatcache_proxied_requests_total",
                "Requests passed through to coderd.",
            ),
            bad_notifies: counter(
                "chatcache_bad_notifies_total",
                "NOTIFY payloads that could not be parsed.",
            ),
            registry,
        };
        // Every known label value is exported from the start, so dashboards and alerts see 0
        // rather than a missing series.
        let known: [(&IntCounterVec, &[&str]); 4] = [
            (&metrics.catchups, &["hit", "below_floor", "fail_open"]),
            (
                &metrics.db_reads,
                &["repair", "proof", "refresh", "below_floor", "reload"],
            ),
            (
                &metrics.authz,
                &["allowed", "denied", "cached", "shared", "error"],
            ),
            (&metrics.fail_opens, &crate::stream::FAIL_OPEN_REASONS),
        ];
        for (vec, labels) in known {
            for label in labels {
                vec.with_label_values(&[label]);
            }
        }
        #[cfg(target_os = "linux")]
        {
            let pc = prometheus::process_collector::ProcessCollector::for_self();
            let _ = metrics.registry.register(Box::new(pc));
        }
        metrics
    }

    /// The text exposition for `/metrics`.
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
