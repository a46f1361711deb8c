//! `bearwatch bench windows`: event-time windows and alert rules alone, on pre-scored events, on one
//! core. This is the per-story work of the pipeline after the classifier: `WindowState::add`, closing
//! due windows (their final rows go to the rules), at each `evaluate_every` of event time the live
//! rows of changed windows to the rules, and every `checkpoint_every` events the live rows a
//! checkpoint writes to the table.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use crate::detect::{Detector, RuleFile};
use crate::news::SENTIMENTS;
use crate::rng::Lcg;
use crate::window::{Headline, WindowSpec, WindowState};

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
                story: Headline { id: format!("s{i}"), headline: format!("{} story {i}", TOPICS[topic]), p_negative, why: vec![] },
            }
        })
        .collect()
}

/// One pass; returns (seconds, window rows evaluated, alert changes).
fn pass(events: &[Event], detector: &mut Detector, checkpoint_every: usize, evaluate_every_ms: i64) -> (f64, usize, usize) {
    let spec = WindowSpec { size_ms: 3_600_000, slide_ms: 900_000, allowed_lateness_ms: 300_000, by_ticker: false };
    let mut windows = WindowState::new(spec);
    let (mut rows, mut changes) = (0, 0);
    let started = Instant::now();
    for (i, event) in events.iter().enumerate() {
        windows.add(event.ms, TOPICS[event.topic], &[], event.sentiment, event.score, &event.story);
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
    let mut files = Vec::new();
    for path in &args.rules {
        files.push(RuleFile::load(&crate::pipeline::bundled(path))?);
    }
    let rules = RuleFile::merge(files).rules;
    let rule_count = rules.len();
    let events = events(args.events);
    let mut seconds = Vec::new();
    let (mut rows, mut changes) = (0, 0);
    for round in 0..=args.repeats {
        let mut detector = Detector::new(rules.clone());
        let (s, r, c) = pass(&events, &mut detector, args.checkpoint_every, args.evaluate_every.as_millis());
        if round > 0 {
            seconds.push(s);
            (rows, changes) = (r, c);
        }
    }
    seconds.sort_by(f64::total_cmp);
    let median = seconds[seconds.len() / 2];
    let rate = args.events as f64 / median;
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
    let _ = writeln!(out, "| events/s per core | median s | window rows evaluated | alert changes | goal ≥ 1 M events/s |");
    let _ = writeln!(out, "|---:|---:|---:|---:|---|");
    let _ = writeln!(
        out,
        "| {:.0} | {:.3} | {} | {} | {} |",
        rate,
        median,
        rows,
        changes,
        if rate >= 1_000_000.0 { "met" } else { "not met" }
    );
    Ok(out)
}
