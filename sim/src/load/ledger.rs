//! The client model: which messages one subscriber holds, and every way the stream broke it.
//!
//! A subscriber keeps the ids of the messages it holds, ascending. A message above the newest
//! held id is appended. Anything else is a fault, except the replay that follows an edit: after a
//! full refresh coderd resends the chat's whole visible history from the start, with no marker
//! (protocol doc 8.2 step 6), so the client starts over.
//!
//! # When a replay starts
//!
//! While chatload edits a chat, the first message at or below the newest held id starts the
//! replay: the held list is cleared and restarted with it. Messages above the newest held id are
//! appended as usual until then, because coderd may deliver the replacement message *before*
//! the refresh: a notify of the previous turn that arrives late makes the subscriber read
//! `id > cursor`, which by then includes the replacement. Two refinements keep that race from
//! looking like a fault:
//!
//! * When nothing held is older than the edited message (it was the chat's first visible one),
//!   the refresh begins with the replacement, above everything held, so any message starts it.
//! * A replay may restart once more when its first message arrives again: the refresh after a
//!   late delivery, or a refresh on top of a reconnect that already asked for everything.

use std::time::{Duration, Instant};

use uuid::Uuid;

use super::frame::MessageHead;

/// Fault counters; see the crate-level list in `load` for what each one means.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Faults {
    pub lost: u64,
    pub duplicated: u64,
    pub out_of_order: u64,
    pub foreign: u64,
}

impl Faults {
    pub fn add(&mut self, other: Faults) {
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.out_of_order += other.out_of_order;
        self.foreign += other.foreign;
    }

    pub fn total(&self) -> u64 {
        self.lost + self.duplicated + self.out_of_order + self.foreign
    }
}

/// What a received message did to the ledger.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Receipt {
    Appended,
    /// The first message after an edit: the held list was cleared and restarted with it.
    ReplayStarted,
    Duplicated,
    OutOfOrder,
    /// The event or its message names another chat; the message was not taken.
    Foreign,
}

/// Where the subscriber stands with respect to an edit chatload made this turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Replay {
    /// No edit this turn.
    Idle,
    /// chatload is editing message `edited_id`; the full-refresh replay has not begun.
    Awaited { edited_id: i64 },
    /// The replay began with message `first_id`; `may_restart` while it has not restarted yet.
    Started { first_id: i64, may_restart: bool },
}

/// The messages one subscriber holds and the faults seen so far.
#[derive(Debug)]
pub struct Ledger {
    /// The subscribed chat; messages of any other chat are foreign.
    chat_id: Uuid,
    /// Held message ids, strictly ascending.
    held: Vec<i64>,
    replay: Replay,
    faults: Faults,
    /// `message` events taken in, whatever became of them.
    messages: u64,
    /// Edits announced so far; lets a connection tell whether an edit came after its cursor.
    edits: u64,
}

impl Ledger {
    pub fn new(chat_id: Uuid) -> Self {
        Ledger {
            chat_id,
            held: Vec::new(),
            replay: Replay::Idle,
            faults: Faults::default(),
            messages: 0,
            edits: 0,
        }
    }

    /// The stream cursor to reconnect with: the newest held id, 0 when nothing is held.
    pub fn last_id(&self) -> i64 {
        self.held.last().copied().unwrap_or(0)
    }

    pub fn held(&self) -> &[i64] {
        &self.held
    }

    pub fn faults(&self) -> Faults {
        self.faults
    }

    pub fn messages(&self) -> u64 {
        self.messages
    }

    /// Whether an edit replay is expected but has not begun; a reconnect then asks for the whole
    /// history (after_id 0), since coderd does not tell a reconnecting client about soft-deletes.
    pub fn awaits_replay(&self) -> bool {
        matches!(self.replay, Replay::Awaited { .. })
    }

    /// chatload is about to edit message `edited_id`: a full-refresh replay is coming.
    pub fn expect_replay(&mut self, edited_id: i64) {
        self.replay = Replay::Awaited { edited_id };
        self.edits += 1;
    }

    /// How many edits were announced; see [`Ledger::expect_replay`].
    pub fn edits(&self) -> u64 {
        self.edits
    }

    /// Applies one `message` event for a message in `event_chat`.
    pub fn receive(&mut self, event_chat: Option<Uuid>, message: &MessageHead) -> Receipt {
        self.messages += 1;
        if event_chat != Some(self.chat_id) || message.chat_id != Some(self.chat_id) {
            self.faults.foreign += 1;
            return Receipt::Foreign;
        }

        let id = message.id;
        let at_or_below_newest = id <= self.last_id();
        let starts_replay = match self.replay {
            Replay::Idle => false,
            Replay::Awaited { edited_id } => {
                at_or_below_newest || self.held.first().is_none_or(|first| *first >= edited_id)
            }
            Replay::Started {
                first_id,
                may_restart,
            } => may_restart && id == first_id && at_or_below_newest,
        };
        if starts_replay {
            let may_restart = matches!(self.replay, Replay::Awaited { .. });
            self.replay = Replay::Started {
                first_id: id,
                may_restart,
            };
            self.held.clear();
            self.held.push(id);
            return Receipt::ReplayStarted;
        }

        if id > self.last_id() {
            self.held.push(id);
            return Receipt::Appended;
        }

        // At or below the newest held id outside a replay: either seen before, or late. A late
        // message is kept in place so the end-of-turn check does not count it lost as well.
        match self.held.binary_search(&id) {
            Ok(_) => {
                self.faults.duplicated += 1;
                Receipt::Duplicated
            }
            Err(position) => {
                self.held.insert(position, id);
                self.faults.out_of_order += 1;
                Receipt::OutOfOrder
            }
        }
    }

    /// Whether the subscriber holds exactly `visible`, in order.
    pub fn matches(&self, visible: &[i64]) -> bool {
        self.held == visible
    }

    /// Whether every id of `ids` is held.
    pub fn holds_all(&self, ids: &[i64]) -> bool {
        ids.iter().all(|id| self.held.binary_search(id).is_ok())
    }

    /// The end-of-turn check against Postgres' visible history. Counts what is missing as lost,
    /// what should not be there as foreign, and a different order of the same ids as one
    /// out-of-order fault. Then the subscriber adopts the verified history (as a client would
    /// after reloading), so a fault is counted once, and any edit of the turn is over.
    pub fn reconcile(&mut self, visible: &[i64]) -> Faults {
        let mut sorted = visible.to_vec();
        sorted.sort_unstable();
        let lost = sorted
            .iter()
            .filter(|id| self.held.binary_search(id).is_err())
            .count();
        let foreign = self
            .held
            .iter()
            .filter(|id| sorted.binary_search(id).is_err())
            .count();
        let mut found = Faults {
            lost: lost as u64,
            foreign: foreign as u64,
            ..Faults::default()
        };
        if lost == 0 && foreign == 0 && self.held != visible {
            found.out_of_order = 1;
        }

        self.faults.add(found);
        self.held = sorted;
        self.replay = Replay::Idle;
        found
    }
}

/// A catch-up in progress: from starting a (re)connect until the first frame has arrived (the
/// snapshot always begins with a `status` event) and the subscriber holds every id Postgres
/// showed as visible when the connect started. For a reconnect that visible set is what the
/// subscriber already holds, so its catch-up is the time to the snapshot's first frame.
#[derive(Debug)]
pub struct CatchUp {
    started: Instant,
    /// Ids the snapshot must have delivered.
    target: Vec<i64>,
}

impl CatchUp {
    pub fn new(started: Instant, target: Vec<i64>) -> Self {
        CatchUp { started, target }
    }

    /// The ids still to be delivered, for a catch-up cut short by a broken connection.
    pub fn into_target(self) -> Vec<i64> {
        self.target
    }

    /// Called after each frame; returns the catch-up time once it is complete.
    pub fn after_frame(&self, ledger: &Ledger, now: Instant) -> Option<Duration> {
        ledger
            .holds_all(&self.target)
            .then(|| now.saturating_duration_since(self.started))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat() -> Uuid {
        Uuid::from_u128(0x1111_1111_1111_4111_8111_1111_1111_1111)
    }

    fn message(id: i64) -> MessageHead {
        MessageHead {
            id,
            chat_id: Some(chat()),
            role: "user".into(),
        }
    }

    fn take(ledger: &mut Ledger, ids: &[i64]) -> Vec<Receipt> {
        ids.iter()
            .map(|id| ledger.receive(Some(chat()), &message(*id)))
            .collect()
    }

    #[test]
    fn ascending_messages_are_appended() {
        let mut ledger = Ledger::new(chat());
        assert!(take(&mut ledger, &[1000, 1004, 1010])
            .iter()
            .all(|r| *r == Receipt::Appended));
        assert_eq!(ledger.held(), [1000, 1004, 1010]);
        assert_eq!(ledger.last_id(), 1010);
        assert_eq!(ledger.reconcile(&[1000, 1004, 1010]), Faults::default());
        assert_eq!(ledger.messages(), 3);
    }

    #[test]
    fn edit_replay_restarts_the_history() {
        // 1000 user, 1001 assistant, 1002 user (edited), 1003 assistant; replacement is 1004.
        let mut ledger = Ledger::new(chat());
        take(&mut ledger, &[1000, 1001, 1002, 1003]);

        ledger.expect_replay(1002);
        assert!(ledger.awaits_replay());
        let receipts = take(&mut ledger, &[1000, 1001, 1004, 1005]);
        assert_eq!(receipts[0], Receipt::ReplayStarted);
        assert!(receipts[1..].iter().all(|r| *r == Receipt::Appended));

        assert_eq!(
            ledger.reconcile(&[1000, 1001, 1004, 1005]),
            Faults::default()
        );
        assert_eq!(ledger.faults().total(), 0);
    }

    #[test]
    fn replacement_delivered_before_the_refresh() {
        // A late notify of the previous turn made the server read 1004 before the refresh.
        let mut ledger = Ledger::new(chat());
        take(&mut ledger, &[1000, 1001, 1002, 1003]);
        ledger.expect_replay(1002);
        let receipts = take(&mut ledger, &[1004, 1000, 1001, 1004]);
        assert_eq!(receipts[0], Receipt::Appended);
        assert_eq!(receipts[1], Receipt::ReplayStarted);
        assert_eq!(ledger.reconcile(&[1000, 1001, 1004]), Faults::default());
    }

    #[test]
    fn replay_may_begin_with_the_replacement() {
        // The edited message 1000 was the first visible one: the replay starts at 1002.
        let mut ledger = Ledger::new(chat());
        take(&mut ledger, &[1000, 1001]);
        ledger.expect_replay(1000);
        assert_eq!(take(&mut ledger, &[1002]), [Receipt::ReplayStarted]);
        assert_eq!(take(&mut ledger, &[1003]), [Receipt::Appended]);
        assert_eq!(ledger.reconcile(&[1002, 1003]), Faults::default());
    }

    #[test]
    fn replay_restarts_once_when_its_first_message_returns() {
        // The replacement 1002 came early, then the refresh resent it.
        let mut ledger = Ledger::new(chat());
        take(&mut ledger, &[1000, 1001]);
        ledger.expect_replay(1000);
        assert_eq!(
            take(&mut ledger, &[1002, 1002]),
            [Receipt::ReplayStarted; 2]
        );
        assert_eq!(take(&mut ledger, &[1002]), [Receipt::Duplicated]);
        assert_eq!(ledger.faults().duplicated, 1);
    }

    #[test]
    fn a_third_copy_of_the_history_is_duplicated() {
        let mut ledger = Ledger::new(chat());
        take(&mut ledger, &[1000, 1001, 1002]);
        ledger.expect_replay(1002);
        take(&mut ledger, &[1000, 1003]);
        assert_eq!(
            take(&mut ledger, &[1000, 1003]),
            [Receipt::ReplayStarted, Receipt::Appended]
        );
        assert_eq!(take(&mut ledger, &[1000, 1003]), [Receipt::Duplicated; 2]);
        assert_eq!(ledger.faults().duplicated, 2);
    }

    #[test]
    fn resent_message_without_edit_is_duplicated() {
        let mut ledger = Ledger::new(chat());
        take(&mut ledger, &[1000, 1001]);
        assert_eq!(take(&mut ledger, &[1001]), [Receipt::Duplicated]);
        assert_eq!(ledger.held(), [1000, 1001]);
        assert_eq!(ledger.faults().duplicated, 1);
    }

    #[test]
    fn late_message_is_out_of_order_but_not_lost() {
        let mut ledger = Ledger::new(chat());
        take(&mut ledger, &[1000, 1003]);
        assert_eq!(take(&mut ledger, &[1001]), [Receipt::OutOfOrder]);
        assert_eq!(ledger.held(), [1000, 1001, 1003]);

        let found = ledger.reconcile(&[1000, 1001, 1003]);
        assert_eq!(found.lost, 0);
        assert_eq!(ledger.faults().out_of_order, 1);
    }

    #[test]
    fn missing_messages_are_lost_once() {
        let mut ledger = Ledger::new(chat());
        take(&mut ledger, &[1000, 1002]);
        let found = ledger.reconcile(&[1000, 1001, 1002, 1003]);
        assert_eq!(found.lost, 2);

        // The subscriber adopted the verified history: the next turn starts clean.
        assert_eq!(ledger.last_id(), 1003);
        assert_eq!(ledger.reconcile(&[1000, 1001, 1002, 1003]).lost, 0);
        assert_eq!(ledger.faults().lost, 2);
    }

    #[test]
    fn soft_deleted_leftovers_are_foreign() {
        // No replay arrived after an edit: 1002 and 1003 were soft-deleted.
        let mut ledger = Ledger::new(chat());
        take(&mut ledger, &[1000, 1001, 1002, 1003]);
        ledger.expect_replay(1002);
        let found = ledger.reconcile(&[1000, 1001, 1004]);
        assert_eq!((found.lost, found.foreign), (1, 2));
        assert!(!ledger.awaits_replay());
    }

    #[test]
    fn message_of_another_chat_is_foreign_and_not_held() {
        let mut ledger = Ledger::new(chat());
        let stranger = MessageHead {
            chat_id: Some(Uuid::nil()),
            ..message(1000)
        };
        assert_eq!(ledger.receive(Some(chat()), &stranger), Receipt::Foreign);
        assert_eq!(ledger.receive(None, &message(1001)), Receipt::Foreign);
        assert!(ledger.held().is_empty());
        assert_eq!(ledger.faults().foreign, 2);
    }

    #[test]
    fn catch_up_completes_when_the_target_is_held() {
        let start = Instant::now();
        let mut ledger = Ledger::new(chat());
        let catch_up = CatchUp::new(start, vec![1000, 1001]);

        take(&mut ledger, &[1000]);
        assert_eq!(
            catch_up.after_frame(&ledger, start + Duration::from_millis(3)),
            None
        );
        take(&mut ledger, &[1001]);
        let done = catch_up.after_frame(&ledger, start + Duration::from_millis(7));
        assert_eq!(done, Some(Duration::from_millis(7)));
    }
}
