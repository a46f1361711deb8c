//! The review queue (`bearwatch feedback queue`, `GET /api/feedback/queue`, the dashboard's Review
//! view): the recent stories an analyst's label would be worth most on, so that their time goes
//! where it teaches the model and where it could change an alert.
//!
//! Each story not yet judged gets
//! - `uncertainty`: 1 − the margin between the model's two most likely classes, of the head it is
//!   least sure about (sentiment, or topic: 1 − its score); a label teaches most where this is high;
//! - `alert_closeness`: how near the negative count of the windows that hold it lies to the count
//!   at which the topic's rule fires (its count test, the band the chart draws): e^(−|n − level| /
//!   √level), 1 at the level; 0 where no rule draws a band. One label moves that count by one.
//! - `score` = uncertainty × (1 + 2 × alert_closeness).
//!
//! They are taken in score order within each of the model's readings (topic × sentiment), the
//! readings sharing the places in proportion to their sizes (`feedback::queue::stratified`): top
//! uncertainty alone crowds onto one boundary, and `bench loop` measured 300 labels picked this way
//! gaining more than 300 random ones where the plain score order did not. A story whose words are a
//! near-duplicate (the model's rule on words alone) or a copy of one already taken is skipped, so
//! one template does not fill the list.

use serde::{Deserialize, Serialize};

use super::{Format, SqlError, encode, run};
use crate::detect::Rule;
use crate::detect::band;
use crate::detect::rules::GroupKind;
use crate::feedback::queue::{least_sure, pick_for_review};
use crate::feedback::{Head, match_key};
use crate::news::near::NearDuplicates;
use datafusion::prelude::SessionContext;

/// Stories read as candidates, newest first, at most.
pub const MAX_CANDIDATES: usize = 20_000;
/// Judged texts read to leave out, at most (the newest).
const MAX_JUDGED: usize = 200_000;
/// Days of windows before the first one wanted, read as the count test's baseline (its four weeks
/// and a margin); `/api/bands` reads the same.
pub const BASELINE_DAYS: i64 = 35;
/// The most a queue lists.
pub const MAX_LIMIT: usize = 500;

pub struct QueueOptions {
    pub limit: usize,
    /// Stories published within this many hours of the newest one.
    pub hours: u32,
    /// The serving model's near-duplicate rule; `None`: only copies with the same words are skipped.
    pub near_duplicates: Option<NearDuplicates>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QueueItem {
    pub rank: usize,
    pub story_id: String,
    pub published_at: String,
    pub headline: String,
    pub topic: String,
    pub sentiment: String,
    pub p_negative: f32,
    pub p_neutral: f32,
    pub p_positive: f32,
    pub topic_score: f32,
    /// The head to label first: the one the model is least sure about.
    pub ask: Head,
    pub uncertainty: f32,
    pub alert_closeness: f32,
    pub score: f32,
    /// The window nearest its rule's level, when one is.
    pub window: Option<NearWindow>,
    /// Why it is on the list, in a sentence.
    pub why: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct NearWindow {
    pub rule: String,
    pub window_start: String,
    pub n_negative: u64,
    /// The count from which the rule's count test fires there.
    pub level: f64,
}

#[derive(Deserialize)]
struct Candidate {
    id: String,
    published_at: String,
    headline: String,
    topic: String,
    sentiment: String,
    p_negative: f32,
    p_neutral: f32,
    p_positive: f32,
    topic_score: f32,
}

#[derive(Deserialize)]
struct WindowRow {
    window_start: String,
    window_end: String,
    n: u64,
    n_negative: u64,
    n_neutral: u64,
    n_positive: u64,
}

fn millis(text: &str) -> Option<i64> {
    let parsed = chrono::DateTime::parse_from_rfc3339(text).or_else(|_| chrono::DateTime::parse_from_rfc3339(&format!("{text}Z")));
    parsed.ok().map(|t| t.timestamp_millis())
}

fn literal(text: &str) -> String {
    format!("'{}'", text.replace('\'', "''"))
}

fn time_literal(ms: i64) -> String {
    literal(&chrono::DateTime::from_timestamp_millis(ms).unwrap_or_default().to_rfc3339())
}

async fn rows<T: serde::de::DeserializeOwned>(ctx: &SessionContext, query: &str) -> Result<Vec<T>, SqlError> {
    let bytes = encode(&run(ctx, query).await?, Format::Json)?;
    serde_json::from_slice(&bytes).map_err(|e| SqlError::Execution(format!("review queue: {e}")))
}

/// A topic's final windows (the newest row of each, an analyst's revision included) from `from_ms`
/// on, oldest first: start, end and `[n, negative, neutral, positive]`.
pub async fn topic_windows(ctx: &SessionContext, topic: &str, from_ms: Option<i64>, to_ms: Option<i64>) -> Result<Vec<(i64, i64, [u64; 4])>, SqlError> {
    let mut conditions = vec![format!("topic = {}", literal(topic)), "ticker IS NULL".to_string(), "final".to_string()];
    if let Some(from) = from_ms {
        conditions.push(format!("window_start >= {}", time_literal(from)));
    }
    if let Some(to) = to_ms {
        conditions.push(format!("window_start < {}", time_literal(to)));
    }
    let query = format!(
        "SELECT window_start, window_end, n, n_negative, n_neutral, n_positive FROM (SELECT *, row_number() OVER (PARTITION BY window_start ORDER BY updated_at DESC) AS r \
         FROM windows WHERE {}) WHERE r = 1 ORDER BY window_start",
        conditions.join(" AND ")
    );
    let found: Vec<WindowRow> = rows(ctx, &query).await?;
    Ok(found.iter().filter_map(|r| Some((millis(&r.window_start)?, millis(&r.window_end)?, [r.n, r.n_negative, r.n_neutral, r.n_positive]))).collect())
}

/// How near `count` lies to `level`: 1 at it, falling by e for each √level away.
fn closeness(count: u64, level: f64) -> f32 {
    (-(count as f64 - level).abs() / level.max(1.0).sqrt()).exp() as f32
}

/// The queue over the tables of `ctx`, ranked as the module says, for the topic rules of `rules`.
pub async fn review_queue(ctx: &SessionContext, rules: &[Rule], options: &QueueOptions) -> Result<Vec<QueueItem>, SqlError> {
    #[derive(Deserialize)]
    struct Newest {
        newest: Option<String>,
    }
    let newest: Vec<Newest> = rows(ctx, "SELECT CAST(max(published_at) AS VARCHAR) AS newest FROM news").await?;
    let Some(newest) = newest.first().and_then(|n| n.newest.as_deref()).and_then(millis) else { return Ok(Vec::new()) };
    let horizon = newest - i64::from(options.hours) * 3_600_000;
    let candidates: Vec<Candidate> = rows(
        ctx,
        &format!(
            "SELECT id, published_at, headline, topic, sentiment, p_negative, p_neutral, p_positive, topic_score FROM \
             (SELECT *, row_number() OVER (PARTITION BY id ORDER BY ingested_at DESC) AS r FROM news WHERE published_at >= {}) \
             WHERE r = 1 ORDER BY published_at DESC, id LIMIT {MAX_CANDIDATES}",
            time_literal(horizon)
        ),
    )
    .await?;
    #[derive(Deserialize)]
    struct Judged {
        text: String,
        story_id: Option<String>,
    }
    let judged: Vec<Judged> = rows(ctx, &format!("SELECT text, story_id FROM label_feedback ORDER BY created_at DESC LIMIT {MAX_JUDGED}")).await?;
    let judged_keys: std::collections::HashSet<String> = judged.iter().map(|j| match_key(&j.text)).collect();
    let judged_ids: std::collections::HashSet<&str> = judged.iter().filter_map(|j| j.story_id.as_deref()).collect();

    // Per topic: each window's level and count, from the topic rule's count test.
    let test = rules.iter().filter(|r| r.group == GroupKind::Topic).find_map(|r| Some((r, band::count_test(r)?)));
    let mut levels: std::collections::HashMap<String, Vec<(i64, i64, u64, f64)>> = std::collections::HashMap::new();
    if let Some((_, (condition, metric))) = test {
        let mut topics: Vec<String> = candidates.iter().map(|c| c.topic.clone()).collect();
        topics.sort_unstable();
        topics.dedup();
        for topic in topics {
            let windows = topic_windows(ctx, &topic, Some(horizon - BASELINE_DAYS * 86_400_000), None).await?;
            let counts: Vec<(i64, [u64; 4])> = windows.iter().map(|(s, _, c)| (*s, *c)).collect();
            let bands = band::bands(condition, metric, &counts);
            let by_start: std::collections::HashMap<i64, f64> = bands.iter().map(|b| (b.window_start_ms, b.threshold)).collect();
            let near = windows.iter().filter_map(|(s, e, c)| Some((*s, *e, c[1], *by_start.get(s)?))).filter(|(_, e, _, _)| *e > horizon).collect();
            levels.insert(topic, near);
        }
    }
    let rule_name = test.map(|(r, _)| r.name.clone()).unwrap_or_default();

    let mut scored: Vec<QueueItem> = candidates
        .into_iter()
        .filter(|c| !judged_ids.contains(c.id.as_str()) && !judged_keys.contains(&match_key(&c.headline)))
        .filter_map(|c| {
            let published = millis(&c.published_at)?;
            let (ask, uncertainty): (Head, f32) = least_sure([c.p_negative, c.p_neutral, c.p_positive], c.topic_score);
            let nearest = levels
                .get(c.topic.as_str())
                .into_iter()
                .flatten()
                .filter(|(s, e, _, _)| *s <= published && published < *e)
                .map(|&(s, _, n, level)| (closeness(n, level), s, n, level))
                .max_by(|a, b| a.0.total_cmp(&b.0));
            let alert_closeness = nearest.map_or(0.0, |n| n.0);
            let score = uncertainty * (1.0 + 2.0 * alert_closeness);
            let window = nearest.map(|(_, s, n, level)| NearWindow {
                rule: rule_name.clone(),
                window_start: chrono::DateTime::from_timestamp_millis(s).unwrap_or_default().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                n_negative: n,
                level,
            });
            let why = match &window {
                Some(w) if alert_closeness >= 0.2 => format!(
                    "the model is unsure of its {} ({:.0} % uncertain), and its window of {} holds {} negative where {} fires from {:.1}",
                    ask.name(),
                    100.0 * uncertainty,
                    w.window_start,
                    w.n_negative,
                    w.rule,
                    w.level
                ),
                _ => format!("the model is unsure of its {} ({:.0} % uncertain)", ask.name(), 100.0 * uncertainty),
            };
            let item = QueueItem {
                rank: 0,
                story_id: c.id,
                published_at: c.published_at,
                headline: c.headline,
                topic: c.topic,
                sentiment: c.sentiment,
                p_negative: c.p_negative,
                p_neutral: c.p_neutral,
                p_positive: c.p_positive,
                topic_score: c.topic_score,
                ask,
                uncertainty,
                alert_closeness,
                score,
                window,
                why,
            };
            Some(item)
        })
        .collect();
    scored.sort_by(|a, b| b.score.total_cmp(&a.score).then_with(|| a.story_id.cmp(&b.story_id)));
    let headlines: Vec<&str> = scored.iter().map(|item| item.headline.as_str()).collect();
    let readings: Vec<(&str, &str)> = scored.iter().map(|item| (item.topic.as_str(), item.sentiment.as_str())).collect();
    let picked = pick_for_review(&headlines, &readings, options.limit.min(MAX_LIMIT), options.near_duplicates);
    let mut items: Vec<Option<QueueItem>> = scored.into_iter().map(Some).collect();
    let queue: Vec<QueueItem> = picked
        .into_iter()
        .enumerate()
        .filter_map(|(rank, i)| items[i].take().map(|item| QueueItem { rank: rank + 1, ..item }))
        .collect();
    Ok(queue)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closeness_is_highest_at_the_level() {
        assert_eq!(closeness(9, 9.0), 1.0);
        assert!(closeness(8, 9.0) > closeness(5, 9.0) && closeness(5, 9.0) > closeness(0, 9.0));
        assert!(closeness(12, 9.0) < 1.0);
    }
}
