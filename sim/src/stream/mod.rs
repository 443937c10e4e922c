//! The chat message stream: per-chat state and cache ([`state`]), the Subscribe algorithm
//! ([`subscribe`]), the cross-replica part relay ([`relay`]) and the WebSocket it is written
//! to ([`socket`]).

pub mod relay;
pub mod socket;
pub mod state;
pub mod subscribe;
