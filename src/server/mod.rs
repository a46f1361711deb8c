//! The HTTP API (axum) on its own thread and runtime, so the pipeline thread never waits on it.
//! Read-only SQL over the pipeline's tables (`POST /sql`), silences (`GET/POST /api/silences`,
//! `DELETE /api/silences/{id}`), feedback (`POST /api/feedback/labels|verdicts|missed`) and
//! `GET /api/me`, each for the roles that may use it (`auth`); promotion and rollback of the
//! champion model and a reload of the rule files for admins (`POST /api/models/promote|rollback`,
//! `POST /api/rules/reload`; the rules in force at `GET /api/rules`); and, without auth for probes and
//! scrapers, `GET /health`, `GET /ready` and `GET /metrics` (Prometheus text format), the API's
//! description at `GET /api/openapi.json`, and the dashboard page at `GET /` (its data needs a
//! token when the server has users).

mod auth;
mod bands;
mod config;
pub mod feedback;
mod listen;
mod models;
mod reload;
mod web;

use std::net::SocketAddr;
use std::thread::JoinHandle;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use serde_json::json;
use tokio::sync::oneshot;

pub use config::{Principal, Role, ServerConfig, UserConfig};
pub use feedback::FeedbackService;
pub use reload::{ReloadRequest, Reloaded};
pub use auth::Principals;
pub use web::WebPolicy;

use auth::{Analyst, Viewer};

use crate::alert::silences::SilenceStore;
use crate::detect::rules::Silence;
use crate::error::{Classified, ErrorClass};
use crate::sql::{self, Format, SqlError};

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr}: {reason}")]
    Bind { addr: String, reason: String },
}

impl Classified for ServerError {
    fn class(&self) -> ErrorClass {
        ErrorClass::External
    }
    fn retryable(&self) -> bool {
        true
    }
}

/// Where `POST /sql` reads, and how much one query may take.
#[derive(Clone)]
pub struct SqlService {
    pub storage: crate::storage::Location,
    pub limits: sql::Limits,
    /// The running pipeline's unflushed rows.
    pub live: Option<std::sync::Arc<crate::sql::live::LiveRows>>,
}

/// What the operational endpoints report.
#[derive(Clone)]
pub struct Ops {
    /// Renders the process's metrics; `None` when another recorder was already installed.
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// Set once the model is loaded and the source is open.
    pub ready: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// What `/ready` adds while the pipeline runs degraded (a champion that could not load).
    pub warning: Option<String>,
    /// What `/ready` adds while the storage refuses writes.
    pub storage: std::sync::Arc<crate::storage::Outage>,
    /// What `/ready` adds while the source keeps reporting errors.
    pub source: std::sync::Arc<crate::source::Trouble>,
}

/// Everything the API serves.
#[derive(Clone)]
pub struct Api {
    /// Every accepted token and who it is; empty: the API is open.
    pub principals: Principals,
    pub silences: SilenceStore,
    pub sql: SqlService,
    pub ops: Ops,
    pub feedback: FeedbackService,
    pub web: WebPolicy,
    /// The pipeline's alert rules: `/api/bands` draws what their count test expects.
    pub rules: crate::detect::InForce,
    /// Where `POST /api/rules/reload` asks the pipeline thread to read its rule files and the
    /// pipeline file's receivers and tokens again.
    pub reload: std::sync::mpsc::Sender<ReloadRequest>,
    /// The serving model's near-duplicate rule, which keeps the review queue diverse.
    pub near_duplicates: Option<crate::news::near::NearDuplicates>,
}

type AppState = std::sync::Arc<Api>;

/// A running server; dropping it shuts it down.
pub struct Server {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl Server {
    pub fn start(addr: &str, api: Api) -> Result<Server, ServerError> {
        let bind_error = |e: std::io::Error| ServerError::Bind { addr: addr.to_string(), reason: e.to_string() };
        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().map_err(bind_error)?;
        let listener = runtime.block_on(tokio::net::TcpListener::bind(addr)).map_err(bind_error)?;
        let local = listener.local_addr().map_err(bind_error)?;
        let state: AppState = std::sync::Arc::new(api);
        let open = Router::new()
            .route("/", get(|| async { axum::response::Html(DASHBOARD) }))
            .route("/health", get(|| async { "ok\n" }))
            .route("/ready", get(ready))
            .route("/metrics", get(metrics))
            .route("/api/openapi.json", get(|| async { ([(header::CONTENT_TYPE, "application/json")], OPENAPI) }));
        let guarded = Router::new()
            .route("/sql", post(query))
            .route("/api/silences", get(list).post(create))
            .route("/api/silences/{id}", delete(remove))
            .route("/api/me", get(me))
            .route("/api/bands", get(bands::bands))
            .route("/api/feedback/labels", post(feedback::labels))
            .route("/api/feedback/queue", get(feedback::queue))
            .route("/api/feedback/verdicts", post(feedback::verdicts))
            .route("/api/feedback/missed", post(feedback::missed))
            .route("/api/models/promote", post(models::promote))
            .route("/api/models/rollback", post(models::rollback))
            .route("/api/rules", get(reload::in_force))
            .route("/api/rules/reload", post(reload::reload))
            .layer(middleware::from_fn_with_state(state.clone(), auth::authenticate))
            .layer(middleware::from_fn_with_state(state.clone(), web::guard));
        let app = open.merge(guarded).layer(middleware::from_fn(read_body)).with_state(state);
        let (stop, stopped) = oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("http".into())
            .spawn(move || {
                runtime.block_on(listen::serve(listener, app, stopped));
            })
            .map_err(bind_error)?;
        tracing::info!(addr = %local, "http api listening");
        Ok(Server { addr: local, stop: Some(stop), thread: Some(thread) })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The live dashboard: one hand-written page that polls `POST /sql` (no external assets).
const DASHBOARD: &str = include_str!("dashboard.html");

/// This API as OpenAPI 3.1, kept in the repository (tests/openapi.rs checks it against the routes
/// here and every answer the tests get).
const OPENAPI: &str = include_str!("../../docs/openapi.json");

/// A query is at most 64 KiB and a silence far less; 1,000 feedback items fit in 1 MiB.
const BODY_LIMIT: usize = 1 << 20;
/// How much of a refused body is read and dropped, and for how long, before the answer.
const DRAIN_LIMIT: usize = 64 << 20;
const DRAIN_TIME: std::time::Duration = std::time::Duration::from_secs(5);
/// From the end of a request's head to the end of its body: 1 MiB at 35 KB/s.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Reads the whole request body before any handler (or the token check) runs: at most
/// [`BODY_LIMIT`] bytes, else a JSON 413, and within [`BODY_TIMEOUT`] of its head, else a 408 that
/// closes the connection, so a client that sends a body a byte at a time cannot hold a connection
/// (the head has its own deadline in `listen`), and the connection becomes busy only once the body
/// is in (`listen::busy_while_answering`), so that a full listener may close it for another. A
/// declared oversized body is first read and dropped, up to [`DRAIN_LIMIT`] or [`DRAIN_TIME`]: a
/// server that answers and closes while the client is still sending makes the kernel reset the
/// connection, and the client then sees "connection reset" instead of the 413 (nginx's lingering
/// close does the same).
async fn read_body(request: axum::extract::Request, next: middleware::Next) -> Response {
    use futures::StreamExt;
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    let too_large = || error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body is over {BODY_LIMIT} bytes"));
    let (parts, body) = request.into_parts();
    let mut body = body.into_data_stream();
    if declared.is_some_and(|n| n > BODY_LIMIT as u64) {
        let _ = tokio::time::timeout(DRAIN_TIME, async {
            let mut read = 0;
            while read < DRAIN_LIMIT {
                match body.next().await {
                    Some(Ok(chunk)) => read += chunk.len(),
                    _ => break,
                }
            }
        })
        .await;
        return too_large();
    }
    let mut bytes = Vec::new();
    let read = tokio::time::timeout(BODY_TIMEOUT, async {
        while let Some(chunk) = body.next().await {
            let chunk = chunk.map_err(|e| error(StatusCode::BAD_REQUEST, format!("the body could not be read: {e}")))?;
            if bytes.len() + chunk.len() > BODY_LIMIT {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(())
    })
    .await;
    match read {
        Ok(Ok(())) => listen::busy_while_answering(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes)), next).await,
        Ok(Err(refused)) => refused,
        Err(_) => {
            metrics::counter!("bearwatch_http_body_timeouts_total").increment(1);
            let mut late = error(StatusCode::REQUEST_TIMEOUT, format!("the body was not sent within {} s", BODY_TIMEOUT.as_secs()));
            late.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
            late
        }
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, Json(json!({ "error": message.into() }))).into_response()
}

/// The answer to the server's own failure: 503 with `Retry-After` when the same request can succeed
/// later (a full disk, object storage unreachable: nothing was written), else 500.
fn failed(e: &(impl Classified + std::fmt::Display)) -> Response {
    if !e.retryable() {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let mut answer = error(StatusCode::SERVICE_UNAVAILABLE, e.to_string());
    answer.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("10"));
    answer
}

/// Who the caller is, and the topics a label may name: the dashboard shows the feedback controls
/// to analysts and admins only.
async fn me(State(state): State<AppState>, Viewer(who): Viewer) -> Response {
    Json(json!({ "name": who.name, "role": who.role, "topics": state.feedback.topics })).into_response()
}

async fn ready(State(state): State<AppState>) -> Response {
    let ops = &state.ops;
    let warnings: String = ops
        .warning
        .iter()
        .cloned()
        .chain(ops.storage.describe())
        .chain(ops.source.describe())
        .chain(state.rules.refused().map(|why| format!("the rule files were not reloaded, the rules before stay in force: {why}")))
        .map(|w| format!("warning: {w}\n"))
        .collect();
    if ops.ready.load(std::sync::atomic::Ordering::SeqCst) {
        // Still ready while degraded: queries and the dashboard answer, and they are how an
        // operator sees what is wrong.
        format!("ready\n{warnings}").into_response()
    } else {
        // Why it is still starting, where the source says (a refused login, no broker answers).
        (StatusCode::SERVICE_UNAVAILABLE, format!("starting\n{warnings}")).into_response()
    }
}

async fn metrics(State(state): State<AppState>) -> Response {
    match &state.ops.metrics {
        Some(handle) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response(),
        None => error(StatusCode::NOT_FOUND, "metrics are recorded elsewhere in this process"),
    }
}

async fn list(State(state): State<AppState>, _: Viewer) -> Response {
    Json(state.silences.list()).into_response()
}

async fn create(
    State(state): State<AppState>,
    _: Analyst,
    body: Result<Json<Silence>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(silence) = match body {
        Ok(body) => body,
        Err(e) => return error(StatusCode::BAD_REQUEST, e.body_text()),
    };
    if let Err(message) = silence.check() {
        return error(StatusCode::BAD_REQUEST, message);
    }
    match state.silences.add(silence) {
        Ok(Some(id)) => (StatusCode::CREATED, Json(json!({ "id": id }))).into_response(),
        Ok(None) => error(
            StatusCode::TOO_MANY_REQUESTS,
            format!("{MAX_SILENCES} silences are active or pending: delete some first", MAX_SILENCES = crate::alert::silences::MAX_SILENCES),
        ),
        Err(e) => failed(&e),
    }
}

async fn remove(State(state): State<AppState>, _: Analyst, Path(id): Path<String>) -> Response {
    match state.silences.remove(&id) {
        Ok(true) => StatusCode::NO_CONTENT.into_response(),
        Ok(false) => error(StatusCode::NOT_FOUND, format!("no silence {id}")),
        Err(e) => failed(&e),
    }
}

/// `POST /sql`: the body is the query; the answer is JSON, CSV or an Arrow IPC stream by `Accept`.
async fn query(State(state): State<AppState>, _: Viewer, headers: axum::http::HeaderMap, body: String) -> Response {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).unwrap_or("application/json");
    let (format, content_type) = if accept.contains("text/csv") {
        (Format::Csv, "text/csv")
    } else if accept.contains("application/vnd.apache.arrow.stream") {
        (Format::Arrow, "application/vnd.apache.arrow.stream")
    } else {
        (Format::Json, "application/json")
    };
    let service = &state.sql;
    let result = match sql::context(&service.storage, service.limits, service.live.clone()) {
        Ok(ctx) => sql::run(&ctx, &body).await,
        Err(e) => Err(e),
    };
    match result.and_then(|batches| sql::encode(&batches, format)) {
        Ok(bytes) => ([(header::CONTENT_TYPE, content_type)], bytes).into_response(),
        Err(e) => {
            let status = match &e {
                SqlError::Refused(_) => StatusCode::FORBIDDEN,
                SqlError::Invalid { .. } | SqlError::Data(_) | SqlError::Limit(_) => StatusCode::BAD_REQUEST,
                SqlError::Timeout(_) | SqlError::Cancelled => StatusCode::REQUEST_TIMEOUT,
                SqlError::Tables { .. } | SqlError::Execution(_) => StatusCode::INTERNAL_SERVER_ERROR,
            };
            let position = match &e {
                SqlError::Invalid { position: Some((line, column)), .. } => json!({"line": line, "column": column}),
                _ => serde_json::Value::Null,
            };
            (status, Json(json!({"error": e.render(&body), "position": position}))).into_response()
        }
    }
}
