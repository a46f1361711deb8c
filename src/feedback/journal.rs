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
    /// Files already read (names start with their creation time, so few are ever listed twice).
    read: HashSet<String>,
}

impl JournalTail {
    pub fn new(storage: &Location) -> JournalTail {
        JournalTail { storage: storage.clone(), read: HashSet::new() }
    }

    /// Rows of the files not read before, oldest file first and in file order within one.
    pub fn new_rows(&mut self) -> Result<Vec<LabelFeedback>, FeedbackError> {
        let mut rows = Vec::new();
        for name in storage::journal_files(&self.storage, Table::LabelFeedback)? {
            if self.read.contains(&name) {
                continue;
            }
            let batches = match storage::read_journal(&self.storage, Table::LabelFeedback, &name) {
                // Out of reach for now (object storage): this file and the rest at the next call.
                Err(e) if e.retryable() && rows.is_empty() => return Err(e.into()),
                Err(e) if e.retryable() => break,
                other => other,
            };
            let parsed = batches
                .map_err(|e| e.to_string())
                .and_then(|batches| batches.iter().map(|b| table::label_feedback_rows(b).map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>());
            match parsed {
                Ok(file_rows) => rows.extend(file_rows.into_iter().flatten()),
                // Not a reason to stop scoring: the file stays where it is, and SQL reports it too.
                Err(reason) => {
                    metrics::counter!("bearwatch_feedback_unreadable_files_total").increment(1);
                    tracing::error!(file = %name, reason, "journal file unreadable: its corrections are not applied");
                }
            }
            self.read.insert(name);
        }
        rows.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(rows)
    }
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
