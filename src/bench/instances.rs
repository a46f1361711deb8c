//! `bearwatch bench instances`: the dashboard's queries over two aggregate instances' tables on
//! object storage, against the same rows in one local folder.
//!
//! The rows are a pipeline's own: the bundled Reuters stories (repeated with new ids, each repetition
//! two weeks later) replayed through the windows and the shipped rules into a local folder. They are
//! then split by topic between instances `a` and `b` under `--object-store`, as two aggregate
//! instances that own whole topics write them (`<table>/instance=<name>/`, one checkpoint each),
//! part for part. Each round times every query once per side, back to back, with a new SQL context
//! per query as the HTTP server makes one per request; both sides must give the same answer.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Instant;

use datafusion::arrow::array::{Array, AsArray, RecordBatch};
use datafusion::arrow::compute::filter_record_batch;

use super::{failed, median, reuters};
use crate::pipeline::{PipelineConfig, PipelineError};
use crate::sql::{self, Format};
use crate::storage::{Location, S3Config, Storage, Table};

#[derive(Debug, Clone, clap::Args)]
pub struct InstancesBenchArgs {
    /// Where the two instances' tables go: `s3://bucket/prefix` (the client from AWS_ENDPOINT_URL,
    /// AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
    #[arg(long)]
    pub object_store: String,
    /// Stories replayed (the bundled ones repeated with new ids).
    #[arg(long, default_value_t = 12_000)]
    pub stories: usize,
    /// Timed rounds, after one untimed warm-up round.
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// The local folder (reused when it already holds the stories).
    #[arg(long, default_value = "target/bench-instances")]
    pub dir: PathBuf,
    #[arg(long, default_value = "pipelines/data/reuters-1987.jsonl")]
    pub input: PathBuf,
}

/// The dashboard's queries in its default view (no topic, no time range), as
/// src/server/dashboard.html sends them.
const QUERIES: [(&str, &str); 7] = [
    (
        "chart: windows",
        "WITH latest AS (
           SELECT topic, window_start, window_end, neg_share, n, n_negative, coalesce(copies, 0) AS copies,
                  row_number() OVER (PARTITION BY topic, window_start ORDER BY updated_at DESC, n DESC) AS r
           FROM windows WHERE ticker IS NULL AND topic <> 'all'),
         busiest AS (SELECT topic FROM latest WHERE r = 1 GROUP BY topic ORDER BY sum(n) DESC LIMIT 6)
         SELECT topic, window_start, window_end, neg_share, n, n_negative, copies FROM latest
         WHERE r = 1 AND topic IN (SELECT topic FROM busiest)
         UNION ALL
         SELECT 'all' AS topic, window_start, max(window_end) AS window_end, CAST(sum(n_negative) AS DOUBLE) / sum(n) AS neg_share,
                sum(n) AS n, sum(n_negative) AS n_negative, sum(copies) AS copies
         FROM latest WHERE r = 1 GROUP BY window_start
         ORDER BY topic, window_start",
    ),
    (
        "alerts",
        "SELECT f.alert_id, f.rule, f.severity, f.topic, f.ticker, f.started_at, f.window_start, f.window_end, f.value, f.baseline,
                f.threshold, f.count, f.summary, f.top_headlines, l.state, l.resolved_at
         FROM (SELECT *, row_number() OVER (PARTITION BY alert_id ORDER BY recorded_at DESC) AS r FROM alerts WHERE state = 'firing') f
         JOIN (SELECT alert_id, state, resolved_at, row_number() OVER (PARTITION BY alert_id ORDER BY recorded_at DESC) AS r FROM alerts) l
           ON f.alert_id = l.alert_id AND l.r = 1
         WHERE f.r = 1
         ORDER BY CASE WHEN l.state = 'firing' THEN 0 ELSE 1 END, f.started_at DESC LIMIT 20",
    ),
    ("changes", "SELECT recorded_at, rule, state, topic, value FROM alerts ORDER BY recorded_at DESC LIMIT 10"),
    (
        "spans",
        "SELECT alert_id, rule, topic, min(started_at) AS started_at, max(resolved_at) AS resolved_at FROM alerts
         WHERE ticker IS NULL GROUP BY alert_id, rule, topic ORDER BY started_at DESC LIMIT 500",
    ),
    ("headlines", "SELECT id, published_at, topic, sentiment, p_negative, headline FROM news ORDER BY ingested_at DESC, published_at DESC, id LIMIT 15"),
    ("totals", "SELECT count(*) AS stories, max(published_at) AS latest FROM news"),
    ("topics", "SELECT DISTINCT topic FROM windows WHERE ticker IS NULL AND topic <> 'all' ORDER BY topic"),
];

/// Replays the stories into `dir` (unless it holds them already).
fn replay(args: &InstancesBenchArgs) -> Result<(), PipelineError> {
    let local = Location::from(args.dir.as_path());
    let done = crate::storage::checkpoint(&local, None)?
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|c| c["counters"]["received"].as_u64() == Some(args.stories as u64));
    if done {
        return Ok(());
    }
    let base = reuters(&args.input)?;
    let fortnight = chrono::Duration::days(15);
    let mut lines = String::new();
    for i in 0..args.stories {
        let mut story = base[i % base.len()].clone();
        let round = (i / base.len()) as i32;
        story.id = format!("{}-{round}", story.id);
        let published = chrono::DateTime::parse_from_rfc3339(&story.published_at).map_err(failed)?;
        story.published_at = (published + fortnight * round).to_rfc3339();
        lines.push_str(&serde_json::to_string(&story).map_err(failed)?);
        lines.push('\n');
    }
    std::fs::create_dir_all(&args.dir).map_err(failed)?;
    let input = args.dir.join("stories.jsonl");
    std::fs::write(&input, lines).map_err(failed)?;
    let text = format!(
        "[source]\ntype = \"file\"\npath = \"{}\"\nspeed = 0\n[window]\nsize = \"4h\"\nslide = \"1h\"\nallowed_lateness = \"1h\"\n\
         [storage]\npath = \"{}\"\ncheckpoint_interval = \"2s\"\nreset_on_start = true\n[run]\nsummary_interval = \"0s\"\n\
         [alerts]\nrules = [\"alerts/default.toml\"]\n[[receivers]]\nname = \"log\"\ntype = \"log\"\n",
        input.display(),
        args.dir.display()
    );
    let config = PipelineConfig::parse(&text, "bench instances")?;
    crate::pipeline::run(&config, Arc::new(AtomicBool::new(false)), Default::default())?;
    Ok(())
}

/// Copies every checkpointed table's parts to `remote` as instances `a` and `b`, each topic's rows
/// to one of them; returns how many parts went there.
fn split(dir: &Path, remote: &Location) -> Result<usize, PipelineError> {
    let (mut a, _) = Storage::open::<serde::de::IgnoredAny>(remote, Some("a"), true)?;
    let (mut b, _) = Storage::open::<serde::de::IgnoredAny>(remote, Some("b"), true)?;
    let mut parts = 0;
    for table in Table::CHECKPOINTED {
        let mut files: Vec<PathBuf> = match std::fs::read_dir(dir.join(table.name())) {
            Ok(entries) => entries.filter_map(Result::ok).map(|e| e.path()).filter(|p| p.extension().is_some_and(|x| x == "parquet")).collect(),
            Err(_) => continue,
        };
        files.sort();
        for file in files {
            let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(&file).map_err(failed)?)
                .and_then(|b| b.build())
                .map_err(failed)?;
            for batch in reader {
                let batch = batch.map_err(failed)?;
                let (to_a, to_b) = by_topic(&batch)?;
                for (storage, rows) in [(&mut a, to_a), (&mut b, to_b)] {
                    if rows.num_rows() > 0 {
                        storage.write(table, &rows)?;
                        parts += 1;
                    }
                }
            }
        }
    }
    a.commit(&serde_json::json!({}))?;
    b.commit(&serde_json::json!({}))?;
    Ok(parts)
}

/// The rows whose topic hashes even, and the rest (all to the first without a `topic` column).
fn by_topic(batch: &RecordBatch) -> Result<(RecordBatch, RecordBatch), PipelineError> {
    let Some(topics) = batch.column_by_name("topic") else { return Ok((batch.clone(), batch.slice(0, 0))) };
    let topics = topics.as_string_opt::<i32>().ok_or_else(|| failed("topic is not text"))?;
    let even: datafusion::arrow::array::BooleanArray =
        (0..topics.len()).map(|i| Some(topics.is_null(i) || topics.value(i).bytes().map(u32::from).sum::<u32>() % 2 == 0)).collect();
    let odd = datafusion::arrow::compute::not(&even).map_err(failed)?;
    Ok((filter_record_batch(batch, &even).map_err(failed)?, filter_record_batch(batch, &odd).map_err(failed)?))
}

/// One query on a fresh context: milliseconds and the answer's rows, sorted (as CSV lines).
async fn timed(location: &Location, query: &str) -> Result<(f64, Vec<String>), PipelineError> {
    let limits = crate::server::ServerConfig::default().query_limits();
    let started = Instant::now();
    let ctx = sql::context(location, limits, None)?;
    let batches = sql::run(&ctx, query).await?;
    let ms = started.elapsed().as_secs_f64() * 1000.0;
    let text = String::from_utf8(sql::encode(&batches, Format::Csv)?).map_err(failed)?;
    let mut rows: Vec<String> = text.lines().map(str::to_string).collect();
    rows.sort();
    Ok((ms, rows))
}

pub fn run(args: &InstancesBenchArgs) -> Result<String, PipelineError> {
    replay(args)?;
    let local = Location::from(args.dir.as_path());
    let remote = Location::parse(&args.object_store, &S3Config::default())?;
    let written = split(&args.dir, &remote)?;
    // What the queries open: after the writers' merges (the pipeline's during its run, the
    // instances' when they stop).
    let (local_files, remote_files) = (crate::storage::visible_parts(&local)?, crate::storage::visible_parts(&remote)?);
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(failed)?;
    // Per query: the local folder, then the bucket listing its tables afresh (as the first query of
    // a refresh does), then again within a second (as the others of that refresh do).
    let mut times: Vec<[Vec<f64>; 3]> = vec![Default::default(); QUERIES.len()];
    let mut refresh: (Vec<f64>, Vec<f64>) = (Vec::new(), Vec::new());
    let mut answers = Vec::new();
    let forget = || {
        if let Location::Bucket(bucket) = &remote {
            bucket.forget_listings();
        }
    };
    for round in 0..=args.repeats {
        // A dashboard refresh: the seven queries at once, as the page sends them (the bucket's
        // listings afresh: refreshes come seconds apart).
        forget();
        for (location, sink) in [(&local, &mut refresh.0), (&remote, &mut refresh.1)] {
            let started = Instant::now();
            let all = runtime.block_on(futures::future::join_all(QUERIES.iter().map(|(_, q)| timed(location, q))));
            all.into_iter().collect::<Result<Vec<_>, _>>()?;
            if round > 0 {
                sink.push(started.elapsed().as_secs_f64() * 1000.0);
            }
        }
        for (i, (name, query)) in QUERIES.iter().enumerate() {
            let (local_ms, local_rows) = runtime.block_on(timed(&local, query))?;
            forget();
            let (afresh_ms, remote_rows) = runtime.block_on(timed(&remote, query))?;
            let (reused_ms, _) = runtime.block_on(timed(&remote, query))?;
            if local_rows != remote_rows {
                return Err(failed(format!("{name}: the instances' answer differs from the local one ({} rows against {})", remote_rows.len(), local_rows.len())));
            }
            if round == 0 {
                answers.push(local_rows.len().saturating_sub(1));
            } else {
                for (sink, ms) in times[i].iter_mut().zip([local_ms, afresh_ms, reused_ms]) {
                    sink.push(ms);
                }
            }
        }
    }
    let stored = runtime.block_on(timed(&local, "SELECT count(*) AS n FROM news"))?.1;
    let stored = stored.iter().find(|row| *row != "n").map_or("?", String::as_str);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} stories ({} in `news`), the dashboard's queries in its default view, a new SQL context per query; median of {} rounds after 1 warm-up\n\
         local: one pipeline's folder {} ({local_files} files); object storage: the same rows split by topic into instances a and b under {} ({written} parts written, {remote_files} files after merging)\n",
        args.stories,
        stored,
        args.repeats,
        args.dir.display(),
        args.object_store
    );
    let _ = writeln!(
        out,
        "| query | rows | one local instance, ms | two instances on object storage, listing afresh, ms | ratio | listing of the last second, ms | ratio | goal ≤ 1.5× |\n|---|---:|---:|---:|---:|---:|---:|---|"
    );
    let mut ratios = Vec::new();
    for (((name, _), [local_ms, afresh_ms, reused_ms]), rows) in QUERIES.iter().zip(times.iter_mut()).zip(&answers) {
        let (l, a, r) = (median(local_ms), median(afresh_ms), median(reused_ms));
        ratios.push(a / l);
        let _ = writeln!(out, "| {name} | {rows} | {l:.1} | {a:.1} | {:.2}× | {r:.1} | {:.2}× | {} |", a / l, r / l, if a / l <= 1.5 { "met" } else { "not met" });
    }
    let (l, r) = (median(&mut refresh.0), median(&mut refresh.1));
    let _ = writeln!(out, "| **a dashboard refresh** (all seven at once) | | {l:.1} | {r:.1} | {:.2}× | | | {} |", r / l, if r / l <= 1.5 { "met" } else { "not met" });
    let worst = ratios.iter().copied().fold(0.0, f64::max);
    let _ = writeln!(out, "\nWorst single query (listing afresh) {worst:.2}×: {}.", if worst <= 1.5 { "met" } else { "not met" });
    Ok(out)
}
