//! Journals merge too. Each analyst action appends a file of its own ([`super::append`],
//! `<created ms>-<unique>.parquet`), thousands a day from every writer, and every reader lists and
//! opens them all (20,001 one-row files: `SELECT count(*)` took 1.9 s). So the writer's background
//! round merges them by time: the appends of one UTC hour, once that hour ended [`SETTLE_MS`] ago,
//! become `<hour start ms>-merged-hour.parquet`; a day whose every file is an hour's merge becomes
//! `<day start ms>-merged-day.parquet`. A journal then keeps one file a day, and the last day's hours.
//!
//! Which files a merge holds is in its name: a reader skips every file of a lower level whose time
//! falls in a listed merge's bucket ([`covered`]; bearwatch's SQL through [`super::Visible`], the
//! feedback tail). What exactly it holds, file by file with row counts, is in its Parquet metadata
//! ([`HELD_KEY`]): the feedback tail reads it to skip the rows it applied before the merge, and the
//! merger before it deletes anything.
//!
//! Several writers may merge at once: a merge's name is created once (locally a hard link, which
//! refuses an existing name; on object storage a PUT that refuses one), so one of them writes each
//! bucket's merge. A day merges only once none of its files is a lone append, so no hour's merge is
//! made inside a merged day. A file that lands in a merged bucket after the merge (from a writer
//! whose clock is over [`SETTLE_MS`] behind, or one that raced the merge) is hidden by the name but
//! not held: the next round writes its rows again under a fresh name and deletes it ([`settle`]).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ops::Range;

use arrow::array::RecordBatch;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use super::{Location, Mode, Place, StorageError, Table};

/// How long after its bucket ends a bucket merges: appends are named by their writer's clock when
/// they start, so one that lands later than this in a merged bucket needs a clock that far behind.
pub const SETTLE_MS: i64 = 3_600_000;
const HOUR_MS: i64 = 3_600_000;
const DAY_MS: i64 = 86_400_000;
/// Bytes merged at once, at most (a merge holds its inputs and its output in memory): a bucket
/// with more stays as it is.
const MAX_BYTES: u64 = 64 << 20;
/// Merges one round writes, at most: a backlog (a journal from before merging) takes several.
const MAX_MERGES: usize = 48;
/// The Parquet metadata key of what a merge holds ([`Held`], as JSON).
pub const HELD_KEY: &str = "bearwatch.held";

/// The journals that merge: those every analyst action appends to. The model registry's journals
/// change when a model is promoted, and the pipeline reads their file count as a change signal.
pub const MERGED: [Table; 3] = [Table::LabelFeedback, Table::AlertVerdicts, Table::MissedEvents];

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    Append,
    Hour,
    Day,
}

impl Level {
    const MERGES: [Level; 2] = [Level::Hour, Level::Day];

    fn span_ms(self) -> i64 {
        match self {
            Level::Append => 1,
            Level::Hour => HOUR_MS,
            Level::Day => DAY_MS,
        }
    }

    fn word(self) -> &'static str {
        match self {
            Level::Append => "append",
            Level::Hour => "hour",
            Level::Day => "day",
        }
    }
}

/// A journal file's time (ms since the epoch: an append's creation, a merge's bucket start) and
/// level, from its name; none for any other name (temp files).
pub fn entry(name: &str) -> Option<(i64, Level)> {
    let stem = name.strip_suffix(".parquet")?;
    let (digits, rest) = (stem.get(..13)?, stem.get(13..)?);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let level = match rest {
        "-merged-hour" => Level::Hour,
        "-merged-day" => Level::Day,
        _ if rest.len() > 1 && rest.starts_with('-') => Level::Append,
        _ => return None,
    };
    Some((digits.parse().ok()?, level))
}

/// An append's id, what follows its time (`-<unique>.parquet`): a copy written again keeps it.
/// None for a merge or any other name.
pub fn append_id(name: &str) -> Option<&str> {
    entry(name).filter(|(_, level)| *level == Level::Append).and_then(|_| name.get(13..))
}

fn bucket(ms: i64, level: Level) -> i64 {
    ms - ms.rem_euclid(level.span_ms())
}

/// The name of the merge of `level` whose bucket starts at `start` (ms).
pub fn merged_name(level: Level, start: i64) -> String {
    format!("{start:013}-merged-{}.parquet", level.word())
}

/// The level of the listed merge whose bucket holds a file of `level` at `ms`: the highest, since
/// its record holds the lower ones'.
fn covering(ms: i64, level: Level, merges: &HashSet<(Level, i64)>) -> Option<Level> {
    Level::MERGES.iter().rev().copied().filter(|&l| l > level).find(|&l| merges.contains(&(l, bucket(ms, l))))
}

fn merges<'a>(entries: impl IntoIterator<Item = &'a (&'a str, i64, Level)>) -> HashSet<(Level, i64)> {
    entries.into_iter().filter(|e| e.2 != Level::Append).map(|e| (e.2, e.1)).collect()
}

/// Of one journal folder's names, those a reader skips: each file of a lower level whose time
/// falls in the bucket of a listed merge.
pub fn covered<'a>(names: impl IntoIterator<Item = &'a str>) -> HashSet<&'a str> {
    let entries: Vec<(&str, i64, Level)> = names.into_iter().filter_map(|n| entry(n).map(|(ms, l)| (n, ms, l))).collect();
    let merges = merges(&entries);
    entries.iter().filter(|(_, ms, level)| covering(*ms, *level, &merges).is_some()).map(|e| e.0).collect()
}

/// One file a merge holds, in the merge's row order: an append, or an earlier merge with what it held.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Held {
    pub name: String,
    pub rows: usize,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<Held>,
}

impl Held {
    /// Every append `list` holds, at any depth, with its rows' range in the file that holds `list`
    /// (whose rows start at `at`).
    pub fn appends(list: &[Held], at: usize) -> Vec<(&str, Range<usize>)> {
        let mut out = Vec::new();
        let mut at = at;
        for item in list {
            if item.held.is_empty() {
                out.push((item.name.as_str(), at..at + item.rows));
            } else {
                out.extend(Held::appends(&item.held, at));
            }
            at += item.rows;
        }
        out
    }

    /// Every name `list` holds, at any depth.
    fn names(list: &[Held]) -> HashSet<String> {
        list.iter().flat_map(|h| std::iter::once(h.name.clone()).chain(Held::names(&h.held))).collect()
    }
}

/// A merge due: its level, bucket start and inputs (names), oldest first.
#[derive(Debug, PartialEq)]
pub struct Planned {
    pub level: Level,
    pub start: i64,
    pub inputs: Vec<String>,
}

/// The merges due at `now_ms` in one journal folder (names and sizes), oldest first, at most
/// [`MAX_MERGES`]: each settled hour's appends that no merge covers, and each settled day whose
/// visible files are all hours' merges (at least two).
pub fn plan(files: &[(String, u64)], now_ms: i64) -> Vec<Planned> {
    let hidden = covered(files.iter().map(|(n, _)| n.as_str()));
    let mut by_bucket: BTreeMap<(i64, Level), (Vec<String>, u64, bool)> = BTreeMap::new();
    for (name, bytes) in files.iter().filter(|(n, _)| !hidden.contains(n.as_str())) {
        let Some((ms, level)) = entry(name) else { continue };
        if level == Level::Day {
            continue;
        }
        let target = if level == Level::Append { Level::Hour } else { Level::Day };
        let (inputs, total, only_hours) = by_bucket.entry((bucket(ms, target), target)).or_insert((Vec::new(), 0, true));
        inputs.push(name.clone());
        *total += bytes;
        *only_hours &= level == Level::Hour;
        if level == Level::Append {
            // A lone append keeps its day from merging until its hour has.
            by_bucket.entry((bucket(ms, Level::Day), Level::Day)).or_insert((Vec::new(), 0, true)).2 = false;
        }
    }
    let mut planned: Vec<Planned> = by_bucket
        .into_iter()
        .filter(|((start, level), (inputs, total, only_hours))| {
            start + level.span_ms() + SETTLE_MS <= now_ms
                && *total <= MAX_BYTES
                && match level {
                    Level::Hour => !inputs.is_empty(),
                    _ => *only_hours && inputs.len() >= 2,
                }
        })
        .map(|((start, level), (mut inputs, _, _))| {
            inputs.sort();
            Planned { level, start, inputs }
        })
        .collect();
    planned.sort_by_key(|p| (p.start, p.level));
    planned.truncate(MAX_MERGES);
    planned
}

/// A journal file's rows and, for a merge, what it holds.
pub struct JournalFile {
    pub batches: Vec<RecordBatch>,
    pub held: Vec<Held>,
}

impl JournalFile {
    pub fn rows(&self) -> usize {
        self.batches.iter().map(RecordBatch::num_rows).sum()
    }

    /// Its appends, each with the range of its rows here (an append: itself, all of them).
    pub fn appends<'a>(&'a self, name: &'a str) -> Vec<(&'a str, Range<usize>)> {
        if self.held.is_empty() { vec![(name, 0..self.rows())] } else { Held::appends(&self.held, 0) }
    }

    /// All its rows as one batch (none when it has no batch).
    fn concat(&self) -> Result<Option<RecordBatch>, String> {
        let Some(first) = self.batches.first() else { return Ok(None) };
        arrow::compute::concat_batches(&first.schema(), &self.batches).map(Some).map_err(|e| e.to_string())
    }
}

/// Parses a journal file's bytes.
fn parse(bytes: Vec<u8>) -> Result<JournalFile, String> {
    let builder = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(bytes::Bytes::from(bytes)).map_err(|e| e.to_string())?;
    let held = match builder.metadata().file_metadata().key_value_metadata().and_then(|kv| kv.iter().find(|k| k.key == HELD_KEY)) {
        Some(KeyValue { value: Some(json), .. }) => serde_json::from_str(json).map_err(|e| format!("{HELD_KEY}: {e}"))?,
        _ => Vec::new(),
    };
    let batches = builder.build().map_err(|e| e.to_string())?.collect::<Result<Vec<_>, _>>().map_err(|e| e.to_string())?;
    let file = JournalFile { batches, held };
    let held_rows: usize = file.held.iter().map(|h| h.rows).sum();
    if !file.held.is_empty() && held_rows != file.rows() {
        return Err(format!("holds {} rows where its record says {held_rows}", file.rows()));
    }
    Ok(file)
}

/// `<table>/<name>`, parsed; none when it is not there.
pub(super) fn read(place: &Place, table: Table, name: &str) -> Result<Option<JournalFile>, StorageError> {
    let relative = format!("{}/{name}", table.name());
    place.read(&relative)?.map(|(bytes, _)| parsed(place, &relative, bytes)).transpose()
}

/// The bytes of `relative`, parsed, with its name in the error.
fn parsed(place: &Place, relative: &str, bytes: Vec<u8>) -> Result<JournalFile, StorageError> {
    parse(bytes).map_err(|reason| StorageError::Parquet { path: place.name(relative).into(), reason })
}

/// Writes `batches` as `<table>/<name>` unless that name exists (then false): locally through a
/// temp name of this process's, fsynced, then hard-linked, which refuses an existing name; on
/// object storage in one PUT that refuses one.
fn create_once(place: &Place, table: Table, name: &str, batches: &[RecordBatch], properties: &WriterProperties) -> Result<bool, StorageError> {
    let relative = format!("{}/{name}", table.name());
    match &place.location {
        Location::Local(root) => {
            let dir = root.join(table.name());
            let (path, temp) = (dir.join(name), dir.join(format!(".{name}.{}.tmp", std::process::id())));
            let file = super::write_parquet(std::fs::File::create(&temp).map_err(super::io_error(&temp))?, &path, batches, properties)?;
            file.sync_all().map_err(super::io_error(&temp))?;
            let linked = std::fs::hard_link(&temp, &path);
            std::fs::remove_file(&temp).map_err(super::io_error(&temp))?;
            match linked {
                Ok(()) => {
                    std::fs::File::open(&dir).and_then(|d| d.sync_all()).map_err(super::io_error(&dir))?;
                    Ok(true)
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(super::io_error(&path)(e)),
            }
        }
        Location::Bucket(bucket) => match bucket.put(&relative, super::encode(&bucket.url_of(&relative), batches, properties)?, Mode::Create) {
            Ok(_) => Ok(true),
            Err(StorageError::Object { precondition: true, .. }) => Ok(false),
            Err(e) => Err(e),
        },
    }
}

/// What one round over a journal did.
#[derive(Debug, Default, PartialEq)]
pub struct Round {
    /// Merges written (another writer's of the same bucket not counted).
    pub merges: usize,
    /// Files deleted: merged inputs, and what earlier merges left.
    pub deleted: usize,
    /// Appends found in a merged bucket without being held, written again under a fresh name.
    pub rescued: usize,
    /// Buckets left as they are: their files' columns differ beyond added nullable ones.
    pub refused: Vec<String>,
}

/// One round over `table`'s journal at `now_ms`: first what earlier merges left ([`settle`]), then
/// the merges due ([`plan`]); inputs are deleted once no query may still read them
/// (`wait_for_readers`, or at once when `stopping`).
pub(super) fn merge_round(place: &Place, table: Table, now_ms: i64, stopping: &std::sync::atomic::AtomicBool) -> Result<Round, StorageError> {
    let files = place.list(table.name())?;
    let mut round = Round::default();
    let mut doomed = settle(place, table, &files, now_ms, &mut round)?;
    // A stop lets the round finish (small files, at most MAX_MERGES; `Drop for Storage` waits
    // up to 10 s) and delete its inputs without the wait; one cut short leaves what `settle` mends.
    for planned in plan(&files, now_ms) {
        let relatives: Vec<String> = planned.inputs.iter().map(|name| format!("{}/{name}", table.name())).collect();
        let mut inputs = Vec::new();
        for ((name, relative), bytes) in planned.inputs.iter().zip(&relatives).zip(place.read_many(&relatives)?) {
            // Gone: another writer merged it already; its merge is listed next round.
            let Some(bytes) = bytes else { break };
            inputs.push((name, parsed(place, relative, bytes)?));
        }
        if inputs.len() < planned.inputs.len() {
            continue;
        }
        let Some(schema) = inputs.iter().rev().find_map(|(_, f)| f.batches.first().map(RecordBatch::schema)) else { continue };
        let mut batches = Vec::new();
        for (_, file) in &inputs {
            batches.extend(file.batches.iter().map(|b| super::compact::align(b, &schema)));
        }
        let name = merged_name(planned.level, planned.start);
        let Some(batches) = batches.into_iter().collect::<Option<Vec<_>>>() else {
            round.refused.push(name);
            continue;
        };
        let held: Vec<Held> = inputs.iter().map(|(name, file)| Held { name: name.to_string(), rows: file.rows(), held: file.held.clone() }).collect();
        let record = serde_json::to_string(&held).map_err(|e| StorageError::Parquet { path: name.clone().into(), reason: e.to_string() })?;
        let properties = WriterProperties::builder()
            .set_compression(parquet::basic::Compression::SNAPPY)
            .set_key_value_metadata(Some(vec![KeyValue::new(HELD_KEY.to_string(), record)]))
            .build();
        if batches.is_empty() || !create_once(place, table, &name, &batches, &properties)? {
            // Another writer merged this bucket: what it holds of these inputs goes next round.
            continue;
        }
        round.merges += 1;
        doomed.extend(planned.inputs);
    }
    if !doomed.is_empty() {
        super::wait_for_readers(std::time::Instant::now(), stopping);
        place.delete_many(&doomed.iter().map(|name| format!("{}/{name}", table.name())).collect::<Vec<_>>())?;
        round.deleted = doomed.len();
    }
    Ok(round)
}

/// What earlier merges left in `files`: a covered file its merge holds is returned (to delete, a
/// crash or another writer left it); an append in a merged bucket that its merge does not hold is
/// written again under a fresh name (`<now ms>-<its unique part>`, once) and returned too.
fn settle(place: &Place, table: Table, files: &[(String, u64)], now_ms: i64, round: &mut Round) -> Result<Vec<String>, StorageError> {
    let entries: Vec<(&str, i64, Level)> = files.iter().filter_map(|(n, _)| entry(n).map(|(ms, l)| (n.as_str(), ms, l))).collect();
    let merges = merges(&entries);
    let hidden = covered(files.iter().map(|(n, _)| n.as_str()));
    let mut doomed = Vec::new();
    let mut records: HashMap<String, Option<HashSet<String>>> = HashMap::new();
    let mut hidden: Vec<&str> = hidden.into_iter().collect();
    hidden.sort();
    for name in hidden {
        let Some((ms, level)) = entry(name) else { continue };
        let Some(cover) = covering(ms, level, &merges).map(|l| merged_name(l, bucket(ms, l))) else { continue };
        if !records.contains_key(&cover) {
            let record = read(place, table, &cover)?.map(|f| Held::names(&f.held));
            records.insert(cover.clone(), record);
        }
        // Deleted since it was listed: the next round sees what replaced it.
        let Some(Some(holds)) = records.get(&cover) else { continue };
        if holds.contains(name) {
            doomed.push(name.to_string());
            continue;
        }
        let Some(file) = read(place, table, name)? else { continue };
        let unreadable = |reason: String| StorageError::Parquet { path: place.name(&format!("{}/{name}", table.name())).into(), reason };
        let all = file.concat().map_err(unreadable)?;
        for (append, rows) in file.appends(name) {
            if holds.contains(append) {
                continue;
            }
            let unique = append_id(append).unwrap_or("-rescued.parquet");
            // Rescued already (a crash came before the delete): the copy is listed and visible.
            if entries.iter().any(|(n, _, _)| append_id(n) == Some(unique) && *n != append) {
                continue;
            }
            let Some(batch) = all.as_ref().filter(|all| rows.end <= all.num_rows()).map(|all| all.slice(rows.start, rows.len())) else { continue };
            tracing::warn!(table = table.name(), file = append, "an append landed in a merged bucket after its merge: written again under a fresh name");
            create_once(place, table, &format!("{now_ms:013}{unique}"), &[batch], &super::properties())?;
            round.rescued += 1;
        }
        doomed.push(name.to_string());
    }
    Ok(doomed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: i64 = 1_764_979_200_000; // 2025-12-06 00:00 UTC

    fn append(ms: i64, unique: &str) -> (String, u64) {
        (format!("{ms:013}-{unique}.parquet"), 1_000)
    }

    #[test]
    fn names_say_level_and_time() {
        assert_eq!(entry("1764979200000-0a1b.parquet"), Some((T0, Level::Append)));
        assert_eq!(entry(&merged_name(Level::Hour, T0)), Some((T0, Level::Hour)));
        assert_eq!(entry(&merged_name(Level::Day, T0)), Some((T0, Level::Day)));
        for other in [".1764979200000-a.parquet.1.tmp", "1764979200000-.parquet", "1764979200000.parquet", "17649792000x0-a.parquet", "part-00000001.parquet"] {
            assert_eq!(entry(other), None, "{other}");
        }
    }

    #[test]
    fn a_merge_covers_the_lower_levels_of_its_bucket_only() {
        let hour = merged_name(Level::Hour, T0 + HOUR_MS);
        let (inside, before, after) = (append(T0 + HOUR_MS + 5, "a").0, append(T0 + HOUR_MS - 1, "b").0, append(T0 + 2 * HOUR_MS, "c").0);
        let names = [hour.as_str(), inside.as_str(), before.as_str(), after.as_str()];
        assert_eq!(covered(names), HashSet::from([inside.as_str()]));
        let day = merged_name(Level::Day, T0);
        let names = [day.as_str(), hour.as_str(), inside.as_str(), before.as_str(), after.as_str()];
        assert_eq!(covered(names).len(), 5 - 1, "the day covers its hour's merge and every append of that day");
    }

    #[test]
    fn settled_hours_merge_then_days_whose_files_are_all_hours() {
        let files = vec![append(T0 + 10, "a"), append(T0 + 20, "b"), append(T0 + HOUR_MS + 1, "c"), append(T0 + 3 * HOUR_MS, "d")];
        // At 2 h 59 min only the first hour has settled.
        let due = plan(&files, T0 + 3 * HOUR_MS - 60_000);
        assert_eq!(due, vec![Planned { level: Level::Hour, start: T0, inputs: vec![files[0].0.clone(), files[1].0.clone()] }]);
        // The next day, every hour; the day waits for them.
        let due = plan(&files, T0 + DAY_MS + 2 * HOUR_MS);
        assert_eq!(due.iter().map(|p| (p.level, p.start)).collect::<Vec<_>>(), vec![(Level::Hour, T0), (Level::Hour, T0 + HOUR_MS), (Level::Hour, T0 + 3 * HOUR_MS)]);
        let merged: Vec<(String, u64)> = due.iter().map(|p| (merged_name(p.level, p.start), 3_000)).chain(files.clone()).collect();
        let due = plan(&merged, T0 + DAY_MS + 2 * HOUR_MS);
        assert_eq!(due.len(), 1);
        assert_eq!((due[0].level, due[0].start, due[0].inputs.len()), (Level::Day, T0, 3));
        // A lone append of that day (one that missed its hour's merge is covered, not lone) keeps it waiting.
        let mut lone = merged.clone();
        lone.push(append(T0 + 5 * HOUR_MS, "e"));
        assert_eq!(plan(&lone, T0 + DAY_MS + 2 * HOUR_MS).iter().map(|p| p.level).collect::<Vec<_>>(), vec![Level::Hour]);
        // Too many bytes in one hour: left as it is.
        let big = vec![(append(T0, "x").0, MAX_BYTES), append(T0 + 1, "y")];
        assert!(plan(&big, T0 + DAY_MS).is_empty());
    }

    fn values(file: &JournalFile) -> Vec<i64> {
        use arrow::array::AsArray;
        file.batches.iter().flat_map(|b| b.column(0).as_primitive::<arrow::datatypes::Int64Type>().values().to_vec()).collect()
    }

    struct Journal {
        _dir: tempfile::TempDir,
        place: Place,
    }

    impl Journal {
        fn new() -> Journal {
            let dir = tempfile::tempdir().unwrap();
            std::fs::create_dir_all(dir.path().join(Table::LabelFeedback.name())).unwrap();
            Journal { place: Place { location: Location::from(dir.path()), instance: None }, _dir: dir }
        }

        fn write(&self, name: &str, values: &[i64]) {
            let schema = std::sync::Arc::new(arrow::datatypes::Schema::new(vec![arrow::datatypes::Field::new("v", arrow::datatypes::DataType::Int64, false)]));
            let batch = RecordBatch::try_new(schema, vec![std::sync::Arc::new(arrow::array::Int64Array::from(values.to_vec()))]).unwrap();
            assert!(create_once(&self.place, Table::LabelFeedback, name, &[batch], &super::super::properties()).unwrap());
        }

        fn files(&self) -> Vec<String> {
            let mut names: Vec<String> = self.place.list(Table::LabelFeedback.name()).unwrap().into_iter().map(|(n, _)| n).collect();
            names.sort();
            names
        }

        /// Every value a reader sees: the files no merge covers, read whole.
        fn seen(&self) -> Vec<i64> {
            let files = self.files();
            let hidden = covered(files.iter().map(String::as_str));
            let mut seen: Vec<i64> = files.iter().filter(|n| !hidden.contains(n.as_str())).flat_map(|n| values(&read(&self.place, Table::LabelFeedback, n).unwrap().unwrap())).collect();
            seen.sort();
            seen
        }

        fn round(&self, now: i64) -> Round {
            merge_round(&self.place, Table::LabelFeedback, now, &std::sync::atomic::AtomicBool::new(false)).unwrap()
        }
    }

    #[test]
    fn hours_then_days_merge_and_every_row_is_seen_once_even_one_that_landed_late() {
        let journal = Journal::new();
        journal.write(&append(T0 + 10, "a").0, &[1, 2]);
        journal.write(&append(T0 + 20, "b").0, &[3]);
        journal.write(&append(T0 + HOUR_MS + 5, "c").0, &[4]);
        journal.write(&append(T0 + DAY_MS + HOUR_MS, "d").0, &[5]);
        assert_eq!(journal.round(T0 + 3 * HOUR_MS), Round { merges: 2, deleted: 3, ..Round::default() });
        assert_eq!(journal.files(), vec![merged_name(Level::Hour, T0), merged_name(Level::Hour, T0 + HOUR_MS), append(T0 + DAY_MS + HOUR_MS, "d").0]);
        assert_eq!(journal.seen(), vec![1, 2, 3, 4, 5]);

        // A writer whose clock is behind appends into the merged hour: hidden until the next round
        // writes it again under a fresh name.
        journal.write(&append(T0 + 30, "late").0, &[6]);
        assert_eq!(journal.seen(), vec![1, 2, 3, 4, 5]);
        assert_eq!(journal.round(T0 + 3 * HOUR_MS), Round { deleted: 1, rescued: 1, ..Round::default() });
        assert!(journal.files().contains(&append(T0 + 3 * HOUR_MS, "late").0), "{:?}", journal.files());
        assert_eq!(journal.seen(), vec![1, 2, 3, 4, 5, 6]);

        // The next day: the rescued append's hour and the next day's hour merge, then the first day.
        assert_eq!(journal.round(T0 + DAY_MS + 3 * HOUR_MS).merges, 2);
        let round = journal.round(T0 + DAY_MS + 3 * HOUR_MS);
        assert_eq!((round.merges, round.deleted), (1, 3));
        assert_eq!(journal.files(), vec![merged_name(Level::Day, T0), merged_name(Level::Hour, T0 + DAY_MS + HOUR_MS)]);
        assert_eq!(journal.seen(), vec![1, 2, 3, 4, 5, 6]);
        let day = read(&journal.place, Table::LabelFeedback, &merged_name(Level::Day, T0)).unwrap().unwrap();
        let appends: Vec<(&str, Range<usize>)> = day.appends("day");
        assert_eq!(appends.iter().map(|(n, r)| (n.get(13..).unwrap(), r.clone())).collect::<Vec<_>>(), vec![("-a.parquet", 0..2), ("-b.parquet", 2..3), ("-c.parquet", 3..4), ("-late.parquet", 4..5)]);

        // An input left beside its merge (a crash before the delete) is deleted, not rescued; a
        // second writer's merge of a bucket already merged is refused by its name.
        journal.write(&append(T0 + HOUR_MS + 5, "c").0, &[4]);
        assert_eq!(journal.seen(), vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(journal.round(T0 + DAY_MS + 3 * HOUR_MS), Round { deleted: 1, ..Round::default() });
        assert_eq!(journal.files().len(), 2);
        let batch = day.batches[0].clone();
        assert!(!create_once(&journal.place, Table::LabelFeedback, &merged_name(Level::Day, T0), &[batch], &super::super::properties()).unwrap());
        assert_eq!(journal.seen(), vec![1, 2, 3, 4, 5, 6]);
    }

    #[test]
    fn a_record_gives_each_append_its_rows_at_any_depth() {
        let held = vec![
            Held { name: "h1".into(), rows: 3, held: vec![Held { name: "a".into(), rows: 1, held: vec![] }, Held { name: "b".into(), rows: 2, held: vec![] }] },
            Held { name: "c".into(), rows: 4, held: vec![] },
        ];
        assert_eq!(Held::appends(&held, 0), vec![("a", 0..1), ("b", 1..3), ("c", 3..7)]);
        assert_eq!(Held::names(&held), HashSet::from(["h1", "a", "b", "c"].map(String::from)));
    }
}
