//! Spike detection: alert rules evaluated on `windows` rows, with an alert lifecycle per
//! (rule, group): inactive → pending (`for`) → firing → resolved (`keep_firing_for`, exit levels).
//!
//! Times are event times (the watermark), so a replay of 1987 news fires the alerts that 1987 would
//! have fired, and a test gets the same answer every run. State is plain data kept in checkpoints.

pub mod band;
mod config;
pub mod count;
mod handover;
mod in_force;
pub mod replay;
pub mod rules;
pub mod unit;
mod sql;
mod table;

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

pub use config::AlertsConfig;
pub use in_force::InForce;
pub use rules::{Condition, GroupKind, Metric, Rule, RuleFile};
pub use table::{alerts_batch, alerts_schema};

use crate::config::HumanDuration;
use crate::window::{ALL, Counts, Headline, WindowKey, WindowRow};

/// A group of `windows` rows: a topic, `all`, or a ticker.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct GroupKey {
    pub topic: String,
    pub ticker: Option<String>,
}

impl GroupKey {
    fn of(key: &WindowKey) -> GroupKey {
        GroupKey { topic: key.topic.clone(), ticker: key.ticker.clone() }
    }

    fn kind(&self) -> GroupKind {
        match (&self.ticker, self.topic.as_str()) {
            (Some(_), _) => GroupKind::Ticker,
            (None, ALL) => GroupKind::All,
            (None, _) => GroupKind::Topic,
        }
    }

    /// As the Alert's `group` object: `{"topic": "energy"}` or `{"ticker": "XOM"}`.
    pub fn labels(&self) -> BTreeMap<String, String> {
        match &self.ticker {
            Some(ticker) => BTreeMap::from([("ticker".to_string(), ticker.clone())]),
            None => BTreeMap::from([("topic".to_string(), self.topic.clone())]),
        }
    }

    fn describe(&self) -> String {
        match &self.ticker {
            Some(ticker) => ticker.clone(),
            None if self.topic == ALL => "all news".into(),
            None => self.topic.clone(),
        }
    }
}

/// Closed windows per group that `sql` conditions can query besides the current rows.
pub const SQL_HISTORY: usize = 48;

/// Groups whose closed windows the detector keeps at most. Tickers come from the input, so this
/// bounds what a feed that keeps naming new tickers can make it (and its checkpoints) hold.
pub const MAX_GROUPS: usize = 20_000;

/// A rule's failing SQL condition, logged once every half minute while it keeps failing.
static SQL_FAILED: crate::telemetry::Repeats = crate::telemetry::Repeats::new(std::time::Duration::from_secs(30));

/// A closed window's numbers, kept as baseline for the next ones.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Past {
    start_ms: i64,
    #[serde(default)]
    end_ms: i64,
    counts: Counts,
}

fn metric(metric: Metric, counts: &Counts) -> f64 {
    match metric {
        Metric::NegShare => counts.neg_share(),
        Metric::NNegative => counts.n_negative as f64,
        Metric::MeanSentiment => counts.mean_sentiment(),
        Metric::N => counts.n as f64,
    }
}

/// What a condition says about one window.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Past the threshold: a new alert may start.
    Breach,
    /// Not past the threshold but still past the exit level: a firing alert stays.
    Elevated,
    /// Back to normal: a firing alert may resolve.
    Normal,
    /// Too few stories, or no baseline yet: decides nothing either way.
    Undecided,
}

/// The numbers behind a verdict, for the explanation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub verdict: Verdict,
    pub value: f64,
    pub baseline: Option<f64>,
    pub threshold: f64,
    /// A `binomial` or `count` condition's tail probability.
    pub p: Option<f64>,
    /// Which test of an `any` condition decided (the first with the strongest verdict).
    pub test: Option<usize>,
}

impl Verdict {
    /// Which of two tests' verdicts decides an `any` condition: a breach over an elevated reading
    /// over a normal one over none.
    fn strength(self) -> u8 {
        match self {
            Verdict::Breach => 3,
            Verdict::Elevated => 2,
            Verdict::Normal => 1,
            Verdict::Undecided => 0,
        }
    }
}

/// What a window is compared with: its group's closed windows before it and the market's (`all`),
/// oldest first, and in how many windows of a group each story is counted (size / slide).
#[derive(Debug, Clone, Copy)]
pub struct Baselines<'a> {
    pub own: &'a [&'a Counts],
    /// Where each of `own` starts, and where the current window does: for a `count` condition's
    /// time of the week. Empty: every window is in the same slot.
    pub own_starts: &'a [i64],
    pub start_ms: i64,
    pub market: &'a [&'a Counts],
    pub overlap: f64,
    /// Where count tests keep the same-slot baselines of this window between readings.
    pub slots: Option<SlotScope<'a>>,
}

/// The count tests' same-slot baselines of each group's window, kept while the group's history is
/// the same: every live reading of a window (each step of event time) reads the same ones, and
/// finding them walks up to 1,000 closed windows. Not state: a restart recomputes them.
#[derive(Debug, Default)]
pub struct SlotMemo(std::cell::RefCell<std::collections::HashMap<(GroupKey, i64), (i64, Vec<((Metric, usize, rules::Season), Vec<f64>)>)>>);

/// Windows a memo holds at most before it starts afresh (closed windows leave it as they close).
const SLOT_MEMO_WINDOWS: usize = 100_000;

impl Clone for SlotMemo {
    fn clone(&self) -> SlotMemo {
        SlotMemo::default()
    }
}

impl PartialEq for SlotMemo {
    fn eq(&self, _: &SlotMemo) -> bool {
        true
    }
}

/// One window's place in a [`SlotMemo`]: its group and start, and the newest closed window of the
/// group before it (a new one changes the baseline).
#[derive(Debug, Clone, Copy)]
pub struct SlotScope<'a> {
    memo: &'a SlotMemo,
    group: &'a GroupKey,
    start_ms: i64,
    newest_ms: i64,
}

impl<'a> Baselines<'a> {
    /// Tumbling windows compared with their own group only, all in one season slot.
    pub fn own(own: &'a [&'a Counts]) -> Baselines<'a> {
        Baselines { own, own_starts: &[], start_ms: 0, market: &[], overlap: 1.0, slots: None }
    }

    /// The counts of `own`'s newest `count` windows that start in the current window's `season`
    /// slot, less those with under a quarter of the slot's median stories (a holiday, an outage).
    fn same_slot(&self, metric_kind: Metric, count: usize, season: rules::Season) -> Vec<f64> {
        let Some(scope) = self.slots else { return self.find_same_slot(metric_kind, count, season) };
        let key = (scope.group.clone(), scope.start_ms);
        let which = (metric_kind, count, season);
        if let Some((newest, found)) = scope.memo.0.borrow().get(&key)
            && *newest == scope.newest_ms
            && let Some((_, values)) = found.iter().find(|(w, _)| *w == which)
        {
            return values.clone();
        }
        let values = self.find_same_slot(metric_kind, count, season);
        let mut memo = scope.memo.0.borrow_mut();
        if memo.len() >= SLOT_MEMO_WINDOWS {
            memo.clear();
        }
        let entry = memo.entry(key).or_insert_with(|| (scope.newest_ms, Vec::new()));
        if entry.0 != scope.newest_ms {
            *entry = (scope.newest_ms, Vec::new());
        }
        entry.1.push((which, values.clone()));
        values
    }

    fn find_same_slot(&self, metric_kind: Metric, count: usize, season: rules::Season) -> Vec<f64> {
        let recent = self.own.len().saturating_sub(count);
        let slot = count::slot(season, self.start_ms);
        let in_slot: Vec<&Counts> = self.own[recent..]
            .iter()
            .enumerate()
            .filter(|(i, _)| self.own_starts.get(recent + i).is_none_or(|start| count::slot(season, *start) == slot))
            .map(|(_, c)| *c)
            .collect();
        let mut stories: Vec<u64> = in_slot.iter().map(|c| c.n).collect();
        stories.sort_unstable();
        let median = stories.get(stories.len() / 2).copied().unwrap_or(0);
        in_slot.iter().filter(|c| c.n * 4 >= median).map(|c| metric(metric_kind, c)).collect()
    }
}

/// Evaluates `condition` on `current` against its baselines.
pub fn read(condition: &Condition, metric_kind: Metric, current: &Counts, baselines: &Baselines<'_>) -> Reading {
    let history = baselines.own;
    let value = metric(metric_kind, current);
    let undecided = |baseline, threshold| Reading { verdict: Verdict::Undecided, value, baseline, threshold, p: None, test: None };
    let grade = |breach: bool, elevated: bool| {
        if breach {
            Verdict::Breach
        } else if elevated {
            Verdict::Elevated
        } else {
            Verdict::Normal
        }
    };
    match condition {
        Condition::Threshold { op, value: threshold, min_count, exit_value } => {
            if current.n < *min_count {
                return undecided(None, *threshold);
            }
            let exit = exit_value.unwrap_or(*threshold);
            let verdict = grade(op.holds(value, *threshold), op.holds(value, exit));
            Reading { verdict, value, baseline: None, threshold: *threshold, p: None, test: None }
        }
        Condition::RatioToBaseline { factor, baseline_windows, min_count, min_baseline_count, min_baseline_window_count, min_value, exit_factor } => {
            let windows = baseline(history, *baseline_windows, *min_baseline_window_count).unwrap_or_default();
            let baseline_n: u64 = windows.iter().map(|c| c.n).sum();
            if windows.is_empty() || baseline_n < *min_baseline_count {
                return undecided(None, f64::NAN);
            }
            // A share's baseline is pooled (Σ negative / Σ stories): a window of 2 stories weighs
            // 2 stories, not as much as one of 400. Counts keep the mean of the windows.
            let baseline = match metric_kind {
                Metric::NegShare => pooled_share(&windows),
                _ => windows.iter().map(|c| metric(metric_kind, c)).sum::<f64>() / windows.len() as f64,
            };
            let threshold = in_range(metric_kind, baseline * factor);
            // As ElastAlert's spike rule: no spike from or to nothing.
            if current.n < *min_count || baseline <= 0.0 || value <= 0.0 {
                return undecided(Some(baseline), threshold);
            }
            let exit = baseline * exit_factor.unwrap_or(*factor);
            let breach = value >= threshold && value >= *min_value;
            Reading { verdict: grade(breach, value >= exit), value, baseline: Some(baseline), threshold, p: None, test: None }
        }
        // Decided over all rows at once by `sql_readings`.
        Condition::Sql { .. } => undecided(None, f64::NAN),
        Condition::Zscore { sigma, baseline_windows, min_count, min_baseline_window_count, exit_sigma } => {
            let previous: Vec<f64> = baseline(history, *baseline_windows, *min_baseline_window_count)
                .unwrap_or_default()
                .iter()
                .map(|c| metric(metric_kind, c))
                .collect();
            // A spread needs two windows.
            if previous.len() < 2 {
                return undecided(None, f64::NAN);
            }
            let mean = previous.iter().sum::<f64>() / previous.len() as f64;
            let variance = previous.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (previous.len() - 1) as f64;
            let sd = variance.sqrt();
            let threshold = in_range(metric_kind, mean + sigma * sd);
            if current.n < *min_count || sd == 0.0 {
                return undecided(Some(mean), threshold);
            }
            let z = (value - mean) / sd;
            Reading { verdict: grade(z >= *sigma, z >= exit_sigma.unwrap_or(*sigma)), value, baseline: Some(mean), threshold, p: None, test: None }
        }
        Condition::Any { of } => {
            let readings = read_tests(of, metric_kind, current, baselines);
            // `max_by_key` keeps the last of equals: reversed, the first listed test wins a tie.
            let Some((index, reading)) = readings.into_iter().enumerate().rev().max_by_key(|(_, r)| r.verdict.strength()) else {
                return undecided(None, f64::NAN);
            };
            Reading { test: Some(index), ..reading }
        }
        Condition::Count { p_value, baseline_windows, season, min_count, min_ratio, min_slot_windows, exit_p_value } => {
            let past = baselines.same_slot(metric_kind, *baseline_windows, *season);
            if past.len() < *min_slot_windows {
                return undecided(None, f64::NAN);
            }
            let Some(model) = count::CountModel::fit(&past) else { return undecided(None, f64::NAN) };
            // The count at which the window would breach: the first one under `p_value`, and no
            // less than `min_count` and `min_ratio` × usual.
            let floor = (*min_count as f64).max(min_ratio * model.mean).ceil();
            let threshold = model.threshold(*p_value).map_or(f64::INFINITY, |k| (k as f64).max(floor));
            let tail = model.tail(value as u64);
            let big_enough = value >= floor;
            Reading {
                verdict: grade(tail < *p_value && big_enough, tail < exit_p_value.unwrap_or(*p_value) && big_enough),
                value,
                baseline: Some(model.mean),
                threshold,
                p: Some(tail),
                test: None,
            }
        }
        Condition::Binomial {
            p_value,
            baseline_windows,
            min_effect,
            min_count,
            min_negative,
            min_baseline_count,
            min_baseline_window_count,
            exit_p_value,
            prior_stories,
        } => {
            let windows = baseline(history, *baseline_windows, *min_baseline_window_count).unwrap_or_default();
            let (own_negative, own_n) = totals(&windows);
            if own_n < *min_baseline_count {
                return undecided(None, f64::NAN);
            }
            let usual = if *prior_stories > 0.0 {
                // Beta(market share · weight, …) updated by the group's own stories, each counted
                // once however many hopping windows hold it; +½ each side (Jeffreys) keeps a
                // market without negatives from making one negative impossible.
                let Some(market) = baseline(baselines.market, *baseline_windows, *min_baseline_window_count).filter(|w| totals(w).1 > 0) else {
                    return undecided(None, f64::NAN);
                };
                let market = pooled_share(&market);
                let once = 1.0 / baselines.overlap.max(1.0);
                Usual::Beta(
                    own_negative as f64 * once + market * prior_stories + 0.5,
                    (own_n - own_negative) as f64 * once + (1.0 - market) * prior_stories + 0.5,
                )
            } else if own_n == 0 {
                return undecided(None, f64::NAN);
            } else {
                Usual::Share(own_negative as f64 / own_n as f64)
            };
            let share = usual.share();
            // The share at which the current window would breach: the smallest count whose tail
            // is under `p_value`, and at least `min_effect` above usual (never above 1).
            let needed = usual.threshold(current.n, *p_value).map_or(f64::INFINITY, |k| k as f64);
            let threshold = (needed / current.n.max(1) as f64).max(share + min_effect).max(*min_negative as f64 / current.n.max(1) as f64).min(1.0);
            if current.n < *min_count {
                return undecided(Some(share), threshold);
            }
            let tail = usual.tail(current.n_negative, current.n);
            let effect = value - share >= *min_effect && current.n_negative >= *min_negative;
            Reading {
                verdict: grade(tail < *p_value && effect, tail < exit_p_value.unwrap_or(*p_value) && effect),
                value,
                baseline: Some(share),
                threshold,
                p: Some(tail),
                test: None,
            }
        }
    }
}

/// Each test of an `any` condition's reading, in order.
pub fn read_tests(tests: &[rules::Test], metric_kind: Metric, current: &Counts, baselines: &Baselines<'_>) -> Vec<Reading> {
    tests.iter().map(|t| read(&t.condition, t.metric.unwrap_or(metric_kind), current, baselines)).collect()
}

/// The newest `count` closed windows before the current one, less those under `min_stories`
/// stories (skipped, not counted), oldest first; None until the group has `count` closed windows.
fn baseline<'a>(history: &[&'a Counts], count: usize, min_stories: u64) -> Option<Vec<&'a Counts>> {
    if history.len() < count {
        return None;
    }
    Some(history[history.len() - count..].iter().filter(|c| c.n >= min_stories).copied().collect())
}

/// In how many of a group's windows each story is counted: size / slide, the slide read off the
/// nearest starts of its closed windows (1 for tumbling windows or too little history).
fn overlap(past: &VecDeque<Past>) -> f64 {
    let slide = past.iter().zip(past.iter().skip(1)).map(|(a, b)| b.start_ms - a.start_ms).filter(|d| *d > 0).min();
    let size = past.back().map(|p| p.end_ms - p.start_ms);
    match (slide, size) {
        (Some(slide), Some(size)) if size > slide => size as f64 / slide as f64,
        _ => 1.0,
    }
}

/// Σ negative and Σ stories.
fn totals(windows: &[&Counts]) -> (u64, u64) {
    windows.iter().fold((0, 0), |(neg, n), c| (neg + c.n_negative, n + c.n))
}

fn pooled_share(windows: &[&Counts]) -> f64 {
    let (negative, n) = totals(windows);
    if n == 0 { 0.0 } else { negative as f64 / n as f64 }
}

/// A threshold as the metric can be: a share never above 1 (then the rule cannot fire there).
fn in_range(metric_kind: Metric, threshold: f64) -> f64 {
    match metric_kind {
        Metric::NegShare => threshold.min(1.0),
        _ => threshold,
    }
}

/// How many of a window's n stories are usually negative.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Usual {
    /// A known share p: Binomial(n, p).
    Share(f64),
    /// A share known as Beta(a, b) (a, b > 0): beta-binomial.
    Beta(f64, f64),
}

impl Usual {
    pub fn share(self) -> f64 {
        match self {
            Usual::Share(p) => p,
            Usual::Beta(a, b) => a / (a + b),
        }
    }

    /// A share of exactly 0 or 1 makes the answer certain; None otherwise.
    fn certain(self, k: u64, n: u64) -> Option<f64> {
        match self {
            _ if k == 0 => Some(1.0),
            _ if k > n => Some(0.0),
            Usual::Share(p) if p <= 0.0 => Some(0.0),
            Usual::Share(p) if p >= 1.0 => Some(1.0),
            _ => None,
        }
    }

    /// ln P(X = n).
    fn ln_all(self, n: u64) -> f64 {
        match self {
            Usual::Share(p) => n as f64 * p.ln(),
            Usual::Beta(a, b) => (0..n).map(|i| ((a + i as f64) / (a + b + i as f64)).ln()).sum(),
        }
    }

    /// ln pmf(j − 1) − ln pmf(j).
    fn ln_step_down(self, j: u64, n: u64) -> f64 {
        let (j, n) = (j as f64, n as f64);
        let choose = j.ln() - (n - j + 1.0).ln();
        match self {
            Usual::Share(p) => choose + (1.0 - p).ln() - p.ln(),
            Usual::Beta(a, b) => choose + (n - j + b).ln() - (j - 1.0 + a).ln(),
        }
    }

    /// The tail summed downwards from n in logs (neither overflow nor underflow in the
    /// thousands) to `down_to`, or until the tail reaches `ln_stop`. Returns the last j summed and
    /// ln P(X ≥ j).
    fn sum_down(self, n: u64, down_to: u64, ln_stop: f64) -> (u64, f64) {
        let mut ln_term = self.ln_all(n);
        let mut ln_tail = ln_term;
        let mut j = n;
        while j > down_to && ln_tail < ln_stop {
            ln_term += self.ln_step_down(j, n);
            let (hi, lo) = if ln_tail > ln_term { (ln_tail, ln_term) } else { (ln_term, ln_tail) };
            ln_tail = hi + (lo - hi).exp().ln_1p();
            j -= 1;
        }
        (j, ln_tail)
    }

    /// P(X ≥ k) for n stories, O(n).
    pub fn tail(self, k: u64, n: u64) -> f64 {
        if let Some(p) = self.certain(k, n) {
            return p;
        }
        self.sum_down(n, k, f64::INFINITY).1.exp().min(1.0)
    }

    /// The smallest k with P(X ≥ k) < `alpha` for n stories, None if even n is not that unlikely.
    fn threshold(self, n: u64, alpha: f64) -> Option<u64> {
        match self {
            _ if n == 0 => None,
            Usual::Share(p) if p <= 0.0 => Some(1),
            Usual::Share(p) if p >= 1.0 => None,
            _ => match self.sum_down(n, 0, alpha.ln()) {
                (j, ln_tail) if ln_tail < alpha.ln() => Some(j),
                (j, _) if j == n => None,
                (j, _) => Some(j + 1),
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
enum Phase {
    Pending {
        since_ms: i64,
        /// Absent from older checkpoints: then `since_ms`.
        #[serde(default)]
        last_breach_ms: Option<i64>,
    },
    Firing { alert_id: String, started_ms: i64, last_breach_ms: i64 },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Tracked {
    rule: String,
    group: GroupKey,
    phase: Phase,
    /// Newest window evaluated; older ones (final rows of hopping windows) no longer move the state.
    last_start_ms: i64,
    /// What that window read: a quiet resolution reports it (absent from older checkpoints).
    #[serde(default)]
    seen: Option<Seen>,
    /// The severity and labels the alert fired with: its rule may be gone (or changed) by the time
    /// it resolves, and the resolution must route as the firing did (absent from older checkpoints).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    fired_as: Option<FiredAs>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct FiredAs {
    severity: rules::Severity,
    labels: BTreeMap<String, String>,
}

impl Tracked {
    /// The resolution, at watermark `now_ms`, of a firing alert that no window row resolves (a
    /// quiet group, a gone rule), with the numbers of its last reading; None for a pending one.
    fn resolution(self, now_ms: i64, summary: String, unknown: FiredAs) -> Option<Alert> {
        let Phase::Firing { alert_id, started_ms, .. } = self.phase else { return None };
        let seen = self.seen.unwrap_or(Seen { end_ms: self.last_start_ms, value: f64::NAN, baseline: None, threshold: f64::NAN, count: 0 });
        let FiredAs { severity, labels } = self.fired_as.unwrap_or(unknown);
        Some(Alert {
            alert_id,
            rule: self.rule,
            severity,
            state: AlertState::Resolved,
            group: self.group.labels(),
            labels,
            started_at: time(started_ms),
            resolved_at: Some(time(now_ms.max(started_ms))),
            window_start: time(self.last_start_ms),
            window_end: time(seen.end_ms),
            value: seen.value,
            baseline: seen.baseline,
            threshold: seen.threshold,
            count: seen.count,
            summary,
            top_headlines: Vec::new(),
        })
    }
}

impl FiredAs {
    fn of(rule: &Rule) -> Option<FiredAs> {
        Some(FiredAs { severity: rule.severity, labels: rule.labels.clone() })
    }

    /// Gives a resolution the severity and labels its alert fired with, where they are known: a
    /// receiver that keys alerts by their labels (Alertmanager) would see another alert otherwise.
    fn mark(fired_as: Option<FiredAs>, mut resolved: Alert) -> Alert {
        if let Some(FiredAs { severity, labels }) = fired_as {
            (resolved.severity, resolved.labels) = (severity, labels);
        }
        resolved
    }
}

/// The numbers of the newest window a (rule, group) read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Seen {
    end_ms: i64,
    #[serde(deserialize_with = "null_as_nan")]
    value: f64,
    baseline: Option<f64>,
    #[serde(deserialize_with = "null_as_nan")]
    threshold: f64,
    count: u64,
}

impl Seen {
    fn of(row: &WindowRow, reading: &Reading) -> Seen {
        Seen { end_ms: row.end_ms, value: reading.value, baseline: reading.baseline, threshold: reading.threshold, count: row.counts.n }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AlertState {
    Firing,
    Resolved,
}

impl AlertState {
    /// As written in tables, keys, metrics and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertState::Firing => "firing",
            AlertState::Resolved => "resolved",
        }
    }
}

/// One state change of one alert (DESIGN §2 Alert): what receivers get and `alerts` stores.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Alert {
    pub alert_id: String,
    pub rule: String,
    pub severity: rules::Severity,
    pub state: AlertState,
    pub group: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub started_at: String,
    pub resolved_at: Option<String>,
    pub window_start: String,
    pub window_end: String,
    #[serde(deserialize_with = "null_as_nan")]
    pub value: f64,
    pub baseline: Option<f64>,
    /// NaN where the rule has none (`sql`): JSON writes it as null.
    #[serde(deserialize_with = "null_as_nan")]
    pub threshold: f64,
    pub count: u64,
    pub summary: String,
    pub top_headlines: Vec<Headline>,
}

impl Alert {
    /// Labels routes and silences match on: `rule`, `severity`, the group and the rule's labels.
    pub fn match_labels(&self) -> BTreeMap<String, String> {
        let mut labels = self.labels.clone();
        labels.extend(self.group.clone());
        labels.insert("rule".into(), self.rule.clone());
        labels.insert("severity".into(), self.severity.as_str().into());
        labels
    }
}

/// serde_json writes a non-finite number as null; reading it back (outbox, checkpoints) must not fail.
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

/// A stable id: FNV-1a over rule, group and start (never changes across versions or machines).
fn alert_id(rule: &str, group: &GroupKey, started_ms: i64) -> String {
    let text = format!("{rule}\u{1f}{}\u{1f}{}\u{1f}{started_ms}", group.topic, group.ticker.as_deref().unwrap_or(""));
    format!("{:016x}", crate::news::near::stable_hash(&text))
}

/// All rules and their state; serializable as a whole for checkpoints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Detector {
    #[serde(skip)]
    rules: Vec<Rule>,
    #[serde(with = "as_pairs")]
    history: BTreeMap<GroupKey, VecDeque<Past>>,
    #[serde(with = "as_pairs")]
    tracked: BTreeMap<(String, GroupKey), Tracked>,
    /// Records every reading of one group (`backtest --explain`); never checkpointed.
    #[serde(skip)]
    trace: Option<(BTreeMap<String, String>, Vec<Trace>)>,
    #[serde(skip)]
    slots: SlotMemo,
}

/// One rule's reading of one window row: why it did or did not fire there.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Trace {
    pub rule: String,
    /// The watermark it was read at.
    pub at: String,
    pub window_start: String,
    pub final_row: bool,
    pub n: u64,
    pub value: f64,
    pub baseline: Option<f64>,
    pub threshold: f64,
    /// A `binomial` or `count` condition's tail probability.
    pub p: Option<f64>,
    pub verdict: Verdict,
    /// `firing` or `resolved` when the reading changed the alert.
    pub change: Option<AlertState>,
    /// An `any` condition's tests, each with its own reading; the row's numbers are the deciding one's.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tests: Vec<TestTrace>,
}

/// One test's reading of a window, beside the others of its `any` condition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TestTrace {
    pub test: &'static str,
    pub metric: Metric,
    pub value: f64,
    pub baseline: Option<f64>,
    pub threshold: f64,
    pub p: Option<f64>,
    pub verdict: Verdict,
}

/// JSON object keys must be strings, so maps are stored as lists of pairs.
mod as_pairs {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<K: Serialize, V: Serialize, S: Serializer>(map: &BTreeMap<K, V>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, K, V, D>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
        D: Deserializer<'de>,
    {
        Ok(Vec::<(K, V)>::deserialize(d)?.into_iter().collect())
    }
}

impl Detector {
    /// Alerts firing now, over every rule and group.
    pub fn firing(&self) -> usize {
        self.tracked.values().filter(|t| matches!(t.phase, Phase::Firing { .. })).count()
    }

    pub fn new(rules: Vec<Rule>) -> Detector {
        Detector { rules, history: BTreeMap::new(), tracked: BTreeMap::new(), trace: None, slots: SlotMemo::default() }
    }

    /// From now on, records every reading of the group with these labels (`{"topic": "energy"}`).
    pub fn trace(&mut self, group: BTreeMap<String, String>) {
        self.trace = Some((group, Vec::new()));
    }

    pub fn take_trace(&mut self) -> Vec<Trace> {
        self.trace.as_mut().map(|(_, rows)| std::mem::take(rows)).unwrap_or_default()
    }

    /// Evaluates `rules` from now on (restored state at a start, or a reload), and returns the
    /// resolutions of the alerts firing under rules that are gone: no window will ever resolve
    /// them, and a receiver holding one open would hold it for good. Pending state of gone rules
    /// is dropped; the rules kept by name keep their state.
    pub fn replace_rules(&mut self, rules: Vec<Rule>, now_ms: i64) -> Vec<Alert> {
        let gone: Vec<(String, GroupKey)> = self.tracked.keys().filter(|(name, _)| !rules.iter().any(|r| &r.name == name)).cloned().collect();
        self.rules = rules;
        let mut resolved = Vec::new();
        for key in gone {
            let Some(tracked) = self.tracked.remove(&key) else { continue };
            let summary = format!("{}: resolved, rule `{}` is no longer in the rule files", tracked.group.describe(), key.0);
            // Checkpoints from before `fired_as` knew neither: the rules' default severity, no labels.
            let unknown = FiredAs { severity: rules::Severity::Warning, labels: BTreeMap::new() };
            resolved.extend(tracked.resolution(now_ms, summary, unknown));
        }
        resolved
    }

    pub fn into_rules(self) -> Vec<Rule> {
        self.rules
    }

    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Closed windows kept per group: the longest baseline, and one more, because the market's
    /// (`all`) window of the same start as a topic's closes with it and may be kept first; the
    /// topic's baseline is the windows before its own start.
    fn history_len(&self) -> usize {
        self.rules.iter().map(|r| r.condition.baseline_windows()).max().map_or(0, |n| n + 1)
    }

    /// Evaluates every rule on new `windows` rows (live or final) at event time `now_ms`, and
    /// returns the alerts that changed state.
    pub fn evaluate(&mut self, rows: &[WindowRow], now_ms: i64) -> Vec<Alert> {
        let mut ordered: Vec<&WindowRow> = rows.iter().collect();
        ordered.sort_by_key(|r| (r.key.start_ms, !r.final_row));
        let mut changes = Vec::new();
        let keep = self.history_len();
        let sql_hits = self.sql_hits(rows);
        let priors = self.rules.iter().any(|r| r.condition.leans_on_market());
        for row in ordered {
            let group = GroupKey::of(&row.key);
            // The group's closed windows before this one: the same for every rule.
            let before = |group: &GroupKey| -> Vec<&Counts> {
                self.history.get(group).map(|h| h.iter().filter(|p| p.start_ms < row.key.start_ms).map(|p| &p.counts).collect()).unwrap_or_default()
            };
            let history = before(&group);
            let starts: Vec<i64> = self
                .history
                .get(&group)
                .map(|h| h.iter().filter(|p| p.start_ms < row.key.start_ms).map(|p| p.start_ms).collect())
                .unwrap_or_default();
            // Only a prior reads the market's windows and how often each story is counted.
            let (market, overlap) = if priors {
                (before(&GroupKey { topic: ALL.to_string(), ticker: None }), self.history.get(&group).map_or(1.0, overlap))
            } else {
                (Vec::new(), 1.0)
            };
            let scope = SlotScope { memo: &self.slots, group: &group, start_ms: row.key.start_ms, newest_ms: starts.last().copied().unwrap_or(i64::MIN) };
            let baselines = Baselines { own: &history, own_starts: &starts, start_ms: row.key.start_ms, market: &market, overlap, slots: Some(scope) };
            for (index, rule) in self.rules.iter().enumerate() {
                if rule.group != group.kind() {
                    continue;
                }
                let reading = match sql_hits.get(&index) {
                    Some(hits) => sql_reading(rule.metric, row, hits),
                    None => read(&rule.condition, rule.metric, &row.counts, &baselines),
                };
                let change = step(&mut self.tracked, rule, &group, row, &reading, now_ms);
                if let Some((wanted, rows)) = self.trace.as_mut()
                    && *wanted == group.labels()
                {
                    rows.push(Trace {
                        rule: rule.name.clone(),
                        at: time(now_ms),
                        window_start: time(row.key.start_ms),
                        final_row: row.final_row,
                        n: row.counts.n,
                        value: reading.value,
                        baseline: reading.baseline,
                        threshold: reading.threshold,
                        p: reading.p,
                        verdict: reading.verdict,
                        change: change.as_ref().map(|a| a.state),
                        tests: match &rule.condition {
                            Condition::Any { of } => read_tests(of, rule.metric, &row.counts, &baselines)
                                .into_iter()
                                .zip(of)
                                .map(|(r, t)| TestTrace {
                                    test: t.condition.test_name(),
                                    metric: t.metric.unwrap_or(rule.metric),
                                    value: r.value,
                                    baseline: r.baseline,
                                    threshold: r.threshold,
                                    p: r.p,
                                    verdict: r.verdict,
                                })
                                .collect(),
                            _ => Vec::new(),
                        },
                    });
                }
                changes.extend(change);
            }
            if row.final_row {
                // A closed window is read again only if a correction revises it.
                self.slots.0.borrow_mut().remove(&(group.clone(), row.key.start_ms));
            }
            if row.final_row && keep > 0 && self.keeps_history(group.kind(), priors) {
                let past = self.history.entry(group).or_default();
                past.push_back(Past { start_ms: row.key.start_ms, end_ms: row.end_ms, counts: row.counts.clone() });
                while past.len() > keep {
                    past.pop_front();
                }
            }
        }
        changes.extend(self.resolve_quiet(now_ms));
        self.bound_history();
        changes
    }

    /// Drops the closed windows of the groups read longest ago while more than [`MAX_GROUPS`] are
    /// held, a tenth below it at a time.
    fn bound_history(&mut self) {
        if self.history.len() <= MAX_GROUPS {
            return;
        }
        let mut newest: Vec<(i64, GroupKey)> = self.history.iter().map(|(g, past)| (past.back().map_or(i64::MIN, |p| p.end_ms), g.clone())).collect();
        newest.sort_unstable();
        let drop = self.history.len() - MAX_GROUPS * 9 / 10;
        tracing::warn!(groups = self.history.len(), dropped = drop, "detector holds too many groups: dropping the baselines of those read longest ago");
        metrics::counter!("bearwatch_detect_groups_dropped_total").increment(drop as u64);
        for (_, group) in newest.into_iter().take(drop) {
            self.history.remove(&group);
        }
    }

    /// Whether closed windows of groups of `kind` are kept: only the rules read them (their own kind,
    /// `all` for a prior, every group for a `sql` query), so per-ticker rows cost nothing unless a
    /// rule watches tickers.
    fn keeps_history(&self, kind: GroupKind, priors: bool) -> bool {
        (priors && kind == GroupKind::All) || self.rules.iter().any(|r| r.group == kind || matches!(r.condition, Condition::Sql { .. }))
    }

    /// Once the rows up to watermark `now_ms` are read: resolves the firing alerts, and forgets the
    /// pending ones, whose group has had no window in breach or past the exit level for the rule's
    /// `quiet_for`. Windows too thin to decide, or a group with no stories at all (which gets no
    /// rows, so `step` never sees it), no longer hold an alert open for good.
    fn resolve_quiet(&mut self, now_ms: i64) -> Vec<Alert> {
        let quiet: Vec<(String, GroupKey)> = self
            .tracked
            .iter()
            .filter(|((name, _), t)| {
                let last_breach_ms = match t.phase {
                    Phase::Firing { last_breach_ms, .. } => last_breach_ms,
                    Phase::Pending { since_ms, last_breach_ms } => last_breach_ms.unwrap_or(since_ms),
                };
                let (Some(seen), Some(rule)) = (&t.seen, self.rules.iter().find(|r| &r.name == name)) else { return false };
                now_ms - last_breach_ms >= quiet_ms(rule, seen.end_ms - t.last_start_ms)
            })
            .map(|(key, _)| key.clone())
            .collect();
        let mut changes = Vec::new();
        for key in quiet {
            let (Some(tracked), Some(rule)) = (self.tracked.remove(&key), self.rules.iter().find(|r| r.name == key.0)) else { continue };
            // A pending one is forgotten without a word.
            let Phase::Firing { last_breach_ms, .. } = tracked.phase else { continue };
            let summary = format!(
                "{}: resolved as quiet, nothing has held the alert since {} (windows too thin to decide, or none)",
                tracked.group.describe(),
                time(last_breach_ms)
            );
            let (group, last_start_ms) = (tracked.group.clone(), tracked.last_start_ms);
            let Some(resolved) = tracked.resolution(now_ms, summary, FiredAs { severity: rule.severity, labels: rule.labels.clone() }) else { continue };
            if let Some((wanted, rows)) = self.trace.as_mut()
                && *wanted == group.labels()
            {
                rows.push(Trace {
                    rule: rule.name.clone(),
                    at: time(now_ms),
                    window_start: time(last_start_ms),
                    final_row: false,
                    n: resolved.count,
                    value: resolved.value,
                    baseline: resolved.baseline,
                    threshold: resolved.threshold,
                    p: None,
                    verdict: Verdict::Undecided,
                    change: Some(AlertState::Resolved),
                    tests: Vec::new(),
                });
            }
            changes.push(resolved);
        }
        changes
    }
}

/// How long a firing alert of `rule` may read nothing decided before it resolves: the rule's
/// `quiet_for`, else two lengths of its windows (`window_ms`), and never less than `keep_firing_for`.
fn quiet_ms(rule: &Rule, window_ms: i64) -> i64 {
    let quiet = rule.quiet_for.as_ref().map_or(2 * window_ms, HumanDuration::as_millis);
    quiet.max(rule.keep_firing_for.as_millis()).max(1)
}

impl Detector {
    /// Runs each `sql` rule's query once over the held closed windows plus `rows`. A query that fails
    /// at run time is logged and decides nothing this time.
    fn sql_hits(&self, rows: &[WindowRow]) -> BTreeMap<usize, Vec<sql::Hit>> {
        let queries: Vec<(usize, &str)> = self
            .rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| match &r.condition {
                Condition::Sql { query } => Some((i, query.as_str())),
                _ => None,
            })
            .collect();
        if queries.is_empty() || rows.is_empty() {
            return BTreeMap::new();
        }
        let mut table: Vec<WindowRow> = self
            .history
            .iter()
            .flat_map(|(group, past)| {
                past.iter().map(|p| {
                    let key = WindowKey { start_ms: p.start_ms, topic: group.topic.clone(), ticker: group.ticker.clone() };
                    WindowRow::new(key, p.end_ms - p.start_ms, p.counts.clone(), Vec::new(), true, 0)
                })
            })
            .collect();
        table.extend(rows.iter().cloned());
        queries
            .into_iter()
            .filter_map(|(i, query)| match sql::hits(&table, query) {
                Ok(hits) => Some((i, hits)),
                Err(e) => {
                    // At every evaluation (many a second in a backfill) while the query fails.
                    if let Some(held) = SQL_FAILED.admit(&format!("{}: {e}", self.rules[i].name)) {
                        tracing::error!(rule = %self.rules[i].name, error = %e, "sql condition failed{}", crate::telemetry::held_back(held));
                    }
                    None
                }
            })
            .collect()
    }
}

/// A row is in breach when a query result row names its group (and its window, if given).
fn sql_reading(metric_kind: Metric, row: &WindowRow, hits: &[sql::Hit]) -> Reading {
    let hit = hits.iter().find(|h| {
        h.topic == row.key.topic && h.ticker == row.key.ticker && h.window_start_ms.is_none_or(|s| s == row.key.start_ms)
    });
    let value = hit.and_then(|h| h.value).unwrap_or_else(|| metric(metric_kind, &row.counts));
    let verdict = if hit.is_some() { Verdict::Breach } else { Verdict::Normal };
    Reading { verdict, value, baseline: None, threshold: f64::NAN, p: None, test: None }
}

/// Moves one (rule, group) through its lifecycle; returns the alert if it started firing or resolved.
fn step(
    tracked: &mut BTreeMap<(String, GroupKey), Tracked>,
    rule: &Rule,
    group: &GroupKey,
    row: &WindowRow,
    reading: &Reading,
    now_ms: i64,
) -> Option<Alert> {
    let key = (rule.name.clone(), group.clone());
    if let Some(t) = tracked.get_mut(&key)
        && row.key.start_ms < t.last_start_ms
    {
        // An older window of a hopping set moves nothing but this: while it still holds the surge,
        // a firing alert stays, though the newest window (its first hour) reads normal. Else one
        // surge would resolve and fire again as the windows slide over it.
        if let Phase::Firing { last_breach_ms, .. } = &mut t.phase
            && matches!(reading.verdict, Verdict::Breach | Verdict::Elevated)
        {
            *last_breach_ms = now_ms;
        }
        return None;
    }
    let alert = |state, alert_id: &str, started_ms, resolved_ms: Option<i64>| Alert {
        alert_id: alert_id.to_string(),
        rule: rule.name.clone(),
        severity: rule.severity,
        state,
        group: group.labels(),
        labels: rule.labels.clone(),
        started_at: time(started_ms),
        resolved_at: resolved_ms.map(time),
        window_start: time(row.key.start_ms),
        window_end: time(row.end_ms),
        value: reading.value,
        baseline: reading.baseline,
        threshold: reading.threshold,
        count: row.counts.n,
        summary: summary(rule, group, row, reading),
        top_headlines: row.top.clone(),
    };
    let seen = Some(Seen::of(row, reading));
    let current = tracked.get_mut(&key);
    match (current, reading.verdict) {
        (None, Verdict::Breach) => {
            if rule.pending_for.as_millis() == 0 {
                let id = alert_id(&rule.name, group, now_ms);
                let phase = Phase::Firing { alert_id: id.clone(), started_ms: now_ms, last_breach_ms: now_ms };
                let fired_as = FiredAs::of(rule);
                tracked.insert(key, Tracked { rule: rule.name.clone(), group: group.clone(), phase, last_start_ms: row.key.start_ms, seen, fired_as });
                return Some(alert(AlertState::Firing, &id, now_ms, None));
            }
            let phase = Phase::Pending { since_ms: now_ms, last_breach_ms: Some(now_ms) };
            tracked.insert(key, Tracked { rule: rule.name.clone(), group: group.clone(), phase, last_start_ms: row.key.start_ms, seen, fired_as: None });
            None
        }
        (None, _) => None,
        (Some(t), verdict) => {
            t.last_start_ms = row.key.start_ms;
            t.seen = seen;
            match (&mut t.phase, verdict) {
                (Phase::Pending { since_ms, last_breach_ms }, Verdict::Breach) => {
                    // After a silence longer than `quiet_for` (which `resolve_quiet` would have
                    // ended, had it run in it), the condition has not held all along.
                    if now_ms - last_breach_ms.unwrap_or(*since_ms) > quiet_ms(rule, row.end_ms - row.key.start_ms) {
                        *since_ms = now_ms;
                    }
                    *last_breach_ms = Some(now_ms);
                    if now_ms - *since_ms >= rule.pending_for.as_millis() {
                        let started = now_ms;
                        let id = alert_id(&rule.name, group, started);
                        t.phase = Phase::Firing { alert_id: id.clone(), started_ms: started, last_breach_ms: now_ms };
                        t.fired_as = FiredAs::of(rule);
                        return Some(alert(AlertState::Firing, &id, started, None));
                    }
                    None
                }
                (Phase::Pending { .. }, Verdict::Undecided) => None,
                (Phase::Pending { .. }, _) => {
                    tracked.remove(&key);
                    None
                }
                (Phase::Firing { last_breach_ms, .. }, Verdict::Breach | Verdict::Elevated) => {
                    *last_breach_ms = now_ms;
                    None
                }
                (Phase::Firing { .. }, Verdict::Undecided) => None,
                (Phase::Firing { alert_id, started_ms, last_breach_ms }, Verdict::Normal) => {
                    // A window that breached at this very step of the rules (an older live one
                    // of a hopping set, read first) holds the alert too. Not a final row: windows
                    // close in order of start, and whether two close at one watermark depends on
                    // how the partitions interleave, which must not decide an alert.
                    let held = now_ms == *last_breach_ms && !row.final_row;
                    if held || now_ms - *last_breach_ms < rule.keep_firing_for.as_millis() {
                        return None;
                    }
                    let (id, started) = (alert_id.clone(), *started_ms);
                    let fired_as = tracked.remove(&key).and_then(|t| t.fired_as);
                    Some(FiredAs::mark(fired_as, alert(AlertState::Resolved, &id, started, Some(now_ms))))
                }
            }
        }
    }
}

/// One line a person can read: what, how much, against what, over how many stories, when; for an
/// `any` condition, which test saw it.
fn summary(rule: &Rule, group: &GroupKey, row: &WindowRow, reading: &Reading) -> String {
    if let (Condition::Any { of }, Some(test)) = (&rule.condition, reading.test.and_then(|i| rule.condition_test(i)))
        && of.len() > 1
    {
        let subject = format!("{} ({})", group.describe(), test.condition.test_name());
        return summary_of(&test.condition, test.metric.unwrap_or(rule.metric), &subject, row, reading);
    }
    summary_of(&rule.condition, rule.metric, &group.describe(), row, reading)
}

/// The summary of `condition`'s reading, after `subject` (the group, and the test that decided).
fn summary_of(condition: &Condition, metric_kind: Metric, subject: &str, row: &WindowRow, reading: &Reading) -> String {
    let what = match metric_kind {
        Metric::NegShare => "negative share",
        Metric::NNegative => "negative stories",
        Metric::MeanSentiment => "mean sentiment",
        Metric::N => "stories",
    };
    let fmt = |v: f64| if matches!(metric_kind, Metric::NegShare | Metric::MeanSentiment) { format!("{v:.2}") } else { format!("{v:.0}") };
    let detail = match (condition, reading.baseline) {
        (Condition::Threshold { op, .. }, _) => format!("{} {} {}", fmt(reading.value), op.symbol(), fmt(reading.threshold)),
        (Condition::RatioToBaseline { factor, .. }, Some(baseline)) => format!(
            "{} is {:.1}× its baseline {} (alert at {factor}×)",
            fmt(reading.value),
            reading.value / baseline,
            fmt(baseline)
        ),
        (Condition::Sql { .. }, _) => format!("{} (matched by the rule's query)", fmt(reading.value)),
        (Condition::Zscore { sigma, .. }, Some(mean)) => {
            format!("{} against a mean of {} (alert at {sigma}σ, {})", fmt(reading.value), fmt(mean), fmt(reading.threshold))
        }
        (Condition::Binomial { p_value, .. }, Some(usual)) => {
            let tail = reading.p.unwrap_or(f64::NAN);
            let p = if tail < 0.001 { "p < 0.001".to_string() } else { format!("p = {tail:.3}") };
            format!(
                "{} of {} negative against {:.0} % usual: {p} (alert under p = {p_value}, from {:.0} %)",
                row.counts.n_negative,
                row.counts.n,
                usual * 100.0,
                reading.threshold * 100.0
            )
        }
        (Condition::Count { .. }, Some(usual)) => {
            let tail = reading.p.unwrap_or(f64::NAN);
            let p = if tail < 1e-6 {
                "p < 1e-6".to_string()
            } else if tail < 0.001 {
                format!("p = {tail:.0e}")
            } else {
                format!("p = {tail:.3}")
            };
            let what = if metric_kind == Metric::N { "stories" } else { "negative" };
            let hours = (row.end_ms - row.key.start_ms) as f64 / 3_600_000.0;
            format!("{} {what} in {hours} h against {usual:.1} usual at this hour: {p} (alert from {})", fmt(reading.value), fmt(reading.threshold))
        }
        _ => fmt(reading.value),
    };
    let span = format!(
        "{} to {}",
        chrono::DateTime::from_timestamp_millis(row.key.start_ms).unwrap_or_default().format("%Y-%m-%d %H:%M"),
        chrono::DateTime::from_timestamp_millis(row.end_ms).unwrap_or_default().format("%Y-%m-%d %H:%M"),
    );
    // Re-sends of a story already counted are not in the numbers; the person should know.
    let copies = match row.counts.n_copies {
        0 => String::new(),
        1 => ", 1 copy of a story folded in".to_string(),
        n => format!(", {n} copies of stories folded in"),
    };
    if matches!(condition, Condition::Binomial { .. } | Condition::Count { .. }) && reading.baseline.is_some() {
        // "31 of 68 negative" already says how many stories.
        return format!("{subject}: {detail}{copies}, {span}");
    }
    format!("{subject}: {what} {detail} over {} stories{copies}, {span}", row.counts.n)
}

#[cfg(test)]
mod tests;
