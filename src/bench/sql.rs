//! `bearwatch bench sql`: five representative queries over a large `news` table, timed with
//! bearwatch's SQL engine and, side by side in the same run, with DuckDB on the same Parquet files.
//!
//! The table is written by bearwatch's own storage code (same schema, compression and part layout
//! as a pipeline writes), from real Reuters headlines with synthetic scores, so that string columns
//! look like real ones. DuckDB runs in a Python worker (`benches/duckdb_sql.py`) that answers one
//! query per request; each round times every query on both engines back to back, so the machine's
//! drift hits both alike. Both engines must agree on each answer (row count and the sum of its
//! numeric cells) or the run fails: a fast wrong answer is not a result.

use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::datatypes::{DataType, Float64Type};

use crate::classify::news_batch;
use crate::news::{News, ScoredNews, Scores};
use crate::rng::Lcg;
use crate::sql::{self, SqlError};
use crate::storage::{Storage, Table};

#[derive(Debug, Clone, clap::Args)]
pub struct SqlBenchArgs {
    /// Rows in the generated `news` table.
    #[arg(long, default_value_t = 10_000_000)]
    pub rows: usize,
    /// Where the table is generated (reused when it already holds `--rows` rows).
    #[arg(long, default_value = "target/bench-sql")]
    pub dir: PathBuf,
    /// Timed rounds, after one untimed warm-up round.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Python interpreter with `duckdb` (pip install -r benches/requirements.txt).
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: PathBuf,
    /// Real headlines to draw from (JSON lines with a `headline` field).
    #[arg(long, default_value = "pipelines/data/reuters-1987.jsonl")]
    pub headlines: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum SqlBenchError {
    #[error("cannot prepare the table under {path}: {reason}")]
    Data { path: PathBuf, reason: String },
    #[error(transparent)]
    Sql(#[from] SqlError),
    #[error("duckdb worker: {0}")]
    DuckDb(String),
    #[error("engines disagree on query {query}: bearwatch {ours}, duckdb {theirs}")]
    Disagree { query: &'static str, ours: String, theirs: String },
}

/// The five queries: what dashboards and analysts ask of `news` (docs/SQL.md has more).
pub const QUERIES: [(&str, &str); 5] = [
    (
        "per-topic summary (full scan, group by)",
        "SELECT topic, count(*) AS stories, avg(p_negative) AS mean_p_negative, \
         sum(CASE WHEN sentiment = 'negative' THEN 1 ELSE 0 END) AS negative \
         FROM news GROUP BY topic ORDER BY topic",
    ),
    (
        "daily negative share per topic (date_trunc)",
        "SELECT topic, date_trunc('day', published_at) AS day, count(*) AS stories, \
         avg(CASE WHEN sentiment = 'negative' THEN 1.0 ELSE 0.0 END) AS neg_share \
         FROM news GROUP BY 1, 2 ORDER BY 1, 2",
    ),
    (
        "most negative headlines of one day (filter, top-k)",
        "SELECT published_at, topic, headline, p_negative FROM news \
         WHERE published_at >= '2026-06-01T00:00:00Z' AND published_at < '2026-06-02T00:00:00Z' \
         ORDER BY p_negative DESC, id LIMIT 20",
    ),
    (
        "negative stories per ticker (unnest, group by)",
        "SELECT ticker, count(*) AS negative FROM \
         (SELECT unnest(tickers) AS ticker FROM news WHERE sentiment = 'negative') AS t \
         GROUP BY ticker ORDER BY negative DESC, ticker LIMIT 10",
    ),
    (
        "rolling 7-day z-score per topic (window functions)",
        "WITH daily AS (SELECT topic, date_trunc('day', published_at) AS day, \
         avg(CASE WHEN sentiment = 'negative' THEN 1.0 ELSE 0.0 END) AS neg_share FROM news GROUP BY 1, 2), \
         scored AS (SELECT topic, day, neg_share, \
         avg(neg_share) OVER (PARTITION BY topic ORDER BY day ROWS BETWEEN 7 PRECEDING AND 1 PRECEDING) AS mean7, \
         stddev(neg_share) OVER (PARTITION BY topic ORDER BY day ROWS BETWEEN 7 PRECEDING AND 1 PRECEDING) AS sd7 \
         FROM daily) \
         SELECT topic, day, neg_share, (neg_share - mean7) / sd7 AS z FROM scored \
         WHERE sd7 > 0 ORDER BY z DESC, topic LIMIT 10",
    ),
];

const TOPICS: [&str; 12] = [
    "earnings", "energy", "macro", "metals", "agriculture", "banking", "tech", "retail", "m&a", "bonds", "fx", "shipping",
];
const SOURCES: [&str; 6] = ["reuters", "bloomberg", "dowjones", "ft", "wsj", "pr-newswire"];
/// 2026-01-01T00:00:00Z; the table spans 2026, one story every ~3 s at 10 M rows.
const YEAR_START_MS: i64 = 1_767_225_600_000;
const YEAR_MS: i64 = 365 * 24 * 3_600_000;
const ROWS_PER_PART: usize = 1_000_000;

fn data_error(path: &Path) -> impl Fn(String) -> SqlBenchError + '_ {
    move |reason| SqlBenchError::Data { path: path.to_path_buf(), reason }
}

/// Writes `rows` stories as `news` parts under `dir`, unless a previous run left exactly that.
fn prepare(args: &SqlBenchArgs) -> Result<(), SqlBenchError> {
    let marker = args.dir.join("rows");
    if std::fs::read_to_string(&marker).ok().and_then(|s| s.trim().parse::<usize>().ok()) == Some(args.rows) {
        return Ok(());
    }
    let failed = data_error(&args.dir);
    let text = std::fs::read_to_string(&args.headlines).map_err(|e| data_error(&args.headlines)(e.to_string()))?;
    let headlines: Vec<String> = text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok()?.get("headline")?.as_str().map(str::to_string))
        .collect();
    if headlines.is_empty() {
        return Err(data_error(&args.headlines)("no headlines".into()));
    }
    let tickers: Vec<String> = (0..300).map(|i| format!("T{i:03}")).collect();
    let model: Arc<str> = Arc::from("synthetic@1");
    let (mut storage, _) = Storage::open::<serde::de::IgnoredAny>(&args.dir.as_path().into(), None, true).map_err(|e| failed(e.to_string()))?;
    let mut rng = Lcg(42);
    let step = YEAR_MS / args.rows.max(1) as i64;
    let mut start = 0;
    while start < args.rows {
        let end = (start + ROWS_PER_PART).min(args.rows);
        let rows: Vec<ScoredNews> = (start..end)
            .map(|i| {
                let published_ms = YEAR_START_MS + i as i64 * step;
                let topic = *rng.pick(&TOPICS);
                // Sentiment drifts by topic and season, so windows and z-scores have something to find.
                // 6.28, not TAU: the published SQL numbers were measured on the data this writes.
                #[allow(clippy::approx_constant)]
                let season = ((published_ms - YEAR_START_MS) as f64 / YEAR_MS as f64 * 6.28 * 4.0).sin() * 0.15;
                let p_negative = ((rng.next_f64() * 0.9 + season).clamp(0.001, 0.99)) as f32;
                let p_positive = (1.0 - p_negative) * rng.next_f64() as f32;
                let p_neutral = 1.0 - p_negative - p_positive;
                let sentiment = crate::classify::sentiment_label(&[p_negative, p_neutral, p_positive]);
                let n_tickers = (rng.next_f64() * 3.0) as usize;
                let published_at = chrono::DateTime::from_timestamp_millis(published_ms)
                    .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
                    .unwrap_or_default();
                ScoredNews {
                    news: News {
                        id: format!("n{i:09}"),
                        published_at,
                        headline: rng.pick(&headlines).clone(),
                        body: None,
                        source: Some(rng.pick(&SOURCES).to_string()),
                        tickers: (n_tickers > 0).then(|| (0..n_tickers).map(|_| rng.pick(&tickers).clone()).collect()),
                        url: None,
                        lang: Some("en".into()),
                        extra: Default::default(),
                    },
                    scores: Scores {
                        topic: topic.to_string(),
                        topic_score: 0.5 + rng.next_f64() as f32 * 0.5,
                        sentiment,
                        p_negative,
                        p_neutral,
                        p_positive,
                        sentiment_score: p_positive - p_negative,
                        model: model.clone(),
                    },
                    ingested_at: String::new(),
                    kafka_partition: Some((i % 6) as i32),
                    kafka_offset: Some((i / 6) as i64),
                    published_ms,
                    ingested_ms: published_ms + 1_500,
                }
            })
            .collect();
        let batch = news_batch(&rows).map_err(|e| failed(e.to_string()))?;
        storage.write(Table::News, &batch).map_err(|e| failed(e.to_string()))?;
        start = end;
    }
    // Parts are seen once a checkpoint commits them.
    storage.commit(&serde_json::json!({})).map_err(|e| failed(e.to_string()))?;
    std::fs::write(&marker, args.rows.to_string()).map_err(|e| failed(e.to_string()))?;
    Ok(())
}

/// What both engines must agree on.
#[derive(Debug, Clone, Copy)]
struct Answer {
    rows: usize,
    /// Sum of every numeric cell.
    checksum: f64,
}

impl Answer {
    fn agrees(&self, other: &Answer) -> bool {
        let scale = self.checksum.abs().max(other.checksum.abs()).max(1.0);
        self.rows == other.rows && (self.checksum - other.checksum).abs() / scale < 1e-6
    }
}

fn answer(batches: &[RecordBatch]) -> Result<Answer, SqlBenchError> {
    let mut checksum = 0.0;
    for batch in batches {
        for column in batch.columns() {
            if column.data_type().is_numeric() {
                let cast = datafusion::arrow::compute::cast(column, &DataType::Float64)
                    .map_err(|e| SqlBenchError::Sql(SqlError::Execution(e.to_string())))?;
                checksum += cast.as_primitive::<Float64Type>().iter().flatten().sum::<f64>();
            }
        }
    }
    Ok(Answer { rows: batches.iter().map(|b| b.num_rows()).sum(), checksum })
}

/// The DuckDB side: one Python process, one connection, one query per line of JSON.
struct DuckDb {
    child: Child,
    input: ChildStdin,
    output: BufReader<ChildStdout>,
    version: String,
    threads: String,
}

impl DuckDb {
    fn start(python: &Path, dir: &Path) -> Result<DuckDb, SqlBenchError> {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/duckdb_sql.py");
        let mut child = Command::new(python)
            .arg(&script)
            .arg(dir.join("news"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| SqlBenchError::DuckDb(format!("cannot start {}: {e}", python.display())))?;
        let input = child.stdin.take().ok_or_else(|| SqlBenchError::DuckDb("no stdin".into()))?;
        let output = BufReader::new(child.stdout.take().ok_or_else(|| SqlBenchError::DuckDb("no stdout".into()))?);
        let mut duck = DuckDb { child, input, output, version: String::new(), threads: String::new() };
        let hello = duck.read()?;
        duck.version = hello["duckdb"].as_str().unwrap_or("?").to_string();
        duck.threads = hello["threads"].to_string();
        Ok(duck)
    }

    fn read(&mut self) -> Result<serde_json::Value, SqlBenchError> {
        let mut line = String::new();
        self.output.read_line(&mut line).map_err(|e| SqlBenchError::DuckDb(e.to_string()))?;
        if line.is_empty() {
            return Err(SqlBenchError::DuckDb("worker exited (is duckdb installed? pip install -r benches/requirements.txt)".into()));
        }
        let value: serde_json::Value = serde_json::from_str(&line).map_err(|e| SqlBenchError::DuckDb(format!("{e}: {line}")))?;
        match value.get("error") {
            Some(error) => Err(SqlBenchError::DuckDb(error.to_string())),
            None => Ok(value),
        }
    }

    fn run(&mut self, query: &str) -> Result<(Duration, Answer), SqlBenchError> {
        let request = serde_json::json!({ "query": query }).to_string();
        writeln!(self.input, "{request}").and_then(|_| self.input.flush()).map_err(|e| SqlBenchError::DuckDb(e.to_string()))?;
        let reply = self.read()?;
        let seconds = reply["seconds"].as_f64().unwrap_or(f64::NAN);
        let answer = Answer { rows: reply["rows"].as_u64().unwrap_or(0) as usize, checksum: reply["checksum"].as_f64().unwrap_or(f64::NAN) };
        Ok((Duration::from_secs_f64(seconds), answer))
    }
}

impl Drop for DuckDb {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    match values.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => values[n / 2],
        n => (values[n / 2 - 1] + values[n / 2]) / 2.0,
    }
}

/// Runs the benchmark and returns the report as a Markdown table.
pub fn run(args: &SqlBenchArgs) -> Result<String, SqlBenchError> {
    let started = Instant::now();
    prepare(args)?;
    let prepared = started.elapsed();
    let bytes: u64 = std::fs::read_dir(args.dir.join("news"))
        .map_err(|e| data_error(&args.dir)(e.to_string()))?
        .filter_map(|e| e.ok()?.metadata().ok())
        .map(|m| m.len())
        .sum();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| data_error(&args.dir)(e.to_string()))?;
    // The limits a server runs queries under by default.
    let limits = crate::server::ServerConfig::default().query_limits();
    let ctx = sql::context(&args.dir.as_path().into(), limits, None)?;
    let partitions = ctx.state().config().target_partitions();
    let mut duck = DuckDb::start(&args.python, &args.dir)?;

    let mut ours: Vec<Vec<f64>> = vec![Vec::new(); QUERIES.len()];
    let mut theirs: Vec<Vec<f64>> = vec![Vec::new(); QUERIES.len()];
    for round in 0..=args.repeats {
        for (index, (name, query)) in QUERIES.iter().enumerate() {
            let clock = Instant::now();
            let batches = runtime.block_on(sql::run(&ctx, query))?;
            let our_time = clock.elapsed();
            let (their_time, their_answer) = duck.run(query)?;
            let our_answer = answer(&batches)?;
            if !our_answer.agrees(&their_answer) {
                return Err(SqlBenchError::Disagree { query: name, ours: format!("{our_answer:?}"), theirs: format!("{their_answer:?}") });
            }
            if round > 0 {
                ours[index].push(our_time.as_secs_f64());
                theirs[index].push(their_time.as_secs_f64());
            }
        }
    }

    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} rows of `news` in {} Parquet parts ({:.0} MiB, snappy) under {}; generated in {:.0} s (0 s when reused)",
        args.rows,
        args.rows.div_ceil(ROWS_PER_PART),
        bytes as f64 / (1 << 20) as f64,
        args.dir.display(),
        prepared.as_secs_f64()
    );
    let _ = writeln!(
        out,
        "bearwatch: DataFusion {}, {partitions} partitions, {} MiB query memory; DuckDB {} ({} threads); median of {} timed rounds after 1 warm-up\n",
        datafusion::DATAFUSION_VERSION,
        limits.memory_bytes >> 20,
        duck.version,
        duck.threads,
        args.repeats
    );
    let _ = writeln!(out, "| query | bearwatch ms | DuckDB ms | bearwatch / DuckDB | goal ≤ 1.5× |");
    let _ = writeln!(out, "|---|---:|---:|---:|---|");
    for (index, (name, _)) in QUERIES.iter().enumerate() {
        let mut ratios: Vec<f64> = ours[index].iter().zip(&theirs[index]).map(|(a, b)| a / b).collect();
        let ratio = median(&mut ratios);
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.0} | {:.2}× | {} |",
            name,
            median(&mut ours[index]) * 1e3,
            median(&mut theirs[index]) * 1e3,
            ratio,
            if ratio <= 1.5 { "met" } else { "not met" }
        );
    }
    let _ = writeln!(out, "\nTimes are plan + execute + collect the whole answer, for both engines; the ratio is the median of per-round ratios.");
    Ok(out)
}
