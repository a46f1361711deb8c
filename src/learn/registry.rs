//! Which model serves (DESIGN §10): every version promoted in `models`, and the history of the
//! `champion` alias in `model_aliases`, both append-only journals under `storage.path`.
//! `model promote` is the gate: a candidate whose report shows it worse than the champion beyond its
//! interval (on the frozen set or on the newest feedback) is refused unless `--force` gives a
//! reason, which is recorded. `model rollback` points the alias back at the champion before it.

use std::path::Path;
use std::sync::{Arc, LazyLock};

use arrow::array::{Array, ArrayRef, RecordBatch, StringArray, TimestampMillisecondArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use arrow::error::ArrowError;
use chrono::{DateTime, Utc};
use sha2::Digest;

use super::{LearnError, Report, files};
use crate::classify::ModelSpec;
use crate::storage::{self, Location, Table};

pub const CHAMPION: &str = "champion";
/// The alias of the model scoring the live stream in shadow (`model shadow`); an empty `path`
/// means none.
pub const CHALLENGER: &str = "challenger";

/// A row of `models`.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRow {
    pub model: String,
    /// SHA-256 over the folder's model.onnx, tokenizer.json, labels.json and heads.json (if any).
    pub sha256: String,
    pub parent: Option<String>,
    pub built_at: DateTime<Utc>,
    /// JSON: anchors, feedback labels trained on, the newest one's id and time.
    pub trained_on: String,
    /// JSON: the report's comparisons.
    pub metrics: String,
    pub path: String,
}

/// A row of `model_aliases`: from `set_at` on, `alias` is `model` (in the folder `path`).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct AliasRow {
    pub alias: String,
    pub model: String,
    pub path: String,
    pub set_at: DateTime<Utc>,
    pub set_by: String,
    pub reason: String,
}

fn utc() -> DataType {
    DataType::Timestamp(TimeUnit::Millisecond, Some("UTC".into()))
}

static MODELS: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("model", DataType::Utf8, false),
        Field::new("sha256", DataType::Utf8, false),
        Field::new("parent", DataType::Utf8, true),
        Field::new("built_at", utc(), false),
        Field::new("trained_on", DataType::Utf8, false),
        Field::new("metrics", DataType::Utf8, false),
        Field::new("path", DataType::Utf8, false),
    ]))
});

static ALIASES: LazyLock<SchemaRef> = LazyLock::new(|| {
    Arc::new(Schema::new(vec![
        Field::new("alias", DataType::Utf8, false),
        Field::new("model", DataType::Utf8, false),
        Field::new("path", DataType::Utf8, false),
        Field::new("set_at", utc(), false),
        Field::new("set_by", DataType::Utf8, false),
        Field::new("reason", DataType::Utf8, false),
    ]))
});

pub fn models_schema() -> SchemaRef {
    MODELS.clone()
}

pub fn model_aliases_schema() -> SchemaRef {
    ALIASES.clone()
}

fn text<T>(rows: &[T], f: impl Fn(&T) -> Option<String>) -> ArrayRef {
    Arc::new(StringArray::from_iter(rows.iter().map(f)))
}

fn time<T>(rows: &[T], f: impl Fn(&T) -> DateTime<Utc>) -> ArrayRef {
    Arc::new(TimestampMillisecondArray::from_iter_values(rows.iter().map(|r| f(r).timestamp_millis())).with_timezone("UTC"))
}

fn models_batch(rows: &[ModelRow]) -> Result<RecordBatch, ArrowError> {
    let columns = vec![
        text(rows, |r| Some(r.model.clone())),
        text(rows, |r| Some(r.sha256.clone())),
        text(rows, |r| r.parent.clone()),
        time(rows, |r| r.built_at),
        text(rows, |r| Some(r.trained_on.clone())),
        text(rows, |r| Some(r.metrics.clone())),
        text(rows, |r| Some(r.path.clone())),
    ];
    RecordBatch::try_new(models_schema(), columns)
}

fn aliases_batch(rows: &[AliasRow]) -> Result<RecordBatch, ArrowError> {
    let columns = vec![
        text(rows, |r| Some(r.alias.clone())),
        text(rows, |r| Some(r.model.clone())),
        text(rows, |r| Some(r.path.clone())),
        time(rows, |r| r.set_at),
        text(rows, |r| Some(r.set_by.clone())),
        text(rows, |r| Some(r.reason.clone())),
    ];
    RecordBatch::try_new(model_aliases_schema(), columns)
}

fn append<T>(storage: &Location, table: Table, rows: &[T], batch: fn(&[T]) -> Result<RecordBatch, ArrowError>, unique: &str) -> Result<(), LearnError> {
    let batch = batch(rows).map_err(|e| LearnError::Invalid(e.to_string()))?;
    storage::append(storage, table, &batch, unique)?;
    Ok(())
}

/// SHA-256 over a model folder's files, in a fixed order.
fn folder_hash(dir: &Path) -> Result<String, LearnError> {
    let mut hasher = sha2::Sha256::new();
    for file in ["model.onnx", "tokenizer.json", "labels.json", "heads.json"] {
        let path = dir.join(file);
        if path.exists() {
            hasher.update(std::fs::read(&path).map_err(files(&path))?);
        }
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Held while the champion alias is read, compared with and written: a promote or rollback from
/// another process (the CLI beside a server) waits, so each one compares with the champion it
/// replaces (compare-and-set), not with one read before another promote landed. On object storage
/// the lock is a file in the temp folder named after the URL: it orders the processes of one host.
fn alias_lock(storage: &Location) -> Result<std::fs::File, LearnError> {
    let folder = match storage {
        Location::Local(root) => root.clone(),
        Location::Bucket(bucket) => {
            let digest: String = sha2::Sha256::digest(bucket.url().as_bytes()).iter().take(8).map(|b| format!("{b:02x}")).collect();
            std::env::temp_dir().join(format!("bearwatch-{digest}"))
        }
    };
    std::fs::create_dir_all(&folder).map_err(files(&folder))?;
    let path = folder.join(".model_aliases.lock");
    let file = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&path).map_err(files(&path))?;
    file.lock().map_err(files(&path))?;
    Ok(file)
}

/// Makes the candidate in `dir` the champion, if its report allows it or `force` gives a reason,
/// and only once the folder loads, its outputs match its labels and it reproduces its golden
/// outputs: an alias never names a model that cannot serve. The champion it replaces is read under
/// [`alias_lock`]; when the alias has no history, the report's champion is recorded first, so that
/// a rollback can return to it. Returns the alias row written.
pub fn promote(storage: &Location, dir: &Path, by: &str, force: Option<&str>) -> Result<AliasRow, LearnError> {
    let path = dir.join("report.json");
    let report: Report =
        serde_json::from_str(&std::fs::read_to_string(&path).map_err(files(&path))?).map_err(|e| LearnError::Files { path: path.clone(), reason: e.to_string() })?;
    let cannot_serve = |e: &dyn std::fmt::Display| LearnError::Invalid(format!("{} cannot serve: {e}", dir.display()));
    let spec = ModelSpec::load(dir).map_err(|e| cannot_serve(&e))?;
    if spec.id() != report.candidate {
        return Err(LearnError::Invalid(format!("{}: the folder holds {}, its report is about {}", dir.display(), spec.id(), report.candidate)));
    }
    let serving = crate::classify::ClassifierConfig { device: crate::classify::Device::Cpu, ..crate::classify::ClassifierConfig::default() };
    drop(load_checked(&serving, dir).map_err(|e| cannot_serve(&e))?);
    let _lock = alias_lock(storage)?;
    let history = champion_history(storage)?;
    let current = history.last();
    if let Some(current) = current
        && current.model != report.champion
    {
        return Err(LearnError::Invalid(format!(
            "{} was compared with {}, but the champion is now {}: retrain from the champion (--from {})",
            report.candidate, report.champion, current.model, current.path
        )));
    }
    let worse: Vec<String> = report
        .comparisons
        .iter()
        .filter(|c| c.worse)
        .map(|c| format!("{} {}: {:+.3} ({:+.3} to {:+.3})", c.set, c.head.name(), c.difference, c.difference_95.0, c.difference_95.1))
        .collect();
    let reason = match (worse.is_empty(), force.map(str::trim).filter(|r| !r.is_empty())) {
        (true, None) => "its report: not worse than the champion beyond its interval".to_string(),
        (_, Some(reason)) => format!("forced: {reason}"),
        (false, None) => {
            return Err(LearnError::Refused(format!(
                "{} is worse than {} beyond its interval on {}; promote it anyway only with --force --reason",
                report.candidate,
                report.champion,
                worse.join(", ")
            )));
        }
    };
    let now = Utc::now();
    let dir = std::fs::canonicalize(dir).map_err(files(dir))?;
    if current.is_none() {
        let initial = AliasRow {
            alias: CHAMPION.into(),
            model: report.champion.clone(),
            path: report.from.clone(),
            set_at: now - chrono::Duration::milliseconds(1),
            set_by: by.into(),
            reason: "the champion before the first promotion".into(),
        };
        append(storage, Table::ModelAliases, &[initial], aliases_batch, "initial")?;
    }
    let model = ModelRow {
        model: report.candidate.clone(),
        sha256: folder_hash(&dir)?,
        parent: Some(report.champion.clone()),
        built_at: report.built_at,
        trained_on: serde_json::json!({
            "anchors": report.anchors,
            "feedback": report.feedback_trained,
            "until": report.trained_until,
            "storage": report.storage,
        })
        .to_string(),
        metrics: serde_json::to_string(&report.comparisons).unwrap_or_default(),
        path: dir.display().to_string(),
    };
    append(storage, Table::Models, std::slice::from_ref(&model), models_batch, &model.sha256[..16])?;
    let alias = AliasRow { alias: CHAMPION.into(), model: model.model.clone(), path: model.path.clone(), set_at: now, set_by: by.into(), reason };
    append(storage, Table::ModelAliases, std::slice::from_ref(&alias), aliases_batch, &model.sha256[..16])?;
    tracing::info!(model = %alias.model, by, forced = force.is_some(), "promoted to champion");
    Ok(alias)
}

/// Points the champion alias back at the one before its newest, in one step (under [`alias_lock`]).
pub fn rollback(storage: &Location, by: &str, reason: Option<&str>) -> Result<AliasRow, LearnError> {
    let _lock = alias_lock(storage)?;
    let history = champion_history(storage)?;
    let Some(current) = history.last() else {
        return Err(LearnError::Invalid("nothing to roll back: the champion alias has no history (no model was promoted)".into()));
    };
    let Some(previous) = history.iter().rev().find(|row| row.model != current.model) else {
        return Err(LearnError::Invalid(format!("nothing to roll back to: {} is the only champion there has been", current.model)));
    };
    let row = AliasRow {
        alias: CHAMPION.into(),
        model: previous.model.clone(),
        path: previous.path.clone(),
        set_at: Utc::now(),
        set_by: by.into(),
        reason: format!("rollback from {}{}", current.model, reason.map(|r| format!(": {r}")).unwrap_or_default()),
    };
    append(storage, Table::ModelAliases, std::slice::from_ref(&row), aliases_batch, "rollback")?;
    tracing::info!(from = %current.model, to = %row.model, by, "rolled back");
    Ok(row)
}

/// The `champion` rows of `model_aliases`, oldest first: what the gate compares with.
pub fn champion_history(storage: &Location) -> Result<Vec<AliasRow>, LearnError> {
    alias_history(storage, CHAMPION)
}

/// Runs `dir` in shadow on the live stream of every pipeline on `storage` (`None`: stops the
/// shadow): a `challenger` row of `model_aliases`. Any model folder will do; it is loaded and
/// checked against its golden outputs by the pipeline, as a champion is.
pub fn shadow(storage: &Location, dir: Option<&Path>, by: &str, reason: Option<&str>) -> Result<AliasRow, LearnError> {
    let (model, path) = match dir {
        Some(dir) => (ModelSpec::load(dir)?.id().to_string(), std::fs::canonicalize(dir).map_err(files(dir))?.display().to_string()),
        None => (String::new(), String::new()),
    };
    let row = AliasRow {
        alias: CHALLENGER.into(),
        model,
        path,
        set_at: Utc::now(),
        set_by: by.into(),
        reason: reason.map(str::to_string).unwrap_or_else(|| if dir.is_some() { "shadow".into() } else { "shadow stopped".into() }),
    };
    append(storage, Table::ModelAliases, std::slice::from_ref(&row), aliases_batch, "shadow")?;
    tracing::info!(model = %row.model, by, "challenger set");
    Ok(row)
}

/// The rows of `alias` in `model_aliases`, oldest first, read straight from its files, without a
/// query engine: what a running pipeline checks every second.
pub fn alias_history(storage: &Location, alias: &str) -> Result<Vec<AliasRow>, LearnError> {
    let table = Table::ModelAliases.name();
    let unreadable = |name: &str| {
        let path = std::path::PathBuf::from(format!("{storage}/{table}/{name}"));
        move |reason: String| LearnError::Files { path, reason }
    };
    let files = storage::journal_files(storage, Table::ModelAliases).map_err(|e| unreadable("")(e.to_string()))?;
    let mut rows = Vec::new();
    for name in files {
        for batch in storage::read_journal(storage, Table::ModelAliases, &name).map_err(|e| unreadable(&name)(e.to_string()))? {
            rows.extend(alias_rows(&batch).map_err(unreadable(&name))?);
        }
    }
    rows.retain(|r| r.alias == alias);
    rows.sort_by_key(|r| r.set_at);
    Ok(rows)
}

fn alias_rows(batch: &RecordBatch) -> Result<Vec<AliasRow>, String> {
    let text = |name: &str| -> Result<&StringArray, String> {
        batch.column_by_name(name).and_then(|c| c.as_any().downcast_ref::<StringArray>()).ok_or(format!("no text column `{name}`"))
    };
    let (alias, model, dir, by, reason) = (text("alias")?, text("model")?, text("path")?, text("set_by")?, text("reason")?);
    let set_at = batch
        .column_by_name("set_at")
        .and_then(|c| c.as_any().downcast_ref::<TimestampMillisecondArray>())
        .ok_or("no timestamp column `set_at`")?;
    Ok((0..batch.num_rows())
        .map(|i| AliasRow {
            alias: alias.value(i).into(),
            model: model.value(i).into(),
            path: dir.value(i).into(),
            set_at: DateTime::from_timestamp_millis(set_at.value(i)).unwrap_or_default(),
            set_by: by.value(i).into(),
            reason: if reason.is_null(i) { String::new() } else { reason.value(i).into() },
        })
        .collect())
}

/// Loads the model folder `dir` with the `[model]` settings of `config` and checks it against its
/// golden outputs ([`check_golden`]): what a pipeline does before a model serves or shadows.
pub fn load_checked(config: &crate::classify::ClassifierConfig, dir: &Path) -> Result<crate::classify::Classifier, LearnError> {
    let config = crate::classify::ClassifierConfig { path: Some(dir.to_path_buf()), ..config.clone() };
    let classifier = crate::classify::Classifier::start(&config)?;
    check_golden(&classifier, dir)?;
    Ok(classifier)
}

/// The outputs a candidate must reproduce when loaded (`golden.jsonl`, written by `retrain`).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Golden {
    pub text: String,
    pub sentiment: [f32; 3],
}

/// Classifies `golden.jsonl`'s texts (a warm-up in any case) and checks each sentiment probability
/// within 1e-3 of what retrain computed; a folder without the file (the bundled model) is warmed up
/// only.
pub fn check_golden(classifier: &crate::classify::Classifier, dir: &Path) -> Result<(), LearnError> {
    let path = dir.join("golden.jsonl");
    let golden: Vec<Golden> = match std::fs::read_to_string(&path) {
        Ok(text) => text
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| serde_json::from_str(l).map_err(|e| LearnError::Files { path: path.clone(), reason: e.to_string() }))
            .collect::<Result<_, _>>()?,
        Err(_) => vec![Golden { text: "Warm-up: shares rise".into(), sentiment: [f32::NAN; 3] }],
    };
    for g in &golden {
        let scores = classifier.submit_now(&g.text)?.wait()?;
        let got = [scores.p_negative, scores.p_neutral, scores.p_positive];
        if g.sentiment.iter().zip(&got).any(|(want, got)| !want.is_nan() && (want - got).abs() > 1e-3) {
            return Err(LearnError::Invalid(format!("{}: {:?} scored {got:?}, its golden output says {:?}", dir.display(), g.text, g.sentiment)));
        }
    }
    Ok(())
}
