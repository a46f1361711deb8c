//! `bearwatch bench detect`: what the pipeline's windows and rules catch when known bursts of
//! negative news are injected into a real, dense stream. The stream (the Reuters ModApte training
//! stories, six weeks of 1987) and a pool of labelled negative texts the model never trained on are
//! scored once by the pipeline's model; each burst (`--burst-stories` pool texts of one topic, at
//! random times within `--burst-span`, starting at a random weekday time) is then added to the
//! stream alone and replayed through `detect::replay`, the calls the running pipeline makes (the
//! backtest test shows they give the demo's alerts, ids included).
//!
//! A burst is caught when an episode of its topic or of `all` fires from its first story until
//! `--horizon` after its last; the delay is the newest story time read when it fired, minus the
//! burst's first story. Episodes no burst explains are counted per week, with and without injection.
//!
//! Goals (issue 17): recall ≥ 0.9, median delay ≤ 2 h, ≤ 1 unexplained episode per week.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use chrono::Datelike;
use sha2::Digest;

use super::{failed, median};
use crate::classify::Classifier;
use crate::config::HumanDuration;
use crate::detect::replay::{Story, replay_timed};
use crate::detect::{AlertState, Detector};
use crate::feedback::Head;
use crate::learn;
use crate::news::{News, Scores};
use crate::pipeline::{PipelineConfig, PipelineError, bundled};
use crate::rng::Lcg;
use crate::window::{ALL, WindowSpec};

const HOUR_MS: f64 = 3_600_000.0;
const WEEK_MS: f64 = 7.0 * 86_400_000.0;

#[derive(Debug, Clone, clap::Args)]
pub struct DetectBenchArgs {
    /// The pipeline whose `[model]`, `[window]` and `[alerts]` are measured (default: the demo's).
    #[arg(long)]
    pub pipeline: Option<PathBuf>,
    /// Rule files to measure instead of the pipeline's `[alerts] rules`.
    #[arg(long, value_delimiter = ',')]
    pub rules: Vec<PathBuf>,
    /// The stream bursts are injected into: news JSON lines with their own `published_at`.
    #[arg(long, default_value = "../shared/data/reuters21578/modapte_train.jsonl")]
    pub stream: PathBuf,
    /// Labelled texts the model never trained on (`{"text", "head", "label"}` lines); bursts are
    /// made of the sentiment-negative ones, grouped by the topic the model gives them.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "benches/data/loop/sentfin-dev.jsonl,benches/data/loop/phrasebank-dev.jsonl,benches/data/loop/tweets-dev.jsonl"
    )]
    pub pool: Vec<PathBuf>,
    /// Bursts per seed, each replayed on its own.
    #[arg(long, default_value_t = 20)]
    pub bursts: usize,
    /// Each seed draws its own bursts (topics, times, texts).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub seeds: Vec<u64>,
    /// Stories in a burst.
    #[arg(long, default_value_t = 12)]
    pub burst_stories: usize,
    /// A burst's stories fall at random times within this span of its start.
    #[arg(long, default_value = "2h", value_parser = HumanDuration::parse)]
    pub burst_span: HumanDuration,
    /// How long after a burst's last story a firing still counts as catching it.
    #[arg(long, default_value = "24h", value_parser = HumanDuration::parse)]
    pub horizon: HumanDuration,
    /// No burst starts in the stream's first stretch, so that baselines have history.
    #[arg(long, default_value = "7d", value_parser = HumanDuration::parse)]
    pub warmup: HumanDuration,
}

/// One injected burst and what the rules made of it.
struct Outcome {
    topic: String,
    /// Burst stories the model read as negative.
    read_negative: usize,
    /// Event-time delay and the rule of the first firing that caught it.
    caught: Option<(i64, String)>,
    /// Firings in the replay that no burst explains.
    unexplained: usize,
}

/// A firing: which rule, on which group, and the newest story time read when it fired.
struct Firing {
    rule: String,
    topic: Option<String>,
    seen_ms: i64,
}

fn story(id: String, published_ms: i64, headline: String, scores: Scores) -> Story {
    Story {
        id,
        published_ms,
        headline,
        topic: scores.topic,
        tickers: Vec::new(),
        sentiment: scores.sentiment.to_string(),
        sentiment_score: scores.sentiment_score,
        p_negative: scores.p_negative,
    }
}

/// A generator whose state depends on every bit of `seed`, so that seeds 1, 2, 3 are unrelated.
fn generator(seed: u64) -> Lcg {
    let digest = sha2::Sha256::digest(format!("bearwatch-detect-{seed}").as_bytes());
    Lcg(u64::from_be_bytes(digest[..8].try_into().unwrap_or_default()))
}

fn weekday(ms: i64) -> bool {
    chrono::DateTime::from_timestamp_millis(ms).is_some_and(|t| t.weekday().number_from_monday() <= 5)
}

fn firings(spec: WindowSpec, rules: &[crate::detect::Rule], every_ms: i64, stories: &[Story]) -> Vec<Firing> {
    replay_timed(spec, &mut Detector::new(rules.to_vec()), every_ms, stories)
        .into_iter()
        .filter(|(_, a)| a.state == AlertState::Firing)
        .map(|(seen_ms, a)| Firing { rule: a.rule, topic: if a.group.contains_key("ticker") { None } else { a.group.get("topic").cloned() }, seen_ms })
        .collect()
}

/// Whether `firing` is the rules' answer to a burst of `topic` from `from_ms` to `to_ms`.
fn explains(firing: &Firing, topic: &str, from_ms: i64, to_ms: i64) -> bool {
    firing.topic.as_deref().is_some_and(|t| t == topic || t == ALL) && (from_ms..=to_ms).contains(&firing.seen_ms)
}

/// The scored stories of a news JSON-lines file; lines that are not news are skipped and counted.
fn read_stream(path: &Path, classifier: &Classifier, body_chars: usize) -> Result<(Vec<Story>, usize), PipelineError> {
    let text = std::fs::read_to_string(path).map_err(|e| PipelineError::Usage(format!("{}: {e} (pass --stream)", path.display())))?;
    let mut news = Vec::new();
    let mut skipped = 0;
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        match News::from_json(line.as_bytes()) {
            Ok(n) => news.push(n),
            Err(_) => skipped += 1,
        }
    }
    if news.is_empty() {
        return Err(PipelineError::Usage(format!("{}: no news stories", path.display())));
    }
    let texts: Vec<String> = news.iter().map(|n| n.classification_text(body_chars)).collect();
    let scores = classifier.score_all(&texts.iter().map(String::as_str).collect::<Vec<_>>())?;
    let stories = news.into_iter().zip(scores).map(|(n, (s, _))| story(n.id.clone(), n.published_ms(), n.headline, s)).collect();
    Ok((stories, skipped))
}

/// The pool's negative texts, scored, by the topic the model gives them.
fn read_pool(paths: &[PathBuf], classifier: &Classifier) -> Result<BTreeMap<String, Vec<(String, Scores)>>, PipelineError> {
    let (mut texts, mut seen) = (Vec::new(), std::collections::HashSet::new());
    for path in paths {
        for e in learn::read_examples(&bundled(path))? {
            if e.head == Head::Sentiment && e.label == "negative" && seen.insert(e.text.clone()) {
                texts.push(e.text);
            }
        }
    }
    let scores = classifier.score_all(&texts.iter().map(String::as_str).collect::<Vec<_>>())?;
    let mut by_topic: BTreeMap<String, Vec<(String, Scores)>> = BTreeMap::new();
    for (text, (s, _)) in texts.into_iter().zip(scores) {
        by_topic.entry(s.topic.clone()).or_default().push((text, s));
    }
    Ok(by_topic)
}

pub fn run(args: &DetectBenchArgs, config: &PipelineConfig) -> Result<String, PipelineError> {
    if args.burst_stories == 0 || args.bursts == 0 || args.seeds.is_empty() {
        return Err(PipelineError::Usage("--burst-stories, --bursts and --seeds must be at least 1".into()));
    }
    let rule_paths = if args.rules.is_empty() { config.alerts.rules.clone() } else { args.rules.clone() };
    let rules = crate::pipeline::backtest::load_rules(&rule_paths)?.rules;
    let classifier = Classifier::start(&config.model)?;
    let model = classifier.spec().id().to_string();
    let (base, skipped) = read_stream(&bundled(&args.stream), &classifier, config.model.body_chars)?;
    let pool = read_pool(&args.pool, &classifier)?;
    drop(classifier);
    let topics: Vec<&String> = pool.iter().filter(|(_, texts)| texts.len() >= args.burst_stories).map(|(t, _)| t).collect();
    if topics.is_empty() {
        return Err(PipelineError::Usage(format!("no topic has {} negative pool texts", args.burst_stories)));
    }

    let first = base.iter().map(|s| s.published_ms).min().unwrap_or(0);
    let last = base.iter().map(|s| s.published_ms).max().unwrap_or(0);
    let weeks = (last - first) as f64 / WEEK_MS;
    let span = args.burst_span.as_millis();
    let (earliest, latest) = (first + args.warmup.as_millis(), last - span - args.horizon.as_millis());
    if latest <= earliest {
        return Err(PipelineError::Usage("the stream is shorter than --warmup + --burst-span + --horizon".into()));
    }
    let spec = WindowSpec::from_config(&config.window);
    let every = config.alerts.evaluate_every.as_millis();
    let quiet = firings(spec.clone(), &rules, every, &base);

    let mut outcomes: BTreeMap<u64, Vec<Outcome>> = BTreeMap::new();
    for &seed in &args.seeds {
        let mut rng = generator(seed);
        for b in 0..args.bursts {
            let topic = topics[rng.below(topics.len())].clone();
            let start = (0..100_000)
                .map(|_| earliest + (rng.next_f64() * (latest - earliest) as f64) as i64)
                .find(|&t| weekday(t))
                .ok_or_else(|| failed("no weekday time in the stream"))?;
            let mut texts: Vec<&(String, Scores)> = pool[&topic].iter().collect();
            let mut burst = Vec::with_capacity(args.burst_stories);
            for i in 0..args.burst_stories {
                let (text, scores) = texts.swap_remove(rng.below(texts.len()));
                let at = start + (rng.next_f64() * span as f64) as i64;
                burst.push(story(format!("burst-{seed}-{b}-{i}"), at, text.clone(), scores.clone()));
            }
            let (from, to) = (burst.iter().map(|s| s.published_ms).min().unwrap_or(start), burst.iter().map(|s| s.published_ms).max().unwrap_or(start));
            let read_negative = burst.iter().filter(|s| s.sentiment == "negative").count();
            let mut stories = base.clone();
            stories.extend(burst);
            let found = firings(spec.clone(), &rules, every, &stories);
            let horizon_end = to + args.horizon.as_millis();
            let caught = found.iter().filter(|f| explains(f, &topic, from, horizon_end)).min_by_key(|f| f.seen_ms).map(|f| (f.seen_ms - from, f.rule.clone()));
            let unexplained = found.iter().filter(|f| !explains(f, &topic, from, horizon_end)).count();
            outcomes.entry(seed).or_default().push(Outcome { topic, read_negative, caught, unexplained });
        }
    }
    Ok(render(args, &Context { rule_paths: &rule_paths, config, model: &model, base: base.len(), skipped, first, last, weeks, pool: &pool, topics: &topics, quiet: &quiet, rules: &rules }, &outcomes))
}

struct Context<'a> {
    rule_paths: &'a [PathBuf],
    config: &'a PipelineConfig,
    model: &'a str,
    base: usize,
    skipped: usize,
    first: i64,
    last: i64,
    weeks: f64,
    pool: &'a BTreeMap<String, Vec<(String, Scores)>>,
    topics: &'a [&'a String],
    quiet: &'a [Firing],
    rules: &'a [crate::detect::Rule],
}

fn hours(ms: i64) -> f64 {
    ms as f64 / HOUR_MS
}

/// Recall, median and worst delay (hours), unexplained firings per week: one row of the table.
fn summary(outcomes: &[&Outcome], weeks: f64) -> (usize, Option<crate::pipeline::backtest::Share>, Option<(f64, f64)>, f64) {
    let caught: Vec<f64> = outcomes.iter().filter_map(|o| o.caught.as_ref().map(|(d, _)| hours(*d))).collect();
    let delays = (!caught.is_empty()).then(|| {
        let mut d = caught.clone();
        (median(&mut d), d.iter().copied().fold(f64::MIN, f64::max))
    });
    let unexplained = outcomes.iter().map(|o| o.unexplained as f64).sum::<f64>() / outcomes.len().max(1) as f64 / weeks.max(f64::MIN_POSITIVE);
    (caught.len(), crate::pipeline::backtest::wilson(caught.len(), outcomes.len()), delays, unexplained)
}

fn render(args: &DetectBenchArgs, cx: &Context<'_>, outcomes: &BTreeMap<u64, Vec<Outcome>>) -> String {
    let time = crate::pipeline::backtest::time;
    let files: Vec<String> = cx.rule_paths.iter().map(|p| p.display().to_string()).collect();
    let w = &cx.config.window;
    let mut out = format!(
        "bench detect: rules {} with windows of {} sliding {}, lateness {}, rules every {} of event time; model {}\n",
        files.join(", "),
        w.size,
        w.slide.as_ref().map_or_else(|| w.size.to_string(), |s| s.to_string()),
        w.allowed_lateness,
        cx.config.alerts.evaluate_every,
        cx.model
    );
    let _ = writeln!(
        out,
        "stream {}: {} stories ({} lines skipped), {} to {} ({:.1} weeks)",
        args.stream.display(),
        cx.base,
        cx.skipped,
        time(cx.first),
        time(cx.last),
        cx.weeks
    );
    let pool_size: usize = cx.pool.values().map(Vec::len).sum();
    let _ = writeln!(
        out,
        "bursts: {} negative texts of one topic within {} from a random weekday time after the first {}, one burst per replay, {} per seed; \
         pool: {} negative texts never trained on, topics with at least {}: {}\n\
         caught: an episode of the burst's topic or `all` fires from its first story to {} after its last (at the newest story time read)\n",
        args.burst_stories,
        args.burst_span,
        args.warmup,
        args.bursts,
        pool_size,
        args.burst_stories,
        cx.topics.iter().map(|t| t.as_str()).collect::<Vec<_>>().join(", "),
        args.horizon
    );
    let quiet_per_week = cx.quiet.len() as f64 / cx.weeks.max(f64::MIN_POSITIVE);
    out.push_str("| seed | bursts | caught | recall (95 %) | median delay h | worst delay h | unexplained episodes / week, injected | without injection |\n|---|---:|---:|---|---:|---:|---:|---:|\n");
    let row = |out: &mut String, name: &str, of: &[&Outcome]| {
        let (caught, recall, delays, unexplained) = summary(of, cx.weeks);
        let recall = recall.map_or("—".into(), |s| format!("{:.2} ({:.2}–{:.2})", s.value, s.low, s.high));
        let (median, worst) = delays.map_or(("—".into(), "—".into()), |(m, w)| (format!("{m:.2}"), format!("{w:.2}")));
        let _ = writeln!(out, "| {name} | {} | {caught} | {recall} | {median} | {worst} | {unexplained:.2} | {quiet_per_week:.2} |", of.len());
    };
    for (seed, of) in outcomes {
        row(&mut out, &seed.to_string(), &of.iter().collect::<Vec<_>>());
    }
    let all: Vec<&Outcome> = outcomes.values().flatten().collect();
    row(&mut out, "all", &all);
    let recalls: Vec<f64> = outcomes.values().map(|of| summary(&of.iter().collect::<Vec<_>>(), cx.weeks).0 as f64 / of.len().max(1) as f64).collect();
    let mean = recalls.iter().sum::<f64>() / recalls.len() as f64;
    let sd = (recalls.iter().map(|r| (r - mean).powi(2)).sum::<f64>() / (recalls.len().max(2) - 1) as f64).sqrt();
    let (_, recall, delays, unexplained) = summary(&all, cx.weeks);
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let _ = writeln!(
        out,
        "\nrecall over seeds {mean:.2} ± {sd:.2} (sd). Goals: recall ≥ 0.9 {}; median delay ≤ 2 h {}; ≤ 1 unexplained episode / week {} (injected), {} (without)\n",
        met(recall.is_some_and(|r| r.value >= 0.9)),
        met(delays.is_some_and(|(m, _)| m <= 2.0)),
        met(unexplained <= 1.0),
        met(quiet_per_week <= 1.0)
    );

    out.push_str("| topic | bursts | caught | median delay h | burst stories read negative |\n|---|---:|---:|---:|---:|\n");
    for topic in cx.topics {
        let of: Vec<&Outcome> = all.iter().copied().filter(|o| &o.topic == *topic).collect();
        if of.is_empty() {
            continue;
        }
        let (caught, _, delays, _) = summary(&of, cx.weeks);
        let negative = of.iter().map(|o| o.read_negative as f64).sum::<f64>() / (of.len() * args.burst_stories) as f64;
        let _ = writeln!(out, "| {topic} | {} | {caught} | {} | {:.0} % |", of.len(), delays.map_or("—".into(), |(m, _)| format!("{m:.2}")), negative * 100.0);
    }
    out.push_str("\n| rule | bursts it caught first | episodes / week without injection |\n|---|---:|---:|\n");
    for rule in cx.rules {
        let first = all.iter().filter(|o| o.caught.as_ref().is_some_and(|(_, r)| *r == rule.name)).count();
        let quiet = cx.quiet.iter().filter(|f| f.rule == rule.name).count() as f64 / cx.weeks.max(f64::MIN_POSITIVE);
        let _ = writeln!(out, "| {} | {first} | {quiet:.2} |", rule.name);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn firing(topic: Option<&str>, seen_ms: i64) -> Firing {
        Firing { rule: "r".into(), topic: topic.map(str::to_string), seen_ms }
    }

    #[test]
    fn a_burst_is_explained_by_its_topic_or_all_within_its_time() {
        assert!(explains(&firing(Some("energy"), 10), "energy", 5, 20));
        assert!(explains(&firing(Some(ALL), 20), "energy", 5, 20));
        assert!(!explains(&firing(Some("metals"), 10), "energy", 5, 20));
        assert!(!explains(&firing(Some("energy"), 4), "energy", 5, 20), "fired before the burst began");
        assert!(!explains(&firing(None, 10), "energy", 5, 20), "a ticker's alert is not a topic's");
    }

    #[test]
    fn seeds_draw_unrelated_numbers() {
        let (a, b) = (generator(1).next_f64(), generator(2).next_f64());
        assert!((a - b).abs() > 1e-6);
        assert_eq!(generator(7).next_f64(), generator(7).next_f64());
    }
}
