use tokenizers::{Tokenizer, TruncationParams};

use super::{ClassifyError, ModelSpec};

/// Text → token ids, cut at `max_length` and never padded: the batcher pads each batch to its
/// longest item, which for headlines is far shorter than the tokenizer file's fixed 128.
pub struct Encoder {
    tokenizer: Tokenizer,
}

impl Encoder {
    pub fn load(spec: &ModelSpec, max_length: usize) -> Result<Encoder, ClassifyError> {
        let files_error =
            |reason: String| ClassifyError::ModelFiles { path: spec.tokenizer.clone(), reason };
        let mut tokenizer = Tokenizer::from_file(&spec.tokenizer).map_err(|e| files_error(e.to_string()))?;
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| files_error(e.to_string()))?;
        Ok(Encoder { tokenizer })
    }

    pub fn encode(&self, text: &str) -> Result<Vec<i64>, ClassifyError> {
        if text.trim().is_empty() {
            return Err(ClassifyError::EmptyText);
        }
        // `encode_fast` skips the character offsets, which nothing here reads.
        let encoding = self.tokenizer.encode_fast(text, true).map_err(|e| ClassifyError::Tokenize(e.to_string()))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }
}
