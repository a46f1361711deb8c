//! Typed pipeline configuration (`pipelines/*.toml`, DESIGN §5).
//!
//! Every section denies unknown fields. Errors name the file, line, column and field, and exit 2.

mod duration;
mod env;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use duration::HumanDuration;
pub use env::EnvString;

use crate::alert::ReceiverConfig;
use crate::classify::{ClassifierConfig, ClassifyError};
use crate::error::{Classified, ErrorClass};

/// The demo pipeline, compiled in so that `bearwatch run` works with no arguments and no files.
pub const DEMO_PIPELINE: &str = include_str!("../../pipelines/demo.toml");
pub const DEMO_PIPELINE_NAME: &str = "pipelines/demo.toml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("{file}:{line}:{column}: `{field}`: {message}")]
    Invalid { file: String, line: usize, column: usize, field: String, message: String },
}

impl Classified for ConfigError {
    fn class(&self) -> ErrorClass {
        ErrorClass::User
    }
    fn retryable(&self) -> bool {
        false
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PipelineConfig {
    pub source: SourceConfig,
    #[serde(default)]
    pub model: ClassifierConfig,
    #[serde(default)]
    pub window: WindowConfig,
    pub storage: StorageConfig,
    /// Publishes every scored story to a Kafka topic (`news.scored`), keyed by topic.
    pub sink: Option<SinkConfig>,
    #[serde(default)]
    pub run: RunConfig,
    #[serde(default)]
    pub alerts: AlertsConfig,
    #[serde(default)]
    pub receivers: Vec<ReceiverConfig>,
    #[serde(default)]
    pub server: ServerConfig,
}

/// `[server]`: the HTTP API. Off unless `http` is set.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Listen address, e.g. "127.0.0.1:9464" (`${ENV}` expands).
    pub http: Option<EnvString>,
    /// When set, requests need `Authorization: Bearer <token>`.
    pub auth_token: Option<EnvString>,
    /// Longest a query may run, on the HTTP API and the Postgres wire protocol alike.
    #[serde(default = "thirty_seconds")]
    pub query_timeout: HumanDuration,
    /// Memory one query may use for sorts, joins and aggregations, in MiB.
    #[serde(default = "default_query_memory")]
    pub query_memory_mib: usize,
    /// Postgres wire protocol listen address, e.g. "127.0.0.1:5433" (psql, Grafana, drivers).
    pub postgres: Option<EnvString>,
    #[serde(default = "default_postgres_user")]
    pub postgres_user: EnvString,
    /// Required with `postgres`; e.g. "${BEARWATCH_PG_PASSWORD}".
    pub postgres_password: Option<EnvString>,
}

impl ServerConfig {
    pub fn query_limits(&self) -> crate::sql::Limits {
        crate::sql::Limits { memory_bytes: self.query_memory_mib << 20, timeout: self.query_timeout.0 }
    }
}

fn default_postgres_user() -> EnvString {
    EnvString::expand("bearwatch").expect("no references")
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            http: None,
            auth_token: None,
            query_timeout: thirty_seconds(),
            query_memory_mib: default_query_memory(),
            postgres: None,
            postgres_user: default_postgres_user(),
            postgres_password: None,
        }
    }
}

fn thirty_seconds() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(30))
}
fn default_query_memory() -> usize {
    512
}

/// `[alerts]`: the rule files (`alerts/*.toml`) to evaluate on the windows.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlertsConfig {
    #[serde(default, deserialize_with = "env::paths")]
    pub rules: Vec<PathBuf>,
}

/// How a pipeline is split across processes (DESIGN §1): one process, or two roles joined by the
/// `[sink]` topic, each scaled out by its own Kafka consumer group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Every stage in this process.
    All,
    /// Source → classify → `[sink]` topic, keyed by topic. Stateless: no tables, no checkpoint file;
    /// offsets are committed once the scored stories are acknowledged by the broker.
    Classify,
    /// Reads the `[sink]` topic (group `<group_id>-aggregate`) → windows → rules → alerts → tables.
    Aggregate,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    File,
    Kafka,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StartOffset {
    Earliest,
    Latest,
}

/// `[source]`: one struct for both kinds so that errors point at exact lines; `validate` checks
/// that each kind has what it needs.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    #[serde(rename = "type")]
    pub kind: SourceKind,
    /// file: JSON lines of news, replayed in event-time order.
    #[serde(default, deserialize_with = "env::optional_path")]
    pub path: Option<PathBuf>,
    /// file: 0 = as fast as possible; N = N× the pace of the stories' own timestamps.
    #[serde(default)]
    pub speed: f64,
    /// file: where bad lines go; default `<storage.path>/dead-letter.jsonl`.
    #[serde(default, deserialize_with = "env::optional_path")]
    pub dead_letter_path: Option<PathBuf>,
    /// kafka: `bootstrap.servers`.
    pub brokers: Option<EnvString>,
    #[serde(default)]
    pub topics: Vec<String>,
    pub group_id: Option<EnvString>,
    #[serde(default = "default_dead_letter_topic")]
    pub dead_letter_topic: String,
    /// kafka: where a group with no committed offset starts.
    #[serde(default = "default_start_offset")]
    pub start_offset: StartOffset,
    /// kafka: any librdkafka property, passed through (`security.protocol`, `sasl.*`, `ssl.*`, …).
    #[serde(default)]
    pub properties: BTreeMap<String, EnvString>,
    /// Larger messages go to the dead-letter output as `too_large`.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Stories dated further than this past the wall clock are rejected as `timestamp_out_of_range`
    /// (a typo'd year would otherwise push the watermark ahead and close every open window).
    #[serde(default = "default_max_clock_skew")]
    pub max_clock_skew: HumanDuration,
}

fn default_dead_letter_topic() -> String {
    "news.dlq".into()
}
fn default_start_offset() -> StartOffset {
    StartOffset::Earliest
}
fn default_max_message_bytes() -> usize {
    256 * 1024
}
fn default_max_clock_skew() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(3600))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum GroupBy {
    Topic,
    Ticker,
}

/// `[window]`: event-time windows. `slide` < `size` makes hopping windows; equal (the default), tumbling.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WindowConfig {
    pub size: HumanDuration,
    pub slide: Option<HumanDuration>,
    /// The watermark trails the newest event time by this much; windows close when it passes their end.
    pub allowed_lateness: HumanDuration,
    /// `topic` always; add `ticker` for per-ticker rows. An `all` group is always computed.
    pub group_by: Vec<GroupBy>,
    /// Ids are remembered for this long in event time to drop replayed duplicates...
    pub dedup_horizon: HumanDuration,
    /// ...and at most this many of them.
    pub dedup_max_ids: usize,
}

impl Default for WindowConfig {
    fn default() -> Self {
        let d = |s| HumanDuration::parse(s).expect("valid default duration");
        WindowConfig {
            size: d("1h"),
            slide: None,
            allowed_lateness: d("5m"),
            group_by: vec![GroupBy::Topic],
            dedup_horizon: d("1d"),
            dedup_max_ids: 1_000_000,
        }
    }
}

impl WindowConfig {
    pub fn slide(&self) -> HumanDuration {
        self.slide.unwrap_or(self.size)
    }
}

/// `[storage]`: Parquet tables and the checkpoint.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StorageConfig {
    /// `${ENV}` expands, so that several instances can share one file.
    #[serde(deserialize_with = "env::path")]
    pub path: PathBuf,
    /// How often state is checkpointed, tables are flushed and offsets committed.
    #[serde(default = "default_checkpoint_interval")]
    pub checkpoint_interval: HumanDuration,
    /// A checkpoint (and so a new Parquet file) is also taken when this many stories are buffered.
    #[serde(default = "default_roll_rows")]
    pub roll_rows: usize,
    /// Delete earlier tables and checkpoint at start. For demos that replay the same file each run.
    #[serde(default)]
    pub reset_on_start: bool,
}

fn default_checkpoint_interval() -> HumanDuration {
    HumanDuration(std::time::Duration::from_secs(10))
}
fn default_roll_rows() -> usize {
    100_000
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    pub topic: String,
    /// Default: the Kafka source's brokers.
    pub brokers: Option<EnvString>,
    #[serde(default)]
    pub properties: BTreeMap<String, EnvString>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunConfig {
    /// Which stages this process runs (`bearwatch run --role` overrides it).
    pub role: Role,
    /// How often the live summary is printed; "0s" turns it off.
    pub summary_interval: HumanDuration,
    /// Longest a SIGTERM/SIGINT shutdown waits for in-flight stories before checkpointing without them.
    pub shutdown_timeout: HumanDuration,
    /// When a bounded input (a file) ends, keep serving the dashboard, SQL and metrics until
    /// SIGINT/SIGTERM instead of exiting (`bearwatch run --keep-serving`).
    pub keep_serving: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            role: Role::All,
            summary_interval: HumanDuration(std::time::Duration::from_secs(2)),
            shutdown_timeout: HumanDuration(std::time::Duration::from_secs(30)),
            keep_serving: false,
        }
    }
}

impl PipelineConfig {
    pub fn load(path: &Path) -> Result<PipelineConfig, ConfigError> {
        load_with(path, PipelineConfig::parse)
    }

    /// Parses and validates; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<PipelineConfig, ConfigError> {
        let config: PipelineConfig = parse_toml(text, origin)?;
        config.validate().map_err(|(field, message)| invalid_at(text, origin, field, message))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), (&'static str, String)> {
        let s = &self.source;
        match s.kind {
            SourceKind::File => {
                if s.path.is_none() {
                    return Err(("source.path", "a file source needs `path`, the JSON-lines file to replay".into()));
                }
                if !(s.speed >= 0.0 && s.speed.is_finite()) {
                    return Err(("source.speed", "must be 0 (as fast as possible) or a positive speed-up".into()));
                }
            }
            SourceKind::Kafka => {
                if s.brokers.is_none() {
                    return Err(("source.brokers", "a kafka source needs `brokers`, e.g. \"127.0.0.1:9092\"".into()));
                }
                if s.topics.is_empty() {
                    return Err(("source.topics", "a kafka source needs at least one topic".into()));
                }
                if s.group_id.is_none() {
                    return Err(("source.group_id", "a kafka source needs `group_id`".into()));
                }
                for key in ["bootstrap.servers", "group.id", "enable.auto.commit"] {
                    if s.properties.contains_key(key) {
                        return Err(("source.properties", format!("`{key}` is set by bearwatch itself; remove it")));
                    }
                }
            }
        }
        within("source.max_message_bytes", s.max_message_bytes, 1, 64 << 20)?;
        let w = &self.window;
        if w.size.as_millis() <= 0 {
            return Err(("window.size", "must be longer than 0".into()));
        }
        let slide = w.slide().as_millis();
        if slide <= 0 || slide > w.size.as_millis() || w.size.as_millis() % slide != 0 {
            return Err(("window.slide", format!("must be positive, at most `size` ({}), and divide it", w.size)));
        }
        let windows_per_story = w.size.as_millis() / slide;
        if windows_per_story > MAX_WINDOWS_PER_STORY {
            return Err((
                "window.slide",
                format!("`size` / `slide` is {windows_per_story} windows per story; at most {MAX_WINDOWS_PER_STORY} are allowed"),
            ));
        }
        within("window.dedup_max_ids", w.dedup_max_ids, 1, 100_000_000)?;
        if !w.group_by.contains(&GroupBy::Topic) {
            return Err(("window.group_by", "must include \"topic\"".into()));
        }
        if self.storage.checkpoint_interval.as_millis() <= 0 {
            return Err(("storage.checkpoint_interval", "must be longer than 0".into()));
        }
        within("storage.roll_rows", self.storage.roll_rows, 1, 10_000_000)?;
        within("server.query_memory_mib", self.server.query_memory_mib, 1, 1 << 20)?;
        let timeout = self.server.query_timeout.as_millis();
        if !(1..=86_400_000).contains(&timeout) {
            return Err(("server.query_timeout", format!("must be between 1ms and 24h, is {}", self.server.query_timeout)));
        }
        if let Some(sink) = &self.sink
            && sink.brokers.is_none()
            && s.brokers.is_none()
        {
            return Err(("sink.brokers", "needed when the source is not Kafka".into()));
        }
        self.model.validate().map_err(|e| match e {
            ClassifyError::Config { field, reason } => (model_field(field), reason),
            other => ("model", other.to_string()),
        })?;
        self.check_role()?;
        if self.server.postgres.is_some() && self.server.postgres_password.is_none() {
            return Err(("server.postgres_password", "the Postgres listener needs a password (e.g. \"${BEARWATCH_PG_PASSWORD}\")".into()));
        }
        let secrets = [("server.auth_token", &self.server.auth_token), ("server.postgres_password", &self.server.postgres_password)];
        for (field, secret) in secrets {
            if secret.as_ref().is_some_and(|s| s.as_str().trim().is_empty()) {
                return Err((field, "is empty (check the environment variable it names): an empty secret would let anyone in".into()));
            }
        }
        let mut names = std::collections::BTreeSet::new();
        for receiver in &self.receivers {
            receiver.check().map_err(|(field, message)| (receiver_field(field), message))?;
            if !names.insert(receiver.name.as_str()) {
                return Err(("receivers.name", format!("receiver name `{}` is used twice", receiver.name)));
            }
            if receiver.kind == crate::alert::ReceiverKind::Kafka && receiver.brokers.is_none() && s.brokers.is_none() {
                return Err(("receivers.brokers", format!("receiver `{}` needs `brokers` when the source is not Kafka", receiver.name)));
            }
        }
        Ok(())
    }
}

impl PipelineConfig {
    /// What `run.role` needs from the rest of the file; also checked after `--role` overrides it.
    pub fn check_role(&self) -> Result<(), (&'static str, String)> {
        match self.run.role {
            Role::All => Ok(()),
            Role::Classify if self.sink.is_none() => {
                Err(("run.role", "role `classify` publishes scored stories: it needs a [sink] topic".into()))
            }
            Role::Aggregate if self.source.kind != SourceKind::Kafka || self.sink.is_none() => Err((
                "run.role",
                "role `aggregate` reads the [sink] topic that `classify` instances write: it needs a kafka [source] and a [sink]".into(),
            )),
            Role::Classify | Role::Aggregate => Ok(()),
        }
    }

    /// The consumer group of `aggregate` instances, beside the `classify` group on the news topics.
    pub fn aggregate_group_id(&self) -> String {
        format!("{}-aggregate", self.source.group_id.as_ref().map_or("bearwatch", EnvString::as_str))
    }
}

/// Stories × windows is the work and memory of every story: `size / slide` beyond this is a typo.
pub const MAX_WINDOWS_PER_STORY: i64 = 1000;

/// A numeric setting outside its bounds, as a field error.
fn within(field: &'static str, value: usize, min: usize, max: usize) -> Result<(), (&'static str, String)> {
    if (min..=max).contains(&value) { Ok(()) } else { Err((field, format!("must be between {min} and {max}, is {value}"))) }
}

fn model_field(field: &str) -> &'static str {
    match field {
        "max_batch_size" => "model.max_batch_size",
        "max_length" => "model.max_length",
        "max_batch_tokens" => "model.max_batch_tokens",
        "max_queued" => "model.max_queued",
        "threads" => "model.threads",
        "body_chars" => "model.body_chars",
        "max_wait_ms" => "model.max_wait_ms",
        _ => "model",
    }
}

/// Reads a config file and parses it with `parse(text, origin)`, the file's path naming it in errors.
pub fn load_with<T>(path: &Path, parse: impl FnOnce(&str, &str) -> Result<T, ConfigError>) -> Result<T, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read { path: path.to_path_buf(), reason: e.to_string() })?;
    parse(&text, &path.display().to_string())
}

/// Deserializes TOML into `T`; errors carry the file, line, column and field path.
pub fn parse_toml<T: serde::de::DeserializeOwned>(text: &str, origin: &str) -> Result<T, ConfigError> {
    let invalid = |line, column, field: String, message: String| ConfigError::Invalid {
        file: origin.to_string(),
        line,
        column,
        field,
        message,
    };
    let deserializer = toml::de::Deserializer::parse(text).map_err(|e| {
        let (line, column) = line_column(text, e.span().map_or(0, |s| s.start));
        invalid(line, column, "(syntax)".into(), e.message().to_string())
    })?;
    serde_path_to_error::deserialize(deserializer).map_err(|e| {
        let field = e.path().to_string();
        let inner = e.into_inner();
        let (line, column) = match inner.span() {
            Some(span) => line_column(text, span.start),
            None => (locate(text, &field), 1),
        };
        invalid(line, column, field, inner.message().to_string())
    })
}

/// An error found after parsing, placed at the line where `field` (`table.key`) is written.
pub fn invalid_at(text: &str, origin: &str, field: &str, message: String) -> ConfigError {
    ConfigError::Invalid { file: origin.to_string(), line: locate(text, field), column: 1, field: field.to_string(), message }
}

fn receiver_field(field: &str) -> &'static str {
    match field {
        "url" => "receivers.url",
        "smtp_host" => "receivers.smtp_host",
        "from" => "receivers.from",
        "to" => "receivers.to",
        "topic" => "receivers.topic",
        "password" => "receivers.password",
        _ => "receivers",
    }
}

fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, column)
}

/// The line of `a.b.key` in `text`: the key's own line inside its table, else the table header, else 1.
fn locate(text: &str, field: &str) -> usize {
    let (table, key) = field.rsplit_once('.').unwrap_or(("", field));
    let mut current = String::new();
    let mut header_line = None;
    for (index, line) in text.lines().enumerate() {
        let trimmed = line.trim();
        if let Some(name) = trimmed.strip_prefix('[').and_then(|t| t.split(']').next()) {
            current = name.trim_matches(['[', ' ']).to_string();
            if current == table || (table.is_empty() && current == key) {
                header_line.get_or_insert(index + 1);
            }
            continue;
        }
        if current == table && trimmed.split('=').next().is_some_and(|k| k.trim().trim_matches('"') == key) {
            return index + 1;
        }
    }
    header_line.unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const KAFKA: &str = r#"
[source]
type = "kafka"
brokers = "127.0.0.1:9092"
topics = ["news"]
group_id = "g"

[storage]
path = "data"
"#;

    fn error(text: &str) -> String {
        PipelineConfig::parse(text, "p.toml").unwrap_err().to_string()
    }

    #[test]
    fn the_demo_pipeline_parses() {
        let config = PipelineConfig::parse(DEMO_PIPELINE, DEMO_PIPELINE_NAME).unwrap();
        assert_eq!(config.source.kind, SourceKind::File);
    }

    #[test]
    fn every_shipped_pipeline_parses() {
        // SAFETY: no other test reads or writes this variable. The compose pipeline takes it from the environment.
        unsafe { std::env::set_var("BEARWATCH_PG_PASSWORD", "test") };
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                PipelineConfig::load(&path).unwrap_or_else(|e| panic!("{e}"));
            }
        }
    }

    #[test]
    fn defaults_fill_what_is_left_out() {
        let config = PipelineConfig::parse(KAFKA, "p.toml").unwrap();
        assert_eq!(config.window.size.to_string(), "1h");
        assert_eq!(config.window.slide().to_string(), "1h");
        assert_eq!(config.source.dead_letter_topic, "news.dlq");
        assert_eq!(config.storage.checkpoint_interval.to_string(), "10s");
    }

    #[test]
    fn unknown_fields_name_file_line_and_field() {
        let text = KAFKA.replace("group_id = \"g\"", "group_id = \"g\"\ntopcs = [\"x\"]");
        let err = error(&text);
        assert!(err.starts_with("p.toml:7:"), "{err}");
        assert!(err.contains("`source.topcs`: unknown field"), "{err}");
    }

    #[test]
    fn bad_values_name_the_field() {
        let err = error(&format!("{KAFKA}\n[window]\nsize = \"5 minutes\"\n"));
        assert!(err.starts_with("p.toml:12:") && err.contains("`window.size`") && err.contains("invalid duration"), "{err}");
        let err = error(&format!("{KAFKA}\n[window]\nsize = \"10m\"\nslide = \"3m\"\n"));
        assert!(err.starts_with("p.toml:13:1: `window.slide`"), "{err}");
        let err = error(&KAFKA.replace("group_id = \"g\"\n", ""));
        assert!(err.contains("`source.group_id`") && err.starts_with("p.toml:2:"), "{err}");
        let err = error("[source\n");
        assert!(err.starts_with("p.toml:1:"), "{err}");
    }

    #[test]
    fn env_references_expand_and_missing_ones_are_errors() {
        // SAFETY: tests in this module do not read this variable concurrently.
        unsafe { std::env::set_var("BEARWATCH_TEST_SASL", "s3cret") };
        let text = format!("{KAFKA}\n[source.properties]\n\"sasl.password\" = \"${{BEARWATCH_TEST_SASL}}\"\n")
            .replace("[storage]\npath = \"data\"\n", "")
            + "\n[storage]\npath = \"data\"\n";
        let config = PipelineConfig::parse(&text, "p.toml").unwrap();
        assert_eq!(config.source.properties["sasl.password"].as_str(), "s3cret");
        assert!(!format!("{config:?}").contains("s3cret"));
        let err = error(&text.replace("BEARWATCH_TEST_SASL", "BEARWATCH_TEST_UNSET"));
        assert!(err.contains("`BEARWATCH_TEST_UNSET` is not set") && err.contains("sasl.password"), "{err}");
    }
}
