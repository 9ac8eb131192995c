//! The HTTP API beside `/metrics` (`schemas/openapi.v1.json`): an intake that
//! validates interactions exactly as the consumer does and produces them to
//! the interactions topic, interactive queries of this instance's state (or
//! the address of the instance that owns the user), refresh commands, and
//! server-sent events of a user's output records for the live page.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, PathRejection, QueryRejection};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::Stream;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::{broadcast, watch};
use tracing::{info, warn};

use crate::config::{Config, HttpConfig, TopicNames};
use crate::event::{parse_interaction, parse_refresh, RefreshCommand};
use crate::live::OutputFeed;
use crate::metrics;
use crate::output::OutputKind;
use crate::pipeline::{self, JobHandle, QueryError};
use crate::routing::{self, Identity, Partitioner, Registry};

/// Environment variable with the write endpoints' bearer token.
pub const TOKEN_ENV: &str = "RECSTREAM_API_TOKEN";
/// Shorter tokens are refused at startup: they can be guessed.
const MIN_TOKEN_LEN: usize = 16;
const MAX_LISTED_USERS: usize = 1000;

#[derive(Debug, thiserror::Error)]
pub enum ApiSetupError {
    #[error("`http.api_token_file` {path}: {source}")]
    TokenFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("`{0}` must be at least {MIN_TOKEN_LEN} characters")]
    TokenTooShort(&'static str),
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
}

/// Everything the handlers share.
pub struct Api {
    pub job: Arc<JobHandle>,
    registry: Arc<Registry>,
    feed: Arc<OutputFeed>,
    producer: FutureProducer,
    client: ClientConfig,
    topics: TopicNames,
    group_id: String,
    partitioner: Partitioner,
    token: Option<String>,
    max_event_bytes: usize,
    max_body_bytes: usize,
    announce_interval: Duration,
    /// Turns true at shutdown: open event streams end, so the server can stop.
    stopping: watch::Receiver<bool>,
}

impl Api {
    /// `token`: see [`load_token`].
    pub fn new(
        config: &Config,
        job: Arc<JobHandle>,
        token: Option<String>,
        stopping: watch::Receiver<bool>,
    ) -> Result<Arc<Api>, ApiSetupError> {
        let client = pipeline::client_config(config);
        let announce_interval = Duration::from_millis(config.http.announce_interval_ms);
        Ok(Arc::new(Api {
            job,
            registry: Arc::new(Registry::new(
                &instance_id(config),
                &config.kafka.group_id,
                announce_interval,
            )),
            feed: OutputFeed::new(client.clone(), &config.topics, stopping.clone()),
            producer: pipeline::producer(config)?,
            client,
            topics: config.topics.clone(),
            group_id: config.kafka.group_id.clone(),
            partitioner: Partitioner::from_client_config(&config.kafka.client)
                .expect("validated with the config"),
            token,
            max_event_bytes: config.processing.max_event_bytes,
            max_body_bytes: config.http.max_body_bytes,
            announce_interval,
            stopping,
        }))
    }

    pub fn max_body_bytes(&self) -> usize {
        self.max_body_bytes
    }

    pub fn instance(&self) -> &str {
        self.registry.me()
    }

    /// Starts following the other instances and announcing this one at
    /// `http_url` until `stop` turns true (then see [`Routing::finish`]).
    pub fn start_routing(&self, http_url: String, stop: watch::Receiver<bool>) -> Routing {
        let (registry, client, topic) = (
            self.registry.clone(),
            self.client.clone(),
            self.topics.instances.clone(),
        );
        let follow = tokio::spawn(async move {
            if let Err(e) = routing::follow(registry, client, topic).await {
                warn!(%e, "cannot follow the instances topic: queries for other instances' users get 503");
            }
        });
        let announce = tokio::spawn(routing::announce(
            self.producer.clone(),
            self.topics.instances.clone(),
            Identity {
                instance: self.registry.me().to_string(),
                group_id: self.group_id.clone(),
                http_url,
            },
            self.job.assignment(),
            self.announce_interval,
            stop,
        ));
        Routing { announce, follow }
    }
}

/// The routing tasks of a running instance.
pub struct Routing {
    announce: tokio::task::JoinHandle<()>,
    follow: tokio::task::JoinHandle<()>,
}

impl Routing {
    /// After the stop signal: waits (up to 5 s) until this instance's
    /// announcement is removed, so nobody is sent here any more, then stops
    /// following the others.
    pub async fn finish(self) {
        let _ = tokio::time::timeout(Duration::from_secs(5), self.announce).await;
        self.follow.abort();
        let _ = self.follow.await;
    }
}

/// `kafka.instance_id`, or host name and process id.
fn instance_id(config: &Config) -> String {
    config
        .kafka
        .instance_id
        .clone()
        .unwrap_or_else(|| format!("{}-{}", host_name(), std::process::id()))
}

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".into())
}

/// `http.advertised_url`, or `http://` + the bound address (an unspecified IP
/// replaced by the host name).
pub fn advertised_url(http: &HttpConfig, bound: std::net::SocketAddr) -> String {
    match &http.advertised_url {
        Some(url) => url.clone(),
        None if bound.ip().is_unspecified() => format!("http://{}:{}", host_name(), bound.port()),
        None => format!("http://{bound}"),
    }
}

/// The write endpoints' token: `RECSTREAM_API_TOKEN`, else `http.api_token_file`.
/// `None` disables the write endpoints (logged once, here).
pub fn load_token(http: &HttpConfig) -> Result<Option<String>, ApiSetupError> {
    let (token, field) = match (std::env::var(TOKEN_ENV), &http.api_token_file) {
        (Ok(t), _) if !t.trim().is_empty() => (t.trim().to_string(), TOKEN_ENV),
        (_, Some(path)) => {
            let text =
                std::fs::read_to_string(path).map_err(|source| ApiSetupError::TokenFile {
                    path: path.clone(),
                    source,
                })?;
            (text.trim().to_string(), "http.api_token_file")
        }
        _ => {
            info!(
                "no API token ({TOKEN_ENV} or http.api_token_file): POST /api/track and \
                 /api/refresh are disabled (403); queries and the live page work"
            );
            return Ok(None);
        }
    };
    if token.chars().count() < MIN_TOKEN_LEN {
        return Err(ApiSetupError::TokenTooShort(field));
    }
    Ok(Some(token))
}

// ---------------------------------------------------------------- responses

/// A request the API turns down: `{"error": code, "detail": ...}` with the
/// status, plus `Retry-After` on 503 and `WWW-Authenticate` on 401.
#[derive(Debug)]
struct Refusal {
    status: StatusCode,
    code: &'static str,
    detail: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = Json(json!({ "error": self.code, "detail": self.detail }));
        let mut r = (self.status, body).into_response();
        let h = r.headers_mut();
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            h.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        r
    }
}

fn refusal(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Refusal {
    Refusal {
        status,
        code,
        detail: detail.into(),
    }
}

fn error(status: StatusCode, code: &'static str, detail: impl Into<String>) -> Response {
    refusal(status, code, detail).into_response()
}

fn unavailable(detail: impl Into<String>) -> Response {
    error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", detail)
}

/// Counts every request by route pattern and status.
pub async fn record_metrics(
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let route = matched
        .as_ref()
        .map(|m| m.as_str().to_string())
        .unwrap_or_else(|| "unmatched".into());
    let started = Instant::now();
    let response = next.run(request).await;
    let streaming = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let seconds = (!streaming).then(|| started.elapsed().as_secs_f64());
    metrics::http_request(&route, response.status().as_u16(), seconds);
    response
}

/// Checks the bearer token of a write endpoint.
fn authorize(api: &Api, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(expected) = &api.token else {
        return Err(refusal(
            StatusCode::FORBIDDEN,
            "writes_disabled",
            format!("write endpoints are disabled: no API token is configured ({TOKEN_ENV} or http.api_token_file)"),
        ));
    };
    // The scheme is case-insensitive (RFC 7235).
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim());
    match given {
        Some(g) if constant_time_eq(g.as_bytes(), expected.as_bytes()) => Ok(()),
        _ => Err(refusal(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid `Authorization: Bearer <token>` header is required",
        )),
    }
}

/// A write endpoint's body, once the token is checked: a body over
/// `http.max_body_bytes` is refused (413), as is one that could not be read.
fn authorized_body(
    api: &Api,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Bytes, Refusal> {
    authorize(api, headers)?;
    body.map_err(|e| {
        let status = e.status();
        let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
            "too_large"
        } else {
            "bad_body"
        };
        refusal(status, code, e.body_text())
    })
}

/// Compares without an early exit, so timing does not leak the token.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

// ---------------------------------------------------------------- writes

/// `POST /api/track`: one interaction, checked like a record of the topic.
pub async fn track(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match authorized_body(&api, &headers, body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    if body.len() > api.max_event_bytes {
        metrics::api_event("oversized");
        return error(
            StatusCode::BAD_REQUEST,
            "oversized",
            format!(
                "payload of {} bytes exceeds `processing.max_event_bytes` ({})",
                body.len(),
                api.max_event_bytes
            ),
        );
    }
    let checked = parse_interaction(&body)
        .map_err(|e| (e.reason(), e.to_string()))
        .and_then(|event| {
            pipeline::check_not_far_future(&event, pipeline::wall_clock_ms())
                .map(|()| event)
                .map_err(|r| (r.reason, r.detail))
        });
    let event = match checked {
        Ok(e) => e,
        Err((reason, detail)) => {
            metrics::api_event(reason);
            return error(StatusCode::BAD_REQUEST, reason, detail);
        }
    };
    let record = FutureRecord::to(&api.topics.interactions)
        .key(&event.user_id)
        .payload(body.as_ref());
    match api.producer.send(record, Duration::from_secs(10)).await {
        Ok(delivered) => {
            metrics::api_event("accepted");
            (
                StatusCode::ACCEPTED,
                Json(json!({
                    "event_id": event.event_id,
                    "partition": delivered.partition,
                    "offset": delivered.offset,
                })),
            )
                .into_response()
        }
        Err((e, _)) => {
            metrics::kafka_error("api_produce");
            warn!(%e, "producing a tracked interaction failed");
            unavailable(format!(
                "the interactions topic did not accept the event: {e}"
            ))
        }
    }
}

/// `POST /api/refresh`: `{"user_id": "..."}` or `{"all": true}`.
pub async fn refresh(
    State(api): State<Arc<Api>>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let body = match authorized_body(&api, &headers, body) {
        Ok(b) => b,
        Err(r) => return r.into_response(),
    };
    let command = match parse_refresh(&body, api.max_event_bytes) {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.reason(), e.to_string()),
    };
    match send_refresh(&api.producer, &api.client, &api.topics.refresh, &command).await {
        Ok(sent) => (StatusCode::ACCEPTED, Json(json!({ "commands": sent }))).into_response(),
        Err(e) => {
            warn!(%e, "producing a refresh command failed");
            unavailable(e.to_string())
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("kafka: {0}")]
    Kafka(#[from] KafkaError),
    #[error("reading topic metadata: {0}")]
    Metadata(String),
    #[error("refresh topic {0} does not exist")]
    NoTopic(String),
}

/// A user refresh goes to the user's partition (by key); a refresh of everyone
/// goes to every partition so that every instance sees it.
pub async fn send_refresh(
    producer: &FutureProducer,
    client: &ClientConfig,
    topic: &str,
    command: &RefreshCommand,
) -> Result<usize, RefreshError> {
    let send = |key: &str, payload: String, partition: Option<i32>| {
        let producer = producer.clone();
        let (topic, key) = (topic.to_string(), key.to_string());
        async move {
            let mut record = FutureRecord::to(&topic).key(&key).payload(&payload);
            if let Some(p) = partition {
                record = record.partition(p);
            }
            producer
                .send(record, Duration::from_secs(30))
                .await
                .map(|_| ())
                .map_err(|(e, _)| RefreshError::Kafka(e))
        }
    };
    match &command.user_id {
        Some(user) => {
            send(user, json!({ "user_id": user }).to_string(), None).await?;
            Ok(1)
        }
        None => {
            let client = client.clone();
            let counts =
                tokio::task::spawn_blocking(move || crate::topics::partition_counts(&client))
                    .await
                    .map_err(|e| RefreshError::Metadata(e.to_string()))?
                    .map_err(|e| RefreshError::Metadata(e.to_string()))?;
            let partitions = *counts
                .get(topic)
                .ok_or_else(|| RefreshError::NoTopic(topic.to_string()))?;
            for p in 0..partitions as i32 {
                send("*", r#"{"all":true}"#.to_string(), Some(p)).await?;
            }
            Ok(partitions)
        }
    }
}

// ---------------------------------------------------------------- queries

/// `GET /api/users/{id}/{kind}`: the user's record computed from this
/// instance's state now; a 307 to the owning instance; or cold-start rows.
pub async fn user_record(
    State(api): State<Arc<Api>>,
    path: Result<Path<(String, String)>, PathRejection>,
) -> Response {
    let (user_id, kind) = match path {
        Ok(Path(p)) => p,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_path", e.body_text()),
    };
    let kind = match kind.as_str() {
        "recommendations" => OutputKind::Recommendations,
        "carousels" => OutputKind::Carousels,
        "insights" => OutputKind::Insights,
        other => {
            return error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no such record kind {other:?} (recommendations, carousels, insights)"),
            )
        }
    };
    if let Err(r) = check_user_id(&user_id) {
        return r.into_response();
    }
    let partitions = match api.job.partition_count() {
        Ok(n) => n,
        Err(e) => return unavailable(e.to_string()),
    };
    let home = api.partitioner.partition(user_id.as_bytes(), partitions);
    let view = match api.job.query(&user_id, home).await {
        Ok(v) => v,
        Err(QueryError::NotOwned { partition }) => {
            return redirect_to_owner(&api, &user_id, partition, kind)
        }
        Err(
            e @ (QueryError::NotRunning
            | QueryError::NoPartitions
            | QueryError::Busy
            | QueryError::Timeout(_)),
        ) => return unavailable(e.to_string()),
        Err(e @ QueryError::Engine(_)) => {
            return error(StatusCode::INTERNAL_SERVER_ERROR, "engine", e.to_string())
        }
    };
    let record = match kind {
        OutputKind::Recommendations => serde_json::to_value(&view.outputs.recommendations),
        OutputKind::Carousels => serde_json::to_value(&view.outputs.carousels),
        OutputKind::Insights => serde_json::to_value(&view.outputs.insights),
    };
    let mut record = record.expect("output records serialise");
    record["cold_start"] = Value::Bool(!view.known);
    let mut response = Json(record).into_response();
    let h = response.headers_mut();
    h.insert("x-recstream-partition", HeaderValue::from(view.partition));
    if let Ok(v) = HeaderValue::from_str(api.instance()) {
        h.insert("x-recstream-instance", v);
    }
    response
}

fn redirect_to_owner(api: &Api, user_id: &str, partition: u32, kind: OutputKind) -> Response {
    match api.registry.owner(partition, pipeline::wall_clock_ms()) {
        Some(owner) => {
            let location = format!(
                "{}/api/users/{}/{}",
                owner.http_url,
                percent_encode(user_id),
                kind.as_str()
            );
            let mut r = (
                StatusCode::TEMPORARY_REDIRECT,
                Json(json!({
                    "error": "not_owned",
                    "detail": format!("partition {partition} is owned by instance {}", owner.instance),
                    "owner": owner.instance,
                    "url": location,
                })),
            )
                .into_response();
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(header::LOCATION, v);
            }
            r
        }
        None => unavailable(format!(
            "partition {partition} has no live owner right now (a rebalance may be moving it)"
        )),
    }
}

/// Percent-encodes a path segment (user ids are free-form).
fn percent_encode(segment: &str) -> String {
    let mut out = String::with_capacity(segment.len());
    for b in segment.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn check_user_id(user_id: &str) -> Result<(), Refusal> {
    crate::event::check_id("user_id", user_id)
        .map_err(|e| refusal(StatusCode::BAD_REQUEST, e.reason(), e.to_string()))
}

#[derive(Debug, Deserialize)]
pub struct ListParams {
    limit: Option<usize>,
}

/// `GET /api/users`: users with state on this instance (the page's picker).
pub async fn users(
    State(api): State<Arc<Api>>,
    params: Result<Query<ListParams>, QueryRejection>,
) -> Response {
    let limit = match params {
        Ok(Query(p)) => p.limit.unwrap_or(50),
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_query", e.body_text()),
    };
    if !(1..=MAX_LISTED_USERS).contains(&limit) {
        return error(
            StatusCode::BAD_REQUEST,
            "out_of_range",
            format!("`limit` must be in 1..={MAX_LISTED_USERS}"),
        );
    }
    match api.job.known_users(limit).await {
        Ok(users) => Json(json!({ "instance": api.instance(), "users": users })).into_response(),
        Err(e) => unavailable(e.to_string()),
    }
}

/// `GET /api/instances`: the live instances of this group and their partitions.
pub async fn instances(State(api): State<Arc<Api>>) -> Response {
    let now = pipeline::wall_clock_ms();
    let assignment = api.job.assignment().borrow().clone();
    Json(json!({
        "instance": api.instance(),
        "partitions": assignment.partitions,
        "partition_count": assignment.partition_count,
        "instances": api.registry.live(now),
    }))
    .into_response()
}

/// `GET /api/users/{id}/stream`: server-sent events with every record
/// published for the user from now on (event name: the record kind). The
/// first event, `ready`, says nothing published later will be missed; `resync`
/// says some were (the client fell behind) and it should re-read.
pub async fn stream(
    State(api): State<Arc<Api>>,
    path: Result<Path<String>, PathRejection>,
) -> Response {
    let user_id = match path {
        Ok(Path(u)) => u,
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_path", e.body_text()),
    };
    if let Err(r) = check_user_id(&user_id) {
        return r.into_response();
    }
    match api.feed.watch(&user_id).await {
        Ok(updates) => Sse::new(events(updates, api.stopping.clone()))
            .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
            .into_response(),
        Err(e) => unavailable(e.to_string()),
    }
}

/// Decrements the watcher gauge when the stream is dropped.
struct Watching(broadcast::Receiver<crate::live::Update>);

impl Drop for Watching {
    fn drop(&mut self) {
        metrics::live_watchers(-1);
    }
}

fn events(
    updates: broadcast::Receiver<crate::live::Update>,
    stopping: watch::Receiver<bool>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    metrics::live_watchers(1);
    let ready = futures::stream::once(async { Ok(Event::default().event("ready").data("{}")) });
    let state = (Watching(updates), stopping);
    let rest = futures::stream::unfold(state, |(mut w, mut stopping)| async move {
        let received = tokio::select! {
            r = w.0.recv() => r,
            _ = stopping.wait_for(|s| *s) => return None,
        };
        let event = match received {
            Ok(u) => Event::default().event(u.kind.as_str()).data(&*u.payload),
            Err(broadcast::error::RecvError::Lagged(n)) => Event::default()
                .event("resync")
                .data(json!({ "missed": n }).to_string()),
            Err(broadcast::error::RecvError::Closed) => return None,
        };
        Some((Ok(event), (w, stopping)))
    });
    futures::StreamExt::chain(ready, rest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"abcdef", b"abcdef"));
        assert!(!constant_time_eq(b"abcdef", b"abcdeg"));
        assert!(!constant_time_eq(b"abcdef", b"abcde"));
    }

    #[test]
    fn user_ids_are_encoded_for_a_path() {
        assert_eq!(percent_encode("u-1.x_y~"), "u-1.x_y~");
        assert_eq!(percent_encode("a/b c"), "a%2Fb%20c");
        assert_eq!(percent_encode("é"), "%C3%A9");
    }

    #[test]
    fn unspecified_addresses_advertise_the_host_name() {
        let http = HttpConfig::default();
        assert_eq!(
            advertised_url(&http, "127.0.0.1:80".parse().unwrap()),
            "http://127.0.0.1:80"
        );
        assert!(!advertised_url(&http, "0.0.0.0:80".parse().unwrap()).contains("0.0.0.0"));
        let set = HttpConfig {
            advertised_url: Some("https://reco-0.reco:9898".into()),
            ..HttpConfig::default()
        };
        assert_eq!(
            advertised_url(&set, "0.0.0.0:80".parse().unwrap()),
            "https://reco-0.reco:9898"
        );
    }
}
