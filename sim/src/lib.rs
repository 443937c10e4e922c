//! coderd-sim: a stand-in for coderd's chat streaming on real Postgres, built to judge the
//! chatcache sidecar. It reproduces what the sidecar depends on — one global message id
//! sequence, the chat row lock on every write, notifies after commit through a 50 ms batching
//! publisher, edits as soft-delete plus a new row plus `full_refresh`, the 20-message queue,
//! per-subscriber rereads, and coderd's PR #23218 stream cache including its cross-replica
//! hole — and writes the exact bytes coderd writes.
//!
//! # Layout
//!
//! * [`cli`], [`server`]: the command line and one replica's listener.
//! * [`migrate`], [`seed`]: schema and test data.
//! * [`db`], [`store`]: connections (named per replica, UTC) and the SQL.
//! * [`wire`]: coderd's JSON — parts, messages, events, notify payloads, chats.
//! * [`gojson`]: the Go-specific text rules (escaping, quoting, error texts, times).
//! * [`pubsub`]: the shared LISTEN connection and the batching publisher.
//! * [`stream`]: per-chat stream state and cache, Subscribe, the relay, the WebSocket.
//! * [`publish`], [`chatd`], [`worker`]: publish paths, write paths, the simulated model.
//! * [`api`]: the HTTP surface (auth, chat parameter, REST, stream, watch, metrics).
//! * [`load`]: chatload, the load generator (separate binary).

pub mod api;
pub mod chatd;
pub mod cli;
pub mod db;
pub mod gojson;
pub mod load;
pub mod metrics;
pub mod migrate;
pub mod publish;
pub mod pubsub;
pub mod replica;
pub mod seed;
pub mod server;
pub mod store;
pub mod stream;
pub mod wire;
pub mod worker;
