//! The file source: JSON lines replayed in event-time order, as fast as possible or at N× real time.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{Offsets, Record, Source, SourceError};

/// Lines are read up front and stably sorted by `published_at`, so that a file in any order replays
/// the way a live feed would have delivered it. Lines without a readable timestamp keep their place
/// after the line before them (and fail validation downstream, reaching the dead-letter file).
pub struct FileSource {
    topic: Arc<str>,
    lines: Vec<(i64, Vec<u8>)>,
    next: usize,
    speed: f64,
    started: Option<(Instant, i64)>,
}

impl FileSource {
    /// Opens `path`; `start` is the checkpointed offset (lines in event-time order already processed).
    pub fn open(path: &Path, speed: f64, start: i64) -> Result<FileSource, SourceError> {
        let bytes = std::fs::read(path)
            .map_err(|e| SourceError::File { path: path.display().to_string(), reason: e.to_string() })?;
        let mut previous = i64::MIN;
        let mut lines: Vec<(i64, Vec<u8>)> = bytes
            .split(|b| *b == b'\n')
            .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
            .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
            .map(|line| {
                previous = event_time(line).unwrap_or(previous);
                (previous, line.to_vec())
            })
            .collect();
        lines.sort_by_key(|(t, _)| *t);
        let next = usize::try_from(start.max(0)).unwrap_or(usize::MAX).min(lines.len());
        Ok(FileSource { topic: Arc::from(path.display().to_string()), lines, next, speed, started: None })
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
        let mut source = FileSource::open(&path, 0.0, 0).unwrap();
        let mut seen = Vec::new();
        while let Some(record) = source.poll(Duration::ZERO).unwrap() {
            seen.push((record.offset, String::from_utf8(record.payload).unwrap()));
        }
        assert!(source.finished());
        let order: Vec<&str> = seen.iter().map(|(_, p)| p.as_str()).collect();
        // "not json" has no time of its own, so it stays right after the line before it.
        assert!(order[0].contains("\"a\"") && order[1] == "not json" && order[2].contains("\"b\""), "{order:?}");
        assert_eq!(seen.iter().map(|(o, _)| *o).collect::<Vec<_>>(), vec![0, 1, 2]);

        let mut resumed = FileSource::open(&path, 0.0, 1).unwrap();
        assert_eq!(resumed.poll(Duration::ZERO).unwrap().unwrap().payload, b"not json");
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
        let mut source = FileSource::open(&path, 600.0, 0).unwrap();
        assert!(source.poll(Duration::ZERO).unwrap().is_some());
        assert!(source.poll(Duration::from_millis(10)).unwrap().is_none(), "the second line is not due yet");
        let started = Instant::now();
        while source.poll(Duration::from_millis(10)).unwrap().is_none() {}
        assert!(started.elapsed() >= Duration::from_millis(60));
    }
}
