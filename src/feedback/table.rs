//! The journal tables' schemas (DESIGN §10, `schemas/*.table.json`) and batches.

use std::sync::{Arc, LazyLock};

use arrow::array::{Array, ArrayRef, Float32Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use chrono::{DateTime, Utc};

use super::{AlertVerdict, AppliedLabel, LabelFeedback, MissedEvent, name_of};

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

static APPLIED: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        text("story_id", false),
        text("text_hash", false),
        text("head", false),
        text("model", false),
        text("model_label", false),
        text("label", true),
        text("feedback_id", false),
        text("matched", false),
        Field::new("shared_words", DataType::Float32, true),
        Field::new("applied_at", utc(), false),
    ]))
});

pub fn applied_labels_schema() -> SchemaRef {
    APPLIED.clone()
}

pub fn applied_labels_batch(rows: &[AppliedLabel]) -> Result<RecordBatch, ArrowError> {
    let columns = vec![
        strings(rows, |r| Some(r.story_id.clone())),
        strings(rows, |r| Some(r.text_hash.clone())),
        strings(rows, |r| Some(name_of(&r.head))),
        strings(rows, |r| Some(r.model.clone())),
        strings(rows, |r| Some(r.model_label.clone())),
        strings(rows, |r| r.label.clone()),
        strings(rows, |r| Some(r.feedback_id.clone())),
        strings(rows, |r| Some(r.matched.name().to_string())),
        Arc::new(Float32Array::from_iter(rows.iter().map(|r| r.matched.shared_words()))),
        times(rows, |r| r.applied_at),
    ];
    RecordBatch::try_new(applied_labels_schema(), columns)
}

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

fn column<'a>(batch: &'a RecordBatch, name: &str) -> Result<&'a ArrayRef, ArrowError> {
    batch.column_by_name(name).ok_or_else(|| ArrowError::SchemaError(format!("no column `{name}`")))
}

fn text_column(batch: &RecordBatch, name: &str) -> Result<Vec<Option<String>>, ArrowError> {
    let array = column(batch, name)?.as_any().downcast_ref::<StringArray>().ok_or_else(|| ArrowError::SchemaError(format!("`{name}` is not text")))?;
    Ok(array.iter().map(|v| v.map(str::to_string)).collect())
}

fn parse<T: serde::de::DeserializeOwned>(name: &str, value: Option<String>) -> Result<T, ArrowError> {
    let value = value.ok_or_else(|| ArrowError::InvalidArgumentError(format!("`{name}` is empty")))?;
    serde_json::from_value(serde_json::Value::String(value.clone()))
        .map_err(|_| ArrowError::InvalidArgumentError(format!("`{name}` {value:?} is not known")))
}

/// The rows of a `label_feedback` batch, as [`label_feedback_batch`] wrote them.
pub(super) fn label_feedback_rows(batch: &RecordBatch) -> Result<Vec<LabelFeedback>, ArrowError> {
    let get = |name| text_column(batch, name);
    let (ids, stories, texts, hashes, heads) = (get("feedback_id")?, get("story_id")?, get("text")?, get("text_hash")?, get("head")?);
    let (models, model_labels, labels, actions, analysts) = (get("model")?, get("model_label")?, get("analyst_label")?, get("action")?, get("analyst")?);
    let (notes, sources, supersedes) = (get("note")?, get("source")?, get("supersedes")?);
    let scores = column(batch, "model_score")?.as_any().downcast_ref::<Float32Array>().ok_or_else(|| ArrowError::SchemaError("`model_score` is not float".into()))?;
    let created = column(batch, "created_at")?
        .as_any()
        .downcast_ref::<TimestampMillisecondArray>()
        .ok_or_else(|| ArrowError::SchemaError("`created_at` is not a timestamp".into()))?;
    let mut rows = Vec::with_capacity(batch.num_rows());
    for i in 0..batch.num_rows() {
        rows.push(LabelFeedback {
            feedback_id: ids[i].clone().unwrap_or_default(),
            story_id: stories[i].clone(),
            text: texts[i].clone().unwrap_or_default(),
            text_hash: hashes[i].clone().unwrap_or_default(),
            head: parse("head", heads[i].clone())?,
            model: models[i].clone(),
            model_label: model_labels[i].clone(),
            model_score: scores.is_valid(i).then(|| scores.value(i)),
            analyst_label: labels[i].clone(),
            action: parse("action", actions[i].clone())?,
            analyst: analysts[i].clone().unwrap_or_default(),
            created_at: DateTime::from_timestamp_millis(created.value(i)).unwrap_or_default(),
            note: notes[i].clone(),
            source: parse("source", sources[i].clone())?,
            supersedes: supersedes[i].clone(),
        });
    }
    Ok(rows)
}
