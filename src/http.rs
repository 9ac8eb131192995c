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
        .route("/favicon.ico", get(|| asset("image/svg+xml", ICON)))
        .route("/api/openapi.json", get(openapi))
        .route("/api/track", post(api::track))
        .route("/api/refresh", post(api::refresh))
        .route("/api/users", get(api::users))
        .route("/api/instances", get(api::instances))
        .route("/api/users/{user_id}/stream", get(api::stream))
        .route("/api/users/{user_id}/{kind}", get(api::user_record))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .layer(axum::middleware::from_fn(cors))
        .layer(axum::middleware::from_fn(api::record_metrics))
        .with_state(api)
}

const PAGE: &str = include_str!("web/index.html");
const SCRIPT: &str = include_str!("web/app.js");
const STYLE: &str = include_str!("web/app.css");
const ICON: &str = include_str!("web/icon.svg");

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

async fn method_not_allowed() -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        Json(serde_json::json!({"error": "method_not_allowed", "detail": "this route does not take that method (see /api/openapi.json)"})),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::pipeline::JobHandle;
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    fn app(token: Option<&str>) -> Router {
        let config = Config::default();
        let (_, stopping) = tokio::sync::watch::channel(false);
        let api = Api::new(
            &config,
            Arc::new(JobHandle::default()),
            token.map(str::to_string),
            stopping,
        )
        .unwrap();
        router(api)
    }

    async fn call(
        app: Router,
        method: &str,
        uri: &str,
        auth: Option<&str>,
        body: Vec<u8>,
    ) -> Response {
        let mut request = Request::builder().method(method).uri(uri);
        if let Some(a) = auth {
            request = request.header(header::AUTHORIZATION, a);
        }
        app.oneshot(request.body(Body::from(body)).unwrap())
            .await
            .unwrap()
    }

    async fn error_code(response: Response) -> String {
        let bytes = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        v["error"].as_str().unwrap().to_string()
    }

    #[tokio::test]
    async fn without_a_token_writes_are_disabled() {
        let r = call(
            app(None),
            "POST",
            "/api/track",
            Some("Bearer anything-at-all-x"),
            b"{}".to_vec(),
        )
        .await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(error_code(r).await, "writes_disabled");
        let r = call(app(None), "POST", "/api/refresh", None, b"{}".to_vec()).await;
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
    }

    #[tokio::test]
    async fn a_wrong_token_or_a_big_body_is_refused() {
        let token = "0123456789abcdef";
        let r = call(
            app(Some(token)),
            "POST",
            "/api/track",
            Some("Bearer 0123456789abcdeX"),
            b"{}".to_vec(),
        )
        .await;
        assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
        let big = vec![b' '; 65 * 1024];
        let r = call(
            app(Some(token)),
            "POST",
            "/api/track",
            Some(&format!("Bearer {token}")),
            big,
        )
        .await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let r = call(
            app(Some(token)),
            "POST",
            "/api/track",
            Some(&format!("Bearer {token}")),
            b"[1]".to_vec(),
        )
        .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
        assert_eq!(error_code(r).await, "schema_violation");
    }

    #[tokio::test]
    async fn queries_before_the_job_runs_are_unavailable_not_errors() {
        let r = call(app(None), "GET", "/api/users/u1/carousels", None, vec![]).await;
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(r.headers()[header::RETRY_AFTER], "1");
        let r = call(app(None), "GET", "/api/users/u1/nonsense", None, vec![]).await;
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let r = call(app(None), "GET", "/api/users?limit=0", None, vec![]).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    }

    #[tokio::test]
    async fn the_page_and_the_bundled_openapi_are_served() {
        let r = call(app(None), "GET", "/", None, vec![]).await;
        assert_eq!(r.status(), StatusCode::OK);
        let r = call(app(None), "GET", "/api/openapi.json", None, vec![]).await;
        let bytes = axum::body::to_bytes(r.into_body(), 1 << 22).await.unwrap();
        let doc: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(doc["openapi"], "3.1.0");
        assert!(doc["components"]["schemas"]["interaction.v1"].is_object());
    }
}
