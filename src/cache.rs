//! The cache of all chats: a `DashMap` of [`Chat`]s, the global byte budget, and the reads that
//! keep rings complete (hole repair, full refresh, reload after a LISTEN reconnect).
//!
//! No DashMap guard is held across an `.await`: every guard here lives inside one statement or
//! a block without awaits (enforced by clippy's `await_holding_invalid_type`).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use uuid::Uuid;

use crate::chat::{Chat, Refreshed};
use crate::config::{CacheConfig, Framing};
use crate::db::{self, Pool, ReadReason};
use crate::metrics::Metrics;
use crate::render;
use crate::ring::{Effects, RingLimits};

/// Why chatcache cannot read or render a chat's messages itself.
#[derive(Debug, thiserror::Error)]
pub enum FillError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error(transparent)]
    Unsupported(#[from] render::UnsupportedContent),
}

pub struct Cache {
    chats: DashMap<Uuid, Arc<Chat>>,
    pub pool: Pool,
    pub metrics: Metrics,
    pub framing: Framing,
    limits: RwLock<CacheConfig>,
    total_bytes: AtomicI64,
    /// Chats whose rows chatcache cannot render, with the time until which they stay with coderd.
    left_to_coderd: DashMap<Uuid, Instant>,
}

impl Cache {
    pub fn new(pool: Pool, metrics: Metrics, framing: Framing, limits: CacheConfig) -> Arc<Self> {
        Arc::new(Self {
            chats: DashMap::new(),
            pool,
            metrics,
            framing,
            limits: RwLock::new(limits),
            total_bytes: AtomicI64::new(0),
            left_to_coderd: DashMap::new(),
        })
    }

    pub fn limits(&self) -> CacheConfig {
        self.limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Applies reloaded limits; rings shrink on their next insert.
    pub fn set_limits(&self, limits: CacheConfig) {
        *self.limits.write().unwrap_or_else(|e| e.into_inner()) = limits;
    }

    pub fn ring_limits(&self) -> RingLimits {
        let l = self.limits();
        RingLimits {
            max_messages: l.max_messages_per_chat,
            max_bytes: l.max_bytes_per_chat,
            grace: Duration::from_millis(l.hole_grace_ms),
            settle: Duration::from_millis(l.order_settle_ms),
            proof: l.order_proof,
        }
    }

    pub fn get(&self, id: &Uuid) -> Option<Arc<Chat>> {
        self.chats.get(id).map(|c| c.clone())
    }

    /// The chat's entry, created (as `Loading`) when absent. `true` means the caller created it
    /// and must start its lifecycle.
    pub fn get_or_create(&self, id: Uuid) -> (Arc<Chat>, bool) {
        let mut created = false;
        let chat = self
            .chats
            .entry(id)
            .or_insert_with(|| {
                created = true;
                Arc::new(Chat::new(id))
            })
            .clone();
        if created {
            self.metrics.chats_held.set(self.chats.len() as i64);
        }
        (chat, created)
    }

    pub fn chat_ids(&self) -> Vec<Uuid> {
        self.chats.iter().map(|e| *e.key()).collect()
    }

    /// Removes a chat whose feed ended; its bytes leave the budget.
    pub fn remove(&self, chat: &Arc<Chat>) {
        let removed = self
            .chats
            .remove_if(&chat.id, |_, c| Arc::ptr_eq(c, chat))
            .is_some();
        chat.close();
        if removed {
            let bytes = chat.lock().ring.bytes as i64;
            self.account(-bytes);
            self.metrics.chats_held.set(self.chats.len() as i64);
        }
    }

    pub fn account(&self, delta: i64) {
        let total = self.total_bytes.fetch_add(delta, Ordering::Relaxed) + delta;
        self.metrics.bytes_held.set(total);
    }

    /// Runs a synchronous change on a chat's state, keeps the byte budget and acts on the
    /// effects: wakes subscribers, schedules hole checks and repairs.
    pub fn apply<F>(self: &Arc<Self>, chat: &Arc<Chat>, change: F)
    where
        F: FnOnce(&mut crate::chat::ChatState, RingLimits) -> Effects,
    {
        let limits = self.ring_limits();
        let (fx, delta) = {
            let mut state = chat.lock();
            let before = state.ring.bytes as i64;
            let fx = change(&mut state, limits);
            if fx.advanced {
                state.wake(false);
            }
            (fx, state.ring.bytes as i64 - before)
        };
        self.account(delta);
        if fx.repair_now {
            self.spawn_repair(chat.clone());
        } else if fx.check_later {
            self.spawn_hole_check(chat.clone());
        }
        if delta > 0 {
            self.enforce_budget();
        }
    }

    /// A LISTEN announcement: message `id` exists in `chat`.
    pub fn announce(self: &Arc<Self>, chat_id: Uuid, id: i64) {
        if let Some(chat) = self.get(&chat_id) {
            self.apply(&chat, |state, limits| state.ring.announce(id, limits));
        }
    }

    /// Once an announced message has been missing for the grace period, it is read from
    /// Postgres. One checker per chat; it sleeps until the oldest pending id is due.
    fn spawn_hole_check(self: &Arc<Self>, chat: Arc<Chat>) {
        {
            let mut state = chat.lock();
            if state.hole_check_running {
                return;
            }
            state.hole_check_running = true;
        }
        let cache = self.clone();
        tokio::spawn(async move {
            loop {
                let limits = cache.ring_limits();
                let grace = limits.grace;
                let due = chat.lock().ring.due_in(limits);
                match due {
                    Some(wait) if !wait.is_zero() && !chat.is_closed() => {
                        tokio::time::sleep(wait).await;
                    }
                    Some(_) if !chat.is_closed() => {
                        // Expiring may release messages or ask for a repair; keep checking
                        // while anything still waits.
                        cache.apply(&chat, |state, limits| state.ring.expire(limits));
                        tokio::task::yield_now().await;
                        let still = chat.lock().ring.due_in(limits);
                        if still.is_some_and(|d| d.is_zero()) {
                            tokio::time::sleep(grace.max(Duration::from_millis(10))).await;
                        }
                    }
                    _ => {
                        // Re-checked under the lock that announcements take, so none is missed.
                        let mut state = chat.lock();
                        if state.ring.due_in(limits).is_some() && !chat.is_closed() {
                            continue;
                        }
                        state.hole_check_running = false;
                        return;
                    }
                }
            }
        });
    }

    /// One coalesced read of `id > proven_head` per chat; a second request while it runs is
    /// folded into one more read afterwards.
    pub fn spawn_repair(self: &Arc<Self>, chat: Arc<Chat>) {
        {
            let mut state = chat.lock();
            if state.repair_running {
                state.repair_again = true;
                return;
            }
            state.repair_running = true;
        }
        let cache = self.clone();
        tokio::spawn(async move {
            loop {
                let (epoch, from, pending) = {
                    let state = chat.lock();
                    (
                        state.epoch,
                        state.ring.repair_from(),
                        state.ring.pending_ids(),
                    )
                };
                // With announced ids missing it is a hole repair; otherwise the read only
                // proves the order of messages the feed already delivered (`order_proof`).
                let reason = if pending.is_empty() {
                    ReadReason::Proof
                } else {
                    cache.metrics.hole_repairs.inc();
                    ReadReason::Repair
                };
                tracing::debug!(chat.id = %chat.id, from, ?pending, reason = reason.label(), "reading to complete the ring");
                let result = cache.read_events(reason, chat.id, from).await;
                let mut again = false;
                match result {
                    Ok(rows) => {
                        tracing::debug!(chat.id = %chat.id, from, rows = rows.len(), "ring completed");
                        cache.apply(&chat, |state, limits| {
                            if state.epoch != epoch {
                                return Effects::default();
                            }
                            state.ring.merge_read(from, rows, &pending, limits)
                        });
                    }
                    Err(FillError::Unsupported(e)) => {
                        cache.leave_to_coderd(&chat, &e);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(chat.id = %chat.id, error = %e, "hole repair failed");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                        again = !chat.is_closed();
                    }
                }
                let mut state = chat.lock();
                // Another read only helps if something is still missing.
                let waiting = state.ring.has_pending() || state.ring.staged_len() > 0;
                again |= std::mem::take(&mut state.repair_again) && waiting;
                if again && !chat.is_closed() {
                    continue;
                }
                state.repair_running = false;
                // Ids announced while the read ran get their own grace period.
                let waiting = state.ring.has_pending() || state.ring.staged_len() > 0;
                drop(state);
                if waiting && !chat.is_closed() {
                    cache.spawn_hole_check(chat);
                }
                return;
            }
        });
    }

    /// A `full_refresh` notify (an edit): reload the whole history and replay it.
    pub fn full_refresh(self: &Arc<Self>, chat_id: Uuid) {
        if let Some(chat) = self.get(&chat_id) {
            self.metrics.full_refreshes.inc();
            self.spawn_reload(chat, ReadReason::Refresh);
        }
    }

    /// Re-reads a chat from id 0 in a new epoch. After a refresh every subscriber gets the
    /// whole history again; after a reload only if the history changed.
    pub fn spawn_reload(self: &Arc<Self>, chat: Arc<Chat>, reason: ReadReason) {
        let epoch = chat.lock().begin_refresh();
        let cache = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                match cache.read_events(reason, chat.id, 0).await {
                    Ok(rows) => {
                        let limits = cache.ring_limits();
                        let read = rows.len();
                        let (delta, refreshed) = {
                            let mut state = chat.lock();
                            let bytes = state.ring.bytes as i64;
                            let always = reason == ReadReason::Refresh;
                            let refreshed = state.finish_refresh(epoch, rows, limits, always);
                            (state.ring.bytes as i64 - bytes, refreshed)
                        };
                        cache.account(delta);
                        if refreshed == Refreshed::Replayed {
                            tracing::info!(chat.id = %chat.id, reason = reason.label(),
                                messages = read, "history rewritten; replayed to subscribers");
                        }
                        return;
                    }
                    Err(FillError::Unsupported(e)) => {
                        cache.leave_to_coderd(&chat, &e);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(chat.id = %chat.id, error = %e, "reload failed; retrying");
                        tokio::time::sleep(delay).await;
                        delay = (delay * 2).min(Duration::from_secs(5));
                        if chat.is_closed() || chat.lock().epoch != epoch {
                            return;
                        }
                    }
                }
            }
        });
    }

    /// After a LISTEN reconnect a `full_refresh` may have been missed: reload every chat.
    pub fn reload_all(self: &Arc<Self>) {
        for id in self.chat_ids() {
            if let Some(chat) = self.get(&id) {
                self.spawn_reload(chat, ReadReason::Reload);
            }
        }
    }

    /// How long a chat whose rows chatcache cannot render is left to coderd.
    const LEFT_TO_CODERD: Duration = Duration::from_secs(300);

    /// Stops serving a chat whose rows chatcache cannot render faithfully: its subscribers are
    /// closed (they reconnect) and, for a while, new ones are tunnelled to coderd.
    pub fn leave_to_coderd(&self, chat: &Arc<Chat>, why: &render::UnsupportedContent) {
        tracing::warn!(chat.id = %chat.id, error = %why, "chat left to coderd");
        self.left_to_coderd
            .insert(chat.id, Instant::now() + Self::LEFT_TO_CODERD);
        self.remove(chat);
    }

    /// True while a chat must be passed to coderd untouched.
    pub fn is_left_to_coderd(&self, chat: &Uuid) -> bool {
        let until = self.left_to_coderd.get(chat).map(|u| *u);
        match until {
            Some(until) if Instant::now() < until => true,
            Some(_) => {
                self.left_to_coderd.remove(chat);
                false
            }
            None => false,
        }
    }

    /// Reads and renders `id > after_id` for one chat.
    pub async fn read_events(
        &self,
        reason: ReadReason,
        chat: Uuid,
        after_id: i64,
    ) -> Result<Vec<(i64, Bytes)>, FillError> {
        let rows = db::messages_after(&self.pool, &self.metrics, reason, chat, after_id).await?;
        rows.iter()
            .map(|row| {
                Ok((
                    row.id,
                    Bytes::from(render::message_event(row, self.framing)?),
                ))
            })
            .collect()
    }

    /// Evicts idle chats, least recently used first, while the cache is over `max_bytes`.
    fn enforce_budget(&self) {
        let max = self.limits().max_bytes as i64;
        if self.total_bytes.load(Ordering::Relaxed) <= max {
            return;
        }
        let mut idle: Vec<(std::time::Instant, Arc<Chat>)> = self
            .chats
            .iter()
            .filter_map(|e| {
                let since = e.value().lock().idle_since?;
                Some((since, e.value().clone()))
            })
            .collect();
        idle.sort_by_key(|(since, _)| *since);
        for (_, chat) in idle {
            if self.total_bytes.load(Ordering::Relaxed) <= max {
                break;
            }
            tracing::info!(chat.id = %chat.id, "evicting idle chat over the byte budget");
            self.metrics.evictions.inc();
            self.remove(&chat);
        }
    }
}
