//! What can go wrong with the files the alert stage keeps for itself (the outbox, the silences).

use std::path::{Path, PathBuf};

use crate::error::{Classified, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum AlertError {
    #[error("{path}: {reason}")]
    Io { path: PathBuf, reason: String },
    #[error("{path} is unreadable ({reason}); move it away to start from scratch")]
    Corrupt { path: PathBuf, reason: String },
}

impl AlertError {
    pub(super) fn io(path: &Path) -> impl Fn(std::io::Error) -> AlertError + Copy + '_ {
        move |e| AlertError::Io { path: path.to_path_buf(), reason: e.to_string() }
    }
}

impl Classified for AlertError {
    fn class(&self) -> ErrorClass {
        ErrorClass::External
    }
    fn retryable(&self) -> bool {
        matches!(self, AlertError::Io { .. })
    }
}
