//! The pipeline file (`pipelines/*.toml`, DESIGN §5): each stage's own section, composed, plus the
//! `[sink]` topic and `[run]` settings that only the wiring uses.
//!
//! Every section denies unknown fields. A section's own checks live with its stage; the checks here
//! are the ones that span sections (a sink's brokers, a role's needs, receivers beside the source).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::alert::{ReceiverConfig, ReceiverKind};
use crate::classify::{ClassifierConfig, ClassifyError};
use crate::config::{ConfigError, EnvString, FieldError, HumanDuration, invalid_at, load_with, parse_toml};
use crate::detect::AlertsConfig;
use crate::feedback::FeedbackConfig;
use crate::server::ServerConfig;
use crate::source::{SourceConfig, SourceKind};
use crate::storage::StorageConfig;
use crate::window::WindowConfig;

/// The demo pipeline, compiled in so that `bearwatch run` works with no arguments and no files.
pub const DEMO_PIPELINE: &str = include_str!("../../pipelines/demo.toml");
pub const DEMO_PIPELINE_NAME: &str = "pipelines/demo.toml";

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
    #[serde(default)]
    pub feedback: FeedbackConfig,
    /// The file this was read from, as TOML: what a reload compares the file with (none for the
    /// demo's embedded pipeline).
    #[serde(skip)]
    pub file: Option<ConfigFile>,
}

/// A pipeline file as read at start.
#[derive(Debug, Clone)]
pub struct ConfigFile {
    pub path: PathBuf,
    pub table: toml::Table,
}

impl ConfigFile {
    /// The top-level sections of `other` that differ from this file's in more than what a reload
    /// reads again (`[[receivers]]`, `[alerts] rules`, `[server] users` and `auth_token`).
    pub fn changed_beyond_reload(&self, other: &toml::Table) -> Vec<String> {
        let reloadable = |table: &toml::Table| {
            let mut table = table.clone();
            table.remove("receivers");
            for (section, fields) in [("alerts", &["rules"][..]), ("server", &["users", "auth_token"][..])] {
                if let Some(toml::Value::Table(inner)) = table.get_mut(section) {
                    for field in fields {
                        inner.remove(*field);
                    }
                    if inner.is_empty() {
                        table.remove(section);
                    }
                }
            }
            table
        };
        let (before, after) = (reloadable(&self.table), reloadable(other));
        let keys: std::collections::BTreeSet<&String> = before.keys().chain(after.keys()).collect();
        keys.into_iter().filter(|key| before.get(*key) != after.get(*key)).map(|key| format!("[{key}]")).collect()
    }
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
        load_with(path, |text, origin| {
            let mut config = PipelineConfig::parse(text, origin)?;
            let table = toml::from_str(text).map_err(|e| ConfigError::Read { path: path.to_path_buf(), reason: e.to_string() })?;
            config.file = Some(ConfigFile { path: path.to_path_buf(), table });
            Ok(config)
        })
    }

    /// Parses and validates; `origin` names the file in errors.
    pub fn parse(text: &str, origin: &str) -> Result<PipelineConfig, ConfigError> {
        let config: PipelineConfig = parse_toml(text, origin)?;
        config.validate().map_err(|(field, message)| invalid_at(text, origin, field, message))?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), FieldError> {
        let s = &self.source;
        s.validate()?;
        self.window.validate()?;
        self.storage.validate()?;
        self.server.validate()?;
        self.feedback.validate()?;
        self.alerts.validate()?;
        if let Some(sink) = &self.sink
            && sink.brokers.is_none()
            && s.brokers.is_none()
        {
            return Err(("sink.brokers", "needed when the source is not Kafka".into()));
        }
        if let Some(sink) = &self.sink
            && s.kind == SourceKind::Kafka
            && sink.brokers.as_ref().is_none_or(|b| Some(b) == s.brokers.as_ref())
            && s.reads_topic(&sink.topic)
        {
            return Err(("sink.topic", format!("`{}` is also a topic the source reads: scored stories would come back as news", sink.topic)));
        }
        self.model.validate().map_err(|e| match e {
            ClassifyError::Config { field, reason } => (model_field(field), reason),
            other => ("model", other.to_string()),
        })?;
        self.check_role()?;
        let mut names = std::collections::BTreeSet::new();
        for receiver in &self.receivers {
            receiver.check().map_err(|(field, message)| (receiver_field(field), message))?;
            if !names.insert(receiver.name.as_str()) {
                return Err(("receivers.name", format!("receiver name `{}` is used twice", receiver.name)));
            }
            if receiver.kind == ReceiverKind::Kafka && receiver.brokers.is_none() && s.brokers.is_none() {
                return Err(("receivers.brokers", format!("receiver `{}` needs `brokers` when the source is not Kafka", receiver.name)));
            }
        }
        Ok(())
    }
}

impl PipelineConfig {
    /// What `run.role` needs from the rest of the file; also checked after `--role` overrides it.
    pub fn check_role(&self) -> Result<(), FieldError> {
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

fn model_field(field: &str) -> &'static str {
    match field {
        "max_batch_size" => "model.max_batch_size",
        "max_length" => "model.max_length",
        "max_batch_tokens" => "model.max_batch_tokens",
        "max_queued" => "model.max_queued",
        "workers" => "model.workers",
        "threads" => "model.threads",
        "body_chars" => "model.body_chars",
        "max_wait_ms" => "model.max_wait_ms",
        _ => "model",
    }
}

fn receiver_field(field: &str) -> &'static str {
    match field {
        "url" => "receivers.url",
        "smtp_host" => "receivers.smtp_host",
        "from" => "receivers.from",
        "to" => "receivers.to",
        "topic" => "receivers.topic",
        "password" => "receivers.password",
        "urls" => "receivers.urls",
        "username" => "receivers.username",
        "bearer_token" => "receivers.bearer_token",
        "resend_every" => "receivers.resend_every",
        "dashboard_url" => "receivers.dashboard_url",
        "rate_limit" => "receivers.rate_limit",
        "rate_interval" => "receivers.rate_interval",
        "properties" => "receivers.properties",
        "tls" => "receivers.tls",
        _ => "receivers",
    }
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
        // SAFETY: no other test reads or writes these variables. The compose pipeline takes them from the environment.
        unsafe {
            std::env::set_var("BEARWATCH_PG_PASSWORD", "test");
            std::env::set_var("BEARWATCH_INSTANCE", "a");
        }
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
        // One kind's settings on the other are refused, not ignored.
        let err = error(&format!("{KAFKA}").replace("[source]\n", "[source]\ndead_letter_path = \"dead.jsonl\"\n"));
        assert!(err.contains("`source.dead_letter_path`") && err.contains("dead_letter_topic"), "{err}");
        let err = error("[source]\ntype = \"file\"\npath = \"in.jsonl\"\ntopics = [\"news\"]\n[storage]\npath = \"s\"\n");
        assert!(err.contains("`source.topics`"), "{err}");
        let err = error(&format!("{KAFKA}").replace("[source]\n", "[source]\nmax_gap = \"1h\"\n"));
        assert!(err.contains("`source.max_gap`") && err.contains("file's replay"), "{err}");
        let err = error("[source]\ntype = \"file\"\npath = \"in.jsonl\"\nspeed = 60\nmax_gap = \"0s\"\n[storage]\npath = \"s\"\n");
        assert!(err.contains("`source.max_gap`") && err.contains("more than 0"), "{err}");
        let file_with_brokers = "[source]\ntype = \"file\"\npath = \"in.jsonl\"\nbrokers = \"k:9092\"\n[storage]\npath = \"s\"\n[sink]\ntopic = \"scored\"\n";
        assert!(PipelineConfig::parse(file_with_brokers, "p.toml").is_ok(), "a file source's brokers are its sink's");
    }

    #[test]
    fn output_topics_the_source_reads_are_refused() {
        let topics = |list: &str, extra: &str| error(&format!("{}{extra}", KAFKA.replace("topics = [\"news\"]", &format!("topics = [{list}]"))));
        let err = topics("\"news\", \"news.dlq\"", "");
        assert!(err.contains("`source.dead_letter_topic`") && err.contains("without end"), "{err}");
        let err = topics("\"^news.*\"", "");
        assert!(err.contains("`source.dead_letter_topic`"), "{err}");
        let err = topics("\"news\", \"scored\"", "\n[sink]\ntopic = \"scored\"\n");
        assert!(err.contains("`sink.topic`") && err.contains("come back as news"), "{err}");
        // Another cluster's topic of the same name is another topic.
        let ok = format!("{KAFKA}\n[sink]\ntopic = \"news\"\nbrokers = \"elsewhere:9092\"\n");
        assert!(PipelineConfig::parse(&ok, "p.toml").is_ok());
        assert!(PipelineConfig::parse(&KAFKA.replace("topics = [\"news\"]", "topics = [\"^news$\"]"), "p.toml").is_ok());
    }

    #[test]
    fn kafka_properties_bearwatch_sets_itself_are_refused() {
        let property = |key: &str, value: &str| error(&format!("{KAFKA}\n[source.properties]\n\"{key}\" = \"{value}\"\n"));
        let err = property("auto.offset.reset", "latest");
        assert!(err.contains("`source.properties`") && err.contains("`start_offset`"), "{err}");
        assert!(property("enable.partition.eof", "true").contains("set by bearwatch itself"));
    }

    /// What a reload may change: receivers and the list of rule files; any other section is named.
    #[test]
    fn a_reload_names_the_sections_changed_beyond_receivers_and_rule_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("p.toml");
        let base = "[source]\ntype = \"file\"\npath = \"n.jsonl\"\n[storage]\npath = \"s\"\n[alerts]\nrules = [\"a.toml\"]\n\
                    [[receivers]]\nname = \"log\"\ntype = \"log\"\n";
        std::fs::write(&path, base).unwrap();
        let file = PipelineConfig::load(&path).unwrap().file.unwrap();
        let changed = |text: &str| file.changed_beyond_reload(&toml::from_str(text).unwrap());
        assert!(changed(base).is_empty());
        let other_receivers = base.replace("name = \"log\"", "name = \"console\"") + "[[receivers]]\nname = \"hook\"\ntype = \"webhook\"\nurl = \"http://h/\"\n";
        assert!(changed(&other_receivers).is_empty(), "receivers are reloaded");
        assert!(changed(&base.replace("[\"a.toml\"]", "[\"a.toml\", \"b.toml\"]")).is_empty(), "so is the list of rule files");
        assert!(changed(&base.replace("[alerts]\nrules = [\"a.toml\"]\n", "")).is_empty(), "[alerts] gone with only its rules in it");
        assert_eq!(changed(&base.replace("rules = [", "evaluate_every = \"1m\"\nrules = [")), ["[alerts]"]);
        assert_eq!(changed(&(base.to_string() + "[window]\nsize = \"2h\"\n")), ["[window]"]);
        let server = |body: &str| base.replace("[[receivers]]", &format!("[server]\n{body}[[receivers]]"));
        let users = "[[server.users]]\nname = \"ana\"\nrole = \"analyst\"\ntoken = \"0123456789abcdef\"\n";
        assert!(changed(&server(&format!("auth_token = \"fedcba9876543210\"\n{users}"))).is_empty(), "tokens are reloaded");
        assert_eq!(changed(&server("http = \"127.0.0.1:9464\"\n")), ["[server]"]);
        assert_eq!(changed(&base.replace("\"s\"", "\"t\"").replace("n.jsonl", "m.jsonl")), ["[source]", "[storage]"]);
    }

    #[test]
    fn receivers_are_checked_by_kind_and_name_the_field() {
        let receiver = |body: &str| error(&format!("{KAFKA}\n[[receivers]]\nname = \"r\"\n{body}"));
        let err = receiver("type = \"webhook\"\nurl = \"hooks.example.com/SECRET\"\n");
        assert!(err.contains("`receivers.url`") && err.contains("http:// or https://") && !err.contains("SECRET"), "{err}");
        let err = receiver("type = \"alertmanager\"\n");
        assert!(err.contains("`receivers.urls`"), "{err}");
        let err = receiver("type = \"alertmanager\"\nurls = [\"http://am:9093\", \"am2:9093\"]\n");
        assert!(err.contains("`receivers.urls`") && err.contains("http://"), "{err}");
        let err = receiver("type = \"alertmanager\"\nurl = \"http://am:9093\"\nbearer_token = \"t\"\nusername = \"u\"\n");
        assert!(err.contains("`receivers.bearer_token`") && err.contains("not both"), "{err}");
        let err = receiver("type = \"alertmanager\"\nurl = \"http://am:9093\"\nresend_every = \"0s\"\n");
        assert!(err.contains("`receivers.resend_every`"), "{err}");
        let ok = format!("{KAFKA}\n[[receivers]]\nname = \"r\"\ntype = \"alertmanager\"\nurls = [\"http://a:9093\", \"https://b\"]\n");
        assert_eq!(PipelineConfig::parse(&ok, "p.toml").unwrap().receivers[0].resend_every.as_millis(), 60_000);
        let err = receiver("type = \"log\"\nrate_limit = 1000001\n");
        assert!(err.contains("`receivers.rate_limit`") && err.contains("at most 1000000"), "{err}");
        let err = receiver("type = \"log\"\nrate_interval = \"0s\"\n");
        assert!(err.contains("`receivers.rate_interval`"), "{err}");
        let mail = |host: &str, tls: &str| format!("type = \"email\"\nsmtp_host = \"{host}\"\nfrom = \"f@x\"\nto = [\"t@x\"]\ntls = \"{tls}\"\nusername = \"u\"\npassword = \"p\"\n");
        let err = receiver(&mail("smtp.example.com", "none"));
        assert!(err.contains("`receivers.tls`") && err.contains("clear text"), "{err}");
        for (host, tls) in [("127.0.0.1", "none"), ("localhost", "none"), ("[::1]", "none"), ("smtp.example.com", "starttls")] {
            let ok = format!("{KAFKA}\n[[receivers]]\nname = \"r\"\n{}", mail(host, tls));
            assert!(PipelineConfig::parse(&ok, "p.toml").is_ok(), "{host} {tls}");
        }
        let err = receiver("type = \"webhook\"\nurl = \"http://h\"\n[receivers.properties]\n\"acks\" = \"all\"\n");
        assert!(err.contains("`receivers.properties`") && err.contains("for kafka receivers"), "{err}");
        // A field its kind does not use is refused, not ignored: a webhook's token was never sent.
        let err = receiver("type = \"kafka\"\ntopic = \"t\"\nbearer_token = \"t0ken\"\n");
        assert!(err.contains("`receivers.bearer_token`") && err.contains("for webhook and alertmanager receivers, not kafka"), "{err}");
        let err = receiver("type = \"webhook\"\nurl = \"http://h\"\nsmtp_host = \"mail\"\n");
        assert!(err.contains("`receivers.smtp_host`") && err.contains("for email receivers, not webhook"), "{err}");
        let err = receiver("type = \"email\"\nsmtp_host = \"s\"\nfrom = \"f\"\nto = [\"t\"]\nurls = [\"http://a\"]\n");
        assert!(err.contains("`receivers.urls`"), "{err}");
        let err = receiver("type = \"webhook\"\nurl = \"http://h\"\npassword = \"p\"\n");
        assert!(err.contains("`receivers.username`") && err.contains("without `username`"), "{err}");
        let hook = format!("{KAFKA}\n[[receivers]]\nname = \"r\"\ntype = \"webhook\"\nurl = \"http://h\"\nusername = \"u\"\npassword = \"p\"\n");
        assert_eq!(PipelineConfig::parse(&hook, "p.toml").unwrap().receivers[0].authorization().as_deref(), Some("Basic dTpw"));
        // People read email and webhooks: limited unless said otherwise; machines are not.
        let limits = |kind: &str, extra: &str| {
            let needs = match kind {
                "email" => "smtp_host = \"s\"\nfrom = \"f\"\nto = [\"t\"]\n",
                "webhook" => "url = \"http://h\"\n",
                "kafka" => "topic = \"t\"\n",
                _ => "urls = [\"http://a\"]\n",
            };
            let text = format!("{KAFKA}\n[[receivers]]\nname = \"r\"\ntype = \"{kind}\"\n{needs}{extra}");
            PipelineConfig::parse(&text, "p.toml").unwrap().receivers[0].rate_limit()
        };
        assert_eq!((limits("email", ""), limits("webhook", ""), limits("kafka", ""), limits("alertmanager", "")), (Some(30), Some(30), None, None));
        assert_eq!((limits("webhook", "rate_limit = 0\n"), limits("kafka", "rate_limit = 7\n")), (None, Some(7)));
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
