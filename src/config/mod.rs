//! What every config file shares (pipeline TOML, rule files): `"5m"` durations, `${ENV}` strings
//! and paths, bounds, and errors that name the file, line, column and field (exit 2).
//!
//! Each stage owns its own section's struct (`source::SourceConfig`, `window::WindowConfig`, …) and
//! `pipeline::PipelineConfig` composes them, so this module knows no stage.

mod duration;
pub mod env;

use std::path::{Path, PathBuf};

pub use duration::HumanDuration;
pub use env::EnvString;

use crate::error::{Classified, ErrorClass};

/// A value that parses but is not allowed: the field as written in the file (`window.slide`) and why.
pub type FieldError = (&'static str, String);

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{file}:{line}:{column}: `{field}`: {message}")]
    Invalid { file: String, line: usize, column: usize, field: String, message: String },
}

impl Classified for ConfigError {
    fn class(&self) -> ErrorClass {
        ErrorClass::User
    }
    fn retryable(&self) -> bool {
        false
    }
}

/// A numeric setting outside its bounds, as a field error.
pub fn within(field: &'static str, value: usize, min: usize, max: usize) -> Result<(), FieldError> {
    if (min..=max).contains(&value) { Ok(()) } else { Err((field, format!("must be between {min} and {max}, is {value}"))) }
}

/// Reads a config file and parses it with `parse(text, origin)`, the file's path naming it in errors.
pub fn load_with<T>(path: &Path, parse: impl FnOnce(&str, &str) -> Result<T, ConfigError>) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read { path: path.to_path_buf(), reason: e.to_string() })?;
    parse(&text, &path.display().to_string())
}

/// Deserializes TOML into `T`; errors carry the file, line, column and field path.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    let invalid = |line, column, field: String, message: String| ConfigError::Invalid {
        file: origin.to_string(),
        line,
        column,
        field,
        message,
    };
    let deserializer = toml::de::Deserializer::parse(text).map_err(|e| {
        let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
        invalid(line, column, "(syntax)".into(), e.message().to_string())
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let (line, column) = match inner.span() {
            Some(span) => line_column(text, span.start),
            None => (locate(text, &field), 1),
        };
        invalid(line, column, field, inner.message().to_string())
    })
}

/// An error found after parsing, placed at the line where `field` (`table.key`) is written.
pub fn invalid_at(text: &str, origin: &str, field: &str, message: String) -> ConfigError {
    ConfigError::Invalid { file: origin.to_string(), line: locate(text, field), column: 1, field: field.to_string(), message }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// The line of `a.b.key` in `text`: the key's own line inside its table, else the table header, else 1.
fn locate(text: &str, field: &str) -> usize {
    let (table, key) = field.rsplit_once('.').unwrap_or(("", field));
    let mut current = String::new();
    let mut header_line = None;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix('[').and_then(|t| t.split(']').next()) {
            current = name.trim_matches(['[', ' ']).to_string();
            if current == table || (table.is_empty() && current == key) {
                header_line.get_or_insert(index + 1);
            }
            continue;
        }
        if current == table && trimmed.split('=').next().is_some_and(|k| k.trim().trim_matches('"') == key) {
            return index + 1;
        }
    }
    header_line.unwrap_or(1)
}

