//! `bearwatch bench windows`: event-time windows and alert rules alone, on pre-scored events, on one
//! core. This is the per-story work of the pipeline after the classifier: `WindowState::add`, closing
//! due windows (their final rows go to the rules), at each `evaluate_every` of event time the live
//! rows of changed windows to the rules, and every `checkpoint_every` events the live rows a
//! checkpoint writes to the table. A second row adds what scoring a story costs when the analysts'
//! corrections memory is full: the story's match key and words, and the memory's lookup of its text
//! among templated corrections that share its first and last words (the worst case of its index).

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use crate::classify::NearDuplicates;
use crate::detect::{Detector, RuleFile};
use crate::feedback::{Action, Head, LabelFeedback, Memory, Query, Reading, match_key, near_words};
use crate::news::SENTIMENTS;
use crate::rng::Lcg;
use crate::window::{Counted, Folding, Headline, WindowSpec, WindowState};

#[derive(Debug, Clone, clap::Args)]
pub struct WindowsBenchArgs {
    /// Pre-scored events per round.
    #[arg(long, default_value_t = 2_000_000)]
    pub events: usize,
    /// Rule files evaluated on the window rows.
    #[arg(long, default_value = "alerts/default.toml")]
    pub rules: Vec<PathBuf>,
    /// Events between two checkpoints' live rows for the table.
    #[arg(long, default_value_t = 10_000)]
    pub checkpoint_every: usize,
    /// `[alerts] evaluate_every`: the step of event time at which the rules see live rows.
    #[arg(long, default_value = "10s", value_parser = crate::config::HumanDuration::parse)]
    pub evaluate_every: crate::config::HumanDuration,
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Corrected texts in the memory for the second row (the `[feedback] remember` default).
    #[arg(long, default_value_t = 50_000)]
    pub corrections: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum WindowsBenchError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

struct Event {
    ms: i64,
    topic: usize,
    sentiment: &'static str,
    score: f32,
    story: Headline,
}

const TOPICS: [&str; 16] = [
    "earnings",
    "mergers_acquisitions",
    "monetary_policy",
    "macro",
    "currencies",
    "debt_markets",
    "energy",
    "metals",
    "agriculture",
    "equity_markets",
    "analyst_ratings",
    "company_news",
    "financials",
    "legal_regulatory",
    "politics",
    "other",
];

/// Words the middle of a headline is drawn from.
const WORDS: [&str; 24] = [
    "shares", "fall", "rise", "profit", "loss", "bank", "deal", "bid", "rates", "oil", "gold", "yen", "dollar", "cut", "raise", "sees",
    "says", "plans", "output", "talks", "strike", "exports", "sales", "forecast",
];

/// "energy story yen cut talks 812 today": distinct stories (copies are rare, as in a real feed)
/// whose end words each lookup of a copy or a correction meets thousands of times.
fn headline(topic: &str, i: usize, next: &mut impl FnMut() -> f64) -> String {
    let mut word = || WORDS[(next() * WORDS.len() as f64) as usize % WORDS.len()];
    format!("{topic} story {} {} {} {i} today", word(), word(), word())
}

/// Events a few seconds apart (a busy feed), slightly out of order, with sentiment that drifts.
fn events(n: usize) -> Vec<Event> {
    let mut rng = Lcg(42);
    let mut next = move || rng.next_f64();
    let start = 1_767_225_600_000i64;
    (0..n)
        .map(|i| {
            let topic = (next() * TOPICS.len() as f64) as usize % TOPICS.len();
            let drift = ((i as f64 / 50_000.0).sin() * 0.2).max(0.0);
            let p_negative = (next() * 0.8 + drift).min(1.0) as f32;
            let sentiment = SENTIMENTS[if p_negative > 0.5 { 0 } else if next() < 0.5 { 1 } else { 2 }];
            let jitter = (next() * 60_000.0) as i64;
            Event {
                ms: start + i as i64 * 3_000 - jitter,
                topic,
                sentiment,
                score: 1.0 - 2.0 * p_negative,
                story: Headline { id: format!("s{i}"), headline: headline(TOPICS[topic], i, &mut next), p_negative, why: vec![] },
            }
        })
        .collect()
}

/// The near-duplicate rule of the bench's memory and windows.
fn near_rule() -> NearDuplicates {
    NearDuplicates { min_shared: 0.5, max_span: 5, max_distance: 0.1 }
}

/// A memory of `n` corrections shaped like the events' headlines ("energy story c7 today"): every
/// event shares both end words with thousands of them, so each lookup meets the most candidates.
fn full_memory(n: usize) -> Memory {
    let mut memory = Memory::new(Some(near_rule()), n);
    for j in 0..n {
        let topic = TOPICS[j % TOPICS.len()];
        let text = format!("{topic} story c{j} today");
        let row = LabelFeedback {
            feedback_id: format!("f{j}"),
            story_id: None,
            text_hash: crate::feedback::text_hash(&text),
            text,
            head: Head::Sentiment,
            model: None,
            model_label: None,
            model_score: None,
            analyst_label: Some("neutral".into()),
            action: Action::Correct,
            analyst: "bench".into(),
            created_at: chrono::Utc::now(),
            note: None,
            source: crate::feedback::Channel::Cli,
            supersedes: None,
        };
        memory.learn(&row, Some(Reading { sentiment: [0.9, 0.1, 0.0], topic: topic.into() }));
    }
    memory
}

/// One pass; returns (seconds, window rows evaluated, alert changes). With a memory, each story is
/// first looked up in it, as the pipeline does before counting.
fn pass(events: &[Event], detector: &mut Detector, checkpoint_every: usize, evaluate_every_ms: i64, memory: Option<&Memory>) -> (f64, usize, usize) {
    let spec = WindowSpec { size_ms: 3_600_000, slide_ms: 900_000, allowed_lateness_ms: 300_000, by_ticker: false };
    let mut windows = WindowState::new(spec);
    // Copies fold as in the pipeline: exact ones, and near-duplicates by the bench memory's rule.
    windows.fold_copies(Some(Folding { near: Some(near_rule()) }));
    let (mut rows, mut changes) = (0, 0);
    let started = Instant::now();
    for (i, event) in events.iter().enumerate() {
        if let Some(memory) = memory {
            let headline = &event.story.headline;
            let (key, words) = (match_key(headline), near_words(headline));
            let reading = Reading { sentiment: [event.story.p_negative, 1.0 - event.story.p_negative, 0.0], topic: TOPICS[event.topic].into() };
            std::hint::black_box(memory.lookup(&Query { key: &key, words: &words, reading: &reading }));
        }
        let reading = Reading { sentiment: [event.story.p_negative, 1.0 - event.story.p_negative, 0.0], topic: TOPICS[event.topic].into() };
        let cluster = windows.cluster_of(event.ms, &event.story.headline, &reading);
        windows.add(&Counted {
            event_ms: event.ms,
            topic: TOPICS[event.topic].into(),
            tickers: Vec::new(),
            sentiment: event.sentiment.into(),
            sentiment_score: event.score,
            story: event.story.clone(),
            cluster,
        });
        windows.advance("bench", event.ms);
        let closed = windows.close_due(event.ms);
        let watermark = windows.watermark_ms().unwrap_or(event.ms);
        if !closed.is_empty() {
            rows += closed.len();
            changes += detector.evaluate(&closed, watermark).len();
        }
        let live = windows.take_due_for_rules(evaluate_every_ms, event.ms);
        if !live.is_empty() {
            rows += live.len();
            changes += detector.evaluate(&live, watermark).len();
        }
        if (i + 1) % checkpoint_every == 0 {
            std::hint::black_box(windows.take_updates(event.ms));
        }
    }
    (started.elapsed().as_secs_f64(), rows, changes)
}

pub fn run(args: &WindowsBenchArgs) -> Result<String, WindowsBenchError> {
    let paths: Vec<_> = args.rules.iter().map(|path| crate::pipeline::bundled(path)).collect();
    let rules = RuleFile::merge(RuleFile::load_all(&paths)?).rules;
    let rule_count = rules.len();
    let events = events(args.events);
    let memory = full_memory(args.corrections);
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} pre-scored events ({} topics, 1 h windows sliding by 15 min, {} rules on live rows every {} of event time, table rows every {} events), one thread, median of {} rounds after 1 warm-up\n",
        args.events,
        TOPICS.len(),
        rule_count,
        args.evaluate_every,
        args.checkpoint_every,
        args.repeats
    );
    let _ = writeln!(out, "| corrections memory | events/s per core | median s | window rows evaluated | alert changes | goal ≥ 1 M events/s |");
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---|");
    let full = format!("{} templated texts, near-duplicates on", args.corrections);
    for (name, memory) in [("none", None), (full.as_str(), Some(&memory))] {
        let mut seconds = Vec::new();
        let (mut rows, mut changes) = (0, 0);
        for round in 0..=args.repeats {
            let mut detector = Detector::new(rules.clone());
            let (s, r, c) = pass(&events, &mut detector, args.checkpoint_every, args.evaluate_every.as_millis(), memory);
            if round > 0 {
                seconds.push(s);
                (rows, changes) = (r, c);
            }
        }
        seconds.sort_by(f64::total_cmp);
        let median = seconds[seconds.len() / 2];
        let rate = args.events as f64 / median;
        let goal = if rate >= 1_000_000.0 { "met" } else { "not met" };
        let _ = writeln!(out, "| {name} | {rate:.0} | {median:.3} | {rows} | {changes} | {goal} |");
    }
    Ok(out)
}
