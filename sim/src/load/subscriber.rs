//! One stream subscriber: a WebSocket to `GET .../chats/{chat}/stream`, kept open across turns,
//! reconnected with `after_id` = its newest held id whenever the stream ends or the chat's
//! driver asks for it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use http::HeaderValue;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tracing::{debug, warn};
use uuid::Uuid;

use super::api::SESSION_TOKEN_HEADER;
use super::frame::{self, EventKind, Frame};
use super::ledger::{CatchUp, Ledger, Receipt};
use super::options::{Framing, Target};
use super::report::{millis, Tally};

/// coderd's own client refuses frames above 4 MiB (protocol doc 4.7); so does chatload.
const MAX_FRAME_BYTES: usize = 4 << 20;
/// Read chunk per socket; tungstenite's 128 KiB default would dominate memory with thousands of
/// subscribers, while stream frames are mostly small.
const READ_BUFFER_BYTES: usize = 16 << 10;
/// How long the WebSocket handshake may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a closing handshake may take before the socket is just dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed connect, doubled per failure in a row up to `RETRY_MAX`.
const RETRY_MIN: Duration = Duration::from_millis(50);
const RETRY_MAX: Duration = Duration::from_secs(1);

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// What the chat's driver wants from its subscribers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Directive {
    /// Raised by one to make every subscriber close and reconnect.
    pub epoch: u64,
    /// Close and end the task.
    pub stop: bool,
}

/// Signals shared by a chat's driver and its subscribers.
pub struct ChatSignals {
    /// Bumped after every frame a subscriber took, so the driver re-checks without polling.
    pub progress: watch::Sender<u64>,
    pub directive: watch::Sender<Directive>,
}

impl Default for ChatSignals {
    fn default() -> Self {
        ChatSignals {
            progress: watch::Sender::new(0),
            directive: watch::Sender::new(Directive {
                epoch: 1,
                stop: false,
            }),
        }
    }
}

/// A subscriber's state, read by the driver between frames.
#[derive(Debug)]
pub struct SubscriberState {
    pub ledger: Ledger,
    /// Reconnects, errors and catch-up samples; faults and messages live in the ledger.
    pub tally: Tally,
    /// The epoch whose connection has caught up; the driver waits on it after a reconnect.
    pub caught_up_epoch: u64,
    catch_up: Option<CatchUp>,
    connect_epoch: u64,
    /// The ledger's edit count when the current connection's cursor was chosen.
    cursor_edits: u64,
    /// Whether the current connection delivered its first frame (the snapshot's start).
    snapshot_seen: bool,
}

impl SubscriberState {
    fn new(chat_id: Uuid) -> Self {
        SubscriberState {
            ledger: Ledger::new(chat_id),
            tally: Tally::default(),
            caught_up_epoch: 0,
            catch_up: None,
            connect_epoch: 0,
            cursor_edits: 0,
            snapshot_seen: false,
        }
    }
}

/// Shared between the subscriber task and its chat's driver. A std mutex: it is never held
/// across an `.await`, only while one frame is applied or one check runs.
pub type SharedState = Arc<Mutex<SubscriberState>>;

/// Locks a subscriber's state; a panic elsewhere cannot leave it half-updated in a way that
/// matters for counting, so a poisoned lock is used as is.
pub fn lock(state: &SharedState) -> MutexGuard<'_, SubscriberState> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Everything one subscription needs to connect.
pub struct Subscription {
    pub chat_id: Uuid,
    pub token: HeaderValue,
    pub targets: Arc<[Target]>,
    /// Index of the target for the first connect; each reconnect moves on by one.
    pub first_target: usize,
    pub framing: Framing,
    /// Ids Postgres showed as visible before the first connect: its catch-up target.
    pub initial_history: Vec<i64>,
}

/// How a connection ended.
enum End {
    /// The driver asked for a reconnect, or an edit overtook the connect (see `take_frame`).
    Redirected,
    /// The driver asked to stop.
    Stopped,
    /// The stream ended or failed; the text is counted as an error and the subscriber reconnects.
    Broken(String),
}

/// Starts a subscriber task and returns its shared state.
pub fn spawn(sub: Subscription, signals: Arc<ChatSignals>) -> (SharedState, JoinHandle<()>) {
    let state = Arc::new(Mutex::new(SubscriberState::new(sub.chat_id)));
    let task = tokio::spawn(follow(sub, state.clone(), signals));
    (state, task)
}

/// Connects, reads until the connection ends, and reconnects, until told to stop.
async fn follow(mut sub: Subscription, state: SharedState, signals: Arc<ChatSignals>) {
    let mut directive = signals.directive.subscribe();
    let mut connects = 0usize;
    let mut retry_delay = RETRY_MIN;
    loop {
        let Directive { epoch, stop } = *directive.borrow_and_update();
        if stop {
            return;
        }

        // Pick the cursor and the catch-up target before connecting. A reconnect while an
        // edit replay is awaited asks for everything: the snapshot then is the replay.
        let after_id = {
            let mut guard = lock(&state);
            let s = &mut *guard;
            let awaits_replay = s.ledger.awaits_replay();
            let target = match (connects, s.catch_up.take()) {
                (_, _) if awaits_replay => Vec::new(),
                (0, _) => std::mem::take(&mut sub.initial_history),
                (_, Some(unfinished)) => unfinished.into_target(),
                (_, None) => s.ledger.held().to_vec(),
            };
            s.catch_up = Some(CatchUp::new(Instant::now(), target));
            s.connect_epoch = epoch;
            s.cursor_edits = s.ledger.edits();
            s.snapshot_seen = false;
            if connects > 0 {
                s.tally.reconnects += 1;
            }
            if awaits_replay {
                0
            } else {
                s.ledger.last_id()
            }
        };
        let target = &sub.targets[(sub.first_target + connects) % sub.targets.len()];
        connects += 1;

        let end = match open(&sub, target, after_id).await {
            Ok(socket) => read(socket, &sub, &state, &signals, &mut directive).await,
            Err(err) => End::Broken(format!("connect: {err}")),
        };
        let reason = match end {
            End::Stopped => return,
            End::Redirected => continue,
            End::Broken(reason) => reason,
        };
        debug!(chat.id = %sub.chat_id, after_id, %reason, "stream ended, reconnecting");
        let never_caught_up = {
            let mut s = lock(&state);
            s.tally.error(reason);
            s.catch_up.is_some()
        };
        signals.progress.send_modify(|n| *n = n.wrapping_add(1));

        // A connection that caught up is replaced at once. One that failed before catching up
        // is retried after a pause that doubles each time; a new directive cuts it short.
        if never_caught_up {
            tokio::select! {
                _ = tokio::time::sleep(retry_delay) => {}
                _ = directive.changed() => {}
            }
            retry_delay = (retry_delay * 2).min(RETRY_MAX);
        } else {
            retry_delay = RETRY_MIN;
        }
    }
}

/// Opens the stream at `after_id` on one target.
async fn open(sub: &Subscription, target: &Target, after_id: i64) -> Result<Socket, String> {
    let url = format!(
        "{}/api/experimental/chats/{}/stream?after_id={after_id}",
        target.ws_base, sub.chat_id
    );
    let mut request = url.into_client_request().map_err(|err| err.to_string())?;
    request
        .headers_mut()
        .insert(SESSION_TOKEN_HEADER, sub.token.clone());
    let config = WebSocketConfig::default()
        .max_message_size(Some(MAX_FRAME_BYTES))
        .read_buffer_size(READ_BUFFER_BYTES);

    let handshake = tokio_tungstenite::connect_async_with_config(request, Some(config), true);
    match tokio::time::timeout(CONNECT_TIMEOUT, handshake).await {
        Ok(Ok((socket, _response))) => Ok(socket),
        Ok(Err(tungstenite::Error::Http(response))) => Err(format!("HTTP {}", response.status())),
        Ok(Err(err)) => Err(err.to_string()),
        Err(_) => Err("handshake timed out".to_owned()),
    }
}

/// Reads frames into the ledger until the connection ends or the driver redirects it.
async fn read(
    mut socket: Socket,
    sub: &Subscription,
    state: &SharedState,
    signals: &ChatSignals,
    directive: &mut watch::Receiver<Directive>,
) -> End {
    loop {
        let frame = tokio::select! {
            changed = directive.changed() => {
                let stop = changed.is_err() || directive.borrow_and_update().stop;
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close(None)).await;
                return if stop { End::Stopped } else { End::Redirected };
            }
            frame = socket.next() => frame,
        };

        let text = match frame {
            None => return End::Broken("stream ended without close frame".into()),
            Some(Err(err)) => return End::Broken(format!("read: {err}")),
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(close))) => {
                let reason = close.map_or_else(
                    || "no code".to_owned(),
                    |close| format!("{} {}", u16::from(close.code), close.reason),
                );
                return End::Broken(format!("closed by server: {reason}"));
            }
            Some(Ok(Message::Binary(_))) => {
                lock(state).tally.error("binary frame");
                continue;
            }
            // Pings are answered by tungstenite itself.
            Some(Ok(_)) => continue,
        };

        let end = take_frame(sub, state, text.as_str());
        signals.progress.send_modify(|n| *n = n.wrapping_add(1));
        if let Some(end) = end {
            if matches!(end, End::Redirected) {
                let _ = tokio::time::timeout(CLOSE_TIMEOUT, socket.close(None)).await;
            }
            return end;
        }
    }
}

/// Applies one text frame to the ledger. Returns why the connection must end, if it must.
fn take_frame(sub: &Subscription, state: &SharedState, text: &str) -> Option<End> {
    let now = Instant::now();
    let decoded = frame::decode(sub.framing, text);
    let mut guard = lock(state);
    let s = &mut *guard;
    if !frame::ends_with_newline(text) {
        s.tally.error("frame without trailing newline");
    }

    let events = match decoded {
        Ok(Frame::Events(events)) => events,
        Ok(Frame::Ignored) => return None,
        Ok(Frame::Refused(refusal)) => {
            return Some(End::Broken(format!("refused: {}", refusal.message)));
        }
        Err(err) => {
            warn!(chat.id = %sub.chat_id, error = %err, "undecodable frame");
            return Some(End::Broken("malformed frame".into()));
        }
    };

    // An edit announced after this connection chose its cursor, with its replay still to
    // come: whether coderd subscribed this stream before or after the edit's full refresh
    // cannot be told, and a snapshot from after the edit does not show the soft-deletes
    // (protocol doc 9.9). So connect again from the start, as a careful client would.
    if !s.snapshot_seen {
        s.snapshot_seen = true;
        if s.ledger.awaits_replay() && s.ledger.edits() != s.cursor_edits {
            debug!(chat.id = %sub.chat_id, "edit overtook the connect, reconnecting from 0");
            return Some(End::Redirected);
        }
    }

    // An error event ends the subscription; events before it in the frame still count.
    let mut end = None;
    for event in &events {
        match (event.kind, &event.message) {
            (EventKind::Message, Some(message)) => {
                let receipt = s.ledger.receive(event.chat_id, message);
                if !matches!(receipt, Receipt::Appended | Receipt::ReplayStarted) {
                    warn!(
                        chat.id = %sub.chat_id,
                        message.id = message.id,
                        fault = ?receipt,
                        "stream fault"
                    );
                }
            }
            (EventKind::Message, None) => s.tally.error("message event without message"),
            (EventKind::Error, _) => {
                let message = event
                    .error
                    .as_ref()
                    .map_or("", |error| error.message.as_str());
                end = Some(End::Broken(format!("error event: {message}")));
                break;
            }
            _ => {}
        }
    }

    // The catch-up clock stops at the first frame that leaves the target held.
    if let Some(elapsed) = s
        .catch_up
        .as_ref()
        .and_then(|c| c.after_frame(&s.ledger, now))
    {
        s.tally.catch_up_ms.push(millis(elapsed));
        s.catch_up = None;
        s.caught_up_epoch = s.connect_epoch;
    }
    end
}

#[cfg(test)]
mod tests {
    use super::*;

    const CHAT: &str = "11111111-1111-4111-8111-111111111111";

    fn subscription() -> Subscription {
        Subscription {
            chat_id: Uuid::parse_str(CHAT).unwrap(),
            token: HeaderValue::from_static("id-secret"),
            targets: Arc::from(Vec::new()),
            first_target: 0,
            framing: Framing::Array,
            initial_history: Vec::new(),
        }
    }

    /// A connection whose cursor was chosen now, with the given catch-up target.
    fn connected(sub: &Subscription, target: Vec<i64>) -> SharedState {
        let mut s = SubscriberState::new(sub.chat_id);
        s.catch_up = Some(CatchUp::new(Instant::now(), target));
        s.connect_epoch = 1;
        Arc::new(Mutex::new(s))
    }

    fn frame(events: &[String]) -> String {
        format!("[{}]\n", events.join(","))
    }

    fn status() -> String {
        format!(r#"{{"type":"status","chat_id":"{CHAT}","status":{{"status":"waiting"}}}}"#)
    }

    fn message(id: i64) -> String {
        format!(
            r#"{{"type":"message","chat_id":"{CHAT}","message":{{"id":{id},"chat_id":"{CHAT}","role":"user"}}}}"#
        )
    }

    #[test]
    fn snapshot_completes_the_catch_up() {
        let sub = subscription();
        let state = connected(&sub, vec![1000, 1001]);
        let end = take_frame(
            &sub,
            &state,
            &frame(&[status(), message(1000), message(1001)]),
        );
        assert!(end.is_none());

        let s = lock(&state);
        assert_eq!(s.ledger.held(), [1000, 1001]);
        assert_eq!(s.caught_up_epoch, 1);
        assert_eq!(s.tally.catch_up_ms.len(), 1);
        assert!(s.tally.errors.is_empty());
    }

    #[test]
    fn error_event_ends_the_stream_after_earlier_events() {
        let sub = subscription();
        let state = connected(&sub, Vec::new());
        let error = format!(
            r#"{{"type":"error","chat_id":"{CHAT}","error":{{"message":"dropped messages"}}}}"#
        );
        let end = take_frame(&sub, &state, &frame(&[message(1000), error, message(1001)]));
        assert!(
            matches!(end, Some(End::Broken(reason)) if reason == "error event: dropped messages")
        );
        assert_eq!(lock(&state).ledger.held(), [1000]);
    }

    #[test]
    fn edit_after_the_cursor_was_chosen_forces_a_reconnect_from_zero() {
        let sub = subscription();
        let state = connected(&sub, Vec::new());
        lock(&state).ledger.expect_replay(1000);

        let end = take_frame(&sub, &state, &frame(&[status(), message(1002)]));
        assert!(matches!(end, Some(End::Redirected)));
        let s = lock(&state);
        assert!(s.ledger.held().is_empty(), "the frame is not applied");
        assert!(s.ledger.awaits_replay());
    }

    #[test]
    fn edit_after_the_snapshot_waits_for_the_refresh() {
        let sub = subscription();
        let state = connected(&sub, Vec::new());
        assert!(take_frame(&sub, &state, &frame(&[status(), message(1000)])).is_none());
        lock(&state).ledger.expect_replay(1000);

        assert!(take_frame(&sub, &state, &frame(&[message(1001)])).is_none());
        assert_eq!(lock(&state).ledger.held(), [1001]);
    }

    #[test]
    fn frames_without_newline_and_bad_frames_are_counted() {
        let sub = subscription();
        let state = connected(&sub, Vec::new());
        assert!(take_frame(&sub, &state, &format!("[{}]", status())).is_none());
        let end = take_frame(&sub, &state, "{not json}\n");
        assert!(matches!(end, Some(End::Broken(reason)) if reason == "malformed frame"));
        assert_eq!(
            lock(&state).tally.errors["frame without trailing newline"],
            1
        );
    }
}
