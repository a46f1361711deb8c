//! What `model retrain` says about its candidate: accuracy beside the champion's on each set and
//! head, with a 95 % interval of the paired difference, in `report.json` and `report.md`.

use std::path::Path;

use chrono::{DateTime, Utc};
use serde::Serialize;

use super::{Example, LearnError, Read, classes, files};
use crate::classify::ModelSpec;
use crate::classify::heads::Heads;
use crate::feedback::Head as Kind;

#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// `eval` (the frozen set shipped with the model) or `feedback` (the newest labels, held out).
    pub set: String,
    pub head: Kind,
    pub n: usize,
    pub champion_accuracy: f64,
    pub candidate_accuracy: f64,
    /// Candidate minus champion, and its 95 % interval (paired, normal approximation).
    pub difference: f64,
    pub difference_95: (f64, f64),
    /// The whole interval is below zero: worse beyond doubt.
    pub worse: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub candidate: String,
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
    pub comparisons: Vec<Comparison>,
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
        let mut md = format!(
            "# {} against {}\n\nRefitted heads on {} anchors and {} feedback labels (weight {}); {} newer labels held out. \
             Temperatures: sentiment {:.3}, topic {:.3}.\n\n| set | head | n | champion | candidate | difference (95 % interval) | |\n|---|---|---:|---:|---:|---|---|\n",
            self.candidate, self.champion, self.anchors, self.feedback_trained, self.feedback_weight, self.feedback_held_out, self.temperatures.0, self.temperatures.1
        );
        for c in &self.comparisons {
            md.push_str(&format!(
                "| {} | {} | {} | {:.3} | {:.3} | {:+.3} ({:+.3} to {:+.3}) | {} |\n",
                c.set,
                c.head.name(),
                c.n,
                c.champion_accuracy,
                c.candidate_accuracy,
                c.difference,
                c.difference_95.0,
                c.difference_95.1,
                if c.worse { "worse" } else { "" }
            ));
        }
        if self.feedback_held_out == 0 {
            md.push_str(&format!("\nFewer than {} feedback labels: none held out, so no feedback comparison.\n", super::MIN_HELD_OUT_FEEDBACK));
        }
        md.push_str(&format!("\nVerdict: {}.\n", if self.worse() { "worse than the champion beyond its interval; `model promote` refuses it without --force" } else { "not worse beyond its interval" }));
        md
    }
}

/// Per head: both models' accuracy on `examples` (read by the champion as `reads`).
pub(super) fn compare(set: &str, examples: &[Example], reads: &[Read], heads: &Heads, spec: &ModelSpec) -> Vec<Comparison> {
    let mut out = Vec::new();
    for kind in [Kind::Sentiment, Kind::Topic] {
        let names = classes(spec, kind);
        let head = match kind {
            Kind::Sentiment => &heads.sentiment,
            Kind::Topic => &heads.topic,
        };
        let mut differences = Vec::new();
        let (mut champion, mut candidate) = (0usize, 0usize);
        let mut p = Vec::new();
        for (e, r) in examples.iter().zip(reads).filter(|(e, _)| e.head == kind) {
            p.clear();
            head.probabilities(&r.embedding, &mut p);
            let predicted = p.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).map(|(i, _)| names[i].as_str()).unwrap_or_default();
            let (a, b) = (usize::from(r.label(kind) == e.label), usize::from(predicted == e.label));
            champion += a;
            candidate += b;
            differences.push(b as f64 - a as f64);
        }
        let n = differences.len();
        if n == 0 {
            continue;
        }
        let mean = differences.iter().sum::<f64>() / n as f64;
        let half = if n < 2 {
            1.0
        } else {
            let variance = differences.iter().map(|d| (d - mean).powi(2)).sum::<f64>() / (n - 1) as f64;
            1.96 * (variance / n as f64).sqrt()
        };
        let (lo, hi) = (mean - half, mean + half);
        out.push(Comparison {
            set: set.to_string(),
            head: kind,
            n,
            champion_accuracy: champion as f64 / n as f64,
            candidate_accuracy: candidate as f64 / n as f64,
            difference: mean,
            difference_95: (lo, hi),
            worse: hi < 0.0,
        });
    }
    out
}
