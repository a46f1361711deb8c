//! The `alerts` table (DESIGN §3): every state change of every alert.

use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;

use super::Alert;

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let utc = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let text = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        text("alert_id", false),
        text("rule", false),
        text("severity", false),
        text("state", false),
        text("topic", true),
        text("ticker", true),
        Field::new("started_at", utc.clone(), false),
        Field::new("resolved_at", utc.clone(), true),
        Field::new("window_start", utc.clone(), false),
        Field::new("window_end", utc.clone(), false),
        Field::new("value", DataType::Float64, false),
        Field::new("baseline", DataType::Float64, true),
        Field::new("threshold", DataType::Float64, false),
        Field::new("count", DataType::Int64, false),
        text("summary", false),
        // JSON: [{"id", "headline", "p_negative"}], most negative first.
        text("top_headlines", false),
        // JSON object of the rule's labels.
        text("labels", false),
        Field::new("recorded_at", utc, false),
    ]))
});

pub fn alerts_schema() -> SchemaRef {
    SCHEMA.clone()
}

fn millis(text: &str) -> i64 {
    chrono::DateTime::parse_from_rfc3339(text).map_or(0, |t| t.timestamp_millis())
}

pub fn alerts_batch(rows: &[(Alert, i64)]) -> Result<RecordBatch, ArrowError> {
    let text = |f: fn(&Alert) -> String| -> ArrayRef { Arc::new(StringArray::from_iter_values(rows.iter().map(|(a, _)| f(a)))) };
    let time = |f: fn(&Alert) -> i64| -> ArrayRef {
        Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(|(a, _)| f(a))).with_timezone("UTC"))
    };
    let columns: Vec<ArrayRef> = vec![
        text(|a| a.alert_id.clone()),
        text(|a| a.rule.clone()),
        text(|a| a.severity.as_str().to_string()),
        text(|a| a.state.as_str().to_string()),
        Arc::new(StringArray::from_iter(rows.iter().map(|(a, _)| a.group.get("topic").cloned()))),
        Arc::new(StringArray::from_iter(rows.iter().map(|(a, _)| a.group.get("ticker").cloned()))),
        time(|a| millis(&a.started_at)),
        Arc::new(
            TimestampMillisecondArray::from_iter(rows.iter().map(|(a, _)| a.resolved_at.as_deref().map(millis))).with_timezone("UTC"),
        ),
        time(|a| millis(&a.window_start)),
        time(|a| millis(&a.window_end)),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|(a, _)| a.value))),
        Arc::new(Float64Array::from_iter(rows.iter().map(|(a, _)| a.baseline))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|(a, _)| a.threshold))),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|(a, _)| a.count as i64))),
        text(|a| a.summary.clone()),
        text(|a| serde_json::to_string(&a.top_headlines).unwrap_or_default()),
        text(|a| serde_json::to_string(&a.labels).unwrap_or_default()),
        Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(|(_, at)| *at)).with_timezone("UTC")),
    ];
    RecordBatch::try_new(alerts_schema(), columns)
}
