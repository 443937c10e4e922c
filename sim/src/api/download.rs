//! `GET /api/experimental/sim/download`: a streamed download, the test fixture for proxies.
//!
//! coderd has responses that are written piece by piece over a long time (file downloads, log
//! follows); a proxy in front of it must pass each piece on as it comes, not buffer the whole
//! body. This sim-only route produces such a response with chunked transfer encoding:
//! `chunks` pieces (default 4, at most 1,000) of `chunk_bytes` bytes (default 1,024, at most
//! 1 MiB) each, `delay_ms` apart (default 100, at most 5,000). Byte `i` of the body is
//! `b'a' + i % 26`, so any lost, repeated or reordered byte shows. Authentication is required
//! as for every route under `/api/experimental`.

use std::convert::Infallible;
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream;
use http::{header, Response, StatusCode};
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;

use super::query;
use super::response::{self, HttpResponse};

const MAX_CHUNKS: u64 = 1_000;
const MAX_CHUNK_BYTES: u64 = 1 << 20;
const MAX_DELAY_MS: u64 = 5_000;

/// The streamed body described in the module docs, or a 400 for a bad parameter.
pub fn download(raw_query: Option<&str>) -> HttpResponse {
    let param = |name: &str, default: u64, max: u64| -> Result<u64, HttpResponse> {
        let Some(raw) = query::get(raw_query, name) else {
            return Ok(default);
        };
        match raw.parse::<u64>() {
            Ok(value) if value <= max => Ok(value),
            _ => Err(response::validation_error(
                "Query parameters have invalid values.",
                name,
                &format!("Query param {name:?} must be an integer from 0 to {max}."),
            )),
        }
    };
    let (chunks, chunk_bytes, delay_ms) = match (
        param("chunks", 4, MAX_CHUNKS),
        param("chunk_bytes", 1_024, MAX_CHUNK_BYTES),
        param("delay_ms", 100, MAX_DELAY_MS),
    ) {
        (Ok(c), Ok(b), Ok(d)) => (c, b, d),
        (Err(bad), _, _) | (_, Err(bad), _) | (_, _, Err(bad)) => return bad,
    };

    let delay = Duration::from_millis(delay_ms);
    let pieces = stream::unfold(0u64, move |index| async move {
        if index == chunks {
            return None;
        }
        if index > 0 {
            tokio::time::sleep(delay).await;
        }
        let start = index * chunk_bytes;
        let piece: Vec<u8> = (start..start + chunk_bytes)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        Some((
            Ok::<_, Infallible>(Frame::data(Bytes::from(piece))),
            index + 1,
        ))
    });
    Response::builder()
        .status(StatusCode::OK)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .body(StreamBody::new(pieces).boxed())
        .expect("static response parts")
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn body(query: &str) -> (StatusCode, Vec<u8>) {
        let response = download(Some(query));
        let status = response.status();
        let bytes = response.into_body().collect().await.unwrap().to_bytes();
        (status, bytes.to_vec())
    }

    #[tokio::test]
    async fn the_body_is_the_alphabet_in_pieces() {
        let (status, bytes) = body("chunks=3&chunk_bytes=10&delay_ms=0").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(bytes, b"abcdefghijklmnopqrstuvwxyzabcd");
    }

    #[tokio::test]
    async fn bad_parameters_are_rejected() {
        let (status, bytes) = body("chunks=1001").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
        assert!(String::from_utf8(bytes)
            .unwrap()
            .contains("\"field\":\"chunks\""));
        let (status, _) = body("delay_ms=-1").await;
        assert_eq!(status, StatusCode::BAD_REQUEST);
    }
}
