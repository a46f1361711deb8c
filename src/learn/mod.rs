//! `bearwatch model retrain`: a candidate model built from what analysts said, with no torch at run
//! time. Both heads are refitted, as multinomial logistic regressions in Rust started from the
//! champion's heads (`refit/heads.json`) and held near them, on the champion's pooled embeddings of
//! two kinds of examples: a fixed sample of the original training
//! data shipped with the model (`refit/anchors.jsonl`, so that the heads do not forget) and the labels
//! that won in `label_feedback`; then each head's temperature is fitted on held-out anchors.
//!
//! The candidate is a complete model folder: the champion's encoder, tokenizer and labels, and a
//! `heads.json` that scores instead of the graph's heads. Its report compares it with the champion
//! on the frozen evaluation set shipped with the model (`refit/eval.jsonl`) and on the newest
//! feedback, which it did not train on (a time split), each with a 95 % interval.

mod fit;
pub mod registry;
mod report;

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::classify::heads::{Head, Heads};
use crate::classify::{Classifier, ClassifierConfig, ClassifyError, ModelSpec};
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
}

impl Classified for LearnError {
    fn class(&self) -> ErrorClass {
        match self {
            LearnError::Files { .. } => ErrorClass::External,
            LearnError::Invalid(_) | LearnError::Refused(_) => ErrorClass::User,
            LearnError::Classify(e) => e.class(),
        }
    }
    fn retryable(&self) -> bool {
        false
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
    pub storage: &'a Path,
    pub out: &'a Path,
    pub from: &'a Path,
    /// The labels that won (`feedback export`).
    pub feedback: Vec<TrainingLabel>,
    /// How many anchors one feedback label weighs ([`FEEDBACK_WEIGHT`] by default).
    pub feedback_weight: f32,
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
    // Oldest first; judgements of one import share a millisecond, so the text decides among them and
    // the held-out set is the same on every run.
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
    tracing::info!(anchors = anchors.len(), feedback = feedback.len(), held_out = newest.len(), eval = evaluation.len(), "refitting heads");

    let config = ClassifierConfig { path: Some(options.from.to_path_buf()), embeddings: true, ..ClassifierConfig::default() };
    let classifier = Classifier::start(&config)?;
    let texts: Vec<&str> = anchors.iter().chain(&feedback).chain(&evaluation).chain(&newest).map(|e| e.text.as_str()).collect();
    let reads = read_all(&classifier, &texts)?;
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
    let fit_head = |kind| {
        let names = classes(&spec, kind);
        let (mut train, mut calibrate) = (Vec::new(), Vec::new());
        for (i, (e, r)) in anchors.iter().zip(anchor_reads).enumerate().filter(|(_, (e, _))| e.head == kind) {
            if i % TEMPERATURE_EVERY == 0 { calibrate.push(row(&names, e, r, 1.0)) } else { train.push(row(&names, e, r, 1.0)) }
        }
        train.extend(feedback.iter().zip(feedback_reads).filter(|(e, _)| e.head == kind).map(|(e, r)| row(&names, e, r, options.feedback_weight)));
        let prior = prior.as_ref().map(|p| head_of(p, kind));
        let head = fit::fit(&train, dims, names.len(), &fit::Settings::default(), prior);
        Head { temperature: fit::temperature(&head, &calibrate), ..head }
    };
    let heads = Heads { dims, sentiment: fit_head(Kind::Sentiment), topic: fit_head(Kind::Topic) };

    let version = write_candidate(options.from, options.out, &spec, &heads)?;
    // What the folder must reproduce when a pipeline loads it: the first evaluation texts' scores.
    let mut golden = String::new();
    for (e, r) in evaluation.iter().zip(eval_reads).take(16) {
        let (sentiment, _) = heads.apply(&r.embedding, 1)?;
        let row = registry::Golden { text: e.text.clone(), sentiment: [sentiment[0], sentiment[1], sentiment[2]] };
        golden.push_str(&(serde_json::to_string(&row).map_err(|e| LearnError::Invalid(e.to_string()))? + "\n"));
    }
    std::fs::write(options.out.join("golden.jsonl"), golden).map_err(files(options.out))?;
    let compare = |examples: &[Example], reads: &[Read], set: &str| report::compare(set, examples, reads, &heads, &spec);
    let report = Report {
        candidate: format!("{}@{version}", spec.id().split('@').next().unwrap_or_default()),
        built_at: chrono::Utc::now(),
        champion: spec.id().to_string(),
        from: std::fs::canonicalize(options.from).unwrap_or_else(|_| options.from.to_path_buf()).display().to_string(),
        storage: options.storage.display().to_string(),
        anchors: anchors.len(),
        feedback_trained: feedback.len(),
        trained_until: feedback.len().checked_sub(1).map(|i| (labels[i].feedback_id.clone(), labels[i].created_at)),
        feedback_held_out: newest.len(),
        feedback_weight: options.feedback_weight,
        temperatures: (heads.sentiment.temperature, heads.topic.temperature),
        comparisons: [compare(&evaluation, eval_reads, "eval"), compare(&newest, newest_reads, "feedback")].concat(),
    };
    report.write(options.out)?;
    Ok(report)
}

/// Copies the champion's files, adds the heads and names the new version in `labels.json`.
fn write_candidate(from: &Path, out: &Path, spec: &ModelSpec, heads: &Heads) -> Result<String, LearnError> {
    std::fs::create_dir_all(out.join("refit")).map_err(files(out))?;
    for file in ["model.onnx", "tokenizer.json", "refit/anchors.jsonl", "refit/eval.jsonl"] {
        std::fs::copy(from.join(file), out.join(file)).map_err(files(&from.join(file)))?;
    }
    let json = serde_json::to_string(heads).map_err(|e| LearnError::Invalid(e.to_string()))?;
    std::fs::write(out.join("heads.json"), &json).map_err(files(out))?;
    let labels_path = from.join("labels.json");
    let mut labels: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&labels_path).map_err(files(&labels_path))?).map_err(|e| LearnError::Files {
            path: labels_path.clone(),
            reason: e.to_string(),
        })?;
    let base = spec.id().split('@').nth(1).unwrap_or_default().split('+').next().unwrap_or_default().to_string();
    let version = format!("{base}+refit.{}", &crate::feedback::text_hash(&json)[..8]);
    labels["version"] = serde_json::Value::String(version.clone());
    labels["heads"] = serde_json::Value::String("heads.json".into());
    let text = serde_json::to_string_pretty(&labels).map_err(|e| LearnError::Invalid(e.to_string()))?;
    std::fs::write(out.join("labels.json"), text + "\n").map_err(files(out))?;
    // The folder must load as a model before anyone may use it.
    ModelSpec::load(out)?;
    Ok(version)
}
