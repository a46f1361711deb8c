//! Parquet tables under `storage.path` and the checkpoint that makes them exactly-once.
//!
//! Storage knows tables and checkpoints, not the stages that fill them: a caller hands it record
//! batches for a [`Table`] and its own serialisable state for the checkpoint.
//!
//! Layout: `<path>/<table>/part-<seq>.parquet` for every [`Table`], and `<path>/checkpoint.json`,
//! under a local folder or an `s3://bucket/prefix` ([`Location`]). Parts are written only at a
//! checkpoint, first under a hidden pending name (`.part-<seq>.parquet.pending`: locally through a
//! temp name, fsynced and renamed; on object storage in one PUT); the checkpoint written next
//! records the next sequence number of every table; only then are the parts renamed to their
//! names, where readers (bearwatch's SQL, DuckDB, Trino) see them. So a reader never sees rows
//! that a crash would have the pipeline read again. A crash before the checkpoint leaves pending
//! parts numbered at or past it: deleted on start (their stories are read again from the
//! checkpointed offsets). A crash after it leaves pending parts below it: renamed on start, or by
//! another instance that takes over the crashed one's partitions ([`settle`]). So no row is lost or
//! doubled.
//!
//! On object storage the checkpoint is replaced only if it is still the version this process read
//! or wrote last (`If-Match`; `If-None-Match` for the first): a second process writing to the same
//! prefix makes the other's next checkpoint fail ([`StorageError::Fenced`]) instead of both
//! committing over each other.
//!
//! The writer merges its small committed parts in the background ([`compact`]): a merge's name,
//! `part-<first>-<last>.parquet`, says which parts it holds, and readers skip those parts until they
//! are deleted.
//!
//! Journal tables (what people tell bearwatch: [`Table::JOURNALS`]) are outside the checkpoint: any
//! process may [`append`] to them at any time, one file per append, and no row of them is ever
//! deleted, not even by `--reset` (that restarts the pipeline, not people's work). The writer merges
//! the analysts' journals' files by hour and day in the background ([`journals`]).

mod cache;
mod compact;
mod config;
mod journals;
mod location;
mod packed;

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

pub use compact::{ReadPin, Visible};
pub use config::{S3Config, StorageConfig};
pub use journals::{Held, JournalFile, Round as JournalRound, append_id as journal_append_id, covered as merged_journal_files};
pub use location::{Bucket, Location};
use location::Mode;

use crate::error::{Classified, ErrorClass};
use crate::sync::lock;

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{reason}")]
    Config { reason: String },
    /// A request to object storage that failed after the client's retries (or was refused by a
    /// precondition: someone else wrote first).
    #[error("{url}: {reason}")]
    Object { url: String, reason: String, precondition: bool },
    #[error(
        "{url} was changed by another process since this one last wrote it: two pipelines share this storage \
         (give each its own path, or stop the other). Nothing more is written here"
    )]
    Fenced { url: String },
    #[error(
        "{path} is in use by another bearwatch process{holder}: two pipelines must not share one storage \
         (give each its own storage.path, or each instance its own storage.local_path), or stop the other"
    )]
    InUse { path: PathBuf, holder: String },
    #[error(
        "instance {instance:?} of {root} is in use by another bearwatch process{holder}: two processes must not write as one \
         instance (give each its own storage.instance), or stop the other"
    )]
    InstanceInUse { root: PathBuf, instance: String, holder: String },
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
            StorageError::Io { .. } | StorageError::CorruptCheckpoint { .. } | StorageError::Damaged { .. } | StorageError::Object { .. } => ErrorClass::External,
            StorageError::Config { .. } | StorageError::Fenced { .. } | StorageError::InUse { .. } | StorageError::InstanceInUse { .. } => ErrorClass::User,
            StorageError::Parquet { .. } => ErrorClass::Internal,
        }
    }
    fn retryable(&self) -> bool {
        matches!(self, StorageError::Io { .. } | StorageError::Object { precondition: false, .. })
    }
}

/// This process's hold on a folder of local state (the outbox, silences, dead letters, and the
/// tables and checkpoint where they are local): two processes writing them at once lose and
/// repeat stories with no error from either. Held until dropped (the operating system lets go of
/// it when the process ends, however it ends).
pub struct Hold {
    _file: fs::File,
}

/// Takes `dir`'s hold, `bearwatch.lock` in it (created with `dir` if need be), or says who has it.
pub fn hold(dir: &Path) -> Result<Hold, StorageError> {
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    take_lock(&dir.join("bearwatch.lock"), |holder| StorageError::InUse { path: dir.to_path_buf(), holder })
}

/// Takes an instance's hold on a local storage that instances share (`checkpoints/<instance>.lock`),
/// or says who has it: two processes writing as one instance number their parts alike and commit
/// over each other's checkpoint. None on object storage, where the checkpoint's `If-Match` refuses
/// the second writer.
pub fn hold_instance(location: &Location, instance: &str) -> Result<Option<Hold>, StorageError> {
    let Location::Local(root) = location else { return Ok(None) };
    let dir = root.join("checkpoints");
    fs::create_dir_all(&dir).map_err(io_error(&dir))?;
    let in_use = |holder| StorageError::InstanceInUse { root: root.clone(), instance: instance.to_string(), holder };
    take_lock(&dir.join(format!("{instance}.lock")), in_use).map(Some)
}

/// Locks `path` (created if need be) and notes this process's pid in it; `in_use` makes the error
/// when another process holds it, from " (pid N)" or nothing.
fn take_lock(path: &Path, in_use: impl FnOnce(String) -> StorageError) -> Result<Hold, StorageError> {
    let mut file = fs::OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io_error(path))?;
    match file.try_lock() {
        Ok(()) => {
            use std::io::{Seek, Write};
            // Only for the message a second process gives; a full disk (where the pipeline starts
            // and waits for room) cannot take even these bytes, and the lock holds without them.
            let noted = file.set_len(0).and_then(|()| file.rewind()).and_then(|()| writeln!(file, "{}", std::process::id()));
            if let Err(e) = noted {
                tracing::warn!(path = %path.display(), error = %e, "cannot note this process's pid beside its lock");
            }
            Ok(Hold { _file: file })
        }
        Err(fs::TryLockError::WouldBlock) => {
            let pid = fs::read_to_string(path).unwrap_or_default();
            Err(in_use(Some(pid.trim()).filter(|p| !p.is_empty()).map(|p| format!(" (pid {p})")).unwrap_or_default()))
        }
        Err(fs::TryLockError::Error(e)) => Err(io_error(path)(e)),
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
    /// Which opening of the storage wrote the checkpoint, and its how-manieth commit: no two
    /// checkpoints have the same bytes, so their versions (ETags, digests of the bytes) differ and
    /// a conditional write can tell them apart.
    #[serde(default)]
    writer: String,
    #[serde(default)]
    commit: u64,
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
    place: Place,
    next_part: BTreeMap<Table, u64>,
    lost_parts: BTreeMap<String, Vec<u64>>,
    properties: WriterProperties,
    /// Object storage: the checkpoint's version this process read or wrote last (none: there was
    /// none), which the next commit must still find there.
    checkpoint_version: Option<String>,
    /// `next_part` as of the last commit (or the open).
    committed: BTreeMap<Table, u64>,
    /// Parts below these numbers are under their names; from there to `committed`, committed but
    /// still pending (a rename that failed is tried again at the next commit).
    published: BTreeMap<Table, u64>,
    writer: String,
    commits: u64,
    /// Where the last committed checkpoint's pieces lie, when it was written in pieces ([`packed`]).
    stored: packed::Stored,
    /// Object storage: when this process last swept packs no checkpoint references ([`sweep_stale_packs`]).
    packs_swept: Option<std::time::Instant>,
    compactor: Compactor,
}

/// The writer's background merges: one round at a time, after a commit that named new parts.
#[derive(Default)]
struct Compactor {
    running: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Set when the storage is dropped: a round in progress deletes its inputs without waiting.
    stopping: std::sync::Arc<std::sync::atomic::AtomicBool>,
    /// Tables whose parts cannot be merged (their schemas differ beyond added nullable columns):
    /// left alone for the rest of the process, instead of being read again each round.
    refused: std::sync::Arc<std::sync::Mutex<std::collections::BTreeSet<Table>>>,
    /// When the last round over the journals started ([`JOURNAL_ROUND_EVERY`]).
    journals_at: std::sync::Arc<std::sync::Mutex<Option<std::time::Instant>>>,
}

/// How often the writer merges journal files: a bucket is due an hour after it ends, so a minute
/// late costs nothing, and a round lists each merged journal once.
const JOURNAL_ROUND_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// One writer's share of a storage: the tables' folders and the checkpoint. Without an instance
/// name, the storage's own (`<table>/`, `checkpoint.json`); with one (`[storage] instance`),
/// `<table>/instance=<name>/` and `checkpoints/<name>.json`, beside the other instances', so that
/// SQL over the storage reads every instance's rows, with an `instance` column.
#[derive(Clone)]
struct Place {
    location: Location,
    instance: Option<String>,
}

impl Place {
    fn folder(&self, table: Table) -> String {
        match &self.instance {
            Some(name) => format!("{}/{INSTANCE}={name}", table.name()),
            None => table.name().to_string(),
        }
    }

    fn part(&self, table: Table, seq: u64) -> String {
        format!("{}/{}", self.folder(table), part_name(seq))
    }

    fn pending(&self, table: Table, seq: u64) -> String {
        format!("{}/{}", self.folder(table), pending_name(seq))
    }

    fn checkpoint(&self) -> String {
        match &self.instance {
            Some(name) => format!("checkpoints/{name}.json"),
            None => "checkpoint.json".to_string(),
        }
    }

    /// `relative` as a file name or URL, for messages.
    fn name(&self, relative: &str) -> String {
        match &self.location {
            Location::Local(root) => root.join(relative).display().to_string(),
            Location::Bucket(bucket) => bucket.url_of(relative),
        }
    }

    fn read(&self, relative: &str) -> Result<Option<(Vec<u8>, Option<String>)>, StorageError> {
        match &self.location {
            Location::Local(root) => {
                let path = root.join(relative);
                match fs::read(&path) {
                    Ok(bytes) => Ok(Some((bytes, None))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(io_error(&path)(e)),
                }
            }
            Location::Bucket(bucket) => Ok(bucket.get(relative)?.map(|(bytes, version)| (bytes.to_vec(), version))),
        }
    }

    /// Names and sizes of the files directly in `folder` (none when it does not exist).
    fn list(&self, folder: &str) -> Result<Vec<(String, u64)>, StorageError> {
        match &self.location {
            Location::Local(root) => {
                let dir = root.join(folder);
                let entries = match fs::read_dir(&dir) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(io_error(&dir)(e)),
                };
                let mut files = Vec::new();
                for entry in entries {
                    let entry = entry.map_err(io_error(&dir))?;
                    let meta = match entry.metadata() {
                        Ok(meta) => meta,
                        // Deleted since the folder was read (a merge's input): not there.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(io_error(&entry.path())(e)),
                    };
                    if meta.is_file()
                        && let Some(name) = entry.file_name().to_str()
                    {
                        files.push((name.to_string(), meta.len()));
                    }
                }
                Ok(files)
            }
            Location::Bucket(bucket) => bucket.list(folder),
        }
    }

    /// Several files' bytes, in order (none for one that is not there): on object storage
    /// several requests at once.
    fn read_many(&self, relatives: &[String]) -> Result<Vec<Option<Vec<u8>>>, StorageError> {
        match &self.location {
            Location::Local(_) => relatives.iter().map(|r| Ok(self.read(r)?.map(|(bytes, _)| bytes))).collect(),
            Location::Bucket(bucket) => Ok(bucket.get_many(relatives)?.into_iter().map(|b| b.map(|b| b.to_vec())).collect()),
        }
    }

    /// Deletes several files (one that is not there is no error): on object storage several
    /// requests at once.
    fn delete_many(&self, relatives: &[String]) -> Result<(), StorageError> {
        match &self.location {
            Location::Local(_) => relatives.iter().try_for_each(|r| self.delete(r)),
            Location::Bucket(bucket) => bucket.delete_many(relatives),
        }
    }

    fn delete(&self, relative: &str) -> Result<(), StorageError> {
        match &self.location {
            Location::Local(root) => {
                let path = root.join(relative);
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(&path)(e)),
                    _ => Ok(()),
                }
            }
            Location::Bucket(bucket) => bucket.delete(relative),
        }
    }
}

/// The Hive-style partition that names an instance: `<table>/instance=<name>/`.
pub const INSTANCE: &str = "instance";

/// Where instances publish their progress notes ([`Storage::publish_progress`]).
const PROGRESS: &str = "progress";

/// A stop lets a round of merges finish (a bounded wait), so that a stopped pipeline leaves no
/// merged part beside its inputs for a plain glob to read twice. A merge cut short loses nothing:
/// the next start deletes what it left.
impl Drop for Storage {
    fn drop(&mut self) {
        self.compactor.stopping.store(true, std::sync::atomic::Ordering::Release);
        if !self.wait_for_compaction(STOP_WAIT) {
            tracing::warn!("stopping in the middle of merging parts; the next start deletes what it leaves");
        }
    }
}

/// How long a stop waits for a round of merges.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Storage {
    /// Opens (creating) the storage, restores the caller's checkpointed state if any, and removes
    /// parts written after it. With `reset`, earlier tables and checkpoint are deleted first (with
    /// `instance`, that instance's only).
    pub fn open<S: DeserializeOwned>(location: &Location, instance: Option<&str>, reset: bool) -> Result<(Storage, Option<S>), StorageError> {
        let place = Place { location: location.clone(), instance: instance.map(str::to_string) };
        if reset {
            reset_tables(&place)?;
        }
        if let Location::Local(root) = location {
            for table in Table::CHECKPOINTED {
                let dir = root.join(place.folder(table));
                fs::create_dir_all(&dir).map_err(io_error(&dir))?;
            }
        }
        let (bytes, checkpoint_version, stored) = read_checkpoint(&place)?.map_or((None, None, packed::Stored::default()), |(b, v, s)| (Some(b), v, s));
        if let Location::Local(_) = location {
            sweep_packs(&place, &stored)?;
        }
        let parts: Parts = match &bytes {
            Some(bytes) => parse_checkpoint(&place, bytes)?,
            None => Parts::default(),
        };
        let next_part = parts.next_parts();
        for (&table, &next) in &next_part {
            settle_parts(&place, table, next, true)?;
        }
        let damage: Vec<String> = damaged_parts(&place, &next_part, &parts.lost_parts)?.into_iter().map(|(_, _, what)| what).collect();
        if !damage.is_empty() {
            return Err(StorageError::Damaged { root: location.to_string(), damage });
        }
        let state = bytes.as_deref().map(|bytes| parse_checkpoint(&place, bytes)).transpose()?;
        let writer = opening();
        let storage = Storage {
            place,
            committed: next_part.clone(),
            published: next_part.clone(),
            next_part,
            lost_parts: parts.lost_parts,
            properties: properties(),
            checkpoint_version,
            writer,
            commits: 0,
            stored,
            packs_swept: None,
            compactor: Compactor::default(),
        };
        Ok((storage, state))
    }

    /// Sets aside the parts that [`Storage::open`] finds missing or unreadable: unreadable ones move
    /// to `<root>/damaged/`, and the checkpoint records all of them as lost, so that the pipeline
    /// starts again with the rest. Returns what it found. The rest of the checkpoint is kept as it is.
    pub fn repair(location: &Location, instance: Option<&str>) -> Result<Vec<String>, StorageError> {
        let place = Place { location: location.clone(), instance: instance.map(str::to_string) };
        let Some((bytes, version, mut stored)) = read_checkpoint(&place)? else { return Ok(Vec::new()) };
        let mut parts: Parts = parse_checkpoint(&place, &bytes)?;
        let damaged = damaged_parts(&place, &parts.next_parts(), &parts.lost_parts)?;
        if damaged.is_empty() {
            return Ok(Vec::new());
        }
        for (table, (first, last), _) in &damaged {
            set_aside(&place, *table, (*first, *last))?;
            parts.lost_parts.entry(table.name().to_string()).or_default().extend(*first..=*last);
        }
        for lost in parts.lost_parts.values_mut() {
            lost.sort_unstable();
            lost.dedup();
        }
        let mut state: serde_json::Map<String, serde_json::Value> = parse_checkpoint(&place, &bytes)?;
        for field in ["next_part", "lost_parts", "writer", "commit"] {
            state.remove(field);
        }
        parts.writer = format!("repair-{}", opening());
        write_checkpoint(&place, &Written { state: &state, parts: &parts }, version.as_deref(), &mut stored, &format!("{}.pack", parts.writer))?;
        Ok(damaged.into_iter().map(|(_, _, what)| what).collect())
    }

    pub fn location(&self) -> &Location {
        &self.place.location
    }

    /// Writes one Parquet part. Not visible to a restart or a reader until the next [`Storage::commit`].
    pub fn write(&mut self, table: Table, batch: &RecordBatch) -> Result<String, StorageError> {
        Ok(self.write_all(std::slice::from_ref(&(table, batch.clone())))?.remove(0))
    }

    /// Writes one part per batch (on object storage, all at once: a checkpoint waits for one round
    /// trip, not one per table). Returns where each went.
    pub fn write_all(&mut self, parts: &[(Table, RecordBatch)]) -> Result<Vec<String>, StorageError> {
        let mut written = Vec::with_capacity(parts.len());
        let mut uploads = Vec::new();
        for (table, batch) in parts {
            let seq = self.next_part[table];
            let relative = self.place.pending(*table, seq);
            match &self.place.location {
                Location::Local(root) => write_file(&root.join(self.place.folder(*table)), &pending_name(seq), std::slice::from_ref(batch), &self.properties)?,
                Location::Bucket(bucket) => uploads.push((relative.clone(), encode(&bucket.url_of(&relative), std::slice::from_ref(batch), &self.properties)?)),
            }
            self.next_part.insert(*table, seq + 1);
            written.push(self.place.name(&self.place.part(*table, seq)));
        }
        if let Location::Bucket(bucket) = &self.place.location {
            bucket.put_all(uploads)?;
        }
        Ok(written)
    }

    /// Atomically replaces the checkpoint with `state` and the part numbers written so far (locally:
    /// temp file, fsync, rename, fsync of the folder; on object storage: a conditional PUT, see the
    /// module's doc). `state` must serialise as a JSON object.
    pub fn commit<S: Serialize>(&mut self, state: &S) -> Result<(), StorageError> {
        self.commits += 1;
        let parts = Parts {
            next_part: self.next_part.iter().map(|(t, n)| (t.name().to_string(), *n)).collect(),
            lost_parts: self.lost_parts.clone(),
            writer: self.writer.clone(),
            commit: self.commits,
        };
        let pack = format!("{}-{}.pack", self.writer, self.commits);
        self.checkpoint_version = write_checkpoint(&self.place, &Written { state, parts: &parts }, self.checkpoint_version.as_deref(), &mut self.stored, &pack)?;
        self.committed = self.next_part.clone();
        self.publish();
        if let Location::Bucket(bucket) = &self.place.location
            && self.packs_swept.is_none_or(|at| at.elapsed() >= SWEEP_PACKS_EVERY)
        {
            self.packs_swept = Some(std::time::Instant::now());
            if let Err(e) = sweep_stale_packs(&self.place, bucket, &self.stored, self.checkpoint_version.as_deref()) {
                tracing::warn!(error = %e, "checkpoint packs no checkpoint references are swept again in an hour");
            }
        }
        Ok(())
    }

    /// What a commit does besides committing, for a checkpoint that had nothing new to commit: renames
    /// parts a failed rename left pending, and starts a round of journal merges when one is due.
    pub fn tend_between_commits(&mut self) {
        if self.published != self.committed {
            self.publish();
        } else {
            self.compact_in_background(false);
        }
    }

    /// Renames the committed parts to their names. A failure leaves them pending (hidden from
    /// readers, not lost): tried again at the next commit, and at the next open.
    fn publish(&mut self) {
        let renames: Vec<(String, String)> = self
            .committed
            .iter()
            .flat_map(|(&table, &next)| (self.published[&table]..next).map(move |seq| (table, seq)))
            .map(|(table, seq)| (self.place.pending(table, seq), self.place.part(table, seq)))
            .collect();
        match rename_all(&self.place, renames) {
            Ok(()) => {
                let named = self.published != self.committed;
                self.published = self.committed.clone();
                self.compact_in_background(named);
            }
            Err(e) => tracing::warn!(error = %e, "committed parts stay hidden until the next checkpoint renames them"),
        }
        if let Location::Bucket(bucket) = &self.place.location {
            bucket.forget_listings();
        }
    }

    /// Starts a round of merges on a thread of its own, unless one is running: of the parts
    /// ([`compact`]) when `parts` (new ones were named), of the journals ([`journals`]) when
    /// [`JOURNAL_ROUND_EVERY`] has passed since the last.
    fn compact_in_background(&self, parts: bool) {
        let journals_due = lock(&self.compactor.journals_at).is_none_or(|at| at.elapsed() >= JOURNAL_ROUND_EVERY);
        if !(parts || journals_due) || self.compactor.running.swap(true, std::sync::atomic::Ordering::AcqRel) {
            return;
        }
        if journals_due {
            *lock(&self.compactor.journals_at) = Some(std::time::Instant::now());
        }
        let (place, published, running, refused, stopping) = (
            self.place.clone(),
            if parts { self.published.clone() } else { BTreeMap::new() },
            self.compactor.running.clone(),
            self.compactor.refused.clone(),
            self.compactor.stopping.clone(),
        );
        let started = std::thread::Builder::new().name("compact".into()).spawn(move || {
            let _span = tracing::info_span!("compact").entered();
            if journals_due {
                merge_journals(&Place { location: place.location.clone(), instance: None }, &stopping);
            }
            for (&table, &next) in &published {
                if lock(&refused).contains(&table) {
                    continue;
                }
                let started = std::time::Instant::now();
                match compact_table(&place, table, next, &stopping) {
                    Ok(Merge::Nothing) => {}
                    Ok(Merge::Merged { parts, into }) => {
                        metrics::counter!("bearwatch_storage_compactions_total").increment(1);
                        metrics::counter!("bearwatch_storage_compacted_parts_total").increment(parts as u64);
                        tracing::debug!(table = table.name(), parts, into = %place.name(&into), took = ?started.elapsed(), "merged parts");
                    }
                    Ok(Merge::Refused(reason)) => {
                        tracing::warn!(table = table.name(), %reason, "its parts are not merged");
                        lock(&refused).insert(table);
                    }
                    Err(e) => {
                        metrics::counter!("bearwatch_storage_compaction_errors_total").increment(1);
                        tracing::warn!(table = table.name(), error = %e, "merging parts failed; tried again after the next checkpoint");
                    }
                }
            }
            running.store(false, std::sync::atomic::Ordering::Release);
        });
        if let Err(e) = started {
            tracing::warn!(error = %e, "cannot start merging parts");
            self.compactor.running.store(false, std::sync::atomic::Ordering::Release);
        }
    }

    /// Waits for a round of merges to end, at most `limit`; whether it ended.
    fn wait_for_compaction(&self, limit: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + limit;
        while self.compactor.running.load(std::sync::atomic::Ordering::Acquire) {
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    /// The instance this storage writes as (none: it is the storage's only writer).
    pub fn instance(&self) -> Option<&str> {
        self.place.instance.as_deref()
    }

    /// Replaces this instance's progress note, `progress/<instance>.json`: a few bytes each
    /// checkpoint that the other instances read ([`progress`]) to learn how far its partitions
    /// are, without reading its whole checkpoint. Not a commitment: a lost note is only late news.
    pub fn publish_progress(&self, bytes: Vec<u8>) -> Result<(), StorageError> {
        let Some(name) = &self.place.instance else { return Ok(()) };
        let relative = format!("{PROGRESS}/{name}.json");
        match &self.place.location {
            Location::Local(root) => replace_local(root, &relative, &bytes),
            Location::Bucket(bucket) => bucket.put(&relative, bytes, Mode::Overwrite).map(|_| ()),
        }
    }

    /// The other instances' checkpoints, by instance name (for taking over their partitions).
    pub fn others_checkpoints(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let mut found = Vec::new();
        for name in instances(&self.place.location)? {
            if Some(&name) != self.place.instance.as_ref()
                && let Some(bytes) = checkpoint(&self.place.location, Some(&name))?
            {
                found.push((name, bytes));
            }
        }
        Ok(found)
    }

    /// The other instances' progress notes ([`Storage::publish_progress`]), by instance name.
    pub fn others_progress(&self) -> Result<Vec<(String, Vec<u8>)>, StorageError> {
        let place = Place { location: self.place.location.clone(), instance: None };
        let mut found = Vec::new();
        for (file, _) in place.list(PROGRESS)? {
            let Some(name) = file.strip_suffix(".json") else { continue };
            if Some(name) != self.place.instance.as_deref()
                && let Some((bytes, _)) = place.read(&format!("{PROGRESS}/{file}"))?
            {
                found.push((name.to_string(), bytes));
            }
        }
        Ok(found)
    }

    /// Numbers the next parts from the last commit again, after a checkpoint that failed part way:
    /// its retry writes the same rows over the same part names, and nothing is counted twice.
    pub fn forget_uncommitted(&mut self) {
        self.next_part = self.committed.clone();
    }
}

/// Names one opening of a storage (process id and clock): what a checkpoint's `writer` says, and
/// the start of its packs' names, which no other opening may write.
fn opening() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{}-{nanos:x}", std::process::id())
}

fn properties() -> WriterProperties {
    WriterProperties::builder().set_compression(Compression::SNAPPY).build()
}

fn part_name(seq: u64) -> String {
    format!("part-{seq:08}.parquet")
}

/// A part's name until the checkpoint that counts it is committed: hidden (a leading dot, and not
/// `.parquet`) from every reader.
fn pending_name(seq: u64) -> String {
    format!(".part-{seq:08}.parquet.pending")
}

/// Renames each `(pending, name)` pair (on object storage all at once). One already renamed (by
/// another instance settling the same parts) is no error.
fn rename_all(place: &Place, renames: Vec<(String, String)>) -> Result<(), StorageError> {
    match &place.location {
        Location::Local(root) => {
            let mut dirs = std::collections::BTreeSet::new();
            for (from, to) in &renames {
                let (from, to) = (root.join(from), root.join(to));
                match fs::rename(&from, &to) {
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound && to.exists() => {}
                    other => other.map_err(io_error(&from))?,
                }
                dirs.extend(to.parent().map(Path::to_path_buf));
            }
            for dir in dirs {
                File::open(&dir).and_then(|d| d.sync_all()).map_err(io_error(&dir))?;
            }
            Ok(())
        }
        Location::Bucket(bucket) => bucket.rename_all(renames),
    }
}

/// Whether the storage refuses writes now, and since when: the pipeline sets it while a checkpoint
/// waits for the storage, and `/ready` says so (the gauge alone does not tell an operator why).
#[derive(Default)]
pub struct Outage(std::sync::Mutex<Option<(chrono::DateTime<chrono::Utc>, String)>>);

impl Outage {
    /// A write failed with `error`; the outage started at the first failure.
    pub fn failed(&self, error: &str) {
        metrics::gauge!("bearwatch_storage_unavailable").set(1.0);
        let mut now = lock(&self.0);
        let since = now.as_ref().map_or_else(chrono::Utc::now, |(since, _)| *since);
        *now = Some((since, error.to_string()));
    }

    pub fn ended(&self) {
        metrics::gauge!("bearwatch_storage_unavailable").set(0.0);
        *lock(&self.0) = None;
    }

    /// What the outage is, for people; `None` while the storage takes writes.
    pub fn describe(&self) -> Option<String> {
        let now = lock(&self.0);
        now.as_ref().map(|(since, error)| {
            format!(
                "storage unavailable since {}: {error}; the pipeline waits and reads nothing more until it can write again (nothing is lost)",
                since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
            )
        })
    }
}

/// Settles another instance's parts that its last checkpoint committed but that are still pending
/// (it crashed before renaming them), so that readers see them. Leaves the rest: that instance may
/// be writing them now.
pub fn settle(location: &Location, instance: &str) -> Result<(), StorageError> {
    let place = Place { location: location.clone(), instance: Some(instance.to_string()) };
    let Some((bytes, _, _)) = read_checkpoint(&place)? else { return Ok(()) };
    let parts: Parts = parse_checkpoint(&place, &bytes)?;
    for (table, next) in parts.next_parts() {
        settle_parts(&place, table, next, false)?;
    }
    Ok(())
}

/// Writes `batches` (one schema, at least one batch) to `out` as one Parquet file, one row group
/// each; `name` is for errors. A failure of `out` itself (a full disk) is an I/O error, which a retry
/// can help, however the Parquet writer reports it (it may keep only its text).
fn write_parquet<W: Write + Send>(out: W, name: &Path, batches: &[RecordBatch], properties: &WriterProperties) -> Result<W, StorageError> {
    let mut out = NotingErrors { out, failed: None };
    let written = (|| {
        let schema = batches.first().ok_or_else(|| parquet::errors::ParquetError::General("no rows to write".into()))?.schema();
        let mut writer = ArrowWriter::try_new(&mut out, schema, Some(properties.clone()))?;
        for batch in batches {
            writer.write(batch)?;
            writer.flush()?;
        }
        writer.into_inner().map(drop)
    })();
    match (written, out.failed) {
        (Ok(()), _) => Ok(out.out),
        (Err(_), Some(reason)) => Err(StorageError::Io { path: name.to_path_buf(), reason }),
        (Err(e), None) => Err(StorageError::Parquet { path: name.to_path_buf(), reason: e.to_string() }),
    }
}

/// A writer that remembers its first error.
struct NotingErrors<W> {
    out: W,
    failed: Option<String>,
}

impl<W: Write> NotingErrors<W> {
    fn noted<T>(&mut self, result: std::io::Result<T>) -> std::io::Result<T> {
        if let Err(e) = &result {
            self.failed.get_or_insert_with(|| e.to_string());
        }
        result
    }
}

impl<W: Write> Write for NotingErrors<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let written = self.out.write(buf);
        self.noted(written)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        let flushed = self.out.flush();
        self.noted(flushed)
    }
}

/// `batches` (one schema, at least one batch) as the bytes of one Parquet file, one row group each.
fn encode(name: &str, batches: &[RecordBatch], properties: &WriterProperties) -> Result<Vec<u8>, StorageError> {
    write_parquet(Vec::new(), Path::new(name), batches, properties)
}

/// Writes `batches` (one schema, at least one batch) as `<dir>/<name>`, one row group each, through
/// a temp name, fsynced, then renamed. A failed write (a full disk) leaves no temp file behind.
fn write_file(dir: &Path, name: &str, batches: &[RecordBatch], properties: &WriterProperties) -> Result<(), StorageError> {
    let path = dir.join(name);
    let temp = dir.join(format!(".{name}.tmp"));
    let written = File::create(&temp).map_err(io_error(&temp)).and_then(|file| {
        let file = write_parquet(file, &path, batches, properties)?;
        file.sync_all().map_err(io_error(&temp))?;
        fs::rename(&temp, &path).map_err(io_error(&path))
    });
    if written.is_err() {
        let _ = fs::remove_file(&temp);
    }
    written
}

/// Appends `batch` to a journal table as a file of its own, `<created ms>-<unique>.parquet`, durable
/// before it returns (locally: fsynced file and folder; on object storage: one PUT that refuses to
/// replace anything); readers see all of it or none. Journals are shared by every instance. Returns
/// where it went.
pub fn append(location: &Location, table: Table, batch: &RecordBatch, unique: &str) -> Result<String, StorageError> {
    debug_assert!(Table::JOURNALS.contains(&table), "{} is written at checkpoints", table.name());
    let name = format!("{:013}-{unique}.parquet", chrono::Utc::now().timestamp_millis());
    if journals::entry(&name).map(|(_, level)| level) != Some(journals::Level::Append) {
        return Err(StorageError::Config { reason: format!("{unique:?} cannot name a journal file") });
    }
    let relative = format!("{}/{name}", table.name());
    match location {
        Location::Local(root) => {
            let dir = root.join(table.name());
            fs::create_dir_all(&dir).map_err(io_error(&dir))?;
            write_file(&dir, &name, std::slice::from_ref(batch), &properties())?;
            File::open(&dir).and_then(|d| d.sync_all()).map_err(io_error(&dir))?;
            Ok(root.join(relative).display().to_string())
        }
        Location::Bucket(bucket) => {
            bucket.put(&relative, encode(&bucket.url_of(&relative), std::slice::from_ref(batch), &properties())?, Mode::Create)?;
            Ok(bucket.url_of(&relative))
        }
    }
}

/// A journal table's finished files (names), oldest first: locally `append` writes each under a
/// temporary dot-name and renames it into place, and on object storage in one PUT, so a file listed
/// here is whole. None when nothing was appended yet.
pub fn journal_files(location: &Location, table: Table) -> Result<Vec<String>, StorageError> {
    let place = Place { location: location.clone(), instance: None };
    let mut names: Vec<String> = place.list(table.name())?.into_iter().map(|(name, _)| name).collect();
    names.retain(|n| n.ends_with(".parquet") && !n.starts_with('.'));
    names.sort();
    Ok(names)
}

/// Whether `table` holds any Parquet file (of `instance`, for a checkpointed table, when given).
pub fn holds_parts(location: &Location, instance: Option<&str>, table: Table) -> Result<bool, StorageError> {
    let place = Place { location: location.clone(), instance: instance.filter(|_| Table::CHECKPOINTED.contains(&table)).map(str::to_string) };
    Ok(place.list(&place.folder(table))?.iter().any(|(name, _)| name.ends_with(".parquet") && !name.starts_with('.')))
}

/// How many Parquet files a reader of the checkpointed tables opens: every instance's parts, less
/// those a merge holds.
pub fn visible_parts(location: &Location) -> Result<usize, StorageError> {
    let mut places = vec![Place { location: location.clone(), instance: None }];
    places.extend(instances(location)?.into_iter().map(|name| Place { location: location.clone(), instance: Some(name) }));
    let mut count = 0;
    for place in &places {
        for table in Table::CHECKPOINTED {
            count += compact::visible_parts(&place.list(&place.folder(table))?).len();
        }
    }
    Ok(count)
}

/// The checkpoint's bytes (of `instance`, when given), if there is one: for readers that follow a
/// pipeline's progress from outside it.
pub fn checkpoint(location: &Location, instance: Option<&str>) -> Result<Option<Vec<u8>>, StorageError> {
    let place = Place { location: location.clone(), instance: instance.map(str::to_string) };
    Ok(read_checkpoint(&place)?.map(|(bytes, _, _)| bytes))
}

/// The instances that have checkpointed into this storage (`checkpoints/<name>.json`): none
/// when it is one pipeline's alone.
fn instances(location: &Location) -> Result<Vec<String>, StorageError> {
    let place = Place { location: location.clone(), instance: None };
    let mut names: Vec<String> = place.list("checkpoints")?.into_iter().filter_map(|(name, _)| name.strip_suffix(".json").map(str::to_string)).collect();
    names.sort();
    Ok(names)
}

/// Whether several instances share this storage. On object storage a yes is remembered (instances
/// do not go away), which spares each SQL context a listing.
pub fn has_instances(location: &Location) -> Result<bool, StorageError> {
    if let Location::Bucket(bucket) = location
        && bucket.instances_seen()
    {
        return Ok(true);
    }
    let seen = !instances(location)?.is_empty();
    if let (true, Location::Bucket(bucket)) = (seen, location) {
        bucket.saw_instances();
    }
    Ok(seen)
}

/// Every batch of one journal file named by [`journal_files`] (for readers that follow a table
/// without SQL).
pub fn read_journal(location: &Location, table: Table, name: &str) -> Result<Vec<RecordBatch>, StorageError> {
    let gone = || StorageError::Parquet { path: PathBuf::from(format!("{location}/{}/{name}", table.name())), reason: "the file is gone".into() };
    read_journal_file(location, table, name)?.map(|file| file.batches).ok_or_else(gone)
}

/// One journal file named by [`journal_files`]: its rows and, for a merge, which files it holds
/// and their rows ([`journals`]). None when it is gone since it was listed: a merge that holds
/// it is listed now.
pub fn read_journal_file(location: &Location, table: Table, name: &str) -> Result<Option<JournalFile>, StorageError> {
    journals::read(&Place { location: location.clone(), instance: None }, table, name)
}

/// One round of merging `table`'s journal files as at `now` ([`journals`]): what the writer's
/// background runs every minute. No-op for the model registry's journals.
pub fn merge_journal(location: &Location, table: Table, now: chrono::DateTime<chrono::Utc>) -> Result<JournalRound, StorageError> {
    if !journals::MERGED.contains(&table) {
        return Ok(JournalRound::default());
    }
    let place = Place { location: location.clone(), instance: None };
    journals::merge_round(&place, table, now.timestamp_millis(), &std::sync::atomic::AtomicBool::new(false))
}

impl Parts {
    fn next_parts(&self) -> BTreeMap<Table, u64> {
        Table::CHECKPOINTED.iter().map(|t| (*t, self.next_part.get(t.name()).copied().unwrap_or(0))).collect()
    }
}

/// Deletes the checkpointed tables and the checkpoint of `place` (not the journals: people's work).
fn reset_tables(place: &Place) -> Result<(), StorageError> {
    for table in Table::CHECKPOINTED {
        // Without an instance name, the table's instances' folders go too: all of it.
        delete_folder(place, &place.folder(table))?;
    }
    place.delete(&place.checkpoint())?;
    delete_folder(place, &packed::folder(&place.checkpoint()))
}

/// Deletes `folder` and everything under it, at any depth (one that is not there is no error).
fn delete_folder(place: &Place, folder: &str) -> Result<(), StorageError> {
    match &place.location {
        Location::Local(root) => {
            let dir = root.join(folder);
            match fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(&dir)(e)),
                _ => Ok(()),
            }
        }
        Location::Bucket(bucket) => bucket.delete_many(&bucket.list_all(folder)?.into_iter().map(|name| format!("{folder}/{name}")).collect::<Vec<_>>()),
    }
}

/// One view of the checkpoint's JSON object: storage's [`Parts`] or the caller's state (each
/// ignores the other's fields), read straight from the bytes.
fn parse_checkpoint<T: DeserializeOwned>(place: &Place, bytes: &[u8]) -> Result<T, StorageError> {
    serde_json::from_slice(bytes).map_err(|e| StorageError::CorruptCheckpoint { path: PathBuf::from(place.name(&place.checkpoint())), reason: e.to_string() })
}

/// Replaces the JSON file `relative` under `root` whole (`files::replace`), its folder created if
/// need be.
fn replace_local(root: &Path, relative: &str, bytes: &[u8]) -> Result<(), StorageError> {
    let path = root.join(relative);
    let dir = path.parent().unwrap_or(root);
    fs::create_dir_all(dir).map_err(io_error(dir))?;
    crate::files::replace(&path, bytes).map_err(io_error(&path))
}

/// The checkpoint's JSON (joined from its pieces when it was written in pieces), its version, and
/// where its pieces lie; none when there is no checkpoint.
fn read_checkpoint(place: &Place) -> Result<Option<(Vec<u8>, Option<String>, packed::Stored)>, StorageError> {
    let relative = place.checkpoint();
    let corrupt = |reason: String| StorageError::CorruptCheckpoint { path: PathBuf::from(place.name(&relative)), reason };
    // A pack that is gone may have been deleted by its writer after a newer checkpoint: read that one.
    let mut attempts = 0;
    loop {
        attempts += 1;
        let Some((file, version)) = place.read(&relative)? else { return Ok(None) };
        let Some(packed) = packed::manifest(&file).map_err(&corrupt)? else { return Ok(Some((file, version, packed::Stored::default()))) };
        let folder = packed::folder(&relative);
        let files = place.read_many(&packed.pack_names().map(|name| format!("{folder}/{name}")).collect::<Vec<_>>())?;
        match packed.join(files) {
            Ok((json, stored)) => return Ok(Some((json, version, stored))),
            Err(packed::JoinError::Missing(_)) if attempts < 3 => {}
            Err(packed::JoinError::Missing(name)) => return Err(corrupt(format!("its pack {folder}/{name} is missing"))),
            Err(packed::JoinError::Corrupt(reason)) => return Err(corrupt(reason)),
        }
    }
}

/// Deletes the packs that the checkpoint does not reference (left by a crash between a pack and
/// its checkpoint). Local storage, where this process holds the storage (or its instance) alone;
/// object storage has [`sweep_stale_packs`].
fn sweep_packs(place: &Place, stored: &packed::Stored) -> Result<(), StorageError> {
    let folder = packed::folder(&place.checkpoint());
    let listed = place.list(&folder)?.into_iter().map(|(name, _)| name);
    delete_unreferenced_packs(place, stored, listed)
}

/// How often a process on object storage sweeps the packs no checkpoint references: at its first
/// commit (a crash's leftover is the previous process's) and then once an hour (one HEAD and one
/// listing).
const SWEEP_PACKS_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// How much older than the checkpoint a pack must be to be swept: room for the store's servers'
/// clocks to disagree (its times are the only clock the writers share).
const STALE_BY: chrono::TimeDelta = chrono::TimeDelta::seconds(10);

/// On object storage, deletes the packs that the checkpoint this process just committed does not
/// reference and that were written [`STALE_BY`] before it: left by a crash, or by a process fenced
/// off, between a pack and its checkpoint. Another process of the instance may be about to commit
/// a pack it just wrote, but it read this checkpoint first (a commit must replace the version it
/// read), so its pack is newer than this checkpoint and stays; if the checkpoint there is no
/// longer this process's own, nothing is deleted.
fn sweep_stale_packs(place: &Place, bucket: &Bucket, stored: &packed::Stored, version: Option<&str>) -> Result<(), StorageError> {
    let relative = place.checkpoint();
    let Some((Some(there), written)) = bucket.head(&relative)? else { return Ok(()) };
    if version != Some(there.as_str()) {
        return Ok(());
    }
    let stale = bucket.list_modified(&packed::folder(&relative))?.into_iter().filter(|(_, at)| *at + STALE_BY < written).map(|(name, _)| name);
    delete_unreferenced_packs(place, stored, stale)
}

fn delete_unreferenced_packs(place: &Place, stored: &packed::Stored, names: impl Iterator<Item = String>) -> Result<(), StorageError> {
    let folder = packed::folder(&place.checkpoint());
    let referenced: std::collections::HashSet<&String> = stored.packs().collect();
    let unreferenced: Vec<String> = names.filter(|name| !referenced.contains(name)).map(|name| format!("{folder}/{name}")).collect();
    for pack in &unreferenced {
        tracing::info!(file = %place.name(pack), "removing a checkpoint pack no checkpoint references");
    }
    place.delete_many(&unreferenced)
}

/// Replaces the checkpoint; on object storage only if `version` (none: no checkpoint) is still the
/// one there. A big one is written in pieces, the new ones in a pack named `pack` ([`packed`]);
/// `last` says where the pieces of the checkpoint it replaces lie, and is updated. Returns the new
/// version.
fn write_checkpoint<S: Serialize>(place: &Place, checkpoint: &Written<'_, S>, version: Option<&str>, last: &mut packed::Stored, pack: &str) -> Result<Option<String>, StorageError> {
    let relative = place.checkpoint();
    let failed = |reason: String| StorageError::Io { path: PathBuf::from(place.name(&relative)), reason };
    let json = serde_json::to_vec(checkpoint).map_err(|e| failed(e.to_string()))?;
    let state_bytes = json.len();
    let encoded = packed::encode(json, last, pack).map_err(failed)?;
    let folder = packed::folder(&relative);
    let mut written = encoded.file.len();
    if let Some((name, bytes)) = &encoded.pack {
        written += bytes.len();
        let pack = format!("{folder}/{name}");
        let put = match &place.location {
            Location::Local(root) => replace_local(root, &pack, bytes),
            Location::Bucket(bucket) => bucket.put(&pack, bytes.clone(), Mode::Overwrite).map(drop),
        };
        if let Err(e) = put {
            last.unreferenced(name.clone());
            return Err(e);
        }
    }
    let version = match replace_checkpoint(place, &relative, encoded.file, version) {
        Ok(version) => version,
        Err(e) => {
            if let Some((name, _)) = encoded.pack {
                last.unreferenced(name);
            }
            return Err(e);
        }
    };
    let unused = last.unused_after(&encoded.stored);
    *last = encoded.stored;
    if let Err(e) = place.delete_many(&unused.iter().map(|name| format!("{folder}/{name}")).collect::<Vec<_>>()) {
        tracing::warn!(error = %e, "checkpoint packs no checkpoint uses are deleted after the next checkpoint");
        unused.into_iter().for_each(|name| last.unreferenced(name));
    }
    metrics::counter!("bearwatch_checkpoint_written_bytes_total").increment(written as u64);
    metrics::gauge!("bearwatch_checkpoint_state_bytes").set(state_bytes as f64);
    Ok(version)
}

/// Replaces the checkpoint file with `bytes`; on object storage only if `version` is still there.
fn replace_checkpoint(place: &Place, relative: &str, bytes: Vec<u8>, version: Option<&str>) -> Result<Option<String>, StorageError> {
    match &place.location {
        Location::Local(root) => replace_local(root, relative, &bytes).map(|()| None),
        Location::Bucket(bucket) => {
            let mode = match version {
                Some(etag) => Mode::Replace(etag),
                None => Mode::Create,
            };
            match bucket.put(relative, bytes.clone(), mode) {
                // Refused: someone else wrote since, unless what is there is this very write (a
                // retry of a PUT whose first answer was lost finds its own bytes).
                Err(StorageError::Object { precondition: true, url, .. }) => match bucket.get(relative)? {
                    Some((there, version)) if there[..] == bytes[..] => Ok(version),
                    _ => Err(StorageError::Fenced { url }),
                },
                other => other,
            }
        }
    }
}

/// Every part the checkpoint counts (numbers below `next_part`, not accepted as lost) that is
/// missing or unreadable, with what is wrong with it, by the part numbers its file holds. Locally
/// each file's Parquet footer is read; on object storage (where a part is written in one PUT and
/// cannot be cut short by a crash) one listing per table finds missing and empty parts.
fn damaged_parts(place: &Place, next_part: &BTreeMap<Table, u64>, lost: &BTreeMap<String, Vec<u64>>) -> Result<Vec<(Table, (u64, u64), String)>, StorageError> {
    let mut damaged = Vec::new();
    for (&table, &next) in next_part {
        if next == 0 {
            continue;
        }
        let lost = lost.get(table.name()).map(Vec::as_slice).unwrap_or_default();
        let listed = place.list(&place.folder(table))?;
        let mut files = compact::visible_parts(&listed);
        files.retain(|(_, (_, last), _)| *last < next);
        for &(name, span, bytes) in &files {
            let relative = format!("{}/{name}", place.folder(table));
            let problem = match &place.location {
                _ if bytes == 0 => Some("is unreadable (empty)".to_string()),
                Location::Local(root) => match File::open(root.join(&relative)) {
                    Err(e) => Some(format!("cannot be opened ({e})")),
                    Ok(file) => parquet::file::reader::SerializedFileReader::new(file).err().map(|e| format!("is unreadable ({e})")),
                },
                Location::Bucket(_) => None,
            };
            if let Some(problem) = problem {
                damaged.push((table, span, format!("{relative} {problem}")));
            }
        }
        // Numbers that no file holds; the files are sorted and do not overlap.
        let mut held = files.iter().map(|(_, span, _)| *span).peekable();
        for seq in (0..next).filter(|seq| !lost.contains(seq)) {
            while held.peek().is_some_and(|(_, last)| *last < seq) {
                held.next();
            }
            if !held.peek().is_some_and(|(first, _)| *first <= seq) {
                damaged.push((table, (seq, seq), format!("{} is missing", place.part(table, seq))));
            }
        }
    }
    Ok(damaged)
}

/// Moves a damaged part (holding part numbers `span`) to `damaged/<table>-<part>` (if it is there
/// at all).
fn set_aside(place: &Place, table: Table, span: (u64, u64)) -> Result<(), StorageError> {
    let name = compact::merged_name(span.0, span.1);
    let relative = format!("{}/{name}", place.folder(table));
    let aside = format!("damaged/{}-{}{name}", table.name(), place.instance.as_deref().map(|i| format!("{i}-")).unwrap_or_default());
    match &place.location {
        Location::Local(root) => {
            let path = root.join(&relative);
            if path.exists() {
                let dir = root.join("damaged");
                fs::create_dir_all(&dir).map_err(io_error(&dir))?;
                fs::rename(&path, root.join(aside)).map_err(io_error(&path))?;
            }
        }
        Location::Bucket(bucket) => {
            if let Some((bytes, _)) = bucket.get(&relative)? {
                bucket.put(&aside, bytes.to_vec(), Mode::Overwrite)?;
                bucket.delete(&relative)?;
            }
        }
    }
    Ok(())
}

/// What one round of [`compact_table`] did.
enum Merge {
    Nothing,
    Merged { parts: usize, into: String },
    /// The parts cannot be merged without losing data; why.
    Refused(String),
}

/// How long a merge's inputs stay after the merge is in place, at least: a query that listed the
/// folder before the merge appeared (SQL on object storage reuses a listing for a second) still
/// finds the files it reads. Longer while a query of this process that started before then (or
/// within this much after: it may have listed before) is still reading ([`ReadPin`]), up to
/// [`DELETE_WAIT_MAX`]. A query of another process that meets a deleted part runs again on a fresh
/// listing (`sql::run`).
const DELETE_GRACE: std::time::Duration = std::time::Duration::from_secs(3);
/// The longest a merge's inputs wait for queries to finish (a bound on the files kept).
const DELETE_WAIT_MAX: std::time::Duration = std::time::Duration::from_secs(600);

/// One round over each merged journal ([`journals::MERGED`]), logged and counted.
fn merge_journals(root: &Place, stopping: &std::sync::atomic::AtomicBool) {
    for table in journals::MERGED {
        let started = std::time::Instant::now();
        match journals::merge_round(root, table, chrono::Utc::now().timestamp_millis(), stopping) {
            Ok(round) => {
                metrics::counter!("bearwatch_storage_journal_merges_total").increment(round.merges as u64);
                metrics::counter!("bearwatch_storage_journal_files_merged_total").increment(round.deleted as u64);
                if round.merges + round.deleted + round.rescued > 0 {
                    tracing::debug!(table = table.name(), merges = round.merges, deleted = round.deleted, rescued = round.rescued, took = ?started.elapsed(), "merged journal files");
                }
                for bucket in round.refused {
                    tracing::warn!(table = table.name(), %bucket, "journal files not merged: their columns differ beyond added nullable ones");
                }
            }
            Err(e) => {
                metrics::counter!("bearwatch_storage_compaction_errors_total").increment(1);
                tracing::warn!(table = table.name(), error = %e, "merging journal files failed; tried again in a minute");
            }
        }
    }
}

/// Waits, after a merge was in place at `merged`, until its inputs may go: [`DELETE_GRACE`] and
/// no query of this process that may have listed them still reading, at most [`DELETE_WAIT_MAX`];
/// at once when `stopping`.
fn wait_for_readers(merged: std::time::Instant, stopping: &std::sync::atomic::AtomicBool) {
    let may_have_listed = |started: std::time::Instant| started < merged + DELETE_GRACE;
    while !stopping.load(std::sync::atomic::Ordering::Acquire)
        && merged.elapsed() < DELETE_WAIT_MAX
        && (merged.elapsed() < DELETE_GRACE || compact::oldest_reader().is_some_and(may_have_listed))
    {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Merges the next run of small named parts of `table` below `published` ([`compact::plan`]) into
/// one, then deletes them ([`DELETE_GRACE`] later, or at once when `stopping`).
fn compact_table(place: &Place, table: Table, published: u64, stopping: &std::sync::atomic::AtomicBool) -> Result<Merge, StorageError> {
    let folder = place.folder(table);
    let Some(run) = compact::plan(&place.list(&folder)?, published) else { return Ok(Merge::Nothing) };
    let (first, last) = (run[0].1.0, run[run.len() - 1].1.1);
    let merged_name = compact::merged_name(first, last);
    let into = format!("{folder}/{merged_name}");
    // One batch per part, written as a row group of its own: the merge reads as its parts did, in
    // the same pieces (a query's operators see the batches they saw before the merge).
    let mut batches = Vec::new();
    for (name, _) in &run {
        let relative = format!("{folder}/{name}");
        let unreadable = |reason: String| StorageError::Parquet { path: PathBuf::from(place.name(&relative)), reason };
        // Gone: another round (a restart's) merged it already; this one stops.
        let Some((bytes, _)) = place.read(&relative)? else { return Ok(Merge::Nothing) };
        let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes))
            .and_then(|b| b.build())
            .map_err(|e| unreadable(e.to_string()))?;
        let part: Vec<RecordBatch> = reader.collect::<Result<_, _>>().map_err(|e| unreadable(e.to_string()))?;
        if let Some(first) = part.first() {
            batches.push(arrow::compute::concat_batches(&first.schema(), &part).map_err(|e| unreadable(e.to_string()))?);
        }
    }
    // The newest part's columns; older parts gain the nullable columns added since.
    let Some(schema) = batches.last().map(RecordBatch::schema) else { return Ok(Merge::Nothing) };
    let Some(batches) = batches.iter().map(|b| compact::align(b, &schema)).collect::<Option<Vec<_>>>() else {
        return Ok(Merge::Refused(format!("{} parts {first}..={last} have columns that differ beyond added nullable ones", table.name())));
    };
    match &place.location {
        Location::Local(root) => {
            let dir = root.join(&folder);
            write_file(&dir, &merged_name, &batches, &properties())?;
            File::open(&dir).and_then(|d| d.sync_all()).map_err(io_error(&dir))?;
        }
        Location::Bucket(bucket) => {
            bucket.put(&into, encode(&bucket.url_of(&into), &batches, &properties())?, Mode::Overwrite)?;
        }
    }
    wait_for_readers(std::time::Instant::now(), stopping);
    place.delete_many(&run.iter().map(|(name, _)| format!("{folder}/{name}")).collect::<Vec<_>>())?;
    Ok(Merge::Merged { parts: run.len(), into })
}

/// Renames the pending parts below `next` (committed: a crash came before their rename) and, with
/// `leftovers` (the writer itself, on start), deletes the parts numbered `next` or later and
/// unfinished temp files: writes that a crash interrupted.
fn settle_parts(place: &Place, table: Table, next: u64, leftovers: bool) -> Result<(), StorageError> {
    let folder = place.folder(table);
    let mut committed = Vec::new();
    let listed = place.list(&folder)?;
    if leftovers {
        // A merge is in place but some of its inputs were not deleted yet (a crash in between).
        for name in compact::superseded(listed.iter().map(|(n, _)| n.as_str())) {
            let relative = format!("{folder}/{name}");
            tracing::info!(file = %place.name(&relative), "removing a part that a merge holds");
            place.delete(&relative)?;
        }
    }
    for (name, _) in listed {
        let seq = |name: &str, prefix: &str, suffix: &str| name.strip_prefix(prefix).and_then(|n| n.strip_suffix(suffix)).and_then(|n| n.parse::<u64>().ok());
        let (part, pending) = (seq(&name, "part-", ".parquet"), seq(&name, ".part-", ".parquet.pending"));
        if let Some(seq) = pending.filter(|seq| *seq < next) {
            committed.push((place.pending(table, seq), place.part(table, seq)));
        } else if leftovers && (name.ends_with(".tmp") || part.or(pending).is_some_and(|seq| seq >= next)) {
            let relative = format!("{folder}/{name}");
            tracing::info!(file = %place.name(&relative), "removing a part written after the last checkpoint");
            place.delete(&relative)?;
        }
    }
    if !committed.is_empty() {
        tracing::info!(table = table.name(), parts = committed.len(), "renaming parts the last checkpoint committed");
    }
    rename_all(place, committed)
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

    fn here(dir: &tempfile::TempDir) -> Location {
        Location::from(dir.path())
    }

    fn exists(path: &str) -> bool {
        Path::new(path).exists()
    }

    fn batch() -> RecordBatch {
        let schema = Schema::new(vec![Field::new("n", DataType::Int64, false)]);
        RecordBatch::try_new(std::sync::Arc::new(schema), vec![std::sync::Arc::new(Int64Array::from(vec![1, 2]))]).unwrap()
    }

    /// A full disk is the storage's trouble, not the data's: the checkpoint waits on it and retries.
    #[test]
    fn a_parquet_write_that_runs_out_of_disk_is_a_retryable_io_error() {
        struct Full;
        impl Write for Full {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from(std::io::ErrorKind::StorageFull))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let properties = WriterProperties::builder().build();
        let error = write_parquet(Full, Path::new("news/part"), &[batch()], &properties).err().expect("the write fails");
        assert!(matches!(error, StorageError::Io { .. }) && error.retryable() && error.class() == ErrorClass::External, "{error:?}");
    }

    #[test]
    fn parts_after_the_last_checkpoint_are_hidden_and_removed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut storage, restored) = Storage::open::<State>(&here(&dir), None, false).unwrap();
        assert!(restored.is_none());
        let batch = batch();
        let kept = storage.write(Table::Windows, &batch).unwrap();
        assert!(!exists(&kept), "hidden until the checkpoint commits it");
        storage.commit(&checkpoint()).unwrap();
        assert!(exists(&kept), "named once committed");
        let orphan = storage.write(Table::Windows, &batch).unwrap();
        let pending = dir.path().join("windows/.part-00000001.parquet.pending");
        assert!(pending.exists() && !exists(&orphan), "an uncommitted part is hidden from readers");
        fs::write(dir.path().join("news/.part-00000000.parquet.tmp"), b"half").unwrap();

        let (mut storage, restored) = Storage::open::<State>(&here(&dir), None, false).unwrap();
        let restored = restored.unwrap();
        assert_eq!(restored.offsets["news"][&0], 42);
        assert_eq!(restored.received, 3);
        assert!(exists(&kept));
        assert!(!pending.exists() && !exists(&orphan), "a part written after the checkpoint must go");
        assert!(!dir.path().join("news/.part-00000000.parquet.tmp").exists());
        assert_eq!(storage.write(Table::Windows, &batch).unwrap(), orphan, "numbering resumes at the checkpoint");

        let (_, restored) = Storage::open::<State>(&here(&dir), None, true).unwrap();
        assert!(restored.is_none() && !exists(&kept), "reset starts from nothing");
    }

    /// A crash between the checkpoint and the renames leaves committed parts hidden: the writer's
    /// next start names them, and so does another instance settling its parts (which leaves the
    /// parts the writer has not committed yet).
    #[test]
    fn committed_parts_left_pending_by_a_crash_are_named_by_the_next_start_or_another_instance() {
        let dir = tempfile::tempdir().unwrap();
        let hide = |named: &str| {
            let named = Path::new(named);
            fs::rename(named, named.with_file_name(format!(".{}.pending", named.file_name().unwrap().to_str().unwrap()))).unwrap();
        };
        let (mut storage, _) = Storage::open::<State>(&here(&dir), Some("a"), false).unwrap();
        let first = storage.write(Table::News, &batch()).unwrap();
        storage.commit(&checkpoint()).unwrap();
        hide(&first);
        assert!(!exists(&first));
        Storage::open::<State>(&here(&dir), Some("a"), false).unwrap();
        assert!(exists(&first), "the writer's next start names it");

        let (mut storage, _) = Storage::open::<State>(&here(&dir), Some("a"), false).unwrap();
        let second = storage.write(Table::News, &batch()).unwrap();
        storage.commit(&checkpoint()).unwrap();
        hide(&second);
        let writing = storage.write(Table::News, &batch()).unwrap();
        settle(&here(&dir), "a").unwrap();
        assert!(exists(&second), "another instance names the committed part");
        assert!(dir.path().join("news/instance=a/.part-00000002.parquet.pending").exists(), "and leaves the one being written");
        storage.commit(&checkpoint()).unwrap();
        assert!(exists(&writing));
    }

    #[test]
    fn journal_appends_are_outside_the_checkpoint_and_survive_reset_and_restarts() {
        let dir = tempfile::tempdir().unwrap();
        let (mut storage, _) = Storage::open::<State>(&here(&dir), None, false).unwrap();
        let first = append(&here(&dir), Table::LabelFeedback, &batch(), "a1").unwrap();
        storage.commit(&checkpoint()).unwrap();
        let second = append(&here(&dir), Table::LabelFeedback, &batch(), "b2").unwrap();
        assert_ne!(first, second);
        assert!(!dir.path().join("label_feedback").read_dir().unwrap().any(|e| e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
        // An append after the last checkpoint is no crash leftover, and a reset keeps people's work.
        Storage::open::<State>(&here(&dir), None, false).unwrap();
        Storage::open::<State>(&here(&dir), None, true).unwrap();
        assert!(exists(&first) && exists(&second));
        let written = fs::read_to_string(dir.path().join("checkpoint.json")).unwrap_or_default();
        assert!(!written.contains("label_feedback"), "journals have no part numbers: {written}");
    }

    #[test]
    fn a_missing_or_truncated_part_refuses_the_start_until_repaired() {
        let dir = tempfile::tempdir().unwrap();
        let (mut storage, _) = Storage::open::<State>(&here(&dir), None, false).unwrap();
        let batch = batch();
        let first = storage.write(Table::Windows, &batch).unwrap();
        let second = storage.write(Table::Windows, &batch).unwrap();
        let third = storage.write(Table::Windows, &batch).unwrap();
        storage.commit(&checkpoint()).unwrap();
        fs::remove_file(&first).unwrap();
        let bytes = fs::read(&second).unwrap();
        fs::write(&second, &bytes[..bytes.len() / 2]).unwrap();

        let err = Storage::open::<State>(&here(&dir), None, false).err().unwrap().to_string();
        assert!(err.contains("windows/part-00000000.parquet is missing"), "{err}");
        assert!(err.contains("windows/part-00000001.parquet is unreadable"), "{err}");
        assert!(err.contains("bearwatch storage repair"), "{err}");

        let found = Storage::repair(&here(&dir), None).unwrap();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(dir.path().join("damaged/windows-part-00000001.parquet").exists());
        let (mut storage, restored) = Storage::open::<serde_json::Value>(&here(&dir), None, false).unwrap();
        let restored = restored.unwrap();
        assert!(exists(&third) && restored["lost_parts"]["windows"] == serde_json::json!([0, 1]));
        assert_eq!(restored["offsets"]["news"]["0"], 42, "repair keeps the caller's state");
        // What was accepted as lost stays accepted through later checkpoints.
        storage.commit(&checkpoint()).unwrap();
        assert!(Storage::open::<State>(&here(&dir), None, false).is_ok());
        assert!(Storage::repair(&here(&dir), None).unwrap().is_empty());
    }

    /// Twenty checkpoints' parts become one merge and the newest few, in the background; a crash
    /// between a merge and the deletion of its inputs is cleaned up at the next start; a damaged
    /// merge is set aside whole by a repair.
    #[test]
    fn small_parts_merge_in_the_background_and_a_restart_cleans_up_after_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("windows");
        let listed = || -> Vec<String> {
            let mut names: Vec<String> = fs::read_dir(&folder).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
            names.sort();
            names
        };
        let rows = |names: &[String]| -> usize {
            let files: Vec<(String, u64)> = names.iter().map(|n| (n.clone(), 0)).collect();
            compact::visible_parts(&files)
                .into_iter()
                .map(|(n, _, _)| parquet::file::reader::SerializedFileReader::new(File::open(folder.join(n)).unwrap()).unwrap())
                .map(|r| parquet::file::reader::FileReader::metadata(&r).file_metadata().num_rows() as usize)
                .sum()
        };
        let (mut storage, _) = Storage::open::<State>(&here(&dir), None, false).unwrap();
        for _ in 0..20 {
            storage.write(Table::Windows, &batch()).unwrap();
            storage.commit(&checkpoint()).unwrap();
            assert!(storage.wait_for_compaction(std::time::Duration::from_secs(30)));
        }
        let mut expected = vec![compact::merged_name(0, 14)];
        expected.extend((15..20).map(part_name));
        assert_eq!(listed(), expected, "0..=7 merged at the 8th checkpoint, then with 8..=14 at the 15th");
        assert_eq!(rows(&listed()), 40);

        // A crash after a merge, before its inputs were all deleted, and during the next merge.
        write_file(&folder, &part_name(3), &[batch()], &properties()).unwrap();
        fs::write(folder.join(".part-00000000-00000019.parquet.tmp"), b"half").unwrap();
        assert_eq!(rows(&listed()), 40, "readers skip what a merge holds");
        drop(storage);
        Storage::open::<State>(&here(&dir), None, false).unwrap();
        assert_eq!(listed(), expected, "the start deletes the merged input and the unfinished merge");

        let merged = folder.join(compact::merged_name(0, 14));
        let bytes = fs::read(&merged).unwrap();
        fs::write(&merged, &bytes[..bytes.len() / 2]).unwrap();
        let err = Storage::open::<State>(&here(&dir), None, false).err().unwrap().to_string();
        assert!(err.contains("windows/part-00000000-00000014.parquet is unreadable"), "{err}");
        assert_eq!(Storage::repair(&here(&dir), None).unwrap().len(), 1);
        assert!(dir.path().join("damaged/windows-part-00000000-00000014.parquet").exists());
        let (_, restored) = Storage::open::<serde_json::Value>(&here(&dir), None, false).unwrap();
        assert_eq!(restored.unwrap()["lost_parts"]["windows"], serde_json::json!((0..15).collect::<Vec<u64>>()));
    }

    /// A state of `n` tracked stories: about 70 bytes each.
    fn big(n: usize, first: usize) -> serde_json::Value {
        let tracked: Vec<String> = (first..first + n).map(|i| format!("story {i}: shares of company {} fell {} percent", i * 7919 % 1013, i % 97)).collect();
        serde_json::json!({ "offsets": { "news": { "0": first + n } }, "tracked": tracked })
    }

    fn packs(dir: &tempfile::TempDir) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir.path().join("checkpoint.packs")).map_or(Vec::new(), |d| d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect());
        names.sort();
        names
    }

    /// A big state is written as a manifest and packs of the pieces that changed; it reads back as
    /// it was written, through restarts, a repair and a reset, and no pack outlives its use.
    #[test]
    fn a_big_checkpoint_is_written_in_pieces_and_reads_back_whole() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("checkpoint.json");
        let (mut storage, _) = Storage::open::<serde_json::Value>(&here(&dir), None, false).unwrap();
        storage.commit(&big(30_000, 0)).unwrap();
        let manifest = fs::metadata(&file).unwrap().len();
        let first = packs(&dir);
        assert!(fs::read(&file).unwrap().starts_with(br#"{"packed":"#) && first.len() == 1);
        // Twenty stories more: a small pack beside the first, which still serves.
        storage.commit(&big(30_000, 20)).unwrap();
        let both = packs(&dir);
        let size = |name: &String| fs::metadata(dir.path().join("checkpoint.packs").join(name)).unwrap().len();
        assert_eq!(both.len(), 2, "{both:?}");
        assert!(both.iter().map(size).min().unwrap() * 20 < both.iter().map(size).max().unwrap(), "the second pack holds the changes only");
        drop(storage);

        let (mut storage, restored) = Storage::open::<serde_json::Value>(&here(&dir), None, false).unwrap();
        let restored = restored.unwrap();
        assert_eq!(restored["tracked"], big(30_000, 20)["tracked"]);
        assert_eq!(restored["offsets"]["news"]["0"], 30_020);
        // Restored, it goes on referencing the first pack; the second, of which less than half
        // still serves, is dissolved into the third.
        storage.commit(&big(30_000, 40)).unwrap();
        let after = packs(&dir);
        assert!(after.len() == 2 && after.contains(&first[0]) && !after.contains(&both.iter().find(|n| !first.contains(n)).unwrap().clone()), "{after:?}");
        assert!(fs::metadata(&file).unwrap().len() < manifest * 2, "the manifest lists pieces, it holds none");

        // A crash between a pack and its checkpoint leaves a pack no checkpoint references.
        fs::write(dir.path().join("checkpoint.packs/9-9.pack"), b"left by a crash").unwrap();
        drop(storage);
        let (mut storage, _) = Storage::open::<serde_json::Value>(&here(&dir), None, false).unwrap();
        assert_eq!(packs(&dir), after, "swept on open");

        // Small again: one JSON file, and the packs go.
        storage.commit(&checkpoint()).unwrap();
        assert!(packs(&dir).is_empty());
        assert!(serde_json::from_slice::<State>(&fs::read(&file).unwrap()).is_ok());

        // A repair writes the state back in pieces, and what it reads is what it keeps.
        storage.write(Table::Windows, &batch()).unwrap();
        let part = storage.write(Table::Windows, &batch()).unwrap();
        storage.commit(&big(30_000, 60)).unwrap();
        fs::remove_file(&part).unwrap();
        drop(storage);
        assert_eq!(Storage::repair(&here(&dir), None).unwrap().len(), 1);
        let (storage, restored) = Storage::open::<serde_json::Value>(&here(&dir), None, false).unwrap();
        assert_eq!(restored.unwrap()["tracked"], big(30_000, 60)["tracked"]);
        assert_eq!(packs(&dir).len(), 2, "the repair's pack (its part numbers) beside the one it still uses");
        drop(storage);

        // A damaged pack is a corrupt checkpoint, not a fresh start.
        let name = packs(&dir).into_iter().next().unwrap();
        fs::write(dir.path().join("checkpoint.packs").join(&name), b"damaged").unwrap();
        let err = Storage::open::<State>(&here(&dir), None, false).err().unwrap().to_string();
        assert!(err.contains("move it away") && err.contains(&name), "{err}");

        // A reset deletes them with the checkpoint.
        let (_, restored) = Storage::open::<State>(&here(&dir), None, true).unwrap();
        assert!(restored.is_none() && packs(&dir).is_empty() && !dir.path().join("checkpoint.packs").exists());
    }

    #[test]
    fn a_corrupt_checkpoint_is_an_error_not_a_fresh_start() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("checkpoint.json"), b"{").unwrap();
        let err = Storage::open::<State>(&here(&dir), None, false).err().unwrap();
        assert!(err.to_string().contains("move it away"), "{err}");
    }
}
