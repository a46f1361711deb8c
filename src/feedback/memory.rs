//! What analysts corrected, as a memory the pipeline asks about every story it scores. A story gets an
//! analyst's label when its headline is the same text (by [`match_key`]), or a near-duplicate by the
//! model's rule ([`NearDuplicates`], set on validation data by `models/train/near_duplicates.py`):
//! one stretch of a few words differs, the rest is shared, and the model reads both texts the same
//! way (same topic, sentiment probabilities close), so what differs is a name or a number, not what
//! the headline says.

use std::collections::{HashMap, VecDeque};

use super::{Action, Head, LabelFeedback, match_key};

use crate::classify::NearDuplicates;
pub use crate::news::near::{NEAR_CANDIDATES, Reading, near_words, words};
use crate::news::near::ends;


/// An analyst's label for one head of one text.
#[derive(Debug, Clone, PartialEq)]
pub struct Correction {
    pub label: String,
    pub feedback_id: String,
}

/// How a story came to carry a correction.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Match {
    /// The analyst judged this very story.
    Story,
    /// Another story with the same text (ignoring case, punctuation and spacing).
    Exact,
    /// A near-duplicate, with the share of words it shares with the corrected text.
    Near { shared: f32 },
}

impl Match {
    pub fn name(self) -> &'static str {
        match self {
            Match::Story => "story",
            Match::Exact => "exact",
            Match::Near { .. } => "near",
        }
    }

    pub fn shared_words(self) -> Option<f32> {
        match self {
            Match::Near { shared } => Some(shared),
            Match::Story | Match::Exact => None,
        }
    }
}

#[derive(Debug, Default)]
struct Judged {
    sentiment: Option<Correction>,
    topic: Option<Correction>,
    words: Vec<String>,
    /// The model's reading of the text; `None` until classified (or with no classifier).
    reading: Option<Reading>,
}

impl Judged {
    fn head(&mut self, head: Head) -> &mut Option<Correction> {
        match head {
            Head::Sentiment => &mut self.sentiment,
            Head::Topic => &mut self.topic,
        }
    }

    fn corrections(&self) -> impl Iterator<Item = (Head, &Correction)> {
        [(Head::Sentiment, &self.sentiment), (Head::Topic, &self.topic)].into_iter().filter_map(|(h, c)| c.as_ref().map(|c| (h, c)))
    }
}

pub struct Memory {
    /// By match key.
    by_key: HashMap<String, Judged>,
    /// Match keys by first and by last word, oldest first: a near-duplicate shares one of them.
    by_end: HashMap<String, VecDeque<String>>,
    /// Match keys, oldest first, to forget the oldest beyond `capacity`.
    order: VecDeque<String>,
    /// `None`: exact matches only.
    rule: Option<NearDuplicates>,
    capacity: usize,
}

/// A story's headline, as lookups need it.
pub struct Query<'a> {
    pub key: &'a str,
    pub words: &'a [String],
    pub reading: &'a Reading,
}

impl Memory {
    pub fn new(rule: Option<NearDuplicates>, capacity: usize) -> Memory {
        Memory { by_key: HashMap::new(), by_end: HashMap::new(), order: VecDeque::new(), rule, capacity }
    }

    pub fn len(&self) -> usize {
        self.by_key.len()
    }

    /// Whether the memory already holds the model's reading of the text with this match key.
    pub fn has_reading(&self, key: &str) -> bool {
        self.by_key.get(key).is_some_and(|judged| judged.reading.is_some())
    }

    /// Whether near-duplicates are matched, so that judged texts need the model's reading.
    pub fn wants_readings(&self) -> bool {
        self.rule.is_some()
    }

    /// Takes in one journal row; rows come oldest first, so the newest judgement of a text and head
    /// wins. `unsure` forgets the head's label: the model's stands again.
    pub fn learn(&mut self, row: &LabelFeedback, reading: Option<Reading>) {
        if self.capacity == 0 {
            return;
        }
        let key = match_key(&row.text);
        if !self.by_key.contains_key(&key) {
            let words = near_words(&row.text);
            for end in ends(&words) {
                self.by_end.entry(end.clone()).or_default().push_back(key.clone());
            }
            self.by_key.insert(key.clone(), Judged { words, ..Judged::default() });
            self.order.push_back(key.clone());
            while self.order.len() > self.capacity {
                if let Some(oldest) = self.order.pop_front() {
                    self.forget(&oldest);
                }
            }
        }
        let Some(judged) = self.by_key.get_mut(&key) else { return };
        if reading.is_some() {
            judged.reading = reading;
        }
        *judged.head(row.head) = match (row.action, &row.analyst_label) {
            (Action::Unsure, _) | (_, None) => None,
            (_, Some(label)) => Some(Correction { label: label.clone(), feedback_id: row.feedback_id.clone() }),
        };
    }

    fn forget(&mut self, key: &str) {
        let Some(judged) = self.by_key.remove(key) else { return };
        for end in ends(&judged.words) {
            if let Some(keys) = self.by_end.get_mut(end) {
                // The oldest text is forgotten first, and it is the oldest of its ends too.
                if keys.front().is_some_and(|k| k == key) {
                    keys.pop_front();
                } else {
                    keys.retain(|k| k != key);
                }
                if keys.is_empty() {
                    self.by_end.remove(end);
                }
            }
        }
    }

    /// The corrections a story gets, per head: its text's, or else its nearest near-duplicate's.
    pub fn lookup(&self, query: &Query<'_>) -> Vec<(Head, Correction, Match)> {
        let (judged, matched) = match self.by_key.get(query.key) {
            Some(judged) => (judged, Match::Exact),
            None => match self.nearest(query) {
                Some((judged, shared)) => (judged, Match::Near { shared }),
                None => return Vec::new(),
            },
        };
        judged.corrections().map(|(head, c)| (head, c.clone(), matched)).collect()
    }

    /// The labelled text that shares most of the query's words within the rule (then the closest
    /// reading, then the key, so that the answer does not depend on memory order).
    fn nearest(&self, query: &Query<'_>) -> Option<(&Judged, f32)> {
        let rule = self.rule?;
        let mut best: Option<(f32, f32, &str, &Judged)> = None;
        let candidates = ends(query.words).filter_map(|end| self.by_end.get(end)).flat_map(|keys| keys.iter().rev().take(NEAR_CANDIDATES));
        for key in candidates {
            let Some(judged) = self.by_key.get(key) else { continue };
            let Some(reading) = &judged.reading else { continue };
            if judged.corrections().next().is_none() {
                continue;
            }
            let Some((shared, distance)) = rule.matches((query.words, query.reading), (&judged.words, reading)) else { continue };
            let better = best.is_none_or(|(s, d, k, _)| (shared, -distance, std::cmp::Reverse(key.as_str())) > (s, -d, std::cmp::Reverse(k)));
            if better {
                best = Some((shared, distance, key.as_str(), judged));
            }
        }
        best.map(|(shared, _, _, judged)| (judged, shared))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(text: &str, head: Head, label: Option<&str>, action: Action) -> LabelFeedback {
        crate::feedback::judgement(None, text, head, label, action)
    }

    fn reading(p_negative: f32, topic: &str) -> Reading {
        Reading { sentiment: [p_negative, 1.0 - p_negative, 0.0], topic: topic.into() }
    }

    const RULE: NearDuplicates = NearDuplicates { min_shared: 0.5, max_span: 5, max_distance: 0.05 };

    fn ask<'a>(memory: &Memory, text: &str, reading: &Reading) -> Vec<(Head, Correction, Match)> {
        let (key, words) = (match_key(text), near_words(text));
        memory.lookup(&Query { key: &key, words: &words, reading })
    }

    #[test]
    fn the_same_text_in_other_case_and_punctuation_matches_exactly() {
        let mut memory = Memory::new(None, 10);
        memory.learn(&row("Acme shares fall 5%", Head::Sentiment, Some("neutral"), Action::Correct), None);
        let found = ask(&memory, "ACME SHARES FALL 5 %!", &reading(0.9, "equity_markets"));
        assert_eq!(found.len(), 1);
        assert_eq!((found[0].0, found[0].1.label.as_str(), found[0].2), (Head::Sentiment, "neutral", Match::Exact));
        assert!(ask(&memory, "Acme shares rise 5%", &reading(0.9, "equity_markets")).is_empty(), "no rule: exact only");
    }

    #[test]
    fn a_near_duplicate_needs_shared_words_and_the_same_reading() {
        let mut memory = Memory::new(Some(RULE), 10);
        memory.learn(&row("Acme Corp shares fall 5% after results", Head::Sentiment, Some("neutral"), Action::Correct), Some(reading(0.9, "equity_markets")));
        let near = ask(&memory, "Globex Inc shares fall 5% after results", &reading(0.92, "equity_markets"));
        assert_eq!(near.len(), 1);
        assert!(matches!(near[0].2, Match::Near { shared } if (shared - 5.0 / 7.0).abs() < 1e-6), "{:?}", near[0].2);
        // The model reads the other text differently: what differs is not a name.
        assert!(ask(&memory, "Globex Inc shares fall 5% after results", &reading(0.5, "equity_markets")).is_empty());
        assert!(ask(&memory, "Globex Inc shares fall 5% after results", &reading(0.9, "earnings")).is_empty());
        // Too little in common.
        assert!(ask(&memory, "Globex Inc to buy a rival for $2 billion after results", &reading(0.9, "equity_markets")).is_empty());
    }

    #[test]
    fn a_long_text_is_remembered_by_its_first_words() {
        let mut memory = Memory::new(Some(RULE), 10);
        let long = |name: &str| format!("{name} shares fall 5% after results {}", "a b c d e f g h i j ".repeat(500));
        let near = reading(0.9, "equity_markets");
        memory.learn(&row(&long("Acme Inc"), Head::Sentiment, Some("neutral"), Action::Correct), Some(near.clone()));
        let kept = &memory.by_key.values().next().unwrap().words;
        assert_eq!((kept.len(), kept.capacity()), (crate::news::near::NEAR_WORDS, crate::news::near::NEAR_WORDS), "of 5,007 words");
        assert_eq!(ask(&memory, &long("ACME INC"), &near).len(), 1, "the same text");
        assert_eq!(ask(&memory, &long("Globex Inc"), &near).len(), 1, "a near-duplicate, by its first words");
    }

    #[test]
    fn the_newest_judgement_wins_and_unsure_gives_the_model_back() {
        let mut memory = Memory::new(None, 10);
        memory.learn(&row("Acme shares fall", Head::Sentiment, Some("neutral"), Action::Correct), None);
        memory.learn(&row("Acme shares fall", Head::Sentiment, Some("negative"), Action::Correct), None);
        memory.learn(&row("Acme shares fall", Head::Topic, Some("company_news"), Action::Correct), None);
        let found = ask(&memory, "Acme shares fall", &reading(0.9, "equity_markets"));
        assert_eq!(found.iter().map(|f| (f.0, f.1.label.as_str())).collect::<Vec<_>>(), vec![(Head::Sentiment, "negative"), (Head::Topic, "company_news")]);
        memory.learn(&row("Acme shares fall", Head::Sentiment, None, Action::Unsure), None);
        let found = ask(&memory, "Acme shares fall", &reading(0.9, "equity_markets"));
        assert_eq!(found.iter().map(|f| f.0).collect::<Vec<_>>(), vec![Head::Topic]);
    }

    #[test]
    fn the_oldest_texts_are_forgotten_beyond_capacity() {
        let mut memory = Memory::new(Some(RULE), 2);
        for text in ["one two three", "four five six", "seven eight nine"] {
            memory.learn(&row(text, Head::Sentiment, Some("neutral"), Action::Correct), Some(reading(0.5, "other")));
        }
        assert_eq!(memory.len(), 2);
        assert!(ask(&memory, "one two three", &reading(0.5, "other")).is_empty());
        assert_eq!(ask(&memory, "seven eight nine", &reading(0.5, "other")).len(), 1);
        assert!(memory.by_end.values().flatten().all(|k| memory.by_key.contains_key(k)), "the index forgets with them");
    }

    #[test]
    fn a_lookup_compares_a_bounded_number_of_texts_that_share_an_end_word() {
        let mut memory = Memory::new(Some(RULE), 10_000);
        for i in 0..5_000 {
            memory.learn(&row(&format!("Acme unit {i} shares fall after results"), Head::Sentiment, Some("neutral"), Action::Correct), Some(reading(0.9, "equity_markets")));
        }
        assert_eq!(memory.by_end["acme"].len(), 5_000);
        let (key, words) = (match_key("Acme unit x shares fall after results"), words("Acme unit x shares fall after results"));
        let compared = ends(&words).filter_map(|end| memory.by_end.get(end)).map(|keys| keys.len().min(NEAR_CANDIDATES)).sum::<usize>();
        assert_eq!(compared, 2 * NEAR_CANDIDATES);
        let found = memory.lookup(&Query { key: &key, words: &words, reading: &reading(0.9, "equity_markets") });
        assert_eq!(found.len(), 1, "the newest look-alikes still match");
        // Forgetting the oldest stays cheap and keeps the index right.
        let mut small = Memory::new(Some(RULE), 3);
        for i in 0..6 {
            small.learn(&row(&format!("Acme {i} falls"), Head::Sentiment, Some("neutral"), Action::Correct), Some(reading(0.9, "other")));
        }
        assert_eq!(small.by_end["acme"].len(), 3);
        assert!(small.by_end.values().flatten().all(|k| small.by_key.contains_key(k)));
    }
}
