//! One chat's durable messages and what is proven about them. Pure data, no I/O.
//!
//! Invariant: every visible message with `floor < id <= proven_head` is in the ring. Messages
//! above `proven_head` arrived from coderd's stream (the feed) and are checked against the LISTEN
//! ledger: every `after_message_id` notify announces id `after_message_id + 1`. An announced id
//! that is not held is *pending*. Every feed message is *staged* until its own announcement has
//! been heard (or the grace period passed), and while a pending id lies below it: Postgres
//! delivers notifies to every listener in one order, so by the time a message's announcement is
//! heard, the announcements coderd reacted to before sending it have been heard too. A pending
//! id below a staged message is a hole (coderd's stream skipped it): one database read of the
//! ids from the lowest pending one resolves both, and subscribers still see id order.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;

/// One cached message: its id, when it entered the ring, and the encoded `message` event.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: i64,
    /// Insertion order; subscribers follow it so a late repair still reaches them.
    pub seq: u64,
    pub event: Bytes,
}

/// What the caller must do after a ring operation.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effects {
    /// New entries are visible: wake subscribers.
    pub advanced: bool,
    /// A hole is known: read `id > proven_head` now.
    pub repair_now: bool,
    /// An announced id is missing: check again after the grace period.
    pub check_later: bool,
}

impl Effects {
    pub fn merge(&mut self, other: Effects) {
        self.advanced |= other.advanced;
        self.repair_now |= other.repair_now;
        self.check_later |= other.check_later;
    }
}

/// Limits applied on every insert.
#[derive(Debug, Clone, Copy)]
pub struct RingLimits {
    pub max_messages: usize,
    pub max_bytes: usize,
    /// How long a message may wait for its announcement, or an announced id for its message.
    pub grace: Duration,
    /// How long a heard message still waits for announcements of lower ids that another
    /// replica's notify batch may deliver a little later (coderd flushes every 50 ms).
    pub settle: Duration,
    /// Release a feed message only once a read of `id > proven_head` has covered it, so no
    /// lower id can still appear: strict id order at the cost of one coalesced read per chat
    /// per burst of messages.
    pub proof: bool,
}

/// A feed message not yet visible to subscribers.
#[derive(Debug)]
struct Staged {
    event: Bytes,
    /// When its own announcement was heard on LISTEN.
    heard: Option<Instant>,
    since: Instant,
}

#[derive(Debug, Default)]
pub struct Ring {
    entries: VecDeque<Entry>,
    pub floor: i64,
    pub proven_head: i64,
    pub bytes: usize,
    next_seq: u64,
    /// Highest seq that was inserted below the head (out of id order); 0 when none.
    pub last_late_seq: u64,
    /// Highest seq among entries trimmed away: a subscriber that had not seen it lost it.
    pub trimmed_seq: u64,
    /// Announced ids not held yet, with when they were announced.
    pending: BTreeMap<i64, Instant>,
    /// Set while a full refresh is read: nothing staged is released until the replay.
    pub hold: bool,
    staged: BTreeMap<i64, Staged>,
}

impl Ring {
    /// A ring proven complete for `floor < id <= proven_head` by a read that returned `rows`.
    pub fn from_read(floor: i64, rows: Vec<(i64, Bytes)>, limits: RingLimits) -> Self {
        let mut ring = Ring {
            floor,
            proven_head: floor,
            ..Ring::default()
        };
        for (id, event) in rows {
            ring.push_back(id, event);
            ring.proven_head = ring.proven_head.max(id);
        }
        ring.trim(limits);
        ring
    }

    pub fn head(&self) -> i64 {
        self.entries
            .back()
            .map_or(self.proven_head, |e| e.id.max(self.proven_head))
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn max_seq(&self) -> u64 {
        self.next_seq
    }

    pub fn holds(&self, id: i64) -> bool {
        self.position(id).is_ok()
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Messages staged behind a pending id or their own announcement.
    pub fn staged_len(&self) -> usize {
        self.staged.len()
    }

    /// Ids staged or pending, for carrying them into a rebuilt ring.
    pub fn take_waiting(&mut self) -> (Vec<i64>, Vec<(i64, Bytes, bool)>) {
        let pending = std::mem::take(&mut self.pending).into_keys().collect();
        let staged = std::mem::take(&mut self.staged)
            .into_iter()
            .map(|(id, s)| (id, s.event, s.heard.is_some()))
            .collect();
        (pending, staged)
    }

    pub fn pending_ids(&self) -> Vec<i64> {
        self.pending.keys().copied().collect()
    }

    /// Where a repair read starts: the proven head, never the lowest missing id — a read from
    /// there could not show a lower id whose announcement is still on its way.
    pub fn repair_from(&self) -> i64 {
        self.proven_head
    }

    fn position(&self, id: i64) -> Result<usize, usize> {
        self.entries.binary_search_by_key(&id, |e| e.id)
    }

    fn push_back(&mut self, id: i64, event: Bytes) {
        self.next_seq += 1;
        self.bytes += event.len();
        self.entries.push_back(Entry {
            id,
            seq: self.next_seq,
            event,
        });
    }

    fn insert_sorted(&mut self, id: i64, event: Bytes) -> bool {
        match self.position(id) {
            Ok(_) => false,
            Err(at) if at == self.entries.len() => {
                self.push_back(id, event);
                true
            }
            Err(at) => {
                self.next_seq += 1;
                self.bytes += event.len();
                self.last_late_seq = self.next_seq;
                self.entries.insert(
                    at,
                    Entry {
                        id,
                        seq: self.next_seq,
                        event,
                    },
                );
                true
            }
        }
    }

    /// A LISTEN announcement of message `id` (from any replica).
    pub fn announce(&mut self, id: i64, limits: RingLimits) -> Effects {
        if id <= self.proven_head || id <= self.floor || self.holds(id) {
            return Effects::default();
        }
        if let Some(staged) = self.staged.get_mut(&id) {
            staged.heard.get_or_insert_with(Instant::now);
            return self.release_staged(limits, false);
        }
        let mut fx = Effects::default();
        if id < self.head() || self.staged.range(id..).next().is_some() {
            // The feed already passed this id (it delivers in id order): a hole to repair now.
            fx.repair_now = true;
        } else {
            fx.check_later = true;
        }
        self.pending.entry(id).or_insert_with(Instant::now);
        fx
    }

    /// A message delivered by the feed, with coderd's exact bytes.
    pub fn feed_message(&mut self, id: i64, event: Bytes, limits: RingLimits) -> Effects {
        if id <= self.floor || self.holds(id) || self.staged.contains_key(&id) {
            return Effects::default();
        }
        let heard = self.pending.remove(&id);
        self.staged.insert(
            id,
            Staged {
                event,
                heard,
                since: Instant::now(),
            },
        );
        self.release_staged(limits, false)
    }

    /// How long until the next waiting thing is due: a pending id or an unheard staged message
    /// after `grace`, a heard staged message after `settle`. `None` when nothing waits.
    pub fn due_in(&self, limits: RingLimits) -> Option<Duration> {
        let pending = self
            .pending
            .values()
            .map(|t| limits.grace.saturating_sub(t.elapsed()));
        let staged = self.staged.values().map(|s| match s.heard {
            Some(at) => limits.settle.saturating_sub(at.elapsed()),
            None => limits.grace.saturating_sub(s.since.elapsed()),
        });
        pending.chain(staged).min()
    }

    /// After the grace period: staged messages whose announcement never came are released, and
    /// a pending id that is overdue asks for a repair read.
    pub fn expire(&mut self, limits: RingLimits) -> Effects {
        let mut fx = self.release_staged(limits, true);
        if self.pending.values().any(|t| t.elapsed() >= limits.grace) {
            fx.repair_now = true;
        }
        fx
    }

    /// Merges a read of `id > from` that started when `pending_at_start` were pending.
    ///
    /// Every visible message above `from` is in `rows`, so pending ids it lacks are not visible
    /// (deleted by an edit) and are dropped; staged messages it covers are released.
    pub fn merge_read(
        &mut self,
        from: i64,
        rows: Vec<(i64, Bytes)>,
        pending_at_start: &[i64],
        limits: RingLimits,
    ) -> Effects {
        let mut advanced = false;
        let mut top = from;
        for (id, event) in rows {
            top = top.max(id);
            let event = self.staged.remove(&id).map_or(event, |s| s.event);
            if id > self.floor {
                advanced |= self.insert_sorted(id, event);
            }
        }
        if from <= self.proven_head {
            self.proven_head = self.proven_head.max(top);
        }
        for id in pending_at_start {
            self.pending.remove(id);
        }
        self.pending
            .retain(|&id, _| id > top || !self.entries.iter().any(|e| e.id == id));
        let mut fx = self.release_staged(limits, false);
        fx.advanced |= advanced;
        self.trim(limits);
        fx
    }

    /// Moves staged messages into the ring, in id order, while no pending id lies below them
    /// and their announcement has been heard (or, with `expired`, the grace period passed).
    fn release_staged(&mut self, limits: RingLimits, expired: bool) -> Effects {
        let mut fx = Effects::default();
        if self.hold {
            return fx;
        }
        while let Some((&id, staged)) = self.staged.iter().next() {
            if self.pending.range(..id).next().is_some() {
                fx.repair_now = true;
                break;
            }
            if limits.proof && id > self.proven_head {
                // Only a read proves that nothing lies between the proven head and this id.
                fx.repair_now = true;
                break;
            }
            let ready = limits.proof
                || match staged.heard {
                    Some(at) => at.elapsed() >= limits.settle,
                    None => expired && staged.since.elapsed() >= limits.grace,
                };
            if !ready {
                fx.check_later = true;
                break;
            }
            let staged = self.staged.remove(&id).expect("key just seen");
            self.pending.remove(&id);
            if !self.holds(id) && id > self.floor {
                fx.advanced |= self.insert_sorted(id, staged.event);
            }
        }
        self.trim(limits);
        fx
    }

    /// Drops the oldest messages until both limits hold, raising the floor.
    pub fn trim(&mut self, limits: RingLimits) {
        while self.entries.len() > limits.max_messages
            || (self.bytes > limits.max_bytes && self.entries.len() > 1)
        {
            let old = self.entries.pop_front().expect("non-empty");
            self.trimmed_seq = self.trimmed_seq.max(old.seq);
            self.bytes -= old.event.len();
            self.floor = old.id;
            self.proven_head = self.proven_head.max(self.floor);
        }
    }

    /// Entries with `id > after_id`, in id order (a catch-up).
    pub fn after(&self, after_id: i64) -> impl Iterator<Item = &Entry> {
        let start = match self.position(after_id) {
            Ok(i) => i + 1,
            Err(i) => i,
        };
        self.entries.range(start..)
    }

    /// Entries a subscriber has not seen: inserted after `seen_seq`, above its original cursor.
    pub fn since(&self, seen_seq: u64, after_id: i64) -> Vec<Entry> {
        let mut out: Vec<Entry> = if self.last_late_seq > seen_seq {
            self.entries
                .iter()
                .filter(|e| e.seq > seen_seq && e.id > after_id)
                .cloned()
                .collect()
        } else {
            let mut tail: Vec<Entry> = self
                .entries
                .iter()
                .rev()
                .take_while(|e| e.seq > seen_seq)
                .filter(|e| e.id > after_id)
                .cloned()
                .collect();
            tail.reverse();
            tail
        };
        out.sort_by_key(|e| e.id);
        out
    }

    /// Every entry, for a full replay.
    pub fn all(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: RingLimits = RingLimits {
        max_messages: 100,
        max_bytes: 1 << 20,
        grace: Duration::from_secs(60),
        settle: Duration::ZERO,
        proof: false,
    };

    fn ev(id: i64) -> Bytes {
        Bytes::from(format!("{{\"id\":{id}}}"))
    }

    fn ids(ring: &Ring) -> Vec<i64> {
        ring.all().map(|e| e.id).collect()
    }

    #[test]
    fn feed_messages_wait_for_their_announcement() {
        let mut ring = Ring::from_read(0, vec![(10, ev(10))], LIMITS);
        assert_eq!(ring.proven_head, 10);
        let fx = ring.feed_message(12, ev(12), LIMITS);
        assert!(!fx.advanced && fx.check_later, "staged until announced");
        assert_eq!(ring.feed_message(12, ev(12), LIMITS), Effects::default());
        assert!(ring.announce(12, LIMITS).advanced);
        assert_eq!(ids(&ring), vec![10, 12]);
        assert_eq!(ring.after(10).map(|e| e.id).collect::<Vec<_>>(), vec![12]);
        assert_eq!(ring.head(), 12);
        // Announced first, delivered second: visible at once.
        ring.announce(13, LIMITS);
        assert!(ring.feed_message(13, ev(13), LIMITS).advanced);
    }

    #[test]
    fn unannounced_messages_are_released_after_the_grace() {
        let quick = RingLimits {
            grace: Duration::ZERO,
            ..LIMITS
        };
        let mut ring = Ring::from_read(0, vec![], quick);
        ring.feed_message(7, ev(7), LIMITS);
        assert_eq!(ring.due_in(LIMITS).map(|d| d > Duration::ZERO), Some(true));
        assert!(ring.expire(quick).advanced);
        assert_eq!(ids(&ring), vec![7]);
        assert_eq!(ring.due_in(LIMITS), None);
    }

    /// Another replica's announcement of a lower id arrives within the settle time.
    #[test]
    fn heard_messages_settle_before_release() {
        let slow = RingLimits {
            settle: Duration::from_secs(60),
            ..LIMITS
        };
        let mut ring = Ring::from_read(0, vec![(9, ev(9))], slow);
        ring.announce(12, slow);
        let fx = ring.feed_message(12, ev(12), slow);
        assert!(!fx.advanced && fx.check_later);
        assert!(ring.announce(10, slow).repair_now, "10 below a staged 12");
        let pending = ring.pending_ids();
        ring.merge_read(9, vec![(10, ev(10)), (12, ev(12))], &pending, LIMITS);
        assert_eq!(ids(&ring), vec![9, 10, 12]);
    }

    /// With proof on, nothing from the feed is visible before a read has covered it.
    #[test]
    fn proof_mode_releases_only_read_messages() {
        let strict = RingLimits {
            proof: true,
            ..LIMITS
        };
        let mut ring = Ring::from_read(0, vec![(9, ev(9))], strict);
        ring.announce(12, strict);
        let fx = ring.feed_message(12, ev(12), strict);
        assert!(fx.repair_now && !fx.advanced);
        assert_eq!(ring.repair_from(), 9);
        let pending = ring.pending_ids();
        let fx = ring.merge_read(9, vec![(10, ev(10)), (12, ev(12))], &pending, strict);
        assert!(fx.advanced);
        assert_eq!(ids(&ring), vec![9, 10, 12]);
        assert_eq!(ring.staged_len(), 0);
    }

    /// coderd's cache answered notify 10 with message 11 and skipped 10 (protocol doc 10).
    #[test]
    fn feed_message_above_a_pending_id_is_staged_until_the_read() {
        let mut ring = Ring::from_read(0, vec![(9, ev(9))], LIMITS);
        assert!(ring.announce(10, LIMITS).check_later);
        let fx = ring.feed_message(11, ev(11), LIMITS);
        assert!(fx.repair_now && !fx.advanced);
        assert_eq!(ids(&ring), vec![9]);
        assert_eq!(ring.repair_from(), 9);
        let pending = ring.pending_ids();
        let fx = ring.merge_read(9, vec![(10, ev(10)), (11, ev(11))], &pending, LIMITS);
        assert!(fx.advanced && !fx.repair_now);
        assert_eq!(ids(&ring), vec![9, 10, 11]);
        assert_eq!(ring.proven_head, 11);
        assert!(!ring.has_pending());
        assert_eq!(ring.staged_len(), 0);
    }

    /// The notifies of two replicas crossed: 11 was announced and delivered before 10 was
    /// announced. 10 is still delivered, late, to every subscriber.
    #[test]
    fn late_announcement_below_head_is_a_hole_delivered_by_seq() {
        let mut ring = Ring::from_read(0, vec![(9, ev(9))], LIMITS);
        ring.announce(11, LIMITS);
        assert!(ring.feed_message(11, ev(11), LIMITS).advanced);
        let seen = ring.max_seq();
        assert!(ring.announce(10, LIMITS).repair_now);
        let pending = ring.pending_ids();
        ring.merge_read(9, vec![(10, ev(10)), (11, ev(11))], &pending, LIMITS);
        let late: Vec<i64> = ring.since(seen, 9).iter().map(|e| e.id).collect();
        assert_eq!(late, vec![10]);
    }

    #[test]
    fn pending_id_missing_from_the_read_was_deleted() {
        let mut ring = Ring::from_read(0, vec![], LIMITS);
        ring.announce(5, LIMITS);
        let pending = ring.pending_ids();
        ring.merge_read(0, vec![], &pending, LIMITS);
        assert!(!ring.has_pending());
    }

    #[test]
    fn trimming_raises_the_floor() {
        let limits = RingLimits {
            max_messages: 2,
            max_bytes: 1 << 20,
            grace: Duration::ZERO,
            settle: Duration::ZERO,
            proof: false,
        };
        let ring = Ring::from_read(0, (1..=5).map(|i| (i, ev(i))).collect(), limits);
        assert_eq!(ids(&ring), vec![4, 5]);
        assert_eq!(ring.floor, 3);
        let small = RingLimits {
            max_messages: 10,
            max_bytes: 20,
            grace: Duration::ZERO,
            settle: Duration::ZERO,
            proof: false,
        };
        let ring = Ring::from_read(0, (1..=5).map(|i| (i, ev(i))).collect(), small);
        assert!(ring.bytes <= 20, "{}", ring.bytes);
    }

    #[test]
    fn since_returns_only_new_entries() {
        let mut ring = Ring::from_read(0, vec![(1, ev(1)), (2, ev(2))], LIMITS);
        let seen = ring.max_seq();
        ring.announce(3, LIMITS);
        ring.feed_message(3, ev(3), LIMITS);
        assert_eq!(
            ring.since(seen, 0).iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![3]
        );
        assert!(ring.since(ring.max_seq(), 0).is_empty());
    }
}
