//! What makes a story worth an analyst's label, shared by the review queue (`sql::queue`) and
//! `bench loop --pick queue`: how unsure the model is, and a pick that skips near-duplicates of
//! what is already picked, so that one template does not take every place.

use crate::news::near::{NearDuplicates, Reading, near_words};

use super::{Head, match_key};

/// 1 − the margin between the two largest of `p`: 1 at a tie, 0 when one class has it all.
pub fn margin_uncertainty(p: &[f32]) -> f32 {
    let mut sorted = p.to_vec();
    sorted.sort_by(|a, b| b.total_cmp(a));
    1.0 - (sorted.first().copied().unwrap_or(0.0) - sorted.get(1).copied().unwrap_or(0.0))
}

/// How unsure the model is of `head`, from its sentiment probabilities `[negative, neutral,
/// positive]` and its topic's score: the sentiment margin's complement, or 1 − the topic score.
pub fn uncertainty(head: Head, sentiment: [f32; 3], topic_score: f32) -> f32 {
    match head {
        Head::Sentiment => margin_uncertainty(&sentiment),
        Head::Topic => 1.0 - topic_score,
    }
}

/// The head the model is least sure of, and how unsure ([`uncertainty`]).
pub fn least_sure(sentiment: [f32; 3], topic_score: f32) -> (Head, f32) {
    let (s, t) = (uncertainty(Head::Sentiment, sentiment, topic_score), uncertainty(Head::Topic, sentiment, topic_score));
    if t > s { (Head::Topic, t) } else { (Head::Sentiment, s) }
}

/// A ranking interleaved so that each stratum (e.g. the model's reading: topic and sentiment) gets
/// places in proportion to its size, each in its own rank order. Top-uncertainty alone crowds onto
/// one boundary (neutral against negative headlines); this keeps the hard cases of every kind of
/// story. An item's key is (its place within its stratum + ½) ÷ the stratum's size; ties keep rank.
pub fn stratified<K: std::hash::Hash + Eq>(ranked: &[K]) -> Vec<usize> {
    let mut sizes: std::collections::HashMap<&K, usize> = std::collections::HashMap::new();
    for key in ranked {
        *sizes.entry(key).or_default() += 1;
    }
    let mut seen: std::collections::HashMap<&K, usize> = std::collections::HashMap::new();
    let mut keyed: Vec<(f64, usize)> = ranked
        .iter()
        .enumerate()
        .map(|(i, key)| {
            let place = seen.entry(key).or_default();
            *place += 1;
            ((*place as f64 - 0.5) / sizes[key] as f64, i)
        })
        .collect();
    keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    keyed.into_iter().map(|(_, i)| i).collect()
}

/// The review queue's pick from `texts` in score order, each with the model's reading: score order
/// kept within a reading, the readings sharing places by size ([`stratified`]), then copies and
/// near-duplicates skipped ([`pick_diverse`]). Returns positions in `texts`, in the queue's order.
pub fn pick_for_review<K: std::hash::Hash + Eq>(texts: &[&str], readings: &[K], limit: usize, rule: Option<NearDuplicates>) -> Vec<usize> {
    let order = stratified(readings);
    let picked = pick_diverse(order.iter().map(|&i| texts[i]), limit, rule);
    picked.into_iter().map(|k| order[k]).collect()
}

/// The first `limit` of `texts` (already in order of preference) that are neither a copy (the same
/// words) nor a near-duplicate by `rule` (on words alone: any reading, any topic) of one picked
/// before them; their positions in `texts`. Without a rule, only copies are skipped.
pub fn pick_diverse<'a>(texts: impl IntoIterator<Item = &'a str>, limit: usize, rule: Option<NearDuplicates>) -> Vec<usize> {
    let rule = rule.map(|n| NearDuplicates { max_distance: f32::INFINITY, ..n });
    let anything = Reading { sentiment: [0.0; 3], topic: String::new() };
    let mut taken: Vec<(String, Vec<String>)> = Vec::new();
    let mut picked = Vec::new();
    for (i, text) in texts.into_iter().enumerate() {
        if picked.len() >= limit {
            break;
        }
        let (key, these) = (match_key(text), near_words(text));
        if taken.iter().any(|(k, w)| *k == key || rule.is_some_and(|r| r.matches((&these, &anything), (w, &anything)).is_some())) {
            continue;
        }
        taken.push((key, these));
        picked.push(i);
    }
    picked
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_stratum_gets_places_in_proportion_to_its_size_in_its_own_order() {
        // 6 of stratum a, 3 of b, ranked with every a first.
        let ranked = ["a", "a", "a", "a", "a", "a", "b", "b", "b"];
        let order = stratified(&ranked);
        assert_eq!(order.len(), ranked.len());
        // Keys: a at 1/12, 3/12, 5/12, …; b at 1/6 = 2/12, 6/12, 10/12.
        assert_eq!(order, [0, 6, 1, 2, 7, 3, 4, 8, 5]);
        let first_three: Vec<&str> = order[..3].iter().map(|&i| ranked[i]).collect();
        assert_eq!(first_three, ["a", "b", "a"], "a third of the first places go to the third of the stories in b");
    }

    #[test]
    fn uncertainty_is_highest_at_a_tie() {
        assert!((margin_uncertainty(&[0.45, 0.45, 0.10]) - 1.0).abs() < 1e-6);
        assert!(margin_uncertainty(&[0.98, 0.01, 0.01]) < 0.05);
    }

    #[test]
    fn one_template_takes_one_place() {
        let rule = NearDuplicates { min_shared: 0.4, max_span: 5, max_distance: 0.05 };
        let texts = ["Acme Corp sets two-for-one stock split", "acme corp sets two for one stock split!", "Globex Corp sets two-for-one stock split", "Oil prices fall"];
        assert_eq!(pick_diverse(texts, 10, Some(rule)), [0, 3]);
        assert_eq!(pick_diverse(texts, 10, None), [0, 2, 3], "without the rule, copies only");
        assert_eq!(pick_diverse(texts, 1, Some(rule)), [0]);
    }
}
