//! Reads what is new in the `label_feedback` journal, for the running pipeline. Every writer (the
//! dashboard and HTTP API, `bearwatch feedback import` from another process) appends files of its
//! own, so following the folder is how corrections from anywhere reach the pipeline.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Utc};

use super::{FeedbackError, Head, LabelFeedback, table};
use crate::error::Classified;
use crate::storage::{self, Location, Table};

pub struct JournalTail {
    storage: Location,
    /// Files whose rows were taken, among those listed at the last call (names start with their
    /// creation time, so few are ever listed twice). A merge of files read before is recognised
    /// by the record of what it holds, and only its other rows are taken.
    read: HashSet<String>,
}

impl JournalTail {
    pub fn new(storage: &Location) -> JournalTail {
        JournalTail { storage: storage.clone(), read: HashSet::new() }
    }

    /// Rows of the files not read before, oldest first (by `created_at`).
    pub fn new_rows(&mut self) -> Result<Vec<LabelFeedback>, FeedbackError> {
        let mut rows = Vec::new();
        let listed = storage::journal_files(&self.storage, Table::LabelFeedback)?;
        let merged = storage::merged_journal_files(listed.iter().map(String::as_str));
        let mut interrupted = false;
        // An append written again under a fresh name (it had landed in a merged hour, and may have
        // been read before that merge appeared) keeps its id: `<ms>-<id>.parquet`.
        let ids_read: HashSet<String> = self.read.iter().filter_map(|n| storage::journal_append_id(n)).map(str::to_string).collect();
        for name in &listed {
            if merged.contains(name.as_str()) || self.read.contains(name) {
                continue;
            }
            if storage::journal_append_id(name).is_some_and(|id| ids_read.contains(id)) {
                self.read.insert(name.clone());
                continue;
            }
            let file = match storage::read_journal_file(&self.storage, Table::LabelFeedback, name) {
                // Out of reach for now (object storage): this file and the rest at the next call.
                Err(e) if e.retryable() && rows.is_empty() => return Err(e.into()),
                Err(e) if e.retryable() => {
                    interrupted = true;
                    break;
                }
                // Merged and deleted since the listing: its merge is listed at the next call.
                Ok(None) => continue,
                Ok(Some(file)) => Ok(file),
                Err(e) => Err(e),
            };
            let parsed = file.map_err(|e| e.to_string()).and_then(|file| {
                let all: Vec<LabelFeedback> =
                    file.batches.iter().map(|b| table::label_feedback_rows(b).map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>()?.into_iter().flatten().collect();
                Ok(unread(&file.held, &self.read, 0).into_iter().flat_map(|range| all.get(range.start.min(all.len())..range.end.min(all.len())).unwrap_or_default().to_vec()).collect::<Vec<_>>())
            });
            match parsed {
                Ok(file_rows) => rows.extend(file_rows),
                // Not a reason to stop scoring: the file stays where it is, and SQL reports it too.
                Err(reason) => {
                    metrics::counter!("bearwatch_feedback_unreadable_files_total").increment(1);
                    tracing::error!(file = %name, reason, "journal file unreadable: its corrections are not applied");
                }
            }
            self.read.insert(name.clone());
        }
        // A file no longer listed was merged (its merge, listed since, was read above) or is gone.
        // Kept while some file was left unread: a merge of it may be among them.
        if !interrupted {
            let listed: HashSet<&String> = listed.iter().collect();
            self.read.retain(|name| listed.contains(name));
        }
        rows.sort_by_key(|r| r.created_at);
        Ok(rows)
    }
}

/// The row ranges of a file not yet taken: all of an append (`held` empty); of a merge, the rows
/// of each file it holds that was not `read`, at any depth (a merge of merges holds their records).
fn unread(held: &[storage::Held], read: &HashSet<String>, at: usize) -> Vec<std::ops::Range<usize>> {
    if held.is_empty() {
        return std::iter::once(at..usize::MAX).collect();
    }
    let mut ranges = Vec::new();
    let mut start = at;
    for item in held {
        if !read.contains(&item.name) {
            if item.held.is_empty() { ranges.push(start..start + item.rows) } else { ranges.extend(unread(&item.held, read, start)) }
        }
        start += item.rows;
    }
    ranges
}

/// The newest `label_feedback` row of each (text hash, head): what a new judgement supersedes. It
/// follows the journal like [`JournalTail`], so a request costs the files written since the last
/// one, not a scan of the whole table (which grows with every request). About 150 bytes a judged
/// text and head.
pub struct LatestLabels {
    tail: JournalTail,
    latest: HashMap<(String, Head), (DateTime<Utc>, String)>,
}

impl LatestLabels {
    pub fn new(storage: &Location) -> LatestLabels {
        LatestLabels { tail: JournalTail::new(storage), latest: HashMap::new() }
    }

    /// Reads what was appended since the last call, by any writer.
    pub fn refresh(&mut self) -> Result<(), FeedbackError> {
        for row in self.tail.new_rows()? {
            self.note(&row);
        }
        Ok(())
    }

    pub fn get(&self, text_hash: &str, head: Head) -> Option<&String> {
        self.latest.get(&(text_hash.to_string(), head)).map(|(_, id)| id)
    }

    /// Takes in one row; an older row read late (another writer's) does not displace a newer one.
    pub fn note(&mut self, row: &LabelFeedback) {
        let entry = self.latest.entry((row.text_hash.clone(), row.head)).or_insert_with(|| (row.created_at, row.feedback_id.clone()));
        if row.created_at >= entry.0 {
            *entry = (row.created_at, row.feedback_id.clone());
        }
    }
}
