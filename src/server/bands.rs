//! `GET /api/bands?topic=T&from=&to=`: what the alert rules' count test expects of each of a
//! topic's windows (its usual negative count at that hour, and the count it fires from), read from
//! the `windows` table as the detector reads it. The dashboard draws it behind the topic's counts.

use axum::Json;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::auth::Viewer;
use super::{AppState, error};
use crate::detect::band;
use crate::detect::rules::GroupKind;
use crate::sql;

#[derive(Default)]
struct BandQuery {
    topic: String,
    from: Option<chrono::DateTime<chrono::Utc>>,
    to: Option<chrono::DateTime<chrono::Utc>>,
}

impl BandQuery {
    fn parse(raw: &str) -> Result<BandQuery, String> {
        let mut q = BandQuery::default();
        // Stories are dated 1970 on, and the tables' timestamps end in 2262 (nanoseconds in an i64):
        // a `from` in year 1 had the window query fail inside with an overflow, as a 500.
        let instant = |v: &str| {
            let at = v.parse::<chrono::DateTime<chrono::Utc>>().map_err(|e| format!("{v:?} is not an RFC 3339 time: {e}"))?;
            let (earliest, latest) = (chrono::DateTime::UNIX_EPOCH, chrono::DateTime::from_timestamp(9_214_646_400, 0).unwrap_or_default());
            if at < earliest || at >= latest {
                return Err(format!("{v:?} is outside 1970-01-01 to 2262-01-01"));
            }
            Ok(at)
        };
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

pub async fn bands(State(state): State<AppState>, _: Viewer, RawQuery(raw): RawQuery) -> Response {
    let q = match BandQuery::parse(raw.as_deref().unwrap_or("")) {
        Ok(q) => q,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if q.topic.is_empty() || q.topic.len() > 200 {
        return error(StatusCode::BAD_REQUEST, "topic: 1 to 200 characters");
    }
    let rules = state.rules.rules();
    let Some((rule, (condition, metric))) = rules.iter().filter(|r| r.group == GroupKind::Topic).find_map(|r| Some((r, band::count_test(r)?))) else {
        return Json(json!({ "rule": null, "windows": [] })).into_response();
    };
    let baseline_from = q.from.map(|from| (from - chrono::Duration::days(sql::queue::BASELINE_DAYS)).timestamp_millis());
    let service = &state.sql;
    let windows = match sql::context(&service.storage, service.limits, service.live.clone()) {
        Ok(ctx) => sql::queue::topic_windows(&ctx, &q.topic, baseline_from, q.to.map(|t| t.timestamp_millis())).await,
        Err(e) => Err(e),
    };
    let windows: Vec<(i64, [u64; 4])> = match windows {
        Ok(windows) => windows.into_iter().map(|(start, _, counts)| (start, counts)).collect(),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
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

#[cfg(test)]
mod tests {
    use super::BandQuery;

    #[test]
    fn times_outside_the_tables_range_are_refused_by_name() {
        let err = BandQuery::parse("topic=macro&from=0001-01-01T00:00:00Z").err().unwrap();
        assert!(err.starts_with("from:") && err.contains("1970-01-01 to 2262-01-01"), "{err}");
        let err = BandQuery::parse("topic=macro&to=9999-12-31T00:00:00Z").err().unwrap();
        assert!(err.starts_with("to:"), "{err}");
        let q = BandQuery::parse("topic=macro&from=1987-03-01T00:00:00Z&to=2261-12-31T23:00:00Z").unwrap();
        assert_eq!(q.topic, "macro");
    }
}
