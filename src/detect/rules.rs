//! Alert rule files (`alerts/*.toml`, DESIGN §6): rules, routes and silences.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::config::{ConfigError, HumanDuration, load_with, parse_toml};

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleFile {
    #[serde(default)]
    pub rules: Vec<Rule>,
    #[serde(default)]
    pub routes: Vec<Route>,
    #[serde(default)]
    pub silences: Vec<Silence>,
}

impl RuleFile {
    pub fn load(path: &Path) -> Result<RuleFile, ConfigError> {
        load_with(path, RuleFile::parse)
    }

    pub fn parse(text: &str, origin: &str) -> Result<RuleFile, ConfigError> {
        let file: RuleFile = parse_toml(text, origin)?;
        for (i, silence) in file.silences.iter().enumerate() {
            if let Err(message) = silence.check() {
                return Err(ConfigError::Invalid {
                    file: origin.to_string(),
                    line: line_of(text, "[[silences]]", i + 1),
                    column: 1,
                    field: format!("silences[{i}]"),
                    message,
                });
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, rule) in file.rules.iter().enumerate() {
            if !names.insert(rule.name.as_str()) {
                return Err(ConfigError::Invalid {
                    file: origin.to_string(),
                    line: line_of(text, &format!("\"{}\"", rule.name), 2),
                    column: 1,
                    field: format!("rules[{i}].name"),
                    message: format!("rule name `{}` is used twice", rule.name),
                });
            }
        }
        Ok(file)
    }

    /// Loads each file, and refuses a rule name that an earlier file already defines: an alert's
    /// state, id and routes are keyed by its rule's name.
    pub fn load_all(paths: &[impl AsRef<Path>]) -> Result<Vec<RuleFile>, ConfigError> {
        RuleFile::read_all(paths).map(|(files, _)| files)
    }

    /// [`RuleFile::load_all`], with the SHA-256 (hex) of the files' bytes in order: the hash of
    /// exactly the text these rules came from, so that what a verdict records names them even if a
    /// file changes a moment later.
    pub fn read_all(paths: &[impl AsRef<Path>]) -> Result<(Vec<RuleFile>, String), ConfigError> {
        use sha2::Digest;
        let mut names: BTreeMap<String, &Path> = BTreeMap::new();
        let mut files = Vec::new();
        let mut hasher = sha2::Sha256::new();
        for path in paths {
            let path = path.as_ref();
            let file = load_with(path, |text, origin| {
                hasher.update(text.as_bytes());
                RuleFile::parse(text, origin)
            })?;
            for rule in &file.rules {
                if let Some(other) = names.insert(rule.name.clone(), path) {
                    return Err(ConfigError::Read { path: path.to_path_buf(), reason: format!("rule `{}` is also defined in {}", rule.name, other.display()) });
                }
            }
            files.push(file);
        }
        let sha256 = hasher.finalize().iter().map(|b| format!("{b:02x}")).collect();
        Ok((files, sha256))
    }

    /// Rules, routes and silences of several files, in order.
    pub fn merge(files: impl IntoIterator<Item = RuleFile>) -> RuleFile {
        files.into_iter().fold(RuleFile::default(), |mut all, file| {
            all.rules.extend(file.rules);
            all.routes.extend(file.routes);
            all.silences.extend(file.silences);
            all
        })
    }
}

/// The line of the `nth` occurrence of `needle`, for errors found after parsing.
fn line_of(text: &str, needle: &str, nth: usize) -> usize {
    text.match_indices(needle).nth(nth - 1).map_or(1, |(at, _)| text[..at].matches('\n').count() + 1)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Info,
    Warning,
    Critical,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Info => "info",
            Severity::Warning => "warning",
            Severity::Critical => "critical",
        }
    }
}

/// Which `windows` rows a rule watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupKind {
    /// One alert per topic.
    Topic,
    /// The market as a whole (`topic = 'all'`).
    All,
    /// One alert per ticker (needs `group_by = ["topic", "ticker"]`).
    Ticker,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    NegShare,
    NNegative,
    MeanSentiment,
    N,
}

impl Metric {
    pub fn as_str(self) -> &'static str {
        match self {
            Metric::NegShare => "neg_share",
            Metric::NNegative => "n_negative",
            Metric::MeanSentiment => "mean_sentiment",
            Metric::N => "n",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    #[serde(rename = ">")]
    Above,
    #[serde(rename = ">=")]
    AtLeast,
    #[serde(rename = "<")]
    Below,
    #[serde(rename = "<=")]
    AtMost,
}

impl Op {
    pub fn holds(self, value: f64, threshold: f64) -> bool {
        match self {
            Op::Above => value > threshold,
            Op::AtLeast => value >= threshold,
            Op::Below => value < threshold,
            Op::AtMost => value <= threshold,
        }
    }

    pub fn symbol(self) -> &'static str {
        match self {
            Op::Above => ">",
            Op::AtLeast => "≥",
            Op::Below => "<",
            Op::AtMost => "≤",
        }
    }
}

/// When a rule's metric is "bad". Every kind has an exit level for hysteresis: once firing, an alert
/// resolves only when the metric is back past the exit level, so values hovering at the threshold
/// don't flap. A window with fewer than `min_count` stories decides nothing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Condition {
    /// `metric op value`, e.g. neg_share > 0.4.
    Threshold {
        op: Op,
        value: f64,
        #[serde(default)]
        min_count: u64,
        /// Default: `value`.
        exit_value: Option<f64>,
    },
    /// Current window ≥ `factor` × the mean of the previous `baseline_windows` (ElastAlert's spike
    /// rule, which is this with one baseline window). Silent until the baseline windows exist and hold
    /// `min_baseline_count` stories in all.
    RatioToBaseline {
        factor: f64,
        #[serde(default = "one")]
        baseline_windows: usize,
        #[serde(default)]
        min_count: u64,
        #[serde(default)]
        min_baseline_count: u64,
        /// Baseline windows with fewer stories are skipped, not counted (a weekend of 2 stories).
        #[serde(default)]
        min_baseline_window_count: u64,
        /// The current value must also reach this, so that 3% against a baseline of 0.4% is no spike.
        #[serde(default)]
        min_value: f64,
        /// Default: `factor`.
        exit_factor: Option<f64>,
    },
    /// A read-only query over `windows`; each result row (a `topic`, maybe `ticker`, `value`,
    /// `window_start`) is a group in breach, and groups it does not return are back to normal.
    Sql { query: String },
    /// (current − mean) / standard deviation of the previous `baseline_windows` ≥ `sigma`.
    Zscore {
        sigma: f64,
        baseline_windows: usize,
        #[serde(default)]
        min_count: u64,
        /// Baseline windows with fewer stories are skipped, not counted.
        #[serde(default)]
        min_baseline_window_count: u64,
        /// Default: `sigma`.
        exit_sigma: Option<f64>,
    },
    /// For `neg_share`: the current window's negatives are unlikely under the usual share, pooled
    /// over the previous `baseline_windows` (Σ negative / Σ stories, thin windows skipped): the
    /// binomial tail P(X ≥ negatives | stories, usual share) < `p_value`, and the share is at least
    /// `min_effect` above the usual one. It counts how many stories a share stands on: 8 of 16 is
    /// weaker evidence than 200 of 400.
    Binomial {
        p_value: f64,
        baseline_windows: usize,
        #[serde(default)]
        min_effect: f64,
        #[serde(default)]
        min_count: u64,
        /// No alert on fewer negative stories than this, whatever the share: a surge a person is
        /// woken for is a number of stories.
        #[serde(default)]
        min_negative: u64,
        #[serde(default)]
        min_baseline_count: u64,
        #[serde(default)]
        min_baseline_window_count: u64,
        /// A firing alert stays while the tail is under this (default: `p_value`).
        exit_p_value: Option<f64>,
        /// With a weight (in stories), the usual share is uncertain: a Beta prior centred on the
        /// market's (`all`) pooled share over the same windows, updated by the group's own stories,
        /// and the tail is beta-binomial. A topic with little or no history of its own then leans on
        /// the market instead of staying silent; one with thousands of stories barely moves.
        #[serde(default)]
        prior_stories: f64,
    },
    /// For counts (`n_negative`, or `n`): the window's count against the usual count of its group at
    /// this time of the week, a negative binomial fitted to the previous `baseline_windows` that
    /// start in the same `season` slot (windows with under a quarter of the slot's median stories,
    /// a holiday or an outage, are skipped). Fires when P(X ≥ count) < `p_value`, the count is at
    /// least `min_count` and at least `min_ratio` × usual. A surge of negative news is first of all
    /// a number of stories: a busy topic whose usual share is high cannot pass a share test.
    Count {
        p_value: f64,
        baseline_windows: usize,
        #[serde(default)]
        season: Season,
        #[serde(default)]
        min_count: u64,
        #[serde(default = "default_min_ratio")]
        min_ratio: f64,
        /// Past windows of the slot needed before it decides.
        #[serde(default = "default_slot_windows")]
        min_slot_windows: usize,
        /// A firing alert stays while the tail is under this (default: `p_value`).
        exit_p_value: Option<f64>,
    },
    /// Several tests of one group behind one alert: it fires when any test breaches and stays while
    /// any is past its exit level, so a surge that the share and the count both see is one alert,
    /// explained by the test that saw it first.
    Any { of: Vec<Test> },
}

/// One test of an `any` condition: a condition and the metric it reads (default: the rule's).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Test {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric: Option<Metric>,
    #[serde(flatten)]
    pub condition: Condition,
}

/// A test is written as one table: the condition's fields beside an optional `metric`.
impl<'de> Deserialize<'de> for Test {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Test, D::Error> {
        use serde::de::Error;
        let mut table = serde_json::Map::deserialize(d)?;
        let metric = table.remove("metric").map(serde_json::from_value).transpose().map_err(D::Error::custom)?;
        let condition = serde_json::from_value(serde_json::Value::Object(table)).map_err(D::Error::custom)?;
        Ok(Test { metric, condition })
    }
}

/// Tests an `any` condition may hold: each is read and explained on its own.
pub const MAX_TESTS: usize = 8;

/// What "the same time" is for a `count` condition's usual level (UTC).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Season {
    /// The same hour on the same kind of day: weekday hours are not weekend hours.
    #[default]
    Week,
    /// The same hour of any day.
    Day,
    /// Every baseline window alike.
    None,
}

fn default_min_ratio() -> f64 {
    2.0
}

fn default_slot_windows() -> usize {
    3
}

/// Baseline windows a rule may ask for: each is kept per group in memory and in checkpoints.
pub const MAX_BASELINE_WINDOWS: usize = 1000;

fn one() -> usize {
    1
}

impl Condition {
    /// Whether the condition reads the market's (`all`) windows: a binomial with a prior.
    pub fn leans_on_market(&self) -> bool {
        match self {
            Condition::Binomial { prior_stories, .. } => *prior_stories > 0.0,
            Condition::Any { of } => of.iter().any(|t| t.condition.leans_on_market()),
            _ => false,
        }
    }

    pub fn baseline_windows(&self) -> usize {
        match self {
            Condition::Threshold { .. } => 0,
            // The query sees this many closed windows per group besides the current rows.
            Condition::Sql { .. } => super::SQL_HISTORY,
            Condition::RatioToBaseline { baseline_windows, .. }
            | Condition::Zscore { baseline_windows, .. }
            | Condition::Binomial { baseline_windows, .. }
            | Condition::Count { baseline_windows, .. } => *baseline_windows,
            Condition::Any { of } => of.iter().map(|t| t.condition.baseline_windows()).max().unwrap_or(0),
        }
    }

    /// What a test is called in explanations: "share test", "count test"…
    pub fn test_name(&self) -> &'static str {
        match self {
            Condition::Threshold { .. } => "threshold",
            Condition::RatioToBaseline { .. } => "ratio test",
            Condition::Sql { .. } => "query",
            Condition::Zscore { .. } => "z-score",
            Condition::Binomial { .. } => "share test",
            Condition::Count { .. } => "count test",
            Condition::Any { .. } => "any",
        }
    }

    /// Every number the condition holds: each must be finite (`nan` or `inf` in a rule never fires,
    /// or always does).
    fn numbers(&self) -> Vec<(&'static str, f64)> {
        let present = |pairs: &[(&'static str, Option<f64>)]| pairs.iter().filter_map(|(n, v)| Some((*n, (*v)?))).collect();
        match self {
            Condition::Sql { .. } | Condition::Any { .. } => Vec::new(),
            Condition::Threshold { value, exit_value, .. } => present(&[("value", Some(*value)), ("exit_value", *exit_value)]),
            Condition::RatioToBaseline { factor, min_value, exit_factor, .. } => {
                present(&[("factor", Some(*factor)), ("min_value", Some(*min_value)), ("exit_factor", *exit_factor)])
            }
            Condition::Zscore { sigma, exit_sigma, .. } => present(&[("sigma", Some(*sigma)), ("exit_sigma", *exit_sigma)]),
            Condition::Binomial { p_value, min_effect, exit_p_value, prior_stories, .. } => present(&[
                ("p_value", Some(*p_value)),
                ("min_effect", Some(*min_effect)),
                ("exit_p_value", *exit_p_value),
                ("prior_stories", Some(*prior_stories)),
            ]),
            Condition::Count { p_value, min_ratio, exit_p_value, .. } => {
                present(&[("p_value", Some(*p_value)), ("min_ratio", Some(*min_ratio)), ("exit_p_value", *exit_p_value)])
            }
        }
    }

    fn check(&self, metric: Metric) -> Result<(), String> {
        if let Some((name, value)) = self.numbers().into_iter().find(|(_, v)| !v.is_finite()) {
            return Err(format!("{name} must be a finite number, is {value}"));
        }
        if self.baseline_windows() > MAX_BASELINE_WINDOWS {
            return Err(format!("baseline_windows must be at most {MAX_BASELINE_WINDOWS}"));
        }
        match self {
            Condition::Binomial { p_value, baseline_windows, min_effect, exit_p_value, prior_stories, .. } => {
                if !(0.0..=1e6).contains(prior_stories) {
                    return Err("prior_stories must be between 0 and 1,000,000".into());
                }
                if metric != Metric::NegShare {
                    return Err(format!("kind = \"binomial\" tests a share: use metric = \"neg_share\", not {:?}", metric.as_str()));
                }
                if !(*p_value > 0.0 && *p_value < 1.0) {
                    return Err("p_value must be between 0 and 1".into());
                }
                if exit_p_value.is_some_and(|e| !(e >= *p_value && e < 1.0)) {
                    return Err("exit_p_value must be at least p_value and under 1".into());
                }
                if !(0.0..1.0).contains(min_effect) {
                    return Err("min_effect must be at least 0 and under 1 (a share)".into());
                }
                if *baseline_windows == 0 {
                    return Err("baseline_windows must be at least 1".into());
                }
            }
            Condition::Count { p_value, baseline_windows, min_ratio, min_slot_windows, exit_p_value, .. } => {
                if !matches!(metric, Metric::NNegative | Metric::N) {
                    return Err(format!("kind = \"count\" tests a count: use metric = \"n_negative\" or \"n\", not {:?}", metric.as_str()));
                }
                if !(*p_value > 0.0 && *p_value < 1.0) {
                    return Err("p_value must be between 0 and 1".into());
                }
                if exit_p_value.is_some_and(|e| !(e >= *p_value && e < 1.0)) {
                    return Err("exit_p_value must be at least p_value and under 1".into());
                }
                if *min_ratio < 0.0 {
                    return Err("min_ratio must be at least 0".into());
                }
                if *min_slot_windows < 2 || *min_slot_windows > *baseline_windows {
                    return Err("min_slot_windows must be at least 2 (a spread) and at most baseline_windows".into());
                }
            }
            Condition::Sql { query } => super::sql::validate(query)?,
            Condition::Any { of } => {
                if of.is_empty() || of.len() > MAX_TESTS {
                    return Err(format!("kind = \"any\" takes 1 to {MAX_TESTS} tests in `of`"));
                }
                for (i, test) in of.iter().enumerate() {
                    if matches!(test.condition, Condition::Any { .. } | Condition::Sql { .. }) {
                        return Err(format!("of[{i}]: a test of `any` is a threshold, ratio_to_baseline, zscore, binomial or count"));
                    }
                    test.condition.check(test.metric.unwrap_or(metric)).map_err(|e| format!("of[{i}]: {e}"))?;
                }
            }
            Condition::Threshold { op, value, exit_value, .. } => {
                if let Some(exit) = exit_value
                    && op.holds(*exit, *value)
                    && exit != value
                {
                    return Err(format!("exit_value {exit} must be on the other side of value {value} (it is where a firing alert resolves)"));
                }
            }
            Condition::RatioToBaseline { factor, baseline_windows, exit_factor, .. } => {
                if !(*factor > 0.0) {
                    return Err("factor must be positive".into());
                }
                if *baseline_windows == 0 {
                    return Err("baseline_windows must be at least 1".into());
                }
                if exit_factor.is_some_and(|e| !(e > 0.0 && e <= *factor)) {
                    return Err("exit_factor must be positive and at most factor".into());
                }
            }
            Condition::Zscore { sigma, baseline_windows, exit_sigma, .. } => {
                if !(*sigma > 0.0) {
                    return Err("sigma must be positive".into());
                }
                if *baseline_windows < 2 {
                    return Err("baseline_windows must be at least 2 for a standard deviation".into());
                }
                if exit_sigma.is_some_and(|e| e > *sigma) {
                    return Err("exit_sigma must be at most sigma".into());
                }
            }
        }
        Ok(())
    }
}

/// Serialized as a rule file writes it (`GET /api/rules`); read through [`RawRule`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, try_from = "RawRule")]
pub struct Rule {
    pub name: String,
    pub severity: Severity,
    pub group: GroupKind,
    pub metric: Metric,
    pub condition: Condition,
    /// How long (event time) the condition must hold before the alert fires.
    #[serde(rename = "for")]
    pub pending_for: HumanDuration,
    /// How long (event time) a firing alert stays firing after the condition stops holding.
    pub keep_firing_for: HumanDuration,
    /// How long (event time) a firing alert stays firing while its group's windows decide nothing
    /// (too few stories, or none at all); None: two window lengths. Never less than `keep_firing_for`.
    pub quiet_for: Option<HumanDuration>,
    /// Extra labels for routing and for the receivers.
    pub labels: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: String,
    #[serde(default = "warning")]
    severity: Severity,
    group: GroupKind,
    metric: Metric,
    condition: Condition,
    #[serde(default, rename = "for")]
    pending_for: Option<HumanDuration>,
    #[serde(default)]
    keep_firing_for: Option<HumanDuration>,
    #[serde(default)]
    quiet_for: Option<HumanDuration>,
    #[serde(default)]
    labels: BTreeMap<String, String>,
}

impl Rule {
    /// Test `index` of an `any` condition.
    pub fn condition_test(&self, index: usize) -> Option<&Test> {
        match &self.condition {
            Condition::Any { of } => of.get(index),
            _ => None,
        }
    }

    /// This rule with `condition.FIELD = value`, checked as in a rule file; None when its kind of
    /// condition has no such field (`bearwatch rules backtest --sweep`).
    pub fn with_condition(&self, field: &str, value: f64) -> Result<Option<Rule>, String> {
        let mut condition = serde_json::to_value(&self.condition).map_err(|e| e.to_string())?;
        // `of.1.p_value` reaches into an `any` condition's second test.
        let pointer = format!("/{}", field.replace('.', "/"));
        let Some(slot) = condition.pointer_mut(&pointer).filter(|_| !field.ends_with("kind")) else {
            return Ok(None);
        };
        *slot = match slot {
            serde_json::Value::Number(n) if n.is_u64() => {
                if value < 0.0 || value.fract() != 0.0 {
                    return Err(format!("condition.{field} of rule `{}` takes whole numbers, not {value}", self.name));
                }
                serde_json::json!(value as u64)
            }
            _ => serde_json::json!(value),
        };
        let condition: Condition = serde_json::from_value(condition).map_err(|e| format!("rule `{}`: condition.{field}: {e}", self.name))?;
        condition.check(self.metric).map_err(|e| format!("rule `{}`: condition: {e}", self.name))?;
        Ok(Some(Rule { condition, ..self.clone() }))
    }
}

fn warning() -> Severity {
    Severity::Warning
}

impl TryFrom<RawRule> for Rule {
    type Error = String;

    fn try_from(raw: RawRule) -> Result<Rule, String> {
        if raw.name.trim().is_empty() {
            return Err("rule `name` must not be empty".into());
        }
        raw.condition.check(raw.metric).map_err(|e| format!("rule `{}`: condition: {e}", raw.name))?;
        let zero = HumanDuration(std::time::Duration::ZERO);
        Ok(Rule {
            name: raw.name,
            severity: raw.severity,
            group: raw.group,
            metric: raw.metric,
            condition: raw.condition,
            pending_for: raw.pending_for.unwrap_or(zero),
            keep_firing_for: raw.keep_firing_for.unwrap_or(zero),
            quiet_for: raw.quiet_for,
            labels: raw.labels,
        })
    }
}

/// Sends the alerts whose labels match to `receivers` (names of `[[receivers]]` in the pipeline).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Route {
    pub receivers: Vec<String>,
    /// Exact matches on `rule`, `severity`, `topic`, `ticker` or a rule label; empty matches all.
    #[serde(default, rename = "match")]
    pub matchers: BTreeMap<String, String>,
    /// Wait this long before the first notice of a new alert.
    #[serde(default = "no_wait")]
    pub group_wait: HumanDuration,
    /// Remind of a still-firing alert this often.
    #[serde(default = "four_hours")]
    pub repeat_interval: HumanDuration,
    #[serde(default = "yes")]
    pub send_resolved: bool,
}

fn no_wait() -> HumanDuration {
    HumanDuration(std::time::Duration::ZERO)
}
fn four_hours() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(4 * 3600))
}
fn yes() -> bool {
    true
}

/// Mutes notifications of matching alerts between two instants (alerts are still recorded).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Silence {
    #[serde(rename = "match")]
    pub matchers: BTreeMap<String, String>,
    pub starts_at: chrono::DateTime<chrono::Utc>,
    pub ends_at: chrono::DateTime<chrono::Utc>,
    #[serde(default)]
    pub comment: String,
}

impl Silence {
    /// What a silence must be, from a rule file or the HTTP API alike.
    pub fn check(&self) -> Result<(), String> {
        if self.ends_at <= self.starts_at {
            return Err("ends_at must be after starts_at".into());
        }
        if self.matchers.is_empty() {
            return Err("a silence needs at least one matcher in `match`".into());
        }
        if self.matchers.len() > MAX_SILENCE_MATCHERS {
            return Err(format!("a silence has at most {MAX_SILENCE_MATCHERS} matchers"));
        }
        let longest = self.matchers.iter().map(|(k, v)| k.len().max(v.len())).max().unwrap_or(0);
        if longest > 256 || self.comment.len() > 4096 {
            return Err("matcher names and values have at most 256 bytes, a comment at most 4096".into());
        }
        Ok(())
    }
}

pub const MAX_SILENCE_MATCHERS: usize = 32;

/// Whether every matcher equals the label of that name.
pub fn matches(matchers: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    matchers.iter().all(|(k, v)| labels.get(k) == Some(v))
}
