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

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::PipelineError;
use crate::classify::{Classifier, ClassifyError};
use crate::classify::NearDuplicates;
use crate::feedback::{Action, AppliedLabel, FeedbackConfig, Head, JournalTail, LabelFeedback, Match, Memory, Query, Reading, match_key, near_words, text_hash};
use crate::news::Scores;
use crate::window::{Counted, Headline, WindowRow, WindowState};

/// How often the journal folder is listed for new judgements: a local folder often; object storage
/// every 2 s, since each listing is a request that costs a round trip (and, on AWS, money), and a
/// judgement reaching the windows within 2 s is soon enough.
const POLL_EVERY: Duration = Duration::from_millis(250);
const POLL_EVERY_ON_OBJECT_STORAGE: Duration = Duration::from_secs(2);
/// Judged texts classified per round trip.
const READ_CHUNK: usize = 32;
/// Stories re-counted per round at most: a judgement of a text that thousands of kept stories share
/// finishes over several rounds, with scoring and checkpoints in between, instead of holding the
/// pipeline (and its memory) for all of them at once.
pub const RECOUNT_PER_ROUND: usize = 2_000;

/// The newest judgement of one text and head, not yet carried to every kept story with that text.
#[derive(Debug, Clone)]
struct Pending {
    label: Option<String>,
    feedback_id: String,
    story_id: Option<String>,
}

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
    /// `headline` whole: the windows keep it cut short ([`Headline::kept`]), but its hash and match
    /// key are of all of it, as the analysts' labels have them.
    pub fn new(event_ms: i64, tickers: Vec<String>, id: &str, headline: &str, scores: &Scores, cluster: u64) -> Tracked {
        let whole = headline.trim();
        let (text_hash, key) = (text_hash(whole), match_key(whole));
        let story = Headline::kept(id, headline, scores.p_negative);
        let counted = Counted {
            event_ms,
            topic: scores.topic.clone(),
            tickers,
            sentiment: scores.sentiment.to_string(),
            sentiment_score: scores.sentiment_score,
            story,
            cluster,
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
    /// Judgements still to re-count, by match key and head: a flip of the same text coalesces here,
    /// so a thousand flips cost what the last one costs.
    pending: BTreeMap<(String, Head), Pending>,
    last_poll: Option<Instant>,
    poll_every: Duration,
}

impl Corrections {
    /// `near_duplicates`: the model's rule, or `None` for exact matches only.
    pub fn new(config: &FeedbackConfig, storage: &crate::storage::Location, near_duplicates: Option<NearDuplicates>) -> Corrections {
        Corrections {
            memory: Memory::new(near_duplicates, config.remember),
            tail: JournalTail::new(storage),
            tracked: HashMap::new(),
            order: VecDeque::new(),
            by_key: HashMap::new(),
            capacity: config.revise_stories,
            revise_windows: config.revise_windows,
            applied: Vec::new(),
            pending: BTreeMap::new(),
            last_poll: None,
            poll_every: if storage.as_local().is_some() { POLL_EVERY } else { POLL_EVERY_ON_OBJECT_STORAGE },
        }
    }

    /// The clusters of copies the tracked stories belong to: all that a correction can re-count.
    pub fn tracked_clusters(&self) -> std::collections::HashSet<u64> {
        self.tracked.values().map(|t| t.counted.cluster).filter(|cluster| *cluster != 0).collect()
    }

    /// What the checkpoint keeps, oldest first.
    pub fn tracked(&self) -> Vec<&Tracked> {
        self.order.iter().filter_map(|id| self.tracked.get(id)).collect()
    }

    /// Gives a story just scored the labels analysts gave its text or a near-duplicate of it, and
    /// returns how the windows count it. `headline` whole, as [`Tracked::new`] had it.
    pub fn label(&mut self, tracked: &mut Tracked, headline: &str, scores: &Scores) -> Counted {
        let (words, reading) = (near_words(headline), Reading::of(scores));
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

    /// Forgets the stories of `topics`: their partition went to another instance, which can revise
    /// their windows from now on.
    pub fn drop_topics(&mut self, topics: &std::collections::BTreeSet<String>) {
        let gone: Vec<String> = self.tracked.iter().filter(|(_, t)| topics.contains(&t.counted.topic)).map(|(id, _)| id.clone()).collect();
        for id in gone {
            if let Some(tracked) = self.tracked.remove(&id)
                && let Some(ids) = self.by_key.get_mut(&tracked.key)
            {
                ids.retain(|i| *i != id);
                if ids.is_empty() {
                    self.by_key.remove(&tracked.key);
                }
            }
        }
        self.order.retain(|id| self.tracked.contains_key(id));
    }

    /// New journal rows, at most every [`POLL_EVERY`] (or [`POLL_EVERY_ON_OBJECT_STORAGE`]).
    pub fn due_rows(&mut self) -> Result<Vec<LabelFeedback>, PipelineError> {
        if self.last_poll.is_some_and(|t| t.elapsed() < self.poll_every) {
            return Ok(Vec::new());
        }
        self.last_poll = Some(Instant::now());
        match self.tail.new_rows() {
            Ok(rows) => Ok(rows),
            // The storage out of reach for now: the judgements are read at a later poll.
            Err(crate::feedback::FeedbackError::Storage(e)) if crate::error::Classified::retryable(&e) => {
                tracing::warn!(error = %e, "label_feedback unreadable for now; judgements are applied once it can be read");
                Ok(Vec::new())
            }
            Err(e) => Err(PipelineError::Internal(format!("reading label_feedback: {e}"))),
        }
    }

    /// Whether judgements learnt earlier still have stories to re-count.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Learns judgements (oldest first) and re-counts the stories they apply to, at most
    /// [`RECOUNT_PER_ROUND`] now and the rest in later [`Corrections::recount`] rounds. Returns the
    /// revised final rows of closed windows. `classifier` reads the judged texts for near-duplicate
    /// matching; nothing may be in flight on it.
    pub fn learn(
        &mut self,
        rows: Vec<LabelFeedback>,
        classifier: Option<&Classifier>,
        windows: &mut WindowState,
        now_ms: i64,
    ) -> Result<Vec<WindowRow>, PipelineError> {
        let readings = self.read(&rows, classifier)?;
        for (row, reading) in rows.into_iter().zip(readings) {
            self.memory.learn(&row, reading);
            let label = match row.analyst_label {
                Some(label) if row.action != Action::Unsure => Some(label),
                _ => None,
            };
            self.pending.insert((match_key(&row.text), row.head), Pending { label, feedback_id: row.feedback_id, story_id: row.story_id });
        }
        metrics::gauge!("bearwatch_feedback_memory_texts").set(self.memory.len() as f64);
        Ok(self.recount(windows, now_ms))
    }

    /// Carries pending judgements to the kept stories with their text, re-counting at most
    /// [`RECOUNT_PER_ROUND`] of them; a judgement whose stories are not all done stays pending.
    /// Returns the revised final rows of closed windows, one per window.
    pub fn recount(&mut self, windows: &mut WindowState, now_ms: i64) -> Vec<WindowRow> {
        let mut revised: BTreeMap<_, WindowRow> = BTreeMap::new();
        let mut budget = RECOUNT_PER_ROUND;
        while budget > 0 {
            let Some(((key, head), judgement)) = self.pending.pop_first() else { break };
            let mut ids: Vec<&String> = self.by_key.get(&key).map(|ids| ids.iter().collect()).unwrap_or_default();
            if let Some(story) = &judgement.story_id
                && !ids.contains(&story)
            {
                ids.push(story);
            }
            let mut done = true;
            for id in ids {
                let Some(tracked) = self.tracked.get_mut(id) else { continue };
                if *tracked.label(head) == judgement.label {
                    continue;
                }
                if budget == 0 {
                    done = false;
                    break;
                }
                budget -= 1;
                *tracked.label(head) = judgement.label.clone();
                let was = tracked.counted.clone();
                let now = tracked.effective();
                for row in windows.relabel(&was, &now, now_ms) {
                    revised.insert(row.key.clone(), row);
                }
                tracked.counted = now;
                let matched = if judgement.story_id.as_ref() == Some(id) { Match::Story } else { Match::Exact };
                self.applied.push(tracked.applied(head, judgement.label.clone(), &judgement.feedback_id, matched));
                metrics::counter!("bearwatch_feedback_applied_total", "matched" => matched.name()).increment(1);
            }
            if !done {
                self.pending.insert((key, head), judgement);
            }
        }
        metrics::gauge!("bearwatch_feedback_pending_texts").set(self.pending.len() as f64);
        revised.into_values().collect()
    }

    /// The model's reading of each row's text, when near-duplicates are matched.
    /// Each text is read once: by the newest row of its match key, and only if the memory has no
    /// reading of that key yet (a flipped label needs no new reading).
    fn read(&self, rows: &[LabelFeedback], classifier: Option<&Classifier>) -> Result<Vec<Option<Reading>>, PipelineError> {
        let mut out: Vec<Option<Reading>> = vec![None; rows.len()];
        let Some(classifier) = classifier.filter(|_| self.memory.wants_readings()) else { return Ok(out) };
        let mut keys = HashSet::new();
        let mut indices: Vec<usize> = (0..rows.len())
            .rev()
            .filter(|&i| {
                let key = match_key(&rows[i].text);
                !self.memory.has_reading(&key) && keys.insert(key)
            })
            .collect();
        indices.reverse();
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
