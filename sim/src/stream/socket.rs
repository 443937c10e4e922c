//! The server side of a one-way WebSocket, as coderd's `OneWayWebSocketEventSender` runs it.
//!
//! The server only writes. It pings every 15 s with a decimal counter and closes with 1001
//! `Ping failed` when the previous ping got no pong; it reads only to police the client: a
//! data message closes with 1002 (envelope era) or 1008 (array era, `CloseRead`), a read error
//! with 1011. A write that takes longer than 10 s closes with 1011.

use std::time::Duration;

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::wire::Framing;

/// An upgraded server connection.
pub type ServerSocket = WebSocketStream<TokioIo<Upgraded>>;

const PING_INTERVAL: Duration = Duration::from_secs(15);
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// What the reader saw.
#[derive(Debug)]
pub enum Inbound {
    Pong,
    /// The client pinged; its pong is queued and goes out with the next flush.
    Ping,
    /// A text or binary message, which a one-way stream does not accept.
    Data,
    ReadError,
    Closed,
}

/// Something the socket needs attention for, besides sending events.
#[derive(Debug)]
pub enum Tick {
    Heartbeat,
    Inbound(Inbound),
}

/// The socket is done; the caller stops producing frames.
#[derive(Debug, thiserror::Error)]
#[error("websocket closed")]
pub struct SocketClosed;

pub struct OneWaySocket {
    sink: SplitSink<ServerSocket, Message>,
    inbound: mpsc::Receiver<Inbound>,
    reader: JoinHandle<()>,
    heartbeat: tokio::time::Interval,
    pings_sent: u64,
    awaiting_pong: bool,
    framing: Framing,
}

impl Drop for OneWaySocket {
    fn drop(&mut self) {
        self.reader.abort();
    }
}

impl OneWaySocket {
    pub fn new(ws: ServerSocket, framing: Framing) -> OneWaySocket {
        let (sink, stream) = ws.split();
        let (tx, inbound) = mpsc::channel(8);
        let reader = tokio::spawn(read_loop(stream, tx));
        let start = tokio::time::Instant::now() + PING_INTERVAL;
        let heartbeat = tokio::time::interval_at(start, PING_INTERVAL);
        OneWaySocket {
            sink,
            inbound,
            reader,
            heartbeat,
            pings_sent: 0,
            awaiting_pong: false,
            framing,
        }
    }

    /// Sends one text message, closing with 1011 if the write stalls or fails.
    pub async fn send_text(&mut self, text: String) -> Result<(), SocketClosed> {
        match tokio::time::timeout(WRITE_TIMEOUT, self.sink.send(Message::text(text))).await {
            Ok(Ok(())) => Ok(()),
            _ => {
                self.close(CloseCode::Error, "Unable to send newest message")
                    .await;
                Err(SocketClosed)
            }
        }
    }

    /// Waits for the next heartbeat or client message. Cancel-safe, so it can race the
    /// event source in a `select!`.
    pub async fn next_tick(&mut self) -> Tick {
        tokio::select! {
            _ = self.heartbeat.tick() => Tick::Heartbeat,
            inbound = self.inbound.recv() => Tick::Inbound(inbound.unwrap_or(Inbound::Closed)),
        }
    }

    /// Acts on a tick; `Err` means the socket is finished.
    pub async fn handle(&mut self, tick: Tick) -> Result<(), SocketClosed> {
        match tick {
            Tick::Heartbeat => {
                if self.awaiting_pong {
                    self.close(CloseCode::Away, "Ping failed").await;
                    return Err(SocketClosed);
                }
                self.pings_sent += 1;
                self.awaiting_pong = true;
                let payload = self.pings_sent.to_string().into_bytes();
                let sent = self.sink.send(Message::Ping(payload.into()));
                match tokio::time::timeout(WRITE_TIMEOUT, sent).await {
                    Ok(Ok(())) => Ok(()),
                    _ => Err(SocketClosed),
                }
            }
            Tick::Inbound(Inbound::Pong) => {
                self.awaiting_pong = false;
                Ok(())
            }
            Tick::Inbound(Inbound::Ping) => {
                let _ = tokio::time::timeout(WRITE_TIMEOUT, self.sink.flush()).await;
                Ok(())
            }
            Tick::Inbound(Inbound::Data) => {
                match self.framing {
                    Framing::Envelope => {
                        let reason = "Clients cannot send messages for one-way WebSockets";
                        self.close(CloseCode::Protocol, reason).await;
                    }
                    Framing::Array => {
                        self.close(CloseCode::Policy, "unexpected data message")
                            .await;
                    }
                }
                Err(SocketClosed)
            }
            Tick::Inbound(Inbound::ReadError) => {
                self.close(
                    CloseCode::Error,
                    "Unable to process invalid message from client",
                )
                .await;
                Err(SocketClosed)
            }
            Tick::Inbound(Inbound::Closed) => Err(SocketClosed),
        }
    }

    /// Sends a close frame (best effort) and shuts the write side.
    pub async fn close(&mut self, code: CloseCode, reason: &str) {
        let frame = CloseFrame {
            code,
            reason: reason.to_string().into(),
        };
        let closing = async {
            let _ = self.sink.send(Message::Close(Some(frame))).await;
            let _ = self.sink.close().await;
        };
        let _ = tokio::time::timeout(WRITE_TIMEOUT, closing).await;
    }
}

async fn read_loop(mut stream: SplitStream<ServerSocket>, tx: mpsc::Sender<Inbound>) {
    while let Some(message) = stream.next().await {
        let inbound = match message {
            Ok(Message::Pong(_)) => Inbound::Pong,
            Ok(Message::Ping(_)) => Inbound::Ping,
            Ok(Message::Text(_)) | Ok(Message::Binary(_)) => Inbound::Data,
            Ok(Message::Close(_)) => Inbound::Closed,
            Ok(Message::Frame(_)) => continue,
            Err(_) => Inbound::ReadError,
        };
        let last = !matches!(inbound, Inbound::Pong | Inbound::Ping);
        if tx.send(inbound).await.is_err() || last {
            return;
        }
    }
    let _ = tx.send(Inbound::Closed).await;
}
