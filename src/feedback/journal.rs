//! Reads what is new in the `label_feedback` journal, for the running pipeline. Every writer (the
//! dashboard and HTTP API, `bearwatch feedback import` from another process) appends files of its
//! own, so following the folder is how corrections from anywhere reach the pipeline.

use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};

use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

use super::{FeedbackError, LabelFeedback, table};
use crate::storage::{StorageError, Table};

pub struct JournalTail {
    dir: PathBuf,
    /// Files already read (names start with their creation time, so few are ever listed twice).
    read: HashSet<String>,
}

impl JournalTail {
    pub fn new(storage: &Path) -> JournalTail {
        JournalTail { dir: storage.join(Table::LabelFeedback.name()), read: HashSet::new() }
    }

    /// Rows of the files not read before, oldest file first and in file order within one.
    pub fn new_rows(&mut self) -> Result<Vec<LabelFeedback>, FeedbackError> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(&self.dir, e)),
        };
        let mut names: Vec<String> = entries
            .filter_map(Result::ok)
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|name| name.ends_with(".parquet") && !name.starts_with('.') && !self.read.contains(name))
            .collect();
        names.sort();
        let mut rows = Vec::new();
        for name in names {
            let path = self.dir.join(&name);
            match read_file(&path) {
                Ok(file_rows) => rows.extend(file_rows),
                // Not a reason to stop scoring: the file stays where it is, and SQL reports it too.
                Err(reason) => {
                    metrics::counter!("bearwatch_feedback_unreadable_files_total").increment(1);
                    tracing::error!(path = %path.display(), reason, "journal file unreadable: its corrections are not applied");
                }
            }
            self.read.insert(name);
        }
        rows.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(rows)
    }
}

fn read_file(path: &Path) -> Result<Vec<LabelFeedback>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file).and_then(|b| b.build()).map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for batch in reader {
        rows.extend(table::label_feedback_rows(&batch.map_err(|e| e.to_string())?).map_err(|e| e.to_string())?);
    }
    Ok(rows)
}

fn io(path: &Path, e: std::io::Error) -> FeedbackError {
    FeedbackError::Storage(StorageError::Io { path: path.to_path_buf(), reason: e.to_string() })
}
