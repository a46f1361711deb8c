//! The detector's section of the pipeline file.

use std::path::PathBuf;

use serde::Deserialize;

/// `[alerts]`: the rule files (`alerts/*.toml`) to evaluate on the windows.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    #[serde(default, deserialize_with = "crate::config::env::paths")]
    pub rules: Vec<PathBuf>,
}
