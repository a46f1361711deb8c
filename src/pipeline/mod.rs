//! `bearwatch run`: the top layer, which wires the stages (source → classify → window → detect →
//! alert) to storage, SQL and the server, for each role (`all`, `classify`, `aggregate`), with
//! checkpoints. The pipeline file's [`PipelineConfig`] composes each stage's own config section.
//!
//! One thread drives the loop: read a record, validate it, hand it to the classifier's batcher, and
//! apply finished results in arrival order. The batcher runs inference on its own thread, so reading
//! and tokenizing overlap with the model. Kafka rebalance callbacks run inside `poll` on this same
//! thread and lock the same [`Core`], so a revocation can finish and checkpoint in-flight work before
//! the partitions move.

mod config;
mod core;
mod corrections;
mod shadow;
pub mod backtest;
pub mod compare;
pub mod summary;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use config::{DEMO_PIPELINE, DEMO_PIPELINE_NAME, PipelineConfig, Role, RunConfig, SinkConfig};

use crate::alert::outbox::Outbox;
use crate::alert::silences::{SilenceStore, Silences};
use crate::server::{Api, FeedbackService, Ops, Principals, ReloadRequest, Reloaded, Server, ServerError, SqlService, WebPolicy};
use crate::sql::live::LiveRows;
use crate::alert::{AlertError, Alerting, ReceiverKind, Router, notify};
use crate::classify::{ClassifyError, Classifier, ModelSpec};
use crate::detect::{Detector, InForce, RuleFile};
use crate::config::ConfigError;
use crate::error::{Classified, ErrorClass};
use crate::source::dead_letter::DeadLetter;
use crate::source::file::FileSource;
use crate::source::kafka::{GroupHandler, KafkaSource, Output, output_connection};
use crate::source::{Offsets, Source, SourceError, SourceKind};
use crate::storage::{Storage, StorageError};
use crate::window::{WindowSpec, WindowState};
use crate::sync::lock;

pub use self::core::Counters;
use self::core::{Checkpoint, Core, Limits, ScoredSink};
use self::corrections::Corrections;

#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Classify(#[from] ClassifyError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error(transparent)]
    Alert(#[from] AlertError),
    #[error(transparent)]
    Server(#[from] ServerError),
    #[error(transparent)]
    Sql(#[from] crate::sql::SqlError),
    #[error(transparent)]
    Learn(#[from] crate::learn::LearnError),
    #[error(
        "the checkpoint in {storage} was written with other [window] settings ({saved}); restore them, \
         or give this pipeline a new storage.path"
    )]
    WindowsChanged { storage: String, saved: String },
    /// A request that cannot be met as asked (a command's arguments, rule files without rules).
    #[error("{0}")]
    Usage(String),
    /// An aggregate instance that may have lost its partitions to another one without knowing when:
    /// what it counted since its last checkpoint may be counted there too, so it commits nothing more.
    #[error(
        "{0}: the group may have given its partitions to another instance, which counts them from this instance's last \
         checkpoint, so nothing more is committed here. Start this instance again: it goes on from its last checkpoint, \
         and no story is lost or counted twice"
    )]
    OutOfGroup(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl Classified for PipelineError {
    fn class(&self) -> ErrorClass {
        match self {
            PipelineError::Config(e) => e.class(),
            PipelineError::Classify(e) => e.class(),
            PipelineError::Source(e) => e.class(),
            PipelineError::Storage(e) => e.class(),
            PipelineError::Alert(e) => e.class(),
            PipelineError::Server(e) => e.class(),
            PipelineError::Sql(e) => e.class(),
            PipelineError::Learn(e) => e.class(),
            PipelineError::WindowsChanged { .. } | PipelineError::Usage(_) => ErrorClass::User,
            PipelineError::OutOfGroup(_) => ErrorClass::External,
            PipelineError::Internal(_) => ErrorClass::Internal,
        }
    }
    fn retryable(&self) -> bool {
        match self {
            PipelineError::Config(e) => e.retryable(),
            PipelineError::Classify(e) => e.retryable(),
            PipelineError::Source(e) => e.retryable(),
            PipelineError::Storage(e) => e.retryable(),
            PipelineError::Alert(e) => e.retryable(),
            PipelineError::Server(e) => e.retryable(),
            PipelineError::Sql(e) => e.retryable(),
            PipelineError::Learn(e) => e.retryable(),
            // A restart helps; doing the same again (committing) is what must not happen.
            PipelineError::WindowsChanged { .. } | PipelineError::Usage(_) | PipelineError::OutOfGroup(_) | PipelineError::Internal(_) => false,
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct RunOutcome {
    pub counters: Counters,
    /// Stopped by a signal rather than by the end of a bounded input.
    pub interrupted: bool,
    pub storage: crate::storage::Location,
    /// Per-topic table of this run's stories, most negative first.
    pub topics: String,
}

/// Finishes and checkpoints in-flight work before partitions are taken away.
struct Rebalancer {
    core: Arc<Mutex<Core>>,
    failure: Mutex<Option<PipelineError>>,
    closing: AtomicBool,
}

impl GroupHandler for Rebalancer {
    fn revoking(&self, partitions: &[(String, i32)], lost: bool) -> Offsets {
        if self.closing.load(Ordering::SeqCst) {
            // The final checkpoint and commit have already been made.
            return Offsets::new();
        }
        let mut core = lock(&self.core);
        if lost && core.polls.is_some() {
            let e = PipelineError::OutOfGroup(format!("the consumer group took this instance's partitions {partitions:?} while it was out of touch"));
            tracing::error!(error = %e, "not checkpointing");
            lock(&self.failure).get_or_insert(e);
            return Offsets::new();
        }
        tracing::info!("finishing and checkpointing in-flight stories before the partitions move");
        let result = core.drain(None).and_then(|_| core.checkpoint());
        core.revoked(partitions);
        match result {
            Ok(offsets) => offsets,
            Err(e) => {
                tracing::error!(error = %e, "checkpoint before revocation failed; not committing");
                lock(&self.failure).get_or_insert(e);
                Offsets::new()
            }
        }
    }

    fn committed(&self, partitions: &[(String, i32)]) {
        lock(&self.core).forget(partitions);
    }

    fn assigned(&self, partitions: &[(String, i32)]) {
        if let Err(e) = lock(&self.core).assigned(partitions) {
            tracing::error!(error = %e, "cannot take over the assigned partitions' state; stopping before counting any of their stories");
            lock(&self.failure).get_or_insert(e);
        }
    }

    fn log_ends(&self, ends: &[((String, i32), i64)]) {
        let mut core = lock(&self.core);
        for ((topic, partition), end) in ends {
            core.log_ends_at(topic, *partition, *end);
        }
    }

    fn read_to_end(&self, partitions: &[((String, i32), bool)]) {
        let mut core = lock(&self.core);
        for ((topic, partition), at_end) in partitions {
            core.set_read_to_end(topic, *partition, *at_end);
        }
    }
}

/// A relative path that is missing here is looked up in the source tree, so that the embedded demo
/// finds its bundled data from any working directory.
pub fn bundled(path: &Path) -> PathBuf {
    if path.is_relative() && !path.exists() {
        let in_tree = Path::new(env!("CARGO_MANIFEST_DIR")).join(path);
        if in_tree.exists() {
            return in_tree;
        }
    }
    path.to_path_buf()
}

/// A Prometheus recorder for `/metrics`; latency histograms get buckets from 1 ms to 10 s.
fn prometheus_recorder() -> Option<metrics_exporter_prometheus::PrometheusHandle> {
    let buckets = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];
    let builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .set_buckets_for_metric(metrics_exporter_prometheus::Matcher::Suffix("_seconds".into()), &buckets)
        .and_then(|b| b.set_buckets(&[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0]));
    match builder.map(|b| b.install_recorder()) {
        Ok(Ok(handle)) => {
            crate::telemetry::describe();
            Some(handle)
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "no /metrics: a metrics recorder is already installed");
            None
        }
        Err(e) => {
            tracing::warn!(error = %e, "no /metrics: bad histogram buckets");
            None
        }
    }
}

/// Explains alert headlines with the pipeline's classifier: each headline's variants are one group,
/// all of an alert's groups queued before the first is awaited.
pub(super) fn explainer(classifier: Classifier) -> crate::alert::Explainer {
    Box::new(move |texts: &[&str]| {
        let pending: Vec<_> = texts.iter().map(|text| classifier.explain_now(text)).collect();
        pending
            .into_iter()
            .map(|p| match p.and_then(|p| p.wait()) {
                Ok(explained) => explained.why,
                Err(e) => {
                    tracing::warn!(error = %e, "an alert headline could not be explained; it is sent without its words");
                    Vec::new()
                }
            })
            .collect()
    })
}

/// The topics feedback may name: the configured model's, also in a role that runs no model.
/// How the windows fold copies under `config` with a model of near-duplicate rule `near`.
pub(crate) fn folding(config: &PipelineConfig, near: Option<crate::classify::NearDuplicates>) -> Option<crate::window::Folding> {
    config.window.fold_copies.then_some(crate::window::Folding { near })
}

/// [`folding`] with the rule of the configured model, for replays of stored stories (a model
/// folder that does not load folds exact copies only).
pub(crate) fn stored_folding(config: &PipelineConfig) -> Option<crate::window::Folding> {
    folding(config, ModelSpec::load(&config.model.model_dir()).ok().and_then(|spec| spec.near_duplicates))
}

/// `bearwatch feedback queue`: the review queue over `config`'s storage, its topic rule's band
/// and its model's near-duplicate rule, as the HTTP endpoint builds it for a running pipeline.
pub fn review_queue(config: &PipelineConfig, limit: usize, hours: u32) -> Result<Vec<crate::sql::queue::QueueItem>, PipelineError> {
    let rules = backtest::load_rules(&config.alerts.rules)?.rules;
    let near_duplicates = ModelSpec::load(&config.model.model_dir()).ok().and_then(|spec| spec.near_duplicates);
    let options = crate::sql::queue::QueueOptions { limit, hours, near_duplicates };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| PipelineError::Sql(crate::sql::SqlError::Execution(e.to_string())))?;
    let limits = config.server.query_limits();
    let location = config.storage.location()?;
    Ok(runtime.block_on(async { crate::sql::queue::review_queue(&crate::sql::context(&location, limits, None)?, &rules, &options).await })?)
}

/// Whether the pipeline's rule files load and fit its receivers and windows (`rules check
/// --pipeline`): what a start and a reload check.
pub fn check_rule_files(config: &PipelineConfig) -> Result<(), PipelineError> {
    load_rule_files(config).map(drop)
}

/// The pipeline's `[alerts] rules` files, bundled ones found where the binary's files are.
pub fn rule_paths(config: &PipelineConfig) -> Vec<PathBuf> {
    config.alerts.rules.iter().map(|path| bundled(path)).collect()
}

/// Reads the rule files and checks them against the pipeline (receivers, windows), as a start does
/// and a reload does again; with the SHA-256 of the bytes read, which each verdict records as the
/// rules it judged.
fn load_rule_files(config: &PipelineConfig) -> Result<(RuleFile, String), PipelineError> {
    let paths = rule_paths(config);
    let (files, sha256) = RuleFile::read_all(&paths)?;
    for (path, file) in paths.into_iter().zip(&files) {
        for route in &file.routes {
            for receiver in &route.receivers {
                if !config.receivers.iter().any(|r| &r.name == receiver) {
                    return Err(PipelineError::Config(ConfigError::Read {
                        path,
                        reason: format!("a route sends to receiver `{receiver}`, which the pipeline's [[receivers]] do not define"),
                    }));
                }
            }
        }
        let ticker_windows = config.window.group_by.contains(&crate::window::GroupBy::Ticker);
        if let Some(rule) = file.rules.iter().find(|r| r.group == crate::detect::rules::GroupKind::Ticker && !ticker_windows) {
            return Err(PipelineError::Config(ConfigError::Read {
                path,
                reason: format!(
                    "rule `{}` has group = \"ticker\", but the windows are not per ticker: add `group_by = [\"topic\", \"ticker\"]` to [window]",
                    rule.name
                ),
            }));
        }
    }
    let all = RuleFile::merge(files);
    tracing::info!(rules = all.rules.len(), routes = all.routes.len(), silences = all.silences.len(), "alert rules loaded");
    Ok((all, sha256))
}

/// A sender for each receiver that sends somewhere (all but `log`).
fn senders(config: &PipelineConfig) -> Result<notify::Senders, PipelineError> {
    let dashboard = config.server.http.as_ref().map(|listen| format!("http://{}", listen.as_str()));
    let mut senders = notify::Senders::new();
    for receiver in config.receivers.iter().filter(|r| r.kind != ReceiverKind::Log) {
        let sender = notify::notifier(receiver, config.source.connection(), dashboard.as_deref()).map_err(|reason| {
            PipelineError::Config(ConfigError::Invalid {
                file: config.file.as_ref().map_or("pipeline".into(), |f| f.path.display().to_string()),
                line: 0,
                column: 0,
                field: format!("receivers.{}", receiver.name),
                message: reason,
            })
        })?;
        senders.insert(receiver.name.clone(), sender);
    }
    Ok(senders)
}

/// The notifier thread over the outbox, which keeps what an earlier run left pending.
fn start_notifier(config: &PipelineConfig, senders: notify::Senders, silences: Silences) -> Result<notify::Notifier, AlertError> {
    let outbox = Outbox::open(&config.storage.local_dir().join("outbox.jsonl"))?;
    let pending = outbox.pending().count();
    if pending > 0 {
        tracing::info!(pending, "notifications pending from an earlier run will be retried");
    }
    Ok(notify::Notifier::start(outbox, senders, silences))
}

/// The alerting stage and the hash of the rule files it loaded (see [`load_rule_files`]).
fn alerting(config: &PipelineConfig, silences: &SilenceStore) -> Result<Option<(Alerting, String)>, PipelineError> {
    if config.alerts.rules.is_empty() {
        return Ok(None);
    }
    let (all, sha256) = load_rule_files(config)?;
    let router = Router::new(all.routes, Silences::new(all.silences, Some(silences.clone())));
    let senders = senders(config)?;
    let notifier = if senders.is_empty() { None } else { Some(start_notifier(config, senders, router.silences().clone())?) };
    Ok(Some((Alerting::new(Detector::new(all.rules), router, &config.receivers, notifier), sha256)))
}

/// How often the live summary repeats itself while nothing arrives (every `summary_interval` otherwise).
const IDLE_SUMMARY_EVERY: Duration = Duration::from_secs(60);

/// What a reload read, all of it checked, before any of it is put in force.
struct ReadAgain {
    /// The pipeline file as it is now (none for the demo's embedded one).
    fresh: Option<PipelineConfig>,
    files: RuleFile,
    sha256: String,
    /// The fresh file's receivers' senders.
    senders: Option<notify::Senders>,
}

/// Where reloads of the rule files (and the pipeline file's receivers and tokens) are asked for:
/// SIGHUP sets the flag, `POST /api/rules/reload` sends a request and waits for the answer. The pipeline
/// thread takes both between reads, so a reload never lands between a window's rows.
struct Reloads {
    signal: Arc<AtomicBool>,
    requests: std::sync::mpsc::Receiver<ReloadRequest>,
    in_force: InForce,
    /// The API's tokens, which the pipeline file's `[server] users` and `auth_token` give.
    principals: Principals,
}

impl Reloads {
    fn poll(&self, config: &PipelineConfig, core: &mut Core) {
        if self.signal.swap(false, Ordering::SeqCst) {
            tracing::info!("SIGHUP: reading the rule files and the pipeline file's receivers and tokens again");
            let _ = self.reload(config, core);
        }
        while let Ok(answer) = self.requests.try_recv() {
            let _ = answer.send(self.reload(config, core));
        }
    }

    /// Puts the rule files, and the pipeline file's `[[receivers]]`, `[alerts] rules` and `[server]`
    /// tokens, in force as they are now, or keeps those in force and says why. Nothing is applied
    /// unless all of it checks. Where no stage evaluates rules (role classify, or a pipeline started
    /// without them), the rules are still what verdicts are given against, and the tokens still guard
    /// the API: a leaked token is revoked without a restart in every role.
    fn reload(&self, config: &PipelineConfig, core: &mut Core) -> Result<Reloaded, String> {
        let evaluates = core.alerting.is_some();
        let result = Self::read_again(config, evaluates).and_then(|ReadAgain { fresh, files, sha256, senders }| {
            let checked = fresh.as_ref().unwrap_or(config);
            let (rules, routes, silences, receivers) = (files.rules.clone(), files.routes.len(), files.silences.len(), checked.receivers.len());
            let count = rules.len();
            // Rules first: alerts of rules gone resolve through the receivers they fired to.
            let resolved = core.reload_rules(files).unwrap_or(0);
            if let (Some(fresh), Some(senders), Some(alerting)) = (&fresh, senders, core.alerting.as_mut()) {
                alerting.replace_receivers(&fresh.receivers, senders, |senders, silences| start_notifier(config, senders, silences)).map_err(|e| e.to_string())?;
            }
            if let Some(fresh) = &fresh {
                self.principals.replace(fresh.server.principals());
            }
            let hash = (!checked.alerts.rules.is_empty()).then_some(sha256);
            self.in_force.replace(rules, hash.clone());
            Ok(Reloaded { rules: count, routes, silences, receivers, resolved, rules_hash: hash })
        });
        let outcome = if result.is_ok() { "reloaded" } else { "refused" };
        metrics::counter!("bearwatch_rules_reloads_total", "outcome" => outcome).increment(1);
        metrics::gauge!("bearwatch_rules_last_reload_successful").set(if result.is_ok() { 1.0 } else { 0.0 });
        match &result {
            Ok(r) => tracing::info!(rules = r.rules, routes = r.routes, silences = r.silences, receivers = r.receivers, resolved = r.resolved, "rule files and receivers reloaded"),
            Err(why) => {
                tracing::error!(error = %why, "reload refused; the rules and receivers before stay in force");
                self.in_force.refuse(crate::telemetry::one_line(why));
            }
        }
        result
    }

    /// The pipeline file read again (none for the demo's embedded one), checked to differ from the
    /// running one only in what a reload takes ([`config::ConfigFile::changed_beyond_reload`]), with
    /// its receivers' senders where rules are evaluated; and the rule files it names, checked
    /// against those receivers.
    fn read_again(config: &PipelineConfig, evaluates: bool) -> Result<ReadAgain, String> {
        let fresh = match &config.file {
            None => None,
            Some(file) => {
                let fresh = PipelineConfig::load(&file.path).map_err(|e| e.to_string())?;
                let changed = fresh.file.as_ref().map(|f| file.changed_beyond_reload(&f.table)).unwrap_or_default();
                if !changed.is_empty() {
                    return Err(format!(
                        "{}: {} changed since the start, and a reload reads only [[receivers]], [alerts] rules, [server] users \
                         and auth_token, and the rule files again: restart to apply it, or undo it; nothing was reloaded",
                        file.path.display(),
                        changed.join(", ")
                    ));
                }
                // An API with tokens does not become open by a reload, nor the other way round: what
                // listens where was checked at the start for the one or the other.
                if fresh.server.is_open() != config.server.is_open() {
                    return Err(format!(
                        "{}: [server] would go from {} by this reload: restart to apply it, or undo it; nothing was reloaded",
                        file.path.display(),
                        if config.server.is_open() { "no tokens (an open API) to tokens" } else { "tokens to none (an open API)" }
                    ));
                }
                // The alerting stage (its notifier, its outbox) is built at the start or not at all.
                if !evaluates && config.run.role != Role::Classify && !fresh.alerts.rules.is_empty() {
                    return Err(format!(
                        "{}: [alerts] rules were added to a pipeline started without rules: restart to start evaluating them, \
                         or undo it; nothing was reloaded",
                        file.path.display()
                    ));
                }
                Some(fresh)
            }
        };
        let checked = fresh.as_ref().unwrap_or(config);
        let (files, sha256) = load_rule_files(checked).map_err(|e| e.to_string())?;
        let senders = fresh.as_ref().filter(|_| evaluates).map(senders).transpose().map_err(|e| e.to_string())?;
        Ok(ReadAgain { fresh, files, sha256, senders })
    }
}

/// Runs until the input ends (file) or `stop` is set (SIGINT/SIGTERM), then drains, checkpoints and
/// commits. Setting `reload` (SIGHUP) reads the rule files again.
pub fn run(config: &PipelineConfig, stop: Arc<AtomicBool>, reload: Arc<AtomicBool>) -> Result<RunOutcome, PipelineError> {
    tracing::debug!(?config, "effective configuration");
    // Installed first, so that every stage's metrics from the start are recorded.
    let metrics = config.server.http.as_ref().and_then(|_| prometheus_recorder());
    let ready = Arc::new(AtomicBool::new(false));
    let role = config.run.role;
    tracing::info!(role = ?role, "starting");
    let location = config.storage.location()?;
    if let Some(local) = &config.storage.local_path {
        std::fs::create_dir_all(local).map_err(|e| crate::storage::StorageError::Io { path: local.clone(), reason: e.to_string() })?;
    }
    // Classify instances keep no state and share one config; the others hold their local folder.
    let _hold = match role {
        Role::Classify => None,
        Role::All | Role::Aggregate => Some(crate::storage::hold(config.storage.local_dir())?),
    };
    let _instance_hold = match (role, config.storage.instance()) {
        (Role::All | Role::Aggregate, Some(instance)) => crate::storage::hold_instance(&location, instance)?,
        _ => None,
    };
    let (storage, restored) = match role {
        Role::Classify => (None, None),
        Role::All | Role::Aggregate => {
            let (storage, restored) = Storage::open::<Checkpoint>(&location, config.storage.instance(), config.storage.reset_on_start)?;
            (Some(storage), restored)
        }
    };
    if let Some(checkpoint) = &restored {
        tracing::info!(written_at = %checkpoint.written_at, scored = checkpoint.counters.scored, "resuming from checkpoint");
    }
    let (classifier, serving_warning) = match role {
        Role::Aggregate => (None, None),
        Role::All | Role::Classify => {
            let (classifier, warning) = start_serving(config, &location)?;
            (Some(classifier), warning)
        }
    };
    let serves = classifier.is_some();
    let source_config = &config.source;
    let kafka_output = match (&source_config.brokers, source_config.kind) {
        (Some(brokers), SourceKind::Kafka) => Some(Arc::new(Output::connect(brokers.as_str(), &source_config.properties)?)),
        _ => None,
    };
    let dead_letter = match (&kafka_output, source_config.kind) {
        (Some(output), _) => DeadLetter::topic(output.clone(), source_config.dead_letter_topic.clone()),
        (None, _) => {
            let path = source_config.dead_letter_path.clone().unwrap_or_else(|| config.storage.local_dir().join("dead-letter.jsonl"));
            DeadLetter::file(&path)?
        }
    };
    let sink = match &config.sink {
        None => None,
        Some(sink) => {
            let output = match (&sink.brokers, &kafka_output) {
                // The source's own producer, where the sink adds nothing to its connection.
                (None, Some(output)) if sink.properties.is_empty() => output.clone(),
                _ => {
                    let (brokers, properties) =
                        output_connection(sink.brokers.as_ref(), &sink.properties, source_config.connection()).expect("validated: sink has brokers");
                    Arc::new(Output::connect(&brokers, &properties)?)
                }
            };
            Some(ScoredSink { output, topic: sink.topic.clone() })
        }
    };
    let limits = Limits {
        max_message_bytes: source_config.max_message_bytes,
        max_clock_skew_ms: source_config.max_clock_skew.as_millis(),
        body_chars: config.model.body_chars,
        dedup_horizon_ms: config.window.dedup_horizon.as_millis(),
        dedup_max_ids: config.window.dedup_max_ids,
        evaluate_every_ms: config.alerts.evaluate_every.as_millis(),
    };
    let mut windows = WindowState::new(WindowSpec::from_config(&config.window));
    windows.fold_copies(folding(config, classifier.as_ref().and_then(|c| c.spec().near_duplicates)));
    let silences = SilenceStore::open(&config.storage.local_dir().join("silences.json"))?;
    let (alerting, rules_hash) = match (role, &classifier) {
        (Role::Classify, _) => (None, None),
        (Role::All, Some(classifier)) => alerting(config, &silences)?.map(|(a, hash)| (a.with_explainer(explainer(classifier.clone())), hash)).unzip(),
        (Role::All | Role::Aggregate, _) => alerting(config, &silences)?.unzip(),
    };
    let in_force = match &alerting {
        Some(alerting) => InForce::new(alerting.detector.rules().to_vec(), rules_hash),
        None if config.alerts.rules.is_empty() => InForce::new(Vec::new(), None),
        // Rules no stage here evaluates (role classify) are still what verdicts are given against,
        // checked as a reload checks them: a file a reload would refuse stops the start.
        None => {
            let (all, sha256) = load_rule_files(config)?;
            InForce::new(all.rules, Some(sha256))
        }
    };
    let (reload_requests, requests) = std::sync::mpsc::channel();
    let principals = Principals::new(config.server.principals());
    let reloads = Reloads { signal: reload, requests, in_force: in_force.clone(), principals: principals.clone() };
    metrics::gauge!("bearwatch_rules_last_reload_successful").set(1.0);
    let live = (config.server.http.is_some() || config.server.postgres.is_some()).then(|| Arc::new(LiveRows::new(config.storage.instance().map(str::to_string))));
    let _postgres = match (&config.server.postgres, &config.server.postgres_password) {
        (Some(addr), Some(password)) => {
            let ctx = crate::sql::context(&location, config.server.query_limits(), live.clone())?;
            Some(crate::sql::postgres::serve(addr.as_str(), ctx, config.server.postgres_user.as_str(), password.as_str())?)
        }
        _ => None,
    };
    let outage = Arc::new(crate::storage::Outage::default());
    let trouble = Arc::new(crate::source::Trouble::default());
    let _server = match &config.server.http {
        Some(addr) => {
            let sql = SqlService {
                storage: location.clone(),
                limits: config.server.query_limits(),
                live: live.clone(),
            };
            let ops = Ops { metrics, ready: ready.clone(), warning: serving_warning.clone(), storage: outage.clone(), source: trouble.clone() };
            // The model's topics (what topic labels may name) and its near-duplicate rule (the review queue's).
            let spec = ModelSpec::load(&config.model.model_dir()).ok();
            let feedback = FeedbackService::new(location.clone(), spec.as_ref().map(|s| s.topics.clone()).unwrap_or_default(), in_force.clone());
            let web = WebPolicy::new(addr.as_str(), &config.server.allowed_hosts, &config.server.allowed_origins);
            if config.server.is_open() && !crate::net::is_loopback(addr.as_str()) {
                tracing::warn!(addr = addr.as_str(), "the API is open (no auth_token or users) on a non-loopback address: anyone who reaches it is an admin (allow_open = true)");
            }
            let near_duplicates = spec.and_then(|spec| spec.near_duplicates);
            let api = Api { principals, silences, sql, ops, feedback, web, rules: in_force.clone(), reload: reload_requests.clone(), near_duplicates };
            Some(Server::start(addr.as_str(), api)?)
        }
        None => None,
    };
    let corrections = match role {
        Role::Classify => None,
        Role::All | Role::Aggregate => {
            // Near-duplicates need the model's reading of each corrected text, and the model's rule.
            let rule = classifier.as_ref().and_then(|c| c.spec().near_duplicates).filter(|_| config.feedback.near_duplicates);
            tracing::info!(near_duplicates = ?rule, "label corrections act on the windows");
            Some(Corrections::new(&config.feedback, &location, rule))
        }
    };
    let core =
        Arc::new(Mutex::new(Core::new(role, classifier, limits, windows, storage, dead_letter, sink, alerting, corrections, restored)?));
    lock(&core).live = live;
    {
        let mut core = lock(&core);
        core.stop = stop.clone();
        core.outage = outage;
        core.checkpoint_every = config.storage.checkpoint_interval.0;
    }
    if serves {
        let mut core = lock(&core);
        // The folder serving, as the alias rows name folders: canonical.
        let dir = core.classifier_dir().map(|d| std::fs::canonicalize(&d).unwrap_or(d).display().to_string());
        core.model_watch = Some(core::ModelWatch {
            storage: location.clone(),
            serving: dir,
            config: config.model.clone(),
            failed: Default::default(),
            last_poll: None,
            files: 0,
        });
        // A challenger set before the start shadows from the first story.
        core.poll_models()?;
    }
    let rebalancer = Arc::new(Rebalancer { core: core.clone(), failure: Mutex::new(None), closing: AtomicBool::new(false) });

    let mut source: Box<dyn Source> = match source_config.kind {
        SourceKind::File => {
            let path = bundled(source_config.path.as_deref().expect("validated: file source has a path"));
            let name = crate::source::file::source_name(&path);
            let mut core = lock(&core);
            // Checkpoints from before canonical names kept the path as written.
            let written = path.display().to_string();
            let start = core.offset(&name, 0).or_else(|| core.offset(&written, 0));
            let file = FileSource::open(&path, source_config.pace(), start.map(|s| (s, core.files.get(&name))))?;
            tracing::info!(file = %path.display(), stories = file.len(), resume_at = start.unwrap_or(0), "replaying file");
            core.files.insert(name.clone(), file.progress().clone());
            core.rename_source(&written, &name);
            Box::new(file)
        }
        SourceKind::Kafka => {
            let source_brokers = source_config.brokers.as_ref().expect("validated");
            // Role `aggregate` reads what `classify` instances publish, in a group of its own, on
            // the cluster they publish to: the sink's brokers and properties where it names them.
            let (group_id, topics, brokers, properties) = match (role, &config.sink) {
                (Role::Aggregate, Some(sink)) => {
                    let (brokers, properties) = match &sink.brokers {
                        Some(brokers) => (brokers, &sink.properties),
                        None => (source_brokers, &source_config.properties),
                    };
                    (config.aggregate_group_id(), vec![sink.topic.clone()], brokers, properties)
                }
                _ => (source_config.group_id.as_ref().expect("validated").as_str().to_string(), source_config.topics.clone(), source_brokers, &source_config.properties),
            };
            tracing::info!(group_id, ?topics, "joining the consumer group");
            // Instances that share a storage take each other's partitions from their checkpoints:
            // one that may have been put out of the group must not commit after the taker read.
            // (Role `classify` keeps no checkpoint there: the group's offsets are its state.)
            let polls = (config.storage.instance().is_some() && role != Role::Classify).then(|| Arc::new(crate::source::kafka::Polls::new(properties)));
            if let Some(polls) = &polls {
                // A commit begun inside the bound may take three request timeouts on object storage.
                let commit_may_take = config.storage.s3.timeout.0 * 3;
                if matches!(location, crate::storage::Location::Bucket(_)) && commit_may_take >= polls.interval() / 2 {
                    tracing::warn!(
                        commit_may_take = ?commit_may_take,
                        max_poll_interval = ?polls.interval(),
                        "storage.s3.timeout is long for max.poll.interval.ms: a checkpoint is committed only within half of the poll interval, and one that takes longer to land than the other half may count stories twice if the group moves partitions meanwhile; lower storage.s3.timeout or raise max.poll.interval.ms"
                    );
                }
                lock(&core).polls = Some(polls.clone());
            }
            Box::new(KafkaSource::subscribe(
                brokers.as_str(),
                properties,
                &group_id,
                &topics,
                source_config.start_offset,
                rebalancer.clone(),
                trouble,
                polls,
            )?)
        }
    };

    let result = drive(config, &core, &rebalancer, source.as_mut(), &stop, &ready, &reloads);
    rebalancer.closing.store(true, Ordering::SeqCst);
    drop(source);
    let interrupted = result?;
    if !interrupted && config.run.keep_serving && (_server.is_some() || _postgres.is_some()) {
        tracing::info!("input finished; still serving the dashboard, SQL and metrics until Ctrl-C");
        // Judgements still act on the kept closed windows.
        while !stop.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            let mut core = lock(&core);
            reloads.poll(config, &mut core);
            if core.poll_feedback()? || !core.alerting.as_ref().is_none_or(|a| a.changes.is_empty()) {
                core.checkpoint()?;
            }
            core.poll_models()?;
            core.publish_live()?;
        }
    }
    let core = lock(&core);
    Ok(RunOutcome {
        counters: core.counters.clone(),
        interrupted,
        storage: location,
        topics: if core.counters.scored > 0 { summary::final_table(&core.recent) } else { String::new() },
    })
}

/// Starts the model of the `champion` alias when a model was promoted in this storage (`bearwatch
/// model promote`): the alias decides what serves, not the file. A champion that cannot load (a
/// folder changed or lost since its promotion) does not stop the pipeline: the newest earlier
/// champion that loads serves, else `[model]`, and the returned warning says so (logged, counted in
/// `bearwatch_model_champion_unloadable`, and shown by `/ready`).
pub(super) fn start_serving(config: &PipelineConfig, location: &crate::storage::Location) -> Result<(Classifier, Option<String>), PipelineError> {
    let history = crate::learn::registry::champion_history(location)?;
    let Some(champion) = history.last() else { return Ok((Classifier::start(&config.model)?, None)) };
    let mut tried = std::collections::BTreeSet::new();
    let mut failures = Vec::new();
    for row in history.iter().rev().filter(|row| tried.insert(row.path.clone())) {
        let model = crate::classify::ClassifierConfig { path: Some(PathBuf::from(&row.path)), ..config.model.clone() };
        match crate::learn::registry::load_checked(&model, std::path::Path::new(&row.path)) {
            Ok(classifier) if failures.is_empty() => {
                tracing::info!(model = %row.model, path = %row.path, set_by = %row.set_by, "serving the champion alias");
                return Ok((classifier, None));
            }
            Ok(classifier) => return Ok((classifier, Some(fell_back(champion, &failures, &row.model)))),
            Err(e) => failures.push(format!("{} ({}): {e}", row.model, row.path)),
        }
    }
    let classifier = Classifier::start(&config.model)?;
    let configured = classifier.spec().id().to_string();
    Ok((classifier, Some(fell_back(champion, &failures, &configured))))
}

fn fell_back(champion: &crate::learn::registry::AliasRow, failures: &[String], serving: &str) -> String {
    let warning = format!("the champion {} cannot load, so {serving} serves instead: {}; roll back or promote a model that loads", champion.model, failures.join("; "));
    tracing::error!("{warning}");
    metrics::gauge!("bearwatch_model_champion_unloadable").set(1.0);
    warning
}

/// The loop. Returns whether it was interrupted.
fn drive(
    config: &PipelineConfig,
    core: &Mutex<Core>,
    rebalancer: &Rebalancer,
    source: &mut dyn Source,
    stop: &AtomicBool,
    ready: &AtomicBool,
    reloads: &Reloads,
) -> Result<bool, PipelineError> {
    let max_in_flight = config.model.max_queued;
    let checkpoint_every = config.storage.checkpoint_interval.0;
    let summary_every = config.run.summary_interval.0;
    let started = (Instant::now(), lock(core).counters.scored);
    let mut last_summary = Instant::now();
    // What the last line said and when it was printed: an idle feed repeats it only once a minute.
    let mut summarized: Option<(Counters, Instant)> = None;
    let mut last_publish = Instant::now();
    let mut saturated = false;
    let mut last_reach = None::<Instant>;
    let interrupted = loop {
        if stop.load(Ordering::SeqCst) {
            break true;
        }
        // Ready (the model is loaded by now) once the source reaches its data; asked every 2 s.
        if !ready.load(Ordering::Relaxed) && last_reach.is_none_or(|t| t.elapsed() >= Duration::from_secs(2)) {
            last_reach = Some(Instant::now());
            if source.connected() {
                ready.store(true, Ordering::SeqCst);
            }
        }
        if let Some(e) = lock(&rebalancer.failure).take() {
            return Err(e);
        }
        let in_flight = {
            let mut core = lock(core);
            core.complete_ready()?;
            // Never more than `max_queued` in flight, so `submit_now` always finds a slot. Reading
            // waits meanwhile, and librdkafka stops fetching once its queue holds
            // `queued.max.messages.kbytes`: memory stays bounded without pausing partitions, which
            // would throw away their prefetched messages and starve whichever come last on resume.
            if core.in_flight() >= max_in_flight && !saturated {
                saturated = true;
                metrics::gauge!("bearwatch_source_paused").set(1.0);
            }
            while core.in_flight() >= max_in_flight {
                core.complete_one()?;
            }
            core.in_flight()
        };
        if saturated && in_flight < max_in_flight / 2 {
            saturated = false;
            metrics::gauge!("bearwatch_source_paused").set(0.0);
        }
        if source.finished() && in_flight == 0 {
            break false;
        }
        let timeout = if in_flight == 0 { Duration::from_millis(100) } else { Duration::ZERO };
        // No lock held here: rebalance callbacks inside `poll` take it.
        let record = if source.finished() { None } else { source.poll(timeout)? };
        // A rebalance inside `poll` that failed: nothing of its partitions may be counted.
        if let Some(e) = lock(&rebalancer.failure).take() {
            return Err(e);
        }
        {
            let mut core = lock(core);
            match record {
                Some(record) => core.accept(record)?,
                // Nothing to read right now: make progress on what is in flight instead.
                None if core.in_flight() > 0 => core.complete_one()?,
                None => {}
            }
            core.poll_feedback()?;
            core.poll_models()?;
            reloads.poll(config, &mut core);
            if core.last_checkpoint.elapsed() >= checkpoint_every
                || core.buffered_rows() >= config.storage.roll_rows
                || core.held_bytes() >= config.storage.roll_bytes
            {
                core.drain(None)?;
                let offsets = core.checkpoint()?;
                drop(core);
                source.commit(&offsets)?;
            }
        }
        // Unflushed rows become queryable within about half a second.
        if last_publish.elapsed() >= Duration::from_millis(500) {
            last_publish = Instant::now();
            lock(core).publish_live()?;
        }
        if !summary_every.is_zero() && last_summary.elapsed() >= summary_every {
            last_summary = Instant::now();
            let core = lock(core);
            if summarized.as_ref().is_none_or(|(counters, at)| *counters != core.counters || at.elapsed() >= IDLE_SUMMARY_EVERY) {
                summarized = Some((core.counters.clone(), Instant::now()));
                crate::telemetry::say(format_args!("{}", summary::live_line(&core.counters, started, &core.windows, &core.recent, &source.describe())));
            }
        }
    };

    let mut core = lock(core);
    let deadline = interrupted.then(|| Instant::now() + config.run.shutdown_timeout.0);
    if interrupted {
        tracing::info!(in_flight = core.in_flight(), "stopping: draining in-flight stories");
    }
    core.drain(deadline)?;
    core.finish_shadow(deadline);
    if !interrupted {
        core.close_all_windows();
    }
    if let Some(alerting) = core.alerting.as_mut() {
        alerting.sum_up_held(true);
    }
    let offsets = core.checkpoint()?;
    // Give due notifications (and their retries) the shutdown budget, then record how they went.
    let pending = core.settle_notifications(Instant::now() + config.run.shutdown_timeout.0);
    if pending > 0 {
        tracing::warn!(pending, "notifications still pending; they are in the outbox and will be retried at the next start");
    }
    let offsets = if core.alerting.is_some() { core.checkpoint()? } else { offsets };
    drop(core);
    source.commit(&offsets)?;
    Ok(interrupted)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;

    use super::*;
    use crate::classify::{Backend, BatchOutput, ModelSpec, PaddedBatch};
    use crate::source::Record;

    /// A model that takes 20 ms per batch (of at most 4), so that the source outruns it even on a
    /// slow, loaded machine (at 2 ms, an AVX2 machine running the suite in parallel never filled the queue).
    struct SlowModel;

    impl Backend for SlowModel {
        fn run(&mut self, batch: &PaddedBatch) -> Result<BatchOutput, ClassifyError> {
            std::thread::sleep(Duration::from_millis(20));
            Ok(BatchOutput { sentiment: [0.2, 0.6, 0.2].repeat(batch.rows), topic: vec![1.0 / 9.0; 9 * batch.rows], embedding: Vec::new() })
        }
    }

    /// Hands out records as fast as asked, like a broker with a backlog, and records how many
    /// stories were in flight whenever it was asked.
    struct Backlog {
        records: VecDeque<Record>,
        core: Arc<Mutex<Core>>,
        in_flight_when_read: Vec<usize>,
    }

    impl Source for Backlog {
        fn poll(&mut self, _timeout: Duration) -> Result<Option<Record>, SourceError> {
            self.in_flight_when_read.push(lock(&self.core).in_flight());
            Ok(self.records.pop_front())
        }
        fn finished(&self) -> bool {
            self.records.is_empty()
        }
        fn commit(&mut self, _offsets: &Offsets) -> Result<(), SourceError> {
            Ok(())
        }
        fn describe(&self) -> String {
            String::new()
        }
    }

    /// A pipeline of role `all` over a Kafka source whose model takes 2 ms per batch, storing in `dir`.
    fn slow_pipeline(dir: &Path) -> (PipelineConfig, Arc<Mutex<Core>>, Rebalancer) {
        let text = format!(
            "[source]\ntype = \"kafka\"\nbrokers = \"unused:9092\"\ntopics = [\"news\"]\ngroup_id = \"g\"\n\
             [model]\nmax_queued = 16\nmax_batch_size = 4\n[storage]\npath = {:?}\n[run]\nsummary_interval = \"0s\"\n",
            dir.display().to_string()
        );
        let config = PipelineConfig::parse(&text, "test.toml").unwrap();
        let spec = ModelSpec::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("models")).unwrap();
        let classifier = Classifier::with_backends(&config.model, spec, vec![SlowModel], "fake").unwrap();
        let (storage, _) = Storage::open::<Checkpoint>(&dir.into(), None, false).unwrap();
        let dead_letter = DeadLetter::file(&dir.join("dead.jsonl")).unwrap();
        let limits = Limits {
            max_message_bytes: 1 << 20,
            max_clock_skew_ms: 0,
            body_chars: 0,
            dedup_horizon_ms: 0,
            dedup_max_ids: 1000,
            evaluate_every_ms: 10_000,
        };
        let windows = WindowState::new(WindowSpec::from_config(&config.window));
        let core = Arc::new(Mutex::new(Core::new(Role::All, Some(classifier), limits, windows, Some(storage), dead_letter, None, None, None, None).unwrap()));
        let rebalancer = Rebalancer { core: core.clone(), failure: Mutex::new(None), closing: AtomicBool::new(false) };
        (config, core, rebalancer)
    }

    fn story(i: i64) -> Record {
        let payload = format!(r#"{{"id":"s{i}","published_at":"2024-01-01T00:{:02}:00Z","headline":"Story {i}"}}"#, i % 60);
        Record { topic: Arc::from("news"), partition: 0, offset: i, payload: payload.into_bytes(), from_kafka: true, cut_from: None }
    }

    #[test]
    fn reading_waits_while_the_classifier_is_saturated_and_every_story_still_completes() {
        let dir = tempfile::tempdir().unwrap();
        let (config, core, rebalancer) = slow_pipeline(dir.path());
        let mut source = Backlog { records: VecDeque::new(), core: core.clone(), in_flight_when_read: Vec::new() };
        source.records.extend((0..300).map(story));

        let reloads = Reloads { signal: Default::default(), requests: std::sync::mpsc::channel().1, in_force: InForce::default(), principals: Principals::default() };
        let interrupted = drive(&config, &core, &rebalancer, &mut source, &AtomicBool::new(false), &AtomicBool::new(false), &reloads).unwrap();
        assert!(!interrupted);
        // Reads happened with the queue full but never past it (max_queued = 16).
        assert_eq!(source.in_flight_when_read.iter().max(), Some(&15), "{:?}", source.in_flight_when_read);
        let core = lock(&core);
        assert_eq!(core.counters.scored, 300);
        assert_eq!(core.offset("news", 0), Some(300));
    }

    /// An instance sharing its storage that may have been put out of the group commits nothing more:
    /// not when Kafka says its partitions were lost, nor once half of `max.poll.interval.ms` passed
    /// since it last polled. Either ends the run; the checkpoint stays the last one committed.
    #[test]
    fn an_instance_that_may_be_out_of_its_group_commits_nothing() {
        let polls = |ms: &str| {
            let properties = std::collections::BTreeMap::from([("max.poll.interval.ms".to_string(), crate::config::EnvString::expand(ms).unwrap())]);
            Some(Arc::new(crate::source::kafka::Polls::new(&properties)))
        };
        let committed = |dir: &Path| {
            let bytes = crate::storage::checkpoint(&dir.into(), None).unwrap()?;
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap()["counters"]["scored"].as_u64()
        };
        let partitions = [("news".to_string(), 0)];

        // Partitions lost: the revocation neither checkpoints nor hands back offsets to commit.
        let dir = tempfile::tempdir().unwrap();
        let (_, core, rebalancer) = slow_pipeline(dir.path());
        {
            let mut core = lock(&core);
            core.polls = polls("300000");
            core.accept(story(0)).unwrap();
            core.drain(None).unwrap();
        }
        assert!(rebalancer.revoking(&partitions, true).is_empty());
        let failure = lock(&rebalancer.failure).take().expect("the run ends");
        assert!(matches!(failure, PipelineError::OutOfGroup(_)) && !failure.retryable(), "{failure:?}");
        assert!(failure.to_string().contains("nothing more is committed here"), "{failure}");
        assert_eq!(committed(dir.path()), None);
        // Revoked in the ordinary way, the same instance checkpoints first.
        assert_eq!(rebalancer.revoking(&partitions, false).get("news").and_then(|p| p.get(&0)), Some(&1));
        assert_eq!(committed(dir.path()), Some(1));

        // No poll for more than half the interval: the checkpoint is refused, the one before stays.
        let dir = tempfile::tempdir().unwrap();
        let (_, core, _) = slow_pipeline(dir.path());
        let mut core = lock(&core);
        core.accept(story(0)).unwrap();
        core.drain(None).unwrap();
        core.checkpoint().unwrap();
        core.polls = polls("100");
        core.accept(story(1)).unwrap();
        core.drain(None).unwrap();
        std::thread::sleep(Duration::from_millis(60));
        let refused = core.checkpoint().unwrap_err();
        assert!(refused.to_string().contains("did not poll Kafka for") && refused.to_string().contains("max.poll.interval.ms (100 ms)"), "{refused}");
        assert_eq!(committed(dir.path()), Some(1));
    }

    /// A checkpoint is written from borrows of the running state (`CheckpointView`) and read back as
    /// a `Checkpoint`: the same fields, or a restart would lose what the view leaves out.
    #[test]
    fn a_checkpoint_reads_back_as_it_was_written() {
        let dir = tempfile::tempdir().unwrap();
        let (_, core, _) = slow_pipeline(dir.path());
        let mut core = lock(&core);
        for i in 0..10 {
            core.accept(story(i)).unwrap();
        }
        core.drain(None).unwrap();
        core.checkpoint().unwrap();
        let written = serde_json::to_value(core.view()).unwrap();
        let read: Checkpoint = serde_json::from_value(written.clone()).unwrap();
        assert_eq!(serde_json::to_value(&read).unwrap(), written);
        assert_eq!((read.counters.scored, read.offsets["news"][&0]), (10, 10));
        let file: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.path().join("checkpoint.json")).unwrap()).unwrap();
        let as_text: serde_json::Value = serde_json::from_str(&serde_json::to_string(&core.view()).unwrap()).unwrap();
        assert_eq!(file["windows"], as_text["windows"], "the file holds what the view says");
    }
}
