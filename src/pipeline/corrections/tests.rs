use std::sync::Arc;

use super::*;
use crate::feedback::{judgement, record_labels};
use crate::window::{ALL, WindowSpec, WindowState};

const H: i64 = 3_600_000;

fn scores(sentiment: &'static str, p_negative: f32, topic: &str) -> Scores {
    Scores {
        topic: topic.into(),
        topic_score: 0.9,
        sentiment,
        p_negative,
        p_neutral: 1.0 - p_negative,
        p_positive: 0.0,
        sentiment_score: -p_negative,
        model: Arc::from("m@1"),
    }
}

/// Scores a story into the windows the way `Core::score` does.
fn count(corrections: &mut Corrections, windows: &mut WindowState, id: &str, headline: &str, t: i64, scores: &Scores) -> Counted {
    let cluster = windows.cluster_of(t, headline, &crate::news::near::Reading::of(scores));
    let mut tracked = Tracked::new(t, vec![], id, headline, scores, cluster);
    let counted = corrections.label(&mut tracked, headline, scores);
    windows.add(&counted);
    windows.advance("p0", t);
    corrections.track(tracked);
    counted
}

/// Corrections over a fresh journal folder, and hourly windows.
fn fresh(config: &FeedbackConfig) -> (tempfile::TempDir, Corrections, WindowState) {
    let dir = tempfile::tempdir().unwrap();
    let corrections = Corrections::new(config, &dir.path().into(), None);
    (dir, corrections, WindowState::new(WindowSpec { size_ms: H, slide_ms: H, allowed_lateness_ms: 0, by_ticker: false }))
}

fn negatives(windows: &WindowState, topic: &str) -> Vec<(u64, u64)> {
    windows.open_counts().filter(|(k, _)| k.topic == topic).map(|(_, c)| (c.n, c.n_negative)).collect()
}

#[test]
fn a_correction_recounts_the_story_and_its_exact_copies_and_labels_the_next_ones() {
    let (dir, mut corrections, mut windows) = fresh(&FeedbackConfig::default());
    let negative = scores("negative", 0.9, "equity_markets");
    count(&mut corrections, &mut windows, "a", "S&P says downgrades may ease", 10, &negative);
    count(&mut corrections, &mut windows, "b", "S&P SAYS DOWNGRADES MAY EASE", 20, &negative);
    count(&mut corrections, &mut windows, "c", "Oil falls", 30, &negative);
    assert_eq!(negatives(&windows, ALL), vec![(3, 3)]);

    record_labels(&dir.path().into(), &[judgement(Some("a"), "S&P says downgrades may ease", Head::Sentiment, Some("neutral"), Action::Correct)]).unwrap();
    let rows = corrections.due_rows().unwrap();
    assert_eq!(rows.len(), 1);
    assert!(corrections.learn(rows, None, &mut windows, 0).unwrap().is_empty(), "only open windows");
    assert_eq!(negatives(&windows, ALL), vec![(3, 1)], "the story and its re-sent copy count as neutral");
    let matched: Vec<(&str, &str)> = corrections.applied.iter().map(|a| (a.story_id.as_str(), a.matched.name())).collect();
    assert_eq!(matched, vec![("a", "story"), ("b", "exact")]);
    assert!(corrections.applied.iter().all(|a| a.model_label == "negative" && a.label.as_deref() == Some("neutral")));

    // A later story with the same words gets the label as it is scored.
    let later = count(&mut corrections, &mut windows, "d", "S&P says: downgrades may ease!", 40, &negative);
    assert_eq!((later.sentiment.as_str(), later.sentiment_score, later.story.p_negative), ("neutral", 0.0, 0.0));
    assert_eq!(corrections.applied.last().map(|a| (a.story_id.as_str(), a.matched.name())), Some(("d", "exact")));

    // Unsure gives the model's label back to every story that had the correction.
    corrections.last_poll = None;
    record_labels(&dir.path().into(), &[judgement(Some("a"), "S&P says downgrades may ease", Head::Sentiment, None, Action::Unsure)]).unwrap();
    let rows = corrections.due_rows().unwrap();
    corrections.learn(rows, None, &mut windows, 0).unwrap();
    assert_eq!(negatives(&windows, ALL), vec![(4, 4)]);
    assert!(corrections.due_rows().unwrap().is_empty(), "each file is read once");
}

#[test]
fn a_headline_longer_than_a_window_keeps_is_matched_on_all_of_it() {
    let (_dir, mut corrections, mut windows) = fresh(&FeedbackConfig::default());
    let negative = scores("negative", 0.9, "equity_markets");
    let long = format!("{} ends in a default", "Regional lender warns ".repeat(20));
    assert!(long.chars().count() > crate::window::TOP_HEADLINE_CHARS);
    count(&mut corrections, &mut windows, "a", &long, 10, &negative);
    count(&mut corrections, &mut windows, "b", &long.to_uppercase(), 20, &negative);
    // Another text with the same first 300 characters is not a copy.
    count(&mut corrections, &mut windows, "c", &format!("{} ends in a rescue", "Regional lender warns ".repeat(20)), 30, &negative);

    let rows = vec![judgement(Some("a"), &long, Head::Sentiment, Some("neutral"), Action::Correct)];
    corrections.learn(rows, None, &mut windows, 0).unwrap();
    let matched: Vec<(&str, &str)> = corrections.applied.iter().map(|a| (a.story_id.as_str(), a.matched.name())).collect();
    assert_eq!(matched, vec![("a", "story"), ("b", "exact")]);
    assert_eq!(corrections.applied[0].text_hash, text_hash(&long), "the hash label_feedback has");
    assert_eq!(negatives(&windows, ALL), vec![(3, 1)]);
    let later = count(&mut corrections, &mut windows, "d", &format!("{long}!"), 40, &negative);
    assert_eq!(later.sentiment, "neutral", "a later copy gets the label as it is scored");
    assert!(later.story.headline.chars().count() <= crate::window::TOP_HEADLINE_CHARS + 1, "the window keeps it cut");
}

#[test]
fn a_topic_correction_moves_the_story_between_topic_windows() {
    let (_dir, mut corrections, mut windows) = fresh(&FeedbackConfig::default());
    count(&mut corrections, &mut windows, "a", "Midland sets stock split", 10, &scores("negative", 0.8, "other"));
    let rows = vec![judgement(Some("a"), "Midland sets stock split", Head::Topic, Some("company_news"), Action::Correct)];
    corrections.learn(rows, None, &mut windows, 0).unwrap();
    assert_eq!(negatives(&windows, "other"), vec![(0, 0)]);
    assert_eq!(negatives(&windows, "company_news"), vec![(1, 1)]);
    assert_eq!(corrections.tracked()[0].counted.topic, "company_news", "the checkpoint keeps how it is counted");
}

#[test]
fn stories_beyond_revise_stories_are_no_longer_recounted() {
    let (_dir, mut corrections, mut windows) = fresh(&FeedbackConfig { revise_stories: 1, ..FeedbackConfig::default() });
    let negative = scores("negative", 0.9, "energy");
    count(&mut corrections, &mut windows, "a", "Oil falls", 10, &negative);
    count(&mut corrections, &mut windows, "b", "Gas falls", 20, &negative);
    let rows = vec![judgement(Some("a"), "Oil falls", Head::Sentiment, Some("neutral"), Action::Correct)];
    corrections.learn(rows, None, &mut windows, 0).unwrap();
    assert_eq!(negatives(&windows, ALL), vec![(2, 2)], "story a was forgotten");
    assert_eq!(corrections.tracked().len(), 1);
    assert!(corrections.applied.is_empty());
}

#[test]
fn flips_of_one_text_coalesce_and_a_round_recounts_a_bounded_number_of_stories() {
    let (_dir, mut corrections, mut windows) = fresh(&FeedbackConfig::default());
    let negative = scores("negative", 0.9, "energy");
    let stories = RECOUNT_PER_ROUND + RECOUNT_PER_ROUND / 2;
    for i in 0..stories {
        count(&mut corrections, &mut windows, &format!("s{i}"), "Oil falls", 10, &negative);
    }
    // One request of a thousand items flipping the same headline back and forth.
    let rows: Vec<_> = (0..1000)
        .map(|i| judgement(Some("s0"), "Oil falls", Head::Sentiment, Some(if i % 2 == 0 { "neutral" } else { "positive" }), Action::Correct))
        .collect();
    corrections.learn(rows, None, &mut windows, 0).unwrap();
    assert_eq!(corrections.applied.len(), RECOUNT_PER_ROUND, "the first round stops at its budget, not at 1000 x {stories}");
    assert!(corrections.has_pending());
    corrections.recount(&mut windows, 0);
    assert!(!corrections.has_pending());
    assert_eq!(corrections.applied.len(), stories, "each story re-counted once, to the last label");
    assert!(corrections.applied.iter().all(|a| a.label.as_deref() == Some("positive")));
    assert_eq!(negatives(&windows, ALL), vec![(stories as u64, 0)]);
    assert!(corrections.recount(&mut windows, 0).is_empty() && corrections.applied.len() == stories, "nothing left to do");
}
