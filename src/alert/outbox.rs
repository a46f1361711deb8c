//! The outbox: every notification is written here (appended and fsynced) before it is sent, and
//! every attempt's outcome after. Replaying the file at start restores what is pending, so a
//! restart neither loses a notification nor sends one again that was recorded as sent. Reminders
//! and Alertmanager re-sends (`KEY#n`) add entries while an alert fires; once settled they are not
//! needed, and the file is rewritten without them from time to time. It is rewritten too when
//! failed attempts have piled up (a receiver down for a day adds a line a minute per notice), and
//! settled notices are kept [`SETTLED_KEEP_MS`], so file and memory stay bounded however long
//! the pipeline runs and however many alerts it raises.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader};
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
    /// An entry as it stood when the file was compacted.
    Restored(Entry),
}

/// Settled reminders allowed before the file is rewritten without them.
const SETTLED_REMINDERS_MAX: usize = 256;
/// Lines allowed beyond two per entry (queued, settled) before the file is rewritten.
const EXTRA_LINES_MAX: usize = 4096;
/// How long a settled notice is known: a change raised again (a restart replays what its last
/// checkpoint had not covered, seconds to minutes) is then not sent twice.
const SETTLED_KEEP_MS: i64 = 7 * 86_400_000;
/// How often settled notices are looked over for ones past [`SETTLED_KEEP_MS`].
const AGE_CHECK_MS: i64 = 3_600_000;

fn is_reminder(key: &str) -> bool {
    key.contains('#')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    settled_reminders: usize,
    /// Lines in the file.
    lines: usize,
    /// When settled notices are next looked over for ones past their keeping.
    next_age_check_ms: i64,
}

/// When a notice stopped being pending: sent, or given up at its expiry.
fn settled_at(entry: &Entry) -> i64 {
    entry.sent_ms.unwrap_or(entry.expires_ms)
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Outbox {
    pub fn open(path: &Path) -> Result<Outbox, AlertError> {
        let io = AlertError::io(path);
        let mut entries = BTreeMap::new();
        let mut lines = 0;
        if path.exists() {
            for (number, line) in BufReader::new(File::open(path).map_err(io)?).lines().enumerate() {
                let line = line.map_err(io)?;
                lines += 1;
                match serde_json::from_str::<Event>(&line) {
                    Ok(event) => apply(&mut entries, event),
                    // Only the last line can be torn, by a crash in the middle of an append.
                    Err(e) => tracing::warn!(file = %path.display(), line = number + 1, error = %e, "skipping an unreadable outbox line"),
                }
            }
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(io)?;
        let settled_reminders = entries.values().filter(|e| e.status != Status::Pending && is_reminder(&e.key)).count();
        let mut outbox = Outbox { path: path.to_path_buf(), file, entries, settled_reminders, lines, next_age_check_ms: i64::MIN };
        if outbox.settled_reminders > 0 || outbox.compaction_due() {
            outbox.compact()?;
        }
        Ok(outbox)
    }

    /// Whether failed attempts have piled up in the file, or (looked at hourly) a settled notice
    /// is past its keeping.
    fn compaction_due(&mut self) -> bool {
        if self.lines > 2 * self.entries.len() + EXTRA_LINES_MAX {
            return true;
        }
        let now = now_ms();
        if now < self.next_age_check_ms {
            return false;
        }
        self.next_age_check_ms = now + AGE_CHECK_MS;
        self.entries.values().any(|e| e.status != Status::Pending && settled_at(e) < now - SETTLED_KEEP_MS)
    }

    /// Rewrites the file, whole, with one line per entry: every entry but the settled reminders
    /// and the notices settled longer ago than [`SETTLED_KEEP_MS`].
    fn compact(&mut self) -> Result<(), AlertError> {
        let keep_from = now_ms() - SETTLED_KEEP_MS;
        self.entries.retain(|key, e| e.status == Status::Pending || (!is_reminder(key) && settled_at(e) >= keep_from));
        let mut text = Vec::new();
        for entry in self.entries.values() {
            serde_json::to_writer(&mut text, &Event::Restored(entry.clone())).map_err(|e| AlertError::Io { path: self.path.clone(), reason: e.to_string() })?;
            text.push(b'\n');
        }
        super::replace_file(&self.path, &text)?;
        self.file = OpenOptions::new().append(true).open(&self.path).map_err(AlertError::io(&self.path))?;
        self.settled_reminders = 0;
        self.lines = self.entries.len();
        Ok(())
    }

    fn settled(&mut self, key: &str) {
        if is_reminder(key) {
            self.settled_reminders += 1;
        }
    }

    /// Compacts when settled reminders or failed attempts have piled up, or notices are past
    /// their keeping (the notifier calls it once it has recorded their rows for the
    /// `notifications` table).
    pub fn compact_when_due(&mut self) -> Result<(), AlertError> {
        if self.settled_reminders > SETTLED_REMINDERS_MAX || self.compaction_due() { self.compact() } else { Ok(()) }
    }

    /// Writes `event`, then applies it: what is queued must be on disk before anyone sends it.
    fn append(&mut self, event: Event) -> Result<(), AlertError> {
        self.write(&event)?;
        apply(&mut self.entries, event);
        Ok(())
    }

    /// Applies an attempt's outcome, and writes it. It applies even when it cannot be written (a
    /// full disk): the running process must not send a notice again and again because its sending
    /// could not be recorded; a restart may then repeat it once, as after a crash.
    fn record(&mut self, event: Event) -> Result<(), AlertError> {
        let written = self.write(&event);
        apply(&mut self.entries, event);
        written
    }

    /// Appends `event` as one line, durably and whole (`files::append_whole`), so that no torn line
    /// runs into the next one.
    fn write(&mut self, event: &Event) -> Result<(), AlertError> {
        let mut line = serde_json::to_vec(event).map_err(|e| AlertError::Io { path: self.path.clone(), reason: e.to_string() })?;
        line.push(b'\n');
        crate::files::append_whole(&mut self.file, &line).map_err(AlertError::io(&self.path))?;
        self.lines += 1;
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
        self.record(Event::Failed { key: key.to_string(), at_ms, error, next_ms })
    }

    pub fn sent(&mut self, key: &str, at_ms: i64) -> Result<(), AlertError> {
        let written = self.record(Event::Sent { key: key.to_string(), at_ms });
        self.settled(key);
        written
    }

    pub fn drop_entry(&mut self, key: &str, at_ms: i64, reason: String) -> Result<(), AlertError> {
        let written = self.record(Event::Dropped { key: key.to_string(), at_ms, reason });
        self.settled(key);
        written
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
        Event::Restored(entry) => {
            entries.insert(entry.key.clone(), entry);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alert::notify::tests::alert;
    use crate::detect::AlertState;

    /// A full disk (`/dev/full` in place of the file): a notice that was sent is not due again in
    /// this process, and one that could not be queued is not taken, so its caller keeps it.
    #[test]
    fn a_full_disk_neither_loses_a_queued_notice_nor_sends_one_again_and_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.jsonl");
        let mut outbox = Outbox::open(&path).unwrap();
        outbox.enqueue("a1/firing/am".into(), "am".into(), alert(AlertState::Firing), 0, 100, 10).unwrap();
        let file = std::mem::replace(&mut outbox.file, OpenOptions::new().append(true).open("/dev/full").unwrap());
        assert!(outbox.sent("a1/firing/am", 1).is_err(), "the disk is full");
        assert_eq!(outbox.get("a1/firing/am").map(|e| e.status), Some(Status::Sent));
        assert!(outbox.due(i64::MAX).is_empty(), "sent, though not recorded: not sent again");
        assert!(outbox.enqueue("a2/firing/am".into(), "am".into(), alert(AlertState::Firing), 0, 100, 10).is_err());
        assert!(outbox.get("a2/firing/am").is_none() && outbox.due(i64::MAX).is_empty(), "not on disk, so not to be sent");
        // Space again: the caller's retry queues it.
        outbox.file = file;
        assert!(outbox.enqueue("a2/firing/am".into(), "am".into(), alert(AlertState::Firing), 0, 100, 10).unwrap());
        drop(outbox);
        let reopened = Outbox::open(&path).unwrap();
        let status = |key: &str| reopened.get(key).map(|e| e.status);
        // The send the disk did not take is repeated once after a restart, as after a crash.
        assert_eq!((status("a1/firing/am"), status("a2/firing/am")), (Some(Status::Pending), Some(Status::Pending)));
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(text.lines().all(|l| serde_json::from_str::<Event>(l).is_ok()), "{text}");
    }

    #[test]
    fn settled_reminders_are_compacted_away_and_the_rest_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.jsonl");
        let mut outbox = Outbox::open(&path).unwrap();
        outbox.enqueue("a1/firing/am".into(), "am".into(), alert(AlertState::Firing), 0, 100, 10).unwrap();
        outbox.sent("a1/firing/am", now_ms()).unwrap();
        // A long firing alert: one re-send after another.
        for n in 1..=2 * SETTLED_REMINDERS_MAX {
            let key = format!("a1/firing/am#{n}");
            outbox.enqueue(key.clone(), "am".into(), alert(AlertState::Firing), n as i64, 100, 10).unwrap();
            outbox.sent(&key, n as i64).unwrap();
            outbox.compact_when_due().unwrap();
        }
        outbox.enqueue("a1/firing/am#999".into(), "am".into(), alert(AlertState::Firing), 5, 100, 10).unwrap();
        outbox.failed("a1/firing/am#999", 6, "down".into(), 7).unwrap();
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        // Uncompacted: two lines per re-send, 4 × SETTLED_REMINDERS_MAX and more.
        assert!(lines <= 2 * SETTLED_REMINDERS_MAX + 4, "the file was compacted while it ran: {lines} lines");
        drop(outbox);

        let reopened = Outbox::open(&path).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2, "compacted on open: the original and the pending re-send");
        assert_eq!(reopened.get("a1/firing/am").map(|e| e.status), Some(Status::Sent), "still known as sent: never sent again");
        let pending = reopened.get("a1/firing/am#999").unwrap();
        assert_eq!((pending.status, pending.attempts, pending.next_ms, pending.last_error.as_deref()), (Status::Pending, 1, 7, Some("down")));
        assert!(reopened.get("a1/firing/am#1").is_none());
    }

    /// A receiver down for days: each retry added a line, and only settled reminders made the
    /// file be rewritten.
    #[test]
    fn failed_attempts_do_not_pile_up_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.jsonl");
        let mut outbox = Outbox::open(&path).unwrap();
        outbox.enqueue("a1/firing/hook".into(), "hook".into(), alert(AlertState::Firing), 0, i64::MAX, 0).unwrap();
        for attempt in 0..3 * EXTRA_LINES_MAX as i64 {
            outbox.failed("a1/firing/hook", attempt, format!("HTTP 503 (attempt {attempt})"), attempt + 1).unwrap();
            outbox.compact_when_due().unwrap();
        }
        let lines = std::fs::read_to_string(&path).unwrap().lines().count();
        assert!(lines <= EXTRA_LINES_MAX + 3, "{lines} lines for one notice");
        drop(outbox);
        let reopened = Outbox::open(&path).unwrap();
        let entry = reopened.get("a1/firing/hook").unwrap();
        let last = 3 * EXTRA_LINES_MAX as i64 - 1;
        assert_eq!((entry.status, entry.attempts as i64, entry.next_ms), (Status::Pending, last + 1, last + 1));
        assert_eq!(entry.last_error.as_deref(), Some(format!("HTTP 503 (attempt {last})").as_str()));
    }

    /// Every alert of a long run (a feed naming ever new tickers fires one per ticker) stayed in
    /// the file and in memory for good; a settled notice is kept a week.
    #[test]
    fn settled_notices_are_kept_a_week_and_pending_ones_until_they_settle() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.jsonl");
        let mut outbox = Outbox::open(&path).unwrap();
        let now = now_ms();
        let long_ago = now - SETTLED_KEEP_MS - 60_000;
        outbox.enqueue("old/firing/hook".into(), "hook".into(), alert(AlertState::Firing), long_ago, long_ago + 1, 0).unwrap();
        outbox.sent("old/firing/hook", long_ago).unwrap();
        outbox.enqueue("expired/firing/hook".into(), "hook".into(), alert(AlertState::Firing), long_ago, long_ago, 0).unwrap();
        outbox.drop_entry("expired/firing/hook", long_ago, "expired after 9 attempts".into()).unwrap();
        outbox.enqueue("new/firing/hook".into(), "hook".into(), alert(AlertState::Firing), now, now + 1, 0).unwrap();
        outbox.sent("new/firing/hook", now).unwrap();
        outbox.enqueue("waiting/firing/hook".into(), "hook".into(), alert(AlertState::Firing), long_ago, long_ago, 0).unwrap();
        drop(outbox);

        let reopened = Outbox::open(&path).unwrap();
        let status = |key: &str| reopened.get(key).map(|e| e.status);
        assert_eq!((status("old/firing/hook"), status("expired/firing/hook")), (None, None), "settled over a week ago");
        assert_eq!((status("new/firing/hook"), status("waiting/firing/hook")), (Some(Status::Sent), Some(Status::Pending)));
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }

    #[test]
    fn an_alert_without_a_threshold_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("outbox.jsonl");
        let mut outbox = Outbox::open(&path).unwrap();
        // A `sql` rule's alert has no threshold: JSON writes NaN as null.
        let sql_alert = Alert { threshold: f64::NAN, ..alert(AlertState::Firing) };
        outbox.enqueue("a1/firing/am".into(), "am".into(), sql_alert, 0, 100, 10).unwrap();
        drop(outbox);
        let reopened = Outbox::open(&path).unwrap();
        let entry = reopened.get("a1/firing/am").expect("the queued notification is still there after a restart");
        assert_eq!(entry.status, Status::Pending);
        assert!(entry.alert.threshold.is_nan());
    }
}
