//! One cached chat: its ring, the ephemeral state the feed keeps current, and its subscribers.
//!
//! All state sits behind one `std::sync::Mutex` that is never held across an `.await`; every
//! method here is synchronous and returns what the caller must do next (read, wake, reconnect).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use uuid::Uuid;

use crate::authz::Credentials;
use crate::ring::{Effects, Entry, Ring, RingLimits};
use crate::wire::EventHead;

/// coderd's part buffer limit (`maxStreamBufferSize`); the oldest part is dropped beyond it.
const MAX_BUFFERED_PARTS: usize = 10_000;

/// What a subscriber's task is told. Durable messages are never carried here, only the news
/// that the ring moved, so a slow subscriber can always catch up from the ring by cursor.
#[derive(Debug)]
pub enum Signal {
    /// An ephemeral event (part, status, queue, retry, error), encoded.
    Event(Bytes),
    /// The ring has entries this subscriber has not seen.
    Durable,
    /// The history was rewritten: resend all of it, as coderd does after `full_refresh`.
    Replay,
}

/// The readiness of a chat, published to subscribers waiting for the first snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    Loading,
    Ready,
    /// The chat cannot be served from the cache; new subscribers fail open.
    Failed(&'static str),
}

struct SubscriberSlot {
    tx: mpsc::Sender<Signal>,
    overflowed: Arc<AtomicBool>,
    credentials: Credentials,
}

/// Where a subscriber stands in the chat's history.
#[derive(Debug, Clone)]
pub struct Cursor {
    /// The history generation this subscriber has; a replay moves it to the current one.
    pub generation: u64,
    pub seen_seq: u64,
    /// The client's `after_id`: nothing at or below it is sent, except in a replay.
    pub after_id: i64,
}

/// What a finished refresh or reload did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refreshed {
    /// A newer refresh started meanwhile; the read was dropped.
    Stale,
    /// Nothing held was deleted: new ids were merged, nobody's cursor changed.
    Merged,
    /// The history was rewritten and every subscriber gets it again.
    Replayed,
}

/// A subscriber fell behind the ring's trim and missed a message.
#[derive(Debug)]
pub struct Lagged;

pub struct Subscription {
    pub id: u64,
    pub rx: mpsc::Receiver<Signal>,
    pub overflowed: Arc<AtomicBool>,
    pub cursor: Cursor,
}

pub struct ChatState {
    /// Bumped when a reload starts, so a read begun before it is never merged.
    pub epoch: u64,
    /// Bumped when the history is rewritten and replayed to subscribers.
    generation: u64,
    pub ring: Ring,
    status: Option<Bytes>,
    parts: VecDeque<Bytes>,
    queue: Option<Bytes>,
    subscribers: HashMap<u64, SubscriberSlot>,
    next_subscriber: u64,
    pub idle_since: Option<Instant>,
    /// A full refresh is being read; feed messages wait for it in `refresh_staged`.
    pub refreshing: bool,
    refresh_staged: Vec<(i64, Bytes)>,
    pub repair_running: bool,
    pub repair_again: bool,
    /// The last full refresh's history (all of it), the ring seq and top id it ended at:
    /// what a replay sends. Dropped when the chat has no subscribers.
    replay_base: std::sync::Arc<Vec<Bytes>>,
    replay_seq: u64,
    replay_top: i64,
    /// A LISTEN-reconnect reload found held messages deleted and replayed: an edit whose own
    /// `full_refresh` may still arrive. That refresh, reading the same history, must not replay
    /// it again.
    reload_replayed: bool,
    /// A task is waiting for the oldest pending id to come due.
    pub hole_check_running: bool,
}

pub struct Chat {
    pub id: Uuid,
    state: Mutex<ChatState>,
    phase: watch::Sender<Phase>,
    /// Set when the chat leaves the cache; its feed and timers stop.
    closed: watch::Sender<bool>,
}

impl Chat {
    pub fn new(id: Uuid) -> Self {
        let state = ChatState {
            epoch: 1,
            generation: 1,
            ring: Ring::default(),
            status: None,
            parts: VecDeque::new(),
            queue: None,
            subscribers: HashMap::new(),
            next_subscriber: 1,
            idle_since: Some(Instant::now()),
            refreshing: false,
            refresh_staged: Vec::new(),
            repair_running: false,
            repair_again: false,
            replay_base: Default::default(),
            replay_seq: 0,
            replay_top: 0,
            reload_replayed: false,
            hole_check_running: false,
        };
        Self {
            id,
            state: Mutex::new(state),
            phase: watch::channel(Phase::Loading).0,
            closed: watch::channel(false).0,
        }
    }

    /// The state lock. Poisoning only follows a panic elsewhere; the data is still consistent
    /// because every mutation completes before it can panic, so keep serving.
    pub fn lock(&self) -> MutexGuard<'_, ChatState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn phase(&self) -> watch::Receiver<Phase> {
        self.phase.subscribe()
    }

    pub fn set_phase(&self, phase: Phase) {
        self.phase.send_replace(phase);
    }

    pub fn is_ready(&self) -> bool {
        *self.phase.borrow() == Phase::Ready
    }

    pub fn closed(&self) -> watch::Receiver<bool> {
        self.closed.subscribe()
    }

    pub fn close(&self) {
        self.closed.send_replace(true);
        self.set_phase(Phase::Failed("evicted"));
        // Dropping the senders ends every subscriber's stream; clients reconnect.
        self.lock().subscribers.clear();
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }
}

impl ChatState {
    pub fn subscriber_count(&self) -> usize {
        self.subscribers.len()
    }

    /// Credentials of a current subscriber, newest first, for (re)opening the feed.
    pub fn feed_credentials(&self) -> Vec<Credentials> {
        let mut ids: Vec<&u64> = self.subscribers.keys().collect();
        ids.sort_unstable_by(|a, b| b.cmp(a));
        ids.into_iter()
            .map(|id| self.subscribers[id].credentials.clone())
            .collect()
    }

    /// Installs the feed's first snapshot, which coderd read from Postgres (`id > from`).
    pub fn install_snapshot(
        &mut self,
        from: i64,
        events: Vec<(EventHead, Bytes)>,
        limits: RingLimits,
    ) -> Effects {
        let mut rows = Vec::new();
        self.parts.clear();
        self.queue = None;
        for (head, bytes) in events {
            match head.kind.as_str() {
                "message" => {
                    if let Some(m) = head.message {
                        rows.push((m.id, bytes));
                    }
                }
                "status" => self.status = Some(bytes),
                "message_part" => self.parts.push_back(bytes),
                "queue_update" => {
                    self.queue = head.queued_messages.is_some().then_some(bytes);
                }
                _ => {}
            }
        }
        if self.ring.is_empty() && self.ring.proven_head == 0 && from == 0 {
            let announced = self.ring.pending_ids();
            self.ring = Ring::from_read(0, rows, limits);
            let mut fx = Effects {
                advanced: true,
                ..Effects::default()
            };
            for id in announced {
                fx.merge(self.ring.announce(id, limits));
            }
            fx
        } else {
            let pending = self.ring.pending_ids();
            self.ring.merge_read(from, rows, &pending, limits)
        }
    }

    /// One live event from the feed. Returns ring effects and whether the feed itself failed.
    pub fn feed_event(&mut self, head: EventHead, bytes: Bytes, limits: RingLimits) -> Effects {
        match head.kind.as_str() {
            "message" => {
                let Some(m) = head.message else {
                    return Effects::default();
                };
                if matches!(m.role.as_deref(), Some("assistant" | "tool")) {
                    self.parts.clear();
                }
                if self.refreshing {
                    self.refresh_staged.push((m.id, bytes));
                    return Effects::default();
                }
                return self.ring.feed_message(m.id, bytes, limits);
            }
            "message_part" => {
                if self.parts.len() >= MAX_BUFFERED_PARTS {
                    self.parts.pop_front();
                }
                self.parts.push_back(bytes.clone());
            }
            "status" => {
                if head.status.as_ref().is_some_and(|s| s.status != "running") {
                    self.parts.clear();
                }
                self.status = Some(bytes.clone());
            }
            "queue_update" => self.queue = head.queued_messages.is_some().then(|| bytes.clone()),
            _ => {}
        }
        self.broadcast(bytes);
        Effects::default()
    }

    /// Sends an ephemeral event to every subscriber; one that cannot keep up is dropped.
    fn broadcast(&mut self, event: Bytes) {
        self.signal_all(|| Signal::Event(event.clone()));
    }

    /// Tells every subscriber that the ring moved (or was rewritten).
    pub fn wake(&mut self, replay: bool) {
        self.signal_all(|| {
            if replay {
                Signal::Replay
            } else {
                Signal::Durable
            }
        });
    }

    /// Queues a signal for every subscriber; one whose queue is full is marked overflowed and
    /// dropped (its stream then ends so the client reconnects), a closed one is forgotten.
    fn signal_all(&mut self, signal: impl Fn() -> Signal) {
        self.subscribers
            .retain(|_, slot| match slot.tx.try_send(signal()) {
                Ok(()) => true,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    slot.overflowed.store(true, Ordering::Release);
                    false
                }
                Err(mpsc::error::TrySendError::Closed(_)) => false,
            });
    }

    /// Registers a subscriber and returns its snapshot in coderd's order: status, buffered
    /// parts, messages with `id > after_id`, then the queue if it is not empty.
    ///
    /// Returns `None` when `after_id` is below the floor: the caller reads those from Postgres.
    pub fn subscribe(
        &mut self,
        after_id: i64,
        credentials: Credentials,
        queue_len: usize,
        below_floor: Option<Vec<Bytes>>,
    ) -> Option<(Subscription, Vec<Bytes>)> {
        let below = self.ring.floor > 0 && after_id < self.ring.floor;
        if below && below_floor.is_none() {
            return None;
        }
        let mut snapshot = Vec::with_capacity(self.ring.len() + self.parts.len() + 2);
        snapshot.extend(self.status.iter().cloned());
        snapshot.extend(self.parts.iter().cloned());
        let (read_top, older) = match below_floor {
            Some(rows) if below => (self.ring.floor, rows),
            _ => (after_id, Vec::new()),
        };
        snapshot.extend(older);
        snapshot.extend(
            self.ring
                .after(read_top.max(after_id))
                .map(|e| e.event.clone()),
        );
        snapshot.extend(self.queue.iter().cloned());

        let (tx, rx) = mpsc::channel(queue_len);
        let overflowed = Arc::new(AtomicBool::new(false));
        let id = self.next_subscriber;
        self.next_subscriber += 1;
        self.subscribers.insert(
            id,
            SubscriberSlot {
                tx,
                overflowed: overflowed.clone(),
                credentials,
            },
        );
        self.idle_since = None;
        let cursor = Cursor {
            generation: self.generation,
            seen_seq: self.ring.max_seq(),
            after_id,
        };
        Some((
            Subscription {
                id,
                rx,
                overflowed,
                cursor,
            },
            snapshot,
        ))
    }

    pub fn unsubscribe(&mut self, id: u64) {
        self.subscribers.remove(&id);
        if self.subscribers.is_empty() {
            self.idle_since = Some(Instant::now());
            self.replay_base = Default::default();
            self.replay_seq = self.ring.max_seq();
        }
    }

    /// Ring entries this subscriber has not seen yet.
    /// Ring entries this subscriber has not seen yet. `Err` when the ring dropped an entry
    /// this subscriber never saw (it fell behind the trim): it must reconnect and catch up.
    pub fn pull(&self, cursor: &mut Cursor) -> Result<Vec<Bytes>, Lagged> {
        if cursor.generation != self.generation {
            // A replay for the new epoch is queued behind this signal; it will carry these.
            return Ok(Vec::new());
        }
        if self.ring.trimmed_seq > cursor.seen_seq && self.ring.floor > cursor.after_id {
            return Err(Lagged);
        }
        let fresh: Vec<Entry> = self.ring.since(cursor.seen_seq, cursor.after_id);
        cursor.seen_seq = self.ring.max_seq();
        Ok(fresh.into_iter().map(|e| e.event).collect())
    }

    /// The whole visible history after a full refresh, as coderd resends it: the read that
    /// refreshed the chat (all of it, even beyond the ring's limits), then what came since.
    pub fn replay(&self, cursor: &mut Cursor) -> Vec<Bytes> {
        cursor.generation = self.generation;
        cursor.after_id = 0;
        let mut out: Vec<Bytes> = self.replay_base.iter().cloned().collect();
        let since = self.ring.since(self.replay_seq, self.replay_top);
        out.extend(since.into_iter().map(|e| e.event));
        cursor.seen_seq = self.ring.max_seq();
        out
    }

    /// Starts a full refresh: a new epoch; feed messages wait until the read is merged.
    pub fn begin_refresh(&mut self) -> u64 {
        self.epoch += 1;
        self.refreshing = true;
        self.ring.hold = true;
        self.epoch
    }

    /// Replaces the history with a read from id 0 made for `epoch`, and says what became of
    /// it. A read for an older epoch changes nothing: a stale fill never enters the ring.
    pub fn finish_refresh(
        &mut self,
        epoch: u64,
        rows: Vec<(i64, Bytes)>,
        limits: RingLimits,
        always_replay: bool,
    ) -> Refreshed {
        if epoch != self.epoch {
            return Refreshed::Stale;
        }
        let top = rows.last().map_or(0, |r| r.0);
        let unchanged = if always_replay {
            // coderd replays on every `full_refresh`, except here: a reload already replayed
            // this very history (the edit's notify came after a LISTEN reconnect), and coderd
            // replays an edit once.
            let floor = self.ring.floor;
            let seen_by_reload = std::mem::take(&mut self.reload_replayed);
            seen_by_reload
                && !rows.is_empty()
                && self
                    .ring
                    .all()
                    .map(|e| (e.id, &e.event))
                    .eq(rows.iter().filter(|r| r.0 > floor).map(|r| (r.0, &r.1)))
        } else {
            // Unchanged means nothing held was deleted: ids the reload adds are merged, not
            // replayed.
            let new: std::collections::HashSet<i64> = rows.iter().map(|r| r.0).collect();
            let kept = self
                .ring
                .all()
                .filter(|e| e.id <= top)
                .all(|e| new.contains(&e.id));
            self.reload_replayed |= !kept;
            kept
        };
        if unchanged {
            self.ring.hold = false;
            let pending = self.ring.pending_ids();
            let fx = self
                .ring
                .merge_read(self.ring.floor, rows, &pending, limits);
            self.refreshing = false;
            self.release_refresh_staged(limits);
            if fx.advanced {
                self.wake(false);
            }
            return Refreshed::Merged;
        }
        let carried: Vec<(i64, Bytes)> = self
            .ring
            .all()
            .filter(|e| e.id > top)
            .map(|e| (e.id, e.event.clone()))
            .collect();
        let (pending, staged) = self.ring.take_waiting();
        self.replay_base = std::sync::Arc::new(rows.iter().map(|r| r.1.clone()).collect());
        self.replay_top = top;
        self.ring = Ring::from_read(0, rows, limits);
        self.replay_seq = self.ring.max_seq();
        for (id, event) in carried {
            self.ring.feed_message(id, event, limits);
            self.ring.announce(id, limits);
        }
        // What was announced or staged but not yet resolved stays so in the new ring.
        for id in pending {
            self.ring.announce(id, limits);
        }
        for (id, event, heard) in staged {
            self.ring.feed_message(id, event, limits);
            if heard {
                self.ring.announce(id, limits);
            }
        }
        self.refreshing = false;
        self.release_refresh_staged(limits);
        self.generation += 1;
        self.wake(true);
        Refreshed::Replayed
    }

    fn release_refresh_staged(&mut self, limits: RingLimits) {
        for (id, event) in std::mem::take(&mut self.refresh_staged) {
            self.ring.feed_message(id, event, limits);
        }
    }
}
