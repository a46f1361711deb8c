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

use super::hardware::{Machine, Work};
use crate::classify::runtime::OrtBackend;
use crate::classify::{Backend, BatchOutput, Classifier, ClassifierConfig, ClassifyError, ModelSpec, PaddedBatch};
use crate::sync::lock;

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
    /// Token budgets to measure as well, each with the default batch size.
    #[arg(long, value_delimiter = ',')]
    pub batch_tokens: Vec<usize>,
    /// Model folder (model.onnx, tokenizer.json, labels.json); default: the bundled `models/`.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// Model workers (sessions running batches side by side); 0 = the classifier's default.
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// ONNX Runtime intra-op threads per worker; 0 = the classifier's default. Python gets
    /// workers × threads, the same cores.
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Python interpreter with onnxruntime and tokenizers (what scripts/setup-ort.sh installs).
    #[arg(long, default_value = ".venv/bin/python")]
    pub python: PathBuf,
    /// Timed rounds; each measures every configuration and the Python reference once.
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Skip the Python reference.
    #[arg(long)]
    pub no_python: bool,
    /// Also replay the default configuration's batches through a profiling ONNX Runtime session
    /// and print its time per operator type (and where the rest of the run goes).
    #[arg(long)]
    pub profile: bool,
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

/// Records every batch and how long the model took on it.
struct Recording<B> {
    inner: B,
    log: Arc<Mutex<Vec<(PaddedBatch, Duration)>>>,
}

impl<B: Backend> Backend for Recording<B> {
    fn run(&mut self, batch: &PaddedBatch) -> Result<BatchOutput, ClassifyError> {
        let started = Instant::now();
        let out = self.inner.run(batch)?;
        lock(&self.log).push((batch.clone(), started.elapsed()));
        Ok(out)
    }
}

/// One pipeline configuration and its measurements, one entry per timed repeat.
struct Subject {
    label: String,
    classifier: Classifier,
    log: Arc<Mutex<Vec<(PaddedBatch, Duration)>>>,
    /// As many sessions again, for replaying the pipeline's batches without the pipeline.
    bare: Vec<OrtBackend>,
    seconds: Vec<f64>,
    /// The process's CPU time (every thread) while the pipeline scored.
    cpu_seconds: Vec<f64>,
    bare_seconds: Vec<f64>,
    batch_ms: Vec<f64>,
    /// The batches of the last timed round: their padding and arithmetic, and `--profile`'s input.
    batches: Vec<PaddedBatch>,
}

impl Subject {
    fn new(label: String, config: &ClassifierConfig, spec: &ModelSpec) -> Result<Subject, ClassifyError> {
        let log = Arc::new(Mutex::new(Vec::new()));
        let (sessions, provider) = Classifier::sessions(spec, config)?;
        let recording = sessions.into_iter().map(|inner| Recording { inner, log: log.clone() }).collect();
        let classifier = Classifier::with_backends(config, spec.clone(), recording, provider)?;
        let bare = Classifier::sessions(spec, config)?.0;
        let (seconds, cpu_seconds, bare_seconds, batch_ms) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        Ok(Subject { label, classifier, log, bare, seconds, cpu_seconds, bare_seconds, batch_ms, batches: Vec::new() })
    }

    /// Scores every text through the pipeline, then replays the batches it formed on the bare
    /// session; records both times when `timed`.
    fn measure(&mut self, runtime: &tokio::runtime::Runtime, texts: &[String], timed: bool) -> Result<(), ClassifyError> {
        lock(&self.log).clear();
        let (started, cpu) = (Instant::now(), process_cpu_seconds());
        runtime.block_on(async {
            let mut pending = Vec::with_capacity(texts.len());
            for text in texts {
                pending.push(self.classifier.submit(text).await?);
            }
            for p in pending {
                p.scores().await?;
            }
            Ok::<_, ClassifyError>(())
        })?;
        let (seconds, cpu_seconds) = (started.elapsed().as_secs_f64(), process_cpu_seconds() - cpu);
        let batches = std::mem::take(&mut *lock(&self.log));
        let started = Instant::now();
        replay(&mut self.bare, batches.iter().map(|(batch, _)| batch))?;
        if timed {
            self.bare_seconds.push(started.elapsed().as_secs_f64());
            self.seconds.push(seconds);
            self.cpu_seconds.push(cpu_seconds);
            self.batch_ms.extend(batches.iter().map(|(_, d)| d.as_secs_f64() * 1e3));
            self.batches = batches.into_iter().map(|(b, _)| b).collect();
        }
        Ok(())
    }

    fn padded_tokens(&self) -> usize {
        self.batches.iter().map(PaddedBatch::padded_tokens).sum()
    }

    /// Arithmetic of the batches it formed (see [`Work`]).
    fn ops(&self, work: &Work) -> f64 {
        self.batches.iter().map(|b| work.ops(b.rows, b.cols)).sum()
    }
}

/// Runs `batches` through the sessions side by side, each taking the next batch when it is free,
/// as the pipeline's workers do.
fn replay<'a>(sessions: &mut [OrtBackend], batches: impl Iterator<Item = &'a PaddedBatch> + Send) -> Result<(), ClassifyError> {
    let next = Mutex::new(batches);
    std::thread::scope(|scope| {
        let runs: Vec<_> = sessions
            .iter_mut()
            .map(|session| {
                let next = &next;
                scope.spawn(move || loop {
                    let Some(batch) = lock(&next).next() else { return Ok(()) };
                    session.run(batch)?;
                })
            })
            .collect();
        runs.into_iter().try_for_each(|run| run.join().unwrap_or_else(|_| Err(ClassifyError::Inference("a replay thread panicked".into()))))
    })
}

pub fn run(args: &BenchArgs) -> Result<String, BenchError> {
    let texts = read_texts(args)?;
    let base = config(args);
    let spec = ModelSpec::load(&base.model_dir())?;
    let graph = base.model_dir().join("model.onnx");
    let unreadable = |reason: String| BenchError::Input { path: graph.clone(), reason };
    let work = Work::of(&crate::classify::onnx::Model::parse(std::fs::read(&graph).map_err(|e| unreadable(e.to_string()))?).map_err(unreadable)?);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| ClassifyError::Session(e.to_string()))?;
    let mut subjects = Vec::new();
    for &size in &args.batch_sizes {
        // Only the batch size limits these rows.
        let config = ClassifierConfig { max_batch_size: size, max_batch_tokens: size * base.max_length, ..base.clone() };
        subjects.push(Subject::new(format!("bearwatch, batch ≤ {size}"), &config, &spec)?);
    }
    for &tokens in &args.batch_tokens {
        let config = ClassifierConfig { max_batch_tokens: tokens, ..base.clone() };
        subjects.push(Subject::new(format!("bearwatch, ≤ {} items, ≤ {tokens} tokens", base.max_batch_size), &config, &spec)?);
    }
    let mut defaults = Subject::new(String::new(), &base, &spec)?;
    let limits = defaults.classifier.limits();
    defaults.label = format!("bearwatch, defaults (≤ {} items, ≤ {} tokens)", limits.max_batch_size, limits.max_batch_tokens);
    subjects.push(defaults);

    // ORT sizes its buffers on the first run of each shape: one untimed round first. Each timed
    // round then measures every configuration and the Python reference back to back, so a slow
    // spell of the machine hits one round rather than one configuration; ratios are per round.
    for subject in &mut subjects {
        subject.measure(&runtime, &texts, false)?;
    }
    let mut python = Vec::new();
    for _ in 0..args.repeats.max(1) {
        for subject in &mut subjects {
            subject.measure(&runtime, &texts, true)?;
        }
        if !args.no_python {
            python.push(python_pass(args, &spec, texts.len())?);
        }
    }
    let mut out = report(&subjects, &python, args, &base, texts.len(), &Machine::read(), &work);
    if args.profile {
        let defaults = subjects.last().expect("the defaults are measured");
        out.push_str(&profile(&spec, &base, &defaults.batches, median(&defaults.seconds), median(&defaults.bare_seconds))?);
    }
    Ok(out)
}

/// ONNX Runtime's own profile of `batches` (one pass, after one untimed pass), summed per operator
/// type, beside the pipeline's and bare ORT's times for the same batches.
fn profile(spec: &ModelSpec, config: &ClassifierConfig, batches: &[PaddedBatch], pipeline_s: f64, bare_s: f64) -> Result<String, BenchError> {
    let dir = std::env::temp_dir().join(format!("bearwatch-profile-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| BenchError::Input { path: dir.clone(), reason: e.to_string() })?;
    // One worker's session, every batch in turn: kernel times add up to its wall time.
    let mut session = OrtBackend::profiled(spec, config, &dir.join("ort"))?;
    for batch in batches {
        session.run(batch)?;
    }
    let started = Instant::now();
    for batch in batches {
        session.run(batch)?;
    }
    let session_s = started.elapsed().as_secs_f64();
    let file = session.end_profiling()?;
    let unreadable = |reason: String| BenchError::Input { path: file.clone(), reason };
    let events: Vec<serde_json::Value> = serde_json::from_slice(&std::fs::read(&file).map_err(|e| unreadable(e.to_string()))?).map_err(|e| unreadable(e.to_string()))?;
    let _ = std::fs::remove_dir_all(&dir);
    // Kernel times of the second pass (the first sizes ORT's buffers): the later half of each node's.
    let mut per_node: std::collections::BTreeMap<(String, String), Vec<f64>> = Default::default();
    for event in &events {
        let (Some(name), Some(dur)) = (event["name"].as_str(), event["dur"].as_f64()) else { continue };
        if event["cat"] == "Node" && name.ends_with("_kernel_time") {
            let op = event["args"]["op_name"].as_str().unwrap_or("?").to_string();
            per_node.entry((op, name.to_string())).or_default().push(dur);
        }
    }
    let mut per_op: std::collections::BTreeMap<String, (usize, f64)> = Default::default();
    for ((op, _), durations) in &per_node {
        let second: f64 = durations[durations.len() / 2..].iter().sum();
        let entry = per_op.entry(op.clone()).or_default();
        entry.0 += 1;
        entry.1 += second / 1e3;
    }
    let total: f64 = per_op.values().map(|(_, ms)| ms).sum();
    let mut rows: Vec<(&String, &(usize, f64))> = per_op.iter().collect();
    rows.sort_by(|a, b| b.1.1.total_cmp(&a.1.1));
    let mut out = format!(
        "\nONNX Runtime profile of the defaults' {} batches through one worker's session (one pass after one untimed): time per operator type, summed over its nodes\n\n\
         | operator | nodes | ms | share of kernel time |\n|---|---:|---:|---:|\n",
        batches.len()
    );
    for (op, (nodes, ms)) in rows {
        let _ = writeln!(out, "| {op} | {nodes} | {ms:.1} | {:.1} % |", 100.0 * ms / total);
    }
    let _ = writeln!(
        out,
        "\nKernels {:.0} ms of that session's {:.0} ms for these batches (the rest: ORT's own work between kernels, and the \
         profiler). On all workers, bare ORT took {:.0} ms and the pipeline {:.0} ms: its own share (tokenizing, batching, \
         copying out) is {:.1} %.",
        total,
        session_s * 1e3,
        bare_s * 1e3,
        pipeline_s * 1e3,
        100.0 * (pipeline_s - bare_s) / pipeline_s
    );
    Ok(out)
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

#[derive(serde::Deserialize)]
struct PythonPass {
    seconds: f64,
    cpu_seconds: f64,
    batch_ms: Vec<f64>,
    padded_tokens: usize,
}

/// One timed pass of the Python reference (after its own untimed pass), in a fresh process.
fn python_pass(args: &BenchArgs, spec: &ModelSpec, items: usize) -> Result<PythonPass, BenchError> {
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
    serde_json::from_slice(&output.stdout).map_err(|e| BenchError::Python(format!("unreadable result: {e}")))
}

/// CPU time of this process so far, every thread's.
fn process_cpu_seconds() -> f64 {
    let mut now = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec, which lives on this stack frame.
    if unsafe { libc::clock_gettime(libc::CLOCK_PROCESS_CPUTIME_ID, &mut now) } != 0 {
        return f64::NAN;
    }
    now.tv_sec as f64 + now.tv_nsec as f64 / 1e9
}

fn config(args: &BenchArgs) -> ClassifierConfig {
    ClassifierConfig { path: args.model.clone(), workers: args.workers, threads: args.threads, ..ClassifierConfig::default() }
}

/// Threads on the model in all, the cores the pipeline's workers share (and what Python gets).
fn threads(args: &BenchArgs) -> usize {
    let config = config(args);
    config.workers() * config.threads()
}

fn median(values: &[f64]) -> f64 {
    percentile(values, 50.0)
}

fn percentile(values: &[f64], p: f64) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted.get(rank).copied().unwrap_or(f64::NAN)
}

fn report(subjects: &[Subject], python: &[PythonPass], args: &BenchArgs, base: &ClassifierConfig, items: usize, machine: &Machine, work: &Work) -> String {
    let mut out = String::new();
    let rounds = args.repeats.max(1);
    let _ = writeln!(
        out,
        "{items} items from {}, {} model workers × {} ORT threads (Python: one session, {} threads), max_length {}, median of {rounds} timed rounds\n{}\n",
        args.input.display(),
        base.workers(),
        base.threads(),
        threads(args),
        base.max_length,
        machine.describe(),
    );
    // GOP/s per core against the strongest vector ISA's peak, and AMX's where there is one.
    let vector = machine.int8.iter().find(|(name, _)| *name != "AMX-INT8");
    let amx = machine.int8.iter().find(|(name, _)| *name == "AMX-INT8");
    let peaks: Vec<(&str, f64)> = vector.into_iter().chain(amx).filter_map(|(name, ops)| Some((*name, machine.peak_gops(*ops)?))).collect();
    let per_core = |s: &Subject| {
        let gops = s.ops(work) / median(&s.seconds) / threads(args) as f64 / 1e9;
        let shares: Vec<String> = peaks.iter().map(|(name, peak)| format!("{:.1} % {name}", 100.0 * gops / peak)).collect();
        if shares.is_empty() { format!("{gops:.0}") } else { format!("{gops:.0} ({})", shares.join(", ")) }
    };
    let _ = writeln!(
        out,
        "| pipeline | items/s | p50 batch ms | p99 batch ms | padded tokens/item | GOP/item | GOP/s per core (% of int8 peak) | bare ORT items/s | overhead vs bare ORT | CPU ms/item | × Python (wall) | × Python (CPU) |"
    );
    let _ = writeln!(out, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    let python_seconds: Vec<f64> = python.iter().map(|p| p.seconds).collect();
    let python_cpu: Vec<f64> = python.iter().map(|p| p.cpu_seconds).collect();
    let ratio = |ours: &[f64], theirs: &[f64]| {
        let per_round: Vec<f64> = theirs.iter().zip(ours).map(|(p, t)| p / t).collect();
        if per_round.is_empty() { "–".to_string() } else { format!("{:.2}×", median(&per_round)) }
    };
    for s in subjects {
        let overhead: Vec<f64> = s.seconds.iter().zip(&s.bare_seconds).map(|(t, b)| t / b - 1.0).collect();
        let _ = writeln!(
            out,
            "| {} | {:.0} | {:.2} | {:.2} | {:.1} | {:.3} | {} | {:.0} | {:+.1} % | {:.2} | {} | {} |",
            s.label,
            items as f64 / median(&s.seconds),
            percentile(&s.batch_ms, 50.0),
            percentile(&s.batch_ms, 99.0),
            s.padded_tokens() as f64 / items as f64,
            s.ops(work) / items as f64 / 1e9,
            per_core(s),
            items as f64 / median(&s.bare_seconds),
            median(&overhead) * 100.0,
            median(&s.cpu_seconds) * 1e3 / items as f64,
            ratio(&s.seconds, &python_seconds),
            ratio(&s.cpu_seconds, &python_cpu),
        );
    }
    if let Some(last) = python.last() {
        let batch_ms: Vec<f64> = python.iter().flat_map(|p| p.batch_ms.iter().copied()).collect();
        let _ = writeln!(
            out,
            "| Python reference, batches of 32 in arrival order | {:.0} | {:.2} | {:.2} | {:.1} | | | – | – | {:.2} | 1.00× | 1.00× |",
            items as f64 / median(&python_seconds),
            percentile(&batch_ms, 50.0),
            percentile(&batch_ms, 99.0),
            last.padded_tokens as f64 / items as f64,
            median(&python_cpu) * 1e3 / items as f64,
        );
    }
    let _ = writeln!(
        out,
        "\nOverhead and × Python are medians of per-round ratios; CPU is every thread's of each process (ORT's pool, \
         tokenizing, batching) while it scored. Batch ms: bearwatch rows time the model \
         run of each batch (tokenizing overlaps it on another thread); the Python row times tokenize + run, \
         which its loop does in turn. GOP/item: the batches' arithmetic (2 × every weight matrix per padded \
         token, and attention's 4 × T² × hidden per item and layer) over the items; GOP/s per core: that × items/s ÷ \
         model threads (workers × ORT threads); peak: int8 operations per cycle per core of the instruction set × the clock above."
    );
    out
}
