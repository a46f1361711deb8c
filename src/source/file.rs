//! The file source: JSON lines replayed in event-time order, as fast as possible or at N× real time.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{Offsets, Record, Source, SourceError};

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
pub struct FileSource {
    topic: Arc<str>,
    lines: Vec<(i64, Vec<u8>)>,
    next: usize,
    speed: f64,
    started: Option<(Instant, i64)>,
    progress: FileProgress,
}

impl FileSource {
    /// Opens `path`; `resume` is the checkpointed offset (lines already processed) with what the
    /// checkpoint knew of the file. Refuses a file whose part already read has changed.
    pub fn open(path: &Path, speed: f64, resume: Option<(i64, Option<&FileProgress>)>) -> Result<FileSource, SourceError> {
        let failed = |reason: String| SourceError::File { path: path.display().to_string(), reason };
        let bytes = std::fs::read(path).map_err(|e| failed(e.to_string()))?;
        let (start, known) = resume.unwrap_or((0, None));
        let mut segment_ends = match known {
            Some(known) => {
                let read = known.segment_ends.last().copied().unwrap_or(0);
                let same = usize::try_from(read).ok().and_then(|n| bytes.get(..n)).is_some_and(|part| sha256(part) == known.sha256);
                if !same {
                    return Err(failed(format!(
                        "the first {read} bytes, which an earlier run already read, have changed (or the file is shorter): \
                         its checkpoint cannot resume it. Restore the file, give the new data another file, \
                         or start this pipeline from scratch (a new storage.path)"
                    )));
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
        if segment_ends.is_empty() || (bytes.len() as u64) > read {
            segment_ends.push(bytes.len() as u64);
        }
        let mut lines = Vec::new();
        let mut from = 0usize;
        for &end in &segment_ends {
            let end = end as usize;
            let mut segment = parse_lines(&bytes[from..end]);
            segment.sort_by_key(|(t, _)| *t);
            lines.extend(segment);
            from = end;
        }
        let progress = FileProgress { sha256: sha256(&bytes[..from]), segment_ends };
        let next = usize::try_from(start.max(0)).unwrap_or(usize::MAX).min(lines.len());
        Ok(FileSource { topic: Arc::from(source_name(path).as_str()), lines, next, speed, started: None, progress })
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

    /// How long to wait before the next line is due at `speed`× the stories' own pace.
    fn due_in(&mut self, event_ms: i64) -> Duration {
        if self.speed <= 0.0 || event_ms == i64::MIN {
            return Duration::ZERO;
        }
        let (wall_start, event_start) = *self.started.get_or_insert((Instant::now(), event_ms));
        let due = Duration::from_secs_f64(((event_ms - event_start).max(0) as f64 / 1000.0) / self.speed);
        due.saturating_sub(wall_start.elapsed())
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
    sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Non-blank lines, each with the event time of the last line before it that had one.
fn parse_lines(bytes: &[u8]) -> Vec<(i64, Vec<u8>)> {
    let mut previous = i64::MIN;
    bytes
        .split(|b| *b == b'\n')
        .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
        .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
        .map(|line| {
            previous = event_time(line).unwrap_or(previous);
            (previous, line.to_vec())
        })
        .collect()
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
        let Some((event_ms, _)) = self.lines.get(self.next) else {
            return Ok(None);
        };
        let wait = self.due_in(*event_ms);
        if wait > timeout {
            std::thread::sleep(timeout);
            return Ok(None);
        }
        std::thread::sleep(wait);
        let offset = self.next as i64;
        let payload = std::mem::take(&mut self.lines[self.next].1);
        self.next += 1;
        Ok(Some(Record { topic: self.topic.clone(), partition: 0, offset, payload, from_kafka: false }))
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
        let mut source = FileSource::open(&path, 0.0, None).unwrap();
        let mut seen = Vec::new();
        while let Some(record) = source.poll(Duration::ZERO).unwrap() {
            seen.push((record.offset, String::from_utf8(record.payload).unwrap()));
        }
        assert!(source.finished());
        let order: Vec<&str> = seen.iter().map(|(_, p)| p.as_str()).collect();
        // "not json" has no time of its own, so it stays right after the line before it.
        assert!(order[0].contains("\"a\"") && order[1] == "not json" && order[2].contains("\"b\""), "{order:?}");
        assert_eq!(seen.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![0, 1, 2]);

        let mut resumed = FileSource::open(&path, 0.0, Some((1, None))).unwrap();
        assert_eq!(resumed.poll(Duration::ZERO).unwrap().unwrap().payload, b"not json");
    }

    #[test]
    fn appended_lines_follow_and_a_changed_read_part_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("n.jsonl");
        let line = |id: &str, second: u32| format!("{{\"id\":\"{id}\",\"published_at\":\"2024-01-01T00:00:{second:02}Z\"}}\n");
        std::fs::write(&path, line("b", 2) + &line("a", 1)).unwrap();
        let mut first = FileSource::open(&path, 0.0, None).unwrap();
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
        let mut resumed = FileSource::open(&path, 0.0, Some((2, Some(&progress)))).unwrap();
        assert_eq!(ids(&mut resumed), vec![(2, "c".to_string())]);
        assert_eq!(resumed.progress().segment_ends.len(), 2);
        // The same file by another name is the same source.
        let dotted = dir.path().join(".").join("n.jsonl");
        assert_eq!(source_name(&dotted), source_name(&path));

        // A line of the part already read was edited: refused, with what to do.
        std::fs::write(&path, line("B", 2) + &line("a", 1)).unwrap();
        let err = FileSource::open(&path, 0.0, Some((2, Some(&progress)))).err().unwrap().to_string();
        assert!(err.contains("have changed") && err.contains("storage.path"), "{err}");
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
        let mut source = FileSource::open(&path, 600.0, None).unwrap();
        assert!(source.poll(Duration::ZERO).unwrap().is_some());
        assert!(source.poll(Duration::from_millis(10)).unwrap().is_none(), "the second line is not due yet");
        let started = Instant::now();
        while source.poll(Duration::from_millis(10)).unwrap().is_none() {}
        assert!(started.elapsed() >= Duration::from_millis(60));
    }
}
