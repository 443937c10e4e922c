//! Micro-benchmarks of chatcache's per-event hot paths: a tail catch-up from the ring, frame
//! assembly, NOTIFY parsing and rendering a row as a `message` event.
//!
//! `cargo bench --bench hot_paths`. Inputs are shaped like the scaletest's: assistant messages
//! of a few hundred bytes, a full ring of 2048 messages, frames of 256 events.

use std::hint::black_box;

use bytes::Bytes;
use chatcache::config::Framing;
use chatcache::listen::parse_notify;
use chatcache::render::{message_event, MessageRow};
use chatcache::ring::{Ring, RingLimits};
use chatcache::wire::frame;
use chrono::{TimeZone, Utc};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};

/// The ring's default limits (config.toml `[cache]`).
const LIMITS: RingLimits = RingLimits {
    grace: std::time::Duration::from_millis(250),
    settle: std::time::Duration::ZERO,
    proof: false,
    max_messages: 2048,
    max_bytes: 4 * 1024 * 1024,
};
/// ids start where coderd-sim's sequence does.
const FIRST_ID: i64 = 1000;

/// An assistant row as coderd's worker writes it: one text part and token usage.
fn assistant_row(id: i64) -> MessageRow {
    let text: String = (1..=5)
        .map(|n| {
            format!(
                "part {n} of turn {} with some streamed model output. ",
                id % 10
            )
        })
        .collect();
    MessageRow {
        id,
        chat_id: "11111111-1111-4111-8111-111111111111".parse().unwrap(),
        created_by: None,
        model_config_id: Some("22222222-2222-4222-8222-222222222222".parse().unwrap()),
        created_at: Utc.with_ymd_and_hms(2026, 3, 18, 10, 0, 2).unwrap()
            + chrono::Duration::microseconds(123_456),
        role: "assistant".into(),
        content: Some(serde_json::json!([{"type": "text", "text": text}])),
        content_version: 1,
        usage: [Some(812), Some(45), Some(857), None, None, None, None],
    }
}

/// The encoded `message` events of ids `FIRST_ID..FIRST_ID + n`.
fn events(n: usize) -> Vec<(i64, Bytes)> {
    (0..n as i64)
        .map(|i| {
            let id = FIRST_ID + i;
            let event = message_event(&assistant_row(id), Framing::Envelope).unwrap();
            (id, Bytes::from(event))
        })
        .collect()
}

fn ring(c: &mut Criterion) {
    let rows = events(2048);
    c.bench_function("ring/from_read_2048", |b| {
        b.iter_batched(
            || rows.clone(),
            |rows| Ring::from_read(FIRST_ID - 1, rows, LIMITS),
            BatchSize::SmallInput,
        )
    });

    // A subscriber reconnecting ten messages behind the head.
    let ring = Ring::from_read(FIRST_ID - 1, rows, LIMITS);
    let after = ring.head() - 10;
    c.bench_function("ring/after_tail_10_of_2048", |b| {
        b.iter(|| {
            let tail: Vec<Bytes> = ring
                .after(black_box(after))
                .map(|e| e.event.clone())
                .collect();
            assert_eq!(tail.len(), 10);
            tail
        })
    });
}

fn framing(c: &mut Criterion) {
    let batch: Vec<Bytes> = events(256).into_iter().map(|(_, e)| e).collect();
    c.bench_function("wire/frame_256_events_envelope", |b| {
        b.iter(|| frame(Framing::Envelope, black_box(&batch)))
    });
    c.bench_function("wire/frame_256_events_array", |b| {
        b.iter(|| frame(Framing::Array, black_box(&batch)))
    });
}

fn notify(c: &mut Criterion) {
    let message = r#"{"after_message_id":1234567}"#;
    let status = r#"{"status":"running","worker_id":"33333333-3333-4333-8333-333333333333"}"#;
    c.bench_function("listen/parse_notify_message", |b| {
        b.iter(|| parse_notify(black_box(message)).unwrap())
    });
    c.bench_function("listen/parse_notify_status", |b| {
        b.iter(|| parse_notify(black_box(status)).unwrap())
    });
}

fn render(c: &mut Criterion) {
    let row = assistant_row(FIRST_ID + 7);
    c.bench_function("render/message_event_assistant", |b| {
        b.iter(|| message_event(black_box(&row), Framing::Envelope).unwrap())
    });
}

criterion_group!(hot_paths, ring, framing, notify, render);
criterion_main!(hot_paths);
