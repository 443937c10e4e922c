//! Message resources: history pages, sending, editing, and the queue.

use http::{Request, StatusCode};
use hyper::body::Incoming;
use serde::Deserialize;
use serde_json::{Map, Value};
use uuid::Uuid;

use super::chats::{to_parts, InputPart};
use super::query;
use super::response::{self, HttpResponse};
use crate::chatd::{ChatdError, Sent};
use crate::gojson;
use crate::metrics::ReadCaller;
use crate::replica::Replica;
use crate::store;
use crate::wire::chat::ChatRow;
use crate::wire::message::{chat_message, queued_message};

const DEFAULT_PAGE: i64 = 50;
const MAX_PAGE: i64 = 200;

/// `GET /chats/{chat}/messages?before_id=&limit=`: newest first, `has_more` from one extra
/// row, `queued_messages` on the first page only.
pub async fn list(replica: &Replica, chat: &ChatRow, query_string: Option<&str>) -> HttpResponse {
    let mut params = [("before_id", 0i64), ("limit", DEFAULT_PAGE)];
    for (name, value) in &mut params {
        let Some(raw) = query::get(query_string, name).filter(|v| !v.is_empty()) else {
            continue;
        };
        match gojson::parse_int64(&raw) {
            Ok(v) if v >= 0 => *value = v,
            _ => {
                let detail = format!(
                    "Query param {} must be a valid positive integer.",
                    gojson::quote(name)
                );
                return response::validation_error(
                    "Query parameters have invalid values.",
                    name,
                    &detail,
                );
            }
        }
    }
    let [(_, before_id), (_, limit)] = params;
    if !(1..=MAX_PAGE).contains(&limit) {
        return response::error(
            StatusCode::BAD_REQUEST,
            "Invalid limit parameter (1-200).",
            None,
        );
    }

    let page = async {
        let conn = replica.pool.get().await?;
        replica.metrics.count_read(ReadCaller::Rest);
        let rows = store::messages_page_desc(&*conn, chat.id, before_id, limit + 1).await?;
        let queue = if before_id == 0 {
            store::queued(&*conn, chat.id).await?
        } else {
            vec![]
        };
        Ok::<_, crate::db::DbError>((rows, queue))
    };
    let (mut rows, queue) = match page.await {
        Ok(page) => page,
        Err(e) => return response::internal("Failed to get chat messages.", &e.to_string()),
    };
    let has_more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);

    let framing = replica.settings.framing;
    let mut body = Map::new();
    let messages = rows.iter().map(|r| chat_message(r, framing)).collect();
    body.insert("messages".into(), Value::Array(messages));
    let queued = queue.iter().map(|q| queued_message(q, framing)).collect();
    body.insert("queued_messages".into(), Value::Array(queued));
    body.insert("has_more".into(), has_more.into());
    response::json(StatusCode::OK, &Value::Object(body))
}

#[derive(Debug, Deserialize)]
struct ContentRequest {
    #[serde(default)]
    content: Vec<InputPart>,
    #[serde(default)]
    model_config_id: Option<Uuid>,
}

async fn read_content(req: Request<Incoming>) -> Result<ContentRequest, HttpResponse> {
    let body: ContentRequest = super::read_json(req).await?;
    if body.content.is_empty() {
        return Err(response::error(
            StatusCode::BAD_REQUEST,
            "Content is required.",
            None,
        ));
    }
    Ok(body)
}

/// `POST /chats/{chat}/messages`: always busy behaviour "queue".
pub async fn send(
    replica: &Replica,
    user_id: Uuid,
    chat: &ChatRow,
    req: Request<Incoming>,
) -> HttpResponse {
    let body = match read_content(req).await {
        Ok(body) => body,
        Err(rejection) => return rejection,
    };
    let parts = to_parts(&body.content);
    let framing = replica.settings.framing;
    match replica
        .send_message(chat.id, user_id, &parts, body.model_config_id)
        .await
    {
        Ok(Sent::Inserted(row)) => {
            let body =
                serde_json::json!({ "message": chat_message(&row, framing), "queued": false });
            response::json(StatusCode::OK, &body)
        }
        Ok(Sent::Queued(row)) => {
            let queued = queued_message(&row, framing);
            let body = serde_json::json!({ "queued_message": queued, "queued": true });
            response::json(StatusCode::OK, &body)
        }
        Err(ChatdError::QueueFull) => response::error(
            StatusCode::TOO_MANY_REQUESTS,
            "Message queue is full.",
            Some("Maximum 20 messages can be queued."),
        ),
        Err(e) => response::internal("Failed to create chat message.", &e.to_string()),
    }
}

/// `PATCH /chats/{chat}/messages/{message}`: the replacement message.
pub async fn edit(
    replica: &Replica,
    user_id: Uuid,
    chat: &ChatRow,
    raw_id: &str,
    req: Request<Incoming>,
) -> HttpResponse {
    let message_id = match gojson::parse_int64(raw_id) {
        Ok(id) if id > 0 => id,
        _ => {
            let detail = "Message ID must be a positive integer.";
            return response::error(
                StatusCode::BAD_REQUEST,
                "Invalid chat message ID.",
                Some(detail),
            );
        }
    };
    let body = match read_content(req).await {
        Ok(body) => body,
        Err(rejection) => return rejection,
    };
    let parts = to_parts(&body.content);
    match replica
        .edit_message(chat.id, user_id, message_id, &parts)
        .await
    {
        Ok(row) => response::json(
            StatusCode::OK,
            &chat_message(&row, replica.settings.framing),
        ),
        Err(ChatdError::MessageNotFound) => {
            response::error(StatusCode::NOT_FOUND, "Chat message not found.", None)
        }
        Err(ChatdError::NotUserMessage) => response::error(
            StatusCode::BAD_REQUEST,
            "Only user messages can be edited.",
            None,
        ),
        Err(e) => response::internal("Failed to edit chat message.", &e.to_string()),
    }
}

fn queued_id(raw: &str) -> Result<i64, HttpResponse> {
    gojson::parse_int64(raw).map_err(|detail| {
        response::error(
            StatusCode::BAD_REQUEST,
            "Invalid queued message ID.",
            Some(&detail),
        )
    })
}

/// `DELETE /chats/{chat}/queue/{queuedMessage}`: 204 even for an id that does not exist.
pub async fn delete_queued(replica: &Replica, chat: &ChatRow, raw_id: &str) -> HttpResponse {
    let id = match queued_id(raw_id) {
        Ok(id) => id,
        Err(rejection) => return rejection,
    };
    match replica.delete_queued(chat.id, id).await {
        Ok(()) => response::no_content(),
        Err(e) => response::internal("Failed to delete queued message.", &e.to_string()),
    }
}

/// `POST /chats/{chat}/queue/{queuedMessage}/promote`: the promoted message.
pub async fn promote(
    replica: &Replica,
    user_id: Uuid,
    chat: &ChatRow,
    raw_id: &str,
) -> HttpResponse {
    let id = match queued_id(raw_id) {
        Ok(id) => id,
        Err(rejection) => return rejection,
    };
    match replica.promote_queued(chat.id, user_id, id).await {
        Ok(row) => response::json(
            StatusCode::OK,
            &chat_message(&row, replica.settings.framing),
        ),
        Err(ChatdError::QueuedNotFound) => {
            response::error(StatusCode::NOT_FOUND, "Queued message not found.", None)
        }
        Err(e) => response::internal("Failed to promote queued message.", &e.to_string()),
    }
}
