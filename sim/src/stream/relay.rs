//! The enterprise relay: `message_part` deltas exist only in the worker replica's memory, so a
//! subscriber elsewhere dials the worker's ordinary stream endpoint with the client's own
//! credentials and forwards the parts it receives. Durable events keep coming via pubsub.

use std::sync::Arc;

use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue};
use serde_json::Value;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use uuid::Uuid;

use crate::gojson;
use crate::replica::Replica;
use crate::wire::event::{EventKind, StreamEvent};

/// Marks a stream request as opened by another replica's relay.
pub const RELAY_SOURCE_HEADER: &str = "X-Coder-Relay-Source-Replica";
/// The headers a relay passes on from the original request.
const FORWARDED_HEADERS: [&str; 3] = ["Coder-Session-Token", "Authorization", "Cookie"];
/// Buffered relayed parts per subscriber.
const RELAY_CHANNEL: usize = 128;

/// Failures dialing or reading the worker's stream. They end only the relay, never the
/// subscriber: parts are previews, and the durable messages still arrive via pubsub.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("build relay request: {0}")]
    Request(#[from] tokio_tungstenite::tungstenite::Error),
    #[error("dial worker replica: {0}")]
    Dial(#[from] std::io::Error),
}

/// One subscriber's relay; at most one dial is active, to the replica running the chat.
pub struct Relay {
    replica: Arc<Replica>,
    chat_id: Uuid,
    /// The credentials of the request that opened the subscription.
    auth: HeaderMap,
    active: Option<(Uuid, JoinHandle<()>, mpsc::Receiver<StreamEvent>)>,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Relay {
    pub fn new(replica: Arc<Replica>, chat_id: Uuid, request_headers: &HeaderMap) -> Relay {
        let mut auth = HeaderMap::new();
        for name in FORWARDED_HEADERS {
            for value in request_headers.get_all(name) {
                auth.append(name, value.clone());
            }
        }
        Relay {
            replica,
            chat_id,
            auth,
            active: None,
        }
    }

    /// Follows the chat's status: relay from the worker while another known replica runs
    /// it, stop otherwise.
    pub fn update(&mut self, status: &str, worker_id: Option<Uuid>) {
        let remote =
            worker_id.filter(|w| status == "running" && self.replica.peer_for_worker(*w).is_some());
        match remote {
            Some(worker) if self.active.as_ref().is_some_and(|(w, ..)| *w == worker) => {}
            Some(worker) => {
                self.stop();
                self.start(worker);
            }
            None => self.stop(),
        }
    }

    /// The next relayed part; pending forever while no relay is active.
    pub async fn recv(&mut self) -> StreamEvent {
        match self.active.as_mut() {
            Some((_, _, rx)) => match rx.recv().await {
                Some(event) => event,
                None => {
                    self.active = None;
                    std::future::pending().await
                }
            },
            None => std::future::pending().await,
        }
    }

    fn start(&mut self, worker_id: Uuid) {
        let Some(peer) = self.replica.peer_for_worker(worker_id) else {
            return;
        };
        let (tx, rx) = mpsc::channel(RELAY_CHANNEL);
        let url = format!(
            "ws://{}/api/experimental/chats/{}/stream",
            peer.addr, self.chat_id
        );
        let mut auth = self.auth.clone();
        let source = self.replica.worker_id.to_string();
        auth.insert(
            RELAY_SOURCE_HEADER,
            HeaderValue::from_str(&source).expect("uuid header"),
        );
        let chat_id = self.chat_id;
        let peer_name = peer.name.clone();
        let task = tokio::spawn(async move {
            tracing::debug!(chat.id = %chat_id, peer = %peer_name, "relay dialing worker replica");
            if let Err(e) = forward_parts(&url, auth, tx).await {
                tracing::debug!(chat.id = %chat_id, peer = %peer_name, error = %e, "relay ended");
            }
        });
        self.active = Some((worker_id, task, rx));
    }

    fn stop(&mut self) {
        if let Some((_, task, _)) = self.active.take() {
            task.abort();
        }
    }
}

/// Dials the worker's stream and forwards its `message_part` events until either side ends.
async fn forward_parts(
    url: &str,
    auth: HeaderMap,
    tx: mpsc::Sender<StreamEvent>,
) -> Result<(), RelayError> {
    let mut request = url.into_client_request()?;
    request.headers_mut().extend(auth);
    let host = request
        .uri()
        .authority()
        .map(|a| a.to_string())
        .unwrap_or_default();
    let tcp = TcpStream::connect(host).await?;
    let (mut ws, _) = tokio_tungstenite::client_async(request, tcp).await?;
    while let Some(message) = ws.next().await {
        let text = match message? {
            Message::Text(text) => text,
            Message::Close(_) => break,
            _ => continue,
        };
        for event in parts_in_frame(text.as_str()) {
            if tx.send(event).await.is_err() {
                return Ok(());
            }
        }
    }
    Ok(())
}

/// Extracts the `message_part` events of one frame, in either framing.
fn parts_in_frame(text: &str) -> Vec<StreamEvent> {
    let Ok(frame) = serde_json::from_str::<Value>(text) else {
        return Vec::new();
    };
    let events = match frame {
        Value::Array(events) => events,
        Value::Object(mut envelope) if envelope.get("type") == Some(&"data".into()) => {
            match envelope.remove("data") {
                Some(Value::Array(events)) => events,
                _ => Vec::new(),
            }
        }
        _ => Vec::new(),
    };
    events
        .into_iter()
        .filter(|e| e.get("type").and_then(Value::as_str) == Some("message_part"))
        .map(|e| StreamEvent::relayed(EventKind::MessagePart, gojson::to_string(&e)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_parts_are_taken_from_a_frame() {
        let frame = r#"{"type":"data","data":[{"type":"status","chat_id":"x","status":{"status":"running"}},{"type":"message_part","chat_id":"x","message_part":{"part":{"type":"text","text":"a<b"}}}]}"#;
        let parts = parts_in_frame(frame);
        assert_eq!(parts.len(), 1);
        assert_eq!(
            &*parts[0].json,
            r#"{"type":"message_part","chat_id":"x","message_part":{"part":{"type":"text","text":"a\u003cb"}}}"#
        );
    }
}
