//! `[storage]`: where the tables and the checkpoint live, and how often they are written.

use std::path::PathBuf;

use serde::Deserialize;

use super::{Location, StorageError};
use crate::config::env::EnvString;
use crate::config::{FieldError, HumanDuration, within};

/// `[storage]`: Parquet tables and the checkpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `${ENV}` expands, so that several instances can share one file.
    #[serde(deserialize_with = "crate::config::env::path")]
    pub path: PathBuf,
    /// How often state is checkpointed, tables are flushed and offsets committed.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: HumanDuration,
    /// A checkpoint (and so a new Parquet file) is also taken when this many stories are buffered.
    #[serde(default = "default_roll_rows")]
    pub roll_rows: usize,
    /// ...and when the text of the stories read since the last one, in flight or buffered, comes to
    /// this many bytes: long bodies fill memory long before `roll_rows` stories do.
    #[serde(default = "default_roll_bytes")]
    pub roll_bytes: usize,
    /// Delete earlier tables and checkpoint at start. For demos that replay the same file each run.
    #[serde(default)]
    pub reset_on_start: bool,
    /// Files only this process reads and writes (the notification outbox, silences, the file
    /// source's dead letters): the storage folder itself when `path` is local; required beside an
    /// `s3://` path.
    #[serde(default, deserialize_with = "crate::config::env::optional_path")]
    pub local_path: Option<PathBuf>,
    /// This process's name among several that share `path` (aggregate instances, `${ENV}` expands):
    /// its tables go to `<table>/instance=<name>/` and its checkpoint to `checkpoints/<name>.json`,
    /// and SQL over the storage reads every instance's. Unset: the storage is this process's alone.
    pub instance: Option<EnvString>,
    /// `[storage.s3]`: the client of an `s3://` path.
    #[serde(default)]
    pub s3: S3Config,
}

/// `[storage.s3]`. Each setting left out comes from the standard environment variable
/// (`AWS_ENDPOINT_URL`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`); `${ENV}` expands.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    /// A self-hosted or non-AWS server, e.g. `http://127.0.0.1:9000` (plain HTTP is allowed then).
    pub endpoint: Option<EnvString>,
    pub region: Option<EnvString>,
    pub access_key_id: Option<EnvString>,
    pub secret_access_key: Option<EnvString>,
    /// `https://bucket.host/key` instead of the path-style `https://host/bucket/key` that
    /// self-hosted servers expect.
    #[serde(default)]
    pub virtual_hosted_style: bool,
    /// Each request's time limit (retries come on top, bounded at three times this).
    #[serde(default = "default_s3_timeout")]
    pub timeout: HumanDuration,
    /// Retries of a failed request, with exponential backoff from 100 ms up to 5 s.
    #[serde(default = "default_s3_retries")]
    pub retries: usize,
}

impl Default for S3Config {
    fn default() -> Self {
        S3Config {
            endpoint: None,
            region: None,
            access_key_id: None,
            secret_access_key: None,
            virtual_hosted_style: false,
            timeout: default_s3_timeout(),
            retries: default_s3_retries(),
        }
    }
}

fn default_s3_timeout() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}
fn default_s3_retries() -> usize {
    5
}

fn default_checkpoint_interval() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}
fn default_roll_rows() -> usize {
    100_000
}
fn default_roll_bytes() -> usize {
    64 << 20
}

impl StorageConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.checkpoint_interval.as_millis() <= 0 {
            return Err(("storage.checkpoint_interval", "must be longer than 0".into()));
        }
        within("storage.roll_rows", self.roll_rows, 1, 10_000_000)?;
        within("storage.roll_bytes", self.roll_bytes, 1 << 20, 1 << 34)?;
        within("storage.s3.retries", self.s3.retries, 0, 20)?;
        if !(1..=600).contains(&self.s3.timeout.0.as_secs()) {
            return Err(("storage.s3.timeout", "must be between 1 s and 10 min".into()));
        }
        if let Some(name) = &self.instance
            && (name.as_str().is_empty() || name.as_str().len() > 64 || !name.as_str().chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'))
        {
            return Err(("storage.instance", format!("{name:?} must be 1 to 64 letters, digits, `-` or `_`")));
        }
        if let Some(text) = self.path.to_str().filter(|p| p.contains("://"))
            && !text.starts_with("s3://")
        {
            return Err(("storage.path", format!("{text:?}: a folder or an s3:// URL (S3 or an S3-compatible server)")));
        }
        if self.is_object_storage() && self.local_path.is_none() {
            return Err(("storage.local_path", "is required when storage.path is an s3:// URL: the notification outbox, silences and dead letters stay on this machine".into()));
        }
        Ok(())
    }

    fn is_object_storage(&self) -> bool {
        self.path.to_str().is_some_and(|p| p.contains("://"))
    }

    /// Where the tables, checkpoint and journals are (this builds the object-store client).
    pub fn location(&self) -> Result<Location, StorageError> {
        Location::parse(&self.path.to_string_lossy(), &self.s3)
    }

    pub fn instance(&self) -> Option<&str> {
        self.instance.as_ref().map(EnvString::as_str)
    }

    /// The folder for files only this process uses (see `local_path`).
    pub fn local_dir(&self) -> &std::path::Path {
        self.local_path.as_deref().unwrap_or(&self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn storage(text: &str) -> StorageConfig {
        toml::from_str(text).unwrap()
    }

    #[test]
    fn an_s3_path_needs_a_local_folder_and_other_schemes_are_refused() {
        assert_eq!(storage("path = \"s3://b/p\"").validate().unwrap_err().0, "storage.local_path");
        assert!(storage("path = \"s3://b/p\"\nlocal_path = \"here\"").validate().is_ok());
        assert_eq!(storage("path = \"gs://b/p\"\nlocal_path = \"here\"").validate().unwrap_err().0, "storage.path");
        assert_eq!(storage("path = \"data\"\ninstance = \"a/b\"").validate().unwrap_err().0, "storage.instance");
        assert_eq!(storage("path = \"data\"\n[s3]\ntimeout = \"0s\"").validate().unwrap_err().0, "storage.s3.timeout");
        let local = storage("path = \"data\"\ninstance = \"a-1\"");
        assert_eq!((local.local_dir(), local.instance()), (std::path::Path::new("data"), Some("a-1")));
    }
}
