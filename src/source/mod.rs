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
use crate::sync::lock;

/// One message as read: its bytes and where it came from. For a file, `topic` is the file's path,
/// `partition` 0 and `offset` the line's place in event-time order.
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    pub payload: Vec<u8>,
    pub from_kafka: bool,
    /// The whole message's length where `payload` holds only its start (a file line past what is
    /// read of one line); none where `payload` is all of it.
    pub cut_from: Option<u64>,
}

impl Record {
    /// The message's length in bytes, all of it.
    pub fn size(&self) -> u64 {
        self.cut_from.unwrap_or(self.payload.len() as u64)
    }
}

/// Next offset to read, per topic and partition.
pub type Offsets = BTreeMap<String, BTreeMap<i32, i64>>;

/// Errors the source keeps reporting. librdkafka retries by itself and hands each failure over as a
/// report, so a refused login, a topic that is not there or a partition it cannot read shows only
/// as a log line a second; `/ready` shows this while they last.
#[derive(Default)]
pub struct Trouble {
    streak: std::sync::Mutex<Option<Streak>>,
    /// Subscribed topics the brokers do not have (librdkafka says so once, then waits for them).
    absent: std::sync::Mutex<Vec<String>>,
    logged: crate::telemetry::Repeats,
}

struct Streak {
    since: chrono::DateTime<chrono::Utc>,
    last_at: std::time::Instant,
    count: u64,
    /// The last few different errors, oldest first: the cause ("authentication failed") comes
    /// with its consequences ("all broker connections are down").
    recent: std::collections::VecDeque<String>,
}

/// How long after the last error a streak ends.
const TROUBLE_QUIET: Duration = Duration::from_secs(30);
/// Different errors a streak keeps, and the characters kept of each.
const TROUBLE_KINDS: usize = 5;
const TROUBLE_CHARS: usize = 300;

impl Trouble {
    /// Counts `error` towards `/ready`, and says whether to log it: `Some(n)` with the `n` like it
    /// held back since it was last logged ([`crate::telemetry::Repeats`]).
    #[must_use]
    pub fn report(&self, error: &str) -> Option<u64> {
        let error: String = error.chars().take(TROUBLE_CHARS).collect();
        let mut streak = lock(&self.streak);
        let now = std::time::Instant::now();
        let s = match streak.as_mut().filter(|s| now.duration_since(s.last_at) < TROUBLE_QUIET) {
            Some(s) => s,
            None => streak.insert(Streak { since: chrono::Utc::now(), last_at: now, count: 0, recent: Default::default() }),
        };
        s.last_at = now;
        s.count += 1;
        s.recent.retain(|e| *e != error);
        s.recent.push_back(error.clone());
        if s.recent.len() > TROUBLE_KINDS {
            s.recent.pop_front();
        }
        drop(streak);
        self.logged.admit(&error)
    }

    /// The subscribed topics the brokers do not have, as of the last look.
    pub fn absent(&self, topics: Vec<String>) {
        *lock(&self.absent) = topics;
    }

    /// Topics that are not there, and the errors of the last half minute, for people.
    pub fn describe(&self) -> Vec<String> {
        let absent = lock(&self.absent).clone();
        let absent = (!absent.is_empty())
            .then(|| format!("subscribed topics the brokers do not have: {} (nothing is read from them until they are created)", absent.join(", ")));
        absent.into_iter().chain(self.streak()).collect()
    }

    fn streak(&self) -> Option<String> {
        let streak = lock(&self.streak);
        let s = streak.as_ref().filter(|s| s.last_at.elapsed() < TROUBLE_QUIET)?;
        Some(format!(
            "source errors since {} ({}, the last {} s ago): {}",
            s.since.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
            s.count,
            s.last_at.elapsed().as_secs(),
            s.recent.iter().cloned().collect::<Vec<_>>().join("; ")
        ))
    }
}

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

#[cfg(test)]
mod trouble_tests {
    use super::*;

    #[test]
    fn trouble_keeps_the_last_few_different_errors_each_cut_short() {
        let trouble = Trouble::default();
        assert!(trouble.describe().is_empty());
        assert_eq!(trouble.report("login refused"), Some(0), "logged the first time");
        for i in 0..10 {
            assert_eq!(trouble.report(&format!("broker {i} down")), (i == 0).then_some(0), "one kind, digits aside");
            assert_eq!(trouble.report("login refused"), None);
        }
        assert_eq!(trouble.report(&"x".repeat(10_000)), Some(0));
        trouble.absent(vec!["news".into(), "mews".into()]);
        let said = trouble.describe().join("\n");
        assert!(said.starts_with("subscribed topics the brokers do not have: news, mews (nothing"), "{said}");
        assert!(said.contains("(22, the last 0 s ago): broker 7 down; broker 8 down; broker 9 down; login refused; xxx"), "{said}");
        assert!(said.len() < 700, "{said}");
    }
}
