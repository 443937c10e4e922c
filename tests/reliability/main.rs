//! Reliability under faults and load: the LISTEN connection killed over and over, a coderd
//! replica and the sidecar itself killed mid-turn and restarted on the same port, reconnect
//! storms, slow and stalled consumers next to fast ones under tight memory limits, edits racing
//! new messages, and two replicas publishing into one chat at once. Each fault is followed by
//! chatload's no-loss check or an exact comparison with Postgres.
//!
//! Long variants (5,000 subscribers; a Postgres restart) run only with
//! `CHATCACHE_LONG_TESTS=1`; their figures are in `tests/RELIABILITY.md`.
//!
//! One test binary, one module a kind of fault; `support` holds the harness additions.

#[path = "../common/mod.rs"]
mod common;

mod support;

mod consumers;
mod load_faults;
mod postgres_restart;
mod replays;
mod storms;
