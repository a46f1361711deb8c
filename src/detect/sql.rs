//! `kind = "sql"` conditions: a read-only DataFusion query over the `windows` rows the detector
//! holds (recent closed windows plus the rows being evaluated). Each result row names a group that
//! should be firing: a `topic` column (and `ticker` for ticker rules), optionally `value` (shown in
//! the alert) and `window_start` (to pick one window; without it, any window of the group).

use std::sync::Arc;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::cast;
use datafusion::arrow::datatypes::{DataType, Float64Type, TimeUnit, TimestampMillisecondType};
use datafusion::datasource::MemTable;
use datafusion::execution::context::SQLOptions;
use datafusion::prelude::SessionContext;

use crate::window::{WindowRow, windows_batch, windows_schema};

/// One group the query says is in breach.
#[derive(Debug, Clone, PartialEq)]
pub struct Hit {
    pub topic: String,
    pub ticker: Option<String>,
    pub window_start_ms: Option<i64>,
    pub value: Option<f64>,
}

fn read_only() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread().enable_time().build().map_err(|e| e.to_string())
}

/// Memory a rule's query may hold (joins, sorts, aggregates, any function's output): the rows it
/// reads are the detector's recent windows, a few MB.
const RULE_QUERY_MEMORY: usize = 64 << 20;

/// Time a rule's query may run. It runs in the detector's turn, so a query that joins the windows
/// with themselves thrice must not hold the pipeline.
const RULE_QUERY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A session over `windows`, bounded as the tables' SQL is (`query_bounds`) and within
/// [`RULE_QUERY_MEMORY`].
fn context(batches: Vec<RecordBatch>) -> Result<SessionContext, String> {
    use datafusion::execution::memory_pool::GreedyMemoryPool;
    use datafusion::execution::runtime_env::RuntimeEnvBuilder;
    use datafusion::execution::session_state::SessionStateBuilder;
    let runtime = RuntimeEnvBuilder::new()
        .with_memory_pool(Arc::new(GreedyMemoryPool::new(RULE_QUERY_MEMORY)))
        .build_arc()
        .map_err(|e| e.to_string())?;
    let state = SessionStateBuilder::new()
        .with_runtime_env(runtime)
        .with_default_features()
        .with_physical_optimizer_rule(Arc::new(crate::query_bounds::NoBroadcast { memory_bytes: RULE_QUERY_MEMORY }))
        .build();
    let mut ctx = SessionContext::new_with_state(state);
    crate::query_bounds::register(&mut ctx, RULE_QUERY_MEMORY).map_err(|e| e.to_string())?;
    let table = MemTable::try_new(windows_schema(), vec![batches]).map_err(|e| e.to_string())?;
    ctx.register_table("windows", Arc::new(table)).map_err(|e| e.to_string())?;
    Ok(ctx)
}

fn run(rows: &[WindowRow], query: &str) -> Result<Vec<RecordBatch>, String> {
    let batch = windows_batch(rows).map_err(|e| e.to_string())?;
    let ctx = context(vec![batch])?;
    let collect = crate::query_bounds::scope(async {
        let frame = ctx.sql_with_options(query, read_only()).await.map_err(|e| e.to_string())?;
        frame.collect().await.map_err(|e| e.to_string())
    });
    runtime()?.block_on(async {
        tokio::time::timeout(RULE_QUERY_TIMEOUT, collect)
            .await
            .unwrap_or_else(|_| Err(format!("the query ran longer than {} s (a rule's query runs in the detector's turn)", RULE_QUERY_TIMEOUT.as_secs())))
    })
}

/// Plans the query against an empty `windows` table: read-only, and the columns it needs exist.
pub fn validate(query: &str) -> Result<(), String> {
    let batches = run(&[], query)?;
    let schema = match batches.first() {
        Some(batch) => batch.schema(),
        None => {
            // No batch for an empty result: plan once more to see the output columns.
            let ctx = context(vec![])?;
            let frame = runtime()?
                .block_on(crate::query_bounds::scope(ctx.sql_with_options(query, read_only())))
                .map_err(|e| e.to_string())?;
            Arc::new(frame.schema().as_arrow().clone())
        }
    };
    if schema.field_with_name("topic").is_err() {
        return Err("the query must return a `topic` column (the group to alert on)".into());
    }
    Ok(())
}

/// Runs the query over `rows`; every result row is a group in breach.
pub fn hits(rows: &[WindowRow], query: &str) -> Result<Vec<Hit>, String> {
    let mut hits = Vec::new();
    for batch in run(rows, query)? {
        let text = |name: &str| -> Result<Option<Arc<dyn Array>>, String> {
            match batch.column_by_name(name) {
                Some(c) => cast(c, &DataType::Utf8).map(Some).map_err(|e| e.to_string()),
                None => Ok(None),
            }
        };
        let topic = text("topic")?.ok_or("the query returned no `topic` column")?;
        let ticker = text("ticker")?;
        let value = match batch.column_by_name("value") {
            Some(c) => Some(cast(c, &DataType::Float64).map_err(|e| e.to_string())?),
            None => None,
        };
        let start = match batch.column_by_name("window_start") {
            Some(c) => Some(cast(c, &DataType::Timestamp(TimeUnit::Millisecond, None)).map_err(|e| e.to_string())?),
            None => None,
        };
        for i in 0..batch.num_rows() {
            let topic = topic.as_string::<i32>();
            if topic.is_null(i) {
                continue;
            }
            hits.push(Hit {
                topic: topic.value(i).to_string(),
                ticker: ticker.as_ref().map(|t| t.as_string::<i32>()).filter(|t| !t.is_null(i)).map(|t| t.value(i).to_string()),
                window_start_ms: start.as_ref().map(|s| s.as_primitive::<TimestampMillisecondType>()).filter(|s| !s.is_null(i)).map(|s| s.value(i)),
                value: value.as_ref().map(|v| v.as_primitive::<Float64Type>()).filter(|v| !v.is_null(i)).map(|v| v.value(i)),
            });
        }
    }
    Ok(hits)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::{Counts, WindowKey};

    fn row(topic: &str, n: u64, negative: u64) -> WindowRow {
        let counts = Counts { n, n_negative: negative, n_neutral: n - negative, ..Counts::default() };
        WindowRow::new(WindowKey { start_ms: 3_600_000, topic: topic.into(), ticker: None }, 3_600_000, counts, vec![], true, 0)
    }

    #[test]
    fn result_rows_name_the_groups_in_breach() {
        let rows = [row("energy", 20, 12), row("metals", 20, 2), row("all", 40, 14)];
        let found = hits(&rows, "SELECT topic, neg_share AS value, window_start FROM windows WHERE topic <> 'all' AND neg_share > 0.5").unwrap();
        assert_eq!(found, [Hit { topic: "energy".into(), ticker: None, window_start_ms: Some(3_600_000), value: Some(0.6) }]);
    }

    #[test]
    fn only_read_only_queries_with_a_topic_column_are_accepted() {
        assert!(validate("SELECT topic FROM windows WHERE n > 10").is_ok());
        for bad in [
            "DROP TABLE windows",
            "INSERT INTO windows SELECT * FROM windows",
            "CREATE TABLE x AS SELECT 1",
            "SET datafusion.execution.batch_size = 1",
            "SELECT n FROM windows",
            "SELECT topic FROM nowhere",
        ] {
            assert!(validate(bad).is_err(), "{bad}");
        }
    }

    /// A rule's query runs in the detector's turn: one that would take gigabytes or minutes is an
    /// error (the rule file is refused at load; a running rule's evaluation fails), not a stall.
    #[test]
    fn a_rules_query_is_bounded_in_memory_and_time() {
        assert!(validate("SELECT topic FROM windows WHERE cardinality(array_repeat(1, 2000000000)) > 0").unwrap_err().contains("array_repeat"));
        let rows: Vec<WindowRow> = (0..1500).map(|i| row(&format!("t{i}"), 10, 5)).collect();
        let started = std::time::Instant::now();
        let err = hits(&rows, "SELECT a.topic FROM windows a, windows b, windows c WHERE a.n + b.n + c.n < 0").unwrap_err();
        assert!(err.contains("longer than") || err.contains("Resources exhausted"), "{err}");
        assert!(started.elapsed() < RULE_QUERY_TIMEOUT * 3, "stopped after {:?}", started.elapsed());
        let sorted = hits(&rows, "SELECT a.topic FROM windows a, windows b ORDER BY a.topic, b.topic").unwrap_err();
        assert!(sorted.contains("Resources exhausted") || sorted.contains("longer than"), "{sorted}");
    }
}
