//! The Kafka source (a consumer group) and the producer behind the dead-letter topic and
//! `news.scored`.
//!
//! Offsets are committed by hand, only after the checkpoint that covers them. When partitions are
//! revoked, the [`GroupHandler`] finishes their in-flight stories and checkpoints first, and the
//! offsets it returns are committed before the partitions move to another member.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::{KafkaError, KafkaResult, RDKafkaErrorCode};
use rdkafka::message::{Message, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::{ClientContext, Offset, TopicPartitionList};

use super::{Offsets, Record, Source, SourceError, Trouble};
use super::StartOffset;
use crate::config::EnvString;
use crate::sync::lock;

/// `bootstrap.servers` plus every pass-through property.
pub fn client_config(brokers: &str, properties: &BTreeMap<String, EnvString>) -> ClientConfig {
    let mut config = ClientConfig::new();
    config.set("bootstrap.servers", brokers);
    for (key, value) in properties {
        config.set(key, value.as_str());
    }
    config
}

/// What the pipeline does around a rebalance, and what it learns from the consumer's statistics.
pub trait GroupHandler: Send + Sync {
    /// `partitions` are about to be taken away: finish and checkpoint all work in flight, and return
    /// the checkpoint's offsets (the caller commits those of the revoked partitions). `lost`: the
    /// group already took them (this member missed its session or `max.poll.interval.ms`), so
    /// another member may be counting them from the last checkpoint.
    fn revoking(&self, partitions: &[(String, i32)], lost: bool) -> Offsets;
    /// `partitions` were handed to this member (after any revocation of the same rebalance).
    fn assigned(&self, partitions: &[(String, i32)]);
    /// Where each assigned partition's log ends (its high watermark), read at the assignment: one
    /// that ends before the offset this member has read to was deleted and created again, or
    /// truncated, and its offsets start over.
    fn log_ends(&self, ends: &[((String, i32), i64)]);
    /// The revoked partitions' offsets are committed to the group (or there was nothing to commit):
    /// their positions no longer need keeping. Not called when the commit failed (a lost session
    /// after a broker restart, say): the group then hands out the older committed offsets, and only
    /// the kept positions let this member skip what it already processed if the partitions return.
    fn committed(&self, partitions: &[(String, i32)]);
    /// From each statistics report: whether this consumer has read each of its partitions to the
    /// end, so that event time need not wait for it.
    fn read_to_end(&self, partitions: &[((String, i32), bool)]);
}

pub struct GroupContext {
    handler: Arc<dyn GroupHandler>,
    /// Partitions whose lag was last reported, so that a partition that moved away reads 0.
    reported: std::sync::Mutex<std::collections::BTreeSet<(String, i32)>>,
    /// This member's partitions: statistics also list partitions other members own.
    assigned: std::sync::Mutex<std::collections::BTreeSet<(String, i32)>>,
    /// Where a partition without a committed offset is read from.
    start: StartOffset,
    /// Partitions new to the group, read from their beginning whatever `start` says.
    from_beginning: std::sync::Mutex<BTreeSet<(String, i32)>>,
    trouble: Arc<Trouble>,
}

/// Whether a partition's statistics say this consumer has nothing left to read in it: the position
/// handed to the application has reached the high watermark. Before its first message that position
/// is where reading starts: the group's committed offset, else the reset point (the low watermark
/// for `earliest`, the high one for `latest`). Offsets are negative until known. (`fetchq_cnt`
/// cannot tell: with one consumer queue it counts every partition's prefetched messages.)
fn read_to_end(p: &rdkafka::statistics::Partition, start: StartOffset) -> bool {
    let position = if p.app_offset >= 0 {
        p.app_offset
    } else if p.committed_offset >= 0 {
        p.committed_offset
    } else {
        match start {
            StartOffset::Earliest => p.lo_offset,
            StartOffset::Latest => p.hi_offset,
        }
    };
    p.hi_offset >= 0 && position >= p.hi_offset
}

impl ClientContext for GroupContext {
    /// librdkafka's errors outside a message (a refused login, every broker down): logged as
    /// rdkafka logs them, and reported.
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(held) = self.trouble.report(&format!("{error}: {reason}")) {
            tracing::error!(target: "rdkafka::client", "librdkafka: {error}: {reason}{}", crate::telemetry::held_back(held));
        }
    }

    /// librdkafka's statistics (every `statistics.interval.ms`): consumer lag per assigned partition,
    /// measured from the group's committed offset, as `kafka-consumer-groups.sh` shows it.
    fn stats(&self, statistics: rdkafka::Statistics) {
        let mut now = std::collections::BTreeSet::new();
        let mut positions = Vec::new();
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                // Partition -1 is librdkafka's internal "unassigned" queue; lag -1 means not known yet.
                if *partition >= 0 && p.consumer_lag >= 0 {
                    metrics::gauge!("bearwatch_kafka_consumer_lag", "topic" => topic.clone(), "partition" => partition.to_string())
                        .set(p.consumer_lag as f64);
                    now.insert((topic.clone(), *partition));
                }
                let new_to_group = lock(&self.from_beginning).contains(&(topic.clone(), *partition));
                let start = if new_to_group { StartOffset::Earliest } else { self.start };
                positions.push(((topic.clone(), *partition), read_to_end(p, start)));
            }
        }
        let assigned = lock(&self.assigned).clone();
        positions.retain(|(partition, _)| assigned.contains(partition));
        self.handler.read_to_end(&positions);
        let mut reported = lock(&self.reported);
        for (topic, partition) in reported.difference(&now) {
            metrics::gauge!("bearwatch_kafka_consumer_lag", "topic" => topic.clone(), "partition" => partition.to_string()).set(0.0);
        }
        *reported = now;
    }
}

impl GroupContext {
    /// `start_offset = "latest"` is where a group starts, not where it reads a partition added to a
    /// topic later: that one is read from its beginning (as Flink does), or the stories written to
    /// it before this member learns of it (`topic.metadata.refresh.interval.ms`, 5 min) would be
    /// skipped. So a group records where "latest" was as committed offsets at its first
    /// assignment, and an assigned partition without one, of a topic that has them, is new.
    /// Sets the offsets in `list`, which librdkafka then assigns.
    fn place_uncommitted(&self, consumer: &BaseConsumer<Self>, list: &TopicPartitionList) -> KafkaResult<()> {
        let timeout = Duration::from_secs(10);
        let assigned = partitions(list);
        let mut every = TopicPartitionList::new();
        for topic in assigned.iter().map(|(t, _)| t.as_str()).collect::<BTreeSet<_>>() {
            for known in consumer.fetch_metadata(Some(topic), timeout)?.topics() {
                for partition in known.partitions() {
                    every.add_partition(topic, partition.id());
                }
            }
        }
        let committed: BTreeSet<(String, i32)> = (consumer.committed_offsets(every, timeout)?.elements().iter())
            .filter(|e| matches!(e.offset(), Offset::Offset(_)))
            .map(|e| (e.topic().to_string(), e.partition()))
            .collect();
        let mut starts = TopicPartitionList::new();
        for (topic, partition) in assigned.iter().filter(|p| !committed.contains(p)) {
            let Some(mut element) = list.find_partition(topic, *partition) else { continue };
            if committed.iter().any(|(t, _)| t == topic) {
                tracing::info!(topic, partition, "a partition new to the group: read from its beginning");
                element.set_offset(Offset::Beginning)?;
                lock(&self.from_beginning).insert((topic.clone(), *partition));
            } else {
                let (_, high) = consumer.fetch_watermarks(topic, *partition, timeout)?;
                element.set_offset(Offset::Offset(high))?;
                starts.add_partition_offset(topic, *partition, Offset::Offset(high))?;
            }
        }
        if starts.count() > 0 {
            consumer.commit(&starts, CommitMode::Sync)?;
        }
        Ok(())
    }
}

fn partitions(list: &TopicPartitionList) -> Vec<(String, i32)> {
    list.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect()
}

fn offsets_list(offsets: &Offsets, only: Option<&[(String, i32)]>) -> Result<TopicPartitionList, KafkaError> {
    let mut list = TopicPartitionList::new();
    for (topic, parts) in offsets {
        for (partition, next) in parts {
            if only.is_none_or(|keep| keep.iter().any(|(t, p)| t == topic && p == partition)) {
                list.add_partition_offset(topic, *partition, Offset::Offset(*next))?;
            }
        }
    }
    Ok(list)
}

impl ConsumerContext for GroupContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(list) = rebalance
            && self.start == StartOffset::Latest
            && let Err(e) = self.place_uncommitted(consumer, list)
        {
            tracing::warn!(error = %e, "cannot tell new partitions from the group's first ones; those without a committed offset start at the latest");
        }
        if let Rebalance::Revoke(list) = rebalance {
            let revoked = partitions(list);
            tracing::info!(partitions = ?revoked, "partitions revoked");
            lock(&self.assigned).retain(|p| !revoked.contains(p));
            lock(&self.from_beginning).retain(|p| !revoked.contains(p));
            let offsets = self.handler.revoking(&revoked, consumer.assignment_lost());
            match offsets_list(&offsets, Some(&revoked)) {
                Ok(list) if list.count() > 0 => match consumer.commit(&list, CommitMode::Sync) {
                    Ok(()) => self.handler.committed(&revoked),
                    Err(e) => {
                        tracing::warn!(error = %e, "commit of revoked partitions failed; the next owner re-reads from the last commit")
                    }
                },
                Ok(_) => self.handler.committed(&revoked),
                Err(e) => tracing::warn!(error = %e, "cannot build the commit for revoked partitions"),
            }
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(list) => {
                let assigned = partitions(list);
                tracing::info!(partitions = ?assigned, "partitions assigned");
                lock(&self.assigned).extend(assigned.iter().cloned());
                let ends: Vec<((String, i32), i64)> = assigned
                    .iter()
                    .filter_map(|(topic, partition)| match consumer.fetch_watermarks(topic, *partition, Duration::from_secs(10)) {
                        Ok((_, high)) => Some(((topic.clone(), *partition), high)),
                        Err(e) => {
                            tracing::warn!(topic, partition, error = %e, "cannot read where the partition ends; a recreated topic goes unnoticed");
                            None
                        }
                    })
                    .collect();
                // After `assigned`, which may take over the offsets another instance read to.
                self.handler.assigned(&assigned);
                self.handler.log_ends(&ends);
            }
            Rebalance::Revoke(_) => {}
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
        }
    }
}

/// When this member last asked the group for records. A member that does not ask within
/// `max.poll.interval.ms` is put out of the group and its partitions go to another member, which
/// counts them from the last checkpoint: a checkpoint committed after that counts their stories twice.
pub struct Polls {
    last: std::sync::Mutex<std::time::Instant>,
    /// `max.poll.interval.ms`.
    interval: Duration,
}

impl Polls {
    pub fn new(properties: &BTreeMap<String, EnvString>) -> Polls {
        // librdkafka refuses a value that does not parse when the consumer is created.
        let ms = properties.get("max.poll.interval.ms").and_then(|v| v.as_str().trim().parse().ok()).unwrap_or(300_000);
        Polls { last: std::sync::Mutex::new(std::time::Instant::now()), interval: Duration::from_millis(ms) }
    }

    /// `max.poll.interval.ms`.
    pub fn interval(&self) -> Duration {
        self.interval
    }

    fn polled(&self) {
        *lock(&self.last) = std::time::Instant::now();
    }

    /// Why a commit now could land after the group moved the partitions: set once half of
    /// `max.poll.interval.ms` has passed since the last poll began (the other half is for the
    /// commit itself, and a rebalance takes no less).
    pub fn overdue(&self) -> Option<String> {
        let silent = lock(&self.last).elapsed();
        (silent >= self.interval / 2).then(|| {
            format!(
                "this instance did not poll Kafka for {:.1} s, more than half of max.poll.interval.ms ({} ms)",
                silent.as_secs_f64(),
                self.interval.as_millis()
            )
        })
    }
}

pub struct KafkaSource {
    consumer: BaseConsumer<GroupContext>,
    /// Kept where a checkpoint asks them (instances sharing a storage).
    polls: Option<Arc<Polls>>,
    /// Set once the brokers answered a metadata request.
    reached: bool,
    /// The subscribed topics given by name (not `^` patterns), and when the brokers were last
    /// asked whether they have them.
    named: Vec<String>,
    looked: Option<std::time::Instant>,
    /// Whether the brokers had all of them when last asked.
    all_found: bool,
}

/// How often the source asks the brokers whether the topics it reads exist while one is missing;
/// once all are there, every [`LOOK_EVERY_FOUND`] (a full metadata request, on the pipeline
/// thread: large on a cluster of many topics).
const LOOK_EVERY: Duration = Duration::from_secs(10);
const LOOK_EVERY_FOUND: Duration = Duration::from_secs(60);

impl KafkaSource {
    pub fn subscribe(
        brokers: &str,
        properties: &BTreeMap<String, EnvString>,
        group_id: &str,
        topics: &[String],
        start: StartOffset,
        handler: Arc<dyn GroupHandler>,
        trouble: Arc<Trouble>,
        polls: Option<Arc<Polls>>,
    ) -> Result<KafkaSource, SourceError> {
        let mut config = client_config(brokers, properties);
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "false")
            .set("enable.partition.eof", "false")
            .set("statistics.interval.ms", properties.get("statistics.interval.ms").map_or("5000", |v| v.as_str()))
            // What librdkafka prefetches beyond the stories in flight (its default is 64 MiB); it
            // stops fetching there, which is the source's back-pressure when the classifier is slow.
            .set("queued.max.messages.kbytes", properties.get("queued.max.messages.kbytes").map_or("16384", |v| v.as_str()))
            .set("auto.offset.reset", match start {
                StartOffset::Earliest => "earliest",
                StartOffset::Latest => "latest",
            });
        let consumer: BaseConsumer<GroupContext> = config
            .create_with_context(GroupContext { handler, reported: Default::default(), assigned: Default::default(), start, from_beginning: Default::default(), trouble })
            .map_err(|e| SourceError::KafkaConfig(e.to_string()))?;
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        consumer.subscribe(&names).map_err(|e| SourceError::KafkaConfig(e.to_string()))?;
        let named = topics.iter().filter(|t| !t.starts_with('^')).cloned().collect();
        Ok(KafkaSource { consumer, polls, reached: false, named, looked: None, all_found: false })
    }

    /// Tells `Trouble` which subscribed topics the brokers do not have: librdkafka reports a
    /// missing topic once and then waits for it, so a misspelt name was one log line.
    fn look_for_topics(&mut self) {
        let Ok(metadata) = self.consumer.fetch_metadata(None, Duration::from_millis(500)) else { return };
        let there: BTreeSet<&str> = metadata.topics().iter().filter(|t| t.error().is_none()).map(|t| t.name()).collect();
        let absent: Vec<String> = self.named.iter().filter(|t| !there.contains(t.as_str())).cloned().collect();
        self.all_found = absent.is_empty();
        self.consumer.context().trouble.absent(absent);
    }
}

impl Source for KafkaSource {
    fn poll(&mut self, timeout: Duration) -> Result<Option<Record>, SourceError> {
        if let Some(polls) = &self.polls {
            polls.polled();
        }
        // Patterns (`^…`) match what there is: only topics named outright can be missing.
        let every = if self.all_found { LOOK_EVERY_FOUND } else { LOOK_EVERY };
        if !self.named.is_empty() && self.looked.is_none_or(|at| at.elapsed() >= every) {
            self.looked = Some(std::time::Instant::now());
            self.look_for_topics();
        }
        match self.consumer.poll(timeout) {
            None => Ok(None),
            Some(Ok(message)) => Ok(Some(Record {
                topic: Arc::from(message.topic()),
                partition: message.partition(),
                offset: message.offset(),
                payload: message.payload().unwrap_or_default().to_vec(),
                from_kafka: true,
                cut_from: None,
            })),
            Some(Err(e)) => {
                // librdkafka reconnects and retries by itself; these are reports, not failures.
                crate::telemetry::errors("source", 1);
                if let Some(held) = self.consumer.context().trouble.report(&e.to_string()) {
                    tracing::warn!(error = %e, "kafka consumer{}", crate::telemetry::held_back(held));
                }
                Ok(None)
            }
        }
    }

    fn finished(&self) -> bool {
        false
    }

    fn commit(&mut self, offsets: &Offsets) -> Result<(), SourceError> {
        let assignment = self.consumer.assignment().map_err(|e| SourceError::Kafka(e.to_string()))?;
        // Only what this member owns: committing a partition it lost would rewind its new owner.
        let owned = partitions(&assignment);
        let list = offsets_list(offsets, Some(&owned)).map_err(|e| SourceError::Kafka(e.to_string()))?;
        if list.count() == 0 {
            return Ok(());
        }
        match self.consumer.commit(&list, CommitMode::Sync) {
            Ok(()) => Ok(()),
            // Not allowed to commit: no retry helps.
            Err(e @ KafkaError::ConsumerCommit(RDKafkaErrorCode::GroupAuthorizationFailed | RDKafkaErrorCode::TopicAuthorizationFailed)) => {
                Err(SourceError::Kafka(e.to_string()))
            }
            // Broker or coordinator away (a restart, a network blip): the checkpoint already holds
            // these offsets, so records before them are skipped after a crash; the next checkpoint's
            // commit carries them (or later ones) again.
            Err(e) => {
                tracing::warn!(error = %e, "offset commit failed; retried at the next checkpoint");
                crate::telemetry::errors("source", 1);
                Ok(())
            }
        }
    }

    fn describe(&self) -> String {
        match self.consumer.assignment() {
            Ok(list) => format!("{} partitions", list.count()),
            Err(_) => "no assignment".into(),
        }
    }

    fn connected(&mut self) -> bool {
        if !self.reached {
            self.reached = self.consumer.client().fetch_metadata(None, Duration::from_millis(500)).is_ok();
        }
        self.reached
    }
}

/// The most bearwatch puts in one message of its own output topics (dead letters, the scored
/// sink): under the 1 MB a topic takes by default (`max.message.bytes`), so that what the input
/// makes large is cut by us, not refused by the broker.
pub const MAX_OUTPUT_BYTES: usize = 900 * 1024;

/// Deliveries that failed after librdkafka's own retries, since the last [`Output::flush`], with
/// the first one's topic and error.
#[derive(Default, Clone)]
pub struct DeliveryReport {
    failed: Arc<std::sync::Mutex<(u64, Option<String>)>>,
    logged: Arc<crate::telemetry::Repeats>,
}

impl ClientContext for DeliveryReport {
    /// As the consumer's: logged at most every half minute per kind while it repeats.
    fn error(&self, error: KafkaError, reason: &str) {
        if let Some(held) = self.logged.admit(&format!("{error}: {reason}")) {
            tracing::error!(target: "rdkafka::client", "librdkafka: {error}: {reason}{}", crate::telemetry::held_back(held));
        }
    }
}

impl ProducerContext for DeliveryReport {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, message)) = result {
            let mut failed = lock(&self.failed);
            failed.0 += 1;
            failed.1.get_or_insert_with(|| format!("{}: {e}", message.topic()));
            crate::telemetry::errors("producer", 1);
            if let Some(held) = self.logged.admit(&format!("{}: {e}", message.topic())) {
                tracing::error!(error = %e, topic = message.topic(), "kafka delivery failed{}", crate::telemetry::held_back(held));
            }
        }
    }
}

/// Where an output that may name its own cluster connects (the `[sink]`, a kafka receiver): with
/// its own `brokers`, with its own properties; else with the source's brokers and the source's
/// properties (the same cluster takes the same login) and its own on top. None where neither
/// names brokers.
pub fn output_connection(
    brokers: Option<&EnvString>,
    properties: &BTreeMap<String, EnvString>,
    source: Option<(&str, &BTreeMap<String, EnvString>)>,
) -> Option<(String, BTreeMap<String, EnvString>)> {
    match (brokers, source) {
        (Some(brokers), _) => Some((brokers.as_str().to_string(), properties.clone())),
        (None, Some((brokers, inherited))) => {
            let mut all = inherited.clone();
            all.extend(properties.clone());
            Some((brokers.to_string(), all))
        }
        (None, None) => None,
    }
}

/// A producer for bearwatch's own output topics; sends never block the pipeline.
pub struct Output {
    producer: ThreadedProducer<DeliveryReport>,
    report: DeliveryReport,
}

impl Output {
    pub fn connect(brokers: &str, properties: &BTreeMap<String, EnvString>) -> Result<Output, SourceError> {
        let report = DeliveryReport::default();
        let mut config = client_config(brokers, properties);
        // Defaults that the properties may change (they were set over them).
        for (key, value) in [("message.max.bytes", "4194304"), ("linger.ms", "5")] {
            if !properties.contains_key(key) {
                config.set(key, value);
            }
        }
        let producer = config.create_with_context(report.clone()).map_err(|e| SourceError::KafkaConfig(e.to_string()))?;
        Ok(Output { producer, report })
    }

    pub fn send(&self, topic: &str, key: &[u8], payload: &[u8], headers: Option<OwnedHeaders>) -> Result<(), SourceError> {
        let mut record = BaseRecord::to(topic).key(key).payload(payload);
        if let Some(headers) = headers {
            record = record.headers(headers);
        }
        loop {
            match self.producer.send(record) {
                Ok(()) => return Ok(()),
                Err((KafkaError::MessageProduction(rdkafka::types::RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => return Err(SourceError::Kafka(format!("cannot send to {topic}: {e}"))),
            }
        }
    }

    /// Waits until everything sent so far is delivered or failed for good, and fails if any
    /// delivery failed since the last flush: a caller that commits input after a flush (a
    /// checkpoint) must not commit what never reached its topic. librdkafka hands a failure back
    /// only through the delivery report, so without this a refused message (too large for the
    /// topic, a topic that does not exist, no authorization) was logged and its input committed.
    pub fn flush(&self, timeout: Duration) -> Result<(), SourceError> {
        self.producer.flush(timeout).map_err(|e| SourceError::Kafka(format!("flush: {e}")))?;
        match std::mem::take(&mut *lock(&self.report.failed)) {
            (0, _) => Ok(()),
            (count, first) => Err(SourceError::Kafka(format!("{count} messages were not delivered; the first to {}", first.unwrap_or_default()))),
        }
    }
}
