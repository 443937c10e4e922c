//! `GET /chats/{chat}/stream`: parse `after_id`, upgrade, Subscribe, then write the snapshot
//! in frames of at most 256 events followed by live batches.

use std::sync::Arc;

use bytes::Bytes;
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

use super::query;
use super::response::{self, HttpResponse};
use crate::gojson;
use crate::replica::Replica;
use crate::store;
use crate::stream::relay::RELAY_SOURCE_HEADER;
use crate::stream::socket::{OneWaySocket, ServerSocket};
use crate::stream::subscribe::subscribe;
use crate::wire::event::{frame, StreamEvent};
use crate::wire::Framing;

/// `chatStreamBatchSize`: events per WebSocket message.
pub const BATCH_SIZE: usize = 256;

/// The stream handler. The target (envelope) upgrades first and subscribes afterwards; the
/// array era (PR #24148) subscribes before the upgrade.
pub async fn stream(
    replica: Arc<Replica>,
    chat_id: Uuid,
    mut req: Request<Incoming>,
) -> HttpResponse {
    let after_id = match query::get(req.uri().query(), "after_id").filter(|v| !v.is_empty()) {
        None => 0,
        Some(raw) => match gojson::parse_int64(&raw) {
            Ok(id) => id,
            Err(detail) => {
                let message = "Invalid after_id parameter.";
                return response::error(StatusCode::BAD_REQUEST, message, Some(&detail));
            }
        },
    };
    let headers = req.headers().clone();
    if let Some(source) = headers
        .get(RELAY_SOURCE_HEADER)
        .and_then(|v| v.to_str().ok())
    {
        tracing::debug!(chat.id = %chat_id, relay.source = source, "relay stream opened");
    }
    let framing = replica.settings.framing;
    let early = match framing {
        Framing::Array => Some(subscribe(replica.clone(), chat_id, &headers, after_id).await),
        Framing::Envelope => None,
    };
    let (accepted, on_upgrade) = match accept(&mut req) {
        Ok(upgrade) => upgrade,
        Err(rejection) => return rejection,
    };
    tokio::spawn(async move {
        let Some(ws) = upgraded(on_upgrade).await else {
            return;
        };
        let mut socket = OneWaySocket::new(ws, framing);
        let subscribed = match early {
            Some(subscribed) => subscribed,
            None => subscribe(replica.clone(), chat_id, &headers, after_id).await,
        };
        tracing::debug!(chat.id = %chat_id, after_id, snapshot = subscribed.snapshot.len(),
            "stream subscribed");
        mark_read(&replica, chat_id).await;
        let _ = write_stream(&mut socket, subscribed.snapshot, subscribed.events, framing).await;
        mark_read(&replica, chat_id).await;
    });
    accepted
}

/// Sends the snapshot, then batches live events until the subscription or the socket ends.
async fn write_stream(
    socket: &mut OneWaySocket,
    snapshot: Vec<StreamEvent>,
    mut events: tokio::sync::mpsc::Receiver<StreamEvent>,
    framing: Framing,
) -> Result<(), crate::stream::socket::SocketClosed> {
    for chunk in snapshot.chunks(BATCH_SIZE) {
        socket.send_text(frame(chunk, framing)).await?;
    }
    loop {
        tokio::select! {
            first = events.recv() => {
                let Some(first) = first else {
                    socket.close(CloseCode::Normal, "Connection closed").await;
                    return Ok(());
                };
                // Wait for one event, then take what is ready, up to a full batch.
                let mut batch = vec![first];
                while batch.len() < BATCH_SIZE {
                    match events.try_recv() {
                        Ok(event) => batch.push(event),
                        Err(_) => break,
                    }
                }
                socket.send_text(frame(&batch, framing)).await?;
            }
            tick = socket.next_tick() => socket.handle(tick).await?,
        }
    }
}

/// `markChatAsRead`, on connect and on disconnect; a failure only costs the unread marker.
async fn mark_read(replica: &Replica, chat_id: Uuid) {
    let result = match replica.pool.get().await {
        Ok(conn) => store::mark_read(&*conn, chat_id).await,
        Err(e) => Err(e.into()),
    };
    if let Err(e) = result {
        tracing::debug!(chat.id = %chat_id, error = %e, "mark read failed");
    }
}

/// `websocket.Accept` with no options allows only a same-origin browser: a request with an
/// `Origin` header whose host is not the request's `Host` (ASCII case folded) gets 403 with a
/// plain-text reason, as the library's `http.Error` writes it. Clients that send no `Origin`
/// (CLIs, the relay, chatload) are not affected.
fn same_origin(headers: &http::HeaderMap) -> Result<(), HttpResponse> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(());
    };
    let origin = String::from_utf8_lossy(origin.as_bytes()).into_owned();
    let host = headers
        .get(header::HOST)
        .map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned())
        .unwrap_or_default();
    // The authority of `scheme://authority/...`, without user info; none for `null` and the like.
    let origin_host = origin
        .split_once("://")
        .map(|(_, rest)| rest.split(['/', '?', '#']).next().unwrap_or(""))
        .map(|authority| authority.rsplit('@').next().unwrap_or(""))
        .unwrap_or("");
    if !origin_host.is_empty() && origin_host.eq_ignore_ascii_case(&host) {
        return Ok(());
    }
    let reason = if origin_host.is_empty() {
        format!(
            "request Origin {} is not a valid URL with a host",
            gojson::quote(&origin)
        )
    } else {
        format!(
            "request Origin {} is not authorized for Host {}",
            gojson::quote(origin_host),
            gojson::quote(&host)
        )
    };
    let mut refusal = response::text(
        StatusCode::FORBIDDEN,
        "text/plain; charset=utf-8",
        format!("{reason}\n"),
    );
    refusal.headers_mut().insert(
        header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    Err(refusal)
}

/// Validates a WebSocket upgrade request and builds the 101 response.
pub(super) fn accept(
    req: &mut Request<Incoming>,
) -> Result<(HttpResponse, OnUpgrade), HttpResponse> {
    let headers = req.headers();
    let has_token = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|v| {
            v.to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    let version_ok = headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_some_and(|v| v == "13");
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| k.as_bytes().to_vec());
    let (true, true, true, Some(key)) = (
        has_token(header::CONNECTION, "upgrade"),
        has_token(header::UPGRADE, "websocket"),
        version_ok,
        key,
    ) else {
        let detail = "not a WebSocket upgrade request";
        return Err(response::internal("Failed to open chat stream.", detail));
    };
    same_origin(headers)?;
    let accepted = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(header::SEC_WEBSOCKET_ACCEPT, derive_accept_key(&key))
        .body(response::full(Bytes::new()))
        .expect("static response parts");
    Ok((accepted, hyper::upgrade::on(req)))
}

/// Completes the upgrade; `None` when the client went away first.
pub(super) async fn upgraded(on_upgrade: OnUpgrade) -> Option<ServerSocket> {
    match on_upgrade.await {
        Ok(upgraded) => {
            let io = TokioIo::new(upgraded);
            Some(WebSocketStream::from_raw_socket(io, Role::Server, None).await)
        }
        Err(e) => {
            tracing::debug!(error = %e, "websocket upgrade failed");
            None
        }
    }
}
