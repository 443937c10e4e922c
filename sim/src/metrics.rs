//! The replica's Prometheus metrics (names fixed in CONTRACTS.md), served at `GET /metrics`.
//!
//! They exist so a load run can count what the sidecar is meant to save: message reads per
//! caller, open subscribers, and how often coderd's own #23218 cache answered.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};

/// Who issued a `GetChatMessagesByChatID`-shaped read.
#[derive(Debug, Clone, Copy)]
pub enum ReadCaller {
    /// The initial snapshot of a stream connect.
    StreamSnapshot,
    /// A subscriber catching up after a notify (cache miss, cache off, or full refresh).
    StreamNotify,
    /// `GET .../messages`.
    Rest,
}

impl ReadCaller {
    fn label(self) -> &'static str {
        match self {
            ReadCaller::StreamSnapshot => "stream_snapshot",
            ReadCaller::StreamNotify => "stream_notify",
            ReadCaller::Rest => "rest",
        }
    }
}

/// All metrics of one replica, registered in their own registry.
pub struct Metrics {
    registry: Registry,
    message_reads: IntCounterVec,
    /// Open stream subscribers on this replica.
    pub stream_subscribers: IntGauge,
    /// Notifies answered from the #23218 cache without a read.
    pub stream_cache_hits: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let message_reads = IntCounterVec::new(
            Opts::new(
                "coderd_sim_message_reads_total",
                "GetChatMessagesByChatID-shaped reads",
            ),
            &["caller"],
        )
        .expect("valid metric");
        let stream_subscribers =
            IntGauge::new("coderd_sim_stream_subscribers", "Open stream subscribers")
                .expect("valid metric");
        let stream_cache_hits = IntCounter::new(
            "coderd_sim_stream_cache_hits_total",
            "Message notifies served from the per-chat durable message cache",
        )
        .expect("valid metric");
        registry
            .register(Box::new(message_reads.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(stream_subscribers.clone()))
            .expect("unique metric");
        registry
            .register(Box::new(stream_cache_hits.clone()))
            .expect("unique metric");
        for caller in [
            ReadCaller::StreamSnapshot,
            ReadCaller::StreamNotify,
            ReadCaller::Rest,
        ] {
            message_reads.with_label_values(&[caller.label()]);
        }
        Metrics {
            registry,
            message_reads,
            stream_subscribers,
            stream_cache_hits,
        }
    }

    pub fn count_read(&self, caller: ReadCaller) {
        self.message_reads
            .with_label_values(&[caller.label()])
            .inc();
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("text encoding");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
