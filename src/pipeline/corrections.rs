//! Corrections act at once (issue 16): what analysts say about a label changes what the windows
//! count, without a restart and without losing a story.
//!
//! - Every story scored from now on asks the [`Memory`]: a story whose headline an analyst labelled,
//!   or a near-duplicate of it, counts with the analyst's label.
//! - A new judgement re-counts the stories already in windows that are open or still kept closed
//!   (the judged story and any other with the same headline): open windows show it in their next live
//!   rows, closed ones get a revised final row.
//! - `news` keeps the model's scores; `applied_labels` says which stories count another label, and
//!   why (the judged story, the same text, or a near-duplicate and how many words it shares).
//!
//! An analyst's label counts with full confidence: sentiment score −1, 0 or 1, and p_negative 1 or 0
//! for the window's most negative headlines.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::PipelineError;
use crate::classify::{Classifier, ClassifyError};
use crate::classify::NearDuplicates;
use crate::feedback::{Action, AppliedLabel, FeedbackConfig, Head, JournalTail, LabelFeedback, Match, Memory, Query, Reading, match_key, text_hash, words};
use crate::news::Scores;
use crate::window::{Counted, Headline, WindowRow, WindowState};

/// How often the journal folder is listed for new judgements.
const POLL_EVERY: Duration = Duration::from_millis(250);
/// Judged texts classified per round trip.
const READ_CHUNK: usize = 32;

/// A story in the windows, with the model's labels and any analyst's, so either can be counted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tracked {
    /// As the windows count it now.
    pub counted: Counted,
    /// SHA-256 of the headline, as `label_feedback.text_hash` has it.
    pub text_hash: String,
    /// [`match_key`] of the headline.
    pub key: String,
    pub model: String,
    pub model_sentiment: String,
    pub model_sentiment_score: f32,
    pub model_p_negative: f32,
    pub model_topic: String,
    pub sentiment_label: Option<String>,
    pub topic_label: Option<String>,
}

impl Tracked {
    pub fn new(event_ms: i64, tickers: Vec<String>, story: Headline, scores: &Scores) -> Tracked {
        let headline = story.headline.trim();
        let (text_hash, key) = (text_hash(headline), match_key(headline));
        let counted = Counted {
            event_ms,
            topic: scores.topic.clone(),
            tickers,
            sentiment: scores.sentiment.to_string(),
            sentiment_score: scores.sentiment_score,
            story,
        };
        Tracked {
            counted,
            text_hash,
            key,
            model: scores.model.to_string(),
            model_sentiment: scores.sentiment.to_string(),
            model_sentiment_score: scores.sentiment_score,
            model_p_negative: scores.p_negative,
            model_topic: scores.topic.clone(),
            sentiment_label: None,
            topic_label: None,
        }
    }

    fn label(&mut self, head: Head) -> &mut Option<String> {
        match head {
            Head::Sentiment => &mut self.sentiment_label,
            Head::Topic => &mut self.topic_label,
        }
    }

    fn model_label(&self, head: Head) -> &str {
        match head {
            Head::Sentiment => &self.model_sentiment,
            Head::Topic => &self.model_topic,
        }
    }

    /// How the windows count it with its current labels.
    fn effective(&self) -> Counted {
        let mut counted = self.counted.clone();
        counted.topic = self.topic_label.clone().unwrap_or_else(|| self.model_topic.clone());
        match self.sentiment_label.as_deref() {
            Some(label) => {
                counted.sentiment = label.to_string();
                counted.sentiment_score = match label {
                    "negative" => -1.0,
                    "positive" => 1.0,
                    _ => 0.0,
                };
                counted.story.p_negative = if label == "negative" { 1.0 } else { 0.0 };
            }
            None => {
                counted.sentiment = self.model_sentiment.clone();
                counted.sentiment_score = self.model_sentiment_score;
                counted.story.p_negative = self.model_p_negative;
            }
        }
        counted
    }

    fn applied(&self, head: Head, label: Option<String>, feedback_id: &str, matched: Match) -> AppliedLabel {
        AppliedLabel {
            story_id: self.counted.story.id.clone(),
            text_hash: self.text_hash.clone(),
            head,
            model: self.model.clone(),
            model_label: self.model_label(head).to_string(),
            label,
            feedback_id: feedback_id.to_string(),
            matched,
            applied_at: chrono::Utc::now(),
        }
    }
}

pub struct Corrections {
    memory: Memory,
    tail: JournalTail,
    /// Stories whose windows can still be revised, by id, oldest first in `order`.
    tracked: HashMap<String, Tracked>,
    order: VecDeque<String>,
    /// Story ids by match key, to find every story a judgement of a text applies to.
    by_key: HashMap<String, Vec<String>>,
    capacity: usize,
    pub revise_windows: usize,
    /// Rows for `applied_labels`, written at the next checkpoint.
    pub applied: Vec<AppliedLabel>,
    last_poll: Option<Instant>,
}

impl Corrections {
    /// `near_duplicates`: the model's rule, or `None` for exact matches only.
    pub fn new(config: &FeedbackConfig, storage: &std::path::Path, near_duplicates: Option<NearDuplicates>) -> Corrections {
        Corrections {
            memory: Memory::new(near_duplicates, config.remember),
            tail: JournalTail::new(storage),
            tracked: HashMap::new(),
            order: VecDeque::new(),
            by_key: HashMap::new(),
            capacity: config.revise_stories,
            revise_windows: config.revise_windows,
            applied: Vec::new(),
            last_poll: None,
        }
    }

    /// What the checkpoint keeps, oldest first.
    pub fn tracked(&self) -> Vec<Tracked> {
        self.order.iter().filter_map(|id| self.tracked.get(id)).cloned().collect()
    }

    /// Gives a story just scored the labels analysts gave its text or a near-duplicate of it, and
    /// returns how the windows count it.
    pub fn label(&mut self, tracked: &mut Tracked, scores: &Scores) -> Counted {
        let (words, reading) = (words(&tracked.counted.story.headline), Reading::of(scores));
        for (head, correction, matched) in self.memory.lookup(&Query { key: &tracked.key, words: &words, reading: &reading }) {
            *tracked.label(head) = Some(correction.label.clone());
            self.applied.push(tracked.applied(head, Some(correction.label), &correction.feedback_id, matched));
            metrics::counter!("bearwatch_feedback_applied_total", "matched" => matched.name()).increment(1);
        }
        tracked.counted = tracked.effective();
        tracked.counted.clone()
    }

    /// Keeps a story that the windows counted, forgetting the oldest beyond `revise_stories`.
    pub fn track(&mut self, tracked: Tracked) {
        if self.capacity == 0 {
            return;
        }
        let id = tracked.counted.story.id.clone();
        if !self.tracked.contains_key(&id) {
            self.by_key.entry(tracked.key.clone()).or_default().push(id.clone());
            self.order.push_back(id.clone());
        }
        self.tracked.insert(id, tracked);
        while self.order.len() > self.capacity {
            let Some(oldest) = self.order.pop_front() else { break };
            if let Some(gone) = self.tracked.remove(&oldest)
                && let Some(ids) = self.by_key.get_mut(&gone.key)
            {
                ids.retain(|i| *i != oldest);
                if ids.is_empty() {
                    self.by_key.remove(&gone.key);
                }
            }
        }
    }

    /// New journal rows, at most every [`POLL_EVERY`].
    pub fn due_rows(&mut self) -> Result<Vec<LabelFeedback>, PipelineError> {
        if self.last_poll.is_some_and(|t| t.elapsed() < POLL_EVERY) {
            return Ok(Vec::new());
        }
        self.last_poll = Some(Instant::now());
        self.tail.new_rows().map_err(|e| PipelineError::Internal(format!("reading label_feedback: {e}")))
    }

    /// Learns judgements (oldest first) and re-counts the stories they apply to. Returns the revised
    /// final rows of closed windows. `classifier` reads the judged texts for near-duplicate
    /// matching; nothing may be in flight on it.
    pub fn learn(
        &mut self,
        rows: Vec<LabelFeedback>,
        classifier: Option<&Classifier>,
        windows: &mut WindowState,
        now_ms: i64,
    ) -> Result<Vec<WindowRow>, PipelineError> {
        let readings = self.read(&rows, classifier)?;
        let mut revised = Vec::new();
        for (row, reading) in rows.iter().zip(readings) {
            self.memory.learn(row, reading);
            let mut ids: Vec<String> = self.by_key.get(&match_key(&row.text)).cloned().unwrap_or_default();
            if let Some(story) = &row.story_id
                && !ids.contains(story)
            {
                ids.push(story.clone());
            }
            for id in ids {
                let Some(tracked) = self.tracked.get_mut(&id) else { continue };
                let label = match &row.analyst_label {
                    Some(label) if row.action != Action::Unsure => Some(label.clone()),
                    _ => None,
                };
                if *tracked.label(row.head) == label {
                    continue;
                }
                *tracked.label(row.head) = label.clone();
                let was = tracked.counted.clone();
                let now = tracked.effective();
                revised.extend(windows.relabel(&was, &now, now_ms));
                tracked.counted = now;
                let matched = if row.story_id.as_deref() == Some(id.as_str()) { Match::Story } else { Match::Exact };
                self.applied.push(tracked.applied(row.head, label, &row.feedback_id, matched));
                metrics::counter!("bearwatch_feedback_applied_total", "matched" => matched.name()).increment(1);
            }
        }
        metrics::gauge!("bearwatch_feedback_memory_texts").set(self.memory.len() as f64);
        // One row per window: the last revision of this round.
        let mut newest: std::collections::BTreeMap<_, WindowRow> = std::collections::BTreeMap::new();
        for row in revised {
            newest.insert(row.key.clone(), row);
        }
        Ok(newest.into_values().collect())
    }

    /// The model's reading of each row's text, when near-duplicates are matched.
    fn read(&self, rows: &[LabelFeedback], classifier: Option<&Classifier>) -> Result<Vec<Option<Reading>>, PipelineError> {
        let mut out: Vec<Option<Reading>> = vec![None; rows.len()];
        let Some(classifier) = classifier.filter(|_| self.memory.wants_readings()) else { return Ok(out) };
        let indices: Vec<usize> = (0..rows.len()).collect();
        for chunk in indices.chunks(READ_CHUNK) {
            let mut pending = Vec::with_capacity(chunk.len());
            for &i in chunk {
                match classifier.submit_now(&rows[i].text) {
                    Ok(p) => pending.push((i, p)),
                    // A text the tokenizer refuses still works by exact match.
                    Err(ClassifyError::Tokenize(_) | ClassifyError::EmptyText) => {}
                    Err(e) => return Err(PipelineError::Classify(e)),
                }
            }
            for (i, p) in pending {
                out[i] = Some(Reading::of(&p.wait().map_err(PipelineError::Classify)?));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests;
