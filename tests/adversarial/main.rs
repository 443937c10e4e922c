//! Adversarial input: odd cursors, chat ids and paths, every credential shape, broken
//! WebSocket handshakes and frames, HTTP framing tricks, and Postgres feeding the cache NOTIFY
//! payloads and rows it does not expect. Where coderd has an answer, the sidecar's answer is
//! compared with the sim answering the same bytes directly; everywhere, the process must stay
//! alive (`/live`) and subscribers must keep receiving exactly Postgres's history.
//!
//! One test binary, one module a domain; `fuzz` runs the fuzz targets of `fuzz/` as property
//! tests over a seeded corpus.

#[path = "../common/mod.rs"]
mod common;

#[path = "../../fuzz/targets.rs"]
#[allow(dead_code)]
mod fuzz_targets;

mod support;

mod credentials;
mod fuzz;
mod http_framing;
mod postgres;
mod routes;
mod websocket;
