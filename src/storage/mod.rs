//! Parquet tables under `storage.path` and the checkpoint that makes them exactly-once.
//!
//! Layout: `<path>/<table>/part-<seq>.parquet` for tables `news`, `windows` and `late`, and
//! `<path>/checkpoint.json`. Files are written only at a checkpoint, each to a temp name, fsynced and
//! renamed; the checkpoint written right after records the next sequence number of every table. A
//! crash between the two leaves parts numbered at or past the checkpoint's: on start they are deleted,
//! and the stories in them are read again from the checkpointed offsets. So no row is lost or doubled.

mod news_table;

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use arrow::array::RecordBatch;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

pub use news_table::{news_batch, news_schema};

use crate::error::{Classified, ErrorClass};
use crate::window::{WindowState, windows_schema};

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
}

impl Table {
    pub const ALL: [Table; 5] = [Table::News, Table::Windows, Table::Late, Table::Alerts, Table::Notifications];

    pub fn name(self) -> &'static str {
        match self {
            Table::News => "news",
            Table::Windows => "windows",
            Table::Late => "late",
            Table::Alerts => "alerts",
            Table::Notifications => "notifications",
        }
    }

    pub fn schema(self) -> arrow::datatypes::SchemaRef {
        match self {
            Table::News | Table::Late => news_schema(),
            Table::Windows => windows_schema(),
            Table::Alerts => crate::detect::alerts_schema(),
            Table::Notifications => crate::alert::notifications_schema(),
        }
    }
}

/// Running totals, kept in the checkpoint so that they survive restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub received: u64,
    pub scored: u64,
    pub dead_lettered: u64,
    pub duplicates: u64,
    pub late: u64,
    #[serde(default)]
    pub alerts: u64,
}

/// Everything needed to resume exactly where the last checkpoint left off.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub written_at: String,
    /// Next offset to read, per source topic (or file) and partition.
    pub offsets: BTreeMap<String, BTreeMap<i32, i64>>,
    pub windows: WindowState,
    /// Recently seen story ids with their event time, for de-duplication.
    pub seen: Vec<(String, i64)>,
    pub counters: Counters,
    /// Alert rules' baselines and lifecycles (absent when the pipeline has no rules).
    #[serde(default)]
    pub detector: Option<crate::detect::Detector>,
    /// Next part number of each table; parts at or past it are leftovers of a crash.
    pub next_part: BTreeMap<String, u64>,
    /// Parts that `bearwatch storage repair` set aside, per table: their rows are accepted as lost.
    #[serde(default)]
    pub lost_parts: BTreeMap<String, Vec<u64>>,
    /// What was read of each file source (its offsets are in `offsets`).
    #[serde(default)]
    pub files: BTreeMap<String, crate::source::file::FileProgress>,
}

pub struct Storage {
    root: PathBuf,
    next_part: BTreeMap<Table, u64>,
    lost_parts: BTreeMap<String, Vec<u64>>,
    properties: WriterProperties,
}

const CHECKPOINT: &str = "checkpoint.json";

impl Storage {
    /// Opens (creating) the storage folder, restores the checkpoint if any, and removes parts written
    /// after it. With `reset`, earlier tables and checkpoint are deleted first.
    pub fn open(root: &Path, reset: bool) -> Result<(Storage, Option<Checkpoint>), StorageError> {
        if reset {
            for table in Table::ALL {
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
        for table in Table::ALL {
            let dir = root.join(table.name());
            fs::create_dir_all(&dir).map_err(io_error(&dir))?;
        }
        let checkpoint = Storage::read_checkpoint(root)?;
        let mut next_part = BTreeMap::new();
        for table in Table::ALL {
            let next = checkpoint.as_ref().and_then(|c| c.next_part.get(table.name()).copied()).unwrap_or(0);
            next_part.insert(table, next);
            remove_leftovers(&root.join(table.name()), next)?;
        }
        let lost_parts = checkpoint.as_ref().map(|c| c.lost_parts.clone()).unwrap_or_default();
        let damage: Vec<String> = damaged_parts(root, &next_part, &lost_parts).into_iter().map(|(_, _, what)| what).collect();
        if !damage.is_empty() {
            return Err(StorageError::Damaged { root: root.display().to_string(), damage });
        }
        let properties = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
        Ok((Storage { root: root.to_path_buf(), next_part, lost_parts, properties }, checkpoint))
    }

    /// Sets aside the parts that [`Storage::open`] finds missing or unreadable: unreadable ones move
    /// to `<root>/damaged/`, and the checkpoint records all of them as lost, so that the pipeline
    /// starts again with the rest. Returns what it found.
    pub fn repair(root: &Path) -> Result<Vec<String>, StorageError> {
        let Some(mut checkpoint) = Storage::read_checkpoint(root)? else { return Ok(Vec::new()) };
        let next_part: BTreeMap<Table, u64> =
            Table::ALL.iter().map(|t| (*t, checkpoint.next_part.get(t.name()).copied().unwrap_or(0))).collect();
        let damaged = damaged_parts(root, &next_part, &checkpoint.lost_parts);
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
            checkpoint.lost_parts.entry(table.name().to_string()).or_default().push(*seq);
        }
        write_atomically(root, &checkpoint)?;
        Ok(damaged.into_iter().map(|(_, _, what)| what).collect())
    }

    fn read_checkpoint(root: &Path) -> Result<Option<Checkpoint>, StorageError> {
        let path = root.join(CHECKPOINT);
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StorageError::CorruptCheckpoint { path, reason: e.to_string() }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_error(&path)(e)),
        }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Writes one Parquet part. Not visible to a restart until the next [`Storage::commit`].
    pub fn write(&mut self, table: Table, batch: &RecordBatch) -> Result<PathBuf, StorageError> {
        let seq = self.next_part[&table];
        let dir = self.root.join(table.name());
        let path = dir.join(format!("part-{seq:08}.parquet"));
        let temp = dir.join(format!(".part-{seq:08}.parquet.tmp"));
        let parquet_error = |e: parquet::errors::ParquetError| StorageError::Parquet { path: path.clone(), reason: e.to_string() };
        let file = File::create(&temp).map_err(io_error(&temp))?;
        let mut writer = ArrowWriter::try_new(file, table.schema(), Some(self.properties.clone())).map_err(parquet_error)?;
        writer.write(batch).map_err(parquet_error)?;
        let file = writer.into_inner().map_err(parquet_error)?;
        file.sync_all().map_err(io_error(&temp))?;
        fs::rename(&temp, &path).map_err(io_error(&path))?;
        self.next_part.insert(table, seq + 1);
        Ok(path)
    }

    /// Atomically replaces the checkpoint (temp file, fsync, rename, fsync of the folder).
    pub fn commit(&mut self, mut checkpoint: Checkpoint) -> Result<(), StorageError> {
        checkpoint.next_part = self.next_part.iter().map(|(t, n)| (t.name().to_string(), *n)).collect();
        checkpoint.lost_parts = self.lost_parts.clone();
        write_atomically(&self.root, &checkpoint)
    }
}

fn write_atomically(root: &Path, checkpoint: &Checkpoint) -> Result<(), StorageError> {
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
    use crate::window::{WindowSpec, WindowState, windows_batch};

    fn checkpoint() -> Checkpoint {
        let spec = WindowSpec { size_ms: 1000, slide_ms: 1000, allowed_lateness_ms: 0, by_ticker: false };
        Checkpoint {
            written_at: String::new(),
            offsets: BTreeMap::from([("news".to_string(), BTreeMap::from([(0, 42)]))]),
            windows: WindowState::new(spec),
            seen: vec![("a".into(), 1)],
            counters: Counters { received: 3, ..Counters::default() },
            detector: None,
            next_part: BTreeMap::new(),
            lost_parts: BTreeMap::new(),
            files: BTreeMap::new(),
        }
    }

    #[test]
    fn parts_after_the_last_checkpoint_are_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut storage, restored) = Storage::open(dir.path(), false).unwrap();
        assert!(restored.is_none());
        let batch = windows_batch(&[]).unwrap();
        let kept = storage.write(Table::Windows, &batch).unwrap();
        storage.commit(checkpoint()).unwrap();
        let orphan = storage.write(Table::Windows, &batch).unwrap();
        fs::write(dir.path().join("news/.part-00000000.parquet.tmp"), b"half").unwrap();

        let (mut storage, restored) = Storage::open(dir.path(), false).unwrap();
        let restored = restored.unwrap();
        assert_eq!(restored.offsets["news"][&0], 42);
        assert_eq!(restored.counters.received, 3);
        assert!(kept.exists());
        assert!(!orphan.exists(), "a part written after the checkpoint must go");
        assert!(!dir.path().join("news/.part-00000000.parquet.tmp").exists());
        assert_eq!(storage.write(Table::Windows, &batch).unwrap(), orphan, "numbering resumes at the checkpoint");

        let (_, restored) = Storage::open(dir.path(), true).unwrap();
        assert!(restored.is_none() && !kept.exists(), "reset starts from nothing");
    }

    /// The table schemas users query are contracts (DESIGN §3): `schemas/*.table.json` are their
    /// reviewed copies. After a deliberate change, regenerate with `BEARWATCH_BLESS=1 cargo test` and
    /// record the change in docs/ARCHITECTURE.md.
    #[test]
    fn table_schemas_match_the_files_in_schemas() {
        for table in [Table::News, Table::Windows, Table::Alerts, Table::Notifications] {
            let columns: Vec<serde_json::Value> = table
                .schema()
                .fields()
                .iter()
                .map(|f| serde_json::json!({"name": f.name(), "type": f.data_type().to_string(), "nullable": f.is_nullable()}))
                .collect();
            let mut expected = serde_json::to_string_pretty(&serde_json::json!({"table": table.name(), "columns": columns})).unwrap();
            expected.push('\n');
            let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("schemas/{}.table.json", table.name()));
            if std::env::var_os("BEARWATCH_BLESS").is_some() {
                fs::write(&path, &expected).unwrap();
            }
            assert_eq!(fs::read_to_string(&path).unwrap_or_default(), expected, "{} changed", path.display());
        }
    }

    #[test]
    fn a_missing_or_truncated_part_refuses_the_start_until_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let (mut storage, _) = Storage::open(dir.path(), false).unwrap();
        let batch = windows_batch(&[]).unwrap();
        let first = storage.write(Table::Windows, &batch).unwrap();
        let second = storage.write(Table::Windows, &batch).unwrap();
        let third = storage.write(Table::Windows, &batch).unwrap();
        storage.commit(checkpoint()).unwrap();
        fs::remove_file(&first).unwrap();
        let bytes = fs::read(&second).unwrap();
        fs::write(&second, &bytes[..bytes.len() / 2]).unwrap();

        let err = Storage::open(dir.path(), false).err().unwrap().to_string();
        assert!(err.contains("windows/part-00000000.parquet is missing"), "{err}");
        assert!(err.contains("windows/part-00000001.parquet is unreadable"), "{err}");
        assert!(err.contains("bearwatch storage repair"), "{err}");

        let found = Storage::repair(dir.path()).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(dir.path().join("damaged/windows-part-00000001.parquet").exists());
        let (mut storage, restored) = Storage::open(dir.path(), false).unwrap();
        assert!(third.exists() && restored.unwrap().lost_parts["windows"] == vec![0, 1]);
        // What was accepted as lost stays accepted through later checkpoints.
        storage.commit(checkpoint()).unwrap();
        assert!(Storage::open(dir.path(), false).is_ok());
        assert!(Storage::repair(dir.path()).unwrap().is_empty());
    }

    #[test]
    fn a_corrupt_checkpoint_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(CHECKPOINT), b"{").unwrap();
        let err = Storage::open(dir.path(), false).err().unwrap();
        assert!(err.to_string().contains("move it away"), "{err}");
    }
}
