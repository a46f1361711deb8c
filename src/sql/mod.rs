//! SQL over the tables a pipeline writes (DESIGN §3), with DataFusion: read only, bounded in time and
//! memory. Used by `bearwatch sql` and by the HTTP API's `POST /sql`.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use futures::StreamExt;

use datafusion::arrow::array::{Array, ArrayRef, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{DataType, FieldRef, Schema, SchemaRef};
use datafusion::arrow::error::ArrowError;
use datafusion::arrow::json::writer::{EncoderOptions, make_encoder};
use datafusion::arrow::util::display::{ArrayFormatter, FormatOptions};
use datafusion::datasource::file_format::parquet::ParquetFormat;
use datafusion::datasource::listing::{ListingOptions, ListingTable, ListingTableConfig, ListingTableUrl};
use datafusion::error::DataFusionError;
use datafusion::execution::context::SQLOptions;
use datafusion::execution::cache::cache_manager::{CacheManager, CacheManagerConfig};
use datafusion::execution::memory_pool::{GreedyMemoryPool, MemoryConsumer, MemoryPool, TrackConsumersPool};
use datafusion::execution::runtime_env::{RuntimeEnv, RuntimeEnvBuilder};
use datafusion::execution::session_state::SessionStateBuilder;
use datafusion::prelude::{SessionConfig, SessionContext};

pub mod deadline;
pub mod guard;
pub mod live;
pub mod lookup;
pub mod postgres;
pub mod queue;

use crate::error::{Classified, ErrorClass};
use crate::storage::{Location, Table};
use crate::sync::lock;

#[derive(Debug, thiserror::Error)]
pub enum SqlError {
    /// Anything that would write, or read outside the tables.
    #[error("refused: bearwatch SQL is read only ({0})")]
    Refused(String),
    #[error("{message}")]
    Invalid { message: String, position: Option<(usize, usize)> },
    #[error("query ran longer than {0:?}")]
    Timeout(Duration),
    /// A query over one of the limits of `guard` or `Limits` (size, nesting, result memory).
    #[error("refused: {0}")]
    Limit(String),
    #[error("query cancelled")]
    Cancelled,
    #[error("cannot open the tables under {path}: {reason}")]
    Tables { path: String, reason: String },
    /// The query's own values made it fail: a division by zero, a cast or a regular expression
    /// that cannot be made. The query's to change, as Postgres' data exceptions (class 22).
    #[error("the query failed on a value: {0}")]
    Data(String),
    #[error("query failed: {0}")]
    Execution(String),
}

impl Classified for SqlError {
    fn class(&self) -> ErrorClass {
        match self {
            SqlError::Refused(_)
            | SqlError::Invalid { .. }
            | SqlError::Data(_)
            | SqlError::Timeout(_)
            | SqlError::Limit(_)
            | SqlError::Cancelled => {
                ErrorClass::User
            }
            SqlError::Tables { .. } => ErrorClass::External,
            SqlError::Execution(_) => ErrorClass::Internal,
        }
    }
    fn retryable(&self) -> bool {
        false
    }
}

impl SqlError {
    /// The error with the query line and a caret under the reported position, when there is one.
    pub fn render(&self, query: &str) -> String {
        match self {
            SqlError::Invalid { message, position: Some((line, column)) } => {
                let text = query.lines().nth(line.saturating_sub(1)).unwrap_or_default();
                format!("{message}\n  {text}\n  {}^", " ".repeat(column.saturating_sub(1)))
            }
            other => other.to_string(),
        }
    }
}

/// "... at Line: 1, Column: 15" in parser messages, or the span of a planner diagnostic.
fn position(error: &DataFusionError) -> Option<(usize, usize)> {
    if let Some(span) = error.diagnostic().and_then(|d| d.span) {
        return Some((span.start.line as usize, span.start.column as usize));
    }
    line_and_column(&error.to_string())
}

/// The "Line: 1, Column: 8" that sqlparser's messages end with.
fn line_and_column(text: &str) -> Option<(usize, usize)> {
    let after = &text[text.find("Line: ")? + 6..];
    let line: usize = after.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    let after = &after[after.find("Column: ")? + 8..];
    let column: usize = after.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    Some((line, column))
}

fn classify(error: impl std::borrow::Borrow<DataFusionError>) -> SqlError {
    let error = error.borrow();
    if let Some(stopped) = deadline::stopped(error) {
        return stopped;
    }
    if let DataFusionError::ResourcesExhausted(reason) = error.find_root() {
        return SqlError::Limit(format!("the query needs more memory than query_memory_mib allows ({reason})"));
    }
    let message = error.to_string();
    let refused = ["DDL not supported", "DML not supported", "Statement not supported", "not supported: Statement"];
    if refused.iter().any(|r| message.contains(r)) {
        return SqlError::Refused(message);
    }
    match error.find_root() {
        DataFusionError::SQL(..) | DataFusionError::Plan(_) | DataFusionError::SchemaError(..) | DataFusionError::NotImplemented(_) => {
            SqlError::Invalid { position: position(error), message }
        }
        DataFusionError::ArrowError(arrow, _) if data_exception(arrow) => SqlError::Data(message),
        DataFusionError::Execution(_) => SqlError::Data(message),
        _ if bad_pattern(&message) => SqlError::Data(message),
        _ => SqlError::Execution(message),
    }
}

/// A part listed at planning was deleted before it was read (a merge replaced it).
fn part_went_away(message: &str) -> bool {
    message.contains("Object at location") && message.contains("not found")
}

/// Regex kernels report a pattern that does not compile as DataFusion's internal error.
fn bad_pattern(message: &str) -> bool {
    ["Regular expression did not compile", "regex parse error"].iter().any(|p| message.contains(p))
}

/// The Postgres SQLSTATE of `error` once classified as `sql`, so that a Postgres client (a driver,
/// Grafana, psql's `\errverbose`) tells a typo, a bad value, a limit and a timeout apart the way it
/// would against Postgres, rather than seeing every failure as `XX000` (internal).
pub fn sqlstate(error: &DataFusionError, sql: &SqlError) -> &'static str {
    use datafusion::common::SchemaError;
    match (sql, error.find_root()) {
        (SqlError::Refused(_), _) => "25006",
        (SqlError::Invalid { .. }, DataFusionError::SQL(..)) => "42601",
        (SqlError::Invalid { .. }, DataFusionError::SchemaError(e, _)) if matches!(**e, SchemaError::FieldNotFound { .. }) => "42703",
        (SqlError::Invalid { .. }, DataFusionError::Plan(message)) if message.starts_with("table '") && message.ends_with("' not found") => "42P01",
        (SqlError::Invalid { .. }, DataFusionError::NotImplemented(_)) => "0A000",
        (SqlError::Invalid { .. }, _) => "42000",
        (SqlError::Data(_), DataFusionError::ArrowError(arrow, _)) => arrow_sqlstate(arrow),
        (SqlError::Data(message), _) if bad_pattern(message) => "2201B",
        (SqlError::Data(_), _) => "22000",
        (SqlError::Timeout(_) | SqlError::Cancelled, _) => "57014",
        (SqlError::Limit(_), DataFusionError::ResourcesExhausted(_)) => "53200",
        (SqlError::Limit(_), _) => "54000",
        (SqlError::Tables { .. }, _) => "58030",
        // What Postgres answers when concurrent writes made a query's snapshot stale: clients
        // that retry (connection pools, ORMs) run it again, and it sees the merged part.
        (SqlError::Execution(message), _) if part_went_away(message) => "40001",
        (SqlError::Execution(_), _) => "XX000",
    }
}

/// The SQLSTATE of an Arrow error that [`data_exception`] calls the query's.
fn arrow_sqlstate(error: &ArrowError) -> &'static str {
    match error {
        ArrowError::DivideByZero => "22012",
        ArrowError::ArithmeticOverflow(_) => "22003",
        ArrowError::CastError(_) | ArrowError::ParseError(_) => "22P02",
        _ => "22000",
    }
}

/// Arrow errors that a query's values cause (not storage, I/O or memory).
fn data_exception(error: &ArrowError) -> bool {
    matches!(
        error,
        ArrowError::DivideByZero
            | ArrowError::ArithmeticOverflow(_)
            | ArrowError::CastError(_)
            | ArrowError::ParseError(_)
            | ArrowError::InvalidArgumentError(_)
            | ArrowError::ComputeError(_)
    )
}

/// A table's stored columns, as the stage that fills it writes them (DESIGN §3; reviewed copies in
/// `schemas/*.table.json`). Every table is registered with its schema, so that one with no parts
/// yet is empty rather than missing.
pub fn stored_schema(table: Table) -> SchemaRef {
    match table {
        Table::News | Table::Late | Table::ShadowNews => crate::classify::news_schema(),
        Table::Windows => crate::window::windows_schema(),
        Table::Alerts => crate::detect::alerts_schema(),
        Table::Notifications => crate::alert::notifications_schema(),
        Table::AppliedLabels => crate::feedback::applied_labels_schema(),
        Table::LabelFeedback => crate::feedback::label_feedback_schema(),
        Table::AlertVerdicts => crate::feedback::alert_verdicts_schema(),
        Table::MissedEvents => crate::feedback::missed_events_schema(),
        Table::Models => crate::learn::registry::models_schema(),
        Table::ModelAliases => crate::learn::registry::model_aliases_schema(),
    }
}

/// What queries may use.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Memory for query state (sorts, joins, aggregates) and collected results, shared by all the
    /// queries that run at once with the same limit (HTTP and Postgres of one pipeline); beyond it a
    /// query fails.
    pub memory_bytes: usize,
    /// Running time of each query, on every interface.
    pub timeout: Duration,
}

/// A session over the tables under `storage`, within `limits`; with `live`, a running pipeline's
/// unflushed rows too.
pub fn context(storage: &Location, limits: Limits, live: Option<Arc<live::LiveRows>>) -> Result<SessionContext, SqlError> {
    let tables_error = |reason: String| SqlError::Tables { path: storage.to_string(), reason };
    let runtime = shared_runtime_env(limits.memory_bytes).map_err(|e| tables_error(e.to_string()))?;
    // information_schema (read only) is what Grafana's Postgres data source browses.
    let config = SessionConfig::from_env().map_err(|e| tables_error(e.to_string()))?.with_information_schema(true);
    let state = SessionStateBuilder::new()
        .with_config(config)
        .with_runtime_env(runtime)
        .with_default_features()
        .with_physical_optimizer_rule(Arc::new(crate::query_bounds::NoBroadcast { memory_bytes: limits.memory_bytes }))
        .with_physical_optimizer_rule(Arc::new(deadline::Deadline(limits.timeout)))
        .build();
    let mut ctx = SessionContext::new_with_state(state);
    crate::query_bounds::register(&mut ctx, limits.memory_bytes).map_err(|e| tables_error(e.to_string()))?;
    // Listings leave out the parts that a merge holds until they are deleted (storage::compact).
    let (store_url, store) = match storage {
        Location::Bucket(bucket) => (bucket.store_url(), bucket.client().map_err(|e| tables_error(e.to_string()))?),
        Location::Local(_) => ("file://".to_string(), Arc::new(object_store::local::LocalFileSystem::new()) as Arc<dyn object_store::ObjectStore>),
    };
    let store_url = url::Url::parse(&store_url).map_err(|e| tables_error(e.to_string()))?;
    ctx.register_object_store(&store_url, Arc::new(crate::storage::Visible::new(store)));
    // Several instances' tables: each table gets their `instance` column (Hive partitions).
    // (A pipeline that is an instance knows before its first checkpoint.)
    let partitioned = live.as_ref().is_some_and(|l| l.is_an_instance()) || crate::storage::has_instances(storage).map_err(|e| tables_error(e.to_string()))?;
    for table in Table::ALL {
        let folder = match storage {
            Location::Local(root) => {
                let dir = root.join(table.name());
                std::fs::create_dir_all(&dir).map_err(|e| tables_error(e.to_string()))?;
                std::fs::canonicalize(&dir).map_err(|e| tables_error(e.to_string()))?.display().to_string()
            }
            Location::Bucket(bucket) => bucket.url_of(table.name()),
        };
        let url = ListingTableUrl::parse(format!("{folder}/")).map_err(|e| tables_error(e.to_string()))?;
        let mut options = ListingOptions::new(Arc::new(ParquetFormat::default())).with_file_extension(".parquet");
        if partitioned && Table::CHECKPOINTED.contains(&table) {
            options = options.with_table_partition_cols(vec![(crate::storage::INSTANCE.to_string(), DataType::Utf8)]);
        }
        let config = ListingTableConfig::new(url).with_listing_options(options).with_schema(read_schema(table));
        let listing: Arc<dyn datafusion::catalog::TableProvider> =
            Arc::new(ListingTable::try_new(config).map_err(|e| tables_error(e.to_string()))?);
        // Journal tables are written straight to Parquet: they have no live rows.
        let provider = match &live {
            Some(live) if Table::CHECKPOINTED.contains(&table) => Arc::new(live::LiveTable::new(table, listing, live.clone())),
            _ => listing,
        };
        ctx.register_table(table.name(), provider).map_err(|e| tables_error(e.to_string()))?;
    }
    Ok(ctx)
}

/// One memory pool per limit for the whole process, so that concurrent queries (each HTTP request
/// makes its own context) share `memory_bytes` instead of each taking all of it. Only the pool is
/// shared.
fn shared_runtime_env(memory_bytes: usize) -> Result<Arc<RuntimeEnv>, DataFusionError> {
    static POOLS: Mutex<BTreeMap<usize, Weak<dyn MemoryPool>>> = Mutex::new(BTreeMap::new());
    let pool = {
        let mut pools = lock(&POOLS);
        pools.retain(|_, pool| pool.strong_count() > 0);
        match pools.get(&memory_bytes).and_then(Weak::upgrade) {
            Some(pool) => pool,
            None => {
                let pool: Arc<dyn MemoryPool> = Arc::new(TrackConsumersPool::new(
                    GreedyMemoryPool::new(memory_bytes),
                    std::num::NonZeroUsize::new(3).expect("3 is not zero"),
                ));
                pools.insert(memory_bytes, Arc::downgrade(&pool));
                pool
            }
        }
    };
    // No file-listing cache: its entries never expire by default, and a pipeline adds parts at
    // every checkpoint (a long-lived Postgres session would stop seeing them). Parquet footers and
    // file statistics are cached for the whole process: an entry holds only while the file's size,
    // time and version are the same, and parts never change once written, so every query after
    // the first reads each part's footer from memory (on object storage, a request saved per part).
    static CACHES: OnceLock<Result<Arc<CacheManager>, String>> = OnceLock::new();
    let shared = CACHES.get_or_init(|| CacheManager::try_new(&CacheManagerConfig::default().with_list_files_cache_limit(0)).map_err(|e| e.to_string()));
    let shared = shared.as_ref().map_err(|e| DataFusionError::Internal(e.clone()))?;
    let caches = CacheManagerConfig::default()
        .with_list_files_cache_limit(0)
        .with_file_metadata_cache(Some(shared.get_file_metadata_cache()))
        .with_file_statistics_cache(shared.get_file_statistic_cache());
    // No spilling to disk: a query that needs more than its memory fails with that reason instead
    // of writing temp files (a bound a user's query could otherwise push to the disk's size), and
    // DataFusion 55's nested-loop join fallback that spills its left side answered a three-way
    // self-join with a wrong count (a fraction of the rows, fast) once that side outgrew 64 MiB.
    let no_spill = datafusion::execution::disk_manager::DiskManagerBuilder::default()
        .with_mode(datafusion::execution::disk_manager::DiskManagerMode::Disabled);
    RuntimeEnvBuilder::new().with_memory_pool(pool).with_cache_manager(caches).with_disk_manager_builder(no_spill).build_arc()
}

/// A table's schema as queries see it: text as `Utf8View`, which DataFusion's string kernels
/// (comparisons, grouping, hashing) handle faster than `Utf8`; Parquet stores both the same way and
/// clients (psql, drivers) see `text` either way. (Dictionary types for low-cardinality columns
/// measured 3× slower on `bench sql`.)
pub fn read_schema(table: Table) -> SchemaRef {
    let fields: Vec<_> = stored_schema(table)
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            DataType::Utf8 => Arc::new(f.as_ref().clone().with_data_type(DataType::Utf8View)),
            _ => f.clone(),
        })
        .collect();
    Arc::new(Schema::new(fields))
}

fn read_only() -> SQLOptions {
    SQLOptions::new().with_allow_ddl(false).with_allow_dml(false).with_allow_statements(false)
}

/// Plans one query under the read-only options and the limits of [`guard`]: anything that would
/// write or change settings, or is too long or too deeply nested, is refused here, before it runs.
pub async fn plan(ctx: &SessionContext, query: &str) -> Result<datafusion::dataframe::DataFrame, SqlError> {
    guard::check_size(query)?;
    let state = ctx.state();
    let dialect = state.config().options().sql_parser.dialect;
    let statement = state.sql_to_statement(query, &dialect).map_err(classify)?;
    check_nesting(&statement)?;
    let plan = state.statement_to_plan(statement).await.map_err(classify)?;
    read_only().verify_plan(&plan).map_err(classify)?;
    ctx.execute_logical_plan(plan).await.map_err(classify)
}

fn check_nesting(statement: &datafusion::sql::parser::Statement) -> Result<(), SqlError> {
    use datafusion::sql::parser::Statement;
    match statement {
        Statement::Statement(statement) => guard::check_statement(statement),
        Statement::Explain(explain) => check_nesting(&explain.statement),
        other => Err(SqlError::Refused(format!("`{other}` is not a query"))),
    }
}

/// Plans and runs one read-only query on the query threads ([`guard::pool`]), within the context's
/// [`Limits`]: the collected result counts against the query memory, so a result too large to hold
/// is refused rather than grown without bound. Dropping the future stops the query.
pub async fn run(ctx: &SessionContext, query: &str) -> Result<Vec<RecordBatch>, SqlError> {
    match run_once(ctx, query).await {
        // A part listed at planning was deleted before it was read: a merge holds its rows now
        // (storage::compact deletes a merge's inputs a few seconds after the merge appears). A
        // query only reads, so it runs again on a fresh listing, once.
        Err(SqlError::Execution(message)) if part_went_away(&message) => {
            tracing::debug!(%message, "a part went away during the query; running it again");
            run_once(ctx, query).await
        }
        other => other,
    }
}

async fn run_once(ctx: &SessionContext, query: &str) -> Result<Vec<RecordBatch>, SqlError> {
    let (ctx, query) = (ctx.clone(), query.to_string());
    let mut task = AbortOnDrop(guard::pool()?.spawn(crate::query_bounds::scope(async move {
        let frame = plan(&ctx, &query).await?;
        let task_ctx = Arc::new(frame.task_ctx());
        let plan = frame.create_physical_plan().await.map_err(classify)?;
        let reservation = MemoryConsumer::new("query result").register(task_ctx.memory_pool());
        let mut stream = datafusion::physical_plan::execute_stream(plan, task_ctx).map_err(classify)?;
        let mut batches = Vec::new();
        while let Some(batch) = stream.next().await {
            let batch = batch.map_err(classify)?;
            reservation.try_grow(batch.get_array_memory_size()).map_err(|_| {
                SqlError::Limit("the result is larger than the query memory (query_memory_mib): add a LIMIT or aggregate".into())
            })?;
            batches.push(batch);
        }
        Ok(batches)
    })));
    (&mut task.0).await.map_err(|e| SqlError::Execution(format!("the query failed inside: {e}")))?
}

struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    Table,
    Csv,
    Json,
    /// Arrow IPC stream (HTTP only).
    #[value(skip)]
    Arrow,
}

/// Result batches as text (table, CSV, JSON array of objects) or Arrow IPC stream bytes.
/// Longest cell a table shows, in characters: a table is for reading, and laying out a cell of
/// megabytes takes minutes. CSV, JSON and Arrow carry every value whole.
pub const MAX_TABLE_CELL_CHARS: usize = 1000;

/// A cell's text, up to [`MAX_TABLE_CELL_CHARS`]: writing more fails, so a value of megabytes is
/// never formatted whole.
#[derive(Default)]
struct CappedCell {
    text: String,
    chars: usize,
    cut: bool,
}

impl std::fmt::Write for CappedCell {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        for c in s.chars() {
            if self.chars == MAX_TABLE_CELL_CHARS {
                self.cut = true;
                return Err(std::fmt::Error);
            }
            self.text.push(c);
            self.chars += 1;
        }
        Ok(())
    }
}

/// `batch` with each column that `as_text` writes as text replaced by those cells (a text column of
/// the same name); the others as they are. How the table, CSV and JSON answers make a column they
/// cannot write as it is into one they can.
fn with_text_columns(
    batch: &RecordBatch,
    as_text: impl Fn(&FieldRef, &ArrayRef) -> Result<Option<StringArray>, ArrowError>,
) -> Result<RecordBatch, ArrowError> {
    let schema = batch.schema();
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(batch.num_columns());
    let mut fields = Vec::with_capacity(batch.num_columns());
    for (field, column) in schema.fields().iter().zip(batch.columns()) {
        match as_text(field, column)? {
            Some(text) => {
                columns.push(Arc::new(text));
                fields.push(field.as_ref().clone().with_data_type(DataType::Utf8).with_nullable(true));
            }
            None => {
                columns.push(column.clone());
                fields.push(field.as_ref().clone());
            }
        }
    }
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns)
}

/// Each cell of `column` as Arrow displays it.
fn displayed(column: &ArrayRef) -> Result<StringArray, ArrowError> {
    let shown = ArrayFormatter::try_new(column.as_ref(), &FormatOptions::default())?;
    Ok((0..column.len()).map(|row| column.is_valid(row).then(|| shown.value(row).to_string())).collect())
}

/// `batch` as text columns with long cells cut at [`MAX_TABLE_CELL_CHARS`], saying so.
fn table_cells(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    use std::fmt::Write as _;
    let options = FormatOptions::default();
    with_text_columns(batch, |_, column| {
        let formatter = ArrayFormatter::try_new(column.as_ref(), &options)?;
        let cells = (0..column.len()).map(|row| {
            if column.is_null(row) {
                return None;
            }
            let mut cell = CappedCell::default();
            // An error here only means the cell reached the cap: formatting stops there.
            let _ = write!(cell, "{}", formatter.value(row));
            Some(if cell.cut { format!("{}… (cut at {MAX_TABLE_CELL_CHARS} characters)", cell.text) } else { cell.text })
        });
        Ok(Some(cells.collect()))
    })
}

/// Whether a spreadsheet would read a CSV cell as a formula (OWASP's CSV injection rule).
fn formula_like(cell: &str) -> bool {
    cell.starts_with(['=', '+', '-', '@', '\t', '\r'])
}

/// The batch with every text cell that starts like a formula prefixed with `'`, so that a
/// spreadsheet shows a headline such as `=HYPERLINK(…)` as text instead of running it. Numbers
/// are not text columns and keep their sign.
fn csv_safe(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    use datafusion::arrow::array::AsArray;
    with_text_columns(batch, |field, column| {
        if matches!(field.data_type(), DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) {
            let text = datafusion::arrow::compute::cast(column, &DataType::Utf8)?;
            Ok(Some(text.as_string::<i32>().iter().map(|cell| cell.map(|c| if formula_like(c) { format!("'{c}") } else { c.to_string() })).collect()))
        } else if field.data_type().is_nested() {
            // Arrow's CSV writer has no form for lists, structs or maps (`news.tickers`): their JSON.
            json_cells(field, column).map(Some)
        } else {
            Ok(None)
        }
    })
}

/// Each cell of `column` as its JSON text (`["XOM","CVX"]`, `{"a":1}`); where JSON has no form for
/// the column (a map keyed by numbers or dates), as Arrow displays it.
fn json_cells(field: &FieldRef, column: &ArrayRef) -> Result<StringArray, ArrowError> {
    let options = EncoderOptions::default();
    let Ok(mut encoder) = make_encoder(field, column.as_ref(), &options) else { return displayed(column) };
    Ok((0..column.len())
        .map(|row| {
            column.is_valid(row).then(|| {
                let mut out = Vec::new();
                encoder.encode(row, &mut out);
                String::from_utf8_lossy(&out).into_owned()
            })
        })
        .collect())
}

/// The batch with every column that Arrow's JSON writer cannot write (a map keyed by anything but
/// text) as its displayed text, so that one such column does not fail the whole answer.
fn json_ready(batch: &RecordBatch) -> Result<RecordBatch, ArrowError> {
    let options = EncoderOptions::default();
    with_text_columns(batch, |field, column| match make_encoder(field, column.as_ref(), &options) {
        Ok(_) => Ok(None),
        Err(_) => displayed(column).map(Some),
    })
}

pub fn encode(batches: &[RecordBatch], format: Format) -> Result<Vec<u8>, SqlError> {
    // A value the query made that a format cannot write (a timestamp in a time zone that does not
    // exist, as `from_unixtime(0, 'x')` makes, or past the calendar's range) is the query's to
    // change. Writing into memory, the CSV and JSON writers fail on nothing else.
    let failed = |e: ArrowError| {
        if data_exception(&e) || matches!(e, ArrowError::CsvError(_) | ArrowError::JsonError(_)) {
            SqlError::Data(e.to_string())
        } else {
            SqlError::Execution(e.to_string())
        }
    };
    match format {
        Format::Table => {
            let shown = batches.iter().map(table_cells).collect::<Result<Vec<_>, _>>().map_err(failed)?;
            Ok(datafusion::arrow::util::pretty::pretty_format_batches(&shown).map_err(failed)?.to_string().into_bytes())
        }
        Format::Csv => {
            let mut out = Vec::new();
            let mut writer = datafusion::arrow::csv::WriterBuilder::new().with_header(true).build(&mut out);
            for batch in batches {
                writer.write(&csv_safe(batch).map_err(failed)?).map_err(failed)?;
            }
            drop(writer);
            Ok(out)
        }
        Format::Json => {
            let mut writer = datafusion::arrow::json::ArrayWriter::new(Vec::new());
            for batch in batches {
                writer.write(&json_ready(batch).map_err(failed)?).map_err(failed)?;
            }
            writer.finish().map_err(failed)?;
            let mut out = writer.into_inner();
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
            Ok(out)
        }
        Format::Arrow => {
            let schema = batches.first().map(|b| b.schema()).unwrap_or_else(|| Arc::new(datafusion::arrow::datatypes::Schema::empty()));
            let mut writer = datafusion::arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &schema).map_err(failed)?;
            for batch in batches {
                writer.write(batch).map_err(failed)?;
            }
            writer.finish().map_err(failed)?;
            writer.into_inner().map_err(failed)
        }
    }
}

#[cfg(test)]
mod tests;
