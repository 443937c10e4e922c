//! Responses as coderd's `httpapi.Write` produces them: compact JSON with Go's HTML escaping,
//! a trailing newline, and `application/json; charset=utf-8`.

use std::convert::Infallible;

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use serde_json::{Map, Value};

use crate::gojson;

/// A response whose body is whole (almost all) or streamed (the download fixture).
pub type HttpResponse = Response<BoxBody<Bytes, Infallible>>;

/// A whole body.
pub fn full(bytes: impl Into<Bytes>) -> BoxBody<Bytes, Infallible> {
    Full::new(bytes.into()).boxed()
}

/// Writes `body` as `json.Encoder` would.
pub fn json(status: StatusCode, body: &Value) -> HttpResponse {
    let mut text = gojson::to_string(body);
    text.push('\n');
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(full(text))
        .expect("static response parts")
}

/// A `codersdk.Response{message, detail?}`.
pub fn error(status: StatusCode, message: &str, detail: Option<&str>) -> HttpResponse {
    let mut body = Map::new();
    body.insert("message".into(), message.into());
    if let Some(detail) = detail.filter(|d| !d.is_empty()) {
        body.insert("detail".into(), detail.into());
    }
    json(status, &Value::Object(body))
}

/// A `codersdk.Response` with `validations` (`[{field, detail}]`).
pub fn validation_error(message: &str, field: &str, detail: &str) -> HttpResponse {
    let body = serde_json::json!({
        "message": message,
        "validations": [{ "field": field, "detail": detail }],
    });
    json(StatusCode::BAD_REQUEST, &body)
}

/// `httpapi.RouteNotFound`.
pub fn route_not_found() -> HttpResponse {
    error(StatusCode::NOT_FOUND, "Route not found.", None)
}

/// `httpapi.ResourceNotFound`: a missing chat and a chat of another user look the same.
pub fn resource_not_found() -> HttpResponse {
    let message = "Resource not found or you do not have access to this resource";
    error(StatusCode::NOT_FOUND, message, None)
}

pub fn internal(message: &str, detail: &str) -> HttpResponse {
    error(StatusCode::INTERNAL_SERVER_ERROR, message, Some(detail))
}

pub fn no_content() -> HttpResponse {
    Response::builder()
        .status(StatusCode::NO_CONTENT)
        .body(full(Bytes::new()))
        .expect("static response parts")
}

pub fn text(status: StatusCode, content_type: &str, body: String) -> HttpResponse {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(full(body))
        .expect("static response parts")
}
