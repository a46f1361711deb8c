//! The `windows` table (DESIGN §3) as Arrow record batches.

use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, BooleanArray, Float64Array, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;

use super::{Counts, Headline, WindowKey};

/// One row of `windows`: a live snapshot of an open window, or the final row of a closed one.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowRow {
    pub key: WindowKey,
    pub end_ms: i64,
    pub counts: Counts,
    /// The window's most negative stories (not a column: they explain alerts).
    pub top: Vec<Headline>,
    pub final_row: bool,
    pub updated_ms: i64,
}

impl WindowRow {
    pub fn new(key: WindowKey, size_ms: i64, counts: Counts, top: Vec<Headline>, final_row: bool, updated_ms: i64) -> WindowRow {
        WindowRow { end_ms: key.start_ms + size_ms, key, counts, top, final_row, updated_ms }
    }
}

fn utc_millis() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("window_start", utc_millis(), false),
        Field::new("window_end", utc_millis(), false),
        Field::new("topic", DataType::Utf8, false),
        Field::new("ticker", DataType::Utf8, true),
        Field::new("n", DataType::Int64, false),
        Field::new("n_negative", DataType::Int64, false),
        Field::new("n_neutral", DataType::Int64, false),
        Field::new("n_positive", DataType::Int64, false),
        Field::new("neg_share", DataType::Float64, false),
        Field::new("mean_sentiment", DataType::Float64, false),
        Field::new("final", DataType::Boolean, false),
        Field::new("updated_at", utc_millis(), false),
        // Nullable: parts written before copies folded have no such column.
        Field::new("copies", DataType::Int64, true),
    ]))
});

pub fn windows_schema() -> SchemaRef {
    SCHEMA.clone()
}

pub fn windows_batch(rows: &[WindowRow]) -> Result<RecordBatch, ArrowError> {
    let times = |f: fn(&WindowRow) -> i64| -> ArrayRef {
        Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(f)).with_timezone("UTC"))
    };
    let ints = |f: fn(&Counts) -> u64| -> ArrayRef {
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| i64::try_from(f(&r.counts)).unwrap_or(i64::MAX))))
    };
    let columns: Vec<ArrayRef> = vec![
        times(|r| r.key.start_ms),
        times(|r| r.end_ms),
        Arc::new(StringArray::from_iter_values(rows.iter().map(|r| r.key.topic.as_str()))),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.key.ticker.as_deref()))),
        ints(|c| c.n),
        ints(|c| c.n_negative),
        ints(|c| c.n_neutral),
        ints(|c| c.n_positive),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.counts.neg_share()))),
        Arc::new(Float64Array::from_iter_values(rows.iter().map(|r| r.counts.mean_sentiment()))),
        Arc::new(BooleanArray::from_iter(rows.iter().map(|r| Some(r.final_row)))),
        times(|r| r.updated_ms),
        ints(|c| c.n_copies),
    ];
    RecordBatch::try_new(windows_schema(), columns)
}
