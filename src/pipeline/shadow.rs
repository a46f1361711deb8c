//! A challenger scoring the live stream beside the champion (`bearwatch model shadow`): every story
//! the champion scores is also given to the challenger, and its scores go to the `shadow_news`
//! table, never to the windows, the alerts or the offsets. `bearwatch model compare` replays both.
//! A shadow never holds the champion up: its results are collected as they finish, and a story
//! that finds [`Shadow::max_pending`] stories still waiting is skipped (and counted).

use std::collections::VecDeque;

use crate::classify::{Classifier, Pending};
use crate::news::{News, ScoredNews};

pub struct Shadow {
    classifier: Classifier,
    /// The folder it was loaded from, as the `challenger` alias names it.
    pub path: String,
    pending: VecDeque<(News, i64, Pending)>,
    rows: Vec<ScoredNews>,
    max_pending: usize,
}

impl Shadow {
    pub fn new(classifier: Classifier, path: String, max_pending: usize) -> Shadow {
        Shadow { classifier, path, pending: VecDeque::new(), rows: Vec::new(), max_pending: max_pending.max(1) }
    }

    pub fn model(&self) -> &str {
        self.classifier.spec().id()
    }

    /// Gives the challenger the text the champion read.
    pub fn submit(&mut self, news: &News, published_ms: i64, text: &str) {
        if self.pending.len() >= self.max_pending {
            metrics::counter!("bearwatch_shadow_stories_total", "outcome" => "skipped").increment(1);
            return;
        }
        match self.classifier.submit_now(text) {
            Ok(pending) => self.pending.push_back((news.clone(), published_ms, pending)),
            Err(e) => {
                tracing::warn!(error = %e, id = %news.id, "the shadow model could not take the story");
                metrics::counter!("bearwatch_shadow_stories_total", "outcome" => "failed").increment(1);
            }
        }
    }

    /// Moves the challenger's finished scores, in arrival order, into rows for `shadow_news`.
    pub fn collect(&mut self) {
        while let Some((_, _, pending)) = self.pending.front_mut() {
            let Some(result) = pending.try_scores() else { break };
            let (news, published_ms, _) = self.pending.pop_front().expect("front exists");
            match result {
                Ok(scores) => {
                    let now = chrono::Utc::now();
                    metrics::counter!("bearwatch_shadow_stories_total", "outcome" => "scored").increment(1);
                    self.rows.push(ScoredNews {
                        news,
                        scores,
                        ingested_at: now.to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
                        kafka_partition: None,
                        kafka_offset: None,
                        published_ms,
                        ingested_ms: now.timestamp_millis(),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, id = %news.id, "the shadow model failed on a story");
                    metrics::counter!("bearwatch_shadow_stories_total", "outcome" => "failed").increment(1);
                }
            }
        }
    }

    /// Waits for the stories still being scored (at most [`Shadow::max_pending`]), giving up at
    /// `deadline`: the end of a run keeps the shadow's tail.
    pub fn finish(&mut self, deadline: Option<std::time::Instant>) {
        loop {
            self.collect();
            if self.pending.is_empty() || deadline.is_some_and(|d| std::time::Instant::now() >= d) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    /// The rows collected since the last call (written at each checkpoint; stories still being
    /// scored then come with a later one, or are lost with the process: a shadow is a measurement,
    /// not state).
    pub fn take_rows(&mut self) -> Vec<ScoredNews> {
        self.collect();
        std::mem::take(&mut self.rows)
    }
}
