//! The HTTP server: `/metrics` (Prometheus text), `/healthz` (process alive),
//! `/readyz` (catalog loaded and partitions assigned), the API under `/api`
//! (see [`crate::api`] and `schemas/openapi.v1.json`) and the live page at `/`.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use axum::extract::{DefaultBodyLimit, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};

use crate::api::{self, Api};

pub fn router(api: Arc<Api>) -> Router {
    let max_body_bytes = api.max_body_bytes();
    Router::new()
        .route("/metrics", get(metrics))
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route("/", get(|| asset("text/html; charset=utf-8", PAGE)))
        .route(
            "/app.js",
            get(|| asset("text/javascript; charset=utf-8", SCRIPT)),
        )
        .route("/app.css", get(|| asset("text/css; charset=utf-8", STYLE)))
        .route("/api/openapi.json", get(openapi))
        .route("/api/track", post(api::track))
        .route("/api/refresh", post(api::refresh))
        .route("/api/users", get(api::users))
        .route("/api/instances", get(api::instances))
        .route("/api/users/{user_id}/stream", get(api::stream))
        .route("/api/users/{user_id}/{kind}", get(api::user_record))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(cors))
        .layer(axum::middleware::from_fn(api::record_metrics))
        .with_state(api)
}

const PAGE: &str = include_str!("web/index.html");
const SCRIPT: &str = include_str!("web/app.js");
const STYLE: &str = include_str!("web/app.css");

async fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(serde_json::json!({"error": "not_found", "detail": "no such route (see /api/openapi.json)"})),
    )
        .into_response()
}

/// Reads may come from a page served by another instance (after a redirect to
/// the user's owner); writes need the token anyway.
async fn cors(request: axum::extract::Request, next: axum::middleware::Next) -> Response {
    let preflight = request.method() == Method::OPTIONS;
    let mut response = if preflight {
        StatusCode::NO_CONTENT.into_response()
    } else {
        next.run(request).await
    };
    let h = response.headers_mut();
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    if preflight {
        h.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("authorization, content-type"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST"),
        );
    }
    response
}

async fn metrics() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
}

async fn ready(State(api): State<Arc<Api>>) -> impl IntoResponse {
    if api.job.ready() {
        (StatusCode::OK, "ready")
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready")
    }
}

/// The committed OpenAPI document with the record schemas it names bundled in
/// (`components/schemas`), so that clients need one file.
static OPENAPI: LazyLock<serde_json::Value> = LazyLock::new(crate::openapi::bundled);

async fn openapi() -> Response {
    Json(OPENAPI.clone()).into_response()
}

/// Binds `addr` (port 0 picks a free port) and serves until `shutdown` resolves.
pub async fn serve(
    addr: SocketAddr,
    api: Arc<Api>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<std::io::Result<()>>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = router(api);
    let handle = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await
    });
    Ok((bound, handle))
}
