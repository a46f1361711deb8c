//! Stored stories through windows and rules again, as the pipeline counted and judged them live:
//! one event-time clock, [`WindowState::due`] after each story, every window closed at the end.
//! `bearwatch model compare` replays the champion's and a challenger's scores of the same stories;
//! `bearwatch rules backtest` replays stored stories through other rules.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{Alert, AlertState, Detector};
use crate::news::near::Reading;
use crate::window::{Counted, Folding, Headline, WindowSpec, WindowState};

/// A scored story as the windows count it.
#[derive(Debug, Clone, PartialEq)]
pub struct Story {
    pub id: String,
    pub published_ms: i64,
    pub headline: String,
    pub topic: String,
    pub tickers: Vec<String>,
    pub sentiment: String,
    pub sentiment_score: f32,
    pub p_negative: f32,
}

impl Story {
    /// The model's reading, as copies are matched by: p_positive is the score plus p_negative.
    fn reading(&self) -> Reading {
        let p_positive = (self.sentiment_score + self.p_negative).clamp(0.0, 1.0);
        let p_neutral = (1.0 - self.p_negative - p_positive).max(0.0);
        Reading { sentiment: [self.p_negative, p_neutral, p_positive], topic: self.topic.clone() }
    }
}

/// The alert changes (firing, resolved) the rules of `detector` make on `stories`, replayed in
/// event-time order (ties by id) with the rules seeing live rows every `every_ms` of event time.
pub fn replay(spec: WindowSpec, folding: Option<Folding>, detector: &mut Detector, every_ms: i64, stories: &[Story]) -> Vec<Alert> {
    replay_timed(spec, folding, detector, every_ms, stories).into_iter().map(|(_, alert)| alert).collect()
}

/// [`replay`], with the newest story time the pipeline had read when each change was made: an
/// alert's own times follow the watermark, which trails the stories by the allowed lateness.
pub fn replay_timed(spec: WindowSpec, folding: Option<Folding>, detector: &mut Detector, every_ms: i64, stories: &[Story]) -> Vec<(i64, Alert)> {
    let mut ordered: Vec<&Story> = stories.iter().collect();
    ordered.sort_by(|a, b| (a.published_ms, &a.id).cmp(&(b.published_ms, &b.id)));
    let mut windows = WindowState::new(spec);
    windows.fold_copies(folding);
    let mut alerts = Vec::new();
    let mut newest = i64::MIN;
    for story in ordered {
        newest = newest.max(story.published_ms);
        let headline = Headline::kept(&story.id, &story.headline, story.p_negative);
        let cluster = windows.cluster_of(story.published_ms, &story.headline, &story.reading());
        let counted = Counted {
            event_ms: story.published_ms,
            topic: story.topic.clone(),
            tickers: story.tickers.clone(),
            sentiment: story.sentiment.clone(),
            sentiment_score: story.sentiment_score,
            story: headline,
            cluster,
        };
        windows.add(&counted);
        windows.advance("replay", story.published_ms);
        let (closed, live) = windows.due(every_ms, story.published_ms);
        let watermark = windows.watermark_ms().unwrap_or(0);
        alerts.extend(detector.evaluate(&closed, watermark).into_iter().map(|a| (newest, a)));
        alerts.extend(detector.evaluate(&live, watermark).into_iter().map(|a| (newest, a)));
    }
    let closed = windows.close_all(0);
    let watermark = windows.watermark_ms().unwrap_or(0);
    alerts.extend(detector.evaluate(&closed, watermark).into_iter().map(|a| (newest, a)));
    alerts
}

/// One alert from firing to resolved (or still firing when the stories end).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Episode {
    pub alert_id: String,
    pub rule: String,
    /// `topic=earnings`, `ticker=AAPL`...
    pub group: String,
    pub labels: BTreeMap<String, String>,
    pub started_at: String,
    pub resolved_at: Option<String>,
    /// The metric when it fired, and over how many stories.
    pub value: f64,
    pub count: u64,
    pub summary: String,
}

impl Episode {
    /// From firing to resolved, in event-time milliseconds; `i64::MAX` while still firing.
    pub fn span_ms(&self) -> (i64, i64) {
        let ms = |t: &str| chrono::DateTime::parse_from_rfc3339(t).map_or(i64::MAX, |t| t.timestamp_millis());
        (ms(&self.started_at), self.resolved_at.as_deref().map_or(i64::MAX, ms))
    }

    /// Whether it was firing at some time from `from_ms` to `to_ms` (both included).
    pub fn overlaps(&self, from_ms: i64, to_ms: i64) -> bool {
        let (start, end) = self.span_ms();
        start <= to_ms && from_ms <= end
    }
}

/// The episodes of a replay's alert changes, in the order they fired.
pub fn episodes(alerts: Vec<Alert>) -> Vec<Episode> {
    let mut by_id: BTreeMap<String, Episode> = BTreeMap::new();
    let mut order = Vec::new();
    for alert in alerts {
        match alert.state {
            AlertState::Firing => {
                order.push(alert.alert_id.clone());
                let labels = alert.match_labels();
                by_id.insert(
                    alert.alert_id.clone(),
                    Episode {
                        group: alert.group.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","),
                        alert_id: alert.alert_id,
                        rule: alert.rule,
                        labels,
                        started_at: alert.started_at,
                        resolved_at: None,
                        value: alert.value,
                        count: alert.count,
                        summary: alert.summary,
                    },
                );
            }
            AlertState::Resolved => {
                if let Some(episode) = by_id.get_mut(&alert.alert_id) {
                    episode.resolved_at = alert.resolved_at;
                }
            }
        }
    }
    order.into_iter().filter_map(|id| by_id.remove(&id)).collect()
}
