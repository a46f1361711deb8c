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
    /// Most padded tokens (rows × longest row) in one batch; 0 = 512 on CPU, where a batch's
    /// activations then stay in the core's cache, and 2048 on CUDA.
    pub max_batch_tokens: usize,
    pub max_batch_size: usize,
    /// How long a lone item may wait for company before it runs by itself.
    pub max_wait_ms: u64,
    /// Model instances, each running one batch at a time on its own ONNX Runtime session (Triton's
    /// instance count); 0 = one per core on CPU (at most 8), one on CUDA.
    pub workers: usize,
    /// ONNX Runtime intra-op threads per worker; 0 = the cores shared out among the workers.
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
            max_batch_tokens: 0,
            max_batch_size: 64,
            max_wait_ms: 5,
            workers: 0,
            threads: 0,
            max_length: 64,
            body_chars: 0,
            max_queued: 4096,
            embeddings: false,
        }
    }
}

/// Measured on 2 cores with 2 single-threaded workers: 512 padded tokens a batch gave 1.2× the
/// items/s of 2048 (the feed-forward activations of 2048 tokens, 12 MB, spill out of the cache).
const CPU_BATCH_TOKENS: usize = 512;
/// A GPU wants bigger batches; the default before there was a CPU one.
const CUDA_BATCH_TOKENS: usize = 2048;

/// Auto never starts more sessions than this: each holds its own copy of the weights.
const MAX_AUTO_WORKERS: usize = 8;

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

impl ClassifierConfig {
    /// Every setting that scales memory or work has a bound, so that a typo cannot exhaust the host.
    pub fn validate(&self) -> Result<(), ClassifyError> {
        let bad = |field, reason: String| Err(ClassifyError::Config { field, reason });
        let bounds: [(&'static str, usize, usize, usize); 7] = [
            ("max_batch_size", self.max_batch_size, 1, 4096),
            ("max_length", self.max_length, 3, 512),
            ("max_batch_tokens", self.max_batch_tokens, 0, 1 << 20),
            ("max_queued", self.max_queued, 1, 1_000_000),
            ("workers", self.workers, 0, 64),
            ("threads", self.threads, 0, 1024),
            ("body_chars", self.body_chars, 0, 100_000),
        ];
        for (field, value, min, max) in bounds {
            if !(min..=max).contains(&value) {
                return bad(field, format!("must be between {min} and {max}, is {value}"));
            }
        }
        if self.max_batch_tokens != 0 && self.max_batch_tokens < self.max_length {
            return bad("max_batch_tokens", "must be at least max_length, or a long text could never run".into());
        }
        if self.max_wait_ms > 10_000 {
            return bad("max_wait_ms", format!("must be at most 10000 ms, is {}", self.max_wait_ms));
        }
        Ok(())
    }

    /// The batcher's limits for sessions on `provider` (`cpu` or `cuda`).
    pub fn limits(&self, provider: &str) -> BatchLimits {
        let auto = if provider == "cuda" { CUDA_BATCH_TOKENS } else { CPU_BATCH_TOKENS };
        BatchLimits {
            // Never below max_length (at most 512), so that the longest text fits a batch alone.
            max_batch_tokens: if self.max_batch_tokens > 0 { self.max_batch_tokens } else { auto.max(self.max_length) },
            max_batch_size: self.max_batch_size,
            max_wait: Duration::from_millis(self.max_wait_ms),
        }
    }

    /// Workers for a CPU session. One single-threaded session per core beats one session that
    /// splits each batch over the cores: ~1.4× the items/s for ~30 % less CPU per item on 2 cores,
    /// since a headline batch's matrices are too small to split without waiting.
    pub fn workers(&self) -> usize {
        match (self.workers, self.threads) {
            (0, 0) => cores().min(MAX_AUTO_WORKERS),
            (0, threads) => (cores() / threads).clamp(1, MAX_AUTO_WORKERS),
            (workers, _) => workers,
        }
    }

    /// Intra-op threads of each worker's session.
    pub fn threads(&self) -> usize {
        if self.threads > 0 { self.threads } else { (cores() / self.workers()).max(1) }
    }

    /// The same settings for one session that has the whole machine (CUDA, which queues its
    /// batches on one device, and runs what falls back to the CPU on these threads).
    pub fn single_worker(&self) -> ClassifierConfig {
        let threads = if self.threads > 0 { self.threads } else { cores() };
        ClassifierConfig { workers: 1, threads, ..self.clone() }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(workers: usize, threads: usize) -> (usize, usize) {
        let config = ClassifierConfig { workers, threads, ..ClassifierConfig::default() };
        (config.workers(), config.threads())
    }

    #[test]
    fn workers_threads_and_the_token_budget_resolve_per_device_unless_set() {
        let cores = cores();
        assert_eq!(plan(3, 2), (3, 2), "explicit settings are kept");
        let (workers, threads) = plan(0, 0);
        assert_eq!(workers, cores.min(MAX_AUTO_WORKERS));
        assert_eq!(threads, (cores / workers).max(1));
        assert_eq!(plan(0, cores), (1, cores), "threads for the whole machine leave room for one worker");
        assert_eq!(plan(2, 0).1, (cores / 2).max(1));
        let single = ClassifierConfig::default().single_worker();
        assert_eq!((single.workers(), single.threads()), (1, cores));
        assert_eq!(ClassifierConfig::default().limits("cpu").max_batch_tokens, CPU_BATCH_TOKENS);
        assert_eq!(ClassifierConfig::default().limits("cuda").max_batch_tokens, CUDA_BATCH_TOKENS);
        let long = ClassifierConfig { max_length: 512, max_batch_tokens: 0, ..ClassifierConfig::default() };
        assert!(long.limits("cpu").max_batch_tokens >= 512, "the longest text must fit a batch");
        let set = ClassifierConfig { max_batch_tokens: 100, ..ClassifierConfig::default() };
        assert_eq!(set.limits("cuda").max_batch_tokens, 100);
        let too_many = ClassifierConfig { workers: 65, ..ClassifierConfig::default() };
        assert!(matches!(too_many.validate(), Err(ClassifyError::Config { field: "workers", .. })));
    }
}
