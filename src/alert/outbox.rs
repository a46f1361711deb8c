//! The outbox: every notification is written here (appended and fsynced) before it is sent, and
//! every attempt's outcome after. Replaying the file at start restores what is pending, so a
//! restart neither loses a notification nor sends one again that was recorded as sent.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::detect::Alert;
use super::AlertError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Event {
    Queued { key: String, receiver: String, alert: Alert, due_ms: i64, expires_ms: i64, repeat_ms: i64 },
    Failed { key: String, at_ms: i64, error: String, next_ms: i64 },
    Sent { key: String, at_ms: i64 },
    /// Given up: past its expiry, or a reminder made moot by the alert resolving.
    Dropped { key: String, at_ms: i64, reason: String },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Pending,
    Sent,
    Dropped,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Pending => "pending",
            Status::Sent => "sent",
            Status::Dropped => "dropped",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Entry {
    pub key: String,
    pub receiver: String,
    pub alert: Alert,
    pub status: Status,
    pub attempts: u32,
    pub last_error: Option<String>,
    pub next_ms: i64,
    pub expires_ms: i64,
    pub repeat_ms: i64,
    pub sent_ms: Option<i64>,
}

pub struct Outbox {
    path: PathBuf,
    file: File,
    entries: BTreeMap<String, Entry>,
}

impl Outbox {
    pub fn open(path: &Path) -> Result<Outbox, AlertError> {
        let io = AlertError::io(path);
        let mut entries = BTreeMap::new();
        if path.exists() {
            for (number, line) in BufReader::new(File::open(path).map_err(io)?).lines().enumerate() {
                let line = line.map_err(io)?;
                match serde_json::from_str::<Event>(&line) {
                    Ok(event) => apply(&mut entries, event),
                    // Only the last line can be torn, by a crash in the middle of an append.
                    Err(e) => tracing::warn!(file = %path.display(), line = number + 1, error = %e, "skipping an unreadable outbox line"),
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        Ok(Outbox { path: path.to_path_buf(), file, entries })
    }

    fn append(&mut self, event: Event) -> Result<(), AlertError> {
        let io = AlertError::io(&self.path);
        let mut line = serde_json::to_vec(&event).map_err(|e| AlertError::Io { path: self.path.clone(), reason: e.to_string() })?;
        line.push(b'\n');
        self.file.write_all(&line).map_err(io)?;
        self.file.sync_data().map_err(io)?;
        apply(&mut self.entries, event);
        Ok(())
    }

    /// Records a notification to send; false if this key is already known (sent or pending).
    pub fn enqueue(&mut self, key: String, receiver: String, alert: Alert, due_ms: i64, expires_ms: i64, repeat_ms: i64) -> Result<bool, AlertError> {
        if self.entries.contains_key(&key) {
            return Ok(false);
        }
        self.append(Event::Queued { key, receiver, alert, due_ms, expires_ms, repeat_ms })?;
        Ok(true)
    }

    pub fn failed(&mut self, key: &str, at_ms: i64, error: String, next_ms: i64) -> Result<(), AlertError> {
        self.append(Event::Failed { key: key.to_string(), at_ms, error, next_ms })
    }

    pub fn sent(&mut self, key: &str, at_ms: i64) -> Result<(), AlertError> {
        self.append(Event::Sent { key: key.to_string(), at_ms })
    }

    pub fn drop_entry(&mut self, key: &str, at_ms: i64, reason: String) -> Result<(), AlertError> {
        self.append(Event::Dropped { key: key.to_string(), at_ms, reason })
    }

    pub fn get(&self, key: &str) -> Option<&Entry> {
        self.entries.get(key)
    }

    /// Pending keys due at `now_ms`, oldest first.
    pub fn due(&self, now_ms: i64) -> Vec<String> {
        let mut due: Vec<&Entry> = self.entries.values().filter(|e| e.status == Status::Pending && e.next_ms <= now_ms).collect();
        due.sort_by_key(|e| e.next_ms);
        due.into_iter().map(|e| e.key.clone()).collect()
    }

    pub fn pending(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values().filter(|e| e.status == Status::Pending)
    }
}

fn apply(entries: &mut BTreeMap<String, Entry>, event: Event) {
    match event {
        Event::Queued { key, receiver, alert, due_ms, expires_ms, repeat_ms } => {
            entries.insert(
                key.clone(),
                Entry {
                    key,
                    receiver,
                    alert,
                    status: Status::Pending,
                    attempts: 0,
                    last_error: None,
                    next_ms: due_ms,
                    expires_ms,
                    repeat_ms,
                    sent_ms: None,
                },
            );
        }
        Event::Failed { key, error, next_ms, .. } => {
            if let Some(e) = entries.get_mut(&key) {
                e.attempts += 1;
                e.last_error = Some(error);
                e.next_ms = next_ms;
            }
        }
        Event::Sent { key, at_ms } => {
            if let Some(e) = entries.get_mut(&key) {
                e.attempts += 1;
                e.status = Status::Sent;
                e.sent_ms = Some(at_ms);
            }
        }
        Event::Dropped { key, reason, .. } => {
            if let Some(e) = entries.get_mut(&key) {
                e.status = Status::Dropped;
                e.last_error = Some(reason);
            }
        }
    }
}
