//! `[feedback]`: how analysts' label corrections act on the running pipeline.

use serde::Deserialize;

use crate::config::{FieldError, within};

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeedbackConfig {
    /// Give a correction to near-duplicates of the corrected headline too (the same story re-sent,
    /// the same wording about another company), by the model's rule (`near_duplicates` in its
    /// labels.json, set on validation data).
    pub near_duplicates: bool,
    /// Corrected texts remembered (the newest win); each costs its embedding (1.5 KB for model 2).
    pub remember: usize,
    /// Stories whose windows a correction can still re-count, newest kept.
    pub revise_stories: usize,
    /// Closed windows kept so that a correction can revise their final rows, newest kept.
    pub revise_windows: usize,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        FeedbackConfig { near_duplicates: true, remember: 50_000, revise_stories: 20_000, revise_windows: 5_000 }
    }
}

impl FeedbackConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        within("feedback.remember", self.remember, 0, 1_000_000)?;
        within("feedback.revise_stories", self.revise_stories, 0, 1_000_000)?;
        within("feedback.revise_windows", self.revise_windows, 0, 1_000_000)
    }
}
