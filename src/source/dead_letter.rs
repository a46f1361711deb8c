//! Bad input is never dropped: it goes, as the original bytes plus the reason, to the dead-letter
//! topic (DESIGN §2 headers) or, for the file source, to a JSON-lines file.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::message::{Header, OwnedHeaders};

use super::kafka::{MAX_OUTPUT_BYTES, Output};
use super::{Record, SourceError};

/// Dead-letter messages larger than [`MAX_OUTPUT_BYTES`] carry only their first this many bytes,
/// so that an oversized input can't also be refused by the broker's own size limit.
const TRUNCATED_BYTES: usize = 64 * 1024;
/// Dead-letter lines for a file are kept until this many bytes are waiting, then written.
const FILE_BUFFER_BYTES: usize = 64 * 1024;

pub enum DeadLetter {
    Topic { output: Arc<Output>, topic: String },
    /// Lines not yet written wait in `pending`; a write that fails (a full disk) keeps them there.
    File { path: PathBuf, file: File, pending: Vec<u8> },
}

impl DeadLetter {
    pub fn topic(output: Arc<Output>, topic: String) -> DeadLetter {
        DeadLetter::Topic { output, topic }
    }

    pub fn file(path: &Path) -> Result<DeadLetter, SourceError> {
        let error = |e: std::io::Error| SourceError::DeadLetter { target: path.display().to_string(), reason: e.to_string() };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(error)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path).map_err(error)?;
        Ok(DeadLetter::File { path: path.to_path_buf(), file, pending: Vec::new() })
    }

    /// Sends one record. An error a retry can help leaves the record with the output: [`DeadLetter::flush`]
    /// until it succeeds, then the record is sent.
    pub fn send(&mut self, record: &Record, kind: &str, message: &str) -> Result<(), SourceError> {
        metrics::counter!("bearwatch_dead_letter_total", "kind" => kind.to_string()).increment(1);
        match self {
            DeadLetter::Topic { output, topic } => {
                let truncated = record.payload.len() > MAX_OUTPUT_BYTES || record.cut_from.is_some();
                let payload = &record.payload[..record.payload.len().min(if truncated { TRUNCATED_BYTES } else { usize::MAX })];
                let partition = record.partition.to_string();
                let offset = record.offset.to_string();
                let size = record.size().to_string();
                let mut headers = OwnedHeaders::new()
                    .insert(Header { key: "error.kind", value: Some(kind) })
                    .insert(Header { key: "error.message", value: Some(message) })
                    .insert(Header { key: "source.topic", value: Some(&*record.topic) })
                    .insert(Header { key: "source.partition", value: Some(&partition) })
                    .insert(Header { key: "source.offset", value: Some(&offset) });
                if truncated {
                    headers = headers
                        .insert(Header { key: "payload.truncated", value: Some("true") })
                        .insert(Header { key: "payload.size", value: Some(&size) });
                }
                let key = format!("{}/{}/{}", record.topic, record.partition, record.offset);
                output.send(topic, key.as_bytes(), payload, Some(headers))
            }
            DeadLetter::File { pending, .. } => {
                let payload = match std::str::from_utf8(&record.payload) {
                    Ok(text) => ("payload", serde_json::Value::String(text.to_string())),
                    Err(_) => ("payload_hex", serde_json::Value::String(hex(&record.payload))),
                };
                let mut line = serde_json::json!({
                    "error.kind": kind,
                    "error.message": message,
                    "source.topic": &*record.topic,
                    "source.partition": record.partition,
                    "source.offset": record.offset,
                    payload.0: payload.1,
                });
                if let Some(size) = record.cut_from {
                    line["payload.truncated"] = serde_json::Value::Bool(true);
                    line["payload.size"] = serde_json::Value::from(size);
                }
                pending.extend_from_slice(line.to_string().as_bytes());
                pending.push(b'\n');
                if pending.len() >= FILE_BUFFER_BYTES { self.write_pending() } else { Ok(()) }
            }
        }
    }

    /// Whether this writes to a local file (which a full disk makes wait) rather than a topic.
    pub fn is_file(&self) -> bool {
        matches!(self, DeadLetter::File { .. })
    }

    /// Makes everything sent so far durable; called before offsets are committed.
    pub fn flush(&mut self) -> Result<(), SourceError> {
        match self {
            DeadLetter::Topic { output, .. } => output.flush(Duration::from_secs(30)),
            DeadLetter::File { .. } => self.write_pending(),
        }
    }

    /// Appends the pending lines to the file, durably and whole (`files::append_whole`), so that a
    /// retry after a failed write writes every line once.
    fn write_pending(&mut self) -> Result<(), SourceError> {
        let DeadLetter::File { path, file, pending } = self else { return Ok(()) };
        crate::files::append_whole(file, pending).map_err(|e| SourceError::DeadLetter { target: path.display().to_string(), reason: e.to_string() })?;
        pending.clear();
        Ok(())
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
