//! `[storage]`: where the tables and the checkpoint live, and how often they are written.

use std::path::PathBuf;

use serde::Deserialize;

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
    /// Delete earlier tables and checkpoint at start. For demos that replay the same file each run.
    #[serde(default)]
    pub reset_on_start: bool,
}

fn default_checkpoint_interval() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}
fn default_roll_rows() -> usize {
    100_000
}

impl StorageConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.checkpoint_interval.as_millis() <= 0 {
            return Err(("storage.checkpoint_interval", "must be longer than 0".into()));
        }
        within("storage.roll_rows", self.roll_rows, 1, 10_000_000)
    }
}
