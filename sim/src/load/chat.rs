//! One chat driven through all its turns, with its subscribers following along.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use super::api::ChatApi;
use super::history::{History, HistoryError, VisibleMessage};
use super::options::{RunOptions, Target};
use super::report::{millis, Tally};
use super::seed::SeededChat;
use super::subscriber::{self, lock, ChatSignals, SharedState, SubscriberState, Subscription};

/// Longest pause between two looks at Postgres while a turn runs; subscriber progress usually
/// prompts a look sooner.
const FINISH_POLL: Duration = Duration::from_millis(100);
/// Shortest pause between two looks, so a burst of frames does not become a burst of queries.
const FINISH_POLL_GAP: Duration = Duration::from_millis(5);
/// How long stopped subscribers get to close their sockets.
const STOP_GRACE: Duration = Duration::from_secs(3);
/// How long subscribers get to match a history that changed after a turn's first read.
const RECHECK_GRACE: Duration = Duration::from_secs(2);

/// What every chat driver shares.
pub struct RunContext {
    pub options: RunOptions,
    pub targets: Arc<[Target]>,
    pub api: ChatApi,
    pub history: History,
    /// Called once per finished turn, for progress logging.
    pub on_turn: Box<dyn Fn() + Send + Sync>,
}

/// A chat's driver: its subscribers, what Postgres last showed, and what went wrong so far.
struct ChatDriver {
    ctx: Arc<RunContext>,
    chat: SeededChat,
    signals: Arc<ChatSignals>,
    subscribers: Vec<SharedState>,
    tasks: Vec<JoinHandle<()>>,
    /// The visible history as last verified.
    visible: Vec<VisibleMessage>,
    tally: Tally,
}

/// Drives one chat through `--turns` turns and returns what was counted.
pub async fn drive(ctx: Arc<RunContext>, chat: SeededChat) -> Tally {
    let turns = u64::from(ctx.options.turns);
    let mut tally = Tally::default();
    let prepared = prepare(&ctx, &chat).await;
    let (token, visible) = match prepared {
        Ok(prepared) => prepared,
        Err(reason) => {
            warn!(chat.id = %chat.chat_id, %reason, "chat skipped");
            tally.error(format!("chat skipped: {reason}"));
            tally.turns = turns;
            tally.failed_turns = turns;
            return tally;
        }
    };

    // Every subscriber starts from after_id 0; its first catch-up is the visible history.
    let signals = Arc::new(ChatSignals::default());
    let ids = ids_of(&visible);
    let (subscribers, tasks) = (0..ctx.options.subscribers_per_chat as usize)
        .map(|n| {
            let subscription = Subscription {
                chat_id: chat.chat_id,
                token: token.clone(),
                targets: ctx.targets.clone(),
                first_target: chat.index + n,
                framing: ctx.options.framing,
                initial_history: ids.clone(),
            };
            subscriber::spawn(subscription, signals.clone())
        })
        .unzip();
    let mut driver = ChatDriver {
        ctx,
        chat,
        signals,
        subscribers,
        tasks,
        visible,
        tally,
    };

    driver.settle_initial().await;
    for k in 0..driver.ctx.options.turns {
        driver.turn(k).await;
        (driver.ctx.on_turn)();
    }
    driver.finish().await
}

/// Checks the chat exists and the token is usable before any socket is opened.
async fn prepare(
    ctx: &RunContext,
    chat: &SeededChat,
) -> Result<(HeaderValue, Vec<VisibleMessage>), String> {
    let token = HeaderValue::from_str(&chat.owner_token)
        .map_err(|_| "token is not a valid header value".to_owned())?;
    ctx.history
        .turn_state(chat.chat_id)
        .await
        .map_err(|err| err.to_string())?;
    let visible = ctx
        .history
        .visible(chat.chat_id)
        .await
        .map_err(|err| err.to_string())?;
    Ok((token, visible))
}

fn ids_of(visible: &[VisibleMessage]) -> Vec<i64> {
    visible.iter().map(|message| message.id).collect()
}

impl ChatDriver {
    /// Waits for every subscriber's first catch-up, then checks it like a turn's end.
    async fn settle_initial(&mut self) {
        let deadline = Instant::now() + self.ctx.options.turn_timeout();
        if !self.wait_until(deadline, |s| s.caught_up_epoch >= 1).await {
            warn!(chat.id = %self.chat.chat_id, "subscribers did not catch up in time");
            self.tally.error("initial catch-up timed out");
        }
        self.settle(deadline).await;
    }

    /// One turn: send (or edit), wait for coderd to finish it, wait for the subscribers to
    /// hold the visible history, count, and reconnect if asked to.
    async fn turn(&mut self, k: u32) {
        self.tally.turns += 1;
        let ctx = self.ctx.clone();
        let options = &ctx.options;
        let started = Instant::now();
        let deadline = started + options.turn_timeout();
        let chat_id = self.chat.chat_id;
        let target = &ctx.targets[(self.chat.index + k as usize) % ctx.targets.len()];
        let newest_id = self.visible.iter().map(|m| m.id).max().unwrap_or(0);

        // Send the turn. An edit rewrites the newest visible user message; every subscriber
        // then expects coderd's full-refresh replay.
        let edited = options
            .is_edit_turn(k)
            .then(|| self.visible.iter().rev().find(|m| m.role == "user"))
            .flatten()
            .map(|message| message.id);
        let sent = match edited {
            Some(message_id) => {
                for state in &self.subscribers {
                    lock(state).ledger.expect_replay(message_id);
                }
                let text = format!("edited in turn {k} of chat {chat_id}");
                let token = &self.chat.owner_token;
                (ctx.api
                    .edit_message(target, chat_id, token, message_id, &text)
                    .await)
                    .map(Some)
            }
            None => {
                let text = format!("turn {k} of chat {chat_id}");
                let token = &self.chat.owner_token;
                ctx.api.send_message(target, chat_id, token, &text).await
            }
        };
        let user_message_id = match sent {
            Ok(id) => id.unwrap_or(newest_id),
            Err(err) => {
                warn!(chat.id = %chat_id, turn = k, error = %err, "turn not sent");
                self.tally.error(format!("send turn: {}", err.class()));
                self.tally.failed_turns += 1;
                self.settle(deadline).await;
                return;
            }
        };
        debug!(chat.id = %chat_id, turn = k, user_message_id, edit = edited.is_some(), "turn sent");

        // Wait for coderd to finish the turn, then for the subscribers to hold its history.
        let finished = self.await_finish(user_message_id, deadline).await;
        if !finished {
            warn!(chat.id = %chat_id, turn = k, "coderd did not finish the turn in time");
            self.tally.error("turn timed out in coderd");
            self.tally.failed_turns += 1;
        }
        let complete = self.settle(deadline).await;
        if finished && complete {
            self.tally.turn_ms.push(millis(started.elapsed()));
        }

        if options.reconnect_each_turn {
            self.reconnect_all().await;
        }
    }

    /// Polls Postgres until the turn of `user_message_id` is finished or the deadline passes.
    async fn await_finish(&mut self, user_message_id: i64, deadline: Instant) -> bool {
        let mut progress = self.signals.progress.subscribe();
        loop {
            progress.borrow_and_update();
            match self.ctx.history.turn_state(self.chat.chat_id).await {
                Ok(state) if state.finished_after(user_message_id) => return true,
                Ok(_) => {}
                Err(err) => self.postgres_error(&err),
            }

            let wake = async {
                tokio::time::sleep(FINISH_POLL_GAP).await;
                let _ = tokio::time::timeout(FINISH_POLL, progress.changed()).await;
            };
            if tokio::time::timeout_at(deadline, wake).await.is_err() {
                return false;
            }
        }
    }

    /// Reads the visible history, waits until every subscriber holds exactly it, then counts
    /// what differs. Returns whether all subscribers matched before the deadline.
    async fn settle(&mut self, deadline: Instant) -> bool {
        let visible = match self.ctx.history.visible(self.chat.chat_id).await {
            Ok(visible) => visible,
            Err(err) => {
                self.postgres_error(&err);
                return false;
            }
        };
        let mut visible = visible;
        let mut ids = ids_of(&visible);
        let mut complete = self.wait_until(deadline, |s| s.ledger.matches(&ids)).await;
        if !complete {
            // Something may have committed after the read (a turn whose send failed but whose
            // message coderd had stored, then ran): judge by what Postgres shows now, so a
            // message the subscribers rightly hold is not called foreign.
            if let Ok(fresh) = self.ctx.history.visible(self.chat.chat_id).await {
                if ids_of(&fresh) != ids {
                    visible = fresh;
                    ids = ids_of(&visible);
                    let grace = Instant::now() + RECHECK_GRACE;
                    complete = self.wait_until(grace, |s| s.ledger.matches(&ids)).await;
                }
            }
        }

        for (n, state) in self.subscribers.iter().enumerate() {
            let found = lock(state).ledger.reconcile(&ids);
            if found.total() > 0 {
                warn!(
                    chat.id = %self.chat.chat_id,
                    subscriber = n,
                    lost = found.lost,
                    foreign = found.foreign,
                    out_of_order = found.out_of_order,
                    "subscriber history differs from Postgres"
                );
            }
        }
        self.visible = visible;
        complete
    }

    /// Makes every subscriber close and reconnect, and waits until all have caught up.
    async fn reconnect_all(&mut self) {
        let mut epoch = 0;
        self.signals.directive.send_modify(|directive| {
            directive.epoch += 1;
            epoch = directive.epoch;
        });
        let deadline = Instant::now() + self.ctx.options.turn_timeout();
        if !self
            .wait_until(deadline, |s| s.caught_up_epoch >= epoch)
            .await
        {
            warn!(chat.id = %self.chat.chat_id, "reconnected subscribers did not catch up in time");
            self.tally.error("reconnect catch-up timed out");
        }
    }

    /// Waits until `done` holds for every subscriber, re-checking after each frame any of them
    /// takes. Returns false at the deadline.
    async fn wait_until(&self, deadline: Instant, done: impl Fn(&SubscriberState) -> bool) -> bool {
        let mut progress = self.signals.progress.subscribe();
        loop {
            progress.borrow_and_update();
            if self.subscribers.iter().all(|state| done(&lock(state))) {
                return true;
            }
            if tokio::time::timeout_at(deadline, progress.changed())
                .await
                .is_err()
            {
                return false;
            }
        }
    }

    fn postgres_error(&mut self, err: &HistoryError) {
        warn!(chat.id = %self.chat.chat_id, error = %err, "Postgres check failed");
        self.tally.error(format!("postgres: {err}"));
    }

    /// Stops the subscribers and folds their counts into the chat's tally.
    async fn finish(mut self) -> Tally {
        self.signals
            .directive
            .send_modify(|directive| directive.stop = true);
        for task in self.tasks {
            let abort = task.abort_handle();
            if tokio::time::timeout(STOP_GRACE, task).await.is_err() {
                abort.abort();
            }
        }

        for state in &self.subscribers {
            let mut s = lock(state);
            let subscriber_tally = std::mem::take(&mut s.tally);
            self.tally.merge(subscriber_tally);
            self.tally.faults.add(s.ledger.faults());
            self.tally.messages += s.ledger.messages();
        }
        self.tally
    }
}
