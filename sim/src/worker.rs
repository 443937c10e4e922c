//! The simulated LLM worker: claims pending chats and runs one deterministic turn each.
//!
//! A turn follows coderd's `processChat`: buffering on, status `running` with this replica's
//! `worker_id`, text deltas to local subscribers, then one transaction (holding the chat row
//! lock) that persists the turn, a `publishMessage` per stored row, the part buffer cleared,
//! and finally auto-promotion of the queue head or status `waiting`.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::json;
use uuid::Uuid;

use crate::chatd::ChatdError;
use crate::replica::Replica;
use crate::store::{self, NewMessage};
use crate::wire::chat::ChatRow;
use crate::wire::event::StreamEvent;
use crate::wire::message::MessageRow;
use crate::wire::part::{encode_for_storage, Part};

/// `acquire poll interval`.
const POLL_INTERVAL: Duration = Duration::from_secs(1);
/// `DefaultMaxChatsPerAcquire`.
const CHATS_PER_ACQUIRE: i64 = 10;
/// Every this many turns of a chat, the turn also makes a tool call.
const TOOL_TURN_EVERY: i64 = 3;

/// One claim of a chat by this worker: the claim time tells it apart from a later claim of the
/// same chat (after an edit or promotion made it pending again).
#[derive(Debug, Clone, Copy)]
struct Claim {
    chat_id: Uuid,
    started_at: DateTime<Utc>,
}

impl Claim {
    /// Whether the chat, as locked now, is still running under this claim.
    fn holds(&self, replica: &Replica, chat: &ChatRow) -> bool {
        chat.status == "running"
            && chat.worker_id == Some(replica.worker_id)
            && chat.started_at == Some(self.started_at)
    }
}

/// Claims pending chats every second, or sooner when this replica made one pending.
pub async fn run(replica: Arc<Replica>) {
    tracing::info!(replica = %replica.settings.name, worker.id = %replica.worker_id,
        "worker started");
    loop {
        tokio::select! {
            _ = tokio::time::sleep(POLL_INTERVAL) => {}
            _ = replica.worker_wake.notified() => {}
        }
        let claimed = match replica.pool.get().await {
            Ok(conn) => {
                let stale = replica.settings.stale_chat;
                store::acquire_chats(&*conn, replica.worker_id, CHATS_PER_ACQUIRE, stale).await
            }
            Err(e) => Err(e.into()),
        };
        match claimed {
            Ok(chats) => {
                for (chat_id, started_at) in chats {
                    let claim = Claim {
                        chat_id,
                        started_at,
                    };
                    tokio::spawn(process_chat(replica.clone(), claim));
                }
            }
            Err(e) => tracing::warn!(error = %e, "acquiring pending chats failed"),
        }
    }
}

/// Runs one claimed chat's turn; failures are logged and leave the chat to the next claim.
async fn process_chat(replica: Arc<Replica>, claim: Claim) {
    let chat_id = claim.chat_id;
    replica.streams.start_buffering(chat_id);
    let result = run_turn(&replica, claim).await;
    replica.streams.stop_buffering(chat_id);
    if let Err(e) = result {
        tracing::warn!(chat.id = %chat_id, error = %e, "turn failed");
    }
    if let Err(e) = finish_turn(&replica, claim).await {
        tracing::warn!(chat.id = %chat_id, error = %e, "finishing turn failed");
    }
}

/// Streams the deltas and persists the turn; persists nothing when the chat was taken away
/// meanwhile (interrupt, edit, promotion, another claim), as an interrupted coderd turn does.
async fn run_turn(replica: &Replica, claim: Claim) -> Result<(), ChatdError> {
    let chat_id = claim.chat_id;
    let (chat, turn) = {
        let conn = replica.pool.get().await?;
        let chat = store::chat_by_id(&*conn, chat_id)
            .await?
            .ok_or(ChatdError::ChatNotFound)?;
        (chat, store::user_message_count(&*conn, chat_id).await?)
    };
    let running = ChatRow {
        status: "running".into(),
        worker_id: Some(replica.worker_id),
        ..chat
    };
    replica.publish_status(&running).await;

    // Stream the deltas to local subscribers (and, through them, to relays).
    let settings = &replica.settings;
    let mut text = String::new();
    for n in 1..=settings.turn_parts {
        tokio::time::sleep(settings.part_delay).await;
        let delta = format!("part {n} of turn {turn} ");
        let part = Part::text(delta.clone());
        let event = StreamEvent::message_part(chat_id, "assistant", &part, settings.framing);
        replica.streams.publish_part(chat_id, event);
        text.push_str(&delta);
    }

    // Persist everything of the step in one transaction under the row lock.
    let rows = {
        let mut conn = replica.pool.get().await?;
        let tx = conn.transaction().await?;
        let Some(locked) = store::lock_chat(&tx, chat_id).await? else {
            return Ok(());
        };
        if !claim.holds(replica, &locked) {
            tracing::debug!(chat.id = %chat_id, status = %locked.status, "turn interrupted");
            return Ok(());
        }
        let messages = turn_messages(&locked, turn, text, settings.turn_parts);
        let rows = store::insert_messages(&tx, chat_id, &messages).await?;
        tx.commit().await?;
        rows
    };
    for row in &rows {
        replica.publish_message(row).await;
    }
    log_turn(chat_id, turn, &rows);
    Ok(())
}

/// Releases the chat as coderd's `processChat` cleanup does: leave it alone if another claim
/// owns it; keep `pending` if someone made it pending meanwhile; otherwise promote the queue
/// head (the chat goes `pending`) or settle on `waiting`.
async fn finish_turn(replica: &Replica, claim: Claim) -> Result<(), ChatdError> {
    let chat_id = claim.chat_id;
    let mut conn = replica.pool.get().await?;
    let tx = conn.transaction().await?;
    let Some(chat) = store::lock_chat(&tx, chat_id).await? else {
        return Ok(());
    };
    if chat.status == "running" && !claim.holds(replica, &chat) {
        return Ok(());
    }

    let mut promoted = None;
    let mut queue = None;
    let status = if chat.status == "pending" {
        "pending"
    } else if let Some(head) = store::take_queue_head(&tx, chat_id).await? {
        let message = NewMessage {
            role: "user",
            content: head.content,
            visibility: "both",
            created_by: Some(chat.owner_id),
            model_config_id: Some(chat.last_model_config_id),
            tokens: [0; 3],
        };
        promoted = Some(
            store::insert_messages(&tx, chat_id, &[message])
                .await?
                .remove(0),
        );
        queue = Some(store::queued(&tx, chat_id).await?);
        "pending"
    } else {
        "waiting"
    };
    store::set_status(&tx, chat_id, status, None).await?;
    tx.commit().await?;

    if let Some(row) = &promoted {
        replica.publish_message(row).await;
    }
    if let Some(queue) = &queue {
        replica.publish_queue_update(chat_id, queue).await;
    }
    let chat = ChatRow {
        status: status.into(),
        worker_id: None,
        started_at: None,
        ..chat
    };
    replica.publish_status(&chat).await;
    if status == "pending" {
        replica.worker_wake.notify_one();
    }
    Ok(())
}

/// The rows one turn stores: on every third turn a tool call and its result first, then the
/// assistant's text with its usage.
fn turn_messages(chat: &ChatRow, turn: i64, text: String, parts: u32) -> Vec<NewMessage> {
    let config = Some(chat.last_model_config_id);
    let assistant = |content: Vec<Part>, tokens: [i64; 3]| NewMessage {
        role: "assistant",
        content: encode_for_storage(&content),
        visibility: "both",
        created_by: None,
        model_config_id: config,
        tokens,
    };
    let mut messages = Vec::new();
    if turn % TOOL_TURN_EVERY == 0 {
        let call_id = format!("call_{turn}");
        let call = Part {
            kind: "tool-call".into(),
            tool_call_id: call_id.clone(),
            tool_name: "echo".into(),
            args: Some(json!({ "text": format!("turn {turn}") })),
            ..Part::default()
        };
        let result = Part {
            kind: "tool-result".into(),
            tool_call_id: call_id,
            tool_name: "echo".into(),
            result: Some(json!({ "output": format!("turn {turn}") })),
            ..Part::default()
        };
        messages.push(assistant(vec![call], [0; 3]));
        messages.push(NewMessage {
            role: "tool",
            ..assistant(vec![result], [0; 3])
        });
    }
    let input = 100 + 10 * turn;
    let output = i64::from(parts);
    messages.push(assistant(
        vec![Part::text(text)],
        [input, output, input + output],
    ));
    messages
}

fn log_turn(chat_id: Uuid, turn: i64, rows: &[MessageRow]) {
    let ids: Vec<i64> = rows.iter().map(|r| r.id).collect();
    tracing::debug!(chat.id = %chat_id, turn, message.ids = ?ids, "turn persisted");
}
