//! The admin listener: `/live`, `/ready` and `/metrics`, on a port of their own.
//!
//! Readiness means "this sidecar can serve": config loaded, coderd answered, Postgres and the
//! LISTEN connection came up once. After that it stays ready while only Postgres flaps, because
//! streams fail open to coderd meanwhile; taking every replica out of the Service at once for a
//! database blip would be worse than serving through coderd.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use http::{header, Request, Response, StatusCode};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::proxy::{full, Body};
use crate::App;

pub async fn serve(app: Arc<App>, listener: TcpListener) {
    let mut shutdown = app.shutdown.subscribe();
    loop {
        let (tcp, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(_) => continue,
            },
            _ = crate::shutdown_started(&mut shutdown) => return,
        };
        let app = app.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(answer(&app, req).await) }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(tcp), service)
                .await;
        });
    }
}

fn text(status: StatusCode, body: String, content_type: &'static str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, content_type)
        .body(full(body.into()))
        .expect("static response")
}

async fn answer(app: &App, req: Request<Incoming>) -> Response<Body> {
    match req.uri().path() {
        "/live" => text(StatusCode::OK, "ok\n".into(), "text/plain"),
        "/ready" => {
            if app.ready.load(Ordering::Acquire) || check_ready(app).await {
                text(StatusCode::OK, "ready\n".into(), "text/plain")
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "not ready\n".into(),
                    "text/plain",
                )
            }
        }
        "/metrics" => text(
            StatusCode::OK,
            app.metrics.render(),
            "text/plain; version=0.0.4",
        ),
        _ => text(StatusCode::NOT_FOUND, "not found\n".into(), "text/plain"),
    }
}

/// The first-time readiness check: coderd answers, Postgres answers, LISTEN is up.
async fn check_ready(app: &App) -> bool {
    if !app.listener.is_up() || crate::db::ping(&app.cache.pool).await.is_err() {
        return false;
    }
    let upstream = tokio::net::TcpStream::connect(&app.upstream_authority).await;
    if upstream.is_err() {
        return false;
    }
    app.ready.store(true, Ordering::Release);
    tracing::info!("ready");
    true
}
