//! The client listener: the stream route goes to [`crate::stream`], everything else to coderd
//! unchanged — methods, status, headers, streaming bodies both ways, and WebSocket upgrades
//! tunnelled as raw bytes. Hop-by-hop headers are handled per RFC 9110 §7.6.1 and
//! `X-Forwarded-For` / `X-Forwarded-Proto` are added. No idle timeout cuts a long stream.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use crate::route::{match_stream, StreamRoute};
use crate::wire;
use crate::App;

pub type Body = BoxBody<Bytes, hyper::Error>;

pub type PassClient = hyper_util::client::legacy::Client<
    hyper_util::client::legacy::connect::HttpConnector,
    Incoming,
>;

pub fn full(bytes: Bytes) -> Body {
    Full::new(bytes)
        .map_err(|never: Infallible| match never {})
        .boxed()
}

pub fn empty() -> Body {
    Empty::new()
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// A coderd-shaped JSON error response.
pub fn json_error(status: StatusCode, message: &str, detail: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json; charset=utf-8")
        .body(full(wire::error_body(message, detail)))
        .expect("static response")
}

/// Accepts client connections until shutdown, then lets open ones finish within the grace.
pub async fn serve(app: Arc<App>, listener: TcpListener) {
    let mut shutdown = app.shutdown.subscribe();
    let mut connections = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                while connections.try_join_next().is_some() {}
                connections.spawn(serve_connection(app.clone(), tcp, peer));
            }
            _ = crate::shutdown_started(&mut shutdown) => break,
        }
    }
    drop(listener);
    let grace = app.config().shutdown_grace();
    tracing::info!(
        grace_ms = grace.as_millis() as u64,
        open = connections.len(),
        "draining client connections"
    );
    let drain = async { while connections.join_next().await.is_some() {} };
    if tokio::time::timeout(grace, drain).await.is_err() {
        tracing::warn!(
            open = connections.len(),
            "shutdown grace ran out; closing remaining connections"
        );
        connections.abort_all();
    }
}

/// How long a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Serves one client connection; on shutdown it finishes the request in flight and closes.
async fn serve_connection(app: Arc<App>, tcp: TcpStream, peer: SocketAddr) {
    let mut shutdown = app.shutdown.subscribe();
    let service = hyper::service::service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(route(app, req, peer).await) }
    });
    // A client gets a minute to send a request head; one that trickles bytes forever would
    // otherwise hold its connection (and a file descriptor) for good.
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .serve_connection(TokioIo::new(tcp), service)
        .with_upgrades();
    tokio::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        _ = crate::shutdown_started(&mut shutdown) => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "client connection ended with an error");
    }
}

async fn route(app: Arc<App>, req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    match match_stream(req.method(), req.uri().path()) {
        Some(StreamRoute::Chat(chat)) => crate::stream::handle(app, req, chat, peer).await,
        // coderd answers a malformed chat id itself (after authenticating the caller).
        Some(StreamRoute::BadChatId { .. }) | None => forward(&app, req, peer).await,
    }
}

const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
];

/// Whether a comma-separated header (any of its values) lists `token`, case-insensitively.
pub fn has_token(headers: &HeaderMap, name: header::HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .is_ok_and(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

fn is_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE) && has_token(headers, header::CONNECTION, "upgrade")
}

/// Removes hop-by-hop headers, including those the Connection header names.
fn strip_hop_by_hop(headers: &mut HeaderMap, keep_upgrade: bool) {
    let named: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(',').map(|t| t.trim().to_ascii_lowercase()))
        .collect();
    for name in named.iter().map(String::as_str).chain(HOP_BY_HOP) {
        if keep_upgrade && name == "upgrade" {
            continue;
        }
        headers.remove(name);
    }
    if keep_upgrade {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        headers.remove(header::UPGRADE);
    }
}

/// Sends a request to coderd and relays the answer; upgrades become a raw tunnel.
pub async fn forward(app: &App, mut req: Request<Incoming>, peer: SocketAddr) -> Response<Body> {
    app.metrics.proxied_requests.inc();
    let upgrade = is_upgrade(req.headers());
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let uri = match format!("http://{}{path}", app.upstream_authority).parse() {
        Ok(uri) => uri,
        Err(_) => return json_error(StatusCode::BAD_REQUEST, "Invalid request URI.", ""),
    };
    *req.uri_mut() = uri;
    let headers = req.headers_mut();
    strip_hop_by_hop(headers, upgrade);
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prior) => format!("{prior}, {}", peer.ip()),
        None => peer.ip().to_string(),
    };
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    if !headers.contains_key("x-forwarded-proto") {
        headers.insert("x-forwarded-proto", HeaderValue::from_static("http"));
    }

    let result = if upgrade {
        tunnel(app, req).await
    } else {
        app.pass.request(req).await.map_err(|e| e.to_string())
    };
    match result {
        Ok(resp) => {
            let (mut parts, body) = resp.into_parts();
            if parts.status != StatusCode::SWITCHING_PROTOCOLS {
                strip_hop_by_hop(&mut parts.headers, false);
            }
            Response::from_parts(parts, body.boxed())
        }
        Err(e) => {
            tracing::warn!(error = %e, "coderd unreachable");
            json_error(
                StatusCode::BAD_GATEWAY,
                "Bad gateway: coderd did not answer.",
                &e,
            )
        }
    }
}

/// Forwards an upgrade request on its own connection; on 101, splices the two sockets.
async fn tunnel(app: &App, mut req: Request<Incoming>) -> Result<Response<Incoming>, String> {
    let client_side = hyper::upgrade::on(&mut req);
    let tcp = TcpStream::connect(&app.upstream_authority)
        .await
        .map_err(|e| e.to_string())?;
    let _ = tcp.set_nodelay(true);
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        let _ = conn.with_upgrades().await;
    });
    let mut resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let upstream_side = hyper::upgrade::on(&mut resp);
        tokio::spawn(async move {
            let (Ok(client), Ok(upstream)) = (client_side.await, upstream_side.await) else {
                return;
            };
            let mut client = TokioIo::new(client);
            let mut upstream = TokioIo::new(upstream);
            // copy_bidirectional shuts down each write side when the other side's read ends.
            let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
        });
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-private"),
        );
        h.insert("x-private", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::SET_COOKIE, HeaderValue::from_static("a=b"));
        strip_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key(header::SET_COOKIE));
    }

    #[test]
    fn upgrades_keep_their_headers() {
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h.get(header::UPGRADE).unwrap(), "websocket");
        assert_eq!(h.get(header::CONNECTION).unwrap(), "upgrade");
    }
}
