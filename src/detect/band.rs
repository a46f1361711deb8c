//! What a rule's count test expects of each window: the usual count at that time of the week and
//! the count from which it fires. The dashboard draws it behind each topic's negative count, so a
//! person sees why a surge did or did not fire.

use serde::Serialize;

use super::rules::{Condition, Metric, Rule};
use super::{Baselines, read};
use crate::window::Counts;

/// One window's band.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Band {
    pub window_start_ms: i64,
    /// The usual count at this time of the week; the count that would fire (never below it).
    pub usual: f64,
    pub threshold: f64,
}

/// The count test of `rule` (its condition, or one test of an `any`), and the metric it reads.
pub fn count_test(rule: &Rule) -> Option<(&Condition, Metric)> {
    match &rule.condition {
        c @ Condition::Count { .. } => Some((c, rule.metric)),
        Condition::Any { of } => of.iter().find(|t| matches!(t.condition, Condition::Count { .. })).map(|t| (&t.condition, t.metric.unwrap_or(rule.metric))),
        _ => None,
    }
}

/// The band of each of a group's closed windows (`windows`: start and `[n, negative, neutral,
/// positive]`, oldest first), read as the detector reads them: each against the windows before it.
/// Windows whose slot has too little history have none.
pub fn bands(condition: &Condition, metric: Metric, windows: &[(i64, [u64; 4])]) -> Vec<Band> {
    let keep = condition.baseline_windows();
    let counted: Vec<Counts> =
        windows.iter().map(|(_, [n, n_negative, n_neutral, n_positive])| Counts { n: *n, n_negative: *n_negative, n_neutral: *n_neutral, n_positive: *n_positive, ..Counts::default() }).collect();
    let counts: Vec<&Counts> = counted.iter().collect();
    let starts: Vec<i64> = windows.iter().map(|(s, _)| *s).collect();
    (0..windows.len())
        .filter_map(|i| {
            let from = i.saturating_sub(keep);
            let baselines = Baselines { own: &counts[from..i], own_starts: &starts[from..i], start_ms: starts[i], market: &[], overlap: 1.0, slots: None };
            let reading = read(condition, metric, counts[i], &baselines);
            let usual = reading.baseline?;
            reading.threshold.is_finite().then_some(Band { window_start_ms: starts[i], usual, threshold: reading.threshold })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::detect::RuleFile;

    #[test]
    fn a_band_is_what_the_count_test_reads_and_only_where_it_can() {
        let text = "[[rules]]\nname = \"r\"\ngroup = \"topic\"\nmetric = \"neg_share\"\n[rules.condition]\nkind = \"any\"\n\
            [[rules.condition.of]]\nkind = \"binomial\"\np_value = 0.001\nbaseline_windows = 6\n\
            [[rules.condition.of]]\nkind = \"count\"\nmetric = \"n_negative\"\np_value = 1e-4\nbaseline_windows = 6\nseason = \"none\"\nmin_count = 6\nmin_ratio = 3.0\n";
        let rule = RuleFile::parse(text, "r.toml").unwrap().rules.remove(0);
        let (condition, metric) = count_test(&rule).unwrap();
        assert_eq!(metric, Metric::NNegative);
        let counts = |negative: u64| [negative + 2, negative, 2, 0];
        let windows: Vec<(i64, [u64; 4])> = (0..10).map(|i| (i * 3_600_000, counts(if i == 9 { 14 } else { 2 }))).collect();
        let bands = bands(condition, metric, &windows);
        // Three windows of history before the first band (min_slot_windows).
        assert_eq!(bands.first().map(|b| b.window_start_ms), Some(3 * 3_600_000));
        let last = bands.last().unwrap();
        assert!((last.usual - 2.0).abs() < 0.2 && last.threshold >= 6.0 && last.threshold <= 14.0, "{last:?}");
        let share_only = RuleFile::parse(&text.replace("kind = \"count\"", "kind = \"binomial\"").replace("metric = \"n_negative\"\n", ""), "r.toml");
        assert!(share_only.is_err() || count_test(&share_only.unwrap().rules[0]).is_none());
    }
}
