//! `Server.Subscribe`: local registration, LISTEN, snapshot, then the merge loop.
//!
//! The order is coderd's and it matters: the LISTEN is in place before the snapshot query, so a
//! message committed between the two is either in the snapshot or announced afterwards.

use std::sync::Arc;

use http::HeaderMap;
use tokio::sync::mpsc;
use uuid::Uuid;

use super::relay::Relay;
use super::state::LocalSubscription;
use crate::metrics::ReadCaller;
use crate::pubsub::listener::Subscription;
use crate::pubsub::Dropped;
use crate::replica::Replica;
use crate::store;
use crate::wire::event::{EventKind, StreamEvent};
use crate::wire::message::queued_message;
use crate::wire::notify::{stream_channel, StreamNotify};

/// Events between the merge loop and the socket writer.
const EVENTS_CHANNEL: usize = 128;
const SNAPSHOT_ERROR: &str = "failed to load initial snapshot";

/// A live subscription: the snapshot to send first, then live events until the channel
/// closes (the stream ended, e.g. after `dropped messages`).
pub struct Subscribed {
    pub snapshot: Vec<StreamEvent>,
    pub events: mpsc::Receiver<StreamEvent>,
}

/// Subscribes to a chat's stream from `after_id` on (exclusive).
pub async fn subscribe(
    replica: Arc<Replica>,
    chat_id: Uuid,
    request_headers: &HeaderMap,
    after_id: i64,
) -> Subscribed {
    // Register locally first: parts published from now on reach this subscriber.
    let (parts, local) = replica.streams.subscribe(chat_id);

    // LISTEN before any query. Without pubsub the subscriber still runs, on local events.
    let pubsub = match replica.listener.subscribe(&stream_channel(chat_id)).await {
        Ok(subscription) => Some(subscription),
        Err(e) => {
            tracing::warn!(chat.id = %chat_id, error = %e, "stream runs without pubsub");
            None
        }
    };

    let (snapshot, last_message_id, chat) = load_snapshot(&replica, chat_id, parts, after_id).await;

    // A chat running on another replica: relay its parts from there.
    let mut relay = Relay::new(replica.clone(), chat_id, request_headers);
    if let Some(chat) = &chat {
        relay.update(&chat.0, chat.1);
    }

    let (out, events) = mpsc::channel(EVENTS_CHANNEL);
    let merge = Merge {
        replica,
        chat_id,
        last_message_id,
        local,
        pubsub,
        relay,
        out,
    };
    tokio::spawn(merge.run());
    Subscribed { snapshot, events }
}

/// The snapshot in stream order — status, parts, messages, queue — and the cursor after it.
/// The queries run messages, queue, chat; each failure leaves an error event where its
/// events would have been, and a failed chat read leaves no status at all.
async fn load_snapshot(
    replica: &Replica,
    chat_id: Uuid,
    parts: Vec<StreamEvent>,
    after_id: i64,
) -> (Vec<StreamEvent>, i64, Option<(String, Option<Uuid>)>) {
    let mut events = parts;
    let mut last_message_id = after_id;
    let conn = match replica.pool.get().await {
        Ok(conn) => conn,
        Err(e) => {
            tracing::warn!(chat.id = %chat_id, error = %e, "snapshot without a connection");
            for _ in 0..3 {
                events.push(StreamEvent::error(chat_id, SNAPSHOT_ERROR));
            }
            return (events, last_message_id, None);
        }
    };

    replica.metrics.count_read(ReadCaller::StreamSnapshot);
    match store::messages_after(&*conn, chat_id, after_id).await {
        Ok(rows) => {
            if let Some(last) = rows.last() {
                last_message_id = last.id;
            }
            events.extend(rows.iter().map(|row| replica.message_event(row)));
        }
        Err(e) => {
            tracing::warn!(chat.id = %chat_id, error = %e, "snapshot messages failed");
            events.push(StreamEvent::error(chat_id, SNAPSHOT_ERROR));
        }
    }

    match store::queued(&*conn, chat_id).await {
        Ok(queue) if queue.is_empty() => {}
        Ok(queue) => {
            let framing = replica.settings.framing;
            let queued = queue.iter().map(|q| queued_message(q, framing)).collect();
            events.push(StreamEvent::queue_update(chat_id, queued));
        }
        Err(e) => {
            tracing::warn!(chat.id = %chat_id, error = %e, "snapshot queue failed");
            events.push(StreamEvent::error(chat_id, SNAPSHOT_ERROR));
        }
    }

    let mut chat = None;
    match store::chat_by_id(&*conn, chat_id).await {
        Ok(Some(row)) => {
            events.insert(0, StreamEvent::status(chat_id, &row.status));
            chat = Some((row.status, row.worker_id));
        }
        Ok(None) => events.push(StreamEvent::error(chat_id, SNAPSHOT_ERROR)),
        Err(e) => {
            tracing::warn!(chat.id = %chat_id, error = %e, "snapshot chat failed");
            events.push(StreamEvent::error(chat_id, SNAPSHOT_ERROR));
        }
    }
    (events, last_message_id, chat)
}

/// The merge loop's state for one subscriber.
struct Merge {
    replica: Arc<Replica>,
    chat_id: Uuid,
    /// The highest message id this subscriber has been sent (or was given as `after_id`).
    last_message_id: i64,
    local: LocalSubscription,
    pubsub: Option<Subscription>,
    relay: Relay,
    out: mpsc::Sender<StreamEvent>,
}

/// Returned by a step that ended the stream.
struct Ended;

impl Merge {
    async fn run(mut self) {
        let metrics_guard = SubscriberGauge::open(self.replica.clone());
        loop {
            let step = tokio::select! {
                _ = self.out.closed() => Err(Ended),
                delivery = next_delivery(&mut self.pubsub) => self.on_delivery(delivery).await,
                event = self.local.rx.recv() => match event {
                    Some(event) => self.on_local(event).await,
                    None => Err(Ended),
                },
                event = self.relay.recv() => self.emit(event).await,
            };
            if step.is_err() {
                break;
            }
        }
        drop(metrics_guard);
    }

    async fn emit(&self, event: StreamEvent) -> Result<(), Ended> {
        self.out.send(event).await.map_err(|_| Ended)
    }

    /// With pubsub up, only parts come from local fan-out; durable events arrive via notify.
    async fn on_local(&self, event: StreamEvent) -> Result<(), Ended> {
        if self.pubsub.is_none() || event.kind == EventKind::MessagePart {
            self.emit(event).await?;
        }
        Ok(())
    }

    async fn on_delivery(&mut self, delivery: Result<String, Dropped>) -> Result<(), Ended> {
        let payload = match delivery {
            Ok(payload) => payload,
            Err(dropped) => {
                tracing::warn!(chat.id = %self.chat_id, "stream notifications dropped, ending stream");
                self.emit(StreamEvent::error(self.chat_id, &dropped.to_string()))
                    .await?;
                return Err(Ended);
            }
        };
        let notify = match StreamNotify::decode(&payload) {
            Ok(notify) => notify,
            Err(e) => {
                let message = format!("unmarshal chat stream notify: {e}");
                self.emit(StreamEvent::error(self.chat_id, &message))
                    .await?;
                return Err(Ended);
            }
        };

        if notify.after_message_id > 0 || notify.full_refresh {
            self.catch_up(notify.full_refresh).await?;
        }
        if !notify.status.is_empty() {
            self.emit(StreamEvent::status(self.chat_id, &notify.status))
                .await?;
            self.relay.update(&notify.status, notify.worker());
        }
        if let Some(retry) = notify.retry {
            let retry = serde_json::to_value(retry).expect("retry serializes");
            self.emit(StreamEvent::retry(self.chat_id, retry)).await?;
        }
        if !notify.error.is_empty() {
            self.emit(StreamEvent::error(self.chat_id, &notify.error))
                .await?;
        }
        if notify.queue_update {
            self.send_queue().await?;
        }
        Ok(())
    }

    /// Step 5a.1: a full refresh re-reads from id 0; otherwise the #23218 cache is asked
    /// first (when on) and the database only on a miss.
    async fn catch_up(&mut self, full_refresh: bool) -> Result<(), Ended> {
        if full_refresh {
            self.last_message_id = 0;
        } else if self.replica.settings.stream_cache {
            let cached = self
                .replica
                .streams
                .cached_after(self.chat_id, self.last_message_id);
            if let Some(events) = cached {
                self.replica.metrics.stream_cache_hits.inc();
                for event in events {
                    self.last_message_id = event.message_id;
                    self.emit(event).await?;
                }
                return Ok(());
            }
        }

        self.replica.metrics.count_read(ReadCaller::StreamNotify);
        let rows = match self.replica.pool.get().await {
            Ok(conn) => store::messages_after(&*conn, self.chat_id, self.last_message_id).await,
            Err(e) => Err(e.into()),
        };
        match rows {
            Ok(rows) => {
                for row in &rows {
                    if row.id <= self.last_message_id {
                        continue;
                    }
                    self.last_message_id = row.id;
                    self.emit(self.replica.message_event(row)).await?;
                }
            }
            // Only logged, as in coderd: the rows come with the next notify, if one comes.
            Err(e) => tracing::warn!(chat.id = %self.chat_id, error = %e, "catch-up read failed"),
        }
        Ok(())
    }

    async fn send_queue(&self) -> Result<(), Ended> {
        let queue = match self.replica.pool.get().await {
            Ok(conn) => store::queued(&*conn, self.chat_id).await,
            Err(e) => Err(e.into()),
        };
        match queue {
            Ok(queue) => {
                let framing = self.replica.settings.framing;
                let queued = queue.iter().map(|q| queued_message(q, framing)).collect();
                self.emit(StreamEvent::queue_update(self.chat_id, queued))
                    .await
            }
            Err(e) => {
                tracing::warn!(chat.id = %self.chat_id, error = %e, "queue read failed");
                Ok(())
            }
        }
    }
}

/// The next notification, or pending forever when the subscriber runs without pubsub. A
/// closed subscription counts as dropped.
async fn next_delivery(pubsub: &mut Option<Subscription>) -> Result<String, Dropped> {
    match pubsub {
        Some(subscription) => subscription.rx.recv().await.unwrap_or(Err(Dropped)),
        None => std::future::pending().await,
    }
}

/// Keeps `coderd_sim_stream_subscribers` in step with live merge loops.
struct SubscriberGauge(Arc<Replica>);

impl SubscriberGauge {
    fn open(replica: Arc<Replica>) -> Self {
        replica.metrics.stream_subscribers.inc();
        SubscriberGauge(replica)
    }
}

impl Drop for SubscriberGauge {
    fn drop(&mut self) {
        self.0.metrics.stream_subscribers.dec();
    }
}
