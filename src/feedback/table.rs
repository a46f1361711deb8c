//! The journal tables' schemas (DESIGN §10, `schemas/*.table.json`) and batches.

use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, Float32Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use chrono::{DateTime, Utc};

use super::{AlertVerdict, LabelFeedback, MissedEvent, name_of};

fn utc() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

fn text(name: &str, nullable: bool) -> Field {
    Field::new(name, DataType::Utf8, nullable)
}

static LABELS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        text("feedback_id", false),
        text("story_id", true),
        text("text", false),
        text("text_hash", false),
        text("head", false),
        text("model", true),
        text("model_label", true),
        Field::new("model_score", DataType::Float32, true),
        text("analyst_label", true),
        text("action", false),
        text("analyst", false),
        Field::new("created_at", utc(), false),
        text("note", true),
        text("source", false),
        text("supersedes", true),
    ]))
});

static VERDICTS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        text("verdict_id", false),
        text("alert_id", false),
        text("rule", false),
        text("rules_hash", true),
        text("verdict", false),
        text("analyst", false),
        Field::new("created_at", utc(), false),
        text("note", true),
        text("supersedes", true),
    ]))
});

static MISSED: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        text("missed_id", false),
        text("topic", true),
        text("ticker", true),
        Field::new("from", utc(), false),
        Field::new("to", utc(), false),
        text("note", true),
        text("analyst", false),
        Field::new("created_at", utc(), false),
    ]))
});

pub fn label_feedback_schema() -> SchemaRef {
    LABELS.clone()
}

pub fn alert_verdicts_schema() -> SchemaRef {
    VERDICTS.clone()
}

pub fn missed_events_schema() -> SchemaRef {
    MISSED.clone()
}

fn strings<'a, T: 'a>(rows: &'a [T], f: impl Fn(&'a T) -> Option<String>) -> ArrayRef {
    Arc::new(StringArray::from_iter(rows.iter().map(f)))
}

fn times<'a, T: 'a>(rows: &'a [T], f: impl Fn(&'a T) -> DateTime<Utc>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| f(r).timestamp_millis())).with_timezone("UTC"))
}

pub(super) fn label_feedback_batch(rows: &[LabelFeedback]) -> Result<RecordBatch, ArrowError> {
    let columns = vec![
        strings(rows, |r| Some(r.feedback_id.clone())),
        strings(rows, |r| r.story_id.clone()),
        strings(rows, |r| Some(r.text.clone())),
        strings(rows, |r| Some(r.text_hash.clone())),
        strings(rows, |r| Some(name_of(&r.head))),
        strings(rows, |r| r.model.clone()),
        strings(rows, |r| r.model_label.clone()),
        Arc::new(Float32Array::from_iter(rows.iter().map(|r| r.model_score))),
        strings(rows, |r| r.analyst_label.clone()),
        strings(rows, |r| Some(name_of(&r.action))),
        strings(rows, |r| Some(r.analyst.clone())),
        times(rows, |r| r.created_at),
        strings(rows, |r| r.note.clone()),
        strings(rows, |r| Some(name_of(&r.source))),
        strings(rows, |r| r.supersedes.clone()),
    ];
    RecordBatch::try_new(label_feedback_schema(), columns)
}

pub(super) fn alert_verdicts_batch(rows: &[AlertVerdict]) -> Result<RecordBatch, ArrowError> {
    let columns = vec![
        strings(rows, |r| Some(r.verdict_id.clone())),
        strings(rows, |r| Some(r.alert_id.clone())),
        strings(rows, |r| Some(r.rule.clone())),
        strings(rows, |r| r.rules_hash.clone()),
        strings(rows, |r| Some(name_of(&r.verdict))),
        strings(rows, |r| Some(r.analyst.clone())),
        times(rows, |r| r.created_at),
        strings(rows, |r| r.note.clone()),
        strings(rows, |r| r.supersedes.clone()),
    ];
    RecordBatch::try_new(alert_verdicts_schema(), columns)
}

pub(super) fn missed_events_batch(rows: &[MissedEvent]) -> Result<RecordBatch, ArrowError> {
    let columns = vec![
        strings(rows, |r| Some(r.missed_id.clone())),
        strings(rows, |r| r.topic.clone()),
        strings(rows, |r| r.ticker.clone()),
        times(rows, |r| r.from),
        times(rows, |r| r.to),
        strings(rows, |r| r.note.clone()),
        strings(rows, |r| Some(r.analyst.clone())),
        times(rows, |r| r.created_at),
    ];
    RecordBatch::try_new(missed_events_schema(), columns)
}
