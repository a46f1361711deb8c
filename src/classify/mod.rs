//! Topic and sentiment for every headline: tokenizer → token-budget batcher → ONNX Runtime.
//!
//! Laid out like Hugging Face TEI: [`Classifier`] is the router callers talk to, [`batcher`] is the
//! core that forms batches, and [`Backend`] is the small trait the model runtime sits behind
//! ([`runtime::OrtBackend`] in production, fakes in tests).

pub mod batcher;
mod jsonl;
mod config;
mod error;
mod explain;
pub mod heads;
pub mod onnx;
mod model;
pub mod runtime;
mod table;
mod tokenize;

use std::sync::Arc;

use tokio::sync::{Semaphore, oneshot};

pub use batcher::{Backend, BatchLimits, BatchOutput, PaddedBatch};
pub use config::{ClassifierConfig, Device};
pub use error::ClassifyError;
pub use explain::{Explained, PendingExplanation};
pub use jsonl::{LineStats, classify_lines};
pub use crate::news::near::NearDuplicates;
pub use model::{ModelSpec, sentiment_label};
pub use table::{news_batch, news_schema};
pub use tokenize::Encoder;

use crate::news::Scores;

/// A running classifier: tokenizes on the caller's task, batches and infers on its worker threads.
/// Cheap to clone; the workers stop when the last clone is dropped.
#[derive(Clone)]
pub struct Classifier {
    encoder: Arc<Encoder>,
    spec: Arc<ModelSpec>,
    queue: batcher::Submitter,
    /// Bounds the items queued or in flight, so a fast producer waits instead of growing memory.
    slots: Arc<Semaphore>,
    provider: &'static str,
    limits: BatchLimits,
}

impl Classifier {
    /// Loads the model and starts ONNX Runtime on the configured device.
    pub fn start(config: &ClassifierConfig) -> Result<Classifier, ClassifyError> {
        config.validate()?;
        let spec = ModelSpec::load(&config.model_dir())?;
        let (backends, provider) = Classifier::sessions(&spec, config)?;
        Classifier::assemble(config, spec, backends, provider)
    }

    /// One ONNX Runtime session per worker. A GPU takes one session with the machine's threads
    /// unless `workers` asks for more: its batches queue on one device anyway.
    pub fn sessions(spec: &ModelSpec, config: &ClassifierConfig) -> Result<(Vec<runtime::OrtBackend>, &'static str), ClassifyError> {
        let first_config = match config.device {
            Device::Cuda if config.workers == 0 => config.single_worker(),
            _ => config.clone(),
        };
        let cpu_form = runtime::CpuForm::default();
        let first = runtime::OrtBackend::new(spec, &first_config, &cpu_form)?;
        let provider = first.provider();
        let workers = if provider == "cuda" && config.workers == 0 { 1 } else { config.workers() };
        let threads = first_config.threads();
        let mut backends = vec![first];
        while backends.len() < workers {
            backends.push(runtime::OrtBackend::new(spec, config, &cpu_form)?);
        }
        tracing::info!(model = %spec.id(), provider, workers, threads, "classifier ready");
        Ok((backends, provider))
    }

    /// Starts the batcher over any backends, one worker each; tests and benchmarks use this to wrap
    /// or fake the model.
    pub fn with_backends<B: Backend>(
        config: &ClassifierConfig,
        spec: ModelSpec,
        backends: Vec<B>,
        provider: &'static str,
    ) -> Result<Classifier, ClassifyError> {
        config.validate()?;
        Classifier::assemble(config, spec, backends, provider)
    }

    fn assemble<B: Backend>(
        config: &ClassifierConfig,
        spec: ModelSpec,
        backends: Vec<B>,
        provider: &'static str,
    ) -> Result<Classifier, ClassifyError> {
        if config.max_length > spec.trained_max_length {
            tracing::warn!(
                max_length = config.max_length,
                trained = spec.trained_max_length,
                "max_length is longer than the model was trained on; scores for long texts may degrade"
            );
        }
        let encoder = Encoder::load(&spec, config.max_length)?;
        let limits = config.limits(provider);
        let queue = batcher::spawn(backends, limits)?;
        Ok(Classifier {
            encoder: Arc::new(encoder),
            spec: Arc::new(spec),
            queue,
            slots: Arc::new(Semaphore::new(config.max_queued)),
            provider,
            limits,
        })
    }

    /// The execution provider the model runs on (`cpu` or `cuda`).
    pub fn provider(&self) -> &'static str {
        self.provider
    }

    /// The batch limits in force, with defaults resolved for the device.
    pub fn limits(&self) -> BatchLimits {
        self.limits
    }

    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// Tokenizes `text` now and queues it; the returned handle resolves when its batch has run.
    /// Waits only when `max_queued` items are already pending.
    pub async fn submit(&self, text: &str) -> Result<Pending, ClassifyError> {
        let ids = self.encoder.encode(text)?;
        let permit = self.slots.clone().acquire_owned().await.map_err(|_| ClassifyError::Stopped)?;
        let rx = self.queue.submit(ids, permit)?;
        Ok(Pending { rx, spec: self.spec.clone() })
    }

    /// Like [`Classifier::submit`] for callers on plain threads that bound their own in-flight
    /// items below `max_queued`: fails with [`ClassifyError::QueueFull`] instead of waiting.
    pub fn submit_now(&self, text: &str) -> Result<Pending, ClassifyError> {
        let started = std::time::Instant::now();
        let ids = self.encoder.encode(text)?;
        metrics::histogram!("bearwatch_classify_tokenize_seconds").record(started.elapsed().as_secs_f64());
        let permit = self.slots.clone().try_acquire_owned().map_err(|e| match e {
            tokio::sync::TryAcquireError::Closed => ClassifyError::Stopped,
            tokio::sync::TryAcquireError::NoPermits => ClassifyError::QueueFull,
        })?;
        let rx = self.queue.submit(ids, permit)?;
        Ok(Pending { rx, spec: self.spec.clone() })
    }

    /// Scores every text on this thread, at most 256 in flight (kept below `max_queued` by
    /// callers that start the classifier for this alone), with each pooled embedding.
    pub fn score_all(&self, texts: &[&str]) -> Result<Vec<(Scores, Vec<f32>)>, ClassifyError> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(256) {
            let pending: Vec<Pending> = chunk.iter().map(|t| self.submit_now(t)).collect::<Result<_, _>>()?;
            for p in pending {
                out.push(p.wait_embedded()?);
            }
        }
        Ok(out)
    }

    pub async fn classify(&self, text: &str) -> Result<Scores, ClassifyError> {
        self.submit(text).await?.scores().await
    }
}

/// A queued item's result, to be awaited.
pub struct Pending {
    rx: oneshot::Receiver<Result<batcher::ItemOutput, ClassifyError>>,
    spec: Arc<ModelSpec>,
}

impl Pending {
    pub async fn scores(self) -> Result<Scores, ClassifyError> {
        let out = self.rx.await.map_err(|_| ClassifyError::Stopped)??;
        Ok(self.spec.scores(&out.sentiment, &out.topic))
    }

    /// The result if its batch has run, without waiting.
    pub fn try_scores(&mut self) -> Option<Result<Scores, ClassifyError>> {
        match self.rx.try_recv() {
            Ok(out) => Some(out.map(|out| self.spec.scores(&out.sentiment, &out.topic))),
            Err(oneshot::error::TryRecvError::Empty) => None,
            Err(oneshot::error::TryRecvError::Closed) => Some(Err(ClassifyError::Stopped)),
        }
    }

    /// Blocks the calling thread until the result is in. Not for use inside an async task.
    pub fn wait(self) -> Result<Scores, ClassifyError> {
        self.wait_embedded().map(|(scores, _)| scores)
    }

    /// Like [`Pending::wait`], with the pooled embedding (empty unless the model lists one and the
    /// classifier was started with `embeddings`).
    pub fn wait_embedded(self) -> Result<(Scores, Vec<f32>), ClassifyError> {
        let out = self.rx.blocking_recv().map_err(|_| ClassifyError::Stopped)??;
        Ok((self.spec.scores(&out.sentiment, &out.topic), out.embedding))
    }
}
