//! Copies count once: the same wire story sent again (the same words, or a near-duplicate by the
//! model's rule that only adds or drops words or changes numbers) within a window is one story there. [`Copies`] gives each story a cluster: the
//! cluster of an earlier story it copies, else its own; each window counts a cluster once and the
//! rest as `copies`. Twenty re-sends of one headline are one story, and a person is not woken for
//! them.

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::news::near::{NEAR_CANDIDATES, NEAR_WORDS, NearDuplicates, Reading, ends, stable_hash, words};

/// Recent stories a lookup can fold into, at most: a bound on memory and checkpoints whatever the
/// feed sends within a window.
pub const MAX_RECENT: usize = 50_000;

/// Whether and how copies fold: exact copies always, near-duplicates when the model has a rule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Folding {
    pub near: Option<NearDuplicates>,
}

/// One recent story, as lookups compare it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Recent {
    seq: u64,
    event_ms: i64,
    exact: u64,
    cluster: u64,
    words: Vec<String>,
    reading: Reading,
}

/// The recent stories (by event time, within a window's reach of the newest) and their clusters.
/// Plain data in checkpoints; the lookup indexes are rebuilt from it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Copies {
    recent: VecDeque<Recent>,
    next_seq: u64,
    newest_ms: Option<i64>,
    #[serde(skip)]
    index: Option<Index>,
}

impl PartialEq for Copies {
    fn eq(&self, other: &Copies) -> bool {
        self.recent == other.recent && self.next_seq == other.next_seq && self.newest_ms == other.newest_ms
    }
}

/// Where to find recent stories by their exact key and by their end words: sequence numbers,
/// newest last.
#[derive(Debug, Clone, Default)]
struct Index {
    by_exact: HashMap<u64, u64>,
    by_end: HashMap<String, VecDeque<u64>>,
}

impl Index {
    fn insert(&mut self, entry: &Recent) {
        self.by_exact.insert(entry.exact, entry.seq);
        for end in ends(&entry.words) {
            self.by_end.entry(end.clone()).or_default().push_back(entry.seq);
        }
    }

    fn remove(&mut self, entry: &Recent) {
        if self.by_exact.get(&entry.exact) == Some(&entry.seq) {
            self.by_exact.remove(&entry.exact);
        }
        for end in ends(&entry.words) {
            if let Some(seqs) = self.by_end.get_mut(end) {
                // The oldest story leaves first, and it is the oldest of its ends too.
                if seqs.front() == Some(&entry.seq) {
                    seqs.pop_front();
                } else {
                    seqs.retain(|s| *s != entry.seq);
                }
                if seqs.is_empty() {
                    self.by_end.remove(end);
                }
            }
        }
    }
}

impl Copies {
    fn entry(&self, seq: u64) -> Option<&Recent> {
        let front = self.recent.front()?.seq;
        self.recent.get(usize::try_from(seq.checked_sub(front)?).ok()?)
    }

    /// The cluster of a story published at `event_ms`: that of a recent story within `reach_ms` of
    /// it with the same words, else of its nearest near-duplicate there, else its own (never 0,
    /// which means "not folded"). Stories older than `keep_ms` before the newest are forgotten.
    /// Exact copies are all of the text's words; near ones compare its first [`NEAR_WORDS`].
    pub fn cluster(&mut self, folding: &Folding, event_ms: i64, text: &str, reading: &Reading, reach_ms: i64, keep_ms: i64) -> u64 {
        let mut words = words(text);
        if words.is_empty() {
            return 0;
        }
        let exact = stable_hash(&words.join(" ")).max(1);
        // Kept for a window's reach: without its spare capacity (24 bytes a word dropped).
        words.truncate(NEAR_WORDS);
        words.shrink_to_fit();
        let newest = self.newest_ms.map_or(event_ms, |n| n.max(event_ms));
        self.newest_ms = Some(newest);
        if self.index.is_none() {
            let mut index = Index::default();
            self.recent.iter().for_each(|e| index.insert(e));
            self.index = Some(index);
        }
        while self.recent.front().is_some_and(|e| e.event_ms < newest.saturating_sub(keep_ms)) || self.recent.len() >= MAX_RECENT {
            let Some(oldest) = self.recent.pop_front() else { break };
            if let Some(index) = self.index.as_mut() {
                index.remove(&oldest);
            }
        }
        let index = self.index.as_ref();
        let within = |e: &&Recent| (e.event_ms - event_ms).abs() < reach_ms;
        let same = index.and_then(|i| i.by_exact.get(&exact)).and_then(|seq| self.entry(*seq)).filter(within).map(|e| e.cluster);
        let near = || {
            let rule = folding.near?;
            let candidates = ends(&words).filter_map(|end| index?.by_end.get(end)).flat_map(|seqs| seqs.iter().rev().take(NEAR_CANDIDATES));
            candidates
                .filter_map(|seq| self.entry(*seq))
                .filter(within)
                .filter_map(|e| rule.copies((&words, reading), (&e.words, &e.reading)).map(|(shared, distance)| (shared, distance, e.cluster)))
                // Most words shared, then the closest reading, then the smallest cluster: the
                // answer does not depend on arrival order among equals.
                .max_by(|a, b| a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)).then(b.2.cmp(&a.2)))
                .map(|(_, _, cluster)| cluster)
        };
        let cluster = same.or_else(near).unwrap_or(exact);
        let entry = Recent { seq: self.next_seq, event_ms, exact, cluster, words, reading: reading.clone() };
        self.next_seq += 1;
        if let Some(index) = self.index.as_mut() {
            index.insert(&entry);
        }
        self.recent.push_back(entry);
        cluster
    }

    /// Adds another instance's recent stories (a partition taken over from it), ordered by event
    /// time with these, each story once, the newest [`MAX_RECENT`] kept.
    pub fn merge(&mut self, other: &Copies) {
        let mut all: Vec<Recent> = self.recent.drain(..).chain(other.recent.iter().cloned()).collect();
        all.sort_by_key(|e| e.event_ms);
        let mut seen = std::collections::HashSet::new();
        all.retain(|e| seen.insert((e.event_ms, e.exact, e.words.clone())));
        let skip = all.len().saturating_sub(MAX_RECENT);
        self.recent = all.into_iter().skip(skip).enumerate().map(|(seq, e)| Recent { seq: seq as u64, ..e }).collect();
        self.next_seq = self.recent.len() as u64;
        self.newest_ms = match (self.newest_ms, other.newest_ms) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        self.index = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: i64 = 3_600_000;

    fn reading(p_negative: f32) -> Reading {
        Reading { sentiment: [p_negative, 1.0 - p_negative, 0.0], topic: "metals".into() }
    }

    #[test]
    fn exact_and_near_copies_join_the_first_story_within_reach() {
        let folding = Folding { near: Some(NearDuplicates { min_shared: 0.6, max_span: 3, max_distance: 0.2 }) };
        let mut copies = Copies::default();
        let mut cluster = |t: i64, text: &str, p: f32| copies.cluster(&folding, t, text, &reading(p), 4 * H, 5 * H);
        let first = cluster(0, "Copper slumps as Chile mine strike ends", 0.9);
        assert_eq!(cluster(H, "COPPER SLUMPS AS CHILE MINE STRIKE ENDS", 0.9), first, "the same words");
        assert_eq!(cluster(2 * H, "UPDATE 1-Copper slumps as Chile mine strike ends", 0.88), first, "the story again, tagged");
        assert_ne!(cluster(2 * H, "Copper slumps as Peru mine strike ends", 0.88), first, "another mine: another story");
        assert_ne!(cluster(2 * H, "Gold rallies on safe-haven demand", 0.1), first);
        assert_ne!(cluster(7 * H, "UPDATE 2-Copper slumps as Chile mine strike ends", 0.88), first, "a copy out of a window's reach");
        let exact_only = Folding { near: None };
        let mut copies = Copies::default();
        let a = copies.cluster(&exact_only, 0, "Copper slumps as Chile mine strike ends", &reading(0.9), 4 * H, 5 * H);
        assert_ne!(copies.cluster(&exact_only, 0, "Copper slumps as Peru mine strike ends", &reading(0.9), 4 * H, 5 * H), a);
        assert_eq!(copies.cluster(&exact_only, 0, "!!!", &reading(0.9), 4 * H, 5 * H), 0, "no words: never folded");
    }

    #[test]
    fn another_instances_recent_stories_merged_in_still_fold_their_copies() {
        let folding = Folding { near: None };
        let (mut here, mut there) = (Copies::default(), Copies::default());
        let mine = here.cluster(&folding, 2 * H, "Gold steady", &reading(0.1), 4 * H, 5 * H);
        let theirs = there.cluster(&folding, H, "Oil falls", &reading(0.9), 4 * H, 5 * H);
        here.merge(&there);
        here.merge(&there);
        assert_eq!(here.recent.len(), 2, "each story once");
        assert_eq!(here.cluster(&folding, 3 * H, "Oil falls", &reading(0.9), 4 * H, 5 * H), theirs, "a copy of theirs folds here");
        assert_eq!(here.cluster(&folding, 3 * H, "Gold steady", &reading(0.1), 4 * H, 5 * H), mine);
    }

    #[test]
    fn a_long_text_keeps_its_first_words_for_near_copies_and_all_of_them_for_exact_ones() {
        let folding = Folding { near: Some(NearDuplicates { min_shared: 0.6, max_span: 3, max_distance: 0.2 }) };
        let mut copies = Copies::default();
        let long = |pct: u32, tail: &str| format!("Acme shares slump {pct} pct {} {tail}", "a b c d e f g h i j".repeat(100));
        let first = copies.cluster(&folding, 0, &long(5, "ends in a default"), &reading(0.9), 4 * H, 5 * H);
        assert_eq!(copies.recent.back().map(|e| (e.words.len(), e.words.capacity())), Some((NEAR_WORDS, NEAR_WORDS)), "what is kept of 1,009 words");
        assert_eq!(copies.cluster(&folding, H, &long(5, "ENDS IN A DEFAULT"), &reading(0.9), 4 * H, 5 * H), first, "the same words");
        assert_eq!(copies.cluster(&folding, H, &long(7, "ends in a default"), &reading(0.9), 4 * H, 5 * H), first, "a number updated");
        let exact_only = Folding { near: None };
        assert_ne!(copies.cluster(&exact_only, H, &long(5, "ends in a rescue"), &reading(0.9), 4 * H, 5 * H), first, "all the words count for exact copies");
    }

    #[test]
    fn old_stories_are_forgotten_and_a_checkpoint_keeps_the_rest() {
        let folding = Folding { near: None };
        let mut copies = Copies::default();
        let first = copies.cluster(&folding, 0, "Oil falls", &reading(0.9), 4 * H, 5 * H);
        for h in 1..=10 {
            copies.cluster(&folding, h * H, &format!("story {h}"), &reading(0.5), 4 * H, 5 * H);
        }
        assert_eq!(copies.recent.len(), 6, "stories within 5 h of the newest");
        let mut restored: Copies = serde_json::from_str(&serde_json::to_string(&copies).unwrap()).unwrap();
        assert_eq!(restored, copies);
        let again = restored.cluster(&folding, 10 * H, "story 9", &reading(0.5), 4 * H, 5 * H);
        assert_eq!(again, copies.cluster(&folding, 10 * H, "story 9", &reading(0.5), 4 * H, 5 * H), "indexes are rebuilt");
        assert_ne!(copies.cluster(&folding, 10 * H, "Oil falls", &reading(0.9), 4 * H, 5 * H), 0);
        assert_eq!(copies.cluster(&folding, 10 * H, "Oil falls", &reading(0.9), 4 * H, 5 * H), first, "the same words hash alike");
    }
}
