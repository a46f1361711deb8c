//! The `notifications` table (DESIGN §3): every status change of every notification.

use std::sync::{Arc, LazyLock};

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;

use super::notify::NotificationRow;

static SCHEMA: LazyLock<SchemaRef> = LazyLock::new(|| {
    let utc = DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()));
    let text = |name: &str, nullable| Field::new(name, DataType::Utf8, nullable);
    Arc::new(Schema::new(vec![
        // Idempotency key: alert_id/state/receiver, plus #n for reminders.
        text("notification_id", false),
        text("alert_id", false),
        text("state", false),
        text("receiver", false),
        // pending | sent | dropped
        text("status", false),
        Field::new("attempts", DataType::Int64, false),
        text("last_error", true),
        Field::new("sent_at", utc.clone(), true),
        Field::new("recorded_at", utc, false),
    ]))
});

pub fn notifications_schema() -> SchemaRef {
    SCHEMA.clone()
}

pub fn notifications_batch(rows: &[NotificationRow]) -> Result<RecordBatch, ArrowError> {
    let text = |f: fn(&NotificationRow) -> &str| -> ArrayRef { Arc::new(StringArray::from_iter_values(rows.iter().map(f))) };
    let columns: Vec<ArrayRef> = vec![
        text(|r| &r.key),
        text(|r| &r.alert_id),
        text(|r| &r.state),
        text(|r| &r.receiver),
        text(|r| &r.status),
        Arc::new(Int64Array::from_iter_values(rows.iter().map(|r| i64::from(r.attempts)))),
        Arc::new(StringArray::from_iter(rows.iter().map(|r| r.last_error.as_deref()))),
        Arc::new(TimestampMillisecondArray::from_iter(rows.iter().map(|r| r.sent_ms)).with_timezone("UTC")),
        Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| r.recorded_ms)).with_timezone("UTC")),
    ];
    RecordBatch::try_new(notifications_schema(), columns)
}
