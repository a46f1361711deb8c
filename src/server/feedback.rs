//! Feedback in (DESIGN §10): `POST /api/feedback/labels`, `/verdicts` and `/missed`, and the same
//! steps for `bearwatch feedback import`. Each request is checked whole against the tables (the
//! stories and alerts it names must exist) and then written as one append, so a request lands
//! entirely or not at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::auth::Analyst;
use crate::detect::InForce;
use crate::error::{Classified, ErrorClass};
use super::{AppState, error};
use crate::feedback::{
    self, AlertVerdict, Channel, FeedbackError, Head, LabelContext, LabelFeedback, LabelRequest, LatestLabels, MAX_ROWS,
    MissedEvent, MissedRequest, VerdictRequest,
};
use crate::sql::{self, SqlError, lookup};

/// What the feedback endpoints need beyond SQL.
#[derive(Clone)]
pub struct FeedbackService {
    pub storage: crate::storage::Location,
    /// The topics of the model the pipeline runs (empty when it runs none: topic labels are refused).
    pub topics: Vec<String>,
    /// The pipeline's rules in force: the SHA-256 of their files is recorded with each verdict.
    pub rules: InForce,
    /// What each new judgement supersedes; held while a request's rows are linked and written, so
    /// that two requests about the same text cannot both supersede the same row.
    latest: Arc<Mutex<LatestLabels>>,
}

impl FeedbackService {
    pub fn new(storage: crate::storage::Location, topics: Vec<String>, rules: InForce) -> FeedbackService {
        let latest = Arc::new(Mutex::new(LatestLabels::new(&storage)));
        FeedbackService { storage, topics, rules, latest }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FeedbackFailure {
    #[error(transparent)]
    Feedback(#[from] FeedbackError),
    /// What is wrong with one item of a request (1-based), which then writes nothing.
    #[error("item {item}: {source}")]
    Item { item: usize, source: FeedbackError },
    #[error(transparent)]
    Sql(#[from] SqlError),
}

impl Classified for FeedbackFailure {
    fn class(&self) -> ErrorClass {
        match self {
            FeedbackFailure::Feedback(e) | FeedbackFailure::Item { source: e, .. } => e.class(),
            FeedbackFailure::Sql(e) => e.class(),
        }
    }
    fn retryable(&self) -> bool {
        match self {
            FeedbackFailure::Feedback(e) | FeedbackFailure::Item { source: e, .. } => e.retryable(),
            FeedbackFailure::Sql(e) => e.retryable(),
        }
    }
}

/// An id as an answer quotes it: its first 100 characters, so that a made-up id of a megabyte is
/// not sent back whole.
fn quoted(id: &str) -> String {
    match id.char_indices().nth(100) {
        Some((end, _)) => format!("{:?}… ({} characters)", &id[..end], id.chars().count()),
        None => format!("{id:?}"),
    }
}

fn item(index: usize) -> impl FnOnce(FeedbackError) -> FeedbackFailure {
    move |source| FeedbackFailure::Item { item: index + 1, source }
}

/// Writes label judgements: looks up the stories they name, links each to the judgement of the same
/// text and head it supersedes, and appends them all at once.
pub async fn record_labels(
    ctx: &datafusion::prelude::SessionContext,
    service: &FeedbackService,
    requests: Vec<LabelRequest>,
    analyst: &str,
    source: Channel,
) -> Result<Vec<LabelFeedback>, FeedbackFailure> {
    let ids: Vec<String> = requests.iter().filter_map(|r| r.story_id.clone()).collect();
    let stories = lookup::stories(ctx, &ids).await?;
    let mut hashes = Vec::with_capacity(requests.len());
    for (i, request) in requests.iter().enumerate() {
        let story = match &request.story_id {
            Some(id) => Some(stories.get(id).ok_or_else(|| item(i)(FeedbackError::NotFound(format!("no story {} in the news table", quoted(id)))))?),
            None => None,
        };
        hashes.push(feedback::text_hash(&request.text(story).map_err(item(i))?));
    }
    let mut latest = service.latest.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    latest.refresh()?;
    // A later item about the same text and head supersedes an earlier one of this request.
    let mut here: HashMap<(String, Head), String> = HashMap::new();
    let mut rows = Vec::with_capacity(requests.len());
    let created_at = chrono::Utc::now();
    for (i, (request, hash)) in requests.into_iter().zip(hashes).enumerate() {
        let story = request.story_id.as_ref().and_then(|id| stories.get(id));
        let key = (hash, request.head);
        let supersedes = here.get(&key).or_else(|| latest.get(&key.0, key.1)).cloned();
        let context = LabelContext { story, topics: &service.topics, analyst, source, supersedes, created_at };
        let row = request.into_row(context).map_err(item(i))?;
        here.insert(key, row.feedback_id.clone());
        rows.push(row);
    }
    feedback::record_labels(&service.storage, &rows)?;
    rows.iter().for_each(|row| latest.note(row));
    Ok(rows)
}

pub async fn record_verdicts(
    ctx: &datafusion::prelude::SessionContext,
    service: &FeedbackService,
    requests: Vec<VerdictRequest>,
    analyst: &str,
) -> Result<Vec<AlertVerdict>, FeedbackFailure> {
    let ids: Vec<String> = requests.iter().map(|r| r.alert_id.clone()).collect();
    let rules = lookup::alert_rules(ctx, &ids).await?;
    let mut latest = lookup::latest_verdicts(ctx, &ids, analyst).await?;
    let mut rows = Vec::with_capacity(requests.len());
    let created_at = chrono::Utc::now();
    for (i, request) in requests.into_iter().enumerate() {
        let Some(rule) = rules.get(&request.alert_id).cloned() else {
            return Err(item(i)(FeedbackError::NotFound(format!("no alert {} in the alerts table", quoted(&request.alert_id)))));
        };
        let alert_id = request.alert_id.clone();
        let row = request.into_row(rule, service.rules.hash(), analyst, latest.get(&alert_id).cloned(), created_at).map_err(item(i))?;
        latest.insert(alert_id, row.verdict_id.clone());
        rows.push(row);
    }
    feedback::record_verdicts(&service.storage, &rows)?;
    Ok(rows)
}

pub fn record_missed(service: &FeedbackService, requests: Vec<MissedRequest>, analyst: &str) -> Result<Vec<MissedEvent>, FeedbackFailure> {
    let created_at = chrono::Utc::now();
    let rows = requests.into_iter().enumerate().map(|(i, r)| r.into_row(&service.topics, analyst, created_at).map_err(item(i))).collect::<Result<Vec<_>, _>>()?;
    feedback::record_missed(&service.storage, &rows)?;
    Ok(rows)
}

/// One item or a list of up to [`MAX_ROWS`].
#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany<T> {
    Many(Vec<T>),
    One(T),
}

fn items<T: DeserializeOwned>(body: &str) -> Result<Vec<T>, Response> {
    let items = match serde_json::from_str::<OneOrMany<T>>(body) {
        Ok(OneOrMany::Many(items)) => items,
        Ok(OneOrMany::One(item)) => vec![item],
        // The untagged error says nothing; parse as one item again for serde's own message.
        Err(_) => match serde_json::from_str::<T>(body) {
            Ok(item) => vec![item],
            Err(e) => return Err(error(StatusCode::BAD_REQUEST, format!("bad request body: {e}"))),
        },
    };
    if items.is_empty() || items.len() > MAX_ROWS {
        return Err(error(StatusCode::BAD_REQUEST, format!("send 1 to {MAX_ROWS} items, not {}", items.len())));
    }
    Ok(items)
}

fn failure(e: FeedbackFailure) -> Response {
    let status = match &e {
        FeedbackFailure::Feedback(FeedbackError::Invalid(_)) | FeedbackFailure::Item { source: FeedbackError::Invalid(_), .. } => {
            StatusCode::BAD_REQUEST
        }
        FeedbackFailure::Feedback(FeedbackError::NotFound(_)) | FeedbackFailure::Item { source: FeedbackError::NotFound(_), .. } => {
            StatusCode::NOT_FOUND
        }
        _ => return super::failed(&e),
    };
    error(status, e.to_string())
}

/// The request's items and a context over the tables to check them against.
fn checked<T: DeserializeOwned>(state: &AppState, body: &str) -> Result<(Vec<T>, datafusion::prelude::SessionContext), Response> {
    let items = items::<T>(body)?;
    let service = &state.sql;
    let ctx = sql::context(&service.storage, service.limits, service.live.clone()).map_err(|e| failure(e.into()))?;
    Ok((items, ctx))
}

/// The dashboard marks its requests; anything else is an API client.
fn channel(headers: &HeaderMap) -> Channel {
    match headers.get("x-bearwatch-source").and_then(|v| v.to_str().ok()) {
        Some("dashboard") => Channel::Dashboard,
        _ => Channel::Api,
    }
}

fn created<T: serde::Serialize>(rows: &[T]) -> Response {
    (StatusCode::CREATED, Json(json!({ "rows": rows }))).into_response()
}

pub(super) async fn labels(State(state): State<AppState>, Analyst(who): Analyst, headers: HeaderMap, body: String) -> Response {
    let (requests, ctx) = match checked::<LabelRequest>(&state, &body) {
        Ok(checked) => checked,
        Err(response) => return response,
    };
    match record_labels(&ctx, &state.feedback, requests, &who.name, channel(&headers)).await {
        Ok(rows) => created(&rows),
        Err(e) => failure(e),
    }
}

/// `GET /api/feedback/queue?limit=&hours=`: what to label next (`sql::queue`), for analysts.
pub(super) async fn queue(State(state): State<AppState>, _: Analyst, RawQuery(raw): RawQuery) -> Response {
    let mut options = sql::queue::QueueOptions { limit: 50, hours: 168, near_duplicates: state.near_duplicates };
    for (key, value) in form_urlencoded::parse(raw.as_deref().unwrap_or("").as_bytes()) {
        let number = |max: usize| value.parse::<usize>().ok().filter(|n| (1..=max).contains(n));
        match key.as_ref() {
            "limit" => match number(sql::queue::MAX_LIMIT) {
                Some(n) => options.limit = n,
                None => return error(StatusCode::BAD_REQUEST, format!("limit: a whole number from 1 to {}", sql::queue::MAX_LIMIT)),
            },
            "hours" => match number(24 * 366) {
                Some(n) => options.hours = n as u32,
                None => return error(StatusCode::BAD_REQUEST, "hours: a whole number from 1 to 8784"),
            },
            other => return error(StatusCode::BAD_REQUEST, format!("unknown parameter {other:?}: limit, hours")),
        }
    }
    let service = &state.sql;
    let queue = match sql::context(&service.storage, service.limits, service.live.clone()) {
        Ok(ctx) => sql::queue::review_queue(&ctx, &state.rules.rules(), &options).await,
        Err(e) => Err(e),
    };
    match queue {
        Ok(items) => Json(json!({ "stories": items })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

pub(super) async fn verdicts(State(state): State<AppState>, Analyst(who): Analyst, body: String) -> Response {
    let (requests, ctx) = match checked::<VerdictRequest>(&state, &body) {
        Ok(checked) => checked,
        Err(response) => return response,
    };
    match record_verdicts(&ctx, &state.feedback, requests, &who.name).await {
        Ok(rows) => created(&rows),
        Err(e) => failure(e),
    }
}

pub(super) async fn missed(State(state): State<AppState>, Analyst(who): Analyst, body: String) -> Response {
    match items::<MissedRequest>(&body).map(|requests| record_missed(&state.feedback, requests, &who.name)) {
        Ok(Ok(rows)) => created(&rows),
        Ok(Err(e)) => failure(e),
        Err(response) => response,
    }
}
