//! Aggregate instances that share a storage hand partitions of the scored topic to each other.
//!
//! The scored topic is keyed by topic, so a partition carries whole topics. After each checkpoint
//! an instance publishes a progress note (its partitions' offsets and event-time clocks) and reads
//! the others': their partitions hold its watermark like its own, so when one of them dies its
//! partitions' windows stay open everywhere until another instance takes them over. On an
//! assignment, a partition whose newest checkpoint is another instance's is taken from there: the
//! windows of its topics, their alert baselines and lifecycles, the stories a correction can still
//! re-count, the ids that de-duplicate, and the offset to go on from. A partition that went to
//! another instance is dropped here once its checkpoint is written (the revocation wrote it).
//!
//! Another instance's partition that it has read to its end holds event time here only until it
//! has been idle for [`IDLE_AFTER`]: its reader may die in between, and what arrives there
//! meanwhile is counted by the instance that takes it over, which must find its windows open
//! (in a replay, event time runs far ahead of the clock). A note that has not changed for three of
//! its writer's checkpoint intervals (and 5 s) is its writer's last word: its partitions hold the
//! watermark where they were until another instance takes them over.

use std::collections::{BTreeMap, BTreeSet, HashSet};

use serde::{Deserialize, Serialize};

use super::{Checkpoint, Core, source_key};
use crate::pipeline::PipelineError;
use crate::window::SourceClock;

/// What `progress/<instance>.json` holds.
#[derive(Serialize, Deserialize)]
struct Progress {
    written_ms: i64,
    /// The writer's checkpoint interval: how often the note is renewed while the writer lives.
    every_ms: i64,
    partitions: Vec<PartitionProgress>,
}

/// How long another instance's partition must have been read to its end before it stops holding
/// the watermark here: a quiet topic does not stall the others' windows for longer.
const IDLE_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// Per other instance: its note's `written_ms` as last read, and when that last changed.
#[derive(Default)]
pub(super) struct Others(BTreeMap<String, (i64, std::time::Instant)>);

#[derive(Serialize, Deserialize)]
struct PartitionProgress {
    source: String,
    /// Next offset to read (none before the first story).
    offset: Option<i64>,
    clock: SourceClock,
    /// How long it has been read to its end (none: it has not).
    #[serde(default)]
    idle_ms: Option<u64>,
}

impl Core {
    /// Publishes this instance's progress and holds the watermark for the other instances'
    /// partitions. Failures only delay news (logged): the checkpoint is already committed.
    pub(super) fn share_progress(&mut self) {
        let Some(storage) = self.storage.as_ref().filter(|s| s.instance().is_some()) else { return };
        let partitions = self
            .windows
            .clocks()
            .iter()
            .map(|(source, clock)| {
                let offset = source.rsplit_once('/').and_then(|(topic, p)| self.offset(topic, p.parse().ok()?));
                let idle_ms = self.idle_since.get(source).filter(|_| clock.caught_up).map(|since| since.elapsed().as_millis() as u64);
                PartitionProgress { source: source.clone(), offset, clock: *clock, idle_ms }
            })
            .collect();
        let every_ms = i64::try_from(self.checkpoint_every.as_millis()).unwrap_or(i64::MAX);
        let note = Progress { written_ms: super::now_ms(), every_ms, partitions };
        if let Err(e) = serde_json::to_vec(&note).map_err(|e| e.to_string()).and_then(|b| storage.publish_progress(b).map_err(|e| e.to_string())) {
            tracing::warn!(error = %e, "cannot publish this instance's progress; the others' windows wait longer for it");
        }
        let others = match storage.others_progress() {
            Ok(others) => others,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the other instances' progress; keeping what they said last");
                return;
            }
        };
        // Per partition, the newest word: the highest offset (its current reader), then the latest note.
        let mut newest: BTreeMap<String, (Option<i64>, i64, SourceClock)> = BTreeMap::new();
        for (instance, bytes) in others {
            let Ok(note) = serde_json::from_slice::<Progress>(&bytes) else {
                tracing::warn!(instance, "unreadable progress note; ignored");
                continue;
            };
            let changed = match self.others.0.get(&instance) {
                Some((written, at)) if *written == note.written_ms => *at,
                _ => std::time::Instant::now(),
            };
            self.others.0.insert(instance.clone(), (note.written_ms, changed));
            let silent = changed.elapsed() > std::time::Duration::from_millis(note.every_ms.max(0).saturating_mul(3) as u64) + std::time::Duration::from_secs(5);
            if silent {
                tracing::debug!(instance, "no progress lately: its partitions hold event time until taken over");
            }
            for p in note.partitions {
                let idle = p.clock.caught_up && p.idle_ms.is_some_and(|ms| ms >= IDLE_AFTER.as_millis() as u64);
                let clock = SourceClock { caught_up: idle && !silent, ..p.clock };
                let entry = (p.offset, note.written_ms, clock);
                if newest.get(&p.source).is_none_or(|(offset, written, _)| (p.offset, note.written_ms) > (*offset, *written)) {
                    newest.insert(p.source, entry);
                }
            }
        }
        self.windows.hold_for(newest.into_iter().map(|(source, (_, _, clock))| (source, clock)).collect());
    }

    /// On an assignment (the whole of it): drops the topics of partitions that went elsewhere, and
    /// takes over each assigned partition whose newest checkpoint is another instance's.
    pub(super) fn hand_over(&mut self, assigned: &[(String, i32)]) -> Result<(), PipelineError> {
        let Some(storage) = self.storage.as_ref().filter(|s| s.instance().is_some()) else { return Ok(()) };
        let mut donors: Vec<(String, Checkpoint)> = Vec::new();
        for (instance, bytes) in storage.others_checkpoints().map_err(PipelineError::Storage)? {
            match serde_json::from_slice::<Checkpoint>(&bytes) {
                Ok(checkpoint) if checkpoint.windows.spec() != self.windows.spec() => {
                    tracing::warn!(instance, "another instance counts other windows; its partitions start from this one's state")
                }
                Ok(checkpoint) => donors.push((instance, checkpoint)),
                Err(e) => tracing::warn!(instance, error = %e, "another instance's checkpoint is unreadable; its partitions start from this one's state"),
            }
        }
        let storage_location = storage.location().clone();
        let storage_location = &storage_location;
        let ours: HashSet<String> = assigned.iter().map(|(topic, partition)| source_key(topic, *partition)).collect();
        let gone: BTreeSet<String> = self.topic_sources.iter().filter(|(_, source)| !ours.contains(*source)).map(|(topic, _)| topic.clone()).collect();
        self.drop_topics(&gone);
        self.topic_sources.retain(|topic, _| !gone.contains(topic));
        let stale: Vec<String> = self.windows.clocks().keys().filter(|source| !ours.contains(*source)).cloned().collect();
        for source in stale {
            self.windows.forget_source(&source);
        }
        let mut took_copies = BTreeSet::new();
        for (topic, partition) in assigned {
            let here = self.offset(topic, *partition);
            let newest = donors
                .iter()
                .filter_map(|(instance, checkpoint)| Some((*checkpoint.offsets.get(topic)?.get(partition)?, instance, checkpoint)))
                .max_by_key(|(offset, _, _)| *offset);
            let Some((offset, instance, donor)) = newest.filter(|(offset, _, _)| here.is_none_or(|h| *offset > h)) else { continue };
            let source = source_key(topic, *partition);
            let topics: BTreeSet<String> = donor.topic_sources.iter().filter(|(_, s)| **s == source).map(|(t, _)| t.clone()).collect();
            self.adopt(donor, &topics, &source);
            if took_copies.insert(instance.clone()) {
                // Parts its last checkpoint committed and a crash left hidden.
                if let Err(e) = crate::storage::settle(storage_location, instance) {
                    tracing::warn!(instance, error = %e, "cannot rename the parts another instance committed; they stay hidden until it starts again");
                }
                self.windows.adopt_copies(&donor.windows);
                match super::seen::decode(&donor.seen_keys, &donor.seen) {
                    Ok(ids) => {
                        for (id, event_ms) in ids {
                            self.seen.entry(id).or_insert(event_ms);
                        }
                    }
                    Err(e) => tracing::warn!(instance, error = %e, "another instance's remembered ids are unreadable; its copies are not recognised"),
                }
            }
            self.offsets.entry(topic.clone()).or_default().insert(*partition, offset);
            metrics::counter!("bearwatch_partitions_taken_over_total").increment(1);
            tracing::info!(partition = %source, from = %instance, offset, topics = ?topics, "took over a partition from another instance's checkpoint");
        }
        Ok(())
    }

    fn drop_topics(&mut self, topics: &BTreeSet<String>) {
        if topics.is_empty() {
            return;
        }
        self.windows.drop_topics(topics);
        if let Some(alerting) = self.alerting.as_mut() {
            alerting.detector.drop_topics(topics);
        }
        if let Some(corrections) = self.corrections.as_mut() {
            corrections.drop_topics(topics);
        }
        tracing::info!(topics = ?topics, "handed topics over with their partition");
    }

    fn adopt(&mut self, donor: &Checkpoint, topics: &BTreeSet<String>, source: &str) {
        self.windows.adopt(&donor.windows, topics, source);
        if let (Some(alerting), Some(detector)) = (self.alerting.as_mut(), donor.detector.as_ref()) {
            alerting.detector.adopt(detector, topics);
        }
        if let Some(corrections) = self.corrections.as_mut() {
            corrections.drop_topics(topics);
            for tracked in donor.tracked.iter().filter(|t| topics.contains(&t.counted.topic)) {
                corrections.track(tracked.clone());
            }
        }
        for topic in topics {
            self.topic_sources.insert(topic.clone(), source.to_string());
        }
    }
}
