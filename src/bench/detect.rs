//! `bearwatch bench detect`: what the pipeline's windows and rules catch when known bursts of
//! negative news are injected into a real, dense stream. The stream (the Reuters ModApte training
//! stories, six weeks of 1987) and the burst texts are scored once by the pipeline's model; each
//! burst is then put into the stream alone and replayed through `detect::replay`, the calls the
//! running pipeline makes (the backtest test shows they give the demo's alerts, ids included).
//!
//! The bursts are drawn so that they cannot flatter the rules: every topic the stream or the pool
//! has gets bursts in turn, busy ones included; sizes (`--sizes`) and spans (`--spans`) form a
//! grid; a burst either adds negative stories (`added`) or turns the topic's own neutral and
//! positive stories in its span negative (`turned`: the same volume, a different share); its texts
//! are modern headlines never trained on (`--pool`) or the stream's own negative stories of the
//! topic, sent again at the burst's times (`stream`), in turn.
//!
//! A burst is caught when an episode of its topic or of `all` fires from its first story until
//! `--horizon` after its last; the delay is the newest story time read when it fired, minus the
//! burst's first story. Alerts per caught burst say whether a surge raised one alert. Episodes no
//! burst explains are counted per week, with and without injection.
//!
//! Goals (issue 33): bursts of ≥ 12 stories within 2 h caught with recall ≥ 0.95 in every topic,
//! median delay ≤ 1 h, ≤ 0.5 unexplained episodes a week, one alert per surge.

use std::collections::{BTreeMap, BTreeSet};
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
use crate::pipeline::backtest::{Share, wilson};
use crate::pipeline::{PipelineConfig, PipelineError, bundled};
use crate::rng::Lcg;
use crate::window::{ALL, Folding, WindowSpec};

const HOUR_MS: f64 = 3_600_000.0;
const WEEK_MS: f64 = 7.0 * 86_400_000.0;
const DAY_MS: i64 = 86_400_000;

/// How a burst changes the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum BurstKind {
    /// Negative stories added to the topic's own.
    Added,
    /// The topic's own neutral and positive stories in the span turned negative: volume unchanged.
    Turned,
}

impl BurstKind {
    fn as_str(self) -> &'static str {
        match self {
            BurstKind::Added => "added",
            BurstKind::Turned => "turned",
        }
    }
}

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
    /// Labelled texts the model never trained on (`{"text", "head", "label"}` lines); modern
    /// bursts are made of the sentiment-negative ones, grouped by the topic the model gives them.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "benches/data/loop/sentfin-dev.jsonl,benches/data/loop/phrasebank-dev.jsonl,benches/data/loop/tweets-dev.jsonl"
    )]
    pub pool: Vec<PathBuf>,
    /// Bursts per seed in each cell of sizes × spans × kinds, each replayed on its own.
    #[arg(long, default_value_t = 2)]
    pub bursts: usize,
    /// Each seed draws its own bursts (topics, times, texts).
    #[arg(long, value_delimiter = ',', default_value = "1,2,3")]
    pub seeds: Vec<u64>,
    /// Stories in a burst.
    #[arg(long, value_delimiter = ',', default_value = "6,12,24")]
    pub sizes: Vec<usize>,
    /// A burst's stories fall at random times within this span of its start.
    #[arg(long, value_delimiter = ',', default_value = "1h,2h,6h", value_parser = HumanDuration::parse)]
    pub spans: Vec<HumanDuration>,
    #[arg(long, value_delimiter = ',', default_value = "added,turned")]
    pub kinds: Vec<BurstKind>,
    /// How long after a burst's last story a firing still counts as catching it.
    #[arg(long, default_value = "24h", value_parser = HumanDuration::parse)]
    pub horizon: HumanDuration,
    /// No burst starts in the stream's first stretch, so that baselines have history.
    #[arg(long, default_value = "7d", value_parser = HumanDuration::parse)]
    pub warmup: HumanDuration,
    /// Replays run side by side on this many threads (default: the machine's cores).
    #[arg(long)]
    pub threads: Option<usize>,
}

/// Where a burst's texts come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Source {
    /// Modern headlines and tweets the model never trained on.
    Pool,
    /// The stream's own negative stories of the topic, from more than a day away, sent again.
    Stream,
}

impl Source {
    fn as_str(self) -> &'static str {
        match self {
            Source::Pool => "modern headlines",
            Source::Stream => "the stream's own style",
        }
    }
}

/// What a burst was drawn as: its seed and its cell of the grid.
#[derive(Clone)]
struct Drawn {
    seed: u64,
    topic: String,
    kind: BurstKind,
    size: usize,
    span_ms: i64,
    source: Source,
}

/// One burst: stories added to the stream and stories of the stream replaced.
struct Burst {
    drawn: Drawn,
    added: Vec<Story>,
    replaced: Vec<(usize, Story)>,
}

impl Burst {
    fn stories(&self) -> impl Iterator<Item = &Story> {
        self.added.iter().chain(self.replaced.iter().map(|(_, s)| s))
    }

    fn first_and_last(&self) -> (i64, i64) {
        let times = || self.stories().map(|s| s.published_ms);
        (times().min().unwrap_or(0), times().max().unwrap_or(0))
    }
}

/// One injected burst and what the rules made of it.
struct Outcome {
    drawn: Drawn,
    /// Burst stories the model read as negative.
    read_negative: usize,
    /// Event-time delay and the rule of the first firing that caught it.
    caught: Option<(i64, String)>,
    /// Firings that explain it: one per surge is the goal.
    alerts: usize,
    /// Firings in the replay that no burst explains.
    unexplained: usize,
}

/// A firing: which rule, on which group, and the newest story time read when it fired.
struct Firing {
    rule: String,
    topic: Option<String>,
    seen_ms: i64,
    summary: String,
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

fn firings(spec: WindowSpec, folding: Option<Folding>, rules: &[crate::detect::Rule], every_ms: i64, stories: &[Story]) -> Vec<Firing> {
    replay_timed(spec, folding, &mut Detector::new(rules.to_vec()), every_ms, stories)
        .into_iter()
        .filter(|(_, a)| a.state == AlertState::Firing)
        .map(|(seen_ms, a)| Firing { rule: a.rule, topic: if a.group.contains_key("ticker") { None } else { a.group.get("topic").cloned() }, seen_ms, summary: a.summary })
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
    let mut stories: Vec<Story> = news.into_iter().zip(scores).map(|(n, (s, _))| story(n.id.clone(), n.published_ms(), n.headline, s)).collect();
    stories.sort_by(|a, b| (a.published_ms, &a.id).cmp(&(b.published_ms, &b.id)));
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

/// What bursts are drawn from: the scored stream, the pool, and the times a burst may start.
struct Material<'a> {
    base: &'a [Story],
    pool: &'a BTreeMap<String, Vec<(String, Scores)>>,
    earliest: i64,
    latest: i64,
}

impl Material<'_> {
    fn weekday_start(&self, rng: &mut Lcg) -> Option<i64> {
        (0..100_000).map(|_| self.earliest + (rng.next_f64() * (self.latest - self.earliest) as f64) as i64).find(|&t| weekday(t))
    }

    /// `count` negative texts of `topic` from `source` (the other source tops up a short one), none
    /// of the stream's within a day of `at`; None when both together have too few.
    /// Each text comes as a scored story without id or time.
    fn texts(&self, rng: &mut Lcg, topic: &str, source: Source, count: usize, at: i64) -> Option<Vec<Story>> {
        let pool = || self.pool.get(topic).into_iter().flatten().map(|(text, scores)| story(String::new(), 0, text.clone(), scores.clone()));
        let stream = || self.base.iter().filter(|s| s.topic == topic && s.sentiment == "negative" && (s.published_ms - at).abs() > DAY_MS).cloned();
        let mut texts: Vec<Story> = match source {
            Source::Pool => pool().collect(),
            Source::Stream => stream().collect(),
        };
        let mut drawn = Vec::with_capacity(count);
        while drawn.len() < count && !texts.is_empty() {
            drawn.push(texts.swap_remove(rng.below(texts.len())));
        }
        if drawn.len() < count {
            let mut others: Vec<Story> = match source {
                Source::Pool => stream().collect(),
                Source::Stream => pool().collect(),
            };
            while drawn.len() < count && !others.is_empty() {
                drawn.push(others.swap_remove(rng.below(others.len())));
            }
        }
        (drawn.len() == count).then_some(drawn)
    }

    /// The burst `drawn` asks for, its stories' ids numbered by `id`; None when the stream and
    /// pool are too thin for it.
    fn draw(&self, rng: &mut Lcg, id: usize, drawn: Drawn) -> Option<Burst> {
        let Drawn { seed, kind, size, span_ms, source, .. } = drawn;
        let topic = drawn.topic.clone();
        let topic = topic.as_str();
        let mut burst = Burst { drawn, added: Vec::new(), replaced: Vec::new() };
        match kind {
            BurstKind::Added => {
                let start = self.weekday_start(rng)?;
                for (i, text) in self.texts(rng, topic, source, size, start)?.into_iter().enumerate() {
                    let at = start + (rng.next_f64() * span_ms as f64) as i64;
                    burst.added.push(Story { id: format!("burst-{seed}-{id}-{i}"), published_ms: at, ..text });
                }
            }
            BurstKind::Turned => {
                // A weekday span that holds `size` of the topic's stories not read negative.
                let (start, mut own) = (0..2_000).find_map(|_| {
                    let start = self.weekday_start(rng)?;
                    let from = self.base.partition_point(|s| s.published_ms < start);
                    let own: Vec<usize> = (from..self.base.len())
                        .take_while(|&i| self.base[i].published_ms < start + span_ms)
                        .filter(|&i| self.base[i].topic == topic && self.base[i].sentiment != "negative")
                        .collect();
                    (own.len() >= size).then_some((start, own))
                })?;
                for text in self.texts(rng, topic, source, size, start)? {
                    let index = own.swap_remove(rng.below(own.len()));
                    let original = &self.base[index];
                    burst.replaced.push((index, Story { id: original.id.clone(), published_ms: original.published_ms, topic: topic.to_string(), ..text }));
                }
            }
        }
        Some(burst)
    }
}

/// Replays each burst alone and sees what fired: `threads` replays at a time.
fn measure(bursts: &[Burst], base: &[Story], threads: usize, replay: &(dyn Fn(&[Story]) -> Vec<Firing> + Sync), horizon_ms: i64) -> Vec<Outcome> {
    let next = std::sync::atomic::AtomicUsize::new(0);
    let done = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(|| {
                loop {
                    let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(burst) = bursts.get(i) else { break };
                    let mut stories = base.to_vec();
                    for (index, turned) in &burst.replaced {
                        stories[*index] = turned.clone();
                    }
                    stories.extend(burst.added.iter().cloned());
                    let found = replay(&stories);
                    let (from, to) = burst.first_and_last();
                    let explained = |f: &&Firing| explains(f, &burst.drawn.topic, from, to + horizon_ms);
                    let caught = found.iter().filter(explained).min_by_key(|f| f.seen_ms).map(|f| (f.seen_ms - from, f.rule.clone()));
                    let outcome = Outcome {
                        drawn: burst.drawn.clone(),
                        read_negative: burst.stories().filter(|s| s.sentiment == "negative").count(),
                        caught,
                        alerts: found.iter().filter(explained).count(),
                        unexplained: found.iter().filter(|f| !explained(f)).count(),
                    };
                    if let Ok(mut done) = done.lock() {
                        done.push((i, outcome));
                    }
                }
            });
        }
    });
    let mut done = done.into_inner().unwrap_or_default();
    done.sort_by_key(|(i, _)| *i);
    done.into_iter().map(|(_, o)| o).collect()
}

pub fn run(args: &DetectBenchArgs, config: &PipelineConfig) -> Result<String, PipelineError> {
    if args.bursts == 0 || args.seeds.is_empty() || args.sizes.is_empty() || args.spans.is_empty() || args.kinds.is_empty() || args.sizes.contains(&0) {
        return Err(PipelineError::Usage("--bursts, --seeds, --sizes, --spans and --kinds need at least one value, and sizes at least 1".into()));
    }
    let rule_paths = if args.rules.is_empty() { config.alerts.rules.clone() } else { args.rules.clone() };
    let rules = crate::pipeline::backtest::load_rules(&rule_paths)?.rules;
    let classifier = Classifier::start(&config.model)?;
    let model = classifier.spec().id().to_string();
    let folding = crate::pipeline::folding(config, classifier.spec().near_duplicates);
    let (base, skipped) = read_stream(&bundled(&args.stream), &classifier, config.model.body_chars)?;
    let pool = read_pool(&args.pool, &classifier)?;
    drop(classifier);
    let topics: Vec<String> = base.iter().map(|s| s.topic.clone()).chain(pool.keys().cloned()).filter(|t| t != ALL).collect::<BTreeSet<_>>().into_iter().collect();

    let first = base.first().map_or(0, |s| s.published_ms);
    let last = base.last().map_or(0, |s| s.published_ms);
    let weeks = (last - first) as f64 / WEEK_MS;
    let longest = args.spans.iter().map(HumanDuration::as_millis).max().unwrap_or(0);
    let material = Material { base: &base, pool: &pool, earliest: first + args.warmup.as_millis(), latest: last - longest - args.horizon.as_millis() };
    if material.latest <= material.earliest {
        return Err(PipelineError::Usage("the stream is shorter than --warmup + the longest --spans + --horizon".into()));
    }
    let spec = WindowSpec::from_config(&config.window);
    let every = config.alerts.evaluate_every.as_millis();
    let quiet = firings(spec, folding, &rules, every, &base);

    // Every seed walks the topics in its own order, one burst each, across the grid.
    let mut bursts = Vec::new();
    let mut not_drawn: BTreeMap<(String, BurstKind, usize, i64), usize> = BTreeMap::new();
    for &seed in &args.seeds {
        let mut rng = generator(seed);
        let mut order = topics.clone();
        for i in (1..order.len()).rev() {
            order.swap(i, rng.below(i + 1));
        }
        let mut id = 0;
        for &kind in &args.kinds {
            for &size in &args.sizes {
                for span in &args.spans {
                    for b in 0..args.bursts {
                        // A topic too thin for this burst is noted, and the next one takes it.
                        for _ in 0..order.len() {
                            let topic = order[id % order.len()].clone();
                            let source = if (id / order.len() + b).is_multiple_of(2) { Source::Pool } else { Source::Stream };
                            id += 1;
                            let drawn = Drawn { seed, topic: topic.clone(), kind, size, span_ms: span.as_millis(), source };
                            match material.draw(&mut rng, id, drawn) {
                                Some(burst) => {
                                    bursts.push(burst);
                                    break;
                                }
                                None => *not_drawn.entry((topic, kind, size, span.as_millis())).or_default() += 1,
                            }
                        }
                    }
                }
            }
        }
    }
    if bursts.is_empty() {
        return Err(PipelineError::Usage("no burst could be drawn: the stream and pool are too thin for these sizes".into()));
    }
    let threads = args.threads.unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from));
    let replay = |stories: &[Story]| firings(spec, folding, &rules, every, stories);
    let outcomes = measure(&bursts, &base, threads, &replay, args.horizon.as_millis());
    if outcomes.len() != bursts.len() {
        return Err(failed("a replay thread stopped early"));
    }
    let context = Context { rule_paths: &rule_paths, config, model: &model, base: base.len(), skipped, first, last, weeks, pool: &pool, topics: &topics, quiet: &quiet, rules: &rules, not_drawn: &not_drawn };
    Ok(render(args, &context, &outcomes))
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
    topics: &'a [String],
    quiet: &'a [Firing],
    rules: &'a [crate::detect::Rule],
    not_drawn: &'a BTreeMap<(String, BurstKind, usize, i64), usize>,
}

fn hours(ms: i64) -> f64 {
    ms as f64 / HOUR_MS
}

/// One row's numbers: caught, recall with its interval, median and worst delay (hours), unexplained
/// firings per week, and the most alerts one caught burst raised.
struct Summary {
    caught: usize,
    recall: Option<Share>,
    delays: Option<(f64, f64)>,
    unexplained: f64,
    most_alerts: usize,
}

fn summary(outcomes: &[&Outcome], weeks: f64) -> Summary {
    let caught: Vec<f64> = outcomes.iter().filter_map(|o| o.caught.as_ref().map(|(d, _)| hours(*d))).collect();
    let delays = (!caught.is_empty()).then(|| {
        let mut d = caught.clone();
        (median(&mut d), d.iter().copied().fold(f64::MIN, f64::max))
    });
    let unexplained = outcomes.iter().map(|o| o.unexplained as f64).sum::<f64>() / outcomes.len().max(1) as f64 / weeks.max(f64::MIN_POSITIVE);
    Summary {
        caught: caught.len(),
        recall: wilson(caught.len(), outcomes.len()),
        delays,
        unexplained,
        most_alerts: outcomes.iter().map(|o| o.alerts).max().unwrap_or(0),
    }
}

fn share(s: &Option<Share>) -> String {
    s.as_ref().map_or("—".into(), |s| format!("{:.2} ({:.2}–{:.2})", s.value, s.low, s.high))
}

/// A 95 % interval for the mean of a Poisson count `k` (Garwood's, with the Wilson–Hilferty
/// approximation of the chi-square quantiles: within a few percent for any k).
fn poisson_interval(k: usize) -> (f64, f64) {
    let chi_square = |p_z: f64, dof: f64| dof * (1.0 - 2.0 / (9.0 * dof) + p_z * (2.0 / (9.0 * dof)).sqrt()).powi(3);
    let low = if k == 0 { 0.0 } else { chi_square(-1.959_964, 2.0 * k as f64) / 2.0 };
    (low.max(0.0), chi_square(1.959_964, 2.0 * k as f64 + 2.0) / 2.0)
}

/// Which outcomes a row of a breakdown table counts.
type Keep = Box<dyn Fn(&Outcome) -> bool>;

/// The bursts the goals speak of: at least 12 stories within 2 h.
fn in_goal(o: &Outcome) -> bool {
    o.drawn.size >= 12 && o.drawn.span_ms <= 2 * HOUR_MS as i64
}

fn render(args: &DetectBenchArgs, cx: &Context<'_>, outcomes: &[Outcome]) -> String {
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
    let list = |items: Vec<String>| items.join(", ");
    let _ = writeln!(
        out,
        "bursts: sizes {} within spans {}, kinds {} (added: new negative stories; turned: the topic's own neutral and positive stories in the span turned negative), \
         {} per cell and seed, topics in turn: {}; texts from {pool_size} negative pool texts never trained on and the stream's own negative stories, in turn; \
         each burst starts at a random weekday time after the first {} and is replayed alone\n\
         caught: an episode of the burst's topic or `all` fires from its first story to {} after its last (at the newest story time read)\n",
        list(args.sizes.iter().map(usize::to_string).collect()),
        list(args.spans.iter().map(HumanDuration::to_string).collect()),
        list(args.kinds.iter().map(|k| k.as_str().to_string()).collect()),
        args.bursts,
        cx.topics.join(", "),
        args.warmup,
        args.horizon
    );
    let quiet_per_week = cx.quiet.len() as f64 / cx.weeks.max(f64::MIN_POSITIVE);
    out.push_str("| seed | bursts | caught | recall (95 %) | median delay h | worst delay h | unexplained episodes / week, injected | without injection | most alerts for one burst |\n|---|---:|---:|---|---:|---:|---:|---:|---:|\n");
    let row = |out: &mut String, name: &str, of: &[&Outcome]| {
        let s = summary(of, cx.weeks);
        let (median, worst) = s.delays.map_or(("—".into(), "—".into()), |(m, w)| (format!("{m:.2}"), format!("{w:.2}")));
        let _ = writeln!(out, "| {name} | {} | {} | {} | {median} | {worst} | {:.2} | {quiet_per_week:.2} | {} |", of.len(), s.caught, share(&s.recall), s.unexplained, s.most_alerts);
    };
    let seeds: BTreeSet<u64> = outcomes.iter().map(|o| o.drawn.seed).collect();
    for seed in &seeds {
        row(&mut out, &seed.to_string(), &outcomes.iter().filter(|o| o.drawn.seed == *seed).collect::<Vec<_>>());
    }
    let all: Vec<&Outcome> = outcomes.iter().collect();
    row(&mut out, "all", &all);

    let goal: Vec<&Outcome> = all.iter().copied().filter(|o| in_goal(o)).collect();
    let g = summary(&goal, cx.weeks);
    let topic_recalls: Vec<(String, usize, usize)> = cx
        .topics
        .iter()
        .map(|t| {
            let of: Vec<&Outcome> = goal.iter().copied().filter(|o| &o.drawn.topic == t).collect();
            (t.clone(), of.iter().filter(|o| o.caught.is_some()).count(), of.len())
        })
        .filter(|(_, _, n)| *n > 0)
        .collect();
    let worst_topic = topic_recalls.iter().min_by(|a, b| (a.1 * b.2).cmp(&(b.1 * a.2)));
    let met = |ok: bool| if ok { "met" } else { "NOT met" };
    let _ = writeln!(
        out,
        "\nbursts of ≥ 12 stories within ≤ 2 h: {} of {}, recall {}; lowest topic {}; median delay {} h; most alerts for one burst {}.\n\
         Goals: recall ≥ 0.95 {} (in every topic: {}); median delay ≤ 1 h {}; ≤ 0.5 unexplained episodes / week {} (injected), {} (without); one alert per surge {}\n",
        g.caught,
        goal.len(),
        share(&g.recall),
        worst_topic.map_or("—".into(), |(t, c, n)| format!("{t} {c} of {n}")),
        g.delays.map_or("—".into(), |(m, _)| format!("{m:.2}")),
        g.most_alerts,
        met(g.recall.as_ref().is_some_and(|r| r.value >= 0.95)),
        met(topic_recalls.iter().all(|(_, c, n)| *c as f64 >= 0.95 * *n as f64)),
        met(g.delays.is_some_and(|(m, _)| m <= 1.0)),
        met(g.unexplained <= 0.5),
        met(quiet_per_week <= 0.5),
        met(g.most_alerts <= 1)
    );
    let (low, high) = poisson_interval(cx.quiet.len());
    let _ = writeln!(
        out,
        "episodes without injection: {} in {:.1} weeks, {quiet_per_week:.2} a week (95 % interval {:.2}–{:.2}: one stream is one sample)\n",
        cx.quiet.len(),
        cx.weeks,
        low / cx.weeks.max(f64::MIN_POSITIVE),
        high / cx.weeks.max(f64::MIN_POSITIVE)
    );

    let breakdown = |out: &mut String, title: &str, keys: Vec<(String, Keep)>| {
        let _ = writeln!(out, "| {title} | bursts | caught | recall (95 %) | median delay h | most alerts for one burst |\n|---|---:|---:|---|---:|---:|");
        for (name, keep) in keys {
            let of: Vec<&Outcome> = all.iter().copied().filter(|o| keep(o)).collect();
            if of.is_empty() {
                continue;
            }
            let s = summary(&of, cx.weeks);
            let _ = writeln!(out, "| {name} | {} | {} | {} | {} | {} |", of.len(), s.caught, share(&s.recall), s.delays.map_or("—".into(), |(m, _)| format!("{m:.2}")), s.most_alerts);
        }
        out.push('\n');
    };
    let mut by_cell: Vec<(String, Keep)> = Vec::new();
    for &kind in &args.kinds {
        for &size in &args.sizes {
            for span in &args.spans {
                let span_ms = span.as_millis();
                by_cell.push((format!("{} {size} in {span}", kind.as_str()), Box::new(move |o: &Outcome| o.drawn.kind == kind && o.drawn.size == size && o.drawn.span_ms == span_ms)));
            }
        }
    }
    breakdown(&mut out, "kind, size, span", by_cell);
    breakdown(&mut out, "size", args.sizes.iter().map(|&n| (n.to_string(), Box::new(move |o: &Outcome| o.drawn.size == n) as Keep)).collect());
    breakdown(
        &mut out,
        "texts",
        [Source::Pool, Source::Stream].into_iter().map(|source| (source.as_str().to_string(), Box::new(move |o: &Outcome| o.drawn.source == source) as Keep)).collect(),
    );

    out.push_str("| topic | bursts | caught | recall (95 %) | ≥ 12 in ≤ 2 h: caught of | median delay h | burst stories read negative | not drawn (too few texts or stories) |\n|---|---:|---:|---|---:|---:|---:|---:|\n");
    for topic in cx.topics {
        let of: Vec<&Outcome> = all.iter().copied().filter(|o| &o.drawn.topic == topic).collect();
        let missing: usize = cx.not_drawn.iter().filter(|((t, ..), _)| t == topic).map(|(_, n)| n).sum();
        if of.is_empty() && missing == 0 {
            continue;
        }
        let s = summary(&of, cx.weeks);
        let stories: usize = of.iter().map(|o| o.drawn.size).sum();
        let negative = of.iter().map(|o| o.read_negative).sum::<usize>() as f64 / stories.max(1) as f64;
        let goal = topic_recalls.iter().find(|(t, ..)| t == topic).map_or("—".into(), |(_, c, n)| format!("{c} of {n}"));
        let _ = writeln!(
            out,
            "| {topic} | {} | {} | {} | {goal} | {} | {:.0} % | {missing} |",
            of.len(),
            s.caught,
            share(&s.recall),
            s.delays.map_or("—".into(), |(m, _)| format!("{m:.2}")),
            negative * 100.0
        );
    }
    out.push_str("\n| episode without injection (rule) | fired at (newest story read) | why |\n|---|---|---|\n");
    for f in cx.quiet {
        let _ = writeln!(out, "| {} | {} | {} |", f.rule, time(f.seen_ms), f.summary.replace('|', "/"));
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
        Firing { rule: "r".into(), topic: topic.map(str::to_string), seen_ms, summary: String::new() }
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
    fn poisson_intervals_match_garwoods_table() {
        // Garwood (1936): k = 0 → (0, 3.689), 3 → (0.619, 8.767), 10 → (4.795, 18.39).
        for (k, low, high) in [(0, 0.0, 3.689), (3, 0.619, 8.767), (10, 4.795, 18.39)] {
            let (l, h) = poisson_interval(k);
            assert!((l - low).abs() < 0.05 && (h - high).abs() / high < 0.02, "{k}: {l} {h}");
        }
    }

    #[test]
    fn seeds_draw_unrelated_numbers() {
        let (a, b) = (generator(1).next_f64(), generator(2).next_f64());
        assert!((a - b).abs() > 1e-6);
        assert_eq!(generator(7).next_f64(), generator(7).next_f64());
    }
}
