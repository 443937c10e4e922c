//! API key authentication as coderd's `httpmw.ExtractAPIKey` does it.
//!
//! The token comes from the first non-empty of: cookie `coder_session_token`, query
//! `coder_session_token`, header `Coder-Session-Token`, `Authorization: Bearer`, query
//! `access_token`. A later source is never tried when an earlier one is present but invalid.
//! Every rejection is a 401 with the same message, a case-specific detail and a
//! `WWW-Authenticate` challenge.

use chrono::Utc;
use http::request::Parts;
use http::{header, HeaderValue, StatusCode};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use super::query;
use super::response::{self, HttpResponse};
use crate::gojson;
use crate::replica::Replica;

const SIGNED_OUT: &str =
    "You are signed out or your session has expired. Please sign in again to continue.";
const SESSION_COOKIE: &str = "coder_session_token";

/// Why a request is not authenticated; each variant is the client's fault except `Database`.
enum Rejection {
    Missing,
    Format(String),
    UnknownKey,
    WrongSecret,
    Expired(chrono::DateTime<Utc>),
    Database(String),
}

/// Returns the authenticated user, or the response that rejects the request.
pub async fn authenticate(replica: &Replica, parts: &Parts) -> Result<Uuid, HttpResponse> {
    match check(replica, parts).await {
        Ok(user) => Ok(user),
        Err(Rejection::Database(detail)) => Err(response::internal(
            "Internal error fetching API key by id.",
            &detail,
        )),
        Err(rejection) => Err(unauthorized(replica, rejection)),
    }
}

/// `APITokenFromRequest`: the first non-empty token source.
fn token_from_request(parts: &Parts) -> Option<String> {
    let query = parts.uri.query();
    let cookies = parts
        .headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok());
    if let Some(token) = query::cookie(cookies, SESSION_COOKIE).filter(|t| !t.is_empty()) {
        return Some(token);
    }
    if let Some(token) = query::get(query, SESSION_COOKIE).filter(|t| !t.is_empty()) {
        return Some(token);
    }
    let header_token = parts
        .headers
        .get("Coder-Session-Token")
        .and_then(|v| v.to_str().ok());
    if let Some(token) = header_token.filter(|t| !t.is_empty()) {
        return Some(token.to_string());
    }
    let authorization = parts
        .headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    if let Some(value) = authorization {
        if value.len() > 7 && value[..7].eq_ignore_ascii_case("bearer ") {
            let token = value[7..].trim();
            if !token.is_empty() {
                return Some(token.to_string());
            }
        }
    }
    query::get(query, "access_token")
        .map(|t| t.trim().to_string())
        .filter(|t| !t.is_empty())
}

/// `SplitAPIToken`: exactly two `-`-separated parts, a 10-byte id and a 22-byte secret.
fn split_token(token: &str) -> Result<(&str, &str), String> {
    let parts: Vec<&str> = token.split('-').collect();
    if parts.len() != 2 {
        let n = parts.len();
        return Err(format!(
            "incorrect amount of API key parts, expected 2 got {n}"
        ));
    }
    let (id, secret) = (parts[0], parts[1]);
    if id.len() != 10 {
        return Err(format!(
            "invalid API key ID length, expected 10 got {}",
            id.len()
        ));
    }
    if secret.len() != 22 {
        return Err(format!(
            "invalid API key secret length, expected 22 got {}",
            secret.len()
        ));
    }
    Ok((id, secret))
}

async fn check(replica: &Replica, parts: &Parts) -> Result<Uuid, Rejection> {
    let token = token_from_request(parts).ok_or(Rejection::Missing)?;
    let (id, secret) = split_token(&token).map_err(Rejection::Format)?;

    let conn = replica
        .pool
        .get()
        .await
        .map_err(|e| Rejection::Database(e.to_string()))?;
    let row = conn
        .query_opt(
            "SELECT hashed_secret, user_id, expires_at FROM api_keys WHERE id = $1",
            &[&id],
        )
        .await
        .map_err(|e| Rejection::Database(e.to_string()))?
        .ok_or(Rejection::UnknownKey)?;
    let hashed: Vec<u8> = row.get(0);
    if !constant_time_eq(&Sha256::digest(secret.as_bytes()), &hashed) {
        return Err(Rejection::WrongSecret);
    }
    let expires_at: chrono::DateTime<Utc> = row.get(2);
    if expires_at <= Utc::now() {
        return Err(Rejection::Expired(expires_at));
    }
    Ok(row.get(1))
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn unauthorized(replica: &Replica, rejection: Rejection) -> HttpResponse {
    let (detail, description) = match rejection {
        Rejection::Missing => (
            format!(
                "Cookie {} or query parameter must be provided.",
                gojson::quote(SESSION_COOKIE)
            ),
            "The access token is invalid",
        ),
        Rejection::Format(e) => (
            format!("Invalid API key format: {e}"),
            "The access token is invalid",
        ),
        Rejection::UnknownKey => (
            "API key is invalid.".to_string(),
            "The access token is invalid",
        ),
        Rejection::WrongSecret => (
            "API key secret is invalid.".to_string(),
            "The access token is invalid",
        ),
        Rejection::Expired(at) => (
            format!(
                "API key expired at {}.",
                gojson::quote(&gojson::go_time_string(&at))
            ),
            "The access token has expired",
        ),
        Rejection::Database(detail) => (detail, "The access token is invalid"),
    };
    let challenge = format!(
        "Bearer realm=\"coder\", error=\"invalid_token\", error_description=\"{description}\", \
         resource_metadata=\"{}/.well-known/oauth-protected-resource\"",
        replica.settings.access_url
    );
    let mut response = response::error(StatusCode::UNAUTHORIZED, SIGNED_OUT, Some(&detail));
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_errors_match_coderd() {
        assert_eq!(
            split_token("a-b-c").unwrap_err(),
            "incorrect amount of API key parts, expected 2 got 3"
        );
        assert_eq!(
            split_token("abc-0123456789012345678901").unwrap_err(),
            "invalid API key ID length, expected 10 got 3"
        );
        assert_eq!(
            split_token("0123456789-abc").unwrap_err(),
            "invalid API key secret length, expected 22 got 3"
        );
        assert!(split_token("0123456789-0123456789012345678901").is_ok());
    }
}
