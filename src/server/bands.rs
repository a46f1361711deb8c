//! `GET /api/bands?topic=T&from=&to=`: what the alert rules' count test expects of each of a
//! topic's windows (its usual negative count at that hour, and the count it fires from), read from
//! the `windows` table as the detector reads it. The dashboard draws it behind the topic's counts.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::auth::Viewer;
use super::{AppState, error};
use crate::detect::band;
use crate::detect::rules::GroupKind;
use crate::sql::{self, Format};

/// Days of windows before `from` read as baseline (the count test's four weeks, and a margin).
const BASELINE_DAYS: i64 = 35;

#[derive(Default)]
struct BandQuery {
    topic: String,
    from: Option<chrono::DateTime<chrono::Utc>>,
    to: Option<chrono::DateTime<chrono::Utc>>,
}

impl BandQuery {
    fn parse(raw: &str) -> Result<BandQuery, String> {
        let mut q = BandQuery::default();
        let instant = |v: &str| v.parse::<chrono::DateTime<chrono::Utc>>().map_err(|e| format!("{v:?} is not an RFC 3339 time: {e}"));
        for (key, value) in form_urlencoded::parse(raw.as_bytes()) {
            match key.as_ref() {
                "topic" => q.topic = value.into_owned(),
                "from" => q.from = Some(instant(&value).map_err(|e| format!("from: {e}"))?),
                "to" => q.to = Some(instant(&value).map_err(|e| format!("to: {e}"))?),
                other => return Err(format!("unknown parameter {other:?}: topic, from, to")),
            }
        }
        Ok(q)
    }
}

#[derive(Deserialize)]
struct WindowCounts {
    window_start: String,
    n: u64,
    n_negative: u64,
    n_neutral: u64,
    n_positive: u64,
}

pub async fn bands(State(state): State<AppState>, _: Viewer, RawQuery(raw): RawQuery) -> Response {
    let q = match BandQuery::parse(raw.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if q.topic.is_empty() || q.topic.len() > 200 {
        return error(StatusCode::BAD_REQUEST, "topic: 1 to 200 characters");
    }
    let Some((rule, (condition, metric))) = state.rules.iter().filter(|r| r.group == GroupKind::Topic).find_map(|r| Some((r, band::count_test(r)?))) else {
        return Json(json!({ "rule": null, "windows": [] })).into_response();
    };
    let lit = |t: &str| format!("'{}'", t.replace('\'', "''"));
    let mut conditions = vec![format!("topic = {}", lit(&q.topic)), "ticker IS NULL".to_string(), "final".to_string()];
    if let Some(from) = q.from {
        let baseline_from = from - chrono::Duration::days(BASELINE_DAYS);
        conditions.push(format!("window_start >= {}", lit(&baseline_from.to_rfc3339())));
    }
    if let Some(to) = q.to {
        conditions.push(format!("window_start < {}", lit(&to.to_rfc3339())));
    }
    // A revised final row (an analyst's correction) replaces the earlier one.
    let query = format!(
        "SELECT window_start, n, n_negative, n_neutral, n_positive FROM (SELECT *, row_number() OVER (PARTITION BY window_start ORDER BY updated_at DESC) AS r \
         FROM windows WHERE {}) WHERE r = 1 ORDER BY window_start",
        conditions.join(" AND ")
    );
    let service = &state.sql;
    let rows = match sql::context(&service.storage, service.limits, service.live.clone()) {
        Ok(ctx) => sql::run(&ctx, &query).await.and_then(|batches| sql::encode(&batches, Format::Json)),
        Err(e) => Err(e),
    };
    let rows: Vec<WindowCounts> = match rows.map(|bytes| serde_json::from_slice::<Vec<WindowCounts>>(&bytes)) {
        Ok(Ok(rows)) => rows,
        Ok(Err(e)) => return error(StatusCode::INTERNAL_SERVER_ERROR, format!("windows: {e}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let windows: Vec<(i64, [u64; 4])> = rows
        .iter()
        .filter_map(|r| {
            let start = chrono::DateTime::parse_from_rfc3339(&r.window_start).or_else(|_| chrono::DateTime::parse_from_rfc3339(&format!("{}Z", r.window_start))).ok()?;
            Some((start.timestamp_millis(), [r.n, r.n_negative, r.n_neutral, r.n_positive]))
        })
        .collect();
    let from_ms = q.from.map_or(i64::MIN, |f| f.timestamp_millis());
    let bands: Vec<serde_json::Value> = band::bands(condition, metric, &windows)
        .into_iter()
        .filter(|b| b.window_start_ms >= from_ms)
        .map(|b| {
            let start = chrono::DateTime::from_timestamp_millis(b.window_start_ms).unwrap_or_default();
            json!({ "window_start": start.to_rfc3339_opts(chrono::SecondsFormat::Secs, true), "usual": b.usual, "threshold": b.threshold })
        })
        .collect();
    Json(json!({ "rule": rule.name, "test": condition.test_name(), "metric": metric.as_str(), "windows": bands })).into_response()
}
