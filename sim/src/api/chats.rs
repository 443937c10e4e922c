//! Chat resources: create, list, get, interrupt.

use std::sync::Arc;

use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::Value;
use uuid::Uuid;

use super::response::{self, HttpResponse};
use crate::replica::Replica;
use crate::wire::chat::{self, ChatRow};
use crate::wire::part::Part;

/// The model config every chat of the sim uses unless a request names another.
pub const DEFAULT_MODEL_CONFIG_ID: Uuid = uuid::uuid!("22222222-2222-4222-8222-222222222222");

/// A `ChatInputPart`: what clients send as message content.
#[derive(Debug, Deserialize)]
pub struct InputPart {
    #[serde(rename = "type", default)]
    kind: String,
    #[serde(default)]
    text: String,
    #[serde(default)]
    file_id: Option<Uuid>,
}

/// Turns input parts into stored parts: text stays text, a file part keeps its file reference.
pub fn to_parts(input: &[InputPart]) -> Vec<Part> {
    input
        .iter()
        .map(|p| Part {
            kind: if p.kind.is_empty() {
                "text".into()
            } else {
                p.kind.clone()
            },
            text: p.text.clone(),
            file_id: p.file_id,
            ..Part::default()
        })
        .collect()
}

#[derive(Debug, Deserialize)]
struct CreateChatRequest {
    #[serde(default)]
    content: Vec<InputPart>,
    #[serde(default)]
    model_config_id: Option<Uuid>,
}

/// `POST /chats`: 201 with the new (pending) chat.
pub async fn create(replica: &Arc<Replica>, user_id: Uuid, req: Request<Incoming>) -> HttpResponse {
    let body: CreateChatRequest = match super::read_json(req).await {
        Ok(body) => body,
        Err(rejection) => return rejection,
    };
    if body.content.is_empty() {
        return response::error(StatusCode::BAD_REQUEST, "Content is required.", None);
    }
    let config = body.model_config_id.unwrap_or(DEFAULT_MODEL_CONFIG_ID);
    match replica
        .create_chat(user_id, &to_parts(&body.content), config)
        .await
    {
        Ok(chat) => response::json(StatusCode::CREATED, &chat::chat(&chat)),
        Err(e) => response::internal("Failed to create chat.", &e.to_string()),
    }
}

/// `GET /chats`: the caller's chats, newest first.
pub async fn list(replica: &Replica, user_id: Uuid) -> HttpResponse {
    let chats = async {
        let conn = replica.pool.get().await?;
        let rows = conn
            .query(
                "SELECT id FROM chats WHERE owner_id = $1 AND NOT archived \
                 ORDER BY updated_at DESC, id DESC",
                &[&user_id],
            )
            .await?;
        let mut chats = Vec::with_capacity(rows.len());
        for row in rows {
            if let Some(chat) = crate::store::chat_by_id(&*conn, row.get(0)).await? {
                chats.push(chat::chat(&chat));
            }
        }
        Ok::<_, crate::db::DbError>(chats)
    };
    match chats.await {
        Ok(chats) => response::json(StatusCode::OK, &Value::Array(chats)),
        Err(e) => response::internal("Failed to list chats.", &e.to_string()),
    }
}

/// `GET /chats/{chat}`.
pub fn get(chat: &ChatRow) -> HttpResponse {
    response::json(StatusCode::OK, &chat::chat(chat))
}

/// `POST /chats/{chat}/interrupt`: the chat, now `waiting`.
pub async fn interrupt(replica: &Replica, chat: &ChatRow) -> HttpResponse {
    match replica.interrupt(chat.id).await {
        Ok(chat) => response::json(StatusCode::OK, &chat::chat(&chat)),
        Err(e) => response::internal("Failed to interrupt chat.", &e.to_string()),
    }
}
