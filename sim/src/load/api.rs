//! Sending a turn: a new user message, or an edit of an earlier one.

use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use serde_json::json;
use uuid::Uuid;

use super::options::Target;

/// The header chatload authenticates with (protocol doc 4.2, source 3).
pub const SESSION_TOKEN_HEADER: &str = "Coder-Session-Token";

/// How long one REST call may take before it counts as failed.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a REST call failed; the variant says whose fault it was.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("cannot reach {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("{method} {url} timed out")]
    Timeout { method: Method, url: String },
    #[error("{method} {url} answered {status}: {body}")]
    Status {
        method: Method,
        url: String,
        status: StatusCode,
        body: String,
    },
    #[error("{method} {url} answered unreadable JSON: {reason}")]
    Body {
        method: Method,
        url: String,
        reason: String,
    },
}

impl ApiError {
    /// A short class of the failure without chat ids or URLs, to count failures by.
    pub fn class(&self) -> String {
        match self {
            ApiError::Transport { .. } => "unreachable".to_owned(),
            ApiError::Timeout { .. } => "timed out".to_owned(),
            ApiError::Status { status, .. } => format!("HTTP {}", status.as_u16()),
            ApiError::Body { .. } => "unreadable response".to_owned(),
        }
    }
}

/// `CreateChatMessageResponse`: the message, unless it was queued.
#[derive(Debug, Deserialize)]
struct Created {
    #[serde(default)]
    message: Option<MessageId>,
}

/// The id of a returned `ChatMessage`.
#[derive(Debug, Deserialize)]
struct MessageId {
    id: i64,
}

/// A REST client for the two write endpoints of a turn.
#[derive(Clone)]
pub struct ChatApi {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for ChatApi {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        ChatApi {
            client: Client::builder(TokioExecutor::new()).build(connector),
        }
    }
}

impl ChatApi {
    /// `POST /chats/{chat}/messages`. Returns the new message's id, or `None` when coderd
    /// queued it (then the id is not known until it is promoted).
    pub async fn send_message(
        &self,
        target: &Target,
        chat_id: Uuid,
        token: &str,
        text: &str,
    ) -> Result<Option<i64>, ApiError> {
        let url = format!(
            "{}/api/experimental/chats/{chat_id}/messages",
            target.http_base
        );
        let body = self.call(Method::POST, url.clone(), token, text).await?;
        let created: Created = serde_json::from_slice(&body).map_err(|err| ApiError::Body {
            method: Method::POST,
            url,
            reason: err.to_string(),
        })?;
        Ok(created.message.map(|message| message.id))
    }

    /// `PATCH /chats/{chat}/messages/{message}`. Returns the replacement message's id.
    pub async fn edit_message(
        &self,
        target: &Target,
        chat_id: Uuid,
        token: &str,
        message_id: i64,
        text: &str,
    ) -> Result<i64, ApiError> {
        let url = format!(
            "{}/api/experimental/chats/{chat_id}/messages/{message_id}",
            target.http_base
        );
        let body = self.call(Method::PATCH, url.clone(), token, text).await?;
        let edited: MessageId = serde_json::from_slice(&body).map_err(|err| ApiError::Body {
            method: Method::PATCH,
            url,
            reason: err.to_string(),
        })?;
        Ok(edited.id)
    }

    /// Sends one text part as `{"content":[...]}` and returns the body of a 2xx answer.
    async fn call(
        &self,
        method: Method,
        url: String,
        token: &str,
        text: &str,
    ) -> Result<Bytes, ApiError> {
        let body = json!({"content": [{"type": "text", "text": text}]}).to_string();
        let request = Request::builder()
            .method(method.clone())
            .uri(&url)
            .header(SESSION_TOKEN_HEADER, token)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .map_err(|err| ApiError::Body {
                method: method.clone(),
                url: url.clone(),
                reason: err.to_string(),
            })?;

        self.exchange(method, url, request).await
    }

    /// `GET url` without credentials (a Prometheus `/metrics` page); returns the body as text.
    pub async fn get_text(&self, url: &str) -> Result<String, ApiError> {
        let request = Request::builder()
            .method(Method::GET)
            .uri(url)
            .body(Full::new(Bytes::new()))
            .map_err(|err| ApiError::Body {
                method: Method::GET,
                url: url.to_owned(),
                reason: err.to_string(),
            })?;
        let body = self.exchange(Method::GET, url.to_owned(), request).await?;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    /// Sends `request` within [`CALL_TIMEOUT`] and returns the body of a 2xx answer.
    async fn exchange(
        &self,
        method: Method,
        url: String,
        request: Request<Full<Bytes>>,
    ) -> Result<Bytes, ApiError> {
        let exchange = async {
            let response =
                self.client
                    .request(request)
                    .await
                    .map_err(|source| ApiError::Transport {
                        url: url.clone(),
                        source,
                    })?;
            let status = response.status();
            let body = response
                .into_body()
                .collect()
                .await
                .map(|collected| collected.to_bytes())
                .map_err(|err| ApiError::Body {
                    method: method.clone(),
                    url: url.clone(),
                    reason: err.to_string(),
                })?;
            Ok::<_, ApiError>((status, body))
        };
        let (status, body) = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| ApiError::Timeout {
                method: method.clone(),
                url: url.clone(),
            })??;

        if !status.is_success() {
            return Err(ApiError::Status {
                method,
                url,
                status,
                body: String::from_utf8_lossy(&body).trim_end().to_owned(),
            });
        }
        Ok(body)
    }
}
