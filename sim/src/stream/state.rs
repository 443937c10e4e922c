//! coderd's per-chat stream state (`chatStreamState`) and the PR #23218 durable cache.
//!
//! One entry per chat per process: the worker's part buffer, the local subscribers, and up to
//! 256 converted `message` events this replica published. The entry — cache included — is
//! dropped as soon as the chat is not generating here and nobody here watches it, exactly as
//! coderd's `cleanupStreamIfIdle` does. That short life and the "any cached id above the
//! cursor" hit test are what make the cache unsafe across replicas; both are reproduced.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use uuid::Uuid;

use crate::wire::event::StreamEvent;

/// `maxDurableMessageCacheSize`.
pub const DURABLE_CACHE_SIZE: usize = 256;
/// `maxStreamBufferSize`: the oldest buffered part is dropped beyond it.
const PART_BUFFER_SIZE: usize = 10_000;
/// Capacity of a local subscriber's channel; a full one loses events.
const SUBSCRIBER_CHANNEL: usize = 128;
/// Drop warnings per chat are rate-limited to one per this interval.
const DROP_WARN_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Default)]
struct ChatState {
    buffer: VecDeque<StreamEvent>,
    /// True while this replica's worker generates the chat; parts are buffered only then.
    buffering: bool,
    durable: VecDeque<StreamEvent>,
    /// Id of the newest evicted cache entry; a cursor below it cannot be served from cache.
    evicted_before: i64,
    subscribers: HashMap<u64, mpsc::Sender<StreamEvent>>,
    dropped_since_warn: u64,
    last_drop_warn: Option<Instant>,
}

impl ChatState {
    fn idle(&self) -> bool {
        !self.buffering && self.subscribers.is_empty()
    }
}

/// All chats' stream state in this process (coderd's `sync.Map`).
#[derive(Default)]
pub struct StreamStates {
    /// A std mutex: nothing awaits while holding it; delivery happens after it is released.
    chats: Mutex<HashMap<Uuid, ChatState>>,
    next_subscriber: AtomicU64,
}

/// A local subscriber's registration; dropping it unsubscribes and cleans up an idle chat.
pub struct LocalSubscription {
    pub rx: mpsc::Receiver<StreamEvent>,
    chat_id: Uuid,
    id: u64,
    states: Arc<StreamStates>,
}

impl Drop for LocalSubscription {
    fn drop(&mut self) {
        let mut chats = self.states.chats.lock().expect("stream states");
        if let Some(state) = chats.get_mut(&self.chat_id) {
            state.subscribers.remove(&self.id);
            if state.idle() {
                chats.remove(&self.chat_id);
            }
        }
    }
}

impl StreamStates {
    /// `subscribeToStream`: copies the part buffer and registers a subscriber channel, both
    /// under the lock, so no part falls between the copy and the registration.
    pub fn subscribe(self: &Arc<Self>, chat_id: Uuid) -> (Vec<StreamEvent>, LocalSubscription) {
        let (tx, rx) = mpsc::channel(SUBSCRIBER_CHANNEL);
        let id = self.next_subscriber.fetch_add(1, Ordering::Relaxed);
        let mut chats = self.chats.lock().expect("stream states");
        let state = chats.entry(chat_id).or_default();
        let parts = state.buffer.iter().cloned().collect();
        state.subscribers.insert(id, tx);
        (
            parts,
            LocalSubscription {
                rx,
                chat_id,
                id,
                states: self.clone(),
            },
        )
    }

    /// Local fan-out. Subscribers are copied under the lock and served after it is released;
    /// a subscriber whose channel is full silently loses the event. Afterwards an idle chat's
    /// state is dropped — so a message cached on a replica where nobody watches the chat and
    /// nothing generates is forgotten right after its publish, as in coderd.
    pub fn publish(&self, chat_id: Uuid, event: &StreamEvent) {
        let subscribers: Vec<_> = {
            let chats = self.chats.lock().expect("stream states");
            match chats.get(&chat_id) {
                Some(state) => state.subscribers.values().cloned().collect(),
                None => return,
            }
        };
        let mut dropped = 0;
        for tx in subscribers {
            if let Err(mpsc::error::TrySendError::Full(_)) = tx.try_send(event.clone()) {
                dropped += 1;
            }
        }

        let mut chats = self.chats.lock().expect("stream states");
        let Some(state) = chats.get_mut(&chat_id) else {
            return;
        };
        if dropped > 0 {
            state.dropped_since_warn += dropped;
            let due = match state.last_drop_warn {
                None => true,
                Some(t) => t.elapsed() >= DROP_WARN_INTERVAL,
            };
            if due {
                tracing::warn!(chat.id = %chat_id, dropped = state.dropped_since_warn,
                    "stream subscriber channel full, events dropped");
                state.dropped_since_warn = 0;
                state.last_drop_warn = Some(Instant::now());
            }
        }
        if state.idle() {
            chats.remove(&chat_id);
        }
    }

    /// A streamed delta: buffered for late subscribers and fanned out locally, but only while
    /// the chat generates here (otherwise it is dropped). Parts never go through pubsub.
    pub fn publish_part(&self, chat_id: Uuid, event: StreamEvent) {
        {
            let mut chats = self.chats.lock().expect("stream states");
            let Some(state) = chats.get_mut(&chat_id).filter(|s| s.buffering) else {
                return;
            };
            if state.buffer.len() >= PART_BUFFER_SIZE {
                state.buffer.pop_front();
            }
            state.buffer.push_back(event.clone());
        }
        self.publish(chat_id, &event);
    }

    /// Starts buffering parts; the worker calls it before it publishes status `running`.
    pub fn start_buffering(&self, chat_id: Uuid) {
        let mut chats = self.chats.lock().expect("stream states");
        chats.entry(chat_id).or_default().buffering = true;
    }

    /// Empties the part buffer once the turn is durable, and drops the chat's state (cache
    /// included) if nobody watches it here.
    pub fn stop_buffering(&self, chat_id: Uuid) {
        let mut chats = self.chats.lock().expect("stream states");
        if let Some(state) = chats.get_mut(&chat_id) {
            state.buffer.clear();
            state.buffering = false;
            if state.idle() {
                chats.remove(&chat_id);
            }
        }
    }

    /// `cacheDurableMessage`: FIFO of at most 256 events; evicting records the evicted id.
    pub fn cache_message(&self, chat_id: Uuid, event: &StreamEvent) {
        let mut chats = self.chats.lock().expect("stream states");
        let state = chats.entry(chat_id).or_default();
        if state.durable.len() >= DURABLE_CACHE_SIZE {
            if let Some(oldest) = state.durable.pop_front() {
                state.evicted_before = oldest.message_id;
            }
        }
        state.durable.push_back(event.clone());
    }

    /// `publishEditedMessage`'s cache step: the cache becomes just the edited message.
    pub fn reset_cache(&self, chat_id: Uuid, event: &StreamEvent) {
        let mut chats = self.chats.lock().expect("stream states");
        let state = chats.entry(chat_id).or_default();
        state.durable.clear();
        state.durable.push_back(event.clone());
        state.evicted_before = 0;
    }

    /// `getCachedDurableMessages`: every cached event above `after_id`, or `None` when the
    /// cursor is below the eviction mark or nothing matches. The hit test is only "some
    /// cached message is newer" — messages this replica never published are not noticed.
    /// Like coderd, looking up creates the chat's state.
    pub fn cached_after(&self, chat_id: Uuid, after_id: i64) -> Option<Vec<StreamEvent>> {
        let mut chats = self.chats.lock().expect("stream states");
        let state = chats.entry(chat_id).or_default();
        if after_id < state.evicted_before {
            return None;
        }
        let hits: Vec<_> = state
            .durable
            .iter()
            .filter(|e| e.message_id > after_id)
            .cloned()
            .collect();
        (!hits.is_empty()).then_some(hits)
    }

    /// Whether this process holds state for the chat (for tests and logs).
    pub fn has_state(&self, chat_id: Uuid) -> bool {
        self.chats
            .lock()
            .expect("stream states")
            .contains_key(&chat_id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::event::EventKind;

    fn message(id: i64) -> StreamEvent {
        StreamEvent {
            kind: EventKind::Message,
            message_id: id,
            json: format!("{id}").into(),
        }
    }

    #[test]
    fn cache_hit_ignores_holes_and_respects_eviction() {
        let states = Arc::new(StreamStates::default());
        let chat = Uuid::new_v4();
        let (_, _sub) = states.subscribe(chat);
        states.cache_message(chat, &message(11));
        // Message 10 was never cached here, yet the lookup from 9 is a "hit".
        let hit = states.cached_after(chat, 9).unwrap();
        assert_eq!(
            hit.iter().map(|e| e.message_id).collect::<Vec<_>>(),
            vec![11]
        );
        assert!(states.cached_after(chat, 11).is_none());

        for id in 12..(12 + DURABLE_CACHE_SIZE as i64) {
            states.cache_message(chat, &message(id));
        }
        assert!(states.cached_after(chat, 10).is_none(), "11 was evicted");
        assert!(states.cached_after(chat, 11).is_some());
    }

    #[test]
    fn a_publish_where_nobody_watches_forgets_the_cache() {
        let states = Arc::new(StreamStates::default());
        let chat = Uuid::new_v4();
        states.cache_message(chat, &message(7));
        states.publish(chat, &message(7));
        assert!(!states.has_state(chat));
    }

    #[test]
    fn idle_state_is_dropped_with_its_cache() {
        let states = Arc::new(StreamStates::default());
        let chat = Uuid::new_v4();
        let (_, sub) = states.subscribe(chat);
        states.cache_message(chat, &message(5));
        drop(sub);
        assert!(!states.has_state(chat));
    }
}
