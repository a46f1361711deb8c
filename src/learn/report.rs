//! What `model retrain` says about its candidate: accuracy beside the champion's on each set and
//! head, with a 95 % interval of the paired difference, in `report.json` and `report.md`.

use std::path::Path;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use super::tune::{Epoch, TuneSettings};
use super::{Example, LearnError, Read, classes, files, head_of};
use crate::classify::ModelSpec;
use crate::classify::heads::Heads;
use crate::feedback::Head as Kind;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// `eval` (the frozen set shipped with the model) or `feedback` (the newest labels, held out).
    pub set: String,
    pub head: Kind,
    pub n: usize,
    pub champion_accuracy: f64,
    pub candidate_accuracy: f64,
    /// Candidate minus champion, and its 95 % interval (paired; Agresti–Min: half a pair added to
    /// each cell, so that small or one-sided samples do not get a zero-width interval).
    pub difference: f64,
    pub difference_95: (f64, f64),
    /// The whole interval is below zero: worse beyond doubt.
    pub worse: bool,
}

impl Comparison {
    /// Set, head, n, both accuracies and the difference with its interval, as Markdown table cells.
    pub fn cells(&self) -> String {
        format!(
            "{} | {} | {} | {:.3} | {:.3} | {:+.3} ({:+.3} to {:+.3})",
            self.set,
            self.head.name(),
            self.n,
            self.champion_accuracy,
            self.candidate_accuracy,
            self.difference,
            self.difference_95.0,
            self.difference_95.1
        )
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub candidate: String,
    pub built_at: DateTime<Utc>,
    pub champion: String,
    pub from: String,
    pub storage: String,
    pub anchors: usize,
    pub feedback_trained: usize,
    /// The newest judgement it trained on: `feedback_id` and time.
    pub trained_until: Option<(String, DateTime<Utc>)>,
    pub feedback_held_out: usize,
    pub feedback_weight: f32,
    /// (sentiment, topic).
    pub temperatures: (f32, f32),
    /// How the encoder was fine-tuned; absent for a head refit.
    #[serde(default)]
    pub tuning: Option<Tuning>,
    pub comparisons: Vec<Comparison>,
}

/// What `model retrain --encoder` did: its settings, each epoch's losses and the one kept.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tuning {
    pub settings: TuneSettings,
    pub epochs: Vec<Epoch>,
    pub kept_epoch: usize,
    /// Wall-clock seconds of the fine-tuning itself.
    pub seconds: f64,
    /// Held out to decide when to stop: feedback labels (every fifth) and anchors.
    pub stopping_feedback: usize,
    pub stopping_anchors: usize,
    /// The int8 graph against the fp32 weights it was quantized from, on the frozen set.
    pub export: ExportError,
}

/// How far the exported int8 graph's sentiment probabilities lie from the trained fp32 weights'.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExportError {
    pub texts: usize,
    pub mean_abs_difference: f64,
    pub max_abs_difference: f64,
    /// Share of texts whose sentiment label is the same under both.
    pub agreement: f64,
}

/// Sentiment probabilities of the fp32 embeddings `float` and the exported graph's `exported`.
pub(super) fn export_error(heads: &Heads, float: &[Vec<f32>], exported: &[Read]) -> Result<ExportError, LearnError> {
    let (mut sum, mut max, mut same) = (0.0f64, 0.0f64, 0usize);
    for (f, e) in float.iter().zip(exported) {
        let (a, _) = heads.apply(f, 1)?;
        let (b, _) = heads.apply(&e.embedding, 1)?;
        let argmax = |p: &[f32]| p.iter().enumerate().max_by(|x, y| x.1.total_cmp(y.1)).map(|(i, _)| i);
        same += usize::from(argmax(&a) == argmax(&b));
        for (x, y) in a.iter().zip(&b) {
            let d = f64::from((x - y).abs());
            sum += d / 3.0;
            max = max.max(d);
        }
    }
    let n = float.len().min(exported.len()).max(1) as f64;
    Ok(ExportError { texts: float.len().min(exported.len()), mean_abs_difference: sum / n, max_abs_difference: max, agreement: same as f64 / n })
}

impl Report {
    /// Whether the candidate is worse than the champion beyond its interval on any set and head.
    pub fn worse(&self) -> bool {
        self.comparisons.iter().any(|c| c.worse)
    }

    pub fn write(&self, out: &Path) -> Result<(), LearnError> {
        let json = serde_json::to_string_pretty(self).map_err(|e| LearnError::Invalid(e.to_string()))?;
        std::fs::write(out.join("report.json"), json + "\n").map_err(files(out))?;
        std::fs::write(out.join("report.md"), self.markdown()).map_err(files(out))
    }

    pub fn markdown(&self) -> String {
        let how = match &self.tuning {
            None => format!("Refitted heads on {} anchors and {} feedback labels (weight {})", self.anchors, self.feedback_trained, self.feedback_weight),
            Some(t) => format!(
                "Fine-tuned the encoder and heads on {} feedback labels with anchors replayed ({} labels and {} anchors held out to stop; \
                 kept epoch {} of {}, {:.0} s; the int8 export agrees with the fp32 weights on {:.1} % of the frozen set's sentiment labels, \
                 probabilities {:.4} apart on average)",
                self.feedback_trained - t.stopping_feedback,
                t.stopping_feedback,
                t.stopping_anchors,
                t.kept_epoch,
                t.epochs.len() - 1,
                t.seconds,
                100.0 * t.export.agreement,
                t.export.mean_abs_difference
            ),
        };
        let mut md = format!(
            "# {} against {}\n\n{how}; {} newer labels held out. \
             Temperatures: sentiment {:.3}, topic {:.3}.\n\n| set | head | n | champion | candidate | difference (95 % interval) | |\n|---|---|---:|---:|---:|---|---|\n",
            self.candidate, self.champion, self.feedback_held_out, self.temperatures.0, self.temperatures.1
        );
        for c in &self.comparisons {
            md.push_str(&format!("| {} | {} |\n", c.cells(), if c.worse { "worse" } else { "" }));
        }
        if self.feedback_held_out == 0 {
            md.push_str(&format!("\nFewer than {} feedback labels: none held out, so no feedback comparison.\n", super::MIN_HELD_OUT_FEEDBACK));
        }
        md.push_str(&format!("\nVerdict: {}.\n", if self.worse() { "worse than the champion beyond its interval; `model promote` refuses it without --force" } else { "not worse beyond its interval" }));
        md
    }
}

/// 95 % interval of the difference of two paired proportions from the discordant counts `b` (only
/// the first right) and `c` (only the second right) of `n` pairs, by Agresti and Min (2005).
fn paired_interval(b: f64, c: f64, n: usize) -> (f64, f64) {
    let (b, c, n) = (b + 0.5, c + 0.5, n as f64 + 2.0);
    let centre = (c - b) / n;
    let half = 1.96 * (((b + c) - (c - b).powi(2) / n) / (n * n)).sqrt();
    ((centre - half).max(-1.0), (centre + half).min(1.0))
}

/// Both models' accuracy from whether each was right on each example of one set and head
/// (champion, candidate), with the paired interval; `None` for no examples.
pub fn comparison(set: &str, head: Kind, right: impl IntoIterator<Item = (bool, bool)>) -> Option<Comparison> {
    // Discordant pairs: only the champion right (b), only the candidate right (c).
    let (mut n, mut champion, mut candidate, mut b, mut c) = (0usize, 0usize, 0usize, 0f64, 0f64);
    for (old, new) in right {
        n += 1;
        champion += usize::from(old);
        candidate += usize::from(new);
        b += f64::from(u8::from(old && !new));
        c += f64::from(u8::from(new && !old));
    }
    if n == 0 {
        return None;
    }
    let (lo, hi) = paired_interval(b, c, n);
    Some(Comparison {
        set: set.to_string(),
        head,
        n,
        champion_accuracy: champion as f64 / n as f64,
        candidate_accuracy: candidate as f64 / n as f64,
        difference: (c - b) / n as f64,
        difference_95: (lo, hi),
        worse: hi < 0.0,
    })
}

/// Per head: both models' accuracy on `examples`, read by the champion as `reads` and by the
/// candidate's encoder as `candidate` (the same reads when only the heads changed) under `heads`.
pub(super) fn compare(set: &str, examples: &[Example], reads: &[Read], candidate: &[Read], heads: &Heads, spec: &ModelSpec) -> Vec<Comparison> {
    let mut out = Vec::new();
    for kind in [Kind::Sentiment, Kind::Topic] {
        let names = classes(spec, kind);
        let head = head_of(heads, kind);
        let mut p = Vec::new();
        let right = examples.iter().zip(reads.iter().zip(candidate)).filter(|(e, _)| e.head == kind).map(|(e, (r, c))| {
            p.clear();
            head.probabilities(&c.embedding, &mut p);
            let predicted = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| names[i].as_str()).unwrap_or_default();
            (r.label(kind) == e.label, predicted == e.label)
        });
        out.extend(comparison(set, kind, right));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::paired_interval;

    #[test]
    fn paired_intervals_are_never_zero_width_and_follow_the_discordant_pairs() {
        let (lo, hi) = paired_interval(0.0, 10.0, 10);
        assert!(lo > 0.5 && hi == 1.0, "{lo} {hi}");
        let (lo, hi) = paired_interval(0.0, 0.0, 100);
        assert!(lo < 0.0 && hi > 0.0 && hi - lo > 0.01, "{lo} {hi}");
        let (lo, hi) = paired_interval(30.0, 5.0, 900);
        assert!(hi < 0.0, "25 more wrong of 900 is worse beyond doubt: {lo} {hi}");
    }
}
