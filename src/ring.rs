//! One chat's durable messages and what is proven about them. Pure data, no I/O.
//!
//! Invariant: every visible message with `floor < id <= proven_head` is in the ring. Messages
//! above `proven_head` arrived from coderd's stream (the feed) and are checked against the LISTEN
//! ledger: every `after_message_id` notify announces id `after_message_id + 1`. An announced id
//! that is not held is *pending*. A feed message above a pending id is *staged* (held back) so
//! that subscribers never see a later message before an earlier one; a database read of
//! `id > proven_head` then resolves both.

use std::collections::{BTreeMap, BTreeSet, VecDeque};

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
    pending: BTreeSet<i64>,
    staged: BTreeMap<i64, Bytes>,
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

    pub fn pending_ids(&self) -> Vec<i64> {
        self.pending.iter().copied().collect()
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
    pub fn announce(&mut self, id: i64) -> Effects {
        if id <= self.proven_head || id <= self.floor || self.holds(id) {
            return Effects::default();
        }
        let mut fx = Effects::default();
        if id < self.head() {
            // A higher id was delivered already: this one is a hole to repair at once.
            fx.repair_now = true;
        } else {
            fx.check_later = true;
        }
        self.pending.insert(id);
        fx
    }

    /// A message delivered by the feed, with coderd's exact bytes.
    pub fn feed_message(&mut self, id: i64, event: Bytes, limits: RingLimits) -> Effects {
        if id <= self.floor || self.holds(id) {
            return Effects::default();
        }
        self.pending.remove(&id);
        if self.pending.range(..id).next().is_some() {
            self.staged.insert(id, event);
            return Effects {
                repair_now: true,
                ..Effects::default()
            };
        }
        let advanced = self.insert_sorted(id, event);
        self.trim(limits);
        Effects {
            advanced,
            ..Effects::default()
        }
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
            let event = self.staged.remove(&id).unwrap_or(event);
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
            .retain(|&id| id > top || !self.entries.iter().any(|e| e.id == id));
        let mut fx = self.release_staged(limits);
        fx.advanced |= advanced;
        self.trim(limits);
        fx
    }

    /// Moves staged messages into the ring when no pending id lies below them any more.
    fn release_staged(&mut self, limits: RingLimits) -> Effects {
        let mut fx = Effects::default();
        while let Some((&id, _)) = self.staged.iter().next() {
            if self.pending.range(..id).next().is_some() {
                fx.repair_now = true;
                break;
            }
            let event = self.staged.remove(&id).expect("key just seen");
            self.pending.remove(&id);
            if !self.holds(id) && id > self.floor {
                fx.advanced |= self.insert_sorted(id, event);
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
    };

    fn ev(id: i64) -> Bytes {
        Bytes::from(format!("{{\"id\":{id}}}"))
    }

    fn ids(ring: &Ring) -> Vec<i64> {
        ring.all().map(|e| e.id).collect()
    }

    #[test]
    fn feed_messages_append_in_order() {
        let mut ring = Ring::from_read(0, vec![(10, ev(10))], LIMITS);
        assert_eq!(ring.proven_head, 10);
        assert!(ring.feed_message(12, ev(12), LIMITS).advanced);
        assert_eq!(ring.feed_message(12, ev(12), LIMITS), Effects::default());
        assert_eq!(ids(&ring), vec![10, 12]);
        assert_eq!(ring.after(10).map(|e| e.id).collect::<Vec<_>>(), vec![12]);
        assert_eq!(ring.head(), 12);
    }

    #[test]
    fn feed_message_above_a_pending_id_is_staged_until_the_read() {
        let mut ring = Ring::from_read(0, vec![(9, ev(9))], LIMITS);
        assert!(ring.announce(10).check_later);
        let fx = ring.feed_message(11, ev(11), LIMITS);
        assert!(fx.repair_now && !fx.advanced);
        assert_eq!(ids(&ring), vec![9]);
        let pending = ring.pending_ids();
        let fx = ring.merge_read(9, vec![(10, ev(10)), (11, ev(11))], &pending, LIMITS);
        assert!(fx.advanced && !fx.repair_now);
        assert_eq!(ids(&ring), vec![9, 10, 11]);
        assert_eq!(ring.proven_head, 11);
        assert!(!ring.has_pending());
    }

    #[test]
    fn late_announcement_below_head_is_a_hole_delivered_by_seq() {
        let mut ring = Ring::from_read(0, vec![(9, ev(9))], LIMITS);
        ring.feed_message(11, ev(11), LIMITS);
        let seen = ring.max_seq();
        assert!(ring.announce(10).repair_now);
        let pending = ring.pending_ids();
        ring.merge_read(9, vec![(10, ev(10)), (11, ev(11))], &pending, LIMITS);
        let late: Vec<i64> = ring.since(seen, 9).iter().map(|e| e.id).collect();
        assert_eq!(late, vec![10]);
    }

    #[test]
    fn pending_id_missing_from_the_read_was_deleted() {
        let mut ring = Ring::from_read(0, vec![], LIMITS);
        ring.announce(5);
        let pending = ring.pending_ids();
        ring.merge_read(0, vec![], &pending, LIMITS);
        assert!(!ring.has_pending());
    }

    #[test]
    fn trimming_raises_the_floor() {
        let limits = RingLimits {
            max_messages: 2,
            max_bytes: 1 << 20,
        };
        let ring = Ring::from_read(0, (1..=5).map(|i| (i, ev(i))).collect(), limits);
        assert_eq!(ids(&ring), vec![4, 5]);
        assert_eq!(ring.floor, 3);
        let small = RingLimits {
            max_messages: 10,
            max_bytes: 20,
        };
        let ring = Ring::from_read(0, (1..=5).map(|i| (i, ev(i))).collect(), small);
        assert!(ring.bytes <= 20, "{}", ring.bytes);
    }

    #[test]
    fn since_returns_only_new_entries() {
        let mut ring = Ring::from_read(0, vec![(1, ev(1)), (2, ev(2))], LIMITS);
        let seen = ring.max_seq();
        ring.feed_message(3, ev(3), LIMITS);
        assert_eq!(
            ring.since(seen, 0).iter().map(|e| e.id).collect::<Vec<_>>(),
            vec![3]
        );
        assert!(ring.since(ring.max_seq(), 0).is_empty());
    }
}
