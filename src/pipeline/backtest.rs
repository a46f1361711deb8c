//! `bearwatch rules backtest`: what rule files would have raised on a pipeline's stored stories,
//! and how often people said it was right. The `news` table (the newest score of each story) is
//! replayed through the pipeline's `[window]` and the given rules (`detect::replay`, the same calls
//! as the running pipeline), so the shipped rules give back the alerts the run raised, ids
//! included. Episodes are then matched to analysts' verdicts (`alert_verdicts`: the same alert id,
//! or the same rule and group with overlapping times) and to `missed_events`.

use std::collections::BTreeMap;
use std::path::PathBuf;

use datafusion::prelude::{col, lit};
use serde::Serialize;

use super::{PipelineConfig, PipelineError, bundled};
use crate::alert::Router;
use crate::alert::silences::Silences;
use crate::detect::replay::{Episode, Story, episodes, replay};
use crate::detect::{Detector, GroupKind, Rule, RuleFile, Trace};
use crate::sql::lookup::{JudgedAlert, Missed, timestamp};
use crate::window::WindowSpec;

pub struct BacktestOptions<'a> {
    pub rules: &'a [PathBuf],
    /// Event-time bounds on the stories replayed (RFC 3339).
    pub from: Option<chrono::DateTime<chrono::Utc>>,
    pub to: Option<chrono::DateTime<chrono::Utc>>,
    /// A group (`topic=energy`, `ticker=XOM`, `all`, or a topic) whose every reading to print.
    pub explain: Option<String>,
    /// Replays again with one condition field set to each value.
    pub sweep: Option<Sweep>,
}

/// `--sweep [RULE.]condition.FIELD=FROM:TO:STEP`: every value from FROM to TO (both included),
/// for the rule named (default: every rule whose kind of condition has FIELD).
#[derive(Debug, Clone, PartialEq)]
pub struct Sweep {
    pub rule: Option<String>,
    pub field: String,
    pub values: Vec<f64>,
}

/// Values one sweep may replay: each is a whole replay of the stories.
pub const MAX_SWEEP_VALUES: usize = 100;

impl std::str::FromStr for Sweep {
    type Err = String;

    fn from_str(text: &str) -> Result<Sweep, String> {
        let usage = || format!("`{text}`: expected [RULE.]condition.[of.N.]FIELD=FROM:TO:STEP, e.g. condition.p_value=0.0001:0.01:0.002");
        let (target, range) = text.split_once('=').ok_or_else(usage)?;
        let (rule, field) = target.trim().rsplit_once("condition.").ok_or_else(usage)?;
        let rule = match rule {
            "" => None,
            named => Some(named.strip_suffix('.').filter(|r| !r.is_empty()).ok_or_else(usage)?.to_string()),
        };
        // A field, or `of.N.FIELD` for a test of an `any` condition.
        let nested = field.strip_prefix("of.").and_then(|rest| rest.split_once('.')).is_some_and(|(n, f)| n.parse::<usize>().is_ok() && !f.is_empty() && !f.contains('.'));
        if field.is_empty() || (field.contains('.') && !nested) {
            return Err(usage());
        }
        let numbers: Vec<f64> = range.split(':').map(|n| n.trim().parse::<f64>()).collect::<Result<_, _>>().map_err(|_| usage())?;
        let [from, to, step] = numbers[..] else { return Err(usage()) };
        if !(from.is_finite() && to.is_finite() && step.is_finite() && step > 0.0 && to >= from) {
            return Err(format!("`{text}`: FROM ≤ TO and a positive STEP"));
        }
        let count = ((to - from) / step + 1e-9).floor() as usize + 1;
        if count > MAX_SWEEP_VALUES {
            return Err(format!("`{text}`: {count} values; at most {MAX_SWEEP_VALUES}"));
        }
        // Rounded to the step's decimals, so that 0.1 + 0.2 prints and applies as 0.3.
        let round = |v: f64| (v * 1e9).round() / 1e9;
        Ok(Sweep { rule, field: field.to_string(), values: (0..count).map(|i| round(from + i as f64 * step)).collect() })
    }
}

/// One rule's results with the swept field at `value`.
#[derive(Debug, Clone, Serialize)]
pub struct SweepRow {
    pub value: f64,
    #[serde(flatten)]
    pub rule: RuleResult,
}

/// Verdicts `useful` and `late` say the episode was a real event; `noise` and `duplicate` say not.
fn hit(verdict: &str) -> bool {
    matches!(verdict, "useful" | "late")
}

/// A proportion with its Wilson 95 % interval.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Share {
    pub of: usize,
    pub value: f64,
    pub low: f64,
    pub high: f64,
}

pub(crate) fn wilson(hits: usize, of: usize) -> Option<Share> {
    if of == 0 {
        return None;
    }
    let (n, p, z) = (of as f64, hits as f64 / of as f64, 1.96f64);
    let centre = (p + z * z / (2.0 * n)) / (1.0 + z * z / n);
    let half = z / (1.0 + z * z / n) * (p * (1.0 - p) / n + z * z / (4.0 * n * n)).sqrt();
    Some(Share { of, value: p, low: (centre - half).max(0.0), high: (centre + half).min(1.0) })
}

#[derive(Debug, Clone, Serialize)]
pub struct RuleResult {
    pub rule: String,
    pub episodes: usize,
    pub per_week: f64,
    /// Episodes with a verdict, by verdict.
    pub verdicts: BTreeMap<String, usize>,
    /// Useful or late, over the episodes with a verdict.
    pub precision: Option<Share>,
    /// Events caught (episodes judged useful or late, and missed events one of its episodes
    /// overlaps) over all known events (those episodes and every missed event of its kind of group).
    pub recall: Option<Share>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BacktestEpisode {
    #[serde(flatten)]
    pub episode: Episode,
    /// A silence of the rule files or of the storage matched it when it fired (event time).
    pub silenced: bool,
    pub verdict: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Backtest {
    pub storage: String,
    pub stories: usize,
    pub first: Option<String>,
    pub last: Option<String>,
    pub rules: Vec<RuleResult>,
    pub episodes: Vec<BacktestEpisode>,
    pub explain: Vec<Trace>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sweep: Vec<SweepRow>,
}

/// Loads and merges rule files, naming the file in errors; a replay of no rules is refused.
pub(crate) fn load_rules(paths: &[PathBuf]) -> Result<RuleFile, PipelineError> {
    let paths: Vec<PathBuf> = paths.iter().map(|path| bundled(path)).collect();
    let merged = RuleFile::merge(RuleFile::load_all(&paths)?);
    if merged.rules.is_empty() {
        return Err(PipelineError::Usage("the rule files hold no rules".into()));
    }
    Ok(merged)
}

/// A runtime and a query context over the pipeline's tables, for the lookups of a replay.
pub(super) fn tables(config: &PipelineConfig) -> Result<(tokio::runtime::Runtime, datafusion::prelude::SessionContext), PipelineError> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| PipelineError::Internal(e.to_string()))?;
    let ctx = crate::sql::context(&config.storage.location()?, config.server.query_limits(), None)?;
    Ok((runtime, ctx))
}

/// The newest score of each story, with the model that gave it.
pub(super) fn newest(rows: Vec<(String, Story)>) -> BTreeMap<String, (String, Story)> {
    rows.into_iter().map(|(model, story)| (story.id.clone(), (model, story))).collect()
}

pub(crate) fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// `topic=energy`, `ticker=XOM`, `all` or `energy`, as an alert's group labels.
fn group_labels(text: &str) -> BTreeMap<String, String> {
    let (key, value) = text.split_once('=').unwrap_or(("topic", text));
    BTreeMap::from([(key.trim().to_string(), value.trim().to_string())])
}

fn same_group(episode: &Episode, topic: Option<&str>, ticker: Option<&str>) -> bool {
    match ticker {
        Some(ticker) => episode.labels.get("ticker").map(String::as_str) == Some(ticker),
        None => topic.is_some_and(|t| episode.labels.get("topic").map(String::as_str) == Some(t)) && !episode.labels.contains_key("ticker"),
    }
}

/// The verdict that applies to `episode`: of the same alert, or of the same rule and group with
/// overlapping times (a backtest of changed rules fires at other times, with other ids).
fn verdict_of<'a>(episode: &Episode, judged: &'a [JudgedAlert]) -> Option<&'a JudgedAlert> {
    judged.iter().find(|j| j.alert_id == episode.alert_id).or_else(|| {
        judged.iter().find(|j| {
            j.rule == episode.rule && same_group(episode, Some(&j.topic), j.ticker.as_deref()) && episode.overlaps(j.started_ms, j.resolved_ms.unwrap_or(i64::MAX))
        })
    })
}

pub fn backtest(config: &PipelineConfig, options: &BacktestOptions<'_>) -> Result<Backtest, PipelineError> {
    let rules = load_rules(options.rules)?;
    let (runtime, ctx) = tables(config)?;
    let mut filter = lit(true);
    if let Some(from) = options.from {
        filter = filter.and(col("published_at").gt_eq(timestamp(from.timestamp_millis())));
    }
    if let Some(to) = options.to {
        filter = filter.and(col("published_at").lt(timestamp(to.timestamp_millis())));
    }
    let (stories, judged, missed) = runtime.block_on(async {
        Ok::<_, PipelineError>((
            crate::sql::lookup::scored_stories(&ctx, "news", filter).await?,
            crate::sql::lookup::judged_alerts(&ctx).await?,
            crate::sql::lookup::missed_events(&ctx).await?,
        ))
    })?;
    let stories: Vec<Story> = newest(stories).into_values().map(|(_, s)| s).collect();
    let (first, last) = (stories.iter().map(|s| s.published_ms).min(), stories.iter().map(|s| s.published_ms).max());

    let mut detector = Detector::new(rules.rules.clone());
    if let Some(group) = &options.explain {
        detector.trace(group_labels(group));
    }
    let spec = WindowSpec::from_config(&config.window);
    let every = config.alerts.evaluate_every.as_millis();
    let folding = super::stored_folding(config);
    let found = episodes(replay(spec, folding, &mut detector, every, &stories));
    let explain = detector.take_trace();

    let silences = crate::alert::silences::SilenceStore::open(&config.storage.local_dir().join("silences.json")).map_err(|e| PipelineError::Internal(e.to_string()))?;
    let router = Router::new(rules.routes.clone(), Silences::new(rules.silences.clone(), Some(silences)));
    let weeks = match (first, last) {
        (Some(a), Some(b)) if b > a => (b - a) as f64 / (7.0 * 86_400_000.0),
        _ => 0.0,
    };
    let known = Known { router: &router, judged: &judged, missed: &missed, weeks };
    let (found, results) = known.judge(&rules.rules, found);

    let mut sweep = Vec::new();
    if let Some(Sweep { rule, field, values }) = &options.sweep {
        if let Some(name) = rule
            && !rules.rules.iter().any(|r| &r.name == name)
        {
            return Err(PipelineError::Usage(format!("--sweep: no rule named `{name}` in the rule files")));
        }
        for &value in values {
            let mut changed = Vec::new();
            for r in rules.rules.iter().filter(|r| rule.as_ref().is_none_or(|name| &r.name == name)) {
                changed.extend(r.with_condition(field, value).map_err(PipelineError::Usage)?);
            }
            if changed.is_empty() {
                return Err(PipelineError::Usage(format!("--sweep: no rule's condition has a field `{field}`")));
            }
            let found = episodes(replay(spec, folding, &mut Detector::new(changed.clone()), every, &stories));
            sweep.extend(known.judge(&changed, found).1.into_iter().map(|rule| SweepRow { value, rule }));
        }
    }
    Ok(Backtest {
        storage: config.storage.path.display().to_string(),
        stories: stories.len(),
        first: first.map(time),
        last: last.map(time),
        rules: results,
        episodes: found,
        explain,
        sweep,
    })
}

/// What people said, the silences, and how long the replay spans: what a replay's episodes are
/// judged against.
struct Known<'a> {
    router: &'a Router,
    judged: &'a [JudgedAlert],
    missed: &'a [Missed],
    weeks: f64,
}

impl Known<'_> {
    /// Each episode with its silence and verdict, and per rule its counts, precision and recall.
    fn judge(&self, rules: &[Rule], found: Vec<Episode>) -> (Vec<BacktestEpisode>, Vec<RuleResult>) {
        let episodes: Vec<BacktestEpisode> = found
            .into_iter()
            .map(|episode| {
                let when = chrono::DateTime::parse_from_rfc3339(&episode.started_at).map(|t| t.to_utc()).unwrap_or_default();
                let silenced = self.router.silenced(&episode.labels, when);
                let verdict = verdict_of(&episode, self.judged).map(|j| j.verdict.clone());
                BacktestEpisode { episode, silenced, verdict }
            })
            .collect();
        let results = rules.iter().map(|rule| self.rule_result(rule, &episodes)).collect();
        (episodes, results)
    }

    fn rule_result(&self, rule: &Rule, episodes: &[BacktestEpisode]) -> RuleResult {
        let mine: Vec<&BacktestEpisode> = episodes.iter().filter(|e| e.episode.rule == rule.name).collect();
        let mut verdicts = BTreeMap::new();
        for verdict in mine.iter().filter_map(|e| e.verdict.as_deref()) {
            *verdicts.entry(verdict.to_string()).or_insert(0) += 1;
        }
        let hits = mine.iter().filter(|e| e.verdict.as_deref().is_some_and(hit)).count();
        let judged_count = mine.iter().filter(|e| e.verdict.is_some()).count();
        // Missed events this rule could have caught: of its kind of group.
        let relevant: Vec<&Missed> = self
            .missed
            .iter()
            .filter(|m| match rule.group {
                GroupKind::Ticker => m.ticker.is_some(),
                GroupKind::Topic => m.ticker.is_none() && m.topic.as_deref().is_some_and(|t| t != crate::window::ALL),
                GroupKind::All => m.ticker.is_none(),
            })
            .collect();
        let caught = relevant
            .iter()
            .filter(|m| {
                let topic = if rule.group == GroupKind::All { Some(crate::window::ALL) } else { m.topic.as_deref() };
                mine.iter().any(|e| same_group(&e.episode, topic, m.ticker.as_deref()) && e.episode.overlaps(m.from_ms, m.to_ms))
            })
            .count();
        RuleResult {
            rule: rule.name.clone(),
            episodes: mine.len(),
            per_week: if self.weeks > 0.0 { mine.len() as f64 / self.weeks } else { 0.0 },
            verdicts,
            precision: wilson(hits, judged_count),
            recall: wilson(hits + caught, hits + relevant.len()),
        }
    }
}

impl Backtest {
    pub fn render(&self, rule_files: &[PathBuf]) -> String {
        use std::fmt::Write as _;
        let files: Vec<String> = rule_files.iter().map(|p| p.display().to_string()).collect();
        let mut out = format!(
            "backtest of {} on {}: {} stories, {} to {}\n\n| rule | episodes | per week | verdicts | precision (95 %) | recall vs missed events (95 %) |\n|---|---:|---:|---|---|---|\n",
            files.join(", "),
            self.storage,
            self.stories,
            self.first.as_deref().unwrap_or("-"),
            self.last.as_deref().unwrap_or("-")
        );
        let share = |s: &Option<Share>| match s {
            Some(s) => format!("{:.2} ({:.2}–{:.2}) of {}", s.value, s.low, s.high, s.of),
            None => "no verdicts".into(),
        };
        let verdicts = |r: &RuleResult| -> String {
            if r.verdicts.is_empty() { "—".into() } else { r.verdicts.iter().map(|(v, n)| format!("{n} {v}")).collect::<Vec<_>>().join(", ") }
        };
        for r in &self.rules {
            let _ = writeln!(out, "| {} | {} | {:.1} | {} | {} | {} |", r.rule, r.episodes, r.per_week, verdicts(r), share(&r.precision), share(&r.recall));
        }
        if !self.sweep.is_empty() {
            out.push_str("\n| swept value | rule | episodes | per week | verdicts | precision (95 %) | recall vs missed events (95 %) |\n|---:|---|---:|---:|---|---|---|\n");
            for row in &self.sweep {
                let r = &row.rule;
                let _ = writeln!(out, "| {} | {} | {} | {:.1} | {} | {} | {} |", row.value, r.rule, r.episodes, r.per_week, verdicts(r), share(&r.precision), share(&r.recall));
            }
        }
        out.push_str("\n| rule | group | alert_id | started | resolved | value | stories | verdict |\n|---|---|---|---|---|---:|---:|---|\n");
        for e in &self.episodes {
            let ep = &e.episode;
            let _ = writeln!(
                out,
                "| {} | {} | {} | {} | {} | {:.3} | {} | {}{} |",
                ep.rule,
                ep.group,
                ep.alert_id,
                ep.started_at,
                ep.resolved_at.as_deref().unwrap_or("firing"),
                ep.value,
                ep.count,
                e.verdict.as_deref().unwrap_or("—"),
                if e.silenced { " (silenced)" } else { "" }
            );
        }
        if !self.explain.is_empty() {
            out.push_str("\n| at (watermark) | rule | window | row | stories | value | baseline | threshold | p | verdict | change | each test |\n|---|---|---|---|---:|---:|---:|---:|---:|---|---|---|\n");
            for t in &self.explain {
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} | {} | {:.3} | {} | {} | {} | {} | {} | {} |",
                    t.at,
                    t.rule,
                    t.window_start,
                    if t.final_row { "final" } else { "live" },
                    t.n,
                    t.value,
                    t.baseline.map_or("—".into(), |b| format!("{b:.3}")),
                    if t.threshold.is_finite() { format!("{:.3}", t.threshold) } else { "—".into() },
                    t.p.map_or("—".into(), |p| format!("{p:.1e}")),
                    serde_json::to_value(t.verdict).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default(),
                    t.change.map_or("", |c| c.as_str()),
                    tests(t)
                );
            }
        }
        out
    }
}

/// An `any` condition's tests in one cell: "share test normal 0.450 of 0.800 (p 2.0e-3); …".
fn tests(trace: &Trace) -> String {
    let tests: Vec<String> = trace
        .tests
        .iter()
        .map(|t| {
            let verdict = serde_json::to_value(t.verdict).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
            let threshold = if t.threshold.is_finite() { format!("{:.3}", t.threshold) } else { "—".into() };
            let p = t.p.map_or(String::new(), |p| format!(" (p {p:.1e})"));
            format!("{} {verdict} {:.3} of {threshold}{p}", t.test, t.value)
        })
        .collect();
    if tests.is_empty() { "—".into() } else { tests.join("; ") }
}

#[cfg(test)]
mod tests {
    use super::Sweep;

    #[test]
    fn a_sweep_lists_every_value_from_its_start_to_its_end() {
        let sweep: Sweep = "condition.p_value=0.001:0.003:0.001".parse().unwrap();
        assert_eq!((sweep.rule, sweep.field.as_str(), sweep.values), (None, "p_value", vec![0.001, 0.002, 0.003]));
        let sweep: Sweep = "topic-negative-burst.condition.min_count=4:8:2".parse().unwrap();
        assert_eq!((sweep.rule.as_deref(), sweep.field.as_str(), sweep.values), (Some("topic-negative-burst"), "min_count", vec![4.0, 6.0, 8.0]));
        assert_eq!("condition.factor=1.5:3:0.5".parse::<Sweep>().unwrap().values, vec![1.5, 2.0, 2.5, 3.0]);
        for bad in ["p_value=1:2:1", "x.condition.a.b=1:2:1", ".condition.a=1:2:1", "condition.p_value=0.1:0.2", "condition.x=2:1:1", "condition.x=0:1:0", "condition.x=0:1000:1"] {
            assert!(bad.parse::<Sweep>().is_err(), "{bad}");
        }
    }
}
