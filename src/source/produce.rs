//! `bearwatch produce`: loads a JSON-lines file into a Kafka topic, in event-time order, optionally
//! paced at N× the stories' own timestamps. Lines are sent as they are (bad ones too: the pipeline
//! is what validates); the key is the story's `id` when there is one.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use super::file::{FileSource, Pace};
use super::kafka::Output;
use super::{Source, SourceError};
use crate::config::EnvString;

pub struct Produced {
    pub messages: u64,
    pub elapsed: Duration,
}

pub fn produce(
    brokers: &str,
    topic: &str,
    file: &Path,
    pace: Pace,
    properties: &BTreeMap<String, EnvString>,
) -> Result<Produced, SourceError> {
    let mut source = FileSource::open(file, pace, None)?;
    let output = Output::connect(brokers, properties)?;
    let progress = indicatif::ProgressBar::new(source.len() as u64);
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} messages  {per_sec}  eta {eta}")
            .expect("valid progress template"),
    );
    let started = Instant::now();
    let mut messages = 0;
    while !source.finished() {
        let Some(record) = source.poll(Duration::from_millis(100))? else { continue };
        let key = story_id(&record.payload).unwrap_or_default();
        output.send(topic, key.as_bytes(), &record.payload, None)?;
        messages += 1;
        progress.inc(1);
    }
    output.flush(Duration::from_secs(60)).map_err(|e| match e {
        SourceError::Kafka(reason) => SourceError::Kafka(format!("{reason} (of {messages} sent to {topic})")),
        other => other,
    })?;
    progress.finish_and_clear();
    Ok(Produced { messages, elapsed: started.elapsed() })
}

fn story_id(payload: &[u8]) -> Option<String> {
    #[derive(serde::Deserialize)]
    struct Id {
        id: String,
    }
    serde_json::from_slice::<Id>(payload).ok().map(|i| i.id)
}
