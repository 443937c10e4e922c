//! The feed: one upstream stream per cached chat from the local coderd, shared by every local
//! subscriber of that chat. It also owns the chat's lifecycle in the cache.
//!
//! Order of a chat's life: LISTEN on its channel, open the feed (whose first frames are
//! coderd's snapshot, read from Postgres), mark the chat ready, then apply live frames until
//! the chat has had no subscriber for `feed.linger_ms`, the cache evicts it, or the feed cannot
//! be kept open with any current subscriber's credentials.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::authz::Credentials;
use crate::cache::Cache;
use crate::chat::{Chat, Phase};
use crate::config::Framing;
use crate::listen::Listener;
use crate::wire::{self, EventHead, FrameContent, MAX_EVENTS_PER_FRAME};

/// How long after a full snapshot frame the snapshot counts as complete if nothing follows.
const SNAPSHOT_QUIET: Duration = Duration::from_millis(100);
/// The shortest linger, whatever `feed.linger_ms` says (see the idle check in `follow`).
const MIN_LINGER: Duration = Duration::from_secs(1);

/// What the feed needs from the rest of the sidecar.
pub struct FeedContext {
    pub cache: Arc<Cache>,
    pub listener: Listener,
    /// `host:port` of the local coderd.
    pub upstream: String,
    pub framing: Framing,
    pub connect_timeout: Duration,
    pub linger: std::sync::RwLock<Duration>,
}

#[derive(Debug, thiserror::Error)]
enum FeedError {
    #[error("cannot reach coderd: {0}")]
    Connect(String),
    #[error("coderd refused the stream with status {0}")]
    Refused(u16),
    #[error("coderd's stream ended: {0}")]
    Ended(String),
    #[error("coderd sent a frame chatcache does not understand: {0}")]
    Protocol(String),
}

/// Why a feed connection stopped.
enum Stop {
    /// Nobody watches the chat any more, or it was evicted: leave the cache.
    Done,
    /// The connection broke; reopen it if subscribers remain.
    Broken(FeedError),
}

/// Runs a chat from creation to eviction. `first` are the credentials of the subscriber that
/// created it (already approved by coderd).
pub async fn run_chat(ctx: Arc<FeedContext>, chat: Arc<Chat>, first: Credentials) {
    let cache = &ctx.cache;
    if let Err(e) = ctx.listener.listen(chat.id).await {
        tracing::warn!(chat.id = %chat.id, error = %e, "cannot LISTEN; chat left to coderd");
        chat.set_phase(Phase::Failed("listen_down"));
        cache.remove(&chat);
        return;
    }
    cache.metrics.feeds.inc();
    let mut creds = vec![first];
    let mut loaded = false;
    let mut failures = 0u32;
    loop {
        let after_id = if loaded { chat.lock().ring.head() } else { 0 };
        let mut stop = Stop::Broken(FeedError::Ended("no credentials".into()));
        for cred in &creds {
            match connect(&ctx, &chat, after_id, cred).await {
                Ok(ws) => {
                    failures = 0;
                    stop = follow(&ctx, &chat, ws, after_id, &mut loaded).await;
                    break;
                }
                Err(e) => stop = Stop::Broken(e),
            }
        }
        match stop {
            Stop::Done => break,
            Stop::Broken(e) => {
                failures += 1;
                let subscribers = chat.lock().subscriber_count();
                if chat.is_closed() || !loaded || failures > 5 || subscribers == 0 {
                    tracing::warn!(chat.id = %chat.id, error = %e, "feed stopped");
                    if !loaded {
                        chat.set_phase(Phase::Failed("feed"));
                    }
                    break;
                }
                tracing::info!(chat.id = %chat.id, error = %e, "feed broke; reopening");
                tokio::time::sleep(Duration::from_millis(100 * u64::from(failures))).await;
                creds = chat.lock().feed_credentials();
            }
        }
    }
    cache.metrics.feeds.dec();
    ctx.listener.unlisten(chat.id);
    cache.remove(&chat);
}

async fn connect(
    ctx: &FeedContext,
    chat: &Chat,
    after_id: i64,
    creds: &Credentials,
) -> Result<WebSocketStream<TcpStream>, FeedError> {
    let query = creds.query_suffix(&format!("after_id={after_id}"));
    let url = format!(
        "ws://{}/api/experimental/chats/{}/stream{query}",
        ctx.upstream, chat.id
    );
    let mut req = url
        .into_client_request()
        .map_err(|e| FeedError::Connect(e.to_string()))?;
    creds.apply(req.headers_mut());
    let attempt = async {
        let tcp = TcpStream::connect(&ctx.upstream).await?;
        tcp.set_nodelay(true)?;
        Ok::<_, std::io::Error>(tcp)
    };
    let tcp = tokio::time::timeout(ctx.connect_timeout, attempt)
        .await
        .map_err(|_| FeedError::Connect("timed out".into()))?
        .map_err(|e| FeedError::Connect(e.to_string()))?;
    let handshake =
        tokio_tungstenite::client_async_with_config(req, tcp, Some(wire::websocket_config()));
    match tokio::time::timeout(ctx.connect_timeout, handshake).await {
        Err(_) => Err(FeedError::Connect("handshake timed out".into())),
        Ok(Ok((ws, _))) => Ok(ws),
        Ok(Err(tokio_tungstenite::tungstenite::Error::Http(resp))) => {
            Err(FeedError::Refused(resp.status().as_u16()))
        }
        Ok(Err(e)) => Err(FeedError::Connect(e.to_string())),
    }
}

/// Reads one feed connection until it stops.
async fn follow(
    ctx: &FeedContext,
    chat: &Arc<Chat>,
    mut ws: WebSocketStream<TcpStream>,
    after_id: i64,
    loaded: &mut bool,
) -> Stop {
    let mut closed = chat.closed();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    // coderd's snapshot is the first frame(s): a full frame means more of it follows.
    let mut snapshot: Option<Vec<(EventHead, Bytes)>> = Some(Vec::new());
    let first_frame = tokio::time::sleep(ctx.connect_timeout);
    tokio::pin!(first_frame);
    // A full first frame may be the whole snapshot (exactly 256 events) or its first part:
    // more of it follows at once if there is more, so a short quiet spell ends it.
    let snapshot_quiet = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(snapshot_quiet);
    let mut waiting_for_more = false;
    loop {
        tokio::select! {
            msg = ws.next() => {
                let text = match msg {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Close(c))) => {
                        return Stop::Broken(FeedError::Ended(format!("closed: {c:?}")));
                    }
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Stop::Broken(FeedError::Ended(e.to_string())),
                    None => return Stop::Broken(FeedError::Ended("connection closed".into())),
                };
                let events = match wire::split_frame(ctx.framing, text.as_str()) {
                    Ok(FrameContent::Events(events)) => events,
                    Ok(FrameContent::Error(body)) => {
                        return Stop::Broken(FeedError::Ended(format!("error frame {body}")));
                    }
                    Err(e) => return Stop::Broken(FeedError::Protocol(e)),
                };
                let mut parsed = Vec::with_capacity(events.len());
                for bytes in events {
                    match serde_json::from_slice::<EventHead>(&bytes) {
                        Ok(head) => parsed.push((head, bytes)),
                        Err(e) => return Stop::Broken(FeedError::Protocol(e.to_string())),
                    }
                }
                if let Some(mut collected) = snapshot.take() {
                    let more = parsed.len() >= MAX_EVENTS_PER_FRAME;
                    collected.extend(parsed);
                    if more {
                        snapshot = Some(collected);
                        waiting_for_more = true;
                        snapshot_quiet
                            .as_mut()
                            .reset(tokio::time::Instant::now() + SNAPSHOT_QUIET);
                        continue;
                    }
                    install(ctx, chat, after_id, collected, loaded);
                    continue;
                }
                for (head, bytes) in parsed {
                    if let Some(m) = &head.message {
                        tracing::trace!(chat.id = %chat.id, id = m.id, "feed message");
                    }
                    if is_stream_failure(&head) {
                        return Stop::Broken(FeedError::Ended("coderd dropped notifications".into()));
                    }
                    ctx.cache.apply(chat, |state, limits| state.feed_event(head, bytes, limits));
                }
            }
            _ = &mut snapshot_quiet, if waiting_for_more && snapshot.is_some() => {
                install(ctx, chat, after_id, snapshot.take().unwrap_or_default(), loaded);
            }
            _ = &mut first_frame, if snapshot.is_some() && !waiting_for_more => {
                return Stop::Broken(FeedError::Ended("no snapshot in time".into()));
            }
            _ = closed.changed() => return Stop::Done,
            _ = tick.tick() => {
                // A new chat counts as idle until its first subscriber, which waits for the
                // snapshot, is attached: never give up on a feed sooner than a second.
                let linger = *ctx.linger.read().unwrap_or_else(|e| e.into_inner());
                let linger = linger.max(MIN_LINGER);
                let idle = chat.lock().idle_since.is_some_and(|t| t.elapsed() >= linger);
                if idle || chat.is_closed() {
                    let _ = ws.close(None).await;
                    return Stop::Done;
                }
            }
        }
    }
}

/// Puts coderd's snapshot into the cache and lets waiting subscribers in.
fn install(
    ctx: &FeedContext,
    chat: &Arc<Chat>,
    after_id: i64,
    snapshot: Vec<(EventHead, Bytes)>,
    loaded: &mut bool,
) {
    ctx.cache.apply(chat, |state, limits| {
        state.install_snapshot(after_id, snapshot, limits)
    });
    *loaded = true;
    chat.set_phase(Phase::Ready);
    tracing::debug!(chat.id = %chat.id, after_id, "feed open");
}

/// coderd ends a stream with these errors when its pubsub dropped notifies; they concern the
/// feed connection, not the chat, so subscribers never see them.
fn is_stream_failure(head: &EventHead) -> bool {
    head.kind == "error"
        && head.error.as_ref().is_some_and(|e| {
            e.message == "dropped messages" || e.message.starts_with("unmarshal chat stream notify")
        })
}
