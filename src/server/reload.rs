//! `POST /api/rules/reload` (admins): the pipeline reads its rule files (and its pipeline file's
//! receivers and tokens) again, as on SIGHUP, and the caller learns what is in force or why the
//! files were refused (what was in force stays).
//! `GET /api/rules` (anyone who may read): the rules in force, their files' hash, and why the
//! last reload was refused, if it was.

use std::time::Duration;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

use super::auth::{Admin, Viewer};
use super::{AppState, error};

/// One reload asked of the pipeline thread, which answers on the channel.
pub type ReloadRequest = oneshot::Sender<Result<Reloaded, String>>;

/// What a reload put in force.
#[derive(Debug, Clone, Serialize)]
pub struct Reloaded {
    pub rules: usize,
    pub routes: usize,
    pub silences: usize,
    /// Receivers in force (the pipeline file's `[[receivers]]`, read again with the rule files).
    pub receivers: usize,
    /// Alerts that were firing under rules no longer in the files, resolved by the reload.
    pub resolved: usize,
    pub rules_hash: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReloadBody {}

/// How long a caller waits for the pipeline thread to take the request: it takes it between two
/// reads, but a storage outage holds it until the storage answers.
const WAIT: Duration = Duration::from_secs(30);

pub(super) async fn in_force(State(state): State<AppState>, _: Viewer) -> Response {
    let rules = &state.rules;
    Json(serde_json::json!({ "rules_hash": rules.hash(), "refused": rules.refused(), "rules": rules.rules() })).into_response()
}

pub(super) async fn reload(State(state): State<AppState>, Admin(who): Admin, text: String) -> Response {
    if let Err(response) = super::models::body::<ReloadBody>(&text) {
        return response;
    }
    let (answer, answered) = oneshot::channel();
    if state.reload.send(answer).is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the pipeline has stopped");
    }
    tracing::info!(admin = %who.name, "rule files reload asked over HTTP");
    match tokio::time::timeout(WAIT, answered).await {
        Ok(Ok(Ok(reloaded))) => Json(reloaded).into_response(),
        Ok(Ok(Err(refused))) => error(StatusCode::BAD_REQUEST, refused),
        Ok(Err(_)) => error(StatusCode::SERVICE_UNAVAILABLE, "the pipeline stopped before it read the rule files"),
        Err(_) => {
            let mut answer = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "the pipeline has not taken the reload within 30 s (it waits on its storage); it reads the rule files when it does",
            );
            answer.headers_mut().insert(header::RETRY_AFTER, header::HeaderValue::from_static("30"));
            answer
        }
    }
}
