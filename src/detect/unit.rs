//! `bearwatch rules test FILE`: unit tests for rule files, as `promtool test rules` has for
//! Prometheus. A test file names rule files, window settings and, per test, series of synthetic
//! stories and the alerts expected to be firing at given event times. Stories go through the same
//! replay as a backtest (`detect::replay`); at each expected time the firing (rule, group) pairs
//! are compared with the expected ones, and a failure prints both.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::replay::{Story, episodes, replay};
use super::{Detector, RuleFile};
use crate::config::{ConfigError, HumanDuration, load_with, parse_toml};
use crate::window::{WindowConfig, WindowSpec};

/// Stories one test may generate: each is counted in every window it falls in.
pub const MAX_STORIES: u64 = 1_000_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TestFile {
    /// Relative to the test file.
    rule_files: Vec<PathBuf>,
    #[serde(default)]
    window: WindowConfig,
    #[serde(default = "ten_seconds")]
    evaluate_every: HumanDuration,
    tests: Vec<Case>,
}

fn ten_seconds() -> HumanDuration {
    HumanDuration::parse("10s").expect("valid duration")
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    stories: Vec<Series>,
    expect: Vec<Expect>,
}

/// `count` stories of one topic and sentiment, from `from`, one every `every`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Series {
    topic: String,
    sentiment: String,
    from: chrono::DateTime<chrono::Utc>,
    #[serde(default = "one")]
    count: u64,
    #[serde(default = "ten_seconds")]
    every: HumanDuration,
    #[serde(default)]
    tickers: Vec<String>,
    /// Every story of the series has this headline (copies of one story); default: each its own.
    #[serde(default)]
    headline: Option<String>,
}

fn one() -> u64 {
    1
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Expect {
    at: chrono::DateTime<chrono::Utc>,
    /// Every alert firing then; an empty list expects none.
    firing: Vec<Firing>,
}

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(deny_unknown_fields)]
struct Firing {
    rule: String,
    #[serde(default)]
    topic: Option<String>,
    #[serde(default)]
    ticker: Option<String>,
}

impl std::fmt::Display for Firing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (&self.topic, &self.ticker) {
            (_, Some(ticker)) => write!(f, "{} ticker={ticker}", self.rule),
            (Some(topic), None) => write!(f, "{} topic={topic}", self.rule),
            (None, None) => write!(f, "{}", self.rule),
        }
    }
}

/// One test's outcome: the times whose firing alerts differed, with what was expected and got.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    pub failures: Vec<String>,
}

fn invalid(origin: &str, field: String, message: String) -> ConfigError {
    ConfigError::Invalid { file: origin.to_string(), line: 0, column: 0, field, message }
}

fn stories(case: &Case, origin: &str, index: usize) -> Result<Vec<Story>, ConfigError> {
    let total: u64 = case.stories.iter().map(|s| s.count).sum();
    if total > MAX_STORIES {
        return Err(invalid(origin, format!("tests[{index}].stories"), format!("{total} stories; at most {MAX_STORIES}")));
    }
    let mut out = Vec::new();
    for (s, series) in case.stories.iter().enumerate() {
        let (p_negative, score) = match series.sentiment.as_str() {
            "negative" => (0.9, -0.9),
            "neutral" => (0.05, 0.0),
            "positive" => (0.05, 0.9),
            other => {
                return Err(invalid(origin, format!("tests[{index}].stories[{s}].sentiment"), format!("{other:?} is not negative, neutral or positive")));
            }
        };
        for i in 0..series.count {
            let at = series.from.timestamp_millis() + i as i64 * series.every.as_millis();
            out.push(Story {
                id: format!("t{index}-s{s}-{i}"),
                published_ms: at,
                headline: series.headline.clone().unwrap_or_else(|| format!("{} story {i} of series {s}", series.topic)),
                topic: series.topic.clone(),
                tickers: series.tickers.clone(),
                sentiment: series.sentiment.clone(),
                sentiment_score: score,
                p_negative,
            });
        }
    }
    Ok(out)
}

/// Runs every test of the file at `path`.
pub fn run(path: &Path) -> Result<Vec<Outcome>, ConfigError> {
    let file: TestFile = load_with(path, parse_toml)?;
    let origin = path.display().to_string();
    file.window.validate().map_err(|(field, message)| invalid(&origin, field.to_string(), message))?;
    let base = path.parent().unwrap_or(Path::new("."));
    let paths: Vec<_> = file.rule_files.iter().map(|rules| base.join(rules)).collect();
    let rules = RuleFile::merge(RuleFile::load_all(&paths)?).rules;
    let spec = WindowSpec::from_config(&file.window);
    let mut outcomes = Vec::new();
    for (index, case) in file.tests.iter().enumerate() {
        // Generated headlines differ in one word: only exact copies fold.
        let folding = file.window.fold_copies.then_some(crate::window::Folding { near: None });
        let found = episodes(replay(spec, folding, &mut Detector::new(rules.clone()), file.evaluate_every.as_millis().max(1), &stories(case, &origin, index)?));
        let mut failures = Vec::new();
        for expect in &case.expect {
            let at = expect.at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
            let at_ms = expect.at.timestamp_millis();
            let got: BTreeSet<Firing> = found
                .iter()
                .filter(|e| {
                    let (start, end) = e.span_ms();
                    start <= at_ms && at_ms < end
                })
                .map(|e| Firing { rule: e.rule.clone(), topic: e.labels.get("topic").cloned(), ticker: e.labels.get("ticker").cloned() })
                .collect();
            let expected: BTreeSet<Firing> = expect.firing.iter().cloned().collect();
            if got != expected {
                let list = |set: &BTreeSet<Firing>| if set.is_empty() { "(none)".to_string() } else { set.iter().map(|f| f.to_string()).collect::<Vec<_>>().join(", ") };
                failures.push(format!("at {at}\n    exp: {}\n    got: {}", list(&expected), list(&got)));
            }
        }
        outcomes.push(Outcome { name: case.name.clone(), failures });
    }
    Ok(outcomes)
}
