//! Near-duplicate headlines by the model's rule ([`NearDuplicates`]): one stretch of a few words
//! differs, the rest is shared, and the model reads both texts the same way, so what differs is a
//! name or a number, not what the headline says. The corrections memory carries an analyst's label
//! to them; the windows count them once.

use serde::Deserialize;

use super::Scores;

/// A near-duplicate differs from the corrected text in one stretch of at most `max_span` words, the
/// words around it are at least `min_shared` of the longer text, and the model reads both the same
/// way: the same topic, and sentiment probabilities at most `max_distance` apart (total variation).
/// Each model folder sets its own (`labels.json`).
#[derive(Debug, Clone, Copy, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NearDuplicates {
    pub min_shared: f32,
    pub max_span: usize,
    pub max_distance: f32,
}

/// Earlier texts a near-duplicate lookup compares, at most, per end word (the newest): the cost of
/// a lookup stays flat however many texts share a first or last word (templated headlines), at the
/// price of matching only the newest of them.
pub const NEAR_CANDIDATES: usize = 64;

/// Words of a text that the windows keep to find its near-duplicates among later stories, at most
/// (the first): about what the model reads at its default `max_length` of 64 tokens. Every recent
/// story is kept for a window's reach, so a feed of 2,000-character headlines of one-letter words
/// (1,000 words each) held 6.2 GB for 50,000 stories and wrote them into every checkpoint.
pub const NEAR_WORDS: usize = 64;

/// FNV-1a: a hash that never changes across versions or machines (ids, keys in checkpoints).
pub fn stable_hash(text: &str) -> u64 {
    text.bytes().fold(0xcbf29ce484222325, |hash, byte| (hash ^ u64::from(byte)).wrapping_mul(0x100000001b3))
}

/// How the model read a text: what near-duplicate matching compares.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Reading {
    /// `[p_negative, p_neutral, p_positive]`.
    pub sentiment: [f32; 3],
    pub topic: String,
}

impl Reading {
    pub fn of(scores: &Scores) -> Reading {
        Reading { sentiment: [scores.p_negative, scores.p_neutral, scores.p_positive], topic: scores.topic.clone() }
    }

    /// Total variation between the two sentiment readings.
    pub fn distance(&self, other: &Reading) -> f32 {
        0.5 * self.sentiment.iter().zip(&other.sentiment).map(|(a, b)| (a - b).abs()).sum::<f32>()
    }
}

/// Lower case, runs of letters and digits: what exact matches hash and near ones align.
pub fn words(text: &str) -> Vec<String> {
    runs(&text.to_lowercase()).map(str::to_string).collect()
}

/// The runs of letters and digits of a lower-cased text.
fn runs(lower: &str) -> impl Iterator<Item = &str> {
    lower.split(|c: char| !c.is_alphanumeric()).filter(|w| !w.is_empty())
}

/// The first [`NEAR_WORDS`] of [`words`], without spare capacity: what is kept of a text to find
/// its near-duplicates.
pub fn near_words(text: &str) -> Vec<String> {
    let mut words: Vec<String> = runs(&text.to_lowercase()).take(NEAR_WORDS).map(str::to_string).collect();
    words.shrink_to_fit();
    words
}

/// The first and the last word (one, for a one-word text): what near-duplicates are indexed by, as
/// a near-duplicate shares one of them.
pub fn ends(words: &[String]) -> impl Iterator<Item = &String> {
    let last = words.last().filter(|_| words.len() > 1);
    words.first().into_iter().chain(last)
}

/// How much of the longer text the common prefix and suffix cover, and how many words of the longer
/// one differ between them.
fn aligned(a: &[String], b: &[String]) -> (f32, usize) {
    let shortest = a.len().min(b.len());
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a.iter().rev().zip(b.iter().rev()).take(shortest - prefix).take_while(|(x, y)| x == y).count();
    let longest = a.len().max(b.len()).max(1);
    ((prefix + suffix) as f32 / longest as f32, a.len().max(b.len()) - prefix - suffix)
}

/// The words of each text between their common prefix and suffix: what differs.
fn differing<'a>(a: &'a [String], b: &'a [String]) -> (&'a [String], &'a [String]) {
    let shortest = a.len().min(b.len());
    let prefix = a.iter().zip(b).take_while(|(x, y)| x == y).count();
    let suffix = a.iter().rev().zip(b.iter().rev()).take(shortest - prefix).take_while(|(x, y)| x == y).count();
    (&a[prefix..a.len() - suffix], &b[prefix..b.len() - suffix])
}

impl NearDuplicates {
    /// Whether `a` is a copy of `b`: the same story sent again, not another story in the same
    /// words. A near-duplicate by [`NearDuplicates::matches`] whose difference is only added or
    /// dropped words ("UPDATE 1", "- sources") or changed numbers ("5 pct" → "7 pct"); another
    /// name in the same template ("Acme" → "Globex", "Caesars" → "Chrysler") is another story.
    pub fn copies(&self, a: (&[String], &Reading), b: (&[String], &Reading)) -> Option<(f32, f32)> {
        let found = self.matches(a, b)?;
        let (only_a, only_b) = differing(a.0, b.0);
        let numbers = |words: &[String]| words.iter().all(|w| w.chars().any(|c| c.is_ascii_digit()));
        (only_a.is_empty() || only_b.is_empty() || (numbers(only_a) && numbers(only_b))).then_some(found)
    }

    /// Whether text `a` (its words and reading) is a near-duplicate of `b`: Some((share of words
    /// shared, reading distance)) when it is.
    pub fn matches(&self, a: (&[String], &Reading), b: (&[String], &Reading)) -> Option<(f32, f32)> {
        // The differing stretch is at least the difference in length: a cheap first test.
        if a.1.topic != b.1.topic || a.0.len().abs_diff(b.0.len()) > self.max_span {
            return None;
        }
        let (shared, span) = aligned(a.0, b.0);
        let distance = a.1.distance(b.1);
        (shared >= self.min_shared && span <= self.max_span && distance <= self.max_distance).then_some((shared, distance))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(p_negative: f32, topic: &str) -> Reading {
        Reading { sentiment: [p_negative, 1.0 - p_negative, 0.0], topic: topic.into() }
    }

    #[test]
    fn one_differing_name_is_near_a_different_story_is_not() {
        let rule = NearDuplicates { min_shared: 0.6, max_span: 3, max_distance: 0.2 };
        let a = words("Acme shares slump after profit warning");
        let b = words("Globex shares slump after profit warning");
        let c = words("Acme shares jump after record profit");
        let (neg, neg2) = (reading(0.9, "earnings"), reading(0.85, "earnings"));
        assert!(rule.matches((&a, &neg), (&b, &neg2)).is_some_and(|(shared, _)| (shared - 5.0 / 6.0).abs() < 1e-6));
        assert_eq!(rule.matches((&a, &neg), (&c, &neg2)), None);
        assert_eq!(rule.matches((&a, &neg), (&b, &reading(0.9, "energy"))), None, "another topic");
        assert_eq!(rule.matches((&a, &neg), (&b, &reading(0.2, "earnings"))), None, "read another way");
    }

    #[test]
    fn a_copy_is_the_same_story_again_not_another_name_in_the_same_words() {
        let rule = NearDuplicates { min_shared: 0.4, max_span: 5, max_distance: 0.05 };
        let r = reading(0.8, "earnings");
        let copy = |a: &str, b: &str| rule.copies((&words(a), &r), (&words(b), &r)).is_some();
        assert!(copy("Acme shares slump 5 pct after warning", "Acme shares slump 7 pct after warning"), "a number updated");
        assert!(copy("UPDATE 1-Acme shares slump after warning", "Acme shares slump after warning"), "a tag added");
        assert!(copy("Philippines says debt pact \"better than Mexico's'", "PHILIPPINES SAYS DEBT PACT BETTER THAN MEXICO'S"));
        assert!(!copy("ASHTON-TATE <TATE> 4TH QTR NET", "MINSTAR INC <MNST> 4TH QTR NET"), "two companies' results");
        assert!(!copy("MOODY'S MAY DOWNGRADE CAESARS <CAW> AND UNIT", "MOODY'S MAY DOWNGRADE CHRYSLER <C> AND UNIT"));
        assert!(rule.matches((&words("ASHTON-TATE <TATE> 4TH QTR NET"), &r), (&words("MINSTAR INC <MNST> 4TH QTR NET"), &r)).is_some(), "one label fits both");
    }
}
