use std::path::PathBuf;

use crate::error::{Classified, ErrorClass};

#[derive(Debug, thiserror::Error)]
pub enum ClassifyError {
    #[error("invalid classifier setting `{field}`: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("cannot read model file {path}: {reason}")]
    ModelFiles { path: PathBuf, reason: String },
    #[error(
        "ONNX Runtime library not found (looked in: {searched}). Run `scripts/setup-ort.sh` to install it, \
         or set ORT_DYLIB_PATH to the full path of libonnxruntime.so.1.31.1"
    )]
    RuntimeMissing { searched: String },
    #[error("cannot load ONNX Runtime from {path}: {reason}")]
    RuntimeLoad { path: PathBuf, reason: String },
    #[error(
        "device = \"cuda\" was asked for but the CUDA execution provider is unavailable: {0} \
         (CUDA needs the onnxruntime-gpu 1.31.1 library in ORT_DYLIB_PATH and CUDA 13 on the host)"
    )]
    CudaUnavailable(String),
    #[error("ONNX Runtime session: {0}")]
    Session(String),
    #[error("inference failed: {0}")]
    Inference(String),
    #[error("tokenizer: {0}")]
    Tokenize(String),
    #[error("text is empty")]
    EmptyText,
    #[error("the classifier has stopped")]
    Stopped,
    #[error("the classifier queue is full")]
    QueueFull,
}

impl Classified for ClassifyError {
    fn class(&self) -> ErrorClass {
        match self {
            ClassifyError::Config { .. } | ClassifyError::EmptyText => ErrorClass::User,
            ClassifyError::ModelFiles { .. }
            | ClassifyError::RuntimeMissing { .. }
            | ClassifyError::RuntimeLoad { .. }
            | ClassifyError::CudaUnavailable(_) => ErrorClass::External,
            ClassifyError::Session(_)
            | ClassifyError::Inference(_)
            | ClassifyError::Tokenize(_)
            | ClassifyError::Stopped
            | ClassifyError::QueueFull => ErrorClass::Internal,
        }
    }

    fn retryable(&self) -> bool {
        // A failed batch may be a transient device error (e.g. CUDA out of memory under load).
        matches!(self, ClassifyError::Inference(_) | ClassifyError::QueueFull)
    }
}

impl From<ort::Error> for ClassifyError {
    fn from(e: ort::Error) -> Self {
        ClassifyError::Inference(e.to_string())
    }
}
