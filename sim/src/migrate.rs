//! `coderd-sim migrate`: applies the schema and lifts the message id sequence.
//!
//! The schema file is re-runnable on its own. The sequence must start at 1000 or above: the
//! first message of a database would otherwise be announced as `after_message_id: 0`, which
//! omitempty drops, so its notify would be `{}` and ignored.

use crate::db::{self, DbError};

/// The schema shared with the sidecar, embedded so the binary needs no files at run time.
pub const SCHEMA_SQL: &str = include_str!("../../docs/coderd-schema.sql");
/// Lowest id the next message may get.
pub const FIRST_MESSAGE_ID: i64 = 1000;

/// Applies the schema (idempotent) and makes sure the next message id is at least 1000.
pub async fn migrate(database_url: &str) -> Result<(), DbError> {
    let client = db::connect(&db::config(database_url, "migrate")?).await?;
    client.batch_execute(SCHEMA_SQL).await?;
    client
        .execute(
            "SELECT setval('chat_messages_id_seq', $1, false) \
             WHERE (SELECT CASE WHEN is_called THEN last_value + 1 ELSE last_value END \
                    FROM chat_messages_id_seq) < $1",
            &[&FIRST_MESSAGE_ID],
        )
        .await?;
    tracing::info!("schema applied");
    Ok(())
}
