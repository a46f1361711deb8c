//! Parquet tables under `storage.path` and the checkpoint that makes them exactly-once.
//!
//! Storage knows tables and checkpoints, not the stages that fill them: a caller hands it record
//! batches for a [`Table`] and its own serialisable state for the checkpoint.
//!
//! Layout: `<path>/<table>/part-<seq>.parquet` for every [`Table`], and `<path>/checkpoint.json`. Files are written only at a checkpoint, each to a temp name, fsynced and
//! renamed; the checkpoint written right after records the next sequence number of every table. A
//! crash between the two leaves parts numbered at or past the checkpoint's: on start they are deleted,
//! and the stories in them are read again from the checkpointed offsets. So no row is lost or doubled.
//!
//! Journal tables (what people tell bearwatch: [`Table::JOURNALS`]) are outside the checkpoint: any
//! process may [`append`] to them at any time, one file per append, and nothing ever deletes them,
//! not even `--reset` (that restarts the pipeline, not people's work).

mod config;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub use config::StorageConfig;

use crate::error::{Classified, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("cannot write Parquet file {path}: {reason}")]
    Parquet { path: PathBuf, reason: String },
    #[error("checkpoint {path} is unreadable ({reason}); move it away to start from scratch")]
    CorruptCheckpoint { path: PathBuf, reason: String },
    #[error(
        "storage {root} is damaged: {}. Restore these files from a backup, or run `bearwatch storage repair --storage {root}` \
         to set them aside (their rows are then lost) and start again",
        damage.join("; ")
    )]
    Damaged { root: String, damage: Vec<String> },
}

impl Classified for StorageError {
    fn class(&self) -> ErrorClass {
        match self {
            StorageError::Io { .. } | StorageError::CorruptCheckpoint { .. } | StorageError::Damaged { .. } => ErrorClass::External,
            StorageError::Parquet { .. } => ErrorClass::Internal,
        }
    }
    fn retryable(&self) -> bool {
        matches!(self, StorageError::Io { .. })
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> StorageError + '_ {
    move |e| StorageError::Io { path: path.to_path_buf(), reason: e.to_string() }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Table {
    News,
    Windows,
    /// Side output: scored stories that arrived after all their windows had closed.
    Late,
    /// Every state change of every alert.
    Alerts,
    /// Every status change of every notification.
    Notifications,
    /// Which stories count an analyst's label instead of the model's, and why.
    AppliedLabels,
    /// A challenger's scores of the stories the champion scored (`model shadow`); the `news` columns.
    ShadowNews,
    /// Journal: analysts' label confirmations and corrections.
    LabelFeedback,
    /// Journal: analysts' verdicts on alerts.
    AlertVerdicts,
    /// Journal: events analysts say bearwatch should have alerted on.
    MissedEvents,
    /// Journal: every model version promoted.
    Models,
    /// Journal: which model each alias (`champion`) named, from when, by whom and why.
    ModelAliases,
}

impl Table {
    pub const ALL: [Table; 12] = [
        Table::News,
        Table::Windows,
        Table::Late,
        Table::Alerts,
        Table::Notifications,
        Table::AppliedLabels,
        Table::ShadowNews,
        Table::LabelFeedback,
        Table::AlertVerdicts,
        Table::MissedEvents,
        Table::Models,
        Table::ModelAliases,
    ];
    /// The tables the pipeline writes at its checkpoints.
    pub const CHECKPOINTED: [Table; 7] =
        [Table::News, Table::Windows, Table::Late, Table::Alerts, Table::Notifications, Table::AppliedLabels, Table::ShadowNews];
    /// Append-only tables written by anyone, any time: see [`append`].
    pub const JOURNALS: [Table; 5] = [Table::LabelFeedback, Table::AlertVerdicts, Table::MissedEvents, Table::Models, Table::ModelAliases];

    pub fn name(self) -> &'static str {
        match self {
            Table::News => "news",
            Table::Windows => "windows",
            Table::Late => "late",
            Table::Alerts => "alerts",
            Table::Notifications => "notifications",
            Table::AppliedLabels => "applied_labels",
            Table::ShadowNews => "shadow_news",
            Table::LabelFeedback => "label_feedback",
            Table::AlertVerdicts => "alert_verdicts",
            Table::MissedEvents => "missed_events",
            Table::Models => "models",
            Table::ModelAliases => "model_aliases",
        }
    }
}

/// Storage's own part of `checkpoint.json`, beside the state its caller checkpoints: which parts
/// the checkpoint covers. Both are read from and written to one JSON object, so a checkpoint is one
/// atomic file.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Parts {
    /// Next part number of each table; parts at or past it are leftovers of a crash.
    #[serde(default)]
    next_part: BTreeMap<String, u64>,
    /// Parts that `bearwatch storage repair` set aside, per table: their rows are accepted as lost.
    #[serde(default)]
    lost_parts: BTreeMap<String, Vec<u64>>,
}

/// What [`Storage::commit`] writes: the caller's state with storage's fields beside it.
#[derive(Serialize)]
struct Written<'a, S> {
    #[serde(flatten)]
    state: &'a S,
    #[serde(flatten)]
    parts: &'a Parts,
}

pub struct Storage {
    root: PathBuf,
    next_part: BTreeMap<Table, u64>,
    lost_parts: BTreeMap<String, Vec<u64>>,
    properties: WriterProperties,
}

const CHECKPOINT: &str = "checkpoint.json";

impl Storage {
    /// Opens (creating) the storage folder, restores the caller's checkpointed state if any, and
    /// removes parts written after it. With `reset`, earlier tables and checkpoint are deleted first.
    pub fn open<S: DeserializeOwned>(root: &Path, reset: bool) -> Result<(Storage, Option<S>), StorageError> {
        if reset {
            for table in Table::CHECKPOINTED {
                let dir = root.join(table.name());
                if dir.exists() {
                    fs::remove_dir_all(&dir).map_err(io_error(&dir))?;
                }
            }
            let checkpoint = root.join(CHECKPOINT);
            if checkpoint.exists() {
                fs::remove_file(&checkpoint).map_err(io_error(&checkpoint))?;
            }
        }
        for table in Table::CHECKPOINTED {
            let dir = root.join(table.name());
            fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        }
        let bytes = read_checkpoint(root)?;
        let parts: Parts = match &bytes {
            Some(bytes) => parse_checkpoint(root, bytes)?,
            None => Parts::default(),
        };
        let next_part = parts.next_parts();
        for (&table, &next) in &next_part {
            remove_leftovers(&root.join(table.name()), next)?;
        }
        let damage: Vec<String> = damaged_parts(root, &next_part, &parts.lost_parts).into_iter().map(|(_, _, what)| what).collect();
        if !damage.is_empty() {
            return Err(StorageError::Damaged { root: root.display().to_string(), damage });
        }
        let state = bytes.as_deref().map(|bytes| parse_checkpoint(root, bytes)).transpose()?;
        Ok((Storage { root: root.to_path_buf(), next_part, lost_parts: parts.lost_parts, properties: properties() }, state))
    }

    /// Sets aside the parts that [`Storage::open`] finds missing or unreadable: unreadable ones move
    /// to `<root>/damaged/`, and the checkpoint records all of them as lost, so that the pipeline
    /// starts again with the rest. Returns what it found. The rest of the checkpoint is kept as it is.
    pub fn repair(root: &Path) -> Result<Vec<String>, StorageError> {
        let Some(bytes) = read_checkpoint(root)? else { return Ok(Vec::new()) };
        let mut parts: Parts = parse_checkpoint(root, &bytes)?;
        let damaged = damaged_parts(root, &parts.next_parts(), &parts.lost_parts);
        if damaged.is_empty() {
            return Ok(Vec::new());
        }
        let aside = root.join("damaged");
        fs::create_dir_all(&aside).map_err(io_error(&aside))?;
        for (table, seq, _) in &damaged {
            let path = part_path(root, *table, *seq);
            if path.exists() {
                let target = aside.join(format!("{}-part-{seq:08}.parquet", table.name()));
                fs::rename(&path, &target).map_err(io_error(&path))?;
            }
            parts.lost_parts.entry(table.name().to_string()).or_default().push(*seq);
        }
        let mut state: serde_json::Map<String, serde_json::Value> = parse_checkpoint(root, &bytes)?;
        state.remove("next_part");
        state.remove("lost_parts");
        write_atomically(root, &Written { state: &state, parts: &parts })?;
        Ok(damaged.into_iter().map(|(_, _, what)| what).collect())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes one Parquet part. Not visible to a restart until the next [`Storage::commit`].
    pub fn write(&mut self, table: Table, batch: &RecordBatch) -> Result<PathBuf, StorageError> {
        let seq = self.next_part[&table];
        let path = write_file(&self.root.join(table.name()), &format!("part-{seq:08}"), batch, &self.properties)?;
        self.next_part.insert(table, seq + 1);
        Ok(path)
    }

    /// Atomically replaces the checkpoint (temp file, fsync, rename, fsync of the folder) with
    /// `state` and the part numbers written so far. `state` must serialise as a JSON object.
    pub fn commit<S: Serialize>(&mut self, state: &S) -> Result<(), StorageError> {
        let parts = Parts {
            next_part: self.next_part.iter().map(|(t, n)| (t.name().to_string(), *n)).collect(),
            lost_parts: self.lost_parts.clone(),
        };
        write_atomically(&self.root, &Written { state, parts: &parts })
    }
}

fn properties() -> WriterProperties {
    WriterProperties::builder().set_compression(Compression::SNAPPY).build()
}

/// Writes `batch` as `<dir>/<stem>.parquet` through a temp name, fsynced, then renamed.
fn write_file(dir: &Path, stem: &str, batch: &RecordBatch, properties: &WriterProperties) -> Result<PathBuf, StorageError> {
    let path = dir.join(format!("{stem}.parquet"));
    let temp = dir.join(format!(".{stem}.parquet.tmp"));
    let parquet_error = |e: parquet::errors::ParquetError| StorageError::Parquet { path: path.clone(), reason: e.to_string() };
    let file = File::create(&temp).map_err(io_error(&temp))?;
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(properties.clone())).map_err(parquet_error)?;
    writer.write(batch).map_err(parquet_error)?;
    let file = writer.into_inner().map_err(parquet_error)?;
    file.sync_all().map_err(io_error(&temp))?;
    fs::rename(&temp, &path).map_err(io_error(&path))?;
    Ok(path)
}

/// Appends `batch` to a journal table as a file of its own, `<created ms>-<unique>.parquet`, durable
/// (fsynced file and folder) before it returns; readers see all of it or none.
pub fn append(root: &Path, table: Table, batch: &RecordBatch, unique: &str) -> Result<PathBuf, StorageError> {
    debug_assert!(Table::JOURNALS.contains(&table), "{} is written at checkpoints", table.name());
    let dir = root.join(table.name());
    fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    let stem = format!("{:013}-{unique}", chrono::Utc::now().timestamp_millis());
    let path = write_file(&dir, &stem, batch, &properties())?;
    File::open(&dir).and_then(|d| d.sync_all()).map_err(io_error(&dir))?;
    Ok(path)
}

/// A journal table's finished files, oldest first: `append` writes each under a temporary dot-name
/// and renames it into place, so a file listed here is whole. None when nothing was appended yet.
pub fn journal_files(root: &Path, table: Table) -> Result<Vec<PathBuf>, StorageError> {
    let dir = root.join(table.name());
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_error(&dir)(e)),
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_str().is_some_and(|n| n.ends_with(".parquet") && !n.starts_with('.')))
        .map(|e| e.path())
        .collect();
    files.sort();
    Ok(files)
}

/// Every batch of one Parquet file (a journal file, for readers that follow a table without SQL).
pub fn read_file(path: &Path) -> Result<Vec<RecordBatch>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .and_then(|b| b.build())
        .map_err(|e| e.to_string())?;
    reader.map(|batch| batch.map_err(|e| e.to_string())).collect()
}

impl Parts {
    fn next_parts(&self) -> BTreeMap<Table, u64> {
        Table::CHECKPOINTED.iter().map(|t| (*t, self.next_part.get(t.name()).copied().unwrap_or(0))).collect()
    }
}

fn read_checkpoint(root: &Path) -> Result<Option<Vec<u8>>, StorageError> {
    let path = root.join(CHECKPOINT);
    match fs::read(&path) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_error(&path)(e)),
    }
}

/// One view of the checkpoint's JSON object: storage's [`Parts`] or the caller's state (each
/// ignores the other's fields), read straight from the bytes.
fn parse_checkpoint<T: DeserializeOwned>(root: &Path, bytes: &[u8]) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::CorruptCheckpoint { path: root.join(CHECKPOINT), reason: e.to_string() })
}

fn write_atomically<S: Serialize>(root: &Path, checkpoint: &Written<'_, S>) -> Result<(), StorageError> {
    let path = root.join(CHECKPOINT);
    let temp = root.join(".checkpoint.json.tmp");
    let bytes = serde_json::to_vec(checkpoint).map_err(|e| StorageError::Io { path: path.clone(), reason: e.to_string() })?;
    let mut file = File::create(&temp).map_err(io_error(&temp))?;
    file.write_all(&bytes).map_err(io_error(&temp))?;
    file.sync_all().map_err(io_error(&temp))?;
    fs::rename(&temp, &path).map_err(io_error(&path))?;
    File::open(root).and_then(|d| d.sync_all()).map_err(io_error(root))?;
    Ok(())
}

fn part_path(root: &Path, table: Table, seq: u64) -> PathBuf {
    root.join(table.name()).join(format!("part-{seq:08}.parquet"))
}

/// Every part the checkpoint counts (numbers below `next_part`, not accepted as lost) that is
/// missing or whose Parquet footer does not read, with what is wrong with it.
fn damaged_parts(root: &Path, next_part: &BTreeMap<Table, u64>, lost: &BTreeMap<String, Vec<u64>>) -> Vec<(Table, u64, String)> {
    let mut damaged = Vec::new();
    for (&table, &next) in next_part {
        let lost = lost.get(table.name()).map(Vec::as_slice).unwrap_or_default();
        for seq in (0..next).filter(|seq| !lost.contains(seq)) {
            let path = part_path(root, table, seq);
            let name = format!("{}/part-{seq:08}.parquet", table.name());
            match File::open(&path) {
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => damaged.push((table, seq, format!("{name} is missing"))),
                Err(e) => damaged.push((table, seq, format!("{name} cannot be opened ({e})"))),
                Ok(file) => {
                    if let Err(e) = parquet::file::reader::SerializedFileReader::new(file) {
                        damaged.push((table, seq, format!("{name} is unreadable ({e})")));
                    }
                }
            }
        }
    }
    damaged
}

/// Deletes parts numbered `next` or later and unfinished temp files: writes a crash interrupted.
fn remove_leftovers(dir: &Path, next: u64) -> Result<(), StorageError> {
    for entry in fs::read_dir(dir).map_err(io_error(dir))? {
        let path = entry.map_err(io_error(dir))?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or_default();
        let part = name.strip_prefix("part-").and_then(|n| n.strip_suffix(".parquet")).and_then(|n| n.parse::<u64>().ok());
        let leftover = name.ends_with(".tmp") || part.is_some_and(|seq| seq >= next);
        if leftover {
            tracing::info!(file = %path.display(), "removing a part written after the last checkpoint");
            fs::remove_file(&path).map_err(io_error(&path))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;
    use arrow::datatypes::{DataType, Field, Schema};

    /// What a caller checkpoints: storage stores it without knowing it.
    #[derive(Debug, Serialize, Deserialize)]
    struct State {
        offsets: BTreeMap<String, BTreeMap<i32, i64>>,
        received: u64,
    }

    fn checkpoint() -> State {
        State { offsets: BTreeMap::from([("news".to_string(), BTreeMap::from([(0, 42)]))]), received: 3 }
    }

    fn batch() -> RecordBatch {
        let schema = Schema::new(vec![Field::new("n", DataType::Int64, false)]);
        RecordBatch::try_new(std::sync::Arc::new(schema), vec![std::sync::Arc::new(Int64Array::from(vec![1, 2]))]).unwrap()
    }

    #[test]
    fn parts_after_the_last_checkpoint_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut storage, restored) = Storage::open::<State>(dir.path(), false).unwrap();
        assert!(restored.is_none());
        let batch = batch();
        let kept = storage.write(Table::Windows, &batch).unwrap();
        storage.commit(&checkpoint()).unwrap();
        let orphan = storage.write(Table::Windows, &batch).unwrap();
        fs::write(dir.path().join("news/.part-00000000.parquet.tmp"), b"half").unwrap();

        let (mut storage, restored) = Storage::open::<State>(dir.path(), false).unwrap();
        let restored = restored.unwrap();
        assert_eq!(restored.offsets["news"][&0], 42);
        assert_eq!(restored.received, 3);
        assert!(kept.exists());
        assert!(!orphan.exists(), "a part written after the checkpoint must go");
        assert!(!dir.path().join("news/.part-00000000.parquet.tmp").exists());
        assert_eq!(storage.write(Table::Windows, &batch).unwrap(), orphan, "numbering resumes at the checkpoint");

        let (_, restored) = Storage::open::<State>(dir.path(), true).unwrap();
        assert!(restored.is_none() && !kept.exists(), "reset starts from nothing");
    }

    #[test]
    fn journal_appends_are_outside_the_checkpoint_and_survive_reset_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut storage, _) = Storage::open::<State>(dir.path(), false).unwrap();
        let first = append(dir.path(), Table::LabelFeedback, &batch(), "a1").unwrap();
        storage.commit(&checkpoint()).unwrap();
        let second = append(dir.path(), Table::LabelFeedback, &batch(), "b2").unwrap();
        assert_ne!(first, second);
        assert!(!dir.path().join("label_feedback").read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
        // An append after the last checkpoint is no crash leftover, and a reset keeps people's work.
        Storage::open::<State>(dir.path(), false).unwrap();
        Storage::open::<State>(dir.path(), true).unwrap();
        assert!(first.exists() && second.exists());
        let written = fs::read_to_string(dir.path().join(CHECKPOINT)).unwrap_or_default();
        assert!(!written.contains("label_feedback"), "journals have no part numbers: {written}");
    }

    #[test]
    fn a_missing_or_truncated_part_refuses_the_start_until_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let (mut storage, _) = Storage::open::<State>(dir.path(), false).unwrap();
        let batch = batch();
        let first = storage.write(Table::Windows, &batch).unwrap();
        let second = storage.write(Table::Windows, &batch).unwrap();
        let third = storage.write(Table::Windows, &batch).unwrap();
        storage.commit(&checkpoint()).unwrap();
        fs::remove_file(&first).unwrap();
        let bytes = fs::read(&second).unwrap();
        fs::write(&second, &bytes[..bytes.len() / 2]).unwrap();

        let err = Storage::open::<State>(dir.path(), false).err().unwrap().to_string();
        assert!(err.contains("windows/part-00000000.parquet is missing"), "{err}");
        assert!(err.contains("windows/part-00000001.parquet is unreadable"), "{err}");
        assert!(err.contains("bearwatch storage repair"), "{err}");

        let found = Storage::repair(dir.path()).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(dir.path().join("damaged/windows-part-00000001.parquet").exists());
        let (mut storage, restored) = Storage::open::<serde_json::Value>(dir.path(), false).unwrap();
        let restored = restored.unwrap();
        assert!(third.exists() && restored["lost_parts"]["windows"] == serde_json::json!([0, 1]));
        assert_eq!(restored["offsets"]["news"]["0"], 42, "repair keeps the caller's state");
        // What was accepted as lost stays accepted through later checkpoints.
        storage.commit(&checkpoint()).unwrap();
        assert!(Storage::open::<State>(dir.path(), false).is_ok());
        assert!(Storage::repair(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_checkpoint_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CHECKPOINT), b"{").unwrap();
        let err = Storage::open::<State>(dir.path(), false).err().unwrap();
        assert!(err.to_string().contains("move it away"), "{err}");
    }
}
