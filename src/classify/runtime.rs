//! ONNX Runtime, loaded at run time from the PyPI wheel that `scripts/setup-ort.sh` installs.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use ort::ep::{self, ExecutionProvider};
use ort::session::Session;
use ort::session::builder::GraphOptimizationLevel;
use ort::value::TensorRef;

use super::onnx;
use super::{Backend, BatchOutput, ClassifierConfig, ClassifyError, Device, ModelSpec, PaddedBatch};

/// The file name inside the wheel the pinned `ort` binds to (API 31).
pub const ORT_LIBRARY: &str = "libonnxruntime.so.1.31.1";

/// Graph rewrites a CPU session leaves out. ONNX Runtime's CPU SkipLayerNormalization kernel (the
/// residual Add and LayerNormalization fused) runs a scalar loop with a division per element: it
/// took 16 % of a batch's time, where the unfused Add and LayerNormalization take 4 % (profile in
/// BENCHMARKS.md, "One fusion left out on CPU"). CUDA keeps every fusion.
const CPU_DISABLED_OPTIMIZERS: &str = "SkipLayerNormFusion";

/// Whether this CPU's int8 MatMuls would saturate. ONNX Runtime multiplies u8 activations by s8
/// weights with `vpmaddubsw` on x86 CPUs without VNNI (AVX2, AVX-512 before VNNI), which adds each
/// pair of products in 16 bits and clips the sum: on an AMD EPYC (AVX2) the bundled model's
/// probabilities moved by up to 0.08 from a VNNI machine's, and an item's scores changed with its
/// batch-mates. `session.x64quantprecision` has ONNX Runtime shift those weights to u8 (exact,
/// with the zero point moved by 128) and run its u8 × u8 kernel, which does not clip: the same
/// answers as VNNI, more slowly. CPUs with VNNI multiply s8 exactly and keep their kernel.
fn int8_saturates() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        !(std::arch::is_x86_feature_detected!("avx512vnni") || std::arch::is_x86_feature_detected!("avxvnni"))
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The model as CPU sessions load it ([`onnx::Model::for_cpu`]: each int8 MatMul with its bias
/// Add in one node, about 8 % less CPU per story at the defaults; Shapes off DequantizeLinear
/// copies), made at most once however many sessions share it: reading and rewriting the file
/// takes about as long as starting a session. Empty where the file has nothing to rewrite or is
/// not one this reader takes (weights kept outside the file): the sessions load the file.
#[derive(Default)]
pub struct CpuForm(std::cell::OnceCell<Option<Vec<u8>>>);

impl CpuForm {
    fn of(&self, path: &Path) -> Option<&[u8]> {
        self.0.get_or_init(|| cpu_form(path)).as_deref()
    }
}

fn cpu_form(path: &Path) -> Option<Vec<u8>> {
    let model = onnx::Model::parse(std::fs::read(path).ok()?).ok()?;
    match model.for_cpu() {
        Ok((bytes, rewritten)) if rewritten > 0 => {
            tracing::debug!(path = %path.display(), rewritten, "the model's CPU form: nodes rewritten");
            Some(bytes)
        }
        Ok(_) => None,
        Err(reason) => {
            tracing::debug!(path = %path.display(), reason, "the model loads as its file is");
            None
        }
    }
}

/// Where `scripts/setup-ort.sh` puts the library, relative to a project root.
fn setup_locations(root: &Path) -> Vec<PathBuf> {
    let Ok(lib) = std::fs::read_dir(root.join(".venv/lib")) else { return Vec::new() };
    lib.filter_map(Result::ok)
        .map(|python| python.path().join("site-packages/onnxruntime/capi").join(ORT_LIBRARY))
        .collect()
}

/// `ORT_DYLIB_PATH` if set (and it must exist), else the setup location in the working directory,
/// else the one in the source tree this binary was built from.
pub fn find_library() -> Result<PathBuf, ClassifyError> {
    if let Some(path) = std::env::var_os("ORT_DYLIB_PATH") {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(ClassifyError::RuntimeMissing { searched: format!("ORT_DYLIB_PATH={}", path.display()) })
        };
    }
    let roots = [PathBuf::from("."), PathBuf::from(env!("CARGO_MANIFEST_DIR"))];
    let candidates: Vec<PathBuf> = roots.iter().flat_map(|root| setup_locations(root)).collect();
    candidates.iter().find(|p| p.is_file()).cloned().ok_or_else(|| ClassifyError::RuntimeMissing {
        searched: roots.iter().map(|r| format!("{}/.venv", r.display())).collect::<Vec<_>>().join(", "),
    })
}

/// Loads the library once per process; later calls return the first outcome.
fn init_runtime() -> Result<&'static ort::environment::Environment, ClassifyError> {
    static INIT: OnceLock<Result<ort::environment::Environment, String>> = OnceLock::new();
    let outcome = INIT.get_or_init(|| {
        let path = find_library().map_err(|e| e.to_string())?;
        tracing::debug!(path = %path.display(), "loading ONNX Runtime");
        let builder = ort::init_from(&path)
            .map_err(|e| ClassifyError::RuntimeLoad { path: path.clone(), reason: e.to_string() }.to_string())?;
        builder
            .with_name("bearwatch")
            .build()
            .map_err(|e| ClassifyError::RuntimeLoad { path, reason: e.to_string() }.to_string())
    });
    match outcome {
        Ok(environment) => Ok(environment),
        Err(message) => Err(ClassifyError::Session(message.clone())),
    }
}

pub struct OrtBackend {
    session: Session,
    inputs: [String; 2],
    sentiment_output: String,
    topic_output: String,
    embedding_output: Option<String>,
    heads: Option<std::sync::Arc<super::heads::Heads>>,
    /// Topic probabilities per row, as labels.json names them.
    topics: usize,
    provider: &'static str,
}

impl OrtBackend {
    /// A session of `spec`'s model; sessions built with one `cpu_form` share its rewrite.
    pub fn new(spec: &ModelSpec, config: &ClassifierConfig, cpu_form: &CpuForm) -> Result<OrtBackend, ClassifyError> {
        OrtBackend::build(spec, config, cpu_form, None)
    }

    /// A session that records ONNX Runtime's profile (every node's time) into a file named from
    /// `prefix`, until [`OrtBackend::end_profiling`] (`bench classify --profile`).
    pub fn profiled(spec: &ModelSpec, config: &ClassifierConfig, prefix: &std::path::Path) -> Result<OrtBackend, ClassifyError> {
        OrtBackend::build(spec, config, &CpuForm::default(), Some(prefix))
    }

    /// Stops profiling; returns the profile's file (Chrome trace JSON).
    pub fn end_profiling(&mut self) -> Result<std::path::PathBuf, ClassifyError> {
        Ok(self.session.end_profiling()?.into())
    }

    fn build(spec: &ModelSpec, config: &ClassifierConfig, cpu_form: &CpuForm, profile: Option<&std::path::Path>) -> Result<OrtBackend, ClassifyError> {
        let environment = init_runtime()?;
        let session_error = |e: ort::Error| ClassifyError::Session(e.to_string());
        let mut builder = Session::builder(environment)
            .map_err(session_error)?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| session_error(e.into()))?
            .with_intra_threads(config.threads())
            .map_err(|e| session_error(e.into()))?;
        if let Some(prefix) = profile {
            builder = builder.with_profiling(prefix).map_err(|e| session_error(e.into()))?;
        }
        let provider = match config.device {
            Device::Cpu => "cpu",
            Device::Cuda => {
                builder = builder
                    .with_execution_providers([ep::CUDA::default().build().error_on_failure()])
                    .map_err(|e| ClassifyError::CudaUnavailable(e.to_string()))?;
                "cuda"
            }
            Device::Auto => {
                if ep::CUDA::is_available().unwrap_or(false) {
                    match builder.clone().with_execution_providers([ep::CUDA::default().build().error_on_failure()]) {
                        Ok(with_cuda) => {
                            builder = with_cuda;
                            "cuda"
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "CUDA execution provider failed to start; using CPU");
                            "cpu"
                        }
                    }
                } else {
                    "cpu"
                }
            }
        };
        if provider == "cpu" {
            builder = builder
                .with_config_entry("optimization.disable_specified_optimizers", CPU_DISABLED_OPTIMIZERS)
                .map_err(|e| session_error(e.into()))?;
            if int8_saturates() {
                builder = builder.with_config_entry("session.x64quantprecision", "1").map_err(|e| session_error(e.into()))?;
            }
        }
        let invalid = |reason: String| ClassifyError::ModelFiles { path: spec.onnx.clone(), reason };
        let session = match (provider == "cpu").then(|| cpu_form.of(&spec.onnx)).flatten() {
            // A rewrite ONNX Runtime refuses (an input type this reader cannot see) costs only the
            // rewrite: the file loads as it is.
            Some(bytes) => builder.commit_from_memory(bytes).or_else(|e| {
                tracing::warn!(path = %spec.onnx.display(), error = %e, "the model's CPU form did not load; loading the file as it is");
                builder.commit_from_file(&spec.onnx)
            }),
            None => builder.commit_from_file(&spec.onnx),
        }
        .map_err(|e| invalid(e.to_string()))?;
        for name in spec.inputs.iter() {
            if !session.inputs().iter().any(|i| i.name() == name) {
                return Err(invalid(format!("the model has no input `{name}`")));
            }
        }
        let mut backend = OrtBackend {
            session,
            inputs: spec.inputs.clone(),
            sentiment_output: spec.sentiment_output.clone(),
            topic_output: spec.topic_output.clone(),
            // Read only where something uses it: copying 384 floats a story costs throughput.
            embedding_output: spec.embedding_output.clone().filter(|_| spec.heads.is_some() || config.embeddings),
            heads: spec.heads.clone(),
            topics: spec.topics.len(),
            provider,
        };
        // One row through the graph: a file that loads but cannot run, lacks an output, or whose
        // outputs hold other widths than labels.json or heads.json name (`run` checks them), fails
        // here, not on the first story.
        let probe = PaddedBatch { ids: vec![0, 0], mask: vec![1, 1], rows: 1, cols: 2 };
        backend.run(&probe).map_err(|e| invalid(format!("a test row does not run: {e}")))?;
        Ok(backend)
    }

    pub fn provider(&self) -> &'static str {
        self.provider
    }
}

impl Backend for OrtBackend {
    fn run(&mut self, batch: &PaddedBatch) -> Result<BatchOutput, ClassifyError> {
        let shape = [batch.rows, batch.cols];
        let ids = TensorRef::from_array_view((shape, batch.ids.as_slice()))?;
        let mask = TensorRef::from_array_view((shape, batch.mask.as_slice()))?;
        let outputs = self
            .session
            .run(ort::inputs![self.inputs[0].as_str() => ids, self.inputs[1].as_str() => mask])?;
        let read = |name: &str| -> Result<Vec<f32>, ClassifyError> {
            let value = outputs
                .get(name)
                .ok_or_else(|| ClassifyError::Inference(format!("the model has no output `{name}`")))?;
            Ok(value.try_extract_tensor::<f32>()?.1.to_vec())
        };
        let embedding = match &self.embedding_output {
            Some(name) => read(name)?,
            None => Vec::new(),
        };
        let (sentiment, topic) = match &self.heads {
            Some(heads) => heads.apply(&embedding, batch.rows)?,
            None => (read(&self.sentiment_output)?, read(&self.topic_output)?),
        };
        if sentiment.len() != batch.rows * 3 || topic.len() != batch.rows * self.topics {
            return Err(ClassifyError::Inference(format!(
                "the model gave {} sentiment and {} topic values for {} rows; labels.json names 3 sentiments and {} topics",
                sentiment.len(),
                topic.len(),
                batch.rows,
                self.topics
            )));
        }
        Ok(BatchOutput { sentiment, topic, embedding })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bundled model's CPU form is made once for every session built with it, and ONNX
    /// Runtime takes it as it is (a refusal would otherwise hide behind the fallback to the file).
    #[test]
    fn cpu_sessions_share_one_rewrite_that_onnx_runtime_loads() {
        let config = ClassifierConfig { device: Device::Cpu, ..ClassifierConfig::default() };
        let spec = ModelSpec::load(&config.model_dir()).unwrap();
        let form = CpuForm::default();
        for _ in 0..2 {
            assert_eq!(OrtBackend::new(&spec, &config, &form).unwrap().provider(), "cpu");
        }
        let bytes = form.0.get().expect("made by the first session").as_deref().expect("the bundled model has nodes to rewrite");
        assert!(Session::builder(init_runtime().unwrap()).unwrap().commit_from_memory(bytes).is_ok());
    }
}
