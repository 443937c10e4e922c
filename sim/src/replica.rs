//! One replica's shared context: its identity, settings and the machinery every request,
//! subscriber and worker turn uses.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::db::Pool;
use crate::metrics::Metrics;
use crate::pubsub::listener::Listener;
use crate::pubsub::publisher::Publisher;
use crate::stream::state::StreamStates;
use crate::wire::Framing;

/// Behaviour switches of `coderd-sim serve`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The replica's name; its `worker_id` is derived from it.
    pub name: String,
    pub framing: Framing,
    /// Whether message notifies may be served from the #23218 durable cache.
    pub stream_cache: bool,
    /// Whether this replica claims and runs pending chats.
    pub worker: bool,
    /// Text deltas streamed per worker turn.
    pub turn_parts: u32,
    /// Pause between two deltas.
    pub part_delay: Duration,
    /// Base URL clients reach this replica at; named in `WWW-Authenticate`.
    pub access_url: String,
    /// Connections in the replica's query pool (coderd's default pool is larger; tests that
    /// run many replicas side by side keep it small).
    pub db_pool_size: u32,
    /// How long a running chat may go without a heartbeat before it is claimed again.
    pub stale_chat: Duration,
}

/// A peer replica, found by the `worker_id` its name derives to.
#[derive(Debug, Clone)]
pub struct Peer {
    pub name: String,
    /// `host:port` of the peer's listener.
    pub addr: String,
}

/// Everything a replica's tasks share.
pub struct Replica {
    pub settings: Settings,
    pub worker_id: Uuid,
    pub pool: Pool,
    pub listener: Listener,
    pub publisher: Publisher,
    pub streams: Arc<StreamStates>,
    pub metrics: Metrics,
    /// Peers by `worker_id`, so a relay can dial the replica that runs a chat.
    pub peers: HashMap<Uuid, Peer>,
    /// Wakes the worker early when this replica made a chat pending.
    pub worker_wake: Notify,
}

impl Replica {
    /// The address of the replica running a chat, when it is a known peer other than us.
    pub fn peer_for_worker(&self, worker_id: Uuid) -> Option<&Peer> {
        if worker_id == self.worker_id {
            return None;
        }
        self.peers.get(&worker_id)
    }
}

/// The `worker_id` of a replica name (CONTRACTS.md): the first 16 bytes of
/// sha256("coderd-sim/" + name) made into an RFC 4122 version-4 UUID.
pub fn worker_id_for(name: &str) -> Uuid {
    let digest = Sha256::digest(format!("coderd-sim/{name}").as_bytes());
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    Uuid::from_bytes(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn worker_id_is_a_version_4_uuid() {
        let id = worker_id_for("a");
        assert_eq!(id.get_version_num(), 4);
        assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
        assert_eq!(id, worker_id_for("a"));
        assert_ne!(id, worker_id_for("b"));
    }
}
