//! The state a pipeline keeps between checkpoints, and what happens to each record.
//!
//! Records complete strictly in arrival order (a FIFO of in-flight items), so "every record before
//! offset N is done" is always true of the offsets kept here. A checkpoint is taken only with nothing
//! in flight, which makes windows, de-duplication state, buffered rows and offsets agree.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::corrections::{Corrections, Tracked};
use super::{PipelineError, Role};
use crate::alert::{Alerting, notifications_batch};
use crate::classify::{ClassifyError, Classifier, Pending, news_batch};
use crate::detect::{Detector, RuleFile, alerts_batch};
use crate::news::{News, ScoredNews, Scores};
use crate::source::dead_letter::DeadLetter;
use crate::source::file::FileProgress;
use crate::source::kafka::Output;
use crate::source::{Offsets, Record};
use crate::error::Classified;
use crate::storage::{Storage, Table};
use crate::window::{Placed, WindowRow, WindowState, windows_batch};

mod handover;
mod seen;

/// Running totals, kept in the checkpoint so that they survive restarts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Counters {
    pub received: u64,
    pub scored: u64,
    pub dead_lettered: u64,
    pub duplicates: u64,
    pub late: u64,
    #[serde(default)]
    pub alerts: u64,
}

/// Everything needed to resume exactly where the last checkpoint left off: each stage's own state.
/// Storage writes it into `checkpoint.json`, beside the part numbers it keeps itself.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    pub written_at: String,
    /// Next offset to read, per source topic (or file) and partition.
    pub offsets: Offsets,
    pub windows: WindowState,
    /// Recently seen story ids with their event time, for de-duplication, as checkpoints before
    /// keys kept them; written empty now (a build before keys then starts with none remembered).
    #[serde(default)]
    pub seen: Vec<(String, i64)>,
    /// The same, as keys ([`seen`]): base64 of 24 bytes an id.
    #[serde(default)]
    pub seen_keys: String,
    pub counters: Counters,
    /// Alert rules' baselines and lifecycles (absent when the pipeline has no rules).
    #[serde(default)]
    pub detector: Option<Detector>,
    /// What was read of each file source (its offsets are in `offsets`).
    #[serde(default)]
    pub files: BTreeMap<String, FileProgress>,
    /// Stories whose windows a label correction can still re-count.
    #[serde(default)]
    pub tracked: Vec<Tracked>,
    /// The source partition each topic's stories came from last (the scored topic is keyed by
    /// topic): what moves with a partition when another instance takes it over.
    #[serde(default)]
    pub topic_sources: BTreeMap<String, String>,
    /// Each rate-limited receiver's current interval: what it sent and held back.
    #[serde(default)]
    pub rate_intervals: BTreeMap<String, crate::alert::RateInterval>,
}

/// What [`Checkpoint`] holds, borrowed from the running pipeline where it can be: a checkpoint is
/// written from this, without a copy of the windows and the tracked stories (tens of MB on a long
/// run). Serializes as a `Checkpoint` does (a unit test holds the two together).
#[derive(Serialize)]
pub(super) struct CheckpointView<'a> {
    written_at: String,
    offsets: &'a Offsets,
    windows: &'a WindowState,
    seen: [(String, i64); 0],
    seen_keys: String,
    counters: &'a Counters,
    detector: Option<&'a Detector>,
    files: &'a BTreeMap<String, FileProgress>,
    tracked: Vec<&'a Tracked>,
    topic_sources: &'a BTreeMap<String, String>,
    rate_intervals: BTreeMap<String, crate::alert::RateInterval>,
}

/// Lines the feed or a lasting fault would repeat (a story too large for the sink, a journal that
/// does not read), kept to one every half minute per kind.
static LOGGED: crate::telemetry::Repeats = crate::telemetry::Repeats::new(Duration::from_secs(30));

/// Per-message checks that come before scoring.
pub struct Limits {
    pub max_message_bytes: usize,
    pub max_clock_skew_ms: i64,
    pub body_chars: usize,
    pub dedup_horizon_ms: i64,
    pub dedup_max_ids: usize,
    /// `[alerts] evaluate_every`: the step of event time at which the rules see live rows.
    pub evaluate_every_ms: i64,
}

/// Publishes scored stories to `news.scored`, keyed by topic.
pub struct ScoredSink {
    pub output: Arc<Output>,
    pub topic: String,
}

/// Where a story first entered (the `news` partition and offset a `classify` instance read it at).
#[derive(Clone, Copy)]
struct Origin {
    partition: Option<i32>,
    offset: Option<i64>,
}

struct Position {
    topic: Arc<str>,
    partition: i32,
    offset: i64,
    from_kafka: bool,
}

enum InFlight {
    Scoring { at: Position, news: News, published_ms: i64, pending: Pending },
    /// Scored upstream (role `aggregate`): ready at once.
    Scored { at: Position, news: News, published_ms: i64, scores: Scores, origin: Origin },
    /// Dead-lettered or duplicate: nothing to wait for, but its offset must pass in order.
    Done { at: Position },
}

impl InFlight {
    fn position(&self) -> &Position {
        match self {
            InFlight::Scoring { at, .. } | InFlight::Scored { at, .. } | InFlight::Done { at } => at,
        }
    }
}

pub struct Core {
    role: Role,
    /// None for role `aggregate`, whose stories arrive scored.
    classifier: Option<Classifier>,
    limits: Limits,
    in_flight: VecDeque<InFlight>,
    in_flight_ids: HashSet<String>,
    /// Partitions revoked and not yet re-assigned (see [`Core::assigned`]).
    revoked: HashSet<String>,
    seen: seen::Seen,
    pub windows: WindowState,
    offsets: Offsets,
    news_rows: Vec<ScoredNews>,
    /// The text bytes of the stories read since the last checkpoint, in flight or in `news_rows`
    /// and `late_rows`: what the checkpoint will have drained and written out.
    held_bytes: usize,
    late_rows: Vec<ScoredNews>,
    window_rows: Vec<WindowRow>,
    /// None for role `classify`, which keeps no tables and no checkpoint file.
    storage: Option<Storage>,
    dead_letter: DeadLetter,
    sink: Option<ScoredSink>,
    pub counters: Counters,
    pub last_checkpoint: Instant,
    /// [`digest`] of the state committed last, when it was taken (a checkpoint with nothing to write).
    committed_digest: Option<u64>,
    /// Per-topic totals and the most negative stories so far, for the summary.
    pub recent: super::summary::Recent,
    pub alerting: Option<Alerting>,
    /// Where unflushed rows are published for SQL, when a server runs.
    pub live: Option<Arc<crate::sql::live::LiveRows>>,
    /// Set when the process is asked to stop: a checkpoint waiting for the storage gives up.
    pub stop: Arc<std::sync::atomic::AtomicBool>,
    /// Set while a write waits for the storage; `/ready` reports it.
    pub outage: Arc<crate::storage::Outage>,
    /// An instance that shares its storage reads Kafka with these: a checkpoint is not committed
    /// once the group may have moved its partitions (see [`crate::source::kafka::Polls`]).
    pub polls: Option<Arc<crate::source::kafka::Polls>>,
    /// What a file source has read, for the checkpoint (see [`FileProgress`]).
    pub files: BTreeMap<String, FileProgress>,
    /// Analysts' label corrections acting on the windows (None for role `classify`).
    corrections: Option<Corrections>,
    /// Follows the `champion` alias, to swap models without a restart (None without a classifier).
    pub model_watch: Option<ModelWatch>,
    /// The `challenger` scoring in shadow, if one is set.
    shadow: Option<super::shadow::Shadow>,
    /// See [`Checkpoint::topic_sources`].
    topic_sources: BTreeMap<String, String>,
    /// `[storage] checkpoint_interval`: how often this instance's progress note is renewed.
    pub checkpoint_every: Duration,
    /// The other instances' progress notes as last read, and when each last changed (this
    /// process's clock): see [`handover`].
    others: handover::Others,
    /// Since when each partition has been read to its end, for the progress note.
    idle_since: HashMap<String, Instant>,
}

/// Follows the `champion` rows of `model_aliases` under `storage`. A new champion is loaded, warmed
/// up and checked against its own golden outputs while the old one still serves; only then does
/// the pipeline finish what is in flight and switch, so no story is lost or scored twice. Any
/// failure keeps the champion that serves, and that row is not tried again.
pub struct ModelWatch {
    pub storage: crate::storage::Location,
    /// The `[model]` settings; the alias gives the folder.
    pub config: crate::classify::ClassifierConfig,
    /// The folder serving now (None: `[model] path`).
    pub serving: Option<String>,
    pub failed: HashSet<String>,
    pub last_poll: Option<Instant>,
    pub files: usize,
}

/// A source partition's name in the windows' per-source clocks.
fn source_key(topic: &str, partition: i32) -> String {
    format!("{topic}/{partition}")
}

pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Core {
    pub fn new(
        role: Role,
        classifier: Option<Classifier>,
        limits: Limits,
        windows: WindowState,
        storage: Option<Storage>,
        dead_letter: DeadLetter,
        sink: Option<ScoredSink>,
        mut alerting: Option<Alerting>,
        corrections: Option<Corrections>,
        restored: Option<Checkpoint>,
    ) -> Result<Core, PipelineError> {
        let mut core = Core {
            role,
            classifier,
            limits,
            in_flight: VecDeque::new(),
            in_flight_ids: HashSet::new(),
            revoked: HashSet::new(),
            seen: HashMap::new(),
            windows,
            offsets: Offsets::new(),
            news_rows: Vec::new(),
            held_bytes: 0,
            late_rows: Vec::new(),
            window_rows: Vec::new(),
            storage,
            dead_letter,
            sink,
            counters: Counters::default(),
            last_checkpoint: Instant::now(),
            committed_digest: None,
            recent: Default::default(),
            alerting: None,
            live: None,
            stop: Default::default(),
            outage: Default::default(),
            polls: None,
            files: Default::default(),
            corrections,
            model_watch: None,
            shadow: None,
            topic_sources: BTreeMap::new(),
            checkpoint_every: Duration::from_secs(10),
            others: Default::default(),
            idle_since: HashMap::new(),
        };
        if let Some(checkpoint) = restored {
            if checkpoint.windows.spec() != core.windows.spec() {
                return Err(PipelineError::WindowsChanged {
                    storage: core.storage.as_ref().map(|s| s.location().to_string()).unwrap_or_default(),
                    saved: format!("{:?}", checkpoint.windows.spec()),
                });
            }
            let folding = core.windows.folding();
            core.windows = checkpoint.windows;
            core.windows.fold_copies(folding);
            core.windows.upgrade_restored();
            core.offsets = checkpoint.offsets;
            core.seen = seen::decode(&checkpoint.seen_keys, &checkpoint.seen).map_err(PipelineError::Internal)?.into_iter().collect();
            core.counters = checkpoint.counters;
            core.files = checkpoint.files;
            core.topic_sources = checkpoint.topic_sources;
            if let Some(corrections) = core.corrections.as_mut() {
                for tracked in checkpoint.tracked {
                    corrections.track(tracked);
                }
            }
            if let (Some(alerting), Some(saved)) = (alerting.as_mut(), checkpoint.detector) {
                core.counters.alerts += alerting.restore(saved, core.windows.watermark_ms().unwrap_or(0)) as u64;
            }
            if let Some(alerting) = alerting.as_mut() {
                alerting.resume_rate_intervals(checkpoint.rate_intervals);
            }
        }
        if let Some(corrections) = &core.corrections {
            core.windows.keep_closed(corrections.revise_windows);
        }
        core.alerting = alerting;
        Ok(core)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// Rows waiting for the next checkpoint: stories, window rows and applied labels alike, so that
    /// a backlog of re-counted windows is flushed like a backlog of stories.
    pub fn buffered_rows(&self) -> usize {
        self.news_rows.len() + self.window_rows.len() + self.corrections.as_ref().map_or(0, |c| c.applied.len())
    }

    /// The text bytes of the stories the next checkpoint writes, in flight or waiting.
    pub fn held_bytes(&self) -> usize {
        self.held_bytes
    }

    /// The checkpointed position of `topic`/`partition`, if any.
    pub fn offset(&self, topic: &str, partition: i32) -> Option<i64> {
        self.offsets.get(topic).and_then(|p| p.get(&partition)).copied()
    }

    /// A partition's log ends at `end` (its high watermark): if that is before the offset this run
    /// has read to, the topic was deleted and created again (or its log truncated) and its offsets
    /// start over, so skipping records below the old offset would drop new stories.
    pub fn log_ends_at(&mut self, topic: &str, partition: i32, end: i64) {
        if let Some(next) = self.offset(topic, partition).filter(|next| *next > end) {
            tracing::warn!(topic, partition, read_to = next, log_end = end, "the partition's log ends before what was read: the topic was recreated or truncated; reading it again from the group's position");
            crate::telemetry::errors("source", 1);
            if let Some(parts) = self.offsets.get_mut(topic) {
                parts.remove(&partition);
            }
        }
    }

    /// Validates, de-duplicates and queues one record for scoring.
    pub fn accept(&mut self, record: Record) -> Result<(), PipelineError> {
        if self.offset(&record.topic, record.partition).is_some_and(|next| record.offset < next) {
            // Already covered by the checkpoint this run restored: a re-delivery after a crash.
            return Ok(());
        }
        self.counters.received += 1;
        crate::telemetry::received("source", 1);
        // Every log line about this record carries where it came from and, once parsed, its id.
        let span = tracing::info_span!("source", topic = %record.topic, partition = record.partition, offset = record.offset, id = tracing::field::Empty);
        let _entered = span.enter();
        let at = Position {
            topic: record.topic.clone(),
            partition: record.partition,
            offset: record.offset,
            from_kafka: record.from_kafka,
        };
        let news = match self.validate(&record) {
            Ok(news) => {
                span.record("id", news.id.as_str());
                news
            }
            Err((kind, message)) => {
                self.dead_letter("source", &record, kind, &message)?;
                self.in_flight.push_back(InFlight::Done { at });
                return Ok(());
            }
        };
        if self.seen.contains_key(&seen::key(&news.id)) || self.in_flight_ids.contains(&news.id) {
            tracing::debug!("duplicate id: dropped");
            self.counters.duplicates += 1;
            crate::telemetry::dropped("source", "duplicate", 1);
            self.in_flight.push_back(InFlight::Done { at });
            return Ok(());
        }
        let Some(classifier) = &self.classifier else {
            return self.accept_scored(record, news, at);
        };
        let text = news.classification_text(self.limits.body_chars);
        match classifier.submit_now(&text) {
            Ok(pending) => {
                crate::telemetry::sent("source", 1);
                self.in_flight_ids.insert(news.id.clone());
                let published_ms = news.published_ms();
                self.held_bytes += news.bytes();
                self.in_flight.push_back(InFlight::Scoring { at, news, published_ms, pending });
            }
            Err(e @ (ClassifyError::Tokenize(_) | ClassifyError::EmptyText)) => {
                self.dead_letter("classify", &record, "classify_failed", &e.to_string())?;
                self.in_flight.push_back(InFlight::Done { at });
            }
            Err(e) => return Err(PipelineError::Classify(e)),
        }
        Ok(())
    }

    /// A `news.scored` message (role `aggregate`): its scores ride along in the story's fields.
    fn accept_scored(&mut self, record: Record, mut news: News, at: Position) -> Result<(), PipelineError> {
        let scores = Scores::take_from(&mut news.extra).and_then(|scores| self.topic_admitted(&scores.topic, &at).map(|()| scores));
        match scores {
            Ok(scores) => {
                let origin = Origin {
                    partition: news.extra.take("kafka_partition").and_then(|v| v.as_i64()).map(|p| p as i32),
                    offset: news.extra.take("kafka_offset").and_then(|v| v.as_i64()),
                };
                news.extra.take("ingested_at");
                crate::telemetry::sent("source", 1);
                self.in_flight_ids.insert(news.id.clone());
                let published_ms = news.published_ms();
                self.held_bytes += news.bytes();
                self.in_flight.push_back(InFlight::Scored { at, news, published_ms, scores, origin });
            }
            Err(message) => {
                self.dead_letter("source", &record, "invalid_scores", &message)?;
                self.in_flight.push_back(InFlight::Done { at });
            }
        }
        Ok(())
    }

    /// Whether a scored story's topic may be counted here: topics come from the messages role
    /// `aggregate` reads, and each is a window group, so at most [`crate::news::MAX_TOPICS`] (as many
    /// as a model may have) are held at once. A new topic admitted is this partition's from now on
    /// (a topic already held moves with its stories, as each is counted).
    fn topic_admitted(&mut self, topic: &str, at: &Position) -> Result<(), String> {
        if self.topic_sources.contains_key(topic) {
            return Ok(());
        }
        if self.topic_sources.len() >= crate::news::MAX_TOPICS {
            return Err(format!(
                "topic {topic:?} would be topic number {} here, and at most {} are counted (a model has at most as many)",
                self.topic_sources.len() + 1,
                crate::news::MAX_TOPICS
            ));
        }
        if at.from_kafka {
            self.topic_sources.insert(topic.to_string(), source_key(&at.topic, at.partition));
        }
        Ok(())
    }

    fn validate(&self, record: &Record) -> Result<News, (&'static str, String)> {
        let size = record.size();
        if size > self.limits.max_message_bytes as u64 {
            return Err(("too_large", format!("message has {size} bytes, more than max_message_bytes = {}", self.limits.max_message_bytes)));
        }
        if record.payload.is_empty() {
            return Err(("empty", "message has no payload".into()));
        }
        if let Err(e) = std::str::from_utf8(&record.payload) {
            return Err(("invalid_utf8", format!("message is not UTF-8: {e}")));
        }
        let news = News::from_json(&record.payload).map_err(|e| (e.kind(), e.to_string()))?;
        let published = news.published_ms();
        if published < 0 {
            return Err(("timestamp_out_of_range", format!("published_at {} is before 1970", news.published_at)));
        }
        if published > now_ms() + self.limits.max_clock_skew_ms {
            return Err((
                "timestamp_out_of_range",
                format!("published_at {} is in the future by more than max_clock_skew", news.published_at),
            ));
        }
        Ok(news)
    }

    /// Sends a record that `stage` could not handle to the dead-letter output, with the reason.
    fn dead_letter(&mut self, stage: &'static str, record: &Record, kind: &str, message: &str) -> Result<(), PipelineError> {
        self.counters.dead_lettered += 1;
        crate::telemetry::dropped(stage, "dead_letter", 1);
        tracing::debug!(kind, message, topic = %record.topic, partition = record.partition, offset = record.offset, "dead-lettered");
        match self.dead_letter.send(record, kind, message) {
            // The record waits in the output until it can be written.
            Err(e) if self.dead_letter.is_file() && e.retryable() => self.flush_dead_letters(),
            sent => sent.map_err(PipelineError::Source),
        }
    }

    /// Makes the dead letters sent so far durable. A file waits while its disk is full, as the
    /// storage does; a topic's failure ends the run (its stories are read again at the next start).
    fn flush_dead_letters(&mut self) -> Result<(), PipelineError> {
        if self.dead_letter.is_file() {
            while_unavailable(&self.stop, &self.outage, || self.dead_letter.flush())
        } else {
            self.dead_letter.flush()
        }
        .map_err(PipelineError::Source)
    }

    /// Applies every finished item at the head of the queue; returns how many.
    pub fn complete_ready(&mut self) -> Result<usize, PipelineError> {
        if let Some(shadow) = self.shadow.as_mut() {
            shadow.collect();
        }
        let mut done = 0;
        loop {
            let result = match self.in_flight.front_mut() {
                None => break,
                Some(InFlight::Done { .. } | InFlight::Scored { .. }) => None,
                Some(InFlight::Scoring { pending, .. }) => match pending.try_scores() {
                    None => break,
                    Some(result) => Some(result),
                },
            };
            let item = self.in_flight.pop_front().expect("front exists");
            self.apply(item, result)?;
            done += 1;
        }
        Ok(done)
    }

    /// Blocks until the oldest item is done, then applies it and any others ready.
    pub fn complete_one(&mut self) -> Result<(), PipelineError> {
        if let Some(item) = self.in_flight.pop_front() {
            self.apply(item, None)?;
        }
        self.complete_ready().map(|_| ())
    }

    /// Completes everything in flight, giving up at `deadline`. Returns false if it gave up; then the
    /// abandoned items are forgotten, and their offsets stay unconsumed so a restart reads them again.
    pub fn drain(&mut self, deadline: Option<Instant>) -> Result<bool, PipelineError> {
        while !self.in_flight.is_empty() {
            if deadline.is_some_and(|d| Instant::now() >= d) {
                tracing::warn!(abandoned = self.in_flight.len(), "shutdown timeout: stories in flight will be read again at restart");
                self.in_flight.clear();
                self.in_flight_ids.clear();
                return Ok(false);
            }
            if self.complete_ready()? == 0 {
                // Poll rather than block, so that the deadline holds even if a batch hangs.
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        Ok(true)
    }

    /// Finishes one item; a scoring item without a `result` yet is waited for.
    fn apply(&mut self, item: InFlight, result: Option<Result<Scores, ClassifyError>>) -> Result<(), PipelineError> {
        match item {
            InFlight::Done { at } => {
                self.advance(&at);
                Ok(())
            }
            InFlight::Scoring { at, news, published_ms, pending } => {
                let result = result.unwrap_or_else(|| pending.wait());
                self.advance(&at);
                let origin = Origin { partition: at.from_kafka.then_some(at.partition), offset: at.from_kafka.then_some(at.offset) };
                self.score(news, published_ms, result, &at, origin)
            }
            InFlight::Scored { at, news, published_ms, scores, origin } => {
                self.advance(&at);
                self.score(news, published_ms, Ok(scores), &at, origin)
            }
        }
    }

    fn score(
        &mut self,
        news: News,
        published_ms: i64,
        result: Result<Scores, ClassifyError>,
        at: &Position,
        origin: Origin,
    ) -> Result<(), PipelineError> {
        let _span = tracing::info_span!("window", id = %news.id).entered();
        self.in_flight_ids.remove(&news.id);
        let scores = match result {
            Ok(scores) => scores,
            Err(ClassifyError::Stopped) => return Err(PipelineError::Classify(ClassifyError::Stopped)),
            Err(e) => {
                // A failed batch: the story is kept, unscored, in the dead-letter output.
                tracing::error!(error = %e, id = %news.id, "classification failed");
                let payload = serde_json::to_vec(&news).unwrap_or_default();
                let record =
                    Record { topic: at.topic.clone(), partition: at.partition, offset: at.offset, payload, from_kafka: at.from_kafka, cut_from: None };
                return self.dead_letter("classify", &record, "classify_failed", &e.to_string());
            }
        };
        let now = now_ms();
        // Role `classify` keeps no windows, so no watermark to prune by; `aggregate` de-duplicates.
        if self.role != Role::Classify {
            self.seen.insert(seen::key(&news.id), published_ms);
        }
        let mut row = ScoredNews {
            news,
            scores,
            ingested_at: chrono::DateTime::from_timestamp_millis(now)
                .unwrap_or_default()
                .to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            kafka_partition: origin.partition,
            kafka_offset: origin.offset,
            published_ms,
            ingested_ms: now,
        };
        // Role `aggregate` reads the sink's topic: publishing there again would loop.
        if let (Some(sink), false) = (&self.sink, self.role == Role::Aggregate) {
            let mut json = serde_json::to_vec(&row).map_err(|e| PipelineError::Internal(e.to_string()))?;
            if json.len() > crate::source::kafka::MAX_OUTPUT_BYTES {
                // A long body (`max_message_bytes` raised): the topic would refuse the story, and
                // every restart would read it again. Its headline, scores and ids go; `news` keeps it whole.
                if let Some(held) = LOGGED.admit("too large for the sink") {
                    tracing::warn!(id = %row.news.id, bytes = json.len(), "scored story too large for the sink topic: sent without its body{}", crate::telemetry::held_back(held));
                }
                let body = row.news.body.take();
                json = serde_json::to_vec(&row).map_err(|e| PipelineError::Internal(e.to_string()))?;
                row.news.body = body;
            }
            sink.output.send(&sink.topic, row.scores.topic.as_bytes(), &json, None).map_err(PipelineError::Source)?;
            crate::telemetry::sent("sink", 1);
        }
        self.counters.scored += 1;

        self.recent.observe(&row);
        if self.role == Role::Classify {
            return Ok(());
        }
        if at.from_kafka {
            let source = source_key(&at.topic, at.partition);
            if self.topic_sources.get(&row.scores.topic) != Some(&source) {
                self.topic_sources.insert(row.scores.topic.clone(), source);
            }
        }
        if let Some(shadow) = self.shadow.as_mut() {
            shadow.submit(&row.news, published_ms, &row.news.classification_text(self.limits.body_chars));
        }
        let tickers = row.news.tickers.clone().unwrap_or_default();
        crate::telemetry::received("window", 1);
        let cluster = self.windows.cluster_of(published_ms, &row.news.headline, &crate::news::near::Reading::of(&row.scores));
        let mut tracked = Tracked::new(published_ms, tickers, &row.news.id, &row.news.headline, &row.scores, cluster);
        let counted = match self.corrections.as_mut() {
            Some(corrections) => corrections.label(&mut tracked, &row.news.headline, &row.scores),
            None => tracked.counted.clone(),
        };
        let placed = self.windows.add(&counted);
        if let (Some(corrections), Placed::Counted(_)) = (self.corrections.as_mut(), placed) {
            corrections.track(tracked);
        }
        // A story dated ahead of the clock (allowed up to `max_clock_skew`) counts in its window but
        // moves its partition's time only to now: one story from a wrong clock must not push the
        // watermark an hour ahead and make every story of that hour late.
        self.windows.advance(&source_key(&at.topic, at.partition), published_ms.min(now));
        if placed == Placed::Late {
            tracing::debug!(published_at = %row.news.published_at, "behind the watermark: kept in table `late`");
            self.counters.late += 1;
            metrics::counter!("bearwatch_window_late_total").increment(1);
            self.held_bytes += row.news.bytes();
            self.late_rows.push(row.clone());
        }
        self.news_rows.push(row);
        self.evaluate_due(now);
        Ok(())
    }

    /// What the watermark now allows: windows it passed close (their final rows to the table and
    /// the rules), and at each step of `evaluate_every` the rules see the open windows that changed.
    /// Both follow event time only, so every run of the same input raises the same alerts.
    fn evaluate_due(&mut self, now: i64) {
        let (closed, live) = self.windows.due(self.limits.evaluate_every_ms, now);
        self.observe(&closed);
        self.window_rows.extend(closed);
        self.observe(&live);
    }

    /// Applies analysts' new label judgements, if any (see [`Corrections`]): finishes what is in
    /// flight first, so that the classifier is free to embed the judged texts. Returns whether any
    /// came in; their effects are in the next live rows and checkpoint.
    pub fn poll_feedback(&mut self) -> Result<bool, PipelineError> {
        let Some(corrections) = self.corrections.as_mut() else { return Ok(false) };
        let rows = corrections.due_rows()?;
        if rows.is_empty() {
            // Judgements whose stories were not all re-counted in earlier rounds go on.
            if !corrections.has_pending() {
                return Ok(false);
            }
            let revised = corrections.recount(&mut self.windows, now_ms());
            self.window_rows.extend(revised);
            return Ok(true);
        }
        let _span = tracing::info_span!("feedback", rows = rows.len()).entered();
        self.drain(None)?;
        let corrections = self.corrections.as_mut().expect("checked above");
        let revised = corrections.learn(rows, self.classifier.as_ref(), &mut self.windows, now_ms())?;
        tracing::debug!(revised_windows = revised.len(), "label judgements applied");
        self.window_rows.extend(revised);
        Ok(true)
    }

    /// The model folder the classifier was loaded from.
    pub fn classifier_dir(&self) -> Option<std::path::PathBuf> {
        self.classifier.as_ref().map(|c| c.spec().dir.clone())
    }

    /// Swaps to a newly promoted champion, if there is one (see [`ModelWatch`]), and starts, replaces
    /// or stops the shadow as the `challenger` alias says; at most once a second, and only when
    /// `model_aliases` has new files. Returns whether it swapped.
    pub fn poll_models(&mut self) -> Result<bool, PipelineError> {
        let Some(watch) = self.model_watch.as_mut() else { return Ok(false) };
        if watch.last_poll.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
            return Ok(false);
        }
        watch.last_poll = Some(Instant::now());
        let files = crate::storage::journal_files(&watch.storage, Table::ModelAliases).map_or(0, |f| f.len());
        if files == watch.files {
            return Ok(false);
        }
        let read = crate::learn::registry::champion_history(&watch.storage)
            .and_then(|champion| Ok((champion, crate::learn::registry::alias_history(&watch.storage, crate::learn::registry::CHALLENGER)?)));
        let (newest, challenger) = match read {
            Ok((mut champion, mut challenger)) => (champion.pop(), challenger.pop()),
            Err(e) => {
                // Tried again every second while it lasts.
                if let Some(held) = LOGGED.admit(&format!("model_aliases: {e}")) {
                    tracing::error!(error = %e, "model_aliases unreadable; the model serving keeps serving{}", crate::telemetry::held_back(held));
                }
                return Ok(false);
            }
        };
        watch.files = files;
        if let Some(challenger) = challenger {
            self.follow_challenger(&challenger);
        }
        let Some(watch) = self.model_watch.as_mut() else { return Ok(false) };
        let Some(newest) = newest else { return Ok(false) };
        let key = format!("{}|{}", newest.path, newest.set_at);
        if watch.serving.as_deref() == Some(newest.path.as_str()) || watch.failed.contains(&key) {
            return Ok(false);
        }
        let _span = tracing::info_span!("swap", model = %newest.model).entered();
        let started = Instant::now();
        let new = match crate::learn::registry::load_checked(&watch.config, std::path::Path::new(&newest.path)) {
            Ok(new) => new,
            Err(e) => {
                tracing::error!(error = %e, path = %newest.path, "the new champion failed to load or to match its golden outputs; the model serving keeps serving");
                metrics::counter!("bearwatch_model_swaps_total", "outcome" => "failed").increment(1);
                watch.failed.insert(key);
                return Ok(false);
            }
        };
        watch.serving = Some(newest.path.clone());
        self.drain(None)?;
        if let Some(alerting) = self.alerting.as_mut() {
            alerting.replace_explainer(super::explainer(new.clone()));
        }
        self.classifier = Some(new);
        metrics::counter!("bearwatch_model_swaps_total", "outcome" => "swapped").increment(1);
        tracing::info!(model = %newest.model, set_by = %newest.set_by, seconds = started.elapsed().as_secs_f64(), "swapped to the new champion");
        Ok(true)
    }

    /// Lets the shadow finish the stories it holds (see [`super::shadow::Shadow::finish`]).
    pub fn finish_shadow(&mut self, deadline: Option<Instant>) {
        if let Some(shadow) = self.shadow.as_mut() {
            shadow.finish(deadline);
        }
    }

    /// Starts, replaces or stops the shadow model as the newest `challenger` row says. A folder that
    /// fails to load or to match its golden outputs is logged and not tried again.
    fn follow_challenger(&mut self, newest: &crate::learn::registry::AliasRow) {
        let Some(watch) = self.model_watch.as_mut() else { return };
        if self.storage.is_none() || self.shadow.as_ref().map(|s| s.path.as_str()) == Some(newest.path.as_str()) {
            return;
        }
        if newest.path.is_empty() {
            if let Some(stopped) = self.shadow.take() {
                tracing::info!(model = %stopped.model(), set_by = %newest.set_by, "shadow stopped");
            }
            return;
        }
        let key = format!("{}|{}", newest.path, newest.set_at);
        if watch.failed.contains(&key) {
            return;
        }
        match crate::learn::registry::load_checked(&watch.config, std::path::Path::new(&newest.path)) {
            Ok(classifier) => {
                tracing::info!(model = %newest.model, set_by = %newest.set_by, "shadow started: the challenger scores every story beside the champion");
                self.shadow = Some(super::shadow::Shadow::new(classifier, newest.path.clone(), watch.config.max_queued));
            }
            Err(e) => {
                tracing::error!(error = %e, path = %newest.path, "the challenger failed to load or to match its golden outputs; no shadow");
                watch.failed.insert(key);
            }
        }
    }

    /// Puts reloaded rule files in force, and returns how many alerts of rules no longer there it
    /// resolved; None where this pipeline evaluates no rules.
    pub fn reload_rules(&mut self, rules: RuleFile) -> Option<usize> {
        let alerting = self.alerting.as_mut()?;
        let resolved = alerting.reload(rules, self.windows.watermark_ms().unwrap_or(0));
        self.counters.alerts += resolved as u64;
        Some(resolved)
    }

    /// Runs the alert rules on rows the windows just emitted.
    fn observe(&mut self, rows: &[WindowRow]) {
        if rows.is_empty() {
            return;
        }
        crate::telemetry::sent("window", rows.len() as u64);
        metrics::gauge!("bearwatch_windows_open").set(self.windows.open_windows() as f64);
        if let Some(alerting) = self.alerting.as_mut() {
            let watermark = self.windows.watermark_ms().unwrap_or(0);
            self.counters.alerts += alerting.observe(rows, watermark) as u64;
        }
    }

    fn advance(&mut self, at: &Position) {
        self.offsets.entry(at.topic.to_string()).or_default().insert(at.partition, at.offset + 1);
    }

    /// Closes every window (end of a bounded input).
    pub fn close_all_windows(&mut self) {
        let rows = self.windows.close_all(now_ms());
        self.observe(&rows);
        self.window_rows.extend(rows);
    }

    /// Whether `topic`/`partition` has been read to its end. Only once nothing of it is in flight:
    /// a story already read but not yet counted must still hold the watermark back.
    pub fn set_read_to_end(&mut self, topic: &str, partition: i32, at_end: bool) {
        let waiting = self.in_flight.iter().any(|item| {
            let at = item.position();
            at.partition == partition && &*at.topic == topic
        });
        let source = source_key(topic, partition);
        if at_end && !waiting {
            self.idle_since.entry(source.clone()).or_insert_with(Instant::now);
        } else {
            self.idle_since.remove(&source);
        }
        self.windows.set_caught_up(&source, at_end && !waiting);
    }

    /// Revoked partitions keep holding event time back until the assignment that follows says
    /// whether they stay: stories of theirs may still arrive in between.
    /// Keeps a source's offsets under a new name (a file's path as written → its canonical path).
    pub fn rename_source(&mut self, old: &str, new: &str) {
        if old != new
            && let Some(parts) = self.offsets.remove(old)
        {
            for partition in parts.keys() {
                self.windows.forget_source(&source_key(old, *partition));
            }
            self.offsets.entry(new.to_string()).or_insert(parts);
        }
    }

    pub fn revoked(&mut self, partitions: &[(String, i32)]) {
        self.revoked.extend(partitions.iter().map(|(topic, partition)| source_key(topic, *partition)));
    }

    /// Event time waits for each assigned partition (for its first story if it is new), and stops
    /// waiting for revoked ones that went to another member (their new owner counts them). With
    /// instances sharing the storage, partitions also change hands with their state (see
    /// [`handover`]): an error there (the storage unreachable) ends the run before any story of an
    /// assigned partition is counted without its state.
    pub fn assigned(&mut self, partitions: &[(String, i32)]) -> Result<(), PipelineError> {
        let assigned: HashSet<String> = partitions.iter().map(|(topic, partition)| source_key(topic, *partition)).collect();
        for gone in std::mem::take(&mut self.revoked).difference(&assigned) {
            self.windows.forget_source(gone);
        }
        self.hand_over(partitions)?;
        for source in &assigned {
            self.windows.set_caught_up(source, false);
        }
        Ok(())
    }

    /// Forgets partitions this member no longer owns once their offsets are committed.
    pub fn forget(&mut self, partitions: &[(String, i32)]) {
        for (topic, partition) in partitions {
            if let Some(parts) = self.offsets.get_mut(topic) {
                parts.remove(partition);
            }
        }
    }

    /// Writes buffered rows as Parquet parts and then the checkpoint. Nothing may be in flight.
    /// Returns the offsets the checkpoint covers, to commit to the group.
    pub fn checkpoint(&mut self) -> Result<Offsets, PipelineError> {
        assert!(self.in_flight.is_empty(), "checkpoint with items in flight");
        let started = Instant::now();
        let now = now_ms();
        // The watermark also moves without new stories (a partition read to its end stops holding
        // it back), so windows it has passed close here too, not only when a story arrives.
        self.evaluate_due(now);
        // Live rows for queries; the rules saw (or will see) them at steps of event time.
        let updates = self.windows.take_updates(now);
        crate::telemetry::sent("window", updates.len() as u64);
        self.window_rows.extend(updates);
        self.prune_seen();
        if let Some(corrections) = &self.corrections {
            self.windows.forget_folded_except(&corrections.tracked_clusters());
        }
        self.flush_dead_letters()?;
        if let Some(sink) = &self.sink {
            sink.output.flush(Duration::from_secs(30)).map_err(PipelineError::Source)?;
        }
        let Some(mut storage) = self.storage.take() else {
            // Role `classify`: what it published is acknowledged; the group's offsets are its state.
            self.last_checkpoint = Instant::now();
            metrics::counter!("bearwatch_checkpoints_total").increment(1);
            return Ok(self.offsets.clone());
        };
        // Out of `self` while the state is written from borrows of the rest (`view`), and back in
        // whatever comes of it.
        let written = self.write_checkpoint(&mut storage, started);
        self.storage = Some(storage);
        written?;
        self.share_progress();
        if let Some(corrections) = self.corrections.as_mut() {
            corrections.applied.clear();
        }
        if let Some(alerting) = self.alerting.as_mut() {
            alerting.changes.clear();
        }
        self.news_rows.clear();
        self.late_rows.clear();
        self.held_bytes = 0;
        self.window_rows.clear();
        self.last_checkpoint = Instant::now();
        Ok(self.offsets.clone())
    }

    /// The state as a checkpoint writes it, borrowed.
    pub(super) fn view(&self) -> CheckpointView<'_> {
        CheckpointView {
            written_at: String::new(),
            offsets: &self.offsets,
            windows: &self.windows,
            seen: [],
            seen_keys: seen::encode(&self.seen),
            counters: &self.counters,
            detector: self.alerting.as_ref().map(|a| &a.detector),
            files: &self.files,
            tracked: self.corrections.as_ref().map(Corrections::tracked).unwrap_or_default(),
            topic_sources: &self.topic_sources,
            rate_intervals: self.alerting.as_ref().map(Alerting::rate_intervals).unwrap_or_default(),
        }
    }

    /// [`Core::checkpoint`]'s writing: the buffered rows as parts, then the state, into `storage`
    /// (taken out of `self` meanwhile).
    fn write_checkpoint(&mut self, storage: &mut crate::storage::Storage, started: Instant) -> Result<(), PipelineError> {
        // Every part of this checkpoint, built before any is written: a write that fails (object
        // storage unreachable) is retried with the same rows, and nothing is dropped until the
        // checkpoint is committed.
        let internal = |e: arrow::error::ArrowError| PipelineError::Internal(e.to_string());
        let mut parts: Vec<(Table, arrow::array::RecordBatch)> = Vec::new();
        if !self.news_rows.is_empty() {
            parts.push((Table::News, news_batch(&self.news_rows).map_err(internal)?));
        }
        if !self.late_rows.is_empty() {
            parts.push((Table::Late, news_batch(&self.late_rows).map_err(internal)?));
        }
        if !self.window_rows.is_empty() {
            parts.push((Table::Windows, windows_batch(&self.window_rows).map_err(internal)?));
        }
        if let Some(shadow) = self.shadow.as_mut() {
            let rows = shadow.take_rows();
            if !rows.is_empty() {
                parts.push((Table::ShadowNews, news_batch(&rows).map_err(internal)?));
            }
        }
        if let Some(corrections) = self.corrections.as_ref()
            && !corrections.applied.is_empty()
        {
            parts.push((Table::AppliedLabels, crate::feedback::applied_labels_batch(&corrections.applied).map_err(internal)?));
        }
        if let Some(alerting) = self.alerting.as_mut() {
            if !alerting.changes.is_empty() {
                parts.push((Table::Alerts, alerts_batch(&alerting.changes).map_err(internal)?));
            }
            // Into the outbox before the checkpoint: a crash in between may repeat a notice, never lose one.
            while_unavailable(&self.stop, &self.outage, || alerting.flush_queue())?;
            let rows = alerting.notifier.as_ref().map(|n| n.take_rows()).unwrap_or_default();
            if !rows.is_empty() {
                parts.push((Table::Notifications, notifications_batch(&rows).map_err(internal)?));
            }
        }
        tracing::debug!(
            news = self.news_rows.len(),
            windows = self.window_rows.len(),
            late = self.late_rows.len(),
            open_windows = self.windows.open_windows(),
            "checkpoint"
        );
        let mut state = self.view();
        // No rows to write and the state committed last: an idle feed rewrote the whole state every
        // interval (tens of MB on a long run: the tracked stories, the kept windows, the copies).
        let digest = if parts.is_empty() { Some(digest(&state).map_err(|e| PipelineError::Internal(e.to_string()))?) } else { None };
        if digest.is_some() && digest == self.committed_digest {
            storage.tend_between_commits();
            metrics::counter!("bearwatch_checkpoints_unchanged_total").increment(1);
        } else {
            state.written_at = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
            store(storage, self.live.as_deref(), &parts, &state, &self.stop, &self.outage, self.polls.as_deref())?;
            self.committed_digest = digest;
            metrics::counter!("bearwatch_checkpoints_total").increment(1);
            metrics::histogram!("bearwatch_checkpoint_seconds").record(started.elapsed().as_secs_f64());
        }
        Ok(())
    }

    /// Drops ids older than the horizon behind the newest event time, then the oldest over the cap.
    fn prune_seen(&mut self) {
        let Some(watermark) = self.windows.watermark_ms() else { return };
        let cutoff = watermark.saturating_sub(self.limits.dedup_horizon_ms);
        self.seen.retain(|_, t| *t >= cutoff);
        if self.limits.dedup_max_ids == 0 {
            self.seen.clear();
        } else if self.seen.len() > self.limits.dedup_max_ids {
            let mut times: Vec<i64> = self.seen.values().copied().collect();
            let excess = self.seen.len() - self.limits.dedup_max_ids;
            let (_, nth, _) = times.select_nth_unstable(excess);
            let keep_from = *nth;
            self.seen.retain(|_, t| *t >= keep_from);
        }
    }

    /// Publishes the rows not yet in Parquet for SQL: buffered stories, emitted and open windows,
    /// and alert changes.
    pub fn publish_live(&self) -> Result<(), PipelineError> {
        let Some(live) = &self.live else { return Ok(()) };
        let internal = |e: arrow::error::ArrowError| PipelineError::Internal(e.to_string());
        let mut tables = std::collections::BTreeMap::new();
        if !self.news_rows.is_empty() {
            tables.insert(Table::News, vec![news_batch(&self.news_rows).map_err(internal)?]);
        }
        if !self.late_rows.is_empty() {
            tables.insert(Table::Late, vec![news_batch(&self.late_rows).map_err(internal)?]);
        }
        let mut windows = self.window_rows.clone();
        windows.extend(self.windows.snapshot(now_ms()));
        if !windows.is_empty() {
            tables.insert(Table::Windows, vec![windows_batch(&windows).map_err(internal)?]);
        }
        if let Some(alerting) = self.alerting.as_ref().filter(|a| !a.changes.is_empty()) {
            tables.insert(Table::Alerts, vec![alerts_batch(&alerting.changes).map_err(internal)?]);
        }
        if let Some(corrections) = self.corrections.as_ref().filter(|c| !c.applied.is_empty()) {
            tables.insert(Table::AppliedLabels, vec![crate::feedback::applied_labels_batch(&corrections.applied).map_err(internal)?]);
        }
        live.publish(tables);
        Ok(())
    }

    /// Waits (up to `deadline`) for notifications due by then; returns how many are still pending.
    pub fn settle_notifications(&self, deadline: Instant) -> usize {
        self.alerting.as_ref().and_then(|a| a.notifier.as_ref()).map_or(0, |n| n.settle(deadline))
    }


}

/// A digest of `state` as the checkpoint writes it: equal digests, equal states.
fn digest(state: &CheckpointView<'_>) -> Result<u64, serde_json::Error> {
    struct Digest(std::collections::hash_map::DefaultHasher);
    impl std::io::Write for Digest {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            std::hash::Hasher::write(&mut self.0, bytes);
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut digest = Digest(Default::default());
    serde_json::to_writer(&mut digest, state)?;
    Ok(std::hash::Hasher::finish(&digest.0))
}

/// Writes a checkpoint's parts and commits it, waiting while the storage cannot be reached
/// ([`while_unavailable`]). Queries hold off only while a write is under way, so that each row is
/// seen once, from a part or from the live rows. With `polls`, the commit is refused once the group
/// may have moved the partitions (after a long wait, say): the parts stay pending, hidden, and are
/// deleted at the next start.
fn store(
    storage: &mut crate::storage::Storage,
    live: Option<&crate::sql::live::LiveRows>,
    parts: &[(Table, arrow::array::RecordBatch)],
    state: &CheckpointView<'_>,
    stop: &std::sync::atomic::AtomicBool,
    outage: &crate::storage::Outage,
    polls: Option<&crate::source::kafka::Polls>,
) -> Result<(), PipelineError> {
    while_unavailable(stop, outage, || {
        let flushing = live.map(|l| l.flushing());
        let attempt = storage.write_all(parts).map_err(PipelineError::from).and_then(|_| match polls.and_then(|p| p.overdue()) {
            Some(why) => Err(PipelineError::OutOfGroup(why)),
            None => storage.commit(state).map_err(PipelineError::from),
        });
        drop(flushing);
        if attempt.is_err() {
            storage.forget_uncommitted();
        }
        attempt
    })
}

/// Runs `attempt`, a durable write of the pipeline's (parts, the checkpoint, the outbox, the
/// dead-letter file), until it succeeds. While it fails with an error a retry can help (object
/// storage unreachable, a full disk), it waits and tries again (1 s, doubling to 30 s), and reading
/// waits with it: stories stay in Kafka or the file, nothing is dropped. A stop request ends the
/// wait with the error: the next start resumes from the last checkpoint.
fn while_unavailable<T, E: Classified + std::fmt::Display>(
    stop: &std::sync::atomic::AtomicBool,
    outage: &crate::storage::Outage,
    mut attempt: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let mut wait = Duration::from_secs(1);
    loop {
        match attempt() {
            Ok(done) => {
                outage.ended();
                return Ok(done);
            }
            Err(e) if e.retryable() && !stop.load(std::sync::atomic::Ordering::SeqCst) => {
                outage.failed(&e.to_string());
                tracing::warn!(error = %e, retry_in = ?wait, "storage unavailable: writing waits, and reading with it; nothing is lost");
                // In steps, so that a stop request ends the wait at once rather than after up to 30 s.
                let until = Instant::now() + wait;
                while Instant::now() < until && !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(50).min(until.saturating_duration_since(Instant::now())));
                }
                wait = (wait * 2).min(Duration::from_secs(30));
            }
            Err(e) => return Err(e),
        }
    }
}
