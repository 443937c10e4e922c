//! coderd's client-visible JSON: message parts, messages, stream events, notify payloads and
//! chats, each encoded in Go's key order with Go's omitempty rules.

pub mod chat;
pub mod event;
pub mod message;
pub mod notify;
pub mod part;

/// Which era of the stream the replica speaks. It decides both the WebSocket framing and the
/// shape of message parts (see CONTRACTS.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Framing {
    /// The target (March 18): `{"type":"data","data":[...]}` frames, parts after PR #23250.
    Envelope,
    /// After PR #24148: bare arrays, late-March part struct.
    Array,
}
