//! Admin endpoints for the champion alias: `POST /api/models/promote` and `/api/models/rollback`,
//! the same gate and journals as `bearwatch model promote|rollback`, with the authenticated admin
//! recorded as `set_by`. A running pipeline on the same storage swaps within a second or two.

use std::path::PathBuf;

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::auth::Admin;
use super::{AppState, error};
use crate::learn::LearnError;
use crate::learn::registry;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PromoteRequest {
    /// The candidate folder, as the server's filesystem sees it.
    dir: PathBuf,
    #[serde(default)]
    force: bool,
    reason: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RollbackRequest {
    reason: Option<String>,
}

pub(super) fn body<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, Response> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    serde_json::from_str(text).map_err(|e| error(StatusCode::BAD_REQUEST, format!("bad request body: {e}")))
}

fn answer(result: Result<Result<registry::AliasRow, LearnError>, tokio::task::JoinError>) -> Response {
    match result {
        Ok(Ok(row)) => Json(row).into_response(),
        Ok(Err(e)) => {
            let status = match e {
                LearnError::Refused(_) => StatusCode::CONFLICT,
                LearnError::Invalid(_) | LearnError::Files { .. } => StatusCode::BAD_REQUEST,
                LearnError::Classify(_) | LearnError::Storage(_) => return super::failed(&e),
            };
            error(status, e.to_string())
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub(super) async fn promote(State(state): State<AppState>, Admin(who): Admin, text: String) -> Response {
    let request: PromoteRequest = match body(&text) {
        Ok(request) => request,
        Err(response) => return response,
    };
    if request.force && request.reason.as_deref().is_none_or(|r| r.trim().is_empty()) {
        return error(StatusCode::BAD_REQUEST, "force needs a reason, which is recorded");
    }
    let storage = state.sql.storage.clone();
    // Hashing the folder reads the whole model: off the async workers.
    answer(
        tokio::task::spawn_blocking(move || {
            let forced = request.reason.as_deref().filter(|_| request.force);
            registry::promote(&storage, &request.dir, &who.name, forced)
        })
        .await,
    )
}

pub(super) async fn rollback(State(state): State<AppState>, Admin(who): Admin, text: String) -> Response {
    let request: RollbackRequest = match body(&text) {
        Ok(request) => request,
        Err(response) => return response,
    };
    let storage = state.sql.storage.clone();
    answer(
        tokio::task::spawn_blocking(move || {
            registry::rollback(&storage, &who.name, request.reason.as_deref())
        })
        .await,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A promotion the registry's journal could not take (a full disk) is for sending again later.
    #[test]
    fn a_registry_the_storage_cannot_write_is_503_and_a_bad_folder_400() {
        let full = crate::storage::StorageError::Io { path: "store/models".into(), reason: "No space left on device (os error 28)".into() };
        let answered = answer(Ok(Err(LearnError::Storage(full))));
        assert_eq!((answered.status(), answered.headers().contains_key("retry-after")), (StatusCode::SERVICE_UNAVAILABLE, true));
        let missing = LearnError::Files { path: "candidate/report.json".into(), reason: "No such file or directory".into() };
        assert_eq!(answer(Ok(Err(missing))).status(), StatusCode::BAD_REQUEST);
    }
}
