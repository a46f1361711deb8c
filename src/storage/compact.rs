//! Compaction: a checkpoint every 10 s writes one part per table that changed, some 8,640 a day,
//! and every query opens every part it lists. So the writer merges its small committed parts in the
//! background: a run of at least [`FANOUT`] consecutive small parts ([`plan`]) becomes one part,
//! `part-<first>-<last>.parquet`, whose name says which part numbers it holds.
//!
//! Order: the merged part is written whole (locally through a temp name, fsynced and renamed; on
//! object storage in one PUT), then its inputs are deleted. Between the two, and after a crash in
//! between, both are listed: readers skip a part whose numbers a listed merge holds
//! ([`superseded`]; bearwatch's SQL through [`Visible`]), and the writer's next start deletes such
//! parts. A merge holds committed parts only, whose rows never change, so a merge written twice (a
//! crash, or a fenced-off writer) has the same rows.

use std::collections::HashSet;
use std::fmt;
use std::sync::Arc;

use arrow::array::{RecordBatch, new_null_array};
use arrow::datatypes::SchemaRef;
use async_trait::async_trait;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions, PutPayload, PutResult,
};
use crate::sync::lock;

/// Queries of this process that are reading now, by when they started: a merge's inputs are
/// deleted only once no query that may have listed them is still reading ([`ReadPin`]).
static READING: std::sync::Mutex<std::collections::BTreeMap<u64, std::time::Instant>> = std::sync::Mutex::new(std::collections::BTreeMap::new());
static NEXT_PIN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Held by a query of this process while it reads parts (SQL takes one per execution): the
/// writer's merges keep their inputs until every query that started before the merge appeared has
/// let go of its pin. Queries of other processes are not seen; they run again on a fresh listing
/// if a part went away under them.
pub struct ReadPin(u64);

impl ReadPin {
    pub fn new() -> ReadPin {
        let id = NEXT_PIN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        lock(&READING).insert(id, std::time::Instant::now());
        ReadPin(id)
    }
}

impl Default for ReadPin {
    fn default() -> ReadPin {
        ReadPin::new()
    }
}

impl Drop for ReadPin {
    fn drop(&mut self) {
        lock(&READING).remove(&self.0);
    }
}

/// When the oldest query still reading started.
pub fn oldest_reader() -> Option<std::time::Instant> {
    lock(&READING).values().min().copied()
}

/// Parts merged at once, at least: fewer small ones are left as they are.
pub const FANOUT: usize = 8;
/// Parts merged at once, at most: bounds one merge's time (a backlog takes several rounds).
pub const MAX_RUN: usize = 64;
/// Parts this big or bigger are left as they are.
const SMALL_BYTES: u64 = 4 << 20;
/// Bytes merged at once, at most: a merge holds its inputs and its output in memory.
const MAX_RUN_BYTES: u64 = 64 << 20;
// A run cut at MAX_RUN_BYTES can still hold FANOUT small parts.
const _: () = assert!(MAX_RUN_BYTES >= FANOUT as u64 * SMALL_BYTES);

/// The part numbers a part file holds: its own (`part-<n>.parquet`) or a merge's
/// (`part-<first>-<last>.parquet`). None for any other file.
pub fn span(name: &str) -> Option<(u64, u64)> {
    let digits = name.strip_prefix("part-")?.strip_suffix(".parquet")?;
    let number = |s: &str| (!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse::<u64>().ok()).flatten();
    match digits.split_once('-') {
        None => number(digits).map(|n| (n, n)),
        Some((first, last)) => {
            let (first, last) = (number(first)?, number(last)?);
            (first < last).then_some((first, last))
        }
    }
}

/// The name of a part that merges part numbers `first..=last`.
pub fn merged_name(first: u64, last: u64) -> String {
    if first == last { super::part_name(first) } else { format!("part-{first:08}-{last:08}.parquet") }
}

/// Of one folder's files (names and sizes), the parts a reader opens, by their numbers: the files
/// named as parts, less those a merge holds ([`superseded`]).
pub fn visible_parts(files: &[(String, u64)]) -> Vec<(&str, (u64, u64), u64)> {
    let hidden = superseded(files.iter().map(|(n, _)| n.as_str()));
    let mut parts: Vec<(&str, (u64, u64), u64)> = files
        .iter()
        .filter(|(name, _)| !hidden.contains(name.as_str()))
        .filter_map(|(name, bytes)| span(name).map(|s| (name.as_str(), s, *bytes)))
        .collect();
    parts.sort_by_key(|(_, span, _)| *span);
    parts
}

/// Of one folder's file names, the parts a reader skips: those whose numbers another listed part
/// (a merge) also holds.
pub fn superseded<'a>(names: impl IntoIterator<Item = &'a str>) -> HashSet<&'a str> {
    let mut spans: Vec<(u64, u64, &str)> = names.into_iter().filter_map(|n| span(n).map(|(f, l)| (f, l, n))).collect();
    // By first number, the widest first: a part is held by an earlier one that reaches as far.
    spans.sort_by(|a, b| a.0.cmp(&b.0).then(b.1.cmp(&a.1)));
    let mut reach: Option<u64> = None;
    let mut hidden = HashSet::new();
    for (_, last, name) in spans {
        if reach.is_some_and(|r| r >= last) {
            hidden.insert(name);
        } else {
            reach = Some(last);
        }
    }
    hidden
}

/// The next merge in one folder (names and sizes of its files): from the oldest, a run of at least
/// [`FANOUT`] consecutive visible small parts, all below `published` (committed and named), at most
/// [`MAX_RUN`] of them and [`MAX_RUN_BYTES`] together, the longest from its start in which no part
/// holds more than half the bytes. That last rule is what bounds the rewriting: a row is merged
/// again only into a file at least twice the size of the one it is in, so at most
/// log2(4 MiB / part size) times. Numbers missing between parts (accepted as lost) do not break a
/// run.
pub fn plan(files: &[(String, u64)], published: u64) -> Option<Vec<(String, (u64, u64))>> {
    let mut parts = visible_parts(files);
    parts.retain(|(_, (_, last), _)| *last < published);
    for start in 0..parts.len() {
        let (mut total, mut biggest, mut end) = (0, 0, None);
        for (at, (_, _, bytes)) in parts.iter().enumerate().skip(start).take(MAX_RUN) {
            if *bytes >= SMALL_BYTES || total + bytes > MAX_RUN_BYTES {
                break;
            }
            total += bytes;
            biggest = biggest.max(*bytes);
            if at + 1 - start >= FANOUT && biggest * 2 <= total {
                end = Some(at + 1);
            }
        }
        if let Some(end) = end {
            return Some(parts[start..end].iter().map(|(n, s, _)| (n.to_string(), *s)).collect());
        }
    }
    None
}

/// `batch` with `schema`'s columns: the same columns, or nulls for a nullable column it lacks (a
/// part written before the column was added). None when it cannot be done without losing data.
pub fn align(batch: &RecordBatch, schema: &SchemaRef) -> Option<RecordBatch> {
    if batch.schema().fields().iter().any(|f| schema.field_with_name(f.name()).is_err()) {
        return None;
    }
    let columns = schema
        .fields()
        .iter()
        .map(|field| match batch.column_by_name(field.name()) {
            Some(column) if column.data_type() == field.data_type() => Some(column.clone()),
            Some(_) => None,
            None => field.is_nullable().then(|| new_null_array(field.data_type(), batch.num_rows())),
        })
        .collect::<Option<Vec<_>>>()?;
    RecordBatch::try_new(schema.clone(), columns).ok()
}

/// An object store as bearwatch's SQL lists it: parts that a merge holds are left out of listings
/// (see the module's doc), so a query never reads a row twice while a merge's inputs await deletion.
#[derive(Debug)]
pub struct Visible {
    inner: Arc<dyn ObjectStore>,
}

impl Visible {
    pub fn new(inner: Arc<dyn ObjectStore>) -> Visible {
        Visible { inner }
    }
}

/// `objects` without the parts, and the journal files, that a merge in the same folder holds.
fn visible_objects(mut objects: Vec<ObjectMeta>) -> Vec<ObjectMeta> {
    let hidden: HashSet<Path> = {
        let mut by_folder: std::collections::HashMap<Option<&str>, Vec<&ObjectMeta>> = std::collections::HashMap::new();
        for meta in &objects {
            by_folder.entry(meta.location.as_ref().rsplit_once('/').map(|(folder, _)| folder)).or_default().push(meta);
        }
        by_folder
            .values()
            .flat_map(|metas| {
                let names: Vec<&str> = metas.iter().filter_map(|m| m.location.filename()).collect();
                let mut hidden = superseded(names.iter().copied());
                hidden.extend(super::journals::covered(names));
                metas.iter().filter(move |m| m.location.filename().is_some_and(|n| hidden.contains(n))).map(|m| m.location.clone()).collect::<Vec<_>>()
            })
            .collect()
    };
    objects.retain(|m| !hidden.contains(&m.location));
    objects
}

impl fmt::Display for Visible {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Visible({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for Visible {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> object_store::Result<PutResult> {
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> object_store::Result<Box<dyn MultipartUpload>> {
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> object_store::Result<GetResult> {
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, object_store::Result<Path>>) -> BoxStream<'static, object_store::Result<Path>> {
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        // Whole, then filtered: whether a part is held by a merge depends on the rest of its folder.
        let listing = self.inner.list(prefix).try_collect::<Vec<ObjectMeta>>();
        futures::stream::once(listing).map_ok(|objects| futures::stream::iter(visible_objects(objects).into_iter().map(Ok))).try_flatten().boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> object_store::Result<ListResult> {
        let listed = self.inner.list_with_delimiter(prefix).await?;
        Ok(ListResult { common_prefixes: listed.common_prefixes, objects: visible_objects(listed.objects) })
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> object_store::Result<()> {
        self.inner.copy_opts(from, to, options).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{DataType, Field, Schema};
    use object_store::ObjectStoreExt;

    fn names(n: impl IntoIterator<Item = u64>) -> Vec<(String, u64)> {
        n.into_iter().map(|s| (super::super::part_name(s), 10_000)).collect()
    }

    #[test]
    fn part_names_say_which_numbers_they_hold() {
        assert_eq!(span("part-00000007.parquet"), Some((7, 7)));
        assert_eq!(span(&merged_name(3, 40)), Some((3, 40)));
        assert_eq!(merged_name(5, 5), "part-00000005.parquet");
        for other in [".part-00000001.parquet.pending", "part-1-1.parquet", "part-9-2.parquet", "part--2.parquet", "part-x.parquet", "1700-a1.parquet"] {
            assert_eq!(span(other), None, "{other}");
        }
    }

    #[test]
    fn a_merge_hides_the_parts_it_holds_and_only_those() {
        let files = ["part-00000000.parquet", "part-00000001.parquet", "part-00000000-00000001.parquet", "part-00000002.parquet", "other.txt"];
        let hidden = superseded(files);
        assert_eq!(hidden, HashSet::from(["part-00000000.parquet", "part-00000001.parquet"]));
        // A merge of merges hides them and their inputs; a part after it stays.
        let files = ["part-00000000-00000007.parquet", "part-00000008-00000015.parquet", "part-00000000-00000015.parquet", "part-00000003.parquet", "part-00000016.parquet"];
        assert_eq!(superseded(files).len(), 3);
        assert!(!superseded(files).contains("part-00000016.parquet") && !superseded(files).contains("part-00000000-00000015.parquet"));
    }

    #[test]
    fn runs_of_small_committed_parts_merge_oldest_first() {
        assert_eq!(plan(&names(0..7), 100), None, "fewer than FANOUT");
        let run = plan(&names(0..10), 100).unwrap();
        assert_eq!(run.len(), 10);
        assert_eq!(plan(&names(0..10), 5), None, "parts not yet named are not merged");
        assert_eq!(plan(&names(0..200), 1000).unwrap().len(), MAX_RUN);
        // A lost part (3) does not break a run; a big part does.
        let mut files = names((0..3).chain(4..12));
        files[5].1 = 50 << 20;
        assert_eq!(plan(&files, 100), None, "5 small, 1 big, 5 small");
        files[5].1 = 10_000;
        assert_eq!(plan(&files, 100).unwrap().first().unwrap().1, (0, 0));
        // A merge is merged again only with as many bytes as it holds: not with 7 small parts.
        let mut grown: Vec<(String, u64)> = vec![(merged_name(0, 9), 100_000)];
        grown.extend(names(10..17));
        assert_eq!(plan(&grown, 100), None);
        grown.extend(names(17..30));
        let run = plan(&grown, 100).unwrap();
        assert_eq!((run.len(), run[0].1), (21, (0, 9)), "with 20 parts of 10,000 bytes after it, it is");
        grown[0].1 = 300_000;
        assert_eq!(plan(&grown, 100).unwrap()[0].1, (10, 10), "the small ones merge among themselves");
        // What a merge already holds is not merged again.
        let mut held = names(0..10);
        held.push((merged_name(0, 9), 80_000));
        assert_eq!(plan(&held, 100), None);
    }

    /// A day of checkpoints every 10 s, one merge per checkpoint as the writer does, with parts of
    /// one size and of sizes that vary a hundredfold: the files a query opens stay few, and each
    /// byte is rewritten a few times.
    #[test]
    fn a_day_of_parts_stays_a_few_dozen_files() {
        let mut rng = crate::rng::Lcg(7);
        let sizes: [(&str, Box<dyn FnMut() -> u64>); 4] = [
            ("2 KB", Box::new(|| 2_000)),
            ("40 KB", Box::new(|| 40_000)),
            ("700 KB", Box::new(|| 700_000)),
            ("1–300 KB", Box::new(move || 1_000 + (rng.next_f64() * 299_000.0) as u64)),
        ];
        for (label, mut size) in sizes {
            let mut files: Vec<(String, u64)> = Vec::new();
            let (mut most, mut written, mut rewritten) = (0, 0u64, 0u64);
            for seq in 0..8_640u64 {
                let bytes = size();
                written += bytes;
                files.push((super::super::part_name(seq), bytes));
                if let Some(run) = plan(&files, seq + 1) {
                    let merged: u64 = files.iter().filter(|(n, _)| run.iter().any(|(r, _)| r == n)).map(|(_, b)| b).sum();
                    rewritten += merged;
                    files.retain(|(n, _)| !run.iter().any(|(r, _)| r == n));
                    files.push((merged_name(run[0].1.0, run[run.len() - 1].1.1), merged));
                    files.sort_by_key(|(n, _)| span(n));
                }
                most = most.max(files.len());
            }
            let rewrites = rewritten as f64 / written as f64;
            eprintln!("{label} parts: {} files at the end, at most {most}; each byte rewritten {rewrites:.1} times", files.len());
            let small = files.iter().filter(|(_, b)| *b < SMALL_BYTES).count();
            assert!(small <= 64, "{label} parts: {small} small files left");
            assert!(rewrites <= 12.0, "{label} parts: each byte rewritten {rewrites:.1} times");
        }
    }

    #[test]
    fn older_parts_gain_null_columns_and_nothing_is_dropped() {
        let new = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false), Field::new("copies", DataType::Int64, true)]));
        let old = RecordBatch::try_new(Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false)])), vec![Arc::new(Int64Array::from(vec![1, 2]))]).unwrap();
        let aligned = align(&old, &new).unwrap();
        assert_eq!((aligned.num_columns(), aligned.column(1).null_count()), (2, 2));
        let extra = RecordBatch::try_new(
            Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false), Field::new("gone", DataType::Utf8, false)])),
            vec![Arc::new(Int64Array::from(vec![1])), Arc::new(StringArray::from(vec!["x"]))],
        )
        .unwrap();
        assert!(align(&extra, &new).is_none(), "a column the newer schema lacks");
        let required = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, false), Field::new("must", DataType::Int64, false)]));
        assert!(align(&old, &required).is_none(), "a required column it lacks");
    }

    #[test]
    fn listings_through_visible_leave_out_merged_inputs() {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let inner: Arc<dyn ObjectStore> = Arc::new(object_store::memory::InMemory::new());
            for name in ["news/instance=a/part-00000000.parquet", "news/instance=a/part-00000001.parquet", "news/instance=a/part-00000000-00000001.parquet", "news/instance=b/part-00000000.parquet"] {
                inner.put(&Path::from(name), PutPayload::from_static(b"x")).await.unwrap();
            }
            let store = Visible::new(inner);
            let mut listed: Vec<String> = store.list(Some(&Path::from("news"))).map_ok(|m| m.location.to_string()).try_collect().await.unwrap();
            listed.sort();
            assert_eq!(listed, vec!["news/instance=a/part-00000000-00000001.parquet", "news/instance=b/part-00000000.parquet"], "another folder's part 0 stays");
            let folder = store.list_with_delimiter(Some(&Path::from("news/instance=a"))).await.unwrap();
            assert_eq!(folder.objects.len(), 1);
            // A journal's hour merge hides the appends of its hour, not those after it.
            let journal = ["label_feedback/1764979200000-a.parquet", "label_feedback/1764979200000-merged-hour.parquet", "label_feedback/1764982800000-b.parquet"];
            for name in journal {
                store.put(&Path::from(name), PutPayload::from_static(b"x")).await.unwrap();
            }
            let folder = store.list_with_delimiter(Some(&Path::from("label_feedback"))).await.unwrap();
            let mut listed: Vec<String> = folder.objects.iter().map(|m| m.location.to_string()).collect();
            listed.sort();
            assert_eq!(listed, journal[1..]);
        });
    }
}
