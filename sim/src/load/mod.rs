//! chatload: drives chats through coderd's chat API and checks that every stream subscriber
//! ends each turn holding exactly the visible history Postgres holds.
//!
//! # Layout
//!
//! One module per step of a load run:
//!
//! | Module | Step |
//! |---|---|
//! | `options` | the `chatload run` command line, targets and framing |
//! | `seed` | the seed file: users, their tokens and their chats |
//! | `frame` | one WebSocket text frame → stream events, in either framing |
//! | `ledger` | the client model: which message ids one subscriber holds, and what went wrong |
//! | `subscriber` | one WebSocket subscription with reconnects and catch-up timing |
//! | `api` | sending a turn: `POST .../messages` or `PATCH .../messages/{id}` |
//! | `history` | what Postgres says: turn finished, visible history of a chat |
//! | `chat` | one chat driven through all its turns with its subscribers |
//! | `reads` | message reads by coderd and sidecars, from their `/metrics` pages |
//! | `report` | tallies, percentiles, the table and the JSON file |
//! | `run` | the whole run: setup, chats in parallel, the verdict |
//!
//! # What counts as a fault
//!
//! * `lost`: at the end of a turn (or at its timeout) Postgres shows a message the subscriber does
//!   not hold.
//! * `foreign`: a subscriber holds a message Postgres does not show for the chat (for instance a
//!   soft-deleted one), or received a message event whose `chat_id` is not the subscribed chat.
//! * `duplicated`: a message arrived again outside an edit replay.
//! * `out_of_order`: a message arrived below the newest held id without having been held, or the
//!   held order differs from Postgres' `(created_at, id)` order.
//!
//! After each turn's check a subscriber adopts the verified history, so one fault is counted once
//! and not again in every later turn.
//!
//! # Latencies
//!
//! * Catch-up, per (re)connect: from starting the connect until the first frame has arrived and
//!   the subscriber holds every id Postgres showed as visible when the connect started (for a
//!   reconnect that is what it already held, so this is the time to the snapshot's first frame).
//! * Turn: from sending the turn until coderd finished it and every subscriber held the visible
//!   history. Turns that failed or timed out give no sample.
//!
//! # Exit status
//!
//! 0 clean; 1 on any fault or on turns that could not be sent or did not finish in time; 2 when
//! the run could not be set up (command line, seed file, Postgres, report file).

pub mod api;
pub mod chat;
pub mod frame;
pub mod history;
pub mod ledger;
pub mod options;
pub mod reads;
pub mod report;
pub mod run;
pub mod seed;
pub mod subscriber;

pub use options::{Framing, RunOptions};
pub use report::Report;
pub use run::run;

/// Why a load run could not start or finish. A run that finishes with faults is not an error:
/// its [`Report`] says so.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The command line names something unusable (our user's fault).
    #[error("invalid option: {0}")]
    Usage(String),
    /// The seed file is missing or malformed.
    #[error(transparent)]
    Seed(#[from] seed::SeedError),
    /// Postgres could not be reached or queried during setup.
    #[error(transparent)]
    History(#[from] history::HistoryError),
    /// The JSON report could not be written.
    #[error("cannot write report {path}: {source}")]
    WriteReport {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
