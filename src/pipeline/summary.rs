//! The short live summary `bearwatch run` prints, and the table at the end of a bounded run.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::time::Instant;

use crate::news::ScoredNews;
use super::core::Counters;
use crate::window::{ALL, WindowState};

/// Per-topic totals of this run, and the newest event time.
#[derive(Default)]
pub struct Recent {
    topics: BTreeMap<String, (u64, u64)>,
    newest_event_ms: Option<i64>,
}

impl Recent {
    pub fn observe(&mut self, row: &ScoredNews) {
        let entry = self.topics.entry(row.scores.topic.clone()).or_default();
        entry.0 += 1;
        if row.scores.sentiment == "negative" {
            entry.1 += 1;
        }
        self.newest_event_ms = Some(self.newest_event_ms.map_or(row.published_ms, |t| t.max(row.published_ms)));
    }
}

fn date(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms).map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M").to_string())
}

/// One line: progress, rates, problems, and the most negative topic in the newest windows.
pub fn live_line(counters: &Counters, start: (Instant, u64), windows: &WindowState, recent: &Recent, position: &str) -> String {
    let elapsed = start.0.elapsed().as_secs_f64().max(1e-3);
    let rate = (counters.scored - start.1) as f64 / elapsed;
    let mut line = format!(
        "{:>7} scored  {:>6.0}/s  event time {}  dead-letter {}  late {}  dup {}  open windows {}",
        counters.scored,
        rate,
        recent.newest_event_ms.map_or_else(|| "-".into(), date),
        counters.dead_lettered,
        counters.late,
        counters.duplicates,
        windows.open_windows(),
    );
    // The most negative topic among the open windows with enough stories to mean something (the
    // newest alone is minutes old when windows start hourly), if any of them has a negative story.
    let worst = windows
        .open_counts()
        .filter(|(k, c)| k.topic != ALL && k.ticker.is_none() && c.n >= 5 && c.n_negative > 0)
        .max_by(|a, b| a.1.neg_share().total_cmp(&b.1.neg_share()));
    if let Some((key, counts)) = worst {
        let _ = write!(line, "  most negative now: {} {:.0}% of {}", key.topic, counts.neg_share() * 100.0, counts.n);
    }
    let _ = write!(line, "  [{position}]");
    line
}

/// Per-topic table for the end of a run, most negative first.
pub fn final_table(recent: &Recent) -> String {
    let mut rows: Vec<(&String, &(u64, u64))> = recent.topics.iter().collect();
    rows.sort_by(|a, b| {
        let share = |(n, neg): &(u64, u64)| *neg as f64 / (*n).max(1) as f64;
        share(b.1).total_cmp(&share(a.1)).then(a.0.cmp(b.0))
    });
    let mut out = format!("{:<22} {:>8} {:>10} {:>9}\n", "topic", "stories", "negative", "share");
    for (topic, (n, neg)) in rows {
        let _ = writeln!(out, "{topic:<22} {n:>8} {neg:>10} {:>8.1}%", *neg as f64 * 100.0 / (*n).max(1) as f64);
    }
    out
}
