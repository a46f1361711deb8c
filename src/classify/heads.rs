//! Heads refitted outside the ONNX graph (`bearwatch model retrain`): linear layers over the model's
//! pooled `embedding` output, each with its temperature, kept in the model folder's `heads.json`.
//! A model folder that names such a file scores with them instead of the graph's own heads; the
//! encoder, tokenizer and labels stay the champion's.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::ClassifyError;

/// logits = weight · x + bias; probabilities = softmax(logits / temperature).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Head {
    /// One row per class, `dims` columns.
    pub weight: Vec<Vec<f32>>,
    pub bias: Vec<f32>,
    pub temperature: f32,
}

impl Head {
    /// Class probabilities of one embedding, into `out`.
    pub fn probabilities(&self, x: &[f32], out: &mut Vec<f32>) {
        let logits: Vec<f32> =
            self.weight.iter().zip(&self.bias).map(|(w, b)| (w.iter().zip(x).map(|(w, x)| w * x).sum::<f32>() + b) / self.temperature).collect();
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
        let sum: f32 = exp.iter().sum();
        out.extend(exp.iter().map(|e| e / sum));
    }

    fn check(&self, name: &str, classes: usize, dims: usize) -> Result<(), String> {
        if self.weight.len() != classes || self.bias.len() != classes {
            return Err(format!("{name}: {classes} classes expected, found {} rows and {} biases", self.weight.len(), self.bias.len()));
        }
        if self.weight.iter().any(|row| row.len() != dims) {
            return Err(format!("{name}: every row needs {dims} weights"));
        }
        if !(self.temperature.is_finite() && self.temperature > 0.0) || self.weight.iter().flatten().chain(&self.bias).any(|v| !v.is_finite()) {
            return Err(format!("{name}: weights and temperature must be finite, the temperature positive"));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heads {
    /// Length of the embedding the heads read.
    pub dims: usize,
    pub sentiment: Head,
    pub topic: Head,
}

impl Heads {
    pub fn load(path: &Path, topics: usize) -> Result<Heads, ClassifyError> {
        let invalid = |reason: String| ClassifyError::ModelFiles { path: path.to_path_buf(), reason };
        let text = std::fs::read_to_string(path).map_err(|e| invalid(e.to_string()))?;
        let heads: Heads = serde_json::from_str(&text).map_err(|e| invalid(e.to_string()))?;
        if heads.dims == 0 {
            return Err(invalid("dims: the heads read at least one value".into()));
        }
        heads.sentiment.check("sentiment", 3, heads.dims).map_err(invalid)?;
        heads.topic.check("topic", topics, heads.dims).map_err(invalid)?;
        Ok(heads)
    }

    /// Sentiment and topic probabilities, row-major, for `rows` embeddings laid end to end.
    pub fn apply(&self, embedding: &[f32], rows: usize) -> Result<(Vec<f32>, Vec<f32>), ClassifyError> {
        if rows == 0 || embedding.len() != rows * self.dims {
            return Err(ClassifyError::Inference(format!(
                "the heads read {} values per row; the model gave {} for {rows} rows",
                self.dims,
                embedding.len()
            )));
        }
        let (mut sentiment, mut topic) = (Vec::with_capacity(rows * 3), Vec::with_capacity(rows * self.topic.bias.len()));
        for x in embedding.chunks_exact(self.dims) {
            self.sentiment.probabilities(x, &mut sentiment);
            self.topic.probabilities(x, &mut topic);
        }
        Ok((sentiment, topic))
    }
}
