//! The HTTP surface under `/api/experimental`, plus `/metrics`.
//!
//! Order of checks as in coderd's middleware chain: authentication, then the `{chat}` path
//! parameter (400 for a bad UUID, 404 for a missing or foreign chat), then the handler.

// A rejection is the whole HTTP response, built at most once per request, so its size on the
// error path does not matter; boxing it would only add noise.
#![allow(clippy::result_large_err)]

mod auth;
pub mod chats;
mod download;
mod messages;
mod query;
pub mod response;
mod stream;
mod watch;

use std::sync::Arc;

use http::{Method, Request, StatusCode};
use hyper::body::Incoming;
use uuid::Uuid;

pub use self::chats::DEFAULT_MODEL_CONFIG_ID;
use self::response::HttpResponse;
use crate::gojson;
use crate::replica::Replica;
use crate::store;
use crate::wire::chat::ChatRow;

const API_PREFIX: &str = "/api/experimental/";

/// Routes one request.
pub async fn handle(replica: Arc<Replica>, req: Request<Incoming>) -> HttpResponse {
    let path = req.uri().path().to_string();
    if path == "/metrics" && req.method() == Method::GET {
        let body = replica.metrics.render();
        return response::text(StatusCode::OK, "text/plain; version=0.0.4", body);
    }
    let Some(rest) = path.strip_prefix(API_PREFIX) else {
        return response::route_not_found();
    };
    let segments: Vec<String> = rest.split('/').map(str::to_string).collect();
    let segments: Vec<&str> = segments.iter().map(String::as_str).collect();

    let (parts, body) = req.into_parts();
    let user_id = match auth::authenticate(&replica, &parts).await {
        Ok(user) => user,
        Err(rejection) => return rejection,
    };
    let req = Request::from_parts(parts, body);
    let method = req.method().clone();

    match (&method, segments.as_slice()) {
        (&Method::GET, ["chats"]) => chats::list(&replica, user_id).await,
        (&Method::POST, ["chats"]) => chats::create(&replica, user_id, req).await,
        (&Method::GET, ["chats", "watch"]) => watch::watch(replica, user_id, req).await,
        (&Method::GET, ["sim", "download"]) => download::download(req.uri().query()),
        (_, ["chats", chat, rest @ ..]) if known_chat_route(&method, rest) => {
            let chat = match chat_param(&replica, chat, user_id).await {
                Ok(chat) => chat,
                Err(rejection) => return rejection,
            };
            chat_route(replica, user_id, chat, rest, req).await
        }
        _ => response::route_not_found(),
    }
}

/// Whether a path below `/chats/{chat}` names a route, so unknown paths 404 before the chat
/// is looked up.
fn known_chat_route(method: &Method, rest: &[&str]) -> bool {
    matches!(
        (method, rest),
        (&Method::GET, [])
            | (&Method::GET | &Method::POST, ["messages"])
            | (&Method::PATCH, ["messages", _])
            | (&Method::POST, ["interrupt"])
            | (&Method::DELETE, ["queue", _])
            | (&Method::POST, ["queue", _, "promote"])
            | (&Method::GET, ["stream"])
    )
}

async fn chat_route(
    replica: Arc<Replica>,
    user_id: Uuid,
    chat: ChatRow,
    rest: &[&str],
    req: Request<Incoming>,
) -> HttpResponse {
    let method = req.method().clone();
    match (&method, rest) {
        (&Method::GET, []) => chats::get(&chat),
        (&Method::GET, ["messages"]) => messages::list(&replica, &chat, req.uri().query()).await,
        (&Method::POST, ["messages"]) => messages::send(&replica, user_id, &chat, req).await,
        (&Method::PATCH, ["messages", id]) => {
            messages::edit(&replica, user_id, &chat, id, req).await
        }
        (&Method::POST, ["interrupt"]) => chats::interrupt(&replica, &chat).await,
        (&Method::DELETE, ["queue", id]) => messages::delete_queued(&replica, &chat, id).await,
        (&Method::POST, ["queue", id, "promote"]) => {
            messages::promote(&replica, user_id, &chat, id).await
        }
        (&Method::GET, ["stream"]) => stream::stream(replica, chat.id, req).await,
        _ => response::route_not_found(),
    }
}

/// `httpmw.ExtractChatParam`: parse the UUID, then read the chat; a chat of another user is
/// indistinguishable from a missing one.
async fn chat_param(replica: &Replica, raw: &str, user_id: Uuid) -> Result<ChatRow, HttpResponse> {
    if raw.is_empty() {
        let detail = "\"chat\" URL param missing";
        return Err(response::error(
            StatusCode::BAD_REQUEST,
            "Missing UUID in URL.",
            Some(detail),
        ));
    }
    let chat_id = gojson::parse_uuid(raw).map_err(|detail| {
        let message = format!("Invalid UUID {}.", gojson::quote(raw));
        response::error(StatusCode::BAD_REQUEST, &message, Some(&detail))
    })?;
    let chat = match replica.pool.get().await {
        Ok(conn) => store::chat_by_id(&*conn, chat_id).await,
        Err(e) => Err(e.into()),
    };
    match chat {
        Ok(Some(chat)) if chat.owner_id == user_id => Ok(chat),
        Ok(_) => Err(response::resource_not_found()),
        Err(e) => Err(response::internal(
            "Internal error fetching chat.",
            &e.to_string(),
        )),
    }
}

/// Reads a JSON request body (`httpapi.Read`).
async fn read_json<T: serde::de::DeserializeOwned>(
    req: Request<Incoming>,
) -> Result<T, HttpResponse> {
    use http_body_util::BodyExt;
    let bytes = match req.into_body().collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(e) => {
            let detail = e.to_string();
            return Err(response::error(
                StatusCode::BAD_REQUEST,
                "Request body must be valid JSON.",
                Some(&detail),
            ));
        }
    };
    serde_json::from_slice(&bytes).map_err(|e| {
        let detail = e.to_string();
        response::error(
            StatusCode::BAD_REQUEST,
            "Request body must be valid JSON.",
            Some(&detail),
        )
    })
}
