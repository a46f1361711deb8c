//! The `news` table (DESIGN §2–§3), what this stage's output becomes: one row per scored story
//! (the `late` side output has the same columns).

use std::sync::{Arc, LazyLock};

use arrow::array::{
    ArrayRef, Float32Array, Int32Array, Int64Array, ListBuilder, RecordBatch, StringArray, StringBuilder,
    TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;

use crate::news::ScoredNews;

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let utc = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let text = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
    let prob = |name: &str| Field::new(name, DataType::Float32, false);
    Arc::new(Schema::new(vec![
        text("id", false),
        Field::new("published_at", utc.clone(), false),
        text("headline", false),
        text("body", true),
        text("source", true),
        Field::new("tickers", DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))), true),
        text("url", true),
        text("lang", true),
        text("extra", true),
        text("topic", false),
        prob("topic_score"),
        text("sentiment", false),
        prob("p_negative"),
        prob("p_neutral"),
        prob("p_positive"),
        prob("sentiment_score"),
        text("model", false),
        Field::new("ingested_at", utc, false),
        Field::new("kafka_partition", DataType::Int32, true),
        Field::new("kafka_offset", DataType::Int64, true),
    ]))
});

pub fn news_schema() -> SchemaRef {
    SCHEMA.clone()
}

pub fn news_batch(rows: &[ScoredNews]) -> Result<RecordBatch, ArrowError> {
    let text = |f: fn(&ScoredNews) -> &str| -> ArrayRef { Arc::new(StringArray::from_iter_values(rows.iter().map(f))) };
    let optional = |f: fn(&ScoredNews) -> Option<&str>| -> ArrayRef { Arc::new(StringArray::from_iter(rows.iter().map(f))) };
    let prob = |f: fn(&ScoredNews) -> f32| -> ArrayRef { Arc::new(Float32Array::from_iter_values(rows.iter().map(f))) };
    let time = |f: fn(&ScoredNews) -> i64| -> ArrayRef {
        Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(f)).with_timezone("UTC"))
    };
    let mut tickers = ListBuilder::new(StringBuilder::new());
    for row in rows {
        match &row.news.tickers {
            Some(list) => {
                for t in list {
                    tickers.values().append_value(t);
                }
                tickers.append(true);
            }
            None => tickers.append(false),
        }
    }
    let extra: Vec<Option<String>> = rows
        .iter()
        .map(|r| (!r.news.extra.is_empty()).then(|| r.news.extra.to_json()))
        .collect();
    let columns: Vec<ArrayRef> = vec![
        text(|r| &r.news.id),
        time(|r| r.published_ms),
        text(|r| &r.news.headline),
        optional(|r| r.news.body.as_deref()),
        optional(|r| r.news.source.as_deref()),
        Arc::new(tickers.finish()),
        optional(|r| r.news.url.as_deref()),
        optional(|r| r.news.lang.as_deref()),
        Arc::new(StringArray::from(extra)),
        text(|r| &r.scores.topic),
        prob(|r| r.scores.topic_score),
        text(|r| r.scores.sentiment),
        prob(|r| r.scores.p_negative),
        prob(|r| r.scores.p_neutral),
        prob(|r| r.scores.p_positive),
        prob(|r| r.scores.sentiment_score),
        text(|r| &r.scores.model),
        time(|r| r.ingested_ms),
        Arc::new(Int32Array::from_iter(rows.iter().map(|r| r.kafka_partition))),
        Arc::new(Int64Array::from_iter(rows.iter().map(|r| r.kafka_offset))),
    ];
    RecordBatch::try_new(news_schema(), columns)
}
