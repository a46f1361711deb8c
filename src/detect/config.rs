//! The detector's section of the pipeline file.

use std::path::PathBuf;

use serde::Deserialize;

use crate::config::{FieldError, HumanDuration};

/// `[alerts]`: the rule files (`alerts/*.toml`) to evaluate on the windows, and when.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    #[serde(default, deserialize_with = "crate::config::env::paths")]
    pub rules: Vec<PathBuf>,
    /// The rules see the open windows that changed each time the watermark crosses a multiple of
    /// this much event time (and every window as it closes): points of event time, not of the wall
    /// clock, so that every run of the same input raises the same alerts.
    #[serde(default = "default_evaluate_every")]
    pub evaluate_every: HumanDuration,
}

fn default_evaluate_every() -> HumanDuration {
    HumanDuration::parse("10s").expect("valid default duration")
}

impl Default for AlertsConfig {
    fn default() -> Self {
        AlertsConfig { rules: Vec::new(), evaluate_every: default_evaluate_every() }
    }
}

impl AlertsConfig {
    pub fn validate(&self) -> Result<(), FieldError> {
        if self.evaluate_every.as_millis() < 1000 {
            return Err(("alerts.evaluate_every", format!("must be at least 1s, is {}", self.evaluate_every)));
        }
        Ok(())
    }
}
