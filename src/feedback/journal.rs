//! Reads what is new in the `label_feedback` journal, for the running pipeline. Every writer (the
//! dashboard and HTTP API, `bearwatch feedback import` from another process) appends files of its
//! own, so following the folder is how corrections from anywhere reach the pipeline.

use std::collections::HashSet;
use std::path::Path;

use super::{FeedbackError, LabelFeedback, table};
use crate::storage::{self, Table};

pub struct JournalTail {
    storage: std::path::PathBuf,
    /// Files already read (names start with their creation time, so few are ever listed twice).
    read: HashSet<std::path::PathBuf>,
}

impl JournalTail {
    pub fn new(storage: &Path) -> JournalTail {
        JournalTail { storage: storage.to_path_buf(), read: HashSet::new() }
    }

    /// Rows of the files not read before, oldest file first and in file order within one.
    pub fn new_rows(&mut self) -> Result<Vec<LabelFeedback>, FeedbackError> {
        let mut rows = Vec::new();
        for path in storage::journal_files(&self.storage, Table::LabelFeedback)? {
            if self.read.contains(&path) {
                continue;
            }
            let parsed = storage::read_file(&path)
                .and_then(|batches| batches.iter().map(|b| table::label_feedback_rows(b).map_err(|e| e.to_string())).collect::<Result<Vec<_>, _>>());
            match parsed {
                Ok(file_rows) => rows.extend(file_rows.into_iter().flatten()),
                // Not a reason to stop scoring: the file stays where it is, and SQL reports it too.
                Err(reason) => {
                    metrics::counter!("bearwatch_feedback_unreadable_files_total").increment(1);
                    tracing::error!(path = %path.display(), reason, "journal file unreadable: its corrections are not applied");
                }
            }
            self.read.insert(path);
        }
        rows.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(rows)
    }
}
