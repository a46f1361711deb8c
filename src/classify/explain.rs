//! Word-level reasons for a score, by leave-one-out occlusion: the text with each word left out, all
//! variants and the text itself scored in one model call, and each word's effect is how much
//! p_negative drops without it. A person can check the reason by reading the headline without that word.

use std::sync::Arc;

use tokio::sync::oneshot;

use super::batcher::ItemOutput;
use super::{Classifier, ClassifyError, ModelSpec};
use crate::news::{Scores, Why};

/// A text's scores and the effect of each of its words, the strongest push towards negative first.
#[derive(Debug, Clone, PartialEq)]
pub struct Explained {
    pub scores: Scores,
    pub why: Vec<Why>,
}

/// An explanation whose model call is queued.
pub struct PendingExplanation {
    rx: oneshot::Receiver<Result<Vec<ItemOutput>, ClassifyError>>,
    variants: Variants,
}

/// What it takes to read a group's outputs back as an explanation.
struct Variants {
    spec: Arc<ModelSpec>,
    words: Vec<String>,
    /// Per word, the row of its variant; `None` when leaving it out changes no token the model
    /// reads (it lies past `max_length`), so its effect is 0.
    rows: Vec<Option<usize>>,
}

impl Classifier {
    /// Queues `text` and its leave-one-out variants as one group for the model, once a queue slot
    /// is free.
    pub async fn submit_explain(&self, text: &str) -> Result<PendingExplanation, ClassifyError> {
        let permit = self.slots.clone().acquire_owned().await.map_err(|_| ClassifyError::Stopped)?;
        self.queue_explain(text, Some(permit))
    }

    /// Like [`Classifier::submit_explain`] for a pipeline's thread, which bounds its own in-flight
    /// stories by `max_queued`: the group takes no slot, so it never waits behind them.
    pub fn explain_now(&self, text: &str) -> Result<PendingExplanation, ClassifyError> {
        self.queue_explain(text, None)
    }

    fn queue_explain(&self, text: &str, permit: Option<tokio::sync::OwnedSemaphorePermit>) -> Result<PendingExplanation, ClassifyError> {
        let original = self.encoder.encode(text)?;
        let words: Vec<&str> = text.split_whitespace().collect();
        let mut rows = vec![original.clone()];
        let mut variant_rows = Vec::with_capacity(words.len());
        // Every word is at least one token, so a word past the original's (truncated) token count
        // cannot be in the window.
        let considered = words.len().min(original.len());
        for (i, _) in words.iter().enumerate() {
            if i >= considered {
                variant_rows.push(None);
                continue;
            }
            let rest: Vec<&str> = words.iter().enumerate().filter(|(j, _)| *j != i).map(|(_, w)| *w).collect();
            let ids = match self.encoder.encode(&rest.join(" ")) {
                Ok(ids) => ids,
                // A one-word text without its word is the empty input: just the special tokens.
                Err(ClassifyError::EmptyText) => vec![original[0], original[original.len() - 1]],
                Err(e) => return Err(e),
            };
            if ids == original {
                variant_rows.push(None);
            } else {
                rows.push(ids);
                variant_rows.push(Some(rows.len() - 1));
            }
        }
        let rx = self.queue.submit_group(rows, permit)?;
        let words = words.into_iter().map(str::to_string).collect();
        Ok(PendingExplanation { rx, variants: Variants { spec: self.spec.clone(), words, rows: variant_rows } })
    }

    pub async fn explain(&self, text: &str) -> Result<Explained, ClassifyError> {
        self.submit_explain(text).await?.explained().await
    }
}

impl PendingExplanation {
    pub async fn explained(self) -> Result<Explained, ClassifyError> {
        let outputs = self.rx.await.map_err(|_| ClassifyError::Stopped)??;
        self.variants.read(outputs)
    }

    /// Blocks the calling thread until the explanation is in. Not for use inside an async task.
    pub fn wait(self) -> Result<Explained, ClassifyError> {
        let outputs = self.rx.blocking_recv().map_err(|_| ClassifyError::Stopped)??;
        self.variants.read(outputs)
    }
}

impl Variants {
    fn read(self, outputs: Vec<ItemOutput>) -> Result<Explained, ClassifyError> {
        let Some(original) = outputs.first() else {
            return Err(ClassifyError::Inference("an explanation came back without its text's row".into()));
        };
        let scores = self.spec.scores(&original.sentiment, &original.topic);
        let p_negative = original.sentiment[0];
        let mut why: Vec<Why> = self
            .words
            .into_iter()
            .zip(self.rows)
            .enumerate()
            .map(|(position, (word, row))| {
                let without = row.and_then(|r| outputs.get(r)).map_or(p_negative, |o| o.sentiment[0]);
                Why { word, position, effect: p_negative - without }
            })
            .collect();
        // Strongest push towards negative first; the sort is stable, so ties keep word order.
        why.sort_by(|a, b| b.effect.total_cmp(&a.effect));
        Ok(Explained { scores, why })
    }
}
