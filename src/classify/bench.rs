//! `bearwatch bench classify`: the classifier's throughput, beside bare ONNX Runtime and Python.
//!
//! For each batch size the whole pipeline (tokenize → batcher → ORT) scores the same mix of real
//! headlines and tweets as fast as it can. Every batch it formed is recorded and then replayed straight
//! through a fresh ORT session: the difference is the pipeline's own overhead. A Python pipeline
//! (`benches/python_reference.py`: onnxruntime + tokenizers, fixed batches of 32 in arrival order, each
//! padded to its longest item) scores the same file with the same model and threads.

use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::runtime::OrtBackend;
use super::{Backend, BatchOutput, Classifier, ClassifierConfig, ClassifyError, ModelSpec, PaddedBatch};

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    /// JSON lines with a `text` field, scored in file order.
    #[arg(long, default_value = "benches/data/headlines_mix.jsonl")]
    pub input: PathBuf,
    /// Score at most this many items from the input.
    #[arg(long, default_value_t = 2048)]
    pub items: usize,
    /// Batch sizes to measure.
    #[arg(long, value_delimiter = ',', default_values_t = [1, 8, 32, 128])]
    pub batch_sizes: Vec<usize>,
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// ONNX Runtime intra-op threads, for bearwatch and Python alike; 0 = one per core.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Python interpreter with onnxruntime and tokenizers (what scripts/setup-ort.sh installs).
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: PathBuf,
    /// Skip the Python reference.
    #[arg(long)]
    pub no_python: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("cannot read {path}: {reason}")]
    Input { path: PathBuf, reason: String },
    #[error(transparent)]
    Classify(#[from] ClassifyError),
    #[error("python reference failed: {0}")]
    Python(String),
}

/// One measured configuration.
#[derive(Debug, Clone)]
pub struct Row {
    pub label: String,
    pub items: usize,
    pub seconds: f64,
    pub batch_ms: Vec<f64>,
    pub padded_tokens: usize,
    /// Seconds the same batches took as bare ORT runs.
    pub bare_seconds: Option<f64>,
}

impl Row {
    fn per_second(&self) -> f64 {
        self.items as f64 / self.seconds
    }
}

/// Records every batch and how long the model took on it.
struct Recording<B> {
    inner: B,
    log: Arc<Mutex<Vec<(PaddedBatch, Duration)>>>,
}

impl<B: Backend> Backend for Recording<B> {
    fn run(&mut self, batch: &PaddedBatch) -> Result<BatchOutput, ClassifyError> {
        let started = Instant::now();
        let out = self.inner.run(batch)?;
        self.log.lock().unwrap_or_else(|e| e.into_inner()).push((batch.clone(), started.elapsed()));
        Ok(out)
    }
}

pub fn run(args: &BenchArgs) -> Result<String, BenchError> {
    let texts = read_texts(args)?;
    let base = ClassifierConfig { path: args.model.clone(), threads: args.threads, ..ClassifierConfig::default() };
    let spec = ModelSpec::load(&base.model_dir())?;
    let mut rows = Vec::new();
    let mut configs: Vec<(String, ClassifierConfig)> = args
        .batch_sizes
        .iter()
        .map(|&size| {
            let config = ClassifierConfig {
                max_batch_size: size,
                // Only the batch size limits these rows.
                max_batch_tokens: size * base.max_length,
                ..base.clone()
            };
            (format!("bearwatch, batch ≤ {size}"), config)
        })
        .collect();
    configs.push((
        format!("bearwatch, defaults (≤ {} items, ≤ {} tokens)", base.max_batch_size, base.max_batch_tokens),
        base.clone(),
    ));
    for (label, config) in configs {
        rows.push(measure_pipeline(label, &config, &spec, &texts)?);
    }
    let python = if args.no_python { None } else { Some(python_reference(args, &spec, texts.len())?) };
    Ok(report(&rows, python.as_ref(), args, &base))
}

fn read_texts(args: &BenchArgs) -> Result<Vec<String>, BenchError> {
    let input_error = |reason: String| BenchError::Input { path: args.input.clone(), reason };
    let text = std::fs::read_to_string(&args.input).map_err(|e| input_error(e.to_string()))?;
    let texts = text
        .lines()
        .take(args.items)
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line).map_err(|e| input_error(e.to_string()))?;
            value["text"].as_str().map(str::to_string).ok_or_else(|| input_error("a line has no `text`".into()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    if texts.is_empty() {
        return Err(input_error("no items".into()));
    }
    Ok(texts)
}

fn measure_pipeline(
    label: String,
    config: &ClassifierConfig,
    spec: &ModelSpec,
    texts: &[String],
) -> Result<Row, BenchError> {
    let log = Arc::new(Mutex::new(Vec::new()));
    let backend = Recording { inner: OrtBackend::new(spec, config)?, log: log.clone() };
    let classifier = Classifier::with_backend(config, spec.clone(), backend, "cpu")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClassifyError::Session(e.to_string()))?;
    // Warm-up: the first runs allocate ORT's buffers.
    runtime.block_on(async {
        for text in texts.iter().take(8) {
            classifier.classify(text).await?;
        }
        Ok::<_, ClassifyError>(())
    })?;
    log.lock().unwrap_or_else(|e| e.into_inner()).clear();
    let started = Instant::now();
    runtime.block_on(async {
        let mut pending = Vec::with_capacity(texts.len());
        for text in texts {
            pending.push(classifier.submit(text).await?);
        }
        for p in pending {
            p.scores().await?;
        }
        Ok::<_, ClassifyError>(())
    })?;
    let seconds = started.elapsed().as_secs_f64();
    drop(classifier);
    let batches = std::mem::take(&mut *log.lock().unwrap_or_else(|e| e.into_inner()));
    let batch_ms = batches.iter().map(|(_, d)| d.as_secs_f64() * 1e3).collect();
    let padded_tokens = batches.iter().map(|(b, _)| b.padded_tokens()).sum();
    // The same batches, straight through a fresh session.
    let mut bare = OrtBackend::new(spec, config)?;
    bare.run(&batches[0].0)?;
    let bare_started = Instant::now();
    for (batch, _) in &batches {
        bare.run(batch)?;
    }
    let bare_seconds = Some(bare_started.elapsed().as_secs_f64());
    Ok(Row { label, items: texts.len(), seconds, batch_ms, padded_tokens, bare_seconds })
}

#[derive(serde::Deserialize)]
struct PythonResult {
    items: usize,
    seconds: f64,
    batch_ms: Vec<f64>,
    padded_tokens: usize,
}

fn python_reference(args: &BenchArgs, spec: &ModelSpec, items: usize) -> Result<Row, BenchError> {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/python_reference.py");
    let output = std::process::Command::new(&args.python)
        .arg(&script)
        .arg("--model")
        .arg(&spec.dir)
        .arg("--input")
        .arg(&args.input)
        .args(["--items", &items.to_string(), "--threads", &threads(args).to_string(), "--batch-size", "32"])
        .output()
        .map_err(|e| BenchError::Python(format!("cannot run {}: {e}", args.python.display())))?;
    if !output.status.success() {
        return Err(BenchError::Python(String::from_utf8_lossy(&output.stderr).into_owned()));
    }
    let result: PythonResult =
        serde_json::from_slice(&output.stdout).map_err(|e| BenchError::Python(format!("unreadable result: {e}")))?;
    Ok(Row {
        label: "Python reference, batches of 32 in arrival order".into(),
        items: result.items,
        seconds: result.seconds,
        batch_ms: result.batch_ms,
        padded_tokens: result.padded_tokens,
        bare_seconds: None,
    })
}

fn threads(args: &BenchArgs) -> usize {
    ClassifierConfig { threads: args.threads, ..ClassifierConfig::default() }.threads()
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted.get(rank).copied().unwrap_or(f64::NAN)
}

fn report(rows: &[Row], python: Option<&Row>, args: &BenchArgs, base: &ClassifierConfig) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "{} items from {}, {} ORT threads, max_length {}\n",
        rows.first().map_or(0, |r| r.items),
        args.input.display(),
        threads(args),
        base.max_length
    );
    let _ = writeln!(
        out,
        "| pipeline | items/s | p50 batch ms | p99 batch ms | padded tokens/item | bare ORT items/s | overhead vs bare ORT |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|");
    for row in rows.iter().chain(python) {
        let (bare, overhead) = match row.bare_seconds {
            Some(bare) => (
                format!("{:.0}", row.items as f64 / bare),
                format!("{:+.1} %", (row.seconds / bare - 1.0) * 100.0),
            ),
            None => ("–".into(), "–".into()),
        };
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.2} | {:.2} | {:.1} | {} | {} |",
            row.label,
            row.per_second(),
            percentile(&row.batch_ms, 50.0),
            percentile(&row.batch_ms, 99.0),
            row.padded_tokens as f64 / row.items as f64,
            bare,
            overhead
        );
    }
    let _ = writeln!(
        out,
        "\nbatch ms: bearwatch rows time the model run of each batch (tokenizing overlaps it on another \
         thread); the Python row times tokenize + run, which its loop does in turn."
    );
    if let Some(python) = python {
        for row in rows.iter().filter(|r| r.label.contains("≤ 32") || r.label.contains("defaults")) {
            let _ = writeln!(
                out,
                "\n{} vs Python reference: {:.2}×",
                row.label,
                row.per_second() / python.per_second()
            );
        }
    }
    out
}
