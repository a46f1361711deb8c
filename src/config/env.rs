//! `${ENV_VAR}` expansion for config strings, so secrets live in the environment, not in files.

use std::fmt;

use serde::{Deserialize, Deserializer};

/// A config string with `${NAME}` references replaced by environment variables at load time.
/// `Debug` prints the text as written (`"${SASL_PASSWORD}"`), so expanded secrets never reach a log.
#[derive(Clone, PartialEq, Eq)]
pub struct EnvString {
    value: String,
    written: String,
}

impl EnvString {
    pub fn expand(written: &str) -> Result<EnvString, String> {
        Self::expand_with(written, |name| std::env::var(name).ok())
    }

    fn expand_with(written: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<EnvString, String> {
        let mut value = String::with_capacity(written.len());
        let mut rest = written;
        while let Some(start) = rest.find("${") {
            value.push_str(&rest[..start]);
            let after = &rest[start + 2..];
            let end = after.find('}').ok_or_else(|| format!("unclosed `${{` in {written:?}"))?;
            let name = &after[..end];
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(format!("`${{{name}}}` is not a valid environment variable reference"));
            }
            value.push_str(&lookup(name).ok_or_else(|| format!("environment variable `{name}` is not set"))?);
            rest = &after[end + 1..];
        }
        value.push_str(rest);
        Ok(EnvString { value, written: written.to_string() })
    }

    pub fn as_str(&self) -> &str {
        &self.value
    }
}

impl fmt::Debug for EnvString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.written)
    }
}

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let written = String::deserialize(deserializer)?;
        EnvString::expand(&written).map_err(serde::de::Error::custom)
    }
}

/// `deserialize_with` for a path setting with `${NAME}` references (e.g. one storage folder per
/// instance: `path = "${BEARWATCH_STORAGE}"`). Paths are not secrets, so the expanded form is kept.
pub fn path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<std::path::PathBuf, D::Error> {
    let written = String::deserialize(deserializer)?;
    expanded_path(&written).map_err(serde::de::Error::custom)
}

pub fn optional_path<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<std::path::PathBuf>, D::Error> {
    path(deserializer).map(Some)
}

pub fn paths<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<std::path::PathBuf>, D::Error> {
    let written = Vec::<String>::deserialize(deserializer)?;
    written.iter().map(|w| expanded_path(w).map_err(serde::de::Error::custom)).collect()
}

fn expanded_path(written: &str) -> Result<std::path::PathBuf, String> {
    let value = EnvString::expand(written)?.value;
    if value.is_empty() {
        return Err(format!("{written:?} is an empty path"));
    }
    Ok(std::path::PathBuf::from(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(name: &str) -> Option<String> {
        (name == "SECRET").then(|| "hunter2".to_string())
    }

    #[test]
    fn expands_and_never_prints_the_secret() {
        let s = EnvString::expand_with("user:${SECRET}@host", lookup).unwrap();
        assert_eq!(s.as_str(), "user:hunter2@host");
        assert_eq!(format!("{s:?}"), "\"user:${SECRET}@host\"");
    }

    #[test]
    fn names_the_missing_variable() {
        let err = EnvString::expand_with("${NOPE}", lookup).unwrap_err();
        assert!(err.contains("`NOPE` is not set"), "{err}");
        assert!(EnvString::expand_with("${SECRET", lookup).is_err());
        assert!(EnvString::expand_with("${A-B}", lookup).is_err());
    }
}
