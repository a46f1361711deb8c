//! Stored stories through windows and rules again, as the pipeline counted and judged them live:
//! one event-time clock, [`WindowState::due`] after each story, every window closed at the end.
//! `bearwatch model compare` replays the champion's and a challenger's scores of the same stories.

use super::{Alert, Detector};
use crate::window::{Headline, WindowSpec, WindowState};

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

/// The alert changes (firing, resolved) the rules of `detector` make on `stories`, replayed in
/// event-time order (ties by id) with the rules seeing live rows every `every_ms` of event time.
pub fn replay(spec: WindowSpec, mut detector: Detector, every_ms: i64, stories: &[Story]) -> Vec<Alert> {
    let mut ordered: Vec<&Story> = stories.iter().collect();
    ordered.sort_by(|a, b| (a.published_ms, &a.id).cmp(&(b.published_ms, &b.id)));
    let mut windows = WindowState::new(spec);
    let mut alerts = Vec::new();
    for story in ordered {
        let headline = Headline { id: story.id.clone(), headline: story.headline.clone(), p_negative: story.p_negative, why: vec![] };
        windows.add(story.published_ms, &story.topic, &story.tickers, &story.sentiment, story.sentiment_score, &headline);
        windows.advance("replay", story.published_ms);
        let (closed, live) = windows.due(every_ms, story.published_ms);
        let watermark = windows.watermark_ms().unwrap_or(0);
        alerts.extend(detector.evaluate(&closed, watermark));
        alerts.extend(detector.evaluate(&live, watermark));
    }
    let closed = windows.close_all(0);
    let watermark = windows.watermark_ms().unwrap_or(0);
    alerts.extend(detector.evaluate(&closed, watermark));
    alerts
}
