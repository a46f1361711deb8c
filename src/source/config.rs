//! `[source]`: where stories come from (a JSON-lines file or Kafka topics) and what is too large or too far ahead.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Deserialize;

use crate::config::{EnvString, FieldError, HumanDuration, within};

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
    #[serde(default, deserialize_with = "crate::config::env::optional_path")]
    pub path: Option<PathBuf>,
    /// file: 0 = as fast as possible; N = N× the pace of the stories' own timestamps.
    #[serde(default)]
    pub speed: f64,
    /// file, at a `speed`: a longer quiet spell between two stories' timestamps replays as this
    /// long (default 1 d), so that a story dated years off does not stop the replay.
    pub max_gap: Option<HumanDuration>,
    /// file: where bad lines go; default `<storage.path>/dead-letter.jsonl`.
    #[serde(default, deserialize_with = "crate::config::env::optional_path")]
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

impl SourceConfig {
    /// How a file source paces its replay.
    pub fn pace(&self) -> super::file::Pace {
        super::file::Pace::new(self.speed, self.max_gap)
    }

    /// What each kind needs, and the bounds of the settings that scale memory.
    pub fn validate(&self) -> Result<(), FieldError> {
        match self.kind {
            SourceKind::File => {
                if self.path.is_none() {
                    return Err(("source.path", "a file source needs `path`, the JSON-lines file to replay".into()));
                }
                if let Err((setting, why)) = super::file::Pace::check(self.speed, self.max_gap) {
                    return Err((if setting == "speed" { "source.speed" } else { "source.max_gap" }, why.into()));
                }
                // Kafka settings a file source would ignore (`brokers` and `properties` are the
                // default connection of a sink and of kafka receivers, so they stay allowed).
                if !self.topics.is_empty() {
                    return Err(("source.topics", "`topics` are for a kafka source; a file source reads `path`".into()));
                }
                if self.group_id.is_some() {
                    return Err(("source.group_id", "`group_id` is for a kafka source".into()));
                }
            }
            SourceKind::Kafka => {
                // File settings a kafka source would ignore: its dead letters go to `dead_letter_topic`.
                if self.path.is_some() {
                    return Err(("source.path", "`path` is for a file source; a kafka source reads `topics`".into()));
                }
                if self.dead_letter_path.is_some() {
                    return Err(("source.dead_letter_path", "a kafka source's dead letters go to `dead_letter_topic`; `dead_letter_path` is for a file source".into()));
                }
                if self.speed != 0.0 {
                    return Err(("source.speed", "`speed` paces a file's replay; a kafka source reads as the stories come".into()));
                }
                if self.max_gap.is_some() {
                    return Err(("source.max_gap", "`max_gap` paces a file's replay; a kafka source reads as the stories come".into()));
                }
                if self.brokers.is_none() {
                    return Err(("source.brokers", "a kafka source needs `brokers`, e.g. \"127.0.0.1:9092\"".into()));
                }
                if self.topics.is_empty() {
                    return Err(("source.topics", "a kafka source needs at least one topic".into()));
                }
                if self.group_id.is_none() {
                    return Err(("source.group_id", "a kafka source needs `group_id`".into()));
                }
                for key in ["bootstrap.servers", "group.id", "enable.auto.commit", "enable.partition.eof"] {
                    if self.properties.contains_key(key) {
                        return Err(("source.properties", format!("`{key}` is set by bearwatch itself; remove it")));
                    }
                }
                if self.reads_topic(&self.dead_letter_topic) {
                    return Err((
                        "source.dead_letter_topic",
                        format!("`{}` is also a topic this source reads: each dead letter would be read again and dead-lettered again, without end", self.dead_letter_topic),
                    ));
                }
                if self.properties.contains_key("auto.offset.reset") {
                    return Err(("source.properties", "`auto.offset.reset` is set from `start_offset`; set that instead".into()));
                }
            }
        }
        within("source.max_message_bytes", self.max_message_bytes, 1, 64 << 20)
    }

    /// The source's brokers and properties, where it names brokers: the connection that the sink and
    /// kafka receivers naming none of their own start from.
    pub fn connection(&self) -> Option<(&str, &BTreeMap<String, EnvString>)> {
        self.brokers.as_ref().map(|brokers| (brokers.as_str(), &self.properties))
    }

    /// Whether `topic` is among `topics`, by name or by a `^…` pattern (librdkafka subscribes to
    /// every topic a topic starting with `^` matches).
    pub fn reads_topic(&self, topic: &str) -> bool {
        self.topics.iter().any(|t| t == topic || (t.starts_with('^') && regex::Regex::new(t).is_ok_and(|pattern| pattern.is_match(topic))))
    }
}
