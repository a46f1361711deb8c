//! Silences created at run time (over the HTTP API), kept in `<storage>/silences.json` so that they
//! outlive restarts. Silences from rule files are fixed and live in the [`super::Router`].

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::detect::rules::Silence;
use super::AlertError;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredSilence {
    pub id: String,
    #[serde(flatten)]
    pub silence: Silence,
}

/// Silences kept at once: each request rewrites the file, so its size is bounded.
pub const MAX_SILENCES: usize = 1000;

#[derive(Clone)]
pub struct SilenceStore {
    path: PathBuf,
    silences: Arc<RwLock<Vec<StoredSilence>>>,
}

impl SilenceStore {
    pub fn open(path: &Path) -> Result<SilenceStore, AlertError> {
        let silences = match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| AlertError::Corrupt { path: path.to_path_buf(), reason: e.to_string() })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(AlertError::io(path)(e)),
        };
        Ok(SilenceStore { path: path.to_path_buf(), silences: Arc::new(RwLock::new(silences)) })
    }

    pub fn list(&self) -> Vec<StoredSilence> {
        self.silences.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Adds a silence and returns its id, or `None` when [`MAX_SILENCES`] are already active or
    /// pending; expired ones are dropped first. The file is replaced atomically.
    pub fn add(&self, silence: Silence) -> Result<Option<String>, AlertError> {
        let mut all = self.silences.write().unwrap_or_else(|p| p.into_inner());
        let now = chrono::Utc::now();
        all.retain(|s| s.silence.ends_at > now);
        if all.len() >= MAX_SILENCES {
            return Ok(None);
        }
        let id = format!("s{}", chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default());
        all.push(StoredSilence { id: id.clone(), silence });
        self.save(&all)?;
        Ok(Some(id))
    }

    /// Removes a silence; false if there was none with that id.
    pub fn remove(&self, id: &str) -> Result<bool, AlertError> {
        let mut all = self.silences.write().unwrap_or_else(|p| p.into_inner());
        let before = all.len();
        all.retain(|s| s.id != id);
        if all.len() == before {
            return Ok(false);
        }
        self.save(&all)?;
        Ok(true)
    }

    fn save(&self, all: &[StoredSilence]) -> Result<(), AlertError> {
        let bytes = serde_json::to_vec_pretty(all).map_err(|e| AlertError::Io { path: self.path.clone(), reason: e.to_string() })?;
        super::replace_file(&self.path, &bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn silence(ends_in_hours: i64) -> Silence {
        let now = chrono::Utc::now();
        Silence {
            matchers: [("rule".to_string(), "r".to_string())].into(),
            starts_at: now - chrono::Duration::hours(2),
            ends_at: now + chrono::Duration::hours(ends_in_hours),
            comment: String::new(),
        }
    }

    #[test]
    fn at_most_max_silences_are_kept_and_expired_ones_make_room() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("silences.json");
        // Written directly: the store would fsync once per silence.
        let mut stored: Vec<StoredSilence> = (0..MAX_SILENCES - 1).map(|i| StoredSilence { id: format!("a{i}"), silence: silence(1) }).collect();
        stored.extend((0..5).map(|i| StoredSilence { id: format!("x{i}"), silence: silence(-1) }));
        std::fs::write(&path, serde_json::to_vec(&stored).unwrap()).unwrap();
        let store = SilenceStore::open(&path).unwrap();
        assert!(store.add(silence(1)).unwrap().is_some(), "the expired ones are dropped to make room");
        assert_eq!(store.list().len(), MAX_SILENCES);
        assert!(store.add(silence(1)).unwrap().is_none(), "full");
        assert!(store.remove("a0").unwrap());
        assert!(store.add(silence(1)).unwrap().is_some());
        assert_eq!(SilenceStore::open(&path).unwrap().list().len(), MAX_SILENCES, "what was kept is on disk");
    }
}
