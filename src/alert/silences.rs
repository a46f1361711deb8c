//! Silences created at run time (over the HTTP API), kept in `<storage>/silences.json` so that they
//! outlive restarts, and [`Silences`]: those with the rule files' own, as the router and the
//! notifier consult them.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use crate::detect::rules::{Silence, matches};
use crate::sync::{read, write};
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
        read(&self.silences).clone()
    }

    /// Adds a silence and returns its id, or `None` when [`MAX_SILENCES`] are already active or
    /// pending; expired ones are dropped first. The file is replaced atomically, and the silences
    /// in effect change only once it is: a failed write (a full disk) changes nothing.
    pub fn add(&self, silence: Silence) -> Result<Option<String>, AlertError> {
        let mut all = write(&self.silences);
        let now = chrono::Utc::now();
        let mut next: Vec<StoredSilence> = all.iter().filter(|s| s.silence.ends_at > now).cloned().collect();
        if next.len() >= MAX_SILENCES {
            return Ok(None);
        }
        let id = format!("s{}", chrono::Utc::now().timestamp_nanos_opt().unwrap_or_default());
        next.push(StoredSilence { id: id.clone(), silence });
        self.save(&next)?;
        *all = next;
        Ok(Some(id))
    }

    /// Removes a silence; false if there was none with that id. As [`SilenceStore::add`], nothing
    /// changes unless the file is written.
    pub fn remove(&self, id: &str) -> Result<bool, AlertError> {
        let mut all = write(&self.silences);
        let next: Vec<StoredSilence> = all.iter().filter(|s| s.id != id).cloned().collect();
        if next.len() == all.len() {
            return Ok(false);
        }
        self.save(&next)?;
        *all = next;
        Ok(true)
    }

    fn save(&self, all: &[StoredSilence]) -> Result<(), AlertError> {
        let bytes = serde_json::to_vec_pretty(all).map_err(|e| AlertError::Io { path: self.path.clone(), reason: e.to_string() })?;
        super::replace_file(&self.path, &bytes)
    }
}

/// The silences in force: the rule files' (replaced at a reload) and those set over the HTTP API.
/// The router consults them when an alert changes state, and the notifier again when a notice
/// falls due, so that a silence set while an alert fires mutes its reminders too.
#[derive(Clone, Default)]
pub struct Silences {
    fixed: Arc<RwLock<Vec<Silence>>>,
    dynamic: Option<SilenceStore>,
}

impl Silences {
    pub fn new(fixed: Vec<Silence>, dynamic: Option<SilenceStore>) -> Silences {
        Silences { fixed: Arc::new(RwLock::new(fixed)), dynamic }
    }

    /// Puts the rule files' silences of a reload in force.
    pub fn replace_fixed(&self, fixed: Vec<Silence>) {
        *write(&self.fixed) = fixed;
    }

    /// Until when a silence mutes an alert of these labels (the latest end of those active at
    /// `now`), or none when none does.
    pub fn mute_until(&self, labels: &std::collections::BTreeMap<String, String>, now: chrono::DateTime<chrono::Utc>) -> Option<chrono::DateTime<chrono::Utc>> {
        let active = |s: &Silence| (s.starts_at <= now && now < s.ends_at && matches(&s.matchers, labels)).then_some(s.ends_at);
        let fixed = read(&self.fixed).iter().filter_map(active).max();
        let dynamic = self.dynamic.as_ref().and_then(|d| read(&d.silences).iter().filter_map(|s| active(&s.silence)).max());
        fixed.max(dynamic)
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

    /// A full disk, say: the API answers with the error, and the silences in effect are those on disk.
    #[test]
    fn a_write_that_fails_changes_no_silence() {
        use crate::error::Classified;
        let dir = tempfile::tempdir().unwrap();
        let mut store = SilenceStore::open(&dir.path().join("silences.json")).unwrap();
        let kept = store.add(silence(1)).unwrap().unwrap();
        store.path = dir.path().join("gone/silences.json");
        assert!(store.add(silence(1)).unwrap_err().retryable());
        assert!(store.remove(&kept).unwrap_err().retryable());
        assert_eq!(store.list().iter().map(|s| s.id.as_str()).collect::<Vec<_>>(), [kept.as_str()]);
        assert!(!dir.path().join("gone").exists());
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
