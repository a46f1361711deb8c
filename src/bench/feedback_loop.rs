//! `bearwatch bench loop`: plays the analyst through the whole people-in-the-loop path and measures
//! what it buys. A labelled set the model never trained on is split by the salted hash of each text;
//! the analyst reviews one part (labels every headline there, or only the model's mistakes) through
//! the same import as `bearwatch feedback import`, then `model retrain`, `model promote` and the swap
//! a running pipeline does (load, golden check) run as they do for users, timed. The champion and
//! the candidate are then compared, with paired 95 % intervals, on the untouched part and on the
//! other sets given (`--elsewhere`). Each repetition uses another salt, so another split.
//!
//! Goal: +5 points or more on the untouched part of a domain the champion never trained on, with
//! 1,000 labels, at most −0.5 point on any other set; 300 labels picked by the review queue gain
//! more than 300 picked at random (`--labels 300 --pick queue|random|uncertainty`).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use sha2::Digest;

use super::failed;
use crate::classify::{Classifier, ClassifierConfig};
use crate::feedback::{Channel, LabelRequest};
use crate::learn::{self, Comparison, Example, registry};
use crate::pipeline::PipelineError;
use crate::server::FeedbackService;

#[derive(Debug, Clone, clap::Args)]
pub struct LoopBenchArgs {
    /// The labelled texts the analyst reviews part of, never trained on (JSON lines `{"text",
    /// "head", "label", "set"?}`; `models/train/loop_sets.py` writes SEntFiN's dev and final splits).
    #[arg(long, default_value = "benches/data/loop/sentfin-dev.jsonl")]
    pub set: PathBuf,
    /// Sets the loop must not hurt, each reported on its own.
    #[arg(long, value_delimiter = ',', default_value = "benches/data/loop/phrasebank-dev.jsonl,benches/data/loop/tweets-dev.jsonl")]
    pub elsewhere: Vec<PathBuf>,
    /// The share of the set the analyst reviews, chosen by the salted hash of each text.
    #[arg(long, default_value_t = 0.5)]
    pub review_share: f64,
    /// Repetitions, each with its own salt (its own review / untouched split).
    #[arg(long, default_value_t = 3)]
    pub splits: u32,
    /// The first split's salt: splits `first_split` to `first_split + splits − 1` run, so that a
    /// later run can add splits to an earlier one without repeating them.
    #[arg(long, default_value_t = 0)]
    pub first_split: u32,
    /// The analyst labels only the texts the champion gets wrong (default: every reviewed text,
    /// confirming the right ones too, as the dashboard's ✓ does).
    #[arg(long)]
    pub mistakes_only: bool,
    /// The champion to start from (default: the bundled `models/`).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// `model retrain --feedback-weight`.
    #[arg(long, default_value_t = learn::FEEDBACK_WEIGHT)]
    pub feedback_weight: f32,
    /// How many of the reviewed part the analyst labels (default: all of it), chosen by `--pick`.
    #[arg(long)]
    pub labels: Option<usize>,
    /// Which of the reviewed part get labels: `random` (a salted order), `queue` (the review
    /// queue's order: the champion's uncertainty within each of its readings, the readings sharing
    /// places by size, near-duplicates of a picked text skipped) or `uncertainty` (uncertainty alone).
    #[arg(long, value_enum, default_value = "random")]
    pub pick: Pick,
    /// `model retrain --encoder`: fine-tune the encoder, not only the heads.
    #[arg(long)]
    pub encoder: bool,
    /// `model retrain --epochs` (with --encoder).
    #[arg(long, default_value_t = learn::tune::TuneSettings::default().epochs, requires = "encoder")]
    pub epochs: usize,
    /// `model retrain --replay` (with --encoder).
    #[arg(long, default_value_t = learn::tune::TuneSettings::default().replay, requires = "encoder")]
    pub replay: f64,
    /// `model retrain --learning-rate` (with --encoder).
    #[arg(long, default_value_t = learn::tune::TuneSettings::default().learning_rate, requires = "encoder")]
    pub learning_rate: f64,
    /// `model retrain --head-learning-rate` (with --encoder).
    #[arg(long, default_value_t = learn::tune::TuneSettings::default().head_learning_rate, requires = "encoder")]
    pub head_learning_rate: f64,
    /// `model retrain --distill` (with --encoder).
    #[arg(long, default_value_t = learn::tune::TuneSettings::default().distill, requires = "encoder")]
    pub distill: f64,
    /// `model retrain --keep` (with --encoder).
    #[arg(long, default_value_t = learn::tune::TuneSettings::default().keep, requires = "encoder")]
    pub keep: f64,
    /// `model retrain --blend` (with --encoder).
    #[arg(long, default_value_t = learn::tune::TuneSettings::default().blend, requires = "encoder")]
    pub blend: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, clap::ValueEnum)]
pub enum Pick {
    Random,
    /// The review queue's order: uncertainty within each of the champion's readings (topic ×
    /// sentiment), the readings sharing places in proportion to their sizes.
    Queue,
    /// Uncertainty alone (the queue before it shared places out over readings).
    Uncertainty,
}

/// What one repetition measured.
struct Run {
    reviewed: usize,
    corrections: usize,
    untouched: Vec<Comparison>,
    elsewhere: Vec<Comparison>,
    gate: String,
    seconds: [f64; 3],
    /// Untouched texts whose label the memory changed.
    carried: usize,
}

/// A stable number in [0, 1) for `text` under `salt`.
fn bucket(salt: u32, text: &str) -> f64 {
    let digest = sha2::Sha256::digest(format!("bearwatch-loop-{salt}:{text}").as_bytes());
    u64::from_be_bytes(digest[..8].try_into().unwrap_or_default()) as f64 / 2f64.powi(64)
}

/// The label `classifier` gives each example's head.
fn labels(classifier: &Classifier, examples: &[Example]) -> Result<Vec<String>, PipelineError> {
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let reads = learn::read_all(classifier, &texts)?;
    Ok(examples.iter().zip(reads).map(|(e, r)| r.label(e.head).to_string()).collect())
}

/// The candidate's own label for each example, and what the pipeline gives it after the loop: that
/// label, or the analysts' correction that the memory carries to it (the same text, or a
/// near-duplicate by the model's rule), as `pipeline::corrections` applies it to a new story. One
/// scoring pass gives both.
fn candidate_labels(candidate: &Classifier, storage: &crate::storage::Location, examples: &[Example]) -> Result<(Vec<String>, Vec<String>), PipelineError> {
    let rows = crate::feedback::JournalTail::new(storage).new_rows().map_err(failed)?;
    let mut memory = crate::feedback::Memory::new(candidate.spec().near_duplicates, crate::feedback::FeedbackConfig::default().remember);
    let judged: Vec<&str> = rows.iter().map(|r| r.text.as_str()).collect();
    for (row, (scores, _)) in rows.iter().zip(candidate.score_all(&judged)?) {
        memory.learn(row, Some(crate::feedback::Reading::of(&scores)));
    }
    let texts: Vec<&str> = examples.iter().map(|e| e.text.as_str()).collect();
    let scored = candidate.score_all(&texts)?;
    Ok(examples
        .iter()
        .zip(scored)
        .map(|(e, (scores, _))| {
            let own = match e.head {
                crate::feedback::Head::Sentiment => scores.sentiment.to_string(),
                crate::feedback::Head::Topic => scores.topic.clone(),
            };
            let (key, words) = (crate::feedback::match_key(&e.text), crate::feedback::near_words(&e.text));
            let reading = crate::feedback::Reading::of(&scores);
            let corrections = memory.lookup(&crate::feedback::Query { key: &key, words: &words, reading: &reading });
            let remembered = corrections.into_iter().find(|(head, _, _)| *head == e.head).map_or_else(|| own.clone(), |(_, c, _)| c.label);
            (own, remembered)
        })
        .unzip())
}

/// Per set and head, champion against candidate on the same examples.
fn compare(set: &str, examples: &[&Example], champion: &[&String], candidate: &[String]) -> Vec<Comparison> {
    [crate::feedback::Head::Sentiment, crate::feedback::Head::Topic]
        .into_iter()
        .filter_map(|head| {
            let right = examples
                .iter()
                .zip(champion.iter().zip(candidate))
                .filter(|(e, _)| e.head == head)
                .map(|(e, (old, new))| (**old == e.label, *new == e.label));
            learn::comparison(set, head, right)
        })
        .collect()
}

fn set_name(path: &Path, examples: &[Example]) -> String {
    examples
        .first()
        .map(|e| e.set.clone())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default())
}

pub fn run(args: &LoopBenchArgs) -> Result<String, PipelineError> {
    if !(0.05..=0.95).contains(&args.review_share) {
        return Err(failed("--review-share must be between 0.05 and 0.95"));
    }
    let from = args.model.clone().unwrap_or_else(|| crate::pipeline::bundled(Path::new("models")));
    let set = learn::read_examples(&crate::pipeline::bundled(&args.set))?;
    let elsewhere: Vec<(String, Vec<Example>)> = args
        .elsewhere
        .iter()
        .map(|p| learn::read_examples(&crate::pipeline::bundled(p)).map(|e| (set_name(p, &e), e)))
        .collect::<Result<_, _>>()?;
    let champion = Classifier::start(&ClassifierConfig { path: Some(from.clone()), ..ClassifierConfig::default() })?;
    let texts: Vec<&str> = set.iter().map(|e| e.text.as_str()).collect();
    let scored = champion.score_all(&texts)?;
    let champion_set: Vec<String> = set
        .iter()
        .zip(&scored)
        .map(|(e, (s, _))| match e.head {
            crate::feedback::Head::Sentiment => s.sentiment.to_string(),
            crate::feedback::Head::Topic => s.topic.clone(),
        })
        .collect();
    // How unsure the champion is of each example's own head: what the review queue ranks by.
    let unsure: Vec<f32> = set
        .iter()
        .zip(&scored)
        .map(|(e, (s, _))| crate::feedback::queue::uncertainty(e.head, [s.p_negative, s.p_neutral, s.p_positive], s.topic_score))
        .collect();
    let near_duplicates = champion.spec().near_duplicates;
    let champion_elsewhere: Vec<Vec<String>> = elsewhere.iter().map(|(_, e)| labels(&champion, e)).collect::<Result<_, _>>()?;
    drop(champion);
    let topics = crate::classify::ModelSpec::load(&from)?.topics;
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().map_err(failed)?;

    let mut runs = Vec::new();
    for salt in args.first_split..args.first_split.saturating_add(args.splits) {
        let work = tempfile_dir(salt)?;
        let storage = crate::storage::Location::from(work.join("store"));
        let (mut reviewed, untouched): (Vec<usize>, Vec<usize>) = (0..set.len()).partition(|&i| bucket(salt, &set[i].text) < args.review_share);
        if let Some(labels) = args.labels {
            // Another salt orders the reviewed part, so that the pick does not follow the split.
            reviewed.sort_by(|&a, &b| bucket(salt + 1000, &set[a].text).total_cmp(&bucket(salt + 1000, &set[b].text)));
            reviewed = match args.pick {
                Pick::Random => reviewed.into_iter().take(labels).collect(),
                Pick::Queue | Pick::Uncertainty => {
                    reviewed.sort_by(|&a, &b| unsure[b].total_cmp(&unsure[a]));
                    let texts: Vec<&str> = reviewed.iter().map(|&i| set[i].text.as_str()).collect();
                    let picked = if args.pick == Pick::Queue {
                        let readings: Vec<(&str, String)> = reviewed.iter().map(|&i| (scored[i].0.topic.as_str(), scored[i].0.sentiment.to_string())).collect();
                        crate::feedback::queue::pick_for_review(&texts, &readings, labels, near_duplicates)
                    } else {
                        crate::feedback::queue::pick_diverse(texts.iter().copied(), labels, near_duplicates)
                    };
                    picked.into_iter().map(|k| reviewed[k]).collect()
                }
            };
        }
        let requests: Vec<LabelRequest> = reviewed
            .iter()
            .filter(|&&i| !args.mistakes_only || champion_set[i] != set[i].label)
            .map(|&i| serde_json::from_value(serde_json::json!({"text": set[i].text, "head": set[i].head, "label": set[i].label})).map_err(failed))
            .collect::<Result<_, _>>()?;
        let corrections = reviewed.iter().filter(|&&i| champion_set[i] != set[i].label).count();
        let given = requests.len();
        let service = FeedbackService::new(storage.clone(), topics.clone(), Default::default());
        let feedback = runtime.block_on(async {
            let ctx = crate::sql::context(&storage, crate::server::ServerConfig::default().query_limits(), None)?;
            for chunk in requests.chunks(crate::feedback::MAX_ROWS) {
                crate::server::feedback::record_labels(&ctx, &service, chunk.to_vec(), "bench", Channel::Cli).await.map_err(failed)?;
            }
            let ctx = crate::sql::context(&storage, crate::server::ServerConfig::default().query_limits(), None)?;
            Ok::<_, PipelineError>(crate::sql::lookup::winning_labels(&ctx).await?)
        })?;

        let out = work.join("candidate");
        let encoder = args.encoder.then(|| learn::tune::TuneSettings {
            epochs: args.epochs,
            learning_rate: args.learning_rate,
            head_learning_rate: args.head_learning_rate,
            replay: args.replay,
            distill: args.distill,
            keep: args.keep,
            blend: args.blend,
            seed: 13 + u64::from(salt),
            ..Default::default()
        });
        let started = Instant::now();
        learn::retrain(learn::RetrainOptions { storage: &storage, out: &out, from: &from, feedback, feedback_weight: args.feedback_weight, encoder, progress: false })?;
        let retrain_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let gate = match registry::promote(&storage, &out, "bench", None) {
            Ok(_) => "promoted".to_string(),
            Err(learn::LearnError::Refused(why)) => format!("refused: {why}"),
            Err(e) => return Err(e.into()),
        };
        let promote_s = started.elapsed().as_secs_f64();
        // What a running pipeline does before it drains and switches (`Core::poll_models`).
        let started = Instant::now();
        let candidate = registry::load_checked(&ClassifierConfig::default(), &out)?;
        let swap_s = started.elapsed().as_secs_f64();

        let kept: Vec<Example> = untouched.iter().map(|&i| set[i].clone()).collect();
        let (after, remembered) = candidate_labels(&candidate, &storage, &kept)?;
        let carried = remembered.iter().zip(&after).filter(|(r, a)| r != a).count();
        let before: Vec<&String> = untouched.iter().map(|&i| &champion_set[i]).collect();
        let name = set_name(&args.set, &set);
        let kept_refs: Vec<&Example> = kept.iter().collect();
        let mut untouched_cmp = compare(&format!("{name} (untouched)"), &kept_refs, &before, &after);
        untouched_cmp.extend(compare(&format!("{name} (untouched, with the memory)"), &kept_refs, &before, &remembered));
        let mut elsewhere_cmp = Vec::new();
        for ((name, examples), old) in elsewhere.iter().zip(&champion_elsewhere) {
            let new = labels(&candidate, examples)?;
            elsewhere_cmp.extend(compare(name, &examples.iter().collect::<Vec<_>>(), &old.iter().collect::<Vec<_>>(), &new));
        }
        drop(candidate);
        let _ = std::fs::remove_dir_all(&work);
        eprintln!("split {salt}: reviewed {} ({given} labels given), retrain {retrain_s:.1} s, {gate}", reviewed.len());
        runs.push(Run { reviewed: reviewed.len(), corrections, untouched: untouched_cmp, elsewhere: elsewhere_cmp, gate, seconds: [retrain_s, promote_s, swap_s], carried });
    }
    Ok(table(args, &from, &runs))
}

/// A fresh folder for one repetition's storage and candidate.
fn tempfile_dir(salt: u32) -> Result<PathBuf, PipelineError> {
    let dir = std::env::temp_dir().join(format!("bearwatch-bench-loop-{}-{salt}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(failed)?;
    Ok(dir)
}

fn mean_sd(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let sd = if values.len() > 1 { (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt() } else { 0.0 };
    (mean, sd)
}

fn table(args: &LoopBenchArgs, from: &Path, runs: &[Run]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "bench loop: {} from {}, {} split(s), the analyst reviews {:.0} % ({}), {}\n",
        args.set.display(),
        from.display(),
        runs.len(),
        args.review_share * 100.0,
        match (args.labels, args.mistakes_only) {
            (Some(n), _) => format!("labels {n} of them, picked {}", match args.pick {
                    Pick::Queue => "by the review queue",
                    Pick::Uncertainty => "by uncertainty alone",
                    Pick::Random => "at random",
                }),
            (None, true) => "labels the champion's mistakes only".to_string(),
            (None, false) => "labels every reviewed text".to_string(),
        },
        if args.encoder {
            format!(
                "encoder fine-tuned (at most {} epochs, learning rate {} (heads {}), {} anchors replayed per label, distillation {}, keep {}, blend {})",
                args.epochs, args.learning_rate, args.head_learning_rate, args.replay, args.distill, args.keep, args.blend
            )
        } else {
            format!("heads refitted, feedback weight {}", args.feedback_weight)
        }
    );
    let _ = writeln!(out, "| split | set | head | n | before | after | difference (95 % interval) |\n|---:|---|---|---:|---:|---:|---|");
    for (i, run) in runs.iter().enumerate() {
        for c in run.untouched.iter().chain(&run.elsewhere) {
            let _ = writeln!(out, "| {} | {} |", args.first_split as usize + i, c.cells());
        }
    }
    let _ = writeln!(out, "\n| over the splits | mean difference ± sd | goal |\n|---|---|---|");
    let mut met = true;
    let mut names: Vec<(String, bool)> = runs.first().map(|r| r.untouched.iter().map(|c| (c.set.clone(), true)).collect()).unwrap_or_default();
    names.extend(runs.first().map(|r| r.elsewhere.iter().map(|c| (c.set.clone(), false)).collect::<Vec<_>>()).unwrap_or_default());
    for (name, untouched) in names {
        let differences: Vec<f64> =
            runs.iter().flat_map(|r| r.untouched.iter().chain(&r.elsewhere)).filter(|c| c.set == name).map(|c| c.difference).collect();
        let (mean, sd) = mean_sd(&differences);
        let (goal, ok) = if untouched { ("≥ +0.050", mean >= 0.05) } else { ("≥ −0.005", mean >= -0.005) };
        met &= ok;
        let _ = writeln!(out, "| {name} | {mean:+.3} ± {sd:.3} | {goal}: {} |", if ok { "met" } else { "not met" });
    }
    let seconds = |k: usize| mean_sd(&runs.iter().map(|r| r.seconds[k]).collect::<Vec<_>>());
    let ((retrain, _), (promote, _), (swap, _)) = (seconds(0), seconds(1), seconds(2));
    let reviewed = mean_sd(&runs.iter().map(|r| r.reviewed as f64).collect::<Vec<_>>()).0;
    let wrong = mean_sd(&runs.iter().map(|r| r.corrections as f64).collect::<Vec<_>>()).0;
    let carried = mean_sd(&runs.iter().map(|r| r.carried as f64).collect::<Vec<_>>()).0;
    let _ = writeln!(
        out,
        "\nReviewed {reviewed:.0} texts a split, {wrong:.0} of them wrong; the memory changed {carried:.1} untouched labels a split. Mean seconds: retrain {retrain:.1}, promote {promote:.2}, \
         swap (load + golden check) {swap:.2}. Gate: {}.\nGoal {}.",
        runs.iter().map(|r| r.gate.as_str()).collect::<Vec<_>>().join("; "),
        if met { "met" } else { "not met" }
    );
    out
}
