//! Where news comes from (a Kafka consumer group or a JSON-lines file) and where bad input goes
//! (a dead-letter topic or file).

mod config;
pub mod dead_letter;
pub mod file;
pub mod kafka;
pub mod produce;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

pub use config::{SourceConfig, SourceKind, StartOffset};

use crate::error::{Classified, ErrorClass};

/// One message as read: its bytes and where it came from. For a file, `topic` is the file's path,
/// `partition` 0 and `offset` the line's place in event-time order.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    pub from_kafka: bool,
}

/// Next offset to read, per topic and partition.
pub type Offsets = BTreeMap<String, BTreeMap<i32, i64>>;

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("cannot read {path}: {reason}")]
    File { path: String, reason: String },
    #[error("kafka client setup: {0}")]
    KafkaConfig(String),
    #[error("kafka: {0}")]
    Kafka(String),
    #[error("dead-letter output {target}: {reason}")]
    DeadLetter { target: String, reason: String },
}

impl Classified for SourceError {
    fn class(&self) -> ErrorClass {
        match self {
            SourceError::File { .. } | SourceError::KafkaConfig(_) => ErrorClass::User,
            SourceError::Kafka(_) | SourceError::DeadLetter { .. } => ErrorClass::External,
        }
    }
    fn retryable(&self) -> bool {
        matches!(self, SourceError::Kafka(_) | SourceError::DeadLetter { .. })
    }
}

/// A stream of records that can be told what has been durably processed.
pub trait Source: Send {
    /// The next record, waiting at most `timeout`; `None` when none arrived in time.
    fn poll(&mut self, timeout: Duration) -> Result<Option<Record>, SourceError>;
    /// True once a bounded source (a file) has handed out its last record.
    fn finished(&self) -> bool;
    /// Called after a checkpoint: the records before these offsets are durable.
    fn commit(&mut self, offsets: &Offsets) -> Result<(), SourceError>;
    /// Partitions currently owned, for the live summary and logs.
    fn describe(&self) -> String;
    /// Whether the source can reach its data (`/ready`); may block briefly.
    fn connected(&mut self) -> bool {
        true
    }
}
