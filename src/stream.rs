//! One stream subscriber: authorization, the WebSocket handshake, the snapshot and the live
//! loop, in coderd's framing and order.
//!
//! Durable messages are pulled from the chat's ring by cursor when a [`Signal::Durable`]
//! arrives, so a slow subscriber can lag without losing any; ephemeral events travel through a
//! bounded queue, and a subscriber that overflows it gets coderd's `dropped messages` error and
//! is closed, after which the client reconnects with its `after_id`.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Error as WsError;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use uuid::Uuid;

use crate::authz::Credentials;
use crate::chat::{Chat, Phase, Signal, Subscription};
use crate::config::Framing;
use crate::db::ReadReason;
use crate::proxy::{self, Body};
use crate::route::{foreign_origin, parse_after_id};
use crate::wire::{self, MAX_EVENTS_PER_FRAME};
use crate::App;

type Ws = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// Why a subscription is handed to coderd untouched (`chatcache_fail_open_total{reason}`).
pub const FAIL_OPEN_REASONS: [&str; 6] = [
    "authz_error",
    "listen_down",
    "content_version",
    "feed",
    "below_floor_read",
    "refresh_timeout",
];

/// Answers `GET /api/experimental/chats/{chat}/stream`, or hands it to coderd untouched.
pub async fn handle(
    app: Arc<App>,
    mut req: Request<Incoming>,
    chat_id: Uuid,
    peer: SocketAddr,
) -> Response<Body> {
    let Some(key) = websocket_key(&req) else {
        // Not a WebSocket handshake: coderd decides what that means.
        return proxy::forward(&app, req, peer).await;
    };
    let query = req.uri().query().map(str::to_owned);
    let creds = Credentials::from_request(req.headers(), query.as_deref());

    // coderd authenticates and looks the chat up before it parses after_id, so ask it first.
    match app.authz.check(chat_id, &creds).await {
        Ok(Ok(())) => {}
        Ok(Err(denied)) => {
            tracing::debug!(chat.id = %chat_id, status = denied.0.status().as_u16(), "stream denied by coderd");
            return denied.0.map(proxy::full);
        }
        Err(e) => {
            tracing::warn!(chat.id = %chat_id, error = %e, "authorization probe failed; failing open");
            return fail_open(&app, req, peer, chat_id, "authz_error").await;
        }
    }
    let after_id = match parse_after_id(query.as_deref()) {
        Ok(id) => id,
        Err(detail) => {
            return proxy::json_error(
                StatusCode::BAD_REQUEST,
                "Invalid after_id parameter.",
                &detail,
            );
        }
    };
    let headers = req.headers();
    let origin = headers.get(header::ORIGIN).map(|v| v.as_bytes());
    if let Some(reason) = foreign_origin(origin, headers.get(header::HOST).map(|v| v.as_bytes())) {
        tracing::debug!(chat.id = %chat_id, "cross-origin stream refused as coderd does");
        return Response::builder()
            .status(StatusCode::FORBIDDEN)
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .header(header::X_CONTENT_TYPE_OPTIONS, "nosniff")
            .body(proxy::full(Bytes::from(format!("{reason}\n"))))
            .expect("static response");
    }
    if !app.listener.is_up() {
        return fail_open(&app, req, peer, chat_id, "listen_down").await;
    }
    if app.cache.is_left_to_coderd(&chat_id) {
        return fail_open(&app, req, peer, chat_id, "content_version").await;
    }

    let Some(chat) = ready_chat(&app, chat_id, &creds).await else {
        return fail_open(&app, req, peer, chat_id, "feed").await;
    };
    let (subscription, snapshot) = match subscribe(&app, &chat, after_id, creds).await {
        Ok(s) => s,
        Err(reason) => return fail_open(&app, req, peer, chat_id, reason).await,
    };

    let upgrade = hyper::upgrade::on(&mut req);
    let shutdown = app.shutdown.subscribe();
    let app2 = app.clone();
    tokio::spawn(async move {
        match upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(wire::websocket_config()),
                )
                .await;
                serve(app2, chat, subscription, snapshot, ws, shutdown).await;
            }
            Err(e) => {
                tracing::debug!(chat.id = %chat.id, error = %e, "client left during the upgrade");
                chat.lock().unsubscribe(subscription.id);
                app2.metrics.subscribers.dec();
            }
        }
    });
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(header::CONNECTION, "Upgrade")
        .header(header::UPGRADE, "websocket")
        .header(
            header::SEC_WEBSOCKET_ACCEPT,
            derive_accept_key(key.as_bytes()),
        )
        .body(proxy::empty())
        .expect("static response")
}

/// The handshake key, when this is a valid WebSocket upgrade request.
fn websocket_key(req: &Request<Incoming>) -> Option<String> {
    let h = req.headers();
    if !proxy::has_token(h, header::CONNECTION, "upgrade")
        || !proxy::has_token(h, header::UPGRADE, "websocket")
    {
        return None;
    }
    if h.get(header::SEC_WEBSOCKET_VERSION).map(|v| v.as_bytes()) != Some(b"13") {
        return None;
    }
    h.get(header::SEC_WEBSOCKET_KEY)?
        .to_str()
        .ok()
        .map(str::to_owned)
}

async fn fail_open(
    app: &App,
    req: Request<Incoming>,
    peer: SocketAddr,
    chat_id: Uuid,
    reason: &'static str,
) -> Response<Body> {
    app.metrics.fail_opens.with_label_values(&[reason]).inc();
    app.metrics.catchups.with_label_values(&["fail_open"]).inc();
    tracing::warn!(chat.id = %chat_id, reason, "stream passed to coderd");
    proxy::forward(app, req, peer).await
}

/// Finds or creates the chat and waits until its first snapshot is in.
async fn ready_chat(app: &Arc<App>, chat_id: Uuid, creds: &Credentials) -> Option<Arc<Chat>> {
    let (chat, created) = app.cache.get_or_create(chat_id);
    if created {
        tokio::spawn(crate::feed::run_chat(
            app.feed.clone(),
            chat.clone(),
            creds.clone(),
        ));
    }
    let mut phase = chat.phase();
    let wait = async move {
        phase
            .wait_for(|p| *p != Phase::Loading)
            .await
            .map(|p| p.clone())
    };
    match tokio::time::timeout(app.feed.connect_timeout * 3, wait).await {
        Ok(Ok(Phase::Ready)) => Some(chat),
        _ => None,
    }
}

/// Registers the subscriber and builds its snapshot; below the floor, one database read.
async fn subscribe(
    app: &App,
    chat: &Arc<Chat>,
    after_id: i64,
    creds: Credentials,
) -> Result<(Subscription, Vec<Bytes>), &'static str> {
    let queue = app.config().stream.subscriber_queue_events;
    // While an edit's history is being re-read, the ring still holds the old one: wait for it,
    // as coderd would have read the new history for a client connecting now.
    let deadline = tokio::time::Instant::now() + app.feed.connect_timeout;
    loop {
        let attempt = {
            let mut state = chat.lock();
            if state.refreshing {
                None
            } else {
                Some(state.subscribe(after_id, creds.clone(), queue, None))
            }
        };
        match attempt {
            Some(Some(done)) => {
                app.metrics.catchups.with_label_values(&["hit"]).inc();
                app.metrics.subscribers.inc();
                return Ok(done);
            }
            Some(None) => break,
            None if tokio::time::Instant::now() > deadline => return Err("refresh_timeout"),
            None => tokio::time::sleep(Duration::from_millis(5)).await,
        }
    }
    app.metrics
        .catchups
        .with_label_values(&["below_floor"])
        .inc();
    let rows = app
        .cache
        .read_events(ReadReason::BelowFloor, chat.id, after_id)
        .await
        .map_err(|e| {
            if let crate::cache::FillError::Unsupported(why) = &e {
                app.cache.leave_to_coderd(chat, why);
                return "content_version";
            }
            tracing::warn!(chat.id = %chat.id, error = %e, "below-floor read failed");
            "below_floor_read"
        })?;
    let mut state = chat.lock();
    let floor = state.ring.floor;
    let older: Vec<Bytes> = rows
        .into_iter()
        .filter(|(id, _)| *id <= floor)
        .map(|r| r.1)
        .collect();
    let done = state
        .subscribe(after_id, creds, queue, Some(older))
        .ok_or("below_floor")?;
    app.metrics.subscribers.inc();
    Ok(done)
}

/// The live loop of one subscriber.
async fn serve(
    app: Arc<App>,
    chat: Arc<Chat>,
    mut sub: Subscription,
    snapshot: Vec<Bytes>,
    mut ws: Ws,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let framing = app.framing;
    let ping_every = Duration::from_millis(app.config().stream.ping_interval_ms);
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + ping_every, ping_every);
    let mut pings = 0u64;
    let end = 'live: {
        if send_events(&mut ws, framing, snapshot).await.is_err() {
            break 'live End::Gone;
        }
        loop {
            tokio::select! {
                signal = sub.rx.recv() => {
                    let Some(signal) = signal else {
                        break 'live if sub.overflowed.load(Ordering::Acquire) {
                            End::Overflow
                        } else {
                            End::Dropped
                        }
                    };
                    let mut batch = Vec::new();
                    let mut lagged = collect(&chat, &mut sub, signal, &mut batch).is_err();
                    while batch.len() < MAX_EVENTS_PER_FRAME && !lagged {
                        match sub.rx.try_recv() {
                            Ok(s) => lagged = collect(&chat, &mut sub, s, &mut batch).is_err(),
                            Err(_) => break,
                        }
                    }
                    if lagged {
                        // What it already has goes out; the error then makes it reconnect
                        // with its after_id and read what the ring no longer holds.
                        let _ = send_events(&mut ws, framing, batch).await;
                        break 'live End::Overflow;
                    }
                    match send_events(&mut ws, framing, batch).await {
                        Ok(()) => {}
                        Err(Stall::Timeout) => break 'live End::WriteTimeout,
                        Err(Stall::Closed) => break 'live End::Gone,
                    }
                }
                msg = ws.next() => match msg {
                    Some(Ok(Message::Text(_) | Message::Binary(_))) => break 'live End::ClientData,
                    Some(Err(WsError::Protocol(_) | WsError::Capacity(_))) => {
                        break 'live End::InvalidFromClient
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => break 'live End::Gone,
                    Some(Ok(_)) => {}
                },
                _ = ping.tick() => {
                    pings += 1;
                    let payload = Bytes::from(pings.to_string());
                    if ws.send(Message::Ping(payload)).await.is_err() {
                        break 'live End::Gone;
                    }
                }
                _ = crate::shutdown_started(&mut shutdown) => break 'live End::Shutdown,
            }
        }
    };
    chat.lock().unsubscribe(sub.id);
    finish(&app, &chat, &mut ws, end).await;
    // Counted down only once the close frame is out: shutdown waits for this to reach zero.
    app.metrics.subscribers.dec();
}

enum End {
    Gone,
    /// A write did not finish in 10 s: coderd closes such a client with 1011.
    WriteTimeout,
    ClientData,
    /// The client broke the WebSocket protocol (unmasked frame, reserved opcode, oversized
    /// control frame, ...): coderd's read fails and it closes with 1011.
    InvalidFromClient,
    Overflow,
    Dropped,
    Shutdown,
}

async fn finish(app: &App, chat: &Chat, ws: &mut Ws, end: End) {
    let close = |code: CloseCode, reason: &'static str| {
        Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }))
    };
    let msg = match end {
        End::Gone => return,
        End::ClientData => match app.framing {
            Framing::Envelope => close(
                CloseCode::Protocol,
                "Clients cannot send messages for one-way WebSockets",
            ),
            Framing::Array => close(CloseCode::Policy, "unexpected data message"),
        },
        End::Overflow | End::Dropped => {
            if matches!(end, End::Overflow) {
                app.metrics.overflow_closes.inc();
                tracing::warn!(chat.id = %chat.id, "subscriber too slow; closing so it reconnects");
            }
            let event = wire::error_event(chat.id, "dropped messages");
            let _ = send_events(ws, app.framing, vec![event]).await;
            close(CloseCode::Normal, "Connection closed")
        }
        End::Shutdown => close(CloseCode::Away, "server shutting down"),
        End::InvalidFromClient => close(
            CloseCode::Error,
            "Unable to process invalid message from client",
        ),
        End::WriteTimeout => {
            app.metrics.overflow_closes.inc();
            tracing::warn!(chat.id = %chat.id, "subscriber stopped reading; closing");
            close(CloseCode::Error, "Unable to send newest message")
        }
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.send(msg)).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), ws.close(None)).await;
}

/// Turns one signal into events for the next frame.
fn collect(
    chat: &Chat,
    sub: &mut Subscription,
    signal: Signal,
    out: &mut Vec<Bytes>,
) -> Result<(), crate::chat::Lagged> {
    match signal {
        Signal::Event(e) => out.push(e),
        Signal::Durable => out.extend(chat.lock().pull(&mut sub.cursor)?),
        Signal::Replay => out.extend(chat.lock().replay(&mut sub.cursor)),
    }
    Ok(())
}

/// Why a write failed.
enum Stall {
    Closed,
    Timeout,
}

/// Sends events in frames of at most 256, each write bounded like coderd's (10 s).
async fn send_events(ws: &mut Ws, framing: Framing, events: Vec<Bytes>) -> Result<(), Stall> {
    for chunk in events.chunks(MAX_EVENTS_PER_FRAME) {
        let frame = wire::frame(framing, chunk);
        let text = String::from_utf8(frame).map_err(|_| Stall::Closed)?;
        let write = ws.send(Message::Text(text.into()));
        match tokio::time::timeout(Duration::from_secs(10), write).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(Stall::Closed),
            Err(_) => return Err(Stall::Timeout),
        }
    }
    Ok(())
}
