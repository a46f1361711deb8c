//! `bearwatch model retrain`: a candidate model built from what analysts said, with no torch at run
//! time. Both heads are refitted, as multinomial logistic regressions in Rust started from the
//! champion's heads (`refit/heads.json`) and held near them, on the champion's pooled embeddings of
//! two kinds of examples: a fixed sample of the original training
//! data shipped with the model (`refit/anchors.jsonl`, so that the heads do not forget) and the labels
//! that won in `label_feedback`; then each head's temperature is fitted on held-out anchors.
//!
//! With `--encoder` (`tune`) the encoder is fine-tuned with the heads instead, in candle, and written
//! back into the champion's int8 graph (`minilm`, `onnx`); its heads are recalibrated on that
//! graph's own embeddings.
//!
//! The candidate is a complete model folder: the champion's encoder (or the fine-tuned one),
//! tokenizer and labels, and a `heads.json` that scores instead of the graph's heads. Its report compares it with the champion
//! on the frozen evaluation set shipped with the model (`refit/eval.jsonl`), on each of its domains
//! and on the newest feedback, which it did not train on (a time split), each with a 95 % interval.

mod fit;
mod minilm;
pub mod registry;
mod report;
pub mod tune;

use std::path::{Path, PathBuf};

use serde::Deserialize;
use sha2::Digest;

use crate::classify::heads::{Head, Heads};
use crate::classify::onnx;
use crate::classify::{Classifier, ClassifierConfig, ClassifyError, Encoder, ModelSpec};
use crate::error::{Classified, ErrorClass};
use crate::feedback::{Head as Kind, TrainingLabel};
use crate::news::SENTIMENTS;

pub use report::{Comparison, Report, comparison};

#[derive(Debug, thiserror::Error)]
pub enum LearnError {
    #[error("{path}: {reason}")]
    Files { path: PathBuf, reason: String },
    #[error("{0}")]
    Invalid(String),
    /// The gate: the candidate's report shows it worse than the champion.
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Classify(#[from] ClassifyError),
    /// The registry's journals could not be written (a full disk, object storage unreachable).
    #[error(transparent)]
    Storage(#[from] crate::storage::StorageError),
}

impl Classified for LearnError {
    fn class(&self) -> ErrorClass {
        match self {
            LearnError::Files { .. } => ErrorClass::External,
            LearnError::Invalid(_) | LearnError::Refused(_) => ErrorClass::User,
            LearnError::Classify(e) => e.class(),
            LearnError::Storage(e) => e.class(),
        }
    }
    fn retryable(&self) -> bool {
        matches!(self, LearnError::Storage(e) if e.retryable())
    }
}

fn files(path: &Path) -> impl Fn(std::io::Error) -> LearnError + '_ {
    move |e| LearnError::Files { path: path.to_path_buf(), reason: e.to_string() }
}

/// One labelled text of `refit/anchors.jsonl` or `refit/eval.jsonl`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    pub text: String,
    pub head: Kind,
    pub label: String,
    /// The data set it comes from (`phrasebank`, `reuters`, ...), or `feedback`.
    #[serde(default)]
    pub set: String,
}

/// Feedback weighs this many anchors: a correction is one voice among thousands of examples and
/// must still move the head, but 50 alike (a review of one pattern) must not tip a whole class.
pub const FEEDBACK_WEIGHT: f32 = 3.0;
/// The newest share of the feedback held out for the report, when there are at least
/// [`MIN_HELD_OUT_FEEDBACK`] labels.
pub const HELD_OUT_SHARE: f64 = 0.2;
pub const MIN_HELD_OUT_FEEDBACK: usize = 10;
/// How many texts of the frozen set measure what the int8 export changed.
const CHECK_TEXTS: usize = 512;
/// Every this-many-th anchor is held out to fit the temperature.
const TEMPERATURE_EVERY: usize = 10;

/// The lines of an examples file (`refit/*.jsonl`, or a set `bench loop` plays the analyst on).
pub fn read_examples(path: &Path) -> Result<Vec<Example>, LearnError> {
    let text = std::fs::read_to_string(path).map_err(files(path))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| LearnError::Files { path: path.to_path_buf(), reason: format!("line {}: {e}", i + 1) }))
        .collect()
}

/// The champion's reading of each text: its labels and pooled embedding (empty unless the
/// classifier was started with `embeddings`).
#[derive(Clone)]
pub(crate) struct Read {
    sentiment: String,
    topic: String,
    embedding: Vec<f32>,
}

impl Read {
    pub(crate) fn label(&self, head: Kind) -> &str {
        match head {
            Kind::Sentiment => &self.sentiment,
            Kind::Topic => &self.topic,
        }
    }
}

/// Reads `texts` in order, 256 queued at a time.
pub(crate) fn read_all(classifier: &Classifier, texts: &[&str]) -> Result<Vec<Read>, LearnError> {
    let scored = classifier.score_all(texts)?;
    Ok(scored.into_iter().map(|(scores, embedding)| Read { sentiment: scores.sentiment.to_string(), topic: scores.topic, embedding }).collect())
}

/// The labels a head has, in its output order.
fn classes(spec: &ModelSpec, head: Kind) -> Vec<String> {
    match head {
        Kind::Sentiment => SENTIMENTS.iter().map(|s| s.to_string()).collect(),
        Kind::Topic => spec.topics.clone(),
    }
}

/// The head of `heads` for `kind`.
fn head_of(heads: &Heads, kind: Kind) -> &Head {
    match kind {
        Kind::Sentiment => &heads.sentiment,
        Kind::Topic => &heads.topic,
    }
}

fn row<'r>(names: &[String], e: &Example, r: &'r Read, weight: f32) -> fit::Row<'r> {
    fit::Row { x: &r.embedding, class: names.iter().position(|n| *n == e.label).unwrap_or(0), weight }
}

pub struct RetrainOptions<'a> {
    pub storage: &'a crate::storage::Location,
    pub out: &'a Path,
    pub from: &'a Path,
    /// The labels that won (`feedback export`).
    pub feedback: Vec<TrainingLabel>,
    /// How many anchors one feedback label weighs ([`FEEDBACK_WEIGHT`] by default) in a head refit.
    pub feedback_weight: f32,
    /// Fine-tune the encoder with the heads (`--encoder`); `None` refits the heads alone.
    pub encoder: Option<tune::TuneSettings>,
    /// Draw a progress bar on the terminal while fine-tuning.
    pub progress: bool,
}

/// Builds a candidate in `options.out` and returns its report (also written there).
pub fn retrain(options: RetrainOptions<'_>) -> Result<Report, LearnError> {
    if !(options.feedback_weight.is_finite() && (0.0..=100.0).contains(&options.feedback_weight)) {
        return Err(LearnError::Invalid(format!("feedback weight {} is not between 0 and 100", options.feedback_weight)));
    }
    let spec = ModelSpec::load(options.from)?;
    if spec.embedding_output.is_none() {
        return Err(LearnError::Invalid(format!("{}: the model has no `embedding` output to refit heads on", options.from.display())));
    }
    if options.out.exists() && std::fs::read_dir(options.out).map_err(files(options.out))?.next().is_some() {
        return Err(LearnError::Invalid(format!("{}: --out must be a new or empty folder", options.out.display())));
    }
    let anchors = read_examples(&options.from.join("refit/anchors.jsonl"))?;
    let evaluation = read_examples(&options.from.join("refit/eval.jsonl"))?;
    // Oldest first; the judgements of one request share a time (`LabelContext::created_at`), so
    // the text decides among them and the held-out set is the same on every run.
    let mut labels: Vec<&TrainingLabel> = options.feedback.iter().collect();
    labels.sort_by(|a, b| (a.created_at, &a.text, a.head).cmp(&(b.created_at, &b.text, b.head)));
    let mut feedback: Vec<Example> = labels
        .iter()
        .map(|l| Example { text: l.text.clone(), head: l.head, label: l.label.clone(), set: "feedback".into() })
        .collect();
    for example in anchors.iter().chain(&evaluation).chain(&feedback) {
        if !classes(&spec, example.head).contains(&example.label) {
            return Err(LearnError::Invalid(format!("label {:?} is not one of the model's {:?} labels", example.label, example.head)));
        }
    }
    let held_out = if feedback.len() >= MIN_HELD_OUT_FEEDBACK { (feedback.len() as f64 * HELD_OUT_SHARE).ceil() as usize } else { 0 };
    let newest = feedback.split_off(feedback.len() - held_out);
    tracing::info!(anchors = anchors.len(), feedback = feedback.len(), held_out = newest.len(), eval = evaluation.len(), "retraining");

    let config = ClassifierConfig { path: Some(options.from.to_path_buf()), embeddings: true, ..ClassifierConfig::default() };
    let classifier = Classifier::start(&config)?;
    let texts: Vec<&str> = anchors.iter().chain(&feedback).chain(&evaluation).chain(&newest).map(|e| e.text.as_str()).collect();
    let reads = read_all(&classifier, &texts)?;
    drop(classifier);
    let (anchor_reads, rest) = reads.split_at(anchors.len());
    let (feedback_reads, rest) = rest.split_at(feedback.len());
    let (eval_reads, newest_reads) = rest.split_at(evaluation.len());
    let dims = anchor_reads.first().map_or(0, |r| r.embedding.len());

    // Start from the champion's heads: its own refit heads, or the graph's as trained.
    let prior = match &spec.heads {
        Some(heads) => Some(heads.as_ref().clone()),
        None => {
            let path = options.from.join("refit/heads.json");
            path.exists().then(|| Heads::load(&path, spec.topics.len())).transpose()?
        }
    };
    // Held-out anchors: the temperature's (and, fine-tuning, early stopping's).
    let calibrating = |i: usize| i % TEMPERATURE_EVERY == 0;

    let (heads, version, candidate_reads, tuning) = match &options.encoder {
        None => {
            let fit_head = |kind| {
                let names = classes(&spec, kind);
                let (mut train, mut calibrate) = (Vec::new(), Vec::new());
                for (i, (e, r)) in anchors.iter().zip(anchor_reads).enumerate().filter(|(_, (e, _))| e.head == kind) {
                    if calibrating(i) { calibrate.push(row(&names, e, r, 1.0)) } else { train.push(row(&names, e, r, 1.0)) }
                }
                train.extend(feedback.iter().zip(feedback_reads).filter(|(e, _)| e.head == kind).map(|(e, r)| row(&names, e, r, options.feedback_weight)));
                let prior = prior.as_ref().map(|p| head_of(p, kind));
                let head = fit::fit(&train, dims, names.len(), &fit::Settings::default(), prior);
                Head { temperature: fit::temperature(&head, &calibrate), ..head }
            };
            let heads = Heads { dims, sentiment: fit_head(Kind::Sentiment), topic: fit_head(Kind::Topic) };
            copy_champion(options.from, options.out, None)?;
            let version = name_candidate(options.from, options.out, &spec, &heads, None)?;
            (heads, version, None, None)
        }
        Some(settings) => {
            let prior = prior.ok_or_else(|| LearnError::Invalid(format!("{}: fine-tuning starts from the champion's heads, and it has no refit/heads.json", options.from.display())))?;
            let tokens = Encoder::load(&spec, config.max_length)?;
            // A training item carries the champion's probabilities on the head it does not label.
            // A replayed anchor also carries them on the head it labels (`--keep`).
            let item = |e: &Example, champion: Option<&Read>, anchor: bool| -> Result<tune::Item, LearnError> {
                let ids = tokens.encode(&e.text)?.into_iter().map(|id| id as u32).collect();
                let (teacher, own_teacher) = match champion {
                    Some(r) => {
                        let (sentiment, topic) = prior.apply(&r.embedding, 1)?;
                        let (own, other) = if e.head == Kind::Sentiment { (sentiment, topic) } else { (topic, sentiment) };
                        (Some(other), anchor.then_some(own))
                    }
                    None => (None, None),
                };
                Ok(tune::Item { ids, head: e.head, class: classes(&spec, e.head).iter().position(|n| *n == e.label).unwrap_or(0), teacher, own_teacher })
            };
            let (mut train_feedback, mut stop_feedback) = (Vec::new(), Vec::new());
            for (i, (e, r)) in feedback.iter().zip(feedback_reads).enumerate() {
                // Every fifth label (once there are enough) decides when to stop, not what to learn.
                if feedback.len() >= MIN_HELD_OUT_FEEDBACK && i % 5 == 4 { stop_feedback.push(item(e, None, false)?) } else { train_feedback.push(item(e, Some(r), false)?) }
            }
            let (mut train_anchors, mut stop_anchors) = (Vec::new(), Vec::new());
            for (i, (e, r)) in anchors.iter().zip(anchor_reads).enumerate() {
                if calibrating(i) { stop_anchors.push(item(e, None, false)?) } else { train_anchors.push(item(e, Some(r), true)?) }
            }
            let model_path = options.from.join("model.onnx");
            let graph = onnx::Model::parse(std::fs::read(&model_path).map_err(files(&model_path))?)
                .map_err(|reason| LearnError::Files { path: model_path.clone(), reason })?;
            // The export's error is measured on up to CHECK_TEXTS of the frozen set, every domain.
            let stride = evaluation.len().div_ceil(CHECK_TEXTS).max(1);
            let check: Vec<tune::Item> = evaluation.iter().step_by(stride).map(|e| item(e, None, false)).collect::<Result<_, _>>()?;
            let sets = tune::Sets { feedback: &train_feedback, feedback_held_out: &stop_feedback, anchors: &train_anchors, anchors_held_out: &stop_anchors, check: &check };
            tracing::info!(feedback = train_feedback.len(), stop_feedback = stop_feedback.len(), anchors = train_anchors.len(), "fine-tuning the encoder");
            let started = std::time::Instant::now();
            let tuned = tune::fine_tune(&graph, &prior, &sets, settings, options.progress)?;
            let seconds = started.elapsed().as_secs_f64();
            let bytes = graph.with_initializers(&tuned.initializers).map_err(|reason| LearnError::Files { path: model_path.clone(), reason })?;
            let digest: String = sha2::Sha256::digest(&bytes).iter().map(|b| format!("{b:02x}")).collect();
            // The exported graph's own embeddings: what the heads' temperatures and the report read.
            copy_champion(options.from, options.out, Some(&bytes))?;
            name_candidate(options.from, options.out, &spec, &tuned.heads, Some(&digest))?;
            let candidate = Classifier::start(&ClassifierConfig { path: Some(options.out.to_path_buf()), embeddings: true, ..ClassifierConfig::default() })?;
            let calibration: Vec<&Example> = anchors.iter().enumerate().filter(|(i, _)| calibrating(*i)).map(|(_, e)| e).collect();
            let texts: Vec<&str> = calibration.iter().copied().chain(&evaluation).chain(&newest).map(|e| e.text.as_str()).collect();
            let candidate_reads = read_all(&candidate, &texts)?;
            drop(candidate);
            let calibrate: Vec<(&Example, &Read)> = calibration.iter().copied().zip(&candidate_reads).collect();
            let temperature = |kind| {
                let names = classes(&spec, kind);
                let rows: Vec<fit::Row<'_>> = calibrate.iter().filter(|(e, _)| e.head == kind).map(|(e, r)| row(&names, e, r, 1.0)).collect();
                fit::temperature(head_of(&tuned.heads, kind), &rows)
            };
            let heads = Heads {
                dims,
                sentiment: Head { temperature: temperature(Kind::Sentiment), ..tuned.heads.sentiment.clone() },
                topic: Head { temperature: temperature(Kind::Topic), ..tuned.heads.topic.clone() },
            };
            let version = name_candidate(options.from, options.out, &spec, &heads, Some(&digest))?;
            let exported: Vec<Read> = candidate_reads[calibration.len()..][..evaluation.len()].iter().step_by(stride).cloned().collect();
            let export = report::export_error(&heads, &tuned.check_embeddings, &exported)?;
            let tuning = report::Tuning {
                settings: settings.clone(),
                epochs: tuned.epochs,
                kept_epoch: tuned.best,
                seconds,
                stopping_feedback: stop_feedback.len(),
                stopping_anchors: stop_anchors.len(),
                export,
            };
            (heads, version, Some(candidate_reads[calibration.len()..].to_vec()), Some(tuning))
        }
    };
    let (candidate_eval, candidate_newest) = match &candidate_reads {
        Some(reads) => reads.split_at(evaluation.len()),
        None => (eval_reads, newest_reads),
    };

    // What the folder must reproduce when a pipeline loads it: the first evaluation texts' scores.
    let mut golden = String::new();
    for (e, r) in evaluation.iter().zip(candidate_eval).take(16) {
        let (sentiment, _) = heads.apply(&r.embedding, 1)?;
        let row = registry::Golden { text: e.text.clone(), sentiment: [sentiment[0], sentiment[1], sentiment[2]] };
        golden.push_str(&(serde_json::to_string(&row).map_err(|e| LearnError::Invalid(e.to_string()))? + "\n"));
    }
    std::fs::write(options.out.join("golden.jsonl"), golden).map_err(files(options.out))?;
    let mut comparisons = report::compare("eval", &evaluation, eval_reads, candidate_eval, &heads, &spec);
    // Each domain of the frozen set on its own: a loss in one must not hide behind gains in another.
    let mut domains: Vec<&str> = evaluation.iter().map(|e| e.set.as_str()).filter(|s| !s.is_empty()).collect();
    domains.sort_unstable();
    domains.dedup();
    for domain in domains {
        let pick = |reads: &[Read]| -> (Vec<Example>, Vec<Read>) {
            evaluation.iter().zip(reads).filter(|(e, _)| e.set == domain).map(|(e, r)| (e.clone(), r.clone())).unzip()
        };
        let ((examples, champion), (_, candidate)) = (pick(eval_reads), pick(candidate_eval));
        comparisons.extend(report::compare(&format!("eval/{domain}"), &examples, &champion, &candidate, &heads, &spec));
    }
    comparisons.extend(report::compare("feedback", &newest, newest_reads, candidate_newest, &heads, &spec));
    let report = Report {
        candidate: format!("{}@{version}", spec.id().split('@').next().unwrap_or_default()),
        built_at: chrono::Utc::now(),
        champion: spec.id().to_string(),
        from: std::fs::canonicalize(options.from).unwrap_or_else(|_| options.from.to_path_buf()).display().to_string(),
        storage: options.storage.to_string(),
        anchors: anchors.len(),
        feedback_trained: feedback.len(),
        trained_until: feedback.len().checked_sub(1).map(|i| (labels[i].feedback_id.clone(), labels[i].created_at)),
        feedback_held_out: newest.len(),
        feedback_weight: options.feedback_weight,
        temperatures: (heads.sentiment.temperature, heads.topic.temperature),
        tuning,
        comparisons,
    };
    report.write(options.out)?;
    Ok(report)
}

/// Copies the champion's files into `out`, or writes `model` (a fine-tuned graph) as its model.onnx.
fn copy_champion(from: &Path, out: &Path, model: Option<&[u8]>) -> Result<(), LearnError> {
    std::fs::create_dir_all(out.join("refit")).map_err(files(out))?;
    for file in ["tokenizer.json", "refit/anchors.jsonl", "refit/eval.jsonl"] {
        std::fs::copy(from.join(file), out.join(file)).map_err(files(&from.join(file)))?;
    }
    match model {
        Some(bytes) => std::fs::write(out.join("model.onnx"), bytes).map_err(files(out)),
        None => std::fs::copy(from.join("model.onnx"), out.join("model.onnx")).map(drop).map_err(files(&from.join("model.onnx"))),
    }
}

/// Writes the heads into the copied folder `out` and names the new version in `labels.json`: a refit
/// by its heads, a fine-tune (`graph_digest`: SHA-256 of its model.onnx) by its heads and graph.
fn name_candidate(from: &Path, out: &Path, spec: &ModelSpec, heads: &Heads, graph_digest: Option<&str>) -> Result<String, LearnError> {
    let json = serde_json::to_string(heads).map_err(|e| LearnError::Invalid(e.to_string()))?;
    std::fs::write(out.join("heads.json"), &json).map_err(files(out))?;
    let labels_path = from.join("labels.json");
    let mut labels: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&labels_path).map_err(files(&labels_path))?).map_err(|e| LearnError::Files {
            path: labels_path.clone(),
            reason: e.to_string(),
        })?;
    let base = spec.id().split('@').nth(1).unwrap_or_default().split('+').next().unwrap_or_default().to_string();
    let version = match graph_digest {
        None => format!("{base}+refit.{}", &crate::feedback::text_hash(&json)[..8]),
        Some(digest) => format!("{base}+tune.{}", &crate::feedback::text_hash(&(json.clone() + digest))[..8]),
    };
    labels["version"] = serde_json::Value::String(version.clone());
    labels["heads"] = serde_json::Value::String("heads.json".into());
    let text = serde_json::to_string_pretty(&labels).map_err(|e| LearnError::Invalid(e.to_string()))?;
    std::fs::write(out.join("labels.json"), text + "\n").map_err(files(out))?;
    // The folder must load as a model before anyone may use it.
    ModelSpec::load(out)?;
    Ok(version)
}
