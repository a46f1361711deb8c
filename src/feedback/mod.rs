//! What analysts tell bearwatch (DESIGN §10): label confirmations and corrections, verdicts on
//! alerts, and events it missed. Each is a row of an append-only journal table under
//! `storage.path` (`label_feedback`, `alert_verdicts`, `missed_events`), readable over SQL and never
//! rewritten: a change of mind is a new row that `supersedes` the earlier one, and the newest row of a
//! story's head is the label that wins.
//!
//! The analyst of a row is whoever the caller authenticated as (the server's users, or the CLI's
//! `--analyst`), never a field of the request.

mod config;
mod journal;
mod memory;
pub mod queue;
mod table;

use std::sync::atomic::{AtomicU64, Ordering};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sha2::Digest;

pub use config::FeedbackConfig;
pub use journal::{JournalTail, LatestLabels};
pub use memory::{Correction, Match, Memory, Query, Reading, near_words, words};
pub use table::{applied_labels_batch, applied_labels_schema, alert_verdicts_schema, label_feedback_schema, missed_events_schema};

use crate::error::{Classified, ErrorClass};
use crate::news::SENTIMENTS;
use crate::storage::{self, StorageError, Table};

#[derive(Debug, thiserror::Error)]
pub enum FeedbackError {
    /// The request is wrong; the message says how.
    #[error("{0}")]
    Invalid(String),
    /// What the feedback refers to (a story, an alert) is not in the tables.
    #[error("{0}")]
    NotFound(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cannot build the {table} batch: {reason}")]
    Batch { table: &'static str, reason: String },
}

impl Classified for FeedbackError {
    fn class(&self) -> ErrorClass {
        match self {
            FeedbackError::Invalid(_) | FeedbackError::NotFound(_) => ErrorClass::User,
            FeedbackError::Storage(e) => e.class(),
            FeedbackError::Batch { .. } => ErrorClass::Internal,
        }
    }
    fn retryable(&self) -> bool {
        matches!(self, FeedbackError::Storage(e) if e.retryable())
    }
}

fn invalid(message: impl Into<String>) -> FeedbackError {
    FeedbackError::Invalid(message.into())
}

/// The most rows one request or import line batch may carry, and the longest note and text.
pub const MAX_ROWS: usize = 1000;
pub const MAX_NOTE_CHARS: usize = 2000;
pub const MAX_TEXT_CHARS: usize = 10_000;
/// The longest missed event: longer is not an event a rule could have caught.
pub const MAX_MISSED_DAYS: i64 = 31;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Head {
    Sentiment,
    Topic,
}

impl Head {
    pub fn name(self) -> &'static str {
        match self {
            Head::Sentiment => "sentiment",
            Head::Topic => "topic",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    Confirm,
    Correct,
    Unsure,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Useful,
    Noise,
    Duplicate,
    Late,
}

/// Where a row came from (the `source` column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Channel {
    Dashboard,
    Api,
    Cli,
}

fn name_of<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// What the `news` table says about a scored story.
#[derive(Debug, Clone, PartialEq)]
pub struct Story {
    pub id: String,
    pub headline: String,
    pub model: String,
    pub sentiment: String,
    /// The probability of `sentiment`.
    pub sentiment_score: f32,
    pub topic: String,
    pub topic_score: f32,
}

/// One label judgement as a caller sends it (HTTP body, or a line of `feedback import`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelRequest {
    /// A story in the `news` table; or give `text`.
    pub story_id: Option<String>,
    pub text: Option<String>,
    pub head: Head,
    /// Required unless `action` is `unsure`.
    pub label: Option<String>,
    /// Default: `confirm` when `label` is what the model said, else `correct`.
    pub action: Option<Action>,
    pub note: Option<String>,
}

/// A row of `label_feedback`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabelFeedback {
    pub feedback_id: String,
    pub story_id: Option<String>,
    /// The judged text (the headline): what `feedback export` trains on and near-duplicates match.
    pub text: String,
    /// SHA-256 of `text`, hex.
    pub text_hash: String,
    pub head: Head,
    pub model: Option<String>,
    pub model_label: Option<String>,
    pub model_score: Option<f32>,
    /// `None` when the analyst is unsure.
    pub analyst_label: Option<String>,
    pub action: Action,
    pub analyst: String,
    pub created_at: DateTime<Utc>,
    pub note: Option<String>,
    pub source: Channel,
    pub supersedes: Option<String>,
}

/// A label that won (`feedback export`): the newest judgement of a text and head.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TrainingLabel {
    pub text: String,
    pub head: Head,
    pub label: String,
    pub analyst: String,
    pub created_at: DateTime<Utc>,
    pub feedback_id: String,
    pub story_id: Option<String>,
}

/// A row of `applied_labels`: a story whose windows count an analyst's label instead of the
/// model's (or, with no `label`, the model's again after an `unsure`), and why it got it.
#[derive(Debug, Clone, PartialEq)]
pub struct AppliedLabel {
    pub story_id: String,
    pub text_hash: String,
    pub head: Head,
    pub model: String,
    pub model_label: String,
    pub label: Option<String>,
    pub feedback_id: String,
    pub matched: Match,
    pub applied_at: DateTime<Utc>,
}

/// One verdict on an alert as a caller sends it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerdictRequest {
    pub alert_id: String,
    pub verdict: Verdict,
    pub note: Option<String>,
}

/// A row of `alert_verdicts`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AlertVerdict {
    pub verdict_id: String,
    pub alert_id: String,
    pub rule: String,
    /// SHA-256 of the rule files the running pipeline loaded, when the verdict came through it.
    pub rules_hash: Option<String>,
    pub verdict: Verdict,
    pub analyst: String,
    pub created_at: DateTime<Utc>,
    pub note: Option<String>,
    pub supersedes: Option<String>,
}

/// "You should have told me": an event as a caller sends it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MissedRequest {
    pub topic: Option<String>,
    pub ticker: Option<String>,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub note: Option<String>,
}

/// A row of `missed_events`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MissedEvent {
    pub missed_id: String,
    pub topic: Option<String>,
    pub ticker: Option<String>,
    pub from: DateTime<Utc>,
    pub to: DateTime<Utc>,
    pub note: Option<String>,
    pub analyst: String,
    pub created_at: DateTime<Utc>,
}

pub fn text_hash(text: &str) -> String {
    hex(&sha2::Sha256::digest(text.as_bytes()))
}

/// What makes two texts "the same" for a correction: SHA-256 of the text's [`words`] joined by one
/// space, so that a story re-sent with other casing, punctuation or spacing matches exactly.
pub fn match_key(text: &str) -> String {
    text_hash(&words(text).join(" "))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A new row id: 16 hex digits of a hash over the time, the process, a counter and the row's content.
fn new_id(content: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let seed = format!(
        "{}|{}|{}|{content}",
        Utc::now().timestamp_nanos_opt().unwrap_or_default(),
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    hex(&sha2::Sha256::digest(seed.as_bytes())[..8])
}

fn check_note(note: &Option<String>) -> Result<Option<String>, FeedbackError> {
    match note.as_deref().map(str::trim) {
        Some(n) if n.chars().count() > MAX_NOTE_CHARS => Err(invalid(format!("note: at most {MAX_NOTE_CHARS} characters"))),
        Some("") | None => Ok(None),
        Some(n) => Ok(Some(n.to_string())),
    }
}

fn check_analyst(analyst: &str) -> Result<(), FeedbackError> {
    let valid = (1..=64).contains(&analyst.len()) && analyst.chars().all(|c| c.is_ascii_alphanumeric() || "._@-".contains(c));
    if valid { Ok(()) } else { Err(invalid(format!("analyst {analyst:?}: 1 to 64 letters, digits or . _ @ -"))) }
}

/// What a label judgement needs besides the request.
pub struct LabelContext<'a> {
    /// The story named by `story_id`, looked up by the caller; `None` when the request gives `text`.
    pub story: Option<&'a Story>,
    /// The topics the model knows (its `labels.json`).
    pub topics: &'a [String],
    pub analyst: &'a str,
    pub source: Channel,
    /// The row this one replaces: the newest earlier one for the same text and head.
    pub supersedes: Option<String>,
    /// When the request came. Every row of one request carries it: the rows of an import are one
    /// act, and their order by time must not depend on how many milliseconds checking them took
    /// (a retrain holds out the newest labels, the text deciding among equal times).
    pub created_at: DateTime<Utc>,
}

impl LabelRequest {
    /// The text the row is about: the story's headline, or the request's text.
    pub fn text(&self, story: Option<&Story>) -> Result<String, FeedbackError> {
        let text = match (story, &self.text) {
            (Some(story), _) => story.headline.trim().to_string(),
            (None, Some(text)) => text.trim().to_string(),
            (None, None) => return Err(invalid("give `story_id` or `text`")),
        };
        if !text.chars().any(char::is_alphanumeric) {
            return Err(invalid("text has no letter or digit"));
        }
        if text.chars().count() > MAX_TEXT_CHARS {
            return Err(invalid(format!("text: at most {MAX_TEXT_CHARS} characters")));
        }
        Ok(text)
    }

    /// Checks the request and makes its row.
    pub fn into_row(self, context: LabelContext<'_>) -> Result<LabelFeedback, FeedbackError> {
        check_analyst(context.analyst)?;
        let text = self.text(context.story)?;
        let allowed: Vec<&str> = match self.head {
            Head::Sentiment => SENTIMENTS.to_vec(),
            Head::Topic => context.topics.iter().map(String::as_str).collect(),
        };
        let label = self.label.as_deref().map(str::trim).filter(|l| !l.is_empty());
        if let Some(label) = label
            && !allowed.contains(&label)
        {
            return Err(invalid(format!("{} label {label:?} is not one of {}", name_of(&self.head), allowed.join(", "))));
        }
        let (model_label, model_score) = match (context.story, self.head) {
            (Some(s), Head::Sentiment) => (Some(s.sentiment.clone()), Some(s.sentiment_score)),
            (Some(s), Head::Topic) => (Some(s.topic.clone()), Some(s.topic_score)),
            (None, _) => (None, None),
        };
        let action = match (self.action, label) {
            (Some(Action::Unsure), Some(label)) => {
                return Err(invalid(format!("unsure takes no label: leave out {label:?}, or send it with confirm or correct")));
            }
            (Some(Action::Unsure), None) => Action::Unsure,
            (Some(action), Some(label)) => {
                if action == Action::Confirm && model_label.as_deref().is_some_and(|m| m != label) {
                    return Err(invalid(format!("confirm: the model said {:?}, not {label:?}", model_label.unwrap_or_default())));
                }
                action
            }
            (Some(_), None) | (None, None) => return Err(invalid("`label` is required unless `action` is \"unsure\"")),
            (None, Some(label)) => {
                if model_label.as_deref() == Some(label) {
                    Action::Confirm
                } else {
                    Action::Correct
                }
            }
        };
        let analyst_label = if action == Action::Unsure { None } else { label.map(str::to_string) };
        let text_hash = text_hash(&text);
        Ok(LabelFeedback {
            feedback_id: new_id(&text_hash),
            story_id: context.story.map(|s| s.id.clone()),
            text,
            text_hash,
            head: self.head,
            model: context.story.map(|s| s.model.clone()),
            model_label,
            model_score,
            analyst_label,
            action,
            analyst: context.analyst.to_string(),
            created_at: context.created_at,
            note: check_note(&self.note)?,
            source: context.source,
            supersedes: context.supersedes,
        })
    }
}

impl VerdictRequest {
    /// The row for a verdict on an alert of `rule`, recorded at `created_at` (the request's time,
    /// shared by every row of one request).
    pub fn into_row(
        self,
        rule: String,
        rules_hash: Option<String>,
        analyst: &str,
        supersedes: Option<String>,
        created_at: DateTime<Utc>,
    ) -> Result<AlertVerdict, FeedbackError> {
        check_analyst(analyst)?;
        Ok(AlertVerdict {
            verdict_id: new_id(&self.alert_id),
            alert_id: self.alert_id,
            rule,
            rules_hash,
            verdict: self.verdict,
            analyst: analyst.to_string(),
            created_at,
            note: check_note(&self.note)?,
            supersedes,
        })
    }
}

impl MissedRequest {
    /// The row for a missed event, recorded at `created_at` (the request's time).
    pub fn into_row(self, topics: &[String], analyst: &str, created_at: DateTime<Utc>) -> Result<MissedEvent, FeedbackError> {
        check_analyst(analyst)?;
        if self.from >= self.to {
            return Err(invalid("`from` must be before `to`"));
        }
        if self.to - self.from > chrono::Duration::days(MAX_MISSED_DAYS) {
            return Err(invalid(format!("an event spans at most {MAX_MISSED_DAYS} days")));
        }
        let latest = created_at + chrono::Duration::days(1);
        if self.from < DateTime::UNIX_EPOCH || self.to > latest {
            return Err(invalid("an event lies between 1970 and now"));
        }
        let topic = self.topic.map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
        if let Some(topic) = &topic
            && !topics.contains(topic)
        {
            return Err(invalid(format!("topic {topic:?} is not one of {}", topics.join(", "))));
        }
        let ticker = self.ticker.map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
        if ticker.as_ref().is_some_and(|t| t.chars().count() > 32) {
            return Err(invalid("ticker: at most 32 characters"));
        }
        Ok(MissedEvent {
            missed_id: new_id(&format!("{topic:?}{ticker:?}{}", self.from)),
            topic,
            ticker,
            from: self.from,
            to: self.to,
            note: check_note(&self.note)?,
            analyst: analyst.to_string(),
            created_at,
        })
    }
}

fn recorded(table: Table, rows: usize, analyst: &str) {
    metrics::counter!("bearwatch_feedback_rows_total", "table" => table.name()).increment(rows as u64);
    tracing::info!(table = table.name(), rows, analyst, "feedback recorded");
}

/// Appends rows to their journal table under `storage` (one file per call, named after the first
/// row's id); nothing when empty.
fn append<T>(
    storage: &storage::Location,
    table: Table,
    rows: &[T],
    batch: fn(&[T]) -> Result<arrow::array::RecordBatch, arrow::error::ArrowError>,
    id_and_analyst: fn(&T) -> (&str, &str),
) -> Result<(), FeedbackError> {
    let Some(first) = rows.first() else { return Ok(()) };
    let batch = batch(rows).map_err(|e| FeedbackError::Batch { table: table.name(), reason: e.to_string() })?;
    let (id, analyst) = id_and_analyst(first);
    storage::append(storage, table, &batch, id)?;
    recorded(table, rows.len(), analyst);
    Ok(())
}

pub fn record_labels(storage: &storage::Location, rows: &[LabelFeedback]) -> Result<(), FeedbackError> {
    append(storage, Table::LabelFeedback, rows, table::label_feedback_batch, |r| (&r.feedback_id, &r.analyst))
}

pub fn record_verdicts(storage: &storage::Location, rows: &[AlertVerdict]) -> Result<(), FeedbackError> {
    append(storage, Table::AlertVerdicts, rows, table::alert_verdicts_batch, |r| (&r.verdict_id, &r.analyst))
}

pub fn record_missed(storage: &storage::Location, rows: &[MissedEvent]) -> Result<(), FeedbackError> {
    append(storage, Table::MissedEvents, rows, table::missed_events_batch, |r| (&r.missed_id, &r.analyst))
}

/// A judgement as the journal holds it, for tests of what reads the journal.
#[cfg(test)]
pub fn judgement(story_id: Option<&str>, text: &str, head: Head, label: Option<&str>, action: Action) -> LabelFeedback {
    LabelFeedback {
        feedback_id: new_id(text),
        story_id: story_id.map(str::to_string),
        text: text.into(),
        text_hash: text_hash(text),
        head,
        model: Some("m@1".into()),
        model_label: None,
        model_score: None,
        analyst_label: label.map(str::to_string),
        action,
        analyst: "ana".into(),
        created_at: Utc::now(),
        note: None,
        source: Channel::Api,
        supersedes: None,
    }
}

#[cfg(test)]
mod tests;
