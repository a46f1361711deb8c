//! The file source: JSON lines replayed in event-time order, as fast as possible or at N× real time.

use std::fs::File;
use std::io::{BufRead, Read, Seek};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Offsets, Record, Source, SourceError};
use crate::config::HumanDuration;

/// What a checkpoint keeps of a file beside its offset, so that a resume can prove it reads the same
/// lines: the byte ends of the parts read so far (the file when first opened, then what each later
/// run found appended) and a SHA-256 of those bytes.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FileProgress {
    pub segment_ends: Vec<u64>,
    pub sha256: String,
}

/// Each segment's lines are stably sorted by `published_at`, so that a file in any order replays
/// the way a live feed would have delivered it; segments follow each other in the order they were
/// found, so lines appended after a run come after the lines it read, and every offset keeps its
/// meaning. Lines without a readable timestamp keep their place after the line before them (and
/// fail validation downstream, reaching the dead-letter file).
///
/// Only an index is held (event time, byte offset and length: 24 bytes a line) and each line is
/// read when it is due, so a backfill file of any size needs no more memory than its line count.
pub struct FileSource {
    topic: Arc<str>,
    path: String,
    file: File,
    lines: Vec<Line>,
    next: usize,
    pace: Pace,
    clock: Option<Clock>,
    progress: FileProgress,
}

/// How a replay is paced: `speed`× the stories' own pace (0 = as fast as possible), and no quiet
/// spell between two stories' timestamps waited for as longer than `max_gap_ms` of event time, so
/// that one story dated years off (1970, or a typo'd year) does not stop the replay for hours.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pace {
    pub speed: f64,
    pub max_gap_ms: i64,
}

/// A quiet spell in a replayed file's timestamps waits at most this long in event time, unless set.
const DEFAULT_MAX_GAP: HumanDuration = HumanDuration(Duration::from_secs(86_400));

impl Pace {
    /// Every line as soon as it is asked for.
    pub const FAST: Pace = Pace { speed: 0.0, max_gap_ms: i64::MAX };

    /// Which of a replay's settings is out of bounds (`speed` or `max_gap`), and why: the pipeline
    /// file's `[source]` and `bearwatch produce` take the same two.
    pub fn check(speed: f64, max_gap: Option<HumanDuration>) -> Result<(), (&'static str, &'static str)> {
        if !(speed >= 0.0 && speed.is_finite()) {
            return Err(("speed", "must be 0 (as fast as possible) or a positive speed-up"));
        }
        if max_gap.is_some_and(|gap| gap.0.is_zero()) {
            return Err(("max_gap", "must be more than 0 (a speed of 0 replays as fast as possible)"));
        }
        Ok(())
    }

    /// `speed`× the stories' pace, gaps past `max_gap` (default 1 d) replayed as `max_gap`.
    pub fn new(speed: f64, max_gap: Option<HumanDuration>) -> Pace {
        Pace { speed, max_gap_ms: max_gap.unwrap_or(DEFAULT_MAX_GAP).as_millis() }
    }
}

/// Where the replay's clock started, and the event time it has skipped in gaps past `max_gap_ms`.
#[derive(Debug, Clone, Copy)]
struct Clock {
    wall_start: Instant,
    event_start: i64,
    latest: i64,
    skipped_ms: i64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Line {
    event_ms: i64,
    offset: u64,
    len: u64,
}

/// The most of one line that is read, to find its timestamp and to hand it on: one byte past the
/// largest `max_message_bytes`, so a longer line is still refused as too large (and dead-lettered
/// with this much of it) without being held whole.
const LINE_READ_LIMIT: u64 = (64 << 20) + 1;

impl FileSource {
    /// Opens `path`; `resume` is the checkpointed offset (lines already processed) with what the
    /// checkpoint knew of the file. Refuses a file whose part already read has changed.
    pub fn open(path: &Path, pace: Pace, resume: Option<(i64, Option<&FileProgress>)>) -> Result<FileSource, SourceError> {
        let failed = |reason: String| SourceError::File { path: path.display().to_string(), reason };
        let mut file = File::open(path).map_err(|e| failed(e.to_string()))?;
        if !file.metadata().map_err(|e| failed(e.to_string()))?.is_file() {
            // A pipe (`/dev/stdin`, `<(zcat news.jsonl.gz)`) has no size and reads once.
            file = spool(file).map_err(|e| failed(format!("cannot copy it to a temporary file: {e}")))?;
        }
        // What is there now; lines appended while this run reads are for the next run.
        let size = file.metadata().map_err(|e| failed(e.to_string()))?.len();
        let (start, known) = resume.unwrap_or((0, None));
        let changed = |read: u64| {
            failed(format!(
                "the first {read} bytes, which an earlier run already read, have changed (or the file is shorter): \
                 its checkpoint cannot resume it. Restore the file, give the new data another file, \
                 or start this pipeline from scratch (a new storage.path)"
            ))
        };
        let mut segment_ends = match known {
            Some(known) => {
                let read = known.segment_ends.last().copied().unwrap_or(0);
                if size < read {
                    return Err(changed(read));
                }
                known.segment_ends.clone()
            }
            None if start > 0 => {
                // A checkpoint from before file fingerprints: the file as it is now is what it read.
                tracing::warn!(file = %path.display(), "checkpoint has no fingerprint of this file; trusting it is unchanged");
                Vec::new()
            }
            None => Vec::new(),
        };
        let read = segment_ends.last().copied().unwrap_or(0);
        if segment_ends.is_empty() || size > read {
            segment_ends.push(size);
        }
        let index = Index::build(&file, &segment_ends, read, 1 << 20).map_err(|e| failed(e.to_string()))?;
        if known.is_some_and(|known| index.sha256_read != known.sha256) {
            return Err(changed(read));
        }
        let progress = FileProgress { sha256: index.sha256, segment_ends };
        let lines = index.lines;
        let next = usize::try_from(start.max(0)).unwrap_or(usize::MAX).min(lines.len());
        Ok(FileSource { topic: Arc::from(source_name(path).as_str()), path: path.display().to_string(), file, lines, next, pace, clock: None, progress })
    }

    /// What the next checkpoint must keep of this file.
    pub fn progress(&self) -> &FileProgress {
        &self.progress
    }

    pub fn len(&self) -> usize {
        self.lines.len()
    }

    pub fn is_empty(&self) -> bool {
        self.lines.is_empty()
    }

    /// Whether the bytes around `line` are still what the index found: a line end (or the start of
    /// a segment) before it, and a line end (`\n` or `\r\n`, or a segment's end) after it. A file
    /// written over while it replays moves its lines, and reading by offset would hand on pieces.
    fn still_a_line(&self, line: Line) -> std::io::Result<bool> {
        let ends = &self.progress.segment_ends;
        if line.offset > 0 && !ends.contains(&line.offset) {
            let mut before = [0u8; 1];
            self.file.read_exact_at(&mut before, line.offset - 1)?;
            if before[0] != b'\n' {
                return Ok(false);
            }
        }
        let end = line.offset + line.len;
        let mut after = [0u8; 2];
        let read = self.file.read_at(&mut after, end)?;
        Ok(match &after[..read] {
            _ if ends.contains(&end) => true,
            [b'\n', ..] | [b'\r', b'\n'] => true,
            [b'\r', ..] => ends.contains(&(end + 1)),
            _ => false,
        })
    }

    /// How long to wait before the next line is due at `speed`× the stories' own pace, a gap longer
    /// than `max_gap_ms` counting as that long. Asked again for the same line while it waits, it
    /// skips that line's gap once.
    fn due_in(&mut self, event_ms: i64) -> Duration {
        if self.pace.speed <= 0.0 || event_ms == i64::MIN {
            return Duration::ZERO;
        }
        let clock = self.clock.get_or_insert(Clock { wall_start: Instant::now(), event_start: event_ms, latest: event_ms, skipped_ms: 0 });
        let gap = event_ms.saturating_sub(clock.latest);
        if gap > self.pace.max_gap_ms {
            clock.skipped_ms = clock.skipped_ms.saturating_add(gap - self.pace.max_gap_ms);
        }
        clock.latest = clock.latest.max(event_ms);
        let paced_ms = event_ms.saturating_sub(clock.event_start).saturating_sub(clock.skipped_ms).max(0);
        let due = Duration::from_secs_f64((paced_ms as f64 / 1000.0) / self.pace.speed);
        due.saturating_sub(clock.wall_start.elapsed())
    }
}

/// The name a file's offsets are kept under: its canonical path, so that `./data/x.jsonl` and
/// `data/x.jsonl` are one file.
pub fn source_name(path: &Path) -> String {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf()).display().to_string()
}

/// SHA-256 of `bytes`, hex.
pub fn sha256(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// Copies a stream to a temporary file that has no name (removed once created), so it can be
/// indexed and its lines read back by offset like a file's.
fn spool(mut stream: File) -> std::io::Result<File> {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let path = std::env::temp_dir().join(format!("bearwatch-source-{}-{n}.jsonl", std::process::id()));
    let mut copy = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(&path)?;
    std::fs::remove_file(&path)?;
    std::io::copy(&mut stream, &mut copy)?;
    Ok(copy)
}

/// One pass over a file's segments: its non-blank lines, each with the event time of the last
/// line before it that had one, sorted by it within each segment; and SHA-256s of the bytes up to
/// what an earlier run read and up to the last segment's end.
struct Index {
    lines: Vec<Line>,
    sha256_read: String,
    sha256: String,
}

impl Index {
    fn build(file: &File, segment_ends: &[u64], read: u64, buffer: usize) -> std::io::Result<Index> {
        use sha2::Digest;
        let end = segment_ends.last().copied().unwrap_or(0);
        let mut file = file;
        file.rewind()?;
        let mut reader = std::io::BufReader::with_capacity(buffer, file.take(end));
        let mut hasher = sha2::Sha256::new();
        let mut sha256_read = (read == 0).then(|| hex(&hasher.clone().finalize()));
        let mut lines = Vec::new();
        let mut line = LineScan::default();
        let mut previous = i64::MIN;
        let (mut at, mut segment, mut segment_from) = (0u64, 0usize, 0usize);
        loop {
            let chunk = reader.fill_buf()?;
            if chunk.is_empty() {
                break;
            }
            // Up to the next segment end or `read`, whichever comes first, so each is a cut.
            let stop = segment_ends[segment].min(if at < read { read } else { u64::MAX });
            let take = chunk.len().min(usize::try_from(stop - at).unwrap_or(usize::MAX));
            let piece = &chunk[..take];
            hasher.update(piece);
            let mut from = 0;
            while let Some(newline) = piece[from..].iter().position(|b| *b == b'\n') {
                line.extend(&piece[from..from + newline]);
                line.finish(at + (from + newline) as u64, &mut previous, &mut lines);
                from += newline + 1;
            }
            line.extend(&piece[from..]);
            at += take as u64;
            reader.consume(take);
            if at == read && sha256_read.is_none() {
                sha256_read = Some(hex(&hasher.clone().finalize()));
            }
            if at == segment_ends[segment] {
                line.finish(at, &mut previous, &mut lines);
                lines[segment_from..].sort_by_key(|l| l.event_ms);
                segment_from = lines.len();
                segment += 1;
            }
        }
        if at < end {
            return Err(std::io::Error::new(std::io::ErrorKind::UnexpectedEof, format!("the file ended at byte {at} while it was read, before {end}")));
        }
        let sha256 = hex(&hasher.finalize());
        Ok(Index { lines, sha256_read: sha256_read.unwrap_or_else(|| sha256.clone()), sha256 })
    }
}

/// The line being scanned: where it started, its length so far, whether it holds anything but
/// whitespace, and its first [`LINE_READ_LIMIT`] bytes for the timestamp.
#[derive(Default)]
struct LineScan {
    len: u64,
    blank_so_far: bool,
    last: u8,
    head: Vec<u8>,
    started: bool,
}

impl LineScan {
    fn extend(&mut self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        if !self.started {
            (self.started, self.blank_so_far) = (true, true);
        }
        self.blank_so_far = self.blank_so_far && bytes.iter().all(u8::is_ascii_whitespace);
        let room = usize::try_from(LINE_READ_LIMIT.saturating_sub(self.head.len() as u64)).unwrap_or(usize::MAX);
        self.head.extend_from_slice(&bytes[..bytes.len().min(room)]);
        self.len += bytes.len() as u64;
        self.last = bytes[bytes.len() - 1];
    }

    /// Ends the line at byte `end` (its newline, or a segment's end) and indexes it unless blank.
    fn finish(&mut self, end: u64, previous: &mut i64, lines: &mut Vec<Line>) {
        if self.started && !self.blank_so_far {
            let len = self.len - u64::from(self.last == b'\r');
            let head = &self.head[..self.head.len().min(usize::try_from(len).unwrap_or(usize::MAX))];
            if len <= LINE_READ_LIMIT {
                *previous = event_time(head).unwrap_or(*previous);
            }
            lines.push(Line { event_ms: *previous, offset: end - self.len, len });
        }
        self.head.clear();
        (self.len, self.started, self.last) = (0, false, 0);
    }
}

fn hex(digest: &[u8]) -> String {
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

fn event_time(line: &[u8]) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Stamp<'a> {
        #[serde(borrow)]
        published_at: &'a str,
    }
    let stamp: Stamp = serde_json::from_slice(line).ok()?;
    chrono::DateTime::parse_from_rfc3339(stamp.published_at).ok().map(|t| t.timestamp_millis())
}

impl Source for FileSource {
    fn poll(&mut self, timeout: Duration) -> Result<Option<Record>, SourceError> {
        let Some(&line) = self.lines.get(self.next) else {
            return Ok(None);
        };
        let wait = self.due_in(line.event_ms);
        if wait > timeout {
            std::thread::sleep(timeout);
            return Ok(None);
        }
        std::thread::sleep(wait);
        let offset = self.next as i64;
        let mut payload = vec![0; usize::try_from(line.len.min(LINE_READ_LIMIT)).unwrap_or(usize::MAX)];
        let changed = |why: String| SourceError::File {
            path: self.path.clone(),
            reason: format!(
                "line {} (byte {}) {why}: the file changed while it was read; replay a file only once it is written \
                 (appending is fine: the next run reads what was added)",
                self.next + 1,
                line.offset
            ),
        };
        self.file.read_exact_at(&mut payload, line.offset).map_err(|e| changed(format!("cannot be read ({e})")))?;
        if !self.still_a_line(line).map_err(|e| changed(format!("cannot be read ({e})")))? {
            return Err(changed("is no longer between two line ends".into()));
        }
        self.next += 1;
        let cut_from = (line.len > LINE_READ_LIMIT).then_some(line.len);
        Ok(Some(Record { topic: self.topic.clone(), partition: 0, offset, payload, from_kafka: false, cut_from }))
    }

    fn finished(&self) -> bool {
        self.next >= self.lines.len()
    }

    fn commit(&mut self, _offsets: &Offsets) -> Result<(), SourceError> {
        // The checkpoint itself holds a file's position; there is no group to tell.
        Ok(())
    }

    fn describe(&self) -> String {
        format!("{} line {}/{}", self.topic, self.next, self.lines.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_in_event_time_order_and_resumes_at_an_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.jsonl");
        std::fs::write(
            &path,
            "{\"id\":\"b\",\"published_at\":\"2024-01-01T00:00:02Z\"}\n\n{\"id\":\"a\",\"published_at\":\"2024-01-01T00:00:01Z\"}\r\nnot json\n",
        )
        .unwrap();
        let mut source = FileSource::open(&path, Pace::FAST, None).unwrap();
        let mut seen = Vec::new();
        while let Some(record) = source.poll(Duration::ZERO).unwrap() {
            seen.push((record.offset, String::from_utf8(record.payload).unwrap()));
        }
        assert!(source.finished());
        let order: Vec<&str> = seen.iter().map(|(_, p)| p.as_str()).collect();
        // "not json" has no time of its own, so it stays right after the line before it.
        assert!(order[0].contains("\"a\"") && order[1] == "not json" && order[2].contains("\"b\""), "{order:?}");
        assert_eq!(seen.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![0, 1, 2]);

        let mut resumed = FileSource::open(&path, Pace::FAST, Some((1, None))).unwrap();
        assert_eq!(resumed.poll(Duration::ZERO).unwrap().unwrap().payload, b"not json");
    }

    #[test]
    fn appended_lines_follow_and_a_changed_read_part_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.jsonl");
        let line = |id: &str, second: u32| format!("{{\"id\":\"{id}\",\"published_at\":\"2024-01-01T00:00:{second:02}Z\"}}\n");
        std::fs::write(&path, line("b", 2) + &line("a", 1)).unwrap();
        let mut first = FileSource::open(&path, Pace::FAST, None).unwrap();
        let ids = |source: &mut FileSource| {
            let mut ids = Vec::new();
            while let Some(record) = source.poll(Duration::ZERO).unwrap() {
                let value: serde_json::Value = serde_json::from_slice(&record.payload).unwrap();
                ids.push((record.offset, value["id"].as_str().unwrap().to_string()));
            }
            ids
        };
        assert_eq!(ids(&mut first), vec![(0, "a".to_string()), (1, "b".to_string())]);
        let progress = first.progress().clone();

        // An earlier story appended after the run: read after the old ones, none of them again.
        std::fs::write(&path, line("b", 2) + &line("a", 1) + &line("c", 0)).unwrap();
        let mut resumed = FileSource::open(&path, Pace::FAST, Some((2, Some(&progress)))).unwrap();
        assert_eq!(ids(&mut resumed), vec![(2, "c".to_string())]);
        assert_eq!(resumed.progress().segment_ends.len(), 2);
        // The same file by another name is the same source.
        let dotted = dir.path().join(".").join("n.jsonl");
        assert_eq!(source_name(&dotted), source_name(&path));

        // A line of the part already read was edited: refused, with what to do.
        std::fs::write(&path, line("B", 2) + &line("a", 1)).unwrap();
        let err = FileSource::open(&path, Pace::FAST, Some((2, Some(&progress)))).err().unwrap().to_string();
        assert!(err.contains("have changed") && err.contains("storage.path"), "{err}");
    }

    /// What the index must hold: the lines of each segment as the whole file in memory gave them.
    fn held_whole(bytes: &[u8], segment_ends: &[u64]) -> Vec<(i64, Vec<u8>)> {
        let (mut lines, mut from, mut previous) = (Vec::new(), 0, i64::MIN);
        for &end in segment_ends {
            let mut segment: Vec<(i64, Vec<u8>)> = bytes[from..end as usize]
                .split(|b| *b == b'\n')
                .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
                .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
                .map(|line| {
                    previous = event_time(line).unwrap_or(previous);
                    (previous, line.to_vec())
                })
                .collect();
            segment.sort_by_key(|(t, _)| *t);
            lines.extend(segment);
            from = end as usize;
        }
        lines
    }

    #[test]
    fn the_index_reads_what_the_whole_file_in_memory_did_whatever_the_buffer_cuts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.jsonl");
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for _ in 0..200 {
            let mut bytes = Vec::new();
            for _ in 0..next(12) {
                let line = match next(6) {
                    0 => String::new(),
                    1 => "  \t".into(),
                    2 => "not json".into(),
                    _ => format!("{{\"id\":\"{}\",\"published_at\":\"2024-01-01T00:00:{:02}Z\"}}", next(1000), next(60)),
                };
                bytes.extend(line.as_bytes());
                bytes.extend(if next(3) == 0 { &b"\r\n"[..] } else { &b"\n"[..] });
            }
            if next(2) == 0 {
                bytes.extend(b"{\"published_at\":\"2024-01-01T00:00:30Z\"}");
            }
            std::fs::write(&path, &bytes).unwrap();
            // Segments end anywhere, mid-line too (a run that read a file still being written).
            let mut ends: Vec<u64> = (0..next(3)).map(|_| next(bytes.len() as u64 + 1)).filter(|e| *e > 0).collect();
            ends.push(bytes.len() as u64);
            ends.sort_unstable();
            ends.dedup();
            // What an earlier run read: the end before the last one.
            let read = if ends.len() > 1 { ends[ends.len() - 2] } else { 0 };
            let buffer = 1 + next(7) as usize;
            let index = Index::build(&File::open(&path).unwrap(), &ends, read, buffer).unwrap();
            let indexed: Vec<(i64, Vec<u8>)> =
                index.lines.iter().map(|l| (l.event_ms, bytes[l.offset as usize..(l.offset + l.len) as usize].to_vec())).collect();
            let whole = held_whole(&bytes, &ends);
            assert_eq!(indexed, whole, "{:?} cut at {ends:?}, buffer {buffer}", String::from_utf8_lossy(&bytes));
            assert_eq!(index.sha256, sha256(&bytes));
            assert_eq!(index.sha256_read, sha256(&bytes[..read as usize]));
            // Read through the source, every line passes the check that it is still a line.
            let known = FileProgress { segment_ends: ends[..ends.len() - 1].to_vec(), sha256: sha256(&bytes[..read as usize]) };
            let mut source = FileSource::open(&path, Pace::FAST, (ends.len() > 1).then_some((0, Some(&known)))).unwrap();
            let polled: Vec<Vec<u8>> = std::iter::from_fn(|| source.poll(Duration::ZERO).unwrap()).map(|r| r.payload).collect();
            assert_eq!(polled, whole.into_iter().map(|(_, line)| line).collect::<Vec<_>>(), "{:?} cut at {ends:?}", String::from_utf8_lossy(&bytes));
        }
    }

    /// A line past what any `max_message_bytes` allows is handed on cut (it is dead-lettered as too
    /// large all the same), and the lines after it keep their times and order.
    #[test]
    fn a_line_longer_than_any_message_is_read_only_as_far_as_the_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.jsonl");
        let mut bytes = b"{\"id\":\"a\",\"published_at\":\"2024-01-01T00:00:05Z\"}\n".to_vec();
        bytes.extend(std::iter::repeat_n(b'x', (LINE_READ_LIMIT + 100) as usize));
        bytes.extend(b"\n{\"id\":\"b\",\"published_at\":\"2024-01-01T00:00:01Z\"}\n");
        std::fs::write(&path, &bytes).unwrap();
        let mut source = FileSource::open(&path, Pace::FAST, None).unwrap();
        let records: Vec<Record> = std::iter::from_fn(|| source.poll(Duration::ZERO).unwrap()).collect();
        let read: Vec<&[u8]> = records.iter().map(|r| &r.payload[..]).collect();
        assert_eq!(read.len(), 3);
        assert!(read[0].starts_with(b"{\"id\":\"b\"") && read[1].starts_with(b"{\"id\":\"a\""), "b, then a, then the long line, which has a's time");
        assert_eq!(read[2].len() as u64, LINE_READ_LIMIT);
        assert!(read[2].iter().all(|b| *b == b'x'));
        // What is refused, and the dead letter, give the line's own length, not what was read of it.
        assert_eq!(records.iter().map(Record::size).collect::<Vec<_>>(), [read[0].len() as u64, read[1].len() as u64, LINE_READ_LIMIT + 100]);
        let dead = dir.path().join("dead.jsonl");
        let mut letters = super::super::dead_letter::DeadLetter::file(&dead).unwrap();
        letters.send(&records[2], "too_large", "message has 67108965 bytes").unwrap();
        letters.send(&records[0], "invalid_json", "no").unwrap();
        letters.flush().unwrap();
        let lines: Vec<serde_json::Value> = std::fs::read_to_string(&dead).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!((&lines[0]["payload.truncated"], &lines[0]["payload.size"]), (&serde_json::json!(true), &serde_json::json!(LINE_READ_LIMIT + 100)));
        assert!(lines[1].get("payload.truncated").is_none() && lines[1].get("payload.size").is_none(), "{}", lines[1]);
    }

    /// A file written over while it replays (the same inode, other bytes) is noticed at the next
    /// line, which is no longer between two line ends, instead of handing on pieces of lines.
    #[test]
    fn a_file_written_over_while_it_replays_ends_the_replay_with_the_reason() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.jsonl");
        let line = |id: &str, second: u32| format!("{{\"id\":\"{id}\",\"published_at\":\"2024-01-01T00:00:{second:02}Z\"}}\r\n");
        let text = line("a", 1) + "\n" + &line("b", 2) + &line("c", 3);
        std::fs::write(&path, &text).unwrap();
        let mut source = FileSource::open(&path, Pace::FAST, None).unwrap();
        assert!(source.poll(Duration::ZERO).unwrap().is_some());
        // The same length, shifted by two bytes: each line's offset now falls inside another.
        std::fs::write(&path, format!("\n\n{}", &text[..text.len() - 2])).unwrap();
        let err = source.poll(Duration::ZERO).unwrap_err().to_string();
        assert!(err.contains("line 2") && err.contains("changed while it was read"), "{err}");
        // Unchanged, every line reads, CRLF and blank lines included.
        std::fs::write(&path, &text).unwrap();
        let mut source = FileSource::open(&path, Pace::FAST, None).unwrap();
        assert_eq!(std::iter::from_fn(|| source.poll(Duration::ZERO).unwrap()).count(), 3);
    }

    /// A pipe has no size: read through `/dev/stdin` or `<(zcat …)`, its lines are copied aside
    /// first (the index of a size-0 file read nothing).
    #[test]
    fn a_pipe_is_read_as_a_file_is() {
        let line = |id: &str, second: u32| format!("{{\"id\":\"{id}\",\"published_at\":\"2024-01-01T00:00:{second:02}Z\"}}\n");
        let mut cat = std::process::Command::new("printf").arg(line("b", 2) + &line("a", 1)).stdout(std::process::Stdio::piped()).spawn().unwrap();
        let pipe = File::from(std::os::fd::OwnedFd::from(cat.stdout.take().unwrap()));
        let fd = std::os::fd::AsRawFd::as_raw_fd(&pipe);
        let mut source = FileSource::open(Path::new(&format!("/proc/self/fd/{fd}")), Pace::FAST, None).unwrap();
        let ids: Vec<String> = std::iter::from_fn(|| source.poll(Duration::ZERO).unwrap())
            .map(|r| serde_json::from_slice::<serde_json::Value>(&r.payload).unwrap()["id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, ["a", "b"]);
        cat.wait().unwrap();
    }

    #[test]
    fn paces_by_event_time_at_the_given_speed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.jsonl");
        std::fs::write(
            &path,
            "{\"published_at\":\"2024-01-01T00:00:00Z\"}\n{\"published_at\":\"2024-01-01T00:01:00Z\"}\n",
        )
        .unwrap();
        // One minute of event time at 600× is 100 ms of wall time.
        let mut source = FileSource::open(&path, Pace { speed: 600.0, max_gap_ms: i64::MAX }, None).unwrap();
        assert!(source.poll(Duration::ZERO).unwrap().is_some());
        assert!(source.poll(Duration::from_millis(10)).unwrap().is_none(), "the second line is not due yet");
        let started = Instant::now();
        while source.poll(Duration::from_millis(10)).unwrap().is_none() {}
        assert!(started.elapsed() >= Duration::from_millis(60));
    }

    #[test]
    fn a_gap_past_max_gap_waits_as_max_gap() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.jsonl");
        // A story dated 1970 first, then two 54 years later: 20 days at 1,000×; with a one-minute
        // max_gap that gap is 60 ms, and the minute after it is paced as it is.
        std::fs::write(
            &path,
            "{\"published_at\":\"1970-01-02T00:00:00Z\"}\n{\"published_at\":\"2024-01-01T00:00:00Z\"}\n{\"published_at\":\"2024-01-01T00:01:00Z\"}\n",
        )
        .unwrap();
        let mut source = FileSource::open(&path, Pace { speed: 1000.0, max_gap_ms: 60_000 }, None).unwrap();
        let started = Instant::now();
        assert!(source.poll(Duration::ZERO).unwrap().is_some());
        // Asked again and again while it waits, the gap is skipped once (twice would make it due at once).
        while source.poll(Duration::from_millis(5)).unwrap().is_none() {}
        let second = started.elapsed();
        assert!(second >= Duration::from_millis(60) && second < Duration::from_secs(20), "{second:?}");
        while source.poll(Duration::from_millis(5)).unwrap().is_none() {}
        assert!(started.elapsed() >= Duration::from_millis(120), "{:?}", started.elapsed());
    }
}
