use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::{BatchLimits, ClassifyError};

/// Where the model runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Device {
    /// CUDA when this ONNX Runtime build has it and a GPU answers, else CPU; logs which.
    #[default]
    Auto,
    Cpu,
    /// CUDA or refuse to start: never a silent fall-back to CPU.
    Cuda,
}

/// The `[model]` section of a pipeline, and the flags of `bearwatch classify`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClassifierConfig {
    /// Folder with `model.onnx`, `tokenizer.json` and `labels.json`; default: the bundled `models/`.
    pub path: Option<PathBuf>,
    pub device: Device,
    /// Most padded tokens (rows × longest row) in one batch.
    pub max_batch_tokens: usize,
    pub max_batch_size: usize,
    /// How long a lone item may wait for company before it runs by itself.
    pub max_wait_ms: u64,
    /// ONNX Runtime intra-op threads; 0 = one per core.
    pub threads: usize,
    /// Tokens kept per text (headlines are ~20).
    pub max_length: usize,
    /// Characters of a story's body appended to its headline before classifying; 0 = headline only.
    pub body_chars: usize,
    /// Items tokenized and waiting or in flight before producers are held back.
    pub max_queued: usize,
    /// Hand each item's pooled embedding back too (`model retrain`); not a file setting.
    #[serde(skip)]
    pub embeddings: bool,
}

impl Default for ClassifierConfig {
    fn default() -> Self {
        ClassifierConfig {
            path: None,
            device: Device::Auto,
            max_batch_tokens: 2048,
            max_batch_size: 64,
            max_wait_ms: 5,
            threads: 0,
            max_length: 64,
            body_chars: 0,
            max_queued: 4096,
            embeddings: false,
        }
    }
}

impl ClassifierConfig {
    /// Every setting that scales memory or work has a bound, so that a typo cannot exhaust the host.
    pub fn validate(&self) -> Result<(), ClassifyError> {
        let bad = |field, reason: String| Err(ClassifyError::Config { field, reason });
        let bounds: [(&'static str, usize, usize, usize); 6] = [
            ("max_batch_size", self.max_batch_size, 1, 4096),
            ("max_length", self.max_length, 3, 512),
            ("max_batch_tokens", self.max_batch_tokens, 3, 1 << 20),
            ("max_queued", self.max_queued, 1, 1_000_000),
            ("threads", self.threads, 0, 1024),
            ("body_chars", self.body_chars, 0, 100_000),
        ];
        for (field, value, min, max) in bounds {
            if !(min..=max).contains(&value) {
                return bad(field, format!("must be between {min} and {max}, is {value}"));
            }
        }
        if self.max_batch_tokens < self.max_length {
            return bad("max_batch_tokens", "must be at least max_length, or a long text could never run".into());
        }
        if self.max_wait_ms > 10_000 {
            return bad("max_wait_ms", format!("must be at most 10000 ms, is {}", self.max_wait_ms));
        }
        Ok(())
    }

    pub fn limits(&self) -> BatchLimits {
        BatchLimits {
            max_batch_tokens: self.max_batch_tokens,
            max_batch_size: self.max_batch_size,
            max_wait: Duration::from_millis(self.max_wait_ms),
        }
    }

    pub fn threads(&self) -> usize {
        if self.threads > 0 {
            self.threads
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The configured folder, else `models/` in the working directory, else the one in the source tree.
    pub fn model_dir(&self) -> PathBuf {
        if let Some(path) = &self.path {
            return path.clone();
        }
        let local = PathBuf::from("models");
        if local.join("labels.json").is_file() {
            return local;
        }
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models")
    }
}
