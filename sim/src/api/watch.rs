//! `GET /chats/watch`: the owner's chat lifecycle events from `chat:owner:{owner_id}`, each
//! sent as an envelope `data` frame, after one `{"type":"ping","data":null}` that confirms
//! the subscription.

use std::sync::Arc;

use http::Request;
use hyper::body::Incoming;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use uuid::Uuid;

use super::response::{self, HttpResponse};
use super::stream::{accept, upgraded};
use crate::replica::Replica;
use crate::stream::socket::OneWaySocket;
use crate::wire::notify::owner_channel;
use crate::wire::Framing;

pub async fn watch(
    replica: Arc<Replica>,
    user_id: Uuid,
    mut req: Request<Incoming>,
) -> HttpResponse {
    let mut subscription = match replica.listener.subscribe(&owner_channel(user_id)).await {
        Ok(subscription) => subscription,
        Err(e) => return response::internal("Failed to subscribe to chat events.", &e.to_string()),
    };
    let (accepted, on_upgrade) = match accept(&mut req) {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection,
    };
    tokio::spawn(async move {
        let Some(ws) = upgraded(on_upgrade).await else {
            return;
        };
        let mut socket = OneWaySocket::new(ws, Framing::Envelope);
        if socket
            .send_text("{\"type\":\"ping\",\"data\":null}\n".into())
            .await
            .is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                delivery = subscription.rx.recv() => {
                    let Some(Ok(payload)) = delivery else {
                        socket.close(CloseCode::Normal, "Connection closed").await;
                        return;
                    };
                    let frame = format!("{{\"type\":\"data\",\"data\":{payload}}}\n");
                    if socket.send_text(frame).await.is_err() {
                        return;
                    }
                }
                tick = socket.next_tick() => {
                    if socket.handle(tick).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    accepted
}
