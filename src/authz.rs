//! Asking coderd whether a client's credentials may read a chat.
//!
//! chatcache never decides access itself: it sends `GET /api/experimental/chats/{chat}` to the
//! local coderd with exactly the credentials the client presented (cookie, query token, session
//! header, bearer) and relays any non-2xx answer unchanged. A 2xx answer is reused for
//! `authz.ttl_ms` under a hash of the credentials, so tokens never sit in memory as keys and are
//! never logged.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::metrics::Metrics;
use crate::route::query_param_bytes;

pub type UpstreamClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Empty<Bytes>,
>;

/// The credential-bearing parts of a client request, as coderd reads them (doc 4.2).
#[derive(Clone, Default)]
pub struct Credentials {
    /// Every `Cookie` header, in order: coderd reads them all.
    pub cookies: Vec<HeaderValue>,
    pub session_token: Option<HeaderValue>,
    pub authorization: Option<HeaderValue>,
    /// `coder_session_token` and `access_token` query parameters, percent-decoded bytes.
    pub query_token: Option<Vec<u8>>,
    pub access_token: Option<Vec<u8>>,
    /// The client's query string as sent, so coderd reads the credential parameters exactly
    /// as it would have (duplicates, escapes and all).
    pub raw_query: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Credentials(REDACTED)")
    }
}

impl Credentials {
    pub fn from_request(headers: &HeaderMap, query: Option<&str>) -> Self {
        Self {
            cookies: headers
                .get_all(http::header::COOKIE)
                .iter()
                .cloned()
                .collect(),
            session_token: headers.get("coder-session-token").cloned(),
            authorization: headers.get(http::header::AUTHORIZATION).cloned(),
            query_token: query_param_bytes(query, "coder_session_token"),
            access_token: query_param_bytes(query, "access_token"),
            raw_query: query.map(str::to_owned),
        }
    }

    /// A key that identifies these credentials without keeping them.
    fn digest(&self, chat: Uuid) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update((self.cookies.len() as u64).to_le_bytes());
        for cookie in &self.cookies {
            h.update((cookie.len() as u64).to_le_bytes());
            h.update(cookie.as_bytes());
        }
        for part in [
            self.session_token.as_ref().map(|v| v.as_bytes()),
            self.authorization.as_ref().map(|v| v.as_bytes()),
            self.query_token.as_deref(),
            self.access_token.as_deref(),
        ] {
            match part {
                Some(bytes) => {
                    h.update([1]);
                    h.update((bytes.len() as u64).to_le_bytes());
                    h.update(bytes);
                }
                None => h.update([0]),
            }
        }
        h.update(chat.as_bytes());
        h.finalize().into()
    }

    /// Copies the credentials onto a request to coderd.
    pub fn apply(&self, headers: &mut HeaderMap) {
        for cookie in &self.cookies {
            headers.append(http::header::COOKIE, cookie.clone());
        }
        if let Some(v) = &self.session_token {
            headers.insert("coder-session-token", v.clone());
        }
        if let Some(v) = &self.authorization {
            headers.insert(http::header::AUTHORIZATION, v.clone());
        }
    }

    /// The query string for a request to coderd on this client's behalf: the client's own
    /// query without its `after_id`, plus `extra`; starts with `?` or is empty.
    pub fn query_suffix(&self, extra: &str) -> String {
        let mut pairs: Vec<String> = Vec::new();
        if !extra.is_empty() {
            pairs.push(extra.to_string());
        }
        let own = self.raw_query.as_deref().unwrap_or("");
        pairs.extend(
            own.split('&')
                .filter(|p| !p.is_empty() && p.split('=').next() != Some("after_id"))
                .map(str::to_owned),
        );
        if self.raw_query.is_none() {
            if let Some(t) = &self.query_token {
                pairs.push(format!("coder_session_token={}", encode(t)));
            }
            if let Some(t) = &self.access_token {
                pairs.push(format!("access_token={}", encode(t)));
            }
        }
        if pairs.is_empty() {
            String::new()
        } else {
            format!("?{}", pairs.join("&"))
        }
    }
}

fn encode(s: &[u8]) -> String {
    s.iter()
        .copied()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// coderd's answer when it is not a yes: relayed to the client as is.
pub struct Denied(pub Response<Bytes>);

/// coderd's refusal as received, so one answer can be handed to every waiter of a probe.
#[derive(Clone)]
struct Refusal {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Refusal {
    fn into_denied(self) -> Denied {
        let mut denied = Response::new(self.body);
        *denied.status_mut() = self.status;
        *denied.headers_mut() = self.headers;
        Denied(denied)
    }
}

/// One probe's answer, shared by every request that waited for it.
type ProbeOutcome = Result<Result<(), Refusal>, AuthzError>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum AuthzError {
    #[error("coderd did not answer the authorization probe: {0}")]
    Upstream(String),
    #[error("coderd did not answer the authorization probe in time")]
    Timeout,
}

pub struct Authz {
    client: UpstreamClient,
    upstream: String,
    approved: DashMap<[u8; 32], Instant>,
    /// Probes under way, by the same key as `approved`: requests with the same credentials for
    /// the same chat that arrive meanwhile (a reconnect storm) wait for that one answer.
    in_flight: DashMap<[u8; 32], Arc<tokio::sync::OnceCell<ProbeOutcome>>>,
    metrics: Metrics,
    ttl: std::sync::RwLock<Duration>,
    timeout: Duration,
}

impl Authz {
    pub fn new(upstream: String, metrics: Metrics, ttl: Duration, timeout: Duration) -> Arc<Self> {
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build_http();
        Arc::new(Self {
            client,
            upstream,
            approved: DashMap::new(),
            in_flight: DashMap::new(),
            metrics,
            ttl: std::sync::RwLock::new(ttl),
            timeout,
        })
    }

    pub fn set_ttl(&self, ttl: Duration) {
        *self.ttl.write().unwrap_or_else(|e| e.into_inner()) = ttl;
    }

    fn ttl(&self) -> Duration {
        *self.ttl.read().unwrap_or_else(|e| e.into_inner())
    }

    /// `Ok(Ok(()))` when coderd lets these credentials read the chat.
    pub async fn check(
        &self,
        chat: Uuid,
        creds: &Credentials,
    ) -> Result<Result<(), Denied>, AuthzError> {
        let key = creds.digest(chat);
        let fresh = self
            .approved
            .get(&key)
            .is_some_and(|at| at.elapsed() < self.ttl());
        if fresh {
            self.metrics.authz.with_label_values(&["cached"]).inc();
            return Ok(Ok(()));
        }
        let probe = self
            .in_flight
            .entry(key)
            .or_insert_with(|| Arc::new(tokio::sync::OnceCell::new()))
            .clone();
        let mut asked = false;
        let outcome = probe
            .get_or_init(|| {
                asked = true;
                self.probe(chat, creds, key)
            })
            .await
            .clone();
        self.in_flight
            .remove_if(&key, |_, current| Arc::ptr_eq(current, &probe));
        if !asked {
            self.metrics.authz.with_label_values(&["shared"]).inc();
        }
        match outcome {
            Ok(Ok(())) => Ok(Ok(())),
            Ok(Err(refusal)) => Ok(Err(refusal.into_denied())),
            Err(e) => Err(e),
        }
    }

    /// Asks coderd once and remembers a yes.
    async fn probe(&self, chat: Uuid, creds: &Credentials, key: [u8; 32]) -> ProbeOutcome {
        let uri = format!(
            "{}/api/experimental/chats/{chat}{}",
            self.upstream,
            creds.query_suffix("")
        );
        let mut req = Request::get(uri)
            .body(Empty::new())
            .map_err(|e| AuthzError::Upstream(e.to_string()))?;
        creds.apply(req.headers_mut());
        let answer = tokio::time::timeout(self.timeout, self.client.request(req)).await;
        let resp = match answer {
            Err(_) => {
                self.metrics.authz.with_label_values(&["error"]).inc();
                return Err(AuthzError::Timeout);
            }
            Ok(Err(e)) => {
                self.metrics.authz.with_label_values(&["error"]).inc();
                return Err(AuthzError::Upstream(e.to_string()));
            }
            Ok(Ok(resp)) => resp,
        };
        let (parts, body) = resp.into_parts();
        let body = tokio::time::timeout(self.timeout, body.collect())
            .await
            .map_err(|_| AuthzError::Timeout)?
            .map_err(|e| AuthzError::Upstream(e.to_string()))?
            .to_bytes();
        if parts.status.is_success() {
            self.metrics.authz.with_label_values(&["allowed"]).inc();
            if self.approved.len() > 100_000 {
                let ttl = self.ttl();
                self.approved.retain(|_, at| at.elapsed() < ttl);
            }
            self.approved.insert(key, Instant::now());
            return Ok(Ok(()));
        }
        self.metrics.authz.with_label_values(&["denied"]).inc();
        let status = if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            StatusCode::BAD_GATEWAY
        } else {
            parts.status
        };
        Ok(Err(Refusal {
            status,
            headers: parts.headers,
            body,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_separates_sources_and_chats() {
        let chat = Uuid::nil();
        let a = Credentials {
            query_token: Some("x".into()),
            ..Default::default()
        };
        let b = Credentials {
            access_token: Some("x".into()),
            ..Default::default()
        };
        assert_ne!(a.digest(chat), b.digest(chat));
        assert_ne!(a.digest(chat), a.digest(Uuid::from_u128(1)));
        assert_eq!(a.digest(chat), a.clone().digest(chat));
    }

    #[test]
    fn query_tokens_are_reencoded() {
        let c = Credentials {
            query_token: Some("a b&c".into()),
            ..Default::default()
        };
        assert_eq!(
            c.query_suffix("after_id=3"),
            "?after_id=3&coder_session_token=a%20b%26c"
        );
        assert_eq!(Credentials::default().query_suffix(""), "");
        let raw = Credentials::from_request(
            &HeaderMap::new(),
            Some("after_id=5&coder_session_token=%FF&coder_session_token=ok"),
        );
        assert_eq!(
            raw.query_suffix("after_id=9"),
            "?after_id=9&coder_session_token=%FF&coder_session_token=ok"
        );
        assert_eq!(format!("{c:?}"), "Credentials(REDACTED)");
    }
}
