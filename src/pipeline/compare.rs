//! `bearwatch model compare`: the alert episodes a challenger scoring in shadow would have raised,
//! next to the champion's, on the same stories. Both sides are replayed from the tables (`news`
//! and `shadow_news`, the stories both scored) through the pipeline's own windows and rules
//! (`detect::replay`), so the champion's side is what the pipeline raised on them. Analysts'
//! corrections are left out on both sides: this compares models.

use std::collections::BTreeSet;

use datafusion::prelude::{col, lit};
use serde::Serialize;

use super::backtest::{newest, tables, time};
use crate::sql::lookup::timestamp;
use super::{PipelineConfig, PipelineError};
use crate::detect::Detector;
use crate::detect::replay::{Episode, Story, episodes, replay};
use crate::window::WindowSpec;

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The models that scored the stories in `news` (more than one across a swap).
    pub champion: Vec<String>,
    pub challenger: String,
    pub stories: usize,
    pub first: String,
    pub last: String,
    pub sentiment_agrees: usize,
    pub topic_agrees: usize,
    pub champion_episodes: Vec<Episode>,
    pub challenger_episodes: Vec<Episode>,
}

/// Compares the newest challenger in `shadow_news` (or `challenger`) with the champion's scores of
/// the same stories, under the pipeline's `[window]` and `[alerts]`.
pub fn compare(config: &PipelineConfig, challenger: Option<&str>) -> Result<Comparison, PipelineError> {
    if config.alerts.rules.is_empty() {
        return Err(PipelineError::Usage("the pipeline has no [alerts] rules to compare the models' episodes with".into()));
    }
    let rules = super::backtest::load_rules(&config.alerts.rules)?.rules;
    let storage = config.storage.path.display();
    let (runtime, ctx) = tables(config)?;
    let shadow = runtime.block_on(crate::sql::lookup::scored_stories(&ctx, "shadow_news", lit(true)))?;
    let Some(model) = challenger.map(str::to_string).or_else(|| shadow.last().map(|(model, _)| model.clone())) else {
        return Err(PipelineError::Usage(format!(
            "{}: no shadow_news rows; set a challenger with `bearwatch model shadow DIR --storage {}` while a pipeline runs",
            storage, storage
        )));
    };
    let shadow = newest(shadow.into_iter().filter(|(m, _)| *m == model).collect());
    let (Some(first), Some(last)) =
        (shadow.values().map(|(_, s)| s.published_ms).min(), shadow.values().map(|(_, s)| s.published_ms).max())
    else {
        return Err(PipelineError::Usage(format!("{}: no shadow_news rows of {model}", storage)));
    };
    let window = col("published_at").between(timestamp(first), timestamp(last));
    let news = newest(runtime.block_on(crate::sql::lookup::scored_stories(&ctx, "news", window))?);
    let both: Vec<(&(String, Story), &(String, Story))> = news.iter().filter_map(|(id, old)| shadow.get(id).map(|new| (old, new))).collect();

    let champion: BTreeSet<String> = both.iter().map(|(old, _)| old.0.clone()).collect();
    let old: Vec<Story> = both.iter().map(|(old, _)| old.1.clone()).collect();
    let new: Vec<Story> = both.iter().map(|(_, new)| new.1.clone()).collect();
    let spec = WindowSpec::from_config(&config.window);
    let every = config.alerts.evaluate_every.as_millis();
    Ok(Comparison {
        champion: champion.into_iter().collect(),
        challenger: model,
        stories: both.len(),
        first: time(first),
        last: time(last),
        sentiment_agrees: old.iter().zip(&new).filter(|(a, b)| a.sentiment == b.sentiment).count(),
        topic_agrees: old.iter().zip(&new).filter(|(a, b)| a.topic == b.topic).count(),
        champion_episodes: episodes(replay(spec, super::stored_folding(config), &mut Detector::new(rules.clone()), every, &old)),
        challenger_episodes: episodes(replay(spec, super::stored_folding(config), &mut Detector::new(rules), every, &new)),
    })
}

impl Comparison {
    /// Side by side: episodes of the same rule and group whose times overlap share a line.
    pub fn render(&self) -> String {
        use std::fmt::Write as _;
        let share = |n: usize| if self.stories == 0 { 0.0 } else { 100.0 * n as f64 / self.stories as f64 };
        let mut out = format!(
            "champion {} against challenger {} on the {} stories both scored ({} to {}): sentiment agrees on {} ({:.1} %), topic on {} ({:.1} %)\n\n",
            self.champion.join(" + "),
            self.challenger,
            self.stories,
            self.first,
            self.last,
            self.sentiment_agrees,
            share(self.sentiment_agrees),
            self.topic_agrees,
            share(self.topic_agrees)
        );
        out.push_str("| rule | group | champion | challenger |\n|---|---|---|---|\n");
        let overlap = |a: &Episode, b: &Episode| {
            let (start, end) = b.span_ms();
            a.rule == b.rule && a.group == b.group && a.overlaps(start, end)
        };
        let cell = |e: &Episode| format!("{} → {} ({:.2} over {})", e.started_at, e.resolved_at.as_deref().unwrap_or("firing"), e.value, e.count);
        let mut matched = BTreeSet::new();
        let mut both = 0;
        for a in &self.champion_episodes {
            let partner = self.challenger_episodes.iter().enumerate().find(|(i, b)| !matched.contains(i) && overlap(a, b));
            let right = match partner {
                Some((i, b)) => {
                    matched.insert(i);
                    both += 1;
                    cell(b)
                }
                None => "—".into(),
            };
            let _ = writeln!(out, "| {} | {} | {} | {} |", a.rule, a.group, cell(a), right);
        }
        for (_, b) in self.challenger_episodes.iter().enumerate().filter(|(i, _)| !matched.contains(i)) {
            let _ = writeln!(out, "| {} | {} | — | {} |", b.rule, b.group, cell(b));
        }
        let _ = writeln!(
            out,
            "\nEpisodes: champion {}, challenger {}; in both {}, champion only {}, challenger only {}.",
            self.champion_episodes.len(),
            self.challenger_episodes.len(),
            both,
            self.champion_episodes.len() - both,
            self.challenger_episodes.len() - both
        );
        out
    }
}
